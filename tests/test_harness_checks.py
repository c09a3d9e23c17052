"""The plan checks (every dataset, one line per problem), the checkpoint policy, the GPU budget and
the rehearsal's data and config substitutions: no Ray, no training."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from harness.checks import asha_rungs, check_sweep, gpus_per_trial
from harness.config import load_sweep, trial_config
from harness.orchestrate import GpuBudget
from harness.sweep import main

ROOT = Path(__file__).resolve().parents[1]


def full_with(tmp_path: Path, **changes) -> Path:
    """sweeps/full.yaml with top-level keys merged in (nested mappings merged one level deep)."""
    doc = yaml.safe_load((ROOT / "sweeps" / "full.yaml").read_text())
    for k, v in changes.items():
        doc[k] = {**doc.get(k, {}), **v} if isinstance(v, dict) and isinstance(doc.get(k), dict) else v
    doc["data_root"] = str(tmp_path / "nowhere")  # published counts: nothing is read or generated
    f = tmp_path / "full.yaml"
    f.write_text(yaml.safe_dump(doc))
    return f


def test_shipped_sweeps_pass_every_check():
    for name in ("smoke", "full", "ablation", "backbones"):
        assert check_sweep(load_sweep(ROOT / "sweeps" / f"{name}.yaml")) == []


def test_polarbear_p_wider_than_its_training_identities_fails_dry_run_in_one_line(tmp_path: Path, capsys):
    f = full_with(tmp_path, per_dataset={"polarbear": {"preset": "polarbear", "stage1": {"batch_p": 16}}})
    assert main([str(f), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "polarbear: stage1.batch_p: P=16 exceeds the 8 training identities" in err[0]
    assert "per_dataset.polarbear.stage1.batch_p <= 8" in err[0] and not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("changes, line", [
    ({"dataset_resources": {"polarbear": {"workers": 3}}},
     "polarbear: stage1.batch_p: P=8 does not split across the 3 DDP workers"),
    ({"per_dataset": {"mpdd": {"preset": "mpdd", "stage2": {"milestone_unit": "fraction", "milestones": [0.3, 0.8]}}}},
     "mpdd: stage2.milestones: "),
    ({"base": {"eval": {"every": 4}}, "scheduler": {"grace_period": 10}},
     "atrw: scheduler.grace_period: ASHA rung at stage-2 epoch 10 is not an evaluation epoch (eval.every 4)"),
    ({"scheduler": {"grace_period": 5}}, "atrw: scheduler.grace_period: 5 is shorter than the stage-2 warm-up"),
    ({"resources": {"use_gpu": False}}, "atrw: resources.use_gpu: false with gpus: 1"),
    ({"search_space": {"stage2.batch_p": {"kind": "choice", "values": [8, 64]}}},
     "stoat: stage2.batch_p: P=64 (searched stage2.batch_p=64) exceeds the 48 training identities"),
    # weights that cannot fit the backbone, found offline before any trial builds a model
    ({"search_space": {"model": {"kind": "choice", "values": [
        {"backbone": "ViT-B-16", "pretrained": "openai"}, {"backbone": "ViT-L-14", "pretrained": "hf-hub:imageomics/bioclip"}]}}},
     "atrw: model.pretrained: hf-hub:imageomics/bioclip is a ViT-B-16, not a ViT-L-14: set model.backbone: ViT-B-16 "
     "(searched model=backbone=ViT-L-14, pretrained=hf-hub:imageomics/bioclip)"),
    ({"search_space": {"model.backbone": {"kind": "choice", "values": ["ViT-B-16", "ViT-L-14"]},  # every pair TPE may draw
                       "model.pretrained": {"kind": "choice", "values": ["hf-hub:imageomics/bioclip"]}}},
     "atrw: model.pretrained: hf-hub:imageomics/bioclip is a ViT-B-16, not a ViT-L-14"),
    ({"search_space": {"model.pretrained": {"kind": "choice", "values": ["openai", "opena1"]}}},
     "atrw: model.pretrained: 'opena1' is not an open_clip weights tag of ViT-B-16 (tags: openai, "),
])
def test_each_problem_names_dataset_key_and_fix(tmp_path: Path, capsys, changes: dict, line: str):
    f = full_with(tmp_path, **changes)
    assert main([str(f), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert line in err and "Traceback" not in err
    assert all(ln.startswith(f"error: {f}: ") or ln.startswith(f"{f}: ") for ln in err.strip().splitlines())


def test_a_trial_wider_than_the_cluster_is_refused():
    sweep = load_sweep(ROOT / "sweeps" / "full.yaml")
    problems = [str(p) for p in check_sweep(sweep, cluster_gpus=2)]
    assert problems == ["polarbear: dataset_resources.polarbear: one trial needs 4 GPUs, the cluster has 2: it could "
                        "never start; lower workers/gpus or add GPU nodes"]
    assert check_sweep(sweep, cluster_gpus=4) == []
    assert [str(p) for p in check_sweep(sweep, cluster_gpus=4, cluster_cpus=16)] == [
        "polarbear: dataset_resources.polarbear: one trial needs 32 CPUs, the cluster has 16: it could never start; "
        "lower cpus/workers"]


def test_half_gpu_trials_pack_two_to_a_gpu():
    sweep = load_sweep(ROOT / "sweeps" / "full.yaml")
    sweep = dataclasses.replace(sweep, dataset_resources={**sweep.dataset_resources, "stoat": {"gpus": 0.5, "cpus": 4}})
    assert not [p for p in check_sweep(sweep, cluster_gpus=1) if p.dataset == "stoat"]  # half a GPU fits one
    budget = GpuBudget(cluster_gpus=4, chains_at_once=1)
    assert budget.trials(sweep, "stoat", "indivaid") == 8 and budget.demand(sweep, "stoat", "indivaid") == 4  # 8 on 4 GPUs
    assert budget.trials(sweep, "atrw", "indivaid") == 4


def test_asha_rungs_and_the_gpu_budget():
    assert asha_rungs(10, 3, 31) == [10, 30] and asha_rungs(4, 2, 21) == [4, 8, 16] and asha_rungs(10, 3, 10) == []
    sweep = load_sweep(ROOT / "sweeps" / "full.yaml")  # 8 trials at once per search, 6 searches side by side
    budget = GpuBudget(cluster_gpus=8, chains_at_once=6)
    assert budget.trials(sweep, "atrw", "clipreid") == 1 and budget.demand(sweep, "atrw", "clipreid") == 1
    assert budget.trials(sweep, "polarbear", "indivaid") == 1 and budget.demand(sweep, "polarbear", "indivaid") == 4  # a gang
    alone = GpuBudget(cluster_gpus=16, chains_at_once=1)
    assert alone.trials(sweep, "atrw", "indivaid") == 8 and alone.trials(sweep, "polarbear", "indivaid") == 4
    cpu = load_sweep(ROOT / "sweeps" / "smoke.yaml")
    assert GpuBudget(cluster_gpus=0, chains_at_once=3).trials(cpu, "synthetic", "indivaid") == cpu.search.max_concurrent


def test_a_method_that_does_not_train_runs_as_one_worker():
    """Zero-shot only evaluates, and evaluation runs on rank 0: PolarBear's 4 DDP workers would hold
    3 GPUs that do nothing. It runs as one plain trial on one GPU instead."""
    sweep = load_sweep(ROOT / "sweeps" / "full.yaml")
    assert sweep.resources_for("polarbear").workers == 4 == sweep.resources_for("polarbear", "indivaid").workers
    zs = sweep.resources_for("polarbear", "zeroshot")
    assert zs.workers == 1 and zs.gpus == sweep.resources_for("polarbear").gpus == 1
    assert gpus_per_trial(sweep, "polarbear", "zeroshot") == 1 and gpus_per_trial(sweep, "polarbear") == 4
    assert GpuBudget(cluster_gpus=16, chains_at_once=1).trials(sweep, "polarbear", "zeroshot") == 8


def test_checkpoint_policy_skips_short_runs_and_spaces_long_ones():
    from harness.estimate import apply_checkpoint_policy, checkpoint_every, published_counts

    sweep = load_sweep(ROOT / "sweeps" / "full.yaml")
    applied = apply_checkpoint_policy(sweep)
    # every paper dataset trains in minutes on an H200: no mid-run checkpoint at all
    assert {d: trial_config(applied, d, "indivaid", {}).checkpoint.every for d in sweep.datasets} == dict.fromkeys(sweep.datasets, 0)
    cfg = trial_config(sweep, "polarbear", "indivaid", {"stage2.epochs": 600})  # ~2 h on one GPU
    every = checkpoint_every(cfg, published_counts(cfg), sweep.checkpoint_policy, workers=1)
    assert every is not None and 1 <= every < 600
    off = dataclasses.replace(sweep, checkpoint_policy=dataclasses.replace(sweep.checkpoint_policy, enabled=False))
    assert apply_checkpoint_policy(off) == off


def test_checkpoint_size_is_the_real_backbones():
    from harness.estimate import inference_bytes, train_state_bytes

    cfg = trial_config(load_sweep(ROOT / "sweeps" / "full.yaml"), "lion", "indivaid", {})
    assert 0.9e9 < train_state_bytes(cfg, 75) < 1.2e9  # ViT-B/16 image tower + Adam moments, fp32
    assert 0.3e9 < inference_bytes(cfg, 75) < 0.4e9
    assert train_state_bytes(trial_config(load_sweep(ROOT / "sweeps" / "full.yaml"), "lion", "zeroshot", {}), 75) == 0


@pytest.mark.parametrize("name", ["polarbear", "mpdd", "stoat"])
def test_rehearsal_data_has_the_published_identities_in_the_real_layout(name: str, tmp_path: Path):
    from harness.rehearsal import generate_reference_dataset
    from indivaid.data import SplitConfig, build_split, open_dataset
    from indivaid.data.adapters import make_adapter

    info = make_adapter(name).info
    path = generate_reference_dataset(name, tmp_path, train_images=16, test_images=(2, 3))
    assert path.name == info.name  # under a folder named after the generation settings
    cat = open_dataset(name, path)  # the dataset's own adapter and file-name format
    found = {part: cat.table.filter(cat.table["given_split"] == part)["identity"].n_unique() for part in info.expected}
    assert found == {part: n for part, (n, _) in info.expected.items()}
    split = build_split(cat, SplitConfig())
    for stage in ("val", "test"):  # every query keeps a true match under the dataset's protocol
        q, g = split.query_gallery(stage)
        assert q.height and g.height
    if info.video:  # the video is the camera field: query and gallery come from different videos
        q, g = split.query_gallery("test")
        for ident in q["identity"].unique():
            assert set(q.filter(q["identity"] == ident)["camera"]).isdisjoint(g.filter(g["identity"] == ident)["camera"])
    assert generate_reference_dataset(name, tmp_path, 16, (2, 3)) == path  # made once, then reused


def test_rehearsal_keeps_the_plan_and_substitutes_data_model_and_reductions(tmp_path: Path):
    from harness.estimate import published_counts
    from harness.rehearsal import REHEARSAL_MODEL, Reductions, declared_resources, rehearsal_sweep

    real = load_sweep(ROOT / "sweeps" / "full.yaml")
    red = Reductions(steps_per_epoch=3, num_samples=2, seeds=1, gpus=8)
    reh = rehearsal_sweep(real, red, tmp_path / "data", {d: tmp_path / "data" / d for d in real.datasets})
    assert reh.rehearsal and reh.name == "full-rehearsal" and reh.storage_path.name == "full-rehearsal"
    assert (reh.search.num_samples, reh.search.max_concurrent, reh.scheduler) == (2, real.search.max_concurrent, real.scheduler)
    assert reh.final.seeds_for("atrw") == 5 and reh.final.seeds_for("lion") == 1  # one dataset keeps the paired test
    assert reh.resources_for("polarbear") == real.resources_for("polarbear")  # 4 DDP workers, GPUs declared
    for d in real.datasets:
        r, c = trial_config(real, d, "indivaid", {}), trial_config(reh, d, "indivaid", {})
        assert (c.stage1.batch_p, c.stage1.lr, c.stage2) == (r.stage1.batch_p, r.stage1.lr, r.stage2)  # as the file has them
        # stage 1 runs the epochs the real data gives it: max(epochs, min_steps / steps per epoch)
        steps = -(-published_counts(r).train // (r.stage1.batch_p * r.stage1.batch_k))
        assert (c.stage1.epochs, c.stage1.min_steps) == (max(r.stage1.epochs, -(-r.stage1.min_steps // steps)), 0)
        assert (c.eval, c.checkpoint.every) == (r.eval, 0)  # the policy's decision for the real backbone
        assert c.model.backbone == REHEARSAL_MODEL["backbone"] and c.model.pretrained is None
        assert (c.runtime.device, c.runtime.max_steps_per_epoch, c.data.path) == ("cpu", 3, str(tmp_path / "data" / d))
    declared = declared_resources(real, red)
    assert declared["num_gpus"] == 8 and declared["num_cpus"] >= 8 * 8


def test_rehearsal_runs_searched_backbones_on_the_tiny_model_and_preflight_runs_each(tmp_path: Path):
    """A searched backbone is sampled and recorded in a rehearsal, but every trial builds the tiny
    model (pinned); the preflight runs each searched backbone x weights once (a grid)."""
    from harness.config import ParamSpec
    from harness.plan import search_space
    from harness.rehearsal import REHEARSAL_MODEL, Reductions, preflight_sweep, rehearsal_sweep

    real = load_sweep(ROOT / "sweeps" / "backbones.yaml")
    reh = rehearsal_sweep(real, Reductions(), tmp_path / "data", {d: tmp_path / "data" / d for d in real.datasets})
    assert reh.search_space == real.search_space  # the dimension still runs through the search
    label = "backbone=ViT-L-14, pretrained=hf-hub:imageomics/bioclip-2"
    assert trial_config(real, "atrw", "indivaid", {"model": label}).model.backbone == "ViT-L-14"
    c = trial_config(reh, "atrw", "indivaid", {"model": label, "stage2.lr": 3e-5})
    assert (c.model.backbone, c.model.pretrained, c.stage2.lr) == (REHEARSAL_MODEL["backbone"], None, 3e-5)
    pre = preflight_sweep(real, 4)
    assert pre.search_space == {"model": ParamSpec("grid", values=real.search_space["model"].values)}
    assert len(search_space(pre, "indivaid")["model"]["grid_search"]) == 4

