"""``train(cfg, workdir=..., report=...)``: the two-stage IndivAID / CLIP-ReID trainer.

Stage 1 trains the prompts (and Meta-Net) contrastively against frozen image features computed
once and cached. Stage 2 caches every training image's description, fuses them per identity each
step, and fine-tunes the image encoder with ID, triplet and image-to-text losses. The process can
be killed at any instant: it resumes from the last checkpoint in ``workdir`` with the same result.
Validation identities select models; the test split is touched only in the final summary.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
import torch.distributed as dist
from torch import Tensor, nn

from indivaid.config import to_dict
from indivaid.data import build_split, open_dataset, read_split, validate_catalogue, write_split
from indivaid.data.augment import AugmentConfig, normalize, train_transform
from indivaid.data.imagecache import PREPROCESS_VERSION, ImageCache, ImageSpec, build_image_cache
from indivaid.data.sampler import PKSampler
from indivaid.data.split import Split
from indivaid.eval.metrics import RankMetrics
from indivaid.eval.openset import Calibration
from indivaid.eval.retrieval import score_retrieval
from indivaid.losses import batch_hard_triplet, cross_entropy_ls, similarity, supcon_two_way
from indivaid.methods import METHODS, MethodSpec
from indivaid.models.fusion import pad_descriptions
from indivaid.models.head import inference_feature
from indivaid.training import checkpoint as ckpt
from indivaid.training.config import Stage2Config, TrainConfig
from indivaid.training.openset import calibrate_run
from indivaid.training.runtime import Runtime, resolve_runtime, seed_everything
from indivaid.training.schedule import cosine_with_warmup, milestone_epochs, warmup_multistep
from indivaid.training.system import ReIDSystem
from indivaid.utils.io import atomic_write_text, data_root, file_lock, sha256_file, stable_hash

log = logging.getLogger(__name__)

Report = Callable[..., None]
#: Every report carries exactly these keys (NaN where a stage has no such value).
REPORT_KEYS = ("stage", "epoch", "s2_epoch", "loss", "loss_i2t", "loss_t2i", "loss_id", "loss_triplet",
               "loss_i2t_s2", "lr", "steps", "images_per_s", "max_mem_gb", "val_mAP", "val_rank1", "val_rank5",
               "val_rank10", "val_mINP")
NAN = float("nan")


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, incompatible checkpoint); the message says where."""


@dataclass
class RunResult:
    workdir: str
    method: str
    dataset: str
    split_hash: str
    seed: int
    val: dict[str, float]
    test: dict[str, float] | None
    zeroshot_val: dict[str, float]
    stage1_epochs: int
    stage2_epochs: int
    wall_s: float
    images_per_s: float
    checkpoint: str
    history: list[dict[str, float]] = field(default_factory=list)
    config_hash: str = ""  # a restarted run with this config and a result.json does not train again


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def prepare_split(cfg: TrainConfig, workdir: Path) -> Split:
    """The run's split: from ``data.split_file`` or built from the dataset; copied into workdir."""
    d = cfg.data
    if d.split_file:
        split = read_split(d.split_file)
    else:
        cat = open_dataset(d.dataset, d.path, d.data_root, **d.options)
        cat = validate_catalogue(cat, decode=False, skip_bad=d.skip_bad)
        split = build_split(cat, d.split)
    write_split(split, workdir / "split.csv")
    return split


def cache_root(cfg: TrainConfig) -> Path:
    return Path(cfg.data.cache_dir).expanduser().resolve() if cfg.data.cache_dir else data_root(cfg.data.data_root) / "cache"


