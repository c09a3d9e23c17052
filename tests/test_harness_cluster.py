"""A real two-node Ray cluster on this machine: the sweep joins it with ``--address``, its trials
run on the node that has the custom resource they ask for, and the dashboard's HTTP API answers
while the sweep runs. Ray's processes talk over this machine's own address and the dashboard
listens on 127.0.0.1; nothing targets another host."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
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


@contextlib.contextmanager
def local_cluster(monkeypatch, head: dict, workers: list[dict]) -> Iterator[tuple]:
    """A head and worker nodes on this machine (``ray.cluster_utils.Cluster``); every Ray process
    and file is gone afterwards."""
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
        "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port, **head})
    nodes = [cluster.add_node(**w) for w in workers]
    cluster.wait_for_nodes()
    try:
        yield cluster, nodes, f"http://127.0.0.1:{port}"
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


@pytest.fixture()
def two_node_cluster(monkeypatch):
    with local_cluster(monkeypatch, {"num_cpus": 1}, [{"num_cpus": 1, "resources": {"remote": 2}}]) as (c, nodes, url):
        yield c, nodes[0], url


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


@pytest.mark.timeout(600)
def test_a_trial_on_a_lost_node_resumes_on_another_from_its_ray_checkpoint(monkeypatch, data_root: Path,
                                                                          tmp_path: Path):
    """A head (the coordinator node) and two worker nodes that may run trials. Once the trial has a
    Ray checkpoint, its node is removed: Tune restarts the trial on the other worker, where it
    resumes from that checkpoint; the searches' coordinating tasks ran on the head all along."""
    import ray
    from ray.util.state import list_tasks

    trial_node = {"num_cpus": 1, "resources": {"trials": 1}}
    with local_cluster(monkeypatch, {"num_cpus": 1, "resources": {"coordinator": 1}}, [trial_node, trial_node]) \
            as (cluster, workers, _):
        f = sweep_file(tmp_path, data_root, methods=["clipreid", "zeroshot"], max_failures=1,
                       resources={"cpus": 1, "custom": {"trials": 1}}, scheduler={"kind": "none"},
                       search={"num_samples": 1, "max_concurrent": 1, "startup_trials": 1,
                               "max_concurrent_experiments": 2}, final={"seeds": 0},
                       search_space={"stage2.epochs": {"kind": "choice", "values": [40]}})
        sweep = load_sweep(f)
        lost: dict[str, object] = {}

        def remove_the_trials_node() -> None:
            # Tune keeps the latest checkpoint only: once the first is gone, the second is registered
            deadline = time.time() + 300
            while time.time() < deadline:
                for ckpt in sweep.storage_path.glob("search-synthetic-clipreid/*/checkpoint_000001"):
                    if (ckpt.parent / "checkpoint_000000").exists():
                        continue
                    trial = ckpt.parent
                    saves = (ckpt / "checkpoints.jsonl").read_text().splitlines()
                    start = json.loads((trial / "starts.jsonl").read_text().splitlines()[-1])
                    node = next(w for w in workers if w.node_id == start["node_id"])
                    cluster.remove_node(node)
                    lost.update(node=node.node_id, pid=start["pid"], trial=trial, saved=json.loads(saves[-1]))
                    return
                time.sleep(0.02)

        watcher = threading.Thread(target=remove_the_trials_node, daemon=True)
        watcher.start()
        t = pl.read_parquet(run_sweep(sweep, address=cluster.address))
        watcher.join()
        assert lost, "no checkpoint appeared"
        chains = {task.name: task.node_id for task in list_tasks(filters=[("name", "=", "tune-synthetic-clipreid")])}
        head = cluster.head_node.node_id
        assert chains == {"tune-synthetic-clipreid": head}, chains
        assert ray.get_runtime_context().get_node_id() == head

    row = t.filter(pl.col("method") == "clipreid").row(0, named=True)
    assert t.height == 2 and row["status"] == "completed" and row["attempts"] == 2 and row["epochs_run"] == 40
    starts = [json.loads(x) for x in (lost["trial"] / "starts.jsonl").read_text().splitlines()]
    other = next(w.node_id for w in workers if w.node_id != lost["node"])
    assert [s["node_id"] for s in starts] == [lost["node"], other]  # restarted on the node that is left
    reports = [json.loads(x) for x in (lost["trial"] / "result.json").read_text().splitlines()]
    retried = [r for r in reports if r["pid"] != lost["pid"]]
    saved = (lost["saved"]["stage"], lost["saved"]["epoch"])
    # the restarted trial's first report continues after the checkpoint it had when its node was lost
    assert retried and (retried[0]["stage"], retried[0]["epoch"]) > saved, (retried[0], saved)
    assert int(retried[-1]["s2_epoch"]) == 40


@pytest.mark.timeout(300)
def test_runtime_env_ships_the_package_to_the_workers(tmp_path: Path):
    """``--runtime-env '{"py_modules": [...]}'`` (or the sweep file's cluster.runtime_env) reaches
    ``ray.init``: Ray uploads the package once and workers import that copy, as on a node where it is
    not installed (this machine has it installed, so the test checks where the import came from)."""
    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "ship.py"
    script.write_text(
        "import json, sys, ray\n"
        "from harness.orchestrate import init_ray\n"
        "from harness.sweep import runtime_env_arg\n"
        "init_ray(None, runtime_env=runtime_env_arg(sys.argv[1]))\n"
        "@ray.remote(num_cpus=0)\n"
        "def where():\n"
        "    import harness, indivaid\n"
        "    return [harness.__file__, indivaid.__file__]\n"
        "print(json.dumps(ray.get(where.remote())))\n"
        "ray.shutdown()\n")
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1"}
    shipped = json.dumps({"py_modules": [str(root / "harness"), str(root / "indivaid")]})
    out = subprocess.run([sys.executable, str(script), shipped], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    files = json.loads(out.stdout.strip().splitlines()[-1])
    assert all("runtime_resources" in f and not f.startswith(str(root)) for f in files), files
