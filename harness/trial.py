"""What runs inside one Ray Tune trial: the indivaid trainer, with Tune's report as its callback.

The trainer keeps its own resumable checkpoint in the trial's folder on the sweep's storage, so a
trial that Tune restarts after a crash, or that a restored sweep re-launches, continues where it
stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray import tune

from indivaid.config import from_dict
from indivaid.training import train
from indivaid.utils.io import atomic_write_text
from harness.config import SweepConfig, trial_config
from harness.results import REPORT_BEST_VAL_MAP, REPORT_RUN_FINISHED, REPORT_VAL_MAP, TIMEOUT_FILE, finite, measured_val
from harness.telemetry import TrialMetrics

log = logging.getLogger(__name__)


def storage_trial_dir(experiment_dir: str | Path) -> Path:
    """The trial's folder on the sweep's storage (a shared filesystem on a cluster): the
    experiment's folder there, plus the trial's directory name.

    Not ``get_trial_dir()`` itself: that is a staging folder under the Ray session on the node
    running the trial, copied to storage only now and then by the driver, so files written there on
    another node would never arrive and a retried trial could not find its checkpoint. Its last
    part is the trial's directory name, which Tune also gives the trial's folder in storage
    (``<storage_path>/<experiment name>/<trial dir name>``).
    """
    try:
        staging = tune.get_context().get_trial_dir()
    except Exception as e:  # outside a Tune trial the context has no session
        raise RuntimeError("run_trial must run inside a Ray Tune trial") from e
    if not staging:
        raise RuntimeError("run_trial must run inside a Ray Tune trial (no trial directory)")
    path = Path(experiment_dir) / Path(staging).name
    path.mkdir(parents=True, exist_ok=True)
    return path


class TrialTimeout(RuntimeError):
    """The trial ran past the sweep's ``trial_timeout_minutes``."""


def start_watchdog(trial_dir: Path, minutes: float | None, started: float) -> None:
    """Stop this trial once it has run ``minutes`` since its first start (retries included).

    A hung trial (a stuck collective, a placement group that never comes) reports nothing, so no
    scheduler decision can stop it. A daemon timer records ``timeout.json`` and ends the trial's
    process; Ray then releases its resources, and a restart of a timed-out trial fails at once.
    """
    if minutes is None:
        return
    marker = trial_dir / TIMEOUT_FILE
    if marker.is_file():
        raise TrialTimeout(f"stopped after the sweep's trial_timeout_minutes ({minutes:g}); see {marker}")
    limit = started + 60 * minutes

    def fire() -> None:
        atomic_write_text(marker, json.dumps({"limit_minutes": minutes, "time": time.time()}))
        log.error("trial ran past trial_timeout_minutes=%g: stopping it", minutes)
        os._exit(3)  # the training thread may be stuck in native code: only the process can end it

    timer = threading.Timer(max(0.0, limit - time.time()), fire)
    timer.daemon = True
    timer.start()


class ReportProgress:
    """Adds to each trainer report what the live progress table needs, so that it never reads a
    trial's files: the best validation mAP measured so far (not the zero-shot score that early
    reports carry) and whether the trainer has written its results (a trial ASHA stops at its last
    report has finished). One ``stat`` per report."""

    def __init__(self, workdir: Path, every: int, epochs: int) -> None:
        self.result_file = workdir / "result.json"
        self.every, self.epochs = max(1, every), epochs
        self.best: float | None = None

    def row(self, metrics: dict[str, float]) -> dict[str, float]:
        v = finite(metrics.get(REPORT_VAL_MAP))
        if v is not None and measured_val(metrics, self.every, self.epochs):
            self.best = v if self.best is None else max(self.best, v)
        return {**metrics, REPORT_BEST_VAL_MAP: math.nan if self.best is None else self.best,
                REPORT_RUN_FINISHED: float(self.result_file.is_file())}


