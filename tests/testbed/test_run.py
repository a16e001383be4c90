"""`testbed run`: scenario validation, thresholds and exit codes, interrupted runs, virtual time."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from testbed.nginx import NGINX
from testbed.runner import arrival_times
from testbed.scenario import Phase, ScenarioError, load_scenario

TESTBED = [sys.executable, "-m", "testbed.cli"]
ROOT = Path(__file__).resolve().parents[2]

SMALL = """
name = "{name}"
seed = {seed}
clock = "{clock}"
thresholds = [{thresholds}]

[target]
kind = "embedded"

[[cohorts]]
name = "healthy"
size = 6
behaviour = {{ kind = "periodic", interval = {interval} }}

[[cohorts]]
name = "expired"
size = 2
defect = "expired"

[[cohorts]]
name = "revoked"
size = 2
defect = "revoked"

[[phases]]
name = "steady"
duration = "{duration}"
arrival = "{arrival}"
{arrival_fields}
"""


def small(
    tmp_path: Path,
    *,
    name: str = "small",
    seed: int = 1,
    clock: str = "real",
    thresholds: str = '"false_accepts == 0"',
    duration: str = "2s",
    arrival: str = "constant",
    arrival_fields: str = "rate = 10",
    interval: float = 1.0,
) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(
        SMALL.format(
            name=name,
            seed=seed,
            clock=clock,
            thresholds=thresholds,
            duration=duration,
            arrival=arrival,
            arrival_fields=arrival_fields,
            interval=interval,
        )
    )
    return path


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TESTBED, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        (('clock = "real"', 'clock = "sometimes"'), "clock", "is not one of"),
        (("size = 6", "size = 0"), "cohorts[0].size", "below"),
        (('defect = "expired"', 'defect = "rusty"'), "cohorts[1].defect", "is not one of"),
        (('duration = "2s"', 'duration = "two"'), "phases[0].duration", "not a Go duration"),
        (("rate = 10", ""), "phases[0].rate", "needs rate"),
        (('"false_accepts == 0"', '"latency < 5"'), "thresholds[0]", "is not a metric"),
        (
            ('"false_accepts == 0"', '"cohort.nobody.matched == 1"'),
            "thresholds[0]",
            "no cohort 'nobody'",
        ),
        (
            ('kind = "periodic"', 'kind = "sometimes"'),
            "cohorts[0].behaviour.kind",
            "expected one of",
        ),
        (("[target]", '[target]\ncolour = "red"'), "target.colour", "unknown field"),
    ],
)
def test_broken_scenarios_name_the_field(
    tmp_path: Path, change: tuple[str, str], field: str, problem: str
) -> None:
    path = small(tmp_path)
    text = path.read_text()
    assert change[0] in text
    path.write_text(text.replace(change[0], change[1], 1))
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert str(path) in str(info.value) and field in str(info.value) and problem in str(info.value)


def test_a_broken_scenario_exits_2_before_anything_starts(tmp_path: Path) -> None:
    path = small(tmp_path)
    path.write_text(path.read_text().replace("size = 6", 'size = "six"'))
    result = run_cli("run", str(path), "--reports", str(tmp_path / "reports"), "--no-progress")
    assert result.returncode == 2
    assert "cohorts[0].size" in result.stderr
    assert not (tmp_path / "reports").exists()


def test_arrival_times_hold_the_rate() -> None:
    constant = arrival_times(Phase("p", 10, "constant", rate=50), 100.0)
    assert len(constant) == 500 and constant[0] == 100.0 and constant[-1] < 110
    ramp = arrival_times(Phase("r", 10, "ramping", start_rate=0, end_rate=100), 0.0)
    assert len(ramp) == 500
    first_half = sum(1 for t in ramp if t < 5)
    assert first_half == 125  # a linear ramp puts a quarter of its attempts in the first half


def test_quickstart_passes_its_thresholds(tmp_path: Path) -> None:
    result = run_cli(
        "run", "scenarios/quickstart.toml", "--reports", str(tmp_path), "--no-progress"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = next(tmp_path.glob("quickstart-*"))
    for name in ("results.sqlite", "report.html", "summary.json", "junit.xml"):
        assert (run_dir / name).exists(), name
    verdicts = json.loads((run_dir / "summary.json").read_text())["thresholds"]
    # The scenario's own thresholds (tests/testbed/test_shipped_scenarios.py checks which),
    # then the default gates it does not declare itself, all judged and all holding.
    assert len(verdicts) >= 9 and all(v["ok"] for v in verdicts)
    assert [v["expression"] for v in verdicts[-2:]] == [
        "errors <= 1% (default)",
        "decisions > 0 (default)",
    ]


def test_an_impossible_threshold_exits_1(tmp_path: Path) -> None:
    path = small(tmp_path, thresholds='"false_accepts == 0", "total.p50 < 0.001ms"', duration="1s")
    result = run_cli("run", str(path), "--reports", str(tmp_path / "r"), "--no-progress")
    assert result.returncode == 1, result.stderr
    run_dir = next((tmp_path / "r").glob("small-*"))
    verdicts = {
        v["expression"]: v["ok"]
        for v in json.loads((run_dir / "summary.json").read_text())["thresholds"]
    }
    assert verdicts == {
        "false_accepts == 0": True,
        "total.p50 < 0.001ms": False,
        "errors <= 1% (default)": True,
        "decisions > 0 (default)": True,
    }
    junit = (run_dir / "junit.xml").read_text()
    assert junit.count("<testcase") == 4 and junit.count("<failure") == 1


def _attempts(db: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return int(con.execute("SELECT count(*) FROM attempts").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return 0


async def signal_when(args: list[str], ready: Callable[[], bool], how: str) -> int:
    """Run the CLI, send it SIGINT or SIGKILL once ``ready()`` holds; return its exit code."""
    proc = await trio.lowlevel.open_process(
        [*TESTBED, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        with trio.fail_after(120):
            while not ready():
                await trio.sleep(0.2)
        os.kill(proc.pid, getattr(signal, how))
        with trio.fail_after(60):
            return await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
async def test_a_run_killed_midway_still_renders_a_report(tmp_path: Path, how: str) -> None:
    path = small(tmp_path, name=f"killed-{how.lower()}", duration="60s")
    reports = tmp_path / "r"

    def ready() -> bool:
        dbs = list(reports.glob("*/results.sqlite"))
        return bool(dbs) and _attempts(dbs[0]) >= 20

    args = ["run", str(path), "--reports", str(reports), "--no-progress"]
    code = await signal_when(args, ready, how)
    assert code == (130 if how == "SIGINT" else -signal.SIGKILL)
    dbs = list(reports.glob("*/results.sqlite"))
    run_dir = dbs[0].parent
    kept = _attempts(dbs[0])
    assert kept >= 20
    result = run_cli("report", str(run_dir))
    assert result.returncode == 0, result.stderr
    assert (run_dir / "report.html").exists()
    assert "interrupted" in (run_dir / "report.html").read_text().lower()


def test_virtual_time_is_reproducible_from_the_seed(tmp_path: Path) -> None:
    counts = []
    for attempt in range(2):
        path = small(
            tmp_path,
            name=f"virtual-{attempt}",
            clock="virtual",
            seed=11,
            duration="6h",
            arrival="active",
            arrival_fields="devices = 10",
            interval=600.0,
        )
        result = run_cli("run", str(path), "--reports", str(tmp_path / "r"), "--no-progress")
        assert result.returncode == 0, result.stdout + result.stderr
        db = next((tmp_path / "r").glob(f"virtual-{attempt}-*/results.sqlite"))
        con = sqlite3.connect(db)
        counts.append(
            sorted(con.execute("SELECT cohort, outcome, count(*) FROM attempts GROUP BY 1, 2"))
        )
        con.close()
    assert counts[0] == counts[1]
    assert sum(n for _, _, n in counts[0]) > 100  # six virtual hours of 10-minute telemetry


async def test_an_external_target_and_origin_events(tmp_path: Path, served) -> None:
    # The demo enforcer (served in this test) does not trust the run's own fleet: every device
    # is refused, which is what the scenario expects of it.
    path = tmp_path / "external.toml"
    path.write_text(f"""
