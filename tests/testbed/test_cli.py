"""The ``testbed`` command line, run as a real process: serve, workers, demo, exit codes."""

from __future__ import annotations

import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from testbed.demo import AUTH_HOST, DemoLayout
from tests.wire import client_context, get, run

TESTBED = [sys.executable, "-m", "testbed.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for_port(port: int, proc: trio.Process, limit: float = 20) -> None:
    with trio.fail_after(limit):
        while True:
            assert proc.returncode is None, "the server exited early"
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.1)
                continue
            await stream.aclose()
            return


async def stop(proc: trio.Process, limit: float = 15) -> int:
    proc.send_signal(signal.SIGINT)
    with trio.fail_after(limit):
        return await proc.wait()


def test_serve_exits_2_on_a_bad_config_before_listening(demo: DemoLayout) -> None:
    bad = demo.root / "missing-hostname.toml"  # beside the demo, so its relative paths resolve
    bad.write_text(demo.config.read_text().replace('hostname = "iot.example.test"\n', "", 1))
    port = free_port()
    result = subprocess.run(
        [*TESTBED, "enforcer", "serve", "--config", str(bad), "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert str(bad) in result.stderr
    assert "applications[1].hostname" in result.stderr
    assert "required field is missing" in result.stderr
    assert "listening" not in result.stderr


def test_serve_exits_2_when_the_config_is_missing(tmp_path: Path) -> None:
    result = subprocess.run(
        [*TESTBED, "enforcer", "serve", "--config", str(tmp_path / "nope.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "nope.toml" in result.stderr and "cannot read" in result.stderr


async def served_process(args: list[str], port: int, nursery: trio.Nursery) -> trio.Process:
    proc = await trio.lowlevel.open_process(
        [*TESTBED, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    await wait_for_port(port, proc)
    return proc


async def test_serve_answers_and_stops_cleanly_on_ctrl_c(
    demo: DemoLayout, nursery: trio.Nursery
) -> None:
    port = free_port()
    proc = await served_process(
        ["enforcer", "serve", "--config", str(demo.config), "--port", str(port)], port, nursery
    )
    try:
        layout = DemoLayout(demo.root, port)
        ctx = client_context(layout.edge_ca, *layout.device("valid"))
        # The demo fixture's origin is not running: admitted requests get 502, denials still work.
        assert (await get(port, AUTH_HOST, ctx)).status == 502
        assert (
            await get(port, AUTH_HOST, client_context(layout.edge_ca))
        ).reason == "no_certificate"
    finally:
        code = await stop(proc)
    assert code == 0


async def test_workers_share_the_port(demo: DemoLayout, nursery: trio.Nursery) -> None:
    port = free_port()
    proc = await served_process(
        ["enforcer", "serve", "--config", str(demo.config), "--port", str(port), "--workers", "2"],
        port,
        nursery,
    )
    try:
        layout = DemoLayout(demo.root, port)
        ctx = client_context(layout.edge_ca)
        for _ in range(6):
            assert (await get(port, AUTH_HOST, ctx)).reason == "no_certificate"
    finally:
        code = await stop(proc)
    assert code == 0


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is installed by .ci/run")
async def test_demo_prints_curl_commands_that_work(tmp_path: Path, nursery: trio.Nursery) -> None:
    port = free_port()
    out = tmp_path / "demo"
    proc = await trio.lowlevel.open_process(
        [*TESTBED, "enforcer", "demo", "--out", str(out), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        await wait_for_port(port, proc)
        printed = b""
        with trio.fail_after(10):
            while b"Ctrl-C stops the demo" not in printed:
                printed += await proc.stdout.receive_some(65536)
        commands = [line for line in printed.decode().splitlines() if line.startswith("curl ")]
        assert len(commands) >= 8
        for name in ("edge-ca.pem", "root.pem", "intermediate.pem"):
            assert (out / "ca" / name).exists()
        for device in ("valid", "leaf-only", "expired", "not-yet-valid", "foreign-ca", "wrong-cn"):
            assert (out / "devices" / device / "cert.pem").exists()
            assert (out / "devices" / device / "key.pem").exists()
        results = {}
        for command in commands:
            result = await run([*shlex.split(command), "-o", "/dev/null", "-w", "%{http_code}"])
            results[command] = result.stdout.decode()
        valid = next(c for c in commands if "devices/valid/" in c and AUTH_HOST in c)
        no_cert = next(c for c in commands if "--cert" not in c and "/cdn-cgi/" not in c)
        expired = next(c for c in commands if "devices/expired/" in c)
        assert results[valid] == "200"
        assert results[no_cert] == "403"
        assert results[expired] == "403"
    finally:
        code = await stop(proc)
    assert code == 0