def run_trial(params: dict[str, Any], *, sweep: dict[str, Any], dataset: str, method: str, phase: str, seed: int,
              experiment_dir: str) -> None:
    """Tune function trainable (``workers: 0``): trains in the trial process and reports every epoch.
    ``experiment_dir``: the experiment's folder on the sweep's storage (Tune's storage_path/name)."""
    ctx = tune.get_context()
    trial_dir = storage_trial_dir(experiment_dir)
    info_file = trial_dir / "trial.json"
    if not info_file.is_file():  # first, so that a trial failing at any later point is still a row
        info = {"trial_id": ctx.get_trial_id(), "dataset": dataset, "method": method, "phase": phase, "seed": seed,
                "params": params, "node_id": ray.get_runtime_context().get_node_id(), "started": time.time()}
        atomic_write_text(info_file, json.dumps(info, indent=2, default=str))
    cfg_sweep = from_dict(SweepConfig, sweep)
    start_watchdog(trial_dir, cfg_sweep.trial_timeout_minutes, json.loads(info_file.read_text())["started"])
    with open(trial_dir / "starts.jsonl", "a") as f:  # one line per (re)start: retries are visible
        f.write(json.dumps({"time": time.time(), "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}) + "\n")
    cfg = trial_config(cfg_sweep, dataset, method, params, seed)
    if cfg_sweep.resources_for(dataset).workers > 1:
        _fit_with_ray_train(cfg, cfg_sweep, trial_dir, ctx.get_trial_id(), phase == "final")
        return

    telemetry = TrialMetrics(cfg_sweep.name, dataset, method, phase, ctx.get_trial_id())  # stage, epoch, img/s, memory
    progress = ReportProgress(trial_dir / "run", cfg.eval.every, cfg.stage2.epochs)

    def report(metrics: dict[str, float], checkpoint: str | None = None) -> None:
        telemetry.record(metrics)
        tune.report(progress.row(metrics))

    # The trainer writes result.json and model.pt before its last report, so a trial that ASHA stops at
    # its final epoch has finished.
    train(cfg, workdir=trial_dir / "run", report=report, evaluate_test=(phase == "final"))


def _worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: torch.distributed is set up, so the trainer runs DDP."""
    import ray.train

    from indivaid.training import resolve

    cfg = resolve(config["train_config"])
    telemetry = TrialMetrics(**config["metric_tags"], worker=ray.train.get_context().get_world_rank())
    progress = ReportProgress(Path(config["workdir"]), cfg.eval.every, cfg.stage2.epochs)

    def report(metrics: dict[str, float], checkpoint: str | None = None) -> None:
        telemetry.record(metrics)
        ray.train.report(progress.row(metrics))

    train(cfg, workdir=config["workdir"], report=report, evaluate_test=config["evaluate_test"])


def _fit_with_ray_train(cfg, sweep: SweepConfig, trial_dir: Path, trial_id: str, evaluate_test: bool) -> None:
    """``workers > 1``: a TorchTrainer inside the Tune trial (Tune cannot wrap a Trainer directly).

    Only rank 0's metrics reach Tune, through TuneReportCallback. The Train run is named after the
    Tune trial id, so a restored trial resumes the same run rather than starting a new one.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from indivaid.config import to_dict

    res = sweep.resources_for(cfg.data.dataset)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"train_config": to_dict(cfg), "workdir": str(trial_dir / "run"), "evaluate_test": evaluate_test,
                           "metric_tags": {"sweep": sweep.name, "dataset": cfg.data.dataset, "method": cfg.method,
                                           "phase": "final" if evaluate_test else "search", "trial_id": trial_id}},
        scaling_config=ray.train.ScalingConfig(num_workers=res.workers, use_gpu=res.use_gpu,
                                               resources_per_worker={"CPU": res.cpus, **({"GPU": res.gpus} if res.gpus else {}),
                                                                     **res.custom}),
        run_config=ray.train.RunConfig(name=f"train-{trial_id}", storage_path=str(trial_dir.resolve() / "ray_train"),
                                       callbacks=[TuneReportCallback()],
                                       # one retry layer: Tune restarts the whole trial, which resumes
                                       # from its checkpoint (retries here too would multiply them)
                                       failure_config=ray.train.FailureConfig(max_failures=0)),
        torch_config=TorchConfig(backend="gloo" if cfg.runtime.device == "cpu" else None),
    )
    trainer.fit()
