"""The sweep's results files: the trial-row schema, how a trial's row is built, and the writing
of ``trials.parquet``, ``best.yaml`` and ``manifest.json``, all through the sweep's storage
(harness.storage: a local folder or an object store).

A row comes from the trial's own records in its storage folder (``trial.json``, the trainer's
``run/`` files), from what Tune recorded of it, read through Tune's public ``ExperimentAnalysis``
and ``ResultGrid`` (status, reports, error), and from the starts that Tune's callback counted
(``attempts.json``). Tune's own files are never parsed here.

One module owns the schema so that the writer (the sweep) and the readers (the leaderboard, the
rehearsal report, the live table) cannot drift apart. Importing it costs neither torch nor Ray:
the leaderboard runs on a laptop with results copied from a cluster. What needs the trainer's
config or Tune (``collect``) imports it when called.

A number the trainer adds to ``result.json`` becomes a column by one line here: in
``SPLIT_METRICS`` (a key of its ``val``/``test`` dicts, column ``<split>_<key>``) or in
``RUN_NUMBERS`` (a top-level or dotted key, column of the given name). Readers get it typed and
null where a run lacks it, so older files and partial sweeps load the same way. A final run scored
by the robustness suite (``final.robustness``) adds ``ROBUST_METRICS`` from ``run/robustness.json``.
"""

from __future__ import annotations

import fnmatch
import functools
import io
import json
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import yaml

from indivaid.config import ConfigError

if TYPE_CHECKING:
    from harness.config import ResourcesConfig, SweepConfig
    from harness.storage import Storage

log = logging.getLogger(__name__)

#: Bump when a column is renamed or removed or changes meaning (readers refuse other versions);
#: added columns keep it, since every reader conforms a file to ``TRIAL_SCHEMA`` (absent: null).
SCHEMA_VERSION = 1
FINISHED = ".harness-finished"  # marks an experiment folder whose Tuner.fit returned with every trial ended
TIMEOUT_FILE = "timeout.json"  # in a trial folder: the trial was stopped for running past trial_timeout_minutes
TRIAL_INFO = "trial.json"  # in a trial folder: who the trial is (written by the trial at its first start)
STARTS_FILE = "starts.jsonl"  # in a trial folder: one line per start of the trial (time, node, pid)
RUN = "run"  # in a trial folder: the trainer's files that outlive the trial (RUN_FILES)
ATTEMPTS_FILE = "attempts.json"  # in an experiment folder: trial id -> starts, counted by Tune's callback
TRIALS_FILE = "trials.parquet"
ROBUSTNESS_FILE = "robustness.json"  # in run/: the robustness suite's scores of a final model (final.robustness)
#: The trainer's files a trial copies from its node-local workdir to ``run/`` in its storage folder,
#: in this order (the model before result.json, so a result always has its model beside it; the
#: robustness plot before its scores, whose presence tells a restarted trial the suite has run).
RUN_FILES = ("config.json", "split.csv", "checkpoints.jsonl", "model.pt", "result.json", "robustness.png",
             ROBUSTNESS_FILE)
PARAM_PREFIX = "param."  # searched values: one column per dotted trainer key, dtype as sampled

#: A trial's status: ``stopped`` = by ASHA; ``running`` also covers an interrupted sweep's trials;
#: ``lost`` = started, but the driver was killed before Tune's saved state recorded the trial, so the
#: resumed search ran that slot again (its files and any numbers it measured stay in its row).
STATUSES = ("running", "completed", "stopped", "error", "timeout", "lost")
#: ``stop_reason`` refines ``stopped`` into ``asha_stopped`` (below budget) or ``error``.
STOP_REASONS = ("completed", "running", "error", "timeout", "asha_stopped", "lost")

#: Numbers of result.json's ``val``/``test`` dicts -> ``<split>_<key>`` (Float64): key -> splits.
SPLIT_METRICS: dict[str, tuple[str, ...]] = {
    "mAP": ("val", "test"),
    "rank1": ("val", "test"),
    "rank5": ("val", "test"),
    "rank10": ("val", "test"),
    "mINP": ("val", "test"),
    "BAKS": ("val", "test"),  # open set (docs/method.md §5): balanced accuracy on known individuals
    "BAUS": ("val", "test"),  # ... on unknown ones
    "GM": ("val", "test"),  # sqrt(BAKS * BAUS)
    "AUROC": ("val", "test"),  # known vs new from the top-1 distance
    "threshold": ("val", "test"),  # the KNOWN/NEW distance threshold chosen on validation
    "GM_oracle": ("test",),  # the best GM any threshold gets on test
}

