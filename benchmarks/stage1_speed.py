"""Stage-1 prompt training: batched P x K step vs the public code's per-sample loop (CPU, tiny preset).

    python benchmarks/stage1_speed.py [--seconds 8]

Last line: ``speed-up: N.Nx`` (prompts/s batched / per-sample), both measured in this run.
"""

from __future__ import annotations

import argparse

import torch
from common import make_config, stage1_rates

from indivaid.training.runtime import Runtime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = make_config(["preset=tiny"])
    rt = Runtime(torch.device("cpu"), None)
    batched, loop = stage1_rates(cfg, rt, num_ids=100, batch=args.batch, seconds=args.seconds)
    print(f"tiny preset, CPU ({torch.get_num_threads()} threads), batch {args.batch}")
    print(f"batched step:     {batched:8.1f} prompts/s")
    print(f"per-sample loop:  {loop:8.1f} prompts/s")
    print(f"speed-up: {batched / loop:.1f}x")


if __name__ == "__main__":
    main()
