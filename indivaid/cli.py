"""Command-line entry points: train, evaluate, embed, match, robustness, export (``python -m indivaid COMMAND``).

``embed`` and ``match`` run either the torch checkpoint (``--checkpoint model.pt``) or its ONNX export
(``--onnx model.onnx``, through :mod:`indivaid_field`); both write and read the same embedding files and
share one search and decision (:mod:`indivaid_field.matching`)."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from rich.table import Table

from indivaid.config import ConfigError
from indivaid.data.catalogue import DataError
from indivaid.utils.console import make_console
from indivaid_field.matching import Gallery, decide, gallery_mask, key_values, match_rows, print_matches
from indivaid_field.preprocess import find_images, identity_from_folder
from indivaid_field.store import RESERVED, check_model, read_embeddings, write_embeddings

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
    from indivaid.data.imagecache import build_image_cache
    from indivaid.eval.openset import open_set_metrics
    from indivaid.eval.retrieval import match_retrieval, score_retrieval
    from indivaid.inference import checkpoint_split, load_inference
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
    split = checkpoint_split(model, args.checkpoint, dataset=args.dataset, path=args.path, split_file=args.split_file)
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


def _embed_sources(images: str | None, table: str | None) -> pl.DataFrame:
    """Photos to embed: ``path``, ``identity`` (null where unknown), ``bbox_*`` and metadata columns
    (a table's other columns, as strings), from a folder per identity or a table: the same reading
    as the torch-free field tool's (``indivaid_field``), so both embed the same catalogue alike."""
    from indivaid_field import FieldError
    from indivaid_field.cli import folder_sources, table_sources

    if not table and not images:
        raise DataError("embed needs --images DIR (one sub-folder per identity) or --table FILE")
    try:
        return pl.from_arrow(table_sources(table, images) if table else folder_sources(images))
    except FieldError as e:
        raise DataError(str(e)) from None


@dataclass(frozen=True)
class Embedder:
    """What ``embed`` and ``match`` need of a model, torch checkpoint or ONNX export alike."""

    source: str  # the flag and file, for messages
    fingerprint: str
    metric: str
    threshold: float | None  # calibrated on validation (open-set runs), else None
    probability: tuple[float, float] | None
    rule: str
    embed: Callable[[Sequence[str], Sequence[Sequence[float | None]] | None], np.ndarray]  # L2-normalised float32


def load_embedder(checkpoint: str | None, onnx: str | None, device: str = "cpu") -> Embedder:
    """The torch checkpoint, or the ONNX export run by ONNX Runtime (:class:`indivaid_field.model.OnnxModel`)."""
    if onnx:
        from indivaid_field.model import OnnxModel

        m = OnnxModel(onnx)
        return Embedder(f"--onnx {onnx}", m.fingerprint, m.metric, m.threshold, m.probability, m.threshold_rule,
                        lambda paths, boxes: m.embed_files(paths, boxes))
    from indivaid.inference import load_inference

    model = load_inference(checkpoint, device)  # type: ignore[arg-type]
    cal = model.calibration

    def embed(paths: Sequence[str], boxes: Sequence[Sequence[float | None]] | None) -> np.ndarray:
        return torch.nn.functional.normalize(model.embed_files(paths, bboxes=boxes), dim=1).numpy()

    return Embedder(f"--checkpoint {checkpoint}", model.fingerprint, model.metric, cal.threshold if cal else None,
                    cal.probability if cal else None, cal.rule if cal else "", embed)


def _model_flags(ap: argparse.ArgumentParser) -> None:
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="model.pt of a run (torch)")
    which.add_argument("--onnx", help="the same model exported by `python -m indivaid export` (ONNX Runtime)")
    ap.add_argument("--device", default="cpu", help="torch device (with --checkpoint)")


