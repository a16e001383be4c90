"""Reports from a hand-built results database: summary numbers, metric names, figures, the
self-contained HTML (opened in headless Chromium when installed), JUnit, and the CLI."""

from __future__ import annotations

import html
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from testbed.plots import PLOTS
from testbed.report import compare, load_summary, print_comparison, print_summary, render
from testbed.results import AttemptRow, Results, ResultsWriter
from testbed.summary import LATENCIES, STATS, metric, summarize

TESTBED = [sys.executable, "-m", "testbed.cli"]
ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

COHORTS = {
    "healthy": {"size": 20, "expected": "allowed"},
    "expired": {"size": 5, "expected": "denied:certificate_expired"},
    "rogue.cn": {"size": 3, "expected": "allowed"},  # a dot in the name, on purpose
    "piv": {"size": 4, "expected": "allowed"},
}
PHASES = [
    {"name": "warmup", "start": 0.0, "duration": 10.0},
    {"name": "steady", "start": 10.0, "duration": 20.0},
]
THRESHOLDS = [
    ("false_accepts == 0", "1", False),
    ("handshake.p95 < 50ms", "12.3", True),
    ("cohort.expired.share:denied:certificate_expired == 100%", "0.975", False),
]


def make_rows(seed: int = 7) -> list[AttemptRow]:
    """Realistic attempts: kept-alive, resumed and full handshakes, denials, errors, a false
    accept, slow PIV key stores."""
    rng = random.Random(seed)
    rows: list[AttemptRow] = []

    def attempt(cohort: str, i: int, outcome: str, **kw: Any) -> None:
        scheduled = rng.uniform(0, 30)
        new = kw.pop("new_connection", rng.random() < 0.4)
        resumed = kw.pop("resumed", new and rng.random() < 0.3)
        connect = rng.lognormvariate(0, 0.4) if new else 0.0
        key_store = kw.pop("key_store_ms", rng.uniform(0.05, 0.2) if new and not resumed else 0)
        handshake = (rng.lognormvariate(1.5, 0.5) + key_store) if new else 0.0
        status = kw.pop("status", 200 if outcome == "allowed" else 403)
        first_byte = rng.lognormvariate(0.5, 0.3) if status is not None else 0.0
        service = connect + handshake + first_byte + rng.uniform(0, 0.5)
        queued = kw.pop("queued_ms", 0.0)
        rows.append(
            AttemptRow(
                device=f"{cohort}-{i % COHORTS[cohort]['size']:03d}",
                cohort=cohort,
                phase="warmup" if scheduled < 10 else "steady",
                expected=str(COHORTS[cohort]["expected"]),
                scheduled=scheduled,
                started=scheduled + queued / 1000,
                connect_ms=connect,
                key_store_ms=key_store,
                handshake_ms=handshake,
                first_byte_ms=first_byte,
                service_ms=kw.pop("service_ms", service),
                total_ms=kw.pop("total_ms", service + queued),
                outcome=outcome,
                status=status,
                reason=outcome.removeprefix("denied:") if outcome.startswith("denied:") else None,
                new_connection=new,
                resumed=resumed,
                error=kw.pop("error", None),
                logged_in=kw.pop("logged_in", False),
                login_ms=kw.pop("login_ms", 0.0),
                callback_ms=kw.pop("callback_ms", 0.0),
            )
        )
        assert not kw, kw

    for i in range(200):
        # Every tenth logged in first (a person's session start): login and callback timed.
        login = {"logged_in": True, "login_ms": 90.0 + i, "callback_ms": 5.0 + i / 8}
        attempt(
            "healthy",
            i,
            "allowed",
            queued_ms=rng.choice([0.0, 0.0, 0.0, 40.0]),
            **(login if i % 10 == 0 else {}),
        )
    for i in range(2):
        attempt(
            "healthy", i, "timeout", status=None, new_connection=False, total_ms=10_000.0,
            service_ms=10_000.0, error="no response in 10 s",
        )  # fmt: skip
    for i in range(39):
        attempt("expired", i, "denied:certificate_expired", new_connection=True, resumed=False)
    attempt("expired", 39, "allowed", new_connection=True, resumed=False)  # the false accept
    for i in range(28):
        attempt("rogue.cn", i, "allowed")
    for i in range(2):
        attempt("rogue.cn", i, "tls_error:eof", status=None, new_connection=False)
    for i in range(25):
        # A PIV token: touch and on-token signature make full handshakes slow.
        attempt("piv", i, "allowed", new_connection=True, resumed=False, key_store_ms=500.0 + i)
    rng.shuffle(rows)
    return rows


