"""The sweep's results files: the trial-row schema, how a row is read from a trial folder, and the
writing of ``trials.parquet``, ``best.yaml`` and ``manifest.json``.

One module owns the schema so that the writer (the sweep) and the readers (the leaderboard, the
rehearsal report, the live table) cannot drift apart. Importing it costs neither torch nor Ray:
the leaderboard runs on a laptop with results copied from a cluster. What needs the trainer's
config (``collect``) imports it when called.

A number the trainer adds to ``result.json`` becomes a column by one line here: in
``SPLIT_METRICS`` (a key of its ``val``/``test`` dicts, column ``<split>_<key>``) or in
``RUN_NUMBERS`` (a top-level or dotted key, column of the given name). Readers get it typed and
null where a run lacks it, so older files and partial sweeps load the same way.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import yaml

from indivaid.config import ConfigError
from indivaid.utils.io import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from harness.config import ResourcesConfig, SweepConfig

log = logging.getLogger(__name__)

#: Bump when a column is renamed or removed or changes meaning (readers refuse other versions);
#: added columns keep it, since every reader conforms a file to ``TRIAL_SCHEMA`` (absent: null).
SCHEMA_VERSION = 1
FINISHED = ".harness-finished"  # marks an experiment folder whose Tuner.fit returned with every trial ended
TIMEOUT_FILE = "timeout.json"  # in a trial folder: the trial was stopped for running past trial_timeout_minutes
PARAM_PREFIX = "param."  # searched values: one column per dotted trainer key, dtype as sampled

#: A trial's status: ``stopped`` = by ASHA; ``running`` also covers an interrupted sweep's trials.
STATUSES = ("running", "completed", "stopped", "error", "timeout")
#: ``stop_reason`` refines ``stopped`` into ``asha_stopped`` (below budget) or ``error``.
STOP_REASONS = ("completed", "running", "error", "timeout", "asha_stopped")

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
# One row per trial folder
# ---------------------------------------------------------------------------------------------


def read_json(path: Path) -> dict:
    """A JSON object, or {} while it is missing or half-written."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def all_progress(trial_dir: Path) -> list[dict]:
    """Every report Tune recorded for the trial (a half-written last line is skipped)."""
    out = []
    if (trial_dir / "result.json").is_file():
        for line in (trial_dir / "result.json").read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def last_progress(trial_dir: Path) -> dict:
    """Tune's last result line for the trial ({} if none); a half-written last line is skipped."""
    lines = (trial_dir / "result.json").read_text().splitlines() if (trial_dir / "result.json").is_file() else []
    for line in reversed(lines[-2:]):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return {}


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


def trial_status(trial_dir: Path, has_result: bool, progress: Mapping[str, Any]) -> tuple[str, int]:
    """(status, attempts) of a trial from its folder: completed, timeout, error (its last attempt
    failed), running (its experiment is not finished, or was interrupted) or stopped (by ASHA)."""
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


def stop_reason(status: str, progress: Mapping[str, Any], max_epochs: int, method: str) -> str:
    if status != "stopped":
        return status  # completed, running (or interrupted), error, timeout
    if int(progress.get(REPORT_S2_EPOCH, 0) or 0) < max_epochs and method != "zeroshot":
        return "asha_stopped"
    return "error"


def collect(sweep: SweepConfig, experiments: str = "*") -> pl.DataFrame:
    """One row per trial from the trial folders (works on partial and resumed sweeps);
    ``experiments`` is a glob of experiment folder names."""
    return to_table(trial_row(sweep, f) for f in sorted(sweep.storage_path.glob(f"{experiments}/*/trial.json")))


