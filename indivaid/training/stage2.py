"""Stage 2: fine-tune the image encoder with ID, triplet and image-to-text losses.

The text side is frozen, so every training image's description is computed once after stage 1
(:func:`description_cache`); the fusion module turns them into identity descriptions at every
step. Each epoch reports how far the fusion has moved them from the plain mean
(``fusion_departure``, docs/method.md section 4): the evidence that attention fusion is not just
the mean in disguise.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from indivaid.data.augment import AugmentConfig, train_transform
from indivaid.data.sampler import PKSampler
from indivaid.losses import batch_hard_triplet, cross_entropy_ls, similarity
from indivaid.models.fusion import departure_from_mean, pad_descriptions
from indivaid.training.compiling import maybe_compile
from indivaid.training.config import Stage2Config
from indivaid.training.features import ImageSource
from indivaid.training.run import Run, ScaleHolder, check_finite, wrap_ddp
from indivaid.training.runtime import Runtime
from indivaid.training.schedule import milestone_epochs, warmup_multistep
from indivaid.training.system import ReIDSystem

Descriptions = tuple[Tensor, Tensor]  # (C, N, D) padded descriptions and their (C, N) mask


@torch.no_grad()
def description_cache(run: Run, feats: dict[str, Tensor]) -> Descriptions:
    """After stage 1: what the fusion module fuses, padded per identity with its mask: every training
    image's description, or one plain identity text each (a fusion that is not ``per_image``)."""
    system, rt = run.system, run.rt
    system.eval()
    num_ids = len(run.identities)
    out = []
    with rt.autocast():
        if not system.fusion.per_image:
            for s in range(0, num_ids, 256):
                out.append(system.describe(torch.arange(s, min(num_ids, s + 256), device=rt.device), None, use_meta=False).float())
            return pad_descriptions(torch.cat(out), torch.arange(num_ids, device=rt.device), num_ids)
        v = feats["fproj"][run.train_feature_index].to(rt.device)
        labels = run.train_labels.to(rt.device)
        for s in range(0, len(labels), 256):
            out.append(system.describe(labels[s : s + 256], v[s : s + 256]).float())
    return pad_descriptions(torch.cat(out), labels, num_ids)


