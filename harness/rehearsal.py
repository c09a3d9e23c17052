"""``--rehearse`` and ``--preflight``: run a sweep file's real plan before a GPU-hour is spent.

A rehearsal keeps everything the sweep file decides (datasets, per-dataset epochs, warm-up,
milestones, P×K, eval and checkpoint cadence, search space, scheduler, resources and worker counts,
final phase) and runs it on CPU through the same code paths as on a cluster. It substitutes what a
CPU cannot have: each dataset is generated in its own reference layout and file-name format with
its published identity counts per split, the backbone is the tiny random-init CLIP at a small input
with the gloo backend, and the sweep's GPUs are declared to the local Ray as logical resources so
trials are placed and queued as on the cluster. Steps per epoch, search samples and final seeds may
be reduced (:class:`Reductions`).

A preflight runs each dataset × method once, for a few steps, with the real backbone, input size,
dtype and worker count on the cluster it is pointed at: what a rehearsal cannot show (memory,
throughput, NCCL, real weights).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from harness.checks import asha_rungs, gpus_per_trial
from harness.config import ParamSpec, SweepConfig, trial_config
from harness.plan import input_dimensions
from harness.results import PARAM_PREFIX, read_table
from harness.storage import sibling
from indivaid.config import ConfigError
from indivaid.data.adapters import make_adapter
from indivaid.methods import METHODS
from indivaid.training.config import merge
from indivaid.utils.io import file_lock

log = logging.getLogger(__name__)

#: What replaces the real backbone in a rehearsal (the tiny preset's model at a smaller input).
REHEARSAL_MODEL = {"backbone": "tiny", "pretrained": None, "input_size": [32, 64], "stride": 16,
                   "similarity": "cosine", "logit_scale": 10.0}
CANNOT_SHOW = ("A CPU rehearsal cannot show: NCCL collectives, CUDA memory, bf16 numerics, real pretrained "
               "weights, real image sizes, throughput. Run --preflight on the cluster for those.")


@dataclass(frozen=True)
class Reductions:
    """What a rehearsal may shrink; everything else stays as the sweep file has it."""

    steps_per_epoch: int = 2  # optimiser steps per epoch (stage 1's step budget scales with it)
    num_samples: int = 2  # search trials per dataset x method
    startup_trials: int = 2
    seeds: int = 1  # final seeds ...
    full_seeds_dataset: str | None = None  # ... except here (default: the first dataset), which keeps
    full_seeds: int = 5  # enough paired seeds for the leaderboard's test
    gpus: int = 8  # logical GPUs declared to the local Ray
    images_per_identity: int = 6  # training images per identity (more where DDP ranks need batches)


# ---------------------------------------------------------------------------------------------
# Data: each dataset in its own reference layout, at its published identity counts
# ---------------------------------------------------------------------------------------------


def _camera_field(adapter: Any, camera: str, encounter: str, identity: int) -> str:
    """The second file-name field: a camera string, a camera number, or the video (PolarBear)."""
    if adapter.info.video:
        return str(identity * 100 + int(encounter.rsplit("_e", 1)[1]))  # videos are unique per animal
    number = camera.removeprefix("cam")
    return f"cam{number}" if adapter.camera_strings else number


def generate_reference_dataset(name: str, root: Path, train_images: int, test_images: tuple[int, int]) -> Path:
    """``root/<Name>/{train,query,gallery}`` with the adapter's published identity counts, rendered by
    the synthetic generator: ``train_images`` per training identity, (query, gallery) per test identity.

    Test identities take their first encounter as query and the others as gallery, so queries keep
    a true match under every protocol (another video or camera for market1501)."""
    from indivaid.data.synth import SynthParams, generate

    adapter = make_adapter(name)
    info = adapter.info
    out = root / f"{info.name}-train{train_images}-test{test_images[0]}x{test_images[1]}" / info.name
    if (out / ".complete").is_file():
        return out
    n_train = info.expected["train"][0]
    n_test = info.expected.get("query", (0, 0))[0]
    q, g = test_images
    per_id = max(train_images, q + g)
    params = SynthParams(identities=n_train + n_test, min_images=per_id, max_images=per_id, max_encounters=3,
                         cameras=3, height=48, width=80, species=info.species, seed=sum(map(ord, name)))
    src = generate(params, root / ".synthetic")
    meta = pl.read_csv(src / "metadata.csv")
    with file_lock(root / f".{info.name}.lock"):
        if (out / ".complete").is_file():
            return out
        shutil.rmtree(out, ignore_errors=True)
        parts = ("train", "query") if adapter.gallery_is_query else ("train", "query", "gallery")
        for part in parts:
            (out / part).mkdir(parents=True)
        for (ident,), rows in meta.group_by("identity", maintain_order=True):
            i = int(str(ident).removeprefix("id"))
            first = rows["encounter"][0]
            for k, r in enumerate(rows.iter_rows(named=True)):
                if i < n_train:
                    part = "train" if k < train_images else None
                elif adapter.gallery_is_query:
                    part = "query" if k < q + g else None
                else:
                    part = "query" if r["encounter"] == first and k < q else ("gallery" if r["encounter"] != first else None)
                if part is None:
                    continue
                cam = _camera_field(adapter, r["camera"], r["encounter"], i)
                os.link(src / r["path"], out / part / f"{i}_{cam}_{k:03d}.jpg")
        (out / ".complete").touch()
    return out


def _images_needed(sweep: SweepConfig, dataset: str, red: Reductions) -> int:
    """Training images per identity so that every DDP rank draws at least one batch per epoch."""
    cfg = trial_config(sweep, dataset, sweep.methods[0], {})
    k = max(cfg.stage1.batch_k, cfg.stage2.batch_k)
    return max(red.images_per_identity, k * max(1, sweep.resources_for(dataset).workers))


def prepare_data(sweep: SweepConfig, root: Path, red: Reductions) -> dict[str, Path]:
    """Generate every dataset of the sweep (paper datasets only: they have published counts)."""
    paths = {}
    for d in sweep.datasets:
        if "train" not in make_adapter(d).info.expected:
            raise ConfigError(f"datasets: {d} has no published counts to generate a rehearsal dataset from; "
                              f"rehearse the paper datasets (or leave {d} out with --only)")
        paths[d] = generate_reference_dataset(d, root, _images_needed(sweep, d, red), (2, 3))
        log.info("rehearsal data for %s: %s", d, paths[d])
    return paths


# ---------------------------------------------------------------------------------------------
# The rehearsal sweep
# ---------------------------------------------------------------------------------------------


def rehearsal_sweep(sweep: SweepConfig, red: Reductions, data_root: Path, paths: dict[str, Path]) -> SweepConfig:
    """The sweep as it will run on CPU: the real plan with the substitutions and reductions above.

    The checkpoint policy is decided on the real plan first, so the rehearsal writes (and reports)
    the checkpoints the cluster sweep would write.
    """
    from harness.estimate import apply_checkpoint_policy

    real = apply_checkpoint_policy(sweep)
    keep5 = red.full_seeds_dataset or sweep.datasets[0]
    base = merge(real.base, {"model": REHEARSAL_MODEL, "data": {"workers": 1},
                             "runtime": {"device": "cpu", "amp": "off", "threads": 1,
                                         "max_steps_per_epoch": red.steps_per_epoch}})
    per_dataset = {d: {k: v for k, v in over.items() if k != "model"} for d, over in real.per_dataset.items()}
    presets = {d: over["preset"] for d, over in real.per_dataset.items() if "preset" in over}
    for d, preset in presets.items():  # the preset's model section is the real backbone: keep the rest
        per_dataset[d] = merge(per_dataset[d], {"model": REHEARSAL_MODEL})
    for d, path in paths.items():
        per_dataset[d] = merge(per_dataset.get(d, {}), {"data": {"path": str(path)}, "stage1": stage1_epochs(real, d)})
    storage = sibling(sweep.storage, f"{sweep.name}-rehearsal") if sweep.storage else f"results/{sweep.name}-rehearsal"
    return dataclasses.replace(
        real, name=f"{sweep.name}-rehearsal", storage=storage, data_root=str(data_root), base=base,
        per_dataset=per_dataset, rehearsal=True, pinned={"model": REHEARSAL_MODEL},  # searched model.* too
        search=dataclasses.replace(real.search, num_samples=min(real.search.num_samples, red.num_samples),
                                   startup_trials=min(real.search.startup_trials, red.startup_trials)),
        final=dataclasses.replace(real.final, seeds=min(real.final.seeds, red.seeds),
                                  dataset_seeds={keep5: min(real.final.seeds_for(keep5), red.full_seeds)}
                                  if real.final.seeds else {}),
        checkpoint_policy=dataclasses.replace(real.checkpoint_policy, enabled=False))


def stage1_epochs(real: SweepConfig, dataset: str) -> dict[str, int]:
    """Stage 1 as long, in epochs, as on the real data: ``max(epochs, min_steps / steps per epoch)``
    with the published image count. The generated data has fewer images per identity, so its own
    step count would stretch stage 1 to many more (and shorter) epochs than the cluster runs."""
    from harness.estimate import published_counts

    trained = [m for m in real.methods if METHODS.get(m).train]
    if not trained:
        return {}
    cfg = trial_config(real, dataset, trained[0], {})
    counts = published_counts(cfg)
    if counts is None or cfg.stage1.min_steps == 0:
        return {}
    steps = max(1, math.ceil(counts.train / (cfg.stage1.batch_p * cfg.stage1.batch_k)))
    return {"epochs": max(cfg.stage1.epochs, math.ceil(cfg.stage1.min_steps / steps)), "min_steps": 0}


def declared_resources(sweep: SweepConfig, red: Reductions) -> dict[str, Any]:
    """Logical resources for the local Ray: the GPUs of a cluster, and CPUs for that many trials."""
    per_gpu = max(sweep.resources_for(d).cpus for d in sweep.datasets)
    custom: dict[str, float] = {}
    for d in sweep.datasets:
        for k, v in sweep.resources_for(d).custom.items():
            custom[k] = max(custom.get(k, 0.0), v * red.gpus)
    return {"num_gpus": red.gpus, "num_cpus": int(math.ceil(per_gpu * red.gpus)) + 4, "resources": custom or None}


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def peak_gpu_demand(trials: pl.DataFrame, sweep: SweepConfig) -> float:
    """The most GPUs that trials held at once (from their start and wall-clock times)."""
    events = []
    for r in trials.iter_rows(named=True):
        need = gpus_per_trial(sweep, r["dataset"], r["method"])
        if need and r["created_at"] is not None:
            events += [(r["created_at"], need), (r["created_at"] + (r["wall_s"] or 0.0), -need)]
    peak = level = 0.0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):
        level += delta
        peak = max(peak, level)
    return peak


def report_rows(real: SweepConfig, trials: pl.DataFrame) -> list[dict[str, Any]]:
    """One row per dataset x method of what the rehearsal found, against the real plan."""
    from harness.estimate import apply_checkpoint_policy, inference_bytes, train_state_bytes
    from harness.plan import plan_rows

    real = apply_checkpoint_policy(real)  # the checkpoint cadence the cluster sweep gets

    hours: dict[tuple[str, str], float] = {}
    for r in plan_rows(real):
        if r.gpu_hours is not None:
            hours[(r.exp.dataset, r.exp.method)] = hours.get((r.exp.dataset, r.exp.method), 0.0) + r.gpu_hours
    rows = []
    for (d, m), g in trials.group_by(["dataset", "method"], maintain_order=True):
        cfg = trial_config(real, d, m, {})
        trains = METHODS.get(m).train
        ids = make_adapter(d).info.expected["train"][0]
        state, model = (train_state_bytes(cfg, ids), inference_bytes(cfg, ids)) if trains else (0, 0)
        counts = {s: int((g["status"] == s).sum()) for s in ("completed", "stopped", "error", "timeout", "running")}
        errors = sorted({e.splitlines()[0][:160] for e in g.filter(pl.col("status").is_in(["error", "timeout"]))["error"].drop_nulls()})
        rungs = asha_rungs(real.scheduler.grace_period, real.scheduler.reduction_factor, cfg.stage2.epochs + 1) \
            if real.scheduler.kind == "asha" and trains and real.search_space else []
        rows.append({
            "dataset": d, "method": m, **counts, "errors": errors,
            "asha_rungs": rungs, "s2_epochs": cfg.stage2.epochs if trains else 0,
            "lr_peak_factor": g["lr_peak_factor"].max() if trains else None,
            "epochs_at_base_lr": g["epochs_at_base_lr"].max() if trains else None,
            "min_steps_per_rank": g["steps_per_epoch"].min() if trains else None,
            "ckpt_every": cfg.checkpoint.every if trains else None,
            "ckpt_written_gb_per_trial": (g["ckpt_saves"].max() or 0) * state / 1e9,
            # after the sweep: resumable state left (pruned when experiments end) and inference models
            "kept_gb": (int((g["ckpt_kept_bytes"] > 0).sum()) * state + int((g["model_bytes"] > 0).sum()) * model) / 1e9,
            "gpu_hours": hours.get((d, m)),
        })
    return rows


def _cell(v: Any, fmt: str = "{}") -> str:
    return "—" if v is None or v == [] else fmt.format(v)


def render_report(real: SweepConfig, trials: pl.DataFrame, declared_gpus: float, minutes: float) -> str:
    """The rehearsal report as markdown (printed and written beside the results)."""
    rows = report_rows(real, trials)
    head = ["dataset", "method", "completed", "ASHA-stopped", "errors", "timed out", "ASHA rungs / s2 epochs",
            "lr peak × base", "epochs at base lr", "min steps/rank/epoch", "ckpt every", "ckpt GB written/trial",
            "GB kept", "≈ GPU-h"]
    lines = [f"# Rehearsal of sweep `{real.name}` ({minutes:.1f} min on CPU)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["dataset"], r["method"], str(r["completed"]), str(r["stopped"]), str(r["error"]), str(r["timeout"]),
                 f"{', '.join(map(str, r['asha_rungs'])) or 'none'} / {r['s2_epochs']}",
                 _cell(r["lr_peak_factor"], "{:.2f}"), _cell(r["epochs_at_base_lr"]), _cell(r["min_steps_per_rank"]),
                 _cell(r["ckpt_every"], "{}") if r["ckpt_every"] != 0 else "none mid-run",
                 f"{r['ckpt_written_gb_per_trial']:.1f}", f"{r['kept_gb']:.1f}", _cell(r["gpu_hours"], "{:.1f}")]
        lines.append("| " + " | ".join(cells) + " |")
    errors = [f"- {r['dataset']}/{r['method']}: {e}" for r in rows for e in r["errors"]]
    peak = peak_gpu_demand(trials, real)
    total = sum(r["gpu_hours"] or 0.0 for r in rows)
    lines += ["", f"Trials: {trials.height}; errors: {int((trials['status'] == 'error').sum())}; timed out: "
              f"{int((trials['status'] == 'timeout').sum())}.",
              f"Peak GPU demand in flight: {peak:g} of {declared_gpus:g} GPUs declared.",
              f"Full-budget estimate (--dry-run): ≈ {total:.1f} GPU-hours on H200-class GPUs.",
              "Checkpoint sizes are those of the real backbone; steps per epoch were capped by the rehearsal.",
              "", CANNOT_SHOW]
    searched = [k for k in real.search_space if k.split(".")[0] == "model"]
    if searched:
        lines.append(f"Searched model keys ({', '.join(searched)}) were sampled and recorded, but every trial ran the "
                     "tiny model; --preflight runs each searched backbone and weights on the cluster.")
    if errors:
        lines += ["", "Errors:", *errors]
    return "\n".join(lines) + "\n"


def rehearse(sweep: SweepConfig, red: Reductions, *, resume: bool = False, only: list[str] | None = None) -> str:
    """Run the rehearsal; returns where its report is (``<storage>/rehearsal.md``)."""
    import time

    from harness.checks import validate
    from harness.orchestrate import run_sweep
    from harness.ui import console
    from indivaid.utils.io import data_root

    validate(sweep)  # the real plan must pass before anything is generated
    t0 = time.time()
    root = data_root(None) / "rehearsal"
    if only:
        sweep = dataclasses.replace(sweep, datasets=[d for d in sweep.datasets if d in only],
                                    per_dataset={d: v for d, v in sweep.per_dataset.items() if d in only},
                                    dataset_resources={d: v for d, v in sweep.dataset_resources.items() if d in only})
    # generated data has the published identity counts, not image counts: the adapters' mismatch warning is expected
    logging.getLogger("indivaid.data.adapters.base").setLevel(logging.ERROR)
    rsweep = rehearsal_sweep(sweep, red, root, prepare_data(sweep, root, red))
    run_sweep(rsweep, resume=resume, declare=declared_resources(sweep, red))
    report = render_report(sweep, read_table(rsweep.store), red.gpus, (time.time() - t0) / 60)
    rsweep.store.write_text("rehearsal.md", report)
    from rich.markdown import Markdown

    console.print(Markdown(report))
    return rsweep.store.uri("rehearsal.md")


# ---------------------------------------------------------------------------------------------
# Preflight
# ---------------------------------------------------------------------------------------------


def preflight_sweep(sweep: SweepConfig, steps: int) -> SweepConfig:
    """Each dataset x method once, for ``steps`` steps per stage, with the real backbone, input size,
    dtype and workers: no search, no scheduler, no final phase."""
    quick = {"stage1": {"epochs": 1, "min_steps": 0}, "stage2": {"epochs": 1, "warmup_epochs": 0},
             "eval": {"every": 1}, "runtime": {"max_steps_per_epoch": steps}, "checkpoint": {"every": 0}}
    storage = sibling(sweep.storage, f"{sweep.name}-preflight") if sweep.storage else f"results/{sweep.name}-preflight"
    # every searched backbone / weights / input size once (a grid); nothing else is searched
    grid = {k: ParamSpec("grid", values=p.values) for k, p in input_dimensions(sweep).items()}
    return dataclasses.replace(
        sweep, name=f"{sweep.name}-preflight", storage=storage, base=merge(sweep.base, quick), search_space=grid,
        scheduler=dataclasses.replace(sweep.scheduler, kind="none"), final=dataclasses.replace(sweep.final, seeds=0,
                                                                                              dataset_seeds={}),
        search=dataclasses.replace(sweep.search, num_samples=1), checkpoint_policy=dataclasses.replace(
            sweep.checkpoint_policy, enabled=False))


def preflight_rows(sweep: SweepConfig, trials: pl.DataFrame) -> list[dict[str, Any]]:
    """Per dataset x method: status, time to first report, stage-2 img/s, peak accelerator memory."""
    from harness.rows import experiments, tune_trials

    store = sweep.store
    reports: dict[str, list[dict[str, Any]]] = {}
    for exp in experiments(store):
        reports.update({tid: t.history for tid, t in tune_trials(store, exp).items()})
    rows = []
    for r in trials.sort("dataset", "method").iter_rows(named=True):
        progress = reports.get(r["trial_id"], [])
        started = r["created_at"]
        first = progress[0].get("timestamp") if progress else None
        mem = [p.get("max_mem_gb") for p in progress if p.get("max_mem_gb") == p.get("max_mem_gb")]
        s2 = [p.get("images_per_s") for p in progress if p.get("stage") == 2]
        variant = ", ".join(f"{k.removeprefix(PARAM_PREFIX)}={v}" for k, v in r.items()
                            if k.startswith(PARAM_PREFIX) and v is not None)
        rows.append({"dataset": r["dataset"], "method": r["method"], "variant": variant, "status": r["status"],
                     "error": r["error"],
                     "first_report_s": first - started if first and started else None,
                     "images_per_s": s2[-1] if s2 else None,
                     "max_mem_gb": max((m for m in mem if m is not None), default=None)})
    return rows


def preflight(sweep: SweepConfig, steps: int, *, address: str | None = None, resume: bool = False) -> str:
    """Run the preflight; returns where its report is (``<storage>/preflight.md``)."""
    from harness.orchestrate import run_sweep
    from harness.ui import console

    psweep = preflight_sweep(sweep, steps)
    run_sweep(psweep, address=address, resume=resume)
    rows = preflight_rows(psweep, read_table(psweep.store))
    head = ["dataset", "method", "searched", "status", "first report (s)", "stage-2 img/s", "peak GPU memory (GiB)",
            "error"]
    lines = [f"# Preflight of sweep `{sweep.name}` ({steps} steps per stage)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([r["dataset"], r["method"], r["variant"] or "—", r["status"], _cell(r["first_report_s"], "{:.0f}"),
                                        _cell(r["images_per_s"], "{:.0f}"), _cell(r["max_mem_gb"], "{:.1f}"),
                                        (r["error"] or "").splitlines()[0][:120] if r["error"] else ""]) + " |")
    report = "\n".join(lines) + "\n"
    psweep.store.write_text("preflight.md", report)
    from rich.markdown import Markdown

    console.print(Markdown(report))
    return psweep.store.uri("preflight.md")
