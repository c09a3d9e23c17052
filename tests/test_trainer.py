"""The two-stage trainer on CPU with the micro backbone and a small generated dataset."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
from conftest import SMALL

from indivaid.config import ConfigError, apply_overrides, to_dict
from indivaid.data import read_split
from indivaid.eval.metrics import METRIC_KEYS
from indivaid.methods import METHODS
from indivaid.models.fusion import FUSIONS
from indivaid.training import REPORT_KEYS, TrainingError, resolve, train
from indivaid.training.schedule import cosine_with_warmup, milestone_epochs, warmup_multistep
from indivaid.training.features import frozen_feature_cache
from indivaid.training.run import Run
from indivaid.training.stage1 import PLATEAU_TOLERANCE, loss_slope, plateau, stage1
from indivaid.training.stage2 import description_cache, stage2
from indivaid.training.trainer import save_inference_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def micro_config(data_root: Path, cache: Path, *overrides: str, method: str = "indivaid"):
    base = {
        "preset": "tiny", "method": method,
        "data": {"data_root": str(data_root), "cache_dir": str(cache), "options": dict(SMALL), "workers": 2},
        "model": {"backbone": "tiny", "input_size": [64, 32]},
        "fusion": {"heads": 2},
        "stage1": {"epochs": 2, "min_steps": 0, "batch_p": 8, "batch_k": 4},
        "stage2": {"epochs": 2, "batch_p": 8, "batch_k": 4, "warmup_epochs": 0},
        "runtime": {"deterministic": True, "threads": 2},
    }
    return resolve(apply_overrides(base, list(overrides)))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def test_each_stage_trains_only_what_it_should(data_root: Path, tmp_path: Path):
    cfg = micro_config(data_root, tmp_path / "cache")
    run = Run(cfg, tmp_path / "run", None)
    s = run.system
    text0, image0, prompt0 = snapshot(s.text), snapshot(s.image), snapshot(s.prompt)
    feats = frozen_feature_cache(s, cfg, run.split, run.images, run.rt)
    zs = {"val_mAP": 0.0}
    stage1(run, feats, zs, None)
    assert not changed(text0, s.text) and not changed(image0, s.image)
    assert {"ctx", "meta_net.net.0.weight", "meta_net.net.2.weight"} <= changed(prompt0, s.prompt)
    prompt1, head0, fusion0 = snapshot(s.prompt), snapshot(s.head), snapshot(s.fusion)
    stage2(run, feats, None)
    assert not changed(text0, s.text) and not changed(prompt1, s.prompt)
    assert "visual.conv1.weight" in changed(image0, s.image)
    assert {"cls_f12.weight", "bn_f12.weight", "bn_fproj.running_mean"} <= changed(head0, s.head)
    assert not {"bn_f12.bias", "bn_fproj.bias"} & changed(head0, s.head)  # BNNeck bias frozen
    assert "attn.out_proj.weight" in changed(fusion0, s.fusion)
    assert [r["stage"] for r in run.history] == [1, 1, 2, 2]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One image + frozen-feature cache for the per-method runs (the method is not in its key)."""
    return tmp_path_factory.mktemp("method-cache")


