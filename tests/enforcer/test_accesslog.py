"""The access log never stops serving: a dead or stalled reader, a full buffer, logrotate."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from enforcer.accesslog import AccessLog
from testbed.demo import AUTH_HOST, DemoLayout
from tests.testbed.test_cli import TESTBED, free_port, stop, wait_for_port
from tests.wire import Connection, client_context


def config_for(demo: DemoLayout, tmp_path: Path, access_log: str) -> Path:
    """The demo's configuration with its own state file and access log target."""
    text = demo.config.read_text()
    text = text.replace('access_log = "-"', f'access_log = "{access_log}"')
    text = text.replace('path = "state.sqlite"', f'path = "{tmp_path / "state.sqlite"}"')
    # Beside the demo's, so that its relative certificate paths resolve.
    config = demo.root / f"accesslog-{tmp_path.name}.toml"
    config.write_text(text)
    return config


async def requests(port: int, layout: DemoLayout, count: int, path: str = "/") -> list[int]:
    """Send ``count`` requests without a certificate (keep-alive while the server allows)."""
    ctx = client_context(layout.edge_ca)
    statuses: list[int] = []
    conn = await Connection.open(port, AUTH_HOST, ctx)
    try:
        for _ in range(count):
            if conn.closed_by_server:
                await conn.aclose()
                conn = await Connection.open(port, AUTH_HOST, ctx)
            statuses.append((await conn.request(path)).status)
    finally:
        await conn.aclose()
    return statuses


@contextmanager
def piped_reader(out: Path | None = None) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A pipe read by a real `cat` (into ``out``, or nowhere); yield its write end and the cat."""
    read_end, write_end = os.pipe()
    sink = open(out, "wb") if out else subprocess.DEVNULL  # noqa: SIM115
    cat = subprocess.Popen(["cat"], stdin=read_end, stdout=sink)
    os.close(read_end)  # the cat is the only reader
    try:
        yield write_end, cat
    finally:
        with contextlib.suppress(OSError):
            os.close(write_end)  # when the test did not already
        cat.send_signal(signal.SIGCONT)
        cat.kill()
        cat.wait()
        if out:
            sink.close()  # type: ignore[union-attr]


async def read_all(proc: trio.Process) -> bytes:
    """The rest of a finished process's standard error."""
    assert proc.stderr is not None
    data = b""
    with trio.fail_after(10):
        while chunk := await proc.stderr.receive_some(65536):
            data += chunk
    return data


async def serve_process(config: Path, port: int, stdout: int) -> trio.Process:
    proc = await trio.lowlevel.open_process(
        [*TESTBED, "enforcer", "serve", "--config", str(config), "--port", str(port)],
        stdout=stdout,
        stderr=subprocess.PIPE,
    )
    await wait_for_port(port, proc)
    return proc


async def test_a_dead_log_reader_does_not_kill_the_enforcer(
    demo: DemoLayout, tmp_path: Path
) -> None:
    port = free_port()
    layout = DemoLayout(demo.root, port)
    with piped_reader() as (write_end, cat):
        proc = await serve_process(config_for(demo, tmp_path, "-"), port, write_end)
        try:
            assert await requests(port, layout, 3) == [403] * 3
            cat.kill()  # the reader of the enforcer's standard output dies
            cat.wait()
            with trio.fail_after(30):
                assert await requests(port, layout, 20) == [403] * 20
            assert proc.returncode is None
        finally:
            code = await stop(proc)
    assert code == 0
    stderr = (await read_all(proc)).decode()
    assert "dropping records" in stderr and "dropped in all" in stderr


