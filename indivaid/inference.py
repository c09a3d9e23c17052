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

import numpy as np
import torch
from torch import Tensor

from indivaid.config import from_dict
from indivaid.data.augment import normalize
from indivaid.data.imagecache import ImageSpec, load_image
from indivaid.eval.openset import Calibration
from indivaid.models.backbone import build_clip
from indivaid.models.encoders import ImageEncoder
from indivaid.models.head import ReIDHead, inference_feature
from indivaid.training import checkpoint as ckpt
from indivaid.training.config import TrainConfig


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
# Matching: individuals, not images


@dataclass(frozen=True)
class IdentityRanking:
    """Per query, the gallery's individuals ranked by their nearest image (ties: identity order).

    ``(Q, k)`` tensors: ``codes`` index ``identities``; ``best`` and ``mean`` are the nearest and
    the mean distance to the individual's images; ``best_image`` is the gallery row of the nearest."""

    identities: list[str]
    codes: Tensor
    best: Tensor
    mean: Tensor
    best_image: Tensor
    images: Tensor  # (I,) gallery images per individual


def rank_identities(dist: Tensor, gallery_identity: Sequence[str], k: int) -> IdentityRanking:
    """One row per individual instead of per image: a ``(Q, G)`` distance matrix reduced per identity."""
    identities = sorted(set(gallery_identity))
    vocab = {s: i for i, s in enumerate(identities)}
    codes = torch.tensor([vocab[s] for s in gallery_identity], dtype=torch.long)
    q, g, n = dist.shape[0], dist.shape[1], len(identities)
    d = dist.to(torch.float64).cpu()
    idx = codes.expand(q, g)
    best = torch.full((q, n), float("inf"), dtype=torch.float64).scatter_reduce_(1, idx, d, "amin")
    images = torch.bincount(codes, minlength=n)
    mean = torch.zeros((q, n), dtype=torch.float64).index_add_(1, codes, d) / images.to(torch.float64)
    at_best = torch.where(d == best.gather(1, idx), torch.arange(g).expand(q, g), g)
    best_image = torch.full((q, n), g, dtype=torch.long).scatter_reduce_(1, idx, at_best, "amin")
    order = torch.sort(best, dim=1, stable=True).indices[:, : min(k, n)]
    return IdentityRanking(identities, order, best.gather(1, order), mean.gather(1, order),
                           best_image.gather(1, order), images)


def decide(top1_distance: Tensor, threshold: float, probability: tuple[float, float] | None) -> tuple[Tensor, Tensor | None]:
    """(known, confidence) per query: known when the nearest individual is within ``threshold``
    (the rule the threshold was calibrated with); the confidence of that decision from the
    calibrated P(same individual), when the model has one."""
    from indivaid.eval.openset import same_probability

    known = top1_distance <= threshold
    if probability is None:
        return known, None
    p = same_probability(top1_distance, probability)
    return known, torch.where(known, p, 1 - p)
