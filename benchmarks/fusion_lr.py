"""How far attention fusion leaves the mean, per fusion learning rate (CPU, tiny preset, synthetic data).

    python benchmarks/fusion_lr.py [--lrs 1e-5 1e-4 1e-3 1e-2 --seeds 0 1 --epochs 30]

The fusion module starts exactly at the mean of an identity's image-specific descriptions (its output
projection is zero). This trains IndivAID with each ``fusion.lr`` and IndivAID-mean as the reference,
same data and seeds, and prints per run the relative departure from the mean (``fusion_departure``:
mean over identities of ||T - mean|| / ||mean||) after the first, a middle and the last stage-2
epoch, and the final validation mAP. docs/method.md section 4 quotes its output.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch
from common import make_config

from indivaid.training import train

DATA = {"identities": 100, "min_images": 8, "max_images": 12, "height": 48, "width": 96, "seed": 11}


def one_run(method: str, lr: float | None, seed: int, args: argparse.Namespace, root: Path) -> dict:
    cfg = make_config([
        "preset=tiny", f"method={method}", "data.dataset=synthetic", f"data.data_root={root / 'data'}",
        *(f"data.options.{k}={v}" for k, v in DATA.items()), f"stage2.epochs={args.epochs}",
        f"runtime.seed={seed}", f"runtime.threads={args.threads}", "checkpoint.every=0",
        f"eval.every={args.epochs}", *([f"fusion.lr={lr}"] if lr is not None else []),
    ])
    res = train(cfg, workdir=root / "runs" / f"{method}-{lr}-{seed}", evaluate_test=False)
    dep = [h["fusion_departure"] for h in res.history if h["stage"] == 2]
    return {"method": method, "lr": lr, "seed": seed, "dep": (dep[0], dep[len(dep) // 2 - 1], dep[-1]),
            "mAP": res.val["mAP"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3, 1e-2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=30, help="stage-2 epochs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--root", type=Path, default=None, help="where the data and runs go (default: a temp dir)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = args.root or Path(tempfile.mkdtemp(prefix="fusion-lr-"))
    print(f"tiny preset, CPU ({args.threads} threads, torch {torch.__version__}), synthetic {DATA}, "
          f"{args.epochs} stage-2 epochs")
    print(f"| method | fusion.lr | seed | departure ep 1 | ep {args.epochs // 2} | ep {args.epochs} | val mAP |")
    print("|---|---|---|---|---|---|---|")
    for seed in args.seeds:
        for method, lr in [("indivaid-mean", None), *(("indivaid", lr) for lr in args.lrs)]:
            r = one_run(method, lr, seed, args, root)
            deps = " | ".join(f"{d:.4f}" for d in r["dep"])
            print(f"| {method} | {lr if lr is not None else '-'} | {seed} | {deps} | {100 * r['mAP']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
