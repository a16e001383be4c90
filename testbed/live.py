"""A run's live figures: one aggregator, fed from the results as they are written.

Theory of operation. Every run already writes each attempt to SQLite as it happens: a
single-process run to ``results.sqlite``, each shard of a split run (``--workers N``, and every
``testbed load``) to ``shards/<k>-results.sqlite`` (WAL mode; batched writers commit at least
every half second). :class:`ResultsFeed` reads what was added since its last look, once a
second, and hands the rows to one :class:`LiveRun`. So the run's hot path gains nothing, the
same code follows single-process, virtual-clock and split runs, and a shard process needs no
channel of its own: its file is the channel. Runs that get their results some other way (a
Dask cluster) feed the same aggregator with :meth:`LiveRun.add_rows` and report their shards
with :meth:`LiveRun.set_shard` (see docs/dashboard.md, "Feeding a run from elsewhere").

:class:`LiveOutputs` owns what shows the figures: the dashboard (:mod:`testbed.dashboard`), the
Prometheus endpoint (``--metrics-port``, metric names ``testbed_run_*``) and, outside a
terminal, a progress line every ``--progress-interval`` seconds. They run in a thread of their
own with its own trio loop on the wall clock: a virtual run's loop jumps its MockClock
whenever it waits, which a web server must not see. :class:`LiveRun` takes a lock for every
change and every read, so the two threads never see half an update.

Memory is bounded whatever the run's length: the per-second series is a ring buffer
(:data:`SERIES_POINTS`), markers are capped (:data:`MAX_MARKERS`), one poll reads at most
:data:`POLL_ROWS` rows per file, and a second's latency percentiles come from at most
:data:`TICK_SAMPLES` samples (its last ones).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sqlite3
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import trio

from testbed.results import _FIELDS, AttemptRow
from testbed.summary import _Group, _phase_values, fmt_rate, fmt_span
from testbed.thresholds import Threshold

SERIES_POINTS = 3600  # one point a second: the last hour of a longer run stays on the page
MAX_MARKERS = 500  # phase starts and events shown; a run with more keeps the first ones
POLL_ROWS = 50_000  # rows read per file per poll: a poll's work is bounded, the rest waits
TICK_SAMPLES = 20_000  # latencies per second kept for that second's percentiles
MAX_OUTCOMES = 12  # series per outcome on the chart; rarer outcomes are summed as "other"
TICK_SECONDS = 1.0
_HIGHEST_US = 3_600_000_000
# The run's latency histogram buckets for Prometheus (seconds): sub-millisecond virtual
# latencies up to a timeout.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def nearest_rank(ordered: Sequence[float], percentile: float) -> float | None:
    """The value at rank round(p/100 * n) (at least 1) of sorted values; None when empty."""
    if not ordered:
        return None
    return ordered[max(int(percentile / 100 * len(ordered) + 0.5), 1) - 1]


@dataclasses.dataclass
class Shard:
    """One shard's state as the dashboard shows it."""

    key: str
    state: str = "starting"  # starting, running, done, stopped, failed (or a feeder's own)
    attempts: int = 0
    detail: str = ""
    updated: float = 0.0  # wall time of the last change


