"""``python -m harness.leaderboard``: one leaderboard from the sweeps' ``trials.parquet`` files.

Per dataset x method: the final runs (best searched config, several seeds, scored on test) as mean
± sample std of Rank-1/5/10, mAP and mINP; the difference to CLIP-ReID on the same dataset with a
paired bootstrap over seeds when both ran at least 5 of the same seeds (fewer: Δ shown, not tested),
Holm-corrected per method across datasets; what it cost (trials, failures, GPU-hours,
images/s). A dataset x method without final runs falls back to its best search trial, selected and
scored on validation (marked †, never tested). Published numbers from ``harness/published.csv`` are
shown beside, as context. Plots: the metric per dataset and method, hyperparameter importance and a
parallel-coordinates view of the search.

Runs on a laptop with results copied from a cluster: polars, numpy, matplotlib (Agg) and rich;
no Ray, no torch at import time.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import logging
import math
import os
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from indivaid.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)

METRICS = ("rank1", "rank5", "rank10", "mAP", "mINP")  # the order re-ID papers print them in
LABELS = {"rank1": "Rank-1", "rank5": "Rank-5", "rank10": "Rank-10", "mAP": "mAP", "mINP": "mINP"}
REFERENCE = "clipreid"  # every Δ is against CLIP-ReID on the same dataset
UNTRAINED = frozenset({"zeroshot"})  # one deterministic run: Δ shown, never tested
METHOD_ORDER = ("zeroshot", "clipreid", "indivaid", "indivaid-mean", "indivaid-nofusion")
METHOD_LABELS = {"zeroshot": "zero-shot CLIP", "clipreid": "CLIP-ReID", "indivaid": "IndivAID",
                 "indivaid-mean": "IndivAID (mean fusion)", "indivaid-nofusion": "IndivAID (no fusion)"}
DATASET_LABELS = {"atrw": "ATRW", "friesiancattle2017": "FriesianCattle2017", "ipanda50": "IPanda50", "lion": "Lion",
                  "mpdd": "MPDD", "nyala": "Nyala", "polarbear": "PolarBear", "seastar": "SeaStar", "stoat": "Stoat",
                  "synthetic": "Synthetic", "msmt17": "MSMT17", "market1501": "Market-1501",
                  "dukemtmc": "DukeMTMC-reID", "veri776": "VeRi-776"}
N_BOOT = 10_000
RNG_SEED = 0
# Paired seeds a comparison needs before it is tested: the default number of final seeds a sweep runs.
# Below it the bootstrap is degenerate (too few distinct resamples: C(2n - 1, n), 10 for n = 3, 35 for
# n = 4), so differences of one sign put p at its floor 2/(B + 1) whatever their size.
MIN_PAIRS = 5
ALPHA = 0.05
DASH = "—"
FALLBACK_MARK = "†"
REHEARSAL_MARK = "(rehearsal)"  # after the dataset name of rows from a CPU rehearsal (tiny model, generated data)
SOURCE_TEST = "test (final runs)"
SOURCE_VAL = "val (best search trial)"
MAX_DEPTH = 3  # results/<group>/<sweep>/trials.parquet at most

# Columns the leaderboard reads, with the dtype it wants: absent ones are added as nulls, all-null
# (Null-typed) ones are cast, so partial sweeps and older files load the same way.
TRIAL_SCHEMA: dict[str, Any] = {
    "sweep_id": pl.String, "dataset": pl.String, "method": pl.String, "phase": pl.String, "seed": pl.Int64,
    "trial_id": pl.String, "split_hash": pl.String, "protocol": pl.String, "status": pl.String,
    "stop_reason": pl.String, "wall_s": pl.Float64, "gpu_s": pl.Float64, "images_per_s": pl.Float64,
    "error": pl.String, "created_at": pl.Float64, "best_val_mAP": pl.Float64,
    **{f"{split}_{m}": pl.Float64 for split in ("val", "test") for m in METRICS},
}
REQUIRED = ("dataset", "method", "phase")


class LeaderboardError(Exception):
    """Bad input (no results, unknown schema, unreadable file): printed as one ``error:`` line, exit 2."""


@dataclass(frozen=True)
class Loaded:
    """All trials of all sweep folders found, and one row per sweep folder (for headers and plots)."""

    trials: pl.DataFrame
    sweeps: pl.DataFrame


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def supported_schema_version() -> int:
    """The results schema this code reads: the one harness.sweep writes.

    Imported lazily: harness.sweep pulls in the trainer (torch) at import, which the leaderboard's
    import must not pay; it never imports Ray at import time.
    """
    from harness.sweep import SCHEMA_VERSION

    return SCHEMA_VERSION


def find_sweep_dirs(dirs: Sequence[Path]) -> list[Path]:
    """Sweep folders (holding trials.parquet) at or below each dir, sorted, without duplicates.

    The walk stops at a sweep folder (its Tune trees can hold thousands of folders) and MAX_DEPTH
    levels down. A sweep folder with no trials.parquet yet (no experiment finished) is skipped, logged.
    """
    found: list[Path] = []
    for top in dirs:
        if not top.is_dir():
            continue
        base_depth = len(top.resolve().parts)
        for root, subdirs, files in os.walk(top):
            here = Path(root)
            if "trials.parquet" in files:
                found.append(here)
                subdirs.clear()
                continue
            if "sweep.yaml" in files or "manifest.json" in files:
                log.warning("%s: sweep folder without trials.parquet (no experiment finished yet): skipped", here)
                subdirs.clear()
                continue
            subdirs[:] = sorted(s for s in subdirs if not s.startswith(".") and s != "cache")
            if len(here.resolve().parts) - base_depth >= MAX_DEPTH:
                subdirs.clear()
    unique = {p.resolve(): p for p in found}
    return [unique[k] for k in sorted(unique)]


def read_manifest(sweep_dir: Path, supported: int) -> dict[str, Any]:
    """The sweep's manifest.json, refusing a missing one (sweep not finished writing) or another schema."""
    path = sweep_dir / "manifest.json"
    if not path.is_file():
        raise LeaderboardError(
            f"{path} is missing: the sweep did not finish writing its results; re-run it with "
            f"`python -m harness.sweep FILE --resume` (its config is in {sweep_dir / 'sweep.yaml'})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LeaderboardError(f"{path}: unreadable manifest ({e})") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != supported:
        raise LeaderboardError(f"{path}: schema_version {version!r} is not supported (this harness reads "
                               f"schema_version {supported}); use the harness version that wrote it")
    return manifest


def read_trials(path: Path) -> pl.DataFrame:
    """trials.parquet with the columns the leaderboard reads, in TRIAL_SCHEMA's dtypes, plus the params."""
    try:
        df = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LeaderboardError(f"{path}: unreadable parquet file ({first})") from None
    if df.height == 0:  # harness.sweep writes an empty table before any trial has a folder
        log.warning("%s: no trials yet", path)
        return pl.DataFrame(schema=TRIAL_SCHEMA)
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise LeaderboardError(f"{path}: not a trials table (missing column(s) {', '.join(missing)})")
    params = sorted(c for c in df.columns if c.startswith("param."))
    out = df.select(
        *[pl.col(c).cast(t, strict=False) if c in df.columns else pl.lit(None, t).alias(c)
          for c, t in TRIAL_SCHEMA.items()],
        *params,
    )
    # a NaN metric (a diverged run) is a missing value, not a number to average or test
    return out.with_columns(pl.col(pl.Float64).fill_nan(None))


def load_results(dirs: Sequence[Path]) -> Loaded:
    """Every sweep under dirs, concatenated; each row labelled with its sweep (``sweep_id``) and the
    sweep's age (``_order``: 0 = oldest, by manifest started_at (older files: written_at), else the
    newest trial's created_at)."""
    sweep_dirs = find_sweep_dirs(dirs)
    if not sweep_dirs:
        where = ", ".join(str(d) for d in dirs)
        raise LeaderboardError(f"no results found: no trials.parquet in {where} or its subfolders; "
                               f"`python -m harness.sweep sweeps/smoke.yaml` creates some")
    supported = supported_schema_version()
    frames, infos = [], []
    for d in sweep_dirs:
        manifest = read_manifest(d, supported)
        trials = read_trials(d / "trials.parquet")
        name = (manifest.get("sweep") or {}).get("name") or (trials["sweep_id"].drop_nulls().first()) or d.name
        # when the sweep started: a later --resume rewrites written_at but is not a newer sweep
        stamp = manifest.get("started_at", manifest.get("written_at"))
        if not isinstance(stamp, (int, float)):
            stamp = trials["created_at"].max() or 0.0
        if manifest.get("rehearsal"):  # CPU rehearsal of a sweep: labelled, and compared only among themselves
            trials = trials.with_columns(pl.format("{} {}", "dataset", pl.lit(REHEARSAL_MARK)).alias("dataset"))
        frames.append(trials.with_columns(pl.lit(bool(manifest.get("rehearsal"))).alias("_rehearsal")))
        infos.append({"sweep_id": str(name), "dir": str(d), "written_at": float(stamp),
                      "git_commit": manifest.get("git_commit"), "n_trials": trials.height})
    sweeps = pl.DataFrame(infos, schema={"sweep_id": pl.String, "dir": pl.String, "written_at": pl.Float64,
                                         "git_commit": pl.String, "n_trials": pl.Int64})
    # Two folders with the same sweep name (copies from two clusters): label them apart by folder.
    sweeps = sweeps.with_columns(
        pl.when(pl.len().over("sweep_id") > 1).then(pl.format("{} ({})", "sweep_id", "dir")).otherwise("sweep_id")
        .alias("sweep_id"))
    order = sweeps.with_row_index("_i").sort("written_at", "dir")["_i"].to_list()
    rank = {i: r for r, i in enumerate(order)}
    labelled = [f.with_columns(pl.lit(sweeps["sweep_id"][i]).alias("sweep_id"),
                               pl.lit(rank[i], pl.Int64).alias("_order"))
                for i, f in enumerate(frames)]
    trials = pl.concat(labelled, how="diagonal_relaxed")
    if not trials.height:
        raise LeaderboardError(f"no results found: the sweeps under {', '.join(str(d) for d in dirs)} have no trials "
                               f"yet; `python -m harness.sweep sweeps/smoke.yaml` creates some")
    log.info("loaded %d trial(s) from %d sweep(s): %s", trials.height, sweeps.height, ", ".join(sweeps["dir"]))
    return Loaded(trials=trials, sweeps=sweeps.sort("written_at", "dir"))


def select_newest(trials: pl.DataFrame) -> pl.DataFrame:
    """Newest wins: per dataset x method, only the trials of the newest sweep that ran it.

    Per dataset x method rather than per dataset, so a later sweep of one method (or an ablation
    sweep) replaces that method's row without deleting the other methods' rows of older sweeps.
    """
    newest = trials.filter(pl.col("_order") == pl.col("_order").max().over("dataset", "method"))
    dropped = trials.height - newest.height
    if dropped:
        log.info("newest sweep wins per dataset x method: %d trial(s) of older sweeps left out (--all keeps them)",
                 dropped)
    return newest


def with_scope(trials: pl.DataFrame, keep_all: bool) -> pl.DataFrame:
    """``_scope``: what rows are compared within (Holm, mean rows): the sweep with --all, else all real
    results together and all rehearsals together (never mixed)."""
    kind = pl.when(pl.col("_rehearsal")).then(pl.lit("rehearsal")).otherwise(pl.lit(""))
    return trials.with_columns((pl.format("{}{}", "sweep_id", kind) if keep_all else kind).alias("_scope"))


def param_columns(df: pl.DataFrame) -> list[str]:
    return sorted(c for c in df.columns if c.startswith("param."))


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int = N_BOOT,
                     rng_seed: int = RNG_SEED) -> tuple[float, float]:
    """Mean paired difference a - b and its two-sided bootstrap p-value (H0: no difference).

    The seed pairs are resampled with replacement n_boot times (fixed RNG: deterministic output);
    p = 2 * min((1 + #{Δ* <= 0}) / (n_boot + 1), (1 + #{Δ* >= 0}) / (n_boot + 1)), capped at 1. The
    +1s count the observed sample as one of the resamples, so p is never 0 (its floor is 2/(B+1)).
    Accepts any n >= 2, but n pairs have only C(2n - 1, n) distinct resamples: the board tests only
    comparisons with at least MIN_PAIRS pairs.
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.ndim != 1 or d.size < 2:
        raise ValueError(f"paired bootstrap needs at least 2 pairs, got {d.size}")
    rng = np.random.default_rng(rng_seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    le, ge = int(np.count_nonzero(means <= 0)), int(np.count_nonzero(means >= 0))
    return float(d.mean()), min(1.0, 2.0 * (1 + min(le, ge)) / (n_boot + 1))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given): the i-th smallest p times (m - i + 1),
    made monotone with a running max and capped at 1. Controls the family-wise error rate."""
    p = np.asarray(pvalues, dtype=float)
    if p.size == 0:
        return []
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate((p.size - np.arange(p.size)) * p[order])
    out = np.empty(p.size)
    out[order] = np.minimum(stepped, 1.0)
    return out.tolist()


