"""Speed and memory of indivaid.eval.rank_metrics against a torchreid-style numpy evaluation.

Run from the repository root:  python benchmarks/eval_speed.py

1. 2,000 queries x 10,000 gallery (300 identities, 3 cameras, 64-d features): times the usual
   numpy evaluation (argsort of the whole matrix, then a per-query loop: drop same id + same
   camera, cumsum, AP, INP), written out below, and ``rank_metrics``; checks that they agree.
   The other exact rankers of the module are timed too, to show why the default was chosen.
2. PolarBear size, 4,613 queries x 26,500 gallery: in a fresh subprocess, allocates the distance
   matrix first, then reports the peak resident-memory increase caused by ``rank_metrics``
   (the kernel's peak-RSS counter is reset after the allocation when /proc/self/clear_refs
   allows it; otherwise the matrix is built without temporaries so the old peak equals it).

The last line is ``speed-up: N.Nx`` (numpy time / rank_metrics time). Threads are left at
torch's default; timings on a shared machine vary, so each side is timed ``--repeats`` times and
the best run is kept.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from indivaid.eval import distance_matrix, rank_metrics  # noqa: E402
from indivaid.eval.metrics import _rank_metrics  # noqa: E402


def numpy_eval(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 10,
) -> dict[str, float]:
    """The standard per-query evaluation (market1501 protocol), as torchreid's eval_func does it:
    sort every row of the whole matrix, then per query drop same-id same-camera items."""
    indices = np.argsort(distmat, axis=1)
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    all_cmc, all_ap, all_inp = [], [], []
    for q_idx in range(distmat.shape[0]):
        order = indices[q_idx]
        remove = (g_pids[order] == q_pids[q_idx]) & (g_camids[order] == q_camids[q_idx])
        raw_cmc = matches[q_idx][~remove]
        if not raw_cmc.any():
            continue  # no true match left: query skipped
        cmc = raw_cmc.cumsum()
        last_pos = np.nonzero(raw_cmc)[0][-1]
        all_inp.append(cmc[last_pos] / (last_pos + 1.0))
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        precision_at_hits = raw_cmc.cumsum() / np.arange(1, raw_cmc.size + 1) * raw_cmc
        all_ap.append(precision_at_hits.sum() / raw_cmc.sum())
    cmc_mean = np.asarray(all_cmc, dtype=np.float64).mean(axis=0)
    return {
        "rank1": float(cmc_mean[0]),
        "rank5": float(cmc_mean[4]),
        "rank10": float(cmc_mean[9]),
        "mAP": float(np.mean(all_ap)),
        "mINP": float(np.mean(all_inp)),
    }


def make_features(num: int, centres: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Features = identity centre + noise, so that the metrics are neither 0 nor 1."""
    ids = torch.randint(0, centres.shape[0], (num,), generator=gen)
    feats = centres[ids] + 1.5 * torch.randn(num, centres.shape[1], generator=gen)
    return feats, ids


