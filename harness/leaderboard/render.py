"""The board as text: the rich terminal table, GitHub markdown, CSV, JSON and one self-contained
HTML page, with the legend that says what the marks and statistics mean; under it, where final runs
were scored by the robustness suite, the robustness table."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

from harness.leaderboard.common import (ALPHA, DASH, FALLBACK_MARK, LABELS, METRICS, MIN_PAIRS, N_BOOT, OPENSET_DELTA,
                                        OPENSET_METRICS, REFERENCE, RNG_SEED, ROBUST, SOURCE_TEST, SOURCE_VAL,
                                        label_dataset, label_method, num)
from harness.leaderboard.stats import OPENSET_SUFFIX, ROBUST_SUFFIX, has_openset, has_robustness
from harness.results import ROBUST_CORRUPTIONS


def fmt_metric(mean: Any, std: Any) -> str:
    """'63.0 ± 3.0' (percent, 1 decimal); the mean alone when there is no std (n = 1); '—' when missing."""
    mean, std = num(mean), num(std)
    if mean is None:
        return DASH
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def fmt_p(p: Any) -> str:
    p = num(p)
    return DASH if p is None else ("<0.001" if p < 0.001 else f"{p:.3f}")


def fmt_delta(delta: Any, test: str | None) -> str:
    delta = num(delta)
    if delta is None:
        return DASH
    return f"{delta:+.1f}" + (f" {test}" if test in ("*", "n.s.", "n/a") else "")


def shown_metrics(board: pl.DataFrame) -> tuple[str, ...]:
    """The closed-set metrics, and the open-set ones where any run has them."""
    return METRICS + (OPENSET_METRICS if has_openset(board) else ())


def second_delta(board: pl.DataFrame) -> bool:
    """Whether the table shows the open-set score's own Δ column beside the chosen metric's."""
    metric = board["metric"].drop_nulls().first() or "mAP"
    return has_openset(board) and metric != OPENSET_DELTA


def display_rows(board: pl.DataFrame, with_sweep: bool) -> tuple[list[str], list[list[str]]]:
    """Header and string cells of the results table, shared by the markdown, rich and HTML renderers."""
    metric = board["metric"].drop_nulls().first() or "mAP"
    shown, second = shown_metrics(board), second_delta(board)
    x = OPENSET_SUFFIX
    header = ["Dataset", "Method", "Source", "n", *(LABELS[m] for m in shown),
              f"Δ {LABELS[metric]} vs {ref_label(board)} (pp)", "p (Holm)",
              *([f"Δ {LABELS[OPENSET_DELTA]} vs {ref_label(board)} (pp)", f"p (Holm) {LABELS[OPENSET_DELTA]}"] if second else []),
              "Best config", "Trials", "Errors", "GPU-h", "img/s"]
    if with_sweep:
        header.insert(0, "Sweep")
    rows = []
    for r in board.iter_rows(named=True):
        empty = r["source"] is None
        method = label_method(r["method"]) + (f" {FALLBACK_MARK}" if r["source"] == SOURCE_VAL else "")
        mean = r["kind"] == "mean"
        cells = [
            "mean" if mean else label_dataset(r["dataset"]), method, r["source"] or DASH,
            DASH if r["n"] is None else str(r["n"]),
            *(fmt_metric(r[f"{m}_mean"], r[f"{m}_std"]) for m in shown),
            "ref" if r["test"] == "ref" else fmt_delta(r["delta"], r["test"]), fmt_p(r["p_holm"]),
            *(["ref" if r[f"test{x}"] == "ref" else fmt_delta(r[f"delta{x}"], r[f"test{x}"]), fmt_p(r[f"p_holm{x}"])]
              if second else []),
            r["best_config"] or DASH,
            DASH if mean or r["trials"] is None else str(r["trials"]),
            DASH if mean or r["errors"] is None else str(r["errors"]),
            DASH if empty or r["gpu_hours"] is None else f"{r['gpu_hours']:.2f}",
            DASH if empty or num(r["images_per_s"]) is None else f"{r['images_per_s']:.0f}",
        ]
        if with_sweep:
            cells.insert(0, r["sweep_id"] or DASH)
        rows.append(cells)
    return header, rows


ROBUSTNESS_TITLE = "Robustness to corrupted queries"


def robustness_rows(board: pl.DataFrame, with_sweep: bool) -> tuple[list[str], list[list[str]]]:
    """Header and string cells of the robustness table: the dataset x method rows whose final runs
    were scored by the suite, their relative robustness and its Δ vs the reference with its test."""
    x = ROBUST_SUFFIX
    header = ["Dataset", "Method", "n", "Test mAP", "Relative robustness", f"Δ vs {ref_label(board)} (pp)", "p (Holm)"]
    if with_sweep:
        header.insert(0, "Sweep")
    rows = []
    for r in board.filter((pl.col("kind") == "result") & pl.col(f"{ROBUST}_mean").is_not_null()).iter_rows(named=True):
        cells = [label_dataset(r["dataset"]), label_method(r["method"]), str(r["n_robust"]),
                 fmt_metric(r["mAP_mean"], r["mAP_std"]), fmt_metric(r[f"{ROBUST}_mean"], r[f"{ROBUST}_std"]),
                 "ref" if r[f"test{x}"] == "ref" else fmt_delta(r[f"delta{x}"], r[f"test{x}"]), fmt_p(r[f"p_holm{x}"])]
        if with_sweep:
            cells.insert(0, r["sweep_id"] or DASH)
        rows.append(cells)
    return header, rows


def robustness_legend(ref: str) -> list[str]:
    """What the robustness table's numbers mean (markdown; the HTML renderer reuses it)."""
    return [
        "Relative robustness (sweeps with `final: {robustness: true}`): a final model's test mAP with its "
        "queries corrupted (gallery clean) divided by its clean test mAP, averaged over the "
        f"{len(ROBUST_CORRUPTIONS)} corruptions of `python -m indivaid robustness` ({', '.join(ROBUST_CORRUPTIONS)}) "
        "at each of their severities; percent (100 = unaffected), mean ± std over the n final runs scored. "
        "Test mAP: the final runs' clean test mAP, as in the table above.",
        f"Δ: relative robustness minus {ref}'s, in points, paired over seeds and tested like the table above "
        "(paired bootstrap, Holm per method across datasets). Per-corruption figures: the "
        "`robust_<corruption>_rel_mAP` columns of trials.parquet, and each run's `run/robustness.json` and .png.",
    ]


