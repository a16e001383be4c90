"""``testbed report RUN_DIR`` and ``testbed compare RUN_A RUN_B``."""

from __future__ import annotations

import argparse
import sqlite3
from pathlib import Path

from rich.console import Console
from rich.markup import escape

EXIT_USAGE = 2


def add_report_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``report`` and ``compare`` to the top-level ``testbed`` parser."""
    report = sub.add_parser(
        "report",
        help="re-render a run's report from its results.sqlite",
        description="Summarize RUN_DIR/results.sqlite and write summary.json, the figures, "
        "report.html and junit.xml into RUN_DIR, then print the summary. Works on an "
        "interrupted run too.",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (holds results.sqlite)")
    compare = sub.add_parser(
        "compare",
        help="compare two runs' latencies and outcomes",
        description="Show two runs side by side: totals, latency percentiles and outcomes per "
        "cohort, with the change from RUN_A to RUN_B.",
    )
    compare.add_argument("run_a", metavar="RUN_A", help="the baseline run directory")
    compare.add_argument("run_b", metavar="RUN_B", help="the run directory to compare with it")


def _fail(message: str) -> int:
    Console(stderr=True, soft_wrap=True).print(
        f"[bold red]error:[/] {escape(message)}", highlight=False
    )
    return EXIT_USAGE


def run_report_cli(args: argparse.Namespace) -> int:
    """Run ``testbed report`` or ``testbed compare``."""
    # Imported here so other commands do not pay for matplotlib's import.
    from testbed import report

    console = Console(soft_wrap=True)
    try:
        if args.command == "report":
            run_dir = Path(args.run_dir)
            summary = report.load_summary(run_dir)
            paths = report.write_report(run_dir, summary)
            report.print_summary(summary, console)
            console.print(f"report: {escape(str(paths.html))}", highlight=False)
            console.print(
                f"summary: {escape(str(paths.summary))}, junit: {escape(str(paths.junit))}",
                highlight=False,
            )
            return 0
        if args.command == "compare":
            data = report.compare(Path(args.run_a), Path(args.run_b))
            report.print_comparison(data, console)
            return 0
    except FileNotFoundError as exc:
        return _fail(str(exc))
    except sqlite3.DatabaseError as exc:
        return _fail(f"cannot read the results database: {exc}")
    return _fail(f"unknown command {args.command}")
