"""``python -m harness.sweep FILE``: Ray Tune + Optuna (+ ASHA) over datasets x methods.

One Tune experiment per (phase, dataset, method): the search phase optimises the validation
metric with Optuna TPE under a concurrency limit and ASHA (time = stage-2 epoch); the final phase
re-runs the best searched config with several seeds and scores it on the test split. Results go
to ``<storage>/trials.parquet`` (one row per trial), ``best.yaml`` and ``manifest.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import yaml
from rich.table import Table

from harness.checks import gpus_per_trial, validate
from harness.config import TIMEOUT_FILE, ResourcesConfig, SweepConfig, applies, load_sweep, trial_config
from harness.telemetry import sweep_metrics
from indivaid.config import ConfigError, to_dict
from indivaid.data.adapters import make_adapter
from indivaid.data.catalogue import DataError
from indivaid.methods import METHODS
from indivaid.utils.console import Live, make_console
from indivaid.utils.io import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)
console = make_console()  # off a terminal (a log, > plan.txt): tables at natural width, one line per row
SCHEMA_VERSION = 1
FINISHED = ".harness-finished"  # marks an experiment folder whose Tuner.fit returned


@dataclass(frozen=True)
class Experiment:
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
    from ray import tune

    spec = METHODS.get(method)
    space = {}
    for key, p in sweep.search_space.items():
        if not applies(key, spec):
            continue  # e.g. fusion.heads for clipreid: nothing to search
        if p.kind == "loguniform":
            space[key] = tune.loguniform(p.low, p.high)
        elif p.kind == "uniform":
            space[key] = tune.uniform(p.low, p.high)
        elif p.kind == "int":
            space[key] = tune.randint(int(p.low), int(p.high) + 1)
        else:
            space[key] = tune.choice(list(p.values or []))
    return space


def plan(sweep: SweepConfig) -> list[tuple[Experiment, int]]:
    """Experiments and their trial counts: search (num_samples; 1 for zeroshot) then final."""
    rows = []
    for d in sweep.datasets:
        for m in sweep.methods:
            trains = METHODS.get(m).train
            rows.append((Experiment("search", d, m), sweep.search.num_samples if trains and search_space(sweep, m) else 1))
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
    from harness.estimate import image_counts, trial_gpu_seconds

    counts = {d: image_counts(trial_config(sweep, d, sweep.methods[0], {})) for d in sweep.datasets}
    rows = []
    for exp, n in plan(sweep):
        c = counts[exp.dataset]
        per = trial_gpu_seconds(trial_config(sweep, exp.dataset, exp.method, {}), c, exp.phase == "final") if c else None
        trains = METHODS.get(exp.method).train
        keys = ", ".join(search_space(sweep, exp.method)) if exp.phase == "search" else ("best config" if trains else "")
        rows.append(PlanRow(exp, n, keys or "-", f"{c.train}/{c.val}/{c.test} ({c.source})" if c else "not present",
                            _describe(sweep.resources_for(exp.dataset)), per * n / 3600 if per is not None else None))
    return rows


def print_plan(sweep: SweepConfig) -> None:
    rows = plan_rows(sweep)
    table = Table(title=f"sweep {sweep.name}: storage {sweep.storage_path}")
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
    gpus = any(sweep.resources_for(d).gpus for d in sweep.datasets)
    console.print(f"{sum(r.trials for r in rows)} trainings in all; " +
                  (est if gpus else "CPU sweep (no GPUs requested)" + (f"; on GPUs: {est}" if hours else "")))


def _describe(res: ResourcesConfig) -> str:
    per = f"{res.cpus:g} CPU, {res.gpus:g} GPU"
    if res.workers > 1:
        per = f"{res.workers} workers x ({per})"
    return per + "".join(f", {v:g} {k}" for k, v in res.custom.items())


class PruningAwareOptuna:
    """Factory for an OptunaSearch that records ASHA-stopped trials as PRUNED, not COMPLETE.

    Without it, Optuna's TPE would treat a trial stopped at its first ASHA rung as a finished
    run with a (low) final value and learn from it as if it were comparable to full runs.
    """

    @staticmethod
    def make(space: dict, metric: str, seed: int, startup: int, max_t: int):
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        class _Search(OptunaSearch):
            def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
                if result and not error and result.get("s2_epoch", max_t) < max_t and trial_id in self._ot_trials:
                    if trial_id in self._completed_trials:
                        return
                    ot_trial = self._ot_trials[trial_id]
                    try:  # intermediate values were already reported by on_trial_result
                        self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
                    except Exception as e:  # a NaN metric, say: keep the sweep going
                        log.warning("could not record pruned trial %s: %s", trial_id, e)
                    self._completed_trials.add(trial_id)
                    return
                super().on_trial_complete(trial_id, result, error)

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # A retried trial restarts Tune's training_iteration (the trainer resumes from its own
        # checkpoint), so Optuna sees intermediate steps twice; it keeps the first, which is right.
        warnings.filterwarnings("ignore", message="The reported value is ignored because this `step", category=UserWarning)
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
        return _Search(metric=metric, mode="max", sampler=sampler)  # the space comes through param_space


def run_experiment(sweep: SweepConfig, exp: Experiment, n: int, params: dict[str, Any] | None, resume: bool,
                   max_concurrent: int | None = None):
    """Run (or restore) one Tune experiment; returns its ResultGrid. ``max_concurrent`` caps trials
    in flight (the GPU budget's share of this experiment; default ``search.max_concurrent``)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    storage = sweep.storage_path
    exp_dir = storage / exp.name
    res = sweep.resources_for(exp.dataset)
    # workers > 1: the trial itself only drives a TorchTrainer, whose workers hold the resources. One
    # worker or none: a plain function trainable holds them (a 1-worker Train run would add half a
    # dozen coordinating actor processes per trial and nothing else).
    resources = {"cpu": res.cpus, "gpu": res.gpus, **res.custom} if res.workers <= 1 else {"cpu": 0.01}
    trainable = tune.with_resources(_trainable(sweep, exp, params), resources)
    if exp_dir.exists() and tune.Tuner.can_restore(str(exp_dir)):
        if not resume:
            raise ConfigError(f"{exp_dir} exists: continue with --resume, or give the sweep a new name")
        tuner = tune.Tuner.restore(str(exp_dir), trainable, resume_errored=True, restart_errored=False)
        return tuner.fit()
    cap = max_concurrent or sweep.search.max_concurrent
    metric = sweep.search.metric
    space = search_space(sweep, exp.method) if exp.phase == "search" else {"seed": tune.grid_search(list(range(n)))}
    probe = trial_config(sweep, exp.dataset, exp.method, {})
    tune_cfg: dict[str, Any] = {"num_samples": n if exp.phase == "search" else 1, "metric": metric, "mode": "max"}
    if exp.phase == "search" and space:
        search = PruningAwareOptuna.make(space, metric, sweep.search.seed, sweep.search.startup_trials, probe.stage2.epochs)
        tune_cfg["search_alg"] = ConcurrencyLimiter(search, max_concurrent=cap)
        if sweep.scheduler.kind == "asha" and METHODS.get(exp.method).train:
            # max_t one past the last epoch: a trial that reaches its budget ends by itself (writing its
            # result and inference checkpoint) instead of being stopped by the scheduler at its last report.
            tune_cfg["scheduler"] = ASHAScheduler(time_attr="s2_epoch", max_t=probe.stage2.epochs + 1,
                                                  grace_period=sweep.scheduler.grace_period,
                                                  reduction_factor=sweep.scheduler.reduction_factor)
    else:
        tune_cfg["max_concurrent_trials"] = cap
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(**tune_cfg),
        run_config=tune.RunConfig(name=exp.name, storage_path=str(storage), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=sweep.max_failures)),
    )
    return tuner.fit()


