"""A run's report: ``summary.json``, figures, ``report.html``, ``junit.xml`` and a terminal table.

Everything starts from :func:`testbed.summary.summarize`'s data; this module only renders it.
``report.html`` is one self-contained file (inline CSS, figures as base64 data URIs, no
external resources), so it can be mailed, attached to a CI run or opened offline. A small inline
script records on ``<body>`` whether every figure decoded (``data-images-ok``) and how many
script errors happened (``data-console-errors``): the headless browser test reads them.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import operator
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from testbed import plots
from testbed.results import Results, merge_shards
from testbed.summary import LATENCIES, STATS, fmt_rate, fmt_span, is_false_accept, metric, summarize

RESULTS_FILE = "results.sqlite"
SUMMARY_FILE = "summary.json"
HTML_FILE = "report.html"
JUNIT_FILE = "junit.xml"
TABLE_STATS = ("p50", "p90", "p99", "p99.9", "max", "mean")


@dataclasses.dataclass(frozen=True)
class ReportPaths:
    """Where a report's files were written."""

    run_dir: Path
    summary: Path
    html: Path
    junit: Path
    plots: dict[str, Path]


def load_summary(run_dir: Path) -> dict[str, Any]:
    """Summarize ``run_dir/results.sqlite`` (FileNotFoundError when there is none)."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: not a directory")
    path = run_dir / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {RESULTS_FILE} here (is it a run directory?)")
    # A run split between processes whose parent died before merging: merge what was written.
    merge_shards(run_dir)
    results = Results(path)
    try:
        return summarize(results)
    finally:
        results.close()


def render(run_dir: Path) -> ReportPaths:
    """Read a run directory's results and write every report file into it."""
    return write_report(run_dir, load_summary(run_dir))


def write_report(run_dir: Path, summary: Mapping[str, Any]) -> ReportPaths:
    """Write ``summary.json``, the figures, ``report.html`` and ``junit.xml`` into ``run_dir``."""
    summary_path = run_dir / SUMMARY_FILE
    # allow_nan=False: the summary uses null for "no data", so strict JSON parsers accept it.
    summary_path.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    figures = plots.render_all(summary, run_dir)
    images = {name: path.read_bytes() for name, path in figures.items()}
    html_path = run_dir / HTML_FILE
    html_path.write_text(render_html(summary, images), encoding="utf-8")
    junit_path = run_dir / JUNIT_FILE
    junit_path.write_text(render_junit(summary), encoding="utf-8")
    return ReportPaths(run_dir, summary_path, html_path, junit_path, figures)


# Formatting shared by the HTML and the terminal.


def fmt_ms(value: float | None) -> str:
    """Milliseconds for a table cell."""
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 10 else f"{value:,.1f}"


def fmt_share(value: float | None) -> str:
    """A 0..1 share as a percentage."""
    return "-" if value is None else f"{value * 100:.1f}%"


def fmt_seconds(value: float | None) -> str:
    """A duration in seconds."""
    return "-" if value is None else f"{value:,.1f} s"


def rates(summary: Mapping[str, Any]) -> str:
    """The run's rate in words: per virtual and per wall second on the virtual clock."""
    totals = summary["totals"]
    if summary["run"]["clock"] == "virtual":
        return (
            f"{fmt_rate(totals['rate'])} attempts per virtual second, "
            f"{fmt_rate(totals.get('rate_wall'))} per wall-clock second"
        )
    return f"{fmt_rate(totals['rate'])} attempts/s"


def fmt_duration(seconds: float | None) -> str:
    """A run's length: seconds, with days or hours beside them when long."""
    if seconds is None:
        return "-"
    if seconds < 120:
        return fmt_seconds(seconds)
    return f"{fmt_span(seconds)} ({seconds:,.0f} s)"


def fmt_target(target: Any) -> str:
    """The run's target, whatever shape the runner recorded it in."""
    if isinstance(target, Mapping):
        parts = [str(target.get("kind", ""))]
        parts += [str(target[k]) for k in ("url", "hostname") if target.get(k)]
        return " ".join(p for p in parts if p) or "-"
    return "-" if target is None else str(target)


def false_accept_cohorts(summary: Mapping[str, Any]) -> list[tuple[str, int]]:
    """Cohorts with false accepts, worst first."""
    rows = [(n, c["false_accepts"]) for n, c in summary["cohorts"].items() if c["false_accepts"]]
    return sorted(rows, key=lambda r: -r[1])


def verdict(summary: Mapping[str, Any]) -> str:
    """``passed``, ``failed`` (a threshold failed) or ``interrupted``."""
    if not summary["complete"]:
        return "interrupted"
    return "failed" if any(not t["ok"] for t in summary["thresholds"]) else "passed"


# HTML.

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
  color: #1d1d1f; background: #f6f7f9; }