def _method_rank(col: str = "method") -> pl.Expr:
    known = {m: i for i, m in enumerate(METHOD_ORDER)}
    return pl.col(col).replace_strict(known, default=len(known), return_dtype=pl.Int64)


def _final_runs(trials: pl.DataFrame) -> pl.DataFrame:
    """Completed final-phase runs scored on test (a table without a status column counts as completed)."""
    return trials.filter((pl.col("phase") == "final") & (pl.col("status").fill_null("completed") == "completed")
                         & pl.col("test_mAP").is_not_null())


def _config_strings(df: pl.DataFrame, params: list[str]) -> list[str | None]:
    """'key=value, …' per row from its non-null param columns ('defaults' when none apply)."""
    out: list[str | None] = []
    for row in df.select(params).iter_rows(named=True) if params else ({} for _ in range(df.height)):
        items = [f"{k.removeprefix('param.')}={_fmt_value(v)}" for k, v in sorted(row.items()) if v is not None
                 and not (isinstance(v, float) and math.isnan(v))]
        out.append(", ".join(items) if items else "defaults")
    return out


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) < 1e6 else f"{v:.3g}"
    return str(v)


def aggregate(trials: pl.DataFrame, metric: str = "mAP", keep_all: bool = False) -> pl.DataFrame:
    """The leaderboard: one row per (sweep when keep_all,) dataset x method, then per-method mean rows.

    Metrics in percent, Δ in percentage points, p-values as probabilities. Every dataset x method
    pair seen in the results gets a row, empty ("—" when shown) where that method has no trials.
    """
    if metric not in METRICS:
        raise LeaderboardError(f"unknown metric {metric!r} (choose from {', '.join(METRICS)})")
    trials = with_scope(trials, keep_all)
    key = ["_scope", "dataset", "method"]
    params = param_columns(trials)

    grid = trials.select("_scope", "dataset").unique().join(trials.select("_scope", "method").unique(), on="_scope")
    cost = trials.group_by(key).agg(
        pl.col("sweep_id").drop_nulls().first(),
        pl.col("protocol").drop_nulls().first(),
        pl.len().alias("trials"),
        (pl.col("status") == "error").sum().alias("errors"),
        (pl.col("stop_reason") == "asha_stopped").sum().alias("stopped"),
        (pl.col("gpu_s").sum() / 3600).alias("gpu_hours"),
        pl.col("images_per_s").fill_nan(None).mean().alias("images_per_s"),
    )
    final = _final_runs(trials)
    fstats = final.sort("seed").group_by(key).agg(
        pl.len().alias("n_final"),
        *[(100 * pl.col(f"test_{m}").mean()).alias(f"f_{m}_mean") for m in METRICS],
        *[(100 * pl.col(f"test_{m}").std(ddof=1)).alias(f"f_{m}_std") for m in METRICS],
        *[pl.col(p).drop_nulls().first() for p in params],
    )
    fstats = fstats.with_columns(pl.Series("f_config", _config_strings(fstats, params), dtype=pl.String)).drop(params)
    # Fallback: the search trial with the best best_val_mAP (as best.yaml picks), failed trials excluded.
    best = (trials.filter((pl.col("phase") == "search") & (pl.col("status").fill_null("completed") != "error")
                          & pl.col("best_val_mAP").is_not_nan() & pl.col("val_mAP").is_not_null())
            .sort(["best_val_mAP", "trial_id"], descending=[True, False], nulls_last=True)
            .group_by(key, maintain_order=True).first())
    best = best.select(*key, *[(100 * pl.col(f"val_{m}")).alias(f"v_{m}") for m in METRICS],
                       pl.Series("v_config", _config_strings(best, params), dtype=pl.String))

    has_final = pl.col("n_final").fill_null(0) > 0
    has_val = pl.col("v_mAP").is_not_null()
    board = (grid.join(cost, on=key, how="left").join(fstats, on=key, how="left").join(best, on=key, how="left")
             .with_columns(
                 pl.when(has_final).then(pl.lit(SOURCE_TEST)).when(has_val).then(pl.lit(SOURCE_VAL)).alias("source"),
                 pl.when(has_final).then("n_final").when(has_val).then(1).alias("n"),
                 *[pl.when(has_final).then(f"f_{m}_mean").otherwise(f"v_{m}").alias(f"{m}_mean") for m in METRICS],
                 *[pl.when(has_final).then(f"f_{m}_std").alias(f"{m}_std") for m in METRICS],
                 pl.when(has_final).then("f_config").otherwise("v_config").alias("best_config"),
                 *[pl.col(c).fill_null(0) for c in ("trials", "errors", "stopped")],
             ))
    board = _add_deltas(board, final, metric, key)
    board = _add_mean_rows(board, metric)
    board = board.with_columns(pl.lit(metric).alias("metric"), pl.lit(None, pl.String).alias("citation"))
    return board.select(BOARD_COLUMNS)


