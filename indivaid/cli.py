"""Command-line entry points: train, evaluate, embed, match (``python -m indivaid COMMAND``)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import polars as pl
import torch
from rich.table import Table

from indivaid.data.adapters.base import find_images
from indivaid.data.catalogue import DataError
from indivaid.utils.console import make_console

log = logging.getLogger(__name__)
console = make_console()  # natural-width tables when written to a file


def cmd_train(argv: list[str]) -> None:
    from indivaid.training import load_config, train
    from indivaid.training.config import preset_names

    ap = argparse.ArgumentParser(prog="python -m indivaid train", description="Train one method on one dataset.")
    ap.add_argument("--config", help="YAML config (may name a preset)")
    ap.add_argument("--preset", help=f"start from a packaged preset: {', '.join(preset_names())}")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. stage2.lr=1e-5")
    ap.add_argument("--workdir", default=None, help="default: runs/<dataset>-<method>-seed<seed>")
    args = ap.parse_args(argv)
    overrides = ([f"preset={args.preset}"] if args.preset else []) + args.set
    cfg = load_config(args.config, overrides)
    workdir = Path(args.workdir or f"runs/{cfg.data.dataset}-{cfg.method}-seed{cfg.runtime.seed}")

    def report(m: dict, checkpoint: str | None = None) -> None:
        log.info("stage %d epoch %d  loss %.4f  val mAP %.1f%%  R1 %.1f%%  %.0f img/s", m["stage"], m["epoch"], m["loss"],
                 100 * m["val_mAP"], 100 * m["val_rank1"], m["images_per_s"])

    res = train(cfg, workdir=workdir, report=report)
    table = Table(title=f"{cfg.method} on {res.dataset} (split {res.split_hash})")
    for c in ("", "Rank-1", "Rank-5", "Rank-10", "mAP", "mINP"):
        table.add_column(c, justify="right")
    rows = [("zero-shot val", {k.removeprefix("val_"): v for k, v in res.zeroshot_val.items()}), ("val", res.val)]
    if res.test:
        rows.append(("test", res.test))
    for name, m in rows:
        table.add_row(name, *(f"{100 * m[k]:.1f}" for k in ("rank1", "rank5", "rank10", "mAP", "mINP")))
    console.print(table)
    console.print(f"inference checkpoint: {res.checkpoint}")


def cmd_evaluate(argv: list[str]) -> None:
    from indivaid.data import build_split, open_dataset, read_split
    from indivaid.data.imagecache import build_image_cache
    from indivaid.eval.openset import open_set_metrics
    from indivaid.eval.retrieval import match_retrieval, score_retrieval
    from indivaid.inference import load_inference
    from indivaid.training.trainer import cache_root

    ap = argparse.ArgumentParser(prog="python -m indivaid evaluate")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--dataset", help="evaluate on another registered dataset (default: the training one)")
    ap.add_argument("--path", help="that dataset's folder")
    ap.add_argument("--split-file", help="a split file (default: the run's split.csv)")
    ap.add_argument("--split", choices=["val", "test"], default="test")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    model = load_inference(args.checkpoint, args.device)
    run_split = Path(args.checkpoint).parent / "split.csv"
    if args.split_file:
        split = read_split(args.split_file)
    elif args.dataset:
        split = build_split(open_dataset(args.dataset, args.path, model.cfg.data.data_root), model.cfg.data.split)
    elif run_split.is_file():
        split = read_split(run_split)
    else:
        raise SystemExit(f"no split: pass --split-file or --dataset (no {run_split})")
    cache = build_image_cache(split, model.spec, cache_root(model.cfg))
    q, g = split.query_gallery(args.split)
    def feats(df: pl.DataFrame) -> torch.Tensor:
        rows = cache.rows(df["image_id"].to_list())
        return torch.cat([model.embed_uint8(cache[rows[s : s + 128]]).cpu() for s in range(0, len(rows), 128)])
    qf, gf = feats(q), feats(g)
    m = score_retrieval(qf, gf, q, g, protocol=split.protocol, camera_codes=split.camera_codes(), metric=model.metric)
    scores = m.as_dict()
    if model.calibration is not None and split.open_set:  # open-set scores at the calibrated threshold
        top = match_retrieval(qf, gf, q, g, protocol=split.protocol, camera_codes=split.camera_codes(),
                              metric=model.metric)
        scores.update(open_set_metrics(top, model.calibration.threshold).as_dict())
    console.print_json(json.dumps({"dataset": split.dataset, "split": args.split, "split_hash": split.hash,
                                   "protocol": split.protocol, **scores}))


def _identity_of(path: Path, root: Path) -> str | None:
    rel = path.relative_to(root)
    return rel.parts[0] if len(rel.parts) > 1 else None


def _key_values(items: list[str], flag: str) -> dict[str, str]:
    """``COLUMN=VALUE`` arguments as a mapping; a malformed one is a one-line error."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DataError(f"{flag} {item!r}: expected COLUMN=VALUE, e.g. {flag} site=north")
        out[key.strip()] = value
    return out


