"""Load the self-contained inference checkpoint and embed images with it.

The checkpoint (``model.pt`` in a run's workdir) holds the image encoder and head weights, the
resolved config, the identity and camera lists and the feature options: nothing else is needed
to embed new photos. Text is not used at test time. An open-set run also stores the decision
threshold calibrated on validation (:class:`indivaid.eval.openset.Calibration`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from indivaid.config import ConfigError, from_dict
from indivaid.data.augment import normalize
from indivaid.data.catalogue import DataError
from indivaid.data.imagecache import ImageSpec, load_image
from indivaid.eval.openset import Calibration
from indivaid.models.backbone import build_clip
from indivaid.models.encoders import ImageEncoder
from indivaid.models.head import ReIDHead, inference_feature
from indivaid.training import checkpoint as ckpt
from indivaid.training.config import TrainConfig
from indivaid_field.matching import IdentityRanking, decide, rank_distances  # noqa: F401 (decide: re-exported)

if TYPE_CHECKING:
    from indivaid.data.split import Split


@dataclass
class InferenceModel:
    cfg: TrainConfig
    image: ImageEncoder
    head: ReIDHead | None
    identities: list[str]
    cameras: list[str]
    species: str
    split_hash: str
    after_bn: bool
    part_norm: bool
    metric: str
    device: torch.device
    calibration: Calibration | None = None

    @property
    def spec(self) -> ImageSpec:
        return ImageSpec(*self.cfg.model.input_size, self.cfg.data.resize)

    @property
    def fingerprint(self) -> str:
        """Which model made an embedding (config and split): galleries from another model are refused."""
        from indivaid.config import to_dict
        from indivaid.utils.io import stable_hash

        return stable_hash({"config": to_dict(self.cfg), "split": self.split_hash})

    @torch.no_grad()
    def embed_uint8(self, images: Tensor, cameras: Tensor | None = None) -> Tensor:
        """uint8 ``B x 3 x H x W`` -> fp32 inference features (not yet L2-normalised)."""
        x = normalize(images.to(self.device), self.cfg.augment)
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.device.type == "cuda" else torch.autocast("cpu", enabled=False)
        with amp:
            f = self.image(x, cameras.to(self.device) if cameras is not None else None)
        return inference_feature(f, self.head, after_bn=self.after_bn, part_norm=self.part_norm)

    def embed_files(self, paths: Sequence[str | Path], batch: int = 64,
                    bboxes: Sequence[Sequence[float | None]] | None = None) -> Tensor:
        """fp32 features of image files (cropped to ``bboxes``, (x, y, w, h) or Nones, when given)."""
        boxes = bboxes if bboxes is not None else [(None,) * 4] * len(paths)
        out = []
        for s in range(0, len(paths), batch):
            arr = np.stack([load_image(str(p), b, self.spec) for p, b in zip(paths[s : s + batch], boxes[s : s + batch])])
            out.append(self.embed_uint8(torch.from_numpy(arr)).cpu())
        return torch.cat(out) if out else torch.zeros(0, 1)


def load_inference(path: str | Path, device: str | torch.device = "cpu") -> InferenceModel:
    obj = ckpt.load(Path(path), ckpt.INFERENCE_FORMAT)
    cfg = from_dict(TrainConfig, json.loads(obj["config"]))
    m = cfg.model
    clip = build_clip(m.backbone, None, tuple(m.input_size), m.stride, quick_gelu=bool(obj["quick_gelu"]))
    image = ImageEncoder(clip.visual, len(obj["cameras"]) if m.sie else 0, m.sie_coef)
    image.load_state_dict(obj["image"], strict=True)
    head = None
    if obj["head"]:
        head = ReIDHead(image.width, image.embed_dim, len(obj["identities"]))
        head.load_state_dict(obj["head"], strict=True)
    device = torch.device(device)
    image.to(device).eval()
    if head is not None:
        head.to(device).eval()
    feat = json.loads(obj["feature"])
    calibration = Calibration.from_dict(json.loads(obj["openset"])) if obj.get("openset") else None
    return InferenceModel(cfg, image, head, list(obj["identities"]), list(obj["cameras"]), obj["species"],
                          obj["split_hash"], feat["after_bn"], feat["part_norm"], feat["metric"], device, calibration)


# ---------------------------------------------------------------------------------------------
# Matching: individuals, not images (numpy, shared with the torch-free field package)


def rank_identities(dist: Tensor | np.ndarray, gallery_identity: Sequence[str], k: int) -> IdentityRanking:
    """One row per individual instead of per image: a ``(Q, G)`` distance matrix reduced per identity
    (:func:`indivaid_field.matching.rank_distances`; ``match`` streams big galleries with
    :class:`indivaid_field.matching.Gallery` instead)."""
    d = dist.detach().cpu().numpy() if isinstance(dist, Tensor) else np.asarray(dist)
    return rank_distances(d, gallery_identity, k)


# ---------------------------------------------------------------------------------------------
# Which split to score a checkpoint on


def pick_device(name: str | None, cfg: TrainConfig) -> torch.device:
    """``name``, by default the run's own ``runtime.device`` (a cluster run is scored on its GPU);
    ``auto`` is CUDA, else MPS, else the CPU."""
    name = name or cfg.runtime.device
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: CUDA is not available here; pass --device cpu")
    return device


def checkpoint_split(model: InferenceModel, checkpoint: str | Path, *, dataset: str | None = None,
                     path: str | None = None, split_file: str | None = None) -> Split:
    """The split to score ``checkpoint`` on: ``split_file``, else ``dataset`` split as the run split its
    own, else the run's recorded ``split.csv`` beside the checkpoint."""
    from indivaid.data import build_split, open_dataset, read_split

    run_split = Path(checkpoint).parent / "split.csv"
    if split_file:
        return read_split(split_file)
    if dataset:
        return build_split(open_dataset(dataset, path, model.cfg.data.data_root), model.cfg.data.split)
    if run_split.is_file():
        return read_split(run_split)
    raise DataError(f"--checkpoint {checkpoint}: no split to score it on; pass --split-file or --dataset "
                    f"(no {run_split})")
