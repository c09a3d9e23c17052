"""The harness's one rich console: the plan, the live table, the summary and the reports share it,
so that rich's live display redirects everything else that is printed while it runs."""

from __future__ import annotations

from indivaid.utils.console import make_console

console = make_console()  # off a terminal (a log, > plan.txt): tables at natural width, one line per row
