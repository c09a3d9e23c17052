"""Interrupt the sweep driver (Ctrl-C, then SIGKILL) mid-sweep, then ``--resume``: finished trials are
not re-run, an interrupted search is never marked finished, nothing is lost."""

from __future__ import annotations

import contextlib
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


@pytest.mark.timeout(900)
def test_killed_driver_resumes_without_rerunning_finished_trials(data_root: Path, tmp_path: Path):
    f = sweep_file(tmp_path, data_root, methods=["clipreid", "zeroshot"],
                   search={"num_samples": 2, "max_concurrent": 1, "startup_trials": 1}, final={"seeds": 0})
    storage = tmp_path / "results"
    env = {**os.environ, "RAY_CHDIR_TO_TRIAL_DIR": "0"}
    # Ctrl-C while the first (sequential) search runs: the sweep stops, the search is not marked finished
    driver = subprocess.Popen([sys.executable, "-m", "harness.sweep", str(f)], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 600
    # the first trial's first checkpoint (the trainer appends it unbuffered; Tune's own result.json is
    # buffered and can first show up when the trial ends, by which time a fast machine ends the search)
    while time.time() < deadline and not any(p.stat().st_size for p in storage.glob("search-synthetic-clipreid/*/run/checkpoints.jsonl")):
        assert driver.poll() is None, "the sweep ended before it could be interrupted"
        time.sleep(0.5)
    driver.send_signal(signal.SIGINT)
    _, err = driver.communicate(timeout=300)
    assert driver.returncode == 130 and "continue with --resume" in err and "Traceback" not in err, err[-3000:]
    assert not (storage / "search-synthetic-clipreid" / FINISHED).exists()
    assert not (storage / "search-synthetic-zeroshot").exists()  # the sweep stopped there
    with contextlib.suppress(ProcessLookupError):
        os.killpg(driver.pid, signal.SIGKILL)  # whatever the local Ray left behind (normally nothing)
    # then a hard kill of the resumed driver in the next experiment
    driver = subprocess.Popen([sys.executable, "-m", "harness.sweep", str(f), "--resume"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and not (storage / "search-synthetic-zeroshot").exists():
        assert driver.poll() is None, "the sweep ended before it could be interrupted"
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
    driver.wait()
    assert not (storage / "trials.parquet").exists() or pl.read_parquet(storage / "trials.parquet").height < 3
    finished = {p: p.stat().st_mtime_ns for p in storage.glob("search-synthetic-clipreid/*/run/result.json")}
    assert finished  # the first experiment's trials had finished
    resumed = subprocess.run([sys.executable, "-m", "harness.sweep", str(f), "--resume"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    t = pl.read_parquet(storage / "trials.parquet")
    # the interrupted search was resumed, not restarted: num_samples trials in all
    assert t.filter(pl.col("method") == "clipreid").height == 2 and t.filter(pl.col("method") == "zeroshot").height == 1
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # not re-run
    assert (t["status"] != "error").all() and set(t["status"]) <= {"completed", "stopped"}
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
