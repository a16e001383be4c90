"""Several applications on one target: ``[[target.applications]]``, a cohort's
``application``, events that name one, and what the runner makes of them (the embedded
enforcer's applications, edge certificate and roots; nginx's servers; each device's SNI).

Real runs: gRPC devices on a No Duration application beside a 24 h one (counts from
results.sqlite and the enforcer's access log), h2 devices in virtual time with an event that
changes one application's session duration, http1 devices on two hostnames of nginx.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from enforcer.config import load_config
from testbed.nginx import NGINX
from testbed.pkis import provision_pkis
from testbed.runner import write_enforcer_config
from testbed.scenario import ScenarioError, load_scenario
from testbed.summary import metric
from testbed.thresholds import ThresholdError, parse_threshold
from tests.testbed.test_load_cli import load, rows
from tests.testbed.test_run import run_cli

LIVE, BATCH = "live.example.test", "batch.example.test"

TWO_APPLICATIONS = """\
name = "two-apps"
seed = 7
clock = "{clock}"
thresholds = {thresholds}

[target]
kind = "{kind}"
{target}
[[target.applications]]
name = "live"
hostname = "{live}"
session_duration = "{live_duration}"

[[target.applications]]
name = "batch"
hostname = "{batch}"
session_duration = "24h"
{batch_extra}
[[cohorts]]
name = "live-devices"
application = "live"
size = 4
client = {{ {client} }}

[[cohorts]]
name = "batch-devices"
application = "batch"
size = 4
client = {{ {client} }}

