"""The leaderboard's plots (matplotlib's Agg canvas through Figure objects: headless, no pyplot
global state): the metric per dataset and method, hyperparameter importance, and the search
trials in parallel coordinates."""

from __future__ import annotations

import io
import logging
import math
from typing import Any

import numpy as np
import polars as pl

from harness.leaderboard.common import (FALLBACK_MARK, LABELS, METHOD_ORDER, SOURCE_VAL, fmt_value, label_dataset,
                                        label_method, method_rank, num)
from harness.leaderboard.load import with_scope
from harness.results import param_columns

log = logging.getLogger(__name__)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _colour(method: str) -> str:
    """One colour per method across all plots (matplotlib's default cycle, by METHOD_ORDER)."""
    i = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER) + sum(map(ord, method)) % 4
    return f"C{i}"


def _panel_key(scope: str, dataset: str) -> str:
    return label_dataset(dataset) + (f"\n({scope})" if scope else "")


def plot_metric_bars(board: pl.DataFrame, metric: str) -> bytes | None:
    """Per dataset, one bar per method: mean of the metric with the std as error bar; hatched = † (val)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = board.filter((pl.col("kind") == "result") & pl.col(f"{metric}_mean").is_not_null())
    if not rows.height:
        log.info("plot %s bars skipped: no dataset x method has a %s", metric, metric)
        return None
    groups = rows.select("_scope", "dataset").unique(maintain_order=True).rows()
    methods = rows.sort(method_rank(), "method")["method"].unique(maintain_order=True).to_list()
    width = 0.8 / len(methods)
    fig = Figure(figsize=(max(6.0, 1.5 + len(groups) * (0.6 + 0.45 * len(methods))), 4.5))
    ax = fig.add_subplot()
    by_key = {(r["_scope"], r["dataset"], r["method"]): r for r in rows.iter_rows(named=True)}
    top = 0.0
    for j, m in enumerate(methods):
        xs, ys, errs, hatches = [], [], [], []
        for i, (scope, d) in enumerate(groups):
            r = by_key.get((scope, d, m))
            if r is None:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(r[f"{metric}_mean"])
            std = num(r[f"{metric}_std"])
            errs.append(math.nan if std is None else std)  # NaN: no error bar (one run)
            hatches.append("//" if r["source"] == SOURCE_VAL else "")
            top = max(top, ys[-1] + (std or 0.0))
        bars = ax.bar(xs, ys, width * 0.92, yerr=errs, capsize=3, color=_colour(m),
                      error_kw={"elinewidth": 1, "ecolor": "0.2"})
        for bar, h in zip(bars, hatches):
            bar.set_hatch(h)
    ax.set_xticks(range(len(groups)), [_panel_key(s, d) for s, d in groups])
    ax.set_ylabel(f"{LABELS[metric]} (%)")
    ax.set_ylim(0, min(100.0, top * 1.15 + 1))
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(f"{LABELS[metric]} per dataset and method (mean ± std over seeds; test split)")
    handles = [Patch(color=_colour(m), label=label_method(m)) for m in methods]  # plain: a hatched first bar
    if (rows["source"] == SOURCE_VAL).any():                                       # must not set the swatch
        handles.append(Patch(facecolor="white", edgecolor="0.3", hatch="//",
                             label=f"{FALLBACK_MARK} val (best search trial)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _png(fig)


def _search_trials(trials: pl.DataFrame) -> pl.DataFrame:
    """Search trials that produced a validation score: completed and ASHA-stopped ones."""
    return trials.filter((pl.col("phase") == "search") & pl.col("status").is_in(["completed", "stopped"])
                         & pl.col("best_val_mAP").is_not_null())


def hyperparameter_importance(trials: pl.DataFrame) -> pl.DataFrame:
    """|Spearman ρ| between each numeric parameter and best_val_mAP over the completed + ASHA-stopped
    search trials, per (sweep,) dataset x method: a simple, honest importance (monotone association
    only; with few trials it is noisy, so n is kept). Parameters constant over the trials are left out."""
    search = _search_trials(trials if "_scope" in trials.columns else with_scope(trials, False))
    numeric = [p for p in param_columns(search) if search[p].dtype.is_numeric()]
    if not search.height or not numeric:
        return pl.DataFrame(schema={"_scope": pl.String, "dataset": pl.String, "method": pl.String,
                                    "param": pl.String, "importance": pl.Float64, "n": pl.UInt32})
    long = (search.select("_scope", "dataset", "method", "best_val_mAP", *[pl.col(p).cast(pl.Float64) for p in numeric])
            .unpivot(index=["_scope", "dataset", "method", "best_val_mAP"], on=numeric, variable_name="param",
                     value_name="value")
            .drop_nulls("value"))
    return (long.group_by("_scope", "dataset", "method", "param")
            .agg(pl.corr("value", "best_val_mAP", method="spearman").abs().alias("importance"),
                 pl.len().alias("n"), pl.col("value").n_unique().alias("distinct"))
            .filter((pl.col("n") >= 3) & (pl.col("distinct") >= 2) & pl.col("importance").is_not_nan())
            .with_columns(pl.col("param").str.strip_prefix("param."))
            .sort("_scope", "dataset", method_rank(), "param").drop("distinct"))


def plot_importance(trials: pl.DataFrame) -> bytes | None:
    """One panel per dataset: horizontal bars of |Spearman ρ| per parameter, one colour per method."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    imp = hyperparameter_importance(trials)
    if not imp.height:
        log.info("importance plot skipped: no numeric parameter varies over >= 3 completed/stopped search trials")
        return None
    panels = imp.select("_scope", "dataset").unique(maintain_order=True).rows()
    methods = imp.sort(method_rank(), "method")["method"].unique(maintain_order=True).to_list()
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    n_params = imp["param"].n_unique()
    fig = Figure(figsize=(5.2 * ncols + 1.5, max(3.0, 0.45 * n_params * len(methods) / 1.5 + 1.6) * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    height = 0.8 / len(methods)
    for k, (scope, d) in enumerate(panels):
        ax = axes[k // ncols][k % ncols]
        sub = imp.filter((pl.col("_scope") == scope) & (pl.col("dataset") == d))
        params = sorted(sub["param"].unique().to_list())
        for j, m in enumerate(methods):
            s = sub.filter(pl.col("method") == m)
            if not s.height:
                continue
            pos = {p: i for i, p in enumerate(params)}
            ys = [pos[p] - 0.4 + height * (j + 0.5) for p in s["param"]]
            ax.barh(ys, s["importance"].to_list(), height * 0.9, color=_colour(m), label=label_method(m))
        counts = sub.group_by("method").agg(pl.col("n").max()).sort(method_rank(), "method")
        ax.set_yticks(range(len(params)), params)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("|Spearman ρ| with best val mAP")
        ax.set_title(_panel_key(scope, d).replace("\n", " ") + "\ntrials: " +
                     ", ".join(f"{label_method(m)} {n}" for m, n in counts.iter_rows()), fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    for k in range(len(panels), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    fig.suptitle("Hyperparameter importance: |Spearman rank correlation| between each parameter and best val mAP\n"
                 "over the completed + ASHA-stopped search trials of each dataset x method (few trials: noisy)",
                 fontsize=10)
    handles = [Patch(color=_colour(m), label=label_method(m)) for m in methods]
    fig.legend(handles=handles, loc="lower center", ncols=len(methods), frameon=False, bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _png(fig)


def _normalise(values: list[Any]) -> tuple[list[float], str, str, bool]:
    """Values -> [0, 1] for one parallel axis: numbers min-max (log10 first when all positive and
    spanning at least a decade), categories evenly spaced in sorted order. Also the end labels."""
    present = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        lo, hi = min(present), max(present)
        log_scale = lo > 0 and hi / lo >= 10
        f = (lambda v: math.log10(v)) if log_scale else (lambda v: float(v))
        a, b = f(lo), f(hi)
        out = [math.nan if v is None or (isinstance(v, float) and math.isnan(v))
               else (0.5 if b == a else (f(v) - a) / (b - a)) for v in values]
        return out, fmt_value(float(lo)), fmt_value(float(hi)), log_scale
    cats = sorted({str(v) for v in present})
    pos = {c: (i / (len(cats) - 1) if len(cats) > 1 else 0.5) for i, c in enumerate(cats)}
    ys = [math.nan if v is None else pos[str(v)] for v in values]
    return ys, (cats[0] if cats else ""), (cats[-1] if cats else ""), False


def plot_parallel(trials: pl.DataFrame) -> bytes | None:
    """Parallel coordinates of the search: one panel per (sweep,) dataset x method, an axis per parameter
    (normalised to [0, 1]) plus best val mAP, lines coloured by best val mAP; dashed = ASHA-stopped."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    search = _search_trials(trials if "_scope" in trials.columns else with_scope(trials, False))
    params = param_columns(search)
    panels = []
    for (scope, d, m), g in search.sort("_scope", "dataset", method_rank(), "method").group_by(
            "_scope", "dataset", "method", maintain_order=True):
        used = [p for p in params if g[p].null_count() < g.height]
        if g.height >= 2 and used:
            panels.append((scope, d, m, g, used))
    if not panels:
        log.info("parallel-coordinates plot skipped: no dataset x method has >= 2 scored search trials with parameters")
        return None
    # Panels flow in reading order, as many per row as the busiest dataset has methods (at most 3).
    per_dataset = max(sum(1 for s, d, *_ in panels if (s, d) == key) for key in {(s, d) for s, d, *_ in panels})
    ncols = min(3, per_dataset)
    nrows = math.ceil(len(panels) / ncols)
    max_axes = max(len(used) + 1 for *_, used in panels)
    fig = Figure(figsize=(max(5.0, 1.25 * max_axes + 1.5) * ncols, 3.4 * nrows + 0.8))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    cmap = colormaps["viridis"]
    for ax, (scope, d, m, g, used) in zip(axes, panels):
        cols = [*used, "best_val_mAP"]
        normed, ends, names = [], [], []
        for c in cols:
            vals = (100 * g[c]).to_list() if c == "best_val_mAP" else g[c].to_list()
            y, lo, hi, is_log = _normalise(vals)
            normed.append(y)
            ends.append((lo, hi))
            names.append("best val mAP (%)" if c == "best_val_mAP"
                         else c.removeprefix("param.") + (" (log)" if is_log else ""))
        score = g["best_val_mAP"].to_numpy()
        lo, hi = 100 * float(score.min()), 100 * float(score.max())
        norm = Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1e-9)
        stopped = (g["status"] == "stopped").to_list()
        xs = list(range(len(cols)))
        for i in np.argsort(score):  # best trials drawn last, on top
            ax.plot(xs, [normed[k][i] for k in range(len(cols))], color=cmap(norm(100 * score[i])), lw=1.6,
                    alpha=0.9, ls="--" if stopped[i] else "-", marker="o", ms=3)
        for x, (lo, hi) in zip(xs, ends):
            ax.axvline(x, color="0.6", lw=0.8, zorder=0)
            box = {"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8}
            ax.annotate(lo, (x, 0), xytext=(0, -6), textcoords="offset points", ha="center", va="top", fontsize=7,
                        bbox=box)
            ax.annotate(hi, (x, 1), xytext=(0, 6), textcoords="offset points", ha="center", va="bottom", fontsize=7,
                        bbox=box)
        ax.set_xticks(xs, names, rotation=20, ha="right", fontsize=8)
        ax.set_yticks([])
        ax.set_ylim(-0.2, 1.2)
        ax.set_xlim(-0.3, len(cols) - 0.7)
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
        title = _panel_key(scope, d).replace("\n", " ")
        ax.set_title(f"{title}: {label_method(m)} ({g.height} trials)", fontsize=10)
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="best val mAP (%)", fraction=0.05, pad=0.02)
    legend = [Line2D([], [], color="0.3", ls="-", label="completed"),
              Line2D([], [], color="0.3", ls="--", label="ASHA-stopped")]
    fig.legend(handles=legend, loc="upper right", ncols=2, frameon=False, fontsize=8)
    fig.suptitle("Search trials, parameters normalised to [0, 1] per panel (end values printed; log10 where a "
                 "parameter spans a decade)", fontsize=10, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return _png(fig)


def render_plots(board: pl.DataFrame, trials: pl.DataFrame, metric: str, keep_all: bool = False) -> dict[str, bytes]:
    """The plots that have something to show, as PNG bytes by file name (skipped ones are logged)."""
    trials = with_scope(trials, keep_all)
    out = {}
    for name, make in ((f"leaderboard-{metric}.png", lambda: plot_metric_bars(board, metric)),
                       ("leaderboard-importance.png", lambda: plot_importance(trials)),
                       ("leaderboard-parallel.png", lambda: plot_parallel(trials))):
        png = make()
        if png is not None:
            out[name] = png
    return out

