"""Every scenario shipped in `scenarios/` passes through the real CLI, for the right reasons.

A scenario passes for the right reasons when its thresholds cover what it claims to show: each
cohort's matched share is judged (`cohort.<name>.matched`), `false_accepts == 0` is judged,
every threshold is evaluated (none left without data), and the claims the thresholds cannot
state (the No Duration handshake shares, the PIV PIN lock) are checked on `results.sqlite`.

The week-long virtual-time scenarios run in CI as copies with smaller cohorts (the same week,
events and checks); their full-size runs are marked `slow` (`pytest -m slow`).
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import tomllib
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from devices.piv import MAX_RETRIES
from testbed.nginx import NGINX
from tests.oidc_idp import oidc_idp  # noqa: F401 - the provider of the people scenarios

TESTBED = [sys.executable, "-m", "testbed.cli"]
ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ROOT / "scenarios"
NOT_SCENARIOS = {"enforcer.example.toml"}  # an enforcer configuration, not a scenario
SHIPPED = sorted(p.name for p in SCENARIOS.glob("*.toml") if p.name not in NOT_SCENARIOS)

# How much smaller CI runs a long scenario: cohort sizes, active devices and `attempts > N`
# thresholds divided by this; the duration and the events stay as shipped.
SHRINK = {"week-in-virtual-time.toml": 20, "week-10k-in-virtual-time.toml": 200}
# Scenarios whose people log in at an identity provider: run against the tests' real one.
PEOPLE = {"people-and-devices.toml"}
# Full-size runs of those, split between processes as their comments advise.
FULL_WORKERS = {"week-in-virtual-time.toml": 1, "week-10k-in-virtual-time.toml": 2}


def shrunk(source: Path, factor: int, out: Path) -> Path:
    """Write a copy of ``source`` with its sizes (and attempt-count thresholds) divided."""
    text = source.read_text()

    def div(m: re.Match[str]) -> str:
        return f"{m[1]}{max(1, int(m[2]) // factor)}"

    text = re.sub(r"(?m)^(size = )(\d+)", div, text)
    text = re.sub(r"(?m)^(devices = )(\d+)", div, text)
    text = re.sub(r'("attempts > )(\d+)', div, text)
    path = out / source.name
    path.write_text(text)
    before, after = tomllib.loads(source.read_text()), tomllib.loads(text)
    assert [c["size"] for c in after["cohorts"]] == [
        max(1, c["size"] // factor) for c in before["cohorts"]
    ], "the shrinking missed a cohort size"
    return path


def run(
    scenario: Path,
    reports: Path,
    *extra: str,
    timeout: float,
    env: dict[str, str] | None = None,
) -> Path:
    """Run ``testbed run`` on ``scenario``; assert it exits 0 and return its run folder."""
    proc = subprocess.run(
        [*TESTBED, "run", str(scenario), "--reports", str(reports), "--no-progress", *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, (
        f"{scenario.name} exited {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    )
    (run_dir,) = reports.iterdir()
    return run_dir


def check_right_reasons(scenario: Path, run_dir: Path) -> dict[str, Any]:
    """Assert the run was judged on what the scenario claims; return its summary."""
    spec = tomllib.loads(scenario.read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"]
    judged = {t["expression"]: t for t in summary["thresholds"]}
    declared = [" ".join(t.split()) for t in spec["thresholds"]]
    # Every threshold the file declares was evaluated on data, and held; beside them only the
    # default gates it did not override (testbed/verdict.py), which must hold too.
    assert set(declared) <= set(judged)
    assert all(e.endswith(" (default)") for e in set(judged) - set(declared)), judged
    for expression, t in judged.items():
        if expression in declared:
            float(t["observed"])  # a number, not "no data"
        assert t["ok"], f"{expression}: observed {t['observed']}"
    assert "false_accepts == 0" in judged
    assert summary["totals"]["false_accepts"] == 0
    # Each cohort's matched share is judged by a threshold, and the cohort made attempts.
    # A lower bound on it: `== 100%`, or `>= N%` where timing can blur a transition.
    matched = {
        m[1]: float(m[2])
        for e in declared
        if (m := re.fullmatch(r"cohort\.(.+)\.matched (?:==|>=) ([0-9.]+)%", e))
    }
    for name, cohort in summary["cohorts"].items():
        assert name in matched, f"{scenario.name}: no cohort.{name}.matched threshold"
        assert cohort["attempts"] > 0, f"{scenario.name}: cohort {name} made no attempt"
        assert cohort["matched_share"] * 100 >= matched[name] - 1e-9
    assert set(summary["cohorts"]) == {c["name"] for c in spec["cohorts"]}
    return summary


def rows(run_dir: Path, query: str) -> list[tuple[Any, ...]]:
    """Rows of ``query`` on the run's results.sqlite."""
    db = sqlite3.connect(run_dir / "results.sqlite")
    try:
        return db.execute(query).fetchall()
    finally:
        db.close()


