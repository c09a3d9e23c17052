"""Losses, always evaluated in fp32 (bf16 similarity logits and distances lose the ranking)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def similarity(a: Tensor, b: Tensor, *, cosine: bool, scale: Tensor | float = 1.0) -> Tensor:
    """(A, D) x (B, D) -> (A, B) logits: raw dot product (CLIP-ReID, tau = 1) or scaled cosine."""
    a, b = a.float(), b.float()
    if cosine:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    return (a @ b.t()) * scale


def supcon(logits: Tensor, labels_rows: Tensor, labels_cols: Tensor) -> Tensor:
    """Supervised contrastive loss over rows: mean_i -1/|P(i)| sum_{p in P(i)} log softmax(logits_i)_p."""
    pos = (labels_rows[:, None] == labels_cols[None, :]).float()
    logp = F.log_softmax(logits.float(), dim=1)
    return (-(logp * pos).sum(1) / pos.sum(1).clamp_min(1)).mean()


def supcon_two_way(image: Tensor, text: Tensor, labels: Tensor, *, cosine: bool, scale: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
    """(L_i2t, L_t2i) for in-batch (image_i, text_i, label_i) triples."""
    logits = similarity(image, text, cosine=cosine, scale=scale)
    return supcon(logits, labels, labels), supcon(logits.t(), labels, labels)


def cross_entropy_ls(logits: Tensor, labels: Tensor, eps: float = 0.1) -> Tensor:
    return F.cross_entropy(logits.float(), labels, label_smoothing=eps)


def pairwise_euclidean(x: Tensor) -> Tensor:
    x = x.float()
    sq = (x * x).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2 * (x @ x.t())
    return d2.clamp_min(1e-12).sqrt()  # clamp before sqrt: cancellation gives tiny negatives


def batch_hard_triplet(features: Tensor, labels: Tensor, margin: float = 0.3) -> Tensor:
    """Hardest positive vs hardest negative per anchor, Euclidean on raw features."""
    d = pairwise_euclidean(features)
    same = labels[:, None] == labels[None, :]
    hardest_pos = d.masked_fill(~same, float("-inf")).amax(1)
    hardest_neg = d.masked_fill(same, float("inf")).amin(1)
    valid = torch.isfinite(hardest_neg)
    if not valid.any():
        return d.new_zeros(())
    return F.relu(hardest_pos - hardest_neg + margin)[valid].mean()
