"""Sweep files: validated against the trainer config when they load; one clear error line each."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.config import load_sweep, trial_config
from indivaid.config import ConfigError
from harness.plan import plan, search_space
from harness.sweep import main

ROOT = Path(__file__).resolve().parents[1]
GOOD = """
name: t
datasets: [synthetic]
methods: [indivaid, clipreid, zeroshot]
base: {preset: tiny}
search_space:
  stage2.lr: {kind: loguniform, low: 0.0001, high: 0.01}
  fusion.heads: {kind: choice, values: [1, 2]}
search: {num_samples: 3}
scheduler: {grace_period: 5}
final: {seeds: 2}
"""


def write(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "s.yaml"
    f.write_text(text)
    return f


def test_shipped_sweep_files_load():
    for name in ("smoke", "full", "ablation", "ablation-cpu", "backbones"):
        load_sweep(ROOT / "sweeps" / f"{name}.yaml")


def test_plan_drops_keys_that_do_not_apply_and_counts_trials(tmp_path: Path):
    sweep = load_sweep(write(tmp_path, GOOD))
    assert set(search_space(sweep, "indivaid")) == {"stage2.lr", "fusion.heads"}
    assert set(search_space(sweep, "clipreid")) == {"stage2.lr"}  # no fusion in CLIP-ReID
    assert search_space(sweep, "zeroshot") == {}
    counts = {(e.phase, e.method): n for e, n in plan(sweep)}
    assert counts == {("search", "indivaid"): 3, ("final", "indivaid"): 2, ("search", "clipreid"): 3,
                      ("final", "clipreid"): 2, ("search", "zeroshot"): 1, ("final", "zeroshot"): 1}
    cfg = trial_config(sweep, "synthetic", "indivaid", {"stage2.lr": 0.002, "fusion.heads": 1}, seed=7)
    assert (cfg.stage2.lr, cfg.fusion.heads, cfg.runtime.seed, cfg.model.backbone) == (0.002, 1, 7, "tiny")


JOINT = """
  model:
    kind: choice
    values: [{backbone: tiny, pretrained: null}, {backbone: small, pretrained: null, stride: 8}]
