"""What every part of the leaderboard shares: the metrics and their labels, the statistics'
settings, the marks and sources shown in the table, and the error it reports bad input with."""

from __future__ import annotations

import math
from typing import Any

import polars as pl

from harness.results import ROBUST_REL_MAP

METRICS = ("rank1", "rank5", "rank10", "mAP", "mINP")  # the order re-ID papers print them in
# Open-set identification (docs/method.md): sweeps with unknown identities in their splits have them;
# GM = sqrt(BAKS * BAUS) at the threshold calibrated on validation, AnimalCLEF 2025's ranking score.
OPENSET_METRICS = ("GM", "BAKS", "BAUS", "AUROC")
ALL_METRICS = METRICS + OPENSET_METRICS
OPENSET_DELTA = "GM"  # the open-set score that gets its own Δ and test beside the chosen metric's
# Relative robustness (final.robustness: corrupted / clean mAP over the suite): its own table, Δ and test.
ROBUST = ROBUST_REL_MAP
LABELS = {"rank1": "Rank-1", "rank5": "Rank-5", "rank10": "Rank-10", "mAP": "mAP", "mINP": "mINP",
          "GM": "GM", "BAKS": "BAKS", "BAUS": "BAUS", "AUROC": "AUROC"}
REFERENCE = "clipreid"  # every Δ is against CLIP-ReID on the same dataset
UNTRAINED = frozenset({"zeroshot"})  # one deterministic run: Δ shown, never tested
METHOD_ORDER = ("zeroshot", "clipreid", "indivaid", "indivaid-mean", "indivaid-nofusion")
METHOD_LABELS = {"zeroshot": "zero-shot CLIP", "clipreid": "CLIP-ReID", "indivaid": "IndivAID",
                 "indivaid-mean": "IndivAID (mean fusion)", "indivaid-nofusion": "IndivAID (no fusion)"}
DATASET_LABELS = {"atrw": "ATRW", "friesiancattle2017": "FriesianCattle2017", "ipanda50": "IPanda50", "lion": "Lion",
                  "mpdd": "MPDD", "nyala": "Nyala", "polarbear": "PolarBear", "seastar": "SeaStar", "stoat": "Stoat",
                  "synthetic": "Synthetic", "msmt17": "MSMT17", "market1501": "Market-1501",
                  "dukemtmc": "DukeMTMC-reID", "veri776": "VeRi-776"}
N_BOOT = 10_000
RNG_SEED = 0
# Paired seeds a comparison needs before it is tested: the default number of final seeds a sweep runs.
# Below it the bootstrap is degenerate (too few distinct resamples: C(2n - 1, n), 10 for n = 3, 35 for
# n = 4), so differences of one sign put p at its floor 2/(B + 1) whatever their size.
MIN_PAIRS = 5
ALPHA = 0.05
DASH = "—"
FALLBACK_MARK = "†"
REHEARSAL_MARK = "(rehearsal)"  # after the dataset name of rows from a CPU rehearsal (tiny model, generated data)
SOURCE_TEST = "test (final runs)"
SOURCE_VAL = "val (best search trial)"


class LeaderboardError(Exception):
    """Bad input (no results, unknown schema, unreadable file): printed as one ``error:`` line, exit 2."""


def method_rank(col: str = "method") -> pl.Expr:
    known = {m: i for i, m in enumerate(METHOD_ORDER)}
    return pl.col(col).replace_strict(known, default=len(known), return_dtype=pl.Int64)


def fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) < 1e6 else f"{v:.3g}"
    return str(v)


def num(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def label_method(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def label_dataset(dataset: str) -> str:
    return DATASET_LABELS.get(dataset, dataset)

