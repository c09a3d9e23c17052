"""What runs inside one Ray Tune trial: the indivaid trainer, with Tune's report as its callback.

The trainer works in a node-local folder (it knows nothing of URIs). What outlives the trial goes
to the trial's folder in the sweep's storage through harness.storage: its records (``trial.json``,
``starts.jsonl``, a timeout marker) and the trainer's ``run/`` files (config, split, checkpoint
log, inference model, result). Its resumable state goes to Ray: each ``checkpoint.pt`` the trainer
saves is reported as a Ray checkpoint, which Tune (or Ray Train) stores beside the trial's
results and prunes, and a restarted trial, on whatever node, starts from ``get_checkpoint()``.
With ``final.robustness`` a final trial then scores its model with the robustness suite.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
from ray import tune

from harness.config import SweepConfig, trial_config
from harness.results import (REPORT_BEST_VAL_MAP, REPORT_RUN_FINISHED, REPORT_VAL_MAP, ROBUST_REL_MAP, ROBUSTNESS_FILE,
                             RUN, RUN_FILES, STARTS_FILE, TIMEOUT_FILE, TRIAL_INFO, finite, measured_val)
from harness.storage import Storage, open_storage
from harness.telemetry import TrialMetrics
from indivaid.config import from_dict
from indivaid.training import train

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"  # the trainer's resumable state in its workdir
#: What a Ray checkpoint holds besides the state: the files a resumed run expects beside it.
CHECKPOINT_COMPANIONS = ("config.json", "split.csv", "checkpoints.jsonl")
THREAD_EXIT_TIMEOUT_S = 120  # Tune's default (2 s) is shorter than a sync to object storage can take


# ---------------------------------------------------------------------------------------------
# The trial's folders: its storage folder and its node-local workdir
# ---------------------------------------------------------------------------------------------


def trial_folder(experiment: str) -> str:
    """The trial's folder in the storage, relative to it: the experiment's folder plus the trial's
    directory name (Tune has no public accessor for a trial's storage path; the name is the last
    part of the trial's directory on this node, which Tune gives its storage folder too)."""
    try:
        local = tune.get_context().get_trial_dir()
    except Exception as e:  # outside a Tune trial the context has no session
        raise RuntimeError("run_trial must run inside a Ray Tune trial") from e
    if not local:
        raise RuntimeError("run_trial must run inside a Ray Tune trial (no trial directory)")
    return f"{experiment}/{Path(local).name}"


def fresh_workdir(sweep: str, trial_id: str, rank: int = 0) -> Path:
    """An empty node-local folder for the trainer. Whatever an earlier attempt left on this node is
    removed: a run resumes from its Ray checkpoint only, so every node resumes the same way."""
    path = Path(tempfile.gettempdir()) / "indivaid-trials" / sweep / trial_id / f"rank{rank}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def restore_run(store: Storage, folder: str, workdir: Path, checkpoint: Any | None) -> str:
    """Fill ``workdir`` for a (re)started run; returns what it resumes from.

    A run that had finished gets its results back (the trainer then returns them instead of
    training again); otherwise the latest Ray checkpoint's files, if Ray has one for the trial.
    """
    if store.download(f"{folder}/{RUN}/result.json", workdir / "result.json"):
        for name in CHECKPOINT_COMPANIONS:
            store.download(f"{folder}/{RUN}/{name}", workdir / name)
        return "finished run"
    if checkpoint is None:
        return "nothing"
    checkpoint.to_directory(str(workdir))
    return f"Ray checkpoint {checkpoint.path}"


class RunFiles:
    """Copies the trainer's files that outlive the trial (``RUN_FILES``) from its workdir to the
    trial's ``run/`` folder in the storage, each when it is new or has changed. Called before every
    report, so the results of a run that a scheduler stops at its last report are already stored."""

    def __init__(self, store: Storage, folder: str, workdir: Path) -> None:
        self.store, self.folder, self.workdir = store, folder, workdir
        self.sent: dict[str, tuple[int, int]] = {}

    def sync(self) -> None:
        for name in RUN_FILES:
            path = self.workdir / name
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            stamp = (st.st_size, st.st_mtime_ns)
            if self.sent.get(name) != stamp:
                self.store.upload(path, f"{self.folder}/{RUN}/{name}")
                self.sent[name] = stamp

    def sync_quietly(self) -> None:
        """After a failure: store what there is, without hiding the failure behind another."""
        try:
            self.sync()
        except Exception as e:
            log.warning("could not copy the run's files to %s: %s", self.store.uri(self.folder), e)


@contextlib.contextmanager
def ray_checkpoint(state: Path) -> Iterator[Any]:
    """The trainer's state file as a Ray checkpoint: a folder beside the workdir holding it and
    its companions (hard links, so nothing is copied on this node; Ray copies them to storage)."""
    from ray.train import Checkpoint

    folder = Path(tempfile.mkdtemp(prefix="ray-ckpt-", dir=state.parent.parent))
    try:
        for src in (state, *(state.parent / n for n in CHECKPOINT_COMPANIONS)):
            if src.is_file():
                try:
                    os.link(src, folder / src.name)
                except OSError:  # a filesystem without hard links
                    shutil.copyfile(src, folder / src.name)
        yield Checkpoint.from_directory(str(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def record_start(store: Storage, folder: str, info: dict[str, Any]) -> dict[str, Any]:
    """Write ``trial.json`` at the trial's first start (first, so a trial failing at any later point
    is still a row) and add this start to ``starts.jsonl``; returns the trial's info."""
    recorded = store.read_json(f"{folder}/{TRIAL_INFO}")
    if not recorded:
        recorded = info
        store.write_json(f"{folder}/{TRIAL_INFO}", info)
    start = {"time": time.time(), "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}
    store.append_line(f"{folder}/{STARTS_FILE}", json.dumps(start))
    return recorded


# ---------------------------------------------------------------------------------------------
# Time limit, progress, tracking
# ---------------------------------------------------------------------------------------------


class TrialTimeout(RuntimeError):
    """The trial ran past the sweep's ``trial_timeout_minutes``."""


class Watchdog:
    """Stops the trial once it has run ``minutes`` since its first start (retries included).

    A hung trial (a stuck collective, a placement group that never comes) reports nothing, so no
    scheduler decision can stop it. A daemon timer records ``timeout.json`` and ends the trial's
    process; Ray then releases its resources, and a restart of a timed-out trial fails at once.

    Tune reuses a trial's process for the next trial (``reuse_actors``), so the timer must not
    outlive its trial: ``cancel`` it when the trial function ends. A trial that ASHA stops stays
    blocked in ``tune.report`` until Tune hands its process to the next trial; time spent ``waiting``
    there is Tune's, so the timer never fires during it (it checks again a little later).
    """

    RECHECK_S = 5.0

    def __init__(self, store: Storage, folder: str, minutes: float | None, started: float) -> None:
        self.store, self.minutes = store, minutes
        self.limit = started + 60 * (minutes or 0)
        self.marker = f"{folder}/{TIMEOUT_FILE}"
        self._lock = threading.Lock()
        self._waiting = 0
        self._timer: threading.Timer | None = None
        self._cancelled = False

    def start(self) -> Watchdog:
        """Arm the timer, or fail at once if an earlier start of this trial already timed out."""
        if self.minutes is None:
            return self
        if self.store.is_file(self.marker):
            raise TrialTimeout(f"stopped after the sweep's trial_timeout_minutes ({self.minutes:g}); "
                               f"see {self.store.uri(self.marker)}")
        self._arm(self.limit - time.time())
        return self

    def _arm(self, delay: float) -> None:
        with self._lock:
            if self._cancelled:
                return
            self._timer = threading.Timer(max(0.0, delay), self._fire)
            self._timer.daemon = True
            self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            defer = self._cancelled or self._waiting > 0
        if defer:
            self._arm(self.RECHECK_S)  # a no-op once cancelled
            return
        try:
            self.store.write_json(self.marker, {"limit_minutes": self.minutes, "time": time.time()})
        finally:
            log.error("trial ran past trial_timeout_minutes=%g: stopping it", self.minutes)
            os._exit(3)  # the training thread may be stuck in native code: only the process can end it

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Around ``tune.report``: Tune, not the trial, decides how long it blocks."""
        with self._lock:
            self._waiting += 1
        try:
            yield
        finally:
            with self._lock:
                self._waiting -= 1

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            if self._timer is not None:
                self._timer.cancel()


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


def score_robustness(files: RunFiles, seed: int) -> None:
    """A final model's robustness (``final.robustness``): the suite of indivaid.eval.robustness on
    the run's test split, its ``robustness.json`` and ``.png`` stored in ``run/``. Runs after the
    trainer has stored its results; a restarted trial whose scores are stored does not score again.

    A failure raises, failing the trial: the scores were asked for, and a run quietly without them
    would shrink the robustness table's seeds unnoticed. The run's test scores are stored by then,
    so its row stays ``completed`` (with the error beside it), and Tune's retry (``max_failures``)
    costs only the scoring: the restarted trial gets the finished run back instead of training.
    """
    store, folder, workdir = files.store, files.folder, files.workdir
    if store.is_file(f"{folder}/{RUN}/{ROBUSTNESS_FILE}"):
        log.info("%s: robustness already scored", store.uri(folder, RUN, ROBUSTNESS_FILE))
        return
    model = workdir / "model.pt"  # a restarted finished run gets its results back, not its model
    if not model.is_file() and not store.download(f"{folder}/{RUN}/model.pt", model):
        raise FileNotFoundError(f"{store.uri(folder, RUN, 'model.pt')}: no model to score for final.robustness")
    from indivaid.eval.robustness import robustness_scores, write_report

    started = time.perf_counter()
    result = robustness_scores(model, split_file=str(workdir / "split.csv"), split="test", seed=seed)
    write_report(result, workdir)
    files.sync()
    log.info("robustness of %s scored in %.0f s: relative mAP %.3f", store.uri(folder), time.perf_counter() - started,
             result["metrics"][ROBUST_REL_MAP])


# ---------------------------------------------------------------------------------------------
# The trial
# ---------------------------------------------------------------------------------------------


def run_trial(params: dict[str, Any], *, sweep: dict[str, Any], dataset: str, method: str, phase: str, seed: int,
              experiment: str) -> None:
    """Tune function trainable: trains in the trial process (``workers`` 0 or 1) and reports every
    epoch, or drives a Ray Train run (``workers > 1``). ``experiment``: the experiment's folder name."""
    # Tune hands this process to the next trial (reuse_actors) once this one ends or is stopped, and
    # waits this long for a stopped trial's thread to unwind (it syncs its files on the way out).
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", str(THREAD_EXIT_TIMEOUT_S))
    ctx = tune.get_context()
    cfg_sweep = from_dict(SweepConfig, sweep)
    store = cfg_sweep.store
    folder = trial_folder(experiment)
    info = record_start(store, folder, {
        "trial_id": ctx.get_trial_id(), "dataset": dataset, "method": method, "phase": phase, "seed": seed,
        "params": params, "node_id": ray.get_runtime_context().get_node_id(), "started": time.time()})
    watchdog = Watchdog(store, folder, cfg_sweep.trial_timeout_minutes, info["started"]).start()
    try:
        _run(params, cfg_sweep, dataset, method, phase, seed, folder, watchdog)
    finally:
        watchdog.cancel()


def _run(params: dict[str, Any], cfg_sweep: SweepConfig, dataset: str, method: str, phase: str, seed: int,
         folder: str, watchdog: Watchdog) -> None:
    """The trial's work once it is recorded and its time limit armed."""
    ctx = tune.get_context()
    store = cfg_sweep.store
    cfg = trial_config(cfg_sweep, dataset, method, params, seed, final=(phase == "final"))
    if cfg_sweep.resources_for(dataset, method).ray_train:
        _fit_with_ray_train(cfg, cfg_sweep, folder, ctx.get_trial_id(), ctx.get_trial_name(), phase == "final")
        return

    workdir = fresh_workdir(cfg_sweep.name, ctx.get_trial_id())
    log.info("trial %s resumes from %s", ctx.get_trial_id(), restore_run(store, folder, workdir, tune.get_checkpoint()))
    files = RunFiles(store, folder, workdir)
    telemetry = TrialMetrics(cfg_sweep.name, dataset, method, phase, ctx.get_trial_id())  # stage, epoch, img/s, memory
    progress = ReportProgress(workdir, cfg.eval.every, cfg.stage2.epochs)

    def report(metrics: dict[str, float], checkpoint: str | None = None) -> None:
        telemetry.record(metrics)
        files.sync()  # before Tune hears of the epoch: a scheduler may stop the trial at this report
        row = progress.row(metrics)
        with watchdog.waiting():
            if checkpoint:
                with ray_checkpoint(Path(checkpoint)) as ckpt:
                    tune.report(row, checkpoint=ckpt)
            else:
                tune.report(row)

    try:
        # The trainer writes result.json and model.pt before its last report, so a trial that ASHA
        # stops at its final epoch has finished.
        train(cfg, workdir=workdir, report=report, evaluate_test=(phase == "final"))
        files.sync()
        if phase == "final" and cfg_sweep.final.robustness:
            score_robustness(files, seed)
        _log_model(cfg_sweep, ctx.get_trial_name(), workdir / "model.pt")
    except BaseException:
        files.sync_quietly()
        raise
    finally:
        shutil.rmtree(workdir.parent, ignore_errors=True)


def _log_model(sweep: SweepConfig, trial_name: str, model: Path) -> None:
    """With ``tracking.mlflow``: the final model.pt as an artefact of the trial's MLflow run."""
    if sweep.tracking.mlflow is None:
        return
    from harness.tracking import experiment_name, log_model

    log_model(sweep.tracking.mlflow, experiment_name(sweep), trial_name, model)


def _worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: torch.distributed is set up, so the trainer runs DDP. Every
    rank reports every epoch; rank 0, the only one that saves the trainer's state, passes it as the
    checkpoint; every rank resumes from ``ray.train.get_checkpoint()``."""
    import ray.train

    from indivaid.training import resolve

    rank = ray.train.get_context().get_world_rank()
    cfg = resolve(config["train_config"])
    store = open_storage(config["storage"])
    workdir = fresh_workdir(config["metric_tags"]["sweep"], config["metric_tags"]["trial_id"], rank)
    restore_run(store, config["folder"], workdir, ray.train.get_checkpoint())
    files = RunFiles(store, config["folder"], workdir) if rank == 0 else None
    telemetry = TrialMetrics(**config["metric_tags"], worker=rank)
    progress = ReportProgress(workdir, cfg.eval.every, cfg.stage2.epochs)

    def report(metrics: dict[str, float], checkpoint: str | None = None) -> None:
        telemetry.record(metrics)
        if files is not None:
            files.sync()
        row = progress.row(metrics)
        if checkpoint:
            with ray_checkpoint(Path(checkpoint)) as ckpt:
                ray.train.report(row, checkpoint=ckpt)
        else:
            ray.train.report(row)

    try:
        train(cfg, workdir=workdir, report=report, evaluate_test=config["evaluate_test"])
        if files is not None:
            files.sync()
            if config["robustness"]:
                score_robustness(files, cfg.runtime.seed)
            _log_model(from_dict(SweepConfig, config["sweep"]), config["trial_name"], workdir / "model.pt")
    except BaseException:
        if files is not None:
            files.sync_quietly()
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _fit_with_ray_train(cfg, sweep: SweepConfig, folder: str, trial_id: str, trial_name: str,
                        evaluate_test: bool) -> None:
    """``workers > 1``: a TorchTrainer inside the Tune trial (Tune cannot wrap a Trainer directly).

    Only rank 0's metrics reach Tune, through TuneReportCallback. The Train run keeps its
    checkpoints in the trial's storage folder (``ray_train/``, pruned to the latest) and is named
    after the Tune trial id, so a restarted trial resumes the same run from its latest checkpoint.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from indivaid.config import to_dict

    res = sweep.resources_for(cfg.data.dataset, cfg.method)
    store = sweep.store
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"train_config": to_dict(cfg), "storage": store.location, "folder": folder,
                           "sweep": to_dict(sweep), "trial_name": trial_name, "evaluate_test": evaluate_test,
                           "robustness": evaluate_test and sweep.final.robustness,
                           "metric_tags": {"sweep": sweep.name, "dataset": cfg.data.dataset, "method": cfg.method,
                                           "phase": "final" if evaluate_test else "search", "trial_id": trial_id}},
        scaling_config=ray.train.ScalingConfig(num_workers=res.workers, use_gpu=res.use_gpu,
                                               resources_per_worker={"CPU": res.cpus, **({"GPU": res.gpus} if res.gpus else {}),
                                                                     **res.custom}),
        run_config=ray.train.RunConfig(name=f"train-{trial_id}", storage_path=store.path(folder, "ray_train"),
                                       storage_filesystem=store.fs, callbacks=[TuneReportCallback()],
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
                                       # one retry layer: Tune restarts the whole trial, which resumes
                                       # from its checkpoint (retries here too would multiply them)
                                       failure_config=ray.train.FailureConfig(max_failures=0)),
        torch_config=TorchConfig(backend="gloo" if cfg.runtime.device == "cpu" else None),
    )
    trainer.fit()