#: Per-run numbers of result.json -> column (Float64): column -> key (dotted for a nested dict).
RUN_NUMBERS: dict[str, str] = {
    "images_per_s": "images_per_s",
    "fusion_departure": "fusion_departure",
    "stage1_loss_slope": "stage1_loss_slope",
    "stage1_plateau": "stage1_plateau",
    "train_on_val": "train_on_val",
}

#: The robustness suite's corruptions (indivaid.eval.robustness.NAMES, which needs torch to import).
ROBUST_CORRUPTIONS = ("darkness", "brightness", "colour_cast", "haze", "motion_blur", "defocus_blur",
                      "gaussian_noise", "jpeg", "low_resolution", "occlusion")
ROBUST_REL_MAP = "robust_rel_mAP"  # corrupted / clean mAP, averaged over every corruption and severity
#: The "metrics" of run/robustness.json (indivaid.eval.robustness.summary_metrics) -> Float64 columns of
#: the same names. Listed, not taken as whatever ``robust_*`` keys a file has: the suite defines what
#: ``robust_rel_mAP`` means, so changing it is a schema change, and tests keep this list equal to its keys.
ROBUST_METRICS = (ROBUST_REL_MAP, "robust_rel_rank1", "robust_clean_mAP",
                  *(f"robust_{c}_rel_mAP" for c in ROBUST_CORRUPTIONS))

#: Keys of the trainer's per-epoch reports (Tune's result.json rows) that the harness reads.
REPORT_STAGE, REPORT_S2_EPOCH, REPORT_VAL_MAP, REPORT_LR, REPORT_STEPS = "stage", "s2_epoch", "val_mAP", "lr", "steps"
#: Keys the trial adds to each report (harness.trial) for the live progress table: the best
#: validation mAP measured so far, and 1.0 once the trainer has written its result.json.
REPORT_BEST_VAL_MAP, REPORT_RUN_FINISHED = "best_val_mAP", "run_finished"

_BASE_COLUMNS: dict[str, Any] = {
    "sweep_id": pl.String, "dataset": pl.String, "method": pl.String, "phase": pl.String, "seed": pl.Int64,
    "trial_id": pl.String, "node_id": pl.String, "split_hash": pl.String, "protocol": pl.String,
    "status": pl.String, "stop_reason": pl.String, "epochs_run": pl.Int64, "attempts": pl.Int64,
    "wall_s": pl.Float64, "gpu_s": pl.Float64, "error": pl.String, "created_at": pl.Float64,
    "config_path": pl.String, "split_path": pl.String, "checkpoint_path": pl.String, "rehearsal": pl.Boolean,
    "ckpt_saves": pl.Int64, "ckpt_written_bytes": pl.Int64, "ckpt_kept_bytes": pl.Int64, "model_bytes": pl.Int64,
    "lr_peak_factor": pl.Float64, "epochs_at_base_lr": pl.Int64, "steps_per_epoch": pl.Int64,
}

#: Every column of trials.parquet but the ``param.*`` ones, in file order, with its dtype.
TRIAL_SCHEMA: dict[str, Any] = {
    **_BASE_COLUMNS,
    **dict.fromkeys(RUN_NUMBERS, pl.Float64),
    **{f"{split}_{key}": pl.Float64 for key, splits in SPLIT_METRICS.items() for split in splits},
    "best_val_mAP": pl.Float64,  # the best stage-2 validation mAP the run measured (what best.yaml ranks)
    **dict.fromkeys(ROBUST_METRICS, pl.Float64),  # final runs with final.robustness; null otherwise
}


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def param_columns(df: pl.DataFrame) -> list[str]:
    return sorted(c for c in df.columns if c.startswith(PARAM_PREFIX))


def conform(df: pl.DataFrame) -> pl.DataFrame:
    """``df`` with exactly TRIAL_SCHEMA's columns in its dtypes (absent ones null, all-null ones
    typed, other columns dropped), then the ``param.*`` columns as they are."""
    return df.select(
        *[pl.col(c).cast(t, strict=False) if c in df.columns else pl.lit(None, t).alias(c)
          for c, t in TRIAL_SCHEMA.items()],
        *param_columns(df),
    )


def to_table(rows: Iterable[Mapping[str, Any]]) -> pl.DataFrame:
    """Trial rows (dicts) -> the typed table; no rows: an empty table with every column."""
    rows = list(rows)
    if not rows:
        return pl.DataFrame(schema=TRIAL_SCHEMA)
    return conform(pl.DataFrame(rows, infer_schema_length=None))