name = "external"
thresholds = ["false_accepts == 0", "cohort.fleet.share:denied:untrusted_issuer == 100%"]
[target]
kind = "external"
url = "https://127.0.0.1:{served.port}"
hostname = "auth.example.test"
ca = "{served.layout.edge_ca}"
[[cohorts]]
name = "fleet"
size = 4
expected = "denied:untrusted_issuer"
[[phases]]
name = "p"
duration = "1s"
arrival = "constant"
rate = 10
""")
    result = await trio.run_process(
        [*TESTBED, "run", str(path), "--reports", str(tmp_path / "r"), "--no-progress"],
        cwd=ROOT,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert {r["reason"] for r in served.log() if "event" not in r} == {"untrusted_issuer"}


def test_stopping_the_origin_mid_run(tmp_path: Path) -> None:
    # The origin is down for a third of the run: the scenario's own error budget replaces the
    # default 1%.
    path = small(
        tmp_path, name="origin", duration="3s", thresholds='"false_accepts == 0", "errors <= 50%"'
    )
    path.write_text(
        path.read_text()
        + """
[[events]]
at = "1s"
action = "stop_origin"

[[events]]
at = "2s"
action = "start_origin"
"""
    )
    result = run_cli("run", str(path), "--reports", str(tmp_path / "r"), "--no-progress")
    assert result.returncode == 0, result.stderr
    db = next((tmp_path / "r").glob("origin-*/results.sqlite"))
    con = sqlite3.connect(db)
    by_time = con.execute(
        "SELECT scheduled >= 1.1 AND scheduled < 1.9, scheduled >= 2.2, outcome FROM attempts "
        "WHERE cohort = 'healthy'"
    ).fetchall()
    events = [k for (k,) in con.execute("SELECT kind FROM events")]
    con.close()
    assert {"stop_origin", "start_origin"} <= set(events)
    assert {o for stopped, _, o in by_time if stopped} == {"http_502"}
    assert {o for _, after, o in by_time if after} == {"allowed"}


def test_a_missing_nginx_is_a_clear_error_before_anything_is_written(
    tmp_path: Path, monkeypatch
) -> None:
    import testbed.nginx
    from testbed.runner import RunError, run_scenario

    # The one thing this machine cannot show by itself: a host without nginx.
    monkeypatch.setattr(testbed.nginx, "NGINX", None)
    scenario = load_scenario(ROOT / "scenarios" / "nginx.toml")
    with pytest.raises(RunError, match=r"target\.kind: nginx is not installed"):
        run_scenario(scenario, tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
def test_an_nginx_that_cannot_start_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    import testbed.nginx
    from testbed.runner import RunError, run_scenario

    # A real start failure: its port is bound by another socket (not listening, so nothing
    # answers there), and nginx exits before listening, the same path as a broken nginx.conf.
    # The run must end with RunError (exit 2) naming nginx and what it said, not a traceback
    # out of the nursery.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        monkeypatch.setattr(testbed.nginx, "free_port", lambda: taken.getsockname()[1])
        scenario = load_scenario(ROOT / "scenarios" / "nginx.toml")
        with pytest.raises(RunError, match=r"target\.kind: nginx did not start: .*in use"):
            run_scenario(scenario, tmp_path / "r", progress=False)