class SweepInterrupted(RuntimeError):
    """A Tune run returned before all its trials ended (Ctrl-C): nothing is marked finished."""


def experiment_complete(grid, n: int) -> bool:
    """Whether every one of the experiment's ``n`` trials ended (completed, ASHA-stopped or failed)."""
    return len(grid) >= n and grid.num_terminated + grid.num_errors == len(grid)


def prune_checkpoints(sweep: SweepConfig, exp: Experiment) -> None:
    """Delete the resumable state that ended trials left (ASHA-stopped or failed mid-run): nothing
    reads it once its experiment has finished; model.pt and result.json of finished trials stay."""
    if trial_config(sweep, exp.dataset, exp.method, {}).checkpoint.keep:
        return
    for ckpt in (sweep.storage_path / exp.name).glob("*/run/checkpoint.pt"):
        ckpt.unlink(missing_ok=True)


def _trainable(sweep: SweepConfig, exp: Experiment, params: dict[str, Any] | None) -> Callable[[dict], None]:
    """The experiment's Tune function, named after it: Tune registers trainables (and their bound
    parameters) by name per Ray job, so concurrent experiments must not share one."""
    from harness.trial import run_trial

    kw = {"sweep": to_dict(sweep), "dataset": exp.dataset, "method": exp.method}
    if exp.phase == "final":  # one trial per seed: the seed is the gridded dimension
        def trial(config: dict[str, Any]) -> None:
            run_trial(dict(params or {}), **kw, phase="final", seed=int(config["seed"]))
    else:
        def trial(config: dict[str, Any]) -> None:
            run_trial(config, **kw, phase=exp.phase, seed=0)
    trial.__name__ = trial.__qualname__ = f"{exp.phase}_{exp.dataset}_{exp.method}".replace("-", "_")
    return trial


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def collect(sweep: SweepConfig, experiments: str = "*") -> pl.DataFrame:
    """One row per trial from the trial directories (works on partial and resumed sweeps);
    ``experiments`` is a glob of experiment folder names."""
    rows = []
    for info_file in sorted(sweep.storage_path.glob(f"{experiments}/*/trial.json")):
        info = _json(info_file)
        run = info_file.parent / "run"
        result = _json(run / "result.json")
        progress = _last_progress(info_file.parent)
        status, attempts = trial_status(info_file.parent, bool(result), progress)
        cfg = trial_config(sweep, info["dataset"], info["method"], info["params"], info["seed"])
        # from the first start to the last report (retries included); the trainer's own clock otherwise
        wall = max(float(result.get("wall_s") or 0.0), progress.get("timestamp", info["started"]) - info["started"], 0.0)
        row: dict[str, Any] = {
            "sweep_id": sweep.name, "dataset": info["dataset"], "method": info["method"], "phase": info["phase"],
            "seed": info["seed"], "trial_id": info["trial_id"], "node_id": info["node_id"],
            "split_hash": result.get("split_hash") or _split_hash(run / "split.csv"), "protocol": _protocol(run / "split.csv"),
            "status": status,
            "stop_reason": _stop_reason(status, progress, cfg.stage2.epochs, info["method"]),
            "epochs_run": int(progress.get("s2_epoch", 0) or 0),
            "attempts": attempts,
            "wall_s": wall,
            "gpu_s": wall * _gpus_held(sweep.resources_for(info["dataset"])),
            "images_per_s": result.get("images_per_s"),
            "error": _error(info_file.parent),
            "created_at": info["started"],
            "config_path": str(run / "config.json"), "split_path": str(run / "split.csv"),
            "checkpoint_path": result.get("checkpoint"),
            "rehearsal": sweep.rehearsal,
            **_checkpoint_bytes(run),
            **_schedule_reached(result.get("history") or _all_progress(info_file.parent), cfg.stage2.lr),
        }
        for k, v in info["params"].items():
            row[f"param.{k}"] = v
        for k in ("mAP", "rank1", "rank5", "rank10", "mINP"):
            row[f"val_{k}"] = (result.get("val") or {}).get(k, progress.get(f"val_{k}"))
            row[f"test_{k}"] = (result.get("test") or {}).get(k) if result.get("test") else None
        row["best_val_mAP"] = _best_val(result, row["val_mAP"], cfg.eval.every, cfg.stage2.epochs)
        rows.append(row)
    return pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame()


