"""/healthz and /readyz over HTTP: configuration, state store and origins, probed and cached."""

from __future__ import annotations

import dataclasses
import io
import socket
import sqlite3
from pathlib import Path

import trio

from enforcer.accesslog import AccessLog
from enforcer.admin import Operations, serve_operations
from enforcer.clock import WallClock
from enforcer.config import AdminSettings, load_config
from enforcer.server import Enforcer, open_listener
from testbed.demo import DemoLayout
from tests.conftest import ADMIN_TOKEN, Served
from tests.wire import admin_call


async def probes_port(enforcer: Enforcer, nursery: trio.Nursery) -> int:
    listener = await open_listener("127.0.0.1", 0)
    settings = AdminSettings("127.0.0.1", 0, ADMIN_TOKEN, "demo")
    ops = Operations(enforcer.metrics, enforcer.readiness)
    return int(await nursery.start(serve_operations, ops, settings, listener, "127.0.0.1"))


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def enforcer_with_origin(
    demo: DemoLayout, tmp_path: Path, origin: str, **server: object
) -> Enforcer:
    config = load_config(demo.config)
    config = dataclasses.replace(
        config,
        applications=tuple(dataclasses.replace(a, origin=origin) for a in config.applications),
        server=dataclasses.replace(config.server, **server),  # type: ignore[arg-type]
    )
    return Enforcer(config, WallClock(), AccessLog(io.StringIO()), state_path=tmp_path / "s.db")


async def test_healthz_and_readyz_when_all_is_well(served: Served, nursery: trio.Nursery) -> None:
    port = await probes_port(served.enforcer, nursery)
    assert await admin_call(port, "GET", "/healthz", token="") == (200, b"ok\n")
    status, body = await admin_call(port, "GET", "/readyz", token="")
    assert status == 200 and body["ready"] is True
    checks = body["checks"]
    assert checks["config"] == checks["state_store"] == "ok"
    origins = [k for k in checks if k.startswith("origin ")]
    assert origins and all(checks[k] == "ok" for k in origins)
    status, _ = await admin_call(port, "POST", "/readyz", token="")
    assert status == 405


async def test_not_ready_while_the_state_store_cannot_be_written(
    served: Served, nursery: trio.Nursery
) -> None:
    port = await probes_port(served.enforcer, nursery)
    # Another process holds the database's write lock: no commit could land now.
    db = sqlite3.connect(str(served.controller.store.path), isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")
    try:
        status, body = await admin_call(port, "GET", "/readyz", token="")
    finally:
        db.execute("ROLLBACK")
        db.close()
    assert status == 503 and body["ready"] is False
    assert body["checks"]["state_store"].startswith("not writable: database is locked")
    assert (await admin_call(port, "GET", "/healthz", token=""))[0] == 200  # it still serves
    served.enforcer.readiness.cache_seconds = 0  # probe again at once
    status, body = await admin_call(port, "GET", "/readyz", token="")
    assert status == 200, body


async def test_not_ready_while_an_origin_is_unreachable(
    demo: DemoLayout, tmp_path: Path, nursery: trio.Nursery
) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    enforcer = enforcer_with_origin(demo, tmp_path, dead)
    port = await probes_port(enforcer, nursery)
    status, body = await admin_call(port, "GET", "/readyz", token="")
    assert status == 503 and body["ready"] is False
    assert body["checks"][f"origin {dead}"].startswith("unreachable")
    assert body["checks"]["state_store"] == "ok"


async def test_readiness_can_ignore_origins(
    demo: DemoLayout, tmp_path: Path, nursery: trio.Nursery
) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    enforcer = enforcer_with_origin(demo, tmp_path, dead, readiness_origins="none")
    port = await probes_port(enforcer, nursery)
    status, body = await admin_call(port, "GET", "/readyz", token="")
    assert status == 200 and not [k for k in body["checks"] if k.startswith("origin")]


async def test_probes_are_cached_not_one_connect_per_request(
    served: Served, nursery: trio.Nursery
) -> None:
    port = await probes_port(served.enforcer, nursery)
    pool = served.enforcer.origins
    connects = 0
    real = pool.connect

    async def counting(host: str, p: int) -> trio.abc.Stream:
        nonlocal connects
        connects += 1
        return await real(host, p)

    pool.connect = counting
    for _ in range(10):
        assert (await admin_call(port, "GET", "/readyz", token=""))[0] == 200
    origins = len({a.origin for a in served.enforcer.snapshot.applications.values()})
    assert connects == origins  # one probe for ten requests
