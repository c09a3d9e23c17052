"""Tune wiring: one Tune experiment per phase x dataset x method, with Optuna TPE, ASHA, the trial
function, and the callback that feeds the live progress board.

Imported only where Tune runs (the driver or a search task): it imports Ray and Optuna.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from harness.config import SweepConfig, trial_config
from harness.plan import Experiment, grid_size, search_space
from harness.progress import LOOKUP_EVERY_S, find_board
from harness.results import ATTEMPTS_FILE, REPORT_BEST_VAL_MAP, REPORT_RUN_FINISHED, REPORT_S2_EPOCH, TIMEOUT_FILE, finite
from harness.storage import open_storage
from indivaid.config import ConfigError, to_dict
from indivaid.methods import METHODS

log = logging.getLogger(__name__)


class PruningAwareOptunaSearch(OptunaSearch):
    """An OptunaSearch that records ASHA-stopped trials as PRUNED, not COMPLETE.

    Without it, TPE would treat a trial stopped at its first ASHA rung as a finished run with a
    (low) final value and learn from it as if it were comparable to full runs. Tune passes the
    trial's last result when ASHA stops it; a result below the stage-2 budget is withheld from
    OptunaSearch, which then tells Optuna the trial was pruned (its intermediate values were
    already reported by ``on_trial_result``).
    """

    def __init__(self, *args: Any, budget_epochs: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.budget_epochs = budget_epochs  # None: no scheduler stops trials, so none is pruned

    def stopped_early(self, result: dict | None) -> bool:
        if not result or self.budget_epochs is None:
            return False
        budget = (result.get("config") or {}).get("stage2.epochs", self.budget_epochs)  # searched, or the base's
        return int(finite(result.get(REPORT_S2_EPOCH)) or 0) < int(budget)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if not error and self.stopped_early(result):
            result = None  # no value and no error: OptunaSearch records the trial as PRUNED
        super().on_trial_complete(trial_id, result=result, error=error)


def make_search(metric: str, seed: int, startup: int, budget_epochs: int | None) -> PruningAwareOptunaSearch:
    """Optuna TPE for one search. ``constant_liar``: trials running side by side are counted as
    poor results while they run, so parallel trials do not all sample the same region."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # A retried trial restarts Tune's training_iteration (the trainer resumes from its own
    # checkpoint), so Optuna sees intermediate steps twice; it keeps the first, which is right.
    warnings.filterwarnings("ignore", message="The reported value is ignored because this `step", category=UserWarning)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)
    # the space comes through param_space
    return PruningAwareOptunaSearch(metric=metric, mode="max", sampler=sampler, budget_epochs=budget_epochs)