class ImageSource:
    """uint8 batches on the training device; small sets live on the GPU whole (no host copies)."""

    def __init__(self, cache: ImageCache, rows: np.ndarray, device: torch.device, device_budget_gb: float = 8.0) -> None:
        self.cache, self.rows, self.device = cache, rows, device
        nbytes = len(rows) * int(np.prod(cache.array.shape[1:]))
        self.resident = cache[rows].to(device) if device.type == "cuda" and nbytes <= device_budget_gb * 2**30 else None

    def __call__(self, idx: np.ndarray | Tensor) -> Tensor:
        if self.resident is not None:
            return self.resident[torch.as_tensor(idx).to(self.device)]
        if isinstance(idx, Tensor):
            idx = idx.cpu().numpy()
        batch = self.cache[self.rows[idx]]
        if self.device.type == "cuda":
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)


def weights_id(cfg: TrainConfig) -> str:
    """What the frozen image weights are: an open_clip tag, a file hash, or the random-init seed."""
    pre = cfg.model.pretrained
    if pre is None:
        return f"random-seed{cfg.runtime.seed}"
    path = Path(pre).expanduser()
    return f"file-{sha256_file(path)[:16]}" if path.is_file() else f"tag-{pre}"


@torch.no_grad()
def image_features(system: ReIDSystem, source: Callable[[np.ndarray], Tensor], n: int, rt: Runtime, batch: int,
                   cameras: Tensor | None = None, *, after_bn: bool = False, part_norm: bool = False,
                   aug: AugmentConfig = AugmentConfig()) -> Tensor:
    """Inference features (concat f12, fproj; fp32) of ``n`` images, in eval mode."""
    was_training = system.training
    system.eval()
    out = []
    for s in range(0, n, batch):
        idx = np.arange(s, min(n, s + batch))
        x = normalize(source(idx), aug)
        cams = cameras[idx].to(rt.device) if cameras is not None else None
        with rt.autocast():
            f = system.image(x, cams)
        out.append(inference_feature(f, system.head, after_bn=after_bn, part_norm=part_norm))
    system.train(was_training)
    return torch.cat(out)


def feature_cache_path(cfg: TrainConfig, split: Split, rt: Runtime) -> Path:
    """Where the frozen-encoder features of this split, backbone, weights and preprocessing live."""
    m = cfg.model
    key = stable_hash({"split": split.hash, "backbone": m.backbone, "weights": weights_id(cfg), "size": list(m.input_size),
                       "stride": m.stride, "sie": m.sie, "dtype": str(rt.amp_dtype), "resize": cfg.data.resize,
                       "preprocess": PREPROCESS_VERSION, "quick_gelu": m.quick_gelu,
                       "normalize": [list(cfg.augment.mean), list(cfg.augment.std)]})
    return cache_root(cfg) / f"features-{key}.pt"


def frozen_feature_cache(system: ReIDSystem, cfg: TrainConfig, split: Split, images: ImageCache, rt: Runtime,
                         origin: str = "train") -> dict[str, Tensor]:
    """Frozen-encoder features of every image of the split (computed once per key, then loaded).

    Each computation appends a line (key, images, seconds, host, pid, ``origin``) to
    ``features.jsonl`` beside the cache: the provenance of the file, and how often it was made.
    """
    path = feature_cache_path(cfg, split, rt)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    with file_lock(path.with_name(f".{path.name}.lock")):  # concurrent trials compute it once
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True)
        t0 = time.perf_counter()
        feats = _compute_frozen_features(system, cfg, split, images, rt, path)
        entry = {"file": path.name, "split": split.hash, "images": len(feats["image_ids"]), "origin": origin,
                 "seconds": round(time.perf_counter() - t0, 3), "host": socket.gethostname(), "pid": os.getpid(),
                 "time": time.time()}
        with open(path.parent / "features.jsonl", "a") as f:  # one short O_APPEND write per line
            f.write(json.dumps(entry) + "\n")
        return feats


