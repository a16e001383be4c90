"""A run's results database: every attempt written as it happens, in one SQLite file.

The runner appends; reports read. On the real clock each attempt is committed on its own (WAL,
synchronous NORMAL), so a run interrupted by Ctrl-C or a crash keeps every attempt up to that
point and ``testbed report`` can still render it. A virtual run writes attempts in batches (one
transaction per :data:`BATCH_ROWS` rows or :data:`BATCH_SECONDS` of wall time, whichever comes
first): a virtual week's per-row commits were a measurable share of its CPU. A batch is one
transaction, so a crash keeps whole batches only, never part of one, and the writer commits
what it holds before anything that judges or describes the run (meta, events, thresholds,
close): a run whose process died mid-batch has no ``finished_at`` and reads as interrupted.

Times: ``scheduled`` and ``started`` are seconds since the run began (on the run's clock, real
or virtual). ``total_ms`` counts from the *scheduled* start, so a stalled target shows up as
latency (no coordinated omission); ``service_ms`` counts from the actual start.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import sqlite3
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS run (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY,
    device TEXT NOT NULL,
    cohort TEXT NOT NULL,
    phase TEXT NOT NULL,
    expected TEXT NOT NULL,
    scheduled REAL NOT NULL,
    started REAL NOT NULL,
    connect_ms REAL NOT NULL,
    key_store_ms REAL NOT NULL,
    handshake_ms REAL NOT NULL,
    first_byte_ms REAL NOT NULL,
    service_ms REAL NOT NULL,
    total_ms REAL NOT NULL,
    outcome TEXT NOT NULL,
    status INTEGER,
    reason TEXT,
    new_connection INTEGER NOT NULL,
    resumed INTEGER NOT NULL,
    error TEXT,
    cookie_sent INTEGER NOT NULL DEFAULT 0,
    protocol TEXT NOT NULL DEFAULT 'http1',
    grpc_status TEXT,
    kind TEXT NOT NULL DEFAULT 'devices',
    login_ms REAL NOT NULL DEFAULT 0,
    callback_ms REAL NOT NULL DEFAULT 0,
    logged_in INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS attempts_cohort ON attempts (cohort);
CREATE TABLE IF NOT EXISTS events (t REAL NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dropped (t REAL NOT NULL, cohort TEXT NOT NULL, phase TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS thresholds (
    position INTEGER PRIMARY KEY,
    expression TEXT NOT NULL,
    observed TEXT NOT NULL,
    ok INTEGER NOT NULL
);
"""


@dataclasses.dataclass(frozen=True)
class AttemptRow:
    """One attempt as stored."""

    device: str
    cohort: str
    phase: str
    expected: str
    scheduled: float
    started: float
    connect_ms: float
    key_store_ms: float
    handshake_ms: float
    first_byte_ms: float
    service_ms: float
    total_ms: float
    outcome: str
    status: int | None
    reason: str | None
    new_connection: bool
    resumed: bool
    error: str | None = None
    cookie_sent: bool = False  # the device sent its CF_Authorization cookie
    protocol: str = "http1"  # what the device spoke: http1, h2 or grpc
    grpc_status: str | None = None  # a gRPC call's status code name (OK, UNAUTHENTICATED...)
    kind: str = "devices"  # the cohort's kind: devices, people or service_tokens
    login_ms: float = 0.0  # a person's login before this request: navigation and provider
    callback_ms: float = 0.0  # ... and the enforcer's callback
    logged_in: bool = False  # this request logged in first


# Columns added after the first release, with what older databases hold instead.
_ADDED = {
    "cookie_sent": "INTEGER NOT NULL DEFAULT 0",
    "protocol": "TEXT NOT NULL DEFAULT 'http1'",
    "grpc_status": "TEXT",
    "kind": "TEXT NOT NULL DEFAULT 'devices'",
    "login_ms": "REAL NOT NULL DEFAULT 0",
    "callback_ms": "REAL NOT NULL DEFAULT 0",
    "logged_in": "INTEGER NOT NULL DEFAULT 0",
}
# ... and how a reader of such a database spells that default.
_READ_DEFAULT = {
    "cookie_sent": "0",
    "protocol": "'http1'",
    "grpc_status": "NULL",
    "kind": "'devices'",
    "login_ms": "0",
    "callback_ms": "0",
    "logged_in": "0",
}


