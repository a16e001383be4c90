"""Verdicts users can trust: no device handed out twice, default gates, errors apart from
decisions, expectations that follow events (issue 15). Real runs on loopback."""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import json
import os
import sqlite3
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
import trio

from devices.provision import Cohort, provision
from testbed.runner import Device
from testbed.scenario import CohortSpec
from testbed.thresholds import parse_threshold
from tests.testbed.test_run import ROOT, TESTBED, run_cli, small


@pytest.fixture(scope="module")
def fleet3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three healthy devices: a fleet that cannot serve hundreds of attempts a second."""
    root = tmp_path_factory.mktemp("verdicts") / "fleet"
    provision(root, [Cohort("healthy", 3)], dt.datetime.now(dt.UTC), p12=False, workers=1)
    return root


def rows(run_dir: Path, sql: str, *params: object) -> list[tuple]:
    con = sqlite3.connect(run_dir / "results.sqlite")
    try:
        return list(con.execute(sql, params))
    finally:
        con.close()


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


# 1. Overload: a device is claimed before its attempt starts.


def test_overload_never_hands_one_device_to_two_arrivals(fleet3: Path, tmp_path: Path) -> None:
    rate, seconds = 300, 2
    result = run_cli(
        *("load", "--fleet", str(fleet3), "--reports", str(tmp_path), "--no-progress"),
        *("--target", "embedded", "--rate", str(rate), "--duration", f"{seconds}s"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = next(tmp_path.glob("load-*"))
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for device, started, service_ms in rows(
        run_dir, "SELECT device, started, service_ms FROM attempts"
    ):
        spans[device].append((started, started + service_ms / 1000))
    assert 0 < len(spans) <= 3
    for device, intervals in spans.items():
        intervals.sort()
        for (_, end), (start, _) in itertools.pairwise(intervals):
            # One device, one attempt at a time: the next starts after the last ended.
            assert start >= end - 1e-9, (device, end, start)
    recorded = rows(run_dir, "SELECT count(*) FROM attempts")[0][0]
    dropped = rows(run_dir, "SELECT count(*) FROM dropped")[0][0]
    assert recorded + dropped == rate * seconds
    assert dropped > 0  # the fleet could not keep up: the excess was dropped, not doubled
    totals = summary_of(run_dir)["totals"]
    assert (totals["attempts"], totals["dropped"]) == (recorded, dropped)


# 2. Default gates: a run that never reached its target, or let the wrong devices in, fails.


async def load_against(url: str, fleet: Path, reports: Path, *args: str) -> tuple[int, str, Path]:
    """Run `testbed load` as a process (this test's trio loop serves its target meanwhile)."""
    with trio.fail_after(120):
        proc = await trio.run_process(
            [
                *TESTBED,
                *("load", "--fleet", str(fleet), "--reports", str(reports), "--no-progress"),
                *("--target", url, *args),
            ],
            cwd=ROOT,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    runs = sorted(reports.glob("load-*"))
    return proc.returncode, proc.stdout.decode() + proc.stderr.decode(), runs[-1]


async def test_a_url_target_without_ca_fails_naming_the_cause(
    served, fleet3: Path, tmp_path: Path
) -> None:
    # The enforcer answers, but the devices cannot verify its certificate without --ca: not
    # one attempt reaches a decision, and the run says why instead of passing.
    code, output, run_dir = await load_against(
        f"https://127.0.0.1:{served.port}",
        fleet3,
        tmp_path,
        *("--hostname", "auth.example.test", "--rate", "10", "--duration", "1s"),
    )
    assert code == 1, output
    assert "every TLS handshake failed: certificate verify failed; pass --ca" in output
    summary = summary_of(run_dir)
    totals = summary["totals"]
    assert totals["attempts"] > 0
    assert totals["errors"] == totals["attempts"] and totals["decisions"] == 0
    assert totals["false_rejects"] == 0  # the target refused nobody: it was never reached
    verdicts = {t["expression"]: t for t in summary["thresholds"]}
    gate = verdicts["decisions > 0 (default)"]
    assert not gate["ok"] and "pass --ca" in gate["observed"]
    assert not verdicts["errors <= 1% (default)"]["ok"]
    assert "FAILED decisions > 0 (default)" in output


async def test_the_same_url_with_its_ca_passes(served, fleet3: Path, tmp_path: Path) -> None:
    # The control: with --ca the devices reach the enforcer, which (not trusting this fleet)
    # refuses them. Refusals are decisions, so the gates hold; the mismatch is false rejects.
    code, output, run_dir = await load_against(
        f"https://127.0.0.1:{served.port}",
        fleet3,
        tmp_path,
        *("--hostname", "auth.example.test", "--ca", str(served.layout.edge_ca)),
        *("--rate", "10", "--duration", "1s"),
    )
    assert code == 0, output
    totals = summary_of(run_dir)["totals"]
    assert totals["errors"] == 0 and totals["decisions"] == totals["attempts"] > 0
    assert totals["false_rejects"] == totals["attempts"]


CONTRADICTED = """
name = "contradicted"
thresholds = []

[target]
kind = "embedded"

[[cohorts]]
name = "healthy"
size = 3
expected = "denied:revoked"

[[phases]]
name = "p"
duration = "1s"
arrival = "constant"
rate = 10
"""


def test_false_accepts_fail_a_run_that_declares_no_thresholds(tmp_path: Path) -> None:
    # The scenario says these devices are revoked; the enforcer (rightly, it was told nothing)
    # lets them in. No threshold was written, and still the run fails.
    path = tmp_path / "contradicted.toml"
    path.write_text(CONTRADICTED)
    result = run_cli("run", str(path), "--reports", str(tmp_path / "r"), "--no-progress")
    assert result.returncode == 1, result.stdout + result.stderr
    run_dir = next((tmp_path / "r").glob("contradicted-*"))
    summary = summary_of(run_dir)
    assert summary["totals"]["false_accepts"] == summary["totals"]["attempts"] > 0
    verdicts = {t["expression"]: t["ok"] for t in summary["thresholds"]}
    assert verdicts == {
        "false_accepts == 0 (default)": False,
        "errors <= 1% (default)": True,
        "decisions > 0 (default)": True,
    }
    assert "FAILED false_accepts == 0 (default)" in result.stderr
    junit = (run_dir / "junit.xml").read_text()
    assert junit.count("<failure") == 1


def test_a_declared_threshold_replaces_its_gate_and_max_errors_sets_the_budget() -> None:
    from testbed.verdict import gates

    declared = [
        parse_threshold("false_accepts <= 2", ["c"]),
        parse_threshold("errors <= 30%", ["c"]),
    ]
    assert [t.text for t in gates(declared)] == [
        "false_accepts <= 2",
        "errors <= 30%",
        "decisions > 0 (default)",
    ]
    assert [t.text for t in gates([], max_errors=0.05)] == [
        "false_accepts == 0 (default)",
        "errors <= 5% (default)",
        "decisions > 0 (default)",
    ]
    assert [t.text for t in gates([], error_budget=False)] == [
        "false_accepts == 0 (default)",
        "decisions > 0 (default)",
    ]
    assert parse_threshold("errors <= 1%", []).of_attempts
    assert not parse_threshold("errors <= 1", []).of_attempts


# 3. Timeouts are errors, not false rejects.


async def test_a_target_that_never_answers_gives_errors_not_false_rejects(
    fleet3: Path, tmp_path: Path
) -> None:
    async def mute(stream: trio.SocketStream) -> None:
        async with stream:
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, host="127.0.0.1"), mute, 0
        )
        port = listeners[0].socket.getsockname()[1]
        code, output, run_dir = await load_against(
            f"https://127.0.0.1:{port}",
            fleet3,
            tmp_path,
            *("--ca", str(fleet3 / "ca" / "root.pem"), "--hostname", "mute.example.test"),
            *("--rate", "3", "--duration", "1s", "--timeout", "0.5s"),
        )
        nursery.cancel_scope.cancel()
    assert code == 1, output
    summary = summary_of(run_dir)
    totals = summary["totals"]
    assert totals["outcomes"] == {"timeout": totals["attempts"]} and totals["attempts"] > 0
    assert totals["false_rejects"] == 0
    assert totals["errors"] == totals["attempts"] and totals["decisions"] == 0
    healthy = summary["cohorts"]["healthy"]
    assert healthy["false_rejects"] == 0 and healthy["errors"] == healthy["attempts"]
    assert "every attempt ended in timeout: no answer within" in output


