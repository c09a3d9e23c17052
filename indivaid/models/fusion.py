"""Fusing an identity's image-specific descriptions into one identity description T_y.

``attention`` (IndivAID; our design, the paper's module is not available): multi-head attention
with the mean description as the query and the identity's descriptions as keys/values (padded and
masked, all identities at once). Its output projection is zero-initialised on a residual, so T_y
starts exactly at the mean and moves away only as the image-to-text loss finds it useful. No
LayerNorm: it would fix ||T|| and change the i2t logit scale between fusion modes.
``mean``: the plain mean (the public code; an ablation). ``none``: CLIP-ReID's single text feature.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

FusionMode = Literal["attention", "mean", "none"]


def pad_descriptions(desc: Tensor, labels: Tensor, num_ids: int) -> tuple[Tensor, Tensor]:
    """(N, D) descriptions with labels -> (C, Nmax, D) padded tensor and (C, Nmax) validity mask."""
    order = torch.argsort(labels, stable=True)
    labels_sorted = labels[order]
    counts = torch.bincount(labels, minlength=num_ids)
    if (counts == 0).any():
        raise ValueError("every identity needs at least one description")
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(labels), device=labels.device) - starts[labels_sorted]
    out = desc.new_zeros(num_ids, int(counts.max()), desc.shape[1])
    mask = torch.zeros(num_ids, int(counts.max()), dtype=torch.bool, device=desc.device)
    out[labels_sorted, slot] = desc[order]
    mask[labels_sorted, slot] = True
    return out, mask


class IdentityFusion(nn.Module):
    def __init__(self, mode: FusionMode, dim: int, heads: int = 8) -> None:
        super().__init__()
        if mode not in ("attention", "mean", "none"):
            raise ValueError(f"unknown fusion mode {mode!r}")
        self.mode = mode
        self.attn = None
        if mode == "attention":
            if dim % heads:
                raise ValueError(f"fusion.heads={heads} must divide the text width {dim}")
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
            nn.init.zeros_(self.attn.out_proj.weight)
            nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, desc: Tensor, mask: Tensor) -> Tensor:
        """(C, N, D) descriptions + (C, N) mask -> (C, D) identity descriptions (fp32)."""
        desc = desc.float()
        w = mask.unsqueeze(-1).to(desc.dtype)
        mean = (desc * w).sum(1) / w.sum(1)
        if self.attn is None:
            return mean
        with torch.autocast(desc.device.type, enabled=False):
            out, _ = self.attn(mean.unsqueeze(1), desc, desc, key_padding_mask=~mask, need_weights=False)
        return mean + out.squeeze(1)
