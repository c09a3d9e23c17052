"""Published numbers (``harness/published.csv``, package data) as board rows: context, never compared."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from harness.leaderboard.common import METRICS, method_rank
from harness.leaderboard.stats import BOARD_SCHEMA


def load_published() -> pl.DataFrame:
    """harness/published.csv (package data): percent, empty cells where the number is not known."""
    text = (Path(__file__).parent.parent / "published.csv").read_text()  # shipped as package data in harness/
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
    ).sort("dataset", method_rank())

