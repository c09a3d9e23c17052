"""``train(cfg, workdir=..., report=...)``: the two-stage IndivAID / CLIP-ReID trainer.

Stage 1 (:mod:`indivaid.training.stage1`) trains the prompts (and Meta-Net) contrastively against
frozen image features computed once and cached (:mod:`indivaid.training.features`). Stage 2
(:mod:`indivaid.training.stage2`) caches every training image's description, fuses them per
identity each step, and fine-tunes the image encoder with ID, triplet and image-to-text losses.
The run's shared state is :class:`indivaid.training.run.Run`. The process can be killed at any
instant: it resumes from the last checkpoint in ``workdir`` with the same result. Validation
identities select models; the test split is touched only in the final summary.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from indivaid.config import to_dict
from indivaid.eval.openset import Calibration
from indivaid.training import checkpoint as ckpt
from indivaid.training.config import TrainConfig
from indivaid.training.features import cache_root, feature_cache_path, frozen_feature_cache
from indivaid.training.openset import calibrate_run
from indivaid.training.run import NAN, REPORT_KEYS, Report, Run, TrainingError, plain, score_features, val_keys
from indivaid.training.stage1 import stage1
from indivaid.training.stage2 import stage2
from indivaid.utils.io import atomic_write_text, stable_hash

# ``cache_root`` is imported from here by the CLI; REPORT_KEYS and TrainingError by the package.
__all__ = ["REPORT_KEYS", "RunResult", "TrainingError", "cache_root", "finished_result", "save_inference_checkpoint",
           "train", "warm_caches"]

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    workdir: str
    method: str
    dataset: str
    split_hash: str
    seed: int
    val: dict[str, float]  # NaN scores when the run trained on its validation identities (train_on_val)
    test: dict[str, float] | None
    zeroshot_val: dict[str, float]
    stage1_epochs: int
    stage2_epochs: int
    wall_s: float
    images_per_s: float
    checkpoint: str
    history: list[dict[str, float]] = field(default_factory=list)
    config_hash: str = ""  # a restarted run with this config and a result.json does not train again
    train_on_val: bool = False  # trained on train + validation identities (data.train_on_val)
    fusion_departure: float = NAN  # at the last stage-2 epoch; NaN for a fusion without weights
    stage1_loss_slope: float = NAN  # relative loss trend over the last tenth of stage 1's learning
    stage1_plateau: bool | None = None  # |stage1_loss_slope| within the tolerance; None: not measured


def warm_caches(cfg: TrainConfig) -> Path:
    """Build the split, the uint8 image cache and the frozen-feature cache of ``cfg`` without training,
    so that every run sharing them only loads them (the sweep harness runs this once per key)."""
    with tempfile.TemporaryDirectory(prefix="indivaid-warm-") as tmp:
        run = Run(cfg, Path(tmp), None)
        frozen_feature_cache(run.system, cfg, run.split, run.images, run.rt, origin="warm")
        return feature_cache_path(cfg, run.split, run.rt)


def save_inference_checkpoint(run: Run, openset: Calibration | None = None) -> Path:
    s = run.system
    obj = {"format": ckpt.INFERENCE_FORMAT, "config": json.dumps(to_dict(run.cfg)), "identities": run.identities,
           "cameras": list(run.sie_codes), "species": run.split.species, "split_hash": run.split.hash,
           "quick_gelu": s.quick_gelu, "image": s.image.state_dict(),
           "head": s.head.state_dict() if s.head is not None else {},
           "feature": json.dumps({"after_bn": run.cfg.eval.after_bn, "part_norm": run.cfg.eval.part_norm,
                                  "metric": run.cfg.eval.metric})}
    if openset is not None:  # the open-set decision calibrated on validation (indivaid.eval.openset)
        obj["openset"] = json.dumps(openset.to_dict())
    path = run.workdir / "model.pt"
    ckpt.save(obj, path)
    return path


def finished_result(cfg: TrainConfig, workdir: Path) -> RunResult | None:
    """The recorded result of this config in ``workdir``, if the run already finished there."""
    try:
        data = json.loads((workdir / "result.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if data.get("config_hash") != stable_hash(to_dict(cfg)):
        raise TrainingError(f"{workdir} holds the finished run of a different config; use a fresh workdir "
                            "(or delete its result.json to train there again)")
    return RunResult(**data)


def train(cfg: TrainConfig, *, workdir: str | Path, report: Report | None = None, evaluate_test: bool = True) -> RunResult:
    """Train ``cfg.method`` on ``cfg.data`` in ``workdir`` (resuming if it holds a checkpoint).

    The results (``result.json``, ``model.pt``) are written before the last report, and a run
    restarted after that point returns them (re-sending the last report) instead of training again.
    """
    t_start = time.perf_counter()
    workdir = Path(workdir).resolve()
    done = finished_result(cfg, workdir)
    if done is not None:
        log.info("%s already holds the finished run of this config", workdir)
        if report is not None and done.history:
            report(done.history[-1], checkpoint=None)
        return done
    run = Run(cfg, workdir, report)
    atomic_write_text(workdir / "config.json", json.dumps(to_dict(cfg), indent=2))
    feats = frozen_feature_cache(run.system, cfg, run.split, run.images, run.rt)
    zs_feats = torch.cat([feats["f12"], feats["fproj"]], 1)  # the zero-shot inference feature
    zs = plain(score_features(zs_feats, run.split, "val", run.row_index, cfg))
    zs_val = val_keys(zs)
    state = run.load_train_state()
    results: list[RunResult] = []

    def finish() -> None:
        """Score, save the inference model and write result.json (main rank); drop resumable state."""
        test = None
        if evaluate_test and run.rt.is_main:
            test = plain(run.evaluate("test")) if run.method.train else \
                plain(score_features(zs_feats, run.split, "test", run.row_index, cfg))
        openset = calibrate_run(run, None if run.method.train else zs_feats, test=evaluate_test) \
            if run.rt.is_main else None
        model_path = save_inference_checkpoint(run, openset and openset.calibration) if run.rt.is_main \
            else workdir / "model.pt"
        val = run.val_metrics if run.method.train else zs
        if openset is not None:
            val = {**val, **openset.val}
            test = {**test, **openset.test} if test is not None and openset.test is not None else test
        s1 = sum(1 for h in run.history if h["stage"] == 1)
        s2 = sum(1 for h in run.history if h["stage"] == 2)
        last = run.history[-1] if run.history else {}
        slope, reached = run.diagnostics.get("stage1_loss_slope", NAN), run.diagnostics.get("stage1_plateau", NAN)
        result = RunResult(str(workdir), cfg.method, run.split.dataset, run.split.hash, cfg.runtime.seed,
                           val, test, zs_val, s1, s2,
                           time.perf_counter() - t_start, run.images_per_s, str(model_path), list(run.history),
                           run.config_hash(), train_on_val=cfg.data.train_on_val,
                           fusion_departure=last.get("fusion_departure", NAN), stage1_loss_slope=slope,
                           stage1_plateau=None if math.isnan(reached) else bool(reached))
        if run.rt.is_main:
            atomic_write_text(workdir / "result.json", json.dumps(asdict(result), indent=2, default=float))
            if not cfg.checkpoint.keep:
                run.ckpt_path.unlink(missing_ok=True)
        results.append(result)

    if run.method.train:
        if state is None or state["stage"] == 1:
            stage1(run, feats, zs_val, state)
            state = None  # stage 2 starts fresh after stage 1
        stage2(run, feats, state, finish)
    else:
        run.report({"stage": 0, "epoch": 0, "s2_epoch": 0, **zs_val}, before_send=finish)
    if not results:  # no stage-2 epoch ran (stage2.epochs: 0)
        run.validate()
        finish()
    return results[0]
