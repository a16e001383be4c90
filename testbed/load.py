"""``testbed load``: handshakes per second against any mTLS endpoint, one certificate per device.

Theory of operation. A load run is a scenario made on the spot: the fleet's cohorts (from a
provisioned fleet folder or a scenario file), one open-loop phase at a constant or ramping
rate (or a closed loop of N devices, or a staircase of steps), on the real clock. The parent
process starts the target once (the embedded enforcer as ``testbed enforcer serve`` in its
own processes, or nginx, or nothing for a URL), then splits the fleet and the arrivals between
``--workers`` shard processes (see :mod:`testbed.shards`) that start together on the wall
clock. Their results are merged into one ``results.sqlite`` and rendered as the same report
as ``testbed run``.

Modes say what each attempt costs the target:

- ``new-handshake``: a new connection and a full handshake with the client certificate for
  every request, no resumption, no cookie;
- ``resume``: a new connection per request, resuming the device's TLS session;
- ``keepalive``: one connection per device, kept alive, the certificate checked per request;
- ``cookie``: one kept-alive connection per device, with the ``CF_Authorization`` cookie.

Step mode (``--step START:STEP[:MAX]``) runs constant-rate steps of ``--duration`` each and
stops after the first step whose p99 latency (from the scheduled start) exceeds ``--p99`` or
whose share of errors (attempts whose outcome is not the one expected, plus dropped
attempts) exceeds ``--max-errors``; the highest step that held is the sustainable rate.
``--repeat N`` runs the staircase N times against the same target, one after the other (each
repeat's shards write under ``RUN_DIR/repeats/<n>`` and are folded into ``results.sqlite``
with their phases named ``r<n>.step-<k>`` and their times shifted to the run's), and reports
the spread of the sustainable rate: a limit that moves from repeat to repeat is noise.

A scenario's thresholds are the run's, with any ``--threshold`` added. Its timed events are
applied by the parent, which started the target, with ``testbed run``'s own code
(:meth:`testbed.runner.Run.apply`) on a driver run that holds a stand-in for every device:
the embedded enforcer (started so that it follows its state database) takes every event but
``advance_clock`` (it runs on the wall clock), nginx takes ``revoke`` (a new CRL and a reload),
a URL none. The stand-ins tell which devices expect another outcome from when the change was
committed, and the attempts those devices began from then on are judged against it. An event
within the run that the target cannot take, or any event of a ``--step`` run (whose timeline
depends on when a step fails), is refused (exit 2, naming it), unless ``--no-events`` says to
run without the scenario's events.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import trio
from rich.console import Console

from devices.behaviour import Closed
from devices.client import DeviceClient
from devices.client import Target as DeviceTarget
from enforcer.accesslog import AccessLog
from enforcer.clock import WallClock
from enforcer.config import load_config
from enforcer.origin import serve_echo_origin_on
from enforcer.server import Enforcer
from testbed.live import (
    LiveError,
    LiveOptions,
    LiveOutputs,
    ResultsFeed,
    finishing,
    live_for,
    live_options,
)
from testbed.pkis import RunFleet, open_fleet, provision_pkis
from testbed.results import ResultsWriter, shard_results
from testbed.runner import (
    EXIT_INTERRUPTED,
    Device,
    OffsetClock,
    Render,
    Run,
    RunOutcome,
    finish_run,
    reraise_first,
    run_dir_for,
    run_meta,
    start_crls,
    write_edge,
    write_enforcer_config,
)
from testbed.scenario import (
    PROTOCOLS,
    CohortSpec,
    Event,
    Phase,
    PkiSpec,
    Scenario,
    ScenarioError,
    grpc_run,
    load_scenario,
    protocol_problem,
)
from testbed.scenario import Target as ScenarioTarget
from testbed.shards import ShardProgress, jobs_for, run_shards, start_epoch
from testbed.thresholds import Threshold, ThresholdError, parse_threshold
from testbed.verdict import DEFAULT_MAX_ERRORS, gates

MODES: dict[str, dict[str, bool]] = {
    "new-handshake": {
        "keep_alive": False,
        "resume_sessions": False,
        "reuse_cookie": False,
        "always_new_handshake": True,
    },
    "resume": {
        "keep_alive": False,
        "resume_sessions": True,
        "reuse_cookie": False,
        "always_new_handshake": False,
    },
    "keepalive": {
        "keep_alive": True,
        "resume_sessions": False,
        "reuse_cookie": False,
        "always_new_handshake": False,
    },
    "cookie": {
        "keep_alive": True,
        "resume_sessions": False,
        "reuse_cookie": True,
        "always_new_handshake": False,
    },
}


class LoadError(Exception):
    """A load run that cannot start: the message names the option and the problem."""


@dataclasses.dataclass(frozen=True)
class LoadPlan:
    """What ``testbed load`` was asked for (checked by :func:`check_plan`)."""

    target: str  # "embedded", "nginx" or an https:// URL
    duration: float
    fleet: Path | None = None
    scenario: Path | None = None
    rate: float | None = None
    ramp: tuple[float, float] | None = None
    step: tuple[float, float, float | None] | None = None  # start, increment, maximum
    closed: int | None = None  # closed loop: this many devices, back to back
    workers: int = 1
    mode: str = "new-handshake"
    ca: Path | None = None
    hostname: str | None = None
    path: str = "/"
    p99_ms: float = 100.0
    max_errors: float = DEFAULT_MAX_ERRORS
    enforcer_workers: int = 1
    thresholds: tuple[str, ...] = ()
    timeout: float = 10.0
    repeat: int = 1  # --step: run the staircase this many times
    no_events: bool = False  # --scenario: run without the scenario's timed events
    protocol: str | None = None  # http1, h2 or grpc for every cohort (None: the scenario's)


@dataclasses.dataclass(frozen=True)
class StepResult:
    """One step of a step run: its rate, and whether it held."""

    phase: str
    rate: float
    attempts: int
    errors: int
    dropped: int
    p99_ms: float | None
    held: bool
    repeat: int = 1  # which run of the staircase (--repeat)
    start_s: float | None = None  # when the step began, from the run's start

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return dataclasses.asdict(self)


def parse_rate_pair(text: str, option: str) -> tuple[float, float]:
    """Parse ``A:B`` (two rates per second) for ``option``."""
    try:
        a, b = (float(x) for x in text.split(":"))
    except ValueError:
        raise LoadError(f"{option}: expected A:B (attempts per second), got {text!r}") from None
    if a < 0 or b < 0 or a == b == 0:
        raise LoadError(f"{option}: rates must be positive, got {text!r}")
    return a, b


def parse_step(text: str) -> tuple[float, float, float | None]:
    """Parse ``START:STEP[:MAX]`` for ``--step``."""
    parts = text.split(":")
    try:
        numbers = [float(x) for x in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (2, 3) or any(n <= 0 for n in numbers):
        raise LoadError(f"--step: expected START:STEP[:MAX] (positive rates), got {text!r}")
    return numbers[0], numbers[1], numbers[2] if len(numbers) == 3 else None


def check_plan(plan: LoadPlan) -> None:
    """Refuse a plan that cannot run, naming the option."""
    if (plan.fleet is None) == (plan.scenario is None):
        raise LoadError("--fleet or --scenario: give exactly one")
    shapes = [plan.rate is not None, plan.ramp is not None, plan.step, plan.closed is not None]
    if sum(bool(s) for s in shapes) != 1:
        raise LoadError("--rate, --ramp, --step or --closed: give exactly one")
    if plan.rate is not None and plan.rate <= 0:
        raise LoadError(f"--rate: expected attempts per second above 0, got {plan.rate}")
    if plan.closed is not None and plan.closed < 1:
        raise LoadError(f"--closed: expected 1 or more devices, got {plan.closed}")
    if plan.duration <= 0:
        raise LoadError(f"--duration: expected a positive duration, got {plan.duration} s")
    if plan.workers < 1 or plan.enforcer_workers < 1:
        raise LoadError("--workers and --enforcer-workers: expected 1 or more")
    if plan.mode not in MODES:
        raise LoadError(f"--mode: expected one of {', '.join(MODES)}, got {plan.mode!r}")
    if plan.target not in ("embedded", "nginx"):
        url = urlsplit(plan.target)
        if url.scheme != "https" or not url.hostname:
            raise LoadError(
                f"--target: expected embedded, nginx or an https:// URL, got {plan.target!r}"
            )
    for option, path in (("--ca", plan.ca), ("--fleet", plan.fleet), ("--scenario", plan.scenario)):
        if path is not None and not path.exists():
            raise LoadError(f"{option}: {path} does not exist")
    if plan.fleet is not None and not (plan.fleet / "inventory.sqlite").exists():
        raise LoadError(
            f"--fleet: {plan.fleet} has no inventory.sqlite (make one with testbed fleet provision)"
        )
    if not 0 <= plan.max_errors <= 1:
        raise LoadError(f"--max-errors: expected a share between 0 and 1, got {plan.max_errors}")
    if plan.repeat < 1:
        raise LoadError(f"--repeat: expected 1 or more, got {plan.repeat}")
    if plan.repeat > 1 and not plan.step:
        raise LoadError("--repeat: repeats a --step staircase; give --step START:STEP[:MAX]")
    if plan.protocol is not None and plan.protocol not in PROTOCOLS:
        raise LoadError(
            f"--protocol: expected one of {', '.join(PROTOCOLS)}, got {plan.protocol!r}"
        )


def _phases(plan: LoadPlan) -> tuple[Phase, ...]:
    if plan.rate is not None:
        return (Phase("load", plan.duration, "constant", rate=plan.rate),)
    if plan.ramp is not None:
        a, b = plan.ramp
        return (Phase("ramp", plan.duration, "ramping", start_rate=a, end_rate=b),)
    if plan.closed is not None:
        return (Phase("closed", plan.duration, "active", devices=plan.closed),)
    return step_phases(plan, 1)


def step_phases(plan: LoadPlan, repeat: int) -> tuple[Phase, ...]:
    """The staircase of ``--step``, its phases named ``r<repeat>.step-<k>`` when repeated."""
    assert plan.step is not None
    start, increment, maximum = plan.step
    top = maximum if maximum is not None else start + 49 * increment
    prefix = f"r{repeat}." if plan.repeat > 1 else ""
    phases: list[Phase] = []
    rate = start
    while rate <= top + 1e-9:
        name = f"{prefix}step-{len(phases) + 1}"
        phases.append(Phase(name, plan.duration, "constant", rate=rate))
        rate += increment
    return tuple(phases)


def _cohorts_of_fleet(fleet_dir: Path) -> tuple[RunFleet, list[CohortSpec]]:
    fleet, first = open_fleet(fleet_dir)
    if not first:
        raise LoadError(f"--fleet: {fleet_dir} has no devices")
    _, only = fleet.fleets[0]
    specs = [CohortSpec(c.name, c.size, c.defect, first[c.name].expected) for c in only.cohorts]
    return fleet, specs


def build_scenario(plan: LoadPlan, specs: Sequence[CohortSpec], base: Scenario | None) -> Scenario:
    """The scenario a load run amounts to (real clock, the plan's phases and mode)."""
    # Open-loop phases take only the request from the behaviour; the closed loop runs it.
    behaviour = Closed(path=plan.path, method="GET", body_bytes=0)
    protocol = {"protocol": plan.protocol} if plan.protocol else {}
    cohorts = tuple(
        dataclasses.replace(c, behaviour=behaviour, clock_skew=0.0, **MODES[plan.mode], **protocol)
        for c in specs
    )
    declared = base.target.declared if base else ()
    if plan.hostname and declared:
        raise LoadError(
            f"--hostname: {plan.scenario} declares [[target.applications]], each with its own"
            " hostname; leave --hostname out"
        )
    if plan.target in ("embedded", "nginx"):
        target = dataclasses.replace(
            base.target if base else ScenarioTarget(),
            kind=plan.target,
            url=None,
            ca=None,
            workers=plan.enforcer_workers,
        )
        if plan.hostname:
            target = dataclasses.replace(target, hostname=plan.hostname)
    else:
        url = urlsplit(plan.target)
        target = ScenarioTarget(
            kind="external",
            hostname=plan.hostname or (declared[0].hostname if declared else url.hostname) or "",
            url=plan.target,
            ca=plan.ca,
            # The scenario's applications: which hostname each cohort's devices send.
            declared=declared,
        )
    kind = target.kind
    problem = protocol_problem(cohorts, "real", kind)
    if problem is not None:
        option = "--protocol" if plan.protocol else "--scenario"
        raise LoadError(f"{option}: {problem[1]}")
    names = [c.name for c in cohorts]
    try:
        extra = tuple(parse_threshold(t, names) for t in plan.thresholds)
    except ThresholdError as exc:
        raise LoadError(f"--threshold: {exc}") from None
    # The scenario's own thresholds are kept: a load from a scenario is judged as it says.
    thresholds = (base.thresholds if base else ()) + extra
    return Scenario(
        path=plan.scenario or plan.fleet or Path("."),
        name=f"load-{plan.mode}",
        seed=base.seed if base else 1,
        clock="real",
        target=target,
        cohorts=cohorts,
        phases=_phases(plan),
        events=(),  # run_load keeps those plan_events accepts: the parent applies them
        thresholds=thresholds,
        intermediates=base.intermediates if base else 1,
        key_type=base.key_type if base else "ec-p256",
        timeout=plan.timeout,
        pkis=base.pkis if base else (PkiSpec("fleet"),),
    )


def _at(seconds: float) -> str:
    return f"{seconds:g}s"


# What a load can change on each kind of target while it runs: the embedded enforcer through
# its state database (everything but its clock, which is the wall clock of another process),
# nginx through a new CRL and a reload, a URL nothing.
_EVENTS_BY_TARGET = {
    "embedded": (
        "revoke",
        "remove_root",
        "rotate_root",
        "set_policy",
        "set_session_duration",
        "stop_origin",
        "start_origin",
    ),
    "nginx": ("revoke",),
}


def plan_events(
    plan: LoadPlan, base: Scenario, planned: float
) -> tuple[tuple[Event, ...], list[str]]:
    """The scenario's events this load applies, and notes on those it does not.

    An event within the run that the target cannot take is refused (LoadError, exit 2, naming
    it): a run that silently dropped it would judge the devices against the wrong world.
    """
    if plan.no_events:
        return (), [f"{e.action} at {_at(e.at)}" for e in base.events]
    within = [e for e in base.events if e.at < planned]
    kind = plan.target if plan.target in _EVENTS_BY_TARGET else "url"
    refused = [e for e in within if e.action not in _EVENTS_BY_TARGET.get(kind, ())]
    if within and plan.step:
        refused = within  # a staircase stops when a step fails: its events have no fixed time
    if refused:
        named = ", ".join(f"{e.action} at {_at(e.at)}" for e in refused)
        why = (
            "a --step run stops at the first step that fails, so its timeline is not fixed"
            if plan.step
            else f"a load against {'a URL' if kind == 'url' else kind} cannot apply them"
            + (" (the enforcer runs on the wall clock)" if kind == "embedded" else "")
        )
        raise LoadError(
            f"--scenario: {base.path} has timed events within the run ({_at(planned)}) that"
            f" {why}: {named}; run the scenario with `testbed run`, or pass --no-events to"
            " load its fleet without them"
        )
    later = [
        f"{e.action} at {_at(e.at)} (after the run's end)" for e in base.events if e.at >= planned
    ]
    return tuple(within), later


def phase_results(dbs: Sequence[Path], phase: Phase) -> StepResult:
    """Attempts, errors, dropped attempts and p99 latency of one phase, read from databases."""
    latencies: list[float] = []
    errors = dropped = 0
    for path in dbs:
        if not path.exists():
            continue
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
        try:
            for total, outcome, expected in db.execute(
                "SELECT total_ms, outcome, expected FROM attempts WHERE phase = ?", (phase.name,)
            ):
                latencies.append(total)
                errors += outcome != expected
            dropped += db.execute(
                "SELECT count(*) FROM dropped WHERE phase = ?", (phase.name,)
            ).fetchone()[0]
        except sqlite3.Error:
            continue
        finally:
            db.close()
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None
    return StepResult(phase.name, phase.rate, len(latencies), errors, dropped, p99, held=False)


def judge_phase(dbs: Sequence[Path], phase: Phase, p99_ms: float, max_errors: float) -> StepResult:
    """A step's figures and verdict; a scheduled attempt never written counts as an error."""
    result = phase_results(dbs, phase)
    missing = max(0, int(phase.rate * phase.duration) - result.attempts - result.dropped)
    return judge_step(
        dataclasses.replace(result, errors=result.errors + missing), p99_ms, max_errors
    )


def judge_step(result: StepResult, p99_ms: float, max_errors: float) -> StepResult:
    """Whether a step held: p99 within the bound and errors (and drops) within the share."""
    scheduled = result.attempts + result.dropped
    held = (
        result.attempts > 0
        and result.p99_ms is not None
        and result.p99_ms <= p99_ms
        and (result.errors + result.dropped) <= max_errors * scheduled
    )
    return dataclasses.replace(result, held=held)


class _StepWatch:
    """Ends a step run after the first step that does not hold."""

    def __init__(self, scenario: Scenario, run_dir: Path, shards: int, plan: LoadPlan) -> None:
        self.phases = scenario.phases
        self.dbs = [shard_results(run_dir, k) for k in range(shards)]
        self.plan = plan
        self.run_dir = run_dir
        self.start_at: float | None = None
        self.judged: list[StepResult] = []

    def __call__(self, progress: ShardProgress) -> bool:
        k = len(self.judged)
        if k >= len(self.phases):
            return False
        if self.start_at is None:
            self.start_at = start_epoch(self.run_dir)
            if self.start_at is None:
                return False  # the shards have not started yet
        phase = self.phases[k]
        ends = self.start_at + sum(p.duration for p in self.phases[: k + 1])
        if time.time() < ends:
            return False
        # Judged once every scheduled attempt is written (or dropped), or once the slowest
        # could have timed out: the slow ones are not left out of the p99.
        seen = phase_results(self.dbs, phase)
        complete = seen.attempts + seen.dropped >= int(phase.rate * phase.duration)
        if not complete and time.time() < ends + self.plan.timeout:
            return False
        result = judge_phase(self.dbs, phase, self.plan.p99_ms, self.plan.max_errors)
        self.judged.append(result)
        return not result.held


def load_thresholds(plan: LoadPlan, scenario: Scenario) -> list[Threshold]:
    """What a load run is judged on: its thresholds and the default gates.

    ``--max-errors`` other than its default always sets the error budget; at the default, an
    ``errors`` threshold of the run's own replaces it. A step run judges errors step by step
    (its last step fails by design), so it has no run-wide error budget.
    """
    explicit = None if plan.max_errors == DEFAULT_MAX_ERRORS else plan.max_errors
    return gates(scenario.thresholds, max_errors=explicit, error_budget=plan.step is None)


def sustained_rate(steps: Sequence[StepResult]) -> float | None:
    """The highest rate of the steps that held before the first that did not."""
    best = None
    for s in steps:
        if not s.held:
            break
        best = s.rate
    return best


def rate_spread(rates: Sequence[float | None]) -> dict[str, Any]:
    """Min, median and max of the repeats' sustainable rates (a repeat with none counts 0)."""
    values = [r or 0.0 for r in rates]
    return {
        "repeats": len(values),
        "rates": list(rates),
        "min": min(values) if values else None,
        "median": statistics.median(values) if values else None,
        "max": max(values) if values else None,
    }


@dataclasses.dataclass
class _Repeat:
    """One run of the shards: the whole load, or one repeat of a staircase."""

    n: int
    scenario: Scenario
    dir: Path  # where its shards write and are merged
    watch: _StepWatch | None
    ended: Any = None  # the shards' outcome, once run
    epoch: float | None = None  # wall-clock time its schedule started
    elapsed: float = 0.0  # seconds from its start to the stop of its shards
    # (device, expected outcome, seconds from the start) for each change an event made
    changes: list[tuple[str, str, float]] = dataclasses.field(default_factory=list)

    def ran(self) -> list[tuple[Phase, float, float]]:
        """(phase, start, duration) of the phases that began, cut where the repeat stopped."""
        out, t = [], 0.0
        for phase in self.scenario.phases:
            if t >= self.elapsed:
                break
            out.append((phase, t, min(phase.duration, self.elapsed - t)))
            t += phase.duration
        return out


def _step_title(plan: LoadPlan, repeat: _Repeat) -> Callable[[float], str]:
    """The live display's title: the step running now, its rate, and the real time so far."""

    def title(t: float) -> str:
        k, start = 0, 0.0
        phases = repeat.scenario.phases
        while k < len(phases) - 1 and t >= start + phases[k].duration:
            start += phases[k].duration
            k += 1
        again = f" (repeat {repeat.n} of {plan.repeat})" if plan.repeat > 1 else ""
        return (
            f"step {k + 1} of at most {len(phases)} at {phases[k].rate:g}/s against"
            f" {plan.target}{again}: {t:,.1f} s ({plan.workers} workers)"
        )

    return title


def _fold(into: Path, part: Path, offset: float) -> None:
    """Copy a repeat's merged results into the run's, its times moved by ``offset`` seconds."""
    db = sqlite3.connect(str(into), isolation_level=None)
    try:
        db.execute("ATTACH DATABASE ? AS part", (str(part),))
        columns = [c for (_, c, *_rest) in db.execute("PRAGMA part.table_info(attempts)")]
        columns.remove("id")
        shifted = [f"{c} + ?" if c in ("scheduled", "started") else c for c in columns]
        db.execute("BEGIN IMMEDIATE")
        db.execute(
            f"INSERT INTO attempts ({', '.join(columns)})"
            f" SELECT {', '.join(shifted)} FROM part.attempts ORDER BY id",
            (offset, offset),
        )
        db.execute("INSERT INTO dropped SELECT t + ?, cohort, phase FROM part.dropped", (offset,))
        db.execute("INSERT INTO events SELECT t + ?, kind, detail FROM part.events", (offset,))
        db.execute("COMMIT")
        db.execute("DETACH DATABASE part")
    finally:
        db.close()


def _event_driver(
    scenario: Scenario, run_dir: Path, console: Console, fleet: RunFleet, writer: ResultsWriter
) -> Run:
    """A run with no connections of its own, which applies the events to the parent's target.

    It is ``testbed run``'s own event code (:meth:`Run.apply`), given the target the parent
    started and a stand-in for every device of the fleet, whichever shard drives it: after
    each event the stand-ins say what each device should now observe.
    """
    driver = Run(scenario, run_dir, console, writer=writer)
    driver.members = fleet.members()
    cohorts = {c.name: c for c in scenario.cohorts}
    driver.devices = [
        Device(m.id, cohorts[m.cohort], m.sha256, m.device.common_name, cast(DeviceClient, None))
        for m in driver.members
    ]
    return driver


async def _drive_events(driver: Run, repeat: _Repeat, nursery: trio.Nursery) -> None:
    """Apply the events at their times on the shards' clock; note whose expectation changed."""
    epoch = start_epoch(repeat.dir)
    while epoch is None:  # the shards have not started their schedule yet
        await trio.sleep(0.05)
        epoch = start_epoch(repeat.dir)
    for event in sorted(driver.scenario.events, key=lambda e: e.at):
        await trio.sleep(max(0.0, epoch + event.at - time.time()))
        before = {d.id: d.cohort.expected for d in driver.devices}
        if driver.enforcer is not None:
            driver.enforcer.controller.reload()  # what the target itself committed since
        detail = await driver.apply(event, nursery)
        # Committed: every connection the target accepts from now on sees the change.
        done = time.time() - epoch
        driver.writer.event(event.at, event.action, detail)
        repeat.changes += [
            (d.id, d.cohort.expected, done)
            for d in driver.devices
            if d.cohort.expected != before[d.id]
        ]


def _expect_after_events(results: Path, changes: Sequence[tuple[str, str, float]]) -> None:
    """Judge each attempt begun after an event against what the event made it expect."""
    db = sqlite3.connect(str(results), isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        for device, expected, since in sorted(changes, key=lambda c: c[2]):
            db.execute(
                "UPDATE attempts SET expected = ? WHERE device = ? AND started >= ?",
                (expected, device, since),
            )
        db.execute("COMMIT")
    finally:
        db.close()


def serve_target(argv: Sequence[str]) -> int:
    """Serve a load's embedded target so that it follows the events its parent commits."""
    import argparse
    import functools

    from enforcer.workers import run_workers, serve_config

    parser = argparse.ArgumentParser(prog="python -m testbed.load serve-target")
    parser.add_argument("config")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    if args.workers > 1:  # every worker follows the state database already
        return run_workers(args.config, args.host, args.port, args.workers)
    config = load_config(args.config)
    trio.run(functools.partial(serve_config, config, args.host, args.port, follow_store=True))
    return 0


async def _supervise(
    plan: LoadPlan,
    scenario: Scenario,
    run_dir: Path,
    fleet: RunFleet,
    now: dt.datetime,
    console: Console,
    progress: bool,
    repeats: Sequence[_Repeat],
    writer: ResultsWriter,
    cluster: Any = None,
) -> list[_Repeat]:
    """Start the target, run the shards against it (once per repeat), stop the target."""
    from testbed.nginx import free_port, start_nginx, stop_nginx, wait_listening

    host = scenario.target.hostname
    # On a Dask cluster the embedded target listens on this host's address facing the
    # scheduler, which the workers are told (testbed.cluster).
    listen = cluster.target_host if cluster is not None else "127.0.0.1"
    driver = _event_driver(scenario, run_dir, console, fleet, writer) if scenario.events else None
    async with trio.open_nursery() as nursery:
        proc: trio.Process | None = None
        if plan.target == "embedded":
            crls = start_crls(scenario, run_dir, fleet, now)
            if driver is not None:
                # The runner's origin, which its stop_origin and start_origin events control.
                origin = await driver._start_origin(nursery)
                driver.crls = crls
            elif grpc_run(scenario):
                origin = f"grpc://127.0.0.1:{await nursery.start(_serve_telemetry)}"
            else:
                listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
                origin = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
                nursery.start_soon(serve_echo_origin_on, listeners)
            config = write_enforcer_config(scenario, run_dir, fleet, origin, now, crls=crls)
            port = free_port()
            # With events, a target that follows its state database, where they are committed.
            serve = (
                [sys.executable, "-m", "testbed.load", "serve-target", str(config)]
                if driver is not None
                else [
                    sys.executable,
                    "-m",
                    "testbed.cli",
                    "enforcer",
                    "serve",
                    "--config",
                    str(config),
                ]
            )
            # The enforcer writes to its own copy of the descriptor: ours closes at once.
            with (run_dir / "enforcer.log").open("wb") as log:
                proc = await trio.lowlevel.open_process(
                    [
                        *serve,
                        *("--host", listen, "--port", str(port)),
                        *("--workers", str(scenario.target.workers)),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            try:
                await wait_listening(port, proc, "the enforcer", timeout=30)
            except (RuntimeError, trio.TooSlowError) as exc:
                proc.kill()
                raise LoadError(
                    f"--target embedded: {exc or 'not listening after 30 s'}"
                    f" (see {run_dir / 'enforcer.log'})"
                ) from None
            if driver is not None:
                # The parent's handle on the target's state: the events commit through it.
                driver.clock = OffsetClock(WallClock())
                driver.enforcer = Enforcer(
                    load_config(config), driver.clock, AccessLog(io.StringIO())
                )
            target = DeviceTarget(listen, port, host, run_dir / "edge" / "ca.pem")
        elif plan.target == "nginx":
            write_edge(scenario, run_dir, now)
            crls = start_crls(scenario, run_dir, fleet, now)
            upstream = None
            if grpc_run(scenario):
                # nginx passes verified devices to the telemetry service (grpc_pass).
                upstream = f"127.0.0.1:{await nursery.start(_serve_telemetry)}"
            try:
                proc, port = await start_nginx(
                    run_dir / "nginx",
                    cert=run_dir / "edge" / "cert.pem",
                    key=run_dir / "edge" / "key.pem",
                    client_ca=fleet.client_ca(run_dir / "edge" / "client-ca.pem"),
                    server_name=scenario.target.hostnames,
                    # The run's CRLs, as `testbed run` gives nginx: revoked devices are refused.
                    crl=crls.chain,
                    reloadable=driver is not None,
                    http2=any(c.protocol != "http1" for c in scenario.cohorts),
                    grpc_upstream=upstream,
                )
            except (RuntimeError, trio.TooSlowError) as exc:
                raise LoadError(f"--target nginx: nginx did not start: {exc}") from None
            if driver is not None:
                driver.crls = crls
                driver._nginx = (proc, run_dir / "nginx")
            target = DeviceTarget("127.0.0.1", port, host, run_dir / "edge" / "ca.pem")
        else:
            url = urlsplit(plan.target)
            target = DeviceTarget(url.hostname or "", url.port or 443, host, plan.ca)
        if cluster is not None:
            try:
                await trio.to_thread.run_sync(cluster.check_reachable, target.host, target.port)
            except Exception as exc:
                raise LoadError(str(exc)) from None
        try:
            done: list[_Repeat] = []
            for repeat in repeats:
                jobs = jobs_for(
                    repeat.scenario, repeat.dir, fleet, now, plan.workers, target=target
                )
                title = (
                    _step_title(plan, repeat)
                    if plan.step
                    else lambda t: (
                        f"{scenario.name} against {plan.target}: {t:,.1f} s of"
                        f" {scenario.duration:,.0f} s ({plan.workers} workers)"
                    )
                )
                async with trio.open_nursery() as during:
                    if driver is not None:
                        during.start_soon(_drive_events, driver, repeat, nursery)
                    repeat.ended = await run_shards(
                        jobs,
                        console=console,
                        progress=progress,
                        title=title,
                        watch=repeat.watch,
                        executor=cluster.shards(jobs) if cluster is not None else None,
                    )
                    during.cancel_scope.cancel()
                stopped = time.time()
                repeat.epoch = start_epoch(repeat.dir)
                repeat.elapsed = stopped - repeat.epoch if repeat.epoch is not None else 0.0
                done.append(repeat)
                if repeat.ended.failed or repeat.ended.interrupted:
                    break
            return done
        finally:
            with trio.CancelScope(shield=True):
                if proc is not None and plan.target == "nginx":
                    await stop_nginx(proc)
                elif proc is not None:
                    proc.terminate()
                    with trio.move_on_after(10):
                        await proc.wait()
                    if proc.returncode is None:
                        proc.kill()
            nursery.cancel_scope.cancel()


async def _serve_telemetry(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the telemetry gRPC service (a gRPC fleet's origin) until cancelled."""
    from testbed.telemetry import serve_telemetry

    async with serve_telemetry() as service:
        task_status.started(service.port)
        await trio.sleep_forever()


def run_load(
    plan: LoadPlan,
    reports: Path,
    *,
    console: Console | None = None,
    progress: bool = True,
    render: Render | None = None,
    live: LiveOptions | None = None,
    cluster: Any = None,
) -> tuple[RunOutcome, list[StepResult]]:
    """Run a load test; write its results and report; return the outcome and any steps.

    ``live``: the dashboard, metrics endpoint and progress line (outside a terminal the
    progress line replaces the live table). With ``cluster`` (a
    :class:`testbed.cluster.Cluster`), the shards run on its workers.
    """
    from testbed.nginx import NGINX

    check_plan(plan)
    if plan.target == "nginx" and NGINX is None:
        raise LoadError("--target nginx: nginx is not installed (apt-get install nginx)")
    base = None
    fleet: RunFleet | None = None  # provisioned for a scenario's fleet, in the run folder
    if plan.scenario is not None:
        try:
            base = load_scenario(plan.scenario)
        except ScenarioError as exc:
            raise LoadError(str(exc)) from None
        clients = [c.name for c in base.cohorts if c.kind != "devices"]
        if clients:
            # Its shards share one target the parent starts; logins and service tokens are
            # `testbed run`'s (the run creates the tokens and configures the provider).
            raise LoadError(
                f"{plan.scenario}: cohorts: {clients[0]} is not a device cohort; `testbed load`"
                " drives devices only: run people and service tokens with `testbed run`"
            )
        specs = list(base.cohorts)
    else:
        assert plan.fleet is not None
        fleet, specs = _cohorts_of_fleet(plan.fleet)
    scenario = build_scenario(plan, specs, base)
    # Checked before anything is written: a refused event is not worth a run folder.
    events, without = plan_events(plan, base, scenario.duration) if base else ((), [])
    # The run records (and its CRLs last through) the events; the shards never apply them:
    # the parent does, on the target it started (see _EventDriver).
    scenario = dataclasses.replace(scenario, events=events)
    console = console or Console(stderr=True)
    run_dir = run_dir_for(scenario, reports.resolve())
    # Outside a terminal the live outputs' thread prints the progress lines.
    options = live_options(live, progress and not console.is_terminal)
    progress = progress and console.is_terminal
    repeats = _plan_repeats(plan, scenario, run_dir)
    outputs = None
    if options.any:
        outputs = LiveOutputs(
            live_for(scenario, load_thresholds(plan, scenario), options),
            _live_feed(plan, run_dir, repeats),
            options,
        )
        try:
            outputs.__enter__()
        except LiveError as exc:
            raise LoadError(str(exc)) from None
    try:
        outcome, steps = _run_load(
            plan,
            scenario,
            base,
            fleet,
            events,
            without,
            console,
            progress,
            finishing(outputs, render),
            run_dir,
            repeats,
            outputs,
            cluster,
        )
    except BaseException:
        if outputs is not None:
            outputs.finish("failed", None)
        raise
    if outputs is not None:
        status = "interrupted" if outcome.exit_code == EXIT_INTERRUPTED else "finished"
        outputs.finish(status, outcome.thresholds if status == "finished" else None)
    return outcome, steps


def _live_feed(plan: LoadPlan, run_dir: Path, repeats: Sequence[_Repeat]) -> ResultsFeed:
    """Where a load's live figures come from: its shards' files (every repeat's), and the
    parent's results for the events it applies."""
    paths, keys = [], []
    for r in repeats:
        for k in range(plan.workers):
            paths.append(shard_results(r.dir, k))
            keys.append(str(k) if len(repeats) == 1 else f"{r.n}/{k}")
    return ResultsFeed(paths, shards=True, keys=keys, events=[run_dir / "results.sqlite"])


def _run_load(
    plan: LoadPlan,
    scenario: Scenario,
    base: Scenario | None,
    fleet: RunFleet | None,
    events: Sequence[Event],
    without: list[str],
    console: Console,
    progress: bool,
    render: Render | None,
    run_dir: Path,
    repeats: list[_Repeat],
    outputs: LiveOutputs | None,
    cluster: Any,
) -> tuple[RunOutcome, list[StepResult]]:
    run_dir.mkdir(parents=True)
    now = dt.datetime.now(dt.UTC)
    began = time.perf_counter()
    if base is not None:
        fleet = provision_pkis(scenario, run_dir, now)
    assert fleet is not None
    writer = ResultsWriter(run_dir / "results.sqlite")
    writer.set_meta(
        **run_meta(scenario),
        load={
            "target": plan.target,
            "mode": plan.mode,
            "workers": plan.workers,
            "fleet": str(plan.fleet or run_dir / "fleet"),
            "rate": plan.rate,
            "ramp": plan.ramp,
            "step": plan.step,
            "repeat": plan.repeat,
            "closed": plan.closed,
            "protocol": plan.protocol,
        },
        started_at=dt.datetime.now(dt.UTC).isoformat(),
    )
    if without:
        writer.set_meta(events_not_applied=without)
    try:
        done = trio.run(
            _supervise,
            plan,
            scenario,
            run_dir,
            fleet,
            now,
            console,
            progress,
            repeats,
            writer,
            cluster,
        )
    except BaseExceptionGroup as group:
        # The target is started inside a nursery, which wraps what it raises: a target that
        # cannot start is a LoadError (exit 2), not a traceback.
        reraise_first(group, LoadError)
    steps = _record_repeats(plan, run_dir, writer, done) if plan.step else []
    if events:
        _expect_after_events(run_dir / "results.sqlite", done[0].changes)
    last = done[-1].ended
    writer.set_meta(generator_cpu_seconds=sum(r.ended.cpu_seconds for r in done))
    if outputs is not None:
        for k, code in last.failed:
            outputs.live.set_shard(str(k), "failed", detail=f"exit code {code}")
        outputs.live.finish("reporting", None)  # the schedule is over; the report is rendered
    if last.failed:
        writer.set_meta(failed_shards=[k for k, _ in last.failed])
        lost = last.cluster.get("lost_shards") if last.cluster else None
        if lost:
            writer.set_meta(lost_shards=lost)
        finish_run(scenario, run_dir, writer, began, True, render)
        if lost:
            raise LoadError(
                "lost "
                + ", ".join(f"shard {x['shard']} (worker {x['worker']})" for x in lost)
                + f"; what the other shards wrote is in {run_dir}"
            )
        raise LoadError(f"a load worker failed; what the others wrote is in {run_dir}")
    judged = load_thresholds(plan, scenario)
    outcome = finish_run(
        scenario, run_dir, writer, began, last.interrupted, render, thresholds=judged
    )
    return outcome, steps


def _plan_repeats(plan: LoadPlan, scenario: Scenario, run_dir: Path) -> list[_Repeat]:
    """One shard run for a load; one per repeat of a staircase, each in its own folder."""
    if not plan.step:
        return [_Repeat(1, dataclasses.replace(scenario, events=()), run_dir, None)]
    repeats = []
    for n in range(1, plan.repeat + 1):
        phases = step_phases(plan, n)
        rep_scenario = dataclasses.replace(scenario, phases=phases)
        rep_dir = run_dir if plan.repeat == 1 else run_dir / "repeats" / str(n)
        repeats.append(
            _Repeat(n, rep_scenario, rep_dir, _StepWatch(rep_scenario, rep_dir, plan.workers, plan))
        )
    return repeats


def _record_repeats(
    plan: LoadPlan, run_dir: Path, writer: ResultsWriter, done: Sequence[_Repeat]
) -> list[StepResult]:
    """Judge every step of every repeat, fold repeats into the run, record the real timeline."""
    steps: list[StepResult] = []
    rates: list[float | None] = []
    phases_meta: list[dict[str, Any]] = []
    first = next((r.epoch for r in done if r.epoch is not None), None)
    duration = 0.0
    for repeat in done:
        if repeat.epoch is None or first is None:
            continue  # its shards never started
        offset = repeat.epoch - first
        if repeat.dir != run_dir:
            _fold(run_dir / "results.sqlite", repeat.dir / "results.sqlite", offset)
        # Judged again from the merged results, up to the step that failed; every step when
        # none did (the last ends with the run, before the watcher sees it complete). An
        # interrupted run keeps only the steps judged before the interruption.
        watch = repeat.watch
        assert watch is not None
        phases = repeat.scenario.phases
        failed = bool(watch.judged) and not watch.judged[-1].held
        reached = len(watch.judged) if failed or repeat.ended.interrupted else len(phases)
        mine = [
            dataclasses.replace(
                judge_phase([repeat.dir / "results.sqlite"], phase, plan.p99_ms, plan.max_errors),
                repeat=repeat.n,
                start_s=offset + sum(p.duration for p in phases[:k]),
            )
            for k, phase in enumerate(phases[:reached])
        ]
        steps += mine
        rates.append(sustained_rate(mine))
        # The timeline as it ran: a staircase stopped at its third step lasted three steps
        # (and the start of the fourth), not the whole staircase it planned.
        for phase, start, length in repeat.ran():
            phases_meta.append({"name": phase.name, "start": offset + start, "duration": length})
            duration = max(duration, offset + start + length)
    spread = rate_spread(rates)
    writer.set_meta(
        steps=[s.as_dict() for s in steps],
        # One repeat: its sustainable rate; several: their median (the spread says how far
        # they are apart).
        sustained_rate=(None if all(r is None for r in rates) or not rates else spread["median"]),
        sustained_rates=rates,
        sustained_rate_spread=spread,
        step_bounds={"p99_ms": plan.p99_ms, "max_errors": plan.max_errors},
        phases=phases_meta,
        duration=duration,
    )
    return steps


if __name__ == "__main__":
    if sys.argv[1:2] != ["serve-target"]:
        sys.exit("usage: python -m testbed.load serve-target CONFIG --port PORT [--workers N]")
    sys.exit(serve_target(sys.argv[2:]))
