"""GPU throughput of both stages for ViT-B/16 at 256x128 in bf16, each against its reference.

Run it on the lent GPU machine from the repo root (no Ray; open_clip, ftfy, wcwidth and polars
carried as wheels, see BENCHMARKS.md):

    python benchmarks/gpu_throughput.py --out $OUT/gpu_throughput.json

1. makes its own JPEGs (480 x 320) and decodes them once into the uint8 image cache (timed);
2. stage 1: prompts/s of the batched step vs the public code's per-sample loop (target >= 20x);
3. stage 2, for IndivAID and CLIP-ReID, eager and compiled (runtime.compile): images/s end to end
   (sampler -> cached uint8 -> GPU augmentation -> encoder -> losses -> Adam) vs the bare step on a
   ready-made batch at the same batch size. Targets (H200, ViT-B/16, 256x128, b128): compiled end to
   end >= 90% of the compiled bare step and >= 4,300 img/s; IndivAID >= 90% of CLIP-ReID.
Random weights (no download): throughput does not depend on the values.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from common import make_config, rate, stage1_rates, sync
from PIL import Image

from indivaid.data import SplitConfig, build_split, open_dataset
from indivaid.data.augment import AugmentConfig, train_transform
from indivaid.data.imagecache import ImageSpec, build_image_cache
from indivaid.data.sampler import PKSampler
from indivaid.methods import METHODS
from indivaid.models.fusion import pad_descriptions
from indivaid.training.runtime import Runtime
from indivaid.training.system import ReIDSystem
from indivaid.training.features import ImageSource
from indivaid.training.run import epoch_batches
from indivaid.training.stage2 import Stage2Net, Stage2Stepper, stage2_losses, stage2_optimizer


def make_jpegs(root: Path, ids: int, per_id: int) -> None:
    def one(k: int) -> None:
        rng = np.random.default_rng(k)
        base = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((480, 320), Image.Resampling.BILINEAR)
        d = root / f"id{k // per_id:04d}"
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{k:06d}.jpg", quality=90)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(ids * per_id)))


def stage2_rates(cfg, rt: Runtime, cache, rows: np.ndarray, labels: np.ndarray, batch: int, seconds: float,
                 method: str = "indivaid") -> dict:
    """Bare step (a ready-made augmented batch) and end to end (what the trainer does) for one method,
    compiled or not as ``rt.compile`` says (the compile happens in the warm-up, outside the timing)."""
    num_ids = int(labels.max()) + 1
    torch.manual_seed(0)
    spec = METHODS.get(method)
    system = ReIDSystem(cfg, spec, num_ids, 0, "tiger").to(rt.device).train()
    for p in system.prompt.parameters():
        p.requires_grad_(False)
    if system.fusion.per_image:  # every training image's description (IndivAID)
        desc = pad_descriptions(torch.randn(len(labels), system.image.embed_dim, device=rt.device),
                                torch.from_numpy(labels).to(rt.device), num_ids)
    else:  # one text per identity (CLIP-ReID)
        desc = pad_descriptions(torch.randn(num_ids, system.image.embed_dim, device=rt.device),
                                torch.arange(num_ids, device=rt.device), num_ids)
    net = Stage2Net(system, rt)
    opt = stage2_optimizer(system, cfg.stage2, cfg.fusion.lr)
    y_all = torch.from_numpy(labels).to(rt.device)
    stepper = Stage2Stepper(system, net, opt, ImageSource(cache, rows, rt.device), y_all, None, desc, cfg.stage2, rt)
    sampler = PKSampler(labels, batch // 4, 4, seed=0)
    gen = torch.Generator(device=rt.device).manual_seed(0)
    aug = AugmentConfig()
    fixed_idx = torch.from_numpy(next(iter(sampler))).to(rt.device)
    fixed_x = train_transform(stepper.source(fixed_idx), aug, gen)
    fixed_y = y_all[fixed_idx]

    def bare() -> int:  # the same step on a ready-made augmented batch: no sampling, no data movement
        stepper.step(fixed_x, fixed_y, None)
        return batch

    state = {"epoch": 0, "pos": 0, "batches": epoch_batches(sampler, 0, rt.device)}

    def end_to_end() -> int:  # what the trainer does: epoch batches -> cached uint8 -> augment -> step
        if state["pos"] >= len(state["batches"]):
            state["epoch"] += 1
            state["pos"], state["batches"] = 0, epoch_batches(sampler, state["epoch"], rt.device)
        chunk = state["batches"][state["pos"] : state["pos"] + 4]
        state["pos"] += 4
        stepper.run(chunk, gen)
        return chunk.numel()

    t = time.perf_counter()
    stepper.step(fixed_x, fixed_y, None)  # compiles when rt.compile
    sync(rt.device)
    first_step_s = time.perf_counter() - t
    with rt.autocast():
        f = system.image(fixed_x)
    loss, terms = stage2_losses(system, net, fixed_x, fixed_y, None, desc, cfg.stage2, rt)
    check = {"feature_dtype": str(f.fproj.dtype), "loss_dtype": str(loss.dtype), "finite": bool(torch.isfinite(loss))}
    r_bare = rate(bare, rt.device, seconds, warmup=3)
    r_e2e = rate(end_to_end, rt.device, seconds, warmup=3)
    compiled = getattr(net.encode, "active", False)
    return {"method": method, "compiled": compiled, "batch": batch, "first_step_s": first_step_s,
            "bare_img_s": r_bare, "end_to_end_img_s": r_e2e, "ratio": r_e2e / r_bare, "bf16": check}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_throughput.json")
    ap.add_argument("--ids", type=int, default=128)
    ap.add_argument("--per-id", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--backbone", default="ViT-B-16", help="e.g. tiny, to dry-run the script on a CPU")
    ap.add_argument("--size", type=int, nargs=2, default=(256, 128))
    ap.add_argument("--batches", type=int, nargs="+", default=(128,))
    ap.add_argument("--no-compile", action="store_true", help="eager only (e.g. a CPU dry run)")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rt = Runtime(dev, torch.bfloat16 if dev.type == "cuda" else None)
    report: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__}
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    t = time.perf_counter()
    make_jpegs(tmp / "photos", args.ids, args.per_id)
    report["jpeg_write_s"] = time.perf_counter() - t
    cat = open_dataset("folder", path=tmp / "photos")
    split = build_split(cat, SplitConfig(val_fraction=0.05, test_fraction=0.05, protocol="none"))
    t = time.perf_counter()
    cache = build_image_cache(split, ImageSpec(*args.size), tmp / "cache", workers=min(16, os.cpu_count() or 1))
    report["decode_img_s"] = len(cache) / (time.perf_counter() - t)
    train = split.part("train")
    ids = {s: i for i, s in enumerate(sorted(set(train["identity"].to_list())))}
    labels = np.array([ids[s] for s in train["identity"].to_list()])
    rows = cache.rows(train["image_id"].to_list())
    cfg = make_config(["model.pretrained=null", f"model.backbone={args.backbone}", f"model.input_size={list(args.size)}",
                       "fusion.heads=4" if args.backbone in ("tiny", "micro") else "fusion.heads=8"])
    report["backbone"], report["input_size"] = args.backbone, list(args.size)
    s1_batched, s1_loop = stage1_rates(cfg, rt, num_ids=len(ids), batch=64, seconds=args.seconds)
    report["stage1"] = {"batched_prompts_s": s1_batched, "per_sample_prompts_s": s1_loop, "speedup": s1_batched / s1_loop}
    print(json.dumps(report), flush=True)
    runs = []
    for compile_ in (False, True):
        crt = dataclasses.replace(rt, compile=compile_ and not args.no_compile)
        for method in ("indivaid", "clipreid"):
            for b in args.batches:
                runs.append(stage2_rates(cfg, crt, cache, rows, labels, b, args.seconds, method))
                print(json.dumps(runs[-1]), flush=True)
        if args.no_compile:
            break
    report["stage2"] = runs
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    for r in runs:
        print(f"stage 2 {r['method']:>8} {'compiled' if r['compiled'] else 'eager   '} batch {r['batch']}: "
              f"end-to-end {r['end_to_end_img_s']:.0f} img/s = {100 * r['ratio']:.0f}% of the bare step "
              f"({r['bare_img_s']:.0f}); first step {r['first_step_s']:.1f} s")
    pick = {(r["method"], r["compiled"], r["batch"]): r for r in runs}
    b = max(args.batches)
    for compiled in (False, True):
        ind, clip = pick.get(("indivaid", compiled, b)), pick.get(("clipreid", compiled, b))
        if ind and clip:
            print(f"{'compiled' if compiled else 'eager'} batch {b}: IndivAID end to end = "
                  f"{100 * ind['end_to_end_img_s'] / clip['end_to_end_img_s']:.0f}% of CLIP-ReID")
    ce, ee = pick.get(("indivaid", True, b)), pick.get(("indivaid", False, b))
    if ce and ee:
        print(f"IndivAID batch {b}: compiled end to end {ce['end_to_end_img_s']:.0f} img/s = "
              f"{ce['end_to_end_img_s'] / ee['end_to_end_img_s']:.2f}x eager; compiled bare {ce['bare_img_s']:.0f}")
    print(f"stage 1: {s1_batched:.0f} vs {s1_loop:.0f} prompts/s")
    print(f"speed-up: {report['stage1']['speedup']:.1f}x")


if __name__ == "__main__":
    main()
