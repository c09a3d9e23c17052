"""Query-gallery distance matrices.

Computed in fp32 whatever the feature dtype: bf16/fp16 features (from mixed-precision inference)
lose enough precision in a matmul to reorder close neighbours, which changes the ranking metrics.
"""

from __future__ import annotations

import difflib
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

Metric = Literal["euclidean", "cosine"]
METRICS: tuple[str, ...] = get_args(Metric)


def _check_choice(kind: str, value: object, valid: tuple[str, ...]) -> str:
    """Raise a ValueError naming the valid choices (and the closest one) for a bad name."""
    if isinstance(value, str) and value in valid:
        return value
    msg = f"unknown {kind} {value!r}; valid {kind}s are: {', '.join(repr(v) for v in valid)}"
    if isinstance(value, str):
        close = difflib.get_close_matches(value.lower(), valid, n=1)
        if close:
            msg += f" (did you mean {close[0]!r}?)"
    raise ValueError(msg)


def validate_metric(metric: str) -> str:
    """Return ``metric`` if it is a supported distance metric, else raise ValueError."""
    return _check_choice("metric", metric, METRICS)


def distance_matrix(
    query: Tensor,
    gallery: Tensor,
    metric: Metric = "euclidean",
    *,
    normalize: bool = False,
) -> Tensor:
    """Return the ``(Q, G)`` fp32 distance matrix between query and gallery features.

    ``euclidean`` uses ``|a|^2 + |b|^2 - 2 a.b`` (one matmul instead of a ``Q*G*D`` difference
    tensor) on features centred on their joint mean, clamped at 0 before the square root so that
    rounding can never produce a NaN for identical vectors. ``cosine`` is ``1 - cos`` clamped to
    ``[0, 2]``; the features are always L2-normalised for it. ``normalize=True`` L2-normalises
    the features first for either metric (the usual choice for CLIP embeddings). The result lives
    on the inputs' device (on CUDA the matmul follows torch's TF32 setting).
    """
    validate_metric(metric)
    if query.ndim != 2 or gallery.ndim != 2:
        raise ValueError(
            f"query and gallery must be 2-D (N, D) feature matrices, got shapes "
            f"{tuple(query.shape)} and {tuple(gallery.shape)}"
        )
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"feature dimensions differ: query has {query.shape[1]}, gallery has {gallery.shape[1]}"
        )
    if query.device != gallery.device:
        raise ValueError(f"query is on {query.device} but gallery is on {gallery.device}")
    if not (query.is_floating_point() and gallery.is_floating_point()):
        raise TypeError(
            f"features must be floating point, got {query.dtype} and {gallery.dtype}"
        )

    q = query.to(torch.float32)
    g = gallery.to(torch.float32)
    if normalize or metric == "cosine":
        q = F.normalize(q, p=2.0, dim=1)
        g = F.normalize(g, p=2.0, dim=1)

    if metric == "cosine":
        dist = torch.mm(q, g.t())
        return dist.neg_().add_(1.0).clamp_(0.0, 2.0)

    # Euclidean distance is translation invariant; centring both sets on a shared mean keeps the
    # squared norms small, which cuts the cancellation error of the expansion for features far
    # from the origin (unnormalised embeddings).
    if q.shape[0] and g.shape[0]:
        centre = (q.sum(dim=0) + g.sum(dim=0)) / (q.shape[0] + g.shape[0])
        q = q - centre
        g = g - centre
    q_sq = q.pow(2).sum(dim=1, keepdim=True)  # (Q, 1)
    g_sq = g.pow(2).sum(dim=1).unsqueeze(0)  # (1, G)
    dist = torch.addmm(g_sq, q, g.t(), beta=1.0, alpha=-2.0)  # |b|^2 - 2ab
    dist.add_(q_sq).clamp_(min=0.0)
    return dist.sqrt_()
