"""Interrupt the sweep driver (Ctrl-C, then SIGKILL) mid-search, then ``--resume``: finished trials are
not re-run, an interrupted search is never marked finished, Optuna's study keeps what it learnt,
nothing is lost."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from test_harness_sweep import sweep_file

from harness.results import FINISHED

ROOT = Path(__file__).resolve().parents[1]


def trial_folders(storage: Path, experiment: str) -> list[Path]:
    """The experiment's started trials (each writes its trial.json first), in start order."""
    infos = [(json.loads(p.read_text())["started"], p.parent) for p in storage.glob(f"{experiment}/*/trial.json")
             if p.stat().st_size]
    return [folder for _, folder in sorted(infos)]


def recorded_by_tune(experiment: Path, trial: Path) -> bool:
    """Whether Tune's saved experiment state (written by the driver now and then, and after a
    trial's checkpoint) names the trial: a hard kill before that leaves the trial 'lost'
    (tests/test_harness_results.py), which this test keeps out of its timing."""
    trial_id = json.loads((trial / "trial.json").read_text())["trial_id"]
    return any(trial_id in p.read_text() for p in experiment.glob("experiment_state-*.json"))


def wait_for_trial_with_checkpoint(driver: subprocess.Popen, storage: Path, n: int, *, recorded: bool = False) -> None:
    """Until the experiment's ``n``-th trial has started (the earlier ones have ended: one trial at a
    time) and stored a Ray checkpoint (and, if ``recorded``, Tune's saved state names it)."""
    deadline = time.time() + 600
    while time.time() < deadline:
        assert driver.poll() is None, "the sweep ended before it could be interrupted"
        folders = trial_folders(storage, "search-synthetic-clipreid")
        if len(folders) >= n and any(folders[n - 1].glob("checkpoint_*")) and (
                not recorded or recorded_by_tune(storage / "search-synthetic-clipreid", folders[n - 1])):
            return
        time.sleep(0.2)
    raise AssertionError(f"trial {n} did not checkpoint in time")


@pytest.mark.timeout(900)
def test_killed_driver_resumes_without_rerunning_finished_trials(data_root: Path, tmp_path: Path):
    """Ctrl-C and then SIGKILL the driver while the Optuna search is half done (one trial at a time),
    ``--resume`` after each: the study keeps the trials that ended before each interruption,
    completed or pruned, and holds num_samples trials in the end; no finished trial runs again."""
    from ray.tune.search.optuna import OptunaSearch

    f = sweep_file(tmp_path, data_root, methods=["clipreid", "zeroshot"],
                   search={"num_samples": 3, "max_concurrent": 1, "startup_trials": 1}, final={"seeds": 0})
    storage = tmp_path / "results"
    env = {**os.environ, "RAY_CHDIR_TO_TRIAL_DIR": "0"}
    # Ctrl-C while the search's second trial runs: the sweep stops, the search is not marked finished
    driver = subprocess.Popen([sys.executable, "-m", "harness.sweep", str(f)], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_trial_with_checkpoint(driver, storage, 2)
    first = trial_folders(storage, "search-synthetic-clipreid")[0]
    driver.send_signal(signal.SIGINT)
    _, err = driver.communicate(timeout=300)
    assert driver.returncode == 130 and "continue with --resume" in err and "Traceback" not in err, err[-3000:]
    assert not (storage / "search-synthetic-clipreid" / FINISHED).exists()
    assert not (storage / "search-synthetic-zeroshot").exists()  # the sweep stopped there
    with contextlib.suppress(ProcessLookupError):
        os.killpg(driver.pid, signal.SIGKILL)  # whatever the local Ray left behind (normally nothing)
    # then a hard kill of the resumed driver while the search's third trial runs
    driver = subprocess.Popen([sys.executable, "-m", "harness.sweep", str(f), "--resume"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_trial_with_checkpoint(driver, storage, 3, recorded=True)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
    driver.wait()
    ended_before_kill = [json.loads((p / "trial.json").read_text())["trial_id"]
                         for p in trial_folders(storage, "search-synthetic-clipreid")[:2]]
    assert not (storage / "trials.parquet").exists() or pl.read_parquet(storage / "trials.parquet").height < 4
    finished = {p: p.stat().st_mtime_ns for p in storage.glob("search-synthetic-clipreid/*/run/result.json")}
    assert first / "run" / "result.json" in finished  # the first trial had finished (it is never pruned)
    resumed = subprocess.run([sys.executable, "-m", "harness.sweep", str(f), "--resume"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    t = pl.read_parquet(storage / "trials.parquet")
    # the interrupted search was resumed, not restarted: num_samples trials in all
    assert t.filter(pl.col("method") == "clipreid").height == 3 and t.filter(pl.col("method") == "zeroshot").height == 1
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # not re-run
    assert (t["status"] != "error").all() and set(t["status"]) <= {"completed", "stopped"}
    # Optuna's study (Tune's searcher state) holds the search's trials, each ended as a full run or
    # pruned by ASHA, those that ended before the kills among them
    searcher = OptunaSearch()
    searcher.restore_from_dir(str(storage / "search-synthetic-clipreid"))
    study = {t.number: t.state.name for t in searcher._ot_study.trials}
    states = {tid: study[trial.number] for tid, trial in searcher._ot_trials.items()}  # Tune trial id -> Optuna's
    assert len(study) == 3 and set(states) == set(t.filter(pl.col("method") == "clipreid")["trial_id"])
    assert set(states.values()) <= {"COMPLETE", "PRUNED"} and states[ended_before_kill[0]] == "COMPLETE", states
    stopped = set(t.filter(pl.col("stop_reason") == "asha_stopped")["trial_id"])
    assert {tid for tid, st in states.items() if st == "PRUNED"} == stopped
    assert all(states[tid] in ("COMPLETE", "PRUNED") for tid in ended_before_kill)
    # running it again without --resume is refused, before anything is written
    again = subprocess.run([sys.executable, "-m", "harness.sweep", str(f)], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 2 and "continue with --resume" in again.stderr and "Traceback" not in again.stderr
    # and --resume on the finished sweep starts no trial
    starts = {p: p.read_text() for p in storage.glob("*/*/starts.jsonl")}
    noop = subprocess.run([sys.executable, "-m", "harness.sweep", str(f), "--resume"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert noop.returncode == 0, noop.stderr[-3000:]
    assert {p: p.read_text() for p in storage.glob("*/*/starts.jsonl")} == starts
    assert pl.read_parquet(storage / "trials.parquet").sort("trial_id").equals(t.sort("trial_id"))
