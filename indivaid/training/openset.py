"""Open-set calibration at the end of a run: the decision threshold chosen on validation.

Runs on an open-set split only (``data.split.unknown_fraction > 0``): its validation identities
include unknown ones, and none of them was trained on, so the threshold is chosen the way it will
be used, on individuals the model has never seen. The threshold goes into ``model.pt`` with its
validation curve; the test split is scored at it, and at the best threshold chosen on test itself
(``GM_oracle``, which says how well the calibration transfers; never used to pick anything).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import polars as pl
import torch
from torch import Tensor

from indivaid.eval.openset import Calibration, TopMatch, calibrate, open_set_metrics, threshold_curve
from indivaid.eval.retrieval import match_retrieval

if TYPE_CHECKING:
    from indivaid.data.split import Split
    from indivaid.training.config import TrainConfig
    from indivaid.training.run import Run

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpenSetResult:
    calibration: Calibration
    val: dict[str, float]
    test: dict[str, float] | None


def split_top_match(feats: Tensor, split: Split, stage: str, index: dict[str, int], cfg: TrainConfig) -> TopMatch:
    """Top-1 matches of a stage's queries, with the distance evaluation uses (so thresholds transfer)."""
    q, g = split.query_gallery(stage)  # type: ignore[arg-type]
    qi = torch.tensor([index[i] for i in q["image_id"].to_list()], device=feats.device)
    gi = torch.tensor([index[i] for i in g["image_id"].to_list()], device=feats.device)
    return match_retrieval(feats[qi], feats[gi], q, g, protocol=split.protocol, camera_codes=split.camera_codes(),
                           metric=cfg.eval.metric, normalize=True)


def calibrate_run(run: Run, frozen: Tensor | None = None, *, test: bool = True) -> OpenSetResult | None:
    """Calibrate on validation and score test at the threshold (None on a closed-set split).

    ``frozen``: features of every split image in table order (the zero-shot method's), instead of
    the run's current encoder."""
    split, cfg = run.split, run.cfg
    if not split.open_set:
        log.info("closed-set split: no open-set threshold (set data.split.unknown_fraction > 0 to calibrate one)")
        return None
    q, g = split.query_gallery("val")
    seen = sorted(set(run.identities) & set(pl.concat([q, g])["identity"].to_list()))
    if seen:
        log.warning("open-set calibration skipped: %d validation identities were trained on (e.g. %s); keep "
                    "validation identities out of training for open-set runs", len(seen), seen[:3])
        return None

    def top(stage: str) -> TopMatch:
        feats, index = (frozen, run.row_index) if frozen is not None else run.stage_features(stage)
        return split_top_match(feats, split, stage, index, cfg)

    cal = calibrate(top("val"), target_new_recall=cfg.eval.target_new_recall)
    log.info("open-set threshold %.4f (%s): validation BAKS %.3f, BAUS %.3f, GM %.3f", cal.threshold, cal.rule,
             cal.val.BAKS, cal.val.BAUS, cal.val.GM)
    test_scores = None
    if test:
        t = top("test")
        curve = threshold_curve(t)
        best = int(torch.argmax(torch.nan_to_num(curve.GM, nan=-1.0)))
        test_scores = {**open_set_metrics(t, cal.threshold).as_dict(), "GM_oracle": float(curve.GM[best]),
                       "threshold_oracle": float(curve.thresholds[best])}
    return OpenSetResult(cal, cal.val.as_dict(), test_scores)
