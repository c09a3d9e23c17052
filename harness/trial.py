"""What runs inside one Ray Tune trial: the indivaid trainer, with Tune's report as its callback.

The trainer keeps its own resumable checkpoint in the trial directory, so a trial that Tune
restarts after a crash, or that a restored sweep re-launches, continues where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import ray
from ray import tune

from indivaid.config import from_dict
from indivaid.training import train
from indivaid.utils.io import atomic_write_text
from harness.config import SweepConfig, trial_config


def storage_trial_dir() -> Path:
    """The trial's folder on the sweep's storage (a shared filesystem on a cluster).

    Not ``get_trial_dir()``: that is a staging folder under the Ray session on the driver's node,
    copied to storage only now and then by the driver, so files written there by a trial on
    another node would never arrive, and a retried trial could not find its checkpoint.
    """
    from ray.train._internal.session import get_session  # Ray 2.60 exposes no public accessor

    session = get_session()
    if session is None or getattr(session, "storage", None) is None:
        raise RuntimeError("run_trial must run inside a Ray Tune trial")
    path = Path(session.storage.trial_fs_path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_trial(params: dict[str, Any], *, sweep: dict[str, Any], dataset: str, method: str, phase: str, seed: int) -> None:
    """Tune function trainable (``workers: 0``): trains in the trial process and reports every epoch."""
    ctx = tune.get_context()
    trial_dir = storage_trial_dir()
    info_file = trial_dir / "trial.json"
    if not info_file.is_file():  # first, so that a trial failing at any later point is still a row
        info = {"trial_id": ctx.get_trial_id(), "dataset": dataset, "method": method, "phase": phase, "seed": seed,
                "params": params, "node_id": ray.get_runtime_context().get_node_id(), "started": time.time()}
        atomic_write_text(info_file, json.dumps(info, indent=2, default=str))
    with open(trial_dir / "starts.jsonl", "a") as f:  # one line per (re)start: retries are visible
        f.write(json.dumps({"time": time.time(), "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}) + "\n")
    cfg_sweep = from_dict(SweepConfig, sweep)
    cfg = trial_config(cfg_sweep, dataset, method, params, seed)
    if cfg_sweep.resources_for(dataset).workers > 0:
        _fit_with_ray_train(cfg, cfg_sweep, trial_dir, ctx.get_trial_id(), phase == "final")
        return

    def report(metrics: dict[str, float], checkpoint: str | None = None) -> None:
        tune.report(dict(metrics))

    res = train(cfg, workdir=trial_dir / "run", report=report, evaluate_test=(phase == "final"))
    if method == "zeroshot" or not res.history:
        return
    last = dict(res.history[-1])
    last.update({f"val_{k}": v for k, v in res.val.items() if k in ("mAP", "rank1", "rank5", "rank10", "mINP")})
    tune.report(last)  # the final validation of the finished model (same s2_epoch: ASHA sees no new rung)


def _worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: torch.distributed is set up, so the trainer runs DDP."""
    import ray.train

    from indivaid.training import resolve

    cfg = resolve(config["train_config"])
    train(cfg, workdir=config["workdir"], report=lambda m, checkpoint=None: ray.train.report(dict(m)),
          evaluate_test=config["evaluate_test"])


def _fit_with_ray_train(cfg, sweep: SweepConfig, trial_dir: Path, trial_id: str, evaluate_test: bool) -> None:
    """``workers >= 1``: a TorchTrainer inside the Tune trial (Tune cannot wrap a Trainer directly).

    Only rank 0's metrics reach Tune, through TuneReportCallback. The Train run is named after the
    Tune trial id, so a restored trial resumes the same run rather than starting a new one.
    """
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from indivaid.config import to_dict

    res = sweep.resources_for(cfg.data.dataset)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"train_config": to_dict(cfg), "workdir": str(trial_dir / "run"), "evaluate_test": evaluate_test},
        scaling_config=ray.train.ScalingConfig(num_workers=res.workers, use_gpu=res.use_gpu,
                                               resources_per_worker={"CPU": res.cpus, **({"GPU": res.gpus} if res.gpus else {}),
                                                                     **res.custom}),
        run_config=ray.train.RunConfig(name=f"train-{trial_id}", storage_path=str(trial_dir.resolve() / "ray_train"),
                                       callbacks=[TuneReportCallback()],
                                       failure_config=ray.train.FailureConfig(max_failures=sweep.max_failures)),
    )
    trainer.fit()