class LiveRun:
    """A run's figures so far: counts, latencies, per-second series, markers, shards.

    Thread-safe: the run's side feeds it, the live outputs' thread reads it.
    """

    def __init__(
        self,
        *,
        scenario: str,
        clock: str,
        duration: float,
        cohorts: Mapping[str, Mapping[str, Any]],
        phases: Sequence[Mapping[str, Any]],
        thresholds: Sequence[Threshold] = (),
        detail: bool = True,
    ) -> None:
        self.scenario, self.clock, self.duration = scenario, clock, duration
        self.phases = list(phases)
        self.thresholds = list(thresholds)
        # ``detail``: every latency of every attempt (thresholds on them hold live); without
        # it (the progress line alone) only the total latency, at a third of the cost.
        self.detail = detail
        self._lock = threading.Lock()
        self.run = _Group()
        self.cohorts: dict[str, _Group] = {name: _Group() for name in cohorts}
        self.expected = {name: str(c.get("expected") or "") for name, c in cohorts.items()}
        self.dropped = 0
        self.run_time = 0.0  # how far the run's clock got (virtual seconds on the virtual clock)
        self.wall_start: float | None = None  # wall time at which the schedule started
        self.status = "waiting"  # waiting, running, finished, interrupted, failed
        self.verdicts: list[tuple[str, str, bool]] | None = None  # the run's own, at the end
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.latency_sum = 0.0
        self.series: deque[dict[str, Any]] = deque(maxlen=SERIES_POINTS)
        self.markers: list[dict[str, Any]] = []
        self._marker_keys: set[tuple[float, str, str]] = set()
        self.shards: dict[str, Shard] = {}
        self.events_by_kind: Counter[str] = Counter()
        self._tick_counts: Counter[str] = Counter()
        self._tick_latencies: list[float] = []
        self._tick_rows = 0
        self._last_tick: float | None = None
        self.seq = 0  # updates made so far (the page counts them)

    # -- feeding -----------------------------------------------------------------------------

    def add_rows(self, rows: Iterable[AttemptRow], shard: str | None = None) -> int:
        """Add attempts (as written to the results); ``shard`` names whose they are."""
        n = 0
        with self._lock:
            for row in rows:
                self._add(row)
                n += 1
            if shard is not None and n:
                s = self.shards.setdefault(shard, Shard(shard))
                s.attempts += n
                s.updated = time.time()
        return n

    def _add(self, row: AttemptRow) -> None:
        self.run.add(row, latencies=False)
        group = self.cohorts.get(row.cohort)
        if group is None:
            group = self.cohorts[row.cohort] = _Group()
        group.add(row, latencies=False)
        if self.detail:
            for name, ms in _phase_values(row):
                self.run.latency[name].record(ms)
        else:
            self.run.latency["total"].record(row.total_ms)
        seconds = row.total_ms / 1000
        self.latency_sum += seconds
        k = 0
        while k < len(BUCKETS) and seconds > BUCKETS[k]:
            k += 1
        self.buckets[k] += 1
        self.run_time = max(self.run_time, row.scheduled + seconds)
        self._tick_counts[row.outcome] += 1
        self._tick_rows += 1
        if len(self._tick_latencies) < TICK_SAMPLES:
            self._tick_latencies.append(row.total_ms)
        else:  # a ring: the second's last TICK_SAMPLES latencies
            self._tick_latencies[self._tick_rows % TICK_SAMPLES] = row.total_ms

    def add_dropped(self, n: int) -> None:
        """Count ``n`` more attempts that could not start on time."""
        with self._lock:
            self.dropped += n
            self.run.dropped += n

    def add_event(self, t: float, kind: str, detail: str, wall: float | None = None) -> None:
        """Mark a phase start or a timed event at ``t`` on the run's clock (once per event)."""
        key = (round(t, 6), kind, detail)
        with self._lock:
            if key in self._marker_keys or len(self.markers) >= MAX_MARKERS:
                return
            self._marker_keys.add(key)
            self.events_by_kind[kind] += 1
            if wall is None:
                # The real clock maps run time to wall time; a virtual run's events are shown
                # when they were seen.
                real = self.clock == "real" and self.wall_start is not None
                wall = self.wall_start + t if real and self.wall_start is not None else time.time()
            self.markers.append({"wall": wall, "t": t, "kind": kind, "detail": detail})

    def started(self, wall: float) -> None:
        """The run's schedule started at ``wall`` (epoch seconds)."""
        with self._lock:
            if self.wall_start is None:
                self.wall_start = wall
                self.status = "running"

    def set_shard(
        self, key: str, state: str, *, attempts: int | None = None, detail: str = ""
    ) -> None:
        """Report a shard's state (``running``, ``done``, ``failed``...) and, when the feeder
        knows it better than the rows added, its attempts so far."""
        with self._lock:
            s = self.shards.setdefault(key, Shard(key))
            s.state = state
            if attempts is not None:
                s.attempts = attempts
            if detail:
                s.detail = detail
            s.updated = time.time()

    def finish(self, status: str, verdicts: Sequence[tuple[str, str, bool]] | None) -> None:
        """The run ended (``finished``, ``interrupted`` or ``failed``), judged on ``verdicts``."""
        with self._lock:
            self.status = status
            self.verdicts = list(verdicts) if verdicts is not None else None

    # -- reading -----------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> dict[str, Any]:
        """Close this second: append (and return) its point of the series."""
        now = time.time() if now is None else now
        with self._lock:
            span = now - self._last_tick if self._last_tick is not None else TICK_SECONDS
            self._last_tick = now
            span = max(span, 1e-3)
            ordered = sorted(self._tick_latencies)
            point = {
                "t": now,
                "run_time": self.run_time,
                "rates": {o: n / span for o, n in self._tick_counts.items()},
                "p50": nearest_rank(ordered, 50),
                "p90": nearest_rank(ordered, 90),
                "p99": nearest_rank(ordered, 99),
            }
            self._tick_counts = Counter()
            self._tick_latencies = []
            self._tick_rows = 0
            self.series.append(point)
            self.seq += 1
            return point

    def summary(self) -> dict[str, Any]:
        """The figures so far in the shape of :func:`testbed.summary.summarize` (the parts
        thresholds read), so that they are judged as the run's end will judge them."""
        elapsed = self.run_time if self.clock == "virtual" else self._elapsed()
        totals = self.run.counts() | {
            "rate": self.run.attempts / elapsed if elapsed else None,
            "error_examples": dict(self.run.error_examples),
        }
        return {
            "run": {"meta": {}},
            "totals": totals,
            "latency": self.run.latency_stats(),
            "cohorts": {
                name: g.counts() | {"latency": _NO_LATENCY} for name, g in self.cohorts.items()
            },
        }

    def _elapsed(self) -> float:
        if self.wall_start is None:
            return 0.0
        if self.status != "running" and self.run_time:
            return min(self.run_time, self.duration)
        # Capped at the planned length, as the run's summary counts its rate: attempts still
        # finishing after the schedule's end do not make the run longer.
        return min(max(time.time() - self.wall_start, 0.0), self.duration)

    def state(self) -> dict[str, Any]:
        """Everything but the series, as the dashboard shows it (JSON-ready)."""
        with self._lock:
            return self._state()

    def _state(self) -> dict[str, Any]:
        from testbed.verdict import judge

        summary = self.summary()
        totals = summary["totals"]
        total = summary["latency"]["total"]
        if self.verdicts is not None:
            thresholds = [
                {"expression": e, "observed": o, "ok": ok, "final": True}
                for e, o, ok in self.verdicts
            ]
        else:
            thresholds = [
                {"expression": e, "observed": o, "ok": ok, "final": False}
                for e, o, ok in judge(self.thresholds, summary)
            ]
        elapsed = self.run_time if self.clock == "virtual" else self._elapsed()
        return {
            "scenario": self.scenario,
            "clock": self.clock,
            "duration": self.duration,
            "status": self.status,
            "seq": self.seq,
            "now": time.time(),
            "wall_start": self.wall_start,
            "run_time": elapsed,
            "phase": self._phase(elapsed),
            "totals": {
                "attempts": totals["attempts"],
                "rate": totals["rate"],
                "false_accepts": totals["false_accepts"],
                "false_rejects": totals["false_rejects"],
                "errors": totals["errors"],
                "dropped": self.dropped,
                "matched": totals["matched"],
                "outcomes": totals["outcomes"],
                "p50": total["p50"],
                "p90": total["p90"],
                "p99": total["p99"],
            },
            "cohorts": [
                {
                    "name": name,
                    "expected": self.expected.get(name, ""),
                    "attempts": g.attempts,
                    "matched": g.matched,
                    "matched_share": g.matched / g.attempts if g.attempts else None,
                    "false_accepts": g.false_accepts,
                    "false_rejects": g.false_rejects,
                    "errors": g.errors,
                }
                for name, g in self.cohorts.items()
            ],
            "thresholds": thresholds,
            "shards": [dataclasses.asdict(s) for s in self.shards.values()],
            "markers": list(self.markers),
        }

    def _phase(self, t: float) -> str | None:
        for p in self.phases:
            start = float(p.get("start", 0))
            if start <= t < start + float(p.get("duration", 0)):
                return str(p.get("name"))
        return None

    def snapshot(self) -> dict[str, Any]:
        """The full state and the whole series: what a page gets when it (re)connects."""
        with self._lock:
            return {"type": "snapshot", "state": self._state(), "series": list(self.series)}

    def update(self, point: Mapping[str, Any]) -> dict[str, Any]:
        """What a connected page gets each second: the state and the new point."""
        with self._lock:
            return {"type": "update", "state": self._state(), "points": [dict(point)]}

    def progress_line(self) -> str:
        """One line for a log: run time, attempts, rate, p99, false accepts, errors, dropped."""
        with self._lock:
            s = self.summary()
            elapsed = self.run_time if self.clock == "virtual" else self._elapsed()
        t, p99 = s["totals"], s["latency"]["total"]["p99"]
        virtual = " (virtual)" if self.clock == "virtual" else ""
        fa = t["false_accepts"]
        return (
            f"{self.scenario}: {fmt_span(elapsed)} of {fmt_span(self.duration)}{virtual}:"
            f" total {t['attempts']:,} attempts ({fmt_rate(t['rate'])}/s),"
            f" p99 {'-' if p99 is None else f'{p99:,.1f} ms'},"
            f" {'FALSE ACCEPTS' if fa else 'false accepts'} {fa:,},"
            f" errors {t['errors']:,}, dropped {self.dropped:,}"
        )

    def metric_families(self) -> Iterator[Any]:
        """The figures as Prometheus metric families (``testbed_run_*``)."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        with self._lock:
            s = self.summary()
            state = self._state()
            buckets = list(self.buckets)
            latency_sum = self.latency_sum
            shards = list(self.shards.values())
            events = dict(self.events_by_kind)
            outcomes = {n: dict(g.outcomes) for n, g in self.cohorts.items()}
        t = s["totals"]
        attempts = CounterMetricFamily(
            "testbed_run_attempts",
            "Attempts recorded, by cohort and outcome",
            labels=["cohort", "outcome"],
        )
        for cohort, seen in sorted(outcomes.items()):
            for outcome, n in sorted(seen.items()):
                attempts.add_metric([cohort, outcome], n)
        yield attempts
        for name, doc in (
            ("false_accepts", "Attempts let in that should have been kept out"),
            ("false_rejects", "Attempts refused that should have been let in"),
            ("errors", "Attempts that ended without a decision (timeouts, 5xx, transport)"),
            ("matched", "Attempts whose outcome was the one expected at their time"),
        ):
            family = CounterMetricFamily(f"testbed_run_{name}", doc, labels=["cohort"])
            for c in state["cohorts"]:
                family.add_metric([c["name"]], c[name])
            yield family
        yield CounterMetricFamily(
            "testbed_run_dropped", "Attempts that could not start on time", value=t["dropped"]
        )
        hist = HistogramMetricFamily(
            "testbed_run_attempt_duration_seconds",
            "Attempt latency from its scheduled start (run clock seconds)",
        )
        cumulative, out = 0, []
        for bound, n in zip([*BUCKETS, math.inf], buckets, strict=True):
            cumulative += n
            out.append(("+Inf" if bound == math.inf else repr(bound), cumulative))
        hist.add_metric([], out, sum_value=latency_sum)
        yield hist
        quantiles = GaugeMetricFamily(
            "testbed_run_latency_seconds",
            "Attempt latency percentiles so far (total, run clock seconds)",
            labels=["quantile"],
        )
        for q, key in (("0.5", "p50"), ("0.9", "p90"), ("0.99", "p99")):
            value = state["totals"][key]
            if value is not None:
                quantiles.add_metric([q], value / 1000)
        yield quantiles
        yield GaugeMetricFamily(
            "testbed_run_rate",
            "Attempts per second of the run's clock so far",
            value=t["rate"] or 0.0,
        )
        yield GaugeMetricFamily(
            "testbed_run_elapsed_seconds", "How far the run's clock got", value=state["run_time"]
        )
        yield GaugeMetricFamily(
            "testbed_run_duration_seconds", "The run's planned length", value=self.duration
        )
        running = GaugeMetricFamily(
            "testbed_run_status", "1 for the run's current status", labels=["status"]
        )
        running.add_metric([state["status"]], 1)
        yield running
        phase = GaugeMetricFamily("testbed_run_phase", "1 for the phase running", labels=["phase"])
        if state["phase"] is not None:
            phase.add_metric([state["phase"]], 1)
        yield phase
        held = GaugeMetricFamily(
            "testbed_run_threshold_ok",
            "1 while a threshold holds, 0 while it does not",
            labels=["threshold"],
        )
        for th in state["thresholds"]:
            held.add_metric([th["expression"]], 1 if th["ok"] else 0)
        yield held
        ev = CounterMetricFamily(
            "testbed_run_events", "Phase starts and timed events", labels=["kind"]
        )
        for kind, n in sorted(events.items()):
            ev.add_metric([kind], n)
        yield ev
        shard_attempts = CounterMetricFamily(
            "testbed_run_shard_attempts", "Attempts recorded by each shard", labels=["shard"]
        )
        shard_state = GaugeMetricFamily(
            "testbed_run_shard_state", "1 for each shard's state", labels=["shard", "state"]
        )
        for sh in shards:
            shard_attempts.add_metric([sh.key], sh.attempts)
            shard_state.add_metric([sh.key, sh.state], 1)
        yield shard_attempts
        yield shard_state


_NO_LATENCY: dict[str, Any] = {}  # cohort latencies are judged at the end only (see docs)


@dataclasses.dataclass
class _Source:
    path: Path
    attempts: bool  # read its attempts (else only its events)
    shard: str | None
    last_id: int = 0
    last_event: int = 0
    dropped: int = 0


class ResultsFeed:
    """Reads what runs wrote to their results databases since the last poll into a LiveRun."""

    def __init__(
        self,
        attempts: Sequence[Path],
        *,
        events: Sequence[Path] = (),
        shards: bool = False,
        keys: Sequence[str] | None = None,
        meta: Path | None = None,
    ) -> None:
        names = list(keys) if keys is not None else [str(k) for k in range(len(attempts))]
        self.sources = [
            _Source(p, True, names[k] if shards else None) for k, p in enumerate(attempts)
        ]
        self.sources += [_Source(p, False, None) for p in events]
        self.meta = meta or (attempts[0] if attempts else None)
        self.shards = shards
        # The live thread polls every second and the run's end polls once more, from its own
        # thread: one at a time, or a row would be counted twice.
        self._lock = threading.Lock()

    def poll(self, live: LiveRun) -> None:
        """Add the new attempts, drops and events; note when the schedule started."""
        with self._lock:
            self._poll(live)

    def _poll(self, live: LiveRun) -> None:
        if live.wall_start is None and self.meta is not None:
            epoch = _read_meta(self.meta).get("start_epoch")
            if isinstance(epoch, int | float):
                live.started(float(epoch))
        for src in self.sources:
            if not src.path.exists():
                continue
            try:
                self._poll_one(live, src)
            except sqlite3.Error:
                continue  # a file still being created: read it next time

    def _poll_one(self, live: LiveRun, src: _Source) -> None:
        db = sqlite3.connect(f"file:{src.path}?mode=ro", uri=True, timeout=0.2)
        try:
            if src.attempts:
                columns = ", ".join(["id", *_FIELDS])
                rows = db.execute(
                    f"SELECT {columns} FROM attempts WHERE id > ? ORDER BY id LIMIT ?",
                    (src.last_id, POLL_ROWS),
                ).fetchall()
                if rows:
                    src.last_id = rows[-1][0]
                    live.add_rows((_row(r[1:]) for r in rows), src.shard)
                (dropped,) = db.execute("SELECT count(*) FROM dropped").fetchone()
                if dropped > src.dropped:
                    live.add_dropped(dropped - src.dropped)
                    src.dropped = dropped
                if src.shard is not None:
                    meta = dict(db.execute("SELECT key, value FROM run"))
                    if "interrupted" in meta:
                        stopped = json.loads(meta["interrupted"])
                        live.set_shard(src.shard, "stopped" if stopped else "done")
                    elif "start_epoch" in meta:
                        live.set_shard(src.shard, "running")
                    else:
                        live.set_shard(src.shard, "starting")
            if src.attempts and src.shard is not None and src is not self.sources[0]:
                return  # every shard lives the same timeline: shard 0's events stand for all
            for rowid, t, kind, detail in db.execute(
                "SELECT rowid, t, kind, detail FROM events WHERE rowid > ? ORDER BY rowid",
                (src.last_event,),
            ).fetchall():
                src.last_event = rowid
                live.add_event(t, kind, detail)
        finally:
            db.close()


def _row(values: Sequence[Any]) -> AttemptRow:
    v = dict(zip(_FIELDS, values, strict=True))
    for flag in ("new_connection", "resumed", "cookie_sent", "logged_in"):
        v[flag] = bool(v[flag])
    return AttemptRow(**v)


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.2)
        try:
            return {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM run")}
        finally:
            db.close()
    except sqlite3.Error:
        return {}


@dataclasses.dataclass(frozen=True)
class LiveOptions:
    """What a run shows live: ``--dashboard``, ``--metrics-port``, the progress line."""

    dashboard: int | None = None  # port (0: any free port)
    metrics_port: int | None = None
    host: str = "127.0.0.1"
    progress_interval: float | None = None  # seconds between progress lines; None: none

    @property
    def any(self) -> bool:
        """Something to show: worth a thread."""
        return (
            self.dashboard is not None
            or self.metrics_port is not None
            or self.progress_interval is not None
        )

    @property
    def detail(self) -> bool:
        """Every latency is recorded (a dashboard or a scrape may judge any threshold)."""
        return self.dashboard is not None or self.metrics_port is not None


class LiveError(Exception):
    """A live output cannot start (a port in use); the message says which."""


class LiveOutputs:
    """The dashboard, the metrics endpoint and the progress line of one run, in their thread.

    Use as a context manager around the run; call :meth:`finish` with the verdicts before
    leaving it, so that the page and the last scrape show how the run ended.
    """

    def __init__(
        self, live: LiveRun, feed: ResultsFeed, options: LiveOptions, out: TextIO | None = None
    ) -> None:
        self.live, self.feed, self.options = live, feed, options
        self.out = out or sys.stderr
        self.dashboard_url: str | None = None
        self.metrics_url: str | None = None
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._metrics: Any = None
        self._finished = False

    def __enter__(self) -> LiveOutputs:
        if self.options.metrics_port is not None:
            self._start_metrics()
        self._thread = threading.Thread(target=self._thread_main, name="live-run", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._stop_metrics()
            raise self._error
        for what, url in (("dashboard", self.dashboard_url), ("metrics", self.metrics_url)):
            if url:
                print(f"{what}: {url}", file=self.out, flush=True)
        _ACTIVE.append(self.live)
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._finished:
            self.finish("interrupted" if exc[0] is not None else "finished", None)

    def finish(self, status: str, verdicts: Sequence[tuple[str, str, bool]] | None) -> None:
        """Read the last results, show how the run ended, then stop serving."""
        if self._finished:
            return
        self._finished = True
        with contextlib.suppress(ValueError):
            _ACTIVE.remove(self.live)
        self.feed.poll(self.live)
        self.live.finish(status, verdicts)
        if self._token is not None and self._stop is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._stop_metrics()

    def _start_metrics(self) -> None:
        from prometheus_client import start_http_server
        from prometheus_client.registry import CollectorRegistry

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self.live))
        port = self.options.metrics_port
        assert port is not None
        try:
            server, _ = start_http_server(port, addr=self.options.host, registry=registry)
        except OSError as exc:
            where = f"{self.options.host}:{port}"
            raise LiveError(
                f"--metrics-port {port}: cannot listen on {where}: {exc.strerror}"
            ) from None
        self._metrics = server
        self.metrics_url = f"http://{_url_host(self.options.host)}:{server.server_port}/metrics"

    def _stop_metrics(self) -> None:
        if self._metrics is not None:
            self._metrics.shutdown()
            self._metrics.server_close()
            self._metrics = None

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported to __enter__ when it happens at start
            while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]  # the nursery's wrapping of a port that is taken
            if not self._ready.is_set():
                self._error = exc
            else:
                print(f"testbed: live outputs stopped: {exc!r}", file=self.out, flush=True)
        finally:
            self._ready.set()

    async def _main(self) -> None:
        from testbed.dashboard import Dashboard

        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        dashboard: Dashboard | None = None
        async with trio.open_nursery() as nursery:
            if self.options.dashboard is not None:
                dashboard = Dashboard(self.live)
                try:
                    port = await nursery.start(
                        dashboard.serve, self.options.host, self.options.dashboard
                    )
                except OSError as exc:
                    raise LiveError(
                        f"--dashboard {self.options.dashboard}: cannot listen on"
                        f" {self.options.host}:{self.options.dashboard}: {exc.strerror}"
                    ) from None
                self.dashboard_url = f"http://{_url_host(self.options.host)}:{port}/"
            self._ready.set()
            interval = self.options.progress_interval
            last_line = time.monotonic()
            while not self._stop.is_set():
                with trio.move_on_after(TICK_SECONDS):
                    await self._stop.wait()
                if self._stop.is_set():
                    break
                await trio.to_thread.run_sync(self.feed.poll, self.live)
                point = self.live.tick()
                if dashboard is not None:
                    await dashboard.broadcast(self.live.update(point))
                running = self.live.status == "running"
                if running and interval is not None and time.monotonic() - last_line >= interval:
                    last_line = time.monotonic()
                    print(self.live.progress_line(), file=self.out, flush=True)
            # The end: the last second, the final state, then the pages are told it is over.
            point = self.live.tick()
            if interval is not None:
                print(self.live.progress_line(), file=self.out, flush=True)
            if dashboard is not None:
                await dashboard.broadcast(self.live.update(point) | {"type": "final"})
                await dashboard.close_all()
            nursery.cancel_scope.cancel()


class _Collector:
    """A prometheus-client collector reading the LiveRun at each scrape."""

    def __init__(self, live: LiveRun) -> None:
        self.live = live

    def collect(self) -> Iterator[Any]:
        yield from self.live.metric_families()


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


_ACTIVE: list[LiveRun] = []


def active() -> LiveRun | None:
    """The LiveRun of the run in progress in this process (None when nothing is shown live):
    what a run started elsewhere (a Dask cluster) feeds with add_rows and set_shard."""
    return _ACTIVE[-1] if _ACTIVE else None


def live_for(scenario: Any, thresholds: Sequence[Threshold], options: LiveOptions) -> LiveRun:
    """A LiveRun for a checked scenario (its cohorts, phases and the thresholds judged)."""
    return LiveRun(
        scenario=scenario.name,
        clock=scenario.clock,
        duration=scenario.duration,
        cohorts={c.name: {"expected": c.expected} for c in scenario.cohorts},
        phases=[
            {
                "name": p.name,
                "start": sum(q.duration for q in scenario.phases[:i]),
                "duration": p.duration,
            }
            for i, p in enumerate(scenario.phases)
        ],
        thresholds=thresholds,
        detail=options.detail,
    )


def maybe_outputs(
    live: Callable[[], LiveRun], feed: Callable[[], ResultsFeed], options: LiveOptions
) -> LiveOutputs | None:
    """Live outputs when the options ask for any, else None."""
    if not options.any:
        return None
    return LiveOutputs(live(), feed(), options)


__all__ = [
    "LiveError",
    "LiveOptions",
    "LiveOutputs",
    "LiveRun",
    "ResultsFeed",
    "active",
    "live_for",
]


def progress_every() -> float:
    """Seconds between progress lines by default: ``TESTBED_PROGRESS_EVERY``, else 10."""
    return float(os.environ.get("TESTBED_PROGRESS_EVERY", "10"))


def live_options(options: LiveOptions | None, lines: bool) -> LiveOptions:
    """The live outputs of a run: ``options`` with progress lines only when ``lines`` (no
    terminal to draw the live table on), every ``--progress-interval`` or
    :func:`progress_every` seconds."""
    options = options or LiveOptions()
    if not lines:
        return dataclasses.replace(options, progress_interval=None)
    if options.progress_interval is None:
        return dataclasses.replace(options, progress_interval=progress_every())
    return options


DEFAULT_DASHBOARD_PORT = 8089  # Locust's web UI port: where an SRE looks for a load's page


def add_live_arguments(parser: Any) -> None:
    """Add ``--dashboard [PORT]``, ``--metrics-port``, ``--live-host`` and
    ``--progress-interval`` to a run's argparse parser."""
    parser.add_argument(
        "--dashboard",
        type=_port,
        nargs="?",
        const=DEFAULT_DASHBOARD_PORT,
        default=None,
        metavar="PORT",
        help=f"serve a live page of the run on PORT (default {DEFAULT_DASHBOARD_PORT};"
        " 0: any free port; the URL is printed)",
    )
    parser.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        metavar="PORT",
        help="serve the run's live figures as Prometheus metrics (testbed_run_*) on PORT",
    )
    parser.add_argument(
        "--live-host",
        default="127.0.0.1",
        metavar="ADDRESS",
        help="where --dashboard and --metrics-port listen (default 127.0.0.1)",
    )
    parser.add_argument(
        "--progress-interval",
        type=_interval,
        default=None,
        metavar="SECONDS",
        help="outside a terminal, a progress line every SECONDS"
        " (default: env TESTBED_PROGRESS_EVERY, else 10)",
    )


