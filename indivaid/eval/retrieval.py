"""Score features of a split's query and gallery images under the split's protocol."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import polars as pl
import torch
from torch import Tensor

from .distance import distance_matrix
from .metrics import RankMetrics, rank_metrics
from .openset import TopMatch, top_match


def label_codes(*columns: Sequence[str]) -> list[Tensor]:
    """Map string labels to int64 codes with one shared vocabulary across ``columns``."""
    vocab = {v: i for i, v in enumerate(sorted({v for col in columns for v in col}))}
    return [torch.tensor([vocab[v] for v in col], dtype=torch.long) for col in columns]


def score_retrieval(
    query: Tensor,
    gallery: Tensor,
    query_rows: pl.DataFrame,
    gallery_rows: pl.DataFrame,
    *,
    protocol: str,
    camera_codes: Mapping[str, int] | None = None,
    metric: str = "euclidean",
    normalize: bool = True,
) -> RankMetrics:
    """Rank ``gallery`` for every ``query`` feature; the rows give identities and cameras."""
    dist = distance_matrix(query, gallery, metric, normalize=normalize)  # type: ignore[arg-type]
    qi, gi = label_codes(query_rows["identity"].to_list(), gallery_rows["identity"].to_list())
    if camera_codes is None:
        qc, gc = label_codes(query_rows["camera"].to_list(), gallery_rows["camera"].to_list())
    else:
        qc = torch.tensor([camera_codes[c] for c in query_rows["camera"].to_list()])
        gc = torch.tensor([camera_codes[c] for c in gallery_rows["camera"].to_list()])
    dev = dist.device
    return rank_metrics(dist, qi.to(dev), gi.to(dev), qc.to(dev), gc.to(dev), protocol=protocol)


def match_retrieval(
    query: Tensor,
    gallery: Tensor,
    query_rows: pl.DataFrame,
    gallery_rows: pl.DataFrame,
    *,
    protocol: str,
    camera_codes: Mapping[str, int] | None = None,
    metric: str = "euclidean",
    normalize: bool = True,
) -> TopMatch:
    """Each query's top-1 gallery match under the protocol (for the open-set metrics), with the
    same distance as :func:`score_retrieval`, so thresholds carry over between them."""
    dist = distance_matrix(query, gallery, metric, normalize=normalize)  # type: ignore[arg-type]
    qi, gi = label_codes(query_rows["identity"].to_list(), gallery_rows["identity"].to_list())
    if camera_codes is None:
        qc, gc = label_codes(query_rows["camera"].to_list(), gallery_rows["camera"].to_list())
    else:
        qc = torch.tensor([camera_codes[c] for c in query_rows["camera"].to_list()])
        gc = torch.tensor([camera_codes[c] for c in gallery_rows["camera"].to_list()])
    dev = dist.device
    return top_match(dist, qi.to(dev), gi.to(dev), qc.to(dev), gc.to(dev), protocol=protocol)
