"""BNNeck and identity classifiers (the strong re-ID baseline head used by CLIP-ReID).

One BNNeck + classifier on each image feature the losses use: ``f12`` (the final CLS token, the
encoder's width: 768 for ViT-B/16, 1024 for ViT-L/14) and ``fproj`` (its projection into the
joint space: 512 / 768). Names follow the feature, not a width, so every backbone reads the same.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from indivaid.models.encoders import ImageFeatures


class HeadOutput(NamedTuple):
    logits_f12: Tensor
    logits_fproj: Tensor
    bn_f12: Tensor
    bn_fproj: Tensor


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
        self.bn_f12, self.bn_fproj = _bnneck(width), _bnneck(embed_dim)
        self.cls_f12, self.cls_fproj = _classifier(width, num_ids), _classifier(embed_dim, num_ids)

    def forward(self, f: ImageFeatures) -> HeadOutput:
        b_f12, b_fproj = self.bn_f12(f.f12), self.bn_fproj(f.fproj)
        return HeadOutput(self.cls_f12(b_f12), self.cls_fproj(b_fproj), b_f12, b_fproj)


def inference_feature(f: ImageFeatures, head: ReIDHead | None, *, after_bn: bool = False,
                      part_norm: bool = False) -> Tensor:
    """concat(f12, fproj) (before BN by default, as the references); fp32."""
    if after_bn:
        if head is None:
            raise ValueError("after-BN features need a trained head")
        parts = [head.bn_f12(f.f12), head.bn_fproj(f.fproj)]
    else:
        parts = [f.f12, f.fproj]
    parts = [p.float() for p in parts]
    if part_norm:
        parts = [torch.nn.functional.normalize(p, dim=1) for p in parts]
    return torch.cat(parts, 1)
