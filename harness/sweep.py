"""``python -m harness.sweep FILE``: Ray Tune + Optuna (+ ASHA) over datasets x methods.

One Tune experiment per (phase, dataset, method): the search phase optimises the validation
metric with Optuna TPE under a concurrency limit and ASHA (time = stage-2 epoch); the final phase
re-runs the best searched config with several seeds and scores it on the test split. Results go
to ``<storage>/trials.parquet`` (one row per trial), ``best.yaml`` and ``manifest.json``.
"""

# The command line. The work is done by harness.plan (experiments, --dry-run), harness.tuning (the
# Tune experiments), harness.progress (the live table), harness.orchestrate (running the sweep) and
# harness.results (the results files); their main names are re-exported here.

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
from rich.table import Table

from harness.checks import validate
from harness.config import SweepConfig, load_sweep
from harness.orchestrate import (GpuBudget, SweepInterrupted, cluster_gpus, experiment_complete, init_ray,
                                 run_chain, run_sweep)
from harness.plan import Experiment, missing_datasets, plan, plan_rows, print_plan, search_space
from harness.results import FINISHED, RUN, SCHEMA_VERSION, TRIAL_INFO, best_search_trials, read_table, write_results
from harness.rows import collect, experiments, trial_status
from harness.ui import console
from indivaid.config import ConfigError
from indivaid.data.catalogue import DataError

log = logging.getLogger(__name__)

__all__ = ["FINISHED", "SCHEMA_VERSION", "Experiment", "GpuBudget", "SweepInterrupted", "best_search_trials",
           "cluster_gpus", "collect", "console", "experiment_complete", "init_ray", "main", "missing_datasets", "plan",
           "plan_rows", "print_plan", "reproduce", "run_chain", "run_sweep", "search_space", "summary", "trial_status",
           "write_results"]


def summary(table: pl.DataFrame) -> None:
    """The end-of-sweep table read back from trials.parquet: best validation and final test mAP."""
    if not table.height:
        console.print("no trials")
        return
    t = Table(title="sweep summary (validation mAP %, best per dataset x method; test from the final phase)")
    for c in ("dataset", "method", "trials", "stopped early", "errors", "best val mAP", "final test mAP"):
        t.add_column(c)
    for (d, m), g in table.group_by(["dataset", "method"], maintain_order=True):
        final = g.filter(pl.col("phase") == "final")["test_mAP"].drop_nulls()
        t.add_row(d, m, str(g.height), str((g["stop_reason"] == "asha_stopped").sum()), str((g["status"] == "error").sum()),
                  f"{100 * (g['best_val_mAP'].max() or 0):.1f}",
                  f"{100 * final.mean():.1f} ± {100 * (final.std() or 0):.1f} (n={final.len()})" if final.len() else "—")
    console.print(t)


def find_trial(sweep: SweepConfig, trial_id: str) -> tuple[str, dict[str, Any]]:
    """(the trial's folder in the storage, its trial.json) of a recorded trial."""
    store = sweep.store
    for exp in experiments(store):
        for name in store.dirs(exp):
            info = store.read_json(f"{exp}/{name}/{TRIAL_INFO}")
            if info.get("trial_id") == trial_id:
                return f"{exp}/{name}", info
    raise ConfigError(f"no trial {trial_id!r} under {store.uri()} (see trials.parquet's trial_id)")


def reproduce(sweep: SweepConfig, trial_id: str) -> dict[str, Any]:
    """Re-run one recorded trial from its resolved config and split file; recorded vs new metrics.

    The new run's workdir is ``<storage>/reproduce/`` on a local storage, else ``reproduce/<sweep>/``
    here (the trainer writes to local files)."""
    from indivaid.config import from_dict
    from indivaid.training import TrainConfig, train

    store = sweep.store
    folder, info = find_trial(sweep, trial_id)
    stamp = f"{trial_id}-{int(time.time())}"
    workdir = store.local_path("reproduce", stamp) if store.local else Path("reproduce") / sweep.name / stamp
    recorded_dir = workdir / "recorded"
    for name in ("config.json", "split.csv", "result.json"):
        store.download(f"{folder}/{RUN}/{name}", recorded_dir / name)
    if not (recorded_dir / "config.json").is_file() or not (recorded_dir / "split.csv").is_file():
        raise ConfigError(f"trial {trial_id} has no recorded config or split under {store.uri(folder, RUN)}")
    data = json.loads((recorded_dir / "config.json").read_text())
    data["data"]["split_file"] = str(recorded_dir / "split.csv")
    cfg = from_dict(TrainConfig, data)
    res = train(cfg, workdir=workdir / "run", evaluate_test=info["phase"] == "final")
    recorded = json.loads((recorded_dir / "result.json").read_text()) if (recorded_dir / "result.json").is_file() else {}
    out = {"trial_id": trial_id, "workdir": str(workdir), "recorded_val": recorded.get("val"), "val": res.val,
           "recorded_test": recorded.get("test"), "test": res.test}
    table = Table(title=f"reproduced trial {trial_id} ({info['dataset']}, {info['method']}, {info['phase']})")
    for c in ("", "val mAP", "test mAP"):
        table.add_column(c)
    for name, v, te in (("recorded", out["recorded_val"], out["recorded_test"]), ("reproduced", res.val, res.test)):
        table.add_row(name, f"{100 * v['mAP']:.2f}" if v else "—", f"{100 * te['mAP']:.2f}" if te else "—")
    console.print(table)
    return out


