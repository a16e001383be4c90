"""``testbed load``: the command line of :mod:`testbed.load`."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from enforcer.durations import DurationError, parse_duration
from testbed.live import add_live_arguments, options_from

if TYPE_CHECKING:
    from testbed.load import LoadPlan, StepResult
    from testbed.runner import Render, RunOutcome

EXIT_USAGE = 2
VERDICTS = {0: "pass", 1: "fail", 130: "interrupted"}


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
    p.add_argument(
        "--workers",
        type=int,
        help="load generator processes (default 1; with --cluster, one per Dask worker)",
    )
    p.add_argument(
        "--mode",
        default="new-handshake",
        help="new-handshake (default), resume, keepalive or cookie",
    )
    p.add_argument(
        "--protocol",
        choices=("http1", "h2", "grpc"),
        help="what every device speaks: http1 (HTTP/1.1), h2 (HTTP/2, one stream per request)"
        " or grpc (Report calls to the telemetry service, started here); default: each"
        " cohort's client.protocol, http1 for a fleet",
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
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="--step: run the staircase N times and report the spread of the sustainable rate",
    )
    p.add_argument(
        "--no-events",
        action="store_true",
        help="--scenario: load its fleet without its timed events (a load cannot apply them)",
    )
    p.add_argument("--no-progress", action="store_true", help="no live display")
    add_live_arguments(p)
    from testbed.cluster import add_cluster_options

    add_cluster_options(p)
    p.add_argument(
        "--json",
        action="store_true",
        help="print exactly one JSON line on stdout (verdict, thresholds, counts, rates,"
        " latencies, steps); tables and progress go to stderr",
    )


def _fail(message: str) -> int:
    Console(stderr=True, soft_wrap=True).print(
        f"[bold red]error:[/] {escape(message)}", highlight=False
    )
    return EXIT_USAGE


def run_load_cli(args: argparse.Namespace, render: Render | None) -> int:
    """Run ``testbed load``."""
    if not args.json:
        return _run(args, render, sys.stdout)
    # Everything but the one JSON line goes to stderr, whoever prints it (the report's
    # tables, the steps, rich's consoles), so that `testbed load --json | jq` reads one value.
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        return _run(args, render, stdout)


def _run(args: argparse.Namespace, render: Render | None, stdout: TextIO) -> int:
    from testbed.cluster import ClusterError, open_cluster

    try:
        cluster, workers = open_cluster(args)
    except ClusterError as exc:
        return _fail(str(exc))
    try:
        return _run_plan(args, render, stdout, cluster, workers)
    finally:
        if cluster is not None:
            cluster.close()


def _run_plan(
    args: argparse.Namespace,
    render: Render | None,
    stdout: TextIO,
    cluster: Any,
    workers: int,
) -> int:
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
            workers=workers,
            mode=args.mode,
            ca=args.ca,
            hostname=args.hostname,
            path=args.path,
            p99_ms=args.p99,
            max_errors=args.max_errors,
            enforcer_workers=args.enforcer_workers,
            thresholds=tuple(args.threshold),
            timeout=args.timeout,
            repeat=args.repeat,
            no_events=args.no_events,
            protocol=args.protocol,
        )
        outcome, steps = run_load(
            plan,
            Path(args.reports),
            progress=not args.no_progress,
            render=render,
            live=options_from(args),
            cluster=cluster,
        )
    except LoadError as exc:
        if args.json:
            # Still one line for jq: a run that could not be made is a verdict too.
            stdout.write(
                json.dumps({"verdict": "error", "exit_code": EXIT_USAGE, "error": str(exc)})
            )
            stdout.write("\n")
        return _fail(str(exc))
    out = Console(soft_wrap=True)
    if steps:
        print_steps(out, plan, steps)
    if args.json:
        from testbed.report import load_summary

        figures = json_figures(plan, outcome, steps, load_summary(outcome.run_dir))
        # Strict JSON: NaN and Infinity are not JSON, and jq refuses them.
        line = json.dumps(_finite(figures), separators=(",", ":"), allow_nan=False)
        stdout.write(line + "\n")
        stdout.flush()
    if outcome.exit_code == 130:
        out.print(f"interrupted: results so far in {escape(str(outcome.run_dir))}")
    out.print(f"report: {escape(str(outcome.run_dir / 'report.html'))}", highlight=False)
    return outcome.exit_code


def print_steps(out: Console, plan: LoadPlan, steps: Sequence[StepResult]) -> None:
    """Every step (rate, attempts, errors, drops, p99, held) and the sustainable rate."""
    from testbed.load import rate_spread, sustained_rate

    repeats = sorted({s.repeat for s in steps})
    table = Table(title="Steps", title_justify="left")
    columns = ["step", "rate/s", "attempts", "errors", "dropped", "p99 ms", "held"]
    if len(repeats) > 1 or plan.repeat > 1:
        columns.insert(0, "repeat")
    for column in columns:
        table.add_column(column, justify="left" if column in ("step", "repeat") else "right")
    for s in steps:
        row = [
            s.phase.rpartition(".")[2],
            f"{s.rate:g}",
            str(s.attempts),
            str(s.errors),
            str(s.dropped),
            "-" if s.p99_ms is None else f"{s.p99_ms:.1f}",
            "yes" if s.held else "[bold red]no[/]",
        ]
        table.add_row(*([str(s.repeat)] if columns[0] == "repeat" else []), *row)
    out.print(table)
    bounds = f"{plan.mode}, p99 <= {plan.p99_ms:g} ms, errors <= {plan.max_errors:.1%}"
    rates = [sustained_rate([s for s in steps if s.repeat == r]) for r in repeats]
    if len(rates) == 1:
        best = rates[0]
        out.print(
            f"sustainable rate ({bounds}): "
            + (
                f"[bold]{best:g}/s[/]"
                if best is not None
                else "[bold red]none: the first step failed[/]"
            )
        )
        return
    spread = rate_spread(rates)
    shown = ", ".join("none" if r is None else f"{r:g}/s" for r in rates)
    out.print(
        f"sustainable rate ({bounds}) over {len(rates)} repeats: min {spread['min']:g}/s,"
        f" median [bold]{spread['median']:g}/s[/], max {spread['max']:g}/s ({shown})"
    )
    if spread["max"] and spread["min"] != spread["max"]:
        out.print(
            "the repeats disagree: the limit lies between the min and the max; a finer"
            " --step or a longer --duration narrows it"
        )


def json_figures(
    plan: LoadPlan,
    outcome: RunOutcome,
    steps: Sequence[StepResult],
    summary: Mapping[str, Any],
) -> dict[str, Any]:
    """The one JSON object ``--json`` prints: the verdict and the figures behind it."""
    from testbed.load import rate_spread, sustained_rate

    meta = summary["run"]["meta"]
    totals = summary["totals"]
    cpu = meta.get("generator_cpu_seconds") or 0.0
    repeats = sorted({s.repeat for s in steps})
    rates = [sustained_rate([s for s in steps if s.repeat == r]) for r in repeats]
    # Several repeats: their median, with the spread beside it.
    sustained = (rate_spread(rates)["median"] if any(rates) else None) if steps else None
    return {
        "verdict": VERDICTS.get(outcome.exit_code, "fail"),
        "exit_code": outcome.exit_code,
        "thresholds": [
            {"expression": t["expression"], "observed": t["observed"], "ok": bool(t["ok"])}
            for t in summary.get("thresholds", [])
        ],
        "false_accepts": totals.get("false_accepts"),
        "false_rejects": totals.get("false_rejects"),
        "errors": totals.get("errors"),
        "dropped": totals.get("dropped"),
        "attempts": totals.get("attempts"),
        "outcomes": totals.get("outcomes"),
        "duration_s": totals.get("duration_s"),
        "rate": totals.get("rate"),
        "rates": {
            "requested_per_s": plan.rate,
            "ramp_per_s": list(plan.ramp) if plan.ramp else None,
            "achieved_per_s": totals.get("rate"),
            "sustained_per_s": sustained,
        },
        "latency_ms": {
            name: summary["latency"].get(name) for name in ("total", "handshake", "service")
        },
        "steps": [s.as_dict() for s in steps],
        "sustained_rate": sustained,
        "sustained_rate_spread": rate_spread(rates) if len(rates) > 1 else None,
        "run_dir": str(outcome.run_dir),
        "mode": plan.mode,
        "protocol": plan.protocol or "scenario",
        "target": plan.target,
        "report": str(outcome.run_dir / "report.html"),
        # Attempts per second of the generator's own CPU: its per-core capacity.
        "generator_cpu_s": cpu,
        "attempts_per_generator_cpu_s": (totals.get("attempts", 0) / cpu if cpu else None),
    }


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
