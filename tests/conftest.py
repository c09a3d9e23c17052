"""Shared fixtures: a small generated dataset (made once per test session) and image helpers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")

SMALL = dict(identities=30, min_images=5, max_images=8, height=48, width=80, seed=3)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def small_catalogue(data_root: Path):
    from indivaid.data import open_dataset

    return open_dataset("synthetic", data_root=data_root, **SMALL)


def write_image(path: Path, size: tuple[int, int] = (40, 24), seed: int = 0) -> Path:
    """A small random RGB JPEG/PNG (format from the suffix) of ``size`` = (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path