@pytest.mark.parametrize("method", METHODS.names())
def test_every_registered_method_trains_one_tiny_epoch(method: str, data_root: Path, shared_cache: Path, tmp_path: Path):
    """Each method (ablations included) through both stages and into a loadable inference model,
    training exactly what its registry entry says."""
    from indivaid.inference import load_inference

    spec = METHODS.get(method)
    cfg = micro_config(data_root, shared_cache, "stage1.epochs=1", "stage2.epochs=1", method=method)
    if not spec.train:
        reports = []
        res = train(cfg, workdir=tmp_path / "run", report=lambda m, checkpoint=None: reports.append(m), evaluate_test=False)
        assert [m["stage"] for m in reports] == [0] and 0 <= res.val["mAP"] <= 1
        return
    run = Run(cfg, tmp_path / "run", None)
    s = run.system
    assert (s.prompt.meta_net is not None) == spec.meta_net and type(s.fusion) is FUSIONS.get(spec.fusion)
    image0, fusion0 = snapshot(s.image), snapshot(s.fusion)
    feats = frozen_feature_cache(s, cfg, run.split, run.images, run.rt)
    stage1(run, feats, {}, None)
    desc, mask = description_cache(run, feats)
    per_identity = mask.sum(1)
    assert (per_identity >= 1).all() and (per_identity.max() > 1) == s.fusion.per_image
    stage2(run, feats, None)
    assert [r["stage"] for r in run.history] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in run.history)
    s2 = cfg.stage2
    milestones = milestone_epochs(s2.milestones, s2.milestone_unit, s2.epochs)
    assert run.history[-1]["lr"] == pytest.approx(s2.lr * warmup_multistep(0, s2.warmup_epochs, s2.warmup_factor,
                                                                           milestones, s2.gamma))
    assert "visual.conv1.weight" in changed(image0, s.image)
    assert bool(changed(fusion0, s.fusion)) == bool(list(s.fusion.parameters()))  # a learnable fusion learns
    model = load_inference(save_inference_checkpoint(run))
    emb = model.embed_uint8(run.images[torch.arange(3)])
    assert emb.shape == (3, s.image.width + s.image.embed_dim) and torch.isfinite(emb).all()


def test_stage1_loss_falls_and_descriptions_cluster_by_identity(data_root: Path, tmp_path: Path):
    cfg = micro_config(data_root, tmp_path / "cache", "stage1.epochs=10", "stage1.lr=0.01")
    run = Run(cfg, tmp_path / "run", None)
    feats = frozen_feature_cache(run.system, cfg, run.split, run.images, run.rt)
    stage1(run, feats, {}, None)
    losses = [r["loss"] for r in run.history]
    assert losses[-1] < losses[0] - 0.2  # random-init frozen features bound how low it can go
    desc, mask = description_cache(run, feats)
    d = torch.nn.functional.normalize(desc, dim=-1)
    centres = torch.nn.functional.normalize((d * mask[..., None]).sum(1), dim=-1)
    own = ((d * centres[:, None]).sum(-1) * mask).sum() / mask.sum()  # cosine to own identity's centre
    other = (d[mask] @ centres.t()).mean()  # to all centres
    assert own > other + 0.1