def write_run(
    path: Path, rows: list[AttemptRow], *, complete: bool = True, thresholds: bool = True
) -> Path:
    """A results database as a runner would leave it."""
    writer = ResultsWriter(path / "results.sqlite")
    writer.set_meta(
        scenario="mixed-fleet",
        seed=7,
        clock="virtual",
        started_at="2025-01-01T00:00:00+00:00",
        target={"kind": "embedded", "hostname": "auth.example.test"},
        cohorts=COHORTS,
        phases=PHASES,
    )
    writer.event(0.0, "phase", "warmup")
    writer.event(10.0, "phase", "steady")
    writer.event(12.5, "revoke", "cohort expired, share 1.0 <script>alert(1)</script>")
    for row in rows:
        writer.attempt(row)
    writer.dropped(20.5, "healthy", "steady")
    writer.dropped(20.7, "healthy", "steady")
    writer.dropped(5.0, "piv", "warmup")
    if complete:
        if thresholds:
            writer.thresholds(THRESHOLDS)
        writer.set_meta(finished_at="2025-01-01T00:00:31+00:00")
    writer.close()
    return path


@pytest.fixture(scope="module")
def rows() -> list[AttemptRow]:
    return make_rows()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, rows: list[AttemptRow]) -> Path:
    return write_run(tmp_path_factory.mktemp("run"), rows)


@pytest.fixture(scope="module")
def summary(run_dir: Path) -> dict[str, Any]:
    results = Results(run_dir / "results.sqlite")
    try:
        return summarize(results)
    finally:
        results.close()


@pytest.fixture(scope="module")
def rendered(run_dir: Path) -> Path:
    render(run_dir)
    return run_dir


def nearest_rank(values: list[float], percentile: float) -> float:
    """HDR's percentile definition: the value at rank round(p/100 * n), at least 1."""
    ordered = sorted(values)
    rank = max(int(percentile / 100 * len(ordered) + 0.5), 1)
    return ordered[rank - 1]


def selected(rows: list[AttemptRow], latency: str) -> list[float]:
    """The attempts each latency counts, by brute force (see testbed.summary's docstring)."""
    if latency in ("total", "service"):
        return [getattr(r, f"{latency}_ms") for r in rows]
    if latency == "connect":
        return [r.connect_ms for r in rows if r.new_connection]
    if latency in ("handshake", "key_store"):
        return [getattr(r, f"{latency}_ms") for r in rows if r.new_connection and not r.resumed]
    if latency in ("login", "callback"):
        return [getattr(r, f"{latency}_ms") for r in rows if r.logged_in]
    return [r.first_byte_ms for r in rows if r.status is not None]


def close_enough(hdr: float, exact: float) -> bool:
    # 3 significant digits: within 0.1% of the value, plus the 1 us recording unit.
    return abs(hdr - exact) <= exact * 1e-3 + 1e-3


# The summary.


def test_totals(summary: dict[str, Any], rows: list[AttemptRow]) -> None:
    totals = summary["totals"]
    assert totals["attempts"] == len(rows) == 297
    assert totals["outcomes"] == dict(Counter(r.outcome for r in rows))
    assert totals["dropped"] == 3
    assert totals["duration_s"] == 30.0  # the phases' end, on the run's clock
    assert totals["rate"] == pytest.approx(297 / 30)
    assert totals["false_accepts"] == 1
    assert totals["false_rejects"] == 0  # two timeouts, two TLS errors: errors, not rejects
    assert totals["errors"] == 4
    assert summary["complete"] is True
    assert summary["run"]["wall_s"] == 31.0
    assert summary["run"]["scenario"] == "mixed-fleet"
    json.dumps(summary, allow_nan=False)  # strict JSON


@pytest.mark.parametrize("latency", LATENCIES)
def test_percentiles_match_brute_force(
    summary: dict[str, Any], rows: list[AttemptRow], latency: str
) -> None:
    values = selected(rows, latency)
    stats = summary["latency"][latency]
    assert stats["count"] == len(values) > 0
    for stat, p in (("p50", 50), ("p90", 90), ("p95", 95), ("p99", 99), ("p99.9", 99.9)):
        assert close_enough(stats[stat], nearest_rank(values, p)), (stat, stats[stat])
    assert close_enough(stats["max"], max(values))
    assert stats["mean"] == pytest.approx(sum(values) / len(values))


