"""The main job on the embedded default: synthetic data -> split -> baselines.

``make demo`` runs this. It grows with the project (training both methods comes with the trainer).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import polars as pl
import yaml
from rich.console import Console
from rich.table import Table

from indivaid.baselines import cached_raw_pixel_features
from indivaid.data import SplitConfig, build_split, open_dataset, validate_catalogue, write_split
from indivaid.data.imagecache import ImageSpec, build_image_cache
from indivaid.data.split import SPLITS, Split
from indivaid.eval.metrics import RankMetrics
from indivaid.eval.retrieval import score_retrieval
from indivaid.utils.io import data_root

log = logging.getLogger(__name__)


def split_summary(split: Split) -> Table:
    """Identities / images / cameras / encounters per split part."""
    t = split.table.with_columns(pl.coalesce("encounter", "image_id").alias("_g"))
    table = Table(title=f"{split.dataset} split (seed {split.header['seed']}, protocol {split.protocol}, hash {split.hash})")
    for col in ("part", "identities", "images", "cameras", "encounters"):
        table.add_column(col, justify="right" if col != "part" else "left")
    for part in SPLITS:
        rows = t.filter(pl.col("split") == part)
        table.add_row(part, str(rows["identity"].n_unique()), str(rows.height), str(rows["camera"].n_unique()),
                      str(rows["_g"].n_unique()))
    return table


def metrics_table(title: str, results: dict[str, RankMetrics]) -> Table:
    table = Table(title=title)
    for col in ("method / split", "Rank-1", "Rank-5", "Rank-10", "mAP", "mINP", "queries"):
        table.add_column(col, justify="right" if col != "method / split" else "left")
    for name, m in results.items():
        table.add_row(name, *(f"{100 * v:.1f}" for v in (m.cmc[1], m.cmc[5], m.cmc[10], m.mAP, m.mINP)),
                      f"{m.num_valid_queries} (+{m.num_skipped_queries} skipped)")
    return table


def raw_pixel_baseline(split: Split, cache_root: Path) -> dict[str, RankMetrics]:
    cache = build_image_cache(split, ImageSpec(128, 64), cache_root)
    out = {}
    for stage in ("val", "test"):
        q, g = split.query_gallery(stage)  # type: ignore[arg-type]
        qf = cached_raw_pixel_features(cache, q["image_id"].to_list())
        gf = cached_raw_pixel_features(cache, g["image_id"].to_list())
        out[f"raw pixels / {stage}"] = score_retrieval(qf, gf, q, g, protocol=split.protocol,
                                                       camera_codes=split.camera_codes())
    return out


def main(argv: list[str] | None = None, console: Console | None = None) -> dict[str, RankMetrics]:
    ap = argparse.ArgumentParser(prog="python -m indivaid demo", description=__doc__)
    ap.add_argument("--data-root", help="default: $INDIVAID_DATA or ./data")
    ap.add_argument("--seed", type=int, default=0, help="split seed")
    ap.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                    help="synthetic generator option, e.g. -o identities=60")
    args = ap.parse_args(argv)
    console = console or Console()
    root = data_root(args.data_root)
    cache_root = Path(os.environ.get("INDIVAID_CACHE", root / "cache"))
    console.rule("[bold]IndivAID demo: synthetic animals")
    options = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.option)}
    cat = validate_catalogue(open_dataset("synthetic", data_root=root, **options))
    console.print(f"dataset: {cat.root} ({len(cat)} images, {cat.num_identities} identities, species '{cat.species}')")
    split = build_split(cat, SplitConfig(seed=args.seed))
    path = write_split(split, cat.root / f"split-seed{args.seed}.csv")
    console.print(f"split file: {path}")
    console.print(split_summary(split))
    results = raw_pixel_baseline(split, cache_root)
    console.print(metrics_table(f"Baselines (protocol {split.protocol}, %)", results))
    return results