def _fmt_published(v: float | None) -> str:
    """As printed in the paper: two decimals, or one when the second is 0 (52.54, 90.0)."""
    if v is None:
        return DASH
    text = f"{v:.2f}"
    return text[:-1] if text.endswith("0") else text


def published_display_rows(published: pl.DataFrame) -> tuple[list[str], list[list[str]]]:
    header = ["Dataset", "Method", *(LABELS[m] for m in METRICS), "Note", "Citation"]
    rows = [[label_dataset(r["dataset"]), label_method(r["method"]),
             *(_fmt_published(r[f"{m}_mean"]) for m in METRICS),
             r["note"] or "", r["citation"] or ""] for r in published.iter_rows(named=True)]
    return header, rows


def ref_label(board: pl.DataFrame) -> str:
    """The label of the method every Δ is against (CLIP-ReID unless the board chose another)."""
    ref = board["reference"].drop_nulls().first() if "reference" in board.columns else None
    return label_method(ref or REFERENCE)


def legend_lines(metric: str, openset: bool = False, ref: str = "CLIP-ReID") -> list[str]:
    """What the marks, n and the statistics mean (markdown; the HTML and rich renderers reuse it)."""
    lab = LABELS[metric]
    extra = [
        "Open set (runs whose splits hold out unknown individuals): BAKS = balanced accuracy on known "
        "individuals (top-1 right and accepted as known), BAUS = balanced accuracy on unknown ones (rejected "
        "as new), both averaged per individual at the KNOWN/NEW threshold calibrated on validation; GM = "
        "sqrt(BAKS · BAUS), AnimalCLEF 2025's ranking score; AUROC of known vs new from the top-1 distance. "
        f"Δ {LABELS[OPENSET_DELTA]} is tested like {lab}.",
    ] if openset else []
    few, more = (math.comb(2 * n - 1, n) for n in (MIN_PAIRS - 2, MIN_PAIRS - 1))  # distinct resamples of n pairs
    return [
        "Metrics: percent; mean ± sample std (ddof = 1) over the final runs, i.e. the best searched config "
        "re-run with n seeds and scored on the test split; one number when n = 1. "
        f"{DASH} = no result (method not run, or every trial failed).",
        f"{FALLBACK_MARK} selected on validation: no completed final run, so the row shows the search trial with "
        "the best validation mAP and its validation metrics (source `val (best search trial)`); never tested.",
        f"Δ: {lab} minus {ref}'s on the same dataset, in percentage points, averaged over the seeds both "
        "ran (for a method without training, such as zero-shot CLIP, or without a shared seed: the difference "
        "of the means, not tested).",
        f"Test: paired bootstrap over seeds, B = {N_BOOT:,} resamples of the seed pairs (RNG seed {RNG_SEED}), "
        "two-sided p = 2·min((1 + #{Δ* ≤ 0}), (1 + #{Δ* ≥ 0})) / (B + 1), capped at 1; Holm-corrected per "
        f"method across datasets; `*` = significant at α = {ALPHA} after Holm, `n.s.` = not significant, "
        f"`n/a` = not tested (fewer than {MIN_PAIRS} paired seeds, no training, or different splits). "
        f"The test needs {MIN_PAIRS} paired seeds because the bootstrap of fewer is degenerate: too few "
        f"distinct resamples ({few} for {MIN_PAIRS - 2} seeds, {more} for {MIN_PAIRS - 1}), so differences "
        "of one sign put every resample on one side of 0 and p at its floor 2/(B + 1) whatever their size; "
        f"with fewer seeds Δ is the mean paired difference, not tested. Even with {MIN_PAIRS} seeds the "
        "bootstrap is optimistic: differences of one sign still give p = 2/(B + 1).",
        f"mean rows: the unweighted mean over the datasets where the method and {ref} both have test "
        "results (shown with two or more datasets; not tested).",
        "Trials: every trial of the dataset × method (search and final, including ASHA-stopped and failed); "
        "Errors: failed trials; GPU-h: sum of gpu_s / 3600; img/s: mean training throughput of the trials "
        "that report it.",
        "Published: numbers from the papers (harness/published.csv), context only: other splits and, for "
        "Stoat, a protocol that counts the self-match. Unknown cells are left empty, never derived.",
        *extra,
    ]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in row] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in esc])


