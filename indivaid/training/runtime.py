"""Device, precision, seeding and distributed context, resolved once per run."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from indivaid.training.config import RuntimeConfig


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: full fp32
    rank: int = 0
    world_size: int = 1
    compile: bool = False  # torch.compile the stage-2 image tower and head
    compile_backend: str = "inductor"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def resolve_runtime(cfg: RuntimeConfig) -> Runtime:
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    if cfg.device == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count())))
            device = torch.device("cuda", local)
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            device = torch.device("mps")
        else:
            device = torch.device("cpu")
    else:
        device = torch.device(cfg.device)
    if device.type == "cuda":
        if device.index is None:  # "cuda": this rank's GPU (set_device needs an index on some torch versions)
            local = os.environ.get("LOCAL_RANK")
            device = torch.device("cuda", int(local) if local is not None and world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(device)
    use_bf16 = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    compile_ = device.type == "cuda" if cfg.compile is None else cfg.compile
    return Runtime(device, torch.bfloat16 if use_bf16 else None, rank, world, compile_, cfg.compile_backend)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed every generator and set the determinism switches both ways: one process may run several
    runs in turn (a sweep hands a trial's process to the next trial), and none may inherit another's."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = False