def test_report_has_fixed_keys_once_per_epoch_and_result_files(data_root: Path, tmp_path: Path):
    reports = []
    cfg = micro_config(data_root, tmp_path / "cache", "stage1.epochs=1", "stage2.epochs=2", "checkpoint.every=1",
                       method="clipreid")
    run_dir = tmp_path / "run"

    def report(m, checkpoint=None):  # what is on disk when each report arrives
        reports.append((m, checkpoint, (run_dir / "result.json").is_file(), (run_dir / "model.pt").is_file()))

    res = train(cfg, workdir=run_dir, report=report)
    assert [(m["stage"], m["epoch"], m["s2_epoch"]) for m, *_ in reports] == [(1, 1, 0), (2, 1, 1), (2, 2, 2)]
    assert all(tuple(m) == REPORT_KEYS for m, *_ in reports)
    assert all(0 <= m["val_mAP"] <= 1 for m, *_ in reports) and all(m["steps"] >= 1 for m, *_ in reports)
    # mid-run reports carry the resumable checkpoint; the last one comes after the results are written,
    # so a scheduler that stops the run at its final report stops a finished run
    assert reports[1][1].endswith("checkpoint.pt") and reports[-1][1] is None
    assert [r[2:] for r in reports] == [(False, False), (False, False), (True, True)]
    assert res.test is not None and 0 < res.test["mAP"] <= 1 and res.stage2_epochs == 2
    on_disk = json.loads((run_dir / "result.json").read_text())
    assert on_disk["split_hash"] == res.split_hash and (run_dir / "split.csv").is_file()
    same = lambda a, b: json.dumps(a, sort_keys=True, default=vars) == json.dumps(b, sort_keys=True, default=vars)  # NaN-safe
    assert Path(res.checkpoint).is_file() and same(on_disk["history"][-1], reports[-1][0])
    # resumable state is dropped once the run has finished; what was written is on record
    assert not (run_dir / "checkpoint.pt").exists()
    saves = [json.loads(line) for line in (run_dir / "checkpoints.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["epoch"]) for e in saves] == [(1, 1), (2, 1)] and all(e["bytes"] > 0 for e in saves)
    # a restarted finished run trains nothing: it returns the result and re-sends the last report
    again = []
    res2 = train(cfg, workdir=run_dir, report=lambda m, checkpoint=None: again.append(m))
    assert same(res2, res) and same(again, [reports[-1][0]])


def test_no_mid_run_checkpoints_and_a_step_cap(data_root: Path, tmp_path: Path):
    steps = []
    cfg = micro_config(data_root, tmp_path / "cache", "stage1.epochs=1", "stage2.epochs=2", "checkpoint.every=0",
                       "runtime.max_steps_per_epoch=1", "checkpoint.keep=true", method="clipreid")
    train(cfg, workdir=tmp_path / "run", report=lambda m, checkpoint=None: steps.append((m["steps"], checkpoint)))
    assert steps == [(1, None)] * 3
    assert not (tmp_path / "run" / "checkpoints.jsonl").exists() and not (tmp_path / "run" / "checkpoint.pt").exists()


def test_zeroshot_reports_once_and_needs_no_training(data_root: Path, tmp_path: Path):
    reports = []
    cfg = micro_config(data_root, tmp_path / "cache", method="zeroshot")
    res = train(cfg, workdir=tmp_path / "run", report=lambda m, checkpoint=None: reports.append(m))
    assert len(reports) == 1 and reports[0]["stage"] == 0 and res.val["mAP"] == pytest.approx(reports[0]["val_mAP"])


def test_non_finite_loss_names_stage_epoch_and_term(data_root: Path, tmp_path: Path):
    cfg = micro_config(data_root, tmp_path / "cache", "stage1.lr=1e30", "model.similarity=dot", method="clipreid")
    with pytest.raises(TrainingError, match=r"stage 1, epoch \d+: loss term (i2t|t2i) is"):
        train(cfg, workdir=tmp_path / "run")


def test_checkpoint_from_another_config_is_refused(data_root: Path, tmp_path: Path):
    cfg = micro_config(data_root, tmp_path / "cache", "stage2.epochs=1", method="clipreid")
    train(cfg, workdir=tmp_path / "run", evaluate_test=False)
    other = micro_config(data_root, tmp_path / "cache", "stage2.epochs=1", "stage2.lr=0.01", method="clipreid")
    with pytest.raises(TrainingError, match="finished run of a different config"):
        train(other, workdir=tmp_path / "run")
    (tmp_path / "run" / "result.json").unlink()  # an unfinished run's checkpoint is refused too
    longer = micro_config(data_root, tmp_path / "cache", "stage2.epochs=3", "checkpoint.every=1", method="clipreid")
    with pytest.raises(SystemExit):
        train(longer, workdir=tmp_path / "run2", report=lambda m, checkpoint=None: sys.exit() if m["s2_epoch"] == 1 else None)
    with pytest.raises(TrainingError, match="different config"):
        train(other, workdir=tmp_path / "run2")


KILL_SCRIPT = """
import os, signal, sys, json
sys.path.insert(0, {tests!r})
from test_trainer import micro_config
from indivaid.training import train
from pathlib import Path
cfg = micro_config(Path({data!r}), Path({cache!r}), "stage1.epochs=2", "stage2.epochs=4", "checkpoint.every=2")
def report(m, checkpoint=None):
    if {kill} and m["stage"] == {stage} and m["epoch"] == {epoch}:
        os.kill(os.getpid(), signal.SIGKILL)
res = train(cfg, workdir={workdir!r}, report=report)
print(json.dumps({{"val": res.val, "test": res.test}}))
"""


def _run(data_root: Path, cache: Path, workdir: Path, kill: bool, stage: int = 2, epoch: int = 2):
    code = KILL_SCRIPT.format(tests=str(ROOT / "tests"), data=str(data_root), cache=str(cache), kill=kill,
                              stage=stage, epoch=epoch, workdir=str(workdir))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONHASHSEED": "0"})


@pytest.fixture(scope="module")
def uninterrupted(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("resume")
    ref = _run(data_root, tmp / "cache", tmp / "ref", kill=False)
    assert ref.returncode == 0, ref.stderr
    return tmp / "cache", json.loads(ref.stdout.splitlines()[-1])


@pytest.mark.parametrize("stage,epoch", [(1, 1), (2, 3)])
def test_killed_run_resumes_to_identical_metrics(data_root: Path, tmp_path: Path, uninterrupted, stage: int, epoch: int):
    cache, reference = uninterrupted
    killed = _run(data_root, cache, tmp_path / "run", kill=True, stage=stage, epoch=epoch)
    assert killed.returncode == -signal.SIGKILL  # a real kill, mid-run, one epoch after the last checkpoint
    assert (tmp_path / "run" / "checkpoint.pt").is_file() == (stage == 2)
    assert not (tmp_path / "run" / "result.json").exists()
    resumed = _run(data_root, cache, tmp_path / "run", kill=False)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.splitlines()[-1]) == reference


@pytest.fixture(scope="module")
def learnable(tmp_path_factory: pytest.TempPathFactory):
    """A 100-identity synthetic set with its split, image cache and raw-pixel baseline."""
    from indivaid.data import SplitConfig, build_split, open_dataset
    from indivaid.data.imagecache import ImageSpec
    from indivaid.demo import raw_pixel_baseline

    root = tmp_path_factory.mktemp("learn")
    options = {"identities": 100, "min_images": 8, "max_images": 12, "seed": 11}
    split = build_split(open_dataset("synthetic", data_root=root, **options), SplitConfig(seed=0))
    raw = raw_pixel_baseline(split, root / "cache", ImageSpec(48, 96))["raw pixels / val"]
    return root, options, raw.mAP


@pytest.mark.parametrize("method", ["clipreid", "indivaid"])
def test_stage2_learns_far_beyond_untrained_and_raw_pixels(learnable, tmp_path: Path, method: str):
    root, options, raw_map = learnable
    # 40 epochs: ~320 steps, as 30 gave before the sampler became identity-balanced (8, not 11, steps an epoch here)
    cfg = resolve({"preset": "tiny", "method": method, "stage2": {"epochs": 40},
                   "data": {"data_root": str(root), "cache_dir": str(root / "cache"), "options": options}})
    res = train(cfg, workdir=tmp_path / "run", evaluate_test=False)
    untrained = res.zeroshot_val["val_mAP"]  # the same random-init model before any training
    assert res.val["mAP"] >= 2 * untrained, (res.val["mAP"], untrained)
    assert res.val["mAP"] >= raw_map + 0.1, (res.val["mAP"], raw_map)


def test_camera_embedding_trains_and_unseen_cameras_use_the_zero_row(data_root: Path, tmp_path: Path):
    cfg = micro_config(data_root, tmp_path / "cache", "model.sie=true", "stage1.epochs=1", "stage2.epochs=1",
                       method="clipreid")
    run = Run(cfg, tmp_path / "run", None)
    emb = run.system.image.camera_embed
    before = emb.detach().clone()
    assert emb.shape[0] == len(run.sie_codes) + 1 and torch.count_nonzero(before[-1]) == 0
    feats = frozen_feature_cache(run.system, cfg, run.split, run.images, run.rt)
    stage1(run, feats, {}, None)
    stage2(run, feats, None)
    assert not torch.equal(before[:-1], emb.detach()[:-1])  # seen cameras' vectors trained
    codes = run._sie_codes(run.split.table.with_columns(camera=pl.lit("a-camera-never-seen")))
    assert set(codes.tolist()) == {len(run.sie_codes)}


def _cosine_lrs(epochs: int = 50, steps: int = 20) -> list[float]:
    return [cosine_with_warmup(e, epochs, 5, 0.01, 1e-6, 1e-5) for e in range(epochs) for _ in range(steps)]


def test_stage1_loss_slope_tells_a_falling_loss_from_a_levelled_one_under_the_cosine_schedule():
    """Measured per unit of learning rate: a loss still falling in proportion to the learning done
    gives about -0.11 (not a plateau) although the cosine's last steps barely move it; a loss that
    levelled off early gives about 0 (a plateau), noise included."""
    lrs = _cosine_lrs()
    cum = torch.cumsum(torch.tensor(lrs, dtype=torch.float64), 0)
    noise = 0.05 * torch.randn(len(lrs), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    falling, levelled = 7 - 0.2 * cum + noise, 6 + torch.exp(-cum / 0.2) + noise
    assert plateau(list(zip(falling.tolist(), lrs))) == {"stage1_loss_slope": pytest.approx(-0.107, abs=0.02),
                                                         "stage1_plateau": 0.0}
    s = plateau(list(zip(levelled.tolist(), lrs)))
    assert abs(s["stage1_loss_slope"]) < PLATEAU_TOLERANCE and s["stage1_plateau"] == 1.0
    # at a constant lr the window is the last tenth of the steps: a straight line gives -0.1 / 0.9
    assert loss_slope([5 - 0.01 * i for i in range(100)], [1e-3] * 100) == pytest.approx(-1 / 9)
    assert math.isnan(loss_slope([5.0, 4.0, 3.0], [1e-3] * 3))  # too few steps to fit a trend
    assert math.isnan(plateau([(5.0, 1e-3)] * 50)["stage1_plateau"])  # the loss never fell: not measured


def test_stage1_plateau_is_reported_from_its_last_epoch_on_and_recorded(data_root: Path, tmp_path: Path):
    reports = []
    cfg = micro_config(data_root, tmp_path / "cache", "stage1.epochs=1", "stage1.min_steps=40", "stage2.epochs=2",
                       "checkpoint.every=0", method="clipreid")
    res = train(cfg, workdir=tmp_path / "run", report=lambda m, checkpoint=None: reports.append(m), evaluate_test=False)
    s1 = [m for m in reports if m["stage"] == 1]
    assert len(s1) > 1 and all(math.isnan(m["stage1_loss_slope"]) for m in s1[:-1])
    slope = s1[-1]["stage1_loss_slope"]
    assert math.isfinite(slope) and all(m["stage1_loss_slope"] == slope for m in reports[len(s1) - 1:])
    assert res.stage1_loss_slope == slope and res.stage1_plateau == (slope > -PLATEAU_TOLERANCE)
    on_disk = json.loads((tmp_path / "run" / "result.json").read_text())
    assert on_disk["stage1_plateau"] is res.stage1_plateau and on_disk["stage1_loss_slope"] == slope


def test_train_on_val_trains_on_train_and_validation_identities_and_scores_no_validation(data_root: Path,
                                                                                        tmp_path: Path):
    """A final run on train + validation identities: the test identities stay out, and validation,
    now trained on, is not scored (NaN), while test is."""
    reports = []
    cfg = micro_config(data_root, tmp_path / "cache", "data.train_on_val=true", "stage1.epochs=1", "stage2.epochs=1",
                       method="clipreid")
    res = train(cfg, workdir=tmp_path / "run", report=lambda m, checkpoint=None: reports.append(m))
    split = read_split(tmp_path / "run" / "split.csv")
    ids = lambda *parts: set(split.table.filter(pl.col("split").is_in(parts))["identity"].to_list())
    trained = torch.load(res.checkpoint, weights_only=True)["identities"]
    assert set(trained) == ids("train", "val_query", "val_gallery") and not set(trained) & ids("query", "gallery")
    assert len(trained) == len(ids("train")) + len(ids("val_query", "val_gallery")) > len(ids("train"))
    assert res.train_on_val and json.loads((tmp_path / "run" / "result.json").read_text())["train_on_val"] is True
    assert all(math.isnan(v) for v in res.val.values()) and set(res.val) == set(METRIC_KEYS)
    assert all(math.isnan(m[f"val_{k}"]) for m in reports if m["stage"] == 2 for k in METRIC_KEYS)
    assert res.test is not None and 0 < res.test["mAP"] <= 1
    with pytest.raises(ConfigError, match="train_on_val: an open-set split"):
        micro_config(data_root, tmp_path / "cache", "data.train_on_val=true", "data.split.unknown_fraction=0.2")
    assert "train_on_val" not in to_dict(micro_config(data_root, tmp_path / "cache"))["data"]  # off: hashes unchanged
