"""Image and text towers exposing the features the re-ID losses need.

Image: CLS after the second-to-last block (``f11``), CLS after the last block + ln_post (``f12``)
and its projection (``fproj``), with an optional per-camera embedding (SIE) added to the CLS
token. Text: a transformer pass over prompt *embeddings* (not token ids), pooled at the EOT
position, so learnable prompt vectors can be spliced in.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn


class ImageFeatures(NamedTuple):
    f11: Tensor
    f12: Tensor
    fproj: Tensor


class ImageEncoder(nn.Module):
    def __init__(self, visual: nn.Module, num_cameras: int = 0, sie_coef: float = 1.0) -> None:
        super().__init__()
        self.visual = visual
        width = visual.class_embedding.shape[0]
        self.sie_coef = sie_coef
        # One vector per training camera plus a zero row (index num_cameras) for unseen cameras.
        self.camera_embed = nn.Parameter(torch.zeros(num_cameras + 1, width)) if num_cameras > 0 else None
        if self.camera_embed is not None:
            nn.init.trunc_normal_(self.camera_embed.data[:-1], std=0.02)

    @property
    def width(self) -> int:
        return self.visual.class_embedding.shape[0]

    @property
    def embed_dim(self) -> int:
        return self.visual.proj.shape[1]

    def forward(self, x: Tensor, cameras: Tensor | None = None) -> ImageFeatures:
        v = self.visual
        x = v.conv1(x).flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], 1) + v.positional_embedding.to(x.dtype)
        if self.camera_embed is not None and cameras is not None:
            cam = self.camera_embed[cameras.clamp(max=self.camera_embed.shape[0] - 1)] * self.sie_coef
            x = torch.cat([x[:, :1] + cam.unsqueeze(1).to(x.dtype), x[:, 1:]], 1)
        x = v.ln_pre(x)
        blocks = v.transformer.resblocks
        for blk in blocks[:-1]:
            x = blk(x)
        f11 = x[:, 0]
        x = blocks[-1](x)
        f12 = v.ln_post(x[:, 0])
        return ImageFeatures(f11, f12, f12 @ v.proj)


class TextEncoder(nn.Module):
    """CLIP's text transformer applied to given token embeddings."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.transformer = clip.transformer
        self.positional_embedding = clip.positional_embedding
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.token_embedding = clip.token_embedding
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)

    @property
    def width(self) -> int:
        return self.token_embedding.weight.shape[1]

    def forward(self, embeddings: Tensor, eot: Tensor) -> Tensor:
        """``embeddings``: (B, L, width); ``eot``: (B,) EOT positions -> (B, embed_dim)."""
        x = embeddings + self.positional_embedding.to(embeddings.dtype)
        mask = self.attn_mask
        if mask is not None:
            mask = mask[: x.shape[1], : x.shape[1]].to(x.dtype)
        x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        proj = self.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj
