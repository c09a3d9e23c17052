"""The dashboard and the sweep's own metrics.

The end-to-end tests run one small sweep (one method, two trials) on a local Ray with token
authentication on, with a real Prometheus server (Debian's ``prometheus``) scraping Ray's metrics
endpoints through the service-discovery file Ray writes. Ray runs in its loopback-only mode, so
that it, its metrics endpoints and Prometheus all listen on 127.0.0.1; every request goes there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
from test_harness_sweep import sweep_file

from harness.config import load_sweep
from harness.dashboard import auth_hint
from harness.results import STATUSES

PROMETHEUS = shutil.which("prometheus")
SWEEP_NAME = "t"  # test_harness_sweep.sweep_file's


# ---------------------------------------------------------------------------------------------
# Without Ray
# ---------------------------------------------------------------------------------------------


def test_auth_hint_says_where_the_token_comes_from_and_never_what_it_is():
    token = secrets.token_hex(16)
    local = auth_hint(None, True, {"RAY_AUTH_TOKEN": token})
    assert "`ray get-auth-token`" in local and "RAY_AUTH_TOKEN environment variable" in local
    assert "RAY_AUTH_MODE=disabled" in local and token not in local
    from_path = auth_hint(None, True, {"RAY_AUTH_TOKEN_PATH": "/secrets/ray-token"})
    assert "/secrets/ray-token (RAY_AUTH_TOKEN_PATH)" in from_path
    assert "~/.ray/auth_token" in auth_hint(None, True, {})
    cluster = auth_hint("auto", True, {"RAY_AUTH_TOKEN": token})
    assert "whoever started the cluster" in cluster and "`ray get-auth-token`" in cluster and token not in cluster
    assert auth_hint(None, False, {}) == "Dashboard authentication: off (no token needed)."


def test_sweep_metrics_count_the_live_tables_states_and_end_with_the_results_files(tmp_path: Path, data_root: Path,
                                                                                     monkeypatch):
    """The sweep-level series come from the states the live table shows (no storage read); the last
    publish, from the results file's rows, so the final values equal trials.parquet's."""
    import harness.telemetry as telemetry

    set_values: dict[tuple, float] = {}

    class Gauge:
        def set(self, value: float, tags: dict[str, str]) -> None:
            set_values[tuple(sorted(tags.items()))] = value

    monkeypatch.setattr(telemetry, "_gauges", lambda: {"trials": Gauge(), "best": Gauge()})
    sweep = load_sweep(sweep_file(tmp_path, data_root, methods=["clipreid"]))
    live = [{"dataset": "synthetic", "method": "clipreid", "status": "running", "attempts": 1, "best": 0.5},
            {"dataset": "synthetic", "method": "clipreid", "status": "completed", "attempts": 2, "best": 0.4}]
    metrics = telemetry.SweepMetrics(sweep, lambda: live)
    metrics.publish()
    tags = {"sweep": "t", "dataset": "synthetic", "method": "clipreid"}

    def count(status: str) -> float:
        return set_values[tuple(sorted({**tags, "status": status}.items()))]

    assert (count("running"), count("completed"), count("stopped"), count("timeout")) == (1, 1, 0, 0)
    assert set_values[tuple(sorted(tags.items()))] == 0.5
    final = [{**live[0], "status": "stopped"}, live[1]]
    metrics.publish(final)
    assert (count("running"), count("completed"), count("stopped")) == (0, 1, 1)
    # as the sweep runs it: the live table's states while it runs, the results file's rows at the end
    from harness.progress import SweepProgress

    progress = SweepProgress(sweep, total=2)  # no Ray here: no board, the results file's rows only
    progress.known = [{**row, "trial_id": str(i)} for i, row in enumerate(live)]
    with telemetry.sweep_metrics(sweep, progress, interval_s=0.01):
        time.sleep(0.1)
        assert (count("running"), count("completed"), count("stopped")) == (1, 1, 0)
        progress.known = [{**row, "trial_id": str(i)} for i, row in enumerate(final)]
    assert (count("running"), count("completed"), count("stopped")) == (0, 1, 1)


# ---------------------------------------------------------------------------------------------
# A sweep on Ray with token authentication on, watched by Prometheus
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """GET a 127.0.0.1 URL: (status, body); an HTTP error status is returned, not raised."""
    assert url.startswith("http://127.0.0.1:"), url
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@contextlib.contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """Set (or, with None, unset) environment variables for the block, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Everything the block prints or logs (Python objects and file descriptors 1 and 2) goes to ``path``."""
    with open(path, "w") as f:
        handler = logging.StreamHandler(f)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        level = root.level
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                yield
        finally:
            f.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            root.removeHandler(handler)
            root.setLevel(level)


@contextlib.contextmanager
def prometheus_server(workdir: Path, discovery_file: Path) -> Iterator[str | None]:
    """A Prometheus on 127.0.0.1 scraping every second the targets in Ray's service-discovery file;
    yields its URL (None where the binary is absent). Stopped when the block ends."""
    if PROMETHEUS is None:
        yield None
        return
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text("global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
                      "scrape_configs:\n- job_name: ray\n  file_sd_configs:\n"
                      f"  - files: ['{discovery_file}']\n    refresh_interval: 1s\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(workdir / "prometheus.log", "w") as log:
        proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 30
        while time.time() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError):
                if get(f"{url}/-/ready")[0] == 200:
                    break
            time.sleep(0.5)
        else:
            pytest.fail(f"Prometheus did not become ready: {(workdir / 'prometheus.log').read_text()[-2000:]}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@dataclass
class WatchedSweep:
    token: str
    output: str  # everything the sweep printed or logged
    storage: Path
    trials: pl.DataFrame
    dashboard: str
    prometheus: str | None


@pytest.fixture(scope="module")
def watched_sweep(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Iterator[WatchedSweep]:
    import ray
    from ray._private import ray_constants
    from ray._private.authentication_test_utils import reset_auth_token_state

    from harness.sweep import main as sweep_main

    tmp = tmp_path_factory.mktemp("telemetry")
    token = secrets.token_hex(32)
    root = Path(f"/tmp/rt-{os.getpid()}")  # short: AF_UNIX socket paths are limited to 107 bytes
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_AUTH_TOKEN_PATH": None,
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray's loopback-only mode, for its child processes...
           "RAY_CHDIR_TO_TRIAL_DIR": "0", "COLUMNS": None}
    loopback = ray_constants.ENABLE_RAY_CLUSTER
    with environment(**env):
        ray_constants.ENABLE_RAY_CLUSTER = False  # ...and for this one, which read it at import
        reset_auth_token_state()  # drop a token cached from an earlier Ray instance in this process
        try:
            ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
                     _temp_dir=str(root), _system_config={"metrics_report_interval_ms": 1000})
            session = Path(ray._private.worker.global_worker.node.get_session_dir_path())
            discovery = session / "prom_metrics_service_discovery.json"
            deadline = time.time() + 30
            while not discovery.is_file() and time.time() < deadline:
                time.sleep(0.5)
            f = sweep_file(tmp, data_root, methods=["clipreid"], resources={"cpus": 1},
                           search={"num_samples": 2, "max_concurrent": 2, "startup_trials": 1}, final={"seeds": 0})
            with prometheus_server(tmp / "prometheus", discovery) as prometheus:
                with output_to(tmp / "sweep-output.txt"):
                    code = sweep_main([str(f)])
                output = (tmp / "sweep-output.txt").read_text()
                assert code == 0, output[-3000:]
                storage = tmp / "results"
                yield WatchedSweep(token, output, storage, pl.read_parquet(storage / "trials.parquet"),
                                   ray._private.worker.get_dashboard_url(), prometheus)
        finally:
            ray.shutdown()
            ray_constants.ENABLE_RAY_CLUSTER = loopback
            shutil.rmtree(root, ignore_errors=True)
    reset_auth_token_state()  # with the environment restored: later Ray instances use their own token


@pytest.mark.timeout(300)
def test_sweep_prints_how_to_authenticate_and_never_the_token(watched_sweep: WatchedSweep):
    s = watched_sweep
    lines = s.output.splitlines()
    url = next((ln.split(": ", 1)[1] for ln in lines if ln.startswith("Ray dashboard: ")), None)
    assert url is not None and url.startswith("http://127.0.0.1:"), s.output[:2000]
    hint = next(ln for ln in lines if ln.startswith("Dashboard authentication: "))
    assert "token" in hint and "`ray get-auth-token`" in hint and "RAY_AUTH_TOKEN environment variable" in hint
    # the hint is needed: the dashboard's API refuses a request without the token and takes one with it
    assert get(f"{url}/api/jobs/")[0] == 401
    assert get(f"{url}/api/jobs/", {"Authorization": f"Bearer {s.token}"})[0] == 200
    assert s.token not in s.output
    for f in s.storage.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".jsonl", ".yaml", ".csv", ".txt", ".log"):
            assert s.token not in f.read_text(errors="replace"), f
    # the summary went to a log: one line per dataset x method
    assert any(ln.startswith("│ synthetic") and "│ clipreid" in ln for ln in lines), s.output[-2000:]


def query(prometheus: str, promql: str) -> list[dict]:
    status, body = get(f"{prometheus}/api/v1/query?query={urllib.parse.quote(promql)}")
    assert status == 200, body[:500]
    return json.loads(body)["data"]["result"]


def wait_for(prometheus: str, promql: str, ok, timeout_s: float = 60) -> list[dict]:
    """Query until ``ok(result)`` (Ray reports every second here, Prometheus scrapes every second)."""
    deadline = time.time() + timeout_s
    result = query(prometheus, promql)
    while not ok(result) and time.time() < deadline:
        time.sleep(1)
        result = query(prometheus, promql)
    return result


@pytest.mark.timeout(300)
@pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus binary is not installed (apt-get install "
                                               "prometheus): nothing can scrape the sweep's metrics")
def test_sweep_metrics_reach_prometheus(watched_sweep: WatchedSweep):
    s, prom = watched_sweep, watched_sweep.prometheus
    t = s.trials
    targets = json.loads(get(f"{prom}/api/v1/targets")[1])["data"]["activeTargets"]
    assert targets and all(x["scrapeUrl"].startswith("http://127.0.0.1:") for x in targets), targets
    sel = f'sweep="{SWEEP_NAME}",dataset="synthetic",method="clipreid"'
    want = {status: int((t["status"] == status).sum()) for status in STATUSES}  # every status has a series
    assert sum(want.values()) == t.height == 2 and want["completed"] >= 1

    def counts(result: list[dict]) -> dict[str, int]:
        return {r["metric"]["status"]: int(float(r["value"][1])) for r in result}

    # the last values the sweep published (an instant query misses a series once Prometheus has
    # marked it stale, e.g. after the exporting worker went away)
    got = counts(wait_for(prom, f"last_over_time(ray_indivaid_sweep_trials{{{sel}}}[15m])",
                          lambda r: counts(r) == want))
    assert got == want
    best = wait_for(prom, f"last_over_time(ray_indivaid_sweep_best_val_map{{{sel}}}[15m])", lambda r: bool(r))
    assert len(best) == 1 and float(best[0]["value"][1]) == pytest.approx(t["best_val_mAP"].max(), abs=1e-6)
    # bounded cardinality: sweep-level series have no per-trial label
    for r in query(prom, '{__name__=~"ray_indivaid_sweep_.*"}'):
        assert "trial_id" not in r["metric"], r["metric"]
    # per trial, seen while it ran (its process may be gone by now): stage, epoch and throughput
    window = f'{{sweep="{SWEEP_NAME}",phase="search"}}[15m]'
    trial_ids = set(t["trial_id"])
    epochs = {r["metric"]["trial_id"]: float(r["value"][1])
              for r in query(prom, f"max_over_time(ray_indivaid_trial_epoch{window})")}
    assert set(epochs) == trial_ids and all(v >= 1 for v in epochs.values()), epochs
    stages = {r["metric"]["trial_id"]: float(r["value"][1])
              for r in query(prom, f"max_over_time(ray_indivaid_trial_stage{window})")}
    assert stages == dict.fromkeys(trial_ids, 2.0)
    speed = {r["metric"]["trial_id"]: float(r["value"][1])
             for r in query(prom, f"max_over_time(ray_indivaid_trial_images_per_second{window})")}
    assert set(speed) == trial_ids and all(v > 0 for v in speed.values()), speed
    # no accelerator here: no memory series rather than a misleading zero
    assert not query(prom, f"ray_indivaid_trial_peak_accelerator_memory_bytes{{sweep=\"{SWEEP_NAME}\"}}")
