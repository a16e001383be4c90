"""Shared fixtures: a demo PKI made once per session and an enforcer served on loopback."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import itertools
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio
from hypothesis import Verbosity, settings

from enforcer.accesslog import AccessLog
from enforcer.admin import serve_admin
from enforcer.clock import Clock, FixedClock
from enforcer.config import AdminSettings, EnforcerConfig, load_config
from enforcer.controller import Controller
from enforcer.origin import serve_echo_origin
from enforcer.server import Enforcer, open_listener, serve
from testbed.demo import DemoLayout, write_demo
from tests.browser import open_browser  # noqa: F401 (a fixture: headless Chromium)

ADMIN_TOKEN = "test-admin-token-0123456789"

settings.register_profile("default", max_examples=50, deadline=None)
settings.register_profile("ci", max_examples=50, deadline=None, derandomize=True)
settings.register_profile("debug", max_examples=10, deadline=None, verbosity=Verbosity.verbose)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default")
)


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoLayout:
    """The demo PKI, devices and configuration, written once (origins are replaced per test)."""
    return write_demo(tmp_path_factory.mktemp("demo"), 0, "http://127.0.0.1:9")


@dataclasses.dataclass
class Served:
    """An enforcer served on 127.0.0.1 for one test."""

    port: int
    enforcer: Enforcer
    layout: DemoLayout
    clock: FixedClock
    log_buffer: io.StringIO
    admin_port: int | None = None

    @property
    def controller(self) -> Controller:
        """The control plane of this enforcer."""
        return self.enforcer.controller

    def log(self) -> list[dict[str, object]]:
        """The access log records so far."""
        return [json.loads(line) for line in self.log_buffer.getvalue().splitlines()]

    def last(self) -> dict[str, object]:
        """The last request record of the access log."""
        return [r for r in self.log() if "event" not in r][-1]


@pytest.fixture
async def serve_config(
    nursery: trio.Nursery, demo: DemoLayout, tmp_path: Path
) -> Callable[..., object]:
    """Return an async function that serves a config (the demo's by default) on loopback."""
    origin_port = await nursery.start(serve_echo_origin, "127.0.0.1", 0)
    origin = f"http://127.0.0.1:{origin_port}"
    counter = itertools.count()

    async def start(
        config: EnforcerConfig | None = None,
        clock: Clock | None = None,
        admin: bool = False,
        **server: object,
    ) -> Served:
        cfg = config or load_config(demo.config)
        cfg = dataclasses.replace(
            cfg,
            applications=tuple(dataclasses.replace(a, origin=origin) for a in cfg.applications),
            server=dataclasses.replace(cfg.server, **server),  # type: ignore[arg-type]
        )
        fixed = FixedClock(dt.datetime.now(dt.UTC))
        buffer = io.StringIO()
        # Each served enforcer gets its own state database: tests never see each other's changes.
        state = tmp_path / f"state-{next(counter)}.sqlite"
        enforcer = Enforcer(cfg, clock or fixed, AccessLog(buffer), state_path=state)
        listener = await open_listener("127.0.0.1", 0)
        port = await nursery.start(serve, enforcer, listener)
        admin_port = None
        if admin:
            settings = AdminSettings("127.0.0.1", 0, ADMIN_TOKEN, "demo")
            admin_listener = await open_listener("127.0.0.1", 0)
            admin_port = await nursery.start(
                serve_admin, enforcer.controller, settings, admin_listener
            )
        return Served(port, enforcer, DemoLayout(demo.root, port), fixed, buffer, admin_port)

    return start


@pytest.fixture
async def served(serve_config: Callable[..., object]) -> AsyncIterator[Served]:
    """The demo configuration served on loopback, on a FixedClock set to now."""
    yield await serve_config()  # type: ignore[misc]