def test_cohort_percentiles_and_counts(summary: dict[str, Any], rows: list[AttemptRow]) -> None:
    for name in COHORTS:
        mine = [r for r in rows if r.cohort == name]
        cohort = summary["cohorts"][name]
        assert cohort["attempts"] == len(mine)
        assert cohort["expected"] == COHORTS[name]["expected"]
        assert cohort["size"] == COHORTS[name]["size"]
        assert cohort["matched"] == sum(r.outcome == r.expected for r in mine)
        for stat, p in (("p50", 50), ("p99", 99)):
            exact = nearest_rank([r.total_ms for r in mine], p)
            assert close_enough(cohort["latency"]["total"][stat], exact)
    piv = summary["cohorts"]["piv"]
    assert piv["latency"]["key_store"]["p50"] == pytest.approx(512, rel=1e-3)
    assert piv["breakdown"]["samples"] == 25
    assert piv["breakdown"]["key_store"] == pytest.approx(512)
    assert piv["dropped"] == 1


def test_false_accepts_rejects_and_matrix(summary: dict[str, Any]) -> None:
    expired = summary["cohorts"]["expired"]
    assert expired["false_accepts"] == 1
    assert expired["matched_share"] == pytest.approx(39 / 40)
    assert expired["rejections"] == {"certificate_expired": 39}
    assert summary["cohorts"]["healthy"]["false_rejects"] == 0  # timeouts are errors
    assert summary["cohorts"]["healthy"]["errors"] == 2
    assert summary["cohorts"]["healthy"]["rejections"] == {"timeout": 2}
    assert summary["cohorts"]["rogue.cn"]["rejections"] == {"tls_error:eof": 2}
    assert summary["matrix"] == {
        "allowed": {"allowed": 253, "timeout": 2, "tls_error:eof": 2},
        "denied:certificate_expired": {"denied:certificate_expired": 39, "allowed": 1},
    }


def test_phases_series_events_thresholds(summary: dict[str, Any], rows: list[AttemptRow]) -> None:
    phases = {p["name"]: p for p in summary["phases"]}
    assert list(phases) == ["warmup", "steady"]
    assert phases["steady"]["start"] == 10.0
    assert phases["warmup"]["attempts"] + phases["steady"]["attempts"] == len(rows)
    assert phases["steady"]["dropped"] == 2
    series = summary["series"]
    assert series["bucket_s"] == 1
    assert sum(b["attempts"] for b in series["buckets"]) == len(rows)
    assert sum(b["dropped"] for b in series["buckets"]) == 3
    in_first = [r.total_ms for r in rows if r.scheduled < 1]
    assert close_enough(series["buckets"][0]["p50"], nearest_rank(in_first, 50))
    assert [e["kind"] for e in summary["events"]] == ["phase", "phase", "revoke"]
    assert [(t["expression"], t["ok"]) for t in summary["thresholds"]] == [
        (e, ok) for e, _, ok in THRESHOLDS
    ]


def test_an_interrupted_run(tmp_path: Path, rows: list[AttemptRow]) -> None:
    write_run(tmp_path, rows[:100], complete=False)
    summary = load_summary(tmp_path)
    assert summary["complete"] is False
    assert summary["thresholds"] == []
    assert summary["run"]["wall_s"] is None
    # No phases' end to go by: as far as the attempts got.
    last = max(r.scheduled + r.total_ms / 1000 for r in rows[:100])
    assert summary["totals"]["duration_s"] == pytest.approx(max(last, 20.7))


def test_an_empty_run(tmp_path: Path) -> None:
    writer = ResultsWriter(tmp_path / "results.sqlite")
    writer.set_meta(scenario="empty", seed=1, clock="real")
    writer.close()
    summary = load_summary(tmp_path)
    assert summary["totals"]["attempts"] == 0
    assert summary["totals"]["rate"] is None
    assert summary["latency"]["total"] == {"count": 0} | dict.fromkeys(STATS)
    assert math.isnan(metric(summary, "total.p99"))
    assert metric(summary, "false_accepts") == 0
    paths = render(tmp_path)
    for path in paths.plots.values():
        assert path.read_bytes().startswith(PNG_MAGIC)
    assert "No cohorts recorded" in paths.html.read_text()