"""


def test_backbone_and_weights_are_searched_together_and_zero_shot_tries_each(tmp_path: Path):
    """A choice over a section sets its keys together (Tune and Optuna see labels); a method that
    does not train evaluates every choice (a grid); the caches of every searched backbone are warmed."""
    from harness.orchestrate import cache_configs
    from harness.tuning import tune_settings

    sweep = load_sweep(write(tmp_path, GOOD.replace("search_space:\n", "search_space:" + JOINT)))
    spec = sweep.search_space["model"]
    assert spec.joint and spec.labels() == ["backbone=tiny, pretrained=None", "backbone=small, pretrained=None, stride=8"]
    cfg = trial_config(sweep, "synthetic", "clipreid", {"model": "backbone=small, pretrained=None, stride=8"})
    assert (cfg.model.backbone, cfg.model.stride, cfg.model.pretrained) == ("small", 8, None)
    same = trial_config(sweep, "synthetic", "clipreid", {"model": {"backbone": "small", "pretrained": None, "stride": 8}})
    assert same == cfg  # best.yaml may hold the mapping itself
    with pytest.raises(ConfigError, match="search_space.model: 'backbone=big' is none of its values"):
        trial_config(sweep, "synthetic", "clipreid", {"model": "backbone=big"})
    assert search_space(sweep, "indivaid")["model"].categories == spec.labels()  # TPE samples it
    assert search_space(sweep, "zeroshot") == {"model": {"grid_search": spec.labels()}}
    counts = {(e.phase, e.method): n for e, n in plan(sweep)}
    assert counts[("search", "zeroshot")] == 2 and counts[("search", "indivaid")] == 3
    exps = {e.method: e for e, _ in plan(sweep) if e.phase == "search"}
    zs = tune_settings(sweep, exps["zeroshot"], 2, 1, search_space(sweep, "zeroshot"))
    assert zs["num_samples"] == 1 and "search_alg" not in zs  # the grid runs each value once
    assert "search_alg" in tune_settings(sweep, exps["indivaid"], 3, 1, search_space(sweep, "indivaid"))
    # seeds 0 and 1 (random init) x two backbones; methods share them
    warmed = {(c["model"]["backbone"], c["runtime"]["seed"]) for c in cache_configs(sweep, "synthetic")}
    assert warmed == {("tiny", 0), ("tiny", 1), ("small", 0), ("small", 1)}


@pytest.mark.parametrize("change, message", [
    (("search: {num_samples: 3}", "serch: {num_samples: 3}"), "serch: unknown key (did you mean 'search'?)"),
    (("search_space:\n", "search_space:" + JOINT.replace("backbone: small, pretrained: null, stride: 8",
                                                          "backbone: tiny, pretrained: null")),
     "search_space.model: duplicate values (backbone=tiny, pretrained=None)"),
    (("search_space:\n", "search_space:\n  model: {kind: choice, values: [{backbone: tiny}, small]}\n"),
     "search_space.model: either every value is a mapping"),
    (("search_space:\n", "search_space:\n  model.backbone: {kind: grid, values: [tiny, small]}\n"),
     "search_space: grid keys (model.backbone) cannot be mixed with sampled keys (stage2.lr, fusion.heads)"),
    (("search_space:\n", "search_space:\n  model: {kind: choice, values: [{backbone: tiny, strid: 8}]}\n"),
     "search_space.model: model.strid: unknown key (did you mean 'stride'?)"),
    (("stage2.lr:", "stage2.lrr:"), "search_space.stage2.lrr: stage2.lrr: unknown key (did you mean 'lr'?)"),
    (("low: 0.0001, high: 0.01", "low: 0.01, high: 0.0001"), "search_space.stage2.lr: loguniform needs low < high"),
    (("values: [1, 2]", "values: [1, 3]"), "search_space.fusion.heads"),
    (("[synthetic]", "[atrv]"), "datasets[0]: unknown dataset 'atrv' (did you mean 'atrw'?)"),
    (("grace_period: 5", "grace_period: 1"), "shorter than the stage-2 warm-up"),
    (("final: {seeds: 2}", "final: {seeds: 2}\ntracking: {mlflow: {tracking_url: x}}"),
     "tracking.mlflow.tracking_url: unknown key (did you mean 'tracking_uri'?)"),
    (("final: {seeds: 2}", "final: {seeds: 2}\ntracking: {mlflow: {experiment: x}}"),
     "tracking.mlflow.tracking_uri: required key is missing"),
    (("final: {seeds: 2}", "final: {seeds: 2}\ncluster: {coordinator: x}"),
     "cluster.coordinator: unknown key (did you mean 'coordinator_resource'?)"),
    (("final: {seeds: 2}", "final: {seeds: 2}\nresources: {gpus: 1.5, use_gpu: true}"),
     "resources.gpus: 1.5: Ray gives a task a fraction of one GPU"),
])
def test_bad_sweep_files_give_one_clear_error(tmp_path: Path, capsys, change, message):
    f = write(tmp_path, GOOD.replace(*change))
    assert main([str(f), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {f}:") and message in err and len(err.splitlines()) == 1


def test_missing_dataset_is_reported_before_anything_starts(tmp_path: Path, capsys):
    f = write(tmp_path, GOOD.replace("[synthetic]", "[atrw, lion]") + f"data_root: {tmp_path / 'nowhere'}\n"
              f"storage: {tmp_path / 'results'}\n")
    assert main([str(f)]) == 2
    err = capsys.readouterr().err
    assert "missing datasets" in err and "atrw" in err and "lion" in err and "--skip-missing" in err
    assert not (tmp_path / "results").exists()


def test_dry_run_estimates_gpu_hours_from_published_sizes_without_touching_data(tmp_path: Path, capsys):
    from harness.estimate import image_counts, trial_gpu_seconds
    from harness.plan import plan_rows

    f = write(tmp_path, (ROOT / "sweeps" / "full.yaml").read_text() + f"data_root: {tmp_path / 'nowhere'}\n")
    assert main([str(f), "--dry-run"]) == 0
    assert "GPU-hours" in capsys.readouterr().out
    assert not (tmp_path / "nowhere").exists()
    sweep = load_sweep(f)
    rows = {(r.exp.phase, r.exp.dataset, r.exp.method): r for r in plan_rows(sweep)}
    assert all(r.gpu_hours is not None and "(published)" in r.images for r in rows.values())
    assert rows["search", "polarbear", "indivaid"].resources.startswith("4 workers")  # PolarBear's DDP trials
    assert rows["search", "atrw", "indivaid"].resources == "8 CPU, 1 GPU"  # one GPU: a plain function trainable
    cfg = trial_config(sweep, "atrw", "indivaid", {})
    counts = image_counts(cfg)
    assert counts is not None and counts.source == "published" and counts.train + counts.val == 3730
    one = trial_gpu_seconds(cfg, counts, evaluate_test=True)
    zs = trial_gpu_seconds(trial_config(sweep, "atrw", "zeroshot", {}), counts, evaluate_test=True)
    assert one is not None and zs is not None and 0 < zs < one
    # the stage-2 share doubles with its epochs
    longer = trial_config(sweep, "atrw", "indivaid", {"stage2.epochs": 2 * cfg.stage2.epochs})
    assert trial_gpu_seconds(longer, counts, True) > 1.5 * one


def test_generated_dataset_is_never_missing_and_dry_run_does_not_generate(tmp_path: Path, capsys):
    f = write(tmp_path, GOOD + f"data_root: {tmp_path / 'data'}\nstorage: {tmp_path / 'results'}\n")
    from harness.plan import missing_datasets, plan_rows

    assert main([str(f), "--dry-run"]) == 0
    assert all(r.images == "not present" and r.gpu_hours is None for r in plan_rows(load_sweep(f)))
    assert missing_datasets(load_sweep(f)) == []
    assert not (tmp_path / "data").exists() and not (tmp_path / "results").exists()


def test_missing_datasets_follow_the_trainer_config_a_trial_gets(tmp_path: Path):
    from harness.plan import missing_datasets

    here = tmp_path / "atrw-copy"
    here.mkdir()
    text = GOOD.replace("[synthetic]", "[atrw, lion]").replace("base: {preset: tiny}", f"base: {{preset: tiny, data: {{path: {here}}}}}")
    text += f"data_root: {tmp_path / 'nowhere'}\nper_dataset:\n  lion: {{data: {{path: {tmp_path / 'no-lion'}}}}}\n"
    missing = missing_datasets(load_sweep(write(tmp_path, text)))
    assert missing == [("lion", str(tmp_path / "no-lion"))]  # atrw found through base.data.path


def test_closed_set_final_runs_train_on_validation_identities(tmp_path: Path):
    """The paper's protocol for finals: trained methods on closed-set splits train on train + val;
    search trials, zero-shot, open-set splits and final.train_on_val: false keep validation out."""
    sweep = load_sweep(write(tmp_path, GOOD))
    assert trial_config(sweep, "synthetic", "clipreid", {}, 0, final=True).data.train_on_val
    assert trial_config(sweep, "synthetic", "indivaid", {"stage2.lr": 1e-3}, 1, final=True).data.train_on_val
    assert not trial_config(sweep, "synthetic", "clipreid", {}, 0).data.train_on_val  # search
    assert not trial_config(sweep, "synthetic", "zeroshot", {}, 0, final=True).data.train_on_val
    open_set = load_sweep(write(tmp_path, GOOD + "per_dataset: {synthetic: {data: {split: {unknown_fraction: 0.2}}}}\n"))
    assert not trial_config(open_set, "synthetic", "clipreid", {}, 0, final=True).data.train_on_val
    held_out = load_sweep(write(tmp_path, GOOD.replace("final: {seeds: 2}", "final: {seeds: 2, train_on_val: false}")))
    assert not trial_config(held_out, "synthetic", "clipreid", {}, 0, final=True).data.train_on_val


def test_best_search_trial_ignores_failed_and_nan_trials_and_breaks_ties_by_id():
    import polars as pl

    from harness.results import best_search_trials

    rows = [  # (trial_id, status, best_val_mAP, val_rank1, stage2.lr)
        ("a", "error", 0.90, 0.9, 1.0), ("b", "completed", float("nan"), 0.1, 2.0), ("c", "stopped", 0.50, 0.7, 3.0),
        ("d", "completed", 0.50, 0.2, 4.0), ("e", "completed", 0.40, 0.8, 5.0),
    ]
    t = pl.DataFrame([{"dataset": "x", "method": "indivaid", "phase": "search", "trial_id": i, "status": st,
                       "best_val_mAP": v, "val_mAP": v, "val_rank1": r1, "param.stage2.lr": lr} for i, st, v, r1, lr in rows]
                     + [{"dataset": "x", "method": "indivaid", "phase": "final", "trial_id": "f", "status": "completed",
                         "best_val_mAP": 0.99, "val_mAP": 0.99, "val_rank1": 0.99, "param.stage2.lr": 9.0}])
    best = best_search_trials(t)[("x", "indivaid")]
    assert best["trial_id"] == "c" and best["params"] == {"stage2.lr": 3.0}  # tie 0.50: smaller id; no error, NaN, final
    assert best_search_trials(t, "val_rank1")[("x", "indivaid")]["trial_id"] == "e"


def test_storage_uri_tracking_and_cluster_sections_load(tmp_path: Path, capsys):
    """A storage URI is kept as given (never made a local path), --storage overrides the file's,
    caches default to a file path; tracking, cluster and a fractional GPU load typed."""
    from harness.sweep import with_cli_overrides

    uri = "s3://bucket/sweeps/t?endpoint_override=127.0.0.1:9000&scheme=http"
    text = GOOD + (f"storage: '{uri}'\ntracking: {{mlflow: {{tracking_uri: 'sqlite:///{tmp_path}/m.db'}}}}\n"
                   "cluster: {coordinator_resource: cpu_node, runtime_env: {py_modules: [harness]}}\n"
                   "resources: {gpus: 0.5, use_gpu: true}\n")
    sweep = load_sweep(write(tmp_path, text))
    assert sweep.storage_uri == uri and not sweep.store.local and sweep.store.root == "bucket/sweeps/t"
    assert sweep.cache_path == Path("~/.cache/indivaid/sweeps/t").expanduser()
    assert sweep.tracking.mlflow.tracking_uri.startswith("sqlite:") and sweep.cluster.runtime_env == {"py_modules": ["harness"]}
    local = with_cli_overrides(sweep, str(tmp_path / "r"), {"working_dir": "."})
    assert local.storage_path == tmp_path / "r" and local.cache_path == tmp_path / "r" / "cache"
    assert local.cluster.runtime_env == {"working_dir": "."} and local.cluster.coordinator_resource == "cpu_node"
    assert main([str(write(tmp_path, text)), "--dry-run"]) == 0  # 0.5 GPU per trial plans fine
    assert "0.5 GPU" in capsys.readouterr().out
