"""The state database: all-or-nothing commits, seeding once, reading back what was committed."""

from __future__ import annotations

import dataclasses
import datetime as dt
import sqlite3
from pathlib import Path

import pytest

from enforcer.config import load_config
from enforcer.controller import open_state
from enforcer.store import Change, Store, StoreError

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)


def test_a_commit_is_all_or_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    assert store.commit([Change("app", "a", {"v": 1})]) == 1
    with pytest.raises(TypeError):
        # The second change cannot be encoded: the first must not land either.
        store.commit([Change("app", "b", {"v": 2}), Change("app", "c", {"v": object()})])
    assert store.load() == (1, {"app": {"a": {"v": 1}}})
    store.close()
    reopened = Store(tmp_path / "s.sqlite")
    assert reopened.load() == (1, {"app": {"a": {"v": 1}}})


def test_a_writer_that_dies_mid_transaction_leaves_the_previous_state(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    store = Store(path)
    store.commit([Change("root", "r", {"name": "before"})])
    # Another connection starts a write and never commits (as if its process died).
    other = sqlite3.connect(str(path), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("UPDATE objects SET body = '{\"name\": \"half\"}' WHERE id = 'r'")
    other.close()  # closing without COMMIT rolls back, like a crash does on recovery
    assert Store(path).load() == (1, {"root": {"r": {"name": "before"}}})


def test_changes_and_deletes(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    store.commit([Change("k", "1", {"x": 1}), Change("k", "2", {"x": 2})])
    store.commit([Change("k", "1", None), Change("k", "2", {"x": 3})])
    assert store.load() == (2, {"k": {"2": {"x": 3}}})


def test_unopenable_database_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-db.sqlite"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match=r"not-a-db\.sqlite"):
        Store(bad)


def test_the_config_seeds_the_state_only_once(demo, tmp_path: Path) -> None:
    config = load_config(demo.config)
    path = tmp_path / "state.sqlite"
    store, generation, objects = open_state(config, NOW, path)
    assert generation == 1
    assert {a["domain"] for a in objects["app"].values()} == {
        "auth.example.test",
        "iot.example.test",
    }
    assert objects["account"]["demo"]["mtls_enabled"] is True
    assert set(objects["zone_ca"]) == {"demo"}
    store.close()
    # A changed config does not overwrite the state that exists.
    fewer = dataclasses.replace(config, applications=config.applications[:1])
    store, generation, objects = open_state(fewer, NOW, path)
    assert generation == 1 and len(objects["app"]) == 2
    store.close()
