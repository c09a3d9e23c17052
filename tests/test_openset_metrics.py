"""Open-set metrics (BAKS, BAUS, GM, AUROC), the threshold curve and calibration, against a plain
per-query oracle written from the wildlife-datasets definitions, on hand-made and random cases."""

from __future__ import annotations

import json
import math

import pytest
import torch

from indivaid.eval.openset import (Calibration, TopMatch, calibrate, choose_threshold, fit_same_probability,
                                   open_set_metrics, same_probability, threshold_curve, top_match)
from indivaid.inference import decide, rank_identities

# --------------------------------------------------------------------------------------------
# the oracle: one query at a time, straight from the definitions


def removed(protocol: str, i: int, j: int, qid, gid, qcam, gcam) -> bool:
    if protocol == "market1501":
        return qid[i] == gid[j] and qcam[i] == gcam[j]
    if protocol == "leave_one_out":
        return i == j
    return False


def oracle(dist, qid, gid, qcam, gcam, protocol: str, threshold: float) -> dict:
    rows = []
    for i in range(len(qid)):
        kept = [j for j in range(len(gid)) if not removed(protocol, i, j, qid, gid, qcam, gcam)]
        known = any(gid[j] == qid[i] for j in kept)
        if kept:
            j = min(kept, key=lambda c: (dist[i][c], c))
            d, ident = dist[i][j], gid[j]
        else:
            d, ident = math.inf, None
        rows.append({"id": qid[i], "known": known, "d": d, "hit": ident == qid[i],
                     "accepted": ident is not None and d <= threshold})

    def per_identity_mean(rows, value) -> float:
        ids = sorted({r["id"] for r in rows})
        if not ids:
            return math.nan
        return sum(sum(value(r) for r in rows if r["id"] == k) / sum(r["id"] == k for r in rows) for k in ids) / len(ids)

    known = [r for r in rows if r["known"]]
    unknown = [r for r in rows if not r["known"]]
    baks = per_identity_mean(known, lambda r: r["accepted"] and r["hit"])
    baus = per_identity_mean(unknown, lambda r: not r["accepted"])

    def weight(r, group):
        return 1 / sum(x["id"] == r["id"] for x in group) / len({x["id"] for x in group})

    auroc = math.nan
    if known and unknown:
        auroc = sum(weight(u, unknown) * weight(k, known) * (1.0 if u["d"] > k["d"] else 0.5 if u["d"] == k["d"] else 0.0)
                    for u in unknown for k in known)
    return {"BAKS": baks, "BAUS": baus, "GM": math.sqrt(baks * baus), "AUROC": auroc, "rows": rows}


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-9)


def run(dist, qid, gid, qcam=None, gcam=None, *, protocol="none", threshold=0.45):
    t = torch.tensor
    top = top_match(t(dist), t(qid), t(gid), t(qcam) if qcam else None, t(gcam) if gcam else None, protocol=protocol)
    return top, open_set_metrics(top, threshold)


# --------------------------------------------------------------------------------------------
# hand-made cases


DIST = [[0.1, 0.5, 0.3, 0.9],  # id 0: nearest is its own (0.1)
        [0.4, 0.6, 0.7, 0.2],  # id 1: nearest is id 2 (0.2): wrong
        [0.8, 0.9, 0.85, 0.6],  # id 3 (unknown): 0.6 -> new at 0.45
        [0.3, 0.9, 0.9, 0.9],  # id 3 (unknown): 0.3 -> wrongly accepted
        [0.7, 0.5, 0.9, 0.9]]  # id 0: own at 0.5 -> rejected at 0.45
QID, GID = [0, 1, 3, 3, 0], [0, 0, 1, 2]


def test_hand_made_case_worked_out_by_hand():
    top, m = run(DIST, QID, GID, threshold=0.45)
    assert top.known.tolist() == [True, True, False, False, True]
    assert top.identity.tolist() == [0, 2, 2, 0, 0] and top.index.tolist() == [0, 3, 3, 0, 1]
    # known identities 0: (1 + 0) / 2, 1: 0  ->  0.25;  unknown identity 3: (1 + 0) / 2  ->  0.5
    assert m.BAKS == pytest.approx(0.25) and m.BAUS == pytest.approx(0.5)
    assert m.GM == pytest.approx(math.sqrt(0.125))
    # unknown 0.6 beats every known distance; unknown 0.3 beats 0.1 (w 1/4) and 0.2 (w 1/2)
    assert m.AUROC == pytest.approx(0.5 * 1.0 + 0.5 * 0.75)
    assert (m.num_known_queries, m.num_unknown_queries, m.num_known_ids, m.num_unknown_ids) == (3, 2, 2, 1)
    # every identity weighs the same: doubling identity 0's queries changes nothing
    _, m2 = run(DIST + [DIST[0], DIST[4]], QID + [0, 0], GID, threshold=0.45)
    assert (m2.BAKS, m2.BAUS) == pytest.approx((m.BAKS, m.BAUS))


