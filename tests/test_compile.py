"""runtime.compile: the compiled stage-2 step matches the eager one, and a failed compile falls back."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from indivaid.config import apply_overrides
from indivaid.methods import METHODS
from indivaid.models.fusion import pad_descriptions
from indivaid.training.compiling import CompiledOrEager
from indivaid.training.config import resolve
from indivaid.training.runtime import Runtime
from indivaid.training.stage2 import Stage2Net, stage2_losses
from indivaid.training.system import ReIDSystem


State = dict[str, torch.Tensor]


def _steps(compile_: bool, backend: str, n: int = 3) -> tuple[list[float], State, State, Stage2Net]:
    """``n`` SGD steps of stage 2 (tiny model, fixed data): losses, image weights before and after."""
    cfg = resolve(apply_overrides({"method": "indivaid"}, ["preset=tiny"]))
    rt = Runtime(torch.device("cpu"), None, compile=compile_, compile_backend=backend)
    torch.manual_seed(0)
    system = ReIDSystem(cfg, METHODS.get("indivaid"), 8, 0, "tiger").train()
    for p in system.prompt.parameters():
        p.requires_grad_(False)
    system.logit_scale.requires_grad_(False)
    labels = torch.arange(8).repeat_interleave(3)
    desc = pad_descriptions(torch.randn(len(labels), system.image.embed_dim), labels, 8)
    init = {k: v.detach().clone() for k, v in system.image.state_dict().items()}
    net = Stage2Net(system, rt)
    # plain SGD: Adam's normalised steps turn rounding-level gradient differences into lr-sized moves
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.05)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(n):  # full P x K batches: one shape, one compile
        y = torch.arange(8).repeat_interleave(2)
        x = torch.randn(16, 3, *cfg.model.input_size, generator=gen)
        loss, _ = stage2_losses(system, net, x, y, None, desc, cfg.stage2, rt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    params = {k: v.detach().clone() for k, v in system.image.state_dict().items()}
    return losses, init, params, net


@pytest.mark.timeout(600)
@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile's CPU backend needs a C++ compiler")
def test_compiled_stage2_steps_match_eager():
    eager_losses, init, eager_params, _ = _steps(False, "inductor")
    losses, _, params, net = _steps(True, "inductor")
    assert isinstance(net.encode, CompiledOrEager) and net.encode.active and net.encode.compile_s is not None
    assert losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)
    moved = 0
    for k, v in eager_params.items():
        assert torch.allclose(params[k], v, rtol=1e-4, atol=1e-6), k
        moved += int(not torch.equal(v, init[k]))
    assert moved > len(eager_params) // 2  # most tensors trained: equal parameters mean equal updates
    assert eager_losses[-1] != eager_losses[0]  # the steps trained something: the comparison means something


def test_failed_compile_falls_back_to_eager_with_one_warning(caplog: pytest.LogCaptureFixture):
    calls = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return x * 2

    wrapped = CompiledOrEager(fn, "test function", backend="no-such-backend")
    with caplog.at_level(logging.WARNING, logger="indivaid.training.compiling"):
        assert torch.equal(wrapped(torch.ones(2)), torch.full((2,), 2.0))
        assert torch.equal(wrapped(torch.ones(2)), torch.full((2,), 2.0))
    assert not wrapped.active
    assert sum("running eagerly instead" in r.message for r in caplog.records) == 1
