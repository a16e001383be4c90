"""Devices that speak HTTP/2 and gRPC in scenarios and loads: ``client.protocol``, ``testbed
load --protocol``, the telemetry service as the origin, protocol and gRPC status in results.

The same through the embedded enforcer: tests/testbed/test_protocols_enforcer.py.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from pathlib import Path

import pytest

from devices.provision import Cohort, provision
from testbed.nginx import NGINX
from testbed.results import AttemptRow, Results
from testbed.scenario import ScenarioError, load_scenario
from tests.testbed.test_load_cli import load, meta, rows
from tests.testbed.test_run import run_cli

needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is installed by .ci/run")

SCENARIO = """\
name = "{name}"
seed = 5
clock = "{clock}"
thresholds = {thresholds}

[target]
kind = "{target}"

[[cohorts]]
name = "healthy"
size = 6
client = {{ {client} }}

[[cohorts]]
name = "expired"
size = 2
defect = "expired"
client = {{ {client} }}
{expired}
[[phases]]
name = "steady"
duration = "{duration}"
arrival = "constant"
rate = 10
{events}"""


def scenario(
    tmp_path: Path,
    *,
    client: str = 'protocol = "grpc"',
    target: str = "nginx",
    clock: str = "real",
    expired: str = 'expected = "grpc_unauthenticated"',
    thresholds: list[str] | None = None,
    duration: str = "2s",
    events: str = "",
    name: str = "protocols",
) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(
        SCENARIO.format(
            name=name,
            clock=clock,
            target=target,
            client=client,
            expired=expired,
            thresholds=json.dumps(thresholds or ["false_accepts == 0"]),
            duration=duration,
            events=events,
        )
    )
    return path


# -- scenario files -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client", "protocol", "rpc", "messages"),
    [
        ("", "http1", "report", 3),
        ('protocol = "http1"', "http1", "report", 3),
        ('protocol = "h2", keep_alive = false', "h2", "report", 3),
        ('protocol = "grpc"', "grpc", "report", 3),
        ('protocol = "grpc", rpc = "watch", watch_messages = 10', "grpc", "watch", 10),
    ],
)
def test_client_protocol_is_read_per_cohort(
    tmp_path: Path, client: str, protocol: str, rpc: str, messages: int
) -> None:
    s = load_scenario(scenario(tmp_path, client=client, expired=""))
    assert [(c.protocol, c.rpc, c.watch_messages) for c in s.cohorts] == [
        (protocol, rpc, messages)
    ] * 2


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        (
            {"client": 'protocol = "http3"'},
            "cohorts[0].client.protocol",
            "'http3' is not one of ['http1', 'h2', 'grpc']",
        ),
        ({"client": "protocol = 2"}, "cohorts[0].client.protocol", "expected one of"),
        (
            {"client": 'protocol = "h2", rpc = "watch"'},
            "cohorts[0].client.rpc",
            'only a gRPC cohort makes calls: set protocol = "grpc"',
        ),
        (
            {"client": 'protocol = "grpc", rpc = "stream"'},
            "cohorts[0].client.rpc",
            "'stream' is not one of ['report', 'watch']",
        ),
        (
            {"client": 'protocol = "grpc", watch_messages = 0'},
            "cohorts[0].client.watch_messages",
            "below 1",
        ),
        (
            {"clock": "virtual", "target": "embedded"},
            "clock",
            "cohort healthy has client.protocol = grpc, which needs real sockets",
        ),
        (
            {"expired": 'key_store = "piv"'},
            "cohorts[1].client.protocol",
            "grpc cannot use a piv key store",
        ),
        (
            {"expired": 'client = { protocol = "h2" }'},
            "cohorts",
            "cohort healthy speaks grpc and cohort expired does not",
        ),
    ],
)
def test_bad_protocols_name_the_file_the_field_and_the_problem(
    tmp_path: Path, change: dict[str, str], field: str, problem: str
) -> None:
    kwargs = {"expired": ""} | change
    if "client = {" in kwargs["expired"]:
        # The expired cohort's own client table replaces the shared one.
        text = scenario(tmp_path, expired="").read_text()
        head, _, tail = text.partition('defect = "expired"\nclient = { protocol = "grpc" }')
        path = tmp_path / "mixed.toml"
        path.write_text(head + 'defect = "expired"\n' + kwargs["expired"] + tail)
    else:
        path = scenario(tmp_path, **kwargs)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {field}: ") and problem in message, message


def test_a_virtual_grpc_run_exits_2_before_anything_starts(tmp_path: Path) -> None:
    path = scenario(tmp_path, clock="virtual", target="embedded", expired="")
    result = run_cli("run", str(path), "--reports", str(tmp_path / "reports"), "--no-progress")
    assert result.returncode == 2
    assert "clock: cohort healthy has client.protocol = grpc" in result.stderr
    assert not (tmp_path / "reports").exists()


def test_results_written_before_protocols_read_as_http1(tmp_path: Path) -> None:
    db = tmp_path / "results.sqlite"
    con = sqlite3.connect(db)
    later = ("protocol", "grpc_status", "kind", "login_ms", "callback_ms", "logged_in")
    fields = [f for f in AttemptRow.__dataclass_fields__ if f not in later]
    con.execute(f"CREATE TABLE attempts (id INTEGER PRIMARY KEY, {', '.join(fields)})")
    con.execute("CREATE TABLE run (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    values = ["d", "c", "p", "allowed", 0, 0, 1, 0, 1, 1, 1, 2, "allowed", 200, None, 1, 0, None, 0]
    con.execute(
        f"INSERT INTO attempts ({', '.join(fields)}) VALUES ({', '.join('?' * len(fields))})",
        values,
    )
    con.commit()
    con.close()
    results = Results(db)
    try:
        (row,) = list(results.attempts())
    finally:
        results.close()
    assert row.protocol == "http1" and row.grpc_status is None
    # ... and as devices' attempts: people and service tokens came later (issue 17).
    assert row.kind == "devices" and not row.logged_in and row.login_ms == row.callback_ms == 0


# -- runs and loads against nginx -----------------------------------------------------------------


def small_fleet(root: Path) -> Path:
    """Four healthy devices and two expired ones, provisioned in ``root``."""
    provision(
        root,
        [Cohort("healthy", 4), Cohort("expired", 2, "expired")],
        dt.datetime.now(dt.UTC),
        p12=False,
        workers=1,
    )
    return root


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four healthy devices and two expired ones."""
    return small_fleet(tmp_path_factory.mktemp("protocols") / "fleet")


