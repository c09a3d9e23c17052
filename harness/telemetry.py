"""The sweep's own metrics, exported through ``ray.util.metrics``.

Ray's metrics agent on each node serves them to Prometheus (found through the service-discovery
file Ray writes, ``<session dir>/prom_metrics_service_discovery.json``), so a cluster's Prometheus
and Grafana, and the dashboard's Metrics tab, chart the sweep live. Ray prefixes every name with
``ray_``:

- ``ray_indivaid_sweep_trials{sweep, dataset, method, status}``: trials per status (running,
  completed, stopped = by ASHA, error), read from the sweep's storage by the driver;
- ``ray_indivaid_sweep_best_val_map{sweep, dataset, method}``: the best validation mAP (0-1) any
  trial has measured so far;
- ``ray_indivaid_trial_stage``, ``ray_indivaid_trial_epoch``, ``ray_indivaid_trial_images_per_second``
  and ``ray_indivaid_trial_peak_accelerator_memory_bytes`` (only where there is an accelerator),
  labelled ``{sweep, dataset, method, phase, trial_id, worker}``, set by each trial as it reports.

Sweep-level series carry no per-trial label, so their number stays datasets x methods x statuses
however many trials run. Metrics never stop a sweep: a failure to record one is logged and skipped.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.config import SweepConfig, trial_config
from harness.results import STATUSES, finite, measured_val, trial_status

log = logging.getLogger(__name__)

SWEEP_TAGS = ("sweep", "dataset", "method")
TRIAL_TAGS = ("sweep", "dataset", "method", "phase", "trial_id", "worker")
DEFAULT_INTERVAL_S = 10.0  # Ray's default metrics report interval: publishing faster shows nothing new


@functools.cache
def _gauges() -> dict[str, Any]:
    """The Gauge objects, made once per process (Ray registers each name with its agent)."""
    from ray.util.metrics import Gauge

    return {
        "trials": Gauge("indivaid_sweep_trials", "Trials of the sweep per dataset x method and status "
                        "(running, completed, stopped = by ASHA, error)", tag_keys=(*SWEEP_TAGS, "status")),
        "best": Gauge("indivaid_sweep_best_val_map", "Best validation mAP (0-1) measured so far per dataset x method",
                      tag_keys=SWEEP_TAGS),
        "stage": Gauge("indivaid_trial_stage", "Training stage the trial is in (0 zero-shot, 1 prompts, 2 encoder)",
                       tag_keys=TRIAL_TAGS),
        "epoch": Gauge("indivaid_trial_epoch", "Epoch of the current stage the trial last finished",
                       tag_keys=TRIAL_TAGS),
        "images_per_s": Gauge("indivaid_trial_images_per_second", "Training images per second in the last epoch "
                              "(all workers)", tag_keys=TRIAL_TAGS),
        "peak_memory": Gauge("indivaid_trial_peak_accelerator_memory_bytes", "Peak accelerator memory allocated by "
                             "the trial's process", tag_keys=TRIAL_TAGS),
    }


def peak_accelerator_memory() -> int | None:
    """Peak bytes allocated on this process's CUDA device; None without one (or before first use)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.max_memory_allocated())


# ---------------------------------------------------------------------------------------------
# Per trial (inside the trial's process)
# ---------------------------------------------------------------------------------------------


class TrialMetrics:
    """The per-trial series of one trial process (or one Ray Train worker of it)."""

    def __init__(self, sweep: str, dataset: str, method: str, phase: str, trial_id: str, worker: int = 0) -> None:
        self.tags = {"sweep": sweep, "dataset": dataset, "method": method, "phase": phase, "trial_id": trial_id,
                     "worker": str(worker)}
        self._warned = False

    def record(self, row: Mapping[str, Any]) -> None:
        """Set the trial's gauges from one trainer report (a row of ``indivaid.train``'s callback)."""
        try:
            gauges = _gauges()
            for key, name in (("stage", "stage"), ("epoch", "epoch"), ("images_per_s", "images_per_s")):
                value = finite(row.get(key))
                if value is not None:
                    gauges[name].set(value, tags=self.tags)
            peak = peak_accelerator_memory()
            if peak is not None:
                gauges["peak_memory"].set(peak, tags=self.tags)
        except Exception as e:  # a metric is never worth a failed trial
            if not self._warned:
                log.warning("trial %s: could not record metrics (%s); training goes on", self.tags["trial_id"], e)
                self._warned = True


# ---------------------------------------------------------------------------------------------
# Per sweep (in the driver, from the sweep's storage)
# ---------------------------------------------------------------------------------------------


