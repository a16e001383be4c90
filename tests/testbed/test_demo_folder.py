"""A demo folder in use is never rewritten: a second `testbed enforcer demo` is refused first."""

from __future__ import annotations

import subprocess
from pathlib import Path

import trio

from testbed.demo import AUTH_HOST, DemoLayout
from tests.testbed.test_cli import TESTBED, free_port, stop, wait_for_port
from tests.wire import client_context, get, run


def demo_args(out: Path, port: int, admin_port: int) -> list[str]:
    return ["--out", str(out), "--port", str(port), "--admin-port", str(admin_port)]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of ``folder`` and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


async def answers(layout: DemoLayout) -> bool:
    ctx = client_context(layout.edge_ca, *layout.device("valid"))
    return (await get(layout.port, AUTH_HOST, ctx)).status == 200


async def start_demo(out: Path, port: int, admin_port: int) -> trio.Process:
    proc = await trio.lowlevel.open_process(
        [*TESTBED, "enforcer", "demo", *demo_args(out, port, admin_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    await wait_for_port(admin_port, proc)
    return proc


async def second_demo(out: Path, port: int, admin_port: int) -> trio.CompletedProcess[bytes]:
    return await run(
        [*TESTBED, "enforcer", "demo", *demo_args(out, port, admin_port)],
        timeout=60,
    )


async def test_a_second_demo_on_a_folder_in_use_changes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    port, admin_port = free_port(), free_port()
    first = await start_demo(out, port, admin_port)
    try:
        layout = DemoLayout(out, port, admin_port)
        assert await answers(layout)
        before = snapshot(out)
        assert "admin.token" in before and "state.sqlite" in before

        # The same ports: refused before anything is written ("address in use" used to come
        # only after the folder had been rewritten).
        same = await second_demo(out, port, admin_port)
        assert same.returncode == 2, same.stderr
        assert snapshot(out) == before
        assert b"nothing was written" in same.stderr

        # Free ports, same folder: the folder's lock refuses it.
        other = await second_demo(out, free_port(), free_port())
        assert other.returncode == 2, other.stderr
        message = other.stderr.decode()
        assert "in use by a running demo" in message and f"pid {first.pid}" in message
        assert snapshot(out) == before

        assert await answers(layout)  # the first demo still serves, with its own PKI and token
    finally:
        assert await stop(first) == 0


async def test_a_demo_whose_port_is_taken_leaves_an_old_folder_alone(tmp_path: Path) -> None:
    # The folder of a stopped demo, and another demo holding the port the new one asks for.
    old = tmp_path / "old"
    busy_port, busy_admin = free_port(), free_port()
    running = await start_demo(tmp_path / "running", busy_port, busy_admin)
    try:
        port, admin_port = free_port(), free_port()
        stopped = await start_demo(old, port, admin_port)
        assert await stop(stopped) == 0
        before = snapshot(old)
        result = await second_demo(old, busy_port, free_port())
        assert result.returncode == 2
        assert f"127.0.0.1:{busy_port}" in result.stderr.decode()
        assert snapshot(old) == before
        # The folder is free again: a demo can use it (and the lock was released on exit).
        again = await start_demo(old, port, admin_port)
        assert await stop(again) == 0
    finally:
        assert await stop(running) == 0