@needs_nginx
@pytest.mark.parametrize(
    ("protocol", "refused", "statuses"),
    [
        ("h2", "http_400", {None}),
        ("grpc", "grpc_unauthenticated", {"OK", "UNAUTHENTICATED"}),
    ],
)
def test_load_with_a_protocol_against_nginx(
    fleet: Path, tmp_path: Path, protocol: str, refused: str, statuses: set[str | None]
) -> None:
    result, run_dir = load(
        tmp_path / "reports",
        *("--target", "nginx", "--fleet", str(fleet), "--protocol", protocol),
        *("--rate", "10", "--duration", "2s", "--mode", "keepalive", "--json"),
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["protocol"] == protocol and figures["false_accepts"] == 0
    assert set(figures["outcomes"]) == {"allowed", refused}
    assert run_dir is not None and meta(run_dir)["load"]["protocol"] == protocol  # type: ignore[index]
    seen = rows(run_dir, "SELECT DISTINCT protocol, grpc_status FROM attempts")
    assert {p for p, _ in seen} == {protocol} and {s for _, s in seen} == statuses
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["protocols"]) == [protocol]
    assert summary["protocols"][protocol]["attempts"] == figures["attempts"]
    assert 'id="protocols"' in (run_dir / "report.html").read_text()
    if protocol == "grpc":
        rejections = summary["cohorts"]["expired"]["rejections"]
        assert list(rejections) == ["grpc_unauthenticated [UNAUTHENTICATED]"]
        # nginx passed the allowed calls to the telemetry service it was given.
        conf = (run_dir / "nginx" / "nginx.conf").read_text()
        assert "grpc_pass grpc://127.0.0.1:" in conf and " ssl http2;" in conf


def test_load_refuses_a_protocol_its_fleet_cannot_speak(fleet: Path, tmp_path: Path) -> None:
    result, _ = load(
        tmp_path / "reports",
        *("--target", "nginx", "--fleet", str(fleet), "--protocol", "http3"),
        *("--rate", "10", "--duration", "2s"),
    )
    assert result.returncode == 2 and "--protocol" in result.stderr


@needs_nginx
def test_a_grpc_scenario_against_nginx_follows_a_revocation(tmp_path: Path) -> None:
    path = scenario(
        tmp_path,
        client='protocol = "grpc", rpc = "watch", watch_messages = 2',
        duration="4s",
        thresholds=[
            "false_accepts == 0",
            "cohort.expired.matched == 100%",
            "cohort.healthy.share:allowed > 0%",
            "cohort.healthy.share:grpc_unauthenticated > 0%",
            # The revocation reloads nginx: its old workers' GOAWAY can cut a Watch in flight,
            # which the device reports as an error (grpcio's retries are off: one attempt is
            # one call). Seen in 2 of 15 loaded runs, 1 call of 40 each.
            "errors <= 10%",
        ],
        events='\n[[events]]\nat = "2s"\naction = "revoke"\ncohort = "healthy"\nshare = 0.5\n',
    )
    reports = tmp_path / "reports"
    result = run_cli("run", str(path), "--reports", str(reports), "--no-progress")
    assert result.returncode == 0, result.stderr
    (run_dir,) = reports.iterdir()
    judged = rows(run_dir, "SELECT expression, ok FROM thresholds")
    assert all(ok for _, ok in judged) and len(judged) >= 4
    # After the reload, the revoked half expected nginx's gRPC refusal, and got it.
    late = rows(
        run_dir,
        "SELECT DISTINCT expected, outcome, grpc_status FROM attempts"
        " WHERE cohort = 'healthy' AND outcome != 'allowed' AND grpc_status != 'UNAVAILABLE'",
    )
    assert late == [("grpc_unauthenticated", "grpc_unauthenticated", "UNAUTHENTICATED")]
