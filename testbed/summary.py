"""A run's summary as plain data: what ``summary.json`` holds and thresholds are judged on.

Theory of operation. :func:`summarize` reads a results database once, attempt by attempt, and
records each latency into HDR histograms (microseconds, 3 significant digits, so every
percentile is within 0.1% of the exact one, whatever the run's size). Percentiles follow HDR's
nearest-rank definition (the per-second time series, for the plots, applies it exactly to
each bucket's values). Nothing here renders: the report, the plots and the terminal table
all start from the dict returned, and :func:`metric` answers threshold names from it alone.

Which attempts each latency counts, so that zeros from phases that did not happen (a kept-alive
request opens no connection) do not drag percentiles down:

- ``total`` (from the *scheduled* start) and ``service`` (from the actual start): every attempt;
- ``connect``: attempts that opened a connection (``new_connection``);
- ``handshake`` and ``key_store``: full handshakes (a new connection, not resumed);
- ``first_byte``: attempts that got an HTTP response (``status`` set).

How each attempt is judged, against the outcome expected *at its time* (the runner records it
per attempt, so expectations follow events such as a mid-run revocation): an outcome is
``allowed``, ``refused`` (a decision against the device: ``denied:*``, a 4xx, a TLS alert about
its certificate), ``device`` (its key store failed) or ``error`` (no decision: a timeout, a
refused connection, a failed handshake, a 5xx). A false accept is ``allowed`` where anything
else was expected; a false reject is a refusal where ``allowed`` was; an error is an ``error``
outcome the attempt did not expect. So a timeout is never a false reject: it is an error.

Latencies are in milliseconds, shares in 0..1; a statistic without samples is ``None``.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

from testbed.results import AttemptRow, Results

# The latencies (a device's phases, a person's login and callback) and their statistics:
# thresholds name the same ones.
from testbed.thresholds import LATENCIES, STATS

COUNTS = ("false_accepts", "false_rejects", "attempts", "dropped", "errors", "decisions", "rate")
# Per-cohort shares of attempts, by threshold name: ``cohort.<name>.new_connections == 100%``.
COHORT_SHARES = {
    "new_connections": "new_connection_share",
    "full_handshakes": "full_handshake_share",
}
# Percentiles kept for the CDF plots: dense where tails live.
CDF_PERCENTILES = (
    *(float(p) for p in range(0, 100)),
    99.5,
    99.9,
    99.95,
    99.99,
    100.0,
)
_PERCENTILES = {"p50": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0, "p99.9": 99.9}
_HIGHEST_US = 3_600_000_000  # one hour; anything slower is clamped (and is a timeout anyway)
_MAX_BUCKETS = 600  # the time series grows its buckets beyond this, plots stay readable


class _Latency:
    """One latency's HDR histogram (microseconds) plus an exact sum for the mean."""

    def __init__(self) -> None:
        self.hist = HdrHistogram(1, _HIGHEST_US, 3)
        self.total_ms = 0.0

    def record(self, ms: float) -> None:
        """Record one value in milliseconds (clamped into the histogram's range)."""
        us = min(max(round(ms * 1000), 0), _HIGHEST_US)
        self.hist.record_value(us)
        self.total_ms += ms

    def merge(self, other: _Latency) -> None:
        """Add another histogram's values into this one."""
        if other.hist.get_total_count():
            self.hist.add(other.hist)
            self.total_ms += other.total_ms

    def stats(self) -> dict[str, Any]:
        """Count, percentiles, max and mean (ms; ``None`` when empty)."""
        count = self.hist.get_total_count()
        out: dict[str, Any] = {"count": count}
        if not count:
            return out | {name: None for name in STATS}
        values = self.hist.get_percentile_to_value_dict(list(_PERCENTILES.values()))
        for name, p in _PERCENTILES.items():
            out[name] = values[p] / 1000
        out["max"] = self.hist.get_max_value() / 1000
        out["mean"] = self.total_ms / count
        return out

    def cdf(self) -> list[list[float]]:
        """``[percentile, ms]`` pairs at :data:`CDF_PERCENTILES` (empty when no samples)."""
        if not self.hist.get_total_count():
            return []
        values = self.hist.get_percentile_to_value_dict(list(CDF_PERCENTILES))
        return [[p, values[p] / 1000] for p in CDF_PERCENTILES if p in values]


