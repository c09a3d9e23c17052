"""The live progress table, fed by a small Ray actor instead of the trial folders.

Tune callbacks run where each ``Tuner.fit`` runs: in the driver, or in the zero-CPU task that
drives a dataset x method search (``harness.orchestrate``). They push each trial's latest state
(status, attempts, best measured validation mAP) to one named :class:`ProgressBoard` actor, and
the driver's table reads the board on every refresh: no trial file is read, however large the
sweep and however slow its storage.

The board is a convenience, never a dependency: a callback that cannot reach it skips the update,
and a board that died (its node was lost) is made again and refilled from ``trials.parquet``
(every finished dataset x method) and from the callbacks' next pushes, which always carry a
trial's whole state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import polars as pl
from rich.table import Table

from harness.results import STATUSES, finite

if TYPE_CHECKING:
    from harness.config import SweepConfig

log = logging.getLogger(__name__)

LOOKUP_EVERY_S = 30.0  # how often a caller without a board looks for one again
READ_TIMEOUT_S = 2.0  # the live table never waits longer than a refresh for the board

#: What the board keeps per trial (the callbacks send all of it on every push).
STATE_KEYS = ("dataset", "method", "phase", "status", "attempts", "best", "s2_epoch")


def board_name(sweep_name: str) -> str:
    """The board's actor name: one per sweep in the driver's Ray namespace (one per job)."""
    return f"indivaid-progress-{sweep_name}"


class ProgressBoard:
    """The latest state of every trial of a sweep, keyed by trial id (a Ray actor, zero CPU)."""

    def __init__(self) -> None:
        self._trials: dict[str, dict[str, Any]] = {}

    def update(self, trial_id: str, state: dict[str, Any]) -> None:
        """A callback's push: the trial's whole state, replacing what was there."""
        self._trials[trial_id] = dict(state)

    def seed(self, rows: list[dict[str, Any]]) -> int:
        """Trials known from the results file, for ids the callbacks have not pushed (a resumed
        sweep's finished experiments, or a board made again); returns how many were added."""
        added = 0
        for row in rows:
            if row["trial_id"] not in self._trials:
                self._trials[row["trial_id"]] = row
                added += 1
        return added

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return self._trials


def start_board(sweep_name: str) -> Any | None:
    """Start (or find) the sweep's board on this node; None where Ray cannot make one (logged)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():
        return None
    try:
        here = ray.get_runtime_context().get_node_id()  # the driver's node: losing it ends the sweep anyway
        return ray.remote(ProgressBoard).options(
            name=board_name(sweep_name), get_if_exists=True, num_cpus=0, max_restarts=-1,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=True)).remote()
    except Exception as e:  # the table then shows what trials.parquet holds
        log.warning("live progress unavailable (could not start its actor: %s); the table shows finished "
                    "experiments only", e)
        return None


def find_board(sweep_name: str) -> Any | None:
    """The sweep's running board, or None (not started, or gone)."""
    import ray

    if not ray.is_initialized():
        return None
    try:
        return ray.get_actor(board_name(sweep_name))
    except ValueError:
        return None


def board_rows(table: pl.DataFrame) -> list[dict[str, Any]]:
    """trials.parquet rows as board states (the best measured validation mAP as ``best``)."""
    if not table.height:
        return []
    rows = table.select("trial_id", "dataset", "method", "phase", "status", "attempts",
                        pl.col("best_val_mAP").alias("best"), pl.col("epochs_run").alias("s2_epoch"))
    return [r for r in rows.iter_rows(named=True) if r["trial_id"] is not None]


def group_counts(states: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (dataset, method): trials per status, retries and the best validation mAP measured."""
    counts: dict[tuple[str, str], dict[str, Any]] = {}
    for s in states:
        c = counts.setdefault((s["dataset"], s["method"]), {**dict.fromkeys(STATUSES, 0), "retries": 0, "best": None})
        c[s["status"] if s.get("status") in STATUSES else "running"] += 1
        c["retries"] += max(0, int(s.get("attempts") or 1) - 1)
        best = finite(s.get("best"))
        if best is not None:
            c["best"] = best if c["best"] is None else max(c["best"], best)
    return counts


class SweepProgress:
    """The live table: trials by status and the best validation mAP per dataset x method, and an
    ETA from the pace of the finished trials. Reads the board (one actor call per refresh)."""

    def __init__(self, sweep: SweepConfig, total: int, board: Any | None = None) -> None:
        self.sweep, self.total, self.t0 = sweep, total, time.time()
        self.board = board
        self.known: list[dict[str, Any]] = []  # the last trials.parquet, as board states
        self.states: dict[str, dict[str, Any]] = {}
        self.note = ""
        self._looked = 0.0
        self._lock = threading.Lock()  # the live display and the metrics thread both read the board

    def record_results(self, table: pl.DataFrame) -> None:
        """After trials.parquet is written: what it holds fills the board's gaps."""
        self.known = board_rows(table)
        self._seed()

    def _seed(self) -> None:
        if self.board is None or not self.known:
            return
        try:
            self.board.seed.remote(self.known)
        except Exception as e:
            log.debug("progress board not seeded: %s", e)

    def _fetch(self) -> dict[str, dict[str, Any]]:
        """One call to the board (raises when it does not answer within a refresh)."""
        import ray

        return ray.get(self.board.snapshot.remote(), timeout=READ_TIMEOUT_S)

    def trial_states(self) -> list[dict[str, Any]]:
        """Every trial's latest state, as the table shows it (the sweep's metrics publish these)."""
        return list(self._read().values())

    def _read(self) -> dict[str, dict[str, Any]]:
        """The board's snapshot over the last results file's rows; the last snapshot seen (and a
        note) when the board does not answer, and a new board after LOOKUP_EVERY_S."""
        with self._lock:
            return self._read_locked()

    def _read_locked(self) -> dict[str, dict[str, Any]]:
        if self.board is None and time.time() - self._looked > LOOKUP_EVERY_S:
            self._looked = time.time()
            self.board = start_board(self.sweep.name)
            self._seed()
        if self.board is not None:
            try:
                self.states = self._fetch()
                self.note = ""
            except Exception as e:  # a dead or restarting board: keep the last snapshot
                log.debug("progress board did not answer: %r", e)
                self.note = f" (live progress stale: {type(e).__name__})"
                self.board = None
                self._looked = time.time()
        return {**{r["trial_id"]: r for r in self.known}, **self.states}

    def __rich__(self) -> Table:
        counts = group_counts(self._read().values())
        finished = sum(c[s] for c in counts.values() for s in STATUSES if s != "running")
        elapsed = time.time() - self.t0
        eta = f"{(self.total - finished) * elapsed / finished / 60:.1f} min" if finished else "…"
        table = Table(title=f"sweep {self.sweep.name}: {finished}/{self.total} trials finished, "
                            f"{elapsed / 60:.1f} min elapsed, ETA {eta}{self.note}")
        for col in ("dataset", "method", "running", "done", "stopped (ASHA)", "errors", "timed out", "retries",
                    "best val mAP"):
            table.add_column(col)
        for (d, m), c in sorted(counts.items()):
            table.add_row(d, m, *(str(c[s]) for s in STATUSES), str(c["retries"]),
                          f"{100 * c['best']:.1f}" if c["best"] is not None else "—")
        return table
