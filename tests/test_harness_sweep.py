"""A real (local) Ray Tune + Optuna + ASHA sweep of the tiny trainer, end to end."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from conftest import SMALL

from harness.config import load_sweep
from harness.orchestrate import run_sweep
from harness.results import STARTS_FILE


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    # The dashboard (ray[default]) must run: without it, placement groups of ASHA-stopped Train runs leak.
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
             _temp_dir=f"/tmp/ray-test-{os.getpid()}")
    yield
    ray.shutdown()


BASE_SPACE = {"stage2.lr": {"kind": "loguniform", "low": 1e-4, "high": 3e-3},
              "fusion.heads": {"kind": "choice", "values": [1, 2]}}


def sweep_file(tmp_path: Path, data_root: Path, **extra) -> Path:
    doc = {
        "name": "t", "storage": str(tmp_path / "results"), "data_root": str(data_root),
        "datasets": ["synthetic"], "methods": ["indivaid", "clipreid", "zeroshot"],
        "base": {"preset": "tiny", "model": {"input_size": [32, 64]},
                 "stage1": {"epochs": 1, "min_steps": 0, "batch_p": 8},
                 "stage2": {"epochs": 4, "warmup_epochs": 1, "batch_p": 8},
                 "eval": {"every": 1}, "checkpoint": {"every": 1}, "runtime": {"threads": 1}},
        "per_dataset": {"synthetic": {"data": {"options": dict(SMALL)}}},
        "search_space": BASE_SPACE,
        "search": {"num_samples": 3, "max_concurrent": 1, "startup_trials": 1},
        "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2},
        "final": {"seeds": 2},
        **extra,
    }
    f = tmp_path / "sweep.yaml"
    f.write_text(yaml.safe_dump(doc))
    return f


def assert_asha_rule(storage: Path, method: str, rungs: tuple[int, ...], t: pl.DataFrame) -> None:
    """Sequential trials, reduction factor 2: ASHA stops a trial at a rung exactly when its score
    there is below the median of the earlier trials' scores at that rung. Checked from the
    validation mAP each trial reported, in start order."""
    trials = []
    for info in storage.glob(f"search-synthetic-{method}/*/trial.json"):
        rows = [json.loads(line) for line in (info.parent / "result.json").read_text().splitlines()]
        at = {int(r["s2_epoch"]): r["val_mAP"] for r in rows if r["stage"] == 2}
        trials.append((json.loads(info.read_text())["started"], json.loads(info.read_text())["trial_id"], at))
    recorded: dict[int, list[float]] = {r: [] for r in rungs}
    stopped = dict(zip(t["trial_id"], t["stop_reason"] == "asha_stopped"))
    for _, trial_id, at in sorted(trials):
        cut = None
        for r in rungs:
            if r not in at:
                break
            earlier = list(recorded[r])
            recorded[r].append(at[r])
            if earlier and at[r] < float(np.percentile(earlier, 50)):
                cut = r
                break
        assert stopped[trial_id] == (cut is not None and cut < max(rungs)), (method, trial_id, at, recorded)


@pytest.mark.timeout(600)
def test_smoke_sweep_end_to_end(ray_local, data_root: Path, tmp_path: Path):
    # the three dataset x method chains run concurrently, each Tuner driven from its own Ray task
    # the backbone is searched too, as a joint choice (a section's keys set together): TPE samples it
    # for the trained methods, zero-shot evaluates each (a grid)
    space = {**BASE_SPACE, "model": {"kind": "choice", "values": [{"backbone": "tiny"}, {"backbone": "small"}]}}
    sweep = load_sweep(sweep_file(tmp_path, data_root, search_space=space,
                                  search={"num_samples": 3, "max_concurrent": 1, "startup_trials": 1,
                                          "max_concurrent_experiments": 3}))
    out = run_sweep(sweep)
    t = pl.read_parquet(out)
    search = t.filter(pl.col("phase") == "search")
    zeroshot = search.filter(pl.col("method") == "zeroshot")
    assert sorted(zeroshot["param.model"]) == ["backbone=small", "backbone=tiny"]
    for r in t.iter_rows(named=True):  # each trial trained the backbone its label names
        ran = json.loads(Path(r["config_path"]).read_text())["model"]["backbone"]
        assert r["param.model"] == f"backbone={ran}", (r["trial_id"], r["param.model"], ran)
    assert search.filter(pl.col("method") == "indivaid").height == 3
    assert search.filter(pl.col("method") == "clipreid").height == 3
    assert set(search["stop_reason"]) <= {"completed", "asha_stopped"}
    assert (search["stop_reason"] == "completed").sum() >= 2
    for m in ("indivaid", "clipreid"):  # one after the other, in one process that Tune hands on
        trials = search.filter(pl.col("method") == m)["config_path"].to_list()
        pids = {json.loads(line)["pid"] for p in trials
                for line in (Path(p).parent.parent / STARTS_FILE).read_text().splitlines()}
        assert len(pids) < len(trials), (m, pids)
    for m in ("indivaid", "clipreid"):
        assert_asha_rule(sweep.storage_path, m, rungs=(1, 2, 4), t=search.filter(pl.col("method") == m))
    assert search.filter(pl.col("method") == "clipreid")["param.fusion.heads"].is_null().all()  # dropped for it
    final = t.filter(pl.col("phase") == "final")
    assert sorted(final.filter(pl.col("method") == "indivaid")["seed"].to_list()) == [0, 1]
    assert final["test_mAP"].is_not_null().all() and search["test_mAP"].is_null().all()  # test only in final
    assert t["split_hash"].n_unique() == 1 and set(t["protocol"]) == {"market1501"}
    assert all(Path(p).is_file() for p in final["checkpoint_path"].to_list())
    best = yaml.safe_load((sweep.storage_path / "best.yaml").read_text())
    assert set(best) == {"synthetic/indivaid", "synthetic/clipreid", "synthetic/zeroshot"}
    assert (sweep.storage_path / "manifest.json").is_file()
    # the shared frozen-feature caches were computed once per key, by the warm-up task, before any trial;
    # random-init weights depend on the seed: per searched backbone, one key for seed 0 (search + final)
    # and one for seed 1
    made = [json.loads(line) for line in (sweep.storage_path / "cache" / "features.jsonl").read_text().splitlines()]
    files = sorted(p.name for p in (sweep.storage_path / "cache").glob("features-*.pt"))
    assert sorted(m["file"] for m in made) == files and len(files) == 4
    assert {m["origin"] for m in made} == {"warm"}


@pytest.mark.timeout(600)
def test_torchtrainer_path_runs_ddp_workers_and_releases_resources(ray_local, data_root: Path, tmp_path: Path):
    import ray
    from ray.util.placement_group import placement_group_table

    f = sweep_file(tmp_path, data_root, methods=["clipreid"], resources={"cpus": 0.5, "workers": 2},  # DDP over gloo
                   search={"num_samples": 2, "max_concurrent": 1, "startup_trials": 1}, final={"seeds": 0})
    out = run_sweep(load_sweep(f))
    t = pl.read_parquet(out)
    assert t.height == 2 and set(t["stop_reason"]) <= {"completed", "asha_stopped"}
    assert (t["stop_reason"] == "completed").sum() >= 1
    # every placement group of the sweep's trials and Train workers is removed and every CPU is free
    # again (both happen asynchronously after the sweep returns)
    deadline = time.time() + 60
    while time.time() < deadline:
        states = [pg["state"] for pg in placement_group_table().values()]
        free = ray.available_resources().get("CPU", 0) == pytest.approx(ray.cluster_resources()["CPU"])
        if all(s == "REMOVED" for s in states) and free:
            break
        time.sleep(1)
    assert all(s == "REMOVED" for s in states), states
    if not free:
        from ray.util.state import list_actors, list_tasks

        alive = [(a.class_name, a.state) for a in list_actors() if a.state != "DEAD"]
        running = [(t.name, t.state) for t in list_tasks() if t.state not in ("FINISHED", "FAILED")]
        pytest.fail(f"CPUs still held: {ray.available_resources()} of {ray.cluster_resources()}; "
                    f"actors {alive}; tasks {running}")


@pytest.mark.timeout(600)
def test_failing_trial_is_a_row_with_its_reason_and_the_rest_finish(ray_local, data_root: Path, tmp_path: Path):
    f = sweep_file(tmp_path, data_root, methods=["clipreid", "zeroshot"], max_failures=1,
                   search_space={"stage2.lr": {"kind": "choice", "values": [1e30]}, "model.similarity": {"kind": "choice", "values": ["dot"]}},
                   search={"num_samples": 1, "max_concurrent": 1, "startup_trials": 1}, final={"seeds": 0})
    t = pl.read_parquet(run_sweep(load_sweep(f)))
    bad = t.filter(pl.col("method") == "clipreid").row(0, named=True)
    assert bad["status"] == "error" and bad["stop_reason"] == "error"
    assert "TrainingError: stage 2, epoch 1: loss term" in bad["error"]
    good = t.filter(pl.col("method") == "zeroshot").row(0, named=True)
    assert good["status"] == "completed" and good["val_mAP"] > 0


@pytest.mark.timeout(600)
def test_final_runs_are_scored_for_robustness_once_and_the_leaderboard_shows_it(ray_local, data_root: Path,
                                                                               tmp_path: Path, capsys):
    """``final: {robustness: true}``: the final model is scored with corrupted queries, its report
    stored in run/, its figures in trials.parquet and the leaderboard's robustness table. A restarted
    trial (fresh workdir, the finished run's files only) does not score again; without the stored
    scores it scores the stored model, to the same numbers (seeded)."""
    import math

    from harness import leaderboard as lb
    from harness.trial import RunFiles, restore_run, score_robustness

    f = sweep_file(tmp_path, data_root, methods=["clipreid"], final={"seeds": 1, "robustness": True},
                   search={"num_samples": 1, "max_concurrent": 1, "startup_trials": 1})
    sweep = load_sweep(f)
    t = pl.read_parquet(run_sweep(sweep))
    final = t.filter(pl.col("phase") == "final").row(0, named=True)
    rel = final["robust_rel_mAP"]
    assert final["status"] == "completed" and rel is not None and math.isfinite(rel) and 0 < rel < 1.5, final
    assert final["robust_clean_mAP"] > 0 and final["robust_jpeg_rel_mAP"] is not None
    assert t.filter(pl.col("phase") == "search")["robust_rel_mAP"].is_null().all()  # only final runs are scored
    run = Path(final["config_path"]).parent
    assert (run / "robustness.png").stat().st_size > 0
    stored = json.loads((run / "robustness.json").read_text())
    assert stored["split"] == "test" and stored["seed"] == final["seed"]
    assert stored["metrics"]["robust_rel_mAP"] == pytest.approx(rel)
    capsys.readouterr()
    assert lb.main([str(sweep.storage_path), "--format", "markdown", "--no-report", "-q"]) == 0
    assert "## Robustness to corrupted queries" in capsys.readouterr().out

    folder = run.parent.relative_to(sweep.storage_path).as_posix()
    workdir = tmp_path / "restarted"
    workdir.mkdir()
    assert restore_run(sweep.store, folder, workdir, None) == "finished run"
    before = (run / "robustness.json").stat().st_mtime_ns
    score_robustness(RunFiles(sweep.store, folder, workdir), final["seed"])  # scored already: left alone
    assert (run / "robustness.json").stat().st_mtime_ns == before and not (workdir / "model.pt").exists()
    (run / "robustness.json").unlink()
    score_robustness(RunFiles(sweep.store, folder, workdir), final["seed"])  # the stored model, scored again
    again = json.loads((run / "robustness.json").read_text())
    assert again["metrics"] == pytest.approx(stored["metrics"])


@pytest.mark.timeout(600)
def test_reproduce_reruns_a_recorded_trial_to_the_same_numbers(ray_local, data_root: Path, tmp_path: Path):
    from harness.sweep import reproduce

    f = sweep_file(tmp_path, data_root, methods=["zeroshot"], final={"seeds": 1})
    sweep = load_sweep(f)
    t = pl.read_parquet(run_sweep(sweep))
    final = t.filter(pl.col("phase") == "final").row(0, named=True)
    out = reproduce(sweep, final["trial_id"])
    assert out["val"]["mAP"] == pytest.approx(final["val_mAP"]) and out["test"]["mAP"] == pytest.approx(final["test_mAP"])
    with pytest.raises(Exception, match="no trial 'nope'"):
        reproduce(sweep, "nope")


@pytest.mark.timeout(600)
def test_crashed_trial_is_retried_from_its_checkpoint(ray_local, data_root: Path, tmp_path: Path):
    """SIGKILL a trial's process once it has reported a Ray checkpoint: Tune restarts it and the
    trainer resumes from that checkpoint (``tune.get_checkpoint()``) instead of starting over."""
    import signal
    import threading

    f = sweep_file(tmp_path, data_root, methods=["clipreid"], max_failures=1, scheduler={"kind": "none"},
                   search={"num_samples": 1, "max_concurrent": 1, "startup_trials": 1}, final={"seeds": 0},
                   search_space={"stage2.epochs": {"kind": "choice", "values": [12]}})
    sweep = load_sweep(f)
    killed: list[int] = []

    def kill_after_first_checkpoint() -> None:
        # A Ray checkpoint in the trial's storage folder (Tune stores it while the trial reports, unlike
        # Tune's result.json, which the driver writes with a lag) says the run has something to resume
        # from; the second one, for Tune to have registered the first (it keeps only the latest).
        deadline = time.time() + 300
        while time.time() < deadline:
            for ckpt in sweep.storage_path.glob("search-*/*/checkpoint_000001"):
                pid = json.loads((ckpt.parent / "starts.jsonl").read_text().splitlines()[0])["pid"]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    watcher.start()
    t = pl.read_parquet(run_sweep(sweep))
    watcher.join()
    assert killed, "no checkpoint appeared"
    row = t.row(0, named=True)
    assert row["status"] == "completed" and row["attempts"] == 2 and row["epochs_run"] == 12
    reports = [json.loads(x) for x in next(sweep.storage_path.glob("search-*/*/result.json")).read_text().splitlines()]
    retried = [r for r in reports if r["pid"] != killed[0]]
    # the restarted process's first report continues after the checkpoint: not stage 1, epoch 1 again
    assert retried and (retried[0]["stage"], retried[0]["epoch"]) != (1, 1), retried[0]
    assert int(retried[-1]["s2_epoch"]) == 12


@pytest.mark.timeout(600)
def test_preflight_runs_each_dataset_method_once_for_a_few_steps(ray_local, data_root: Path, tmp_path: Path):
    from harness.rehearsal import preflight, preflight_rows, preflight_sweep

    space = {**BASE_SPACE, "model": {"kind": "choice", "values": [{"backbone": "tiny"}, {"backbone": "small"}]}}
    sweep = load_sweep(sweep_file(tmp_path, data_root, methods=["indivaid", "zeroshot"], search_space=space))
    report = Path(preflight(sweep, steps=2))
    psweep = preflight_sweep(sweep, 2)
    t = pl.read_parquet(psweep.storage_path / "trials.parquet")
    # once per dataset x method x searched backbone; the other searched keys keep their base values
    assert sorted(zip(t["method"], t["param.model"])) == [("indivaid", "backbone=small"), ("indivaid", "backbone=tiny"),
                                                         ("zeroshot", "backbone=small"), ("zeroshot", "backbone=tiny")]
    assert (t["status"] == "completed").all() and "param.stage2.lr" not in t.columns
    assert (t.filter(pl.col("method") == "indivaid")["steps_per_epoch"] == 2).all()  # a few steps per stage
    rows = {(r["method"], r["variant"]): r for r in preflight_rows(psweep, t)}
    first = rows[("indivaid", "model=backbone=tiny")]
    assert first["first_report_s"] > 0 and first["images_per_s"] > 0
    assert first["max_mem_gb"] is None  # no accelerator here
    text = report.read_text()
    assert "| synthetic | indivaid | model=backbone=small | completed |" in text and "peak GPU memory" in text


@pytest.mark.timeout(600)
def test_a_trial_past_its_time_limit_is_stopped_and_recorded_as_timeout(ray_local, data_root: Path, tmp_path: Path):
    base = {"preset": "tiny", "model": {"input_size": [32, 64]}, "stage1": {"epochs": 1, "min_steps": 0, "batch_p": 8},
            "stage2": {"epochs": 5000, "warmup_epochs": 1, "batch_p": 8}, "runtime": {"threads": 1}}
    f = sweep_file(tmp_path, data_root, methods=["clipreid"], base=base, search={"num_samples": 1, "startup_trials": 1},
                   scheduler={"kind": "none"}, final={"seeds": 0}, max_failures=1, trial_timeout_minutes=0.25)
    started = time.time()
    t = pl.read_parquet(run_sweep(load_sweep(f)))
    assert t.height == 1 and t["status"][0] == "timeout" and t["stop_reason"][0] == "timeout"
    assert "trial_timeout_minutes" in t["error"][0]  # the restart failed at once, naming the limit
    # two starts: the one the watchdog ended and Tune's restart, which failed at once
    assert t["attempts"][0] == 2 and time.time() - started < 240  # the 5000-epoch run (minutes at least) was cut short
    trial_dir = next((tmp_path / "results").glob("search-*/*/timeout.json")).parent
    assert not (trial_dir / "run" / "result.json").exists()


@pytest.mark.timeout(300)
def test_progress_board_feeds_the_live_table_and_is_made_again_when_lost(ray_local, data_root: Path, tmp_path: Path):
    """Tune callbacks push trial states to the board actor; the live table reads it. When the board
    dies the table keeps its last snapshot, pushes are skipped without an error, and a new board is
    made and refilled from trials.parquet."""
    from types import SimpleNamespace

    import ray
    from rich.console import Console

    from harness.plan import Experiment
    from harness.progress import SweepProgress, find_board, start_board
    from harness.results import to_table
    from harness.tuning import ProgressCallback

    sweep = load_sweep(sweep_file(tmp_path, data_root, name="board-test", methods=["clipreid"]))
    board = start_board(sweep.name)
    assert board is not None and find_board(sweep.name) is not None
    progress = SweepProgress(sweep, total=3, board=board)
    cb = ProgressCallback(sweep.name, Experiment("search", "synthetic", "clipreid"), sweep.storage_uri)
    trials = [SimpleNamespace(trial_id=i, path=str(tmp_path / i), last_result={}) for i in ("a", "b")]
    for t in trials:
        cb.on_trial_start(0, trials, t)
        cb.on_trial_result(0, trials, t, {"s2_epoch": 2, "best_val_mAP": 0.25})
    trials[0].last_result = {"run_finished": 1.0}
    cb.on_trial_complete(0, trials, trials[0])

    def render() -> str:
        console = Console(width=200, record=True)
        console.print(progress)
        return console.export_text()

    deadline = time.time() + 30
    while "1/3 trials finished" not in (text := render()) and time.time() < deadline:
        time.sleep(0.2)
    assert "1/3 trials finished" in text and "25.0" in text, text
    ray.kill(board, no_restart=True)  # asynchronous: the board answers until the kill takes effect
    deadline = time.time() + 30
    while "live progress stale" not in (text := render()) and time.time() < deadline:
        time.sleep(0.2)
    assert "live progress stale" in text and "1/3 trials finished" in text, text  # the last snapshot is kept
    cb.on_trial_complete(0, trials, trials[1])  # the board is gone: skipped, no error
    progress.record_results(to_table([{"trial_id": "a", "dataset": "synthetic", "method": "clipreid",
                                       "phase": "search", "status": "completed", "attempts": 1, "best_val_mAP": 0.5}]))
    deadline = time.time() + 30
    while True:
        progress._looked = 0.0  # look for a board now instead of after LOOKUP_EVERY_S
        text = render()
        if "1/3 trials finished" in text and "stale" not in text:
            break
        assert time.time() < deadline, text
        time.sleep(0.5)
    assert "50.0" in text and progress.board is not None
