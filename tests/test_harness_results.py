"""The results schema, Optuna's record of ASHA-stopped trials, and the live progress board, without
a Ray cluster (hand-built trial folders, a stand-in for the board actor)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import polars as pl
import pytest
from test_harness_sweep import sweep_file

from harness.config import load_sweep
from harness.plan import Experiment
from harness.progress import ProgressBoard, SweepProgress, board_rows, group_counts
from harness.results import (PARAM_PREFIX, RUN_NUMBERS, SPLIT_METRICS, TIMEOUT_FILE, TRIAL_SCHEMA, conform,
                             to_table)
from harness.rows import collect

# ---------------------------------------------------------------------------------------------
# The schema
# ---------------------------------------------------------------------------------------------


def test_every_result_key_has_a_typed_column_and_an_empty_table_has_them_all():
    for key, splits in SPLIT_METRICS.items():
        assert all(TRIAL_SCHEMA[f"{s}_{key}"] == pl.Float64 for s in splits), key
    assert all(TRIAL_SCHEMA[c] == pl.Float64 for c in RUN_NUMBERS)
    assert {"val_BAKS", "test_GM", "test_GM_oracle", "fusion_departure", "train_on_val"} <= set(TRIAL_SCHEMA)
    assert "val_GM_oracle" not in TRIAL_SCHEMA  # test-only
    empty = to_table([])
    assert empty.height == 0 and dict(empty.schema) == TRIAL_SCHEMA
    # an old file without the new columns, with an all-null column: conformed, typed, params kept
    old = conform(pl.DataFrame({"dataset": ["a"], "method": ["m"], "phase": ["search"], "test_mAP": [None],
                                f"{PARAM_PREFIX}stage2.lr": [1e-4], "unknown": [1]}))
    assert old["test_mAP"].dtype == pl.Float64 and old["val_BAKS"].is_null().all()
    assert old["robust_rel_mAP"].dtype == pl.Float64 and old["robust_rel_mAP"].is_null().all()
    assert old.columns == [*TRIAL_SCHEMA, f"{PARAM_PREFIX}stage2.lr"]


def _trial_folder(exp: Path, name: str, *, result: dict[str, Any] | None, phase: str = "search") -> None:
    trial = exp / name
    (trial / "run").mkdir(parents=True)
    info = {"trial_id": name, "dataset": "synthetic", "method": "clipreid", "phase": phase, "seed": 0,
            "params": {"stage2.lr": 1e-4}, "node_id": "n0", "started": 1000.0}
    (trial / "trial.json").write_text(json.dumps(info))
    (trial / "starts.jsonl").write_text(json.dumps({"time": 1000.0}) + "\n")
    if result is not None:
        (trial / "run" / "result.json").write_text(json.dumps(result))
        (trial / "run" / "model.pt").write_bytes(b"m" * 7)
    (trial / "checkpoint_000002").mkdir()
    (trial / "checkpoint_000002" / "checkpoint.pt").write_bytes(b"c" * 11)  # Tune keeps the latest


def test_collect_reads_open_set_and_run_numbers_into_their_columns(tmp_path: Path, data_root: Path, monkeypatch):
    import harness.rows as rows

    sweep = load_sweep(sweep_file(tmp_path, data_root, methods=["clipreid"]))
    exp = sweep.storage_path / "search-synthetic-clipreid"
    val = {"mAP": 0.5, "rank1": 0.6, "BAKS": 0.4, "BAUS": 0.7, "GM": 0.53, "AUROC": 0.6, "threshold": 0.8}
    history = [{"stage": 2, "epoch": e, "s2_epoch": e, "val_mAP": 0.1 * e, "lr": 1e-4} for e in (1, 2, 3, 4)]
    _trial_folder(exp, "done", result={"val": val, "test": None, "fusion_departure": 0.25, "images_per_s": 90.0,
                                       "wall_s": 5.0, "history": history})
    _trial_folder(exp, "going", result=None)
    _trial_folder(exp, "failed", result=None)
    (exp / "attempts.json").write_text(json.dumps({"failed": 2}))  # counted by the progress callback
    going = [{"stage": 2, "s2_epoch": 1, "val_mAP": 0.2, "lr": 1e-4, "timestamp": 1003.0}]
    tune = {"done": rows.TuneTrial("TERMINATED", {**history[-1], "timestamp": 1010.0}, history, None),
            "going": rows.TuneTrial("RUNNING", going[-1], going, None),
            "failed": rows.TuneTrial("ERROR", going[-1], going, "TrainingError: stage 2, epoch 1: loss")}
    monkeypatch.setattr(rows, "tune_trials", lambda store, experiment: tune)  # Tune's record, as Ray reads it
    t = collect(sweep).sort("trial_id")
    assert dict(t.select(list(TRIAL_SCHEMA)).schema) == TRIAL_SCHEMA and t[f"{PARAM_PREFIX}stage2.lr"].to_list() == [1e-4] * 3
    done, failed, going_row = (t.row(i, named=True) for i in range(3))
    assert (done["status"], going_row["status"], failed["status"]) == ("completed", "running", "error")
    assert failed["error"] == "TrainingError: stage 2, epoch 1: loss" and failed["attempts"] == 2
    assert done["attempts"] == 1 and done["error"] is None
    assert (done["val_BAKS"], done["val_threshold"], done["fusion_departure"]) == (0.4, 0.8, 0.25)
    assert done["test_GM"] is None and done["stage1_loss_slope"] is None  # absent keys: null, not an error
    assert done["best_val_mAP"] == pytest.approx(0.5) and done["epochs_at_base_lr"] == 4
    assert (done["model_bytes"], done["ckpt_kept_bytes"]) == (7, 11)
    assert done["checkpoint_path"] == str(exp / "done" / "run" / "model.pt") and going_row["checkpoint_path"] is None
    assert going_row["val_mAP"] == 0.2 and going_row["val_BAKS"] is None and going_row["wall_s"] == pytest.approx(3.0)


def test_collect_reads_robustness_scores_into_their_columns_and_keeps_a_later_error(tmp_path: Path, data_root: Path,
                                                                                    monkeypatch):
    """A final run scored by the robustness suite: run/robustness.json's "metrics" become the robust_*
    columns, which are exactly the suite's figures; a run without the file has them null. A run that
    finished and then failed (its scoring) stays completed, with its error beside its numbers."""
    import harness.rows as rows
    from indivaid.eval.robustness import NAMES, SEVERITIES, summarize, summary_metrics

    cells = {n: [{"rel_mAP": 1.0 - 0.1 * sev - 0.01 * i, "rel_rank1": 1.0 - 0.05 * sev} for sev in SEVERITIES]
             for i, n in enumerate(NAMES)}
    metrics = summary_metrics({"summary": summarize(cells), "clean": {"mAP": 0.4, "rank1": 0.5}})
    assert tuple(metrics) == rows.ROBUST_METRICS  # the listed columns are the suite's figures
    sweep = load_sweep(sweep_file(tmp_path, data_root, methods=["clipreid"]))
    exp = sweep.storage_path / "final-synthetic-clipreid"
    test = {"mAP": 0.4, "rank1": 0.5}
    history = [{"stage": 2, "epoch": 4, "s2_epoch": 4, "val_mAP": 0.3, "lr": 1e-4}]
    for name in ("scored", "failed"):
        _trial_folder(exp, name, phase="final", result={"val": {"mAP": 0.3}, "test": test, "history": history})
    (exp / "scored" / "run" / "robustness.json").write_text(json.dumps({"clean": test, "metrics": metrics}))
    tune = {"scored": rows.TuneTrial("TERMINATED", history[-1], history, None),
            "failed": rows.TuneTrial("ERROR", history[-1], history, "RuntimeError: robustness scoring failed")}
    monkeypatch.setattr(rows, "tune_trials", lambda store, experiment: tune)
    failed, scored = (r for r in collect(sweep).sort("trial_id").iter_rows(named=True))
    assert all(TRIAL_SCHEMA[c] == pl.Float64 for c in rows.ROBUST_METRICS)
    assert {c: scored[c] for c in rows.ROBUST_METRICS} == pytest.approx(metrics)
    assert scored["robust_rel_mAP"] == pytest.approx(1.0 - 0.2 - 0.045) and scored["robust_clean_mAP"] == 0.4
    assert scored["error"] is None and scored["test_mAP"] == 0.4
    assert all(failed[c] is None for c in rows.ROBUST_METRICS)
    assert (failed["status"], failed["test_mAP"], failed["error"]) == (
        "completed", 0.4, "RuntimeError: robustness scoring failed")


def test_a_trial_tunes_finished_state_never_recorded_is_lost_not_an_error(tmp_path: Path, data_root: Path,
                                                                         monkeypatch):
    """A hard kill of the driver can leave a started trial that Tune's saved state never named; the
    resumed search runs that slot again. Once the experiment has finished, that folder is 'lost' (its
    numbers kept), never an error; while it runs, Tune's state may just lag, so it stays 'running'."""
    import harness.rows as rows

    sweep = load_sweep(sweep_file(tmp_path, data_root, methods=["clipreid"]))
    exp = sweep.storage_path / "search-synthetic-clipreid"
    history = [{"stage": 2, "epoch": 1, "s2_epoch": 1, "val_mAP": 0.3, "lr": 1e-4}]
    _trial_folder(exp, "known", result={"val": {"mAP": 0.3}, "test": None, "wall_s": 5.0, "history": history})
    _trial_folder(exp, "orphan", result=None)
    tune = {"known": rows.TuneTrial("TERMINATED", history[-1], history, None)}
    monkeypatch.setattr(rows, "tune_trials", lambda store, experiment: tune)
    running = collect(sweep).sort("trial_id")
    assert running["status"].to_list() == ["completed", "running"]
    (exp / rows.FINISHED).touch()
    t = collect(sweep).sort("trial_id")
    assert t["status"].to_list() == ["completed", "lost"] and t["stop_reason"].to_list() == ["completed", "lost"]
    assert t["error"].is_null().all() and t.filter(pl.col("status") == "error").height == 0


