"""Command-line entry points: train, evaluate, embed, match (``python -m indivaid COMMAND``)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import polars as pl
import torch
from rich.table import Table

from indivaid.data.adapters.base import find_images
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
    from indivaid.eval.retrieval import score_retrieval
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
    m = score_retrieval(feats(q), feats(g), q, g, protocol=split.protocol, camera_codes=split.camera_codes(),
                        metric=model.metric)
    console.print_json(json.dumps({"dataset": split.dataset, "split": args.split, "split_hash": split.hash,
                                   "protocol": split.protocol, **m.as_dict()}))


def _identity_of(path: Path, root: Path) -> str | None:
    rel = path.relative_to(root)
    return rel.parts[0] if len(rel.parts) > 1 else None


def cmd_embed(argv: list[str]) -> None:
    from indivaid.inference import load_inference

    ap = argparse.ArgumentParser(prog="python -m indivaid embed", description="Embed a folder of photos "
                                 "(<dir>/<identity>/<image> records the identity) into a Parquet file.")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    model = load_inference(args.checkpoint, args.device)
    root = Path(args.images).resolve()
    files = find_images(root)
    if not files:
        raise SystemExit(f"no images under {root}")
    emb = torch.nn.functional.normalize(model.embed_files(files), dim=1)
    df = pl.DataFrame({"path": [str(f) for f in files], "identity": [_identity_of(f, root) for f in files],
                       "embedding": emb.numpy().tolist()})
    df.write_parquet(args.out)
    console.print(f"wrote {len(files)} embeddings ({emb.shape[1]}-d) to {args.out}")


def cmd_match(argv: list[str]) -> None:
    from indivaid.inference import load_inference

    ap = argparse.ArgumentParser(prog="python -m indivaid match", description="Rank known individuals for new photos.")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--gallery", required=True, help="Parquet file from `embed`")
    ap.add_argument("--images", required=True, help="new photos (a folder)")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--grid", help="write a retrieval-grid PNG here")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    model = load_inference(args.checkpoint, args.device)
    gal = pl.read_parquet(args.gallery)
    g = torch.tensor(gal["embedding"].to_list(), dtype=torch.float32)
    root = Path(args.images).resolve()
    files = find_images(root)
    if not files:
        raise SystemExit(f"no images under {root}")
    q = torch.nn.functional.normalize(model.embed_files(files), dim=1)
    dist = torch.cdist(q, g)
    k = min(args.top_k, g.shape[0])
    d, idx = dist.topk(k, largest=False)
    table = Table(title=f"top-{k} matches")
    for c in ("query", "rank", "identity", "distance", "gallery image"):
        table.add_column(c)
    results = []
    for i, f in enumerate(files):
        hits = [(gal["identity"][int(j)], float(dd), gal["path"][int(j)]) for j, dd in zip(idx[i], d[i])]
        results.append((f, _identity_of(f, root), hits))
        for r, (ident, dd, p) in enumerate(hits, 1):
            table.add_row(f.name if r == 1 else "", str(r), str(ident), f"{dd:.3f}", Path(p).name)
    console.print(table)
    if args.grid:
        retrieval_grid(results, Path(args.grid), model.spec)
        console.print(f"retrieval grid: {args.grid}")


def retrieval_grid(results: list, out: Path, spec) -> None:
    """Query + top-k per row; green frame where the match's identity equals the query's known one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from indivaid.data.imagecache import load_image

    rows, cols = len(results), 1 + max(len(r[2]) for r in results)
    cell_w = 1.8
    cell_h = cell_w * spec.height / spec.width + 0.45  # image at its aspect plus a title line
    fig, axes = plt.subplots(rows, cols, figsize=(cell_w * cols, cell_h * rows), squeeze=False)
    for i, (qpath, qid, hits) in enumerate(results):
        axes[i][0].imshow(load_image(str(qpath), (None,) * 4, spec).transpose(1, 2, 0))
        axes[i][0].set_title(f"query\n{qid or ''}", fontsize=7)
        for j, (ident, dd, p) in enumerate(hits, 1):
            ax = axes[i][j]
            ax.imshow(load_image(p, (None,) * 4, spec).transpose(1, 2, 0))
            hit = qid is not None and ident == qid
            ax.set_title(f"{ident}\n{dd:.3f}", fontsize=7, color="green" if hit else "black")
            for s in ax.spines.values():
                s.set_edgecolor("green" if hit else ("red" if qid is not None else "grey"))
                s.set_linewidth(3 if qid is not None else 1)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "embed": cmd_embed, "match": cmd_match}
