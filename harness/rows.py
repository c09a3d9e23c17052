"""One row per trial of trials.parquet, built from the trial's own records in its storage folder
(``trial.json``, the trainer's ``run/`` files), from what Tune recorded of it, read through Tune's
public ``ExperimentAnalysis`` and ``ResultGrid`` (status, reports, error), and from the starts that
Tune's callback counted (``attempts.json``). Tune's own files are never parsed here.

The schema the rows fill lives in harness.results; this module needs the trainer's config (torch)
and Tune, so it is imported only where rows are built (the sweep), never by the leaderboard.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import polars as pl

from harness.results import (ATTEMPTS_FILE, FINISHED, PARAM_PREFIX, REPORT_LR, REPORT_S2_EPOCH, REPORT_STAGE,
                             REPORT_STEPS, REPORT_VAL_MAP, ROBUST_METRICS, ROBUSTNESS_FILE, RUN, RUN_NUMBERS,
                             SPLIT_METRICS, STARTS_FILE, TIMEOUT_FILE, TRIAL_INFO, to_table)

if TYPE_CHECKING:
    from harness.config import ResourcesConfig, SweepConfig
    from harness.storage import Storage

log = logging.getLogger(__name__)


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
    # a finished run's history is in its result.json; an unfinished one's (ASHA-stopped, failed) in Tune's
    history = result.get("history") or (tune.history if tune is not None else [])
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
        "gpu_s": wall * gpus_held(sweep.resources_for(info["dataset"], info["method"])),
        # a run that finished and then failed (its robustness scoring, storing its files) stays completed,
        # its error beside its numbers
        "error": tune.error if tune is not None and (status in ("error", "timeout") or tune.status == "ERROR")
        else None,
        "created_at": info["started"],
        "config_path": store.uri(rel, RUN, "config.json"), "split_path": store.uri(rel, RUN, "split.csv"),
        "checkpoint_path": store.uri(rel, RUN, "model.pt") if f"{RUN}/model.pt" in files else None,
        "rehearsal": sweep.rehearsal,
        **_checkpoint_bytes(store, rel, files),
        **_schedule_reached(history, cfg.stage2.lr),
        **{col: _lookup(result, key) for col, key in RUN_NUMBERS.items()},
        **_split_metrics(result, progress),
        **{col: (robust.get("metrics") or {}).get(col) for col in ROBUST_METRICS},
    }
    for k, v in info["params"].items():
        row[f"{PARAM_PREFIX}{k}"] = v
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