def options_from(args: Any) -> LiveOptions:
    """The live options given on a run's command line."""
    return LiveOptions(
        dashboard=args.dashboard,
        metrics_port=args.metrics_port,
        host=args.live_host,
        progress_interval=args.progress_interval,
    )


def _port(text: str) -> int:
    import argparse

    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port between 0 and 65535, got {port}")
    return port


def _interval(text: str) -> float:
    import argparse

    try:
        value = float(text.removesuffix("s"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected seconds, such as 5 or 0.5, got {text!r}"
        ) from None
    if not value >= 0 or value == math.inf:
        raise argparse.ArgumentTypeError(f"expected 0 or more seconds, got {text!r}")
    return value


# A run's report writer (testbed.runner.Render): the run directory and the judged summary.
_Render = Callable[[Path, "dict[str, Any] | None"], Any]


def finishing(outputs: LiveOutputs | None, render: _Render | None) -> _Render | None:
    """``render`` preceded by the live outputs' end: the pages get the run's verdicts (read
    from its results) as soon as they are judged, not after the report's plots are drawn."""
    if outputs is None:
        return render

    def wrapped(run_dir: Path, summary: dict[str, Any] | None) -> Any:
        verdicts = _read_verdicts(run_dir / "results.sqlite")
        # An interrupted run is not judged: it has no verdicts.
        outputs.finish("finished" if verdicts else "interrupted", verdicts or None)
        return render(run_dir, summary) if render is not None else None

    return wrapped


def _read_verdicts(path: Path) -> list[tuple[str, str, bool]]:
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
        try:
            rows = db.execute("SELECT expression, observed, ok FROM thresholds ORDER BY position")
            return [(e, o, bool(k)) for e, o, k in rows]
        finally:
            db.close()
    except sqlite3.Error:
        return []