def _sweeps_line(sweeps: pl.DataFrame | None) -> str:
    if sweeps is None or not sweeps.height:
        return ""
    parts = []
    for s in sweeps.iter_rows(named=True):
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(s["written_at"]))
        commit = f", commit {s['git_commit'][:7]}" if s["git_commit"] else ""
        parts.append(f"`{s['sweep_id']}` ({when}{commit})")
    return "Sweeps: " + "; ".join(parts) + "."


def render_markdown(board: pl.DataFrame, published: pl.DataFrame | None = None, sweeps: pl.DataFrame | None = None,
                    plots: Sequence[str] = (), with_sweep: bool = False) -> str:
    """GitHub markdown: the table, the legend, the published rows and links to the plot files."""
    metric = board["metric"].drop_nulls().first() or "mAP"
    out = ["# Leaderboard", ""]
    line = _sweeps_line(sweeps)
    if line:
        out += [line, ""]
    out += [_md_table(*display_rows(board, with_sweep)), ""]
    out += [f"- {x}" for x in legend_lines(metric, has_openset(board), ref_label(board))] + [""]
    if has_robustness(board):
        out += [f"## {ROBUSTNESS_TITLE}", "", _md_table(*robustness_rows(board, with_sweep)), ""]
        out += [f"- {x}" for x in robustness_legend(ref_label(board))] + [""]
    if published is not None and published.height:
        out += ["## Published numbers (context, not like-for-like)", "",
                _md_table(*published_display_rows(published)), ""]
    if plots:
        out += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    return "\n".join(out)