# ---------------------------------------------------------------------------------------------
# Optuna: ASHA-stopped trials are PRUNED, through OptunaSearch's public on_trial_complete
# ---------------------------------------------------------------------------------------------


def test_asha_stopped_trials_are_recorded_in_optuna_as_pruned():
    import optuna
    from ray import tune

    from harness.tuning import PruningAwareOptunaSearch

    storage = optuna.storages.InMemoryStorage()
    search = PruningAwareOptunaSearch(
        space={"stage2.lr": tune.loguniform(1e-5, 1e-3)}, metric="val_mAP", mode="max", study_name="s",
        storage=storage, sampler=optuna.samplers.TPESampler(seed=0, constant_liar=True), budget_epochs=4)
    ends = {"stopped": ({"val_mAP": 0.1, "s2_epoch": 1}, False), "full": ({"val_mAP": 0.3, "s2_epoch": 4}, False),
            "failed": (None, True), "searched-budget": ({"val_mAP": 0.2, "s2_epoch": 4, "config": {"stage2.epochs": 8}},
                                                        False)}
    for trial_id, (result, error) in ends.items():
        assert search.suggest(trial_id)
        search.on_trial_result(trial_id, {"val_mAP": 0.1, "training_iteration": 1})
        search.on_trial_complete(trial_id, result=result, error=error)
    states = [t.state.name for t in optuna.load_study(study_name="s", storage=storage).trials]
    assert states == ["PRUNED", "COMPLETE", "FAIL", "PRUNED"]  # 4 of its searched 8 epochs: stopped early
    assert search.stopped_early({"s2_epoch": 1}) and not PruningAwareOptunaSearch(
        metric="val_mAP", mode="max", budget_epochs=None).stopped_early({"s2_epoch": 1})  # no scheduler: never