[[cohorts]]
name = "default-devices"
size = 1
{cohort_extra}
[[phases]]
name = "steady"
duration = "{duration}"
arrival = "constant"
rate = {rate}
{phases}{events}"""


def two_apps(tmp_path: Path, **change: Any) -> Path:
    """Write a scenario with applications live (No Duration) and batch (24 h)."""
    fields: dict[str, Any] = {
        "clock": "real",
        "thresholds": ["false_accepts == 0"],
        "kind": "embedded",
        "target": "",
        "live": LIVE,
        "batch": BATCH,
        "live_duration": "0s",
        "batch_extra": "",
        "client": 'protocol = "grpc", keep_alive = true',
        "cohort_extra": 'client = { protocol = "grpc" }\n',
        "duration": "3s",
        "rate": 10,
        "phases": "",
        "events": "",
    } | change
    fields["thresholds"] = json.dumps(fields["thresholds"])
    path = tmp_path / "two-apps.toml"
    path.write_text(TWO_APPLICATIONS.format(**fields))
    return path


def problem(path: Path) -> tuple[str, str]:
    """The (field, problem) a scenario file is refused with."""
    with pytest.raises(ScenarioError) as caught:
        load_scenario(path)
    assert caught.value.path == str(path)
    return caught.value.field, caught.value.problem


# -- the scenario file ----------------------------------------------------------------------------


def test_applications_and_each_cohorts_application_are_read(tmp_path: Path) -> None:
    s = load_scenario(two_apps(tmp_path))
    assert [(a.name, a.hostname, a.session_duration) for a in s.target.applications] == [
        ("live", LIVE, "0s"),
        ("batch", BATCH, "24h"),
    ]
    # The first application is the default one: the target's hostname, and a cohort's.
    assert (s.target.hostname, s.target.session_duration) == (LIVE, "0s")
    assert [c.application for c in s.cohorts] == ["live", "batch", None]
    assert s.target.application(None).name == "live"
    assert s.target.hostnames == [LIVE, BATCH]


def test_a_scenario_without_applications_keeps_its_one_application(tmp_path: Path) -> None:
    path = tmp_path / "old.toml"
    path.write_text(
        two_apps(tmp_path)
        .read_text()
        .split("[[target.applications]]")[0]
        .replace('kind = "embedded"', 'kind = "embedded"\nhostname = "Old.Example.Test"')
        + '[[cohorts]]\nname = "c"\nsize = 1\n[[phases]]\nname = "p"\nduration = "1s"\n'
        'arrival = "constant"\nrate = 1\n'
    )
    s = load_scenario(path)
    assert s.target.declared == ()
    (app,) = s.target.applications
    assert (app.name, app.hostname, app.session_duration, app.policy) == (
        "",
        "old.example.test",
        "24h",
        "certificate",
    )


def test_target_defaults_apply_to_every_application(tmp_path: Path) -> None:
    # target.session_duration and target.policy are the applications' defaults, as [fleet]
    # is the PKIs'; an application's own value wins.
    path = two_apps(
        tmp_path,
        target='session_duration = "2h"\npolicy = "common_name:device-001"',
        live_duration="0s",
    )
    path.write_text(path.read_text().replace('session_duration = "24h"\n', ""))
    s = load_scenario(path)
    assert [(a.session_duration, a.policy) for a in s.target.applications] == [
        ("0s", "common_name:device-001"),
        ("2h", "common_name:device-001"),
    ]


def test_a_cohorts_expected_outcome_follows_its_applications_policy(tmp_path: Path) -> None:
    wrong_cn = 'defect = "wrong-cn"\nclient = { protocol = "grpc" }\n'
    path = two_apps(
        tmp_path,
        batch_extra='policy = "common_name:someone-else"\n',
        cohort_extra=wrong_cn + 'application = "batch"\n',
    )
    assert load_scenario(path).cohorts[2].expected == "denied:policy_denied"
    # The same wrong-CN cohort on the default application (a certificate policy) is allowed.
    path = two_apps(
        tmp_path, batch_extra='policy = "common_name:someone-else"\n', cohort_extra=wrong_cn
    )
    assert load_scenario(path).cohorts[2].expected == "allowed"


def test_events_name_an_application(tmp_path: Path) -> None:
    events = (
        '\n[[events]]\nat = "1s"\naction = "set_session_duration"\nvalue = "0s"\n'
        'application = "batch"\n'
        '\n[[events]]\nat = "2s"\naction = "set_session_duration"\nvalue = "1h"\n'
    )
    s = load_scenario(two_apps(tmp_path, events=events))
    assert [e.application for e in s.events] == ["batch", None]


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        (
            {"cohort_extra": 'application = "archive"\n'},
            "cohorts[2].application",
            "'archive' is not one of the [[target.applications]]: ['live', 'batch']",
        ),
        (
            {"batch": LIVE.upper()},
            "target.applications[1].hostname",
            f"'{LIVE}' is also applications[0]'s hostname: each application needs its own",
        ),
        (
            {"target": 'hostname = "auth.example.test"'},
            "target.hostname",
            "with [[target.applications]] each application has its own hostname",
        ),
        (
            {"batch": "not a hostname"},
            "target.applications[1].hostname",
            "is not a DNS name",
        ),
        (
            {"batch": "known-intermediates.invalid"},
            "target.applications[1].hostname",
            "names under .invalid are the testbed's own",
        ),
        (
            {"live_duration": "a day"},
            "target.applications[0].session_duration",
            "",
        ),
        (
            {"batch_extra": 'policy = "cn"\n'},
            "target.applications[1].policy",
            "expected certificate or common_name:<CN>",
        ),
        (
            {"batch_extra": 'origin = "http://127.0.0.1:1"\n'},
            "target.applications[1].origin",
            "unknown field",
        ),
        (
            {"events": '\n[[events]]\nat = "1s"\naction = "stop_origin"\napplication = "live"\n'},
            "events[0].application",
            "only set_session_duration and set_policy change one application",
        ),
        (
            {
                "events": '\n[[events]]\nat = "1s"\naction = "set_policy"\n'
                'value = "certificate"\napplication = "live2"\n'
            },
            "events[0].application",
            "'live2' is not one of the [[target.applications]]",
        ),
    ],
)
def test_application_mistakes_name_the_field(
    tmp_path: Path, change: dict[str, Any], field: str, message: str
) -> None:
    got_field, got = problem(two_apps(tmp_path, **change))
    assert got_field == field
    assert message in got


def test_repeated_application_names_are_refused(tmp_path: Path) -> None:
    path = two_apps(tmp_path)
    path.write_text(path.read_text().replace('name = "batch"', 'name = "live"'))
    assert problem(path) == (
        "target.applications[1].name",
        "'live' is also applications[0]'s name: each application needs its own name",
    )


def test_a_cohorts_application_without_declared_applications(tmp_path: Path) -> None:
    path = two_apps(tmp_path)
    text = path.read_text()
    head, _, rest = text.partition("[[target.applications]]")
    path.write_text(head + "[[cohorts]]" + rest.split("[[cohorts]]", 1)[1])
    field, message = problem(path)
    assert field == "cohorts[0].application"
    assert "this target has one application (target.hostname)" in message


def test_a_bad_application_exits_2_naming_file_and_field(tmp_path: Path) -> None:
    path = two_apps(tmp_path, batch=LIVE)
    result = run_cli("run", str(path), "--reports", str(tmp_path / "reports"), "--no-progress")
    assert result.returncode == 2
    assert f"{path}: target.applications[1].hostname:" in result.stderr
    assert not (tmp_path / "reports").exists()


def test_load_refuses_hostname_with_applications(tmp_path: Path) -> None:
    path = two_apps(tmp_path)
    result, _ = load(
        tmp_path / "reports",
        *("--target", "embedded", "--scenario", str(path), "--hostname", "other.example.test"),
        *("--rate", "5", "--duration", "1s"),
    )
    assert result.returncode == 2
    assert "--hostname:" in result.stderr and "[[target.applications]]" in result.stderr


# -- what the runner configures --------------------------------------------------------------------


def test_the_enforcer_gets_every_application_one_edge_certificate_and_the_roots(
    tmp_path: Path,
) -> None:
    path = two_apps(tmp_path, cohort_extra='pki = "elsewhere"\nclient = { protocol = "grpc" }\n')
    path.write_text(
        path.read_text().replace(
            "[[cohorts]]",
            '[[pkis]]\nname = "fleet"\n\n[[pkis]]\nname = "elsewhere"\ntrusted = false\n\n'
            "[[cohorts]]",
            1,
        )
    )
    scenario = load_scenario(path)
    now = dt.datetime.now(dt.UTC)
    run_dir = tmp_path / "run"
    fleet = provision_pkis(scenario, run_dir, now)
    config = load_config(
        write_enforcer_config(scenario, run_dir, fleet, "grpc://127.0.0.1:50051", now)
    )
    apps = {a.name: a for a in config.applications}
    assert set(apps) == {"live", "batch"}
    assert (apps["live"].hostname, apps["live"].session_duration) == (LIVE, dt.timedelta(0))
    assert (apps["batch"].hostname, apps["batch"].session_duration) == (
        BATCH,
        dt.timedelta(hours=24),
    )
    assert {a.origin for a in apps.values()} == {"grpc://127.0.0.1:50051"}
    (edge,) = config.edge_certificates
    assert set(edge.hostnames) == {LIVE, BATCH}
    leaf = x509.load_pem_x509_certificate(edge.chain_pem)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {LIVE, BATCH}
    bound = {r.name: set(r.associated_hostnames) for r in config.roots}
    assert bound["fleet root"] == {LIVE, BATCH}  # a trusted PKI reaches every application
    assert bound["elsewhere root"] == {"elsewhere.elsewhere.invalid"}


# -- real runs -------------------------------------------------------------------------------------


def test_no_duration_beside_24h_grpc_devices_through_the_enforcer(tmp_path: Path) -> None:
    path = two_apps(
        tmp_path,
        duration="4s",
        thresholds=[
            "false_accepts == 0",
            "cohort.live-devices.matched == 100%",
            "cohort.batch-devices.matched == 100%",
            "cohort.live-devices.full_handshakes == 100%",
        ],
    )
    reports = tmp_path / "reports"
    result = run_cli("run", str(path), "--reports", str(reports), "--no-progress")
    assert result.returncode == 0, result.stderr
    (run_dir,) = reports.iterdir()
    counts = {
        cohort: (attempts, new)
        for cohort, attempts, new in rows(
            run_dir,
            "SELECT cohort, count(*), sum(new_connection) FROM attempts"
            " WHERE outcome = 'allowed' AND protocol = 'grpc' GROUP BY cohort",
        )
    }
    live, batch = counts["live-devices"], counts["batch-devices"]
    # No Duration: every call a new connection, although the devices keep their channel.
    assert live[0] > 4 and live[1] == live[0]
    # 24 h: each device connects once and keeps its channel for its next calls.
    assert batch[0] > 6 and batch[1] < batch[0] / 2
    # The enforcer saw each cohort's devices on its application's hostname, and agrees on
    # the connections: one per request on live, one per device at most on batch.
    cohort_of = dict(rows(run_dir, "SELECT DISTINCT device, cohort FROM attempts"))
    seen: dict[str, set[str]] = {}
    connections: dict[str, set[int]] = {}
    requests: dict[str, int] = {}
    for line in (run_dir / "access.log").read_text().splitlines():
        entry = json.loads(line)
        if entry.get("decision") != "allowed":
            continue
        cohort = cohort_of[entry["certificate"]["common_name"]]
        seen.setdefault(cohort, set()).add(entry["sni"])
        assert entry["host"] == entry["sni"]
        connections.setdefault(entry["sni"], set()).add(entry["connection"])
        requests[entry["sni"]] = requests.get(entry["sni"], 0) + 1
    assert seen["live-devices"] == {LIVE} and seen["default-devices"] == {LIVE}
    assert seen["batch-devices"] == {BATCH}
    assert len(connections[BATCH]) <= 4 < requests[BATCH]  # one per device of four
    assert len(connections[LIVE]) == requests[LIVE]
    meta_rows = dict(rows(run_dir, "SELECT key, value FROM run"))
    detail = json.loads(meta_rows["target_detail"])
    assert [a["name"] for a in detail["applications"]] == ["live", "batch"]
    assert json.loads(meta_rows["cohorts"])["live-devices"]["application"] == "live"
    # The report says which cohorts called which application, and with what session duration.
    report = (run_dir / "report.html").read_text()
    assert "session duration 0s (No Duration)" in report
    assert "cohorts: batch-devices" in report


def test_set_session_duration_changes_only_the_named_application(tmp_path: Path) -> None:
    # Virtual time, h2 devices: both applications start with 24 h; at 30 s batch alone gets No
    # Duration, so from then on only its devices connect for every request.
    events = (
        '\n[[events]]\nat = "30s"\naction = "set_session_duration"\nvalue = "0s"\n'
        'application = "batch"\n'
    )
    phases = '\n[[phases]]\nname = "after"\nduration = "30s"\narrival = "constant"\nrate = 2\n'
    path = two_apps(
        tmp_path,
        clock="virtual",
        live_duration="24h",
        client='protocol = "h2", keep_alive = true',
        cohort_extra='client = { protocol = "h2" }\n',
        duration="30s",
        rate=2,
        phases=phases,
        events=events,
        thresholds=["false_accepts == 0", "errors == 0"],
    )
    reports = tmp_path / "reports"
    result = run_cli("run", str(path), "--reports", str(reports), "--no-progress")
    assert result.returncode == 0, result.stderr
    (run_dir,) = reports.iterdir()
    new: dict[tuple[str, str], list[int]] = {}
    for cohort, phase, device, is_new in rows(
        run_dir,
        "SELECT cohort, phase, device, new_connection FROM attempts"
        " WHERE outcome = 'allowed' ORDER BY started",
    ):
        new.setdefault((cohort, phase), []).append(is_new)
        if phase == "after" and cohort == "batch-devices":
            new.setdefault(("batch-devices", device), []).append(is_new)
    # Before the event both applications keep connections: one per device at most.
    assert sum(new["batch-devices", "steady"]) <= 4 < len(new["batch-devices", "steady"])
    # After it, a batch device's kept connection serves one more request (the enforcer's
    # GOAWAY comes with it), then every request is a new connection.
    devices = [k for k in new if k[0] == "batch-devices" and k[1].startswith("device-")]
    assert len(devices) == 4
    assert all(all(new[d][1:]) and len(new[d]) > 1 for d in devices)
    # The live application kept its 24 h: its devices keep their connections.
    assert sum(new["live-devices", "after"]) <= 4 < len(new["live-devices", "after"])
    ((detail,),) = rows(run_dir, "SELECT detail FROM events WHERE kind = 'set_session_duration'")
    assert detail == "session duration set to 0s on batch"


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
def test_nginx_serves_every_applications_hostname(tmp_path: Path) -> None:
    path = two_apps(
        tmp_path,
        kind="nginx",
        client="keep_alive = true",
        cohort_extra="",
        duration="2s",
        thresholds=["false_accepts == 0", "errors == 0"],
    )
    reports = tmp_path / "reports"
    result = run_cli("run", str(path), "--reports", str(reports), "--no-progress")
    assert result.returncode == 0, result.stderr
    (run_dir,) = reports.iterdir()
    assert dict(rows(run_dir, "SELECT cohort, outcome FROM attempts GROUP BY 1, 2")) == {
        "live-devices": "allowed",
        "batch-devices": "allowed",
        "default-devices": "allowed",
    }
    config = (run_dir / "nginx" / "nginx.conf").read_text()
    assert f"server_name {LIVE};" in config and f"server_name {BATCH};" in config


# -- thresholds on connections ---------------------------------------------------------------------


def test_connection_share_thresholds_parse_and_resolve() -> None:
    t = parse_threshold("cohort.live.full_handshakes == 100%", ["live"])
    assert (t.metric, t.value, t.of_attempts) == ("cohort.live.full_handshakes", 1.0, False)
    parse_threshold("cohort.live.new_connections <= 50%", ["live"])
    with pytest.raises(ThresholdError, match="new_connections, full_handshakes"):
        parse_threshold("cohort.live.connections <= 50%", ["live"])
    summary = {
        "totals": {},
        "cohorts": {
            "live": {"attempts": 4, "new_connection_share": 0.75, "full_handshake_share": 0.5}
        },
    }
    assert metric(summary, "cohort.live.new_connections") == 0.75
    assert metric(summary, "cohort.live.full_handshakes") == 0.5


def test_set_policy_changes_only_the_named_applications_devices(tmp_path: Path) -> None:
    # Virtual time, http1: at 10 s batch takes a Common Name policy no device meets; its
    # devices are expected (and observed) policy_denied from then on, live's still allowed.
    events = (
        '\n[[events]]\nat = "10s"\naction = "set_policy"\nvalue = "common_name:nobody"\n'
        'application = "batch"\n'
    )
    phases = '\n[[phases]]\nname = "after"\nduration = "10s"\narrival = "constant"\nrate = 2\n'
    path = two_apps(
        tmp_path,
        clock="virtual",
        live_duration="24h",
        # Without cookies: a session minted before the change would still admit (as Access's).
        client="keep_alive = true, reuse_cookie = false",
        cohort_extra="client = { reuse_cookie = false }\n",
        duration="10s",
        rate=2,
        phases=phases,
        events=events,
        thresholds=[
            "false_accepts == 0",
            "cohort.live-devices.matched == 100%",
            "cohort.batch-devices.matched == 100%",
            "cohort.default-devices.matched == 100%",
        ],
    )
    reports = tmp_path / "reports"
    result = run_cli("run", str(path), "--reports", str(reports), "--no-progress")
    assert result.returncode == 0, result.stderr
    (run_dir,) = reports.iterdir()
    seen = set(rows(run_dir, "SELECT cohort, phase, outcome FROM attempts GROUP BY 1, 2, 3"))
    assert ("batch-devices", "after", "denied:policy_denied") in seen
    assert ("batch-devices", "steady", "allowed") in seen
    assert {o for c, p, o in seen if c != "batch-devices"} == {"allowed"}
