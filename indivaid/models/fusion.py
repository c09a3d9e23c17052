"""Fusing an identity's descriptions into one identity description T_y: a registry of modules.

Every fusion module maps ``(C, N, D)`` descriptions and a ``(C, N)`` validity mask to ``(C, D)``
identity descriptions (fp32). What the trainer caches for it is the entry's ``per_image`` trait:
the image-specific descriptions of each identity's training images (padded and masked), or one
plain prompt text per identity (N = 1). Its ``keys`` are the ``fusion.*`` config keys it reads,
so a sweep searches exactly those for the methods that use it.

``attention`` (IndivAID; our design, the paper's module is not available): multi-head attention
with the mean description as the query and the identity's descriptions as keys/values (padded and
masked, all identities at once). Its output projection is zero-initialised on a residual, so T_y
starts exactly at the mean and moves away only as the image-to-text loss finds it useful. No
LayerNorm: it would fix ||T|| and change the i2t logit scale between fusion modes.
``mean``: the plain mean (the public code; an ablation). ``none``: CLIP-ReID's single text feature.

A new fusion module touches two files, three if a new method uses it: its class, registered here
with ``@FUSIONS.register(name)``; any new option as a field of ``FusionConfig``
(``indivaid/training/config.py``); a ``MethodSpec`` naming it in ``indivaid/methods.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from indivaid.registry import Registry

if TYPE_CHECKING:
    from indivaid.training.config import FusionConfig


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


def masked_mean(desc: Tensor, mask: Tensor) -> Tensor:
    """(C, N, D) descriptions + (C, N) mask -> (C, D) mean over each identity's valid rows (fp32)."""
    desc = desc.float()
    w = mask.unsqueeze(-1).to(desc.dtype)
    return (desc * w).sum(1) / w.sum(1)


class FusionModule(nn.Module):
    """Base of the registered fusion modules: built from the text width and ``FusionConfig``."""

    #: True: fuses the image-specific descriptions; False: gets one plain prompt text per identity.
    per_image: ClassVar[bool] = True
    #: The ``fusion.*`` config keys the module reads (what a sweep may search for it).
    keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, dim: int, cfg: FusionConfig) -> None:
        super().__init__()
        type(self).check(cfg, dim)

    @classmethod
    def check(cls, cfg: FusionConfig, dim: int) -> None:
        """Raise ``ValueError`` naming the ``fusion.*`` key when ``cfg`` does not fit width ``dim``
        (called by the trainer config's validation; this module reads no option)."""

    def forward(self, desc: Tensor, mask: Tensor) -> Tensor:
        """(C, N, D) descriptions + (C, N) mask -> (C, D) identity descriptions (fp32)."""
        return masked_mean(desc, mask)


FUSIONS: Registry[type[FusionModule]] = Registry("fusion")


@FUSIONS.register("mean")
class MeanFusion(FusionModule):
    """The plain mean of the identity's image-specific descriptions (what the public code does)."""


@FUSIONS.register("none")
class IdentityText(FusionModule):
    """CLIP-ReID: the identity's one plain prompt text (N = 1, so the mean is the text itself)."""

    per_image = False


@FUSIONS.register("attention")
class AttentionFusion(FusionModule):
    """Mean-query multi-head attention over the descriptions, added to the mean (starts at the mean)."""

    keys = ("heads", "lr")

    def __init__(self, dim: int, cfg: FusionConfig) -> None:
        super().__init__(dim, cfg)
        self.attn = nn.MultiheadAttention(dim, cfg.heads, batch_first=True)
        self._memo: tuple[Tensor, Tensor, tuple[int, int], Tensor] | None = None
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)

    @classmethod
    def check(cls, cfg: FusionConfig, dim: int) -> None:
        if dim % cfg.heads:
            raise ValueError(f"fusion.heads: {cfg.heads} does not divide the text-feature width {dim}; "
                             f"use a divisor of {dim}")

    def forward(self, desc: Tensor, mask: Tensor) -> Tensor:
        """Exactly ``nn.MultiheadAttention(mean, desc, desc)`` with the key and value projections moved
        off the descriptions: a score is ``q_h · (W_k,h d + b_k,h) = (W_k,h^T q_h) · d + const``, and
        the constant cancels in the softmax; the weights sum to one, so the value projection applies
        once to the attention-weighted raw descriptions. Per description the step costs O(heads · D)
        instead of O(D²): the cached descriptions are never projected (stage 2 fuses every identity
        at every step, so this is most of the fusion's cost). Parameters and checkpoints are those
        of ``self.attn``; the mean of a fixed description cache is computed once."""
        with torch.autocast(desc.device.type, enabled=False):
            desc = desc.float()
            mean = self._mean(desc, mask)
            c, _, d = desc.shape
            heads = self.attn.num_heads
            wq, wk, wv = self.attn.in_proj_weight.chunk(3)
            bq, _, bv = self.attn.in_proj_bias.chunk(3)
            q = F.linear(mean, wq, bq).view(c, heads, d // heads) * (d // heads) ** -0.5
            qk = torch.einsum("chk,hkd->chd", q, wk.view(heads, d // heads, d))
            scores = torch.einsum("chd,cnd->chn", qk, desc).masked_fill(~mask.unsqueeze(1), float("-inf"))
            ctx = torch.einsum("chn,cnd->chd", scores.softmax(-1), desc)
            v = torch.einsum("chd,hkd->chk", ctx, wv.view(heads, d // heads, d)) + bv.view(heads, d // heads)
            return mean + self.attn.out_proj(v.reshape(c, d))

    def _mean(self, desc: Tensor, mask: Tensor) -> Tensor:
        """``masked_mean``, memoised for the tensors it was last given (held, so that their memory
        cannot be reused by another): stage 2 passes the same description cache at every step."""
        versions = (desc._version, mask._version)
        memo = self._memo
        if (memo is None or memo[0] is not desc or memo[1] is not mask or memo[2] != versions
                or desc.requires_grad):
            memo = self._memo = (desc, mask, versions, masked_mean(desc, mask))
        return memo[3]


@torch.no_grad()
def departure_from_mean(fusion: FusionModule, desc: Tensor, mask: Tensor) -> float:
    """Mean over identities of ||T - mean|| / ||mean||: how far a fusion has moved its identity
    descriptions T away from the plain mean of their image-specific descriptions (0 at the start,
    by construction of ``attention``). NaN for a fusion without weights: it cannot move."""
    if not any(p.requires_grad for p in fusion.parameters()):
        return float("nan")
    mean = masked_mean(desc, mask)
    rel = (fusion(desc, mask) - mean).norm(dim=1) / mean.norm(dim=1).clamp_min(1e-12)
    return float(rel.mean())


def build_fusion(name: str, dim: int, cfg: FusionConfig) -> FusionModule:
    """The registered fusion module ``name`` for text width ``dim``."""
    return FUSIONS.get(name)(dim, cfg)


def fusion_reads(name: str, key: str) -> bool:
    """Whether fusion ``name`` reads config key ``fusion.<key>`` (else searching it changes nothing)."""
    return key in FUSIONS.get(name).keys
