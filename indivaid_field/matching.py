"""Which known individual is each photo, or a new one? Exact search over a catalogue, in numpy.

Photos are ranked against *individuals*, not images: per query, each gallery identity gets its
nearest and its mean distance, and identities are ordered by the nearest (ties: identity order).
The search is exact and streams the gallery in chunks, so memory stays bounded whatever the
catalogue size: a block of queries holds ``(queries x chunk)`` distances plus ``(queries x
identities)`` running minima and sums, never the whole ``(queries x gallery)`` matrix. Both
``indivaid match`` and ``indivaid_field match`` call it, so the torch and ONNX paths decide alike.

Distances follow ``indivaid.eval.distance.distance_matrix(..., normalize=True)``: both sides are
L2-normalised; ``euclidean`` is ``|q - g|`` and ``cosine`` is ``1 - cos`` in ``[0, 2]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from indivaid_field import FieldError

METRICS = ("euclidean", "cosine")
#: float elements of one (queries x chunk) distance block: bounds the search's working memory
BLOCK_ELEMENTS = 1 << 22
#: bytes of gallery vectors read at once (only preparing makes a centred float32 copy of them)
CHUNK_BYTES = 32 << 20


@dataclass(frozen=True)
class IdentityRanking:
    """Per query, the gallery's individuals ranked by their nearest image (ties: identity order).

    ``(Q, k)`` arrays: ``codes`` index ``identities``; ``best`` and ``mean`` are the nearest and
    the mean distance to the individual's images; ``best_image`` is the gallery row of the nearest
    (the lowest row among equally near ones)."""

    identities: list[str]
    codes: np.ndarray
    best: np.ndarray
    mean: np.ndarray
    best_image: np.ndarray
    images: np.ndarray  # (I,) gallery images per individual


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit length (as torch's ``F.normalize``: a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(eps))


def _chunk_plan(codes: np.ndarray, chunk: int) -> list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]:
    """Per gallery chunk ``[s, e)``: its rows sorted by identity (stable), and where each identity's
    run starts in that order and which identity it is, for ``np.*.reduceat``."""
    plan = []
    for s in range(0, len(codes), chunk):
        e = min(s + chunk, len(codes))
        order = np.argsort(codes[s:e], kind="stable")
        sorted_codes = codes[s:e][order]
        starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
        plan.append((s, e, order, starts, sorted_codes[starts]))
    return plan


class _Accumulator:
    """Running nearest distance, its gallery row and the distance sum per (query, identity)."""

    def __init__(self, queries: int, identities: int) -> None:
        self.best = np.full((queries, identities), np.inf)
        self.row = np.zeros((queries, identities), np.int64)
        self.total = np.zeros((queries, identities))

    def add(self, dist: np.ndarray, offset: int, order: np.ndarray, starts: np.ndarray, ids: np.ndarray) -> None:
        """Fold in the distances to gallery rows ``offset + order`` (chunks come in row order, so
        a tie keeps the earlier, lower row)."""
        d = dist[:, order]
        mins = np.minimum.reduceat(d, starts, axis=1)
        counts = np.diff(np.r_[starts, d.shape[1]])
        rows = np.where(d == np.repeat(mins, counts, axis=1), (offset + order)[None, :], np.iinfo(np.int64).max)
        first = np.minimum.reduceat(rows, starts, axis=1)
        better = mins < self.best[:, ids]
        self.best[:, ids] = np.where(better, mins, self.best[:, ids])
        self.row[:, ids] = np.where(better, first, self.row[:, ids])
        self.total[:, ids] += np.add.reduceat(d.astype(np.float64), starts, axis=1)


def _top_k(acc: _Accumulator, images: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    order = np.argsort(acc.best, axis=1, kind="stable")[:, :k]
    take = lambda a: np.take_along_axis(a, order, axis=1)  # noqa: E731
    return order, take(acc.best), take(acc.total) / images[order], take(acc.row)


def identity_codes(gallery_identity: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Sorted identity names and each gallery row's index into them."""
    identities = sorted(set(gallery_identity))
    vocab = {s: i for i, s in enumerate(identities)}
    return identities, np.fromiter((vocab[s] for s in gallery_identity), np.int64, len(gallery_identity))


