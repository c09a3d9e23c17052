"""Output written to a file (``> plan.txt``, nohup, a cluster job's log) keeps one line per table
row: nothing wraps mid-word, so a grep for a dataset or method name finds its row."""

from __future__ import annotations

import io
import itertools
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from rich.table import Table

from harness.config import load_sweep
from harness.sweep import plan
from indivaid.utils.console import OFF_TERMINAL_WIDTH, Live, make_console, terminal_columns

ROOT = Path(__file__).resolve().parents[1]


def log_env() -> dict[str, str]:
    """The environment of a job whose output goes to a file: no COLUMNS, nothing forcing a terminal."""
    drop = ("COLUMNS", "LINES", "FORCE_COLOR", "FORCE_TERMINAL", "TTY_COMPATIBLE", "TTY_INTERACTIVE")
    return {k: v for k, v in os.environ.items() if k not in drop}


def run_to_file(args: list[str], out: Path, env: dict[str, str] | None = None) -> str:
    """Run ``python ARGS`` from the repository with stdout going to ``out`` (not a terminal)."""
    with open(out, "w") as f:
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env or log_env(), stdout=f,
                              stderr=subprocess.PIPE, text=True, timeout=280, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out.read_text()


def table_rows(text: str) -> list[list[str]]:
    """The cells of each body row of rich tables in ``text`` (lines framed by │)."""
    return [[c.strip() for c in line.strip().strip("│").split("│")] for line in text.splitlines()
            if line.lstrip().startswith("│")]


def test_console_off_a_terminal_is_wide_and_columns_still_wins(monkeypatch: pytest.MonkeyPatch):
    for var in ("COLUMNS", "FORCE_TERMINAL", "TTY_COMPATIBLE"):
        monkeypatch.delenv(var, raising=False)
    buf = io.StringIO()
    console = make_console(file=buf)
    assert console.width == OFF_TERMINAL_WIDTH
    table = Table(title="t")
    for c in ("dataset", "method", "note"):
        table.add_column(c)
    table.add_row("friesiancattle2017", "indivaid-nofusion", "a long note " * 12)
    console.print(table)
    console.rule("section")
    with Live(table, console=console, transient=False):  # a live view's last frame lands in the log
        pass
    console.print("after")
    lines = buf.getvalue().splitlines()
    assert [r[:2] for r in table_rows(buf.getvalue())] == [["friesiancattle2017", "indivaid-nofusion"]] * 2
    assert max(len(line) for line in lines) < 250  # natural width: nothing padded out to the console's width
    assert lines[-1] == "after" and lines[-2].startswith("└")  # not glued to the live table's last border
    monkeypatch.setenv("COLUMNS", "60")
    narrow = make_console(file=io.StringIO())
    assert narrow.width == 60 and terminal_columns() == 60  # consoles, and the leaderboard's own layout


@pytest.mark.timeout(300)  # a subprocess that imports Ray Tune: slow on a loaded machine
def test_dry_run_to_a_file_keeps_every_plan_row_on_one_line(tmp_path: Path):
    text = run_to_file(["-m", "harness.sweep", "sweeps/full.yaml", "--dry-run"], tmp_path / "plan.txt")
    expected = [(exp.phase, exp.dataset, exp.method) for exp, _ in plan(load_sweep(ROOT / "sweeps" / "full.yaml"))]
    rows = [tuple(cells[:3]) for cells in table_rows(text)]
    assert rows == expected, text[:3000]  # each dataset and method name whole, one row per experiment
    assert len(expected) == 54
    for dataset in {d for _, d, _ in expected}:
        assert sum(f"│ {dataset} " in line for line in text.splitlines()) == 6  # grep finds all its rows


@pytest.mark.timeout(300)
def test_sweep_summary_to_a_file_keeps_one_line_per_row(tmp_path: Path):
    rows = []
    for method in ("indivaid-nofusion", "clipreid", "zeroshot"):
        for phase, seed in (("search", 0), ("final", 0), ("final", 1)):
            rows.append({"dataset": "friesiancattle2017", "method": method, "phase": phase, "seed": seed,
                         "status": "completed", "stop_reason": "completed", "best_val_mAP": 0.4123,
                         "test_mAP": 0.3456 if phase == "final" else None})
    trials = tmp_path / "trials.parquet"
    pl.DataFrame(rows).write_parquet(trials)
    code = "import sys, polars as pl; from harness.sweep import summary; summary(pl.read_parquet(sys.argv[1]))"
    text = run_to_file(["-c", code, str(trials)], tmp_path / "summary.txt")
    got = [cells[:3] for cells in table_rows(text)]
    assert got == [["friesiancattle2017", m, "3"] for m in ("indivaid-nofusion", "clipreid", "zeroshot")], text
    assert "34.6 ± 0.0 (n=2)" in text


@pytest.mark.timeout(300)
def test_leaderboard_to_a_file_keeps_one_line_per_row(tmp_path: Path):
    from test_leaderboard import golden_rows, write_sweep

    rows = [{**r, "param.prompt.n_ctx": 6, "param.stage1.lr": 1e-4} if r["method"] == "indivaid" else r
            for r in golden_rows()]  # a best config longer than a terminal's column for it
    write_sweep(tmp_path / "results", "golden", rows)
    text = run_to_file(["-m", "harness.leaderboard", str(tmp_path / "results"), "--no-report"], tmp_path / "board.txt")
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("───")) + 1
    body = list(itertools.takewhile(str.strip, lines[start:]))  # up to the table's blank last line
    # one line per dataset x method (no continuation lines of wrapped cells), its best config whole
    assert [line.split()[0] for line in body] == ["Lion"] * 4 + ["Nyala"] * 4 + ["mean"] * 3, text[:4000]
    assert any(line.split()[:4] == ["Nyala", "IndivAID", "(mean", "fusion)"] for line in body)
    best = "fusion.heads=4, prompt.n_ctx=6, stage1.lr=0.0001, stage2.lr=8e-06"
    assert any(line.split()[:2] == ["Lion", "IndivAID"] and best in line for line in body)
