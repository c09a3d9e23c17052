"""Stage 1: learn each identity's text description (prompt tokens, and the Meta-Net for IndivAID)
against the frozen image features, with the two-way supervised contrastive loss.

Both towers are frozen, so batches come from the frozen-feature cache and never decode an image.
The run records every step's loss and learning rate; at the end of stage 1 it reports whether the
loss had levelled off (:func:`plateau`), because a too-short stage 1 is the usual reason a GPU run
falls short of the published one (docs/method.md section 3).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from indivaid.data.sampler import PKSampler
from indivaid.losses import supcon_two_way
from indivaid.training.run import NAN, Run, ScaleHolder, check_finite, wrap_ddp
from indivaid.training.runtime import Runtime
from indivaid.training.schedule import cosine_with_warmup
from indivaid.training.system import ReIDSystem

#: The last fraction of stage 1's learning (its summed learning rate) whose loss trend is measured.
PLATEAU_TAIL = 0.1
#: ``stage1_plateau`` holds when that last tenth of the learning lowered the loss by less than this
#: fraction of stage 1's whole decrease (a loss still falling as fast as on average gives about -0.11).
PLATEAU_TOLERANCE = 0.02


def stage1_losses(system: ReIDSystem, prompt: nn.Module, y: Tensor, v: Tensor, rt: Runtime) -> tuple[Tensor, Tensor]:
    """(L_i2t, L_t2i) of one P x K batch of cached image features ``v`` with labels ``y``."""
    with rt.autocast():
        if system.prompt.meta_net is not None:
            emb, eot = prompt(y, v)
            t = system.text(emb, eot)
        else:  # identity text does not depend on the image: encode each identity once
            uniq, inv = torch.unique(y, return_inverse=True)
            emb, eot = prompt(uniq)
            t = system.text(emb, eot)[inv]
    return supcon_two_way(v, t, y, cosine=system.cosine, scale=system.scale)


def loss_slope(losses: Sequence[float], lrs: Sequence[float], tail: float = PLATEAU_TAIL) -> float:
    """How much stage 1's last ``tail`` of learning still lowered the loss, as a fraction of the whole
    stage's decrease: the least-squares slope of loss against cumulative lr over the steps that carried
    the last ``tail`` of the summed lr, times that lr, over (mean loss of the first ``tail`` of it minus
    mean loss of the last). About -tail / (1 - tail) while the loss falls in proportion to the learning
    done (far from a plateau), about 0 once it has levelled off, positive when it rises at the end.

    Why weighted by the lr: stage 1's cosine schedule runs its last tenth of *steps* below 3 % of the
    base lr, where any loss looks flat. Why over the stage's decrease, not the loss level: the
    contrastive loss has a high floor (log of the batch's identities), so changes are small beside it.
    The tail takes at least the last three steps. NaN with fewer than four steps, or when the loss
    did not fall over the stage at all.
    """
    lr = torch.tensor(lrs, dtype=torch.float64)
    y = torch.tensor(losses, dtype=torch.float64)
    if len(y) < 4 or not float(lr.sum()) > 0:
        return NAN
    cum = torch.cumsum(lr, 0)
    last = cum > (1 - tail) * cum[-1]
    last[-3:] = True  # at least three points to fit a trend to
    first = cum <= tail * cum[-1]
    first[0] = True
    drop = float(y[first].mean() - y[last].mean())
    x, tail_y = cum[last], y[last]
    dx = x - x.mean()
    if not drop > 0 or not float((dx * dx).sum()) > 0:
        return NAN
    slope = float((dx * (tail_y - tail_y.mean())).sum() / (dx * dx).sum())
    return slope * float(lr[last].sum()) / drop


def plateau(steps: Sequence[tuple[float, float]]) -> dict[str, float]:
    """The report's stage-1 convergence keys from every step's (loss, lr)."""
    slope = loss_slope([s[0] for s in steps], [s[1] for s in steps]) if steps else NAN
    reached = NAN if math.isnan(slope) else float(slope > -PLATEAU_TOLERANCE)
    return {"stage1_loss_slope": slope, "stage1_plateau": reached}


def stage1_epochs(sampler_len: int, epochs: int, min_steps: int) -> int:
    """Stage 1's epochs: ``epochs``, raised to reach ``min_steps`` optimiser steps (docs/method.md section 3)."""
    return epochs if min_steps == 0 else max(epochs, math.ceil(min_steps / max(1, sampler_len)))


def stage1(run: Run, feats: dict[str, Tensor], zs_val: dict[str, float], state: dict | None) -> int:
    cfg, rt, system = run.cfg.stage1, run.rt, run.system
    prompt = system.prompt
    assert prompt is not None
    v = feats["fproj"][run.train_feature_index].to(rt.device)
    labels = run.train_labels.to(rt.device)
    sampler = PKSampler(run.train_labels.numpy(), cfg.batch_p, cfg.batch_k, seed=run.cfg.runtime.seed,
                        rank=rt.rank, world_size=rt.world_size)
    epochs = stage1_epochs(len(sampler), cfg.epochs, cfg.min_steps)
    params = [p for p in prompt.parameters() if p.requires_grad] + ([system.logit_scale] if system.logit_scale.requires_grad else [])
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if state is not None and state["stage"] == 1:
        prompt.load_state_dict(state["modules"]["prompt"])
        system.logit_scale.data.copy_(state["modules"]["scale"]["logit_scale"])
        opt.load_state_dict(state["optimizer"])
        start = state["epoch"]
    model = wrap_ddp(prompt, rt)
    for epoch in range(start, epochs):
        lr = cosine_with_warmup(epoch, epochs, cfg.warmup_epochs, cfg.lr, cfg.lr_min, cfg.warmup_lr_init)
        for group in opt.param_groups:
            group["lr"] = lr
        batches = run.epoch_batches(sampler, epoch)
        terms = torch.zeros(len(batches), 2, device=rt.device)
        t0 = time.perf_counter()
        for i, idx in enumerate(batches):
            i2t, t2i = stage1_losses(system, model, labels[idx], v[idx], rt)
            opt.zero_grad(set_to_none=True)
            (i2t + t2i).backward()
            opt.step()
            terms[i, 0], terms[i, 1] = i2t.detach(), t2i.detach()
        terms = terms.cpu()  # the epoch's one sync with the device
        means = (terms.sum(0) / max(1, len(batches))).tolist()
        check_finite({"i2t": means[0], "t2i": means[1]}, 1, epoch)
        run.stage1_steps += [(s, lr) for s in terms.sum(1).tolist()]
        losses = {"loss_i2t": means[0], "loss_t2i": means[1]}
        run.last_val = zs_val
        done = epoch + 1
        if done == epochs:  # rank 0's steps decide, so that every rank reports the same
            run.diagnostics = run.broadcast(plateau(run.stage1_steps))
        path = None
        if run.checkpoint_due(done, epochs, final_too=True):  # stage 1's end too: stage 2 resumes without it
            path = run.save_train_state(1, done, {"prompt": prompt, "scale": ScaleHolder(system)}, opt)
        ips = batches.numel() * rt.world_size / max(1e-9, time.perf_counter() - t0)
        run.report({"stage": 1, "epoch": done, "s2_epoch": 0, "loss": means[0] + means[1], **losses, "lr": lr,
                    "steps": len(batches), "images_per_s": ips, **zs_val}, path)
    return epochs
