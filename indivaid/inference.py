"""Load the self-contained inference checkpoint and embed images with it.

The checkpoint (``model.pt`` in a run's workdir) holds the image encoder and head weights, the
resolved config, the identity and camera lists and the feature options: nothing else is needed
to embed new photos. Text is not used at test time.
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

    @property
    def spec(self) -> ImageSpec:
        return ImageSpec(*self.cfg.model.input_size, self.cfg.data.resize)

    @torch.no_grad()
    def embed_uint8(self, images: Tensor, cameras: Tensor | None = None) -> Tensor:
        """uint8 ``B x 3 x H x W`` -> fp32 inference features (not yet L2-normalised)."""
        x = normalize(images.to(self.device), self.cfg.augment)
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.device.type == "cuda" else torch.autocast("cpu", enabled=False)
        with amp:
            f = self.image(x, cameras.to(self.device) if cameras is not None else None)
        return inference_feature(f, self.head, after_bn=self.after_bn, part_norm=self.part_norm)

    def embed_files(self, paths: Sequence[str | Path], batch: int = 64) -> Tensor:
        out = []
        for s in range(0, len(paths), batch):
            arr = np.stack([load_image(str(p), (None,) * 4, self.spec) for p in paths[s : s + batch]])
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
    return InferenceModel(cfg, image, head, list(obj["identities"]), list(obj["cameras"]), obj["species"],
                          obj["split_hash"], feat["after_bn"], feat["part_norm"], feat["metric"], device)