def _phase_values(row: AttemptRow) -> Iterable[tuple[str, float]]:
    """The (latency, ms) pairs this attempt contributes (see the module docstring)."""
    yield "total", row.total_ms
    yield "service", row.service_ms
    if row.new_connection:
        yield "connect", row.connect_ms
        if not row.resumed:
            yield "handshake", row.handshake_ms
            yield "key_store", row.key_store_ms
    if row.status is not None:
        yield "first_byte", row.first_byte_ms
    if row.logged_in:
        yield "login", row.login_ms
        yield "callback", row.callback_ms


# TLS alerts a server sends about the client's certificate: the target refused the device
# during the handshake, a decision as much as a 403 is.
_REFUSAL_ALERTS = (
    "alert_bad_certificate",
    "alert_unknown_ca",
    "alert_certificate_required",
    "alert_certificate_revoked",
    "alert_certificate_expired",
    "alert_certificate_unknown",
    "alert_unsupported_certificate",
    "alert_access_denied",
)


# gRPC statuses a target answers when it refuses the device, without a reason it can name.
_GRPC_REFUSALS = ("grpc_unauthenticated", "grpc_permission_denied")


@functools.cache  # a run has a handful of distinct outcomes and summaries read every attempt
def outcome_kind(outcome: str) -> str:
    """Sort an outcome: ``allowed``, ``refused`` (the target decided against the device),
    ``device`` (the device could not take part: its key store failed) or ``error`` (no
    decision: a timeout, a refused connection, a failed handshake, a 5xx)."""
    if outcome == "allowed":
        return "allowed"
    if outcome.startswith("denied:"):
        return "refused"
    if outcome.startswith("http_4"):
        return "refused"  # the target answered, and not with access (nginx's 400, a bare 403)
    if outcome in _GRPC_REFUSALS:
        return "refused"  # a gRPC denial without a reason code (nginx's, see testbed/nginx.py)
    if outcome.startswith("tls_error:") and outcome.endswith(_REFUSAL_ALERTS):
        return "refused"
    if outcome == "login_error:credentials_rejected":
        return "refused"  # the identity provider refused the person's password
    if outcome.startswith("key_store_error:"):
        return "device"
    return "error"


def is_decision(outcome: str) -> bool:
    """The target decided: it let the device in or refused it."""
    return outcome_kind(outcome) in ("allowed", "refused")


def is_false_accept(expected: str, outcome: str) -> bool:
    """A device that should have been kept out (refused, or failing before the target) got in:
    the security failure."""
    return expected != "allowed" and outcome == "allowed"


def is_false_reject(expected: str, outcome: str) -> bool:
    """A device that should have got in was refused by the target (a timeout is no refusal)."""
    return expected == "allowed" and outcome_kind(outcome) == "refused"


def is_error(outcome: str, expected: str | None = None) -> bool:
    """No decision and no device-side failure: the edge or the network failed (unless that very
    outcome was what this attempt expected)."""
    return outcome_kind(outcome) == "error" and outcome != expected


def reached(expected: str, outcome: str) -> bool:
    """The attempt got an answer worth judging: a decision, or the outcome it expected."""
    return is_decision(outcome) or outcome == expected


