"""Verdicts users can trust: no device handed out twice, default gates, errors apart from
decisions, expectations that follow events (issue 15). Real runs on loopback."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections import defaultdict
from pathlib import Path

import pytest
import trio

from devices.provision import Cohort, provision
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
        for (_, end), (start, _) in zip(intervals, intervals[1:], strict=False):
            # One device, one attempt at a time: the next starts after the last ended.
            assert start >= end - 1e-9, (device, end, start)
    recorded = rows(run_dir, "SELECT count(*) FROM attempts")[0][0]
    dropped = rows(run_dir, "SELECT count(*) FROM dropped")[0][0]
    assert recorded + dropped == rate * seconds
    assert dropped > 0  # the fleet could not keep up: the excess was dropped, not doubled
    totals = summary_of(run_dir)["totals"]
    assert (totals["attempts"], totals["dropped"]) == (recorded, dropped)
