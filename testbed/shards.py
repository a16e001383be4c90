"""A run split between processes: each shard drives its share of the fleet, one trio loop each.

Theory of operation. Device ``i`` of the fleet and arrival ``k`` of an open-loop phase belong
to shard ``i % N`` and ``k % N``, so the shards' schedules add up to the scenario's. Each shard
writes its own results database (``RUN_DIR/shards/<k>-results.sqlite``) as it goes; when the
shards have finished, or stopped, the parent folds them into ``results.sqlite`` (see
:func:`testbed.results.merge_shards`), and ``testbed report`` does the same for a run whose
parent died first. Nothing a shard wrote is lost to a crash of another process.

Who owns the target: on the virtual clock every shard runs its own embedded enforcer and
applies the scenario's events to it (the timeline is the same in every shard). On the real
clock the parent starts the target once (``testbed load``) and the shards only connect to it.

Stopping: Ctrl-C reaches the parent, which asks every shard to stop with SIGTERM; each shard
ends like a single-process run on Ctrl-C. A shard whose parent dies (even by SIGKILL) is sent
SIGTERM by the kernel (``PR_SET_PDEATHSIG``), so no shard outlives its run.

Executors: :func:`run_shards` drives the same jobs through an executor; the default,
:class:`ShardProcesses`, runs them as local processes; :class:`testbed.cluster.ClusterShards`
(``--cluster``) runs them as tasks on a Dask cluster and streams their rows into the same
``RUN_DIR/shards/<k>-results.sqlite`` files, so progress, ``--step`` judging and the merge are
the same code for both.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime as dt
import functools
import json
import multiprocessing
import signal
import sqlite3
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
import trio.testing
from rich.console import Console
from rich.live import Live

from devices.client import Target as DeviceTarget
from testbed.pkis import RunFleet
from testbed.results import ResultsWriter, merge_shards, shard_results
from testbed.runner import ProgressLines, Run, progress_table
from testbed.scenario import Scenario

_PR_SET_PDEATHSIG = 1
_CTX = multiprocessing.get_context("spawn")  # no trio loop or SQLite handle is inherited


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """What one shard process needs (pickled to it)."""

    scenario: Scenario
    run_dir: Path
    fleet: RunFleet
    now: dt.datetime
    shard: int
    shards: int
    target: DeviceTarget | None = None  # started by the parent; None: the shard embeds one
    ready: Any = None  # real clock: a barrier the shards pass together to start


@dataclasses.dataclass
class ShardsOutcome:
    """How the shards ended."""

    interrupted: bool
    failed: list[tuple[int, int | None]]  # (shard, exit code) of shards that crashed
    cpu_seconds: float = 0.0  # what the shards spent from their start, all together
    cluster: dict[str, Any] = dataclasses.field(default_factory=dict)  # a Dask run's figures


def _die_with_parent() -> None:
    # Linux only: elsewhere an orphaned shard runs to the end of its schedule and stops.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def shard_main(job: ShardJob) -> None:
    """Run one shard to its end (the body of a shard process)."""
    _die_with_parent()
    # Until the run's own signal handling is in place, a Ctrl-C (which reaches the whole
    # process group) must not kill the shard with a traceback: the parent forwards SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    run_job(job)


def run_job(job: ShardJob, run_class: type[Run] = Run) -> Run:
    """Run one shard's schedule in this thread to its end, writing its own results file."""
    run = run_class(
        job.scenario,
        job.run_dir,
        Console(stderr=True),
        shard=job.shard,
        shards=job.shards,
        target=job.target,
        ready=job.ready,
        # Even a single shard writes its own file: the parent merges, and watches as it goes.
        writer=ResultsWriter(
            shard_results(job.run_dir, job.shard), batched=job.scenario.clock == "virtual"
        ),
    )
    try:
        if job.scenario.clock == "virtual":
            clock = trio.testing.MockClock(autojump_threshold=0)
            trio.run(run.main, job.fleet, job.now, False, clock=clock)
        else:
            trio.run(run.main, job.fleet, job.now, False)
        run.writer.set_meta(interrupted=run.interrupted)
    finally:
        run.writer.close()
    return run


class ShardProgress:
    """The shards' counts so far, read from their databases as they grow."""

    def __init__(self, run_dir: Path, shards: int) -> None:
        self.paths = [shard_results(run_dir, k) for k in range(shards)]
        self.last = [0] * shards
        self.counts: Counter[str] = Counter()
        self.dropped = 0
        self.elapsed = 0.0

    def poll(self) -> None:
        """Add what the shards wrote since the last poll."""
        dropped = 0
        for k, path in enumerate(self.paths):
            if not path.exists():
                continue
            try:
                db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.2)
                try:
                    for outcome, n, last, started in db.execute(
                        "SELECT outcome, count(*), max(id), max(started) FROM attempts"
                        " WHERE id > ? GROUP BY outcome",
                        (self.last[k],),
                    ):
                        self.counts[outcome] += n
                        self.last[k] = max(self.last[k], last)
                        self.elapsed = max(self.elapsed, started)
                    dropped += db.execute("SELECT count(*) FROM dropped").fetchone()[0]
                finally:
                    db.close()
            except sqlite3.Error:
                continue  # a shard still creating its file: read it next time
        self.dropped = max(self.dropped, dropped)