def test_hand_made_market1501_and_leave_one_out_define_unknown_by_what_is_left():
    # market1501: query 0 (id 0, cam 0) keeps its cam-1 gallery image; query 1 (id 1, cam 0) loses its only one
    dist = [[0.2, 0.1, 0.5], [0.9, 0.8, 0.3]]
    top, m = run(dist, [0, 1], [0, 0, 1], [0, 0], [1, 0, 0], protocol="market1501", threshold=0.25)
    assert top.known.tolist() == [True, False]
    assert top.index.tolist() == [0, 1] and top.distance.tolist() == pytest.approx([0.2, 0.8])  # same-cam 0.1, 0.3 removed
    assert (m.BAKS, m.BAUS) == (1.0, 1.0)
    # leave-one-out: a single-image identity is unknown; the self-match never counts
    d = [[0.0, 0.2, 0.5], [0.2, 0.0, 0.4], [0.5, 0.4, 0.0]]
    top, m = run(d, [7, 7, 8], [7, 7, 8], protocol="leave_one_out", threshold=0.3)
    assert top.known.tolist() == [True, True, False] and top.index.tolist() == [1, 0, 1]
    assert (m.BAKS, m.BAUS, m.AUROC) == (1.0, 1.0, 1.0)
    # nothing left at all: distance inf, never accepted
    top, m = run([[0.1]], [5], [5], protocol="leave_one_out", threshold=10.0)
    assert top.distance.tolist() == [math.inf] and top.identity.tolist() == [-1] and m.BAUS == 1.0
    assert math.isnan(m.BAKS) and math.isnan(m.GM) and math.isnan(m.AUROC)


def test_ties_go_to_the_lower_gallery_index_and_nan_is_refused():
    top, _ = run([[0.3, 0.3, 0.3]], [1], [2, 1, 1])
    assert top.index.tolist() == [0] and not bool(top.correct[0])
    with pytest.raises(ValueError, match="NaN"):
        run([[float("nan"), 0.1]], [0], [0, 1])
    with pytest.raises(ValueError, match="market1501"):
        run([[0.1]], [0], [0], protocol="market1501")


# --------------------------------------------------------------------------------------------
# random cases against the oracle


@pytest.mark.parametrize("protocol", ["none", "market1501", "leave_one_out"])
@pytest.mark.parametrize("seed", range(6))
def test_random_cases_agree_with_the_oracle(protocol: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    nq = int(torch.randint(5, 40, (1,), generator=g))
    ng = nq if protocol == "leave_one_out" else int(torch.randint(3, 30, (1,), generator=g))
    qid = torch.randint(0, 9, (nq,), generator=g)
    gid = qid.clone() if protocol == "leave_one_out" else torch.randint(0, 6, (ng,), generator=g)  # ids 6-8: unknown
    qcam, gcam = torch.randint(0, 2, (nq,), generator=g), torch.randint(0, 2, (ng,), generator=g)
    # coarse values make ties (within a row and across queries) common
    dist = torch.randint(0, 6, (nq, ng), generator=g).float() / 5
    if seed % 2:
        dist[0, :] = float("inf")  # inf distances are allowed
    lists = [x.tolist() for x in (dist, qid, gid, qcam, gcam)]
    top = top_match(dist, qid, gid, qcam, gcam, protocol=protocol, chunk_size=7)
    for threshold in (-1.0, 0.2, 0.4, 0.5, 2.0):
        want = oracle(*lists, protocol, threshold)
        got = open_set_metrics(top, threshold)
        for key in ("BAKS", "BAUS", "GM", "AUROC"):
            assert same(getattr(got, key), want[key]), (key, threshold, getattr(got, key), want[key])
        assert top.known.tolist() == [r["known"] for r in want["rows"]]
        assert top.distance.tolist() == [r["d"] for r in want["rows"]]


@pytest.mark.parametrize("seed", range(4))
def test_curve_equals_pointwise_metrics_and_its_maximum_is_the_best_threshold(seed: int):
    g = torch.Generator().manual_seed(100 + seed)
    dist = torch.rand(60, 25, generator=g)
    qid, gid = torch.randint(0, 12, (60,), generator=g), torch.randint(0, 8, (25,), generator=g)
    top = top_match(dist, qid, gid, protocol="none")
    curve = threshold_curve(top)
    for t, baks, baus in zip(curve.thresholds.tolist(), curve.BAKS.tolist(), curve.BAUS.tolist()):
        m = open_set_metrics(top, t)
        assert (m.BAKS, m.BAUS) == pytest.approx((baks, baus))
    # brute force over every distinct decision (thresholds at each top-1 distance and below all)
    cands = [-1.0] + sorted(set(top.distance.tolist()))
    best = max(open_set_metrics(top, t).GM for t in cands)
    j = choose_threshold(curve)
    assert float(curve.GM[j]) == pytest.approx(best)
    assert open_set_metrics(top, float(curve.thresholds[j])).GM == pytest.approx(best)


def test_target_recall_picks_the_loosest_threshold_that_reaches_it():
    g = torch.Generator().manual_seed(7)
    top = top_match(torch.rand(80, 30, generator=g), torch.randint(0, 15, (80,), generator=g),
                    torch.randint(0, 10, (30,), generator=g), protocol="none")
    curve = threshold_curve(top)
    for r in (0.5, 0.8, 0.95):
        j = choose_threshold(curve, target_new_recall=r)
        assert float(curve.BAUS[j]) >= r and (j + 1 == len(curve.thresholds) or float(curve.BAUS[j + 1]) < r)
    cal = calibrate(top, target_new_recall=0.8)
    assert cal.val.BAUS >= 0.8 and "0.8" in cal.rule
    closed = top_match(torch.rand(4, 4, generator=g), torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3]),
                       protocol="none")
    with pytest.raises(ValueError, match="unknown_fraction"):
        calibrate(closed)