def trial_status(trial_dir: Path, has_result: bool, progress: dict) -> tuple[str, int]:
    """(status, attempts) of a trial from its folder: completed, error (its last attempt failed),
    running (its experiment is not finished, or was interrupted) or stopped (by ASHA)."""
    attempts = max(1, _line_count(trial_dir / "starts.jsonl"))
    if has_result:
        return "completed", attempts
    if (trial_dir / TIMEOUT_FILE).is_file():
        return "timeout", attempts
    if _failures(trial_dir / "error.txt") >= attempts:
        return "error", attempts
    if not (trial_dir.parent / FINISHED).is_file():
        return "running", attempts
    return ("stopped" if progress else "error"), attempts


def _checkpoint_bytes(run: Path) -> dict[str, int]:
    """Resumable state the trial wrote (every save, from the trainer's log) and what it keeps."""
    saves = [json.loads(line) for line in (run / "checkpoints.jsonl").read_text().splitlines() if line.strip()] \
        if (run / "checkpoints.jsonl").is_file() else []
    size = {f: (run / f).stat().st_size if (run / f).is_file() else 0 for f in ("checkpoint.pt", "model.pt")}
    return {"ckpt_saves": len(saves), "ckpt_written_bytes": sum(int(e["bytes"]) for e in saves),
            "ckpt_kept_bytes": size["checkpoint.pt"], "model_bytes": size["model.pt"]}


def _schedule_reached(history: list[dict], base_lr: float) -> dict[str, Any]:
    """What stage 2's schedule delivered: the peak lr as a factor of the base, the epochs run at the
    base lr, and the optimiser steps per rank per epoch (None before stage 2 reports)."""
    s2 = [h for h in history if h.get("stage") == 2 and h.get("lr") is not None]
    if not s2:
        return {"lr_peak_factor": None, "epochs_at_base_lr": None, "steps_per_epoch": None}
    factors = [h["lr"] / base_lr for h in s2]
    steps = [h.get("steps") for h in s2 if h.get("steps") == h.get("steps") and h.get("steps") is not None]
    return {"lr_peak_factor": max(factors), "epochs_at_base_lr": sum(abs(f - 1) < 1e-6 for f in factors),
            "steps_per_epoch": int(min(steps)) if steps else None}