# 4. Expectations follow events, and each is shown with its count.


def test_a_mid_run_revocation_judges_each_attempt_by_its_time(tmp_path: Path) -> None:
    path = small(
        tmp_path, name="revoking", duration="3s", thresholds="", arrival_fields="rate = 20"
    )
    path.write_text(
        path.read_text()
        + """
[[events]]
at = "1s"
action = "revoke"
cohort = "healthy"
share = 0.5
"""
    )
    result = subprocess.run(
        [*TESTBED, "run", str(path), "--reports", str(tmp_path / "r"), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = next((tmp_path / "r").glob("revoking-*"))
    healthy = summary_of(run_dir)["cohorts"]["healthy"]
    by = {e["expected"]: e for e in healthy["by_expected"]}
    assert set(by) == {"allowed", "denied:revoked"}
    assert all(e["matched"] == e["attempts"] > 0 for e in by.values()), by
    assert sum(e["attempts"] for e in by.values()) == healthy["attempts"]
    assert healthy["matched"] == healthy["attempts"] and healthy["unmatched_outcomes"] == {}
    assert healthy["false_accepts"] == healthy["false_rejects"] == 0
    # Every refusal came after the revocation, and was expected by then.
    late = rows(
        run_dir,
        "SELECT min(scheduled), count(*) FROM attempts WHERE cohort = 'healthy'"
        " AND expected = 'denied:revoked'",
    )[0]
    assert late[0] >= 0.95 and late[1] == by["denied:revoked"]["attempts"]
    # The terminal table shows both expectations with their counts, not "allowed" alone.
    revoked = by["denied:revoked"]["attempts"]
    assert f"denied:revoked {revoked:,}" in result.stdout, result.stdout
    # So does report.html's cohort table.
    html = (run_dir / "report.html").read_text()
    assert f"<code>denied:revoked</code>: {revoked:,}" in html


async def test_an_attempt_that_spans_an_event_may_match_either_side() -> None:
    spec = CohortSpec("c", 1, None, "allowed")
    device = Device("d", spec, "00", "d", client=None)  # type: ignore[arg-type]
    started = trio.current_time()
    await trio.sleep(0.01)
    device.expect("denied:revoked")
    # Decided before the revocation reached the target: allowed was right then.
    assert device.expected_for("allowed", started) == "allowed"
    assert device.expected_for("denied:revoked", started) == "denied:revoked"
    assert device.expected_for("timeout", started) == "denied:revoked"
    # Started after it: only the refusal is right.
    assert device.expected_for("allowed", trio.current_time()) == "denied:revoked"