def test_a_long_run_grows_its_time_buckets(tmp_path: Path, rows: list[AttemptRow]) -> None:
    week = 7 * 24 * 3600.0
    writer = ResultsWriter(tmp_path / "results.sqlite")
    writer.set_meta(
        scenario="week", seed=1, clock="virtual", finished_at="2025-01-08T00:00:00+00:00",
        phases=[{"name": "all", "start": 0.0, "duration": week}],
    )  # fmt: skip
    for i, row in enumerate(rows):
        at = week * i / len(rows)
        writer.attempt(AttemptRow(**{**row.__dict__, "scheduled": at, "started": at}))
    writer.close()
    series = load_summary(tmp_path)["series"]
    assert series["bucket_s"] == 1008
    assert len(series["buckets"]) <= 600
    assert sum(b["attempts"] for b in series["buckets"]) == len(rows)


# metric().


def test_metric_names(summary: dict[str, Any]) -> None:
    assert metric(summary, "false_accepts") == 1
    assert metric(summary, "false_rejects") == 0
    assert metric(summary, "attempts") == 297
    assert metric(summary, "dropped") == 3
    assert metric(summary, "errors") == 4
    assert metric(summary, "rate") == pytest.approx(297 / 30)
    for latency in LATENCIES:
        for stat in STATS:
            assert metric(summary, f"{latency}.{stat}") == summary["latency"][latency][stat]
    assert metric(summary, "cohort.expired.allowed") == pytest.approx(1 / 40)
    assert metric(summary, "cohort.expired.matched") == pytest.approx(39 / 40)
    assert metric(summary, "cohort.expired.share:denied:certificate_expired") == pytest.approx(
        39 / 40
    )
    assert metric(summary, "cohort.expired.share:timeout") == 0
    assert metric(summary, "cohort.rogue.cn.share:tls_error:eof") == pytest.approx(2 / 30)
    piv_p99 = summary["cohorts"]["piv"]["latency"]["total"]["p99"]
    assert metric(summary, "cohort.piv.total.p99") == piv_p99
    assert metric(summary, "cohort.rogue.cn.handshake.p99.9") > 0


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("latency.p99", "is not a latency statistic"),
        ("total.p42", "is not a latency statistic"),
        ("speed", "is not a metric"),
        ("cohort.nobody.allowed", "no such cohort"),
        (
            "cohort.expired.denied",
            "expected allowed, matched, new_connections, full_handshakes, share:<outcome>",
        ),
        ("cohort.expired.share:", "share: needs an outcome"),
        ("cohort.expired.total.p42", "expected allowed, matched"),
    ],
)
def test_unknown_metric_names_raise(summary: dict[str, Any], name: str, message: str) -> None:
    with pytest.raises(KeyError, match=re.escape(message)):
        metric(summary, name)


# The rendered report.


def test_every_figure_is_a_png(rendered: Path) -> None:
    for name, _, _ in PLOTS:
        data = (rendered / name).read_bytes()
        assert data.startswith(PNG_MAGIC), name
        assert len(data) > 5000, name  # a drawn figure, not an empty canvas


def test_summary_json_round_trips(rendered: Path, summary: dict[str, Any]) -> None:
    assert json.loads((rendered / "summary.json").read_text()) == summary


def test_html_is_self_contained(rendered: Path) -> None:
    text = (rendered / "report.html").read_text()
    assert not re.search(r"https?://", text)
    sources = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", text, re.I)
    assert len(sources) == len(PLOTS)
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"@import|url\(", text)
    assert "<script>alert(1)</script>" not in text  # event details are escaped
    assert "1 FALSE ACCEPT:" in text
    for heading in ("Thresholds", "Outcomes per cohort", "Latency", "Figures", "Events"):
        assert f"<h2>{heading}</h2>" in text
    for expression, _, _ in THRESHOLDS:
        assert html.escape(expression) in text


def test_junit_has_one_case_per_threshold(rendered: Path) -> None:
    root = ET.parse(rendered / "junit.xml").getroot()
    cases = root.findall("./testsuite/testcase")
    assert [c.get("name") for c in cases] == [e for e, _, _ in THRESHOLDS]
    failed = [c.get("name") for c in cases if c.find("failure") is not None]
    assert failed == [e for e, _, ok in THRESHOLDS if not ok]
    suite = root.find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures")) == ("3", "2")


@pytest.mark.parametrize("complete", [True, False])
def test_junit_without_thresholds(tmp_path: Path, rows: list[AttemptRow], complete: bool) -> None:
    write_run(tmp_path, rows[:20], complete=complete, thresholds=False)
    paths = render(tmp_path)
    cases = ET.parse(paths.junit).getroot().findall("./testsuite/testcase")
    assert [c.get("name") for c in cases] == ["run completed"]
    assert (cases[0].find("failure") is None) == complete