class _Group:
    """Counts shared by the whole run, a cohort and a phase."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.expected: Counter[str] = Counter()
        self.rejections: Counter[str] = Counter()
        self.protocols: Counter[str] = Counter()
        self.grpc_statuses: Counter[str] = Counter()
        self.matched = self.false_accepts = self.false_rejects = self.dropped = 0
        self.errors = self.decisions = 0
        # Per outcome expected at the attempt's time: how many attempts, and what they got.
        self.by_expected: dict[str, Counter[str]] = defaultdict(Counter)
        # The first detail of each error outcome (bounded: one per distinct outcome).
        self.error_examples: dict[str, str] = {}
        self.latency: dict[str, _Latency] = defaultdict(_Latency)
        self.new_connections = self.resumed = self.cookie_admitted = 0
        self.logins = 0  # people's requests that logged in first
        # Sums over attempts that opened a connection, for the phase breakdown.
        self.breakdown = {"connect": 0.0, "key_store": 0.0, "tls": 0.0, "first_byte": 0.0}

    @property
    def attempts(self) -> int:
        return sum(self.outcomes.values())

    def add(self, row: AttemptRow, latencies: bool = True) -> None:
        self.outcomes[row.outcome] += 1
        self.expected[row.expected] += 1
        if row.outcome == row.expected:
            self.matched += 1
        if is_false_accept(row.expected, row.outcome):
            self.false_accepts += 1
        if is_false_reject(row.expected, row.outcome):
            self.false_rejects += 1
        if is_error(row.outcome, row.expected):
            self.errors += 1
            if row.outcome not in self.error_examples and len(self.error_examples) < 20:
                self.error_examples[row.outcome] = row.error or ""
        if reached(row.expected, row.outcome):
            self.decisions += 1
        self.by_expected[row.expected][row.outcome] += 1
        self.protocols[row.protocol] += 1
        if row.grpc_status is not None:
            self.grpc_statuses[row.grpc_status] += 1
        if row.outcome != "allowed":
            # The enforcer's reason header when it gave one, else how the attempt failed; a
            # gRPC call's status beside it (a denial's UNAUTHENTICATED or PERMISSION_DENIED).
            key = row.reason or row.outcome
            self.rejections[f"{key} [{row.grpc_status}]" if row.grpc_status else key] += 1
        self.logins += row.logged_in
        if row.cookie_sent and row.outcome == "allowed":
            self.cookie_admitted += 1
        if row.new_connection:
            self.new_connections += 1
            self.resumed += row.resumed
            b = self.breakdown
            b["connect"] += row.connect_ms
            b["key_store"] += row.key_store_ms
            # The handshake's time includes the key store's (PIN, touch, signature).
            b["tls"] += max(row.handshake_ms - row.key_store_ms, 0.0)
            b["first_byte"] += row.first_byte_ms
            if row.logged_in:
                # A person's session start: the login (navigation and provider) and callback.
                b["login"] = b.get("login", 0.0) + row.login_ms
                b["callback"] = b.get("callback", 0.0) + row.callback_ms
        if latencies:
            for name, ms in _phase_values(row):
                self.latency[name].record(ms)

    def counts(self) -> dict[str, Any]:
        n = self.attempts
        return {
            "attempts": n,
            "outcomes": dict(self.outcomes.most_common()),
            "expected_outcomes": dict(self.expected.most_common()),
            "matched": self.matched,
            "matched_share": self.matched / n if n else None,
            "allowed": self.outcomes["allowed"],
            "false_accepts": self.false_accepts,
            "false_rejects": self.false_rejects,
            "errors": self.errors,
            "decisions": self.decisions,
            "dropped": self.dropped,
            # Each outcome expected (expectations follow events: a revocation mid-run gives a
            # cohort two), with its attempts, how many matched and what was observed.
            "by_expected": [
                {
                    "expected": e,
                    "attempts": sum(seen.values()),
                    "matched": seen[e],
                    "outcomes": dict(seen.most_common()),
                }
                for e, seen in sorted(
                    self.by_expected.items(), key=lambda kv: (-sum(kv[1].values()), kv[0])
                )
            ],
            "unmatched_outcomes": self.unmatched(),
            # What the devices spoke (http1, h2, grpc), and the gRPC calls' status codes.
            "protocols": dict(self.protocols.most_common()),
            "grpc_statuses": dict(self.grpc_statuses.most_common()),
            # How attempts got in, for comparing No Duration with cookies: a full handshake
            # with the certificate, a resumed TLS session, or the CF_Authorization cookie.
            "full_handshakes": self.new_connections - self.resumed,
            "resumed": self.resumed,
            "cookie_admitted": self.cookie_admitted,
            "full_handshake_share": (self.new_connections - self.resumed) / n if n else None,
            # Attempts that opened a connection (resumed or not): what No Duration costs.
            "new_connections": self.new_connections,
            "new_connection_share": self.new_connections / n if n else None,
        }

    def unmatched(self) -> dict[str, int]:
        """Observed outcomes that were not what their own attempt expected, most common first."""
        out: Counter[str] = Counter()
        for expected, seen in self.by_expected.items():
            for outcome, n in seen.items():
                if outcome != expected:
                    out[outcome] += n
        return dict(out.most_common())

    def latency_stats(self) -> dict[str, dict[str, Any]]:
        return {name: self.latency[name].stats() for name in LATENCIES}

    def breakdown_means(self) -> dict[str, Any]:
        n = self.new_connections
        means = {k: (v / n if n else None) for k, v in self.breakdown.items()}
        return means | {"samples": n}


def _group(groups: dict[str, _Group], name: str) -> _Group:
    """The group called ``name``, made on first use (in order of appearance)."""
    group = groups.get(name)
    if group is None:
        group = groups[name] = _Group()
    return group


def _timestamp(value: Any) -> float | None:
    """Seconds since the epoch from a number or an ISO 8601 string, else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value)
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=dt.UTC)
        return parsed.timestamp()
    return None