# ---------------------------------------------------------------------------------------------
# One row per trial: the trial's own records, the trainer's results and what Tune knows
# ---------------------------------------------------------------------------------------------


def finite(value: Any) -> float | None:
    """``value`` as a float, or None when it is missing, not a number, NaN or infinite."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def measured_val(row: Mapping[str, Any], every: int, epochs: int) -> bool:
    """Whether a report carries a validation score measured for it: stage 0 (zero-shot), and stage
    2 from its first validation on (earlier stage-2 reports still carry the zero-shot score)."""
    stage = int(finite(row.get(REPORT_STAGE)) or 0)
    s2 = int(finite(row.get(REPORT_S2_EPOCH)) or 0)
    return stage == 0 or (stage == 2 and (s2 >= every or s2 == epochs))


@dataclass(frozen=True)
class TuneTrial:
    """What Ray Tune recorded of one trial, read through its public ``ExperimentAnalysis`` and
    ``ResultGrid``: its status (PENDING, RUNNING, PAUSED, TERMINATED, ERROR), its last report,
    every report, and the last line of its error."""

    status: str | None
    last: dict[str, Any]
    history: list[dict[str, Any]]
    error: str | None


def tune_trials(store: Storage, experiment: str) -> dict[str, TuneTrial]:
    """Tune's record of one experiment's trials, keyed by trial id ({} before Tune saved its state).

    Tune writes that state from the process running ``Tuner.fit`` and uploads it to the storage
    now and then, and at the end of the run: an interrupted experiment's may lag a little behind
    its trials' own records, which the rows take first.
    """
    from ray.tune import ExperimentAnalysis, ResultGrid

    # A running trial's reports reach the storage after Tune's state names them: expected here, and
    # the row then takes the trial's own records, so Tune's warning about them is noise.
    logging.getLogger(ExperimentAnalysis.__module__).setLevel(logging.ERROR)
    try:
        analysis = ExperimentAnalysis(store.path(experiment), storage_filesystem=store.fs)
    except (ValueError, OSError) as e:  # no experiment state yet
        log.debug("%s: no Tune state (%s)", store.uri(experiment), e)
        return {}
    frames = analysis.trial_dataframes
    out = {}
    for trial, result in zip(analysis.trials, ResultGrid(analysis)):
        frame = frames.get(trial.trial_id)
        history = frame.to_dict("records") if frame is not None and len(frame) else []
        out[trial.trial_id] = TuneTrial(str(trial.status), dict(result.metrics or {}), history,
                                        error_line(result.error))
    return out


def error_line(error: BaseException | None) -> str | None:
    """The exception line of a failed trial (Tune keeps the full traceback in its error.txt)."""
    if error is None:
        return None
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return lines[-1][:2000] if lines else type(error).__name__


def trial_status(has_result: bool, timed_out: bool, tune: TuneTrial | None, finished: bool,
                 lost: bool = False) -> str:
    """A trial's status: lost (see STATUSES), completed (the trainer wrote its results), timeout,
    error (Tune gave up on it), stopped (ended by ASHA), or running (its experiment is not finished,
    or was interrupted)."""
    if lost:
        return "lost"
    if has_result:
        return "completed"
    if timed_out:
        return "timeout"
    if tune is not None and tune.status == "ERROR":
        return "error"
    if (tune is not None and tune.status == "TERMINATED") or finished:
        return "stopped" if tune is not None and tune.last else "error"
    return "running"


def stop_reason(status: str, progress: Mapping[str, Any], max_epochs: int, method: str) -> str:
    if status != "stopped":
        return status  # completed, running (or interrupted), error, timeout
    if int(progress.get(REPORT_S2_EPOCH, 0) or 0) < max_epochs and method != "zeroshot":
        return "asha_stopped"
    return "error"


#: Rows of experiments that have finished, per (storage, sweep, experiment): they never change.
_FINISHED_ROWS: dict[tuple[str, str, str], list[dict[str, Any]]] = {}


def experiments(store: Storage, pattern: str = "*") -> list[str]:
    """The experiment folders of a sweep (``<phase>-<dataset>-<method>``) matching a glob."""
    return [d for d in store.dirs() if fnmatch.fnmatch(d, pattern) and d.split("-", 1)[0] in ("search", "final")]


def collect(sweep: SweepConfig, pattern: str = "*") -> pl.DataFrame:
    """One row per trial of the experiments whose folder names match ``pattern`` (works on partial
    and resumed sweeps)."""
    store = sweep.store
    rows: list[dict[str, Any]] = []
    for exp in experiments(store, pattern):
        key = (store.location, sweep.name, exp)
        if key not in _FINISHED_ROWS:
            finished = store.is_file(f"{exp}/{FINISHED}")
            found = experiment_rows(sweep, exp, finished)
            if not finished:
                rows += found
                continue
            _FINISHED_ROWS[key] = found
        rows += _FINISHED_ROWS[key]
    return to_table(sorted(rows, key=lambda r: (r["phase"], r["dataset"], r["method"], r["created_at"] or 0.0)))


def experiment_rows(sweep: SweepConfig, exp: str, finished: bool) -> list[dict[str, Any]]:
    """The rows of one experiment: each trial folder holding a ``trial.json``, with Tune's record
    of the trial and the starts the progress callback counted."""
    store = sweep.store
    tune = tune_trials(store, exp)
    attempts = store.read_json(f"{exp}/{ATTEMPTS_FILE}")
    rows = []
    for name in store.dirs(exp):
        info = store.read_json(f"{exp}/{name}/{TRIAL_INFO}")
        if not info:
            continue  # Tune's folder of a trial that never started, or one being written
        # Tune's final state names every trial of the finished run: one it lacks was started before a
        # hard kill of the driver and never recorded (a live run's state may just lag: not judged then)
        lost = finished and bool(tune) and info["trial_id"] not in tune
        rows.append(trial_row(sweep, f"{exp}/{name}", info, tune.get(info["trial_id"]), finished,
                              attempts.get(info["trial_id"]), lost=lost))
        if lost:
            log.warning("%s: trial %s started before the driver was killed but Tune never recorded it; its "
                        "search slot ran again (row kept with status 'lost')", store.uri(exp), info["trial_id"])
    return rows


def trial_row(sweep: SweepConfig, rel: str, info: Mapping[str, Any], tune: TuneTrial | None, finished: bool,
              attempts: int | None = None, lost: bool = False) -> dict[str, Any]:
    """The trial's row: ``trial.json`` (written at its first start), the trainer's ``run/`` files
    (copied to the storage as the run goes), Tune's record of the trial and its count of starts."""
    from harness.config import trial_config  # the trainer's config (torch): only when rows are built

    store = sweep.store
    files = store.sizes(rel)  # one listing: what the trial folder holds, and how big
    result = store.read_json(f"{rel}/{RUN}/result.json") if f"{RUN}/result.json" in files else {}
    robust = store.read_json(f"{rel}/{RUN}/{ROBUSTNESS_FILE}") if f"{RUN}/{ROBUSTNESS_FILE}" in files else {}
    progress = tune.last if tune is not None else {}
    status = trial_status(bool(result), TIMEOUT_FILE in files, tune, finished, lost)
    cfg = trial_config(sweep, info["dataset"], info["method"], info["params"], info["seed"])
    # from the first start to the last report (retries included); the trainer's own clock otherwise
    wall = max(float(result.get("wall_s") or 0.0), progress.get("timestamp", info["started"]) - info["started"], 0.0)
    split = _split_info(store, f"{rel}/{RUN}/split.csv", files.get(f"{RUN}/split.csv"))
    starts = len((store.read_text(f"{rel}/{STARTS_FILE}") or "").splitlines()) if STARTS_FILE in files else 0
    row: dict[str, Any] = {
        "sweep_id": sweep.name, "dataset": info["dataset"], "method": info["method"], "phase": info["phase"],
        "seed": info["seed"], "trial_id": info["trial_id"], "node_id": info["node_id"],
        "split_hash": result.get("split_hash") or split[0], "protocol": split[1],
        "status": status,
        "stop_reason": stop_reason(status, progress, cfg.stage2.epochs, info["method"]),
        "epochs_run": int(progress.get(REPORT_S2_EPOCH, 0) or 0),
        "attempts": max(1, attempts or starts),
        "wall_s": wall,
        "gpu_s": wall * gpus_held(sweep.resources_for(info["dataset"])),
        # a run that finished and then failed (its robustness scoring, storing its files) stays completed,
        # its error beside its numbers
        "error": tune.error if tune is not None and (status in ("error", "timeout") or tune.status == "ERROR")
        else None,
        "created_at": info["started"],
        "config_path": store.uri(rel, RUN, "config.json"), "split_path": store.uri(rel, RUN, "split.csv"),
        "checkpoint_path": store.uri(rel, RUN, "model.pt") if f"{RUN}/model.pt" in files else None,
        "rehearsal": sweep.rehearsal,
        **_checkpoint_bytes(store, rel, files),
        **_schedule_reached(result.get("history") or (tune.history if tune is not None else []), cfg.stage2.lr),
        **{col: _lookup(result, key) for col, key in RUN_NUMBERS.items()},
        **_split_metrics(result, progress),
        **{col: (robust.get("metrics") or {}).get(col) for col in ROBUST_METRICS},
    }
    for k, v in info["params"].items():
        row[f"{PARAM_PREFIX}{k}"] = v
    # a finished run's history is in its result.json; an unfinished one's (ASHA-stopped, failed) in Tune's
    history = result.get("history") or (tune.history if tune is not None else [])
    row["best_val_mAP"] = _best_val(history, (result.get("val") or {}).get("mAP"), row["val_mAP"] if result else None,
                                    cfg.eval.every, cfg.stage2.epochs)
    return row


