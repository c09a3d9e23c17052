"""The full sweep's real plan rehearsed on CPU for a subset with PolarBear (4 DDP workers, 8 training
identities) and MPDD (ASHA's top rung at its last epoch): real Ray, real Tune/Optuna/ASHA, real
Ray Train over gloo, generated datasets in their reference layouts, logical GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(1200)
def test_full_sweep_rehearsal_on_polarbear_and_mpdd(tmp_path: Path):
    doc = yaml.safe_load((ROOT / "sweeps" / "full.yaml").read_text())
    doc["storage"] = str(tmp_path / "results" / "full")
    doc["methods"] = ["indivaid", "zeroshot"]  # CLIP-ReID runs the same code paths (and the full rehearsal)
    f = tmp_path / "full.yaml"
    f.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "INDIVAID_DATA": str(tmp_path / "data"), "COLUMNS": "250"}
    run = subprocess.run([sys.executable, "-m", "harness.sweep", str(f), "--rehearse", "--only", "mpdd", "polarbear",
                          "--steps-per-epoch", "1", "--samples", "1", "--seeds", "1", "--first-seeds", "1",
                          "--gpus", "6"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1150)
    assert run.returncode == 0, run.stderr[-4000:]
    storage = tmp_path / "results" / "full-rehearsal"
    t = pl.read_parquet(storage / "trials.parquet")
    assert (t["status"] != "error").all() and (t["status"] != "timeout").all(), t.filter(pl.col("status") == "error")["error"]
    final = t.filter(pl.col("phase") == "final")
    for d in ("mpdd", "polarbear"):
        for m in ("indivaid", "zeroshot"):
            rows = final.filter((pl.col("dataset") == d) & (pl.col("method") == m))
            assert rows.height == 1 and rows["test_mAP"].is_not_null().all(), (d, m)
            # full.yaml's final.robustness: scored in a plain trial (MPDD) and on rank 0 of a Ray Train run (PolarBear)
            assert rows["robust_rel_mAP"].is_not_null().all() and rows["error"].is_null().all(), (d, m)
    trained = t.filter(pl.col("method") != "zeroshot")
    assert (trained["steps_per_epoch"] >= 1).all()  # every DDP rank drew batches
    done = trained.filter(pl.col("status") == "completed")  # the schedules reach their base lr and stay there
    assert (done["lr_peak_factor"] - 1).abs().max() < 1e-6 and (done["epochs_at_base_lr"] >= 5).all()
    assert (trained["ckpt_saves"] == 0).all()  # short runs on an H200: no mid-run checkpoints
    assert not list(storage.glob("*/*/run/checkpoint.pt"))
    # PolarBear's trained trials ran as 4-worker Ray Train runs, the others as plain trials; zero-shot
    # only evaluates (on rank 0), so it ran as one plain trial on one GPU
    assert list(storage.glob("search-polarbear-indivaid/*/ray_train")) and not list(storage.glob("search-mpdd-*/*/ray_train"))
    assert not list(storage.glob("*-polarbear-zeroshot/*/ray_train"))
    zs = t.filter((pl.col("dataset") == "polarbear") & (pl.col("method") == "zeroshot"))
    assert (zs["gpu_s"] == zs["wall_s"]).all()  # one GPU held
    manifest = json.loads((storage / "manifest.json").read_text())
    assert manifest["rehearsal"] is True
    report = (storage / "rehearsal.md").read_text()
    assert "| polarbear | indivaid |" in report and "| mpdd | zeroshot |" in report and "cannot show" in report
    assert "10, 30 / 30" in report  # MPDD's ASHA rungs against its 30 stage-2 epochs
    # the leaderboard labels rehearsal rows
    board = subprocess.run([sys.executable, "-m", "harness.leaderboard", str(storage), "--format", "markdown",
                            "--no-report"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert board.returncode == 0, board.stderr
    assert "(rehearsal)" in board.stdout
