"""The sweep's plan: its experiments (phase x dataset x method), their trial counts, the search
space each method gets, and the ``--dry-run`` table with sizes, resources and a GPU-hour estimate.

Nothing here starts Ray: ``--dry-run`` prints the plan on a laptop.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from harness.config import ParamSpec, ResourcesConfig, SweepConfig, applies, trial_config
from harness.ui import console
from indivaid.data.adapters import make_adapter
from indivaid.methods import METHODS


@dataclass(frozen=True)
class Experiment:
    """One Tune experiment: a phase (search or final) of one dataset x method."""

    phase: str
    dataset: str
    method: str

    @property
    def name(self) -> str:
        return f"{self.phase}-{self.dataset}-{self.method}"


def missing_datasets(sweep: SweepConfig) -> list[tuple[str, str]]:
    """(dataset, where it was looked for) for each dataset whose files are absent."""
    out = []
    for d in sweep.datasets:
        data = trial_config(sweep, d, sweep.methods[0], {}).data  # base, per-dataset and sweep settings
        adapter = make_adapter(d, **data.options)
        if adapter.generated:
            continue  # made on first use
        where = Path(data.path).expanduser() if data.path else adapter.default_path(sweep.data_path)
        if not where.exists():
            out.append((d, str(where)))
    return out


def search_space(sweep: SweepConfig, method: str) -> dict[str, Any]:
    """The sweep's search space as Tune domains, without the keys that do not apply to ``method``.

    A method that does not train (zero-shot) has nothing for TPE to learn from and costs one
    evaluation per value: its choices (a backbone, a weights tag) become a grid, every value run."""
    from ray import tune

    spec = METHODS.get(method)
    space = {}
    for key, p in sweep.search_space.items():
        if not applies(key, spec):
            continue  # e.g. fusion.heads for clipreid: nothing to search
        if p.kind == "grid" or (p.kind == "choice" and not spec.train):
            space[key] = tune.grid_search(p.labels())
        elif p.kind == "loguniform":
            space[key] = tune.loguniform(p.low, p.high)
        elif p.kind == "uniform":
            space[key] = tune.uniform(p.low, p.high)
        elif p.kind == "int":
            space[key] = tune.randint(int(p.low), int(p.high) + 1)
        else:
            space[key] = tune.choice(p.labels())
    return space


def grid_size(space: dict[str, Any]) -> int | None:
    """Trials a space made only of grids enumerates (their product); None when it samples."""
    if not space or not all(is_grid(v) for v in space.values()):
        return None
    return math.prod(len(v["grid_search"]) for v in space.values())


def is_grid(domain: Any) -> bool:
    return isinstance(domain, dict) and "grid_search" in domain


def search_trials(sweep: SweepConfig, method: str) -> int:
    """Trials of one search experiment: the grid's size, else num_samples (1 with nothing to search)."""
    space = search_space(sweep, method)
    grid = grid_size(space)
    if grid is not None:
        return grid
    return sweep.search.num_samples if METHODS.get(method).train and space else 1


#: Trainer sections whose values change what the frozen encoder sees (its features are cached).
INPUT_SECTIONS = ("model", "data", "augment")


def input_dimensions(sweep: SweepConfig) -> dict[str, ParamSpec]:
    """The searched discrete keys that change the frozen features' inputs (a backbone, its
    weights, the input size): what warms caches, sizes trials and what a preflight runs each of."""
    return {k: p for k, p in sweep.search_space.items() if p.discrete and k.split(".")[0] in INPUT_SECTIONS}


def input_variants(sweep: SweepConfig, method: str) -> list[dict[str, Any]]:
    """One params dict per combination of :func:`input_dimensions` values that apply to
    ``method``; ``[{}]`` when none is searched."""
    spec = METHODS.get(method)
    keys = {k: p.labels() for k, p in input_dimensions(sweep).items() if applies(k, spec)}
    return [dict(zip(keys, combo)) for combo in itertools.product(*keys.values())]