# ---------------------------------------------------------------------------------------------
# The progress board and the live table
# ---------------------------------------------------------------------------------------------


class _Remote:
    def __init__(self, fn: Any) -> None:
        self.remote = fn


class FakeBoardHandle:
    """A ProgressBoard called in-process, with an actor handle's ``.method.remote(...)`` shape."""

    def __init__(self, board: ProgressBoard) -> None:
        self.update, self.seed, self.snapshot = _Remote(board.update), _Remote(board.seed), _Remote(board.snapshot)


def _trial(trial_id: str, path: Path, **last: float) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, path=str(path), last_result=last)


def test_progress_callback_pushes_each_trials_state_to_the_board(tmp_path: Path):
    from harness.tuning import ProgressCallback

    board = ProgressBoard()
    exp = Experiment("search", "synthetic", "clipreid")
    storage = tmp_path / "results"
    cb = ProgressCallback("t", exp, str(storage))
    cb.setup()
    cb._board, cb._looked = FakeBoardHandle(board), time.monotonic()
    folder = storage / exp.name
    a, b, c = _trial("a", folder / "a"), _trial("b", folder / "b"), _trial("c", folder / "c")
    for t in (a, b, c):
        cb.on_trial_start(0, [], t)
    cb.on_trial_result(0, [], a, {"s2_epoch": 1, "best_val_mAP": 0.4})
    cb.on_trial_recover(0, [], a)  # a crash: Tune restarts it, whose running best starts over
    cb.on_trial_start(0, [], a)
    cb.on_trial_result(0, [], a, {"s2_epoch": 2, "best_val_mAP": 0.3})
    a.last_result = {"s2_epoch": 2, "run_finished": 0.0}
    cb.on_trial_complete(0, [], a)  # ASHA stopped it before its results were written
    b.last_result = {"s2_epoch": 4, "run_finished": 1.0}
    cb.on_trial_complete(0, [], b)
    (folder / "c").mkdir(parents=True)
    (folder / "c" / TIMEOUT_FILE).write_text("{}")
    cb.on_trial_error(0, [], c)
    snap = board.snapshot()
    assert snap["a"]["status"] == "stopped" and snap["a"]["attempts"] == 2 and snap["a"]["best"] == 0.4
    assert snap["b"]["status"] == "completed" and snap["c"]["status"] == "timeout"
    counts = group_counts(snap.values())[("synthetic", "clipreid")]
    assert (counts["running"], counts["completed"], counts["stopped"], counts["timeout"], counts["retries"]) == (0, 1, 1, 1, 1)
    assert "_board" not in {k for k, v in cb.__getstate__().items() if v is not None}  # a handle is never pickled
    # the starts are kept on the storage: a resumed search's callback (set up again) goes on counting
    assert json.loads((folder / "attempts.json").read_text()) == {"a": 2, "b": 1, "c": 1}
    again = ProgressCallback("t", exp, str(storage))
    again.setup()
    again.on_trial_start(0, [], b)
    assert json.loads((folder / "attempts.json").read_text())["b"] == 2