def _lookup(result: Mapping[str, Any], key: str) -> Any:
    """``result[key]``, following dots into nested dicts; None where any part is missing."""
    value: Any = result
    for part in key.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _split_metrics(result: Mapping[str, Any], progress: Mapping[str, Any]) -> dict[str, Any]:
    """``<split>_<key>`` from result.json's val/test dicts; before the run finished, the validation
    numbers of its last report (test numbers exist only in a finished final run)."""
    val, test = result.get("val") or {}, result.get("test") or {}
    out = {}
    for key, splits in SPLIT_METRICS.items():
        if "val" in splits:
            out[f"val_{key}"] = val.get(key, progress.get(f"val_{key}"))
        if "test" in splits:
            out[f"test_{key}"] = test.get(key)
    return out


def _checkpoint_bytes(store: Storage, rel: str, files: Mapping[str, int]) -> dict[str, int]:
    """Resumable state the trial wrote (every save, from the trainer's log) and what its folder
    still keeps of it (Ray checkpoints: Tune's ``checkpoint_*`` folders, or a Ray Train run's)."""
    log_text = store.read_text(f"{rel}/{RUN}/checkpoints.jsonl") if f"{RUN}/checkpoints.jsonl" in files else None
    saves = [json.loads(line) for line in (log_text or "").splitlines() if line.strip()]
    kept = sum(size for path, size in files.items() if is_checkpoint_path(path))
    return {"ckpt_saves": len(saves), "ckpt_written_bytes": sum(int(e["bytes"]) for e in saves),
            "ckpt_kept_bytes": kept, "model_bytes": files.get(f"{RUN}/model.pt", 0)}