def test_terminal_summary_and_comparison(summary: dict[str, Any], run_dir: Path) -> None:
    console = Console(record=True, width=160)
    print_summary(summary, console)
    text = console.export_text()
    print_summary(run_dir, console)  # a run directory works too
    assert console.export_text() == text
    assert "1 FALSE ACCEPTS" in text
    assert "handshake.p95 < 50ms" in text
    assert "FAIL" in text
    data = compare(run_dir, run_dir)
    assert all(row["change"] in (0, None) for row in data["latency"])
    print_comparison(data, console)


def test_compare_two_runs(tmp_path: Path, run_dir: Path, rows: list[AttemptRow]) -> None:
    slower = [
        AttemptRow(**{**r.__dict__, "total_ms": r.total_ms * 2, "outcome": "allowed"}) for r in rows
    ]
    write_run(tmp_path, slower)
    data = compare(run_dir, tmp_path)
    latency = {row["metric"]: row for row in data["latency"]}
    assert latency["total.p50"]["change"] == pytest.approx(1.0, abs=0.01)
    assert latency["connect.p50"]["change"] == 0
    outcomes = {(r["cohort"], r["outcome"]): r for r in data["outcomes"]}
    assert outcomes["expired", "allowed"]["a"] == 1
    assert outcomes["expired", "allowed"]["b"] == 40
    assert outcomes["expired", "denied:certificate_expired"]["b"] == 0


# The command line.