class ShardProcesses:
    """The shards as local processes: the default executor of :func:`run_shards`.

    An executor starts the shards, lets ``poll`` bring their rows into
    ``RUN_DIR/shards/<k>-results.sqlite`` (local shards write there themselves), stops them and
    says which failed; :class:`testbed.cluster.ClusterShards` runs the same jobs on Dask.
    """

    def __init__(self, jobs: list[ShardJob]) -> None:
        self.jobs = jobs
        self.procs = [
            _CTX.Process(target=shard_main, args=(job,), name=f"shard-{job.shard}") for job in jobs
        ]

    def start(self) -> None:
        """Start every shard."""
        for p in self.procs:
            p.start()

    def poll(self) -> None:
        """Nothing to bring in: the shards write their own databases here."""

    def running(self) -> bool:
        """Whether any shard is still running."""
        return any(p.is_alive() for p in self.procs)

    def crashed(self) -> bool:
        """Whether a shard ended with an error."""
        return any(p.exitcode for p in self.procs)

    def abort_start(self) -> None:
        """Release the shards waiting to start: the others stop waiting for a dead shard."""
        for job in self.jobs:
            if job.ready is not None:
                job.ready.abort()

    def stop(self) -> None:
        """Ask every shard to stop (SIGTERM: the shard stops like a run on Ctrl-C)."""
        for p in self.procs:
            if p.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    p.terminate()

    async def join(self) -> None:
        """Wait for every shard process to end."""
        for p in self.procs:
            await trio.to_thread.run_sync(p.join)

    def failed(self) -> list[tuple[int, int | None]]:
        """(shard, exit code) of the shards that crashed."""
        return [
            (job.shard, p.exitcode)
            for job, p in zip(self.jobs, self.procs, strict=True)
            if p.exitcode
        ]

    def report(self, run_dir: Path) -> dict[str, Any]:
        """Nothing to add to the run's meta."""
        return {}

    def messages(self) -> list[str]:
        """One line per shard that crashed."""
        return [f"shard {shard} ended with exit code {code}" for shard, code in self.failed()]


async def run_shards(
    jobs: list[ShardJob],
    *,
    console: Console,
    progress: bool,
    title: Callable[[float], str],
    watch: Callable[[ShardProgress], bool] | None = None,
    executor: Any = None,
) -> ShardsOutcome:
    """Run the shards (as processes, or with ``executor``), show progress, merge the results.

    ``watch`` sees the progress every half second; when it returns True the shards are asked
    to stop (``testbed load --step`` stops at the first step that does not hold).
    """
    shards = executor if executor is not None else ShardProcesses(jobs)
    run_dir = jobs[0].run_dir
    seen = ShardProgress(run_dir, len(jobs))
    stopped = False  # by a signal: the run is interrupted
    ended = False  # by ``watch``: the run is over

    # A CI log cannot redraw a live table: plain lines every so often instead.
    lines = ProgressLines(console) if progress and not console.is_terminal else None
    live = (
        Live(console=console, refresh_per_second=2, transient=True)
        if progress and lines is None
        else contextlib.nullcontext()
    )
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals, live as display:
        try:
            shards.start()
            while shards.running():
                with trio.move_on_after(0.5):
                    async for _ in signals:
                        stopped = True
                        shards.stop()
                        break
                await trio.to_thread.run_sync(shards.poll)
                seen.poll()
                if shards.crashed():
                    shards.abort_start()
                if watch is not None and not (stopped or ended) and watch(seen):
                    ended = True
                    shards.stop()
                table = functools.partial(
                    progress_table, title(seen.elapsed), seen.counts, seen.dropped, seen.elapsed
                )
                if display is not None:
                    display.update(table())
                elif lines is not None:
                    lines.maybe(table)
        finally:
            with trio.CancelScope(shield=True):
                shards.stop()
                await shards.join()
    failed = shards.failed()
    metas = [_meta(shard_results(run_dir, j.shard)) for j in jobs]
    # A shard with no verdict did not reach its end: it was stopped or it crashed.
    interrupted = stopped or (not ended and any(m.get("interrupted", True) for m in metas))
    merge_shards(run_dir)
    report = shards.report(run_dir)
    if report:
        _set_meta(run_dir / "results.sqlite", cluster=report)
    for line in shards.messages():
        print(f"testbed: {line}", file=sys.stderr)
    cpu = sum(float(m.get("cpu_seconds", 0.0)) for m in metas)
    return ShardsOutcome(interrupted, failed, cpu, report)


def _set_meta(path: Path, **values: Any) -> None:
    db = sqlite3.connect(str(path), isolation_level=None, timeout=30)
    try:
        db.executemany(
            "INSERT OR REPLACE INTO run (key, value) VALUES (?, ?)",
            [(k, json.dumps(v)) for k, v in values.items()],
        )
    finally:
        db.close()


def _meta(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM run")}
    except sqlite3.Error:
        return {}
    finally:
        db.close()


def jobs_for(
    scenario: Scenario,
    run_dir: Path,
    fleet: RunFleet,
    now: dt.datetime,
    shards: int,
    *,
    target: DeviceTarget | None = None,
) -> list[ShardJob]:
    """One job per shard of a run."""
    ready = _CTX.Barrier(shards) if scenario.clock == "real" else None
    return [
        ShardJob(scenario, run_dir, fleet, now, k, shards, target, ready) for k in range(shards)
    ]


def start_epoch(run_dir: Path) -> float | None:
    """The wall-clock time at which shard 0 started its schedule, once it has."""
    value = _meta(shard_results(run_dir, 0)).get("start_epoch")
    return float(value) if value is not None else None
