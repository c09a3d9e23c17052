"""The main job on the embedded default: synthetic data -> split -> baselines -> both methods.

``make demo`` runs this: it generates the synthetic animals, builds and records the split, scores
the raw-pixel and untrained-model baselines, trains CLIP-ReID and IndivAID with the tiny preset on
the CPU and prints validation and test mAP side by side.
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
from indivaid.eval.metrics import METRIC_LABELS, RankMetrics
from indivaid.eval.retrieval import score_retrieval
from indivaid.config import apply_overrides, to_dict
from indivaid.methods import METHODS, untrained_methods
from indivaid.training import resolve, train
from indivaid.utils.console import make_console
from indivaid.utils.io import data_root, stable_hash

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
    for col in ("method / split", *METRIC_LABELS.values(), "queries"):
        table.add_column(col, justify="right" if col != "method / split" else "left")
    for name, m in results.items():
        table.add_row(name, *(f"{100 * v:.1f}" for v in m.scores()),
                      f"{m.num_valid_queries} (+{m.num_skipped_queries} skipped)")
    return table


def raw_pixel_baseline(split: Split, cache_root: Path, spec: ImageSpec) -> dict[str, RankMetrics]:
    cache = build_image_cache(split, spec, cache_root)
    out = {}
    for stage in ("val", "test"):
        q, g = split.query_gallery(stage)  # type: ignore[arg-type]
        size = (spec.height // 2, spec.width // 2)
        qf = cached_raw_pixel_features(cache, q["image_id"].to_list(), size=size)
        gf = cached_raw_pixel_features(cache, g["image_id"].to_list(), size=size)
        out[f"raw pixels / {stage}"] = score_retrieval(qf, gf, q, g, protocol=split.protocol,
                                                       camera_codes=split.camera_codes())
    return out


def main(argv: list[str] | None = None, console: Console | None = None) -> dict[str, RankMetrics]:
    ap = argparse.ArgumentParser(prog="python -m indivaid demo", description=__doc__)
    ap.add_argument("--data-root", help="default: $INDIVAID_DATA or ./data")
    ap.add_argument("--seed", type=int, default=0, help="split seed")
    ap.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                    help="synthetic generator option, e.g. -o identities=60")
    ap.add_argument("--methods", nargs="*", default=["clipreid", "indivaid"], help="methods to train (none: baselines only)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="trainer override, e.g. stage2.epochs=10")
    ap.add_argument("--workdir", default="runs/demo", help="where the demo's training runs go")
    args = ap.parse_args(argv)
    console = console or make_console()
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
    baselines = untrained_methods()  # the frozen (here: untrained tiny) model
    cfg0 = demo_config(baselines[0], root, cache_root, path, options, args.set)
    spec = ImageSpec(*cfg0.model.input_size, cfg0.data.resize)
    results = raw_pixel_baseline(split, cache_root, spec)
    runs = {}
    for method in [*baselines, *args.methods]:
        cfg = demo_config(method, root, cache_root, path, options, args.set)
        console.rule(f"[bold]{method}")
        workdir = Path(args.workdir) / f"{method}-{stable_hash(to_dict(cfg), 8)}"  # a changed config starts afresh
        res = train(cfg, workdir=workdir, report=_log_epoch(method))
        runs[method] = res
        name = method if METHODS.get(method).train else "untrained (tiny)"
        results[f"{name} / val"] = RankMetrics.from_dict(res.val)
        if res.test:
            results[f"{name} / test"] = RankMetrics.from_dict(res.test)
    order = sorted(results, key=lambda k: (k.endswith("/ test"), list(results).index(k)))
    console.print(metrics_table(f"{split.dataset}: validation (model selection) and test (%), protocol {split.protocol}",
                                {k: results[k] for k in order}))
    for method, res in runs.items():
        console.print(f"{method}: {res.stage1_epochs} + {res.stage2_epochs} epochs in {res.wall_s:.0f} s, "
                      f"checkpoint {res.checkpoint}")
    return results


def demo_config(method: str, root: Path, cache_root: Path, split_file: Path, options: dict, overrides: list[str]):
    data = {"data_root": str(root), "cache_dir": str(cache_root), "split_file": str(split_file), "options": options}
    return resolve(apply_overrides({"preset": "tiny", "method": method, "data": data}, overrides))


def _log_epoch(method: str):
    def report(m: dict, checkpoint: str | None = None) -> None:
        if m["stage"] > 0:
            log.info("%s stage %d epoch %d: loss %.3f, val mAP %.1f%%, %.0f img/s", method, m["stage"], m["epoch"],
                     m["loss"], 100 * m["val_mAP"], m["images_per_s"])
    return report