@dataclass
class TrialState:
    """What the driver keeps of one trial between scans: where it stopped reading Tune's
    ``result.json`` (appended to, never rewritten), its last row and its best validation mAP."""

    dataset: str
    method: str
    every: int  # validation every this many stage-2 epochs
    epochs: int  # stage-2 epochs of the full budget
    offset: int = 0
    last: dict[str, Any] = field(default_factory=dict)
    best: float | None = None

    def counts_towards_best(self, row: Mapping[str, Any]) -> bool:
        """Rows that carry a measured validation score: stage 0 (zero-shot), and stage 2 from
        the first validation on (earlier stage-2 rows still carry the zero-shot score)."""
        return measured_val(row, self.every, self.epochs)

    def read(self, result_file: Path) -> None:
        """Read the lines Tune appended since the last scan (a half-written last line waits)."""
        try:
            size = result_file.stat().st_size
        except FileNotFoundError:
            return
        if size < self.offset:  # replaced (a trial restarted from scratch): start over
            self.offset, self.last, self.best = 0, {}, None
        if size == self.offset:
            return
        with open(result_file, "rb") as f:
            f.seek(self.offset)
            data = f.read(size - self.offset)
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.last = row
            v = finite(row.get("val_mAP"))
            if v is not None and self.counts_towards_best(row):
                self.best = v if self.best is None else max(self.best, v)


@dataclass
class GroupCounts:
    """One dataset x method: trials per status and the best validation mAP so far."""

    statuses: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    best: float | None = None


class SweepScanner:
    """Counts a sweep's trials from its storage folder, as the results files do, reading each
    trial's progress incrementally so that a scan of a large sweep stays cheap."""

    def __init__(self, sweep: SweepConfig) -> None:
        self.sweep = sweep
        self.trials: dict[Path, TrialState] = {}

    def _state(self, trial_dir: Path) -> TrialState | None:
        state = self.trials.get(trial_dir)
        if state is None:
            try:
                info = json.loads((trial_dir / "trial.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                return None  # being written: next scan
            try:
                cfg = trial_config(self.sweep, info["dataset"], info["method"], info.get("params") or {},
                                   info.get("seed"))
                every, epochs = max(1, cfg.eval.every), cfg.stage2.epochs
            except Exception as e:  # e.g. a sweep file edited since: count the trial, score every stage-2 row
                log.debug("%s: no trainer config (%s)", trial_dir, e)
                every, epochs = 1, 0
            state = self.trials[trial_dir] = TrialState(info["dataset"], info["method"], every, epochs)
        return state

    def scan(self) -> dict[tuple[str, str], GroupCounts]:
        groups: dict[tuple[str, str], GroupCounts] = {}
        for info_file in sorted(self.sweep.storage_path.glob("*/*/trial.json")):
            trial_dir = info_file.parent
            state = self._state(trial_dir)
            if state is None:
                continue
            state.read(trial_dir / "result.json")
            status, _ = trial_status(trial_dir, (trial_dir / "run" / "result.json").is_file(), state.last)
            g = groups.setdefault((state.dataset, state.method), GroupCounts())
            g.statuses[status] = g.statuses.get(status, 0) + 1
            if state.best is not None:
                g.best = state.best if g.best is None else max(g.best, state.best)
        return groups


class SweepMetrics:
    """Publishes the sweep-level series from a :class:`SweepScanner`."""

    def __init__(self, sweep: SweepConfig) -> None:
        self.name = sweep.name
        self.scanner = SweepScanner(sweep)
        self._lock = threading.Lock()  # the background thread and the final publish
        self._warned = False

    def publish(self) -> dict[tuple[str, str], GroupCounts]:
        """Scan the storage and set every series (zero counts included, so each status has a series)."""
        with self._lock:
            groups = self.scanner.scan()
            gauges = _gauges()
            for (dataset, method), g in groups.items():
                tags = {"sweep": self.name, "dataset": dataset, "method": method}
                for status, n in g.statuses.items():
                    gauges["trials"].set(n, tags={**tags, "status": status})
                if g.best is not None:
                    gauges["best"].set(g.best, tags=tags)
            return groups

    def publish_safely(self) -> None:
        try:
            self.publish()
        except Exception as e:  # a metric is never worth a failed sweep
            (log.debug if self._warned else log.warning)("sweep metrics not published: %r", e)
            self._warned = True


@contextlib.contextmanager
def sweep_metrics(sweep: SweepConfig, interval_s: float = DEFAULT_INTERVAL_S) -> Iterator[SweepMetrics]:
    """Publish the sweep-level series every ``interval_s`` from a daemon thread while the block
    runs (independent of the live table, which rich does not redraw in a log), and once more at
    its end, so the last values equal the results files'."""
    metrics = SweepMetrics(sweep)
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval_s):
            metrics.publish_safely()

    metrics.publish_safely()
    thread = threading.Thread(target=loop, name="indivaid-sweep-metrics", daemon=True)
    thread.start()
    try:
        yield metrics
    finally:
        stop.set()
        thread.join(timeout=60)
        metrics.publish_safely()