#: An embedding file's Parquet schema metadata key: the model that made it and its distance.
EMBED_META = b"indivaid"
RESERVED = ("path", "identity", "embedding", "bbox_x", "bbox_y", "bbox_w", "bbox_h")


def _embed_sources(images: str | None, table: str | None) -> pl.DataFrame:
    """Photos to embed: ``path``, ``identity`` (null where unknown), ``bbox_*`` and metadata columns
    (a table's other columns, as strings), from a folder per identity or a table."""
    from indivaid.data.adapters.generic import _parse_bbox, read_table

    if table:
        file = Path(table).expanduser().resolve()
        if not file.is_file():
            raise DataError(f"--table {file}: not found")
        df = read_table(file)
        missing = [c for c in ("path", "identity") if c not in df.columns]
        if missing:
            raise DataError(f"--table {file}: missing column(s) {missing}; it needs path and identity "
                            "(other columns are kept as metadata)")
        base = Path(images).expanduser().resolve() if images else file.parent
        paths = [str(p if Path(p).is_absolute() else (base / p).resolve()) for p in df["path"].cast(pl.String).to_list()]
        boxes = [_parse_bbox(b, f"{file} row {i + 2}") for i, b in enumerate(df["bbox"].to_list())] \
            if "bbox" in df.columns else [None] * df.height
        box_cols = {k: [b[i] if b else None for b in boxes] for i, k in enumerate(("bbox_x", "bbox_y", "bbox_w", "bbox_h"))}
        meta = df.drop([c for c in ("path", "identity", "bbox") if c in df.columns]).cast(pl.String)
        clash = [c for c in meta.columns if c in RESERVED]
        if clash:
            raise DataError(f"--table {file}: column(s) {clash} are reserved; rename them")
        out = pl.DataFrame({"path": paths, "identity": df["identity"].cast(pl.String), **box_cols},
                           schema_overrides={k: pl.Float64 for k in box_cols})
        return pl.concat([out, meta], how="horizontal")
    if not images:
        raise DataError("embed needs --images DIR (one sub-folder per identity) or --table FILE")
    root = Path(images).expanduser().resolve()
    files = find_images(root) if root.is_dir() else []
    if not files:
        raise DataError(f"--images {root}: no images found (expected {root}/<identity>/<image files>)")
    return pl.DataFrame({"path": [str(f) for f in files], "identity": [_identity_of(f, root) for f in files],
                         **{k: [None] * len(files) for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h")}},
                        schema_overrides={k: pl.Float64 for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h")})


def cmd_embed(argv: list[str]) -> None:
    import pyarrow.parquet as pq

    from indivaid.inference import load_inference

    ap = argparse.ArgumentParser(prog="python -m indivaid embed", description="Embed a catalogue of photos into a "
                                 "Parquet file: float32 vectors, identities, metadata columns (for match --where).")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--images", help="<dir>/<identity>/<image> (records the identity); with --table: the folder "
                    "its paths are relative to")
    ap.add_argument("--table", help="CSV/Parquet with path and identity (and optionally bbox); its other columns "
                    "(site, camera, date...) are kept as metadata")
    ap.add_argument("--meta", action="append", default=[], metavar="COLUMN=VALUE",
                    help="a metadata column with one value for every photo (e.g. site=north)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    meta = _key_values(args.meta, "--meta")
    clash = [c for c in meta if c in RESERVED]
    if clash:
        raise DataError(f"--meta {clash[0]}=...: {RESERVED} are reserved column names")
    rows = _embed_sources(args.images, args.table).with_columns(pl.lit(v).alias(k) for k, v in meta.items())
    model = load_inference(args.checkpoint, args.device)
    boxes = rows.select("bbox_x", "bbox_y", "bbox_w", "bbox_h").rows()
    emb = torch.nn.functional.normalize(model.embed_files(rows["path"].to_list(), bboxes=boxes), dim=1)
    d = int(emb.shape[1])
    df = rows.with_columns(pl.Series("embedding", emb.numpy().astype(np.float32), dtype=pl.Array(pl.Float32, d)))
    info = {"model": model.fingerprint, "checkpoint": str(Path(args.checkpoint).resolve()), "metric": model.metric,
            "dim": d}
    table = df.to_arrow()
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), EMBED_META: json.dumps(info).encode()})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, args.out)
    labelled = rows["identity"].drop_nulls()
    extra = [c for c in rows.columns if c not in RESERVED]
    console.print(f"wrote {df.height} embeddings ({d}-d float32) of {labelled.n_unique()} individuals to {args.out}"
                  + (f"; metadata: {', '.join(extra)}" if extra else ""))