def _all_progress(trial_dir: Path) -> list[dict]:
    """Every report Tune recorded for the trial (a half-written last line is skipped)."""
    out = []
    if (trial_dir / "result.json").is_file():
        for line in (trial_dir / "result.json").read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _gpus_held(res: ResourcesConfig) -> float:
    """GPUs a trial holds (0 on CPU sweeps): per worker under Ray Train."""
    return res.gpus * max(1, res.workers)


def _best_val(result: dict, last: float | None, every: int, epochs: int) -> float | None:
    """The best validation mAP the run measured in stage 2 (its evaluation epochs and the final
    score); not the zero-shot score that stage-1 reports carry, on which untrained configs tie."""
    evals = [h.get("val_mAP") for h in result.get("history", [])
             if h.get("stage") == 2 and (int(h.get("s2_epoch", 0)) % every == 0 or int(h.get("s2_epoch", 0)) == epochs)]
    values = [v for v in [*evals, (result.get("val") or {}).get("mAP"), last] if v is not None and v == v]
    return max(values) if values else None


def _failures(error_file: Path) -> int:
    """How many times Tune recorded this trial failing (one "Failure # k" entry each)."""
    if not error_file.is_file():
        return 0
    return sum(1 for line in error_file.read_text(errors="replace").splitlines() if line.startswith("Failure # "))


