"""The trainer under DistributedDataParallel: two CPU processes (gloo), as Ray Train runs it."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))


def _worker(rank: int, world: int, init: str, data_root: str, out: str) -> None:
    import torch.distributed as dist

    from test_trainer import micro_config

    from indivaid.training import train

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        reports: list[dict] = []
        cfg = micro_config(Path(data_root), Path(out) / "cache", "stage1.epochs=2", "stage2.epochs=2", method="indivaid")
        res = train(cfg, workdir=Path(out) / "run", report=lambda m, checkpoint=None: reports.append(m))
        Path(out, f"rank{rank}.json").write_text(json.dumps({"reports": reports, "test": res.test}))
    finally:
        dist.destroy_process_group()


def test_two_rank_ddp_run_reports_on_every_rank_and_checkpoints_once(data_root: Path, tmp_path: Path):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(2, init, str(data_root), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert [m["epoch"] for m in r0["reports"]] == [m["epoch"] for m in r1["reports"]] == [1, 2, 1, 2]
    assert [m["val_mAP"] for m in r0["reports"]] == [m["val_mAP"] for m in r1["reports"]]  # rank 0's, broadcast
    assert r0["test"] is not None and r1["test"] is None  # the test split is scored once, on rank 0
    assert (tmp_path / "run" / "model.pt").is_file() and not (tmp_path / "run" / "checkpoint.pt").exists()
    saves = (tmp_path / "run" / "checkpoints.jsonl").read_text().splitlines()  # rank 0 alone writes them
    assert [(json.loads(s)["stage"], json.loads(s)["epoch"]) for s in saves] == [(1, 2)]  # every 5: the end of stage 1


def record_steps(run_module, sink: dict) -> Callable[[], None]:
    """Record, per epoch, the identities of every step's batch (what this rank trains on) and the
    optimiser steps taken (each epoch starts with one ``epoch_batches`` call of ``run_module``, the
    trainer's ``indivaid.training.run``); returns the undo."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    original = run_module.epoch_batches
    sink.update(identities=[], steps_before=[], steps=0)

    def recording(sampler, *args, **kwargs):
        batches = original(sampler, *args, **kwargs)
        sink["steps_before"].append(sink["steps"])
        sink["identities"].append([sorted(set(sampler.labels[b].tolist())) for b in batches.cpu().numpy()])
        return batches

    def count(*_):
        sink["steps"] += 1

    run_module.epoch_batches = recording
    hook = register_optimizer_step_post_hook(count)

    def undo() -> None:
        run_module.epoch_batches = original
        hook.remove()

    return undo


def steps_per_epoch(sink: dict) -> list[int]:
    bounds = sink["steps_before"] + [sink["steps"]]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def _ddp_steps_config(data_root: Path, out: Path):
    from test_trainer import micro_config

    return micro_config(data_root, out / "cache", "stage1.epochs=1", "stage2.epochs=1", "stage1.batch_p=8",
                        "stage2.batch_p=8", method="clipreid")


def _steps_worker(rank: int, world: int, init: str, data_root: str, out: str) -> None:
    import torch.distributed as dist

    import indivaid.training.run as run_module
    import indivaid.training.trainer as trainer

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        sink: dict = {}
        record_steps(run_module, sink)
        trainer.train(_ddp_steps_config(Path(data_root), Path(out)), workdir=Path(out) / "ddp", evaluate_test=False)
        Path(out, f"steps{rank}.json").write_text(json.dumps({**sink, "per_epoch": steps_per_epoch(sink)}))
    finally:
        dist.destroy_process_group()


def test_ddp_splits_one_global_batch_same_steps_and_identities_as_one_process(data_root: Path, tmp_path: Path):
    """Two gloo ranks take the steps one process takes, each with half of every step's identities."""
    import indivaid.training.run as run_module
    import indivaid.training.trainer as trainer

    mp.spawn(_steps_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(data_root), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"steps{r}.json").read_text()) for r in (0, 1)]
    single: dict = {}
    undo = record_steps(run_module, single)
    try:
        trainer.train(_ddp_steps_config(data_root, tmp_path), workdir=tmp_path / "single", evaluate_test=False)
    finally:
        undo()
    assert ranks[0]["per_epoch"] == ranks[1]["per_epoch"] == steps_per_epoch(single)  # optimiser steps per epoch
    assert len(single["identities"]) == 2 and all(n > 0 for n in steps_per_epoch(single))
    for epoch, steps in enumerate(single["identities"]):
        for step, whole in enumerate(steps):
            r0, r1 = ranks[0]["identities"][epoch][step], ranks[1]["identities"][epoch][step]
            assert len(whole) == 8 and len(r0) == len(r1) == 4 and sorted(r0 + r1) == whole