BOARD_COLUMNS = [
    "kind", "_scope", "sweep_id", "dataset", "method", "source", "protocol", "n",
    *[f"{m}_{s}" for m in METRICS for s in ("mean", "std")],
    "metric", "delta", "n_pairs", "p", "p_holm", "significant", "test", "best_config",
    "trials", "errors", "stopped", "gpu_hours", "images_per_s", "citation", "note",
]


def _add_deltas(board: pl.DataFrame, final: pl.DataFrame, metric: str, key: list[str]) -> pl.DataFrame:
    """Δ vs CLIP-ReID (pp), the paired bootstrap p and its Holm adjustment per method across datasets.

    Pairs are the seeds both ran (per-seed mean if a seed appears twice). Δ = mean paired
    difference, tested only with at least MIN_PAIRS pairs (1 to MIN_PAIRS - 1: shown, not tested);
    for an untrained method or without a shared seed, the difference of the means, not tested.
    """
    col = f"test_{metric}"
    per_seed = final.filter(pl.col(col).is_not_null()).group_by([*key, "seed"]).agg(pl.col(col).mean().alias("a"))
    ref = per_seed.filter(pl.col("method") == REFERENCE).select("_scope", "dataset", "seed", pl.col("a").alias("b"))
    pairs = (per_seed.join(ref, on=["_scope", "dataset", "seed"], how="inner").sort("seed")
             .group_by(key).agg("a", "b"))
    splits = final.group_by(key).agg(pl.col("split_hash").drop_nulls().unique().sort().alias("splits"))
    ref_rows = board.filter(pl.col("method") == REFERENCE).select(
        "_scope", "dataset", pl.col(f"{metric}_mean").alias("ref_mean"), pl.col("source").alias("ref_source"))
    ref_splits = splits.filter(pl.col("method") == REFERENCE).select("_scope", "dataset",
                                                                     pl.col("splits").alias("ref_splits"))
    same = ["_scope", "dataset"]
    rows = (board.join(pairs, on=key, how="left").join(splits, on=key, how="left")
            .join(ref_rows, on=same, how="left").join(ref_splits, on=same, how="left"))

    deltas, ps, n_pairs, tests, notes = [], [], [], [], []
    for r in rows.select("method", "source", f"{metric}_mean", "a", "b", "splits", "ref_mean", "ref_source",
                         "ref_splits").iter_rows(named=True):
        delta, p, n, test, note = None, None, len(r["a"] or []), "n/a", None
        if r["source"] is None:
            test, note = None, "no results"
        elif r["method"] == REFERENCE:
            test, note = ("ref", "reference") if r["source"] == SOURCE_TEST else (None, "reference, not on test")
        elif r["source"] == SOURCE_VAL:
            note = "selected on validation: no test"
        elif r["ref_source"] != SOURCE_TEST:
            note = "no CLIP-ReID test runs on this dataset"
        elif r["splits"] and r["ref_splits"] and r["splits"] != r["ref_splits"]:
            delta, note = r[f"{metric}_mean"] - r["ref_mean"], "different splits from CLIP-ReID's: not tested"
        elif r["method"] in UNTRAINED:
            delta, note = r[f"{metric}_mean"] - r["ref_mean"], "no training (one deterministic run): not tested"
        elif n >= MIN_PAIRS:
            d, p = paired_bootstrap(r["a"], r["b"])
            delta = 100 * d
        else:
            if n == 0:
                delta = r[f"{metric}_mean"] - r["ref_mean"]
            else:
                delta = 100 * float(np.mean(np.asarray(r["a"], dtype=float) - np.asarray(r["b"], dtype=float)))
            note = f"{n} paired seed{'s' if n != 1 else ''}: not tested (needs {MIN_PAIRS})"
        deltas.append(delta)
        ps.append(p)
        n_pairs.append(n)
        tests.append(test)
        notes.append(note)
    board = board.with_columns(pl.Series("delta", deltas, dtype=pl.Float64), pl.Series("p", ps, dtype=pl.Float64),
                               pl.Series("n_pairs", n_pairs, dtype=pl.Int64), pl.Series("test", tests, dtype=pl.String),
                               pl.Series("note", notes, dtype=pl.String))
    # Holm per family: one method's tested comparisons across datasets (per sweep with --all).
    adjusted = pl.Series("p_holm", [None] * board.height, dtype=pl.Float64)
    tested = board.with_row_index("_i").filter(pl.col("p").is_not_null())
    for *_, idx in tested.group_by("_scope", "method").agg("_i").iter_rows():
        adjusted = adjusted.scatter(idx, holm(board["p"].gather(idx).to_list()))
    return board.with_columns(adjusted).with_columns(
        pl.when(pl.col("p_holm").is_not_null()).then(pl.col("p_holm") < ALPHA).alias("significant"),
    ).with_columns(
        pl.when(pl.col("significant")).then(pl.lit("*")).when(pl.col("significant").not_()).then(pl.lit("n.s."))
        .otherwise("test").alias("test"))


