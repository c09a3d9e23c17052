"""A real two-node Ray cluster on this machine: the sweep joins it with ``--address``, its trials
run on the node that has the custom resource they ask for, and the dashboard's HTTP API answers
while the sweep runs. Ray's processes talk over this machine's own address and the dashboard
listens on 127.0.0.1; nothing targets another host."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import polars as pl
import pytest
from test_harness_sweep import sweep_file

from harness.config import load_sweep
from harness.orchestrate import run_sweep


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_processes(marker: str) -> list[str]:
    """Command lines of live processes that belong to the Ray instance under ``marker``."""
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in out if marker in line and "ps -eo" not in line]


def get_json(url: str) -> dict:
    """GET from the dashboard, with the cluster's token when Ray's token authentication is on
    (this process may have turned it on through an earlier Ray instance: then requests need it)."""
    from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

    request = urllib.request.Request(url, headers=get_auth_headers_if_auth_enabled({}))
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture()
def two_node_cluster(monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    # Ray writes its temp files and the "current cluster" address file under RAY_TMPDIR/ray: keep
    # them in a short private folder (AF_UNIX socket paths are limited to 107 bytes).
    root = Path(f"/tmp/rc-{os.getpid()}")
    (root / "ray").mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("RAY_TMPDIR", str(root))
    monkeypatch.setenv("RAY_DISABLE_USAGE_STATS", "1")
    port = free_port()
    cluster = Cluster(initialize_head=True, shutdown_at_exit=False, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": port})
    worker = cluster.add_node(num_cpus=1, resources={"remote": 2})
    cluster.wait_for_nodes()
    try:
        yield cluster, worker, f"http://127.0.0.1:{port}"
    finally:
        ray.shutdown()
        cluster.shutdown()
        deadline = time.time() + 30
        while ray_processes(str(root)) and time.time() < deadline:
            time.sleep(0.5)
        left = ray_processes(str(root))
        stale = (root / "ray" / "ray_current_cluster").exists()
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"Ray processes left behind: {left}"
        assert not stale, "the cluster address file was left behind"


@pytest.mark.timeout(600)
def test_sweep_joins_a_two_node_cluster_and_the_dashboard_answers(two_node_cluster, data_root: Path, tmp_path: Path):
    cluster, worker, dashboard = two_node_cluster
    f = sweep_file(tmp_path, data_root, methods=["clipreid"], resources={"cpus": 1, "custom": {"remote": 1}},
                   search={"num_samples": 2, "max_concurrent": 2, "startup_trials": 1}, final={"seeds": 0})
    seen: dict[str, object] = {}
    done = threading.Event()

    def watch_dashboard() -> None:
        """Poll the dashboard's HTTP API while the sweep runs: the driver job, trial actors, cache task."""
        def fetch(path: str, key: str, pick) -> None:
            try:
                found = pick(get_json(f"{dashboard}{path}"))
            except Exception as e:  # not up yet, or a state-API hiccup: try again next round
                seen.setdefault("errors", []).append(f"{path}: {e!r}"[:200])
                return
            if found:
                seen.setdefault(key, []).extend(found)

        while not done.is_set():
            fetch("/api/jobs/", "jobs", lambda jobs: [j for j in jobs if j.get("status") == "RUNNING"])
            # Tune's function trainables are actors named by their class (short trials may already be DEAD
            # when a poll lands: the state API keeps them listed)
            fetch("/api/v0/actors?limit=1000", "trial_actors", lambda r: [
                a for a in r["data"]["result"]["result"] if a.get("class_name") == "ImplicitFunc"])
            fetch("/api/v0/tasks?limit=1000", "tasks", lambda r: [t.get("name") for t in r["data"]["result"]["result"]])
            time.sleep(0.5)

    watcher = threading.Thread(target=watch_dashboard, daemon=True)
    watcher.start()
    try:
        t = pl.read_parquet(run_sweep(load_sweep(f), address=cluster.address))
    finally:
        done.set()
        watcher.join()
    assert t.height == 2 and (t["status"] != "error").all()
    assert set(t["node_id"]) == {worker.node_id}  # the only node with the "remote" resource
    assert seen.get("jobs"), f"the dashboard listed no running job during the sweep: {seen.get('errors', [])[-5:]}"
    placed = {a["node_id"] for a in seen.get("trial_actors", []) if a.get("node_id")}  # pending ones have none
    assert placed == {worker.node_id}, seen.get("errors", [])[-5:]
    assert "warm-cache-synthetic" in seen.get("tasks", []), seen  # the shared-cache task ran before the trials