main { max-width: 1100px; margin: 0 auto; padding: 24px; }
h1 { margin: 0 0 4px; font-size: 24px; }
h2 { margin: 28px 0 8px; font-size: 18px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
table { border-collapse: collapse; background: #fff; margin: 8px 0; }
.scroll { max-width: 100%; overflow-x: auto; }
th code { overflow-wrap: anywhere; }
td, th { overflow-wrap: anywhere; }
td.num { overflow-wrap: normal; white-space: nowrap; }
pre.scenario { background: #fff; border: 1px solid #e1e4e8; padding: 8px; max-height: 480px;
  overflow: auto; font-size: 12px; }
th, td { padding: 4px 10px; border: 1px solid #e1e4e8; text-align: left; vertical-align: top; }
th { background: #f0f2f5; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 10px; font-weight: 600;
  color: #fff; font-size: 13px; vertical-align: middle; }
.passed, .ok { background: #2a8a3e; } .failed, .bad { background: #c62828; }
.interrupted { background: #b26a00; }
.banner { padding: 12px 16px; border-radius: 6px; margin: 16px 0; font-size: 16px; }
.banner.bad { background: #c62828; color: #fff; font-weight: 600; }
.banner.ok { background: #e6f4ea; color: #1e6b32; border: 1px solid #a8d5b5; }
.banner.warn { background: #fff4e5; color: #7a4a00; border: 1px solid #f0c17a; }
tr.fail td { background: #fdecea; }
td.fa { background: #c62828; color: #fff; font-weight: 700; }
figure { background: #fff; border: 1px solid #e1e4e8; margin: 12px 0; padding: 8px; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { color: #555; font-size: 13px; margin-top: 4px; }
.meta td:first-child { color: #555; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 13px; }
"""

# Records, for headless checks, whether the figures decoded and how many errors occurred.
_SELF_CHECK = """
(function () {
  var errors = 0;
  function mark() {
    if (document.body) document.body.setAttribute("data-console-errors", String(errors));
  }
  window.addEventListener("error", function () { errors += 1; mark(); }, true);
  window.addEventListener("load", function () {
    var images = document.images, ok = true;
    for (var i = 0; i < images.length; i++) {
      if (!(images[i].complete && images[i].naturalWidth > 0)) ok = false;
    }
    document.body.setAttribute("data-images-ok", String(ok));
    document.body.setAttribute("data-images", String(images.length));
    mark();
  });
})();
"""


def _e(value: Any) -> str:
    return html.escape("-" if value is None else str(value))


def _table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], row_classes: Sequence[str] = ()
) -> str:
    """A table from already-escaped cells (a cell starting with "<td" is used as is)."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cells = "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in row)
        cls = row_classes[i] if i < len(row_classes) else ""
        body.append(f'<tr class="{cls}">{cells}</tr>' if cls else f"<tr>{cells}</tr>")
    # In a box of its own that scrolls sideways, so a wide table never widens the page.
    return (
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _num(text: str, extra: str = "") -> str:
    return f'<td class="num{extra}">{text}</td>'


def _header_html(summary: Mapping[str, Any]) -> str:
    run, totals = summary["run"], summary["totals"]
    state = verdict(summary)
    rows = [
        ("run", "complete" if summary["complete"] else "<strong>interrupted</strong>"),
        ("seed", _e(run["seed"])),
        ("clock", _e(run["clock"])),
        ("target", _e(fmt_target(run["target"]))),
        (
            f"duration ({'virtual' if run['clock'] == 'virtual' else 'run'} clock)",
            _e(fmt_duration(totals["duration_s"])),
        ),
        ("wall time", _e(fmt_duration(run["wall_s"]))),
        ("started", _e(run["started_at"])),
        ("finished", _e(run["finished_at"] if summary["complete"] else "-")),
        ("attempts", f"{totals['attempts']:,}"),
        ("rate", _e(rates(summary))),
        ("dropped (could not start on time)", f"{totals['dropped']:,}"),
    ]
    meta = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows)
    parts = [
        f"<h1>{_e(run['scenario'] or 'unnamed run')} "
        f'<span class="badge {state}">{state}</span></h1>',
        f'<table class="meta"><tbody>{meta}</tbody></table>',
    ]
    if not summary["complete"]:
        parts.append(
            '<div class="banner warn">This run was interrupted: the figures cover the '
            "attempts written before it stopped, and no thresholds were judged.</div>"
        )
    return "".join(parts)


def _shape(phase: Mapping[str, Any]) -> str:
    """A phase's arrival model in words."""
    arrival = phase.get("arrival")
    if arrival == "constant":
        return f"constant {phase.get('rate', 0):g}/s"
    if arrival == "ramping":
        return f"ramp {phase.get('start_rate', 0):g}/s to {phase.get('end_rate', 0):g}/s"
    if arrival == "active":
        return f"{phase.get('devices', 0):,} devices running their behaviour"
    return "-" if arrival is None else str(arrival)


def run_setup(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """How the run was made, as (what, value) pairs of plain text."""
    meta: Mapping[str, Any] = summary["run"].get("meta") or {}
    load: Mapping[str, Any] = meta.get("load") or {}
    detail: Mapping[str, Any] = meta.get("target_detail") or {}
    target = detail.get("url") or load.get("target") or fmt_target(summary["run"]["target"])
    kind = detail.get("kind") or meta.get("target")
    host = detail.get("hostname")
    rows = [("target", f"{target} (kind {kind}{f', hostname {host}' if host else ''})")]
    cohorts_meta: Mapping[str, Any] = meta.get("cohorts") or {}
    for app in detail.get("applications") or ():
        # [[target.applications]]: each with its session duration and the cohorts calling it.
        default = app is detail["applications"][0]
        calling = [
            name
            for name, c in cohorts_meta.items()
            if (c or {}).get("application") == app.get("name")
            or (default and not (c or {}).get("application"))
        ]
        duration = app.get("session_duration")
        rows.append(
            (
                f"application {app.get('name')}",
                f"{app.get('hostname')}, session duration"
                f" {'0s (No Duration)' if duration in ('0s', '0') else duration},"
                f" policy {app.get('policy')}; cohorts: {', '.join(calling) or 'none'}",
            )
        )
    if detail.get("ca"):
        rows.append(("server CA", str(detail["ca"])))
    if load:
        rows.append(("command", "testbed load"))
        rows.append(("mode", str(load.get("mode"))))
        if load.get("rate") is not None:
            rows.append(("rate", f"{load['rate']:g}/s"))
        if load.get("ramp"):
            a, b = load["ramp"]
            rows.append(("ramp", f"{a:g}/s to {b:g}/s"))
        if load.get("step"):
            start, step, top = load["step"]
            rows.append(
                ("steps", f"from {start:g}/s by {step:g}/s" + (f" up to {top:g}/s" if top else ""))
            )
        if load.get("closed"):
            rows.append(("closed loop", f"{load['closed']:,} devices"))
        rows.append(("load workers", str(load.get("workers", 1))))
    else:
        rows.append(("command", "testbed run"))
        rows.append(("mode", "each cohort's client options, from the scenario"))
        rows.append(("workers", str(meta.get("workers", 1))))
    if detail.get("enforcer_workers") is not None and kind in ("embedded", "nginx"):
        rows.append(("enforcer workers", str(detail["enforcer_workers"])))
    phases = [p for p in meta.get("phases") or [] if isinstance(p, Mapping)]
    if phases:
        rows.append(
            (
                "phases",
                "; ".join(
                    f"{p.get('name')}: {fmt_span(p.get('duration'))}, {_shape(p)}" for p in phases
                ),
            )
        )
    cohorts: Mapping[str, Any] = meta.get("cohorts") or {}
    devices = sum(int(c.get("size") or 0) for c in cohorts.values() if isinstance(c, Mapping))
    fleet = f"{devices:,} devices in {len(cohorts)} cohort{'s' if len(cohorts) != 1 else ''}"
    clients = [c for c in cohorts.values() if isinstance(c, Mapping) and c.get("kind")]
    people = sum(int(c.get("size") or 0) for c in clients if c.get("kind") == "people")
    tokens = sum(int(c.get("size") or 0) for c in clients if c.get("kind") == "service_tokens")
    if people or tokens:
        # One run, both kinds of client: devices, people who log in, service tokens.
        fleet = (
            f"{devices - people - tokens:,} devices, {people:,} people and {tokens:,} service"
            f" tokens in {len(cohorts)} cohort{'s' if len(cohorts) != 1 else ''}"
        )
    idp = meta.get("identity_provider")
    if isinstance(idp, Mapping):
        rows.append(
            ("identity provider", f"{idp.get('issuer_url')} (client {idp.get('client_id')})")
        )
    if load.get("fleet"):
        fleet += f", from {load['fleet']}"
    rows.append(("fleet", fleet))
    planned = sum(float(p.get("duration") or 0) for p in phases)
    rows.append(
        (
            "duration",
            f"{fmt_span(planned or None)} planned, {fmt_span(summary['totals']['duration_s'])}"
            f" on the run's clock ({summary['run']['clock']}), "
            f"{fmt_span(summary['run']['wall_s'])} of wall time",
        )
    )
    if meta.get("timeout") is not None:
        rows.append(("timeout per attempt", fmt_span(meta["timeout"])))
    versions: Mapping[str, Any] = meta.get("versions") or {}
    rows.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items()) or "not recorded"))
    if meta.get("scenario_path") and meta.get("scenario_text") is not None:
        # A load run from a fleet folder has a path but no scenario file.
        rows.append(("scenario file", str(meta["scenario_path"])))
    return rows


def _setup_html(summary: Mapping[str, Any]) -> str:
    meta: Mapping[str, Any] = summary["run"].get("meta") or {}
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in run_setup(summary))
    text = meta.get("scenario_text")
    scenario = (
        f'<details open><summary>The scenario file</summary><pre class="scenario" '
        f'id="scenario-text"><code>{_e(text)}</code></pre></details>'
        if text
        else "<p>No scenario file: the run was described on the command line.</p>"
    )
    return (
        f'<div class="scroll"><table class="meta" id="setup"><tbody>{rows}</tbody></table></div>'
        f"{scenario}"
    )


def _false_accepts_html(summary: Mapping[str, Any]) -> str:
    bad = false_accept_cohorts(summary)
    total = summary["totals"]["false_accepts"]
    if not bad:
        return (
            '<div class="banner ok" id="false-accepts">No false accepts: no device that should '
            "have been denied got in.</div>"
        )
    where = ", ".join(f"{_e(n)} ({c:,})" for n, c in bad)
    return (
        f'<div class="banner bad" id="false-accepts">{total:,} FALSE ACCEPT'
        f"{'S' if total != 1 else ''}: devices that should have been denied got in. "
        f"Cohorts: {where}.</div>"
    )


def _thresholds_html(summary: Mapping[str, Any]) -> str:
    thresholds = summary["thresholds"]
    if not thresholds:
        why = "the run did not finish" if not summary["complete"] else "the scenario set none"
        return f"<p>No thresholds were judged ({why}).</p>"
    rows = []
    for t in thresholds:
        result = "pass" if t["ok"] else "fail"
        badge = f'<span class="badge {"ok" if t["ok"] else "bad"}">{result}</span>'
        rows.append([f"<code>{_e(t['expression'])}</code>", _e(t["observed"]), badge])
    # Failed rows are tinted too, so they stand out without relying on the badge alone.
    classes = ["" if t["ok"] else "fail" for t in thresholds]
    return _table(["threshold", "observed", "result"], rows, classes)


PEOPLE_LATENCIES = ("login", "callback")


def client_kind(cohort: Mapping[str, Any]) -> str:
    """`` (people, with certificate)``, `` (service tokens)``, or nothing for devices."""
    kind = cohort.get("kind") or "devices"
    if kind == "people":
        cert = "with certificate" if cohort.get("with_certificate") else "no certificate"
        return f" (people, {cert}, {cohort.get('logins', 0):,} logins)"
    if kind == "service_tokens":
        return " (service tokens)"
    return ""


def _outcomes_html(summary: Mapping[str, Any]) -> str:
    rows = []
    for name, c in summary["cohorts"].items():
        observed = "<br>".join(f"{_e(o)}: {n:,}" for o, n in c["outcomes"].items()) or "-"
        fa = c["false_accepts"]
        # Expectations follow events (a revocation mid-run): each one with its attempts.
        by = c.get("by_expected") or []
        expected = (
            "<br>".join(f"<code>{_e(e['expected'])}</code>: {e['attempts']:,}" for e in by)
            if len(by) > 1
            else f"<code>{_e(by[0]['expected'] if by else c['expected'])}</code>"
        )
        rows.append(
            [
                _e(name + client_kind(c)),
                _num(_e(c["size"])),
                expected,
                _num(f"{c['attempts']:,}"),
                observed,
                _num(fmt_share(c["matched_share"])),
                _num(f"{fa:,}", " fa" if fa else ""),
                _num(f"{c['false_rejects']:,}"),
                _num(f"{c['errors']:,}"),
                _num(f"{c['dropped']:,}"),
            ]
        )
    if not rows:
        return "<p>No cohorts recorded.</p>"
    headers = [
        "cohort",
        "size",
        "expected",
        "attempts",
        "observed",
        "matched",
        "false accepts",
        "false rejects",
        "errors",
        "dropped",
    ]
    return _table(headers, rows)


def _matrix_html(summary: Mapping[str, Any]) -> str:
    matrix = summary["matrix"]
    if not matrix:
        return ""
    observed = sorted(
        {o for row in matrix.values() for o in row}, key=lambda o: (o != "allowed", o)
    )
    rows = []
    for expected, row in matrix.items():
        cells = [f"<code>{_e(expected)}</code>"]
        for o in observed:
            n = row.get(o, 0)
            fa = n and is_false_accept(expected, o)
            cells.append(_num(f"{n:,}" if n else "", " fa" if fa else ""))
        rows.append(cells)
    headers = ["expected \\ observed", *(f"<code>{_e(o)}</code>" for o in observed)]
    return _table(headers, rows)


def _latency_html(summary: Mapping[str, Any]) -> str:
    headers = ["latency", "samples", *TABLE_STATS]
    rows = []
    for name in LATENCIES:
        s = summary["latency"][name]
        if name in PEOPLE_LATENCIES and not s["count"]:
            continue  # no person logged in: no login rows
        rows.append([_e(name), _num(f"{s['count']:,}"), *(_num(fmt_ms(s[k])) for k in TABLE_STATS)])
    unit = "virtual ms" if summary["run"]["clock"] == "virtual" else "ms"
    overall = _table([*headers[:1], headers[1], *(f"{h} ({unit})" for h in TABLE_STATS)], rows)
    cohort_rows = []
    for cname, c in summary["cohorts"].items():
        kinds = (
            ("total", "handshake", *PEOPLE_LATENCIES) if c.get("logins") else ("total", "handshake")
        )
        for name in kinds:
            s = c["latency"][name]
            cohort_rows.append(
                [
                    _e(cname),
                    _e(name),
                    _num(f"{s['count']:,}"),
                    *(_num(fmt_ms(s[k])) for k in TABLE_STATS),
                ]
            )
    per_cohort = _table(
        ["cohort", "latency", "samples", *(f"{h} ({unit})" for h in TABLE_STATS)], cohort_rows
    )
    note = ""
    if summary["run"]["clock"] == "virtual":
        text = _e(virtual_latency_note(summary))
        note = f'<div class="banner warn" id="virtual-latency">{text}</div>'
    return (
        f"{note}<p>All attempts; <code>total</code> counts from the scheduled start (waiting for a "
        "stalled target counts), <code>service</code> from the actual start; "
        "<code>handshake</code> and <code>key_store</code> count full handshakes only.</p>"
        f"{overall}<h3>Per cohort</h3>{per_cohort}"
    )


def virtual_latency_note(summary: Mapping[str, Any]) -> str:
    """What a latency means on the virtual clock, and whether any attempt cost virtual time."""
    text = (
        "Virtual clock: latencies are virtual milliseconds, the simulated time that passed "
        "during each attempt: key-store costs (PIV PIN verify, touch, on-token signature) and "
        "attempts that timed out. In-memory streams and software keys cost no virtual time, "
        "and a device's backoff after a failure delays its next scheduled start, so it is in "
        "no attempt's latency."
    )
    if not summary["latency"]["total"]["max"]:
        text += (
            " No attempt of this run cost any virtual time: every latency is 0 virtual ms, "
            "which says nothing about the target's speed (see the wall-clock rate)."
        )
    return text


def _protocols_html(summary: Mapping[str, Any]) -> str:
    """Outcomes and latencies per protocol the devices spoke (only when not all HTTP/1.1)."""
    protocols: Mapping[str, Any] = summary.get("protocols") or {}
    if not protocols or set(protocols) == {"http1"}:
        return ""
    unit = "virtual ms" if summary["run"]["clock"] == "virtual" else "ms"
    rows = []
    for name, p in protocols.items():
        n = p["attempts"]
        statuses = ", ".join(f"{k} {v:,}" for k, v in (p.get("grpc_statuses") or {}).items())
        lat = p.get("latency") or {}
        rows.append(
            [
                _e(name),
                _num(f"{n:,}"),
                _num(fmt_share(p["matched_share"])),
                _num(f"{p['false_accepts']:,}", " fa" if p["false_accepts"] else ""),
                _num(f"{p['false_rejects']:,}"),
                _num(f"{p['errors']:,}"),
                _num(_count_share(p.get("full_handshakes", 0), n)),
                _e(statuses or "-"),
                *(_num(fmt_ms((lat.get(k) or {}).get("p50"))) for k in ("handshake", "first_byte")),
                _num(fmt_ms((lat.get("total") or {}).get("p99"))),
            ]
        )
    headers = [
        "protocol",
        "attempts",
        "matched",
        "false accepts",
        "false rejects",
        "errors",
        "full handshakes",
        "gRPC status",
        f"handshake p50 ({unit})",
        f"first byte p50 ({unit})",
        f"total p99 ({unit})",
    ]
    return (
        '<h2 id="protocols">Protocols</h2><p>What the devices spoke: HTTP/1.1, HTTP/2 (one '
        "stream per request) or gRPC calls to the telemetry service, with the calls' gRPC "
        "status codes. A gRPC handshake is the time to a READY channel (TCP, TLS and the "
        "HTTP/2 preface together); its first byte is the first response message.</p>"
        + _table(headers, rows)
    )


def _phases_html(summary: Mapping[str, Any]) -> str:
    unit = "virtual ms" if summary["run"]["clock"] == "virtual" else "ms"
    rows = []
    for p in summary["phases"]:
        n = p["attempts"]
        rows.append(
            [
                _e(p["name"]),
                _num(_e(_start(p["start"]))),
                _num(_e(fmt_span(p["duration"]))),
                _num(f"{n:,}"),
                _num(f"{p['dropped']:,}"),
                _num(fmt_share(p["matched_share"])),
                _num(f"{p['false_accepts']:,}", " fa" if p["false_accepts"] else ""),
                _num(f"{p['false_rejects']:,}"),
                *(_num(_count_share(p.get(k, 0), n)) for k in HANDSHAKE_KINDS),
                _num(fmt_ms(p["total"]["p50"])),
                _num(fmt_ms(p["total"]["p99"])),
            ]
        )
    if not rows:
        return "<p>No phases recorded.</p>"
    headers = [
        "phase",
        "start",
        "duration",
        "attempts",
        "dropped",
        "matched",
        "false accepts",
        "false rejects",
        *HANDSHAKE_KINDS.values(),
        f"total p50 ({unit})",
        f"total p99 ({unit})",
    ]
    return (
        "<p>How attempts got in, per phase: a full handshake (a new connection, the "
        "certificate checked), a resumed TLS session, or admitted by the CF_Authorization "
        "cookie (a request on a new connection can be both a full handshake and "
        "cookie-admitted). Shares are of the phase's attempts.</p>" + _table(headers, rows)
    )


def _start(seconds: float | None) -> str:
    """A phase's start: "0" for the first, else a span (fmt_span has no zero)."""
    return "0" if seconds == 0 else fmt_span(seconds)


HANDSHAKE_KINDS = {
    "full_handshakes": "full handshakes",
    "resumed": "resumed",
    "cookie_admitted": "cookie-admitted",
}


def _count_share(count: int, attempts: int) -> str:
    return f"{count:,} ({fmt_share(count / attempts if attempts else None)})"


def _steps_html(summary: Mapping[str, Any]) -> str:
    """``testbed load --step``: the sustainable rate (its spread over repeats) and each step."""
    meta = summary["run"]["meta"]
    steps = meta.get("steps") or []
    if not steps:
        return ""
    bounds = meta.get("step_bounds") or {}
    rate = meta.get("sustained_rate")
    spread = meta.get("sustained_rate_spread") or {}
    shown = "none: the first step failed" if rate is None else f"{rate:g} attempts/s"
    parts = [
        '<h2 id="steps">Steps</h2>',
        f'<p id="sustained-rate">Sustainable rate (p99 &le; {_e(bounds.get("p99_ms"))} ms,'
        f" errors &le; {_e(fmt_share(bounds.get('max_errors')))}): <strong>{_e(shown)}</strong>",
    ]
    if (spread.get("repeats") or 1) > 1:
        parts.append(
            f" &mdash; median of {spread['repeats']} repeats, min {spread['min']:g}/s,"
            f" max {spread['max']:g}/s"
        )
    parts.append("</p>")
    rows, classes = [], []
    for s in steps:
        held = s.get("held")
        badge = "ok" if held else "bad"
        rows.append(
            [
                _num(_e(s.get("repeat", 1))),
                _e(s["phase"]),
                _num(f"{s['rate']:g}"),
                _num(_e(None if s.get("start_s") is None else f"{s['start_s']:.1f}")),
                _num(f"{s['attempts']:,}"),
                _num(f"{s['errors']:,}"),
                _num(f"{s['dropped']:,}"),
                _num(fmt_ms(s.get("p99_ms"))),
                f'<span class="badge {badge}">{"held" if held else "failed"}</span>',
            ]
        )
        classes.append("" if held else "fail")
    headers = ["repeat", "step", "rate/s", "start (s)", "attempts", "errors", "dropped"]
    parts.append(_table([*headers, "p99 (ms)", "verdict"], rows, classes))
    return "".join(parts)


def _events_html(summary: Mapping[str, Any]) -> str:
    long = (summary["totals"]["duration_s"] or 0) >= 120

    def when(t: float) -> str:
        return fmt_span(t) if long and t else f"{t:.3f} s"

    rows = [[_num(_e(when(e["t"]))), _e(e["kind"]), _e(e["detail"])] for e in summary["events"]]
    if not rows:
        return "<p>No events.</p>"
    return _table(["t", "event", "detail"], rows)


def _figures_html(images: Mapping[str, bytes]) -> str:
    captions = {name: caption for name, caption, _ in plots.PLOTS}
    parts = []
    for name, data in images.items():
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        caption = _e(captions.get(name, name))
        parts.append(
            f'<figure id="{_e(name.removesuffix(".png"))}"><img src="{uri}" alt="{caption}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    return "".join(parts)


def render_html(summary: Mapping[str, Any], images: Mapping[str, bytes]) -> str:
    """The self-contained ``report.html`` for a summary and its PNG figures."""
    # "<" escaped so no string in the data can close the script element.
    data = json.dumps(summary, allow_nan=False).replace("<", "\\u003c")
    title = _e(f"testbed report: {summary['run']['scenario'] or 'run'}")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{title}</title><style>{_CSS}</style>"
        f"<script>{_SELF_CHECK}</script></head>"
        '<body data-images-ok="pending" data-console-errors="0"><main>'
        f"{_header_html(summary)}"
        f"{_false_accepts_html(summary)}"
        f"<h2>Thresholds</h2>{_thresholds_html(summary)}"
        f'<h2 id="how">How this run was made</h2>{_setup_html(summary)}'
        f"<h2>Outcomes per cohort</h2>{_outcomes_html(summary)}"
        f"<h3>Expected vs observed</h3>{_matrix_html(summary)}"
        f"<h2>Latency</h2>{_latency_html(summary)}"
        f"<h2>Phases</h2>{_phases_html(summary)}"
        f"{_protocols_html(summary)}"
        f"{_steps_html(summary)}"
        f"<h2>Figures</h2>{_figures_html(images)}"
        f"<h2>Events</h2>{_events_html(summary)}"
        f'<script type="application/json" id="summary-data">{data}</script>'
        "</main></body></html>\n"
    )


# JUnit.


def render_junit(summary: Mapping[str, Any]) -> str:
    """``junit.xml``: one test case per threshold, or "run completed" when there are none."""
    run = summary["run"]
    scenario = str(run["scenario"] or "run")
    suite_name = f"testbed.{scenario}"
    cases: list[tuple[str, str | None, str]] = []  # (name, failure message or None, detail)
    for t in summary["thresholds"]:
        message = None if t["ok"] else f"{t['expression']}: observed {t['observed']}"
        cases.append((t["expression"], message, f"observed {t['observed']}"))
    if not cases:
        message = None if summary["complete"] else "the run was interrupted before it finished"
        cases.append(("run completed", message, f"{summary['totals']['attempts']} attempts"))
    failures = sum(1 for _, m, _ in cases if m)
    duration = summary["totals"]["duration_s"] or 0.0
    root = ET.Element(
        "testsuites", name="testbed", tests=str(len(cases)), failures=str(failures), errors="0"
    )
    suite = ET.SubElement(
        root,
        "testsuite",
        name=suite_name,
        tests=str(len(cases)),
        failures=str(failures),
        errors="0",
        skipped="0",
        time=f"{duration:.3f}",
    )
    if isinstance(run["started_at"], str):
        suite.set("timestamp", run["started_at"])
    props = ET.SubElement(suite, "properties")
    for key in ("scenario", "seed", "clock"):
        ET.SubElement(props, "property", name=key, value=str(run[key]))
    ET.SubElement(props, "property", name="target", value=fmt_target(run["target"]))
    ET.SubElement(props, "property", name="complete", value=str(summary["complete"]).lower())
    ET.SubElement(
        props, "property", name="false_accepts", value=str(summary["totals"]["false_accepts"])
    )
    for name, message, detail in cases:
        case = ET.SubElement(suite, "testcase", classname=suite_name, name=name, time="0")
        if message:
            failure = ET.SubElement(case, "failure", message=message, type="threshold")
            failure.text = message
        else:
            ET.SubElement(case, "system-out").text = detail
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


# Terminal.

# Outside a terminal (CI logs, pipes) rich would assume 80 columns and cut or fold tables: a
# log has no width, so tables get their natural width, up to this.
PIPE_WIDTH = 1000


def terminal_console(*, stderr: bool = False) -> Console:
    """A console for tables: the terminal's width on a TTY, else wide enough that none is cut."""
    console = Console(stderr=stderr, soft_wrap=True)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, soft_wrap=True, width=PIPE_WIDTH)


def print_summary(summary: Mapping[str, Any] | Path, console: Console | None = None) -> None:
    """Print the run's outcome, cohorts, latencies and thresholds as rich tables.

    ``summary`` is a summary dict, or a run directory to summarize.
    """
    if isinstance(summary, Path):
        summary = load_summary(summary)
    console = console or terminal_console()
    run, totals = summary["run"], summary["totals"]
    state = verdict(summary)
    colour = {"passed": "green", "failed": "red", "interrupted": "yellow"}[state]
    console.print(
        f"[bold]{escape(str(run['scenario'] or 'run'))}[/] [bold {colour}]{state}[/]  "
        f"seed {escape(str(run['seed']))}, {escape(str(run['clock']))} clock, "
        f"{fmt_duration(totals['duration_s'])}, {totals['attempts']:,} attempts "
        f"({rates(summary)}), {totals['dropped']:,} dropped",
        highlight=False,
    )
    bad = false_accept_cohorts(summary)
    if bad:
        where = ", ".join(f"{escape(n)} ({c:,})" for n, c in bad)
        console.print(
            f"[bold white on red] {totals['false_accepts']:,} FALSE ACCEPTS [/] {where}",
            highlight=False,
        )
    else:
        console.print("[green]no false accepts[/]", highlight=False)

    cohorts = Table(title="Outcomes per cohort", title_justify="left")
    # Numbers never wrap; on a narrow terminal the outcome names fold instead.
    cohorts.add_column("cohort", overflow="fold", min_width=8)
    cohorts.add_column("expected", overflow="fold", min_width=12)
    for col in ("attempts", "matched", "false\naccepts", "false\nrejects"):
        cohorts.add_column(col, justify="right", no_wrap=True)
    cohorts.add_column("other outcomes", overflow="fold", min_width=12)
    for name, c in summary["cohorts"].items():
        # The expected outcome's count is in "matched": list only the surprises.
        others = [f"{o} {n:,}" for o, n in c["unmatched_outcomes"].items()]
        fa = f"[bold red]{c['false_accepts']:,}[/]" if c["false_accepts"] else "0"
        # Expectations follow events (a revocation mid-run): each one with its attempts.
        by = c["by_expected"]
        if len(by) > 1:
            expected = "\n".join(f"{e['expected']} {e['attempts']:,}" for e in by)
        else:
            expected = str(by[0]["expected"] if by else c["expected"])
        cohorts.add_row(
            escape(name + client_kind(c)),
            escape(expected),
            f"{c['attempts']:,}",
            fmt_share(c["matched_share"]),
            fa,
            f"{c['false_rejects']:,}",
            escape("\n".join(others) or "-"),
        )
    console.print(cohorts)

    virtual = run["clock"] == "virtual"
    latency = Table(title=f"Latency ({'virtual ms' if virtual else 'ms'})", title_justify="left")
    latency.add_column("latency")
    latency.add_column("samples", justify="right")
    for stat in TABLE_STATS:
        latency.add_column(stat, justify="right")
    for name in LATENCIES:
        s = summary["latency"][name]
        if name in PEOPLE_LATENCIES and not s["count"]:
            continue
        latency.add_row(name, f"{s['count']:,}", *(fmt_ms(s[k]) for k in TABLE_STATS))
    console.print(latency)
    if virtual:
        console.print(f"[dim]{escape(virtual_latency_note(summary))}[/]", highlight=False)

    if summary["phases"]:
        phases = Table(title="Phases: how attempts got in", title_justify="left")
        phases.add_column("phase", overflow="fold")
        for col in ("attempts", "matched", *HANDSHAKE_KINDS.values()):
            phases.add_column(col, justify="right", no_wrap=True)
        for p in summary["phases"]:
            n = p["attempts"]
            phases.add_row(
                escape(p["name"]),
                f"{n:,}",
                fmt_share(p["matched_share"]),
                *(_count_share(p.get(k, 0), n) for k in HANDSHAKE_KINDS),
            )
        console.print(phases)

    if summary["thresholds"]:
        thresholds = Table(title="Thresholds", title_justify="left")
        for col in ("threshold", "observed", "result"):
            thresholds.add_column(col)
        for t in summary["thresholds"]:
            result = "[green]pass[/]" if t["ok"] else "[bold red]FAIL[/]"
            thresholds.add_row(escape(t["expression"]), escape(t["observed"]), result)
        console.print(thresholds)
    elif not summary["complete"]:
        console.print("[yellow]interrupted: no thresholds were judged[/]", highlight=False)


# Comparison.

COMPARE_STATS = ("p50", "p90", "p99", "p99.9", "max")
COMPARE_TOTALS = ("attempts", "rate", "dropped", "false_accepts", "false_rejects", "errors")


def _change(a: float | None, b: float | None) -> float | None:
    """Relative change from a to b (None when it has no meaning)."""
    if a is None or b is None or a == 0:
        return None
    return (b - a) / a


def compare(run_a: Path, run_b: Path, fail_if: Sequence[str] = ()) -> dict[str, Any]:
    """Side-by-side totals, latencies and per-cohort outcomes of two runs (B against A).

    ``fail_if`` are regression gates (see :func:`parse_gate`), judged into ``data["gates"]``;
    a bad one raises :class:`GateError` before anything else is judged.
    """
    a, b = load_summary(run_a), load_summary(run_b)
    gates = [parse_gate(text) for text in fail_if]
    data = compare_summaries(a, b, run_a, run_b)
    data["gates"] = [judge_gate(g, a, b) for g in gates]
    data["tripped"] = [g["expression"] for g in data["gates"] if g["tripped"]]
    return data


def compare_summaries(
    a: Mapping[str, Any], b: Mapping[str, Any], run_a: Path, run_b: Path
) -> dict[str, Any]:
    """The comparison of two summaries (B against A), as data."""

    def describe(path: Path, s: Mapping[str, Any]) -> dict[str, Any]:
        run = s["run"]
        return {
            "dir": str(path),
            "scenario": run["scenario"],
            "seed": run["seed"],
            "clock": run["clock"],
            "complete": s["complete"],
            "verdict": verdict(s),
        }

    totals = [
        {
            "name": name,
            "a": a["totals"][name],
            "b": b["totals"][name],
            "change": _change(a["totals"][name], b["totals"][name]),
        }
        for name in COMPARE_TOTALS
    ]
    latency = []
    for name in LATENCIES:
        for stat in COMPARE_STATS:
            va, vb = a["latency"][name][stat], b["latency"][name][stat]
            latency.append(
                {"metric": f"{name}.{stat}", "a": va, "b": vb, "change": _change(va, vb)}
            )
    outcomes = []
    for cohort in list(dict.fromkeys([*a["cohorts"], *b["cohorts"]])):
        ca, cb = a["cohorts"].get(cohort), b["cohorts"].get(cohort)
        names = dict.fromkeys([*(ca or {}).get("outcomes", {}), *(cb or {}).get("outcomes", {})])
        for outcome in names:
            row: dict[str, Any] = {"cohort": cohort, "outcome": outcome}
            for side, c in (("a", ca), ("b", cb)):
                count = c["outcomes"].get(outcome, 0) if c else 0
                attempts = c["attempts"] if c else 0
                row[side] = count
                row[f"{side}_share"] = count / attempts if attempts else None
            outcomes.append(row)
    return {
        "a": describe(run_a, a),
        "b": describe(run_b, b),
        "totals": totals,
        "latency": latency,
        "outcomes": outcomes,
        "gates": [],
        "tripped": [],
    }


# Regression gates: ``testbed compare --fail-if``.


class GateError(ValueError):
    """A ``--fail-if`` expression that cannot be understood; the message names it."""


@dataclasses.dataclass(frozen=True)
class Gate:
    """``METRIC OP VALUE``: trips when true of run B (``relative``: of B's change from A)."""

    text: str
    metric: str
    op: str
    value: float
    relative: bool


_GATE = re.compile(
    r"^\s*(?P<metric>[^\s<>=!]+)\s*(?P<op><=|>=|==|!=|<|>)\s*"
    r"(?P<sign>[+-])?(?P<value>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>ms|s|%)?\s*$"
)
_GATE_OPS = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    ">": operator.gt,
}


def parse_gate(text: str) -> Gate:
    """Parse a gate: ``total.p99 > +10%`` (B's change from A) or ``false_accepts > 0`` (B's value).

    A signed percentage (``+10%``, ``-5%``) compares B's relative change from A; any other
    value compares B's own value (``ms``/``s`` on latencies, ``%`` on shares).
    """
    match = _GATE.match(text)
    if match is None:
        raise GateError(
            f"--fail-if {text!r}: expected METRIC OP VALUE, such as 'total.p99 > +10%' "
            "(B's change from A) or 'false_accepts > 0' (B's value)"
        )
    name, unit, sign = match["metric"], match["unit"], match["sign"]
    _check_gate_metric(text, name)
    value = float(match["value"]) * (-1 if sign == "-" else 1)
    relative = sign is not None and unit == "%"
    if sign is not None and unit != "%":
        raise GateError(
            f"--fail-if {text!r}: a signed value is a change from A and needs %, as in +10%"
        )
    latency = name.rpartition(".")[0].rpartition(".")[2] in LATENCIES or (
        name.partition(".")[0] in LATENCIES
    )
    if unit in ("ms", "s") and not latency:
        raise GateError(f"--fail-if {text!r}: a time unit on {name}, which is not a latency")
    if unit == "s":
        value *= 1000
    elif unit == "%" and not relative:
        value /= 100
    return Gate(text.strip(), name, match["op"], value / 100 if relative else value, relative)


def _check_gate_metric(text: str, name: str) -> None:
    """Refuse a metric name that no summary can answer (cohort names are checked later)."""
    if name.startswith("cohort."):
        return
    try:
        metric(_EMPTY_SUMMARY, name)
    except KeyError as exc:
        raise GateError(f"--fail-if {text!r}: {exc.args[0]}") from None


_EMPTY_SUMMARY: dict[str, Any] = {
    "totals": dict.fromkeys(COMPARE_TOTALS, 0),
    "latency": {name: dict.fromkeys(STATS) for name in LATENCIES},
    "cohorts": {},
}


def judge_gate(gate: Gate, a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Judge one gate on two summaries; a gate with no data to judge trips (fail closed)."""
    try:
        va, vb = metric(a, gate.metric), metric(b, gate.metric)
    except KeyError as exc:
        raise GateError(f"--fail-if {gate.text!r}: {exc.args[0]}") from None
    out: dict[str, Any] = {
        "expression": gate.text,
        "a": None if math.isnan(va) else va,
        "b": None if math.isnan(vb) else vb,
        "change": None,
    }
    if gate.relative:
        if math.isnan(va) or math.isnan(vb):
            return out | {"tripped": True, "why": "no data in one of the runs"}
        if va == 0:
            # From nothing: any rise is an infinite change, no rise is none.
            change = 0.0 if vb == 0 else math.copysign(math.inf, vb)
        else:
            change = (vb - va) / abs(va)
        out["change"] = change if math.isfinite(change) else None
        tripped = _GATE_OPS[gate.op](change, gate.value)
        return out | {"tripped": tripped, "why": f"change {_pct(change)}"}
    if math.isnan(vb):
        return out | {"tripped": True, "why": "no data in run B"}
    out["change"] = _change(va, vb) if not math.isnan(va) else None
    if gate.op in ("==", "!="):
        # Float-safe equality, as thresholds judge it.
        tripped = (abs(vb - gate.value) < 1e-9) == (gate.op == "==")
    else:
        tripped = _GATE_OPS[gate.op](vb, gate.value)
    return out | {"tripped": tripped, "why": f"B {vb:.4g}"}


def _pct(change: float) -> str:
    return "+inf%" if change == math.inf else f"{change * 100:+.1f}%"


def _fmt_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return fmt_ms(value)
    return f"{value:,}" if isinstance(value, int) else str(value)


def _fmt_change(change: float | None, higher_is_worse: bool = True) -> str:
    if change is None:
        return "-"
    text = f"{change * 100:+.1f}%"
    if abs(change) < 0.05:
        return text
    worse = change > 0 if higher_is_worse else change < 0
    return f"[red]{text}[/]" if worse else f"[green]{text}[/]"


def print_comparison(data: Mapping[str, Any], console: Console | None = None) -> None:
    """Print :func:`compare`'s data as rich tables."""
    console = console or terminal_console()
    for side in ("a", "b"):
        d = data[side]
        console.print(
            f"[bold]{side.upper()}[/] {escape(d['dir'])}: {escape(str(d['scenario']))}, seed "
            f"{escape(str(d['seed']))}, {escape(str(d['clock']))} clock, {d['verdict']}",
            highlight=False,
        )
    totals = Table(title="Totals", title_justify="left")
    for col in ("", "A", "B", "change"):
        totals.add_column(col, justify="left" if not col else "right")
    for row in data["totals"]:
        worse_up = row["name"] != "rate" and row["name"] != "attempts"
        totals.add_row(
            row["name"],
            _fmt_value(row["a"]),
            _fmt_value(row["b"]),
            _fmt_change(row["change"], worse_up),
        )
    console.print(totals)
    latency = Table(title="Latency (ms)", title_justify="left")
    for col in ("", "A", "B", "change"):
        latency.add_column(col, justify="left" if not col else "right")
    for row in data["latency"]:
        if row["a"] is None and row["b"] is None:
            continue
        latency.add_row(
            row["metric"], fmt_ms(row["a"]), fmt_ms(row["b"]), _fmt_change(row["change"])
        )
    console.print(latency)
    outcomes = Table(title="Outcomes per cohort", title_justify="left")
    for col in ("cohort", "outcome", "A", "B", "A share", "B share"):
        outcomes.add_column(
            col, justify="right" if col in ("A", "B", "A share", "B share") else "left"
        )
    for row in data["outcomes"]:
        changed = row["a_share"] != row["b_share"]
        style = "bold" if changed else ""
        outcomes.add_row(
            escape(row["cohort"]),
            escape(row["outcome"]),
            f"{row['a']:,}",
            f"{row['b']:,}",
            fmt_share(row["a_share"]),
            fmt_share(row["b_share"]),
            style=style,
        )
    console.print(outcomes)
    if data.get("gates"):
        gates = Table(title="Regression gates (--fail-if)", title_justify="left")
        for col in ("gate", "A", "B", "change", "result"):
            gates.add_column(col, justify="left" if col in ("gate", "result") else "right")
        for g in data["gates"]:
            tripped = f"[bold red]TRIPPED[/] ({escape(g['why'])})"
            result = tripped if g["tripped"] else "[green]ok[/]"
            gates.add_row(
                escape(g["expression"]),
                _fmt_value(g["a"]),
                _fmt_value(g["b"]),
                _fmt_change(g["change"]),
                result,
            )
        console.print(gates)
