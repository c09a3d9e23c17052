"""``python -m indivaid_field embed | match``: the field commands, on ONNX Runtime (no torch).

They mirror ``python -m indivaid embed | match --onnx``: same flags where they overlap, same
embedding files, same decisions. Not here: training, evaluation and the retrieval grid (those
need the full install).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from indivaid_field import FieldError
from indivaid_field.matching import Gallery, decide, gallery_mask, key_values, match_rows, print_matches
from indivaid_field.model import OnnxModel
from indivaid_field.preprocess import find_images, identity_from_folder, parse_bbox
from indivaid_field.store import RESERVED, check_model, read_embeddings, write_embeddings

log = logging.getLogger(__name__)
BOX_COLUMNS = ("bbox_x", "bbox_y", "bbox_w", "bbox_h")


def _console():
    """Rich's console; off a terminal (a log file, a pipe) tables keep their natural width, one
    line per row, instead of wrapping at 80 columns (as ``indivaid.utils.console`` does)."""
    import os

    from rich.console import Console

    console = Console()
    return console if console.is_terminal or os.environ.get("COLUMNS") else Console(width=4096)


def _read_table(file: Path) -> pa.Table:
    """A catalogue table (CSV, TSV or Parquet) with every column as strings."""
    import pyarrow.compute as pc

    suffix = file.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(file)
    elif suffix in (".csv", ".tsv", ".txt"):
        import pyarrow.csv as pacsv

        parse = pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
        header = pacsv.open_csv(file, parse_options=parse).schema.names
        # every column read as text: type guessing would turn identity 007 into 7 and reformat dates
        table = pacsv.read_csv(file, parse_options=parse,
                               convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in header},
                                                                   strings_can_be_null=True))
    else:
        raise FieldError(f"--table {file}: a table must be .csv, .tsv or .parquet")
    # list columns (a Parquet bbox as [x, y, w, h]) stay as they are: parse_bbox reads lists too
    return pa.table({c: table.column(c) if pa.types.is_list(table.column(c).type) else pc.cast(table.column(c), pa.string())
                     for c in table.column_names})


def folder_sources(images: str) -> pa.Table:
    """Photos under ``images/<identity>/``: path, identity, empty boxes."""
    root = Path(images).expanduser().resolve()
    files = find_images(root) if root.is_dir() else []
    if not files:
        raise FieldError(f"--images {root}: no images found (expected {root}/<identity>/<image files>)")
    n = len(files)
    return pa.table({"path": [str(f) for f in files], "identity": [identity_from_folder(f, root) for f in files],
                     **{k: pa.nulls(n, pa.float64()) for k in BOX_COLUMNS}})


def table_sources(table: str, images: str | None) -> pa.Table:
    """Photos listed in a table: path and identity (and optionally bbox); other columns are metadata."""
    file = Path(table).expanduser().resolve()
    if not file.is_file():
        raise FieldError(f"--table {file}: not found")
    df = _read_table(file)
    missing = [c for c in ("path", "identity") if c not in df.column_names]
    if missing:
        raise FieldError(f"--table {file}: missing column(s) {missing}; it needs path and identity "
                         "(other columns are kept as metadata)")
    clash = [c for c in df.column_names if c in RESERVED and c not in ("path", "identity")]
    if clash:
        raise FieldError(f"--table {file}: column(s) {clash} are reserved; rename them")
    base = Path(images).expanduser().resolve() if images else file.parent
    paths = [str(p if Path(p).is_absolute() else (base / p).resolve()) for p in df.column("path").to_pylist()]
    boxes = [parse_bbox(b, f"{file} row {i + 2}") for i, b in enumerate(df.column("bbox").to_pylist())] \
        if "bbox" in df.column_names else [None] * df.num_rows
    cols = {"path": paths, "identity": df.column("identity")}
    cols.update({k: pa.array([b[i] if b else None for b in boxes], pa.float64()) for i, k in enumerate(BOX_COLUMNS)})
    cols.update({c: df.column(c) for c in df.column_names if c not in ("path", "identity", "bbox")})
    return pa.table(cols)


def cmd_embed(argv: Sequence[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m indivaid_field embed", description="Embed a catalogue of photos "
                                 "with an exported ONNX model into a Parquet file (the same as `indivaid embed`).")
    ap.add_argument("--onnx", required=True, help="model exported by `python -m indivaid export`")
    ap.add_argument("--images", help="<dir>/<identity>/<image>; with --table: the folder its paths are relative to")
    ap.add_argument("--table", help="CSV/Parquet with path and identity (optionally bbox); other columns are kept")
    ap.add_argument("--meta", action="append", default=[], metavar="COLUMN=VALUE",
                    help="a metadata column with one value for every photo (e.g. site=north)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, help="CPU threads for ONNX Runtime (default: all cores)")
    args = ap.parse_args(argv)
    meta = key_values(args.meta, "--meta")
    clash = [c for c in meta if c in RESERVED]
    if clash:
        raise FieldError(f"--meta {clash[0]}=...: {RESERVED} are reserved column names")
    if args.table:
        rows = table_sources(args.table, args.images)
    elif args.images:
        rows = folder_sources(args.images)
    else:
        raise FieldError("embed needs --images DIR (one sub-folder per identity) or --table FILE")
    for k, v in meta.items():
        rows = rows.append_column(k, pa.array([v] * rows.num_rows, pa.string()))
    model = OnnxModel(args.onnx, threads=args.threads)
    boxes = list(zip(*(rows.column(c).to_pylist() for c in BOX_COLUMNS)))
    vectors = model.embed_files(rows.column("path").to_pylist(), boxes)
    info = {"model": model.fingerprint, "checkpoint": str(model.path.resolve()), "metric": model.metric,
            "dim": int(vectors.shape[1])}
    write_embeddings(args.out, rows, vectors, info)
    labelled = {v for v in rows.column("identity").to_pylist() if v is not None}
    extra = [c for c in rows.column_names if c not in RESERVED]
    _console().print(f"wrote {rows.num_rows} embeddings ({vectors.shape[1]}-d float32) of {len(labelled)} "
                     f"individuals to {args.out}" + (f"; metadata: {', '.join(extra)}" if extra else ""))


def _write_rows(rows: dict[str, list], out: Path) -> None:
    schema = pa.schema([(c, pa.float64() if c in ("threshold", "confidence", "best_distance", "mean_distance")
                         else pa.int64() if c in ("rank", "images") else pa.string()) for c in rows])
    table = pa.Table.from_pydict(rows, schema=schema)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, out)
    else:
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, out)


def cmd_match(argv: Sequence[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m indivaid_field match", description="Which known individual is "
                                 "each new photo, or is it a new one? Ranks individuals and decides KNOWN / NEW.")
    ap.add_argument("--onnx", required=True, help="model exported by `python -m indivaid export`")
    ap.add_argument("--gallery", required=True, help="Parquet file from `embed` (the catalogue)")
    ap.add_argument("--images", required=True, help="new photos (a folder; <dir>/<identity>/<image> marks hits)")
    ap.add_argument("--top-k", type=int, default=5, help="individuals listed per photo")
    ap.add_argument("--threshold", type=float, help="distance at or below which a photo is KNOWN (default: the "
                    "threshold calibrated on validation, in the model's metadata)")
    ap.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE",
                    help="restrict the gallery by a metadata column kept by embed (repeatable)")
    ap.add_argument("--out", help="write the ranking and decisions to a .csv or .parquet file")
    ap.add_argument("--threads", type=int, help="CPU threads for ONNX Runtime (default: all cores)")
    args = ap.parse_args(argv)
    if args.out and Path(args.out).suffix.lower() not in (".csv", ".parquet"):
        raise FieldError(f"--out {args.out}: use a .csv or .parquet file name")
    if args.top_k < 1:
        raise FieldError(f"--top-k {args.top_k}: must be at least 1")
    model = OnnxModel(args.onnx, threads=args.threads)
    rows, vectors, info = read_embeddings(args.gallery)
    check_model(args.gallery, info, model.fingerprint)
    columns = {c: rows.column(c).to_pylist() for c in rows.column_names}
    keep = gallery_mask(columns, key_values(args.where, "--where"), RESERVED)
    root = Path(args.images).expanduser().resolve()
    files = find_images(root) if root.is_dir() else []
    if not files:
        raise FieldError(f"--images {root}: no images found")
    gallery = Gallery(vectors[keep], [v for v, k in zip(columns["identity"], keep) if k], model.metric)
    ranked = gallery.search(model.embed_files(files), args.top_k)
    threshold = args.threshold if args.threshold is not None else model.threshold
    if threshold is None:
        log.warning("%s has no calibrated threshold (a closed-set model): photos are ranked without a KNOWN/NEW "
                    "decision; pass --threshold", args.onnx)
        known, conf = None, None
    else:
        known, conf = decide(ranked.best[:, 0], threshold, model.probability)
    paths = [p for p, k in zip(columns["path"], keep) if k]
    table = match_rows([str(f) for f in files], [identity_from_folder(f, root) for f in files], paths, ranked,
                       known, conf, threshold)
    source = "--threshold" if args.threshold is not None else f"calibrated on validation, {model.threshold_rule}"
    print_matches(_console(), table, ranked, int(keep.sum()), threshold, source)
    if args.out:
        _write_rows(table, Path(args.out))
        _console().print(f"matches: {args.out}")


COMMANDS = {"embed": cmd_embed, "match": cmd_match}


def main(argv: Sequence[str] | None = None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m indivaid_field {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        COMMANDS[argv[0]](argv[1:])
    except FieldError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
