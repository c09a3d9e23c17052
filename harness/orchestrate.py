"""Running a sweep: Ray start-up, the shared caches, one chain per dataset x method (its search,
then its final phase with the best searched config), chains side by side within a GPU budget,
and the results files written after every chain.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from harness.checks import gpus_per_trial, validate
from harness.config import SweepConfig, trial_config
from harness.plan import Experiment, input_variants, missing_datasets, plan, search_space
from harness.progress import SweepProgress, start_board
from harness.results import FINISHED, TRIALS_FILE, best_search_trials, read_table, write_results
from harness.rows import collect
from harness.telemetry import sweep_metrics
from harness.ui import console
from indivaid.config import ConfigError, to_dict
from indivaid.data.catalogue import DataError
from indivaid.methods import METHODS
from indivaid.utils.console import Live

log = logging.getLogger(__name__)

#: Ray settings the harness needs on every Ray worker. Train v2 workers block in each report until the
#: controller's next poll (every 2 s by default): with per-epoch reports of short stage-1 epochs the GPU
#: would idle for most of stage 1, so the controller polls more often.
RAY_WORKER_ENV = {"RAY_CHDIR_TO_TRIAL_DIR": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


class SweepInterrupted(RuntimeError):
    """A Tune run returned before all its trials ended (Ctrl-C): nothing is marked finished."""


# ---------------------------------------------------------------------------------------------
# Ray and the shared caches
# ---------------------------------------------------------------------------------------------


def init_ray(address: str | None, declare: dict[str, Any] | None = None,
             runtime_env: dict[str, Any] | None = None) -> None:
    """Join ``address`` or start a local Ray (with ``declare``d logical resources: a rehearsal's GPUs).

    ``runtime_env`` is Ray's runtime environment for the sweep's job: ``working_dir`` or
    ``py_modules`` ship this package to nodes that do not have it installed (Ray uploads it once
    and every worker imports it from there)."""
    import ray

    from harness.dashboard import print_dashboard

    if ray.is_initialized():
        print_dashboard(console, address)  # Ray started by the caller (a notebook, a test): still say where to look
        return
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    for k, v in RAY_WORKER_ENV.items():
        os.environ.setdefault(k, v)  # a local Ray's workers inherit this process's environment
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's console boxes would fight the live table
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}  # full logs stay in Ray's session folder
    env = dict(runtime_env or {})
    if address:  # the cluster's workers do not inherit this process's environment
        forward = {k: os.environ[k] for k in (*RAY_WORKER_ENV, "INDIVAID_DATA") if k in os.environ}
        env["env_vars"] = {**forward, **env.get("env_vars", {})}
        ctx = ray.init(address=address, runtime_env=env, **quiet)
    else:
        # Short temp dir: AF_UNIX socket paths are limited to 107 bytes.
        tmp = Path(tempfile.gettempdir()) / f"ray-{os.getuid()}"
        ctx = ray.init(include_dashboard=True, dashboard_host="127.0.0.1", _temp_dir=str(tmp), runtime_env=env or None,
                       **quiet, **(declare or {}))
    print_dashboard(console, address, getattr(ctx, "dashboard_url", None))  # the URL and how to authenticate


def cluster_gpus() -> float:
    """GPUs the Ray cluster declares (logical ones in a rehearsal)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def cache_configs(sweep: SweepConfig, dataset: str) -> list[dict[str, Any]]:
    """The distinct frozen-feature inputs of a dataset's trials (data, model, runtime; seeds matter
    only for random-init weights), as trainer configs: methods and searched values do not change them."""
    seeds = sorted({0, *range(sweep.final.seeds_for(dataset))})
    out: dict[str, dict[str, Any]] = {}
    for m in sweep.methods:
        for seed, variant in itertools.product(seeds, input_variants(sweep, m)):  # each searched backbone too
            cfg = trial_config(sweep, dataset, m, variant, seed)
            ident = to_dict((cfg.data, cfg.model, cfg.augment, cfg.runtime.device, cfg.runtime.amp,
                             seed if cfg.model.pretrained is None else None))
            out.setdefault(json.dumps(ident, sort_keys=True, default=str), to_dict(cfg))
    return list(out.values())


def _warm(configs: list[dict[str, Any]]) -> list[str]:
    """Inside a Ray task: build the image and feature caches of each config (loads what exists)."""
    from indivaid.training import resolve, warm_caches

    return [str(warm_caches(resolve(c))) for c in configs]


def warm_feature_caches(sweep: SweepConfig, datasets: list[str]) -> None:
    """One Ray task per dataset computes the shared caches before any trial starts, on a node with
    the trials' resources (a GPU node on a cluster); trials then load them from the cache folder
    (``cache_dir``: a file path; on a node that has no copy yet, a trial builds its own)."""
    import ray

    pending = {}
    for d in datasets:
        res = sweep.resources_for(d)
        task = ray.remote(_warm).options(num_cpus=res.cpus, num_gpus=res.gpus, resources=dict(res.custom) or None,
                                         name=f"warm-cache-{d}")
        pending[d] = task.remote(cache_configs(sweep, d))
    for d, ref in pending.items():
        try:
            files = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            raise DataError(f"{d}: building the shared image/feature caches failed: {e.cause!r}") from None
        log.info("%s: shared feature caches ready: %s", d, ", ".join(Path(f).name for f in files))


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------


def save_results(sweep: SweepConfig, progress: SweepProgress | None = None) -> pl.DataFrame:
    """Collect and write the results files (after every chain: a killed driver loses no finished
    rows); the live table learns the finished trials from them."""
    table = collect(sweep)
    write_results(sweep, table)
    if progress is not None:
        progress.record_results(table)
    return table


def run_sweep(sweep: SweepConfig, *, address: str | None = None, resume: bool = False, only: list[str] | None = None,
              skip_missing: bool = False, declare: dict[str, Any] | None = None) -> str:
    """Check, plan and run the sweep; returns where its trials.parquet is (a path or a URI)."""
    from harness.estimate import apply_checkpoint_policy

    validate(sweep)  # every dataset's plan, before anything is written or started
    sweep = apply_checkpoint_policy(sweep)
    missing = missing_datasets(sweep)
    if missing and not skip_missing:
        raise DataError("missing datasets (download and prepare them, or pass --skip-missing):\n  " +
                        "\n  ".join(f"{d}: {w}" for d, w in missing))
    skip = {d for d, _ in missing} | ({d for d in sweep.datasets if d not in only} if only else set())
    todo = [(exp, n) for exp, n in plan(sweep) if exp.dataset not in skip]
    store = sweep.store
    started = [exp.name for exp, _ in todo if store.is_dir(exp.name)]
    if started and not resume:
        raise ConfigError(f"{store.uri()} already holds {', '.join(started[:3])}{' …' if len(started) > 3 else ''}: "
                          "continue with --resume, or give the sweep a new name")
    if resume and todo and all(store.is_file(f"{exp.name}/{FINISHED}") for exp, _ in todo):
        log.warning("%s: every experiment of the sweep has finished; nothing to run", store.uri())
        save_results(sweep)  # the results files, as a finished sweep has them (no Ray needed)
        return store.uri(TRIALS_FILE)
    store.mkdir()
    store.write_text("sweep.yaml", yaml.safe_dump(to_dict(sweep), sort_keys=False))
    if sweep.tracking.mlflow is not None:
        from harness.tracking import prepare_experiment

        prepare_experiment(sweep)  # before any trial, so that every process finds the same experiment
    init_ray(address, declare, sweep.cluster.runtime_env)
    at_once = min(sweep.search.max_concurrent_experiments, len({(e.dataset, e.method) for e, _ in todo}))
    budget = GpuBudget(cluster_gpus(), at_once)
    import ray

    # a trial that could never be placed (its placement group would wait forever) fails now
    validate(sweep, cluster_gpus=budget.cluster_gpus, cluster_cpus=ray.cluster_resources().get("CPU", 0.0))
    warm_feature_caches(sweep, sorted({exp.dataset for exp, _ in todo}))
    progress = SweepProgress(sweep, sum(n for _, n in todo), start_board(sweep.name))
    _seed_from_previous_run(sweep, progress)
    chains: dict[tuple[str, str], list[tuple[Experiment, int]]] = {}
    for exp, n in todo:  # one chain per dataset x method: its search, then its final phase
        chains.setdefault((exp.dataset, exp.method), []).append((exp, n))
    with sweep_metrics(sweep, progress), Live(progress, console=console, refresh_per_second=0.5, transient=False):
        try:
            if sweep.search.max_concurrent_experiments <= 1 or len(chains) <= 1:
                for chain in chains.values():
                    run_chain(sweep, chain, resume, budget.trials(sweep, chain[0][0].dataset, chain[0][0].method))
                    save_results(sweep, progress)
            else:
                run_chains_concurrently(sweep, list(chains.values()), resume, budget, progress)
        except (SweepInterrupted, KeyboardInterrupt):
            save_results(sweep, progress)  # what finished before the interruption is kept
            raise
    if not chains:  # otherwise written after every chain
        save_results(sweep, progress)
    return store.uri(TRIALS_FILE)


def _seed_from_previous_run(sweep: SweepConfig, progress: SweepProgress) -> None:
    """A resumed sweep's live table starts from the trials its last results file holds."""
    try:
        previous = read_table(sweep.store)
    except (pl.exceptions.PolarsError, OSError) as e:
        log.warning("%s: unreadable (%s); the live table starts empty", sweep.store.uri(TRIALS_FILE), e)
        return
    if previous is not None:
        progress.record_results(previous)


def experiment_complete(grid: Any, n: int) -> bool:
    """Whether every one of the experiment's ``n`` trials ended (completed, ASHA-stopped or failed)."""
    return len(grid) >= n and grid.num_terminated + grid.num_errors == len(grid)


def prune_checkpoints(sweep: SweepConfig, exp: Experiment) -> None:
    """Delete the Ray checkpoints that the experiment's trials left (Tune keeps the latest of each
    trial, a Ray Train run its latest): nothing resumes from them once every trial has ended.
    ``run/model.pt`` and ``run/result.json`` stay; ``checkpoint.keep: true`` keeps them all."""
    if trial_config(sweep, exp.dataset, exp.method, {}).checkpoint.keep:
        return
    store = sweep.store
    for trial in store.dirs(exp.name):
        folder = f"{exp.name}/{trial}"
        runs = [f"ray_train/{run}" for run in store.dirs(f"{folder}/ray_train")]
        for parent in ("", *runs):
            for sub in store.dirs(f"{folder}/{parent}"):
                if sub.startswith("checkpoint_"):
                    store.delete_dir(f"{folder}/{parent}/{sub}")


def final_params(sweep: SweepConfig, exp: Experiment) -> dict[str, Any] | None:
    """The config a final phase re-runs: the one it recorded when it started, else the best search
    trial's (then recorded, so a resumed sweep never mixes configs across seeds). None: no search
    trial finished without error, so there is nothing to re-run."""
    chosen = f"{exp.name}/config-from-search.json"
    recorded = sweep.store.read_json(chosen)
    if recorded:
        return recorded["params"]
    searched = collect(sweep, f"search-{exp.dataset}-{exp.method}")
    best = best_search_trials(searched, sweep.search.metric).get((exp.dataset, exp.method))
    if best is None:
        return None
    sweep.store.write_json(chosen, best)
    return best["params"]


def run_chain(sweep: SweepConfig, chain: list[tuple[Experiment, int]], resume: bool, max_concurrent: int | None = None) -> None:
    """Run one dataset x method: the search, then the final phase with the best searched config.

    On ``--resume`` an experiment that already finished is left alone (its failed trials are
    not retried again), and the final phase keeps the config it was started with.
    """
    from harness.tuning import run_experiment

    for exp, n in chain:
        if sweep.store.is_file(f"{exp.name}/{FINISHED}"):
            continue
        params = None
        if exp.phase == "final" and (METHODS.get(exp.method).train or search_space(sweep, exp.method)):
            # (zero-shot too when it tried several backbones: its final run uses the best on validation)
            params = final_params(sweep, exp)
            if params is None:
                log.warning("%s: no search trial finished without error; final phase skipped", exp.name)
                continue
        log.info("%s: %d trial(s)%s", exp.name, n, f", best config {params}" if params else "")
        grid = run_experiment(sweep, exp, n, params, resume, max_concurrent)
        if not experiment_complete(grid, n):
            raise SweepInterrupted(f"{exp.name} was interrupted with {len(grid)} of its trials started")
        prune_checkpoints(sweep, exp)
        sweep.store.touch(f"{exp.name}/{FINISHED}")  # every trial ended: completed, stopped by ASHA, failed or timed out


def _remote_chain(sweep: dict[str, Any], chain: list[tuple[Experiment, int]], resume: bool, max_concurrent: int) -> None:
    from indivaid.config import from_dict

    run_chain(from_dict(SweepConfig, sweep), chain, resume, max_concurrent)


@dataclass(frozen=True)
class GpuBudget:
    """How many trials each chain may run at once so that the GPUs the running chains ask for fit
    the cluster: the GPUs are shared out among the chains that run side by side, and a trial needs
    ``gpus x max(1, workers)``. CPU sweeps (no GPUs asked or declared) keep ``search.max_concurrent``."""

    cluster_gpus: float
    chains_at_once: int = 1

    def trials(self, sweep: SweepConfig, dataset: str, method: str) -> int:
        need = gpus_per_trial(sweep, dataset, method)
        if not need or not self.cluster_gpus:
            return sweep.search.max_concurrent
        share = self.cluster_gpus / max(1, self.chains_at_once)
        return max(1, min(sweep.search.max_concurrent, int(share // need)))

    def demand(self, sweep: SweepConfig, dataset: str, method: str) -> float:
        return gpus_per_trial(sweep, dataset, method) * self.trials(sweep, dataset, method)


def run_chains_concurrently(sweep: SweepConfig, chains: list[list[tuple[Experiment, int]]], resume: bool,
                            budget: GpuBudget, progress: SweepProgress | None = None) -> None:
    """Up to ``search.max_concurrent_experiments`` chains at once, each driving its own Tuner from a
    zero-CPU Ray task, so trials of several datasets x methods fill the cluster together.

    A chain starts only when its GPU demand fits beside the running ones', in queue order: a
    4-GPU gang at the head of the queue waits for GPUs instead of being overtaken by 1-GPU chains
    forever, and no Train run waits on a placement group that the cluster cannot give it.
    """
    import ray

    from harness.placement import coordinator_options

    task = ray.remote(num_cpus=0, max_retries=0)(_remote_chain)
    placement = coordinator_options(sweep)  # the head node, or nodes with the coordinator resource
    queue, pending = list(chains), {}
    in_use = 0.0
    while queue or pending:
        while queue and len(pending) < sweep.search.max_concurrent_experiments:
            d, m = queue[0][0][0].dataset, queue[0][0][0].method
            need = budget.demand(sweep, d, m)
            if pending and in_use + need > budget.cluster_gpus:
                break
            chain = queue.pop(0)
            in_use += need
            pending[task.options(name=f"tune-{d}-{m}", **placement).remote(
                to_dict(sweep), chain, resume, budget.trials(sweep, d, m))] = chain
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            chain = pending.pop(ref)
            in_use -= budget.demand(sweep, chain[0][0].dataset, chain[0][0].method)
            save_results(sweep, progress)
            try:
                ray.get(ref)
            except ray.exceptions.RayError as e:
                for other in pending:
                    ray.cancel(other, force=True)
                cause = getattr(e, "cause", None)
                if isinstance(cause, (ConfigError, DataError, SweepInterrupted)):
                    raise cause from None
                raise RuntimeError(f"{chain[0][0].dataset}/{chain[0][0].method}: the Tune run failed: {e}") from None
