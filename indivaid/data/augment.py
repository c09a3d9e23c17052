"""Train/test transforms as batched tensor ops on whatever device the batch is on.

Equivalent to the references' pipeline (resize is done once by the image cache): horizontal flip,
zero-pad + random crop, normalise, then random erasing in timm's ``pixel`` mode (the rectangle is
filled with per-pixel, per-channel N(0, 1) noise in the normalised image) -- each drawn
independently per image, with no Python loop over the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class AugmentConfig:
    flip_p: float = field(default=0.5, metadata={"ge": 0.0, "le": 1.0})
    pad: int = field(default=10, metadata={"ge": 0})
    erase_p: float = field(default=0.5, metadata={"ge": 0.0, "le": 1.0})
    erase_scale: tuple[float, float] = (0.02, 1 / 3)  # erased area / image area (timm's min/max_area)
    erase_ratio: tuple[float, float] = (0.3, 1 / 0.3)  # aspect range, drawn log-uniformly (timm's)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


def normalize(images: Tensor, cfg: AugmentConfig, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 ``B x 3 x H x W`` -> normalised float (the test transform)."""
    mean = torch.tensor(cfg.mean, device=images.device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=images.device, dtype=dtype).view(1, 3, 1, 1)
    return (images.to(dtype) / 255.0 - mean) / std


def random_flip(x: Tensor, p: float, gen: torch.Generator | None) -> Tensor:
    flip = torch.rand(x.shape[0], device=x.device, generator=gen) < p
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def random_pad_crop(x: Tensor, pad: int, gen: torch.Generator | None) -> Tensor:
    """Zero-pad by ``pad`` and crop back to the original size at a random offset per image."""
    if pad == 0:
        return x
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=gen)
    rows = (oy[:, None] + torch.arange(h, device=x.device)).view(b, 1, h, 1).expand(b, c, h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (ox[:, None] + torch.arange(w, device=x.device)).view(b, 1, 1, w).expand(b, c, h, w)
    return out.gather(3, cols)


def random_erasing(x: Tensor, cfg: AugmentConfig, gen: torch.Generator | None, attempts: int = 10) -> Tensor:
    """Erase one random rectangle per image with probability ``erase_p``, filled with N(0, 1) noise
    per pixel and channel (timm's ``RandomErasing(mode='pixel')``, as the references use it: up to
    ``attempts`` draws of area and log-uniform aspect; the first that fits is used)."""
    b, _, h, w = x.shape
    dev = x.device
    area = h * w * torch.empty(b, attempts, device=dev).uniform_(*cfg.erase_scale, generator=gen)
    log_r = torch.empty(b, attempts, device=dev).uniform_(math.log(cfg.erase_ratio[0]), math.log(cfg.erase_ratio[1]), generator=gen)
    ratio = log_r.exp()
    eh = (area * ratio).sqrt().round().long()
    ew = (area / ratio).sqrt().round().long()
    fits = (eh < h) & (ew < w) & (eh > 0) & (ew > 0)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.zeros(b, dtype=torch.long, device=dev))
    eh = eh.gather(1, first[:, None]).squeeze(1)
    ew = ew.gather(1, first[:, None]).squeeze(1)
    do = fits.any(1) & (torch.rand(b, device=dev, generator=gen) < cfg.erase_p)
    top = (torch.rand(b, device=dev, generator=gen) * (h - eh + 1).clamp(min=1)).long()
    left = (torch.rand(b, device=dev, generator=gen) * (w - ew + 1).clamp(min=1)).long()
    ys = torch.arange(h, device=dev).view(1, h, 1)
    xs = torch.arange(w, device=dev).view(1, 1, w)
    inside = (ys >= top.view(b, 1, 1)) & (ys < (top + eh).view(b, 1, 1)) & (xs >= left.view(b, 1, 1)) & (xs < (left + ew).view(b, 1, 1))
    mask = (inside & do.view(b, 1, 1)).unsqueeze(1)
    noise = torch.randn(x.shape, generator=gen, device=dev, dtype=x.dtype)
    return torch.where(mask, noise, x)


def train_transform(images: Tensor, cfg: AugmentConfig, gen: torch.Generator | None = None,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 batch -> augmented, normalised float batch (flip, pad-crop, normalise, erase)."""
    x = random_flip(images, cfg.flip_p, gen)
    x = random_pad_crop(x, cfg.pad, gen)
    x = normalize(x, cfg, dtype)
    return random_erasing(x, cfg, gen) if cfg.erase_p > 0 else x
