"""Checks of a sweep's whole plan before anything runs: every dataset, every trained method, the
base config and each searched value, one line per problem naming the dataset, the key and the fix.

They catch what would otherwise fail (or silently waste GPU-hours) inside trials on a cluster: a
P×K batch wider than the training identities, a batch that does not split across DDP ranks, a
learning-rate decay inside the warm-up, ASHA rungs that judge stale scores, GPUs reserved but unused,
or a trial that needs more GPUs than the cluster has.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from harness.config import SweepConfig, applies, trial_config
from harness.estimate import ImageCounts, image_counts
from harness.plan import input_variants
from indivaid.config import ConfigError
from indivaid.models.backbone import weights_mismatch
from indivaid.methods import METHODS
from indivaid.training import TrainConfig
from indivaid.training.schedule import milestone_epochs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    dataset: str
    key: str
    message: str  # what is wrong, then the fix

    def __str__(self) -> str:
        return f"{self.dataset}: {self.key}: {self.message}"


def asha_rungs(grace: int, factor: int, max_t: int) -> list[int]:
    """The stage-2 epochs at which ASHA compares trials (grace × factor^k below ``max_t``)."""
    rungs, r = [], grace
    while r < max_t:
        rungs.append(r)
        r *= factor
    return rungs


def gpus_per_trial(sweep: SweepConfig, dataset: str, method: str | None = None) -> float:
    """GPUs one trial of ``dataset`` (and ``method``) holds: its own, or each of its Ray Train workers'."""
    res = sweep.resources_for(dataset, method)
    return res.gpus * max(1, res.workers)


def _variants(sweep: SweepConfig, dataset: str, method: str) -> tuple[list[tuple[str, TrainConfig]], list[Problem]]:
    """(label, config) of the base config and of each searched value that applies to ``method``, and
    the problems of those the trainer's own config checks refuse."""
    params: list[tuple[str, dict[str, Any]]] = [("", {})]
    combos = [v for v in input_variants(sweep, method) if v]  # searched backbones x weights: every pair
    for key, spec in sweep.search_space.items():
        if applies(key, METHODS.get(method)) and not any(key in v for v in combos):
            params += [(f" (searched {key}={v})", {key: v}) for v in spec.samples()]
    params += [(" (searched " + ", ".join(f"{k}={v}" for k, v in combo.items()) + ")", combo) for combo in combos]
    out, problems = [], []
    for where, p in params:
        try:
            out.append((where, trial_config(sweep, dataset, method, p)))
        except ConfigError as e:  # "<dataset>/<method>: [TrainConfig: ]<key>: <message>"
            text = str(e).split(": ", 1)[-1].removeprefix("TrainConfig: ")
            key, _, message = text.partition(": ")
            problems.append(Problem(dataset, key, message + where))
    return out, problems


def _batch_problems(d: str, cfg: TrainConfig, where: str, counts: ImageCounts | None, workers: int) -> list[Problem]:
    out = []
    for stage in ("stage1", "stage2"):
        p = getattr(cfg, stage).batch_p
        if counts is not None and counts.train_ids and p > counts.train_ids:
            out.append(Problem(d, f"{stage}.batch_p", f"P={p}{where} exceeds the {counts.train_ids} training identities "
                               f"left after the validation carve ({counts.source} counts); set "
                               f"per_dataset.{d}.{stage}.batch_p <= {counts.train_ids}"))
        if workers > 1 and p % workers:
            out.append(Problem(d, f"{stage}.batch_p", f"P={p}{where} does not split across the {workers} DDP workers "
                               f"(each rank takes P/{workers} identities of one global batch); use a multiple of {workers}"))
    return out


def _weights_problems(d: str, cfg: TrainConfig, where: str) -> list[Problem]:
    """Weights that cannot fit the backbone (an open_clip tag of another model, a hub repo of another
    architecture), found offline, before any trial builds the model."""
    why = weights_mismatch(cfg.model.backbone, cfg.model.pretrained)
    return [Problem(d, "model.pretrained", why + where)] if why else []


def _schedule_problems(d: str, cfg: TrainConfig, where: str) -> list[Problem]:
    s2 = cfg.stage2
    bad = [m for m in milestone_epochs(s2.milestones, s2.milestone_unit, s2.epochs) if m <= s2.warmup_epochs]
    if not bad:
        return []
    return [Problem(d, "stage2.milestones", f"decay at epoch {bad[0]}{where} falls inside the {s2.warmup_epochs}-epoch "
                    f"warm-up, so the lr never reaches its base; move the milestones after epoch {s2.warmup_epochs} "
                    f"or shorten stage2.warmup_epochs")]


def _asha_problems(sweep: SweepConfig, d: str, cfg: TrainConfig, where: str) -> list[Problem]:
    sch = sweep.scheduler
    out = []
    if sch.grace_period < cfg.stage2.warmup_epochs:
        out.append(Problem(d, "scheduler.grace_period", f"{sch.grace_period} is shorter than the stage-2 warm-up "
                           f"({cfg.stage2.warmup_epochs} epochs{where}): ASHA would judge warming-up trials; raise it"))
    every, epochs = cfg.eval.every, cfg.stage2.epochs
    stale = [r for r in asha_rungs(sch.grace_period, sch.reduction_factor, epochs + 1) if r % every and r != epochs]
    if stale:
        out.append(Problem(d, "scheduler.grace_period", f"ASHA rung at stage-2 epoch {stale[0]} is not an evaluation "
                           f"epoch (eval.every {every}{where}), so trials would be compared on a stale validation "
                           f"score; make grace_period × reduction_factor^k multiples of eval.every"))
    return out


def _resource_problems(sweep: SweepConfig, d: str, cluster_gpus: float | None,
                       cluster_cpus: float | None) -> list[Problem]:
    res = sweep.resources_for(d)
    key = f"dataset_resources.{d}" if d in sweep.dataset_resources else "resources"
    out = []
    if res.gpus > 0 and not res.use_gpu:
        out.append(Problem(d, f"{key}.use_gpu", f"false with gpus: {res.gpus:g}: Ray would reserve GPUs the trainer "
                           "never uses; set use_gpu: true, or gpus: 0 for a CPU sweep"))
    if res.gpus > 1 and res.gpus != int(res.gpus):
        out.append(Problem(d, f"{key}.gpus", f"{res.gpus:g}: Ray gives a task a fraction of one GPU (e.g. 0.5: two "
                           "trials share a GPU) or whole GPUs, not a mix; use a whole number, or workers for more GPUs"))
    need = gpus_per_trial(sweep, d)
    if cluster_gpus is not None and need > cluster_gpus:
        out.append(Problem(d, key, f"one trial needs {need:g} GPUs, the cluster has {cluster_gpus:g}: it could never "
                           "start; lower workers/gpus or add GPU nodes"))
    cpus = res.cpus * max(1, res.workers)  # a Train run's driving trial holds no CPU (harness.tuning)
    if cluster_cpus is not None and cpus > cluster_cpus:
        out.append(Problem(d, key, f"one trial needs {cpus:g} CPUs, the cluster has {cluster_cpus:g}: it could never "
                           "start; lower cpus/workers"))
    return out


def check_sweep(sweep: SweepConfig, *, cluster_gpus: float | None = None, cluster_cpus: float | None = None,
                counts: dict[str, ImageCounts | None] | None = None) -> list[Problem]:
    """Every problem of the sweep's plan (empty when it can run as written)."""
    problems: list[Problem] = []
    trained = [m for m in sweep.methods if METHODS.get(m).train]
    for d in sweep.datasets:
        problems += _resource_problems(sweep, d, cluster_gpus, cluster_cpus)
        c = None
        if trained:
            try:
                c = counts[d] if counts is not None else image_counts(trial_config(sweep, d, trained[0], {}))
            except ConfigError:
                pass  # the config itself is refused: reported below
        workers = sweep.resources_for(d).workers
        seen: set[str] = set()
        for m in sweep.methods:
            variants, found = _variants(sweep, d, m)
            for where, cfg in variants:
                found += _weights_problems(d, cfg, where)
                if m not in trained:
                    continue
                found += _batch_problems(d, cfg, where, c, workers) + _schedule_problems(d, cfg, where)
                if sweep.scheduler.kind == "asha" and sweep.search_space:
                    found += _asha_problems(sweep, d, cfg, where)
            for p in found:
                if p.key not in seen:  # the first problem per key is enough to act on
                    seen.add(p.key)
                    problems.append(p)
    return problems


def validate(sweep: SweepConfig, source: Any = None, **kw: Any) -> None:
    """Raise :class:`ConfigError` with every problem, one self-contained line each."""
    problems = check_sweep(sweep, **kw)
    if problems:
        raise ConfigError("\n".join(f"{source}: {p}" if source else str(p) for p in problems))
