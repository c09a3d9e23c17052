"""Decode every image once into a memory-mapped uint8 array.

Training never touches PIL: images are decoded, cropped to their bounding box and resized once
(in a thread pool; PIL releases the GIL while decoding) into ``N x 3 x H x W`` uint8, and batches
are gathered from that array and augmented as tensors on the training device (see
:mod:`indivaid.data.augment`). The cache is keyed by the split hash, size, resize policy and
preprocessing version, built atomically under a lock, and shared by every run with the same key.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import torch

from indivaid.data.catalogue import DataError, list_paths
from indivaid.data.split import Split
from indivaid.utils.io import atomic_write_text, file_lock, stable_hash
from indivaid_field.preprocess import LETTERBOX_FILL, load_image  # noqa: F401 (shared with ONNX Runtime inference)

log = logging.getLogger(__name__)

PREPROCESS_VERSION = 1
ResizePolicy = Literal["stretch", "letterbox"]


@dataclass(frozen=True)
class ImageSpec:
    """Stored image size and how images are fitted to it."""

    height: int = 256
    width: int = 128
    resize: ResizePolicy = "stretch"


def cache_key(split_hash: str, spec: ImageSpec) -> str:
    return stable_hash({"split": split_hash, "h": spec.height, "w": spec.width, "resize": spec.resize,
                        "version": PREPROCESS_VERSION})


class ImageCache:
    """Read access to a built cache: ``cache[indices]`` -> uint8 tensor ``B x 3 x H x W``."""

    def __init__(self, folder: Path) -> None:
        meta = json.loads((folder / "meta.json").read_text())
        self.folder = folder
        self.spec = ImageSpec(meta["height"], meta["width"], meta["resize"])
        self.image_ids: list[str] = meta["image_ids"]
        self.index = {im: i for i, im in enumerate(self.image_ids)}
        self.array = np.memmap(folder / "images.u8", np.uint8, "r", shape=(len(self.image_ids), 3, self.spec.height, self.spec.width))

    def __len__(self) -> int:
        return len(self.image_ids)

    def rows(self, image_ids: Sequence[str]) -> np.ndarray:
        """Row numbers of ``image_ids`` in the cache."""
        return np.fromiter((self.index[i] for i in image_ids), np.int64, len(image_ids))

    def __getitem__(self, rows: np.ndarray | Sequence[int] | torch.Tensor) -> torch.Tensor:
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")  # sorted reads are kinder to the page cache
        out = np.empty((len(rows), *self.array.shape[1:]), np.uint8)
        out[order] = self.array[rows[order]]
        return torch.from_numpy(out)


def build_image_cache(split: Split, spec: ImageSpec, cache_root: str | Path, *, workers: int | None = None) -> ImageCache:
    """Return the cache for ``split`` at ``spec``, building it if no run has yet."""
    folder = Path(cache_root) / f"images-{cache_key(split.hash, spec)}"
    if (folder / "meta.json").is_file():
        return ImageCache(folder)
    with file_lock(Path(cache_root) / f".images-{cache_key(split.hash, spec)}.lock"):
        if (folder / "meta.json").is_file():  # another process built it while we waited
            return ImageCache(folder)
        _build(split.table, spec, folder, workers or min(16, (os.cpu_count() or 1) * 2))
    return ImageCache(folder)


def _build(table: pl.DataFrame, spec: ImageSpec, folder: Path, workers: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    n = table.height
    tmp = folder / f"images.u8.tmp-{os.getpid()}"
    arr = np.memmap(tmp, np.uint8, "w+", shape=(n, 3, spec.height, spec.width))
    paths = table["path"].to_list()
    boxes = list(zip(*(table[c].to_list() for c in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"))))
    errors: list[str] = []

    def work(i: int) -> None:
        try:
            arr[i] = load_image(paths[i], boxes[i], spec)
        except Exception as e:  # collect every failure, report once
            errors.append(f"{paths[i]}: {type(e).__name__}: {e}")

    log.info("decoding %d images into %s (%dx%d, %s)", n, folder, spec.height, spec.width, spec.resize)
    try:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(work, range(n)))
        if errors:
            raise DataError(f"{len(errors)} images could not be decoded:{list_paths(sorted(errors))}\n"
                            "Fix or remove them (validate the catalogue with skip_bad to drop them).")
        arr.flush()
        del arr
        os.replace(tmp, folder / "images.u8")
    finally:
        if tmp.exists():
            tmp.unlink()
    meta = {"height": spec.height, "width": spec.width, "resize": spec.resize, "version": PREPROCESS_VERSION,
            "image_ids": table["image_id"].to_list()}
    atomic_write_text(folder / "meta.json", json.dumps(meta))