def trial_row(sweep: SweepConfig, info_file: Path) -> dict[str, Any]:
    """The trial's row from its folder: ``trial.json`` (written at its first start), the trainer's
    ``run/result.json`` (once it finished), Tune's ``result.json`` reports and ``error.txt``."""
    from harness.config import trial_config  # the trainer's config (torch): only when rows are built

    info = read_json(info_file)
    trial_dir = info_file.parent
    run = trial_dir / "run"
    result = read_json(run / "result.json")
    progress = last_progress(trial_dir)
    status, attempts = trial_status(trial_dir, bool(result), progress)
    cfg = trial_config(sweep, info["dataset"], info["method"], info["params"], info["seed"])
    # from the first start to the last report (retries included); the trainer's own clock otherwise
    wall = max(float(result.get("wall_s") or 0.0), progress.get("timestamp", info["started"]) - info["started"], 0.0)
    row: dict[str, Any] = {
        "sweep_id": sweep.name, "dataset": info["dataset"], "method": info["method"], "phase": info["phase"],
        "seed": info["seed"], "trial_id": info["trial_id"], "node_id": info["node_id"],
        "split_hash": result.get("split_hash") or _split_hash(run / "split.csv"), "protocol": _protocol(run / "split.csv"),
        "status": status,
        "stop_reason": stop_reason(status, progress, cfg.stage2.epochs, info["method"]),
        "epochs_run": int(progress.get(REPORT_S2_EPOCH, 0) or 0),
        "attempts": attempts,
        "wall_s": wall,
        "gpu_s": wall * gpus_held(sweep.resources_for(info["dataset"])),
        "error": _error(trial_dir),
        "created_at": info["started"],
        "config_path": str(run / "config.json"), "split_path": str(run / "split.csv"),
        "checkpoint_path": result.get("checkpoint"),
        "rehearsal": sweep.rehearsal,
        **_checkpoint_bytes(run),
        **_schedule_reached(result.get("history") or all_progress(trial_dir), cfg.stage2.lr),
        **{col: _lookup(result, key) for col, key in RUN_NUMBERS.items()},
        **_split_metrics(result, progress),
    }
    for k, v in info["params"].items():
        row[f"{PARAM_PREFIX}{k}"] = v
    row["best_val_mAP"] = _best_val(result, row["val_mAP"], cfg.eval.every, cfg.stage2.epochs)
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


def _best_val(result: Mapping[str, Any], last: float | None, every: int, epochs: int) -> float | None:
    """The best validation mAP the run measured in stage 2 (its evaluation epochs and the final
    score); not the zero-shot score that stage-1 reports carry, on which untrained configs tie."""
    evals = [h.get(REPORT_VAL_MAP) for h in result.get("history", [])
             if h.get(REPORT_STAGE) == 2 and (int(h.get(REPORT_S2_EPOCH, 0)) % every == 0
                                              or int(h.get(REPORT_S2_EPOCH, 0)) == epochs)]
    values = [v for v in [*evals, (result.get("val") or {}).get("mAP"), last] if v is not None and v == v]
    return max(values) if values else None


def _failures(error_file: Path) -> int:
    """How many times Tune recorded this trial failing (one "Failure # k" entry each)."""
    if not error_file.is_file():
        return 0
    return sum(1 for line in error_file.read_text(errors="replace").splitlines() if line.startswith("Failure # "))


def _line_count(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _split_hash(split_file: Path) -> str | None:
    from indivaid.data.catalogue import DataError
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


def _error(trial_dir: Path) -> str | None:
    """The exception line of a failed trial (the full traceback stays in its error.txt)."""
    err = trial_dir / "error.txt"
    if not err.is_file():
        return None
    lines = [ln.strip() for ln in err.read_text().splitlines() if ln.strip()]
    return lines[-1][:2000] if lines else "failed (empty error.txt)"


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def write_results(sweep: SweepConfig, table: pl.DataFrame) -> Path:
    """trials.parquet (conformed to the schema), best.yaml and manifest.json, each atomically."""
    out = sweep.storage_path / "trials.parquet"
    buf = io.BytesIO()
    conform(table).write_parquet(buf)
    atomic_write_bytes(out, buf.getvalue())
    best = {f"{d}/{m}": top for (d, m), top in best_search_trials(table, sweep.search.metric).items()}
    atomic_write_text(sweep.storage_path / "best.yaml", yaml.safe_dump(best, sort_keys=True))
    atomic_write_text(sweep.storage_path / "manifest.json", json.dumps(manifest(sweep), indent=2))
    return out


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
    started = read_json(sweep.storage_path / "manifest.json").get("started_at")  # kept across rewrites and resumes
    return {"schema_version": SCHEMA_VERSION, "rehearsal": sweep.rehearsal, "sweep": to_dict(sweep),
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