def _line_count(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _last_progress(trial_dir: Path) -> dict:
    """Tune's last result line for the trial ({} if none); a half-written last line is skipped."""
    lines = (trial_dir / "result.json").read_text().splitlines() if (trial_dir / "result.json").is_file() else []
    for line in reversed(lines[-2:]):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return {}


def _split_hash(split_file: Path) -> str | None:
    from indivaid.data.split import read_split

    try:
        return read_split(split_file, check=False).hash
    except (DataError, OSError):
        return None


def _protocol(split_file: Path) -> str | None:
    if not split_file.is_file():
        return None
    for line in split_file.read_text().splitlines()[:12]:
        if line.startswith("# protocol: "):
            return line.split(": ", 1)[1]
    return None


def _stop_reason(status: str, progress: dict, max_epochs: int, method: str) -> str:
    if status != "stopped":
        return status  # completed, running (or interrupted), error
    if int(progress.get("s2_epoch", 0) or 0) < max_epochs and method != "zeroshot":
        return "asha_stopped"
    return "error"


def _error(trial_dir: Path) -> str | None:
    """The exception line of a failed trial (the full traceback stays in its error.txt)."""
    err = trial_dir / "error.txt"
    if not err.is_file():
        return None
    lines = [ln.strip() for ln in err.read_text().splitlines() if ln.strip()]
    return lines[-1][:2000] if lines else "failed (empty error.txt)"


def write_results(sweep: SweepConfig, table: pl.DataFrame) -> Path:
    out = sweep.storage_path / "trials.parquet"
    buf = io.BytesIO()
    table.write_parquet(buf)
    atomic_write_bytes(out, buf.getvalue())
    best = {f"{d}/{m}": top for (d, m), top in best_search_trials(table, sweep.search.metric).items()}
    atomic_write_text(sweep.storage_path / "best.yaml", yaml.safe_dump(best, sort_keys=True))
    atomic_write_text(sweep.storage_path / "manifest.json", json.dumps(manifest(sweep), indent=2))
    return out


def manifest(sweep: SweepConfig) -> dict[str, Any]:
    import subprocess
    from importlib.metadata import version

    import ray
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        commit = None
    started = _json(sweep.storage_path / "manifest.json").get("started_at")  # kept across rewrites and resumes
    return {"schema_version": SCHEMA_VERSION, "rehearsal": sweep.rehearsal, "sweep": to_dict(sweep), "indivaid": version("indivaid"),
            "torch": torch.__version__, "open_clip": version("open_clip_torch"), "ray": ray.__version__,
            "git_commit": commit, "started_at": started or time.time(), "written_at": time.time()}


def best_search_trials(table: pl.DataFrame, metric: str = "val_mAP") -> dict[tuple[str, str], dict[str, Any]]:
    """Per (dataset, method): the search trial with the best validation score, and its parameters.

    Failed trials never qualify (a run that diverged after one good epoch is not a config to
    re-run); ties go to the smaller trial id, so the choice is reproducible.
    """
    if not table.height:
        return {}
    best_col = "best_val_mAP" if metric == "val_mAP" else metric
    search = table.filter((pl.col("phase") == "search") & (pl.col("status") != "error")
                          & pl.col(best_col).is_not_null() & pl.col(best_col).is_not_nan())
    best = {}
    for (d, m), grp in search.group_by(["dataset", "method"], maintain_order=True):
        top = grp.sort([best_col, "trial_id"], descending=[True, False]).row(0, named=True)
        best[(d, m)] = {"trial_id": top["trial_id"], metric: top[best_col],
                        "params": {k.removeprefix("param."): v for k, v in top.items() if k.startswith("param.") and v is not None}}
    return best


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


class SweepProgress:
    """A live view of the sweep from its storage folder: trials by status, best validation mAP
    per dataset x method, and an ETA from the finished trials' pace (re-read on each refresh)."""

    def __init__(self, sweep: SweepConfig, total: int) -> None:
        self.sweep, self.total, self.t0 = sweep, total, time.time()

    def __rich__(self) -> Table:
        counts: dict[tuple[str, str], dict[str, Any]] = {}
        for info_file in self.sweep.storage_path.glob("*/*/trial.json"):
            info = _json(info_file)
            if not info:
                continue
            key = (info["dataset"], info["method"])
            c = counts.setdefault(key, {"running": 0, "completed": 0, "stopped": 0, "error": 0, "timeout": 0, "best": None})
            progress = _last_progress(info_file.parent)
            status, _ = trial_status(info_file.parent, (info_file.parent / "run" / "result.json").is_file(), progress)
            c[status] += 1
            v = progress.get("val_mAP")
            if v is not None and v == v:
                c["best"] = max(c["best"] or 0.0, v)
        finished = sum(c["completed"] + c["stopped"] + c["error"] + c["timeout"] for c in counts.values())
        elapsed = time.time() - self.t0
        eta = f"{(self.total - finished) * elapsed / finished / 60:.1f} min" if finished else "…"
        table = Table(title=f"sweep {self.sweep.name}: {finished}/{self.total} trials finished, "
                            f"{elapsed / 60:.1f} min elapsed, ETA {eta}")
        for col in ("dataset", "method", "running", "done", "stopped (ASHA)", "errors", "timed out", "best val mAP"):
            table.add_column(col)
        for (d, m), c in sorted(counts.items()):
            table.add_row(d, m, str(c["running"]), str(c["completed"]), str(c["stopped"]), str(c["error"]), str(c["timeout"]),
                          f"{100 * c['best']:.1f}" if c["best"] is not None else "—")
        return table


#: Ray settings the harness needs on every Ray worker. Train v2 workers block in each report until the
#: controller's next poll (every 2 s by default): with per-epoch reports of short stage-1 epochs the GPU
#: would idle for most of stage 1, so the controller polls more often.
RAY_WORKER_ENV = {"RAY_CHDIR_TO_TRIAL_DIR": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def init_ray(address: str | None, storage: Path, declare: dict[str, Any] | None = None) -> None:
    """Join ``address`` or start a local Ray (with ``declare``d logical resources: a rehearsal's GPUs)."""
    import ray

    from harness.dashboard import print_dashboard

    if ray.is_initialized():
        print_dashboard(console, address)  # Ray started by the caller (a notebook, a test): still say where to look
        return
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    for k, v in RAY_WORKER_ENV.items():
        os.environ.setdefault(k, v)  # a local Ray's workers inherit this process's environment
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's console boxes would fight the live table
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}  # full logs stay in Ray's session folder
    if address:  # the cluster's workers do not inherit this process's environment
        env = {k: os.environ[k] for k in (*RAY_WORKER_ENV, "INDIVAID_DATA") if k in os.environ}
        ctx = ray.init(address=address, runtime_env={"env_vars": env}, **quiet)
    else:
        # Short temp dir: AF_UNIX socket paths are limited to 107 bytes.
        tmp = Path(tempfile.gettempdir()) / f"ray-{os.getuid()}"
        ctx = ray.init(include_dashboard=True, dashboard_host="127.0.0.1", _temp_dir=str(tmp), **quiet, **(declare or {}))
    print_dashboard(console, address, getattr(ctx, "dashboard_url", None))  # the URL and how to authenticate


def cache_configs(sweep: SweepConfig, dataset: str) -> list[dict[str, Any]]:
    """The distinct frozen-feature inputs of a dataset's trials (data, model, runtime; seeds matter
    only for random-init weights), as trainer configs: methods and searched values do not change them."""
    seeds = sorted({0, *range(sweep.final.seeds_for(dataset))})
    out: dict[str, dict[str, Any]] = {}
    for m in sweep.methods:
        for seed in seeds:
            cfg = trial_config(sweep, dataset, m, {}, seed)
            ident = to_dict((cfg.data, cfg.model, cfg.augment, cfg.runtime.device, cfg.runtime.amp,
                             seed if cfg.model.pretrained is None else None))
            out.setdefault(json.dumps(ident, sort_keys=True, default=str), to_dict(cfg))
    return list(out.values())


def _warm(configs: list[dict[str, Any]]) -> list[str]:
    """Inside a Ray task: build the image and feature caches of each config (loads what exists)."""
    from indivaid.training import resolve, warm_caches

    return [str(warm_caches(resolve(c))) for c in configs]


def warm_feature_caches(sweep: SweepConfig, datasets: list[str]) -> None:
    """One Ray task per dataset computes the shared caches before any trial starts, on a node with
    the trials' resources (a GPU node on a cluster); trials then load them from ``<storage>/cache``."""
    import ray

    pending = {}
    for d in datasets:
        res = sweep.resources_for(d)
        task = ray.remote(_warm).options(num_cpus=res.cpus, num_gpus=res.gpus, resources=dict(res.custom) or None,
                                         name=f"warm-cache-{d}")
        pending[d] = task.remote(cache_configs(sweep, d))
    for d, ref in pending.items():
        try:
            files = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            raise DataError(f"{d}: building the shared image/feature caches failed: {e.cause!r}") from None
        log.info("%s: shared feature caches ready: %s", d, ", ".join(Path(f).name for f in files))


def run_sweep(sweep: SweepConfig, *, address: str | None = None, resume: bool = False, only: list[str] | None = None,
              skip_missing: bool = False, declare: dict[str, Any] | None = None) -> Path:
    from harness.estimate import apply_checkpoint_policy

    validate(sweep)  # every dataset's plan, before anything is written or started
    sweep = apply_checkpoint_policy(sweep)
    missing = missing_datasets(sweep)
    if missing and not skip_missing:
        raise DataError("missing datasets (download and prepare them, or pass --skip-missing):\n  " +
                        "\n  ".join(f"{d}: {w}" for d, w in missing))
    skip = {d for d, _ in missing} | ({d for d in sweep.datasets if d not in only} if only else set())
    todo = [(exp, n) for exp, n in plan(sweep) if exp.dataset not in skip]
    started = [exp.name for exp, _ in todo if (sweep.storage_path / exp.name).is_dir()]
    if started and not resume:
        raise ConfigError(f"{sweep.storage_path} already holds {', '.join(started[:3])}{' …' if len(started) > 3 else ''}: "
                          "continue with --resume, or give the sweep a new name")
    sweep.storage_path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sweep.storage_path / "sweep.yaml", yaml.safe_dump(to_dict(sweep), sort_keys=False))
    init_ray(address, sweep.storage_path, declare)
    at_once = min(sweep.search.max_concurrent_experiments, len({(e.dataset, e.method) for e, _ in todo}))
    budget = GpuBudget(cluster_gpus(), at_once)
    import ray

    # a trial that could never be placed (its placement group would wait forever) fails now
    validate(sweep, cluster_gpus=budget.cluster_gpus, cluster_cpus=ray.cluster_resources().get("CPU", 0.0))
    warm_feature_caches(sweep, sorted({exp.dataset for exp, _ in todo}))
    progress = SweepProgress(sweep, sum(n for _, n in todo))
    chains: dict[tuple[str, str], list[tuple[Experiment, int]]] = {}
    for exp, n in todo:  # one chain per dataset x method: its search, then its final phase
        chains.setdefault((exp.dataset, exp.method), []).append((exp, n))
    with sweep_metrics(sweep), Live(progress, console=console, refresh_per_second=0.5, transient=False):
        try:
            if sweep.search.max_concurrent_experiments <= 1 or len(chains) <= 1:
                for chain in chains.values():
                    run_chain(sweep, chain, resume, budget.trials(sweep, chain[0][0].dataset))
                    write_results(sweep, collect(sweep))  # after every chain: a killed driver loses no finished rows
            else:
                run_chains_concurrently(sweep, list(chains.values()), resume, budget)
        except (SweepInterrupted, KeyboardInterrupt):
            write_results(sweep, collect(sweep))  # what finished before the interruption is kept
            raise
    if not chains:  # otherwise written after every chain
        write_results(sweep, collect(sweep))
    return sweep.storage_path / "trials.parquet"


