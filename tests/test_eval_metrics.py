"""Tests for indivaid.eval: distance matrices and CMC / mAP / mINP under each protocol.

The reference is a deliberately plain oracle (a Python loop per query, explicit filtering and a
sort keyed on (distance, gallery index)); every ranking algorithm in the module is compared with
it, including the fallbacks that only run for unusual inputs.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

import indivaid.eval.metrics as metrics_mod
from indivaid.eval import (
    PROTOCOLS,
    RankMetrics,
    distance_matrix,
    rank_metrics,
    validate_metric,
    validate_protocol,
)
from indivaid.eval.metrics import _rank_metrics

RANKS = (1, 2, 5, 10)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: worker threads only add synchronisation (and, on a busy machine,
    stalls), so run this module single-threaded and restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# oracle


def oracle(dist, q_ids, g_ids, q_cams, g_cams, protocol, ranks=RANKS):
    """Plain per-query evaluation; returns the same flat dict as RankMetrics.as_dict()."""
    d = dist.double().tolist()
    q_ids, g_ids = q_ids.tolist(), g_ids.tolist()
    q_cams = q_cams.tolist() if q_cams is not None else None
    g_cams = g_cams.tolist() if g_cams is not None else None
    hits = {k: 0 for k in ranks}
    ap_sum = inp_sum = 0.0
    valid = skipped = 0
    for q in range(len(q_ids)):
        kept = []
        for g in range(len(g_ids)):
            if protocol == "market1501" and g_ids[g] == q_ids[q] and g_cams[g] == q_cams[q]:
                continue
            if protocol == "leave_one_out" and g == q:
                continue
            kept.append(g)
        kept.sort(key=lambda g: (d[q][g], g))
        positions = [r + 1 for r, g in enumerate(kept) if g_ids[g] == q_ids[q]]
        if not positions:
            skipped += 1
            continue
        valid += 1
        for k in ranks:
            if positions[0] <= k:
                hits[k] += 1
        ap_sum += sum((j + 1) / r for j, r in enumerate(positions)) / len(positions)
        inp_sum += len(positions) / positions[-1]
    out = {f"rank{k}": (hits[k] / valid if valid else 0.0) for k in ranks}
    out["mAP"] = ap_sum / valid if valid else 0.0
    out["mINP"] = inp_sum / valid if valid else 0.0
    out["num_valid_queries"] = valid
    out["num_skipped_queries"] = skipped
    return out


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), (key, got, want)


def random_case(seed, protocol, num_q=None, num_g=None, num_ids=6, num_cams=3, levels=None):
    """Random labels and distances rounded to a few levels so that ties are everywhere."""
    gen = torch.Generator().manual_seed(seed)
    num_q = num_q or int(torch.randint(1, 40, (1,), generator=gen))
    num_g = num_g or int(torch.randint(1, 60, (1,), generator=gen))
    if protocol == "leave_one_out":
        num_g = num_q
    levels = levels or int(torch.randint(2, 12, (1,), generator=gen))
    dist = (torch.rand(num_q, num_g, generator=gen) * levels).round() / levels
    q_ids = torch.randint(0, num_ids, (num_q,), generator=gen)
    g_ids = q_ids.clone() if protocol == "leave_one_out" else torch.randint(0, num_ids, (num_g,), generator=gen)
    q_cams = torch.randint(0, num_cams, (num_q,), generator=gen)
    g_cams = q_cams.clone() if protocol == "leave_one_out" else torch.randint(0, num_cams, (num_g,), generator=gen)
    return dist, q_ids, g_ids, q_cams, g_cams


# Every ranker: the default, the bucket one with and without its binary-search fallback, the
# binary search one, the full-sort one.
BACKENDS = [
    ("auto", None),
    ("bucket", 1.0),  # never falls back, even with heavy ties
    ("bucket", 0.0),  # always falls back to the binary search
    ("bucket-blocks", 1.0),  # chunks split into blocks of a few queries, few or many buckets
    ("search", None),
    ("sort", None),
]


def run_backend(monkeypatch, backend, fraction, *args, **kwargs) -> dict:
    if fraction is not None:
        monkeypatch.setattr(metrics_mod, "_BUCKET_MAX_CANDIDATE_FRACTION", fraction)
    if backend == "bucket-blocks":
        backend = "bucket"
        monkeypatch.setattr(metrics_mod._BucketRanker, "_BLOCK_ITEMS", 100)
        cost = 0.0 if len(args[0]) % 2 else 1e9  # bucket count at its lower / upper bound
        monkeypatch.setattr(metrics_mod._BucketRanker, "_CANDIDATE_COST", cost)
    kwargs.setdefault("ranks", RANKS)
    kwargs.setdefault("chunk_size", 1024)
    return _rank_metrics(*args, backend=backend, **kwargs).as_dict()


# --------------------------------------------------------------------------------------------
# random cases against the oracle


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("backend,fraction", BACKENDS)
def test_random_cases_match_oracle(monkeypatch, protocol, backend, fraction):
    for seed in range(6):
        dist, q_ids, g_ids, q_cams, g_cams = random_case(seed, protocol)
        want = oracle(dist, q_ids, g_ids, q_cams, g_cams, protocol)
        for chunk_size in (1, 7, 1024) if seed < 2 else (7, 1024):
            got = run_backend(
                monkeypatch, backend, fraction, dist, q_ids, g_ids, q_cams, g_cams,
                protocol=protocol, chunk_size=chunk_size,
            )
            assert_same(got, want)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_larger_random_case_public_api(protocol):
    """Continuous distances (few ties), more identities, the public function and its defaults."""
    gen = torch.Generator().manual_seed(7)
    n_q, n_g = 90, 90 if protocol == "leave_one_out" else 150
    dist = torch.rand(n_q, n_g, generator=gen)
    q_ids = torch.randint(0, 15, (n_q,), generator=gen)
    g_ids = q_ids.clone() if protocol == "leave_one_out" else torch.randint(0, 15, (n_g,), generator=gen)
    q_cams = torch.randint(0, 4, (n_q,), generator=gen)
    g_cams = q_cams.clone() if protocol == "leave_one_out" else torch.randint(0, 4, (n_g,), generator=gen)
    got = rank_metrics(dist, q_ids, g_ids, q_cams, g_cams, protocol=protocol)
    assert_same(got.as_dict(), oracle(dist, q_ids, g_ids, q_cams, g_cams, protocol, (1, 5, 10)))
    for chunk_size in (1, 7):
        again = rank_metrics(
            dist, q_ids, g_ids, q_cams, g_cams, protocol=protocol, chunk_size=chunk_size
        )
        assert_same(again.as_dict(), got.as_dict())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_distance_dtypes_match_oracle(dtype):
    for seed in range(6):
        dist, q_ids, g_ids, q_cams, g_cams = random_case(seed, "market1501", levels=50)
        dist = (dist * 3 - 1).to(dtype)  # also negative distances
        want = oracle(dist, q_ids, g_ids, q_cams, g_cams, "market1501")
        got = _rank_metrics(
            dist, q_ids, g_ids, q_cams, g_cams, protocol="market1501", ranks=RANKS,
            chunk_size=5, backend="auto",
        )
        assert_same(got.as_dict(), want)


@pytest.mark.parametrize("backend,fraction", BACKENDS)
def test_infinite_signed_zero_and_constant_distances(monkeypatch, backend, fraction):
    dist, q_ids, g_ids, q_cams, g_cams = random_case(3, "none", num_q=12, num_g=30)
    with_inf = dist.clone()
    with_inf[:, ::4] = math.inf
    with_inf[0, 1] = -math.inf
    signed_zero = dist.clone()
    signed_zero[:, ::3] = -0.0  # -0.0 ties +0.0: order by index
    signed_zero[:, 1::3] = 0.0
    constant = torch.full_like(dist, 0.25)
    for d in (with_inf, signed_zero, constant):
        want = oracle(d, q_ids, g_ids, q_cams, g_cams, "none")
        got = run_backend(monkeypatch, backend, fraction, d, q_ids, g_ids, q_cams, g_cams, protocol="none")
        assert_same(got, want)


# --------------------------------------------------------------------------------------------
# hand-made cases with known answers


def test_hand_made_market1501_and_none():
    # One query (id 0, camera 0); gallery in distance order (already sorted):
    #   g0 id1 cam0 | g1 id0 cam1 | g2 id1 cam0 | g3 id0 cam0 | g4 id0 cam1
    # market1501 removes g3 (same id, same camera) -> kept g0 g1 g2 g4, matches at ranks 2 and 4:
    #   CMC@1 = 0, CMC@2 = 1; AP = (1/2 + 2/4) / 2 = 0.5; INP = 2/4 = 0.5
    # none keeps everything -> matches at ranks 2, 4, 5:
    #   AP = (1/2 + 2/4 + 3/5) / 3 = 1.6/3; INP = 3/5
    dist = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5]])
    q_ids, g_ids = torch.tensor([0]), torch.tensor([1, 0, 1, 0, 0])
    q_cams, g_cams = torch.tensor([0]), torch.tensor([0, 1, 0, 0, 1])
    m = rank_metrics(dist, q_ids, g_ids, q_cams, g_cams, protocol="market1501", ranks=(1, 2, 5))
    assert m.cmc == {1: 0.0, 2: 1.0, 5: 1.0}
    assert m.mAP == pytest.approx(0.5)
    assert m.mINP == pytest.approx(0.5)
    assert (m.num_valid_queries, m.num_skipped_queries) == (1, 0)
    n = rank_metrics(dist, q_ids, g_ids, q_cams, g_cams, protocol="none", ranks=(1, 2, 5))
    assert n.cmc == {1: 0.0, 2: 1.0, 5: 1.0}
    assert n.mAP == pytest.approx(1.6 / 3)
    assert n.mINP == pytest.approx(3 / 5)


def test_hand_made_ties_break_by_gallery_index():
    # All distances equal, so the ranking is the gallery order.
    # query A (id 0): gallery ids [1, 0, 0] -> matches at ranks 2, 3: AP = (1/2 + 2/3)/2 = 7/12,
    #   INP = 2/3, CMC@1 = 0
    # query B (id 1): -> match at rank 1: AP = 1, INP = 1, CMC@1 = 1
    # means: CMC@1 = 1/2, mAP = (7/12 + 1)/2 = 19/24, mINP = (2/3 + 1)/2 = 5/6
    dist = torch.full((2, 3), 0.7)
    q_ids, g_ids = torch.tensor([0, 1]), torch.tensor([1, 0, 0])
    m = rank_metrics(dist, q_ids, g_ids, None, None, protocol="none", ranks=(1, 3))
    assert m.cmc == {1: 0.5, 3: 1.0}
    assert m.mAP == pytest.approx(19 / 24)
    assert m.mINP == pytest.approx(5 / 6)
    # Swapping which tied item is the match changes the answer: gallery ids [0, 1, 0] for query A
    # -> matches at ranks 1, 3: AP = (1 + 2/3)/2 = 5/6, INP = 2/3.
    m2 = rank_metrics(
        dist[:1], torch.tensor([0]), torch.tensor([0, 1, 0]), None, None, protocol="none"
    )
    assert m2.cmc[1] == 1.0
    assert m2.mAP == pytest.approx(5 / 6)
    assert m2.mINP == pytest.approx(2 / 3)


def test_queries_without_match_are_skipped_and_counted():
    # Query 1 has id 9, absent from the gallery: skipped, and the means are those of query 0
    # alone (match at rank 2 of 3: CMC@1 = 0, AP = 1/2, INP = 1/2).
    dist = torch.tensor([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])
    q_ids, g_ids = torch.tensor([0, 9]), torch.tensor([1, 0, 2])
    m = rank_metrics(dist, q_ids, g_ids, None, None, protocol="none", ranks=(1, 2))
    assert (m.num_valid_queries, m.num_skipped_queries) == (1, 1)
    assert m.cmc == {1: 0.0, 2: 1.0}
    assert m.mAP == pytest.approx(0.5)
    assert m.mINP == pytest.approx(0.5)


def test_single_camera_market1501_skips_everything_without_crashing(caplog):
    # With one camera, market1501 removes every positive: no valid query. Documented choice:
    # all scores 0.0, counts tell the story, and a warning is logged.
    dist, q_ids, g_ids, _, _ = random_case(1, "market1501", num_q=10, num_g=20, num_ids=3)
    g_ids[:3] = torch.tensor([0, 1, 2])  # every query identity is present in the gallery
    cams_q, cams_g = torch.zeros(10, dtype=torch.int64), torch.zeros(20, dtype=torch.int64)
    with caplog.at_level(logging.WARNING, logger="indivaid.eval.metrics"):
        m = rank_metrics(dist, q_ids, g_ids, cams_q, cams_g, protocol="market1501")
    assert m.cmc == {1: 0.0, 5: 0.0, 10: 0.0}
    assert (m.mAP, m.mINP) == (0.0, 0.0)
    assert (m.num_valid_queries, m.num_skipped_queries) == (0, 10)
    assert any("no query has a true match" in r.getMessage() for r in caplog.records)
    # The same data under 'none' keeps the same-camera positives.
    n = rank_metrics(dist, q_ids, g_ids, cams_q, cams_g, protocol="none")
    assert n.num_valid_queries == 10


def test_protocol_none_keeps_same_camera_positives():
    # The only positive (g1) shares the query's camera: market1501 drops it, none ranks it 2nd.
    dist = torch.tensor([[0.1, 0.2, 0.3]])
    q_ids, g_ids = torch.tensor([4]), torch.tensor([5, 4, 6])
    q_cams, g_cams = torch.tensor([2]), torch.tensor([2, 2, 2])
    market = rank_metrics(dist, q_ids, g_ids, q_cams, g_cams, protocol="market1501")
    assert (market.num_valid_queries, market.num_skipped_queries) == (0, 1)
    none = rank_metrics(dist, q_ids, g_ids, q_cams, g_cams, protocol="none", ranks=(1, 2))
    assert none.cmc == {1: 0.0, 2: 1.0}
    assert none.mAP == pytest.approx(0.5)


def test_leave_one_out_excludes_only_the_query_itself():
    # Images: 0 and 1 are id 7, 2 is id 8 (its only image), 3 is id 9 (its only image).
    # Each image is at distance 0 from itself; that self-match must not count.
    feats = torch.tensor([[0.0, 0.0], [3.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    dist = distance_matrix(feats, feats)
    ids = torch.tensor([7, 7, 8, 9])
    cams = torch.tensor([0, 0, 0, 0])  # same camera: must not matter for leave_one_out
    m = rank_metrics(dist, ids, ids, cams, cams, protocol="leave_one_out", ranks=(1, 2, 3))
    # Query 0: others at distances 3 (id 7), 1 (id 8), 2 (id 9) -> match at rank 3.
    # Query 1: others at 3 (id 7, img 0), 2 (id 8), sqrt(13) (id 9) -> match at rank 2.
    # Queries 2 and 3 are skipped (single-image identities).
    assert (m.num_valid_queries, m.num_skipped_queries) == (2, 2)
    assert m.cmc == {1: 0.0, 2: 0.5, 3: 1.0}
    assert m.mAP == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert m.mINP == pytest.approx((1 / 3 + 1 / 2) / 2)
    # Without the exclusion, every query would find itself first: check that 'none' does.
    n = rank_metrics(dist, ids, ids, None, None, protocol="none")
    assert n.cmc[1] == 1.0 and n.num_valid_queries == 4


def test_leave_one_out_identical_duplicates_still_count_each_other():
    # Two identical images of one identity: each is the other's (tied, distance 0) match.
    feats = torch.tensor([[1.0, 2.0], [1.0, 2.0], [5.0, 5.0]])
    ids = torch.tensor([0, 0, 1])
    m = rank_metrics(distance_matrix(feats, feats), ids, ids, None, None, protocol="leave_one_out")
    assert m.cmc[1] == 1.0 and m.mAP == 1.0 and m.mINP == 1.0
    assert (m.num_valid_queries, m.num_skipped_queries) == (2, 1)


def test_as_dict_keys_and_frozen():
    dist, q_ids, g_ids, q_cams, g_cams = random_case(2, "market1501")
    m = rank_metrics(dist, q_ids, g_ids, q_cams, g_cams, protocol="market1501")
    assert isinstance(m, RankMetrics)
    assert list(m.as_dict()) == [
        "rank1", "rank5", "rank10", "mAP", "mINP", "num_valid_queries", "num_skipped_queries",
    ]
    for key in ("rank1", "rank5", "rank10", "mAP", "mINP"):
        assert 0.0 <= m.as_dict()[key] <= 1.0
    with pytest.raises(AttributeError):
        m.mAP = 1.0  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# validation


def test_protocol_validation_suggests_the_closest_name():
    assert validate_protocol("leave_one_out") == "leave_one_out"
    with pytest.raises(ValueError, match=r"did you mean 'market1501'") as err:
        validate_protocol("market1510")
    for name in PROTOCOLS:
        assert repr(name) in str(err.value)
    dist = torch.rand(2, 3)
    with pytest.raises(ValueError, match="leave_one_out"):
        rank_metrics(dist, torch.tensor([0, 1]), torch.tensor([0, 1, 2]), None, None, protocol="leave-one-out")
    with pytest.raises(ValueError, match="did you mean 'cosine'"):
        validate_metric("cosin")


def test_argument_errors_are_clear():
    dist = torch.rand(2, 3)
    q, g = torch.tensor([0, 1]), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="query_cams and gallery_cams are required"):
        rank_metrics(dist, q, g, None, None, protocol="market1501")
    with pytest.raises(ValueError, match="square"):
        rank_metrics(dist, q, g, None, None, protocol="leave_one_out")
    with pytest.raises(ValueError, match="gallery_ids == query_ids"):
        rank_metrics(torch.rand(2, 2), q, torch.tensor([1, 0]), None, None, protocol="leave_one_out")
    with pytest.raises(ValueError, match=r"gallery_ids must have shape \(3,\)"):
        rank_metrics(dist, q, torch.tensor([0, 1]), None, None, protocol="none")
    with pytest.raises(TypeError, match="integer tensor"):
        rank_metrics(dist, q.float(), g, None, None, protocol="none")
    with pytest.raises(ValueError, match="ranks"):
        rank_metrics(dist, q, g, None, None, protocol="none", ranks=(0, 1))
    with pytest.raises(ValueError, match="chunk_size"):
        rank_metrics(dist, q, g, None, None, protocol="none", chunk_size=0)


@pytest.mark.parametrize("backend,fraction", BACKENDS)
def test_nan_distances_are_rejected(monkeypatch, backend, fraction):
    dist = torch.rand(3, 4)
    dist[1, 2] = math.nan
    q, g = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="NaN"):
        run_backend(monkeypatch, backend, fraction, dist, q, g, None, None, protocol="none")
    dist[1, 2] = -math.nan
    with pytest.raises(ValueError, match="NaN"):
        run_backend(monkeypatch, backend, fraction, dist, q, g, None, None, protocol="none")


def test_empty_query_set():
    m = rank_metrics(torch.rand(0, 5), torch.zeros(0, dtype=torch.int64), torch.arange(5), None, None, protocol="none")
    assert (m.num_valid_queries, m.num_skipped_queries, m.mAP) == (0, 0, 0.0)


# --------------------------------------------------------------------------------------------
# distance_matrix


def naive_distances(query, gallery, metric, normalize):
    q, g = query.double(), gallery.double()
    if normalize or metric == "cosine":
        q = q / q.norm(dim=1, keepdim=True)
        g = g / g.norm(dim=1, keepdim=True)
    out = torch.empty(len(q), len(g), dtype=torch.float64)
    for i in range(len(q)):
        for j in range(len(g)):
            if metric == "euclidean":
                out[i, j] = ((q[i] - g[j]) ** 2).sum().sqrt()
            else:
                out[i, j] = 1.0 - (q[i] * g[j]).sum()
    return out


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("normalize", [False, True])
def test_distance_matrix_matches_naive_loop(metric, normalize):
    gen = torch.Generator().manual_seed(0)
    query, gallery = torch.randn(5, 16, generator=gen), torch.randn(6, 16, generator=gen)
    got = distance_matrix(query, gallery, metric, normalize=normalize)
    assert got.dtype == torch.float32 and got.shape == (5, 6)
    want = naive_distances(query, gallery, metric, normalize)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_distance_matrix_low_precision_inputs_give_fp32():
    gen = torch.Generator().manual_seed(1)
    query, gallery = torch.randn(4, 8, generator=gen), torch.randn(5, 8, generator=gen)
    for dtype in (torch.bfloat16, torch.float16):
        for metric in ("euclidean", "cosine"):
            got = distance_matrix(query.to(dtype), gallery.to(dtype), metric)
            assert got.dtype == torch.float32
            # Computed from the rounded inputs, in fp32.
            want = naive_distances(query.to(dtype), gallery.to(dtype), metric, False)
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_euclidean_identical_vectors_never_nan():
    gen = torch.Generator().manual_seed(2)
    feats = torch.randn(64, 32, generator=gen) * 1e3 + 5e3  # large norms: heavy cancellation
    dist = distance_matrix(feats, feats)
    assert not torch.isnan(dist).any()
    assert (dist >= 0).all()
    # ~0 up to fp32 cancellation error, small next to the distances between different vectors
    assert dist.diagonal().max() < 1e-3 * dist.median()
    unit = distance_matrix(feats, feats, normalize=True)
    assert not torch.isnan(unit).any() and unit.diagonal().max() < 1e-3
    cos = distance_matrix(feats, feats, "cosine")
    assert not torch.isnan(cos).any() and (cos >= 0).all() and (cos <= 2).all()


def test_distance_matrix_errors():
    with pytest.raises(ValueError, match="feature dimensions differ"):
        distance_matrix(torch.rand(2, 3), torch.rand(2, 4))
    with pytest.raises(ValueError, match="2-D"):
        distance_matrix(torch.rand(3), torch.rand(2, 3))
    with pytest.raises(ValueError, match="valid metrics are"):
        distance_matrix(torch.rand(2, 3), torch.rand(2, 3), "manhattan")  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(5)
    query, gallery = torch.randn(300, 32, generator=gen), torch.randn(900, 32, generator=gen)
    q_ids, g_ids = torch.randint(0, 40, (300,), generator=gen), torch.randint(0, 40, (900,), generator=gen)
    q_cams, g_cams = torch.randint(0, 3, (300,), generator=gen), torch.randint(0, 3, (900,), generator=gen)
    dist_cpu = distance_matrix(query, gallery, normalize=True)
    dist_gpu = distance_matrix(query.cuda(), gallery.cuda(), normalize=True)
    assert dist_gpu.device.type == "cuda"
    torch.testing.assert_close(dist_gpu.cpu(), dist_cpu, atol=1e-5, rtol=1e-5)
    for protocol in PROTOCOLS:
        if protocol == "leave_one_out":
            d, qi, gi, qc, gc = distance_matrix(gallery, gallery), g_ids, g_ids, g_cams, g_cams
        else:
            d, qi, gi, qc, gc = dist_cpu, q_ids, g_ids, q_cams, g_cams
        cpu = rank_metrics(d, qi, gi, qc, gc, protocol=protocol, chunk_size=128)
        gpu = rank_metrics(d.cuda(), qi.cuda(), gi.cuda(), qc.cuda(), gc.cuda(), protocol=protocol, chunk_size=128)
        assert_same(gpu.as_dict(), cpu.as_dict())
