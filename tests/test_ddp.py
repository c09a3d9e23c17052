"""The trainer under DistributedDataParallel: two CPU processes (gloo), as Ray Train runs it."""

from __future__ import annotations

import json
import sys
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
    assert (tmp_path / "run" / "model.pt").is_file() and (tmp_path / "run" / "checkpoint.pt").is_file()