class ProgressCallback(tune.Callback):
    """Pushes each trial's state to the sweep's progress board (harness.progress) as Tune sees it:
    started, reported, recovered, failed, or ended (completed, or stopped by ASHA). Runs where
    Tuner.fit runs; an unreachable board costs one skipped update.

    It also counts every start of every trial (the first, each retry after a failure or a lost node,
    and each restart of an interrupted trial by ``--resume``) and keeps the counts in the
    experiment's ``attempts.json`` on the storage, read back when a resumed run sets it up again:
    the results' ``attempts`` column."""

    def __init__(self, sweep_name: str, exp: Experiment, storage: str) -> None:
        self.sweep_name, self.exp, self.storage = sweep_name, exp, storage
        self.states: dict[str, dict[str, Any]] = {}
        self.starts: dict[str, int] = {}
        self._board: Any = None
        self._looked = float("-inf")

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its callbacks with the experiment
        return {**self.__dict__, "_board": None, "_looked": float("-inf")}

    def setup(self, **info: Any) -> None:
        """At the start of every ``Tuner.fit``, a restored one included: the starts counted so far."""
        try:
            counted = open_storage(self.storage).read_json(f"{self.exp.name}/{ATTEMPTS_FILE}")
        except OSError as e:
            log.warning("%s: could not read the trials' start counts (%s); counting from here", self.exp.name, e)
            counted = {}
        self.starts = {k: int(v) for k, v in counted.items()}

    def _count_start(self, trial_id: str) -> int:
        self.starts[trial_id] = self.starts.get(trial_id, 0) + 1
        try:
            open_storage(self.storage).write_json(f"{self.exp.name}/{ATTEMPTS_FILE}", self.starts)
        except OSError as e:  # the count is a record, never worth a failed search
            log.warning("%s: could not record the start of trial %s: %s", self.exp.name, trial_id, e)
        return self.starts[trial_id]

    def _state(self, trial: Any) -> dict[str, Any]:
        return self.states.setdefault(trial.trial_id, {
            "dataset": self.exp.dataset, "method": self.exp.method, "phase": self.exp.phase, "status": "running",
            "attempts": self.starts.get(trial.trial_id, 1), "best": None, "s2_epoch": 0})

    def _push(self, trial: Any, **changes: Any) -> None:
        state = self._state(trial)
        state.update(changes)
        if self._board is None and time.monotonic() - self._looked > LOOKUP_EVERY_S:
            self._looked = time.monotonic()
            self._board = find_board(self.sweep_name)
        if self._board is None:
            return
        try:
            self._board.update.remote(trial.trial_id, dict(state))
        except Exception as e:  # the board's node was lost: look for it again later
            log.debug("progress update of %s skipped: %s", trial.trial_id, e)
            self._board = None

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._push(trial, status="running", attempts=self._count_start(trial.trial_id))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        best = self._state(trial)["best"]
        new = finite(result.get(REPORT_BEST_VAL_MAP))
        if new is not None:
            best = new if best is None else max(best, new)  # a retried trial's running best starts over
        self._push(trial, status="running", best=best, s2_epoch=int(finite(result.get(REPORT_S2_EPOCH)) or 0))

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._push(trial, status="running")  # Tune restarts it (max_failures): on_trial_start counts the start

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._push(trial, status="timeout" if self._timed_out(trial) else "error")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        finished = bool(finite((trial.last_result or {}).get(REPORT_RUN_FINISHED)))
        self._push(trial, status="completed" if finished else "stopped")

    def _timed_out(self, trial: Any) -> bool:
        """Whether the trial left a timeout marker (its storage folder: the experiment's, plus the
        last part of the trial's path, its directory name)."""
        if not trial.path:
            return False
        try:
            return open_storage(self.storage).is_file(f"{self.exp.name}/{PurePosixPath(trial.path).name}/{TIMEOUT_FILE}")
        except OSError:
            return False


def tracking_callbacks(sweep: SweepConfig, exp: Experiment) -> list[tune.Callback]:
    """MLflow's callback when the sweep file has a ``tracking.mlflow`` section (else none; MLflow
    is imported only then)."""
    if sweep.tracking.mlflow is None:
        return []
    from harness.tracking import mlflow_callback

    return [mlflow_callback(sweep, exp)]


def trial_resources(sweep: SweepConfig, exp: Experiment) -> dict[str, float]:
    """What one trial holds. One worker or none: a plain function trainable holds the trial's
    resources (a fractional GPU, e.g. 0.5, packs small trials two to a GPU; a 1-worker Train run
    would add half a dozen coordinating actor processes per trial and nothing else). ``workers > 1``:
    the trial only drives a TorchTrainer, whose workers hold the resources; the driving trial holds
    no CPU and is pinned where coordinators run (harness.placement)."""
    from harness.placement import coordinator_resources

    res = sweep.resources_for(exp.dataset, exp.method)
    if not res.ray_train:
        return {"cpu": res.cpus, "gpu": res.gpus, **res.custom}
    return {"cpu": 0, **coordinator_resources(sweep)}


