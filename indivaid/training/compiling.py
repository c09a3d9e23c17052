"""``runtime.compile``: torch.compile for the hot path of stage 2, falling back to eager on failure.

Only the image tower and head are compiled. Stage-2 batches are always full P x K batches
(:func:`indivaid.training.run.Run.epoch_batches` drops none and pads none), so the compiled graph
sees one shape for the whole run and never recompiles per epoch; evaluation calls the eager
modules, whose batch sizes vary. Parameters are shared with the eager modules, so checkpoints,
resume and DDP see the same tensors whether compiled or not.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)


class CompiledOrEager:
    """Calls ``fn`` through ``torch.compile`` (compiled on the first call, which is timed and logged);
    if compiling fails, warns once and runs ``fn`` eagerly from then on."""

    def __init__(self, fn: Callable[..., Any], name: str, backend: str = "inductor") -> None:
        self.fn, self.name, self.backend = fn, name, backend
        self.compile_s: float | None = None
        self.compiled: Callable[..., Any] | None = None
        try:
            self.compiled = torch.compile(fn, backend=backend)
        except Exception as e:  # noqa: BLE001 - e.g. an unknown backend: the run goes on eagerly
            self._fall_back(e)

    def _fall_back(self, e: Exception) -> None:
        log.warning("torch.compile (%s) of the %s failed, running eagerly instead: %s: %s",
                    self.backend, self.name, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        self.compiled = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is None:
            return self.fn(*args, **kwargs)
        if self.compile_s is not None:  # compiled already
            return self.compiled(*args, **kwargs)
        t0 = time.perf_counter()
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any compiler failure: the run goes on eagerly
            self._fall_back(e)
            return self.fn(*args, **kwargs)
        self.compile_s = time.perf_counter() - t0
        log.info("compiled the %s with torch.compile (%s) in %.1f s (first step, forward)",
                 self.name, self.backend, self.compile_s)
        return out

    @property
    def active(self) -> bool:
        """Whether calls go through the compiled graph (False after a fallback to eager)."""
        return self.compiled is not None


def maybe_compile(fn: Callable[..., Any], name: str, enabled: bool, backend: str = "inductor") -> Callable[..., Any]:
    """``fn`` itself when compiling is off, else a :class:`CompiledOrEager` around it."""
    return CompiledOrEager(fn, name, backend) if enabled else fn