def is_checkpoint_path(path: str) -> bool:
    """Whether a path inside a trial folder belongs to a Ray checkpoint (``checkpoint_000003/...``)."""
    return any(part.startswith("checkpoint_") for part in path.split("/")[:-1])


def _schedule_reached(history: list[dict], base_lr: float) -> dict[str, Any]:
    """What stage 2's schedule delivered: the peak lr as a factor of the base, the epochs run at the
    base lr, and the optimiser steps per rank per epoch (None before stage 2 reports)."""
    s2 = [h for h in history if h.get(REPORT_STAGE) == 2 and h.get(REPORT_LR) is not None]
    if not s2:
        return {"lr_peak_factor": None, "epochs_at_base_lr": None, "steps_per_epoch": None}
    factors = [h[REPORT_LR] / base_lr for h in s2]
    steps = [h.get(REPORT_STEPS) for h in s2 if h.get(REPORT_STEPS) == h.get(REPORT_STEPS) and h.get(REPORT_STEPS) is not None]
    return {"lr_peak_factor": max(factors), "epochs_at_base_lr": sum(abs(f - 1) < 1e-6 for f in factors),
            "steps_per_epoch": int(min(steps)) if steps else None}


def gpus_held(res: ResourcesConfig) -> float:
    """GPUs a trial holds (0 on CPU sweeps): per worker under Ray Train."""
    return res.gpus * max(1, res.workers)