def run_experiment(sweep: SweepConfig, exp: Experiment, n: int, params: dict[str, Any] | None, resume: bool,
                   max_concurrent: int | None = None) -> tune.ResultGrid:
    """Run (or restore) one Tune experiment; returns its ResultGrid. ``max_concurrent`` caps trials
    in flight (the GPU budget's share of this experiment; default ``search.max_concurrent``).

    Tune stores the experiment on the sweep's storage (any pyarrow filesystem), trials' Ray
    checkpoints included, of which it keeps the latest per trial."""
    store = sweep.store
    trainable = tune.with_resources(trainable_for(sweep, exp, params), trial_resources(sweep, exp))
    if store.exists(exp.name) and tune.Tuner.can_restore(store.path(exp.name), storage_filesystem=store.fs):
        if not resume:
            raise ConfigError(f"{store.uri(exp.name)} exists: continue with --resume, or give the sweep a new name")
        tuner = tune.Tuner.restore(store.path(exp.name), trainable, resume_errored=True, restart_errored=False,
                                   storage_filesystem=store.fs)
        return tuner.fit()
    cap = max_concurrent or sweep.search.max_concurrent
    space = search_space(sweep, exp.method) if exp.phase == "search" else {"seed": tune.grid_search(list(range(n)))}
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(**tune_settings(sweep, exp, n, cap, space)),
        run_config=tune.RunConfig(name=exp.name, storage_path=store.root, storage_filesystem=store.fs, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1),  # the latest resumes
                                  callbacks=[ProgressCallback(sweep.name, exp, sweep.storage_uri),
                                             *tracking_callbacks(sweep, exp)]),
    )
    return tuner.fit()


def tune_settings(sweep: SweepConfig, exp: Experiment, n: int, cap: int, space: dict[str, Any]) -> dict[str, Any]:
    """TuneConfig's arguments: Optuna (+ ASHA) for a search with something to sample, else a plain
    run of ``n`` trials (the final phase's seeds, or a grid's values) at most ``cap`` at once."""
    metric = sweep.search.metric
    out: dict[str, Any] = {"num_samples": n if exp.phase == "search" else 1, "metric": metric, "mode": "max",
                           # A trial that trains in its own process hands that process to the next trial:
                           # it has imported torch and open_clip already (seconds per trial). A Ray Train
                           # trial's process only drives its workers, and a stopped run must release them.
                           "reuse_actors": not sweep.resources_for(exp.dataset, exp.method).ray_train}
    if exp.phase != "search" or not space:
        return {**out, "max_concurrent_trials": cap}
    if grid_size(space) is not None:  # every value runs once (Tune's grid), nothing is sampled
        return {**out, "num_samples": 1, "max_concurrent_trials": cap}
    epochs = trial_config(sweep, exp.dataset, exp.method, {}).stage2.epochs
    asha = sweep.scheduler.kind == "asha" and METHODS.get(exp.method).train
    search = make_search(metric, sweep.search.seed, sweep.search.startup_trials, epochs if asha else None)
    out["search_alg"] = ConcurrencyLimiter(search, max_concurrent=cap)
    if asha:
        # max_t one past the last epoch: a trial that reaches its budget ends by itself (writing its
        # result and inference checkpoint) instead of being stopped by the scheduler at its last report.
        out["scheduler"] = ASHAScheduler(time_attr=REPORT_S2_EPOCH, max_t=epochs + 1,
                                         grace_period=sweep.scheduler.grace_period,
                                         reduction_factor=sweep.scheduler.reduction_factor)
    return out


def trainable_for(sweep: SweepConfig, exp: Experiment, params: dict[str, Any] | None) -> Callable[[dict], None]:
    """The experiment's Tune function, named after it: Tune registers trainables (and their bound
    parameters) by name per Ray job, so concurrent experiments must not share one."""
    from harness.trial import run_trial

    kw = {"sweep": to_dict(sweep), "dataset": exp.dataset, "method": exp.method, "experiment": exp.name}
    if exp.phase == "final":  # one trial per seed: the seed is the gridded dimension
        def trial(config: dict[str, Any]) -> None:
            run_trial(dict(params or {}), **kw, phase="final", seed=int(config["seed"]))
    else:
        def trial(config: dict[str, Any]) -> None:
            run_trial(config, **kw, phase=exp.phase, seed=0)
    trial.__name__ = trial.__qualname__ = f"{exp.phase}_{exp.dataset}_{exp.method}".replace("-", "_")
    return trial

