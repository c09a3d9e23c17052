"""The sweep's own metrics, exported through ``ray.util.metrics``.

Ray's metrics agent on each node serves them to Prometheus (found through the service-discovery
file Ray writes, ``<session dir>/prom_metrics_service_discovery.json``), so a cluster's Prometheus
and Grafana, and the dashboard's Metrics tab, chart the sweep live. Ray prefixes every name with
``ray_``:

- ``ray_indivaid_sweep_trials{sweep, dataset, method, status}``: trials per status (running,
  completed, stopped = by ASHA, error, timeout), as the live table counts them;
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
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from harness.results import STATUSES, finite

if TYPE_CHECKING:
    from harness.config import SweepConfig
    from harness.progress import SweepProgress

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
# Per sweep (in the driver, from the live table's view of the trials)
# ---------------------------------------------------------------------------------------------


class SweepMetrics:
    """Publishes the sweep-level series from the states the live table shows: the progress board
    (fed by Tune's callbacks) over the last results file. Nothing is read from the storage, so a
    publish costs one actor call however large the sweep and however slow its storage."""

    def __init__(self, sweep: SweepConfig, states: Callable[[], Iterable[Mapping[str, Any]]]) -> None:
        self.name = sweep.name
        self.states = states
        self._lock = threading.Lock()  # the background thread and the final publish
        self._warned = False

    def publish(self, states: Iterable[Mapping[str, Any]] | None = None) -> dict[tuple[str, str], dict[str, Any]]:
        """Set every series (zero counts included, so each status has a series); ``states``
        overrides where the trials come from (the final publish: the results file's rows)."""
        from harness.progress import group_counts

        with self._lock:
            groups = group_counts(self.states() if states is None else states)
            gauges = _gauges()
            for (dataset, method), g in groups.items():
                tags = {"sweep": self.name, "dataset": dataset, "method": method}
                for status in STATUSES:
                    gauges["trials"].set(g[status], tags={**tags, "status": status})
                if g["best"] is not None:
                    gauges["best"].set(g["best"], tags=tags)
            return groups

    def publish_safely(self, states: Iterable[Mapping[str, Any]] | None = None) -> None:
        try:
            self.publish(states)
        except Exception as e:  # a metric is never worth a failed sweep
            (log.debug if self._warned else log.warning)("sweep metrics not published: %r", e)
            self._warned = True


@contextlib.contextmanager
def sweep_metrics(sweep: SweepConfig, progress: SweepProgress,
                  interval_s: float = DEFAULT_INTERVAL_S) -> Iterator[SweepMetrics]:
    """Publish the sweep-level series every ``interval_s`` from a daemon thread while the block
    runs (independent of the live table, which rich does not redraw in a log), and once more at
    its end from the last results file written, so the last values equal trials.parquet's."""
    metrics = SweepMetrics(sweep, progress.trial_states)
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
        metrics.publish_safely(progress.known)
