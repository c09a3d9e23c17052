"""``python -m harness.leaderboard``: one leaderboard from the sweeps' ``trials.parquet`` files.

Per dataset x method: the final runs (best searched config, several seeds, scored on test) as mean
± sample std of Rank-1/5/10, mAP and mINP; the difference to CLIP-ReID on the same dataset with a
paired bootstrap over seeds when both ran at least 5 of the same seeds (fewer: Δ shown, not tested),
Holm-corrected per method across datasets; what it cost (trials, failures, GPU-hours,
images/s). A dataset x method without final runs falls back to its best search trial, selected and
scored on validation (marked †, never tested). Final runs scored by the robustness suite
(``final: {robustness: true}``) get a robustness table: relative robustness (corrupted / clean
mAP) as mean ± std over seeds, and its Δ to CLIP-ReID tested in the same way. Published numbers
from ``harness/published.csv`` are shown beside, as context. Plots: the metric per dataset and
method, hyperparameter importance and a parallel-coordinates view of the search.

Runs on a laptop with results copied from a cluster: polars, numpy, matplotlib (Agg) and rich;
no Ray, no torch at import time.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from harness.leaderboard.common import ALL_METRICS, ALPHA, LABELS, MIN_PAIRS, N_BOOT, RNG_SEED, LeaderboardError
from harness.leaderboard.load import load_results, select_newest
from harness.leaderboard.plots import render_plots
from harness.leaderboard.published import load_published, published_rows
from harness.leaderboard.render import render_csv, render_html, render_json, render_markdown, render_rich
from harness.leaderboard.stats import aggregate, full_table
from harness.storage import is_uri
from indivaid.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)


def report_dir(dirs: Sequence[str | Path], given: bool) -> Path:
    """Where leaderboard.md/.csv and the plots go: the results folder (the first given dir, or its
    parent when it is itself a sweep folder); results/ by default, and when the first is a URI
    (report files are written here, not into an object store)."""
    if not given or is_uri(str(dirs[0])):
        return Path("results")
    first = Path(dirs[0])
    return first.parent if (first / "trials.parquet").is_file() else first


def _metric_arg(text: str) -> str:
    norm = text.replace("-", "").replace("_", "").lower()
    for m in ALL_METRICS:
        if norm in (m.lower(), LABELS[m].replace("-", "").lower(), m.lower().replace("rank", "r")):
            return m
    raise argparse.ArgumentTypeError(f"unknown metric {text!r} (choose from {', '.join(LABELS.values())})")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m harness.leaderboard", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[1],
        epilog="\n\n".join(textwrap.fill(t, 100, break_on_hyphens=False) for t in (
            "Files: leaderboard.md, leaderboard.csv and the plots (leaderboard-<metric>.png, "
            "leaderboard-importance.png, leaderboard-parallel.png) go to --report-dir; by default to the results "
            "folder: results/ when no RESULTS_DIR is given, else the first RESULTS_DIR, or its parent when it is "
            "itself a sweep folder. --out PATH writes the chosen --format to PATH; without it the format is printed.",
            "Several sweeps of one dataset x method: the newest (manifest started_at) wins; --all keeps each.",
            "CSV/JSON: one record per dataset x method (kind=result), per-method means (kind=mean) and the "
            "published rows shown (kind=published); metrics in percent, delta in percentage points, p and "
            "p_holm as probabilities.",
            f"Statistics: paired bootstrap over seeds (B = {N_BOOT:,}, RNG seed {RNG_SEED}), two-sided p, "
            f"only with at least {MIN_PAIRS} paired seeds (fewer: Δ shown, not tested), Holm across datasets "
            f"per method, alpha = {ALPHA}. Exit status 2 on bad input.")))
    ap.add_argument("dirs", nargs="*", metavar="RESULTS_DIR",
                    help="results folders to search for sweeps (or sweep folders), local or a URI such as "
                         "s3://bucket/prefix?endpoint_override=HOST:PORT&scheme=http; default: results/")
    ap.add_argument("--format", choices=("rich", "markdown", "csv", "json", "html"), default="rich",
                    help="what to print or write to --out (default: a rich table)")
    ap.add_argument("--out", type=Path, metavar="PATH", help="write --format to PATH instead of printing it")
    ap.add_argument("--metric", type=_metric_arg, default="mAP",
                    help="metric for Δ, its test and the bar plot: mAP (default), mINP, Rank-1, Rank-5, Rank-10; "
                         "open-set sweeps also GM, BAKS, BAUS, AUROC (GM always gets its own Δ column)")
    ap.add_argument("--reference", default="clipreid", metavar="METHOD",
                    help="the method every Δ and test is against (default clipreid; e.g. indivaid-mean for "
                         "the fusion ablation: sweeps/ablation-cpu.yaml)")
    ap.add_argument("--all", action="store_true",
                    help="keep every sweep as its own rows (labelled by sweep id) instead of the newest per "
                         "dataset x method")
    ap.add_argument("--published", choices=("matching", "all", "none"), default="matching",
                    help="published reference rows: for datasets in the results (default), all, or none")
    ap.add_argument("--report-dir", type=Path, metavar="DIR", help="where leaderboard.md/.csv and the plots go")
    ap.add_argument("--no-report", action="store_true", help="write no leaderboard.md/.csv/plots")
    ap.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return ap


def _write(path: Path, data: str | bytes) -> None:
    """Write atomically (a reader never sees half a file); a failure is one clear error line."""
    try:
        atomic_write_bytes(path, data.encode() if isinstance(data, str) else data)
    except OSError as e:
        raise LeaderboardError(f"cannot write {path}: {e.strerror or e}") from None
    log.info("wrote %s", path)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    dirs: list[str | Path] = [d if is_uri(d) else Path(d) for d in args.dirs] or [Path("results")]
    try:
        loaded = load_results(dirs)
        trials = loaded.trials if args.all else select_newest(loaded.trials)
        board = aggregate(trials, args.metric, keep_all=args.all, reference=args.reference)
        datasets = board.filter(pl.col("kind") == "result")["dataset"].unique().to_list()
        published = published_rows(load_published(), datasets, args.published)
        with_sweep = args.all or board["sweep_id"].drop_nulls().n_unique() > 1
        sweeps = loaded.sweeps.filter(pl.col("sweep_id").is_in(board["sweep_id"].drop_nulls().to_list()))
        table = full_table(board, published)
        want_plots = not args.no_report or args.format == "html"
        plots = render_plots(board, trials, args.metric, keep_all=args.all) if want_plots else {}
        where = args.report_dir or report_dir(dirs, bool(args.dirs))
        if not args.no_report:
            for name, png in plots.items():
                _write(where / name, png)
            _write(where / "leaderboard.md", render_markdown(board, published, sweeps, list(plots), with_sweep))
            _write(where / "leaderboard.csv", render_csv(table))
        if args.format == "rich":
            text = render_rich(board, published, with_sweep, width=200 if args.out else None)
        elif args.format == "markdown":
            base = args.out.parent if args.out else Path.cwd()  # plot links relative to where the text lands
            links = [] if args.no_report else [os.path.relpath(where / n, base) for n in plots]
            text = render_markdown(board, published, sweeps, links, with_sweep)
        elif args.format == "csv":
            text = render_csv(table)
        elif args.format == "json":
            text = render_json(table)
        else:
            text = render_html(board, published, sweeps, plots, with_sweep)
        if args.out:
            _write(args.out, text)
        else:
            sys.stdout.write(text)
    except LeaderboardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

