"""The sweep's results files: the trial-row schema, and the writing and reading of
``trials.parquet``, ``best.yaml`` and ``manifest.json``, all through the sweep's storage
(harness.storage: a local folder or an object store). Rows are built by harness.rows.

One module owns the schema so that the writer (the sweep) and the readers (the leaderboard, the
rehearsal report, the live table) cannot drift apart. Importing it costs neither torch nor Ray:
the leaderboard runs on a laptop with results copied from a cluster.

A number the trainer adds to ``result.json`` becomes a column by one line here: in
``SPLIT_METRICS`` (a key of its ``val``/``test`` dicts, column ``<split>_<key>``) or in
``RUN_NUMBERS`` (a top-level or dotted key, column of the given name). Readers get it typed and
null where a run lacks it, so older files and partial sweeps load the same way. A final run scored
by the robustness suite (``final.robustness``) adds ``ROBUST_METRICS`` from ``run/robustness.json``.
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

if TYPE_CHECKING:
    from harness.config import SweepConfig
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
# Report values
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