def _add_mean_rows(board: pl.DataFrame, metric: str) -> pl.DataFrame:
    """Per method, the unweighted mean over the datasets where it and CLIP-ReID both have test results
    (only when the board has at least two datasets; a one-dataset mean would repeat its row)."""
    ref_done = (board.filter((pl.col("method") == REFERENCE) & (pl.col("source") == SOURCE_TEST))
                .select("_scope", "dataset"))
    both = board.join(ref_done, on=["_scope", "dataset"], how="semi").filter(pl.col("source") == SOURCE_TEST)
    many = board.group_by("_scope").agg(pl.col("dataset").n_unique().alias("k")).filter(pl.col("k") >= 2)
    means = both.join(many.select("_scope"), on="_scope", how="semi").group_by("_scope", "method").agg(
        pl.col("dataset").n_unique().alias("k"),
        pl.col("sweep_id").unique().sort().str.join(", "),
        *[pl.col(f"{m}_mean").mean() for m in METRICS],
        pl.col("delta").mean(),
    ).with_columns(
        pl.lit("mean").alias("dataset"),
        pl.format("mean of {} dataset{} (test)", "k", pl.when(pl.col("k") == 1).then(pl.lit("")).otherwise(pl.lit("s")))
        .alias("source"),
        pl.when(pl.col("method") == REFERENCE).then(pl.lit("ref")).otherwise(pl.lit("n/a")).alias("test"),
        pl.lit("mean over datasets: not tested (see the per-dataset rows)").alias("note"),
    ).drop("k")
    board = pl.concat([board.with_columns(pl.lit("result").alias("kind")),
                       means.with_columns(pl.lit("mean").alias("kind"))], how="diagonal_relaxed")
    return board.sort("_scope", pl.col("kind") == "mean", "dataset", _method_rank(), "method")


# ---------------------------------------------------------------------------------------------
# Published numbers
# ---------------------------------------------------------------------------------------------


def load_published() -> pl.DataFrame:
    """harness/published.csv (package data): percent, empty cells where the number is not known."""
    text = (Path(__file__).parent / "published.csv").read_text()  # shipped as package data next to this module
    return pl.read_csv(io.StringIO(text), schema_overrides={m: pl.Float64 for m in METRICS}, infer_schema_length=0)


def published_rows(published: pl.DataFrame, datasets: Sequence[str], which: str = "matching") -> pl.DataFrame:
    """The published rows to show, in board columns: for the datasets in the results ('matching'),
    every row ('all') or none; rows with neither a number nor a note (cells we could not read) are
    never shown."""
    if which == "none":
        return pl.DataFrame(schema=BOARD_SCHEMA)
    known = pl.any_horizontal([pl.col(m).is_not_null() for m in METRICS]) | pl.col("note").is_not_null()
    rows = published.filter(known)
    if which == "matching":
        rows = rows.filter(pl.col("dataset").is_in(list(datasets)))
    note = pl.concat_str([pl.lit("protocol: "), pl.col("protocol").fill_null("?"), pl.lit("; split: "),
                          pl.col("split").fill_null("?"), pl.lit("; like-for-like: "),
                          pl.col("like_for_like").fill_null("?"),
                          pl.when(pl.col("note").is_not_null()).then(pl.concat_str([pl.lit("; "), pl.col("note")]))
                          .otherwise(pl.lit(""))])
    return rows.select(
        pl.lit("published").alias("kind"), pl.lit("").alias("_scope"), pl.lit(None, pl.String).alias("sweep_id"),
        "dataset", "method", pl.lit("published").alias("source"), "protocol", pl.lit(None, pl.Int64).alias("n"),
        *[x for m in METRICS for x in (pl.col(m).alias(f"{m}_mean"), pl.lit(None, pl.Float64).alias(f"{m}_std"))],
        pl.lit(None, pl.String).alias("metric"), pl.lit(None, pl.Float64).alias("delta"),
        pl.lit(None, pl.Int64).alias("n_pairs"), pl.lit(None, pl.Float64).alias("p"),
        pl.lit(None, pl.Float64).alias("p_holm"), pl.lit(None, pl.Boolean).alias("significant"),
        pl.lit(None, pl.String).alias("test"), pl.lit(None, pl.String).alias("best_config"),
        *[pl.lit(None, pl.Int64).alias(c) for c in ("trials", "errors", "stopped")],
        *[pl.lit(None, pl.Float64).alias(c) for c in ("gpu_hours", "images_per_s")],
        "citation", note.alias("note"),
    ).sort("dataset", _method_rank())


BOARD_SCHEMA: dict[str, Any] = {
    "kind": pl.String, "_scope": pl.String, "sweep_id": pl.String, "dataset": pl.String, "method": pl.String,
    "source": pl.String, "protocol": pl.String, "n": pl.Int64,
    **{f"{m}_{s}": pl.Float64 for m in METRICS for s in ("mean", "std")},
    "metric": pl.String, "delta": pl.Float64, "n_pairs": pl.Int64, "p": pl.Float64, "p_holm": pl.Float64,
    "significant": pl.Boolean, "test": pl.String, "best_config": pl.String, "trials": pl.Int64, "errors": pl.Int64,
    "stopped": pl.Int64, "gpu_hours": pl.Float64, "images_per_s": pl.Float64, "citation": pl.String, "note": pl.String,
}


