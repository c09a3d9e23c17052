"""Open-set identification: is a query a known individual (and which one), or a new one?

Definitions follow the wildlife-datasets package, whose metrics AnimalCLEF 2025 ranks by. Per
query, the nearest gallery item left after the protocol's removals (ties: lower gallery index, as
in :mod:`.metrics`) gives the *top-1 identity* and *top-1 distance*. A query is **known** when at
least one gallery item of its identity is left after those removals and **unknown** otherwise:

* ``none``: its identity has no gallery image at all (an open-set split's held-out identities);
* ``market1501``: every gallery image of its identity is on the query's camera;
* ``leave_one_out``: its identity has no image other than the query itself.

At a decision threshold ``t`` a query is *accepted* as known when its top-1 distance is ``<= t``
and declared *new* otherwise. Scores are averaged per identity (each identity weighs the same,
whatever its number of queries), within the known and the unknown queries separately:

* **BAKS** (balanced accuracy on known samples): the fraction of known queries accepted with the
  right top-1 identity;
* **BAUS** (balanced accuracy on unknown samples): the fraction of unknown queries declared new;
* **GM**: their geometric mean √(BAKS·BAUS), AnimalCLEF 2025's ranking score;
* **AUROC**: threshold-free, the probability that an unknown query's top-1 distance exceeds a
  known query's (ties count half), with the same per-identity weights.

A score with no query to average over (no known, or no unknown, queries) is NaN. Everything here
is a pure function of tensors with the protocol as an argument, vectorised over queries; the tests
check it against a plain per-query oracle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .metrics import _check_labels, validate_protocol

NAN = float("nan")


@dataclass(frozen=True)
class TopMatch:
    """Per query: the nearest gallery item left by the protocol, and whether the query is known.

    ``distance`` is ``inf`` and ``identity``/``index`` are -1 for a query that has no gallery item
    left at all. All tensors are 1-D, on the CPU; ``distance`` is float64."""

    distance: Tensor
    identity: Tensor
    index: Tensor
    query_ids: Tensor
    known: Tensor

    @property
    def correct(self) -> Tensor:
        """Known queries whose top-1 identity is their own."""
        return self.known & (self.identity == self.query_ids)

    def __len__(self) -> int:
        return int(self.distance.numel())


def top_match(
    dist: Tensor,
    query_ids: Tensor,
    gallery_ids: Tensor,
    query_cams: Tensor | None = None,
    gallery_cams: Tensor | None = None,
    *,
    protocol: str,
    chunk_size: int = 1024,
) -> TopMatch:
    """The top-1 gallery match of every query of a ``(Q, G)`` distance matrix under ``protocol``.

    Labels are integer tensors (map strings to ints first); cameras are needed for
    ``market1501``; ``leave_one_out`` needs a square matrix with ``gallery_ids == query_ids``.
    """
    protocol = validate_protocol(protocol)
    if not isinstance(dist, Tensor) or dist.ndim != 2 or not dist.is_floating_point():
        raise ValueError(f"dist must be a 2-D floating-point (Q, G) tensor, got {getattr(dist, 'shape', dist)}")
    num_q, num_g = dist.shape
    device = dist.device
    q_ids = _check_labels("query_ids", query_ids, num_q, device)
    g_ids = _check_labels("gallery_ids", gallery_ids, num_g, device)
    if protocol == "market1501":
        if query_cams is None or gallery_cams is None:
            raise ValueError("protocol 'market1501' needs query_cams and gallery_cams (it removes same-identity, "
                             "same-camera gallery items); use protocol 'none' for data without cameras")
        q_cams = _check_labels("query_cams", query_cams, num_q, device)
        g_cams = _check_labels("gallery_cams", gallery_cams, num_g, device)
    if protocol == "leave_one_out" and (num_q != num_g or not torch.equal(q_ids, g_ids)):
        raise ValueError("protocol 'leave_one_out' needs the gallery to be the query set: a square matrix with "
                         "gallery_ids == query_ids")
    if bool(torch.isnan(dist).any()):
        raise ValueError("dist contains NaN; distances must be comparable to pick a nearest match")
    out_d, out_i, out_k = [], [], []
    cols = torch.arange(num_g, device=device)
    for start in range(0, num_q, chunk_size):
        stop = min(start + chunk_size, num_q)
        same = q_ids[start:stop, None] == g_ids[None, :]
        if protocol == "market1501":
            removed = same & (q_cams[start:stop, None] == g_cams[None, :])
        elif protocol == "leave_one_out":
            removed = cols[None, :] == torch.arange(start, stop, device=device)[:, None]
        else:
            removed = torch.zeros_like(same)
        kept_d = dist[start:stop].to(torch.float64).masked_fill(removed, math.inf)
        best = kept_d.min(dim=1).values if num_g else torch.full((stop - start,), math.inf, device=device)
        # first kept item at the minimum (a removed item may also be +inf): argmax returns the first True
        at_best = (kept_d == best[:, None]) & ~removed
        has_kept = at_best.any(dim=1)
        first = at_best.to(torch.int8).argmax(dim=1) if num_g else torch.zeros(stop - start, dtype=torch.long, device=device)
        out_d.append(torch.where(has_kept, best, math.inf))
        out_i.append(torch.where(has_kept, first, -1))
        out_k.append((same & ~removed).any(dim=1))
    distance = torch.cat(out_d).cpu() if out_d else torch.zeros(0, dtype=torch.float64)
    index = torch.cat(out_i).cpu() if out_i else torch.zeros(0, dtype=torch.long)
    g_cpu = g_ids.cpu()
    identity = torch.where(index >= 0, g_cpu[index.clamp(min=0)] if num_g else index, -1)
    known = torch.cat(out_k).cpu() if out_k else torch.zeros(0, dtype=torch.bool)
    return TopMatch(distance, identity, index, q_ids.cpu(), known)


# --------------------------------------------------------------------------------------------
# scores


@dataclass(frozen=True)
class OpenSetMetrics:
    """Open-set scores at one threshold (fractions in [0, 1]; NaN where undefined)."""

    BAKS: float
    BAUS: float
    GM: float
    AUROC: float
    threshold: float
    num_known_queries: int
    num_unknown_queries: int
    num_known_ids: int
    num_unknown_ids: int

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}


def balanced_weights(ids: Tensor, mask: Tensor) -> Tensor:
    """float64 weight per query: 1 / (its identity's queries in ``mask``) / (identities in ``mask``),
    0 outside ``mask``; so a mean over the mask weighs every identity equally."""
    w = torch.zeros(ids.shape[0], dtype=torch.float64)
    sel = ids[mask]
    if sel.numel() == 0:
        return w
    uniq, inv, counts = torch.unique(sel, return_inverse=True, return_counts=True)
    w[mask] = 1.0 / (counts[inv].to(torch.float64) * uniq.numel())
    return w


def _n_ids(ids: Tensor, mask: Tensor) -> int:
    return int(torch.unique(ids[mask]).numel())


def open_set_metrics(top: TopMatch, threshold: float) -> OpenSetMetrics:
    """BAKS, BAUS, GM and AUROC of ``top`` when queries at a top-1 distance ``<= threshold`` are
    accepted as known."""
    known, unknown = top.known, ~top.known
    accepted = (top.distance <= threshold) & (top.index >= 0)
    wk, wu = balanced_weights(top.query_ids, known), balanced_weights(top.query_ids, unknown)
    baks = float((wk * (accepted & top.correct)).sum()) if bool(known.any()) else NAN
    baus = float((wu * ~accepted).sum()) if bool(unknown.any()) else NAN
    return OpenSetMetrics(baks, baus, math.sqrt(baks * baus), auroc_known_vs_new(top), float(threshold),
                          int(known.sum()), int(unknown.sum()), _n_ids(top.query_ids, known),
                          _n_ids(top.query_ids, unknown))


def auroc_known_vs_new(top: TopMatch) -> float:
    """Identity-balanced AUROC of the top-1 distance as a score for "new" (NaN without both classes)."""
    known, unknown = top.known, ~top.known
    if not bool(known.any()) or not bool(unknown.any()):
        return NAN
    wk, wu = balanced_weights(top.query_ids, known), balanced_weights(top.query_ids, unknown)
    values, inv = torch.unique(top.distance, return_inverse=True)  # sorted; inf is a value like any other
    pos = torch.zeros(values.numel(), dtype=torch.float64).index_add_(0, inv, wu)
    neg = torch.zeros(values.numel(), dtype=torch.float64).index_add_(0, inv, wk)
    neg_below = torch.cumsum(neg, 0) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum())


@dataclass(frozen=True)
class ThresholdCurve:
    """BAKS, BAUS and GM at every threshold that changes a decision: midpoints between
    consecutive distinct top-1 distances, plus one below and one above them all."""

    thresholds: Tensor
    BAKS: Tensor
    BAUS: Tensor
    GM: Tensor

    def as_lists(self) -> dict[str, list[float]]:
        return {k: [float(v) for v in getattr(self, k)] for k in ("thresholds", "BAKS", "BAUS", "GM")}


def threshold_curve(top: TopMatch) -> ThresholdCurve:
    """The open-set scores of ``top`` at every decision-changing threshold, in one pass."""
    finite = torch.isfinite(top.distance)
    values, inv = torch.unique(top.distance[finite], return_inverse=True)
    m = values.numel()
    if m == 0:
        thresholds = torch.zeros(1, dtype=torch.float64)
    else:
        pad = float(values[-1] - values[0]) / (2 * max(m - 1, 1)) or 0.5
        mids = (values[:-1] + values[1:]) / 2
        thresholds = torch.cat([values[:1] - pad, mids, values[-1:] + pad])
    known, unknown = top.known, ~top.known
    wk, wu = balanced_weights(top.query_ids, known), balanced_weights(top.query_ids, unknown)
    hit = (wk * top.correct)[finite]
    seen_u = wu[finite]
    # threshold j accepts the distinct distances values[:j]
    acc_hit = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(
        torch.zeros(m, dtype=torch.float64).index_add_(0, inv, hit), 0)])
    acc_u = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(
        torch.zeros(m, dtype=torch.float64).index_add_(0, inv, seen_u), 0)])
    baks = acc_hit if bool(known.any()) else torch.full_like(acc_hit, NAN)
    baus = (wu.sum() - acc_u).clamp(min=0.0) if bool(unknown.any()) else torch.full_like(acc_u, NAN)  # no -1e-17
    return ThresholdCurve(thresholds, baks, baus, torch.sqrt(baks * baus))


def choose_threshold(curve: ThresholdCurve, *, target_new_recall: float | None = None) -> int:
    """Index into ``curve`` of the calibrated threshold.

    Default: the maximum of GM (the middle one when several thresholds tie). With
    ``target_new_recall``: the largest threshold (most queries accepted as known) whose BAUS, the
    balanced recall of new individuals, still reaches the target."""
    if bool(torch.isnan(curve.GM).all()):
        raise ValueError("calibration needs both known and unknown queries (hold out unknown identities: "
                         "data.split.unknown_fraction > 0)")
    if target_new_recall is not None:
        if not 0.0 <= target_new_recall <= 1.0:
            raise ValueError(f"target_new_recall must be in [0, 1], got {target_new_recall}")
        ok = torch.nonzero(curve.BAUS >= target_new_recall - 1e-12).squeeze(1)
        return int(ok[-1]) if ok.numel() else 0
    gm = torch.nan_to_num(curve.GM, nan=-1.0)
    best = torch.nonzero(gm >= gm.max() - 1e-12).squeeze(1)
    return int(best[best.numel() // 2])


# --------------------------------------------------------------------------------------------
# distance -> probability of the same individual


def fit_same_probability(top: TopMatch, *, ridge: float = 1e-3, steps: int = 50) -> tuple[float, float] | None:
    """Platt scaling: ``(a, b)`` with P(top-1 is the query's individual | d) = sigmoid(a + b·d),
    fitted by Newton's method with a small ridge (separable data would diverge). A farther match is
    never more likely the same individual: a fitted ``b > 0`` (no evidence that distance helps)
    becomes the constant base rate (``b = 0``). None when the queries are all right or all wrong,
    or fewer than two have a finite distance."""
    finite = torch.isfinite(top.distance)
    x, y = top.distance[finite], top.correct[finite].to(torch.float64)
    if x.numel() < 2 or bool((y == y[0]).all()):
        return None
    mu, sd = float(x.mean()), float(x.std()) or 1.0
    z = torch.stack([torch.ones_like(x), (x - mu) / sd], 1)
    theta = torch.zeros(2, dtype=torch.float64)
    reg = torch.diag(torch.tensor([0.0, ridge], dtype=torch.float64)) * x.numel()
    for _ in range(steps):
        p = torch.sigmoid(z @ theta)
        grad = z.t() @ (p - y) + reg @ theta
        hess = (z * (p * (1 - p))[:, None]).t() @ z + reg + 1e-9 * torch.eye(2, dtype=torch.float64)
        step = torch.linalg.solve(hess, grad)
        theta = theta - step
        if float(step.abs().max()) < 1e-10:
            break
    a, b = float(theta[0]), float(theta[1])
    if b > 0:
        rate = float(y.mean())
        return math.log(rate / (1 - rate)), 0.0
    return a - b * mu / sd, b / sd


def same_probability(distance: Tensor, ab: tuple[float, float]) -> Tensor:
    """P(same individual) of top-1 distances under a :func:`fit_same_probability` mapping."""
    a, b = ab
    return torch.sigmoid(a + b * distance.to(torch.float64))


# --------------------------------------------------------------------------------------------
# calibration: the decision threshold chosen on validation, stored with the model


@dataclass(frozen=True)
class Calibration:
    """The open-set decision chosen on validation: accept a top-1 match as known at distance
    ``<= threshold``. Kept with its validation scores and curve, and the optional Platt mapping of
    distance to P(same individual) (``probability``: ``(a, b)`` of sigmoid(a + b·d))."""

    threshold: float
    rule: str
    val: OpenSetMetrics
    curve: ThresholdCurve
    probability: tuple[float, float] | None

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "rule": self.rule, "val": self.val.as_dict(),
                "curve": self.curve.as_lists(), "probability": list(self.probability) if self.probability else None}

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        v = data["val"]
        val = OpenSetMetrics(**{k: (int(x) if k.startswith("num_") else float(x)) for k, x in v.items()})
        c = data["curve"]
        curve = ThresholdCurve(*(torch.tensor(c[k], dtype=torch.float64) for k in ("thresholds", "BAKS", "BAUS", "GM")))
        prob = data.get("probability")
        return cls(float(data["threshold"]), str(data["rule"]), val, curve, (float(prob[0]), float(prob[1])) if prob else None)


def calibrate(top: TopMatch, *, target_new_recall: float | None = None, probability: bool = True) -> Calibration:
    """Choose the threshold on validation matches ``top`` (see :func:`choose_threshold`)."""
    curve = threshold_curve(top)
    j = choose_threshold(curve, target_new_recall=target_new_recall)
    threshold = float(curve.thresholds[j])
    rule = "max GM" if target_new_recall is None else f"largest threshold with BAUS >= {target_new_recall:g}"
    return Calibration(threshold, rule, open_set_metrics(top, threshold), curve,
                       fit_same_probability(top) if probability else None)
