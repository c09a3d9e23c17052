"""Learning-rate schedules against the reference schedulers, written out plainly, and their config checks."""

from __future__ import annotations

import math
from bisect import bisect_right

import pytest

from indivaid.training import resolve
from indivaid.training.config import preset_names
from indivaid.training.schedule import cosine_with_warmup, milestone_epochs, warmup_multistep


def reference_warmup_multistep_lr(base_lr: float, last_epoch: int, milestones: list[int], gamma: float,
                                  warmup_factor: float, warmup_iters: int) -> float:
    """CLIP-ReID's ``WarmupMultiStepLR.get_lr`` (linear warm-up) at scheduler position ``last_epoch``."""
    factor = 1.0
    if last_epoch < warmup_iters:
        alpha = last_epoch / warmup_iters
        factor = warmup_factor * (1 - alpha) + alpha
    return base_lr * factor * gamma ** bisect_right(milestones, last_epoch)


def reference_stage2_lrs(base_lr: float, epochs: int, milestones: list[int], gamma: float = 0.1,
                         warmup_factor: float = 0.1, warmup_iters: int = 10) -> list[float]:
    """The reference stage-2 loop: the scheduler starts at last_epoch 0 and ``scheduler.step()``
    runs at the top of every epoch ``for epoch in range(1, epochs + 1)``."""
    last_epoch, lrs = 0, []
    for _ in range(1, epochs + 1):
        last_epoch += 1
        lrs.append(reference_warmup_multistep_lr(base_lr, last_epoch, milestones, gamma, warmup_factor, warmup_iters))
    return lrs


def reference_timm_cosine_lr(t: int, base_lr: float, t_initial: int, lr_min: float, warmup_t: int,
                             warmup_lr_init: float) -> float:
    """timm ``CosineLRScheduler._get_lr`` as the reference builds it (t_mul 1, cycle_limit 1, no
    warm-up prefix, no noise), evaluated by ``scheduler.step(epoch)`` at the top of epoch t (1-based)."""
    if t < warmup_t:
        return warmup_lr_init + t * (base_lr - warmup_lr_init) / warmup_t
    cycle = t // t_initial
    if cycle >= 1:  # past the single cycle
        return lr_min
    t_curr = t - t_initial * cycle
    return lr_min + 0.5 * (base_lr - lr_min) * (1 + math.cos(math.pi * t_curr / t_initial))


@pytest.mark.parametrize("epochs,milestones,warmup", [(60, [30, 50], 10), (15, [30, 50], 10), (40, [12, 20, 33], 5),
                                                      (8, [3], 0), (20, [11], 1)])
def test_stage2_schedule_matches_the_reference_warmup_multistep(epochs: int, milestones: list[int], warmup: int):
    ours = [5e-6 * warmup_multistep(e, warmup, 0.1, milestones, 0.1) for e in range(epochs)]  # 0-based loop index
    assert ours == pytest.approx(reference_stage2_lrs(5e-6, epochs, milestones, warmup_iters=warmup), rel=1e-12)


def test_stage2_first_epoch_and_first_decay_are_the_reference_ones():
    f = [warmup_multistep(e, 10, 0.1, [30, 50], 0.1) for e in range(60)]  # f[i] is 1-based epoch i + 1
    assert f[0] == pytest.approx(0.19) and f[8] == pytest.approx(0.91) and f[9] == 1.0
    assert f[28] == 1.0 and f[29] == pytest.approx(0.1) and f[48] == pytest.approx(0.1) and f[49] == pytest.approx(0.01)


@pytest.mark.parametrize("total,warmup,init", [(120, 5, 1e-5), (10, 5, 1e-4), (40, 5, 1e-5), (7, 0, 1e-5), (3, 5, 1e-5)])
def test_stage1_schedule_matches_timm_cosine_with_warmup_from_warmup_lr_init(total: int, warmup: int, init: float):
    ours = [cosine_with_warmup(e, total, warmup, 3.5e-4, 1e-6, init) for e in range(total)]
    ref = [reference_timm_cosine_lr(t, 3.5e-4, total, 1e-6, warmup, init) for t in range(1, total + 1)]
    assert ours == pytest.approx(ref, rel=1e-12)


def test_stage1_schedule_agrees_with_timm_itself_when_installed():
    timm_scheduler = pytest.importorskip("timm.scheduler")
    import torch

    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=3.5e-4)
    sched = timm_scheduler.CosineLRScheduler(opt, t_initial=30, lr_min=1e-6, cycle_mul=1.0, cycle_decay=0.1,
                                             warmup_lr_init=1e-5, warmup_t=5, cycle_limit=1, t_in_epochs=True)
    for epoch in range(1, 31):  # the reference's stage-1 loop
        sched.step(epoch)
        assert opt.param_groups[0]["lr"] == pytest.approx(cosine_with_warmup(epoch - 1, 30, 5, 3.5e-4, 1e-6, 1e-5))


def test_fraction_milestones_resolve_against_the_run():
    assert milestone_epochs([0.5, 0.8333], "fraction", 60) == [30, 50]
    assert milestone_epochs([30, 50], "epoch", 15) == [30, 50]


@pytest.mark.parametrize("stage2,message", [
    ({"milestone_unit": "epoch", "milestones": [10, 50]}, r"stage2.milestones: \[10.0\] come at or before the end of the 10-epoch warm-up"),
    ({"milestone_unit": "epoch", "milestones": [4, 50], "warmup_epochs": 4}, r"\[4.0\] come at or before .* 4-epoch warm-up"),
    ({"epochs": 15, "milestones": [0.5, 0.8333]}, r"fractions of stage2.epochs=15: epochs \[8, 12\]\).*shorten stage2.warmup_epochs"),
    ({"milestone_unit": "epoch", "milestones": [50, 30]}, r"stage2.milestones: \[50.0, 30.0\] must be in increasing order"),
])
def test_milestones_at_or_before_the_warmup_end_are_rejected(stage2: dict, message: str):
    with pytest.raises(ValueError, match=message):
        resolve({"model": {"backbone": "tiny", "pretrained": None}, "stage2": stage2})


def test_milestones_after_the_warmup_and_untrained_runs_pass():
    ok = resolve({"model": {"backbone": "tiny", "pretrained": None},
                  "stage2": {"milestone_unit": "epoch", "milestones": [11, 50], "epochs": 12}})
    assert ok.stage2.milestones == (11, 50)
    assert resolve({"method": "zeroshot", "stage2": {"epochs": 2}}).method == "zeroshot"  # no stage 2 to schedule
    assert resolve({"stage2": {"epochs": 2, "warmup_epochs": 0}}).stage2.epochs == 2


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_passes_validation(preset: str):
    cfg = resolve({"preset": preset})
    warmup = cfg.stage2.warmup_epochs
    assert all(m > warmup for m in milestone_epochs(cfg.stage2.milestones, cfg.stage2.milestone_unit, cfg.stage2.epochs))
    assert cfg.stage1.warmup_lr_init >= 0 and cfg.model.stride is not None
