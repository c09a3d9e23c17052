"""Rich consoles that stay readable in log files.

Off a terminal (``> plan.txt``, nohup, a cluster job's log, CI) rich falls back to 80 columns
and wraps every table cell mid-word, so a row spreads over many lines and a grep for a dataset
name finds nothing. Here, off a terminal, tables get their natural width instead: one line per
row. ``COLUMNS`` still wins when it is set, and a terminal keeps its own width.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import IO, Any

from rich import live
from rich.console import Console
from rich.rule import Rule

# Wide enough that no table the project prints is ever folded; tables (expand=False) and plain
# text take only the width they need, so nothing is padded out to it.
OFF_TERMINAL_WIDTH = 4096
# A horizontal rule fills the console's width: off a terminal it gets this many columns instead.
RULE_WIDTH = 100


def columns_from_env() -> int | None:
    """``COLUMNS`` as an int when it is set to a positive number (it overrides any detection)."""
    value = os.environ.get("COLUMNS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def _is_terminal(file: IO[str] | None, stderr: bool) -> bool:
    """What rich itself decides (a tty, or FORCE_TERMINAL / TTY_COMPATIBLE set)."""
    return Console(file=file, stderr=stderr).is_terminal


def console_width(file: IO[str] | None = None, *, stderr: bool = False) -> int | None:
    """The width to force on a console writing to ``file``: None where rich should decide (a
    terminal, or ``COLUMNS`` set), :data:`OFF_TERMINAL_WIDTH` otherwise."""
    if columns_from_env() is not None or _is_terminal(file, stderr):
        return None
    return OFF_TERMINAL_WIDTH


def terminal_columns() -> int | None:
    """Columns to lay text out in for stdout: ``COLUMNS``, else the terminal's width; None off a
    terminal (lay out at natural width). For code that formats text itself instead of printing
    through a console."""
    env = columns_from_env()
    if env is not None:
        return env
    if sys.stdout.isatty():
        return shutil.get_terminal_size((100, 40)).columns
    return None


class LogFriendlyConsole(Console):
    """A Console whose horizontal rules stay short when the console is wide (off a terminal)."""

    def rule(self, title: Any = "", *, characters: str = "─", style: Any = "rule.line",
             align: Any = "center") -> None:
        rule = Rule(title, characters=characters, style=style, align=align)
        self.print(rule, width=min(self.width, RULE_WIDTH) if not self.is_terminal else None)


class Live(live.Live):
    """rich's Live display, whose last frame also ends its line off a terminal (rich leaves the
    next output glued to the table's bottom border in a log file)."""

    def stop(self) -> None:
        started = self.is_started
        super().stop()
        if started and not self.transient and not self.console.is_terminal and not self.console.is_jupyter:
            self.console.line()


def make_console(file: IO[str] | None = None, *, stderr: bool = False, **kwargs: Any) -> Console:
    """The project's console: the terminal's width on a terminal, ``COLUMNS`` when set, and
    natural-width tables (one line per row) in files and pipes. ``file=None`` follows
    ``sys.stdout`` (or ``sys.stderr``) at print time, as a plain rich Console does."""
    if "width" not in kwargs:
        kwargs["width"] = console_width(file, stderr=stderr)
    return LogFriendlyConsole(file=file, stderr=stderr, **kwargs)
