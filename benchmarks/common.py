"""Shared pieces of the benchmark scripts (run from the repo root; no Ray)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from indivaid.config import apply_overrides  # noqa: E402
from indivaid.methods import METHODS  # noqa: E402
from indivaid.training.config import TrainConfig, resolve  # noqa: E402
from indivaid.training.runtime import Runtime  # noqa: E402
from indivaid.training.system import ReIDSystem  # noqa: E402
from indivaid.training.stage1 import stage1_losses  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn: Callable[[], int], device: torch.device, seconds: float, warmup: int = 2) -> float:
    """Items per second of ``fn`` (which returns how many items it processed), after warm-up."""
    for _ in range(warmup):
        fn()
    sync(device)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += fn()
    sync(device)
    return n / (time.perf_counter() - t0)


def make_config(overrides: list[str]) -> TrainConfig:
    return resolve(apply_overrides({"method": "indivaid"}, overrides))


def stage1_rates(cfg: TrainConfig, rt: Runtime, num_ids: int, batch: int, seconds: float) -> tuple[float, float]:
    """Prompts/s of the batched stage-1 step and of a per-sample loop at batch 1 (the public code)."""
    system = ReIDSystem(cfg, METHODS.get(cfg.method), num_ids, 0, "tiger").to(rt.device)
    prompt = system.prompt
    opt = torch.optim.Adam([p for p in prompt.parameters() if p.requires_grad], lr=1e-4)
    y = torch.arange(batch, device=rt.device) % num_ids
    v = torch.randn(batch, system.image.embed_dim, device=rt.device)

    def batched() -> int:
        i2t, t2i = stage1_losses(system, prompt, y, v, rt)
        opt.zero_grad(set_to_none=True)
        (i2t + t2i).backward()
        opt.step()
        return batch

    def per_sample() -> int:
        for i in range(batch):  # one prompt built, encoded and stepped at a time
            i2t, t2i = stage1_losses(system, prompt, y[i : i + 1], v[i : i + 1], rt)
            opt.zero_grad(set_to_none=True)
            (i2t + t2i).backward()
            opt.step()
        return batch

    return rate(batched, rt.device, seconds), rate(per_sample, rt.device, seconds, warmup=1)
