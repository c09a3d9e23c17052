"""Per-epoch learning-rate factors (the references step their schedulers once per epoch)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def cosine_with_warmup(epoch: int, total: int, warmup: int, base_lr: float, lr_min: float) -> float:
    """Stage 1: linear warm-up from lr_min, then cosine decay to lr_min; returns the lr."""
    if warmup > 0 and epoch < warmup:
        return lr_min + (base_lr - lr_min) * (epoch + 1) / (warmup + 1)
    t = (epoch - warmup) / max(1, total - warmup)
    return lr_min + 0.5 * (base_lr - lr_min) * (1 + math.cos(math.pi * min(1.0, t)))


def warmup_multistep(epoch: int, warmup: int, warmup_factor: float, milestones: Sequence[int], gamma: float) -> float:
    """Stage 2: factor rising linearly warmup_factor -> 1 over ``warmup`` epochs, times gamma per milestone passed."""
    w = 1.0
    if warmup > 0 and epoch < warmup:
        alpha = epoch / warmup
        w = warmup_factor * (1 - alpha) + alpha
    return w * gamma ** sum(epoch >= m for m in milestones)


def milestone_epochs(milestones: Sequence[float], unit: str, epochs: int) -> list[int]:
    if unit == "epoch":
        return [int(m) for m in milestones]
    return [max(1, round(m * epochs)) for m in milestones]