def render_rich(board: pl.DataFrame, published: pl.DataFrame | None = None, with_sweep: bool = False,
                width: int | None = None) -> str:
    """The terminal table (rich), as text (coloured when stdout is a terminal and no width is forced).

    Numbers never wrap; sources are abbreviated; on terminals narrower than 220 columns the costs
    and best configs go to a second table under the metrics.
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from indivaid.utils.console import OFF_TERMINAL_WIDTH, terminal_columns

    metric = board["metric"].drop_nulls().first() or "mAP"
    header, rows = display_rows(board, with_sweep)
    tty = width is None and sys.stdout.isatty()
    natural = width is None and terminal_columns() is None  # a log or a pipe: one line per row, nothing folded
    width = width or terminal_columns() or OFF_TERMINAL_WIDTH
    src = header.index("Source")
    short = {SOURCE_TEST: "test", SOURCE_VAL: "val"}
    records = list(board.iter_rows(named=True))
    metric_idx = [header.index(LABELS[m]) for m in shown_metrics(board)]
    for r, cells in zip(records, rows):
        cells[src] = short.get(r["source"], cells[src].replace(" datasets (test)", "").replace(" dataset (test)", ""))
        for i in metric_idx:
            cells[i] = cells[i].replace(" ± ", "±")  # compact: the metrics table must fit ~150 columns
    key_cols = [h for h in header if h in ("Sweep", "Dataset", "Method")]
    cost_cols = ["Best config", "Trials", "Errors", "GPU-h", "img/s"]
    metric_cols = [h for h in header if h not in cost_cols]
    groups = [header] if width >= 220 else [metric_cols, key_cols + cost_cols]
    numeric = {"n", *(LABELS[m] for m in shown_metrics(board)), "Trials", "Errors", "GPU-h", "img/s"}
    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=tty)
    for k, cols in enumerate(groups):
        title = (f"Leaderboard (percent; Δ {LABELS[metric]} vs {ref_label(board)} in points)" if k == 0
                 else "Cost and best config")
        table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1))
        idx = [header.index(h) for h in cols]
        for i in idx:
            h = header[i]
            num = h in numeric or h.startswith(("Δ", "p (Holm)"))
            longest = max([len(c[i]) for c in rows] + [len(h)])
            table.add_column(h.split(" vs ")[0] if h.startswith("Δ") else h, justify="right" if num else "left",
                             no_wrap=num, overflow="fold", min_width=min(longest, 24) if not num else None,
                             max_width=44 if h == "Best config" and not natural else None)
        for r, cells in zip(records, rows):
            table.add_row(*(cells[i] for i in idx),
                          style="dim" if r["source"] is None else ("bold" if r["kind"] == "mean" else None))
        console.print(table)
    console.print(f"{FALLBACK_MARK} val = selected on validation (best search trial, no final run); * / n.s. = "
                  f"significant or not at α = {ALPHA} (paired bootstrap over seeds, Holm across datasets); "
                  f"n/a = not tested (e.g. fewer than {MIN_PAIRS} paired seeds). Full legend in leaderboard.md.")
    if has_robustness(board):
        rh, rrows = robustness_rows(board, with_sweep)
        rt = Table(title=f"{ROBUSTNESS_TITLE} (relative mAP, percent; Δ vs {ref_label(board)} in points)",
                   box=box.SIMPLE_HEAD, padding=(0, 1))
        for h in rh:
            right = h not in ("Sweep", "Dataset", "Method")
            rt.add_column(h.split(" vs ")[0] if h.startswith("Δ") else h, justify="right" if right else "left",
                          no_wrap=right)
        for cells in rrows:
            rt.add_row(*cells)
        console.print(rt)
    if published is not None and published.height:
        ph, prows = published_display_rows(published)
        pt = Table(title="Published numbers (context, not like-for-like)", box=box.SIMPLE_HEAD)
        for h in ph:
            pt.add_column(h, overflow="fold", max_width=60 if h in ("Note", "Citation") and not natural else None)
        for cells in prows:
            pt.add_row(*cells)
        console.print(pt)
    return buf.getvalue()


def render_csv(table: pl.DataFrame) -> str:
    """One row per dataset x method (plus mean and published rows, see ``kind``); metrics in percent."""
    return table.write_csv()


def render_json(table: pl.DataFrame) -> str:
    """The CSV's records as a JSON list (NaN written as null)."""
    records = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
               for r in table.iter_rows(named=True)]
    return json.dumps(records, indent=2, ensure_ascii=False) + "\n"


def _html_list(lines: list[str]) -> str:
    """Legend lines (markdown) as an HTML list, code marks dropped."""
    return "<ul>" + "".join(f"<li>{html.escape(x.replace('`', ''))}</li>" for x in lines) + "</ul>"


def render_html(board: pl.DataFrame, published: pl.DataFrame | None = None, sweeps: pl.DataFrame | None = None,
                plots: dict[str, bytes] | None = None, with_sweep: bool = False) -> str:
    """One self-contained HTML file: table, legend, published rows, plots as base64 data URIs."""
    metric = board["metric"].drop_nulls().first() or "mAP"

    def table(header: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join(f"<tr class=\"{(classes or [''] * len(rows))[i]}\">" +
                       "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for i, row in enumerate(rows))
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    header, rows = display_rows(board, with_sweep)
    classes = ["mean" if r["kind"] == "mean" else ("empty" if r["source"] is None else "")
               for r in board.iter_rows(named=True)]
    parts = [
        "<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Leaderboard</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:110em}"
        "table{border-collapse:collapse;font-size:0.9em;margin:1em 0}"
        "th,td{border:1px solid #ccc;padding:0.3em 0.6em;text-align:left;vertical-align:top}"
        "th{background:#f3f3f3}tr.mean td{font-weight:bold}tr.empty td{color:#999}"
        "img{max-width:100%;display:block;margin:1em 0}li{margin:0.3em 0}</style></head><body>",
        "<h1>Leaderboard</h1>",
    ]
    line = _sweeps_line(sweeps)
    if line:
        parts.append(f"<p>{html.escape(line.replace('`', ''))}</p>")
    parts.append(table(header, rows, classes))
    parts.append(_html_list(legend_lines(metric, has_openset(board), ref_label(board))))
    if has_robustness(board):
        parts += [f"<h2>{ROBUSTNESS_TITLE}</h2>", table(*robustness_rows(board, with_sweep)),
                  _html_list(robustness_legend(ref_label(board)))]
    if published is not None and published.height:
        parts += ["<h2>Published numbers (context, not like-for-like)</h2>", table(*published_display_rows(published))]
    if plots:
        parts.append("<h2>Plots</h2>")
        for name, png in plots.items():
            data = base64.b64encode(png).decode("ascii")
            parts.append(f"<figure><img alt=\"{html.escape(name)}\" src=\"data:image/png;base64,{data}\">"
                         f"<figcaption>{html.escape(name)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"

