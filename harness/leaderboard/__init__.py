"""``python -m harness.leaderboard``: one leaderboard from the sweeps' ``trials.parquet`` files.

A package by concern: :mod:`~harness.leaderboard.load` (sweep folders, the results schema),
:mod:`~harness.leaderboard.stats` (means, Δ, paired bootstrap, Holm),
:mod:`~harness.leaderboard.published` (the papers' numbers), :mod:`~harness.leaderboard.render`
(rich, markdown, CSV, JSON, HTML), :mod:`~harness.leaderboard.plots` and
:mod:`~harness.leaderboard.cli`. Their public names are re-exported here.

Runs on a laptop with results copied from a cluster: polars, numpy, matplotlib (Agg) and rich;
no Ray, no torch at import time.
"""

from harness.leaderboard.cli import build_parser, main, report_dir
from harness.leaderboard.common import (ALPHA, DASH, DATASET_LABELS, FALLBACK_MARK, LABELS, METHOD_LABELS,
                                        METHOD_ORDER, METRICS, MIN_PAIRS, N_BOOT, REFERENCE, REHEARSAL_MARK, RNG_SEED,
                                        SOURCE_TEST, SOURCE_VAL, UNTRAINED, LeaderboardError, label_dataset,
                                        label_method)
from harness.leaderboard.load import (Loaded, find_sweep_dirs, load_results, read_manifest, read_trials,
                                      select_newest, supported_schema_version, with_scope)
from harness.leaderboard.plots import (hyperparameter_importance, plot_importance, plot_metric_bars, plot_parallel,
                                       render_plots)
from harness.leaderboard.published import load_published, published_rows
from harness.leaderboard.render import (display_rows, fmt_delta, fmt_metric, fmt_p, legend_lines,
                                        published_display_rows, render_csv, render_html, render_json, render_markdown,
                                        render_rich, robustness_rows)
from harness.leaderboard.stats import (BOARD_COLUMNS, BOARD_SCHEMA, aggregate, full_table, has_robustness, holm,
                                       paired_bootstrap)
from harness.results import TRIAL_SCHEMA, param_columns

__all__ = [
    "ALPHA", "BOARD_COLUMNS", "BOARD_SCHEMA", "DASH", "DATASET_LABELS", "FALLBACK_MARK", "LABELS", "METHOD_LABELS",
    "METHOD_ORDER", "METRICS", "MIN_PAIRS", "N_BOOT", "REFERENCE", "REHEARSAL_MARK", "RNG_SEED", "SOURCE_TEST",
    "SOURCE_VAL", "TRIAL_SCHEMA", "UNTRAINED", "LeaderboardError", "Loaded", "aggregate", "build_parser",
    "display_rows", "find_sweep_dirs", "fmt_delta", "fmt_metric", "fmt_p", "full_table", "has_robustness", "holm",
    "hyperparameter_importance", "label_dataset", "label_method", "legend_lines", "load_published", "load_results",
    "main", "paired_bootstrap", "param_columns", "plot_importance", "plot_metric_bars", "plot_parallel",
    "published_display_rows", "published_rows", "read_manifest", "read_trials", "render_csv", "render_html",
    "render_json", "render_markdown", "render_plots", "render_rich", "report_dir", "robustness_rows", "select_newest",
    "supported_schema_version", "with_scope",
]
