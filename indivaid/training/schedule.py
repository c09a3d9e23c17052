"""Per-epoch learning rates, as the references step their schedulers: once at the start of each
epoch, counting epochs from 1.

Both functions take the 0-based index of the epoch about to run (the trainer's loop variable) and
evaluate the reference scheduler at the 1-based epoch ``epoch + 1``. That is why stage 2's first
epoch runs at 0.19x (not 0.1x) with a 10-epoch warm-up from 0.1, and why a milestone m lowers the
rate from 1-based epoch m on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def cosine_with_warmup(epoch: int, total: int, warmup: int, base_lr: float, lr_min: float,
                       warmup_lr_init: float) -> float:
    """Stage 1 (timm ``CosineLRScheduler``, one cycle, no warm-up prefix): linear from
    ``warmup_lr_init`` over ``warmup`` epochs, cosine from ``base_lr`` to ``lr_min`` over ``total``
    epochs (counted from epoch 0, warm-up included), ``lr_min`` from epoch ``total`` on."""
    t = epoch + 1
    if t < warmup:
        return warmup_lr_init + t * (base_lr - warmup_lr_init) / warmup
    if t >= total:
        return lr_min
    return lr_min + 0.5 * (base_lr - lr_min) * (1 + math.cos(math.pi * t / total))


def warmup_multistep(epoch: int, warmup: int, warmup_factor: float, milestones: Sequence[int], gamma: float) -> float:
    """Stage 2 (the references' ``WarmupMultiStepLR``, linear warm-up): the lr factor, rising
    linearly from ``warmup_factor`` to 1 over ``warmup`` epochs, times ``gamma`` per milestone
    reached (a milestone m counts from 1-based epoch m)."""
    t = epoch + 1
    factor = 1.0
    if t < warmup:
        alpha = t / warmup
        factor = warmup_factor * (1 - alpha) + alpha
    return factor * gamma ** sum(t >= m for m in milestones)


def milestone_epochs(milestones: Sequence[float], unit: str, epochs: int) -> list[int]:
    """1-based epochs from which each milestone applies (fractions are of the stage-2 run)."""
    if unit == "epoch":
        return [int(m) for m in milestones]
    return [max(1, round(m * epochs)) for m in milestones]