def cmd_embed(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m indivaid embed", description="Embed a catalogue of photos into a "
                                 "Parquet file: float32 vectors, identities, metadata columns (for match --where).")
    _model_flags(ap)
    ap.add_argument("--images", help="<dir>/<identity>/<image> (records the identity); with --table: the folder "
                    "its paths are relative to")
    ap.add_argument("--table", help="CSV/Parquet with path and identity (and optionally bbox); its other columns "
                    "(site, camera, date...) are kept as metadata")
    ap.add_argument("--meta", action="append", default=[], metavar="COLUMN=VALUE",
                    help="a metadata column with one value for every photo (e.g. site=north)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    meta = key_values(args.meta, "--meta")
    clash = [c for c in meta if c in RESERVED]
    if clash:
        raise DataError(f"--meta {clash[0]}=...: {RESERVED} are reserved column names")
    rows = _embed_sources(args.images, args.table).with_columns(pl.lit(v).alias(k) for k, v in meta.items())
    model = load_embedder(args.checkpoint, args.onnx, args.device)
    boxes = rows.select("bbox_x", "bbox_y", "bbox_w", "bbox_h").rows()
    emb = model.embed(rows["path"].to_list(), boxes)
    d = int(emb.shape[1])
    origin = Path(args.checkpoint or args.onnx).resolve()
    write_embeddings(args.out, rows.to_arrow(), emb, {"model": model.fingerprint, "checkpoint": str(origin),
                                                       "metric": model.metric, "dim": d})
    labelled = rows["identity"].drop_nulls()
    extra = [c for c in rows.columns if c not in RESERVED]
    console.print(f"wrote {rows.height} embeddings ({d}-d float32) of {labelled.n_unique()} individuals to {args.out}"
                  + (f"; metadata: {', '.join(extra)}" if extra else ""))


def load_gallery(path: str | Path, fingerprint: str) -> tuple[pl.DataFrame, np.ndarray]:
    """An ``embed`` file's rows and float32 vectors; refuses one made by another model."""
    rows, vectors, info = read_embeddings(path)
    check_model(path, info, fingerprint)
    return pl.from_arrow(rows), vectors  # type: ignore[return-value]


def _restrict(gal: pl.DataFrame, emb: np.ndarray, where: dict[str, str]) -> tuple[pl.DataFrame, np.ndarray]:
    """Gallery rows whose metadata equal every ``--where`` value (e.g. one site's individuals)."""
    columns = {c: gal[c].cast(pl.String).to_list() for c in gal.columns}
    keep = gallery_mask(columns, where, RESERVED)
    return gal.filter(pl.Series(keep)), emb[keep]


def cmd_match(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m indivaid match", description="Which known individual is each new "
                                 "photo, or is it a new one? Ranks individuals (not images) and decides KNOWN / NEW.")
    _model_flags(ap)
    ap.add_argument("--gallery", required=True, help="Parquet file from `embed` (the catalogue)")
    ap.add_argument("--images", required=True, help="new photos (a folder; <dir>/<identity>/<image> marks hits)")
    ap.add_argument("--top-k", type=int, default=5, help="individuals listed per photo")
    ap.add_argument("--threshold", type=float, help="distance at or below which a photo is KNOWN (default: the "
                    "threshold calibrated on validation, stored in the checkpoint)")
    ap.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE",
                    help="restrict the gallery by a metadata column kept by embed (repeatable)")
    ap.add_argument("--out", help="write the ranking and decisions to a .csv or .parquet file")
    ap.add_argument("--grid", help="write a PNG: each photo beside its top individuals (original photos)")
    args = ap.parse_args(argv)
    if args.out and Path(args.out).suffix.lower() not in (".csv", ".parquet"):
        raise DataError(f"--out {args.out}: use a .csv or .parquet file name")
    if args.top_k < 1:
        raise DataError(f"--top-k {args.top_k}: must be at least 1")
    model = load_embedder(args.checkpoint, args.onnx, args.device)
    gal, g = _restrict(*load_gallery(args.gallery, model.fingerprint), key_values(args.where, "--where"))
    root = Path(args.images).expanduser().resolve()
    files = find_images(root) if root.is_dir() else []
    if not files:
        raise DataError(f"--images {root}: no images found")
    q = model.embed([str(f) for f in files], None)
    if q.shape[1] != g.shape[1]:
        raise DataError(f"--gallery {args.gallery} holds {g.shape[1]}-d vectors but this model makes {q.shape[1]}-d "
                        f"ones; embed the gallery again with this {model.source.split()[0]}")
    ranked = Gallery(g, gal["identity"].to_list(), model.metric).search(q, args.top_k)
    threshold = args.threshold if args.threshold is not None else model.threshold
    if threshold is None:
        log.warning("%s has no calibrated threshold (trained on a closed-set split): photos are ranked without a "
                    "KNOWN/NEW decision; pass --threshold, or train with data.split.unknown_fraction > 0",
                    model.source)
        known, conf = None, None
    else:
        known, conf = decide(ranked.best[:, 0], threshold, model.probability)
    rows = match_rows([str(f) for f in files], [identity_from_folder(f, root) for f in files], gal["path"].to_list(),
                      ranked, known, conf, threshold)
    table = pl.DataFrame(rows, schema_overrides={"threshold": pl.Float64, "confidence": pl.Float64,
                                                 "decision": pl.String, "identity_decided": pl.String,
                                                 "photo_identity": pl.String})
    source = "--threshold" if args.threshold is not None else (f"calibrated on validation, {model.rule}"
                                                                if model.threshold is not None else "")
    print_matches(console, rows, ranked, g.shape[0], threshold, source)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        table.write_parquet(out) if out.suffix.lower() == ".parquet" else table.write_csv(out)
        console.print(f"matches: {out}")
    if args.grid:
        retrieval_grid(table, Path(args.grid))
        console.print(f"retrieval grid: {args.grid}")


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