def _missing_columns(db: sqlite3.Connection, schema: str = "main") -> list[str]:
    """Columns of :data:`_ADDED` that an older database's attempts table lacks."""
    have = {row[1] for row in db.execute(f"PRAGMA {schema}.table_info(attempts)")}
    return [name for name in _ADDED if name not in have]


def _add_columns(db: sqlite3.Connection) -> None:
    """Bring an older database's attempts table up to date (new columns take defaults)."""
    for name in _missing_columns(db):
        db.execute(f"ALTER TABLE attempts ADD COLUMN {name} {_ADDED[name]}")


_FIELDS = [f.name for f in dataclasses.fields(AttemptRow)]
_values = operator.attrgetter(*_FIELDS)  # an AttemptRow's column values, in _FIELDS order
_INSERT = f"INSERT INTO attempts ({', '.join(_FIELDS)}) VALUES ({', '.join('?' * len(_FIELDS))})"

# A batched writer commits after this many attempts, or this much wall time since its last
# commit, whichever comes first: the shards' progress (read from their files) lags by at most
# that much, and so does what a killed process loses.
BATCH_ROWS = 512
BATCH_SECONDS = 0.5


class ResultsWriter:
    """Appends a run's attempts, events and final thresholds to ``results.sqlite``.

    ``batched``: attempts are committed in batches (see the module's docstring) rather than
    one by one; :meth:`flush` commits what is held.
    """

    def __init__(self, path: Path, *, batched: bool = False) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        _add_columns(self._db)
        self.batched = batched
        self._pending: list[tuple[Any, ...]] = []
        self._flushed_at = time.monotonic()

    def flush(self) -> None:
        """Commit the attempts held for the next batch, all or none (one transaction)."""
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        self._flushed_at = time.monotonic()
        self._db.execute("BEGIN")
        try:
            self._db.executemany(_INSERT, rows)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def set_meta(self, **values: Any) -> None:
        """Record facts about the run (JSON-encoded values)."""
        self.flush()  # what the run says about itself never gets ahead of its attempts
        for key, value in values.items():
            self._db.execute(
                "INSERT INTO run (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, json.dumps(value)),
            )

    def attempt(self, row: AttemptRow) -> None:
        """Append one attempt (committed at once, or with its batch when batched)."""
        values = _values(row)
        if not self.batched:
            self._db.execute(_INSERT, values)
            return
        self._pending.append(values)
        if len(self._pending) >= BATCH_ROWS or time.monotonic() - self._flushed_at >= BATCH_SECONDS:
            self.flush()

    def event(self, t: float, kind: str, detail: str) -> None:
        """Append a timed event (a revocation, a rotation, a phase start...)."""
        self.flush()
        self._db.execute("INSERT INTO events (t, kind, detail) VALUES (?, ?, ?)", (t, kind, detail))

    def dropped(self, t: float, cohort: str, phase: str) -> None:
        """Record an attempt that could not start on time (like k6's dropped_iterations)."""
        self._db.execute(
            "INSERT INTO dropped (t, cohort, phase) VALUES (?, ?, ?)", (t, cohort, phase)
        )

    def thresholds(self, results: list[tuple[str, str, bool]]) -> None:
        """Record the thresholds' verdicts (expression, observed value, held)."""
        self.flush()
        self._db.execute("DELETE FROM thresholds")
        for i, (expression, observed, ok) in enumerate(results):
            self._db.execute(
                "INSERT INTO thresholds (position, expression, observed, ok) VALUES (?, ?, ?, ?)",
                (i, expression, observed, int(ok)),
            )

    def close(self) -> None:
        """Commit what is held, then close the database."""
        try:
            self.flush()
        finally:
            self._db.close()


