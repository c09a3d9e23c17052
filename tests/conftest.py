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


_EXIT_STATUS: list[int] = []


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End the process with pytest's own status once everything has been reported.

    The suite loads Ray's core worker, torch (with gloo and OpenMP threads) and Ray's metrics
    agents into this one process; a full run once segfaulted in their native teardown at interpreter
    exit, after the summary line, turning a passing run into a failed one. Nothing is left to run
    here, so the teardown is skipped (the status is the one pytest computed, failures included).
    """
    import sys

    if _EXIT_STATUS:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
