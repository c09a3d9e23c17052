"""harness.leaderboard on hand-built results folders: numbers, statistics, marks, formats, plots, CLI.

The fixture sweeps are written as trials.parquet + manifest.json the way harness.sweep writes them,
with values chosen so the expected leaderboard can be worked out by hand (see ``golden_rows``).
"""

from __future__ import annotations

import itertools
import json
import math
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from harness import leaderboard as lb

B = lb.N_BOOT
P_FLOOR = 2 / (B + 1)  # the smallest p the bootstrap gives: every resampled Δ* on one side of 0
WRITTEN_AT = 1_800_000_000.0  # 2027-01-15 08:00 UTC


# ---------------------------------------------------------------------------------------------
# Fixture helpers
# ---------------------------------------------------------------------------------------------


def _metrics(prefix: str, mAP: float | None) -> dict[str, float | None]:
    """Rank-1/5/10 and mINP tied to mAP by fixed offsets, so every column's expectation is mAP-derived."""
    if mAP is None:
        return {f"{prefix}_{m}": None for m in lb.METRICS}
    return {f"{prefix}_mAP": mAP, f"{prefix}_rank1": mAP + 0.10, f"{prefix}_rank5": mAP + 0.20,
            f"{prefix}_rank10": mAP + 0.25, f"{prefix}_mINP": mAP - 0.10}