def _compute_frozen_features(system: ReIDSystem, cfg: TrainConfig, split: Split, images: ImageCache, rt: Runtime,
                             path: Path) -> dict[str, Tensor]:
    rows = images.rows(split.table["image_id"].to_list())
    # Before BN and unnormalised, the inference feature is exactly concat(f12, fproj).
    both = image_features(system, ImageSource(images, rows, rt.device, 0), len(rows), rt, cfg.eval.batch_size,
                          aug=cfg.augment).cpu()
    f12, fproj = both.split([system.image.width, system.image.embed_dim], dim=1)
    feats = {"f12": f12.contiguous(), "fproj": fproj.contiguous(), "image_ids": split.table["image_id"].to_list()}
    ckpt.save(feats, path)  # atomic: ranks that computed it too write the same bytes
    log.info("cached frozen image features of %d images: %s", len(rows), path.name)
    return feats


def warm_caches(cfg: TrainConfig) -> Path:
    """Build the split, the uint8 image cache and the frozen-feature cache of ``cfg`` without training,
    so that every run sharing them only loads them (the sweep harness runs this once per key)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="indivaid-warm-") as tmp:
        run = Run(cfg, Path(tmp), None)
        frozen_feature_cache(run.system, cfg, run.split, run.images, run.rt, origin="warm")
        return feature_cache_path(cfg, run.split, run.rt)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def score_features(feats: Tensor, split: Split, stage: str, row_index: dict[str, int], cfg: TrainConfig) -> RankMetrics:
    q, g = split.query_gallery(stage)  # type: ignore[arg-type]
    qi = torch.tensor([row_index[i] for i in q["image_id"].to_list()])
    gi = torch.tensor([row_index[i] for i in g["image_id"].to_list()])
    return score_retrieval(feats[qi.to(feats.device)], feats[gi.to(feats.device)], q, g, protocol=split.protocol,
                           camera_codes=split.camera_codes(), metric=cfg.eval.metric, normalize=True)


def val_keys(metrics: dict[str, float]) -> dict[str, float]:
    """The report's ``val_*`` keys from a plain metrics dict (``{}`` on ranks that do not score)."""
    return {k: v for k, v in ((f"val_{k}", metrics.get(k)) for k in ("mAP", "rank1", "rank5", "rank10", "mINP")) if v is not None}


def plain(m: RankMetrics) -> dict[str, float]:
    return {k: float(v) for k, v in m.as_dict().items()}


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


