"""The enforcer's Prometheus metrics and its health and readiness probes.

Theory of operation. The request path is the enforcer's hot loop (issue 18 measured it per
instruction), so recording must cost a few attribute loads and one ``inc``: every label
combination the hot path uses is bound once (``labels()`` builds a dict and takes a lock),
either here at start or, for decisions, on first use into a dict keyed by a tuple. Counts
the enforcer already keeps for its own reasons (the validation cache's and the token memo's
hits, the access log's drops, tokens minted and verified in the pure token code) are not
counted twice on the hot path: :meth:`EnforcerMetrics.sync` copies their growth into the
Prometheus counters before every scrape and once a second (:func:`keep_metrics`).

Label cardinality is bounded by the configuration: the ``application`` label is the
hostname of a configured application (``none`` when a request matched none), reasons and
algorithms are closed sets; nothing names a device, a client address or a path.

Several worker processes (``enforcer/workers.py``) are one view through prometheus-client's
multiprocess mode: the parent makes a private directory (0700) and names it in
``PROMETHEUS_MULTIPROC_DIR`` before it spawns the workers, each worker's values live in
memory-mapped files there, the worker that serves ``/metrics`` merges them all with
``MultiProcessCollector``, and the parent calls ``mark_process_dead`` as each worker exits
and removes the directory at the end. That is the library's own answer to the problem (the
gunicorn recipe), so a scrape never has to reach the other workers over a socket. Within one
process (no workers, and tests) each :class:`EnforcerMetrics` has a registry of its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

import trio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from enforcer import tokens
from enforcer.proxy import _host_port

if TYPE_CHECKING:
    from enforcer.accesslog import AccessLog
    from enforcer.chain import ValidationCache
    from enforcer.server import Enforcer

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST
# Handshakes and origin answers take milliseconds; a few buckets above a second catch stalls.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# How often each process copies the counts kept elsewhere into its metrics (multiprocess mode:
# the worker serving /metrics cannot sync the others' at scrape time).
SYNC_SECONDS = 1.0
NO_APPLICATION = "none"


def multiprocess_mode() -> bool:
    """True when values go to the shared directory of several workers (see the module doc)."""
    return bool(os.environ.get(MULTIPROC_ENV))


class EnforcerMetrics:
    """The enforcer's metrics, with the label combinations of the hot path bound once."""

    def __init__(self) -> None:
        # Multiprocess mode: values live in the shared files, the scrape builds the registry.
        self.registry = None if multiprocess_mode() else CollectorRegistry()
        r = self.registry
        self.connections_accepted = Counter(
            "enforcer_connections_accepted", "TCP connections accepted.", registry=r
        )
        self.connections_open = Gauge(
            "enforcer_connections_open",
            "Client connections open now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.accept_errors = Counter(
            "enforcer_accept_errors",
            "Failed accept() calls (out of file descriptors or memory).",
            registry=r,
        )
        handshakes = Counter(
            "enforcer_handshakes", "TLS handshakes completed, by kind.", ["kind"], registry=r
        )
        self.handshakes_full = handshakes.labels("full")
        self.handshakes_resumed = handshakes.labels("resumed")
        duration = Histogram(
            "enforcer_handshake_duration_seconds",
            "Time from accept to a completed TLS handshake, by kind.",
            ["kind"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.handshake_full_seconds = duration.labels("full")
        self.handshake_resumed_seconds = duration.labels("resumed")
        self.tls_errors = Counter(
            "enforcer_tls_errors",
            "Connections ended by a TLS error, a handshake timeout or no common ALPN protocol "
            "(one tls_error access-log line each).",
            registry=r,
        )
        self._decisions = Counter(
            "enforcer_decisions",
            "Requests by application, decision (allowed, denied, refused, served) and reason.",
            ["application", "decision", "reason"],
            registry=r,
        )
        self._decision_children: dict[tuple[str, str, str], Counter] = {}
        self._origin_seconds = Histogram(
            "enforcer_origin_request_duration_seconds",
            "Time from sending a request to an origin to its response head, by application.",
            ["application"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self._origin_errors = Counter(
            "enforcer_origin_errors",
            "Requests whose origin could not be reached or broke the protocol, by application.",
            ["application"],
            registry=r,
        )
        self._origin_children: dict[str, tuple[Histogram, Counter]] = {}
        self.tunnels_open = Gauge(
            "enforcer_tunnels_open",
            "WebSocket tunnels open now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.streams_open = Gauge(
            "enforcer_http2_streams_open",
            "HTTP/2 streams being answered now (gRPC and other streaming calls among them).",
            registry=r,
            multiprocess_mode="livesum",
        )
        # Copied from counts kept elsewhere (see sync).
        self._minted = Counter(
            "enforcer_tokens_minted",
            "Access tokens signed, by algorithm.",
            ["algorithm"],
            registry=r,
        )
        self._verified = Counter(
            "enforcer_tokens_verified",
            "Token signatures verified with pyjwt (memo misses), by algorithm.",
            ["algorithm"],
            registry=r,
        )
        self._token_memo_hits = Counter(
            "enforcer_token_memo_hits",
            "Token checks answered from the memo of verified signatures.",
            registry=r,
        )
        self._cache_hits = Counter(
            "enforcer_validation_cache_hits", "Chain validations found in the cache.", registry=r
        )
        self._cache_misses = Counter(
            "enforcer_validation_cache_misses",
            "Chain validations not found in the cache (validated in full).",
            registry=r,
        )
        self._log_dropped = Counter(
            "enforcer_access_log_dropped",
            "Access-log records dropped (buffer full or target broken).",
            registry=r,
        )
        self._validations: ValidationCache | None = None
        self._token_memo: tokens.TokenMemo | None = None
        self._access_log: AccessLog | None = None
        self._seen: dict[object, int] = {}

    def decided(self, application: str, decision: str, reason: str) -> None:
        """Count one request's decision."""
        key = (application, decision, reason)
        child = self._decision_children.get(key)
        if child is None:
            child = self._decision_children[key] = self._decisions.labels(*key)
        child.inc()

    def origin(self, application: str) -> tuple[Histogram, Counter]:
        """The (duration, errors) pair of one application's origin."""
        pair = self._origin_children.get(application)
        if pair is None:
            pair = self._origin_children[application] = (
                self._origin_seconds.labels(application),
                self._origin_errors.labels(application),
            )
        return pair

    def watch(
        self, validations: ValidationCache, token_memo: tokens.TokenMemo, access_log: AccessLog
    ) -> None:
        """Name the objects whose own counts :meth:`sync` copies (counted from now on)."""
        self._validations, self._token_memo, self._access_log = validations, token_memo, access_log
        self.sync(publish=False)

    def sync(self, *, publish: bool = True) -> None:
        """Copy the growth of the counts kept elsewhere into the counters."""
        sources: list[tuple[object, int, Counter]] = []
        if self._validations is not None:
            sources += [
                ("cache_hits", self._validations.hits, self._cache_hits),
                ("cache_misses", self._validations.misses, self._cache_misses),
            ]
        if self._token_memo is not None:
            sources.append(("memo_hits", self._token_memo.hits, self._token_memo_hits))
        if self._access_log is not None:
            sources.append(("dropped", self._access_log.dropped, self._log_dropped))
        # Process-wide counts of the pure token code (one enforcer per process outside tests).
        for algorithm, count in tokens.MINTED.items():
            sources.append((("minted", algorithm), count, self._minted.labels(algorithm)))
        for algorithm, count in tokens.VERIFIED.items():
            sources.append((("verified", algorithm), count, self._verified.labels(algorithm)))
        for key, count, counter in sources:
            last = self._seen.get(key, 0)
            if count > last and publish:
                counter.inc(count - last)
            self._seen[key] = count

    def render(self) -> bytes:
        """The Prometheus text exposition of this process, or of all workers merged."""
        self.sync()
        if self.registry is not None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        return generate_latest(merged)


async def keep_metrics(metrics: EnforcerMetrics) -> None:
    """Sync the copied counts once a second (for the worker that serves the others' scrapes)."""
    while True:
        await trio.sleep(SYNC_SECONDS)
        metrics.sync()


@contextlib.contextmanager
def shared_metrics_dir() -> Iterator[str]:
    """A private (0700) directory for the workers' metric files, named in the environment.

    The spawned workers inherit the variable; it is removed from this process's environment
    and the directory is deleted on exit.
    """
    path = tempfile.mkdtemp(prefix="enforcer-metrics-")  # mkdtemp makes it 0700
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = path
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous
        shutil.rmtree(path, ignore_errors=True)


def worker_exited(pid: int, path: str) -> None:
    """Drop an exited worker's live gauges (its open connections and tunnels) from the view."""
    multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


# Readiness: probes of the state store and the origins are cached this long, so a probe
# request costs a lookup, and a kubelet (or an attacker) polling /readyz cannot make the
# enforcer connect to its origins more than once per interval.
READY_CACHE_SECONDS = 5.0
READY_PROBE_TIMEOUT = 1.0


class Readiness:
    """Answers /readyz: configuration loaded, state store writable, origins reachable."""

    def __init__(self, enforcer: Enforcer) -> None:
        self.enforcer = enforcer
        self.cache_seconds = READY_CACHE_SECONDS
        self._checked_at = -float("inf")
        self._result: dict[str, str] = {}
        self._lock = trio.Lock()

    async def check(self) -> tuple[bool, dict[str, str]]:
        """Whether the enforcer is ready, and each check's outcome (``ok`` or why not)."""
        async with self._lock:  # one probe at a time; waiters get its result
            if trio.current_time() - self._checked_at >= self.cache_seconds:
                self._result = await self._probe()
                self._checked_at = trio.current_time()
        return all(v == "ok" for v in self._result.values()), dict(self._result)

    async def _probe(self) -> dict[str, str]:
        e = self.enforcer
        result = {"config": "ok" if e.snapshot is not None else "no configuration loaded"}
        result["state_store"] = await trio.to_thread.run_sync(
            _store_writable, str(e.controller.store.path)
        )
        mode = e.settings.readiness_origins
        if mode == "none":
            return result
        origins = sorted({app.origin for app in e.snapshot.applications.values()})
        outcomes: dict[str, str] = {}

        async def probe(origin: str) -> None:
            host, port = _host_port(origin)
            try:
                with trio.fail_after(READY_PROBE_TIMEOUT):
                    stream = await e.origins.connect(host, port)
                await trio.aclose_forcefully(stream)
                outcomes[origin] = "ok"
            except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                outcomes[origin] = f"unreachable: {exc or type(exc).__name__}"

        async with trio.open_nursery() as nursery:
            for origin in origins:
                nursery.start_soon(probe, origin)
        reachable = [o for o in origins if outcomes[o] == "ok"]
        if mode == "any" and reachable:
            outcomes = {o: "ok" for o in origins}
        for origin in origins:
            result[f"origin {origin}"] = outcomes[origin]
        return result


def _store_writable(path: str) -> str:
    """``ok`` when a write transaction can start on the state database within the timeout."""
    try:
        db = sqlite3.connect(
            f"file:{path}?mode=rw", uri=True, timeout=READY_PROBE_TIMEOUT, isolation_level=None
        )
        try:
            db.execute("BEGIN IMMEDIATE")  # takes the write lock, as a commit would
            db.execute("ROLLBACK")
        finally:
            db.close()
    except sqlite3.Error as exc:
        return f"not writable: {exc}"
    return "ok"