def runtime_env_arg(text: str) -> dict[str, Any]:
    """``--runtime-env``: Ray's runtime environment as inline JSON/YAML, or a JSON/YAML file."""
    import yaml

    path = Path(text)
    try:
        value = yaml.safe_load(path.read_text() if not text.lstrip().startswith("{") and path.is_file() else text)
    except (OSError, yaml.YAMLError) as e:
        raise argparse.ArgumentTypeError(f"--runtime-env: cannot read {text!r}: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--runtime-env: expected a mapping such as '{{\"working_dir\": \".\"}}', "
                                         f"got {text!r}")
    return value


def with_cli_overrides(sweep: SweepConfig, storage: str | None, runtime_env: dict[str, Any] | None) -> SweepConfig:
    """The sweep file's config with ``--storage`` and ``--runtime-env`` on top."""
    if storage:
        sweep = dataclasses.replace(sweep, storage=storage)
    if runtime_env is not None:
        sweep = dataclasses.replace(sweep, cluster=dataclasses.replace(sweep.cluster, runtime_env=runtime_env))
    return sweep


def main(argv: list[str] | None = None) -> int:
    from harness.rehearsal import Reductions

    ap = argparse.ArgumentParser(prog="python -m harness.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    ap.add_argument("--address", help="join a Ray cluster (auto, or ray://host:port); default: local Ray")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    ap.add_argument("--dry-run", action="store_true", help="check the plan (every dataset), print it and exit")
    ap.add_argument("--only", nargs="+", metavar="DATASET", help="run these datasets only")
    ap.add_argument("--skip-missing", action="store_true", help="skip datasets whose files are absent")
    ap.add_argument("--reproduce", metavar="TRIAL_ID", help="re-run one trial from its recorded config and split")
    ap.add_argument("--storage", metavar="URI",
                    help="where the results go, over the sweep file's storage: a local path or a URI pyarrow opens "
                         "(file:///abs, s3://bucket/prefix?endpoint_override=HOST:PORT&scheme=http, gs://bucket/prefix)")
    ap.add_argument("--runtime-env", type=runtime_env_arg, metavar="JSON_OR_FILE",
                    help="Ray runtime_env for the sweep's job, over the sweep file's cluster.runtime_env, e.g. "
                         "'{\"working_dir\": \".\"}' or '{\"py_modules\": [\"indivaid\", \"harness\"]}' to ship this "
                         "package to nodes that do not have it installed")
    mode = ap.add_argument_group("before a cluster sweep")
    mode.add_argument("--rehearse", action="store_true",
                      help="run the real plan on CPU: generated datasets at their published identity counts, tiny model, "
                           "the sweep's GPUs declared as logical resources; results in results/<name>-rehearsal")
    mode.add_argument("--preflight", action="store_true",
                      help="each dataset x method once for a few steps with the real backbone on the cluster: memory, "
                           "img/s, time to first report; results in results/<name>-preflight")
    red = Reductions()
    mode.add_argument("--steps-per-epoch", type=int, default=None,
                      help=f"rehearsal: optimiser steps per epoch (default {red.steps_per_epoch}); preflight: steps per stage (default 5)")
    mode.add_argument("--samples", type=int, default=red.num_samples, help="rehearsal: search trials per dataset x method")
    mode.add_argument("--seeds", type=int, default=red.seeds, help="rehearsal: final seeds of every dataset but the first")
    mode.add_argument("--first-seeds", type=int, default=red.full_seeds,
                      help="rehearsal: final seeds of the first dataset (5: the leaderboard's paired test runs)")
    mode.add_argument("--gpus", type=int, default=red.gpus, help="rehearsal: logical GPUs to declare")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Ctrl-C stops the sweep here (KeyboardInterrupt: results written, exit 130, --resume continues) instead
    # of Tune's handler, which returns from Tuner.fit as if the search had ended
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    sweep: SweepConfig | None = None
    try:
        sweep = with_cli_overrides(load_sweep(args.file), args.storage, args.runtime_env)
        if args.dry_run:
            validate(sweep, args.file, cluster_gpus=_address_gpus(args.address))
            print_plan(sweep)
            return 0
        if args.reproduce:
            reproduce(sweep, args.reproduce)
            return 0
        if args.rehearse:
            from harness.rehearsal import rehearse

            rehearse(sweep, Reductions(steps_per_epoch=args.steps_per_epoch or red.steps_per_epoch,
                                       num_samples=args.samples, startup_trials=min(args.samples, red.startup_trials),
                                       seeds=args.seeds, full_seeds=args.first_seeds, gpus=args.gpus),
                     resume=args.resume, only=args.only)
            return 0
        if args.preflight:
            from harness.rehearsal import preflight

            preflight(sweep, args.steps_per_epoch or 5, address=args.address, resume=args.resume)
            return 0
        out = run_sweep(sweep, address=args.address, resume=args.resume, only=args.only, skip_missing=args.skip_missing)
        table = read_table(sweep.store)
        summary(table if table is not None else pl.DataFrame())
        console.print(f"results: {out} (tables and plots: python -m harness.leaderboard '{sweep.storage_uri}')")
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the storage could not be reached (credentials, endpoint, bucket)
        where = f" (storage: {sweep.storage_uri})" if sweep is not None else ""
        print(f"error: {e}{where}", file=sys.stderr)
        return 2
    except (SweepInterrupted, KeyboardInterrupt) as e:
        print(f"interrupted{f': {e}' if str(e) else ''}; what finished is in trials.parquet; continue with --resume",
              file=sys.stderr)
        return 130
    return 0


def _address_gpus(address: str | None) -> float | None:
    """The GPUs of the cluster at ``address`` (None without one): --dry-run checks the plan against them."""
    if not address:
        return None
    import ray

    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    try:
        return cluster_gpus()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
