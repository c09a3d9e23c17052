"""Stage-2 throughput of IndivAID against CLIP-ReID, side by side, through the real trainer (CPU, tiny).

    python benchmarks/stage2_speed.py [--identities 1300 --min-images 2 --max-images 40 --steps 40]

IndivAID fuses every identity's image-specific descriptions at every step; CLIP-ReID has one text
feature per identity. With skewed identity sizes (2-40 images) a fusion that pads every identity to
the largest one pays for the padding; this benchmark measures what that costs end to end.

Both methods train on the same generated data with the same seed, through ``indivaid.training.train``
(sampler -> image cache -> augmentation -> encoder -> losses -> optimiser), and the figure is the
``images_per_s`` the trainer reports for its stage-2 epochs (the best of ``--epochs``; stage 1 and
evaluation are not timed). Last line: ``speed-up: N.Nx``, IndivAID img/s over CLIP-ReID img/s.
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
from pathlib import Path

import torch
from common import make_config

from indivaid.training import train


def stage2_rate(method: str, args: argparse.Namespace, data_root: Path, workdir: Path) -> float:
    """Best stage-2 images/s the trainer reported for ``method``."""
    opts = {"identities": args.identities, "min_images": args.min_images, "max_images": args.max_images,
            "height": 48, "width": 96, "seed": 0}
    cfg = make_config([
        "preset=tiny", f"method={method}", "data.dataset=synthetic", f"data.data_root={data_root}",
        *(f"data.options.{k}={v}" for k, v in opts.items()),
        "stage1.epochs=1", "stage1.min_steps=0", f"stage2.epochs={args.epochs}", "stage2.warmup_epochs=0", "stage2.milestones=[]",
        f"runtime.max_steps_per_epoch={args.steps}", f"runtime.threads={args.threads}",
        f"eval.every={10 * args.epochs}", "checkpoint.every=0",
    ])
    rows: list[dict] = []
    train(cfg, workdir=workdir / method, report=lambda row, checkpoint=None: rows.append(dict(row)),
          evaluate_test=False)
    rates = [r["images_per_s"] for r in rows if r["stage"] == 2 and not math.isnan(r["images_per_s"])]
    if not rates:
        raise RuntimeError(f"{method}: the trainer reported no stage-2 epoch")
    return max(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--identities", type=int, default=1300)
    ap.add_argument("--min-images", type=int, default=2)
    ap.add_argument("--max-images", type=int, default=40)
    ap.add_argument("--steps", type=int, default=40, help="stage-2 steps per timed epoch")
    ap.add_argument("--epochs", type=int, default=3, help="stage-2 epochs; the best epoch's rate counts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--root", type=Path, default=None, help="where the synthetic data and runs go (default: a temp dir)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = args.root or Path(tempfile.mkdtemp(prefix="stage2-speed-"))
    rates = {m: stage2_rate(m, args, root / "data", root / "runs") for m in ("clipreid", "indivaid")}
    print(f"tiny preset, CPU ({args.threads} threads), synthetic: {args.identities} identities with "
          f"{args.min_images}-{args.max_images} images each, {args.steps} steps per epoch (torch {torch.__version__})")
    for m, r in rates.items():
        print(f"{m:>9}: {r:8.1f} img/s (stage 2, end to end)")
    print(f"speed-up: {rates['indivaid'] / rates['clipreid']:.2f}x")


if __name__ == "__main__":
    main()
