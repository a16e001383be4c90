"""`testbed load` as a user drives it: a scenario's thresholds and events, `--json` read by
jq, and `--step` runs whose every step, real length and repeats are reported."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from devices.provision import Cohort, provision
from tests.testbed.test_run import run_cli


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight healthy devices and two expired ones."""
    root = tmp_path_factory.mktemp("load-cli") / "fleet"
    provision(
        root,
        [Cohort("healthy", 8), Cohort("expired", 2, "expired")],
        dt.datetime.now(dt.UTC),
        p12=False,
        workers=1,
    )
    return root


def load(reports: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], Path | None]:
    result = run_cli("load", "--reports", str(reports), "--no-progress", *args)
    runs = sorted(reports.glob("load-*")) if reports.exists() else []
    return result, runs[-1] if runs else None


def meta(run_dir: Path) -> dict[str, object]:
    con = sqlite3.connect(run_dir / "results.sqlite")
    try:
        return {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM run")}
    finally:
        con.close()


def rows(run_dir: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(run_dir / "results.sqlite")
    try:
        return list(con.execute(sql))
    finally:
        con.close()


SCENARIO = """\
name = "small"
seed = 3
clock = "real"
thresholds = {thresholds}

[target]
kind = "embedded"

[[cohorts]]
name = "healthy"
size = 6

[[cohorts]]
name = "expired"
size = 2
defect = "expired"

[[phases]]
name = "steady"
duration = "2s"
arrival = "constant"
rate = 5
{events}"""


def scenario(tmp_path: Path, thresholds: list[str], events: str = "") -> Path:
    path = tmp_path / "small.toml"
    path.write_text(SCENARIO.format(thresholds=json.dumps(thresholds), events=events))
    return path


# -- a scenario's thresholds and events ---------------------------------------------------------


def test_a_scenarios_failing_threshold_fails_the_load(tmp_path: Path) -> None:
    # The scenario says every healthy device is refused: wrong, so the load must fail on it.
    path = scenario(tmp_path, ["false_accepts == 0", "cohort.healthy.share:denied:revoked > 50%"])
    result, run_dir = load(
        tmp_path / "r",
        *("--scenario", str(path), "--target", "embedded", "--rate", "5", "--duration", "2s"),
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert run_dir is not None
    verdicts = rows(run_dir, "SELECT expression, ok FROM thresholds ORDER BY position")
    # The scenario's own, then the default gates it did not override (testbed/verdict.py).
    assert verdicts[:2] == [
        ("false_accepts == 0", 1),
        ("cohort.healthy.share:denied:revoked > 50%", 0),
    ]
    assert [e for e, _ in verdicts[2:]] == ["errors <= 1% (default)", "decisions > 0 (default)"]


def test_a_scenarios_thresholds_and_the_command_lines_are_both_kept(tmp_path: Path) -> None:
    path = scenario(tmp_path, ["false_accepts == 0"])
    result, run_dir = load(
        tmp_path / "r",
        *("--scenario", str(path), "--target", "embedded", "--rate", "5", "--duration", "2s"),
        *("--threshold", "cohort.expired.share:denied:certificate_expired == 100%"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert run_dir is not None
    assert rows(run_dir, "SELECT expression, ok FROM thresholds ORDER BY position") == [
        ("false_accepts == 0", 1),
        ("cohort.expired.share:denied:certificate_expired == 100%", 1),
        ("errors <= 1% (default)", 1),
        ("decisions > 0 (default)", 1),
    ]


REVOKE_AT_1S = """
[[events]]
at = "1s"
action = "revoke"
cohort = "healthy"
share = 0.5
"""


def test_a_scenario_event_takes_effect_during_the_load(tmp_path: Path) -> None:
    # Half the healthy cohort is revoked 1 s in: the embedded target refuses them from then
    # on, and they are expected to be refused, so no attempt is a false accept or reject.
    path = scenario(tmp_path, ["false_accepts == 0", "false_rejects == 0"], REVOKE_AT_1S)
    result, run_dir = load(
        tmp_path / "r",
        *("--scenario", str(path), "--target", "embedded", "--rate", "10", "--duration", "3s"),
        "--json",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert run_dir is not None
    events = rows(run_dir, "SELECT t, kind, detail FROM events WHERE kind = 'revoke'")
    assert [(t, kind) for t, kind, _ in events] == [(1.0, "revoke")]
    assert events[0][2].startswith("revoked 3 of 6 devices of cohort healthy")
    revoked = rows(
        run_dir,
        "SELECT device, min(started), count(*) FROM attempts WHERE outcome = 'denied:revoked'"
        " GROUP BY device",
    )
    assert revoked, "no attempt was refused after the revocation"
    assert len(revoked) <= 3 and all(first >= 1.0 for _, first, _ in revoked)
    # The revoked devices were admitted before the event and expected so; refused and
    # expected refused after it.
    for device, *_ in revoked:
        seen = rows(
            run_dir,
            f"SELECT started >= 1.0, outcome, expected FROM attempts WHERE device = '{device}'",
        )
        assert all(outcome == expected for _, outcome, expected in seen), seen
    figures = json.loads(result.stdout)
    assert figures["false_accepts"] == 0 and figures["false_rejects"] == 0
    assert figures["verdict"] == "pass"


def test_a_scenario_event_the_target_cannot_take_is_refused_by_name(tmp_path: Path) -> None:
    # A URL target belongs to someone else: the load cannot revoke anything on it.
    path = scenario(tmp_path, ["false_accepts == 0"], REVOKE_AT_1S)
    result, run_dir = load(
        tmp_path / "r",
        *("--scenario", str(path), "--target", "https://127.0.0.1:9", "--rate", "5"),
        *("--duration", "3s"),
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "revoke at 1s" in result.stderr and "--no-events" in result.stderr
    assert "a URL" in result.stderr
    assert run_dir is None  # refused before anything was written


def test_a_staircase_refuses_a_scenarios_events(tmp_path: Path) -> None:
    path = scenario(tmp_path, ["false_accepts == 0"], REVOKE_AT_1S)
    result, run_dir = load(
        tmp_path / "r",
        *("--scenario", str(path), "--target", "embedded", "--step", "5:5:10"),
        *("--duration", "1s", "--json"),
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "revoke at 1s" in result.stderr and "--step" in result.stderr
    assert run_dir is None
    # --json: one line even so, saying why there is no run.
    (line,) = result.stdout.splitlines()
    refused = json.loads(line)
    assert refused["verdict"] == "error" and refused["exit_code"] == 2
    assert "revoke at 1s" in refused["error"]


def test_no_events_loads_the_fleet_without_them_and_says_so(tmp_path: Path) -> None:
    path = scenario(tmp_path, ["false_accepts == 0"], REVOKE_AT_1S)
    result, run_dir = load(
        tmp_path / "r",
        *("--scenario", str(path), "--target", "embedded", "--rate", "5", "--duration", "2s"),
        "--no-events",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert run_dir is not None
    assert meta(run_dir)["events_not_applied"] == ["revoke at 1s"]


def test_an_event_after_the_loads_end_is_not_refused(tmp_path: Path) -> None:
    path = scenario(tmp_path, ["false_accepts == 0"], REVOKE_AT_1S.replace('"1s"', '"1h"'))
    result, run_dir = load(
        tmp_path / "r",
        *("--scenario", str(path), "--target", "embedded", "--rate", "5", "--duration", "2s"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert run_dir is not None
    assert meta(run_dir)["events_not_applied"] == ["revoke at 3600s (after the run's end)"]


# -- --json --------------------------------------------------------------------------------------


def test_json_prints_one_line_that_jq_reads(fleet: Path, tmp_path: Path) -> None:
    result, _ = load(
        tmp_path,
        *("--fleet", str(fleet), "--target", "embedded", "--rate", "10", "--duration", "2s"),
        *("--threshold", "total.p99 < 30s", "--json"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    figures = json.loads(lines[0])
    assert figures["verdict"] == "pass" and figures["exit_code"] == 0
    assert {"expression": "total.p99 < 30s", "ok": True}.items() <= figures["thresholds"][0].items()
    assert float(figures["thresholds"][0]["observed"]) > 0
    assert figures["attempts"] == 20
    assert figures["false_accepts"] == 0 and figures["false_rejects"] == 0
    assert figures["errors"] == 0 and figures["dropped"] == 0
    assert figures["rates"]["requested_per_s"] == 10
    assert figures["rates"]["achieved_per_s"] == pytest.approx(10, rel=0.05)
    for stat in ("p50", "p95", "p99", "max"):
        assert figures["latency_ms"]["total"][stat] > 0
    # What used to be on stdout (the summary, the report's path) went to stderr.
    assert "report:" in result.stderr
    if shutil.which("jq"):
        jq = subprocess.run(
            ["jq", "-e", '.verdict == "pass" and .false_accepts == 0'],
            input=result.stdout,
            capture_output=True,
            text=True,
            check=False,
        )
        assert jq.returncode == 0, jq.stderr
        assert jq.stdout.strip() == "true"


def test_json_of_a_failed_run_says_fail(fleet: Path, tmp_path: Path) -> None:
    result, _ = load(
        tmp_path,
        *("--fleet", str(fleet), "--target", "embedded", "--rate", "5", "--duration", "1s"),
        *("--threshold", "total.p99 < 0.001ms", "--json"),
    )
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = result.stdout.splitlines()
    figures = json.loads(line)
    assert figures["verdict"] == "fail"
    assert [t["ok"] for t in figures["thresholds"] if t["expression"] == "total.p99 < 0.001ms"] == [
        False
    ]


# -- --step --------------------------------------------------------------------------------------


def test_a_stopped_staircase_reports_its_real_length_and_rate(fleet: Path, tmp_path: Path) -> None:
    # Ten steps planned; a p99 bound no handshake meets stops the run after the first.
    result, run_dir = load(
        tmp_path,
        *("--fleet", str(fleet), "--target", "embedded", "--step", "4:4:40"),
        *("--duration", "1s", "--p99", "0.001ms", "--json"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert run_dir is not None
    summary = json.loads((run_dir / "summary.json").read_text())
    ran = summary["run"]["meta"]["phases"]
    # The first step, and what of the next ones began while the first was judged: far from
    # the ten planned, each where it really began, the last cut where the run stopped.
    assert ran[0] == {"name": "step-1", "start": 0.0, "duration": 1.0}
    assert [p["name"] for p in ran] == [f"step-{k + 1}" for k in range(len(ran))]
    assert len(ran) < 10 and ran[-1]["duration"] <= 1.0
    duration = summary["totals"]["duration_s"]
    assert duration == pytest.approx(sum(p["duration"] for p in ran))
    assert duration < 10  # not the ten seconds of the whole staircase
    assert summary["totals"]["rate"] == pytest.approx(summary["totals"]["attempts"] / duration)
    figures = json.loads(result.stdout)
    assert figures["duration_s"] == pytest.approx(duration)


def test_every_step_is_in_the_terminal_and_in_summary_json(fleet: Path, tmp_path: Path) -> None:
    result, run_dir = load(
        tmp_path,
        *("--fleet", str(fleet), "--target", "embedded", "--step", "4:4:8"),
        *("--duration", "1s", "--p99", "30s"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert run_dir is not None
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = summary["run"]["meta"]["steps"]
    assert [(s["phase"], s["rate"], s["attempts"], s["held"]) for s in steps] == [
        ("step-1", 4, 4, True),
        ("step-2", 8, 8, True),
    ]
    assert all(s["p99_ms"] > 0 and s["errors"] == 0 and s["dropped"] == 0 for s in steps)
    assert [s["start_s"] for s in steps] == [0.0, 1.0]
    assert summary["run"]["meta"]["sustained_rate"] == 8
    # The terminal's table, whatever its borders: step, rate, attempts, errors, dropped, p99,
    # held.
    table = [re.findall(r"[\w.-]+", line) for line in result.stdout.splitlines() if "step-" in line]
    table = [c for c in table if c[-1] in ("yes", "no")]  # not the per-phase tables' step rows
    assert [(c[0], c[1], c[2], c[3], c[4], c[6]) for c in table] == [
        ("step-1", "4", "4", "0", "0", "yes"),
        ("step-2", "8", "8", "0", "0", "yes"),
    ]
    assert [float(c[5]) for c in table] == [pytest.approx(s["p99_ms"], abs=0.05) for s in steps]
    # report.html: the sustainable rate and each step's verdict.
    html = (run_dir / "report.html").read_text()
    section = html[html.index('<h2 id="steps">') : html.index("<h2>Figures</h2>")]
    assert re.search(
        r'id="sustained-rate">Sustainable rate .*<strong>8 attempts/s</strong>', section
    )
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in section.split("<tr>")[2:]]
    assert [(c[1], c[2], c[4], re.sub("<[^>]+>", "", c[-1])) for c in cells] == [
        ("step-1", "4", "4", "held"),
        ("step-2", "8", "8", "held"),
    ]


def test_repeat_runs_the_staircase_again_and_reports_the_spread(
    fleet: Path, tmp_path: Path
) -> None:
    result, run_dir = load(
        tmp_path,
        *("--fleet", str(fleet), "--target", "embedded", "--step", "4:4:8"),
        *("--duration", "1s", "--p99", "30s", "--repeat", "2", "--json"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert run_dir is not None
    figures = json.loads(result.stdout)
    assert [(s["repeat"], s["phase"], s["held"]) for s in figures["steps"]] == [
        (1, "r1.step-1", True),
        (1, "r1.step-2", True),
        (2, "r2.step-1", True),
        (2, "r2.step-2", True),
    ]
    spread = figures["sustained_rate_spread"]
    assert spread == {"repeats": 2, "rates": [8, 8], "min": 8, "median": 8, "max": 8}
    assert "over 2 repeats: min 8/s, median 8/s, max 8/s" in result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["run"]["meta"]["sustained_rate_spread"] == spread
    # Both repeats' attempts are in the run's results, the second after the first.
    counts = dict(rows(run_dir, "SELECT phase, count(*) FROM attempts GROUP BY phase"))
    assert counts == {"r1.step-1": 4, "r1.step-2": 8, "r2.step-1": 4, "r2.step-2": 8}
    (first_end,) = rows(run_dir, "SELECT max(scheduled) FROM attempts WHERE phase LIKE 'r1.%'")[0]
    (second,) = rows(run_dir, "SELECT min(scheduled) FROM attempts WHERE phase LIKE 'r2.%'")[0]
    assert second > first_end
    assert summary["totals"]["attempts"] == 24
    html = (run_dir / "report.html").read_text()
    assert "median of 2 repeats, min 8/s, max 8/s" in html


def test_repeat_needs_a_staircase(fleet: Path, tmp_path: Path) -> None:
    result, run_dir = load(
        tmp_path / "r",
        *("--fleet", str(fleet), "--target", "embedded", "--rate", "4", "--duration", "1s"),
        *("--repeat", "2"),
    )
    assert result.returncode == 2
    assert "--repeat" in result.stderr and "--step" in result.stderr
    assert run_dir is None
