"""What runs inside one Ray Tune trial: the indivaid trainer, with Tune's report as its callback.

The trainer keeps its own resumable checkpoint in the trial directory, so a trial that Tune
restarts after a crash, or that a restored sweep re-launches, continues where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import ray
from ray import tune

from indivaid.config import from_dict
from indivaid.training import train
from indivaid.utils.io import atomic_write_text
from harness.config import SweepConfig, trial_config


def run_trial(params: dict[str, Any], *, sweep: dict[str, Any], dataset: str, method: str, phase: str, seed: int) -> None:
    """Tune function trainable (``workers: 0``): trains in the trial process and reports every epoch."""
    cfg_sweep = from_dict(SweepConfig, sweep)
    ctx = tune.get_context()
    trial_dir = Path(ctx.get_trial_dir())
    info = {"trial_id": ctx.get_trial_id(), "dataset": dataset, "method": method, "phase": phase, "seed": seed,
            "params": params, "node_id": ray.get_runtime_context().get_node_id(), "started": time.time()}
    atomic_write_text(trial_dir / "trial.json", json.dumps(info, indent=2, default=str))
    cfg = trial_config(cfg_sweep, dataset, method, params, seed)

    def report(metrics: dict[str, float], checkpoint: str | None = None) -> None:
        tune.report(dict(metrics))

    res = train(cfg, workdir=trial_dir / "run", report=report, evaluate_test=(phase == "final"))
    if method == "zeroshot" or not res.history:
        return
    last = dict(res.history[-1])
    last.update({f"val_{k}": v for k, v in res.val.items() if k in ("mAP", "rank1", "rank5", "rank10", "mINP")})
    tune.report(last)  # the final validation of the finished model (same s2_epoch: ASHA sees no new rung)