def trial(dataset: str, method: str, phase: str, *, seed: int = 0, test: float | None = None, val: float | None = None,
          status: str = "completed", params: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """One trials.parquet row in harness.sweep's columns (gpu_s 1800 = 0.5 GPU-h; failures cost 0)."""
    failed = status == "error"
    row: dict[str, Any] = {
        "sweep_id": None, "dataset": dataset, "method": method, "phase": phase, "seed": seed,
        "trial_id": f"{phase}-{dataset}-{method}-{seed}-{extra.pop('tag', 0)}", "node_id": "node0",
        "split_hash": "split-a", "protocol": "none", "status": status,
        "stop_reason": {"completed": "completed", "stopped": "asha_stopped", "error": "error"}[status],
        "epochs_run": 10, "wall_s": 1800.0, "gpu_s": 0.0 if failed else 1800.0,
        "images_per_s": None if status == "stopped" else (math.nan if failed or method == "zeroshot"
                                                           else (120.0 if phase == "final" else 60.0)),
        "error": "RuntimeError: CUDA out of memory" if failed else None, "created_at": WRITTEN_AT - 100,
        "config_path": "run/config.json", "split_path": "run/split.csv", "checkpoint_path": None,
        **_metrics("val", val if val is not None else test), **_metrics("test", test if phase == "final" else None),
        "best_val_mAP": 0.0 if failed else (val if val is not None else test),
    }
    for k, v in (params or {}).items():
        row[f"param.{k}"] = v
    row.update(extra)
    return row


def write_sweep(root: Path, name: str, rows: list[dict[str, Any]], *, written_at: float = WRITTEN_AT,
                schema_version: Any = 1, manifest: bool = True) -> Path:
    """A sweep folder (results/<name>/) as harness.sweep leaves it: trials.parquet, manifest.json, sweep.yaml."""
    d = root / name
    d.mkdir(parents=True)
    pl.DataFrame([{**r, "sweep_id": name} for r in rows], infer_schema_length=None).write_parquet(d / "trials.parquet")
    (d / "sweep.yaml").write_text(f"name: {name}\n")
    if manifest:
        (d / "manifest.json").write_text(json.dumps({
            "schema_version": schema_version, "sweep": {"name": name}, "indivaid": "0.1.0",
            "git_commit": "abc1234def5678", "written_at": written_at}))
    return d


def golden_rows() -> list[dict[str, Any]]:
    """Two datasets, five final seeds (MIN_PAIRS) per trained method. Lion: CLIP-ReID 51, 51, 52, 53, 53
    (52 ± 1); IndivAID beats it by 10, 14, 11, 12, 13 points on seeds 0-4: 61, 65, 63, 65, 66 (64 ± 2;
    Δ +12.0, every difference positive, so p at its floor); zero-shot 20; one IndivAID search trial
    failed. Nyala: IndivAID equals CLIP-ReID on every seed, 40, 40, 42, 44, 44 (42 ± 2; Δ 0, p = 1);
    IndivAID (mean fusion) has only search trials (fallback, val mAP 45); no zero-shot run."""
    clip, ind = {"stage2.lr": 5e-6}, {"stage2.lr": 8e-6, "fusion.heads": 4}
    rows = []
    for s, (c, i) in enumerate([(0.51, 0.61), (0.51, 0.65), (0.52, 0.63), (0.53, 0.65), (0.53, 0.66)]):
        rows += [trial("lion", "clipreid", "final", seed=s, test=c, params=clip),
                 trial("lion", "indivaid", "final", seed=s, test=i, params=ind)]
    for s, v in enumerate([0.40, 0.40, 0.42, 0.44, 0.44]):
        rows += [trial("nyala", "clipreid", "final", seed=s, test=v, params=clip),
                 trial("nyala", "indivaid", "final", seed=s, test=v, params=ind)]
    rows += [
        trial("lion", "clipreid", "search", val=0.55, params=clip, tag=1),
        trial("lion", "clipreid", "search", val=0.30, status="stopped", params={"stage2.lr": 1e-4}, tag=2),
        trial("lion", "indivaid", "search", val=0.62, params=ind, tag=1),
        trial("lion", "indivaid", "search", status="error", params={"stage2.lr": 2e-5, "fusion.heads": 8}, tag=2),
        trial("lion", "zeroshot", "search", val=0.21),
        trial("lion", "zeroshot", "final", test=0.20),
        trial("nyala", "clipreid", "search", val=0.45, params=clip, tag=1),
        trial("nyala", "indivaid", "search", val=0.46, params=ind, tag=1),
        trial("nyala", "indivaid-mean", "search", val=0.45, params={"stage2.lr": 1e-5}, tag=1),
        trial("nyala", "indivaid-mean", "search", val=0.30, params={"stage2.lr": 3e-6}, tag=2),
    ]
    return rows


@pytest.fixture
def golden(tmp_path: Path) -> Path:
    results = tmp_path / "results"
    write_sweep(results, "golden", golden_rows())
    return results


def board_of(results: Path, metric: str = "mAP", keep_all: bool = False) -> pl.DataFrame:
    loaded = lb.load_results([results])
    trials = loaded.trials if keep_all else lb.select_newest(loaded.trials)
    return lb.aggregate(trials, metric, keep_all=keep_all)


def row(board: pl.DataFrame, dataset: str, method: str, sweep: str | None = None) -> dict[str, Any]:
    sel = board.filter((pl.col("dataset") == dataset) & (pl.col("method") == method))
    if sweep is not None:
        sel = sel.filter(pl.col("sweep_id") == sweep)
    assert sel.height == 1, sel
    return sel.row(0, named=True)


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = lb.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def test_holm_hand_computed_with_monotonicity_and_cap():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> raised to 0.06 (monotone)
    assert lb.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert lb.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # 0.5*2 = 1.0; 0.6 raised to 1.0; capped at 1
    assert lb.holm([0.2]) == pytest.approx([0.2])
    assert lb.holm([]) == []


def test_paired_bootstrap_known_cases():
    delta, p = lb.paired_bootstrap([0.6, 0.63, 0.66], [0.5, 0.52, 0.54])
    assert delta == pytest.approx(0.11) and p == pytest.approx(P_FLOOR)  # every Δ* > 0
    assert lb.paired_bootstrap([0.4, 0.5, 0.6], [0.4, 0.5, 0.6]) == (0.0, 1.0)  # identical: every Δ* = 0
    again = lb.paired_bootstrap([0.5, 0.4], [0.6, 0.3], rng_seed=3)
    assert lb.paired_bootstrap([0.5, 0.4], [0.6, 0.3], rng_seed=3) == again  # fixed RNG: deterministic
    with pytest.raises(ValueError):
        lb.paired_bootstrap([0.5], [0.4])


@pytest.mark.parametrize("d", [[2.0, -1.0], [0.3, -0.1, -0.5], [1.0, 0.5, -2.0, 0.25]])
def test_paired_bootstrap_matches_exact_resampling_distribution(d):
    """Oracle: enumerate all n^n equally likely resamples of the pairs; the p from B = 10,000 draws must
    agree with the exact one within Monte Carlo error (4 sigma)."""
    n = len(d)
    means = [sum(d[i] for i in idx) / n for idx in itertools.product(range(n), repeat=n)]
    le = sum(m <= 1e-12 for m in means) / len(means)
    ge = sum(m >= -1e-12 for m in means) / len(means)
    exact = min(1.0, 2 * min(le, ge))
    _, p = lb.paired_bootstrap(np.asarray(d), np.zeros(n))
    assert abs(p - exact) < 4 * 2 * math.sqrt(0.25 / B) + 2 / B, (p, exact)


# ---------------------------------------------------------------------------------------------
# The board
# ---------------------------------------------------------------------------------------------


def test_board_numbers_significance_and_holm(golden: Path):
    board = board_of(golden)
    clip, ind = row(board, "lion", "clipreid"), row(board, "lion", "indivaid")
    assert (clip["n"], ind["n"]) == (5, 5) and clip["source"] == ind["source"] == lb.SOURCE_TEST
    assert clip["mAP_mean"] == pytest.approx(52.0) and clip["mAP_std"] == pytest.approx(1.0)  # ddof = 1: 4 / 4
    assert ind["mAP_mean"] == pytest.approx(64.0) and ind["mAP_std"] == pytest.approx(2.0)  # (9+1+1+1+4) / 4
    assert ind["rank1_mean"] == pytest.approx(74.0) and ind["mINP_mean"] == pytest.approx(54.0)
    assert ind["delta"] == pytest.approx(12.0) and ind["n_pairs"] == lb.MIN_PAIRS == 5
    # IndivAID's family: lion (p at its floor) and nyala (p = 1): Holm doubles the smaller one.
    assert ind["p"] == pytest.approx(P_FLOOR) and ind["p_holm"] == pytest.approx(2 * P_FLOOR)
    assert ind["significant"] is True and ind["test"] == "*"
    same = row(board, "nyala", "indivaid")
    assert same["delta"] == pytest.approx(0.0) and same["p"] == 1.0 and same["p_holm"] == 1.0
    assert same["significant"] is False and same["test"] == "n.s." and same["n_pairs"] == 5
    assert ind["note"] is None and same["note"] is None
    assert clip["test"] == "ref" and clip["delta"] is None
    assert ind["best_config"] == "fusion.heads=4, stage2.lr=8e-06" and clip["best_config"] == "stage2.lr=5e-06"
    zs = row(board, "lion", "zeroshot")
    assert zs["n"] == 1 and zs["mAP_std"] is None and zs["delta"] == pytest.approx(-32.0)
    assert zs["test"] == "n/a" and zs["p"] is None and "no training" in zs["note"]


def test_noisy_difference_is_not_significant_and_one_seed_is_not_tested(tmp_path: Path):
    rows = []
    for s, (c, i) in enumerate([(0.50, 0.53), (0.52, 0.50), (0.54, 0.55), (0.56, 0.535),
                                (0.58, 0.57)]):  # Δ = +3, -2, +1, -2.5, -1: mean -0.3
        rows += [trial("atrw", "clipreid", "final", seed=s, test=c), trial("atrw", "indivaid", "final", seed=s, test=i)]
    rows += [trial("lion", "clipreid", "final", seed=0, test=0.5), trial("lion", "indivaid", "final", seed=0, test=0.6),
             trial("lion", "clipreid", "final", seed=1, test=0.5)]  # IndivAID's seed 1 never ran: one pair
    write_sweep(tmp_path, "noisy", rows)
    board = board_of(tmp_path)
    noisy = row(board, "atrw", "indivaid")
    assert noisy["n_pairs"] == 5 and noisy["delta"] == pytest.approx(-0.3)
    assert noisy["p"] > 0.5 and noisy["test"] == "n.s." and noisy["significant"] is False
    one = row(board, "lion", "indivaid")
    assert one["n_pairs"] == 1 and one["delta"] == pytest.approx(10.0) and one["p"] is None and one["test"] == "n/a"
    assert one["note"] == "1 paired seed: not tested (needs 5)"
    assert noisy["p_holm"] == pytest.approx(noisy["p"])  # a family of one: Holm changes nothing


def test_fewer_than_min_pairs_show_the_paired_delta_untested(tmp_path: Path):
    """3 and 4 paired seeds whose differences share a sign: the bootstrap would put p at its floor
    (a meaningless `*`), so Δ is shown as the mean paired difference, test n/a, and the rows stay out
    of the Holm family (the one 5-seed comparison is adjusted alone)."""
    assert lb.MIN_PAIRS == 5
    rows = []
    for s, c in enumerate([0.50, 0.52, 0.54, 0.70]):  # CLIP-ReID seed 3 has no IndivAID partner: 3 pairs
        rows.append(trial("lion", "clipreid", "final", seed=s, test=c))
    for s, i in enumerate([0.60, 0.63, 0.66]):  # beats CLIP-ReID by 10, 11, 12 points
        rows.append(trial("lion", "indivaid", "final", seed=s, test=i))
    for s in range(4):  # 4 pairs, every one +5 points
        rows += [trial("atrw", "clipreid", "final", seed=s, test=0.40 + 0.01 * s),
                 trial("atrw", "indivaid", "final", seed=s, test=0.45 + 0.01 * s)]
    for s in range(5):  # 5 pairs, every one +10 points: tested
        rows += [trial("nyala", "clipreid", "final", seed=s, test=0.30), trial("nyala", "indivaid", "final", seed=s,
                                                                              test=0.40)]
    write_sweep(tmp_path, "few", rows)
    board = board_of(tmp_path)

    three = row(board, "lion", "indivaid")
    assert three["n_pairs"] == 3 and three["delta"] == pytest.approx(11.0)  # mean(10, 11, 12), not 63 - 56.5
    assert three["p"] is None and three["p_holm"] is None and three["significant"] is None
    assert three["test"] == "n/a" and three["note"] == "3 paired seeds: not tested (needs 5)"
    four = row(board, "atrw", "indivaid")
    assert four["n_pairs"] == 4 and four["delta"] == pytest.approx(5.0) and four["p"] is None
    assert four["test"] == "n/a" and four["note"] == "4 paired seeds: not tested (needs 5)"
    five = row(board, "nyala", "indivaid")
    assert five["n_pairs"] == 5 and five["delta"] == pytest.approx(10.0) and five["note"] is None
    assert five["p"] == pytest.approx(P_FLOOR) and five["p_holm"] == pytest.approx(P_FLOOR)  # a family of one
    assert five["test"] == "*"
    # the function itself still takes 3 pairs (and gives the degenerate floor the board now refuses to show)
    assert lb.paired_bootstrap([0.60, 0.63, 0.66], [0.50, 0.52, 0.54]) == (pytest.approx(0.11), pytest.approx(P_FLOOR))

    header, cells = lb.display_rows(board.filter(pl.col("kind") == "result"), False)
    shown = {(c[0], c[1]): c for c in cells}
    delta_col, p_col = header.index("Δ mAP vs CLIP-ReID (pp)"), header.index("p (Holm)")
    assert shown[("Lion", "IndivAID")][delta_col] == "+11.0 n/a" and shown[("Lion", "IndivAID")][p_col] == lb.DASH
    assert shown[("ATRW", "IndivAID")][delta_col] == "+5.0 n/a"
    assert shown[("Nyala", "IndivAID")][delta_col] == "+10.0 *"
    help_text = " ".join(lb.build_parser().format_help().split())
    assert "at least 5 paired seeds" in help_text and "at least 5 of the same seeds" in help_text


def test_missing_cells_and_failed_trials(golden: Path):
    board = board_of(golden)
    missing = row(board, "nyala", "zeroshot")  # zero-shot ran on lion only
    assert missing["source"] is None and missing["trials"] == 0 and missing["mAP_mean"] is None
    ind = row(board, "lion", "indivaid")
    assert (ind["trials"], ind["errors"]) == (7, 1)  # 5 final + 2 search, one failed
    assert ind["gpu_hours"] == pytest.approx(3.0)  # 6 x 1800 s; the failure cost nothing
    assert ind["images_per_s"] == pytest.approx(110.0)  # (5 x 120 + 60) / 6: the NaN of the failure is skipped
    clip = row(board, "lion", "clipreid")
    assert (clip["trials"], clip["errors"], clip["stopped"]) == (7, 0, 1)
    assert row(board, "lion", "zeroshot")["images_per_s"] is None  # NaN only
    only = board.filter((pl.col("dataset") == "nyala") & (pl.col("method") == "zeroshot"))
    header, cells = lb.display_rows(only, False)
    assert cells[0][header.index("mAP")] == lb.DASH and cells[0][header.index("Source")] == lb.DASH


def test_search_only_method_falls_back_to_best_validation_trial(golden: Path):
    fb = row(board_of(golden), "nyala", "indivaid-mean")
    assert fb["source"] == lb.SOURCE_VAL and fb["n"] == 1 and fb["mAP_mean"] == pytest.approx(45.0)
    assert fb["rank1_mean"] == pytest.approx(55.0) and fb["best_config"] == "stage2.lr=1e-05"
    assert fb["delta"] is None and fb["p"] is None and fb["test"] == "n/a" and "validation" in fb["note"]
    md = lb.render_markdown(board_of(golden))
    assert f"| IndivAID (mean fusion) {lb.FALLBACK_MARK} | val (best search trial) |" in md


def test_mean_rows_cover_datasets_where_clipreid_has_results(golden: Path):
    means = board_of(golden).filter(pl.col("dataset") == "mean")
    by = {r["method"]: r for r in means.iter_rows(named=True)}
    assert set(by) == {"zeroshot", "clipreid", "indivaid"}  # indivaid-mean has no test rows
    assert by["clipreid"]["mAP_mean"] == pytest.approx(47.0) and by["indivaid"]["mAP_mean"] == pytest.approx(53.0)
    assert by["indivaid"]["delta"] == pytest.approx(6.0) and by["indivaid"]["source"] == "mean of 2 datasets (test)"
    assert by["zeroshot"]["source"] == "mean of 1 dataset (test)" and by["zeroshot"]["delta"] == pytest.approx(-32.0)


def test_different_splits_are_not_tested(tmp_path: Path):
    rows = []
    for s in range(3):
        rows += [trial("atrw", "clipreid", "final", seed=s, test=0.5),
                 trial("atrw", "indivaid", "final", seed=s, test=0.6, split_hash="split-b")]
    write_sweep(tmp_path, "splits", rows)
    r = row(board_of(tmp_path), "atrw", "indivaid")
    assert r["delta"] == pytest.approx(10.0) and r["p"] is None and "different splits" in r["note"]


def test_newest_sweep_wins_unless_all(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    old = [trial("lion", m, "final", seed=s, test=0.3) for m in ("clipreid", "indivaid") for s in range(2)]
    new = [trial("lion", "indivaid", "final", seed=s, test=0.7, created_at=1.0) for s in range(2)]  # old trial times,
    write_sweep(tmp_path, "first", old, written_at=WRITTEN_AT)  # ... but the newer manifest: written_at decides
    write_sweep(tmp_path, "rerun", new, written_at=WRITTEN_AT + 3600)
    board = board_of(tmp_path)
    newest = row(board, "lion", "indivaid")
    assert newest["sweep_id"] == "rerun" and newest["mAP_mean"] == pytest.approx(70.0)
    assert row(board, "lion", "clipreid")["sweep_id"] == "first"  # the rerun did not run CLIP-ReID: kept
    assert row(board, "lion", "indivaid")["delta"] == pytest.approx(40.0)
    every = board_of(tmp_path, keep_all=True)
    assert row(every, "lion", "indivaid", "first")["mAP_mean"] == pytest.approx(30.0)
    assert row(every, "lion", "indivaid", "rerun")["mAP_mean"] == pytest.approx(70.0)
    assert row(every, "lion", "indivaid", "rerun")["delta"] is None  # no CLIP-ReID inside that sweep
    assert row(every, "lion", "indivaid", "first")["delta"] == pytest.approx(0.0)
    code, out, _ = run_main([str(tmp_path), "--all", "--format", "markdown", "--no-report"], capsys)
    assert code == 0 and "| Sweep |" in out
    assert "| first | Lion | IndivAID |" in out and "| rerun | Lion | IndivAID |" in out


def test_tolerates_missing_and_all_null_columns(tmp_path: Path):
    """No params, no final phase, no status/cost columns, Null-typed metric columns."""
    d = tmp_path / "bare"
    d.mkdir()
    pl.DataFrame({"dataset": ["atrw", "atrw"], "method": ["indivaid", "indivaid"], "phase": ["search", "search"],
                  "val_mAP": [0.3, 0.4], "best_val_mAP": [0.3, 0.4], "test_mAP": [None, None],
                  "images_per_s": [None, None]}).write_parquet(d / "trials.parquet")
    (d / "manifest.json").write_text(json.dumps({"schema_version": 1, "sweep": {"name": "bare"}, "written_at": 1.0}))
    board = board_of(tmp_path)
    r = row(board, "atrw", "indivaid")
    assert r["source"] == lb.SOURCE_VAL and r["mAP_mean"] == pytest.approx(40.0) and r["best_config"] == "defaults"
    assert r["trials"] == 2 and r["rank1_mean"] is None
    assert lb.render_plots(board, lb.load_results([tmp_path]).trials, "mAP").keys() == {"leaderboard-mAP.png"}


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2 with one `error:` line
# ---------------------------------------------------------------------------------------------


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_unknown_schema_version_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    d = write_sweep(tmp_path, "future", golden_rows(), schema_version=99)
    code, out, err = run_main([str(tmp_path), "--no-report"], capsys)
    line = _error_line(err)
    assert code == 2 and not out
    assert str(d / "manifest.json") in line and "schema_version 99" in line and "schema_version 1" in line


def test_missing_manifest_says_the_sweep_did_not_finish(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    d = write_sweep(tmp_path, "partial", golden_rows(), manifest=False)
    code, _, err = run_main([str(d), "--no-report"], capsys)
    line = _error_line(err)
    assert code == 2 and str(d / "manifest.json") in line and "--resume" in line


def test_unreadable_parquet_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    d = write_sweep(tmp_path, "broken", golden_rows())
    (d / "trials.parquet").write_bytes(b"not a parquet file")
    code, _, err = run_main([str(tmp_path), "--no-report"], capsys)
    assert code == 2 and str(d / "trials.parquet") in _error_line(err)


def test_no_results_says_where_it_looked_and_how_to_make_some(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    code, _, err = run_main([str(tmp_path / "empty"), "--no-report"], capsys)
    line = _error_line(err)
    assert code == 2 and str(tmp_path / "empty") in line and "python -m harness.sweep sweeps/smoke.yaml" in line


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------

GOLDEN_TABLE = """\
| Dataset | Method | Source | n | Rank-1 | Rank-5 | Rank-10 | mAP | mINP | Δ mAP vs CLIP-ReID (pp) | p (Holm) | Best config | Trials | Errors | GPU-h | img/s |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
| Lion | zero-shot CLIP | test (final runs) | 1 | 30.0 | 40.0 | 45.0 | 20.0 | 10.0 | -32.0 n/a | — | defaults | 2 | 0 | 1.00 | — |
| Lion | CLIP-ReID | test (final runs) | 5 | 62.0 ± 1.0 | 72.0 ± 1.0 | 77.0 ± 1.0 | 52.0 ± 1.0 | 42.0 ± 1.0 | ref | — | stage2.lr=5e-06 | 7 | 0 | 3.50 | 110 |
| Lion | IndivAID | test (final runs) | 5 | 74.0 ± 2.0 | 84.0 ± 2.0 | 89.0 ± 2.0 | 64.0 ± 2.0 | 54.0 ± 2.0 | +12.0 * | <0.001 | fusion.heads=4, stage2.lr=8e-06 | 7 | 1 | 3.00 | 110 |
| Lion | IndivAID (mean fusion) | — | — | — | — | — | — | — | — | — | — | 0 | 0 | — | — |
| Nyala | zero-shot CLIP | — | — | — | — | — | — | — | — | — | — | 0 | 0 | — | — |
| Nyala | CLIP-ReID | test (final runs) | 5 | 52.0 ± 2.0 | 62.0 ± 2.0 | 67.0 ± 2.0 | 42.0 ± 2.0 | 32.0 ± 2.0 | ref | — | stage2.lr=5e-06 | 6 | 0 | 3.00 | 110 |
| Nyala | IndivAID | test (final runs) | 5 | 52.0 ± 2.0 | 62.0 ± 2.0 | 67.0 ± 2.0 | 42.0 ± 2.0 | 32.0 ± 2.0 | +0.0 n.s. | 1.000 | fusion.heads=4, stage2.lr=8e-06 | 6 | 0 | 3.00 | 110 |
| Nyala | IndivAID (mean fusion) † | val (best search trial) | 1 | 55.0 | 65.0 | 70.0 | 45.0 | 35.0 | — | — | stage2.lr=1e-05 | 2 | 0 | 1.00 | 60 |
| mean | zero-shot CLIP | mean of 1 dataset (test) | — | 30.0 | 40.0 | 45.0 | 20.0 | 10.0 | -32.0 n/a | — | — | — | — | — | — |
| mean | CLIP-ReID | mean of 2 datasets (test) | — | 57.0 | 67.0 | 72.0 | 47.0 | 37.0 | ref | — | — | — | — | — | — |
| mean | IndivAID | mean of 2 datasets (test) | — | 63.0 | 73.0 | 78.0 | 53.0 | 43.0 | +6.0 n/a | — | — | — | — | — | — |
"""


def test_markdown_golden(golden: Path):
    loaded = lb.load_results([golden])
    md = lb.render_markdown(board_of(golden), lb.published_rows(lb.load_published(), ["lion", "nyala"]), loaded.sweeps)
    head = "# Leaderboard\n\nSweeps: `golden` (2027-01-15 08:00 UTC, commit abc1234).\n\n"
    assert md.startswith(head + GOLDEN_TABLE), md
    legend = md[len(head + GOLDEN_TABLE):]
    for needle in ("† selected on validation", "paired bootstrap over seeds, B = 10,000", "Holm-corrected per method",
                   "α = 0.05", "`n.s.` = not significant", "sample std (ddof = 1)", "Published:",
                   "`n/a` = not tested (fewer than 5 paired seeds, no training, or different splits)",
                   "The test needs 5 paired seeds because the bootstrap of fewer is degenerate: too few distinct "
                   "resamples (10 for 3 seeds, 35 for 4)"):
        assert needle in legend
    assert "fewer than 2 paired seeds" not in md and "needs 2" not in md
    assert "## Published" not in md  # no published numbers for Lion or Nyala


def test_published_rows_only_known_numbers_with_citations(tmp_path: Path):
    pub = lb.load_published()
    cells = {(r["dataset"], r["method"], m): r[m]
             for r in pub.iter_rows(named=True) for m in lb.METRICS if r[m] is not None}
    assert cells == {("stoat", "indivaid", "rank1"): 71.82, ("stoat", "indivaid", "mAP"): 52.54,
                     ("msmt17", "clipreid", "rank1"): 88.7, ("msmt17", "clipreid", "mAP"): 73.4,
                     ("market1501", "clipreid", "rank1"): 95.5, ("market1501", "clipreid", "mAP"): 89.6,
                     ("dukemtmc", "clipreid", "rank1"): 90.0, ("dukemtmc", "clipreid", "mAP"): 82.5,
                     ("veri776", "clipreid", "rank1"): 97.4, ("veri776", "clipreid", "mAP"): 83.3}
    assert pub["citation"].null_count() == 0
    shown = lb.published_rows(pub, ["stoat", "lion"])
    assert shown["dataset"].to_list() == ["stoat", "stoat"] and shown["method"].to_list() == ["clipreid", "indivaid"]
    assert all("like-for-like: no" in n for n in shown["note"]) and "7 (mAP) and 8 (Rank-1)" in shown["note"][0]
    assert lb.published_rows(pub, ["stoat"], "none").height == 0
    assert set(lb.published_rows(pub, [], "all")["dataset"]) == {"stoat", "msmt17", "market1501", "dukemtmc", "veri776"}
    rows = [trial("stoat", m, "final", seed=s, test=0.4) for m in ("clipreid", "indivaid") for s in range(2)]
    write_sweep(tmp_path, "stoat", rows)
    md = lb.render_markdown(board_of(tmp_path), lb.published_rows(pub, ["stoat"]))
    assert "## Published numbers (context, not like-for-like)" in md
    assert "| Stoat | IndivAID | 71.82 | — | — | 52.54 | — |" in md and "arXiv 2410.22927" in md


def test_csv_and_json_records(golden: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "board.csv"
    argv = [str(golden), "--format", "csv", "--out", str(out), "--no-report", "--published", "all"]
    code, _, _ = run_main(argv, capsys)
    assert code == 0
    csv = pl.read_csv(out)
    wanted = {"kind", "sweep_id", "source", "n", "mAP_mean", "mAP_std", "delta", "p", "p_holm", "significant"}
    assert wanted <= set(csv.columns)
    res = csv.filter(pl.col("kind") == "result")
    assert res.height == 8 and csv.filter(pl.col("kind") == "mean").height == 3
    ind = res.filter((pl.col("dataset") == "lion") & (pl.col("method") == "indivaid")).row(0, named=True)
    assert ind["sweep_id"] == "golden" and ind["n"] == 5 and ind["n_pairs"] == 5 and ind["significant"] is True
    assert ind["mAP_mean"] == pytest.approx(64.0) and ind["mAP_std"] == pytest.approx(2.0)  # percent
    assert ind["delta"] == pytest.approx(12.0) and ind["p_holm"] == pytest.approx(2 * P_FLOOR)
    pub = csv.filter(pl.col("kind") == "published")
    assert pub.filter(pl.col("dataset") == "stoat")["citation"].str.contains("2410.22927").all()

    code, text, _ = run_main([str(golden), "--format", "json", "--no-report"], capsys)
    records = json.loads(text)
    assert code == 0 and isinstance(records, list) and len(records) == 11  # 8 result + 3 mean rows, no published match
    rec = next(r for r in records if r["dataset"] == "nyala" and r["method"] == "indivaid-mean")
    assert rec["source"] == lb.SOURCE_VAL and rec["mAP_mean"] == pytest.approx(45.0) and rec["delta"] is None


def test_html_is_self_contained(golden: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "lb.html"
    code, _, _ = run_main([str(golden), "--format", "html", "--out", str(out), "--no-report"], capsys)
    page = out.read_text()
    assert code == 0 and page.startswith("<!DOCTYPE html>") and "<table>" in page
    assert "<td>IndivAID (mean fusion) †</td>" in page and "paired bootstrap" in page
    assert page.count("data:image/png;base64,") >= 1 and 'src="http' not in page


# ---------------------------------------------------------------------------------------------
# Plots and the whole command
# ---------------------------------------------------------------------------------------------


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def searched_rows() -> list[dict[str, Any]]:
    """The golden rows plus a search-only dataset with five trials per trained method: exact rank correlations."""
    rows = golden_rows()
    for k in range(5):
        lr, heads = 1e-6 * 3 ** k, [1, 2, 4, 8, 16][k]
        rows += [trial("atrw", "clipreid", "search", val=0.3 + 0.05 * k, params={"stage2.lr": lr}, tag=10 + k,
                       status="stopped" if k == 0 else "completed"),
                 trial("atrw", "indivaid", "search", val=0.5 - 0.04 * k,
                       params={"stage2.lr": lr, "fusion.heads": heads}, tag=10 + k)]
    return rows


def test_plots_are_valid_pngs(tmp_path: Path):
    write_sweep(tmp_path, "searched", searched_rows())
    trials = lb.load_results([tmp_path]).trials
    imp = lb.hyperparameter_importance(trials)
    atrw = imp.filter((pl.col("dataset") == "atrw") & (pl.col("method") == "indivaid"))
    assert dict(zip(atrw["param"], atrw["importance"])) == pytest.approx({"fusion.heads": 1.0, "stage2.lr": 1.0})
    plots = lb.render_plots(lb.aggregate(trials, "mAP"), trials, "mAP")
    assert set(plots) == {"leaderboard-mAP.png", "leaderboard-importance.png", "leaderboard-parallel.png"}
    for name, png in plots.items():
        w, h = png_size(png)
        assert w >= 300 and h >= 200 and len(png) > 5_000, (name, w, h, len(png))


def test_main_end_to_end_writes_report_next_to_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    golden = tmp_path / "results"
    write_sweep(golden, "searched", searched_rows())
    # a sweep folder is given: the report goes to its parent, the results folder
    code, out, _ = run_main([str(golden / "searched"), "--metric", "Rank-1"], capsys)
    assert code == 0 and "Leaderboard" in out and "IndivAID" in out
    md = (golden / "leaderboard.md").read_text()
    assert "Δ Rank-1 vs CLIP-ReID (pp)" in md and "![leaderboard-rank1](leaderboard-rank1.png)" in md
    csv = pl.read_csv(golden / "leaderboard.csv")
    assert set(csv["metric"].drop_nulls()) == {"rank1"}
    for name in ("leaderboard-rank1.png", "leaderboard-importance.png", "leaderboard-parallel.png"):
        w, h = png_size((golden / name).read_bytes())
        assert w >= 300 and h >= 200


def test_import_does_not_load_ray_or_torch():
    code = "import harness.leaderboard, sys; print('ray' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.split() == ["False", "False"], out.stderr


def test_default_reads_results_in_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]):
    write_sweep(tmp_path / "results", "golden", golden_rows())
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_main(["--out", "table.txt"], capsys)  # rich, written to a file: plain text
    text = (tmp_path / "table.txt").read_text()
    assert code == 0 and not out and "Leaderboard" in text and "CLIP-ReID" in text and "\x1b[" not in text
    assert {p.name for p in (tmp_path / "results").glob("leaderboard*")} == {
        "leaderboard.md", "leaderboard.csv", "leaderboard-mAP.png", "leaderboard-parallel.png"}  # too few for importance


def test_open_set_scores_get_their_own_delta_and_test(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """An open-set sweep: GM/BAKS/BAUS/AUROC as mean ± std in percent, GM tested against CLIP-ReID like
    mAP (5 paired seeds, every difference positive: p at its floor); closed-set boards hide the columns."""
    rows = []
    for s, (c, i) in enumerate([(0.40, 0.50), (0.42, 0.51), (0.41, 0.52), (0.43, 0.55), (0.44, 0.52)]):
        for method, gm in (("clipreid", c), ("indivaid", i)):
            rows.append(trial("lion", method, "final", seed=s, test=0.5, test_GM=gm, test_BAKS=gm + 0.1,
                              test_BAUS=gm - 0.1, test_AUROC=0.8, test_threshold=0.3))
    write_sweep(tmp_path / "open", "open", rows)
    board = board_of(tmp_path / "open")
    ind, ref = row(board, "lion", "indivaid"), row(board, "lion", "clipreid")
    assert ind["GM_mean"] == pytest.approx(52.0) and ref["GM_mean"] == pytest.approx(42.0)
    assert ind["BAKS_mean"] == pytest.approx(62.0) and ind["AUROC_mean"] == pytest.approx(80.0)
    assert ind["delta_GM"] == pytest.approx(10.0) and ind["n_pairs_GM"] == 5
    assert ind["p_GM"] == pytest.approx(P_FLOOR) and ind["test_GM"] == "*"
    assert ref["test_GM"] == "ref"
    assert ind["delta"] == pytest.approx(0.0) and ind["test"] == "n.s."  # the chosen metric (mAP) is unchanged
    code, out, _ = run_main([str(tmp_path / "open"), "--format", "markdown", "--no-report"], capsys)
    assert code == 0 and "| GM |" in out and "Δ GM vs CLIP-ReID (pp)" in out and "+10.0 *" in out and "BAUS" in out
    code, out, _ = run_main([str(tmp_path / "open"), "--metric", "GM", "--format", "csv", "--no-report"], capsys)
    assert code == 0 and "GM_mean" in out.splitlines()[0]
    write_sweep(tmp_path / "closed", "closed", golden_rows())
    code, out, _ = run_main([str(tmp_path / "closed"), "--format", "markdown", "--no-report"], capsys)
    assert code == 0 and "| GM |" not in out and "BAKS" not in out


def test_reference_method_can_be_chosen(golden: Path, capsys: pytest.CaptureFixture[str]):
    """--reference indivaid: Lion's CLIP-ReID is 12 points below IndivAID on every seed (p at its floor),
    and the headers name the chosen reference; an absent reference is a clear error."""
    board = lb.aggregate(lb.select_newest(lb.load_results([golden]).trials), "mAP", reference="indivaid")
    clip = row(board, "lion", "clipreid")
    assert clip["delta"] == pytest.approx(-12.0) and clip["p"] == pytest.approx(P_FLOOR)
    assert row(board, "lion", "indivaid")["test"] == "ref"
    code, out, _ = run_main([str(golden), "--reference", "indivaid", "--format", "markdown", "--no-report"], capsys)
    assert code == 0 and "Δ mAP vs IndivAID (pp)" in out and "minus IndivAID's" in out and "vs CLIP-ReID" not in out
    code, _, err = run_main([str(golden), "--reference", "nosuch", "--no-report"], capsys)
    assert code == 2 and "--reference nosuch: no nosuch runs" in err


def test_robustness_table_shows_relative_robustness_and_tests_its_delta(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]):
    """Final runs scored by the robustness suite: relative robustness as mean ± std in percent, its Δ vs
    CLIP-ReID tested like mAP (5 paired seeds, IndivAID ahead on every one: p at its floor), zero-shot's
    one run shown untested; in markdown, HTML and the terminal, and only where some run has the scores."""
    rows = [trial("lion", "zeroshot", "final", test=0.2, robust_rel_mAP=0.90)]
    for s, (c, i) in enumerate([(0.70, 0.80), (0.72, 0.81), (0.71, 0.82), (0.73, 0.85), (0.74, 0.82)]):
        for method, rel in (("clipreid", c), ("indivaid", i)):
            rows.append(trial("lion", method, "final", seed=s, test=0.5, robust_rel_mAP=rel, robust_clean_mAP=0.5))
    write_sweep(tmp_path / "robust", "robust", rows)
    board = board_of(tmp_path / "robust")
    ind, ref, zs = row(board, "lion", "indivaid"), row(board, "lion", "clipreid"), row(board, "lion", "zeroshot")
    assert ind["robust_rel_mAP_mean"] == pytest.approx(82.0) and ref["robust_rel_mAP_mean"] == pytest.approx(72.0)
    assert ind["robust_rel_mAP_std"] == pytest.approx(100 * math.sqrt(14e-4 / 4))  # deviations -2, -1, 0, 3, 0 pp
    assert ind["n_robust"] == 5 and ind["delta_robust"] == pytest.approx(10.0) and ind["n_pairs_robust"] == 5
    assert ind["p_robust"] == pytest.approx(P_FLOOR) and ind["p_holm_robust"] == pytest.approx(P_FLOOR)
    assert ind["test_robust"] == "*" and ref["test_robust"] == "ref"
    assert zs["delta_robust"] == pytest.approx(18.0) and zs["p_robust"] is None and zs["test_robust"] == "n/a"
    assert ind["delta"] == pytest.approx(0.0)  # the main table's Δ mAP is its own
    code, out, _ = run_main([str(tmp_path / "robust"), "--format", "markdown", "--no-report"], capsys)
    assert code == 0 and "## Robustness to corrupted queries" in out
    assert "| Lion | IndivAID | 5 | 50.0 ± 0.0 | 82.0 ± 1.9 | +10.0 * | <0.001 |" in out
    assert "| Lion | zero-shot CLIP | 1 | 20.0 | 90.0 | +18.0 n/a | — |" in out and "Δ vs CLIP-ReID (pp)" in out
    code, out, _ = run_main([str(tmp_path / "robust"), "--no-report"], capsys)
    assert code == 0 and "Robustness to corrupted queries" in out and "82.0 ± 1.9" in out
    code, out, _ = run_main([str(tmp_path / "robust"), "--format", "html", "--no-report"], capsys)
    assert code == 0 and "<h2>Robustness to corrupted queries</h2>" in out and "<td>+10.0 *</td>" in out
    write_sweep(tmp_path / "closed", "closed", golden_rows())  # an older file: no robust_* columns at all
    code, out, _ = run_main([str(tmp_path / "closed"), "--format", "markdown", "--no-report"], capsys)
    assert code == 0 and "Robustness" not in out