def cmd_robustness(argv: list[str]) -> None:
    from indivaid.eval.robustness import NAMES, robustness_scores, write_report

    ap = argparse.ArgumentParser(prog="python -m indivaid robustness", description="Score a checkpoint with its "
                                 "queries corrupted (darkness, blur, noise, JPEG, fog, occlusion...; 3 severities "
                                 "each; gallery clean) against the clean split.")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--dataset", help="score on another registered dataset (default: the run's split)")
    ap.add_argument("--path", help="that dataset's folder")
    ap.add_argument("--split-file", help="a split file (default: the run's split.csv)")
    ap.add_argument("--split", choices=["val", "test"], default="test")
    ap.add_argument("--corruption", action="append", metavar="NAME",
                    help=f"only these (repeatable): {', '.join(NAMES)}")
    ap.add_argument("--seed", type=int, default=0, help="seeds every random draw of the corruptions")
    ap.add_argument("--batch-size", type=int, help="images per forward pass (default: the run's eval.batch_size)")
    ap.add_argument("--device", help="default: the run's runtime.device")
    ap.add_argument("--out", help="folder for robustness.json and robustness.png "
                    "(default: <checkpoint dir>/robustness)")
    args = ap.parse_args(argv)
    unknown = [n for n in args.corruption or [] if n not in NAMES]
    if unknown:
        raise ConfigError(f"--corruption {unknown[0]}: unknown; choose from {', '.join(NAMES)}")
    result = robustness_scores(args.checkpoint, dataset=args.dataset, path=args.path, split_file=args.split_file,
                               split=args.split, device=args.device, seed=args.seed, corruptions=args.corruption,
                               batch_size=args.batch_size)
    console.print(robustness_table(result))
    s = result["summary"]
    console.print(f"mean relative robustness (corrupted / clean, over {sum(map(len, result['corruptions'].values()))} "
                  f"corruption x severity cells): mAP {100 * s['mean_rel_mAP']:.1f} %, Rank-1 "
                  f"{100 * s['mean_rel_rank1']:.1f} %")
    js, png = write_report(result, args.out or Path(args.checkpoint).parent / "robustness")
    console.print(f"robustness: {js}  plot: {png}")


def robustness_table(result: dict) -> Table:
    """One row per corruption x severity: mAP and Rank-1, and each relative to the clean split."""
    clean = result["clean"]
    t = Table(title=f"robustness of {result['method']} on {result['dataset']} {result['split']} ({result['queries']} "
                    f"corrupted queries, {result['gallery']} clean gallery images, seed {result['seed']})")
    for c in ("corruption", "severity", "level", "mAP", "relative mAP", "Rank-1", "relative Rank-1"):
        t.add_column(c, justify="left" if c in ("corruption", "level") else "right")
    t.add_row("clean", "", "", f"{100 * clean['mAP']:.1f}", "100 %", f"{100 * clean['rank1']:.1f}", "100 %",
              end_section=True)
    for name, cells in result["corruptions"].items():
        for i, c in enumerate(cells):
            t.add_row(name if i == 0 else "", str(c["severity"]), str(c["level"]), f"{100 * c['mAP']:.1f}",
                      f"{100 * c['rel_mAP']:.0f} %", f"{100 * c['rank1']:.1f}", f"{100 * c['rel_rank1']:.0f} %",
                      end_section=i == len(cells) - 1)
    return t


def cmd_export(argv: list[str]) -> None:
    from indivaid.export import export_onnx

    ap = argparse.ArgumentParser(prog="python -m indivaid export", description="Export a checkpoint's image encoder "
                                 "and feature head to ONNX (dynamic batch, fixed input size, preprocessing, distance "
                                 "and open-set threshold in the metadata) for `python -m indivaid_field`.")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True, help="the .onnx file to write")
    ap.add_argument("--no-check", action="store_true", help="skip running the export in ONNX Runtime against torch")
    args = ap.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        raise DataError(f"--checkpoint {args.checkpoint}: not found")
    info = export_onnx(args.checkpoint, args.out, check=not args.no_check)
    t = Table(title=f"exported {args.checkpoint} -> {args.out} ({Path(args.out).stat().st_size / 2**20:.1f} MiB)")
    t.add_column("metadata")
    t.add_column("value")
    for k, v in info.items():
        t.add_row(k, f"{v:.2e}" if k == "max_abs_diff" else json.dumps(v))
    console.print(t)
    console.print(f"field use: python -m indivaid_field match --onnx {args.out} --gallery gallery.parquet --images DIR")


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "embed": cmd_embed, "match": cmd_match,
            "robustness": cmd_robustness, "export": cmd_export}
