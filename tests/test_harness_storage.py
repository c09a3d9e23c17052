"""Results on an object store: the sweep and the leaderboard against a local S3 server (moto's
server mode on 127.0.0.1, started here), and the storage layer's paths and URIs without one."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from test_harness_sweep import sweep_file

from harness.storage import child, normalize, open_storage, sibling

ROOT = Path(__file__).resolve().parents[1]
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}


def test_locations_keep_their_scheme_and_query(tmp_path: Path):
    uri = "s3://bucket/sweeps/full?endpoint_override=127.0.0.1:9000&scheme=http"
    assert normalize(uri) == uri and normalize("results/x") == str(Path("results/x").resolve())
    assert sibling(uri, "full-rehearsal") == "s3://bucket/sweeps/full-rehearsal?endpoint_override=127.0.0.1:9000&scheme=http"
    assert child(uri, "a/b") == "s3://bucket/sweeps/full/a/b?endpoint_override=127.0.0.1:9000&scheme=http"
    assert sibling(str(tmp_path / "x"), "y") == str(tmp_path / "y")
    local = open_storage(f"file://{tmp_path}/r")
    assert local.local and local.uri("a", "b.json") == f"{tmp_path}/r/a/b.json"
    local.write_json("a/b.json", {"k": 1})
    local.append_line("a/log.jsonl", "1")
    local.append_line("a/log.jsonl", "2")
    assert local.read_json("a/b.json") == {"k": 1} and local.read_text("a/log.jsonl") == "1\n2\n"
    assert local.read_bytes("nope") is None and local.read_json("nope") == {} and local.dirs() == ["a"]
    assert local.sizes("a") == {"b.json": len(local.read_bytes("a/b.json")), "log.jsonl": 4}


@pytest.fixture()
def s3(monkeypatch):
    """A local S3 server (moto) with an empty bucket; yields its port. Dummy credentials."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        port = server.get_host_and_port()[1]
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1").create_bucket(Bucket="sweeps")
        yield port
    finally:
        server.stop()


def bucket_keys(port: int) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="sweeps"):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


@pytest.mark.timeout(900)
def test_sweep_on_s3_tracked_in_mlflow_then_its_leaderboard(s3: int, data_root: Path, tmp_path: Path, capsys):
    """``python -m harness.sweep FILE --storage s3://...`` (search with ASHA, then a final phase)
    writes every result to the bucket and nothing to a local path named like the URI; MLflow (a
    local tracking store) holds a run per trial with its params, per-epoch metrics and model; the
    leaderboard reads the results back from the same URI. One sweep for all three, to keep it short."""
    from mlflow import MlflowClient

    uri = f"s3://sweeps/runs/t?endpoint_override=127.0.0.1:{s3}&scheme=http"
    work = tmp_path / "cwd"  # the sweep's working folder: a path named like the URI would land here
    work.mkdir()
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"  # a local store (MLflow 3 retires the file store)
    f = sweep_file(tmp_path, data_root, methods=["clipreid", "zeroshot"], cache_dir=str(tmp_path / "cache"),
                   search={"num_samples": 2, "max_concurrent": 1, "startup_trials": 1}, final={"seeds": 1},
                   tracking={"mlflow": {"tracking_uri": tracking, "experiment": "storage-test",
                                        "artifact_location": str(tmp_path / "mlartifacts")}})
    env = {**os.environ, **CREDENTIALS, "RAY_CHDIR_TO_TRIAL_DIR": "0"}
    run = subprocess.run([sys.executable, "-m", "harness.sweep", str(f), "--storage", uri], cwd=work, env=env,
                         capture_output=True, text=True, timeout=800)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    assert f"python -m harness.leaderboard '{uri}'" in run.stdout
    keys = bucket_keys(s3)
    store = open_storage(uri)
    t = pl.read_parquet(io.BytesIO(store.read_bytes("trials.parquet")))
    assert {"runs/t/trials.parquet", "runs/t/best.yaml", "runs/t/manifest.json", "runs/t/sweep.yaml"} <= set(keys)
    assert t.height == 5 and (t["status"] != "error").all(), t.select("method", "phase", "status", "error")
    final = t.filter(pl.col("phase") == "final")
    assert final["test_mAP"].is_not_null().all()
    for path in final["checkpoint_path"]:  # the inference models are in the bucket
        assert path.startswith("s3://sweeps/runs/t/final-synthetic-") and path.removeprefix("s3://sweeps/") in keys
    trained = t.filter(pl.col("method") == "clipreid")
    assert (trained["ckpt_saves"] > 0).all() and (trained["ckpt_kept_bytes"] == 0).all()  # Ray checkpoints, pruned
    assert any(k.startswith("runs/t/search-synthetic-clipreid/") and k.endswith("/result.json") for k in keys)
    assert not any("/checkpoint_0" in k for k in keys)  # every experiment ended: their checkpoints were deleted
    # nothing was written to a local path named like the URI (pathlib would make "s3:/sweeps/...")
    assert not [p for p in work.rglob("*") if "s3:" in str(p) or "endpoint_override" in str(p)], list(work.rglob("*"))
    assert not (ROOT / "s3:").exists()
    assert any("events.out.tfevents" in k for k in keys)  # Tune's TensorBoard files: tensorboard --logdir <storage>

    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("storage-test").experiment_id])
    assert len(runs) == t.height == 5
    by_phase = {(r.data.tags["method"], r.data.tags["phase"]): r for r in runs}
    search = by_phase[("clipreid", "search")]
    assert "stage2.lr" in search.data.params and by_phase[("clipreid", "final")].data.params == {"seed": "0"}
    epochs = [m.step for m in client.get_metric_history(search.info.run_id, "val_mAP")]
    assert len(epochs) >= 2 and epochs == sorted(epochs)  # one value per report
    for trial_id in t.filter(pl.col("status") == "completed")["trial_id"]:  # each logged its model to its run
        run = next(r for r in runs if r.data.tags["trial_name"].endswith(trial_id))
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["model.pt"], run.data.tags

    from harness.leaderboard import main as leaderboard

    code = leaderboard([uri, "--format", "csv", "--no-report"])
    out = capsys.readouterr().out
    assert code == 0 and "clipreid" in out and "zeroshot" in out
