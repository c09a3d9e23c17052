"""Training-free baselines every leaderboard should show.

The raw-pixel nearest neighbour says how much of a dataset is solvable by matching colours and
layouts alone: a trained model that does not beat it has learned nothing about individuals.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from indivaid.data.imagecache import ImageCache


def raw_pixel_features(images: Tensor, size: tuple[int, int] = (32, 16)) -> Tensor:
    """uint8 ``B x 3 x H x W`` -> area-downsampled, per-image standardised, flattened pixels."""
    x = F.interpolate(images.float() / 255.0, size=size, mode="area")
    x = x.flatten(1)
    return (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True).clamp_min(1e-6)


def cached_raw_pixel_features(cache: ImageCache, image_ids: list[str], size: tuple[int, int] = (32, 16),
                              batch: int = 512) -> Tensor:
    rows = cache.rows(image_ids)
    return torch.cat([raw_pixel_features(cache[rows[i : i + batch]], size) for i in range(0, len(rows), batch)])
