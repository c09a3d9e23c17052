"""Logging set-up for the command-line entry points (libraries only ever call ``getLogger``)."""

from __future__ import annotations

import logging

from rich.logging import RichHandler

from indivaid.utils.console import make_console

console = make_console()


def log_handler() -> logging.Handler:
    """Rich's coloured handler on a terminal; off one (a log file, a cluster job's output) plain
    one-line records with a date, which rich would otherwise wrap at 80 columns."""
    err = make_console(stderr=True)
    if err.is_terminal:
        return RichHandler(console=err, show_path=False, rich_tracebacks=True)
    handler = logging.StreamHandler()  # stderr
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


def setup_logging(level: int | str = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]", handlers=[log_handler()], force=True)
    for noisy in ("PIL", "matplotlib", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
