"""``testbed load``: the command line of :mod:`testbed.load`."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from enforcer.durations import DurationError, parse_duration

EXIT_USAGE = 2


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return parse_duration(text).total_seconds()
    except DurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _ms(text: str) -> float:
    """Milliseconds from ``100`` (a bare number is milliseconds) or a duration (``0.1s``)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return parse_duration(text).total_seconds() * 1000
    except DurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _share(text: str) -> float:
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a share like 1% or 0.01, got {text!r}"
        ) from None


def add_load_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``load`` to the top-level ``testbed`` parser."""
    p = sub.add_parser(
        "load",
        help="load-test an mTLS endpoint with one certificate per device",
        description="Open-loop load (every attempt has a scheduled start; latency counts from "
        "it; attempts with no free device are dropped) from a provisioned fleet or a "
        "scenario's fleet, split between worker processes, against the embedded enforcer, "
        "nginx or any https:// URL. Writes the same report as `testbed run`.",
    )
    p.add_argument(
        "--target",
        required=True,
        help="embedded (started here), nginx (started here) or an https:// URL",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--fleet", type=Path, help="a fleet folder from `testbed fleet provision`")
    src.add_argument("--scenario", type=Path, help="a scenario file: its cohorts and target")
    shape = p.add_mutually_exclusive_group(required=True)
    shape.add_argument("--rate", type=float, help="constant arrival rate (attempts per second)")
    shape.add_argument("--ramp", metavar="A:B", help="arrival rate ramping from A to B per second")
    shape.add_argument(
        "--step",
        metavar="START:STEP[:MAX]",
        help="find the highest sustainable rate: steps of --duration each, stopping at the "
        "first whose p99 exceeds --p99 or whose errors exceed --max-errors",
    )
    shape.add_argument(
        "--closed", type=int, metavar="N", help="closed loop: N devices, back to back"
    )
    p.add_argument(
        "--duration", type=_seconds, required=True, help="how long (per step with --step): 30s, 2m"
    )
    p.add_argument("--workers", type=int, default=1, help="load generator processes (default 1)")
    p.add_argument(
        "--mode",
        default="new-handshake",
        help="new-handshake (default), resume, keepalive or cookie",
    )
    p.add_argument("--ca", type=Path, help="URL target: the CA that signed its server certificate")
    p.add_argument("--hostname", help="the SNI and Host to send (default: the URL's host)")
    p.add_argument("--path", default="/", help="the request path (default /)")
    p.add_argument("--p99", type=_ms, default=100.0, help="--step: p99 bound, e.g. 100ms")
    p.add_argument(
        "--max-errors",
        type=_share,
        default=0.01,
        help="share of attempts that may end in errors (timeouts, transport errors, 5xx) before"
        " the run fails; with --step, each step's bound too (default 1%%)",
    )
    p.add_argument(
        "--enforcer-workers", type=int, default=1, help="embedded target: enforcer processes"
    )
    p.add_argument(
        "--threshold",
        action="append",
        default=[],
        help='k6-style check deciding the exit code, e.g. "handshake.p99 < 50ms" (repeatable)',
    )
    p.add_argument("--timeout", type=_seconds, default=10.0, help="per attempt (default 10s)")
    p.add_argument(
        "--reports",
        default=os.environ.get("TESTBED_REPORTS", "reports"),
        help="where run folders go (env TESTBED_REPORTS)",
    )
    p.add_argument("--no-progress", action="store_true", help="no live display")
    p.add_argument("--json", action="store_true", help="print one JSON line of the figures")


def _fail(message: str) -> int:
    Console(stderr=True, soft_wrap=True).print(
        f"[bold red]error:[/] {escape(message)}", highlight=False
    )
    return EXIT_USAGE


def run_load_cli(args: argparse.Namespace, render: Callable[[Path], Any] | None) -> int:
    """Run ``testbed load``."""
    from testbed.load import LoadError, LoadPlan, parse_rate_pair, parse_step, run_load

    try:
        plan = LoadPlan(
            target=args.target,
            duration=args.duration,
            fleet=args.fleet,
            scenario=args.scenario,
            rate=args.rate,
            ramp=parse_rate_pair(args.ramp, "--ramp") if args.ramp else None,
            step=parse_step(args.step) if args.step else None,
            closed=args.closed,
            workers=args.workers,
            mode=args.mode,
            ca=args.ca,
            hostname=args.hostname,
            path=args.path,
            p99_ms=args.p99,
            max_errors=args.max_errors,
            enforcer_workers=args.enforcer_workers,
            thresholds=tuple(args.threshold),
            timeout=args.timeout,
        )
        outcome, steps = run_load(
            plan, Path(args.reports), progress=not args.no_progress, render=render
        )
    except LoadError as exc:
        return _fail(str(exc))
    out = Console(soft_wrap=True)
    if steps:
        from testbed.load import sustained_rate

        table = Table(title="Steps", title_justify="left")
        for column in ("step", "rate/s", "attempts", "errors", "dropped", "p99 ms", "held"):
            table.add_column(column, justify="left" if column == "step" else "right")
        for s in steps:
            table.add_row(
                s.phase,
                f"{s.rate:g}",
                str(s.attempts),
                str(s.errors),
                str(s.dropped),
                "-" if s.p99_ms is None else f"{s.p99_ms:.1f}",
                "yes" if s.held else "[bold red]no[/]",
            )
        out.print(table)
        best = sustained_rate(steps)
        out.print(
            f"sustainable rate ({plan.mode}, p99 <= {plan.p99_ms:g} ms, errors <="
            f" {plan.max_errors:.1%}): "
            + (
                f"[bold]{best:g}/s[/]"
                if best is not None
                else "[bold red]none: the first step failed[/]"
            )
        )
    if args.json:
        from testbed.report import load_summary

        summary = load_summary(outcome.run_dir)
        meta = summary["run"]["meta"]
        cpu = meta.get("generator_cpu_seconds") or 0.0
        print(
            json.dumps(
                {
                    "run_dir": str(outcome.run_dir),
                    "mode": plan.mode,
                    "target": plan.target,
                    "attempts": summary["totals"].get("attempts"),
                    "rate": summary["totals"].get("rate"),
                    "latency": summary["latency"].get("total"),
                    "sustained_rate": sustained_rate(steps) if steps else None,
                    # Attempts per second of the generator's own CPU: its per-core capacity.
                    "generator_cpu_s": cpu,
                    "attempts_per_generator_cpu_s": (
                        summary["totals"].get("attempts", 0) / cpu if cpu else None
                    ),
                }
            )
        )
    if outcome.exit_code == 130:
        out.print(f"interrupted: results so far in {escape(str(outcome.run_dir))}")
    out.print(f"report: {escape(str(outcome.run_dir / 'report.html'))}", highlight=False)
    return outcome.exit_code