def _wall_seconds(
    meta: Mapping[str, Any], started: float | None, finished: float | None
) -> float | None:
    """Wall-clock seconds the run took: as the runner measured it, else from its timestamps."""
    if isinstance(meta.get("wall_seconds"), int | float):
        return float(meta["wall_seconds"])
    return finished - started if started is not None and finished is not None else None


def _phases_meta(meta: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    phases = meta.get("phases") or []
    return [p for p in phases if isinstance(p, Mapping) and "name" in p]


def summarize(results: Results) -> dict[str, Any]:
    """Read a run's results and return its summary (JSON-serialisable, nothing rendered)."""
    meta = results.meta()
    complete = "finished_at" in meta
    cohorts_meta: Mapping[str, Any] = meta.get("cohorts") or {}
    phases_meta = _phases_meta(meta)

    run = _Group()
    cohorts: dict[str, _Group] = {name: _Group() for name in cohorts_meta}
    phases: dict[str, _Group] = {str(p["name"]): _Group() for p in phases_meta}
    protocols: dict[str, _Group] = {}
    phase_total: dict[str, _Latency] = defaultdict(_Latency)
    matrix: dict[str, Counter[str]] = defaultdict(Counter)
    timeline: list[tuple[float, str, float]] = []  # (scheduled, outcome, total_ms)
    span = 0.0
    for row in results.attempts():
        # The run's latencies are the cohorts' histograms merged, not recorded twice.
        run.add(row, latencies=False)
        _group(cohorts, row.cohort).add(row)
        _group(phases, row.phase).add(row, latencies=False)
        _group(protocols, row.protocol).add(row)
        phase_total[row.phase].record(row.total_ms)
        matrix[row.expected][row.outcome] += 1
        timeline.append((row.scheduled, row.outcome, row.total_ms))
        span = max(span, row.scheduled + row.total_ms / 1000)
    for group in cohorts.values():
        for latency, hist in group.latency.items():
            run.latency[latency].merge(hist)
    dropped = results.dropped()
    for t, cohort, phase in dropped:
        run.dropped += 1
        _group(cohorts, cohort).dropped += 1
        _group(phases, phase).dropped += 1
        span = max(span, t)
    events = [{"t": t, "kind": kind, "detail": detail} for t, kind, detail in results.events()]
    thresholds = [{"expression": e, "observed": o, "ok": ok} for e, o, ok in results.thresholds()]

    duration = _duration(meta, phases_meta, complete, span)
    started = _timestamp(meta.get("started_at"))
    finished = _timestamp(meta.get("finished_at"))
    wall = _wall_seconds(meta, started, finished)
    totals = run.counts() | {
        "duration_s": duration,
        # Per second of the run's clock (virtual seconds on the virtual clock)...
        "rate": run.attempts / duration if duration > 0 else None,
        # ...and per second of wall time, which is what a virtual run costs the machine.
        "rate_wall": run.attempts / wall if wall else None,
        "new_connections": run.new_connections,
        "resumed": run.resumed,
        "error_examples": run.error_examples,
    }
    return {
        "version": 1,
        "run": {
            "scenario": meta.get("scenario"),
            "seed": meta.get("seed"),
            "clock": meta.get("clock"),
            "target": meta.get("target"),
            "started_at": meta.get("started_at"),
            "finished_at": meta.get("finished_at"),
            "wall_s": wall,
            "meta": meta,
        },
        "complete": complete,
        "totals": totals,
        "latency": run.latency_stats(),
        "cdf": run.latency["total"].cdf(),
        "cohorts": {
            name: _cohort_summary(name, group, cohorts_meta.get(name) or {})
            for name, group in cohorts.items()
        },
        "phases": _phase_summaries(phases, phases_meta, phase_total),
        # Per protocol the devices spoke: counts, gRPC statuses and latencies.
        "protocols": {
            name: {**group.counts(), "latency": group.latency_stats()}
            for name, group in sorted(protocols.items())
        },
        "matrix": {e: dict(o.most_common()) for e, o in sorted(matrix.items())},
        "series": _series(timeline, dropped, max(duration, span)),
        "events": events,
        "thresholds": thresholds,
    }


def _duration(
    meta: Mapping[str, Any], phases: list[Mapping[str, Any]], complete: bool, span: float
) -> float:
    """The run's length on its own clock (virtual runs take little wall time)."""
    if isinstance(meta.get("duration"), int | float):
        return float(meta["duration"])
    if complete and phases:
        return max(float(p.get("start", 0)) + float(p.get("duration", 0)) for p in phases)
    # Interrupted: as far as the attempts got.
    return span


def _cohort_summary(name: str, group: _Group, spec: Mapping[str, Any]) -> dict[str, Any]:
    expected = spec.get("expected")
    if expected is None and group.expected:
        expected = group.expected.most_common(1)[0][0]
    return {
        "name": name,
        "size": spec.get("size"),
        "expected": expected,
        # What the cohort is made of (runs before people and service tokens: devices).
        "kind": spec.get("kind") or "devices",
        "with_certificate": spec.get("with_certificate", True),
        "logins": group.logins,
        **group.counts(),
        "rejections": dict(group.rejections.most_common()),
        "latency": group.latency_stats(),
        "cdf": group.latency["total"].cdf(),
        "breakdown": group.breakdown_means(),
    }


def _phase_summaries(
    phases: dict[str, _Group],
    phases_meta: list[Mapping[str, Any]],
    phase_total: dict[str, _Latency],
) -> list[dict[str, Any]]:
    known = {str(p["name"]): p for p in phases_meta}
    return [
        {
            "name": name,
            "start": known.get(name, {}).get("start"),
            "duration": known.get(name, {}).get("duration"),
            **group.counts(),
            "total": phase_total[name].stats(),
        }
        for name, group in phases.items()
    ]


def _series(
    timeline: list[tuple[float, str, float]],
    dropped: list[tuple[float, str, str]],
    length: float,
) -> dict[str, Any]:
    """Attempts by outcome and total latency p50/p99 per time bucket (by scheduled start)."""
    width = max(1, math.ceil(length / _MAX_BUCKETS))
    rows: dict[int, list[tuple[str, float]]] = defaultdict(list)
    for scheduled, outcome, total_ms in timeline:
        rows[int(max(scheduled, 0) // width)].append((outcome, total_ms))
    drops: Counter[int] = Counter(int(max(t, 0) // width) for t, _, _ in dropped)
    last = max([*rows, *drops], default=-1)
    buckets = []
    for i in range(last + 1):
        # Exact nearest-rank percentiles (HDR's definition): sorting a bucket is cheap, while
        # walking a histogram per bucket would dominate the whole summary's cost.
        latencies = sorted(ms for _, ms in rows[i])
        buckets.append(
            {
                "t": i * width,
                "attempts": len(latencies),
                "outcomes": dict(Counter(o for o, _ in rows[i]).most_common()),
                "dropped": drops[i],
                "p50": nearest_rank(latencies, 50.0),
                "p99": nearest_rank(latencies, 99.0),
            }
        )
    return {"bucket_s": width, "buckets": buckets}


# Units for people, shared by the report, the terminal and the live progress.


def fmt_rate(value: float | None) -> str:
    """Attempts per second, readable whether 0.05 or 29,530."""
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def fmt_span(seconds: float | None) -> str:
    """A length of time in the unit a reader thinks in: ms, s, min, h or days."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.3g} ms"
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.3g} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.3g} h"
    return f"{seconds / 86400:.3g} days"


def nearest_rank(ordered: list[float], percentile: float) -> float | None:
    """The value at rank round(p/100 * n) (at least 1) of sorted values; ``None`` if empty."""
    if not ordered:
        return None
    rank = max(int(percentile / 100 * len(ordered) + 0.5), 1)
    return ordered[rank - 1]


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def _latency_metric(latency: Mapping[str, Any], name: str, where: str) -> float:
    metric_name, _, stat = name.partition(".")
    if metric_name not in LATENCIES or stat not in STATS:
        raise KeyError(
            f"{where}{name!r} is not a latency statistic: use <latency>.<stat> with latency in "
            f"{list(LATENCIES)} and stat in {list(STATS)}"
        )
    return _number(latency[metric_name][stat])


def metric(summary: Mapping[str, Any], name: str) -> float:
    """Resolve a threshold's metric name against a summary (NaN when there is no data).

    Names: ``false_accepts``, ``false_rejects``, ``attempts``, ``dropped``, ``errors``,
    ``decisions`` (attempts that reached a decision or their expected outcome), ``rate``;
    ``<latency>.<stat>``; ``cohort.<name>.allowed`` (share), ``.matched`` (share),
    ``.new_connections`` (share of attempts that opened a connection), ``.full_handshakes``
    (share that made a full handshake: a new connection, not resumed), ``.share:<outcome>`` or
    ``.<latency>.<stat>``. Unknown names raise :class:`KeyError`.
    """
    totals = summary["totals"]
    if name in COUNTS:
        return _number(totals[name])
    if name.startswith("cohort."):
        return _cohort_metric(summary, name)
    if "." in name:
        return _latency_metric(summary["latency"], name, "")
    raise KeyError(
        f"{name!r} is not a metric: use {', '.join(COUNTS)}, <latency>.<stat> with latency in "
        f"{list(LATENCIES)} and stat in {list(STATS)}, or cohort.<name>.<...>"
    )


def _cohort_metric(summary: Mapping[str, Any], name: str) -> float:
    rest = name[len("cohort.") :]
    cohorts: Mapping[str, Any] = summary["cohorts"]
    # Cohort names may contain dots: take the longest cohort name that prefixes the rest.
    matches = [c for c in cohorts if rest.startswith(c + ".")]
    if not matches:
        raise KeyError(f"{name!r}: no such cohort; cohorts are {sorted(cohorts)}")
    cohort_name = max(matches, key=len)
    cohort = cohorts[cohort_name]
    what = rest[len(cohort_name) + 1 :]
    attempts = cohort["attempts"]
    if what == "allowed":
        return cohort["allowed"] / attempts if attempts else math.nan
    if what == "matched":
        return _number(cohort["matched_share"])
    if what in COHORT_SHARES:
        return _number(cohort[COHORT_SHARES[what]])
    if what.startswith("share:"):
        outcome = what[len("share:") :]
        if not outcome:
            raise KeyError(f"{name!r}: share: needs an outcome, such as share:allowed")
        return cohort["outcomes"].get(outcome, 0) / attempts if attempts else math.nan
    try:
        return _latency_metric(cohort["latency"], what, f"{name!r}: ")
    except KeyError:
        raise KeyError(
            f"{name!r}: after cohort.{cohort_name}. expected allowed, matched, new_connections, "
            f"full_handshakes, share:<outcome> or <latency>.<stat> with latency in"
            f" {list(LATENCIES)} and stat in {list(STATS)}"
        ) from None