def rank_distances(dist: np.ndarray, gallery_identity: Sequence[str], k: int) -> IdentityRanking:
    """A ready ``(Q, G)`` distance matrix reduced to one row per individual (small galleries, tests)."""
    identities, codes = identity_codes(gallery_identity)
    d = np.asarray(dist, dtype=np.float64)
    images = np.bincount(codes, minlength=len(identities))
    acc = _Accumulator(d.shape[0], len(identities))
    for s, e, order, starts, ids in _chunk_plan(codes, max(1, d.shape[1])):
        acc.add(d[:, s:e], s, order, starts, ids)
    return IdentityRanking(identities, *_top_k(acc, images, min(k, len(identities))), images)


class Gallery:
    """A catalogue prepared once for repeated exact searches.

    Distances are computed on vectors centred on the gallery's mean direction, as
    ``indivaid.eval.distance`` does: re-ID embeddings share a large common component (cosines of
    0.99+ between different animals are common), and ``2 - 2 cos`` in float32 would round such
    neighbours into ties; centred, the same float32 arithmetic resolves them. Preparing costs two
    passes over ``vectors`` (norms and the mean, then the centred squared norms); a search reads
    each row once. ``vectors`` may be a memory map: it is read chunk by chunk, never copied whole."""

    def __init__(self, vectors: np.ndarray, gallery_identity: Sequence[str], metric: str = "euclidean",
                 chunk: int | None = None) -> None:
        if metric not in METRICS:
            raise FieldError(f"unknown metric {metric!r}; valid metrics are: {', '.join(METRICS)}")
        if len(vectors) != len(gallery_identity) or len(vectors) == 0:
            raise FieldError(f"the gallery has {len(vectors)} vectors and {len(gallery_identity)} identities")
        self.vectors, self.metric = vectors, metric
        self.chunk = chunk or int(np.clip(CHUNK_BYTES // (4 * vectors.shape[1]), 1024, 65536))
        self.identities, self.codes = identity_codes(gallery_identity)
        self.images = np.bincount(self.codes, minlength=len(self.identities))
        self.plan = _chunk_plan(self.codes, self.chunk)
        inv, total = [], np.zeros(vectors.shape[1])
        for s, e, *_ in self.plan:
            v = np.asarray(vectors[s:e], np.float32)
            inv.append(1.0 / np.maximum(np.linalg.norm(v, axis=1), 1e-12))
            total += (v * inv[-1][:, None]).sum(0, dtype=np.float64)
        self.inv_norm = np.concatenate(inv).astype(np.float32)
        self.centre = (total / len(vectors)).astype(np.float32)
        self.sq = np.concatenate([np.square(self._centred(s, e)).sum(1) for s, e, *_ in self.plan])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def _centred(self, s: int, e: int) -> np.ndarray:
        """Rows ``[s, e)`` normalised and centred: one float32 temporary of the chunk's size."""
        out = np.multiply(np.asarray(self.vectors[s:e], np.float32), self.inv_norm[s:e, None], dtype=np.float32)
        out -= self.centre
        return out

    def _distances(self, q: np.ndarray, q_sq: np.ndarray, q_c: np.ndarray, s: int, e: int) -> np.ndarray:
        """``(Q, e - s)`` distances to gallery rows ``[s, e)``, for centred queries ``q``.

        ``(q - c)·(g/|g| - c) = (q - c)·g / |g| - (q - c)·c``: one float32 product of the small
        centred query with the raw rows, no centred copy of the gallery (the search reads each row
        once, as a plain matrix-vector product would)."""
        dots = (q @ np.asarray(self.vectors[s:e], np.float32).T) * self.inv_norm[s:e] - q_c[:, None]
        d2 = q_sq[:, None] + self.sq[None, s:e] - 2.0 * dots
        np.maximum(d2, 0.0, out=d2)
        return np.minimum(d2 / 2.0, 2.0) if self.metric == "cosine" else np.sqrt(d2)  # unit vectors: 1 - cos = d²/2

    def search(self, query: np.ndarray, k: int) -> IdentityRanking:
        """The top ``k`` individuals of every query row (L2-normalised here)."""
        q_all = np.asarray(query, np.float32)
        if q_all.ndim != 2 or q_all.shape[1] != self.dim:
            raise FieldError(f"the gallery holds {self.dim}-d vectors but the queries are {q_all.shape[1:]}-d; "
                             "embed the gallery again with this model")
        q_all = l2_normalize(q_all) - self.centre
        n, k = len(self.identities), min(k, len(self.identities))
        block = int(np.clip(BLOCK_ELEMENTS // max(n, self.chunk), 1, 256))  # queries at once
        parts = []
        for b in range(0, len(q_all), block):
            q = q_all[b : b + block]
            q_sq, q_c = np.square(q).sum(1), q @ self.centre
            acc = _Accumulator(len(q), n)
            for s, e, order, starts, ids in self.plan:
                acc.add(self._distances(q, q_sq, q_c, s, e), s, order, starts, ids)
            parts.append(_top_k(acc, self.images, k))
        if not parts:
            empty = np.zeros((0, k))
            return IdentityRanking(self.identities, empty.astype(np.int64), empty, empty, empty.astype(np.int64),
                                   self.images)
        codes, best, mean, row = (np.concatenate(p) for p in zip(*parts))
        return IdentityRanking(self.identities, codes, best, mean, row, self.images)


# ---------------------------------------------------------------------------------------------
# the KNOWN / NEW decision


def same_probability(distance: np.ndarray, ab: tuple[float, float]) -> np.ndarray:
    """P(same individual) of top-1 distances under the calibrated Platt mapping ``sigmoid(a + b d)``."""
    a, b = ab
    return 1.0 / (1.0 + np.exp(-(a + b * np.asarray(distance, np.float64))))


def decide(top1_distance: np.ndarray, threshold: float,
           probability: tuple[float, float] | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(known, confidence) per query: known when the nearest individual is within ``threshold``
    (the rule the threshold was calibrated with); the confidence of that decision from the
    calibrated P(same individual), when the model has one."""
    d = np.asarray(top1_distance, np.float64)
    known = d <= threshold
    if probability is None:
        return known, None
    p = same_probability(d, probability)
    return known, np.where(known, p, 1 - p)


# ---------------------------------------------------------------------------------------------
# the catalogue restricted by metadata, and the flags that say how


def key_values(items: Sequence[str], flag: str) -> dict[str, str]:
    """``COLUMN=VALUE`` arguments as a mapping; a malformed one is a one-line error."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FieldError(f"{flag} {item!r}: expected COLUMN=VALUE, e.g. {flag} site=north")
        out[key.strip()] = value
    return out


def gallery_mask(columns: Mapping[str, Sequence[object]], where: Mapping[str, str],
                 reserved: Sequence[str] = ()) -> np.ndarray:
    """Gallery rows with an identity whose metadata equal every ``--where`` value (e.g. one site's
    individuals); ``columns`` are the gallery's columns (values compared as strings)."""
    ident = columns["identity"]
    keep = np.ones(len(ident), dtype=bool)
    for col, value in where.items():
        if col not in columns:
            cols = [c for c in columns if c not in reserved]
            raise FieldError(f"--where {col}={value}: the gallery has no column {col!r}; its metadata columns: "
                             f"{', '.join(cols) or 'none'} (embed keeps a table's columns, or add --meta COLUMN=VALUE)")
        values = [None if v is None else str(v) for v in columns[col]]
        hit = np.array([v == value for v in values], dtype=bool)
        if not hit.any():
            seen = sorted({v for v in values if v is not None})
            raise FieldError(f"--where {col}={value}: no gallery image has it; values of {col}: {seen[:10]}")
        keep &= hit
    keep &= np.array([v is not None for v in ident], dtype=bool)
    if not keep.any():
        raise FieldError(f"no gallery image with an identity matches --where {dict(where)}; embed the catalogue "
                         "with one folder per individual or a table with an identity column")
    return keep


# ---------------------------------------------------------------------------------------------
# the result: one row per photo and ranked individual


def match_rows(photos: Sequence[str], truth: Sequence[str | None], gallery_paths: Sequence[str],
               ranked: IdentityRanking, known: np.ndarray | None, conf: np.ndarray | None,
               threshold: float | None) -> dict[str, list]:
    """Columns of the match table: one row per photo and ranked individual, with the photo's
    decision (KNOWN / NEW, or None without a threshold) on every row."""
    q, k = ranked.codes.shape
    decision = [None] * q if known is None else ["KNOWN" if bool(x) else "NEW" for x in known]
    decided = [ranked.identities[int(ranked.codes[i, 0])] if decision[i] == "KNOWN" else None for i in range(q)]
    rep = lambda values: [v for v in values for _ in range(k)]  # noqa: E731 (per photo -> per row)
    flat = ranked.codes.reshape(-1)
    return {
        "photo": rep(list(photos)), "photo_identity": rep(list(truth)), "decision": rep(decision),
        "identity_decided": rep(decided),
        "confidence": rep([float(c) for c in conf] if conf is not None else [None] * q),
        "threshold": [threshold] * (q * k), "rank": list(range(1, k + 1)) * q,
        "identity": [ranked.identities[int(c)] for c in flat],
        "best_distance": ranked.best.reshape(-1).tolist(), "mean_distance": ranked.mean.reshape(-1).tolist(),
        "images": ranked.images[flat].tolist(),
        "best_image": [gallery_paths[int(i)] for i in ranked.best_image.reshape(-1)],
    }


def print_matches(console, rows: Mapping[str, Sequence], ranked: IdentityRanking, n_images: int,
                  threshold: float | None, source: str) -> None:
    """The ranking and decisions as a rich table, then the KNOWN / NEW tally."""
    from pathlib import Path

    from rich.table import Table

    k = ranked.codes.shape[1]
    out = Table(title=f"top-{k} matches: {len(ranked.identities)} individuals ({n_images} images) ranked by their "
                      "nearest image")
    for c, j in (("photo", "left"), ("decision", "left"), ("confidence", "right"), ("rank", "right"),
                 ("individual", "left"), ("best", "right"), ("mean", "right"), ("images", "right")):
        out.add_column(c, justify=j)  # type: ignore[arg-type]
    n_rows = len(rows["photo"])
    for i in range(n_rows):
        r = {c: rows[c][i] for c in rows}
        first = r["rank"] == 1
        verdict = "" if not first or r["decision"] is None else (
            f"[bold blue]KNOWN {r['identity_decided']}[/]" if r["decision"] == "KNOWN" else "[bold red]NEW[/]")
        conf = f"{r['confidence']:.0%}" if first and r["confidence"] is not None else ""
        out.add_row(Path(r["photo"]).name if first else "", verdict, conf, str(r["rank"]), str(r["identity"]),
                    f"{r['best_distance']:.3f}", f"{r['mean_distance']:.3f}", str(r["images"]))
    console.print(out)
    if threshold is not None:
        decisions = [rows["decision"][i] for i in range(n_rows) if rows["rank"][i] == 1]
        n_known = sum(d == "KNOWN" for d in decisions)
        console.print(f"{len(decisions)} photos: {n_known} KNOWN, {len(decisions) - n_known} NEW at distance "
                      f"threshold {threshold:.4f} ({source})")