def check_claims(name: str, run_dir: Path) -> None:
    """What a scenario shows beyond its thresholds, read from the attempts themselves."""
    if name == "no-duration.toml":
        # Every request of the No Duration phase is a full handshake; once the application
        # has 24 h cookies, kept-alive devices mostly reuse their connection and cookie.
        share = dict(
            rows(
                run_dir,
                "SELECT phase, AVG(new_connection AND NOT resumed) FROM attempts"
                " WHERE cohort = 'devices' GROUP BY phase",
            )
        )
        assert share["no-duration"] == 1.0
        assert share["cookies"] < 0.5
    if name == "grpc-fleet.toml":
        # Every cohort made gRPC calls on its own application's hostname, and the enforcer
        # agrees with the devices: one connection per call on No Duration (telemetry-live),
        # about one per device on 24 h (telemetry-batch).
        spec = tomllib.loads((SCENARIOS / name).read_text())
        host = {a["name"]: a["hostname"] for a in spec["target"]["applications"]}
        app_of = {c["name"]: host[c["application"]] for c in spec["cohorts"]}
        assert rows(run_dir, "SELECT DISTINCT protocol FROM attempts") == [("grpc",)]
        cohort_of = dict(rows(run_dir, "SELECT DISTINCT device, cohort FROM attempts"))
        requests: dict[str, int] = defaultdict(int)
        connections: dict[str, set[int]] = defaultdict(set)
        for line in (run_dir / "access.log").read_text().splitlines():
            entry = json.loads(line)
            if "decision" not in entry:
                continue  # a connection-level line (a handshake the client abandoned)
            if entry["certificate"] is not None:
                assert entry["sni"] == app_of[cohort_of[entry["certificate"]["common_name"]]]
            if entry["decision"] == "allowed":
                requests[entry["sni"]] += 1
                connections[entry["sni"]].add(entry["connection"])
        live, batch = host["telemetry-live"], host["telemetry-batch"]
        assert len(connections[live]) == requests[live] > 0
        batch_devices = sum(
            c["size"]
            for c in spec["cohorts"]
            if c["application"] == "telemetry-batch" and "defect" not in c
        )
        assert len(connections[batch]) <= batch_devices < requests[batch]
        new = dict(
            rows(
                run_dir,
                "SELECT cohort, AVG(new_connection) FROM attempts WHERE outcome = 'allowed'"
                " GROUP BY cohort",
            )
        )
        assert new["live-reporters"] == new["live-watchers"] == 1.0
        assert new["batch-reporters"] < 0.5 and new["batch-watchers"] < 0.5
    if name == "people-and-devices.toml":
        # One login per person's session (two laptops of staff, one outsider), and the person
        # without a certificate never went to the provider (I7).
        logins = dict(rows(run_dir, "SELECT cohort, SUM(logged_in) FROM attempts GROUP BY cohort"))
        assert logins["staff"] == 2 and logins["outsiders"] >= 1
        assert logins["staff-without-laptop"] == 0 and logins["devices"] == 0
        kinds = dict(rows(run_dir, "SELECT DISTINCT cohort, kind FROM attempts"))
        assert kinds["staff"] == "people" and kinds["ci-jobs"] == "service_tokens"
    if name == "yubikey-fleet.toml":
        # Each wrong-PIN token answers CKR_PIN_INCORRECT three times, then CKR_PIN_LOCKED.
        seen: dict[str, list[str]] = defaultdict(list)
        for device, outcome in rows(
            run_dir,
            "SELECT device, outcome FROM attempts WHERE cohort = 'wrong-pin' ORDER BY started",
        ):
            seen[device].append(outcome)
        assert len(seen) == 3
        for outcomes in seen.values():
            assert len(outcomes) > MAX_RETRIES
            assert outcomes[:MAX_RETRIES] == ["key_store_error:CKR_PIN_INCORRECT"] * MAX_RETRIES
            assert set(outcomes[MAX_RETRIES:]) == {"key_store_error:CKR_PIN_LOCKED"}


def test_every_shipped_scenario_is_checked() -> None:
    # A new scenario file is run by the tests below as soon as it is added.
    assert len(SHIPPED) >= 8
    assert set(SHRINK) <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_scenario_passes_for_the_right_reasons(
    name: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if name == "nginx.toml" and NGINX is None:
        pytest.skip("nginx is not installed")
    scenario = SCENARIOS / name
    env = None
    if name in SHRINK:
        (tmp_path / "scenario").mkdir()
        scenario = shrunk(scenario, SHRINK[name], tmp_path / "scenario")
    if name in PEOPLE:
        # Its people log in at a provider the user runs: here, the tests' real one.
        from tests.people_idp import point_at

        (tmp_path / "scenario").mkdir(exist_ok=True)
        scenario, env = point_at(
            request.getfixturevalue("oidc_idp"), scenario, tmp_path / "scenario"
        )
    reports = tmp_path / "reports"
    run_dir = run(scenario, reports, timeout=240, env=env)
    check_right_reasons(scenario, run_dir)
    check_claims(name, run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHRINK))
def test_long_scenario_at_full_size(name: str, tmp_path: Path) -> None:
    scenario = SCENARIOS / name
    run_dir = run(scenario, tmp_path, "--workers", str(FULL_WORKERS[name]), timeout=1800)
    check_right_reasons(scenario, run_dir)