def full_table(board: pl.DataFrame, published: pl.DataFrame) -> pl.DataFrame:
    """Results, mean and published rows in one table (the CSV/JSON records), ``kind`` telling them apart."""
    parts = [board.select([pl.col(c).cast(t) for c, t in BOARD_SCHEMA.items()])]
    if published.height:
        parts.append(published.select([pl.col(c).cast(t) for c, t in BOARD_SCHEMA.items()]))
    return pl.concat(parts).drop("_scope")


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _num(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def fmt_metric(mean: Any, std: Any) -> str:
    """'63.0 ± 3.0' (percent, 1 decimal); the mean alone when there is no std (n = 1); '—' when missing."""
    mean, std = _num(mean), _num(std)
    if mean is None:
        return DASH
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def fmt_p(p: Any) -> str:
    p = _num(p)
    return DASH if p is None else ("<0.001" if p < 0.001 else f"{p:.3f}")


def fmt_delta(delta: Any, test: str | None) -> str:
    delta = _num(delta)
    if delta is None:
        return DASH
    return f"{delta:+.1f}" + (f" {test}" if test in ("*", "n.s.", "n/a") else "")


def label_method(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def label_dataset(dataset: str) -> str:
    return DATASET_LABELS.get(dataset, dataset)


def display_rows(board: pl.DataFrame, with_sweep: bool) -> tuple[list[str], list[list[str]]]:
    """Header and string cells of the results table, shared by the markdown, rich and HTML renderers."""
    metric = board["metric"].drop_nulls().first() or "mAP"
    header = ["Dataset", "Method", "Source", "n", *(LABELS[m] for m in METRICS),
              f"Δ {LABELS[metric]} vs CLIP-ReID (pp)", "p (Holm)", "Best config", "Trials", "Errors", "GPU-h", "img/s"]
    if with_sweep:
        header.insert(0, "Sweep")
    rows = []
    for r in board.iter_rows(named=True):
        empty = r["source"] is None
        method = label_method(r["method"]) + (f" {FALLBACK_MARK}" if r["source"] == SOURCE_VAL else "")
        mean = r["kind"] == "mean"
        cells = [
            "mean" if mean else label_dataset(r["dataset"]), method, r["source"] or DASH,
            DASH if r["n"] is None else str(r["n"]),
            *(fmt_metric(r[f"{m}_mean"], r[f"{m}_std"]) for m in METRICS),
            "ref" if r["test"] == "ref" else fmt_delta(r["delta"], r["test"]), fmt_p(r["p_holm"]),
            r["best_config"] or DASH,
            DASH if mean or r["trials"] is None else str(r["trials"]),
            DASH if mean or r["errors"] is None else str(r["errors"]),
            DASH if empty or r["gpu_hours"] is None else f"{r['gpu_hours']:.2f}",
            DASH if empty or _num(r["images_per_s"]) is None else f"{r['images_per_s']:.0f}",
        ]
        if with_sweep:
            cells.insert(0, r["sweep_id"] or DASH)
        rows.append(cells)
    return header, rows


def _fmt_published(v: float | None) -> str:
    """As printed in the paper: two decimals, or one when the second is 0 (52.54, 90.0)."""
    if v is None:
        return DASH
    text = f"{v:.2f}"
    return text[:-1] if text.endswith("0") else text


def published_display_rows(published: pl.DataFrame) -> tuple[list[str], list[list[str]]]:
    header = ["Dataset", "Method", *(LABELS[m] for m in METRICS), "Note", "Citation"]
    rows = [[label_dataset(r["dataset"]), label_method(r["method"]),
             *(_fmt_published(r[f"{m}_mean"]) for m in METRICS),
             r["note"] or "", r["citation"] or ""] for r in published.iter_rows(named=True)]
    return header, rows


def legend_lines(metric: str) -> list[str]:
    """What the marks, n and the statistics mean (markdown; the HTML and rich renderers reuse it)."""
    lab = LABELS[metric]
    few, more = (math.comb(2 * n - 1, n) for n in (MIN_PAIRS - 2, MIN_PAIRS - 1))  # distinct resamples of n pairs
    return [
        "Metrics: percent; mean ± sample std (ddof = 1) over the final runs, i.e. the best searched config "
        "re-run with n seeds and scored on the test split; one number when n = 1. "
        f"{DASH} = no result (method not run, or every trial failed).",
        f"{FALLBACK_MARK} selected on validation: no completed final run, so the row shows the search trial with "
        "the best validation mAP and its validation metrics (source `val (best search trial)`); never tested.",
        f"Δ: {lab} minus CLIP-ReID's on the same dataset, in percentage points, averaged over the seeds both "
        "ran (for a method without training, such as zero-shot CLIP, or without a shared seed: the difference "
        "of the means, not tested).",
        f"Test: paired bootstrap over seeds, B = {N_BOOT:,} resamples of the seed pairs (RNG seed {RNG_SEED}), "
        "two-sided p = 2·min((1 + #{Δ* ≤ 0}), (1 + #{Δ* ≥ 0})) / (B + 1), capped at 1; Holm-corrected per "
        f"method across datasets; `*` = significant at α = {ALPHA} after Holm, `n.s.` = not significant, "
        f"`n/a` = not tested (fewer than {MIN_PAIRS} paired seeds, no training, or different splits). "
        f"The test needs {MIN_PAIRS} paired seeds because the bootstrap of fewer is degenerate: too few "
        f"distinct resamples ({few} for {MIN_PAIRS - 2} seeds, {more} for {MIN_PAIRS - 1}), so differences "
        "of one sign put every resample on one side of 0 and p at its floor 2/(B + 1) whatever their size; "
        f"with fewer seeds Δ is the mean paired difference, not tested. Even with {MIN_PAIRS} seeds the "
        "bootstrap is optimistic: differences of one sign still give p = 2/(B + 1).",
        "mean rows: the unweighted mean over the datasets where the method and CLIP-ReID both have test "
        "results (shown with two or more datasets; not tested).",
        "Trials: every trial of the dataset × method (search and final, including ASHA-stopped and failed); "
        "Errors: failed trials; GPU-h: sum of gpu_s / 3600; img/s: mean training throughput of the trials "
        "that report it.",
        "Published: numbers from the papers (harness/published.csv), context only: other splits and, for "
        "Stoat, a protocol that counts the self-match. Unknown cells are left empty, never derived.",
    ]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in row] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in esc])


def _sweeps_line(sweeps: pl.DataFrame | None) -> str:
    if sweeps is None or not sweeps.height:
        return ""
    parts = []
    for s in sweeps.iter_rows(named=True):
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(s["written_at"]))
        commit = f", commit {s['git_commit'][:7]}" if s["git_commit"] else ""
        parts.append(f"`{s['sweep_id']}` ({when}{commit})")
    return "Sweeps: " + "; ".join(parts) + "."


def render_markdown(board: pl.DataFrame, published: pl.DataFrame | None = None, sweeps: pl.DataFrame | None = None,
                    plots: Sequence[str] = (), with_sweep: bool = False) -> str:
    """GitHub markdown: the table, the legend, the published rows and links to the plot files."""
    metric = board["metric"].drop_nulls().first() or "mAP"
    out = ["# Leaderboard", ""]
    line = _sweeps_line(sweeps)
    if line:
        out += [line, ""]
    out += [_md_table(*display_rows(board, with_sweep)), ""]
    out += [f"- {x}" for x in legend_lines(metric)] + [""]
    if published is not None and published.height:
        out += ["## Published numbers (context, not like-for-like)", "",
                _md_table(*published_display_rows(published)), ""]
    if plots:
        out += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    return "\n".join(out)


