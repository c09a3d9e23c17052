"""The leaderboard's numbers: per dataset x method means and stds of the final runs (or the best
search trial's validation scores), Δ to CLIP-ReID with a paired bootstrap over seeds, Holm's
correction per method across datasets, and per-method mean rows. The open-set GM and the relative
robustness get their own Δ and test, in columns with their suffix."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

from harness.leaderboard.common import (ALL_METRICS, ALPHA, MIN_PAIRS, N_BOOT, OPENSET_DELTA, OPENSET_METRICS,
                                        REFERENCE, RNG_SEED, ROBUST, SOURCE_TEST, SOURCE_VAL, UNTRAINED,
                                        LeaderboardError, fmt_value, label_method, method_rank)
from harness.leaderboard.load import with_scope
from harness.results import param_columns


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


def _final_runs(trials: pl.DataFrame) -> pl.DataFrame:
    """Completed final-phase runs scored on test (a table without a status column counts as completed)."""
    return trials.filter((pl.col("phase") == "final") & (pl.col("status").fill_null("completed") == "completed")
                         & pl.col("test_mAP").is_not_null())


def _config_strings(df: pl.DataFrame, params: list[str]) -> list[str | None]:
    """'key=value, …' per row from its non-null param columns ('defaults' when none apply)."""
    out: list[str | None] = []
    for row in df.select(params).iter_rows(named=True) if params else ({} for _ in range(df.height)):
        items = [f"{k.removeprefix('param.')}={fmt_value(v)}" for k, v in sorted(row.items()) if v is not None
                 and not (isinstance(v, float) and math.isnan(v))]
        out.append(", ".join(items) if items else "defaults")
    return out


def aggregate(trials: pl.DataFrame, metric: str = "mAP", keep_all: bool = False,
              reference: str = REFERENCE) -> pl.DataFrame:
    """The leaderboard: one row per (sweep when keep_all,) dataset x method, then per-method mean rows.

    Metrics in percent, Δ in percentage points, p-values as probabilities. Every dataset x method
    pair seen in the results gets a row, empty ("—" when shown) where that method has no trials.
    Where the runs have open-set scores, the board also tests GM against CLIP-ReID (``*_GM`` columns);
    where they have robustness scores, the relative robustness (``robust_rel_mAP_*``, ``*_robust``).
    ``reference``: the method every Δ is against (CLIP-ReID; e.g. ``indivaid-mean`` for the fusion ablation).
    """
    if metric not in ALL_METRICS:
        raise LeaderboardError(f"unknown metric {metric!r} (choose from {', '.join(ALL_METRICS)})")
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
        *[(100 * pl.col(f"test_{m}").mean()).alias(f"f_{m}_mean") for m in ALL_METRICS],
        *[(100 * pl.col(f"test_{m}").std(ddof=1)).alias(f"f_{m}_std") for m in ALL_METRICS],
        (100 * pl.col(ROBUST).mean()).alias(f"{ROBUST}_mean"),
        (100 * pl.col(ROBUST).std(ddof=1)).alias(f"{ROBUST}_std"),
        pl.col(ROBUST).count().alias("n_robust"),
        *[pl.col(p).drop_nulls().first() for p in params],
    )
    fstats = fstats.with_columns(pl.Series("f_config", _config_strings(fstats, params), dtype=pl.String)).drop(params)
    # Fallback: the search trial with the best best_val_mAP (as best.yaml picks), failed trials excluded.
    best = (trials.filter((pl.col("phase") == "search") & (pl.col("status").fill_null("completed") != "error")
                          & pl.col("best_val_mAP").is_not_nan() & pl.col("val_mAP").is_not_null())
            .sort(["best_val_mAP", "trial_id"], descending=[True, False], nulls_last=True)
            .group_by(key, maintain_order=True).first())
    best = best.select(*key, *[(100 * pl.col(f"val_{m}")).alias(f"v_{m}") for m in ALL_METRICS],
                       pl.Series("v_config", _config_strings(best, params), dtype=pl.String))

    has_final = pl.col("n_final").fill_null(0) > 0
    has_val = pl.col("v_mAP").is_not_null()
    board = (grid.join(cost, on=key, how="left").join(fstats, on=key, how="left").join(best, on=key, how="left")
             .with_columns(
                 pl.when(has_final).then(pl.lit(SOURCE_TEST)).when(has_val).then(pl.lit(SOURCE_VAL)).alias("source"),
                 pl.when(has_final).then("n_final").when(has_val).then(1).alias("n"),
                 *[pl.when(has_final).then(f"f_{m}_mean").otherwise(f"v_{m}").alias(f"{m}_mean") for m in ALL_METRICS],
                 *[pl.when(has_final).then(f"f_{m}_std").alias(f"{m}_std") for m in ALL_METRICS],
                 pl.when(has_final).then("f_config").otherwise("v_config").alias("best_config"),
                 *[pl.col(c).fill_null(0) for c in ("trials", "errors", "stopped")],
             ))
    if reference != REFERENCE and reference not in set(trials["method"].to_list()):
        raise LeaderboardError(f"--reference {reference}: no {reference} runs in these results "
                               f"(methods: {', '.join(sorted(set(trials['method'].to_list())))})")
    board = _add_deltas(board, final, metric, key, reference=reference)
    board = _add_deltas(board, final, OPENSET_DELTA, key, suffix=OPENSET_SUFFIX, reference=reference)
    board = _add_deltas(board, final, ROBUST, key, suffix=ROBUST_SUFFIX, reference=reference, column=ROBUST)
    board = _add_mean_rows(board, metric, reference)
    board = board.with_columns(pl.lit(metric).alias("metric"), pl.lit(reference).alias("reference"),
                               pl.lit(None, pl.String).alias("citation"))
    return board.select(BOARD_COLUMNS)


OPENSET_SUFFIX = f"_{OPENSET_DELTA}"  # columns of the open-set score's own Δ and test
ROBUST_SUFFIX = "_robust"  # ... and of the relative robustness's
TEST_COLUMNS = ("delta", "n_pairs", "p", "p_holm", "significant", "test")  # what _add_deltas adds
BOARD_COLUMNS = [
    "kind", "_scope", "sweep_id", "dataset", "method", "source", "protocol", "n",
    *[f"{m}_{s}" for m in ALL_METRICS for s in ("mean", "std")],
    "metric", "reference", *TEST_COLUMNS,
    *[f"{c}{OPENSET_SUFFIX}" for c in TEST_COLUMNS],
    f"{ROBUST}_mean", f"{ROBUST}_std", "n_robust", *[f"{c}{ROBUST_SUFFIX}" for c in TEST_COLUMNS],
    "best_config", "trials", "errors", "stopped", "gpu_hours", "images_per_s", "citation", "note",
]


def has_openset(board: pl.DataFrame) -> bool:
    """Whether any row has open-set scores (a sweep with unknown identities in its splits)."""
    return any(board[f"{m}_mean"].drop_nulls().len() for m in OPENSET_METRICS if f"{m}_mean" in board.columns)


def has_robustness(board: pl.DataFrame) -> bool:
    """Whether any row has robustness scores (final runs of a sweep with ``final.robustness``)."""
    return f"{ROBUST}_mean" in board.columns and board[f"{ROBUST}_mean"].drop_nulls().len() > 0


def _add_deltas(board: pl.DataFrame, final: pl.DataFrame, metric: str, key: list[str],
                suffix: str = "", reference: str = REFERENCE, column: str | None = None) -> pl.DataFrame:
    """Δ vs CLIP-ReID (pp), the paired bootstrap p and its Holm adjustment per method across datasets,
    as ``delta``, ``p``, ``p_holm``, ``test``... (each with ``suffix``; ``note`` only without one).
    The final runs' ``column`` (default ``test_<metric>``) against the board's ``<metric>_mean``.

    Pairs are the seeds both ran (per-seed mean if a seed appears twice). Δ = mean paired
    difference, tested only with at least MIN_PAIRS pairs (1 to MIN_PAIRS - 1: shown, not tested);
    for an untrained method or without a shared seed, the difference of the means, not tested.
    """
    col = column or f"test_{metric}"
    per_seed = final.filter(pl.col(col).is_not_null() & pl.col(col).is_not_nan()).group_by([*key, "seed"]).agg(pl.col(col).mean().alias("a"))
    ref_label = label_method(reference)
    ref = per_seed.filter(pl.col("method") == reference).select("_scope", "dataset", "seed", pl.col("a").alias("b"))
    pairs = (per_seed.join(ref, on=["_scope", "dataset", "seed"], how="inner").sort("seed")
             .group_by(key).agg("a", "b"))
    splits = final.group_by(key).agg(pl.col("split_hash").drop_nulls().unique().sort().alias("splits"))
    ref_rows = board.filter(pl.col("method") == reference).select(
        "_scope", "dataset", pl.col(f"{metric}_mean").alias("ref_mean"), pl.col("source").alias("ref_source"))
    ref_splits = splits.filter(pl.col("method") == reference).select("_scope", "dataset",
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
        elif r[f"{metric}_mean"] is None:
            test, note = None, f"no {metric}"
        elif r["method"] == reference:
            test, note = ("ref", "reference") if r["source"] == SOURCE_TEST else (None, "reference, not on test")
        elif r["source"] == SOURCE_VAL:
            note = "selected on validation: no test"
        elif r["ref_source"] != SOURCE_TEST or r["ref_mean"] is None:
            note = f"no {ref_label} test {metric} on this dataset"
        elif r["splits"] and r["ref_splits"] and r["splits"] != r["ref_splits"]:
            delta, note = r[f"{metric}_mean"] - r["ref_mean"], f"different splits from {ref_label}'s: not tested"
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
    x = suffix
    board = board.with_columns(pl.Series(f"delta{x}", deltas, dtype=pl.Float64), pl.Series(f"p{x}", ps, dtype=pl.Float64),
                               pl.Series(f"n_pairs{x}", n_pairs, dtype=pl.Int64),
                               pl.Series(f"test{x}", tests, dtype=pl.String))
    if not suffix:
        board = board.with_columns(pl.Series("note", notes, dtype=pl.String))
    # Holm per family: one method's tested comparisons across datasets (per sweep with --all).
    adjusted = pl.Series(f"p_holm{x}", [None] * board.height, dtype=pl.Float64)
    tested = board.with_row_index("_i").filter(pl.col(f"p{x}").is_not_null())
    for *_, idx in tested.group_by("_scope", "method").agg("_i").iter_rows():
        adjusted = adjusted.scatter(idx, holm(board[f"p{x}"].gather(idx).to_list()))
    return board.with_columns(adjusted).with_columns(
        pl.when(pl.col(f"p_holm{x}").is_not_null()).then(pl.col(f"p_holm{x}") < ALPHA).alias(f"significant{x}"),
    ).with_columns(
        pl.when(pl.col(f"significant{x}")).then(pl.lit("*")).when(pl.col(f"significant{x}").not_()).then(pl.lit("n.s."))
        .otherwise(f"test{x}").alias(f"test{x}"))


def _add_mean_rows(board: pl.DataFrame, metric: str, reference: str = REFERENCE) -> pl.DataFrame:
    """Per method, the unweighted mean over the datasets where it and CLIP-ReID both have test results
    (only when the board has at least two datasets; a one-dataset mean would repeat its row)."""
    ref_done = (board.filter((pl.col("method") == reference) & (pl.col("source") == SOURCE_TEST))
                .select("_scope", "dataset"))
    both = board.join(ref_done, on=["_scope", "dataset"], how="semi").filter(pl.col("source") == SOURCE_TEST)
    many = board.group_by("_scope").agg(pl.col("dataset").n_unique().alias("k")).filter(pl.col("k") >= 2)
    means = both.join(many.select("_scope"), on="_scope", how="semi").group_by("_scope", "method").agg(
        pl.col("dataset").n_unique().alias("k"),
        pl.col("sweep_id").unique().sort().str.join(", "),
        *[pl.col(f"{m}_mean").mean() for m in ALL_METRICS],
        pl.col("delta").mean(),
        pl.col(f"delta{OPENSET_SUFFIX}").mean(),
    ).with_columns(
        pl.lit("mean").alias("dataset"),
        pl.format("mean of {} dataset{} (test)", "k", pl.when(pl.col("k") == 1).then(pl.lit("")).otherwise(pl.lit("s")))
        .alias("source"),
        pl.when(pl.col("method") == reference).then(pl.lit("ref")).otherwise(pl.lit("n/a")).alias("test"),
        pl.lit("mean over datasets: not tested (see the per-dataset rows)").alias("note"),
    ).drop("k")
    board = pl.concat([board.with_columns(pl.lit("result").alias("kind")),
                       means.with_columns(pl.lit("mean").alias("kind"))], how="diagonal_relaxed")
    return board.sort("_scope", pl.col("kind") == "mean", "dataset", method_rank(), "method")


_TEST_TYPES = (pl.Float64, pl.Int64, pl.Float64, pl.Float64, pl.Boolean, pl.String)  # of TEST_COLUMNS
BOARD_SCHEMA: dict[str, Any] = {
    "kind": pl.String, "_scope": pl.String, "sweep_id": pl.String, "dataset": pl.String, "method": pl.String,
    "source": pl.String, "protocol": pl.String, "n": pl.Int64,
    **{f"{m}_{s}": pl.Float64 for m in ALL_METRICS for s in ("mean", "std")},
    "metric": pl.String, "reference": pl.String,
    **{f"{c}{x}": t for x in ("", OPENSET_SUFFIX) for c, t in zip(TEST_COLUMNS, _TEST_TYPES)},
    f"{ROBUST}_mean": pl.Float64, f"{ROBUST}_std": pl.Float64, "n_robust": pl.Int64,
    **{f"{c}{ROBUST_SUFFIX}": t for c, t in zip(TEST_COLUMNS, _TEST_TYPES)},
    "best_config": pl.String, "trials": pl.Int64, "errors": pl.Int64,
    "stopped": pl.Int64, "gpu_hours": pl.Float64, "images_per_s": pl.Float64, "citation": pl.String, "note": pl.String,
}


def full_table(board: pl.DataFrame, published: pl.DataFrame) -> pl.DataFrame:
    """Results, mean and published rows in one table (the CSV/JSON records), ``kind`` telling them apart."""
    parts = [board.select([pl.col(c).cast(t) for c, t in BOARD_SCHEMA.items()])]
    if published.height:
        parts.append(published.select([pl.col(c).cast(t) for c, t in BOARD_SCHEMA.items()]))
    return pl.concat(parts).drop("_scope")

