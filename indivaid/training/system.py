"""The assembled model: CLIP towers, prompt learner, fusion and re-ID head, built from a config."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from indivaid.methods import MethodSpec
from indivaid.models.backbone import build_clip
from indivaid.models.encoders import ImageEncoder, TextEncoder
from indivaid.models.fusion import build_fusion
from indivaid.models.head import ReIDHead
from indivaid.models.prompt import PromptLearner
from indivaid.training.config import TrainConfig


def _build_fusion_aside(name: str, dim: int, cfg: TrainConfig) -> nn.Module:
    """The fusion module, initialised on a fork of the RNG: the modules built after it (the head)
    start the same whatever the fusion, so IndivAID and its fusion ablations with one seed differ
    only by their fusion (a paired comparison; docs/method.md section 4)."""
    with torch.random.fork_rng(devices=[]):
        return build_fusion(name, dim, cfg.fusion)


class ReIDSystem(nn.Module):
    def __init__(self, cfg: TrainConfig, method: MethodSpec, num_ids: int, num_cameras: int, species: str,
                 cache_dir: str | None = None) -> None:
        super().__init__()
        m = cfg.model
        clip = build_clip(m.backbone, m.pretrained, tuple(m.input_size), m.stride, cache_dir, m.quick_gelu)
        self.image = ImageEncoder(clip.visual, num_cameras if m.sie else 0, m.sie_coef)
        self.text = TextEncoder(clip)
        for p in self.text.parameters():
            p.requires_grad_(False)
        self.method = method
        self.cosine = m.similarity == "cosine"
        self.logit_scale = nn.Parameter(torch.tensor(math.log(m.logit_scale)), requires_grad=m.learn_logit_scale)
        self.prompt = PromptLearner(self.text, num_ids, species, n_ctx=cfg.prompt.n_ctx, template=cfg.prompt.template,
                                    meta_net=method.meta_net, embed_dim=self.image.embed_dim,
                                    init_std=cfg.prompt.init_std) if method.train else None
        self.fusion = _build_fusion_aside(method.fusion, self.image.embed_dim, cfg) if method.train else None
        self.head = ReIDHead(self.image.width, self.image.embed_dim, num_ids) if method.train else None
        self.quick_gelu = bool(clip.uses_quick_gelu)

    @property
    def scale(self) -> Tensor:
        return self.logit_scale.exp()

    def describe(self, labels: Tensor, image_features: Tensor | None, use_meta: bool = True) -> Tensor:
        """Text features of prompts for ``labels`` (image-conditioned when the method has a Meta-Net)."""
        assert self.prompt is not None
        if self.prompt.meta_net is not None and use_meta:
            emb, eot = self.prompt(labels, image_features)
        else:
            emb, eot = self.prompt.forward_plain(labels)
        return self.text(emb, eot)