def render_rich(board: pl.DataFrame, published: pl.DataFrame | None = None, with_sweep: bool = False,
                width: int | None = None) -> str:
    """The terminal table (rich), as text (coloured when stdout is a terminal and no width is forced).

    Numbers never wrap; sources are abbreviated; on terminals narrower than 220 columns the costs
    and best configs go to a second table under the metrics.
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from indivaid.utils.console import OFF_TERMINAL_WIDTH, terminal_columns

    metric = board["metric"].drop_nulls().first() or "mAP"
    header, rows = display_rows(board, with_sweep)
    tty = width is None and sys.stdout.isatty()
    natural = width is None and terminal_columns() is None  # a log or a pipe: one line per row, nothing folded
    width = width or terminal_columns() or OFF_TERMINAL_WIDTH
    src = header.index("Source")
    short = {SOURCE_TEST: "test", SOURCE_VAL: "val"}
    records = list(board.iter_rows(named=True))
    metric_idx = [header.index(LABELS[m]) for m in METRICS]
    for r, cells in zip(records, rows):
        cells[src] = short.get(r["source"], cells[src].replace(" datasets (test)", "").replace(" dataset (test)", ""))
        for i in metric_idx:
            cells[i] = cells[i].replace(" ± ", "±")  # compact: the metrics table must fit ~150 columns
    key_cols = [h for h in header if h in ("Sweep", "Dataset", "Method")]
    cost_cols = ["Best config", "Trials", "Errors", "GPU-h", "img/s"]
    metric_cols = [h for h in header if h not in cost_cols]
    groups = [header] if width >= 220 else [metric_cols, key_cols + cost_cols]
    numeric = {"n", *(LABELS[m] for m in METRICS), "Trials", "Errors", "GPU-h", "img/s", "p (Holm)"}
    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=tty)
    for k, cols in enumerate(groups):
        title = (f"Leaderboard (percent; Δ {LABELS[metric]} vs CLIP-ReID in points)" if k == 0
                 else "Cost and best config")
        table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1))
        idx = [header.index(h) for h in cols]
        for i in idx:
            h = header[i]
            num = h in numeric or h.startswith("Δ")
            longest = max([len(c[i]) for c in rows] + [len(h)])
            table.add_column(f"Δ {LABELS[metric]}" if h.startswith("Δ") else h, justify="right" if num else "left",
                             no_wrap=num, overflow="fold", min_width=min(longest, 24) if not num else None,
                             max_width=44 if h == "Best config" and not natural else None)
        for r, cells in zip(records, rows):
            table.add_row(*(cells[i] for i in idx),
                          style="dim" if r["source"] is None else ("bold" if r["kind"] == "mean" else None))
        console.print(table)
    console.print(f"{FALLBACK_MARK} val = selected on validation (best search trial, no final run); * / n.s. = "
                  f"significant or not at α = {ALPHA} (paired bootstrap over seeds, Holm across datasets); "
                  f"n/a = not tested (e.g. fewer than {MIN_PAIRS} paired seeds). Full legend in leaderboard.md.")
    if published is not None and published.height:
        ph, prows = published_display_rows(published)
        pt = Table(title="Published numbers (context, not like-for-like)", box=box.SIMPLE_HEAD)
        for h in ph:
            pt.add_column(h, overflow="fold", max_width=60 if h in ("Note", "Citation") and not natural else None)
        for cells in prows:
            pt.add_row(*cells)
        console.print(pt)
    return buf.getvalue()


def render_csv(table: pl.DataFrame) -> str:
    """One row per dataset x method (plus mean and published rows, see ``kind``); metrics in percent."""
    return table.write_csv()


def render_json(table: pl.DataFrame) -> str:
    """The CSV's records as a JSON list (NaN written as null)."""
    records = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
               for r in table.iter_rows(named=True)]
    return json.dumps(records, indent=2, ensure_ascii=False) + "\n"