def test_calibration_round_trips_through_json_and_probability_recovers_a_known_mapping():
    g = torch.Generator().manual_seed(3)
    n = 20000
    d = torch.rand(n, generator=g, dtype=torch.float64) * 1.2
    right = torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(3.0 - 6.0 * d)
    ids = torch.arange(n)
    top = TopMatch(d, torch.where(right, ids, -5), torch.zeros(n, dtype=torch.long), ids, torch.rand(n, generator=g) < 0.7)
    a, b = fit_same_probability(TopMatch(d, top.identity, top.index, ids, torch.ones(n, dtype=torch.bool)))
    assert a == pytest.approx(3.0, abs=0.25) and b == pytest.approx(-6.0, abs=0.5)
    flipped = TopMatch(d, torch.where(~right, ids, -5), top.index, ids, torch.ones(n, dtype=torch.bool))
    a, b = fit_same_probability(flipped)  # farther looks more likely right: no evidence, so the base rate
    assert b == 0.0 and torch.sigmoid(torch.tensor(a)) == pytest.approx(float((~right).double().mean()))
    cal = calibrate(top)
    back = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert back.threshold == cal.threshold and back.val == cal.val and back.probability == cal.probability
    assert torch.equal(back.curve.GM.nan_to_num(-1), cal.curve.GM.nan_to_num(-1))
    # a decision is KNOWN at or below the threshold, and its confidence is P(same) or 1 - P(same)
    dd = torch.tensor([cal.threshold - 0.1, cal.threshold, cal.threshold + 0.1], dtype=torch.float64)
    known, conf = decide(dd, cal.threshold, cal.probability)
    p = same_probability(dd, cal.probability).tolist()
    assert known.tolist() == [True, True, False] and conf.tolist() == pytest.approx([p[0], p[1], 1 - p[2]])
    assert p[0] > p[2]  # closer is more likely the same individual


def test_rank_identities_gives_one_row_per_individual():
    g = torch.Generator().manual_seed(5)
    names = ["b", "a", "c", "a", "b", "b", "d"]
    dist = torch.randint(0, 5, (6, len(names)), generator=g).double()
    r = rank_identities(dist, names, k=3)
    assert r.identities == ["a", "b", "c", "d"] and r.images.tolist() == [2, 3, 1, 1]
    for i in range(dist.shape[0]):
        per = {n: [float(dist[i, j]) for j in range(len(names)) if names[j] == n] for n in r.identities}
        want = sorted(r.identities, key=lambda n: (min(per[n]), n))[:3]
        assert [r.identities[int(c)] for c in r.codes[i]] == want
        assert r.best[i].tolist() == [min(per[n]) for n in want]
        assert r.mean[i].tolist() == pytest.approx([sum(per[n]) / len(per[n]) for n in want])
        for c, j in zip(r.codes[i], r.best_image[i]):
            name = r.identities[int(c)]
            first = min(k for k in range(len(names)) if names[k] == name and float(dist[i, k]) == min(per[name]))
            assert int(j) == first
