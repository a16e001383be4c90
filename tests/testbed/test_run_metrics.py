"""A run's live figures outside the page: ``--metrics-port`` scraped mid-run with
prometheus-client's own parser, and the progress line a run prints when no terminal is there.

The load is the real CLI (`testbed load`, two shard processes against the embedded enforcer
over loopback TLS): its figures come from the shards' files, the path split runs take.
"""

from __future__ import annotations

import re
import socket
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import trio
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
TESTBED = [sys.executable, "-m", "testbed.cli"]

SCENARIO = """\
name = "scraped"
seed = 9
clock = "real"
thresholds = ["false_accepts == 0"]

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
duration = "6s"
arrival = "constant"
rate = 10
"""

PROGRESS = re.compile(
    r"^\S+: .* of 6 s: total ([\d,]+) attempts \(.*/s\), p99 (-|[\d.,]+ ms),"
    r" false accepts (\d+), errors (\d+), dropped (\d+)$",
    re.M,
)


def _scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample of a scrape, by sample name and labels."""
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


async def test_metrics_scraped_mid_run_increase_and_progress_lines_are_printed(
    tmp_path: Path,
) -> None:
    scenario = tmp_path / "scraped.toml"
    scenario.write_text(SCENARIO)
    reports = tmp_path / "reports"
    stderr = tmp_path / "stderr.txt"
    with stderr.open("wb") as err:
        process = await trio.lowlevel.open_process(
            [
                *TESTBED,
                "load",
                *("--scenario", str(scenario), "--target", "embedded", "--workers", "2"),
                *("--rate", "10", "--duration", "6s"),
                *("--reports", str(reports), "--metrics-port", "0"),
                *("--progress-interval", "1"),
            ],
            stdout=err,
            stderr=err,
            cwd=ROOT,
        )
    scrapes = []
    try:
        # Bounds on waits, not timed assertions: provisioning and the target's start come first.
        with trio.fail_after(120):
            while not (match := re.search(r"^metrics: (http://\S+)$", stderr.read_text(), re.M)):
                assert process.returncode is None, stderr.read_text()
                await trio.sleep(0.1)
        url = match[1]
        with trio.fail_after(120):
            while len(scrapes) < 2:
                seen = await trio.to_thread.run_sync(_scrape, url)
                if sum(seen.get("testbed_run_attempts_total", {}).values()) > 0:
                    previous = scrapes[-1] if scrapes else None
                    total = sum(seen["testbed_run_attempts_total"].values())
                    if previous is None or total > sum(
                        previous["testbed_run_attempts_total"].values()
                    ):
                        scrapes.append(seen)
                await trio.sleep(0.5)
        with trio.fail_after(120):
            code = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    log = stderr.read_text()
    assert code == 0, log

    first, second = scrapes
    # Counters only grow, label by label.
    for labels, value in first["testbed_run_attempts_total"].items():
        assert second["testbed_run_attempts_total"].get(labels, 0) >= value
    assert sum(second["testbed_run_attempts_total"].values()) > sum(
        first["testbed_run_attempts_total"].values()
    )
    cohorts = {dict(k)["cohort"] for k in second["testbed_run_attempts_total"]}
    assert cohorts <= {"healthy", "expired"}
    assert second["testbed_run_false_accepts_total"] == {
        (("cohort", "healthy"),): 0.0,
        (("cohort", "expired"),): 0.0,
    }
    assert second["testbed_run_duration_seconds"] == {(): 6.0}
    assert second["testbed_run_status"] == {(("status", "running"),): 1.0}
    # The histogram's +Inf bucket counts every attempt so far; the shards report themselves.
    buckets = second["testbed_run_attempt_duration_seconds_bucket"]
    assert buckets[(("le", "+Inf"),)] == second["testbed_run_attempt_duration_seconds_count"][()]
    assert {dict(k)["shard"] for k in second["testbed_run_shard_attempts_total"]} <= {"0", "1"}
    held = second["testbed_run_threshold_ok"]
    assert held[(("threshold", "false_accepts == 0"),)] == 1.0

    # Outside a terminal: progress lines while the run goes, and a last one with its totals.
    lines = PROGRESS.findall(log)
    assert len(lines) >= 3, log
    run_dir = next(reports.glob("load-*"))
    db = sqlite3.connect(run_dir / "results.sqlite")
    try:
        attempts = db.execute("SELECT count(*) FROM attempts").fetchone()[0]
    finally:
        db.close()
    assert lines[-1][0] == f"{attempts:,}"
    assert lines[-1][2:] == ("0", "0", "0")


def test_a_dashboard_port_in_use_is_refused_by_name(tmp_path: Path) -> None:
    scenario = tmp_path / "scraped.toml"
    scenario.write_text(SCENARIO)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [
                *TESTBED,
                "run",
                str(scenario),
                "--reports",
                str(tmp_path / "r"),
                "--dashboard",
                f"{port}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
    assert result.returncode == 2, result.stderr
    assert f"--dashboard {port}: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert not (tmp_path / "r").exists()  # refused before a run folder was made


def test_a_bad_metrics_port_is_a_usage_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [*TESTBED, "run", "x.toml", "--metrics-port", "70000"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "--metrics-port: expected a port between 0 and 65535, got 70000" in result.stderr


def _rows() -> list[Any]:
    from testbed.results import AttemptRow

    out = []
    outcomes = [
        ("healthy", "allowed", "allowed"),
        ("healthy", "allowed", "denied:revoked"),  # a false reject
        ("expired", "denied:certificate_expired", "denied:certificate_expired"),
        ("expired", "denied:certificate_expired", "allowed"),  # a false accept
        ("healthy", "allowed", "timeout"),  # an error
    ]
    for i in range(500):
        cohort, expected, outcome = outcomes[i % len(outcomes)]
        out.append(
            AttemptRow(
                device=f"d{i % 7}",
                cohort=cohort,
                phase="steady",
                expected=expected,
                scheduled=i * 0.1,
                started=i * 0.1,
                connect_ms=1.0,
                key_store_ms=0.5,
                handshake_ms=3.0 + i % 11,
                first_byte_ms=2.0,
                service_ms=5.0 + i % 13,
                total_ms=5.0 + (i * 37) % 101,
                outcome=outcome,
                status=200 if outcome == "allowed" else 403,
                reason=None,
                new_connection=i % 3 == 0,
                resumed=False,
            )
        )
    return out


def test_live_figures_are_the_summary_of_what_was_written(tmp_path: Path) -> None:
    from testbed.live import LiveRun, ResultsFeed, _Collector
    from testbed.results import Results, ResultsWriter
    from testbed.summary import summarize
    from testbed.thresholds import parse_threshold

    path = tmp_path / "results.sqlite"
    writer = ResultsWriter(path)
    writer.set_meta(cohorts={"healthy": {"expected": "allowed"}, "expired": {}}, start_epoch=1000.0)
    rows = _rows()
    for row in rows[:200]:
        writer.attempt(row)
    writer.event(0.0, "phase", "steady")
    writer.dropped(3.0, "-", "steady")
    thresholds = [parse_threshold(t, ["healthy"]) for t in ("false_accepts == 0", "total.p99 < 1s")]
    live = LiveRun(
        scenario="s",
        clock="virtual",
        duration=50.0,
        cohorts={"healthy": {"expected": "allowed"}, "expired": {}},
        phases=[{"name": "steady", "start": 0, "duration": 50}],
        thresholds=thresholds,
    )
    feed = ResultsFeed([path])
    feed.poll(live)
    feed.poll(live)  # nothing new: nothing counted twice
    assert live.state()["totals"]["attempts"] == 200
    for row in rows[200:]:
        writer.attempt(row)
    feed.poll(live)
    writer.close()

    results = Results(path)
    try:
        summary = summarize(results)
    finally:
        results.close()
    state = live.state()
    totals = summary["totals"]
    for key in ("attempts", "false_accepts", "false_rejects", "errors", "matched"):
        assert state["totals"][key] == totals[key], key
    assert state["totals"]["dropped"] == 1
    assert state["totals"]["outcomes"] == totals["outcomes"]
    for stat in ("p50", "p90", "p99"):
        assert state["totals"][stat] == summary["latency"]["total"][stat]
    assert {c["name"]: c["matched"] for c in state["cohorts"]} == {
        name: c["matched"] for name, c in summary["cohorts"].items() if c["attempts"]
    }
    assert state["markers"] == [
        {"wall": state["markers"][0]["wall"], "t": 0.0, "kind": "phase", "detail": "steady"}
    ]
    assert state["status"] == "running" and state["wall_start"] == 1000.0
    # Thresholds as they stand: the false accepts fail it, the latency holds.
    assert [(t["expression"], t["ok"]) for t in state["thresholds"]] == [
        ("false_accepts == 0", False),
        ("total.p99 < 1s", True),
    ]
    assert "FALSE ACCEPTS 100" in live.progress_line()

    # The scrape reads the same figures.
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(live))
    families = {
        f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())
    }
    attempts = {
        (s.labels["cohort"], s.labels["outcome"]): s.value
        for s in families["testbed_run_attempts"].samples
    }
    assert sum(attempts.values()) == 500
    assert attempts[("expired", "allowed")] == 100
    fa = {s.labels["cohort"]: s.value for s in families["testbed_run_false_accepts"].samples}
    assert fa == {"healthy": 0, "expired": 100}
    count = [
        s
        for s in families["testbed_run_attempt_duration_seconds"].samples
        if s.name.endswith("_count")
    ]
    assert count[0].value == 500


def test_the_series_is_a_ring_buffer() -> None:
    from testbed.live import SERIES_POINTS, LiveRun

    live = LiveRun(scenario="s", clock="real", duration=1.0, cohorts={}, phases=[])
    for k in range(SERIES_POINTS + 10):
        live.tick(now=float(k))
    snapshot = live.snapshot()
    assert len(snapshot["series"]) == SERIES_POINTS
    assert snapshot["series"][0]["t"] == 10.0
