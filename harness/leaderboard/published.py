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
    given = {"kind": pl.lit("published"), "_scope": pl.lit(""), "dataset": pl.col("dataset"),
             "method": pl.col("method"), "source": pl.lit("published"), "protocol": pl.col("protocol"),
             **{f"{m}_mean": pl.col(m) for m in METRICS}, "citation": pl.col("citation"), "note": note}
    return rows.select(  # every board column: the published numbers, nulls elsewhere (no std, no test)
        *[given.get(c, pl.lit(None)).cast(t).alias(c) for c, t in BOARD_SCHEMA.items()],
    ).sort("dataset", method_rank())