def load_gallery(path: str | Path, model) -> tuple[pl.DataFrame, torch.Tensor]:
    """An ``embed`` file's rows and float32 vectors; refuses one made by another model."""
    import pyarrow.parquet as pq

    file = Path(path)
    if not file.is_file():
        raise DataError(f"--gallery {file}: not found; make it with `python -m indivaid embed`")
    raw = (pq.read_schema(file).metadata or {}).get(EMBED_META)
    info = json.loads(raw) if raw else {}
    if info.get("model") not in (None, model.fingerprint):
        raise DataError(f"--gallery {file} was embedded by another model ({info.get('checkpoint')}); embed the "
                        "gallery again with this --checkpoint")
    gal = pl.read_parquet(file)
    if "embedding" not in gal.columns or "identity" not in gal.columns:
        raise DataError(f"--gallery {file}: not an embedding file (needs identity and embedding columns)")
    col = gal["embedding"]
    vectors = col.to_numpy() if isinstance(col.dtype, pl.Array) else np.asarray(col.to_list())  # older files: lists
    return gal.drop("embedding"), torch.from_numpy(np.array(vectors, dtype=np.float32))  # a writable copy


def _restrict(gal: pl.DataFrame, emb: torch.Tensor, where: dict[str, str]) -> tuple[pl.DataFrame, torch.Tensor]:
    """Gallery rows whose metadata equal every ``--where`` value (e.g. one site's individuals)."""
    keep = pl.Series([True] * gal.height)
    for col, value in where.items():
        if col not in gal.columns:
            cols = [c for c in gal.columns if c not in RESERVED]
            raise DataError(f"--where {col}={value}: the gallery has no column {col!r}; its metadata columns: "
                            f"{', '.join(cols) or 'none'} (embed keeps a table's columns, or add --meta COLUMN=VALUE)")
        hit = gal[col].cast(pl.String) == value
        if not hit.any():
            values = sorted(gal[col].cast(pl.String).drop_nulls().unique().to_list())
            raise DataError(f"--where {col}={value}: no gallery image has it; values of {col}: {values[:10]}")
        keep = keep & hit.fill_null(False)
    labelled = keep & gal["identity"].is_not_null()
    if not labelled.any():
        raise DataError(f"no gallery image with an identity matches --where {where}; embed the catalogue with "
                        "one folder per individual or a table with an identity column")
    idx = torch.from_numpy(np.flatnonzero(labelled.to_numpy()))
    return gal.filter(labelled), emb[idx]