def test_live_table_reads_the_board_and_keeps_its_last_snapshot_when_the_board_is_gone(tmp_path: Path,
                                                                                       data_root: Path):
    from rich.console import Console

    sweep = load_sweep(sweep_file(tmp_path, data_root, methods=["clipreid"]))
    board = ProgressBoard()
    progress = SweepProgress(sweep, total=4, board=FakeBoardHandle(board))
    progress._fetch = board.snapshot
    finished = to_table([{"trial_id": "old", "dataset": "synthetic", "method": "clipreid", "phase": "search",
                          "status": "completed", "attempts": 1, "best_val_mAP": 0.5, "epochs_run": 4}])
    progress.record_results(finished)  # e.g. a resumed sweep's finished experiment
    assert [r["trial_id"] for r in board_rows(finished)] == ["old"] and "old" in board.snapshot()
    board.update("new", {"dataset": "synthetic", "method": "clipreid", "phase": "search", "status": "running",
                         "attempts": 1, "best": 0.6, "s2_epoch": 2})

    def render() -> str:
        console = Console(width=200, record=True)
        console.print(progress)
        return console.export_text()

    text = render()
    assert "1/4 trials finished" in text and "60.0" in text and "stale" not in text

    def gone() -> dict:
        raise TimeoutError("no answer")

    progress._fetch = gone
    progress._looked = time.time()  # no new board is looked for within this test
    text = render()
    assert "1/4 trials finished" in text and "60.0" in text and "live progress stale: TimeoutError" in text