def stage2_optimizer(system: ReIDSystem, cfg: Stage2Config, fusion_lr: float) -> torch.optim.Optimizer:
    """Adam over the image encoder and head (biases at ``bias_lr_factor``), and the fusion module at its
    own absolute ``fusion_lr``; every group follows the stage-2 schedule from its ``base_lr``."""
    weights, biases = [], []
    for module in (system.image, system.head):
        for name, p in module.named_parameters():
            if p.requires_grad:
                (biases if name.endswith("bias") else weights).append(p)
    # Few groups, not one per tensor: Adam's multi-tensor (foreach/fused) kernels work per group.
    groups = [{"params": weights, "base_lr": cfg.lr}, {"params": biases, "base_lr": cfg.lr * cfg.bias_lr_factor}]
    if system.fusion is not None:
        groups.append({"params": list(system.fusion.parameters()), "base_lr": fusion_lr})
    for g in groups:
        g["lr"] = g["base_lr"]
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.Adam([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


class Stage2Net(nn.Module):
    """Image encoder + head (+ fusion) as one module, so DDP syncs all their gradients."""

    def __init__(self, system: ReIDSystem, rt: Runtime | None = None) -> None:
        super().__init__()
        self.image, self.head, self.fusion = system.image, system.head, system.fusion
        self.encode = maybe_compile(self._encode, "stage-2 image tower and head", rt is not None and rt.compile,
                                    rt.compile_backend if rt is not None else "inductor")

    def _encode(self, x: Tensor, cams: Tensor | None):
        f = self.image(x, cams)
        return f, self.head(f)

    def forward(self, x: Tensor, cams: Tensor | None, desc: Descriptions):
        f, h = self.encode(x, cams)
        text = self.fusion(*desc)
        return f, h, text


def stage2_losses(system: ReIDSystem, net: nn.Module, x: Tensor, y: Tensor, cams: Tensor | None,
                  desc: Descriptions, cfg: Stage2Config, rt: Runtime) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """Total stage-2 loss and its (ID, triplet, image-to-text) terms for one augmented batch."""
    with rt.autocast():
        f, h, text = net(x, cams, desc)
    l_id = cross_entropy_ls(h.logits_f12, y, cfg.label_smoothing) + cross_entropy_ls(h.logits_fproj, y, cfg.label_smoothing)
    l_tri = torch.stack([batch_hard_triplet(t, y, cfg.margin) for t in (f.f11, f.f12, f.fproj)]).sum()
    l_i2t = cross_entropy_ls(similarity(f.fproj, text, cosine=system.cosine, scale=system.scale), y, cfg.label_smoothing)
    loss = cfg.id_weight * l_id + cfg.triplet_weight * l_tri + cfg.i2t_weight * l_i2t
    return loss, (l_id, l_tri, l_i2t)


class Stage2Stepper:
    """The stage-2 optimisation step over device-resident batches (shared with the GPU benchmark)."""

    def __init__(self, system: ReIDSystem, net: nn.Module, opt: torch.optim.Optimizer, source: ImageSource,
                 labels: Tensor, sie: Tensor | None, desc: Descriptions, cfg: Stage2Config, rt: Runtime,
                 aug: AugmentConfig = AugmentConfig()) -> None:
        self.system, self.net, self.opt, self.source = system, net, opt, source
        self.labels, self.sie, self.desc, self.cfg, self.rt = labels, sie, desc, cfg, rt
        self.aug = aug

    def step(self, x: Tensor, y: Tensor, cams: Tensor | None) -> Tensor:
        """One optimiser step on an augmented batch; returns the (ID, triplet, i2t) terms, detached."""
        loss, terms = stage2_losses(self.system, self.net, x, y, cams, self.desc, self.cfg, self.rt)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return torch.stack([t.detach() for t in terms])

    def run(self, batches: Tensor, gen: torch.Generator) -> Tensor:
        """Steps over ``batches`` (rows of training-image indices on the device); summed loss terms."""
        sums = torch.zeros(3, device=self.rt.device)
        for idx in batches:
            x = train_transform(self.source(idx), self.aug, gen)
            sums += self.step(x, self.labels[idx], self.sie[idx] if self.sie is not None else None)
        return sums


def _restore(system: ReIDSystem, opt: torch.optim.Optimizer, state: dict) -> int:
    """Load a stage-2 checkpoint into the modules and optimiser; the epoch to continue from."""
    for name in ("image", "head", "fusion", "prompt"):
        if getattr(system, name) is not None:
            getattr(system, name).load_state_dict(state["modules"][name])
    system.logit_scale.data.copy_(state["modules"]["scale"]["logit_scale"])
    opt.load_state_dict(state["optimizer"])
    return int(state["epoch"])


def stage2(run: Run, feats: dict[str, Tensor], state: dict | None, finish: Callable[[], None] | None = None) -> int:
    """Fine-tune the image encoder; ``finish`` writes the run's results just before the last report."""
    cfg, rt, system = run.cfg.stage2, run.rt, run.system
    for p in system.prompt.parameters():
        p.requires_grad_(False)
    system.logit_scale.requires_grad_(False)
    opt = stage2_optimizer(system, cfg, run.cfg.fusion.lr)
    start = _restore(system, opt, state) if state is not None and state["stage"] == 2 else 0
    desc = description_cache(run, feats)  # after any restore: it depends on the prompt weights
    if not run.scores_val:
        run.validate()  # NaN scores: no stale zero-shot ones in the stage-2 rows of a run trained on validation
    system.train()
    net = wrap_ddp(Stage2Net(system, rt), rt)
    sampler = PKSampler(run.train_labels.numpy(), cfg.batch_p, cfg.batch_k, seed=run.cfg.runtime.seed + 1,
                        rank=rt.rank, world_size=rt.world_size)
    sie = run.train_sie
    stepper = Stage2Stepper(system, net, opt, ImageSource(run.images, run.train_rows, rt.device),
                            run.train_labels.to(rt.device), sie.to(rt.device) if sie is not None else None,
                            desc, cfg, rt, run.cfg.augment)
    milestones = milestone_epochs(cfg.milestones, cfg.milestone_unit, cfg.epochs)
    for epoch in range(start, cfg.epochs):
        factor = warmup_multistep(epoch, cfg.warmup_epochs, cfg.warmup_factor, milestones, cfg.gamma)
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor
        batches = run.epoch_batches(sampler, epoch)
        gen = torch.Generator(device=rt.device).manual_seed(run.cfg.runtime.seed * 100_003 + epoch * 7919 + rt.rank)
        t0 = time.perf_counter()
        sums = stepper.run(batches, gen)
        means = (sums / max(1, len(batches))).tolist()  # the epoch's one sync with the device
        ips = batches.numel() * rt.world_size / max(1e-9, time.perf_counter() - t0)
        run.images_per_s = ips
        check_finite(dict(zip(("id", "triplet", "i2t"), means)), 2, epoch)
        losses = dict(zip(("loss_id", "loss_triplet", "loss_i2t_s2"), means))
        departure = departure_from_mean(system.fusion, *desc)  # every rank holds the same (synced) fusion
        done = epoch + 1
        if run.scores_val and (done % run.cfg.eval.every == 0 or done == cfg.epochs):
            run.validate()
        path = None
        if run.checkpoint_due(done, cfg.epochs, final_too=False):  # the last epoch writes results instead
            mods = {"image": system.image, "head": system.head, "prompt": system.prompt, "scale": ScaleHolder(system)}
            if system.fusion is not None:
                mods["fusion"] = system.fusion
            path = run.save_train_state(2, done, mods, opt)
        loss = cfg.id_weight * losses["loss_id"] + cfg.triplet_weight * losses["loss_triplet"] + cfg.i2t_weight * losses["loss_i2t_s2"]
        run.report({"stage": 2, "epoch": done, "s2_epoch": done, "loss": loss, **losses, "lr": cfg.lr * factor,
                    "steps": len(batches), "images_per_s": ips, "fusion_departure": departure, **run.last_val}, path,
                   before_send=finish if done == cfg.epochs else None)
    return cfg.epochs
