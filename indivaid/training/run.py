"""One training run's shared state (split, caches, model, history, checkpoints, evaluation) and the
helpers both stages use: per-epoch batches, the finite-loss check, the DDP wrapper."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
import torch.distributed as dist
from torch import Tensor, nn

from indivaid.config import to_dict
from indivaid.data import build_split, open_dataset, read_split, validate_catalogue, write_split
from indivaid.data.imagecache import ImageSpec, build_image_cache
from indivaid.data.sampler import PKSampler
from indivaid.data.split import Split
from indivaid.eval.metrics import METRIC_KEYS, VAL_METRIC_KEYS, RankMetrics
from indivaid.eval.retrieval import score_retrieval
from indivaid.methods import METHODS, MethodSpec
from indivaid.training import checkpoint as ckpt
from indivaid.training.config import TrainConfig
from indivaid.training.features import ImageSource, cache_root, image_features
from indivaid.training.runtime import Runtime, resolve_runtime, seed_everything
from indivaid.training.system import ReIDSystem
from indivaid.utils.io import stable_hash

log = logging.getLogger(__name__)

Report = Callable[..., None]
#: Every report carries exactly these keys (NaN where a stage has no such value). ``stage1_plateau``
#: is 1.0 / 0.0 (reports are floats); the diagnostics are defined in docs/method.md sections 3 and 4.
REPORT_KEYS = ("stage", "epoch", "s2_epoch", "loss", "loss_i2t", "loss_t2i", "loss_id", "loss_triplet",
               "loss_i2t_s2", "lr", "steps", "images_per_s", "max_mem_gb", *VAL_METRIC_KEYS, "fusion_departure",
               "stage1_loss_slope", "stage1_plateau")
NAN = float("nan")
#: Validation scores of a run that trained on its validation identities: not computed.
UNSCORED = {k: NAN for k in METRIC_KEYS}

#: The split parts a run trains on: the training part, and with ``data.train_on_val`` the validation parts.
TRAIN_PARTS = ("train",)
TRAIN_AND_VAL_PARTS = ("train", "val_query", "val_gallery")


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, incompatible checkpoint); the message says where."""


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


def training_rows(split: Split, train_on_val: bool) -> pl.DataFrame:
    """The images a run trains on, in split-table order: the training part, plus the validation
    parts with ``train_on_val`` (the test parts never)."""
    parts = TRAIN_AND_VAL_PARTS if train_on_val else TRAIN_PARTS
    return split.table.filter(pl.col("split").is_in(parts))


def score_features(feats: Tensor, split: Split, stage: str, row_index: dict[str, int], cfg: TrainConfig) -> RankMetrics:
    q, g = split.query_gallery(stage)  # type: ignore[arg-type]
    qi = torch.tensor([row_index[i] for i in q["image_id"].to_list()])
    gi = torch.tensor([row_index[i] for i in g["image_id"].to_list()])
    return score_retrieval(feats[qi.to(feats.device)], feats[gi.to(feats.device)], q, g, protocol=split.protocol,
                           camera_codes=split.camera_codes(), metric=cfg.eval.metric, normalize=True)


def val_keys(metrics: dict[str, float]) -> dict[str, float]:
    """The report's ``val_*`` keys from a plain metrics dict (``{}`` on ranks that do not score)."""
    return {f"val_{k}": metrics[k] for k in METRIC_KEYS if k in metrics}


def plain(m: RankMetrics) -> dict[str, float]:
    return {k: float(v) for k, v in m.as_dict().items()}


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
        train = training_rows(self.split, cfg.data.train_on_val)
        self.identities: list[str] = sorted(train["identity"].unique().to_list())
        id_code = {s: i for i, s in enumerate(self.identities)}
        self.train_labels = torch.tensor([id_code[s] for s in train["identity"].to_list()])
        self.train_rows = self.images.rows(train["image_id"].to_list())
        # Cameras unseen in training map to the zero SIE row (index = number of training cameras).
        train_cams = sorted(set(train["camera"].to_list()))
        self.sie_codes = {c: i for i, c in enumerate(train_cams)}
        self.train_sie = self._sie_codes(train)
        self.system = ReIDSystem(cfg, self.method, len(self.identities), len(train_cams), self.split.species,
                                 str(cache_root(cfg) / "weights")).to(self.rt.device)
        self.row_index = {im: i for i, im in enumerate(self.split.table["image_id"].to_list())}
        # Rows of the training images in the frozen-feature cache (which follows the split table).
        self.train_feature_index = torch.tensor([self.row_index[i] for i in train["image_id"].to_list()])
        self.history: list[dict[str, float]] = []
        self.last_val: dict[str, float] = {}
        self.val_metrics: dict[str, float] = {}  # the last validation score in full (main rank)
        self.images_per_s = NAN
        self.stage1_steps: list[tuple[float, float]] = []  # (loss, lr) of every stage-1 step on this rank
        self.diagnostics: dict[str, float] = {}  # stage 1's plateau figures, carried in every later report

    @property
    def scores_val(self) -> bool:
        """Whether validation is scored: not when its identities were trained on (``data.train_on_val``)."""
        return not (self.cfg.data.train_on_val and self.method.train)

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
        values = {**self.diagnostics, **values}
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
                 "last_val": self.last_val, "diagnostics": self.diagnostics,
                 "stage1_steps": torch.tensor(self.stage1_steps, dtype=torch.float64).reshape(-1, 2)}
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
        self.stage1_steps = [(loss, lr) for loss, lr in state["stage1_steps"].tolist()]
        self.diagnostics = dict(state["diagnostics"])
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

    def validate(self) -> None:
        """Score validation on the main rank (NaN when it was trained on) and share the report keys."""
        if not self.scores_val:
            self.val_metrics, self.last_val = dict(UNSCORED), val_keys(UNSCORED)
            return
        self.val_metrics = plain(self.evaluate("val")) if self.rt.is_main else {}
        self.last_val = self.broadcast(val_keys(self.val_metrics))

    def broadcast(self, values: dict[str, float]) -> dict[str, float]:
        if not self.rt.distributed:
            return values
        box = [values]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def epoch_batches(self, sampler: PKSampler, epoch: int) -> Tensor:
        """This rank's batches of ``epoch`` on the device (capped by ``runtime.max_steps_per_epoch``)."""
        return epoch_batches(sampler, epoch, self.rt.device, self.cfg.runtime.max_steps_per_epoch)


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


def check_finite(terms: dict[str, float], stage: int, epoch: int) -> None:
    for name, v in terms.items():
        if not np.isfinite(v):
            raise TrainingError(f"stage {stage}, epoch {epoch + 1}: loss term {name} is {v} "
                                "(lower the learning rate, or use similarity: cosine for random-init models)")


def wrap_ddp(module: nn.Module, rt: Runtime) -> nn.Module:
    if not rt.distributed:
        return module
    ids = [rt.device.index] if rt.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)


class ScaleHolder(nn.Module):
    """Lets the (optionally learnable) logit scale travel in checkpoints like a module."""

    def __init__(self, system: ReIDSystem) -> None:
        super().__init__()
        self.logit_scale = system.logit_scale
