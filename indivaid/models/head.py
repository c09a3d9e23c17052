"""BNNeck and identity classifiers (the strong re-ID baseline head used by CLIP-ReID)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from indivaid.models.encoders import ImageFeatures


class HeadOutput(NamedTuple):
    logits768: Tensor
    logits512: Tensor
    bn768: Tensor
    bn512: Tensor


def _bnneck(dim: int) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(dim)
    bn.bias.requires_grad_(False)  # BNNeck: no shift, so the BN feature stays centred for the classifier
    return bn


def _classifier(dim: int, num_ids: int) -> nn.Linear:
    fc = nn.Linear(dim, num_ids, bias=False)
    nn.init.normal_(fc.weight, std=0.001)
    return fc


class ReIDHead(nn.Module):
    def __init__(self, width: int, embed_dim: int, num_ids: int) -> None:
        super().__init__()
        self.bn768, self.bn512 = _bnneck(width), _bnneck(embed_dim)
        self.cls768, self.cls512 = _classifier(width, num_ids), _classifier(embed_dim, num_ids)

    def forward(self, f: ImageFeatures) -> HeadOutput:
        b768, b512 = self.bn768(f.f12), self.bn512(f.fproj)
        return HeadOutput(self.cls768(b768), self.cls512(b512), b768, b512)


def inference_feature(f: ImageFeatures, head: ReIDHead | None, *, after_bn: bool = False,
                      part_norm: bool = False) -> Tensor:
    """concat(f12, fproj) (before BN by default, as the references); fp32."""
    if after_bn:
        if head is None:
            raise ValueError("after-BN features need a trained head")
        parts = [head.bn768(f.f12), head.bn512(f.fproj)]
    else:
        parts = [f.f12, f.fproj]
    parts = [p.float() for p in parts]
    if part_norm:
        parts = [torch.nn.functional.normalize(p, dim=1) for p in parts]
    return torch.cat(parts, 1)