class Run:
    """State shared by the stages of one training run."""

    def __init__(self, cfg: TrainConfig, workdir: Path, report: Report | None) -> None:
        self.cfg, self.workdir, self.user_report = cfg, workdir, report
        self.method: MethodSpec = METHODS.get(cfg.method)
        self.rt = resolve_runtime(cfg.runtime)
        seed_everything(cfg.runtime.seed, cfg.runtime.deterministic)
        workdir.mkdir(parents=True, exist_ok=True)
        self.split = prepare_split(cfg, workdir)
        self.images = build_image_cache(self.split, ImageSpec(*cfg.model.input_size, cfg.data.resize), cache_root(cfg),
                                        workers=cfg.data.workers)
        self.cam_codes = self.split.camera_codes()
        train = self.split.part("train")
        self.identities = self.split.train_identities()
        id_code = {s: i for i, s in enumerate(self.identities)}
        self.train_labels = torch.tensor([id_code[s] for s in train["identity"].to_list()])
        self.train_rows = self.images.rows(train["image_id"].to_list())
        # Cameras unseen in training map to the zero SIE row (index = number of training cameras).
        train_cams = sorted(set(train["camera"].to_list()))
        self.sie_codes = {c: i for i, c in enumerate(train_cams)}
        self.system = ReIDSystem(cfg, self.method, len(self.identities), len(train_cams), self.split.species,
                                 str(cache_root(cfg) / "weights")).to(self.rt.device)
        self.row_index = {im: i for i, im in enumerate(self.split.table["image_id"].to_list())}
        # Rows of the training images in the frozen-feature cache (which follows the split table).
        self.train_feature_index = torch.tensor([self.row_index[i] for i in train["image_id"].to_list()])
        self.history: list[dict[str, float]] = []
        self.last_val: dict[str, float] = {}
        self.val_metrics: dict[str, float] = {}  # the last validation score in full (main rank)
        self.images_per_s = NAN

    def _sie_codes(self, rows: pl.DataFrame) -> Tensor | None:
        if not self.cfg.model.sie:
            return None
        unseen = len(self.sie_codes)
        return torch.tensor([self.sie_codes.get(c, unseen) for c in rows["camera"].to_list()])

    # -- reporting / checkpoints -------------------------------------------------------------

    def report(self, values: dict[str, float], checkpoint_path: str | None = None,
               before_send: Callable[[], None] | None = None) -> None:
        """Record one epoch's row, then hand it to the caller's callback. ``before_send`` runs in
        between: the last epoch writes the run's results there, so that a scheduler stopping the
        run at its final report (ASHA's top rung) stops a finished run."""
        if self.rt.device.type == "cuda":  # peak accelerator memory so far (preflights size GPUs with it)
            values = {**values, "max_mem_gb": torch.cuda.max_memory_allocated(self.rt.device) / 2**30}
        row = {k: float(values.get(k, NAN)) for k in REPORT_KEYS}
        self.history.append(row)
        if before_send is not None:
            before_send()
        if self.user_report is not None:
            self.user_report(row, checkpoint=checkpoint_path)

    @property
    def ckpt_path(self) -> Path:
        return self.workdir / "checkpoint.pt"

    def config_hash(self) -> str:
        return stable_hash(to_dict(self.cfg))

    def save_train_state(self, stage: int, epoch: int, modules: dict[str, nn.Module], opt: torch.optim.Optimizer) -> str | None:
        if not self.rt.is_main:
            return None
        state = {"format": ckpt.TRAIN_FORMAT, "config_hash": self.config_hash(), "split_hash": self.split.hash,
                 "stage": stage, "epoch": epoch, "modules": {k: m.state_dict() for k, m in modules.items()},
                 "optimizer": opt.state_dict(), "rng": ckpt.rng_state(), "history": self.history,
                 "last_val": self.last_val}
        ckpt.save(state, self.ckpt_path)
        entry = {"stage": stage, "epoch": epoch, "bytes": self.ckpt_path.stat().st_size, "time": time.time()}
        with open(self.workdir / "checkpoints.jsonl", "a") as f:  # what was written, for the disk budget
            f.write(json.dumps(entry) + "\n")
        return str(self.ckpt_path)

    def checkpoint_due(self, done: int, last: int, *, final_too: bool) -> bool:
        """Whether epoch ``done`` (1-based) of a stage ending at ``last`` saves resumable state."""
        every = self.cfg.checkpoint.every
        return every > 0 and (done % every == 0 or (final_too and done == last)) and (final_too or done < last)

    def load_train_state(self) -> dict[str, Any] | None:
        if not self.ckpt_path.is_file():
            return None
        state = ckpt.load(self.ckpt_path, ckpt.TRAIN_FORMAT)
        if state["config_hash"] != self.config_hash() or state["split_hash"] != self.split.hash:
            raise TrainingError(f"{self.ckpt_path} was written by a different config or split; "
                                "use a fresh workdir (or delete the checkpoint to start over)")
        self.history = list(state["history"])
        self.last_val = dict(state["last_val"])
        ckpt.set_rng_state(state["rng"])  # batches and augmentations are seeded per epoch; this covers the rest
        log.info("resuming from %s (stage %d, epoch %d)", self.ckpt_path, state["stage"], state["epoch"])
        return state

    # -- evaluation ---------------------------------------------------------------------------

    def stage_features(self, stage: str) -> tuple[Tensor, dict[str, int]]:
        """The current encoder's inference features of a stage's query and gallery images, and the
        row of each image id."""
        q, g = self.split.query_gallery(stage)  # type: ignore[arg-type]
        need = pl.concat([q, g]).unique("image_id", maintain_order=True)
        src = ImageSource(self.images, self.images.rows(need["image_id"].to_list()), self.rt.device, 0)
        ev = self.cfg.eval
        feats = image_features(self.system, src, need.height, self.rt, ev.batch_size, self._sie_codes(need),
                               after_bn=ev.after_bn, part_norm=ev.part_norm, aug=self.cfg.augment)
        return feats, {im: i for i, im in enumerate(need["image_id"].to_list())}

    def evaluate(self, stage: str) -> RankMetrics:
        """Score the current image encoder on the validation or test split (main rank computes)."""
        feats, index = self.stage_features(stage)
        return score_features(feats, self.split, stage, index, self.cfg)

    def broadcast(self, values: dict[str, float]) -> dict[str, float]:
        if not self.rt.distributed:
            return values
        box = [values]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def epoch_batches(sampler: PKSampler, epoch: int, device: torch.device, max_steps: int | None = None) -> Tensor:
    """This rank's batches of an epoch as one (num_batches, P*K) index tensor on ``device``
    (the first ``max_steps`` of them when capped).

    One host-to-device copy per epoch: a per-step copy from pageable memory would make the host
    wait for the GPU every step and starve it at small batch sizes.
    """
    sampler.set_epoch(epoch)
    batches = list(sampler)[:max_steps]
    width = sampler.p * sampler.k
    host = torch.from_numpy(np.stack(batches)) if batches else torch.zeros(0, width, dtype=torch.long)
    return host.to(device)


