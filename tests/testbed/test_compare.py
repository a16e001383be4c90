"""`testbed compare`: the JSON line and the regression gates (`--fail-if`) CI decides on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from testbed.report import GateError, judge_gate, load_summary, parse_gate
from testbed.results import AttemptRow
from tests.testbed.test_report import make_rows, write_run

TESTBED = [sys.executable, "-m", "testbed.cli"]
ROOT = Path(__file__).resolve().parents[2]


def run_testbed(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TESTBED, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A baseline, and a run twice as slow that lets every expired device in."""
    rows = make_rows()
    base = write_run(tmp_path_factory.mktemp("base"), rows)
    worse = [
        AttemptRow(**{**r.__dict__, "total_ms": r.total_ms * 2, "outcome": "allowed"}) for r in rows
    ]
    return base, write_run(tmp_path_factory.mktemp("worse"), worse)


def test_a_regression_trips_the_gates_and_exits_1(runs: tuple[Path, Path]) -> None:
    base, worse = runs
    result = run_testbed(
        *("compare", str(base), str(worse), "--json"),
        *("--fail-if", "total.p99 > +10%", "--fail-if", "false_accepts > 0"),
        *("--fail-if", "handshake.p50 > +10%"),  # unchanged: does not trip
    )
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout  # exactly one line for jq; tables went to stderr
    data = json.loads(lines[0])
    gates = {g["expression"]: g for g in data["gates"]}
    assert gates["total.p99 > +10%"]["tripped"] is True
    assert gates["total.p99 > +10%"]["change"] == pytest.approx(1.0, abs=0.01)
    assert gates["false_accepts > 0"]["tripped"] is True
    assert gates["false_accepts > 0"]["b"] == 40
    assert gates["handshake.p50 > +10%"]["tripped"] is False
    assert data["tripped"] == ["total.p99 > +10%", "false_accepts > 0"]
    latency = {row["metric"]: row for row in data["latency"]}
    assert latency["total.p50"]["change"] == pytest.approx(1.0, abs=0.01)
    assert data["a"]["dir"] == str(base) and data["b"]["dir"] == str(worse)
    assert "regression: total.p99 > +10%" in result.stderr
    assert "TRIPPED" in result.stderr  # the gates table, for people reading the log


def test_no_regression_exits_0(runs: tuple[Path, Path]) -> None:
    base, worse = runs
    # B against itself: nothing changed, and B's own values are within the bounds.
    result = run_testbed(
        *("compare", str(base), str(base), "--json"),
        *("--fail-if", "total.p99 > +10%", "--fail-if", "false_rejects > 100"),
        *("--fail-if", "cohort.expired.matched < 90%"),
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [g["tripped"] for g in data["gates"]] == [False, False, False]
    assert data["tripped"] == []
    # The faster direction of a relative gate: B = base, A = worse, p99 halves.
    result = run_testbed("compare", str(worse), str(base), "--fail-if", "total.p99 > +10%")
    assert result.returncode == 0, result.stderr
    assert "total.p99 > +10%" in result.stdout  # the gates table, without --json


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("total.p98 > +10%", "is not a latency statistic"),
        ("latency > 5", "is not a metric"),
        ("total.p99 >> 5", "expected METRIC OP VALUE"),
        ("total.p99 > +10ms", "a signed value is a change from A"),
        ("false_accepts > 5ms", "a time unit on false_accepts"),
        ("cohort.nope.matched < 99%", "no such cohort"),
    ],
)
def test_a_bad_gate_exits_2_naming_it(
    runs: tuple[Path, Path], expression: str, message: str
) -> None:
    base, worse = runs
    result = run_testbed(
        *("compare", str(base), str(worse), "--json"),
        *("--fail-if", "false_accepts > 0", "--fail-if", expression),
    )
    assert result.returncode == 2, result.stderr
    assert f"--fail-if {expression!r}" in result.stderr
    assert message in result.stderr
    assert result.stdout == ""  # no verdict printed for a gate that could not be read


def test_gates_on_summaries(runs: tuple[Path, Path]) -> None:
    base, worse = (load_summary(r) for r in runs)
    slower = parse_gate("total.p99 > +10%")
    assert (slower.relative, slower.value) == (True, pytest.approx(0.10))
    assert judge_gate(slower, base, worse)["tripped"] is True
    assert judge_gate(slower, worse, base)["tripped"] is False
    # A fall: the rate of B against itself did not fall by 5%.
    assert judge_gate(parse_gate("rate < -5%"), base, base)["tripped"] is False
    assert judge_gate(parse_gate("total.p99 < -40%"), worse, base)["tripped"] is True
    # Absolute values on B: shares in %, latencies in ms or s.
    assert parse_gate("cohort.expired.matched < 99%").value == pytest.approx(0.99)
    assert parse_gate("handshake.p99 > 0.05s").value == pytest.approx(50.0)
    assert judge_gate(parse_gate("cohort.expired.matched < 99%"), base, base)["tripped"] is True
    assert judge_gate(parse_gate("false_accepts == 1"), worse, base)["tripped"] is True
    assert judge_gate(parse_gate("false_accepts != 1"), worse, base)["tripped"] is False


def test_a_gate_without_data_trips(runs: tuple[Path, Path]) -> None:
    base = load_summary(runs[0])
    empty: dict[str, Any] = json.loads(json.dumps(base))
    empty["latency"]["total"] = dict.fromkeys(empty["latency"]["total"]) | {"count": 0}
    gate = judge_gate(parse_gate("total.p99 > +10%"), base, empty)
    assert gate["tripped"] is True and "no data" in gate["why"]
    with pytest.raises(GateError, match="no such cohort"):
        judge_gate(parse_gate("cohort.nope.matched < 1%"), base, base)
