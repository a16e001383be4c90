"""`testbed run --dashboard`: the live page in real headless Chromium during a real short run.

The run is the CLI in a subprocess (its own trio loop, its embedded enforcer over loopback
TLS); the page is the one the package ships, loaded from the run's own server, with uPlot and
its WebSocket. The test reads what the page shows (its DOM) and what it counted (updates and
snapshots it received), drops the page's socket mid-run to see it come back with a snapshot,
and compares the page's final figures with the run's results database.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.browser import Browser, png_size

ROOT = Path(__file__).resolve().parents[2]
TESTBED = [sys.executable, "-m", "testbed.cli"]

SCENARIO = """\
name = "dash"
seed = 5
clock = "real"
thresholds = ["false_accepts == 0", "cohort.healthy.matched == 100%", "total.p99 < 10s"]

[target]
kind = "embedded"

[[cohorts]]
name = "healthy"
size = 6

[[cohorts]]
name = "expired"
size = 2
defect = "expired"

[[cohorts]]
name = "revoked"
size = 2
defect = "revoked"

[[phases]]
name = "warm-up"
duration = "2s"
arrival = "constant"
rate = 5

[[phases]]
name = "steady"
duration = "6s"
arrival = "constant"
rate = 10

[[events]]
at = "4s"
action = "revoke"
cohort = "healthy"
share = 0.5
"""


async def _url(stderr: Path, process: trio.Process, what: str) -> str:
    """The URL the run prints for ``what`` (``dashboard`` or ``metrics``) once it listens."""
    pattern = re.compile(rf"^{what}: (http://\S+)$", re.M)
    # A bound on a wait, not a timed assertion: provisioning the fleet comes first.
    with trio.fail_after(120):
        while True:
            match = pattern.search(stderr.read_text())
            if match:
                return match[1]
            assert process.returncode is None, stderr.read_text()
            await trio.sleep(0.1)


async def _until(browser: Browser, script: str, timeout: float = 60) -> Any:
    """Wait until a page expression is truthy (a bound on a wait, not a timed assertion)."""
    with trio.fail_after(timeout):
        while True:
            value = await browser.call(browser.driver.execute_script, f"return {script}")
            if value:
                return value
            await trio.sleep(0.2)


def _text(browser: Browser, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return str(browser.driver.find_element(By.ID, element_id).text)


async def test_dashboard_follows_a_run_in_chromium(
    tmp_path: Path, open_browser: Callable[..., Any]
) -> None:
    scenario = tmp_path / "dash.toml"
    scenario.write_text(SCENARIO)
    reports = tmp_path / "reports"
    stderr = tmp_path / "stderr.txt"
    browser: Browser = await open_browser([], [], None)
    with stderr.open("wb") as err:
        process = await trio.lowlevel.open_process(
            [*TESTBED, "run", str(scenario), "--reports", str(reports), "--dashboard", "0"],
            stdout=err,
            stderr=err,
            cwd=ROOT,
        )
    try:
        url = await _url(stderr, process, "dashboard")
        await browser.get(url)
        # At least three updates over the WebSocket while the run goes.
        await _until(browser, "window.dashboard.updates >= 3 && !window.dashboard.finished")
        seen = await browser.call(browser.driver.execute_script, "return window.dashboard")
        assert seen["snapshots"] == 1
        assert seen["state"]["status"] == "running", seen["state"]
        # The browser loses its connection mid-run: the page reconnects, gets the whole state
        # again (a second snapshot), and updates go on.
        before = seen["updates"]
        await browser.call(browser.driver.execute_script, "window.dashboard.socket.close()")
        await _until(browser, "window.dashboard.snapshots >= 2")
        await _until(browser, f"window.dashboard.updates > {before}")
        with trio.fail_after(120):
            code = await process.wait()
        assert code == 0, stderr.read_text()
        await _until(browser, "window.dashboard.finished")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    run_dir = next(reports.glob("dash-*"))
    db = sqlite3.connect(run_dir / "results.sqlite")
    try:
        attempts = db.execute("SELECT count(*) FROM attempts").fetchone()[0]
        by_cohort = dict(db.execute("SELECT cohort, count(*) FROM attempts GROUP BY cohort"))
        false_accepts = db.execute(
            "SELECT count(*) FROM attempts WHERE outcome = 'allowed' AND expected != 'allowed'"
        ).fetchone()[0]
        verdicts = list(db.execute("SELECT expression, ok FROM thresholds ORDER BY position"))
    finally:
        db.close()
    assert attempts > 0

    def shown() -> dict[str, Any]:
        from selenium.webdriver.common.by import By

        rows = browser.driver.find_elements(By.CSS_SELECTOR, "#cohorts tbody tr")
        thresholds = browser.driver.find_elements(By.CSS_SELECTOR, "#thresholds tbody tr")
        markers = browser.driver.find_elements(By.CSS_SELECTOR, "#markers tbody tr")
        return {
            "attempts": _text(browser, "attempts"),
            "false_accepts": _text(browser, "false_accepts"),
            "status": _text(browser, "status"),
            "cohorts": {
                r.find_elements(By.TAG_NAME, "td")[0].text: r.find_elements(By.TAG_NAME, "td")[
                    2
                ].text
                for r in rows
            },
            "thresholds": [
                (
                    r.find_elements(By.TAG_NAME, "td")[0].text,
                    r.find_elements(By.TAG_NAME, "td")[2].text,
                )
                for r in thresholds
            ],
            "markers": [r.text for r in markers],
            "note": _text(browser, "thresholds-note"),
        }

    page = await browser.call(shown)
    # The page's final figures are the run's own.
    assert page["status"] == "finished"
    assert page["attempts"] == f"{attempts:,}"
    assert page["false_accepts"] == f"{false_accepts:,}" == "0"
    assert page["cohorts"] == {name: f"{n:,}" for name, n in by_cohort.items()}
    assert page["note"] == "as judged at the end"
    assert page["thresholds"] == [(e, "holds" if ok else "fails") for e, ok in verdicts]
    # The phases and the revocation are marked, at their run time.
    assert any("warm-up" in m for m in page["markers"]), page["markers"]
    assert any("steady" in m for m in page["markers"]), page["markers"]
    assert any("revoke" in m for m in page["markers"]), page["markers"]

    # Room for the whole page (the charts follow the window's width).
    await browser.call(browser.driver.set_window_size, 1400, 1000)
    await trio.sleep(0.5)  # the page's resize handler redraws the charts
    shot = await browser.screenshot(tmp_path / "dashboard.png")
    width, height = png_size(shot.read_bytes())
    assert width >= 1000 and height >= 700
    if os.environ.get("TESTBED_DASHBOARD_SCREENSHOT"):
        # `make` target for the README's picture: the same page, saved where docs/ wants it.
        shutil.copy(shot, os.environ["TESTBED_DASHBOARD_SCREENSHOT"])
    # No console errors: the page, its script and uPlot loaded and ran cleanly (offline: the
    # browser reached nothing but the run's own server).
    logs = await browser.console()
    assert not [e for e in logs if e.get("level") == "SEVERE"], logs


def _live() -> Any:
    from testbed.live import LiveRun

    return LiveRun(
        scenario="s",
        clock="real",
        duration=10.0,
        cohorts={"healthy": {"expected": "allowed"}},
        phases=[{"name": "p", "start": 0, "duration": 10}],
    )


async def _get(port: int, raw: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(raw)
        answer = b""
        # The server answers and closes: a request it did not read whole may end in a reset.
        with contextlib.suppress(trio.BrokenResourceError):
            while chunk := await stream.receive_some(65536):
                answer += chunk
        return answer


async def test_the_server_answers_files_errors_and_caps_its_pages() -> None:
    import json

    import trio_websocket

    from testbed.dashboard import MAX_CLIENTS, Dashboard

    dashboard = Dashboard(_live())
    async with trio.open_nursery() as nursery:
        port = await nursery.start(dashboard.serve, "127.0.0.1", 0)
        page = await _get(port, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        assert page.startswith(b"HTTP/1.1 200 ")
        assert b"content-type: text/html" in page.lower() and b"uPlot.iife.min.js" in page
        chart = await _get(port, b"GET /uPlot.iife.min.js HTTP/1.1\r\nhost: x\r\n\r\n")
        assert chart.startswith(b"HTTP/1.1 200 ") and b"uPlot" in chart
        state = await _get(port, b"GET /state.json HTTP/1.1\r\nhost: x\r\n\r\n")
        assert json.loads(state.split(b"\r\n\r\n", 1)[1])["type"] == "snapshot"
        missing = await _get(port, b"GET /../../etc/passwd HTTP/1.1\r\nhost: x\r\n\r\n")
        assert missing.startswith(b"HTTP/1.1 404 ")
        garbage = await _get(port, b"\x16\x03\x01 not http at all\r\n\r\n")
        assert garbage.startswith(b"HTTP/1.1 400 ")
        huge = await _get(port, b"GET / HTTP/1.1\r\nx: " + b"a" * 20000 + b"\r\n\r\n")
        assert huge.startswith(b"HTTP/1.1 400 ")

        # Pages up to the cap get a snapshot; one more is refused with 503.
        async with contextlib.AsyncExitStack() as stack:
            pages = []
            for _ in range(MAX_CLIENTS):
                ws = await stack.enter_async_context(
                    trio_websocket.open_websocket("127.0.0.1", port, "/ws", use_ssl=False)
                )
                assert json.loads(await ws.get_message())["type"] == "snapshot"
                pages.append(ws)
            upgrade = (
                b"GET /ws HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
                b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
            )
            refused = await _get(port, upgrade)
            assert refused.startswith(b"HTTP/1.1 503 "), refused
            # An update reaches every page, then the end closes them with 1000.
            await dashboard.broadcast({"type": "update", "n": 1})
            await dashboard.close_all()
            for ws in pages:
                assert json.loads(await ws.get_message()) == {"type": "update", "n": 1}
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason.code == 1000
                assert closed.value.reason.reason == "run finished"
                # trio-websocket's client leaves its socket open when the server ends the TCP
                # connection after a completed close handshake (its reader just stops): close
                # it here, or the test leaks a socket per page.
                await ws._stream.aclose()
        nursery.cancel_scope.cancel()