def check_finite(terms: dict[str, Tensor], stage: int, epoch: int) -> None:
    for name, v in terms.items():
        if not torch.isfinite(v).all():
            raise TrainingError(f"stage {stage}, epoch {epoch + 1}: loss term {name} is {v.item()} "
                                "(lower the learning rate, or use similarity: cosine for random-init models)")


def _wrap(module: nn.Module, rt: Runtime) -> nn.Module:
    if not rt.distributed:
        return module
    ids = [rt.device.index] if rt.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)


# ---------------------------------------------------------------------------------------------
# Stage 1
# ---------------------------------------------------------------------------------------------


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


def stage1(run: Run, feats: dict[str, Tensor], zs_val: dict[str, float], state: dict | None) -> int:
    cfg, rt, system = run.cfg.stage1, run.rt, run.system
    prompt = system.prompt
    assert prompt is not None
    v = feats["fproj"][run.train_feature_index].to(rt.device)
    labels = run.train_labels.to(rt.device)
    sampler = PKSampler(run.train_labels.numpy(), cfg.batch_p, cfg.batch_k, seed=run.cfg.runtime.seed,
                        rank=rt.rank, world_size=rt.world_size)
    steps = max(1, len(sampler))
    epochs = cfg.epochs if cfg.min_steps == 0 else max(cfg.epochs, math.ceil(cfg.min_steps / steps))
    params = [p for p in prompt.parameters() if p.requires_grad] + ([system.logit_scale] if system.logit_scale.requires_grad else [])
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if state is not None and state["stage"] == 1:
        prompt.load_state_dict(state["modules"]["prompt"])
        system.logit_scale.data.copy_(state["modules"]["scale"]["logit_scale"])
        opt.load_state_dict(state["optimizer"])
        start = state["epoch"]
    model = _wrap(prompt, rt)
    for epoch in range(start, epochs):
        lr = cosine_with_warmup(epoch, epochs, cfg.warmup_epochs, cfg.lr, cfg.lr_min, cfg.warmup_lr_init)
        for group in opt.param_groups:
            group["lr"] = lr
        batches = epoch_batches(sampler, epoch, rt.device, run.cfg.runtime.max_steps_per_epoch)
        sums = torch.zeros(2, device=rt.device)
        t0 = time.perf_counter()
        for idx in batches:
            y, vx = labels[idx], v[idx]
            i2t, t2i = stage1_losses(system, model, y, vx, rt)
            opt.zero_grad(set_to_none=True)
            (i2t + t2i).backward()
            opt.step()
            sums += torch.stack([i2t.detach(), t2i.detach()])
        means = (sums / max(1, len(batches))).tolist()  # the epoch's one sync with the device
        n = batches.numel()
        check_finite({"i2t": torch.tensor(means[0]), "t2i": torch.tensor(means[1])}, 1, epoch)
        losses = {"loss_i2t": means[0], "loss_t2i": means[1]}
        run.last_val = zs_val
        done = epoch + 1
        path = None
        if run.checkpoint_due(done, epochs, final_too=True):  # stage 1's end too: stage 2 resumes without it
            path = run.save_train_state(1, done, {"prompt": prompt, "scale": _ScaleHolder(system)}, opt)
        run.report({"stage": 1, "epoch": done, "s2_epoch": 0, "loss": losses["loss_i2t"] + losses["loss_t2i"], **losses,
                    "lr": lr, "steps": len(batches), "images_per_s": n * rt.world_size / max(1e-9, time.perf_counter() - t0),
                    **zs_val}, path)
    return epochs


