"""``testbed report RUN_DIR`` and ``testbed compare RUN_A RUN_B``."""

from __future__ import annotations

import argparse
import json
import sqlite3
from pathlib import Path

from rich.console import Console
from rich.markup import escape

EXIT_REGRESSED, EXIT_USAGE = 1, 2


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
    compare.add_argument(
        "--fail-if",
        action="append",
        default=[],
        metavar="EXPR",
        help="regression gate, repeatable: exit 1 when true of RUN_B. A signed percentage is "
        "RUN_B's change from RUN_A ('total.p99 > +10%%', 'rate < -5%%'); any other value is "
        "RUN_B's own ('false_accepts > 0', 'handshake.p99 > 50ms'); metrics as in thresholds. "
        "A gate with no data to judge trips. A bad expression exits 2",
    )
    compare.add_argument(
        "--json",
        action="store_true",
        help="print the comparison and the gates as one JSON line on stdout (tables to stderr)",
    )


def _fail(message: str) -> int:
    Console(stderr=True, soft_wrap=True).print(
        f"[bold red]error:[/] {escape(message)}", highlight=False
    )
    return EXIT_USAGE


def run_report_cli(args: argparse.Namespace) -> int:
    """Run ``testbed report`` or ``testbed compare``."""
    # Imported here so other commands do not pay for matplotlib's import.
    from testbed import report

    console = report.terminal_console()
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
            data = report.compare(Path(args.run_a), Path(args.run_b), args.fail_if)
            if args.json:
                # stdout holds the one JSON line a CI step parses; people read stderr.
                report.print_comparison(data, report.terminal_console(stderr=True))
                print(json.dumps(data, allow_nan=False), flush=True)
            else:
                report.print_comparison(data, console)
            for expression in data["tripped"]:
                Console(stderr=True, soft_wrap=True).print(
                    f"[bold red]regression:[/] {escape(expression)}", highlight=False
                )
            return EXIT_REGRESSED if data["tripped"] else 0
    except report.GateError as exc:
        return _fail(str(exc))
    except FileNotFoundError as exc:
        return _fail(str(exc))
    except sqlite3.DatabaseError as exc:
        return _fail(f"cannot read the results database: {exc}")
    return _fail(f"unknown command {args.command}")
