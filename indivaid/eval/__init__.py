"""Evaluation: query-gallery distances and re-identification ranking metrics."""

from .distance import METRICS, Metric, distance_matrix, validate_metric
from .metrics import PROTOCOLS, Protocol, RankMetrics, rank_metrics, validate_protocol

__all__ = [
    "METRICS",
    "PROTOCOLS",
    "Metric",
    "Protocol",
    "RankMetrics",
    "distance_matrix",
    "rank_metrics",
    "validate_metric",
    "validate_protocol",
]