class _ScaleHolder(nn.Module):
    """Lets the (optionally learnable) logit scale travel in checkpoints like a module."""

    def __init__(self, system: ReIDSystem) -> None:
        super().__init__()
        self.logit_scale = system.logit_scale


# ---------------------------------------------------------------------------------------------
# Stage 2
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def description_cache(run: Run, feats: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
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


def stage2_optimizer(system: ReIDSystem, cfg: Stage2Config, fusion_lr_factor: float) -> torch.optim.Optimizer:
    weights, biases = [], []
    for module in (system.image, system.head):
        for name, p in module.named_parameters():
            if p.requires_grad:
                (biases if name.endswith("bias") else weights).append(p)
    # Few groups, not one per tensor: Adam's multi-tensor (foreach/fused) kernels work per group.
    groups = [{"params": weights, "base_lr": cfg.lr}, {"params": biases, "base_lr": cfg.lr * cfg.bias_lr_factor}]
    if system.fusion is not None:
        groups.append({"params": list(system.fusion.parameters()), "base_lr": cfg.lr * fusion_lr_factor})
    for g in groups:
        g["lr"] = g["base_lr"]
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.Adam([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


class _Stage2Net(nn.Module):
    """Image encoder + head (+ fusion) as one module, so DDP syncs all their gradients."""

    def __init__(self, system: ReIDSystem) -> None:
        super().__init__()
        self.image, self.head, self.fusion = system.image, system.head, system.fusion

    def forward(self, x: Tensor, cams: Tensor | None, desc: Tensor | tuple[Tensor, Tensor]):
        f = self.image(x, cams)
        h = self.head(f)
        text = self.fusion(*desc)
        return f, h, text


def stage2_losses(system: ReIDSystem, net: nn.Module, x: Tensor, y: Tensor, cams: Tensor | None,
                  desc: Tensor | tuple[Tensor, Tensor], cfg, rt: Runtime) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
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

    def __init__(self, system: ReIDSystem, net: nn.Module, opt: torch.optim.Optimizer, source: "ImageSource",
                 labels: Tensor, sie: Tensor | None, desc: Tensor | tuple[Tensor, Tensor], cfg, rt: Runtime,
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


def stage2(run: Run, feats: dict[str, Tensor], state: dict | None, finish: Callable[[], None] | None = None) -> int:
    """Fine-tune the image encoder; ``finish`` writes the run's results just before the last report."""
    cfg, rt, system = run.cfg.stage2, run.rt, run.system
    for p in system.prompt.parameters():
        p.requires_grad_(False)
    system.logit_scale.requires_grad_(False)
    opt = stage2_optimizer(system, cfg, run.cfg.fusion.lr_factor)
    start = 0
    if state is not None and state["stage"] == 2:
        for name in ("image", "head", "fusion", "prompt"):
            if getattr(system, name) is not None:
                getattr(system, name).load_state_dict(state["modules"][name])
        system.logit_scale.data.copy_(state["modules"]["scale"]["logit_scale"])
        opt.load_state_dict(state["optimizer"])
        start = state["epoch"]
    desc = description_cache(run, feats)  # after any restore: it depends on the prompt weights
    system.train()
    net = _wrap(_Stage2Net(system), rt)
    sampler = PKSampler(run.train_labels.numpy(), cfg.batch_p, cfg.batch_k, seed=run.cfg.runtime.seed + 1,
                        rank=rt.rank, world_size=rt.world_size)
    sie = run._sie_codes(run.split.part("train"))
    stepper = Stage2Stepper(system, net, opt, ImageSource(run.images, run.train_rows, rt.device),
                            run.train_labels.to(rt.device), sie.to(rt.device) if sie is not None else None,
                            desc, cfg, rt, run.cfg.augment)
    milestones = milestone_epochs(cfg.milestones, cfg.milestone_unit, cfg.epochs)
    for epoch in range(start, cfg.epochs):
        factor = warmup_multistep(epoch, cfg.warmup_epochs, cfg.warmup_factor, milestones, cfg.gamma)
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor
        batches = epoch_batches(sampler, epoch, rt.device, run.cfg.runtime.max_steps_per_epoch)
        gen = torch.Generator(device=rt.device).manual_seed(run.cfg.runtime.seed * 100_003 + epoch * 7919 + rt.rank)
        t0 = time.perf_counter()
        sums = stepper.run(batches, gen)
        means = (sums / max(1, len(batches))).tolist()  # the epoch's one sync with the device
        ips = batches.numel() * rt.world_size / max(1e-9, time.perf_counter() - t0)
        run.images_per_s = ips
        check_finite({k: torch.tensor(v) for k, v in zip(("id", "triplet", "i2t"), means)}, 2, epoch)
        losses = dict(zip(("loss_id", "loss_triplet", "loss_i2t_s2"), means))
        done = epoch + 1
        if done % run.cfg.eval.every == 0 or done == cfg.epochs:
            run.val_metrics = plain(run.evaluate("val")) if rt.is_main else {}
            run.last_val = run.broadcast(val_keys(run.val_metrics))
        path = None
        if run.checkpoint_due(done, cfg.epochs, final_too=False):  # the last epoch writes results instead
            mods = {"image": system.image, "head": system.head, "prompt": system.prompt, "scale": _ScaleHolder(system)}
            if system.fusion is not None:
                mods["fusion"] = system.fusion
            path = run.save_train_state(2, done, mods, opt)
        loss = cfg.id_weight * losses["loss_id"] + cfg.triplet_weight * losses["loss_triplet"] + cfg.i2t_weight * losses["loss_i2t_s2"]
        run.report({"stage": 2, "epoch": done, "s2_epoch": done, "loss": loss, **losses, "lr": cfg.lr * factor,
                    "steps": len(batches), "images_per_s": ips, **run.last_val}, path,
                   before_send=finish if done == cfg.epochs else None)
    return cfg.epochs


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def save_inference_checkpoint(run: Run, openset: Calibration | None = None) -> Path:
    s = run.system
    obj = {"format": ckpt.INFERENCE_FORMAT, "config": json.dumps(to_dict(run.cfg)), "identities": run.identities,
           "cameras": list(run.sie_codes), "species": run.split.species, "split_hash": run.split.hash,
           "quick_gelu": s.quick_gelu, "image": s.image.state_dict(),
           "head": s.head.state_dict() if s.head is not None else {},
           "feature": json.dumps({"after_bn": run.cfg.eval.after_bn, "part_norm": run.cfg.eval.part_norm,
                                  "metric": run.cfg.eval.metric})}
    if openset is not None:  # the open-set decision calibrated on validation (indivaid.eval.openset)
        obj["openset"] = json.dumps(openset.to_dict())
    path = run.workdir / "model.pt"
    ckpt.save(obj, path)
    return path


def finished_result(cfg: TrainConfig, workdir: Path) -> RunResult | None:
    """The recorded result of this config in ``workdir``, if the run already finished there."""
    try:
        data = json.loads((workdir / "result.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if data.get("config_hash") != stable_hash(to_dict(cfg)):
        raise TrainingError(f"{workdir} holds the finished run of a different config; use a fresh workdir "
                            "(or delete its result.json to train there again)")
    return RunResult(**data)


def train(cfg: TrainConfig, *, workdir: str | Path, report: Report | None = None, evaluate_test: bool = True) -> RunResult:
    """Train ``cfg.method`` on ``cfg.data`` in ``workdir`` (resuming if it holds a checkpoint).

    The results (``result.json``, ``model.pt``) are written before the last report, and a run
    restarted after that point returns them (re-sending the last report) instead of training again.
    """
    t_start = time.perf_counter()
    workdir = Path(workdir).resolve()
    done = finished_result(cfg, workdir)
    if done is not None:
        log.info("%s already holds the finished run of this config", workdir)
        if report is not None and done.history:
            report(done.history[-1], checkpoint=None)
        return done
    run = Run(cfg, workdir, report)
    atomic_write_text(workdir / "config.json", json.dumps(to_dict(cfg), indent=2))
    feats = frozen_feature_cache(run.system, cfg, run.split, run.images, run.rt)
    zs_feats = torch.cat([feats["f12"], feats["fproj"]], 1)  # the zero-shot inference feature
    zs = plain(score_features(zs_feats, run.split, "val", run.row_index, cfg))
    zs_val = val_keys(zs)
    state = run.load_train_state()
    results: list[RunResult] = []

    def finish() -> None:
        """Score, save the inference model and write result.json (main rank); drop resumable state."""
        test = None
        if evaluate_test and run.rt.is_main:
            test = plain(run.evaluate("test")) if run.method.train else \
                plain(score_features(zs_feats, run.split, "test", run.row_index, cfg))
        openset = calibrate_run(run, None if run.method.train else zs_feats, test=evaluate_test) \
            if run.rt.is_main else None
        model_path = save_inference_checkpoint(run, openset and openset.calibration) if run.rt.is_main \
            else workdir / "model.pt"
        val = run.val_metrics if run.method.train else zs
        if openset is not None:
            val = {**val, **openset.val}
            test = {**test, **openset.test} if test is not None and openset.test is not None else test
        s1 = sum(1 for h in run.history if h["stage"] == 1)
        s2 = sum(1 for h in run.history if h["stage"] == 2)
        result = RunResult(str(workdir), cfg.method, run.split.dataset, run.split.hash, cfg.runtime.seed,
                           val, test, zs_val, s1, s2,
                           time.perf_counter() - t_start, run.images_per_s, str(model_path), list(run.history),
                           run.config_hash())
        if run.rt.is_main:
            atomic_write_text(workdir / "result.json", json.dumps(asdict(result), indent=2, default=float))
            if not cfg.checkpoint.keep:
                run.ckpt_path.unlink(missing_ok=True)
        results.append(result)

    if run.method.train:
        if state is None or state["stage"] == 1:
            stage1(run, feats, zs_val, state)
            state = None  # stage 2 starts fresh after stage 1
        stage2(run, feats, state, finish)
    else:
        run.report({"stage": 0, "epoch": 0, "s2_epoch": 0, **zs_val}, before_send=finish)
    if not results:  # no stage-2 epoch ran (stage2.epochs: 0)
        run.val_metrics = plain(run.evaluate("val")) if run.rt.is_main else {}
        finish()
    return results[0]