def plan(sweep: SweepConfig) -> list[tuple[Experiment, int]]:
    """Experiments and their trial counts: search (num_samples, or a grid's size) then final."""
    rows = []
    for d in sweep.datasets:
        for m in sweep.methods:
            trains = METHODS.get(m).train
            rows.append((Experiment("search", d, m), search_trials(sweep, m)))
            if sweep.final.seeds_for(d):
                rows.append((Experiment("final", d, m), sweep.final.seeds_for(d) if trains else 1))
    return rows


@dataclass(frozen=True)
class PlanRow:
    exp: Experiment
    trials: int
    searched: str
    images: str  # train/val/test (counted | published) or "not present"
    resources: str
    gpu_hours: float | None  # all trials of the row at full budget; None: no measured rates


def plan_rows(sweep: SweepConfig) -> list[PlanRow]:
    """The dry run's rows: experiments with sizes, resources and a GPU-hour estimate (harness.estimate)."""
    from harness.estimate import image_counts

    counts = {d: image_counts(trial_config(sweep, d, sweep.methods[0], {})) for d in sweep.datasets}
    rows = []
    for exp, n in plan(sweep):
        c = counts[exp.dataset]
        per = trial_estimate(sweep, exp, c) if c else None
        trains = METHODS.get(exp.method).train
        keys = ", ".join(search_space(sweep, exp.method)) if exp.phase == "search" else ("best config" if trains else "")
        rows.append(PlanRow(exp, n, keys or "-", f"{c.train}/{c.val}/{c.test} ({c.source})" if c else "not present",
                            describe_resources(sweep.resources_for(exp.dataset, exp.method)),
                            per * n / 3600 if per is not None else None))
    return rows


def trial_estimate(sweep: SweepConfig, exp: Experiment, counts: Any) -> float | None:
    """GPU-seconds of one trial at full budget: the most expensive searched backbone/input variant
    (an upper bound; a final run's variant is the search's pick); None if one has no measured rates."""
    from harness.estimate import trial_gpu_seconds

    per = [trial_gpu_seconds(trial_config(sweep, exp.dataset, exp.method, v), counts, exp.phase == "final")
           for v in input_variants(sweep, exp.method)]
    return None if any(p is None for p in per) else max(per)  # type: ignore[type-var]


def print_plan(sweep: SweepConfig) -> None:
    rows = plan_rows(sweep)
    table = Table(title=f"sweep {sweep.name}: storage {sweep.store.uri()}")
    for c in ("phase", "dataset", "method", "trials", "searched", "images train/val/test", "resources per trial",
              "≈ GPU-h"):
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(r.exp.phase, r.exp.dataset, r.exp.method, str(r.trials), r.searched, r.images, r.resources,
                      f"{r.gpu_hours:.1f}" if r.gpu_hours is not None else "—")
    console.print(table)
    hours = sum(r.gpu_hours or 0.0 for r in rows)
    est = (f"≈ {hours:.1f} GPU-hours on H200-class GPUs at full budget (an upper bound: ASHA stops many search "
           f"trials early{'; rows marked — not included' if any(r.gpu_hours is None for r in rows) else ''})")
    if not hours and any(r.gpu_hours is None for r in rows):
        est = ("no GPU-hour estimate: a backbone of this sweep has no measured rates (harness.estimate knows "
               "ViT-B; measure others with benchmarks/gpu_throughput.py)")
    gpus = any(sweep.resources_for(d).gpus for d in sweep.datasets)
    console.print(f"{sum(r.trials for r in rows)} trainings in all; " +
                  (est if gpus else "CPU sweep (no GPUs requested)" + (f"; on GPUs: {est}" if hours else "")))


def describe_resources(res: ResourcesConfig) -> str:
    """'1 CPU, 0.5 GPU' per trial, per worker under Ray Train, with custom resources."""
    per = f"{res.cpus:g} CPU, {res.gpus:g} GPU"
    if res.ray_train:
        per = f"{res.workers} workers x ({per})"
    return per + "".join(f", {v:g} {k}" for k, v in res.custom.items())
