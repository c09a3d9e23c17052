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


def _coded(query: Tensor, gallery: Tensor, query_rows: pl.DataFrame, gallery_rows: pl.DataFrame,
           camera_codes: Mapping[str, int] | None, metric: str, normalize: bool) -> tuple[Tensor, list[Tensor]]:
    """The distance matrix and (query id, gallery id, query camera, gallery camera) codes on its device."""
    dist = distance_matrix(query, gallery, metric, normalize=normalize)  # type: ignore[arg-type]
    qi, gi = label_codes(query_rows["identity"].to_list(), gallery_rows["identity"].to_list())
    if camera_codes is None:
        qc, gc = label_codes(query_rows["camera"].to_list(), gallery_rows["camera"].to_list())
    else:
        qc = torch.tensor([camera_codes[c] for c in query_rows["camera"].to_list()])
        gc = torch.tensor([camera_codes[c] for c in gallery_rows["camera"].to_list()])
    return dist, [t.to(dist.device) for t in (qi, gi, qc, gc)]


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
    dist, codes = _coded(query, gallery, query_rows, gallery_rows, camera_codes, metric, normalize)
    return rank_metrics(dist, *codes, protocol=protocol)


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
    dist, codes = _coded(query, gallery, query_rows, gallery_rows, camera_codes, metric, normalize)
    return top_match(dist, *codes, protocol=protocol)