def shard_results(run_dir: Path, shard: int) -> Path:
    """Where shard ``shard`` of a run split between processes writes its attempts."""
    return run_dir / "shards" / f"{shard}-results.sqlite"


def merge_shards(run_dir: Path) -> int:
    """Fold the shards' databases into the run's ``results.sqlite``; return how many were new.

    Each shard is folded in one transaction that also records its name, so a merge cut short
    (a crash, a kill) is redone from where it stopped and never counts a shard twice. The
    shards' own files stay: they are what the parent process was told was written.
    """
    files = sorted(
        (run_dir / "shards").glob("*-results.sqlite"), key=lambda f: int(f.name.split("-")[0])
    )
    if not files:
        return 0
    db = sqlite3.connect(str(run_dir / "results.sqlite"), isolation_level=None)
    try:
        db.executescript(SCHEMA + "CREATE TABLE IF NOT EXISTS merged (name TEXT PRIMARY KEY);")
        _add_columns(db)
        done = {name for (name,) in db.execute("SELECT name FROM merged")}
        fields = ", ".join(_FIELDS)
        merged = 0
        for i, f in enumerate(files):
            if f.name in done:
                continue
            db.execute("ATTACH DATABASE ? AS shard", (str(f),))
            try:
                db.execute("BEGIN IMMEDIATE")
                db.execute(
                    f"INSERT INTO attempts ({fields}) SELECT {fields} FROM shard.attempts"
                    " ORDER BY id"
                )
                db.execute("INSERT INTO dropped SELECT * FROM shard.dropped")
                if i == 0:  # every shard lives through the same timeline: keep one copy
                    db.execute("INSERT INTO events SELECT * FROM shard.events")
                db.execute("INSERT INTO merged (name) VALUES (?)", (f.name,))
                db.execute("COMMIT")
                merged += 1
            except BaseException:
                db.execute("ROLLBACK")
                raise
            finally:
                db.execute("DETACH DATABASE shard")
        return merged
    finally:
        db.close()


class Results:
    """Read access to a results database."""

    def __init__(self, path: Path) -> None:
        if not path.exists():
            raise FileNotFoundError(f"{path}: no results database here")
        self.path = path
        self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)

    def meta(self) -> dict[str, Any]:
        """The run's recorded facts."""
        return {k: json.loads(v) for k, v in self._db.execute("SELECT key, value FROM run")}

    def attempts(self) -> Iterator[AttemptRow]:
        """Every attempt, in the order written."""
        # A database written before a column was added reads as its default.
        missing = _missing_columns(self._db)
        columns = ", ".join(f"{_READ_DEFAULT[f]} AS {f}" if f in missing else f for f in _FIELDS)
        for row in self._db.execute(f"SELECT {columns} FROM attempts ORDER BY id"):
            values = dict(zip(_FIELDS, row, strict=True))
            values["new_connection"] = bool(values["new_connection"])
            values["resumed"] = bool(values["resumed"])
            values["cookie_sent"] = bool(values["cookie_sent"])
            values["logged_in"] = bool(values["logged_in"])
            yield AttemptRow(**values)

    def events(self) -> list[tuple[float, str, str]]:
        """Timed events, in order."""
        return list(self._db.execute("SELECT t, kind, detail FROM events ORDER BY t"))

    def dropped(self) -> list[tuple[float, str, str]]:
        """Attempts that could not start on time."""
        return list(self._db.execute("SELECT t, cohort, phase FROM dropped ORDER BY t"))

    def thresholds(self) -> list[tuple[str, str, bool]]:
        """The thresholds' verdicts, in scenario order (empty if the run did not finish)."""
        rows = self._db.execute("SELECT expression, observed, ok FROM thresholds ORDER BY position")
        return [(e, o, bool(k)) for e, o, k in rows]

    def close(self) -> None:
        """Close the database."""
        self._db.close()


def meta_value(meta: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """A run fact, or ``default``."""
    return meta.get(key, default)
