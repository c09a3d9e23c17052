"""The caches a run reads instead of recomputing: split images as uint8 batches on the training
device, and the frozen image encoder's features of every split image.

The frozen features serve stage 1 (both towers frozen, so the image side is computed once), the
stage-2 description cache and the zero-shot baseline. They are computed once per key (split,
backbone, weights, input, preprocessing) and shared between runs and concurrent trials.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from indivaid.data.augment import AugmentConfig, normalize
from indivaid.data.imagecache import PREPROCESS_VERSION, ImageCache
from indivaid.data.split import Split
from indivaid.models.head import inference_feature
from indivaid.training import checkpoint as ckpt
from indivaid.training.config import TrainConfig
from indivaid.training.runtime import Runtime
from indivaid.utils.io import data_root, file_lock, sha256_file, stable_hash

if TYPE_CHECKING:
    from indivaid.training.system import ReIDSystem

log = logging.getLogger(__name__)


def cache_root(cfg: TrainConfig) -> Path:
    """Where image, feature and weight caches live (shared between runs)."""
    return Path(cfg.data.cache_dir).expanduser().resolve() if cfg.data.cache_dir else data_root(cfg.data.data_root) / "cache"


class ImageSource:
    """uint8 batches on the training device; small sets live on the GPU whole (no host copies)."""

    def __init__(self, cache: ImageCache, rows: np.ndarray, device: torch.device, device_budget_gb: float = 8.0) -> None:
        self.cache, self.rows, self.device = cache, rows, device
        nbytes = len(rows) * int(np.prod(cache.array.shape[1:]))
        self.resident = cache[rows].to(device) if device.type == "cuda" and nbytes <= device_budget_gb * 2**30 else None

    def __call__(self, idx: np.ndarray | Tensor) -> Tensor:
        if self.resident is not None:
            return self.resident[torch.as_tensor(idx).to(self.device)]
        if isinstance(idx, Tensor):
            idx = idx.cpu().numpy()
        batch = self.cache[self.rows[idx]]
        if self.device.type == "cuda":
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)


def weights_id(cfg: TrainConfig) -> str:
    """What the frozen image weights are: an open_clip tag, a file hash, or the random-init seed."""
    pre = cfg.model.pretrained
    if pre is None:
        return f"random-seed{cfg.runtime.seed}"
    path = Path(pre).expanduser()
    return f"file-{sha256_file(path)[:16]}" if path.is_file() else f"tag-{pre}"


@torch.no_grad()
def image_features(system: ReIDSystem, source: Callable[[np.ndarray], Tensor], n: int, rt: Runtime, batch: int,
                   cameras: Tensor | None = None, *, after_bn: bool = False, part_norm: bool = False,
                   aug: AugmentConfig = AugmentConfig()) -> Tensor:
    """Inference features (concat f12, fproj; fp32) of ``n`` images, in eval mode."""
    was_training = system.training
    system.eval()
    out = []
    for s in range(0, n, batch):
        idx = np.arange(s, min(n, s + batch))
        x = normalize(source(idx), aug)
        cams = cameras[idx].to(rt.device) if cameras is not None else None
        with rt.autocast():
            f = system.image(x, cams)
        out.append(inference_feature(f, system.head, after_bn=after_bn, part_norm=part_norm))
    system.train(was_training)
    return torch.cat(out)


def feature_cache_path(cfg: TrainConfig, split: Split, rt: Runtime) -> Path:
    """Where the frozen-encoder features of this split, backbone, weights and preprocessing live."""
    m = cfg.model
    key = stable_hash({"split": split.hash, "backbone": m.backbone, "weights": weights_id(cfg), "size": list(m.input_size),
                       "stride": m.stride, "sie": m.sie, "dtype": str(rt.amp_dtype), "resize": cfg.data.resize,
                       "preprocess": PREPROCESS_VERSION, "quick_gelu": m.quick_gelu,
                       "normalize": [list(cfg.augment.mean), list(cfg.augment.std)]})
    return cache_root(cfg) / f"features-{key}.pt"


def frozen_feature_cache(system: ReIDSystem, cfg: TrainConfig, split: Split, images: ImageCache, rt: Runtime,
                         origin: str = "train") -> dict[str, Tensor]:
    """Frozen-encoder features of every image of the split (computed once per key, then loaded).

    Each computation appends a line (key, images, seconds, host, pid, ``origin``) to
    ``features.jsonl`` beside the cache: the provenance of the file, and how often it was made.
    """
    path = feature_cache_path(cfg, split, rt)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    with file_lock(path.with_name(f".{path.name}.lock")):  # concurrent trials compute it once
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True)
        t0 = time.perf_counter()
        feats = _compute_frozen_features(system, cfg, split, images, rt, path)
        entry = {"file": path.name, "split": split.hash, "images": len(feats["image_ids"]), "origin": origin,
                 "seconds": round(time.perf_counter() - t0, 3), "host": socket.gethostname(), "pid": os.getpid(),
                 "time": time.time()}
        with open(path.parent / "features.jsonl", "a") as f:  # one short O_APPEND write per line
            f.write(json.dumps(entry) + "\n")
        return feats


def _compute_frozen_features(system: ReIDSystem, cfg: TrainConfig, split: Split, images: ImageCache, rt: Runtime,
                             path: Path) -> dict[str, Tensor]:
    rows = images.rows(split.table["image_id"].to_list())
    # Before BN and unnormalised, the inference feature is exactly concat(f12, fproj).
    both = image_features(system, ImageSource(images, rows, rt.device, 0), len(rows), rt, cfg.eval.batch_size,
                          aug=cfg.augment).cpu()
    f12, fproj = both.split([system.image.width, system.image.embed_dim], dim=1)
    feats = {"f12": f12.contiguous(), "fproj": fproj.contiguous(), "image_ids": split.table["image_id"].to_list()}
    ckpt.save(feats, path)  # atomic: ranks that computed it too write the same bytes
    log.info("cached frozen image features of %d images: %s", len(rows), path.name)
    return feats