async def test_a_stalled_log_reader_does_not_freeze_the_enforcer(
    demo: DemoLayout, tmp_path: Path
) -> None:
    port = free_port()
    layout = DemoLayout(demo.root, port)
    received = tmp_path / "received.log"
    long_path = "/" + "x" * 12000  # ~12 KB a record: the pipe holds five, the buffer ~350
    with piped_reader(received) as (write_end, cat):
        proc = await serve_process(config_for(demo, tmp_path, "-"), port, write_end)
        os.close(write_end)  # the enforcer holds the only write end: its exit is cat's EOF
        try:
            cat.send_signal(signal.SIGSTOP)  # the reader stalls: the pipe fills and stays full
            with trio.fail_after(60):
                assert await requests(port, layout, 500, long_path) == [403] * 500
            cat.send_signal(signal.SIGCONT)
            with trio.fail_after(30):
                assert await requests(port, layout, 1, "/after") == [403]
        finally:
            code = await stop(proc)
        assert code == 0
        with trio.fail_after(10):
            while cat.poll() is None:  # the enforcer closed its end: cat sees EOF
                await trio.sleep(0.05)
    records = [json.loads(line) for line in received.read_text().splitlines()]
    notices = [r for r in records if r.get("event") == "access_log_dropped"]
    served = [r for r in records if r.get("path") is not None]
    assert notices and sum(n["dropped"] for n in notices) == 501 - len(served)
    assert served[-1]["path"] == "/after"  # logging resumed once the reader did


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
async def test_sighup_reopens_a_renamed_log_file(demo: DemoLayout, tmp_path: Path) -> None:
    port = free_port()
    layout = DemoLayout(demo.root, port)
    log_file = tmp_path / "access.log"
    proc = await serve_process(config_for(demo, tmp_path, str(log_file)), port, subprocess.DEVNULL)
    try:
        assert await requests(port, layout, 1, "/before") == [403]
        rotated = tmp_path / "access.log.1"
        log_file.rename(rotated)  # what logrotate does, then it signals
        proc.send_signal(signal.SIGHUP)
        with trio.fail_after(20):
            while not log_file.exists():
                await trio.sleep(0.05)
        assert await requests(port, layout, 1, "/after") == [403]
        with trio.fail_after(20):
            while "/after" not in log_file.read_text():
                await trio.sleep(0.05)
    finally:
        code = await stop(proc)
    assert code == 0
    assert paths(rotated) == ["/before"]
    assert paths(log_file) == ["/after"]


def paths(log_file: Path) -> list[str]:
    """The paths of the request records in a log file (readiness probes log TLS errors)."""
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    return [r["path"] for r in records if "path" in r]


def test_a_full_buffer_drops_and_counts_without_blocking(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    target = os.fdopen(write_end, "w")
    access_log = AccessLog(target, buffer_bytes=64 * 1024)
    record = {"time": "t", "path": "/" + "y" * 10_000}
    done = threading.Event()

    def flood() -> None:
        for _ in range(100):  # ~1 MB into a 64 KiB pipe nobody reads, and a 64 KiB buffer
            access_log.write(record)
        done.set()

    threading.Thread(target=flood, daemon=True).start()
    assert done.wait(20), "AccessLog.write blocked on a full pipe"
    assert access_log.dropped > 70
    # The reader comes back: the next record is preceded by the count of what was lost.
    reader = os.fdopen(read_end, "rb")
    os.set_blocking(read_end, False)
    data = b""
    lost = access_log.dropped
    access_log.write({"time": "t2", "path": "/last"})
    for _ in range(400):
        data += reader.read() or b""
        if b'"/last"' in data:
            break
        threading.Event().wait(0.05)
    lines = [json.loads(line) for line in data.splitlines()]
    notices = [line for line in lines if line.get("event") == "access_log_dropped"]
    assert lines[-2] == notices[-1] and notices[-1]["total"] == lost
    assert sum(n["dropped"] for n in notices) == lost
    assert lines[-1]["path"] == "/last"
    assert len(lines) - len(notices) + lost == 101
    access_log.close()
    reader.close()
    target.close()


def test_a_broken_pipe_stops_writing_and_counts(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line
    target = os.fdopen(write_end, "w")
    access_log = AccessLog(target)
    for i in range(5):
        access_log.write({"n": i})
    access_log.close()
    assert access_log.dropped == 5 and "broken pipe" in (access_log.broken or "")
    target.close()


def test_a_regular_file_is_written_at_once_without_a_writer_thread(tmp_path: Path) -> None:
    # Issue 18: a thread woken per record cost the serving thread a futex wake and a GIL
    # hand-off per request. A regular file has no reader to stall on: written in write().
    before = {t.ident for t in threading.enumerate()}
    log_file = tmp_path / "access.log"
    access_log = AccessLog(str(log_file))
    try:
        access_log.write({"time": "t", "path": "/first"})
        assert paths(log_file) == ["/first"]  # no waiting: the line is there when write returns
        started = [t for t in threading.enumerate() if t.ident not in before]
        assert not [t for t in started if t.name == "access-log-writer"]
        # logrotate: rename, reopen; the next line goes to the new file, none is lost.
        log_file.rename(tmp_path / "access.log.1")
        access_log.reopen()
        access_log.write({"time": "t", "path": "/second"})
        assert paths(log_file) == ["/second"]
        assert paths(tmp_path / "access.log.1") == ["/first"]
    finally:
        access_log.close()
    access_log.write({"time": "t", "path": "/after-close"})
    assert access_log.dropped == 1
    assert paths(log_file) == ["/second"]
