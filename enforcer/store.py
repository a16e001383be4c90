"""The control plane's durable state: JSON objects by kind and id, in one SQLite file.

Every admin change is one transaction that upserts or deletes a few objects and bumps the
generation; SQLite's journal makes it all-or-nothing, so a crash in the middle of a write
leaves the previous state whole, and a 2xx is only sent after the commit (``synchronous=FULL``),
so a restart loses nothing that was acknowledged.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from enforcer.private_files import create_private, private_dir, tighten

Objects = dict[str, dict[str, dict[str, Any]]]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (kind, id)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class StoreError(Exception):
    """The state database cannot be opened or read."""


@dataclasses.dataclass(frozen=True)
class Change:
    """Put ``body`` at (kind, id), or delete it when ``body`` is None."""

    kind: str
    id: str
    body: Mapping[str, Any] | None


def _create_private_database(path: Path) -> None:
    """Make the database file 0600 (in a 0700 folder when made here) before SQLite opens it."""
    # It holds the signing and managed-CA private keys. SQLite creates its -wal and -shm files
    # with the main file's mode, so a main file that is 0600 from the start covers all three;
    # files left by an older release are tightened (see enforcer/private_files.py).
    private_dir(path.parent)
    for extra in ("-wal", "-shm", "-journal"):
        tighten(path.with_name(path.name + extra), "state database")
    create_private(path, "state database")


class Store:
    """A SQLite file of objects with a generation number that every commit increments."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            if str(path) != ":memory:":
                _create_private_database(self.path)
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"{path}: cannot open the state database: {exc}") from exc

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def load(self) -> tuple[int, Objects]:
        """Return the generation and every object, grouped by kind."""
        try:
            objects: Objects = {}
            for kind, oid, body in self._db.execute("SELECT kind, id, body FROM objects"):
                objects.setdefault(kind, {})[oid] = json.loads(body)
            return self.generation(), objects
        except (sqlite3.Error, json.JSONDecodeError) as exc:
            raise StoreError(f"{self.path}: cannot read the state database: {exc}") from exc

    def generation(self) -> int:
        """Return the number of commits so far (0 for a new database)."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row[0]) if row else 0

    def data_version(self) -> int:
        """SQLite's data version: changes when another connection commits (cheap to poll)."""
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def commit(self, changes: Iterable[Change]) -> int:
        """Apply all changes in one transaction and return the new generation."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for change in changes:
                if change.body is None:
                    db.execute(
                        "DELETE FROM objects WHERE kind = ? AND id = ?", (change.kind, change.id)
                    )
                else:
                    db.execute(
                        "INSERT INTO objects (kind, id, body) VALUES (?, ?, ?) "
                        "ON CONFLICT (kind, id) DO UPDATE SET body = excluded.body",
                        (change.kind, change.id, json.dumps(change.body, sort_keys=True)),
                    )
            generation = self.generation() + 1
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('generation', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(generation),),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return generation