def run_testbed(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TESTBED, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_cli_report(tmp_path: Path, rows: list[AttemptRow]) -> None:
    write_run(tmp_path, rows)
    result = run_testbed("report", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert str(tmp_path / "report.html") in result.stdout
    assert "FALSE ACCEPTS" in result.stdout
    assert (tmp_path / "junit.xml").is_file()


def test_cli_report_and_compare_exit_2_without_results(tmp_path: Path, run_dir: Path) -> None:
    result = run_testbed("report", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert "not a directory" in result.stderr
    result = run_testbed("report", str(tmp_path))
    assert result.returncode == 2
    assert "no results.sqlite here" in result.stderr
    result = run_testbed("compare", str(run_dir), str(tmp_path))
    assert result.returncode == 2
    assert "no results.sqlite here" in result.stderr


def test_cli_compare(run_dir: Path) -> None:
    result = run_testbed("compare", str(run_dir), str(run_dir))
    assert result.returncode == 0, result.stderr
    assert "total.p99" in result.stdout
    assert "certificate_expired" in result.stdout


# A real browser.


@pytest.fixture
def chromium_dom(tmp_path: Path) -> Iterator[Any]:
    """Open a file in headless Chromium and return the DOM after load (killed if it hangs)."""

    def dump(page: Path, *options: str) -> str:
        command = [
            str(CHROMIUM),
            *options,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--timeout=10000",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.as_uri(),
        ]
        # Its own session, so a hang kills the browser's helper processes too.
        proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env={**os.environ, "HOME": str(tmp_path)},
        )
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail("headless chromium hung")
        assert proc.returncode == 0, err[-2000:]
        return out

    yield dump


@pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium is installed by .ci/run")
def test_report_opens_in_headless_chromium(
    rendered: Path, tmp_path: Path, chromium_dom: Any
) -> None:
    page = tmp_path / "report.html"
    shutil.copy(rendered / "report.html", page)  # alone: nothing beside it to load
    dom = chromium_dom(page)
    assert 'data-images-ok="true"' in dom
    assert 'data-console-errors="0"' in dom
    assert f'data-images="{len(PLOTS)}"' in dom

    # The check can fail: a figure that does not decode is caught.
    broken = tmp_path / "broken.html"
    corrupted = re.sub(r"base64,[A-Za-z0-9+/=]{100}", "base64,AAAA", page.read_text(), count=1)
    broken.write_text(corrupted)
    dom = chromium_dom(broken)
    assert 'data-images-ok="false"' in dom
    assert 'data-console-errors="1"' in dom


# Every reason code, the two of issue 14 included, in the summary, the figures and the HTML.

# The enforcer's codes after issue 14 (docs/access-flow.md), spelled out so that a report of
# a run against any enforcer version shows them; the test also takes any the enforcer adds.
REASON_CODES = (
    "no_certificate",
    "untrusted_issuer",
    "missing_intermediate",
    "certificate_expired",
    "certificate_not_yet_valid",
    "invalid_chain",
    "unsupported_key",
    "revoked",
    "revocation_unknown",
    "policy_denied",
    "token_invalid",
    "token_expired",
    "misdirected",
    "no_application",
)
ERRORS = ("timeout", "tls_error:eof", "tls_error:handshake_failure", "connect_error:refused")


def write_reasons_run(path: Path) -> Path:
    """A run whose devices meet every reason code and several client-side errors."""
    from enforcer.reasons import Reason

    codes = sorted({*REASON_CODES, *(str(r) for r in Reason)})
    cohorts = {
        "weak-key": {"size": 2, "expected": "denied:unsupported_key"},
        "stale-crl": {"size": 2, "expected": "denied:revocation_unknown"},
        "mixed": {"size": 4, "expected": "allowed"},
    }
    writer = ResultsWriter(path / "results.sqlite")
    writer.set_meta(
        scenario="every-reason", seed=1, clock="virtual", started_at="2025-01-01T00:00:00+00:00",
        target={"kind": "embedded"}, cohorts=cohorts,
        phases=[{"name": "all", "start": 0.0, "duration": 10.0}],
    )  # fmt: skip
    outcomes = [("weak-key", "denied:unsupported_key")] * 6
    outcomes += [("stale-crl", "denied:revocation_unknown")] * 5 + [("stale-crl", "allowed")]
    outcomes += [("mixed", f"denied:{c}") for c in codes] + [("mixed", e) for e in ERRORS]
    outcomes += [("mixed", "allowed")] * 3
    for i, (cohort, outcome) in enumerate(outcomes):
        denied = outcome.startswith("denied:")
        writer.attempt(
            AttemptRow(
                device=f"{cohort}-{i % 2}", cohort=cohort, phase="all",
                expected=str(cohorts[cohort]["expected"]), scheduled=i * 0.1, started=i * 0.1,
                connect_ms=1.0, key_store_ms=0.1, handshake_ms=2.0, first_byte_ms=1.0,
                service_ms=4.0, total_ms=4.0, outcome=outcome,
                status=403 if denied else (200 if outcome == "allowed" else None),
                reason=outcome.removeprefix("denied:") if denied else None,
                new_connection=True, resumed=False, error=None,
            )
        )  # fmt: skip
    writer.set_meta(finished_at="2025-01-01T00:00:10+00:00")
    writer.close()
    return path


def test_every_reason_code_is_reported_in_a_colour_of_its_own(tmp_path: Path) -> None:
    from testbed.plots import FALSE_ACCEPT_COLOR, summary_colors

    run = write_reasons_run(tmp_path)
    summary = load_summary(run)
    cohorts = summary["cohorts"]
    assert cohorts["weak-key"]["rejections"] == {"unsupported_key": 6}
    assert cohorts["weak-key"]["matched_share"] == 1.0
    assert cohorts["stale-crl"]["rejections"] == {"revocation_unknown": 5}
    assert cohorts["stale-crl"]["false_accepts"] == 1  # fail open where closed was expected
    mixed = cohorts["mixed"]["rejections"]
    assert set(REASON_CODES) | set(ERRORS) <= set(mixed)
    assert summary["matrix"]["denied:unsupported_key"] == {"denied:unsupported_key": 6}

    colors = summary_colors(summary)
    # No two outcomes, and no two reasons of the rejections figure, share a colour, and none
    # takes the false-accept red.
    outcomes = list(summary["totals"]["outcomes"])
    assert len({colors[o] for o in outcomes}) == len(outcomes)
    assert len({colors[r] for r in mixed}) == len(mixed)
    assert FALSE_ACCEPT_COLOR not in {colors[k] for k in [*outcomes, *mixed]}
    assert colors["unsupported_key"] == colors["denied:unsupported_key"]

    paths = render(run)
    text = paths.html.read_text()
    for code in ("denied:unsupported_key", "denied:revocation_unknown"):
        assert f"{code}: " in text  # the cohort table's observed outcomes
        assert f"<code>{code}</code>" in text  # the expected-vs-observed matrix
    for name, _, _ in PLOTS:
        assert (run / name).read_bytes().startswith(PNG_MAGIC), name
    out = Console(width=200, record=True)
    print_summary(summary, console=out)
    assert "denied:unsupported_key" in out.export_text()


# The expected-vs-observed table in a 1400 px window.

_MEASURE = """<script>
window.addEventListener("load", function () {
  var heading = Array.prototype.find.call(document.querySelectorAll("h3"), function (h) {
    return h.textContent.indexOf("Expected vs observed") === 0;
  });
  var box = heading.nextElementSibling.getBoundingClientRect();
  var page = document.documentElement;
  document.body.setAttribute("data-matrix-left", String(Math.floor(box.left)));
  document.body.setAttribute("data-matrix-right", String(Math.ceil(box.right)));
  document.body.setAttribute("data-matrix-columns",
    String(heading.nextElementSibling.querySelectorAll("thead th").length));
  document.body.setAttribute("data-page-width", String(page.clientWidth));
  document.body.setAttribute("data-page-scroll-width", String(page.scrollWidth));
});
</script></body>"""


@pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium is installed by .ci/run")
def test_the_expected_vs_observed_table_fits_a_1400px_window(
    tmp_path: Path, chromium_dom: Any
) -> None:
    # Every reason code and error kind: the widest matrix a run can have.
    run = write_reasons_run(tmp_path / "run")
    page = tmp_path / "report.html"
    page.write_text(render(run).html.read_text().replace("</body>", _MEASURE, 1))
    dom = chromium_dom(page, "--window-size=1400,900")

    def attr(name: str) -> int:
        match = re.search(rf'data-{name}="(\d+)"', dom)
        assert match, f"data-{name} missing: the measuring script did not run"
        return int(match[1])

    assert attr("page-width") <= 1400
    assert attr("matrix-columns") >= len(REASON_CODES) + len(ERRORS)
    # The table's box (scrolling inside itself if it must) stays in the page...
    assert attr("matrix-left") >= 0 and attr("matrix-right") <= attr("page-width")
    # ...and nothing makes the page itself scroll sideways.
    assert attr("page-scroll-width") <= attr("page-width")


# Reports of real runs (`testbed run` on the virtual clock, its output piped as in CI).

TWO_DAYS = """\
# Two days of telemetry in virtual time. <b>&</b> must reach report.html escaped.
name = "two-days"
seed = 5
clock = "virtual"
thresholds = ["false_accepts == 0"]

[target]
kind = "embedded"

[[cohorts]]
name = "sensors"
size = 4
behaviour = { kind = "periodic", interval = 21600 }

[[cohorts]]
name = "piv-touch"
size = 2
key_store = "piv"
client = { resume_sessions = false }
piv = { slot = "9c", pin_policy = "always", touch_policy = "always", touch_delay = "0.3s" }
behaviour = { kind = "periodic", interval = 21600 }

[[cohorts]]
name = "wrong-pin"
size = 2
key_store = "piv"
expected = "key_store_error:CKR_PIN_INCORRECT"
piv = { slot = "9a", pin = "000000" }
behaviour = { kind = "periodic", interval = 21600 }

[[phases]]
name = "two-days"
duration = "48h"
arrival = "active"
devices = 8

[[events]]
at = "24h"
action = "set_session_duration"
value = "12h"
"""


def run_piped(scenario: Path, reports: Path, **env: str) -> tuple[Path, Any]:
    """`testbed run` with stdout and stderr piped (no TTY, as in a CI log)."""
    result = subprocess.run(
        [*TESTBED, "run", str(scenario), "--reports", str(reports)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, **env},
    )
    # 0 or 1 (a default gate may fail the wrong-PIN cohort's errors), never a crash.
    assert result.returncode in (0, 1), result.stdout + result.stderr
    return next(reports.glob(f"{scenario.stem}-*")), result


@pytest.fixture(scope="module")
def two_days(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    root = tmp_path_factory.mktemp("two-days")
    scenario = root / "two-days.toml"
    scenario.write_text(TWO_DAYS)
    # A progress line at every wake-up of the display, so that a short run prints some.
    return run_piped(scenario, root / "r", TESTBED_PROGRESS_EVERY="0", COLUMNS="80")


def test_report_shows_how_the_run_was_made(two_days: tuple[Path, Any]) -> None:
    import platform
    import ssl

    import cryptography

    run_dir, _ = two_days
    page = (run_dir / "report.html").read_text()
    assert 'id="how"' in page
    section = page[page.index('id="how"') : page.index("</details>")]
    for expected in (
        "embedded (kind embedded, hostname auth.example.test)",
        "testbed run",
        "each cohort&#x27;s client options",  # the mode of a scenario run
        "<td>workers</td><td>1</td>",
        "8 devices in 3 cohorts",
        "two-days: 2 days, 8 devices running their behaviour",
        "2 days planned, 2 days on the run&#x27;s clock (virtual)",
        f"python {platform.python_version()}",
        f"openssl {html.escape(ssl.OPENSSL_VERSION)}",
        f"cryptography {cryptography.__version__}",
        "testbed 0.1.0",
        "two-days.toml",
    ):
        assert expected in section, expected
    # The scenario file itself, escaped.
    text = html.unescape(re.search(r'id="scenario-text"><code>(.*?)</code>', page, re.S)[1])
    assert text == TWO_DAYS
    assert "<b>&</b>" not in page and "&lt;b&gt;&amp;&lt;/b&gt;" in page


def test_a_virtual_run_reports_virtual_latencies_human_times_and_both_rates(
    two_days: tuple[Path, Any],
) -> None:
    from testbed.plots import time_axis

    run_dir, result = two_days
    summary = json.loads((run_dir / "summary.json").read_text())
    totals = summary["totals"]
    assert totals["duration_s"] == 48 * 3600
    assert totals["rate"] == pytest.approx(totals["attempts"] / (48 * 3600))
    assert totals["rate_wall"] == pytest.approx(totals["attempts"] / summary["run"]["wall_s"])
    # The virtual clock advances while a PIV token waits for its touch: 0.3 s per handshake.
    piv = summary["cohorts"]["piv-touch"]["latency"]
    assert piv["key_store"]["count"] > 0 and piv["key_store"]["p50"] >= 300
    assert piv["total"]["p50"] >= 300
    assert time_axis(summary) == (3600.0, "hours")  # 48 hours, not 172,800 s

    page = (run_dir / "report.html").read_text()
    assert "attempts per virtual second" in page and "per wall-clock second" in page
    assert "p99 (virtual ms)" in page
    assert 'id="virtual-latency"' in page and "key-store costs" in page
    assert "2 days (172,800 s)" in page  # the run's length
    assert "<td>24 h</td>" in page or ">24 h<" in page  # the event's time
    # The terminal: both rates, readable, never "0.0/s".
    out = result.stdout
    assert "attempts per virtual second" in out and "per wall-clock second" in out
    assert "0.0/s" not in out
    assert "Latency (virtual ms)" in out


def test_piped_output_keeps_whole_reason_codes_and_prints_progress(
    two_days: tuple[Path, Any],
) -> None:
    run_dir, result = two_days
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "key_store_error:CKR_PIN_LOCKED" in summary["cohorts"]["wrong-pin"]["outcomes"]
    # Not cut or folded at 80 columns: the reason code is whole on its line.
    assert "key_store_error:CKR_PIN_LOCKED" in result.stdout, result.stdout
    assert "CKR_PIN_INCORRECT" in result.stdout
    # Progress as plain lines on stderr (no live table a log cannot redraw).
    progress = [line for line in result.stderr.splitlines() if line.startswith("two-days: ")]
    assert progress, result.stderr
    assert "total" in progress[-1]


def test_no_duration_shows_how_attempts_got_in_per_phase(tmp_path: Path) -> None:
    # scenarios/no-duration.toml on the virtual clock: the same phases, event and fleet.
    text = (ROOT / "scenarios" / "no-duration.toml").read_text()
    assert 'clock = "real"' in text
    scenario = tmp_path / "no-duration.toml"
    scenario.write_text(text.replace('clock = "real"', 'clock = "virtual"'))
    run_dir, result = run_piped(scenario, tmp_path / "r")
    summary = json.loads((run_dir / "summary.json").read_text())
    phases = {p["name"]: p for p in summary["phases"]}
    before, after = phases["no-duration"], phases["cookies"]
    # No Duration: every attempt a full handshake, no cookie ever issued.
    assert before["attempts"] > 0
    assert before["full_handshakes"] == before["attempts"]
    assert before["full_handshake_share"] == 1.0
    assert before["cookie_admitted"] == 0
    # 24 h cookies: most attempts ride the cookie on a kept-alive connection.
    assert after["cookie_admitted"] > after["attempts"] / 2
    assert after["full_handshake_share"] < 0.5
    assert after["full_handshakes"] + after["resumed"] < after["attempts"]

    page = (run_dir / "report.html").read_text()
    for header in ("full handshakes", "resumed", "cookie-admitted"):
        assert f"<th>{header}</th>" in page
    share = f"{before['attempts']:,} (100.0%)"
    assert f'<td class="num">{share}</td>' in page
    assert "Phases: how attempts got in" in result.stdout
    assert f"{after['cookie_admitted']:,} (" in result.stdout