def render_html(board: pl.DataFrame, published: pl.DataFrame | None = None, sweeps: pl.DataFrame | None = None,
                plots: dict[str, bytes] | None = None, with_sweep: bool = False) -> str:
    """One self-contained HTML file: table, legend, published rows, plots as base64 data URIs."""
    metric = board["metric"].drop_nulls().first() or "mAP"

    def table(header: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join(f"<tr class=\"{(classes or [''] * len(rows))[i]}\">" +
                       "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for i, row in enumerate(rows))
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    header, rows = display_rows(board, with_sweep)
    classes = ["mean" if r["kind"] == "mean" else ("empty" if r["source"] is None else "")
               for r in board.iter_rows(named=True)]
    parts = [
        "<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Leaderboard</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:110em}"
        "table{border-collapse:collapse;font-size:0.9em;margin:1em 0}"
        "th,td{border:1px solid #ccc;padding:0.3em 0.6em;text-align:left;vertical-align:top}"
        "th{background:#f3f3f3}tr.mean td{font-weight:bold}tr.empty td{color:#999}"
        "img{max-width:100%;display:block;margin:1em 0}li{margin:0.3em 0}</style></head><body>",
        "<h1>Leaderboard</h1>",
    ]
    line = _sweeps_line(sweeps)
    if line:
        parts.append(f"<p>{html.escape(line.replace('`', ''))}</p>")
    parts.append(table(header, rows, classes))
    items = "".join(f"<li>{html.escape(x.replace('`', ''))}</li>" for x in legend_lines(metric))
    parts.append(f"<ul>{items}</ul>")
    if published is not None and published.height:
        parts += ["<h2>Published numbers (context, not like-for-like)</h2>", table(*published_display_rows(published))]
    if plots:
        parts.append("<h2>Plots</h2>")
        for name, png in plots.items():
            data = base64.b64encode(png).decode("ascii")
            parts.append(f"<figure><img alt=\"{html.escape(name)}\" src=\"data:image/png;base64,{data}\">"
                         f"<figcaption>{html.escape(name)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib's Agg canvas through Figure objects: headless, no pyplot global state)
# ---------------------------------------------------------------------------------------------


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _colour(method: str) -> str:
    """One colour per method across all plots (matplotlib's default cycle, by METHOD_ORDER)."""
    i = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER) + sum(map(ord, method)) % 4
    return f"C{i}"


def _panel_key(scope: str, dataset: str) -> str:
    return label_dataset(dataset) + (f"\n({scope})" if scope else "")


def plot_metric_bars(board: pl.DataFrame, metric: str) -> bytes | None:
    """Per dataset, one bar per method: mean of the metric with the std as error bar; hatched = † (val)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = board.filter((pl.col("kind") == "result") & pl.col(f"{metric}_mean").is_not_null())
    if not rows.height:
        log.info("plot %s bars skipped: no dataset x method has a %s", metric, metric)
        return None
    groups = rows.select("_scope", "dataset").unique(maintain_order=True).rows()
    methods = rows.sort(_method_rank(), "method")["method"].unique(maintain_order=True).to_list()
    width = 0.8 / len(methods)
    fig = Figure(figsize=(max(6.0, 1.5 + len(groups) * (0.6 + 0.45 * len(methods))), 4.5))
    ax = fig.add_subplot()
    by_key = {(r["_scope"], r["dataset"], r["method"]): r for r in rows.iter_rows(named=True)}
    top = 0.0
    for j, m in enumerate(methods):
        xs, ys, errs, hatches = [], [], [], []
        for i, (scope, d) in enumerate(groups):
            r = by_key.get((scope, d, m))
            if r is None:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(r[f"{metric}_mean"])
            std = _num(r[f"{metric}_std"])
            errs.append(math.nan if std is None else std)  # NaN: no error bar (one run)
            hatches.append("//" if r["source"] == SOURCE_VAL else "")
            top = max(top, ys[-1] + (std or 0.0))
        bars = ax.bar(xs, ys, width * 0.92, yerr=errs, capsize=3, color=_colour(m),
                      error_kw={"elinewidth": 1, "ecolor": "0.2"})
        for bar, h in zip(bars, hatches):
            bar.set_hatch(h)
    ax.set_xticks(range(len(groups)), [_panel_key(s, d) for s, d in groups])
    ax.set_ylabel(f"{LABELS[metric]} (%)")
    ax.set_ylim(0, min(100.0, top * 1.15 + 1))
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(f"{LABELS[metric]} per dataset and method (mean ± std over seeds; test split)")
    handles = [Patch(color=_colour(m), label=label_method(m)) for m in methods]  # plain: a hatched first bar
    if (rows["source"] == SOURCE_VAL).any():                                       # must not set the swatch
        handles.append(Patch(facecolor="white", edgecolor="0.3", hatch="//",
                             label=f"{FALLBACK_MARK} val (best search trial)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _png(fig)


def _search_trials(trials: pl.DataFrame) -> pl.DataFrame:
    """Search trials that produced a validation score: completed and ASHA-stopped ones."""
    return trials.filter((pl.col("phase") == "search") & pl.col("status").is_in(["completed", "stopped"])
                         & pl.col("best_val_mAP").is_not_null())


def hyperparameter_importance(trials: pl.DataFrame) -> pl.DataFrame:
    """|Spearman ρ| between each numeric parameter and best_val_mAP over the completed + ASHA-stopped
    search trials, per (sweep,) dataset x method: a simple, honest importance (monotone association
    only; with few trials it is noisy, so n is kept). Parameters constant over the trials are left out."""
    search = _search_trials(trials if "_scope" in trials.columns else with_scope(trials, False))
    numeric = [p for p in param_columns(search) if search[p].dtype.is_numeric()]
    if not search.height or not numeric:
        return pl.DataFrame(schema={"_scope": pl.String, "dataset": pl.String, "method": pl.String,
                                    "param": pl.String, "importance": pl.Float64, "n": pl.UInt32})
    long = (search.select("_scope", "dataset", "method", "best_val_mAP", *[pl.col(p).cast(pl.Float64) for p in numeric])
            .unpivot(index=["_scope", "dataset", "method", "best_val_mAP"], on=numeric, variable_name="param",
                     value_name="value")
            .drop_nulls("value"))
    return (long.group_by("_scope", "dataset", "method", "param")
            .agg(pl.corr("value", "best_val_mAP", method="spearman").abs().alias("importance"),
                 pl.len().alias("n"), pl.col("value").n_unique().alias("distinct"))
            .filter((pl.col("n") >= 3) & (pl.col("distinct") >= 2) & pl.col("importance").is_not_nan())
            .with_columns(pl.col("param").str.strip_prefix("param."))
            .sort("_scope", "dataset", _method_rank(), "param").drop("distinct"))


def plot_importance(trials: pl.DataFrame) -> bytes | None:
    """One panel per dataset: horizontal bars of |Spearman ρ| per parameter, one colour per method."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    imp = hyperparameter_importance(trials)
    if not imp.height:
        log.info("importance plot skipped: no numeric parameter varies over >= 3 completed/stopped search trials")
        return None
    panels = imp.select("_scope", "dataset").unique(maintain_order=True).rows()
    methods = imp.sort(_method_rank(), "method")["method"].unique(maintain_order=True).to_list()
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    n_params = imp["param"].n_unique()
    fig = Figure(figsize=(5.2 * ncols + 1.5, max(3.0, 0.45 * n_params * len(methods) / 1.5 + 1.6) * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    height = 0.8 / len(methods)
    for k, (scope, d) in enumerate(panels):
        ax = axes[k // ncols][k % ncols]
        sub = imp.filter((pl.col("_scope") == scope) & (pl.col("dataset") == d))
        params = sorted(sub["param"].unique().to_list())
        for j, m in enumerate(methods):
            s = sub.filter(pl.col("method") == m)
            if not s.height:
                continue
            pos = {p: i for i, p in enumerate(params)}
            ys = [pos[p] - 0.4 + height * (j + 0.5) for p in s["param"]]
            ax.barh(ys, s["importance"].to_list(), height * 0.9, color=_colour(m), label=label_method(m))
        counts = sub.group_by("method").agg(pl.col("n").max()).sort(_method_rank(), "method")
        ax.set_yticks(range(len(params)), params)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("|Spearman ρ| with best val mAP")
        ax.set_title(_panel_key(scope, d).replace("\n", " ") + "\ntrials: " +
                     ", ".join(f"{label_method(m)} {n}" for m, n in counts.iter_rows()), fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    for k in range(len(panels), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    fig.suptitle("Hyperparameter importance: |Spearman rank correlation| between each parameter and best val mAP\n"
                 "over the completed + ASHA-stopped search trials of each dataset x method (few trials: noisy)",
                 fontsize=10)
    handles = [Patch(color=_colour(m), label=label_method(m)) for m in methods]
    fig.legend(handles=handles, loc="lower center", ncols=len(methods), frameon=False, bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _png(fig)


def _normalise(values: list[Any]) -> tuple[list[float], str, str, bool]:
    """Values -> [0, 1] for one parallel axis: numbers min-max (log10 first when all positive and
    spanning at least a decade), categories evenly spaced in sorted order. Also the end labels."""
    present = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        lo, hi = min(present), max(present)
        log_scale = lo > 0 and hi / lo >= 10
        f = (lambda v: math.log10(v)) if log_scale else (lambda v: float(v))
        a, b = f(lo), f(hi)
        out = [math.nan if v is None or (isinstance(v, float) and math.isnan(v))
               else (0.5 if b == a else (f(v) - a) / (b - a)) for v in values]
        return out, _fmt_value(float(lo)), _fmt_value(float(hi)), log_scale
    cats = sorted({str(v) for v in present})
    pos = {c: (i / (len(cats) - 1) if len(cats) > 1 else 0.5) for i, c in enumerate(cats)}
    ys = [math.nan if v is None else pos[str(v)] for v in values]
    return ys, (cats[0] if cats else ""), (cats[-1] if cats else ""), False


def plot_parallel(trials: pl.DataFrame) -> bytes | None:
    """Parallel coordinates of the search: one panel per (sweep,) dataset x method, an axis per parameter
    (normalised to [0, 1]) plus best val mAP, lines coloured by best val mAP; dashed = ASHA-stopped."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    search = _search_trials(trials if "_scope" in trials.columns else with_scope(trials, False))
    params = param_columns(search)
    panels = []
    for (scope, d, m), g in search.sort("_scope", "dataset", _method_rank(), "method").group_by(
            "_scope", "dataset", "method", maintain_order=True):
        used = [p for p in params if g[p].null_count() < g.height]
        if g.height >= 2 and used:
            panels.append((scope, d, m, g, used))
    if not panels:
        log.info("parallel-coordinates plot skipped: no dataset x method has >= 2 scored search trials with parameters")
        return None
    # Panels flow in reading order, as many per row as the busiest dataset has methods (at most 3).
    per_dataset = max(sum(1 for s, d, *_ in panels if (s, d) == key) for key in {(s, d) for s, d, *_ in panels})
    ncols = min(3, per_dataset)
    nrows = math.ceil(len(panels) / ncols)
    max_axes = max(len(used) + 1 for *_, used in panels)
    fig = Figure(figsize=(max(5.0, 1.25 * max_axes + 1.5) * ncols, 3.4 * nrows + 0.8))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    cmap = colormaps["viridis"]
    for ax, (scope, d, m, g, used) in zip(axes, panels):
        cols = [*used, "best_val_mAP"]
        normed, ends, names = [], [], []
        for c in cols:
            vals = (100 * g[c]).to_list() if c == "best_val_mAP" else g[c].to_list()
            y, lo, hi, is_log = _normalise(vals)
            normed.append(y)
            ends.append((lo, hi))
            names.append("best val mAP (%)" if c == "best_val_mAP"
                         else c.removeprefix("param.") + (" (log)" if is_log else ""))
        score = g["best_val_mAP"].to_numpy()
        lo, hi = 100 * float(score.min()), 100 * float(score.max())
        norm = Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1e-9)
        stopped = (g["status"] == "stopped").to_list()
        xs = list(range(len(cols)))
        for i in np.argsort(score):  # best trials drawn last, on top
            ax.plot(xs, [normed[k][i] for k in range(len(cols))], color=cmap(norm(100 * score[i])), lw=1.6,
                    alpha=0.9, ls="--" if stopped[i] else "-", marker="o", ms=3)
        for x, (lo, hi) in zip(xs, ends):
            ax.axvline(x, color="0.6", lw=0.8, zorder=0)
            box = {"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8}
            ax.annotate(lo, (x, 0), xytext=(0, -6), textcoords="offset points", ha="center", va="top", fontsize=7,
                        bbox=box)
            ax.annotate(hi, (x, 1), xytext=(0, 6), textcoords="offset points", ha="center", va="bottom", fontsize=7,
                        bbox=box)
        ax.set_xticks(xs, names, rotation=20, ha="right", fontsize=8)
        ax.set_yticks([])
        ax.set_ylim(-0.2, 1.2)
        ax.set_xlim(-0.3, len(cols) - 0.7)
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
        title = _panel_key(scope, d).replace("\n", " ")
        ax.set_title(f"{title}: {label_method(m)} ({g.height} trials)", fontsize=10)
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="best val mAP (%)", fraction=0.05, pad=0.02)
    legend = [Line2D([], [], color="0.3", ls="-", label="completed"),
              Line2D([], [], color="0.3", ls="--", label="ASHA-stopped")]
    fig.legend(handles=legend, loc="upper right", ncols=2, frameon=False, fontsize=8)
    fig.suptitle("Search trials, parameters normalised to [0, 1] per panel (end values printed; log10 where a "
                 "parameter spans a decade)", fontsize=10, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return _png(fig)


def render_plots(board: pl.DataFrame, trials: pl.DataFrame, metric: str, keep_all: bool = False) -> dict[str, bytes]:
    """The plots that have something to show, as PNG bytes by file name (skipped ones are logged)."""
    trials = with_scope(trials, keep_all)
    out = {}
    for name, make in ((f"leaderboard-{metric}.png", lambda: plot_metric_bars(board, metric)),
                       ("leaderboard-importance.png", lambda: plot_importance(trials)),
                       ("leaderboard-parallel.png", lambda: plot_parallel(trials))):
        png = make()
        if png is not None:
            out[name] = png
    return out


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def report_dir(dirs: Sequence[Path], given: bool) -> Path:
    """Where leaderboard.md/.csv and the plots go: the results folder (the first given dir, or its
    parent when it is itself a sweep folder); results/ by default."""
    if not given:
        return Path("results")
    first = dirs[0]
    return first.parent if (first / "trials.parquet").is_file() else first


def _metric_arg(text: str) -> str:
    norm = text.replace("-", "").replace("_", "").lower()
    for m in METRICS:
        if norm in (m.lower(), LABELS[m].replace("-", "").lower(), m.lower().replace("rank", "r")):
            return m
    raise argparse.ArgumentTypeError(f"unknown metric {text!r} (choose from {', '.join(LABELS.values())})")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m harness.leaderboard", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[1],
        epilog="\n\n".join(textwrap.fill(t, 100, break_on_hyphens=False) for t in (
            "Files: leaderboard.md, leaderboard.csv and the plots (leaderboard-<metric>.png, "
            "leaderboard-importance.png, leaderboard-parallel.png) go to --report-dir; by default to the results "
            "folder: results/ when no RESULTS_DIR is given, else the first RESULTS_DIR, or its parent when it is "
            "itself a sweep folder. --out PATH writes the chosen --format to PATH; without it the format is printed.",
            "Several sweeps of one dataset x method: the newest (manifest started_at) wins; --all keeps each.",
            "CSV/JSON: one record per dataset x method (kind=result), per-method means (kind=mean) and the "
            "published rows shown (kind=published); metrics in percent, delta in percentage points, p and "
            "p_holm as probabilities.",
            f"Statistics: paired bootstrap over seeds (B = {N_BOOT:,}, RNG seed {RNG_SEED}), two-sided p, "
            f"only with at least {MIN_PAIRS} paired seeds (fewer: Δ shown, not tested), Holm across datasets "
            f"per method, alpha = {ALPHA}. Exit status 2 on bad input.")))
    ap.add_argument("dirs", nargs="*", metavar="RESULTS_DIR",
                    help="results folders to search for sweeps (or sweep folders); default: results/")
    ap.add_argument("--format", choices=("rich", "markdown", "csv", "json", "html"), default="rich",
                    help="what to print or write to --out (default: a rich table)")
    ap.add_argument("--out", type=Path, metavar="PATH", help="write --format to PATH instead of printing it")
    ap.add_argument("--metric", type=_metric_arg, default="mAP",
                    help="metric for Δ, its test and the bar plot: mAP (default), mINP, Rank-1, Rank-5, Rank-10")
    ap.add_argument("--all", action="store_true",
                    help="keep every sweep as its own rows (labelled by sweep id) instead of the newest per "
                         "dataset x method")
    ap.add_argument("--published", choices=("matching", "all", "none"), default="matching",
                    help="published reference rows: for datasets in the results (default), all, or none")
    ap.add_argument("--report-dir", type=Path, metavar="DIR", help="where leaderboard.md/.csv and the plots go")
    ap.add_argument("--no-report", action="store_true", help="write no leaderboard.md/.csv/plots")
    ap.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return ap


def _write(path: Path, data: str | bytes) -> None:
    """Write atomically (a reader never sees half a file); a failure is one clear error line."""
    try:
        atomic_write_bytes(path, data.encode() if isinstance(data, str) else data)
    except OSError as e:
        raise LeaderboardError(f"cannot write {path}: {e.strerror or e}") from None
    log.info("wrote %s", path)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    dirs = [Path(d) for d in args.dirs] or [Path("results")]
    try:
        loaded = load_results(dirs)
        trials = loaded.trials if args.all else select_newest(loaded.trials)
        board = aggregate(trials, args.metric, keep_all=args.all)
        datasets = board.filter(pl.col("kind") == "result")["dataset"].unique().to_list()
        published = published_rows(load_published(), datasets, args.published)
        with_sweep = args.all or board["sweep_id"].drop_nulls().n_unique() > 1
        sweeps = loaded.sweeps.filter(pl.col("sweep_id").is_in(board["sweep_id"].drop_nulls().to_list()))
        table = full_table(board, published)
        want_plots = not args.no_report or args.format == "html"
        plots = render_plots(board, trials, args.metric, keep_all=args.all) if want_plots else {}
        where = args.report_dir or report_dir(dirs, bool(args.dirs))
        if not args.no_report:
            for name, png in plots.items():
                _write(where / name, png)
            _write(where / "leaderboard.md", render_markdown(board, published, sweeps, list(plots), with_sweep))
            _write(where / "leaderboard.csv", render_csv(table))
        if args.format == "rich":
            text = render_rich(board, published, with_sweep, width=200 if args.out else None)
        elif args.format == "markdown":
            base = args.out.parent if args.out else Path.cwd()  # plot links relative to where the text lands
            links = [] if args.no_report else [os.path.relpath(where / n, base) for n in plots]
            text = render_markdown(board, published, sweeps, links, with_sweep)
        elif args.format == "csv":
            text = render_csv(table)
        elif args.format == "json":
            text = render_json(table)
        else:
            text = render_html(board, published, sweeps, plots, with_sweep)
        if args.out:
            _write(args.out, text)
        else:
            sys.stdout.write(text)
    except LeaderboardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