def cmd_match(argv: list[str]) -> None:
    from indivaid.eval.distance import distance_matrix
    from indivaid.inference import decide, load_inference, rank_identities

    ap = argparse.ArgumentParser(prog="python -m indivaid match", description="Which known individual is each new "
                                 "photo, or is it a new one? Ranks individuals (not images) and decides KNOWN / NEW.")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--gallery", required=True, help="Parquet file from `embed` (the catalogue)")
    ap.add_argument("--images", required=True, help="new photos (a folder; <dir>/<identity>/<image> marks hits)")
    ap.add_argument("--top-k", type=int, default=5, help="individuals listed per photo")
    ap.add_argument("--threshold", type=float, help="distance at or below which a photo is KNOWN (default: the "
                    "threshold calibrated on validation, stored in the checkpoint)")
    ap.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE",
                    help="restrict the gallery by a metadata column kept by embed (repeatable)")
    ap.add_argument("--out", help="write the ranking and decisions to a .csv or .parquet file")
    ap.add_argument("--grid", help="write a PNG: each photo beside its top individuals (original photos)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.out and Path(args.out).suffix.lower() not in (".csv", ".parquet"):
        raise DataError(f"--out {args.out}: use a .csv or .parquet file name")
    if args.top_k < 1:
        raise DataError(f"--top-k {args.top_k}: must be at least 1")
    model = load_inference(args.checkpoint, args.device)
    gal, g = _restrict(*load_gallery(args.gallery, model), _key_values(args.where, "--where"))
    root = Path(args.images).expanduser().resolve()
    files = find_images(root) if root.is_dir() else []
    if not files:
        raise DataError(f"--images {root}: no images found")
    q = model.embed_files(files)
    if q.shape[1] != g.shape[1]:
        raise DataError(f"--gallery {args.gallery} holds {g.shape[1]}-d vectors but this model makes {q.shape[1]}-d "
                        "ones; embed the gallery again with this --checkpoint")
    dist = distance_matrix(q, g.to(q.device), model.metric, normalize=True)  # type: ignore[arg-type]
    ranked = rank_identities(dist, gal["identity"].to_list(), args.top_k)
    cal = model.calibration
    threshold = args.threshold if args.threshold is not None else (cal.threshold if cal else None)
    if threshold is None:
        log.warning("%s has no calibrated threshold (trained on a closed-set split): photos are ranked without a "
                    "KNOWN/NEW decision; pass --threshold, or train with data.split.unknown_fraction > 0",
                    args.checkpoint)
        known, conf = None, None
    else:
        known, conf = decide(ranked.best[:, 0], threshold, cal.probability if cal else None)
    table = _match_table(files, root, gal, ranked, known, conf, threshold)
    _print_matches(table, ranked, g.shape[0], threshold, "--threshold" if args.threshold is not None
                   else (f"calibrated on validation, {cal.rule}" if cal else ""))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        table.write_parquet(out) if out.suffix.lower() == ".parquet" else table.write_csv(out)
        console.print(f"matches: {out}")
    if args.grid:
        retrieval_grid(table, Path(args.grid))
        console.print(f"retrieval grid: {args.grid}")


def _match_table(files: list[Path], root: Path, gal: pl.DataFrame, ranked, known: torch.Tensor | None,
                 conf: torch.Tensor | None, threshold: float | None) -> pl.DataFrame:
    """One row per photo and ranked individual, with the photo's decision on every row."""
    q, k = ranked.codes.shape
    photo = [str(f) for f in files]
    truth = [_identity_of(f, root) for f in files]
    names = [ranked.identities[int(c)] for c in ranked.codes.reshape(-1)]
    gpaths = gal["path"].to_list()
    decision = [None] * q if known is None else ["KNOWN" if bool(x) else "NEW" for x in known]
    decided = [ranked.identities[int(ranked.codes[i, 0])] if decision[i] == "KNOWN" else None for i in range(q)]
    rep = lambda values: [v for v in values for _ in range(k)]  # noqa: E731 (per photo -> per row)
    return pl.DataFrame({
        "photo": rep(photo), "photo_identity": rep(truth), "decision": rep(decision), "identity_decided": rep(decided),
        "confidence": rep(conf.tolist() if conf is not None else [None] * q),
        "threshold": [threshold] * (q * k), "rank": list(range(1, k + 1)) * q, "identity": names,
        "best_distance": ranked.best.reshape(-1).tolist(), "mean_distance": ranked.mean.reshape(-1).tolist(),
        "images": ranked.images[ranked.codes.reshape(-1)].tolist(),
        "best_image": [gpaths[int(i)] for i in ranked.best_image.reshape(-1)],
    }, schema_overrides={"threshold": pl.Float64, "confidence": pl.Float64, "decision": pl.String,
                         "identity_decided": pl.String, "photo_identity": pl.String})


def _print_matches(table: pl.DataFrame, ranked, n_images: int, threshold: float | None, source: str) -> None:
    k = ranked.codes.shape[1]
    out = Table(title=f"top-{k} matches: {len(ranked.identities)} individuals ({n_images} images) ranked by their "
                      "nearest image")
    for c, j in (("photo", "left"), ("decision", "left"), ("confidence", "right"), ("rank", "right"),
                 ("individual", "left"), ("best", "right"), ("mean", "right"), ("images", "right")):
        out.add_column(c, justify=j)  # type: ignore[arg-type]
    for r in table.iter_rows(named=True):
        first = r["rank"] == 1
        verdict = "" if not first or r["decision"] is None else (
            f"[bold blue]KNOWN {r['identity_decided']}[/]" if r["decision"] == "KNOWN" else "[bold red]NEW[/]")
        conf = f"{r['confidence']:.0%}" if first and r["confidence"] is not None else ""
        out.add_row(Path(r["photo"]).name if first else "", verdict, conf, str(r["rank"]), str(r["identity"]),
                    f"{r['best_distance']:.3f}", f"{r['mean_distance']:.3f}", str(r["images"]))
    console.print(out)
    if threshold is not None:
        firsts = table.filter(pl.col("rank") == 1)
        n_known = firsts.filter(pl.col("decision") == "KNOWN").height
        console.print(f"{firsts.height} photos: {n_known} KNOWN, {firsts.height - n_known} NEW at distance threshold "
                      f"{threshold:.4f} ({source})")


def _photo(path: str, max_side: int = 320) -> np.ndarray:
    """The original photo, upright (EXIF orientation) and shrunk, its aspect kept."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
        img.thumbnail((max_side, max_side))
        return np.asarray(img)


def retrieval_grid(table: pl.DataFrame, out: Path) -> None:
    """Each photo, then its top individuals (their nearest image), as original photos with their aspect kept.
    The photo's title is its decision (NEW in red); a frame is green where the individual is the
    photo's known identity (from its folder), red where not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = table.partition_by("photo", maintain_order=True)
    images = [[_photo(g["photo"][0])] + [_photo(p) for p in g["best_image"]] for g in groups]
    k = int(table["rank"].max())
    cell = 1.9
    # each row as tall as its tallest photo at the cell width (the photos keep their aspect)
    ratios = [min(2.0, max(0.3, max(im.shape[0] / im.shape[1] for im in row))) for row in images]
    fig, axes = plt.subplots(len(groups), 1 + k, figsize=(cell * (1 + k), sum(cell * r + 0.45 for r in ratios)),
                             squeeze=False, gridspec_kw={"height_ratios": [cell * r + 0.45 for r in ratios]})
    for i, (rows, row_images) in enumerate(zip(groups, images)):
        first = rows.row(0, named=True)
        photo = first["photo"]
        ax = axes[i][0]
        ax.imshow(row_images[0])
        verdict = first["decision"]
        label = {"KNOWN": f"KNOWN {first['identity_decided']}", "NEW": "NEW"}.get(verdict or "", "")
        if first["confidence"] is not None and label:
            label += f" ({first['confidence']:.0%})"
        ax.set_title(f"{Path(photo).name}\n{label}", fontsize=7, color="red" if verdict == "NEW" else "black",
                     fontweight="bold" if verdict == "NEW" else "normal")
        for s in ax.spines.values():
            s.set_edgecolor("red" if verdict == "NEW" else "grey")
            s.set_linewidth(3 if verdict == "NEW" else 1)
        qid = first["photo_identity"]
        for j, r in enumerate(rows.iter_rows(named=True), 1):
            ax = axes[i][j]
            ax.imshow(row_images[j])
            hit = qid is not None and r["identity"] == qid
            ax.set_title(f"{r['identity']}\n{r['best_distance']:.3f}", fontsize=7, color="green" if hit else "black")
            for s in ax.spines.values():
                s.set_edgecolor("green" if hit else ("red" if qid is not None else "grey"))
                s.set_linewidth(3 if qid is not None else 1)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in axes[i][len(rows) + 1:]:
            ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "embed": cmd_embed, "match": cmd_match}