def cluster_gpus() -> float:
    """GPUs the Ray cluster declares (logical ones in a rehearsal)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def run_chain(sweep: SweepConfig, chain: list[tuple[Experiment, int]], resume: bool, max_concurrent: int | None = None) -> None:
    """Run one dataset x method: the search, then the final phase with the best searched config.

    On ``--resume`` an experiment that already finished is left alone (its failed trials are
    not retried again), and the final phase keeps the config it was started with.
    """
    for exp, n in chain:
        exp_dir = sweep.storage_path / exp.name
        if (exp_dir / FINISHED).is_file():
            continue
        params = None
        if exp.phase == "final" and METHODS.get(exp.method).train:
            chosen = exp_dir / "config-from-search.json"
            if chosen.is_file():
                params = json.loads(chosen.read_text())["params"]
            else:
                searched = collect(sweep, f"search-{exp.dataset}-{exp.method}")
                best = best_search_trials(searched, sweep.search.metric).get((exp.dataset, exp.method))
                if best is None:
                    log.warning("%s: no search trial finished without error; final phase skipped", exp.name)
                    continue
                params = best["params"]
                exp_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_text(chosen, json.dumps(best, indent=2, default=str))
        log.info("%s: %d trial(s)%s", exp.name, n, f", best config {params}" if params else "")
        grid = run_experiment(sweep, exp, n, params, resume, max_concurrent)
        if not experiment_complete(grid, n):
            raise SweepInterrupted(f"{exp.name} was interrupted with {len(grid)} of its trials started")
        prune_checkpoints(sweep, exp)
        (exp_dir / FINISHED).touch()  # every trial ended: completed, stopped by ASHA, failed or timed out


def _remote_chain(sweep: dict[str, Any], chain: list[tuple[Experiment, int]], resume: bool, max_concurrent: int) -> None:
    from indivaid.config import from_dict

    run_chain(from_dict(SweepConfig, sweep), chain, resume, max_concurrent)


@dataclass(frozen=True)
class GpuBudget:
    """How many trials each chain may run at once so that the GPUs the running chains ask for fit
    the cluster: the GPUs are shared out among the chains that run side by side, and a trial needs
    ``gpus x max(1, workers)``. CPU sweeps (no GPUs asked or declared) keep ``search.max_concurrent``."""

    cluster_gpus: float
    chains_at_once: int = 1

    def trials(self, sweep: SweepConfig, dataset: str) -> int:
        need = gpus_per_trial(sweep, dataset)
        if not need or not self.cluster_gpus:
            return sweep.search.max_concurrent
        share = self.cluster_gpus / max(1, self.chains_at_once)
        return max(1, min(sweep.search.max_concurrent, int(share // need)))

    def demand(self, sweep: SweepConfig, dataset: str) -> float:
        return gpus_per_trial(sweep, dataset) * self.trials(sweep, dataset)


def run_chains_concurrently(sweep: SweepConfig, chains: list[list[tuple[Experiment, int]]], resume: bool,
                            budget: GpuBudget) -> None:
    """Up to ``search.max_concurrent_experiments`` chains at once, each driving its own Tuner from a
    zero-CPU Ray task, so trials of several datasets x methods fill the cluster together.

    A chain starts only when its GPU demand fits beside the running ones', in queue order: a
    4-GPU gang at the head of the queue waits for GPUs instead of being overtaken by 1-GPU chains
    forever, and no Train run waits on a placement group that the cluster cannot give it.
    """
    import ray

    task = ray.remote(num_cpus=0, max_retries=0)(_remote_chain)
    queue, pending = list(chains), {}
    in_use = 0.0
    while queue or pending:
        while queue and len(pending) < sweep.search.max_concurrent_experiments:
            d = queue[0][0][0].dataset
            need = budget.demand(sweep, d)
            if pending and in_use + need > budget.cluster_gpus:
                break
            chain = queue.pop(0)
            in_use += need
            pending[task.options(name=f"tune-{d}-{chain[0][0].method}").remote(
                to_dict(sweep), chain, resume, budget.trials(sweep, d))] = chain
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            chain = pending.pop(ref)
            in_use -= budget.demand(sweep, chain[0][0].dataset)
            write_results(sweep, collect(sweep))  # after every chain: a killed driver loses no finished rows
            try:
                ray.get(ref)
            except ray.exceptions.RayError as e:
                for other in pending:
                    ray.cancel(other, force=True)
                cause = getattr(e, "cause", None)
                if isinstance(cause, (ConfigError, DataError, SweepInterrupted)):
                    raise cause from None
                raise RuntimeError(f"{chain[0][0].dataset}/{chain[0][0].method}: the Tune run failed: {e}") from None


def summary(table: pl.DataFrame) -> None:
    if not table.height:
        console.print("no trials")
        return
    t = Table(title="sweep summary (validation mAP %, best per dataset x method; test from the final phase)")
    for c in ("dataset", "method", "trials", "stopped early", "errors", "best val mAP", "final test mAP"):
        t.add_column(c)
    for (d, m), g in table.group_by(["dataset", "method"], maintain_order=True):
        final = g.filter(pl.col("phase") == "final")["test_mAP"].drop_nulls()
        t.add_row(d, m, str(g.height), str((g["stop_reason"] == "asha_stopped").sum()), str((g["status"] == "error").sum()),
                  f"{100 * (g['best_val_mAP'].max() or 0):.1f}",
                  f"{100 * final.mean():.1f} ± {100 * (final.std() or 0):.1f} (n={final.len()})" if final.len() else "—")
    console.print(t)


def reproduce(sweep: SweepConfig, trial_id: str) -> dict[str, Any]:
    """Re-run one recorded trial from its resolved config and split file; recorded vs new metrics."""
    from indivaid.config import from_dict
    from indivaid.training import TrainConfig, train

    for info_file in sweep.storage_path.glob("*/*/trial.json"):
        info = _json(info_file)
        if info.get("trial_id") == trial_id:
            break
    else:
        raise ConfigError(f"no trial {trial_id!r} under {sweep.storage_path} (see trials.parquet's trial_id)")
    run = info_file.parent / "run"
    if not (run / "config.json").is_file() or not (run / "split.csv").is_file():
        raise ConfigError(f"trial {trial_id} has no recorded config or split under {run}")
    data = json.loads((run / "config.json").read_text())
    data["data"]["split_file"] = str(run / "split.csv")
    cfg = from_dict(TrainConfig, data)
    workdir = sweep.storage_path / "reproduce" / f"{trial_id}-{int(time.time())}"
    res = train(cfg, workdir=workdir, evaluate_test=info["phase"] == "final")
    recorded = _json(run / "result.json")
    out = {"trial_id": trial_id, "workdir": str(workdir), "recorded_val": recorded.get("val"), "val": res.val,
           "recorded_test": recorded.get("test"), "test": res.test}
    table = Table(title=f"reproduced trial {trial_id} ({info['dataset']}, {info['method']}, {info['phase']})")
    for c in ("", "val mAP", "test mAP"):
        table.add_column(c)
    for name, v, te in (("recorded", out["recorded_val"], out["recorded_test"]), ("reproduced", res.val, res.test)):
        table.add_row(name, f"{100 * v['mAP']:.2f}" if v else "—", f"{100 * te['mAP']:.2f}" if te else "—")
    console.print(table)
    return out


def main(argv: list[str] | None = None) -> int:
    from harness.rehearsal import Reductions

    ap = argparse.ArgumentParser(prog="python -m harness.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    ap.add_argument("--address", help="join a Ray cluster (auto, or ray://host:port); default: local Ray")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    ap.add_argument("--dry-run", action="store_true", help="check the plan (every dataset), print it and exit")
    ap.add_argument("--only", nargs="+", metavar="DATASET", help="run these datasets only")
    ap.add_argument("--skip-missing", action="store_true", help="skip datasets whose files are absent")
    ap.add_argument("--reproduce", metavar="TRIAL_ID", help="re-run one trial from its recorded config and split")
    mode = ap.add_argument_group("before a cluster sweep")
    mode.add_argument("--rehearse", action="store_true",
                      help="run the real plan on CPU: generated datasets at their published identity counts, tiny model, "
                           "the sweep's GPUs declared as logical resources; results in results/<name>-rehearsal")
    mode.add_argument("--preflight", action="store_true",
                      help="each dataset x method once for a few steps with the real backbone on the cluster: memory, "
                           "img/s, time to first report; results in results/<name>-preflight")
    red = Reductions()
    mode.add_argument("--steps-per-epoch", type=int, default=None,
                      help=f"rehearsal: optimiser steps per epoch (default {red.steps_per_epoch}); preflight: steps per stage (default 5)")
    mode.add_argument("--samples", type=int, default=red.num_samples, help="rehearsal: search trials per dataset x method")
    mode.add_argument("--seeds", type=int, default=red.seeds, help="rehearsal: final seeds of every dataset but the first")
    mode.add_argument("--first-seeds", type=int, default=red.full_seeds,
                      help="rehearsal: final seeds of the first dataset (5: the leaderboard's paired test runs)")
    mode.add_argument("--gpus", type=int, default=red.gpus, help="rehearsal: logical GPUs to declare")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Ctrl-C stops the sweep here (KeyboardInterrupt: results written, exit 130, --resume continues) instead
    # of Tune's handler, which returns from Tuner.fit as if the search had ended
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    try:
        sweep = load_sweep(args.file)
        if args.dry_run:
            validate(sweep, args.file, cluster_gpus=_address_gpus(args.address))
            print_plan(sweep)
            return 0
        if args.reproduce:
            reproduce(sweep, args.reproduce)
            return 0
        if args.rehearse:
            from harness.rehearsal import rehearse

            rehearse(sweep, Reductions(steps_per_epoch=args.steps_per_epoch or red.steps_per_epoch,
                                       num_samples=args.samples, startup_trials=min(args.samples, red.startup_trials),
                                       seeds=args.seeds, full_seeds=args.first_seeds, gpus=args.gpus),
                     resume=args.resume, only=args.only)
            return 0
        if args.preflight:
            from harness.rehearsal import preflight

            preflight(sweep, args.steps_per_epoch or 5, address=args.address, resume=args.resume)
            return 0
        out = run_sweep(sweep, address=args.address, resume=args.resume, only=args.only, skip_missing=args.skip_missing)
        summary(pl.read_parquet(out))
        console.print(f"results: {out} (tables and plots: python -m harness.leaderboard {out.parent})")
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (SweepInterrupted, KeyboardInterrupt) as e:
        print(f"interrupted{f': {e}' if str(e) else ''}; what finished is in trials.parquet; continue with --resume",
              file=sys.stderr)
        return 130
    return 0


def _address_gpus(address: str | None) -> float | None:
    """The GPUs of the cluster at ``address`` (None without one): --dry-run checks the plan against them."""
    if not address:
        return None
    import ray

    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    try:
        return cluster_gpus()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
