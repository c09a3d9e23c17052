"""Any catalogue -> the reference layout + a split file.

    python -m indivaid.data.prepare DATASET [--path P] [-o key=value ...] --out OUT [--seed 0]
    python -m indivaid.data.prepare --wildlife ATRW --path /downloads/ATRW --species tiger --out OUT

writes ``OUT/<Name>/{train,query,gallery}/<pid>_<camid>_<n>.jpg`` (validation identities stay in
``train/``, as in the references, and are marked in the split file), ``OUT/<Name>/identities.csv``
(pid -> original identity), ``OUT/<Name>/prepared.json`` (the source it came from) and
``OUT/<Name>/split-seed<seed>.csv``. ``folder``, ``table`` and ``reference`` data are named after
their folder or table file (``-o name=NAME`` names them otherwise); a different dataset already
prepared under that name is never overwritten. Images are hard-linked when
they need no crop (copied across file systems) and cropped to their bounding box otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import polars as pl
import yaml

from indivaid.data.adapters import open_dataset
from indivaid.data.adapters.generic import TableAdapter
from indivaid.data.catalogue import Catalogue, DataError, validate_catalogue
from indivaid.data.split import Split, SplitConfig, build_split, write_split
from indivaid.utils.io import data_root

log = logging.getLogger(__name__)

PREPARED = "prepared.json"  # in every prepared dataset: the source it was prepared from


def wildlife_catalogue(class_name: str, root: Path, species: str, protocol: str) -> Catalogue:
    """Load a dataset through the optional ``wildlife-datasets`` package (its metadata table)."""
    try:
        from wildlife_datasets import datasets as wd  # type: ignore[import-not-found]
    except ImportError:
        raise DataError("--wildlife needs the optional package: pip install 'indivaid[wildlife]'") from None
    if not hasattr(wd, class_name):
        raise DataError(f"wildlife-datasets has no dataset class {class_name!r}")
    df = pl.from_pandas(getattr(wd, class_name)(str(root)).df.astype(str))
    adapter = TableAdapter(name=class_name, species=species, protocol=protocol, video="video" in df.columns)
    return adapter.from_frame(df, root, f"wildlife-datasets {class_name}")


def _place(src: str, bbox: tuple, dst: Path) -> None:
    if bbox[0] is None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
        return
    from PIL import Image

    x, y, w, h = bbox
    with Image.open(src) as img:
        img.convert("RGB").crop((round(x), round(y), round(x + w), round(y + h))).save(dst, quality=95)


def write_reference_layout(split: Split, out: Path) -> Split:
    """Materialise ``split`` as a reference-layout tree under ``out``; returns the split re-rooted there."""
    t = split.table
    ids = sorted(t["identity"].unique().to_list())
    pid = {s: i for i, s in enumerate(ids)}
    enc = pl.coalesce("encounter", "camera") if split.header.get("video") == "true" else pl.col("camera")
    t = t.with_columns(enc.alias("_cam"))
    cams = {c: i for i, c in enumerate(sorted(t["_cam"].unique().to_list()))}
    folder = {"train": "train", "val_query": "train", "val_gallery": "train", "query": "query", "gallery": "gallery"}
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    new_paths, new_ids = [], []
    counter: dict[int, int] = {}
    for row in t.iter_rows(named=True):
        p = pid[row["identity"]]
        counter[p] = counter.get(p, 0) + 1
        suffix = Path(row["path"]).suffix.lower() if row["bbox_x"] is None else ".jpg"
        rel = Path(folder[row["split"]]) / f"{p:04d}_{cams[row['_cam']]}_{counter[p]:05d}{suffix}"
        (tmp / rel.parent).mkdir(parents=True, exist_ok=True)
        _place(row["path"], (row["bbox_x"], row["bbox_y"], row["bbox_w"], row["bbox_h"]), tmp / rel)
        new_paths.append(str(out / rel))
        new_ids.append(str(rel))
    pl.DataFrame({"pid": list(pid.values()), "identity": list(pid)}).write_csv(tmp / "identities.csv")
    (tmp / PREPARED).write_text(json.dumps({"dataset": split.dataset, "source": str(split.root.resolve())}, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    table = t.drop("_cam").with_columns(
        pl.Series("path", new_paths), pl.Series("image_id", new_ids), bbox_x=None, bbox_y=None, bbox_w=None, bbox_h=None
    ).with_columns(pl.col("^bbox_.$").cast(pl.Float64))
    return Split(table, dict(split.header), out)


def prepared_from(target: Path) -> Path | None:
    """The source a prepared dataset folder was made from (None: not written by this command)."""
    try:
        return Path(json.loads((target / PREPARED).read_text())["source"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_target(target: Path, src: Path) -> None:
    """Refuse to replace a different dataset that has the same name; preparing the same source
    again (another seed, new images) replaces its earlier layout."""
    if not target.is_dir() or not any(target.iterdir()):
        return
    previous = prepared_from(target)
    if previous == src:
        return
    held = (f"a dataset prepared from {previous}" if previous
            else "files not written by prepare (remove them to reuse the name)")
    raise DataError(f"{target} already holds {held}; prepare {src} under another name (-o name=NAME) "
                    "or into another --out")


def prepare(cat: Catalogue, out_root: Path, cfg: SplitConfig, *, layout: bool = True) -> Path:
    """Validate, split and (optionally) lay out ``cat``; returns the split file's path."""
    if not cat.name or cat.name in (".", "..") or "/" in cat.name or "\\" in cat.name:
        raise DataError(f"dataset name {cat.name!r} cannot be a folder name; give another with -o name=NAME")
    split = build_split(cat, cfg)
    target = (out_root / cat.name).resolve()
    src = cat.root.resolve()
    if layout and (target == src or target in src.parents or src in target.parents):
        raise DataError(f"--out {out_root} would write {target} over the source data in {src}; choose another --out")
    if layout:
        check_target(target, src)
        split = write_reference_layout(split, target)
    path = write_split(split, target / f"split-seed{cfg.seed}.csv")
    log.info("wrote %s (split hash %s)", path, split.hash)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m indivaid.data.prepare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", nargs="?", help="registered dataset name (see --list)")
    ap.add_argument("--path", help="the dataset's folder or table (default: under the data root)")
    ap.add_argument("--data-root", help="default: $INDIVAID_DATA or ./data")
    ap.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE", help="adapter option")
    ap.add_argument("--wildlife", metavar="CLASS", help="load through wildlife-datasets (e.g. ATRW, LionData)")
    ap.add_argument("--species", default="animal", help="prompt noun for --wildlife")
    ap.add_argument("--out", required=False, help="output root (default: the data root)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-fraction", type=float, default=0.15)
    ap.add_argument("--test-fraction", type=float, default=0.2)
    ap.add_argument("--protocol", choices=["market1501", "none", "leave_one_out"])
    ap.add_argument("--unknown-fraction", type=float, default=0.0,
                    help="open set: hold out this fraction of validation and test identities as unknown")
    ap.add_argument("--time-aware", action="store_true", help="dated identities: latest encounters are the queries")
    ap.add_argument("--skip-bad", action="store_true", help="drop unreadable images (logged and counted)")
    ap.add_argument("--no-layout", action="store_true", help="only write the split file, next to the data")
    ap.add_argument("--list", action="store_true", help="list registered datasets")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from indivaid.data.adapters import DATASETS

    if args.list:
        for name in DATASETS:
            print(name)
        return 0
    try:
        options = {k: v if k == "name" else yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.option)}
        if args.wildlife:
            if not args.path:
                raise DataError("--wildlife needs --path (the downloaded dataset's folder)")
            cat = wildlife_catalogue(args.wildlife, Path(args.path).resolve(), args.species, args.protocol or "none")
        elif args.dataset:
            cat = open_dataset(args.dataset, args.path, args.data_root, **options)
        else:
            ap.error("name a dataset or --wildlife CLASS")
        cat = validate_catalogue(cat, skip_bad=args.skip_bad)
        cfg = SplitConfig(args.seed, args.val_fraction, args.test_fraction, protocol=args.protocol,
                          unknown_fraction=args.unknown_fraction, time_aware=args.time_aware)
        if args.no_layout:
            split = build_split(cat, cfg)
            print(write_split(split, cat.root / f"split-seed{cfg.seed}.csv"))
        else:
            print(prepare(cat, Path(args.out).resolve() if args.out else data_root(args.data_root), cfg))
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