def best_time(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(num_q: int, num_g: int, num_ids: int) -> None:
    """Runs in a fresh process: peak RSS increase of one rank_metrics call."""
    gen = torch.Generator().manual_seed(1)
    dist = torch.rand(num_q, num_g, generator=gen)  # written in place: no temporary copy
    q_ids = torch.randint(0, num_ids, (num_q,), generator=gen)
    g_ids = torch.randint(0, num_ids, (num_g,), generator=gen)
    q_cams = torch.randint(0, 3, (num_q,), generator=gen)
    g_cams = torch.randint(0, 3, (num_g,), generator=gen)
    rss_before = proc_status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter to the current RSS
        method = "peak RSS reset after allocating the matrix"
    except OSError:
        method = "peak RSS since start (matrix built without temporaries)"
    hwm_before = proc_status_kb("VmHWM")
    t0 = time.perf_counter()
    res = rank_metrics(dist, q_ids, g_ids, q_cams, g_cams, protocol="market1501")
    elapsed = time.perf_counter() - t0
    hwm_after = proc_status_kb("VmHWM")
    # Conservative either way: an older, higher peak can only inflate the difference.
    peak_mb = (max(hwm_after, hwm_before) - rss_before) / 1024
    print(
        f"  distance matrix {num_q} x {num_g} fp32: {dist.numel() * 4 / 2**20:.0f} MB, "
        f"RSS before call {rss_before / 1024:.0f} MB, peak after {hwm_after / 1024:.0f} MB "
        f"({method})"
    )
    print(f"  rank_metrics: {elapsed:.2f} s, valid queries {res.num_valid_queries}, "
          f"mAP {res.mAP:.4f}")
    print(f"peak memory: {peak_mb:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--gallery", type=int, default=10000)
    parser.add_argument("--ids", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--polar-queries", type=int, default=4613)
    parser.add_argument("--polar-gallery", type=int, default=26500)
    parser.add_argument("--polar-ids", type=int, default=13,
                        help="identities at PolarBear size (few identities: ~2,000 true "
                             "matches per query, the heavy case)")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_child:
        memory_child(args.polar_queries, args.polar_gallery, args.polar_ids)
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, numpy {np.__version__}")
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(args.ids, 64, generator=gen)
    q_feats, q_ids = make_features(args.queries, centres, gen)
    g_feats, g_ids = make_features(args.gallery, centres, gen)
    q_cams = torch.randint(0, 3, (args.queries,), generator=gen)
    g_cams = torch.randint(0, 3, (args.gallery,), generator=gen)
    dist = distance_matrix(q_feats, g_feats)
    print(f"{args.queries} queries x {args.gallery} gallery, {args.ids} identities, 3 cameras, "
          f"market1501 protocol")

    dist_np = dist.numpy()
    args_np = (q_ids.numpy(), g_ids.numpy(), q_cams.numpy(), g_cams.numpy())
    t_numpy, ref = best_time(lambda: numpy_eval(dist_np, *args_np), args.repeats)
    print(f"  numpy per-query (torchreid-style): {t_numpy:.3f} s")

    def ours(backend: str = "auto"):
        return _rank_metrics(dist, q_ids, g_ids, q_cams, g_cams, protocol="market1501",
                             ranks=(1, 5, 10), chunk_size=1024, backend=backend)

    t_ours, res = best_time(
        lambda: rank_metrics(dist, q_ids, g_ids, q_cams, g_cams, protocol="market1501"),
        args.repeats,
    )
    print(f"  indivaid rank_metrics (bucket ranker): {t_ours:.3f} s")
    for backend in ("search", "sort"):
        t_alt, alt = best_time(lambda: ours(backend), 1)
        assert alt.as_dict() == res.as_dict(), (backend, alt, res)
        print(f"    alternative '{backend}' ranker: {t_alt:.3f} s")

    # numpy's default argsort orders tied distances arbitrarily (fp32 distances do tie), while
    # rank_metrics breaks ties by gallery index, so agreement is up to those ties.
    got = res.as_dict()
    diff = max(abs(got[k] - ref[k]) for k in ("rank1", "rank5", "rank10", "mAP", "mINP"))
    assert diff < 1e-4, (got, ref)
    print(f"  agree: rank1 {got['rank1']:.4f} vs {ref['rank1']:.4f}, mAP {got['mAP']:.5f} vs "
          f"{ref['mAP']:.5f}, mINP {got['mINP']:.5f} vs {ref['mINP']:.5f} "
          f"(max difference {diff:.1e})")

    print(f"PolarBear size: {args.polar_queries} x {args.polar_gallery}, {args.polar_ids} "
          f"identities (fresh subprocess)")
    child = subprocess.run(
        [sys.executable, __file__, "--memory-child",
         "--polar-queries", str(args.polar_queries),
         "--polar-gallery", str(args.polar_gallery),
         "--polar-ids", str(args.polar_ids)],
        capture_output=True, text=True, check=True, cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    print(child.stdout.rstrip())
    print(f"speed-up: {t_numpy / t_ours:.1f}x")


if __name__ == "__main__":
    main()
