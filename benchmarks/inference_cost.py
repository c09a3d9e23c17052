"""What inference costs on the hardware a field team has: CPU embedding and matching.

Run from the repository root:  python benchmarks/inference_cost.py [--quick]

1. Embedding: ViT-B/16 at 256 x 128 (random weights: the cost does not depend on them) and the
   tiny preset, each in eager torch (fp32, inference mode) and exported to ONNX Runtime (the
   graph ``python -m indivaid export`` writes), with 1 and 2 threads: throughput (img/s, batch
   ``--batch``) and batch-1 latency p50 / p95. The two runtimes are checked to agree first.
   Then the cost of decoding and resizing one 1920 x 1080 camera-trap JPEG, and from both the
   photos per hour a 2-core box embeds end to end.
2. Matching: one query, and 64 at once, against galleries of 1k, 10k, 100k and 1M embeddings
   (1,280-d float32, ViT-B/16's; 10 images per individual), with the chunked exact search ``match`` uses
   (``indivaid_field.matching.Gallery``). The gallery is a memory-mapped file, as a large catalogue
   would be, warm in the page cache; the reported peak is the search's own working memory (numpy
   allocations traced by tracemalloc, in a separate run), which stays bounded whatever the gallery
   size. "prepare" is the one-off pass that computes norms and the mean when a gallery is loaded.
   It runs in a child process with one BLAS thread (``BLAS_THREAD_VARIABLES``).

The last line is ``speed-up: N.Nx``: ONNX Runtime over eager torch, ViT-B/16, batch-1 latency
p50, each runtime at its better thread count (on a loaded machine torch's OpenMP threads can
spin against other processes and make 2 threads far slower than 1). Timings on a shared machine
vary: the load average is printed with each line.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from indivaid.export import EmbeddingGraph, export_graph  # noqa: E402
from indivaid.models.backbone import build_clip  # noqa: E402
from indivaid.models.encoders import ImageEncoder  # noqa: E402
from indivaid_field.matching import Gallery  # noqa: E402

MODELS = {"ViT-B/16": ("ViT-B-16", (256, 128)), "tiny": ("tiny", (48, 96))}
#: One query's search is a memory-bound matrix-vector product: more BLAS threads only add
#: synchronisation, and on a loaded machine they spin (10x slower with 2 threads here under load).
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f}"


def make_graph(backbone: str, size: tuple[int, int]) -> EmbeddingGraph:
    """The embedding graph of a random-weight model (inference feature of the image encoder)."""
    torch.manual_seed(0)
    clip = build_clip(backbone, None, size)
    return EmbeddingGraph(ImageEncoder(clip.visual)).eval()


def timed(fn: Callable[[], object], runs: int, warmup: int = 2) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return np.asarray(out)


def throughput(fn: Callable[[], object], batch: int, seconds: float) -> float:
    fn()
    n, t0 = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - t0 < seconds:
        fn()
        n += batch
    return n / (time.perf_counter() - t0)


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def embed_costs(name: str, graph: EmbeddingGraph, size: tuple[int, int], onnx_file: Path, args) -> dict:
    """Per runtime and thread count: img/s at ``args.batch``, and batch-1 latency p50 / p95 (ms)."""
    runs = args.latency_runs if name != "tiny" else 4 * args.latency_runs
    xb = torch.randn(args.batch, 3, *size)
    x1 = torch.randn(1, 3, *size)
    with torch.inference_mode():
        want = graph(xb)[0].numpy()
    got = ort_session(onnx_file, 2).run(["feature"], {"image": xb.numpy()})[0]
    print(f"  {name}: ONNX Runtime vs torch, max |diff| {np.abs(got - want).max():.1e} over {want.size} values")
    out = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        sess = ort_session(onnx_file, threads)

        def torch_run(x: torch.Tensor) -> Callable[[], object]:
            def run() -> object:
                with torch.inference_mode():
                    return graph(x)
            return run

        def ort_run(x: torch.Tensor, sess=sess) -> Callable[[], object]:
            arr = x.numpy()
            return lambda: sess.run(["embedding"], {"image": arr})

        for runtime, make in (("torch eager", torch_run), ("ONNX Runtime", ort_run)):
            rate = throughput(make(xb), args.batch, args.seconds)
            lat = timed(make(x1), runs) * 1000
            p50, p95 = np.percentile(lat, [50, 95])
            out[(runtime, threads)] = {"img_s": rate, "p50": p50, "p95": p95}
            print(f"  {name:8s} {runtime:13s} {threads} thread{'s' if threads > 1 else ' '}: {rate:8.1f} img/s "
                  f"(batch {args.batch})  batch-1 latency p50 {p50:7.1f} ms  p95 {p95:7.1f} ms   [{load()}]")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return out


def decode_cost(workdir: Path, size: tuple[int, int], runs: int) -> float:
    """Seconds to decode, and resize to the model input, one 1920 x 1080 camera-trap JPEG (1 thread)."""
    from PIL import Image

    from indivaid_field.model import ImageSize
    from indivaid_field.preprocess import load_image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (135, 240, 3), dtype=np.uint8)  # smooth-ish content, a realistic JPEG size
    img = Image.fromarray(base).resize((1920, 1080), Image.Resampling.BILINEAR)
    path = workdir / "camera_trap.jpg"
    img.save(path, quality=90)
    spec = ImageSize(size[0], size[1], "stretch")
    t = timed(lambda: load_image(str(path), (None,) * 4, spec), runs)
    return float(np.median(t))


def traced_peak(fn: Callable[[], object]) -> int:
    """Peak bytes numpy allocated during ``fn`` (traced on its own: tracing slows the search down)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def match_costs(workdir: Path, sizes: list[int], dim: int, per_identity: int, repeats: int) -> None:
    """Single-query exact search latency and working memory against memory-mapped galleries."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, dim)).astype(np.float32)
    qb = rng.standard_normal((64, dim)).astype(np.float32)  # a day's photos matched in one call
    biggest = max(sizes)
    file = workdir / "gallery.f32"
    t0 = time.perf_counter()
    store = np.lib.format.open_memmap(file, mode="w+", dtype=np.float32, shape=(biggest, dim))
    for s in range(0, biggest, 65536):
        block = rng.standard_normal((min(65536, biggest - s), dim), dtype=np.float32)
        store[s : s + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    store.flush()
    del store
    print(f"  wrote a {biggest:,} x {dim} float32 gallery ({file.stat().st_size / 2**30:.2f} GiB) in "
          f"{time.perf_counter() - t0:.0f} s")
    vectors = np.load(file, mmap_mode="r")
    for n in sizes:
        ids = [f"id{i // per_identity}" for i in range(n)]
        t0 = time.perf_counter()
        gallery = Gallery(vectors[:n], ids, "euclidean")
        prepare = time.perf_counter() - t0
        lat = timed(lambda g=gallery: g.search(q, 5), repeats, warmup=1) * 1000  # warm: a served catalogue is
        batch_s = float(timed(lambda g=gallery: g.search(qb, 5), 1, warmup=1)[0])
        peak, peak_b = (traced_peak(lambda g=gallery, x=x: g.search(x, 5)) for x in (q, qb))
        gib = n * dim * 4 / 2**30
        print(f"  gallery {n:>9,} ({n // per_identity:>7,} individuals, {gib:5.2f} GiB, prepare {prepare:4.1f} s): "
              f"1 query p50 {np.median(lat):7.1f} ms (max {lat.max():7.1f}), working memory {peak / 2**20:5.1f} MiB; "
              f"{len(qb)} queries at once {1000 * batch_s / len(qb):6.1f} ms each, {peak_b / 2**20:5.1f} MiB   "
              f"[{load()}]")
    del vectors
    file.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=4.0, help="per throughput measurement (at least one batch)")
    ap.add_argument("--latency-runs", type=int, default=10, help="batch-1 runs per latency (x4 for tiny)")
    ap.add_argument("--gallery-sizes", default="1000,10000,100000,1000000")
    ap.add_argument("--dim", type=int, default=1280, help="embedding size (ViT-B/16: 768 + 512)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: short timings, galleries up to 10k")
    ap.add_argument("--match-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.latency_runs, args.gallery_sizes = 1.0, 3, "1000,10000"
    if args.match_child:  # a fresh process, so that the BLAS thread count set in its environment holds
        match_costs(Path(args.workdir), [int(s) for s in args.gallery_sizes.split(",")], args.dim, 10,
                    3 if not args.quick else 2)
        return
    import onnxruntime

    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, numpy {np.__version__}, "
          f"{os.cpu_count()} CPUs: {cpu_name()}; {load()}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="inference-cost-") as tmp:
        work = Path(tmp)
        print("embedding (random weights, fp32)")
        for name, (backbone, size) in MODELS.items():
            graph = make_graph(backbone, size)
            t0 = time.perf_counter()
            onnx_file = export_graph(graph, size, work / f"{backbone}.onnx")
            print(f"  {name}: exported to ONNX in {time.perf_counter() - t0:.0f} s "
                  f"({onnx_file.stat().st_size / 2**20:.0f} MiB)")
            results[name] = embed_costs(name, graph, size, onnx_file, args)
            del graph
        decode = decode_cost(work, MODELS["ViT-B/16"][1], 20)
        vit = results["ViT-B/16"]
        best = max(v["img_s"] for v in vit.values())  # the 2-core box runs whichever is faster
        per_photo = decode + 1 / best
        print(f"decoding + resizing one 1920 x 1080 JPEG (draft mode, 1 thread): {1000 * decode:.1f} ms")
        print(f"photos per hour, 2-core box, ViT-B/16 (best runtime and thread count): {3600 * best:,.0f} model "
              f"only; {3600 / per_photo:,.0f} end to end (decode, then embed in batches of {args.batch}, in turn)")
        print("matching (one query, exact chunked search, euclidean on L2-normalised vectors, 1 BLAS thread)")
        child = subprocess.run(
            [sys.executable, __file__, "--match-child", "--gallery-sizes", args.gallery_sizes, "--dim", str(args.dim),
             "--workdir", str(work)] + (["--quick"] if args.quick else []),
            capture_output=True, text=True, check=True, cwd=REPO_ROOT,
            env={**os.environ, **dict.fromkeys(BLAS_THREAD_VARIABLES, "1")})
        print(child.stdout.rstrip())
    (t, t_threads), (o, o_threads) = (min((vit[(rt, n)]["p50"], n) for n in (1, 2))
                                      for rt in ("torch eager", "ONNX Runtime"))
    print(f"ViT-B/16 batch-1 latency p50, each at its better thread count: torch eager {t:.1f} ms "
          f"({t_threads} thread{'s' * (t_threads > 1)}), ONNX Runtime {o:.1f} ms ({o_threads} thread{'s' * (o_threads > 1)})")
    print(f"speed-up: {t / o:.1f}x")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