def _best_val(history: list[Mapping[str, Any]], final: float | None, last: float | None, every: int,
              epochs: int) -> float | None:
    """The best validation mAP the run measured in stage 2 (its evaluation epochs, the final score
    ``final`` and a finished run's ``last``); not the zero-shot score that stage-1 reports carry, on
    which untrained configs tie, nor the last report of a trial stopped before it evaluated."""
    evals = [h.get(REPORT_VAL_MAP) for h in history
             if h.get(REPORT_STAGE) == 2 and (int(h.get(REPORT_S2_EPOCH, 0)) % every == 0
                                              or int(h.get(REPORT_S2_EPOCH, 0)) == epochs)]
    values = [v for v in [*evals, final, last] if v is not None and v == v]
    return max(values) if values else None


def _split_info(store: Storage, rel: str, size: int | None) -> tuple[str | None, str | None]:
    """(hash, protocol) of a trial's split file (None, None while it is absent); a split file never
    changes once written, so each is read once per process."""
    if size is None:
        return None, None
    return _read_split_info(store.location, rel, size)


@functools.lru_cache(maxsize=4096)
def _read_split_info(location: str, rel: str, size: int) -> tuple[str | None, str | None]:
    import tempfile

    from harness.storage import open_storage
    from indivaid.data.catalogue import DataError
    from indivaid.data.split import read_split

    data = open_storage(location).read_bytes(rel)
    if data is None:
        return None, None
    protocol = next((line.split(": ", 1)[1] for line in data.decode(errors="replace").splitlines()[:12]
                     if line.startswith("# protocol: ")), None)
    with tempfile.NamedTemporaryFile(suffix=".csv") as f:
        f.write(data)
        f.flush()
        try:
            return read_split(f.name, check=False).hash, protocol
        except (DataError, OSError):
            return None, protocol


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def write_results(sweep: SweepConfig, table: pl.DataFrame) -> str:
    """trials.parquet (conformed to the schema), best.yaml and manifest.json, each written whole
    (atomically on a local disk, one PUT on an object store); returns where trials.parquet is."""
    store = sweep.store
    buf = io.BytesIO()
    conform(table).write_parquet(buf)
    store.write_bytes(TRIALS_FILE, buf.getvalue())
    best = {f"{d}/{m}": top for (d, m), top in best_search_trials(table, sweep.search.metric).items()}
    store.write_text("best.yaml", yaml.safe_dump(best, sort_keys=True))
    store.write_text("manifest.json", json.dumps(manifest(sweep), indent=2))
    return store.uri(TRIALS_FILE)


def read_table(store: Storage, rel: str = "trials.parquet") -> pl.DataFrame | None:
    """A trials table from the storage (None while it does not exist)."""
    data = store.read_bytes(rel)
    return None if data is None else pl.read_parquet(io.BytesIO(data))


def manifest(sweep: SweepConfig) -> dict[str, Any]:
    """What wrote the results: schema version, sweep config, package versions, git commit, times."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    from indivaid.config import to_dict

    def ver(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        commit = None
    started = sweep.store.read_json("manifest.json").get("started_at")  # kept across rewrites and resumes
    return {"schema_version": SCHEMA_VERSION, "rehearsal": sweep.rehearsal, "sweep": to_dict(sweep),
            "storage": sweep.storage_uri,
            "indivaid": ver("indivaid"), "torch": ver("torch"), "open_clip": ver("open_clip_torch"), "ray": ver("ray"),
            "git_commit": commit, "started_at": started or time.time(), "written_at": time.time()}


def best_search_trials(table: pl.DataFrame, metric: str = "val_mAP") -> dict[tuple[str, str], dict[str, Any]]:
    """Per (dataset, method): the search trial with the best validation score, and its parameters.

    Failed trials never qualify (a run that diverged after one good epoch is not a config to
    re-run); ties go to the smaller trial id, so the choice is reproducible.
    """
    if not table.height:
        return {}
    best_col = "best_val_mAP" if metric == "val_mAP" else metric
    if best_col not in table.columns:
        raise ConfigError(f"search.metric {metric!r}: no column {best_col!r} in trials.parquet "
                       f"(known: {', '.join(c for c in TRIAL_SCHEMA if c.startswith('val_'))})")
    search = table.filter((pl.col("phase") == "search") & (pl.col("status") != "error")
                          & pl.col(best_col).is_not_null() & pl.col(best_col).is_not_nan())
    best = {}
    for (d, m), grp in search.group_by(["dataset", "method"], maintain_order=True):
        top = grp.sort([best_col, "trial_id"], descending=[True, False]).row(0, named=True)
        best[(d, m)] = {"trial_id": top["trial_id"], metric: top[best_col],
                        "params": {k.removeprefix(PARAM_PREFIX): v for k, v in top.items()
                                   if k.startswith(PARAM_PREFIX) and v is not None}}
    return best
