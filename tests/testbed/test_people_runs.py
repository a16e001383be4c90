"""People and service-token cohorts beside devices in `testbed run` (issue 17).

The run is real end to end: the served embedded enforcer over TLS on loopback, a REAL OpenID
Connect provider (node oidc-provider, tests/oidc_idp.py) that the simulated people log in at
through its HTML form, service tokens created through the enforcer's admin API, and the run's
results.sqlite and report read back. Scenario files with people are checked before anything
starts: a problem names the file, the field and what is wrong, and exits 2.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from testbed.scenario import ScenarioError, load_scenario
from tests.oidc_idp import OidcIdp, oidc_idp  # noqa: F401 - the fixture
from tests.people_idp import point_at

TESTBED = [sys.executable, "-m", "testbed.cli"]
ROOT = Path(__file__).resolve().parents[2]

GET = (
    'behaviour = { kind = "periodic", interval = 0.5, path = "/", method = "GET", body_bytes = 0 }'
)

SMALL = f"""
name = "people-small"
seed = 5
clock = "real"
thresholds = ["false_accepts == 0"]

[identity_provider]
issuer_url = "https://127.0.0.1:1"
client_id = "replaced by tests.people_idp.point_at"
client_secret_env = "IDP_CLIENT_SECRET"

[target]
kind = "embedded"

[[target.applications]]
name = "app"
hostname = "app.example.test"
policy = "email_domain:example.com+certificate"

[[target.applications]]
name = "telemetry"
hostname = "telemetry.example.test"

[[cohorts]]
name = "staff"
kind = "people"
application = "app"
users = ["alice@example.com"]
password = "alice-password"
size = 2
{GET}

[[cohorts]]
name = "laptop-stolen"
kind = "people"
application = "app"
users = ["carol@example.com"]
password = "carol-password"
{GET}

[[cohorts]]
name = "no-laptop"
kind = "people"
application = "app"
users = ["carol@example.com"]
password = "carol-password"
with_certificate = false
{GET}

[[cohorts]]
name = "outsiders"
kind = "people"
application = "app"
users = [{{ email = "bob@other.test", password = "bob-password" }}]
{GET}

[[cohorts]]
name = "wrong-password"
kind = "people"
application = "app"
users = [{{ email = "alice@example.com", password = "not-alices" }}]
expected = "login_error:credentials_rejected"
{GET}

[[cohorts]]
name = "devices"
application = "telemetry"
size = 2
behaviour = {{ kind = "periodic", interval = 0.5 }}

# A device never logs in: on the people's application it is told so, 401 (never a redirect).
[[cohorts]]
name = "devices-on-app"
application = "app"
size = 1
{GET}

[[cohorts]]
name = "ci"
kind = "service_tokens"
application = "app"
size = 1
{GET}

[[cohorts]]
name = "ci-bad-secret"
kind = "service_tokens"
application = "app"
size = 1
defect = "wrong_secret"
{GET}

[[cohorts]]
name = "ci-revoked"
kind = "service_tokens"
application = "app"
size = 1
{GET}

[[phases]]
name = "steady"
duration = "6s"
arrival = "active"
devices = 12

[[events]]
at = "3s"
action = "revoke"
cohort = "laptop-stolen"

[[events]]
at = "3s"
action = "revoke_service_token"
cohort = "ci-revoked"
"""


def _rows(run_dir: Path, query: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(run_dir / "results.sqlite")
    try:
        return db.execute(query).fetchall()
    finally:
        db.close()


def test_people_log_in_beside_devices_and_service_tokens(
    oidc_idp: OidcIdp,  # noqa: F811
    tmp_path: Path,
) -> None:
    source = tmp_path / "people-small.toml"
    source.write_text(SMALL)
    scenario, env = point_at(oidc_idp, source, tmp_path / "pointed")
    reports = tmp_path / "reports"
    proc = subprocess.run(
        [*TESTBED, "run", str(scenario), "--reports", str(reports), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    (run_dir,) = reports.iterdir()
    outcomes = {
        (cohort, outcome)
        for cohort, outcome in _rows(run_dir, "SELECT DISTINCT cohort, outcome FROM attempts")
    }
    assert proc.returncode == 0, (sorted(outcomes), proc.stdout[-4000:], proc.stderr[-3000:])
    # Every cohort met what it expected; both kinds of client in the one run.
    mismatched = _rows(
        run_dir, "SELECT cohort, expected, outcome, error FROM attempts WHERE outcome != expected"
    )
    assert mismatched == [], mismatched
    seen = {c for c, _ in outcomes}
    assert seen == {
        "staff",
        "laptop-stolen",
        "no-laptop",
        "outsiders",
        "wrong-password",
        "devices",
        "devices-on-app",
        "ci",
        "ci-bad-secret",
        "ci-revoked",
    }
    assert ("staff", "allowed") in outcomes and ("devices", "allowed") in outcomes
    assert {o for c, o in outcomes if c == "no-laptop"} == {"denied:no_certificate"}
    assert {o for c, o in outcomes if c == "outsiders"} == {"denied:identity_denied"}
    assert {o for c, o in outcomes if c == "devices-on-app"} == {"denied:login_required"}
    assert _rows(
        run_dir, "SELECT DISTINCT status FROM attempts WHERE cohort = 'devices-on-app'"
    ) == [(401,)]
    assert {o for c, o in outcomes if c == "ci-bad-secret"} == {"denied:service_token_invalid"}
    # Revoked mid-run: the laptop's certificate (its session ends with it, J3) and the token.
    # (Each was admitted before, unless a loaded machine delayed its first attempt past 3 s.)
    stolen = {o for c, o in outcomes if c == "laptop-stolen"}
    assert "denied:revoked" in stolen and stolen <= {"allowed", "denied:revoked"}
    revoked = {o for c, o in outcomes if c == "ci-revoked"}
    assert "denied:service_token_invalid" in revoked
    assert revoked <= {"allowed", "denied:service_token_invalid"}
    assert ("ci", "allowed") in outcomes
    # A login per session: each person's first request logged in (provider round trips and
    # callback timed), the session's later requests did not.
    logins = dict(
        _rows(
            run_dir,
            "SELECT device, SUM(logged_in) FROM attempts WHERE cohort = 'staff' GROUP BY device",
        )
    )
    assert len(logins) == 2 and set(logins.values()) == {1}, logins
    timed = _rows(
        run_dir,
        "SELECT MIN(login_ms), MIN(callback_ms), COUNT(*) FROM attempts"
        " WHERE logged_in AND cohort IN ('staff', 'outsiders')",
    )
    assert timed[0][0] > 0 and timed[0][1] > 0
    assert _rows(run_dir, "SELECT COUNT(*) FROM attempts WHERE cohort = 'staff'")[0][0] > 2
    # Refused before any login: no certificate means no trip to the provider (I7).
    assert _rows(run_dir, "SELECT SUM(logged_in) FROM attempts WHERE cohort = 'no-laptop'") == [
        (0,)
    ]
    kinds = dict(_rows(run_dir, "SELECT cohort, MIN(kind) FROM attempts GROUP BY cohort"))
    assert kinds["staff"] == "people" and kinds["ci"] == "service_tokens"
    assert kinds["devices"] == "devices"
    # The report shows both kinds of client and the new reason codes.
    html = (run_dir / "report.html").read_text()
    for text in (
        "staff (people, with certificate",
        "no-laptop (people, no certificate",
        "ci (service tokens)",
        "denied:identity_denied",
        "denied:service_token_invalid",
        "login_error:credentials_rejected",
        "identity provider",
    ):
        assert text in html, text
    assert ">login<" in html and ">callback<" in html


SESSIONS = f"""
name = "people-sessions"
seed = 9
clock = "real"
thresholds = ["false_accepts == 0"]

[identity_provider]
issuer_url = "https://127.0.0.1:1"
client_id = "replaced"
client_secret_env = "IDP_CLIENT_SECRET"

[target]
kind = "embedded"
hostname = "app.example.test"
session_duration = "2s"
policy = "email_domain:example.com+certificate"

[[cohorts]]
name = "staff"
kind = "people"
users = ["alice@example.com"]
password = "alice-password"
{GET}

[[phases]]
name = "steady"
duration = "5s"
arrival = "active"
devices = 1
"""


def test_a_login_per_session(oidc_idp: OidcIdp, tmp_path: Path) -> None:  # noqa: F811
    # 2 s sessions, a request every 0.5 s for 5 s: the person logs in again as each session
    # ends, and every request is admitted.
    source = tmp_path / "people-sessions.toml"
    source.write_text(SESSIONS)
    scenario, env = point_at(oidc_idp, source, tmp_path / "pointed")
    reports = tmp_path / "reports"
    proc = subprocess.run(
        [*TESTBED, "run", str(scenario), "--reports", str(reports), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    (run_dir,) = reports.iterdir()
    rows = _rows(run_dir, "SELECT outcome, logged_in, cookie_sent FROM attempts ORDER BY id")
    assert proc.returncode == 0, (rows, proc.stderr[-3000:])
    assert {o for o, _, _ in rows} == {"allowed"}
    logins = sum(logged for _, logged, _ in rows)
    assert 2 <= logins < len(rows), rows  # several sessions, each with several requests


def _write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


PEOPLE = """
name = "p"
clock = "{clock}"
{idp}
[target]
kind = "embedded"
policy = "{policy}"

[[cohorts]]
name = "staff"
kind = "people"
{people}

[[phases]]
name = "p"
duration = "1s"
arrival = "constant"
rate = 1
"""
IDP = """
[identity_provider]
issuer_url = "https://127.0.0.1:9443"
client_id = "c"
client_secret_env = "PEOPLE_TEST_SECRET"
"""


def people(
    tmp_path: Path,
    *,
    clock: str = "real",
    idp: str = IDP,
    policy: str = "email_domain:example.com+certificate",
    people: str = 'users = ["alice@example.com"]\npassword = "x"',
) -> Path:
    return _write(tmp_path, PEOPLE.format(clock=clock, idp=idp, policy=policy, people=people))


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEOPLE_TEST_SECRET", "s3cret")


def test_people_cohorts_parse_with_expected_outcomes(tmp_path: Path) -> None:
    s = load_scenario(
        people(tmp_path, people='user_pattern = "user{i}@example.com"\npassword = "pw"\nsize = 3')
    )
    (c,) = s.cohorts
    assert c.kind == "people" and c.size == 3 and c.expected == "allowed"
    assert [c.user(i) for i in range(3)] == [
        ("user1@example.com", "pw"),
        ("user2@example.com", "pw"),
        ("user3@example.com", "pw"),
    ]
    assert s.identity_provider is not None
    assert s.identity_provider.issuer_url == "https://127.0.0.1:9443"
    other = load_scenario(people(tmp_path, people='users = ["bob@other.test"]\npassword = "x"'))
    assert other.cohorts[0].expected == "denied:identity_denied"
    bare = load_scenario(
        people(
            tmp_path, people='users = ["a@example.com"]\npassword = "x"\nwith_certificate = false'
        )
    )
    assert bare.cohorts[0].expected == "denied:no_certificate"
    assert not bare.cohorts[0].provisioned


@pytest.mark.parametrize(
    ("kwargs", "field", "problem"),
    [
        # People need the real clock: the provider is a real server on the wall clock.
        ({"clock": "virtual"}, "clock", 'use clock = "real"'),
        ({"idp": ""}, "identity_provider", "add an [identity_provider] table"),
        (
            {"people": 'users = ["a@example.com", "b@other.test"]\npassword = "x"'},
            "cohorts[0].users",
            "different outcomes",
        ),
        ({"people": 'users = ["not-an-email"]\npassword = "x"'}, "users[0]", "not an email"),
        ({"people": 'users = ["a@example.com"]'}, "users[0]", "no password"),
        ({"people": 'password = "x"'}, "cohorts[0].users", "user_pattern"),
        ({"policy": "email_domain:"}, "target.policy", "not a policy term"),
        ({"policy": "group:engineering+certificate"}, "cohorts[0].expected", "set expected"),
        (
            {"idp": IDP.replace("PEOPLE_TEST_SECRET", "PEOPLE_UNSET_VAR")},
            "client_secret_env",
            "not set",
        ),
        ({"idp": IDP.replace("https://127", "http://127")}, "issuer_url", "https URL"),
    ],
)
def test_bad_people_scenarios_name_file_field_problem(
    tmp_path: Path, kwargs: dict[str, str], field: str, problem: str
) -> None:
    path = people(tmp_path, **kwargs)
    with pytest.raises(ScenarioError) as bad:
        load_scenario(path)
    assert bad.value.path == str(path)
    assert field in bad.value.field and problem in bad.value.problem, str(bad.value)


def test_service_token_events_need_a_service_token_cohort(tmp_path: Path) -> None:
    text = people(tmp_path).read_text() + (
        '\n[[events]]\nat = "0.5s"\naction = "revoke_service_token"\ncohort = "staff"\n'
    )
    with pytest.raises(ScenarioError, match="needs a service_tokens cohort"):
        load_scenario(_write(tmp_path, text))


def test_a_virtual_people_scenario_exits_2_naming_file_and_field(tmp_path: Path) -> None:
    path = people(tmp_path, clock="virtual")
    proc = subprocess.run(
        [*TESTBED, "run", str(path), "--reports", str(tmp_path / "r"), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={"PEOPLE_TEST_SECRET": "s3cret", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2, proc.stderr
    assert f"{path}: clock:" in proc.stderr and "kind = people" in proc.stderr
    assert not (tmp_path / "r").exists()  # refused before provisioning anything


def test_service_tokens_run_in_virtual_time(tmp_path: Path) -> None:
    # Service tokens need no provider: the admin API and the decision run on the virtual clock.
    path = _write(
        tmp_path,
        """
name = "tokens-virtual"
clock = "virtual"
thresholds = ["false_accepts == 0"]
[target]
kind = "embedded"
[[cohorts]]
name = "devices"
size = 2
behaviour = { kind = "periodic", interval = 600 }
[[cohorts]]
name = "ci"
kind = "service_tokens"
size = 2
duration = "2h"
behaviour = { kind = "periodic", interval = 600 }
[[cohorts]]
name = "ci-unknown"
kind = "service_tokens"
size = 1
defect = "unknown_client_id"
behaviour = { kind = "periodic", interval = 600 }
[[phases]]
name = "day"
duration = "4h"
arrival = "active"
devices = 5
[[events]]
at = "1h"
action = "advance_clock"
value = "30m"
""",
    )
    proc = subprocess.run(
        [*TESTBED, "run", str(path), "--reports", str(tmp_path / "r"), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    (run_dir,) = (tmp_path / "r").iterdir()
    outcomes = set(_rows(run_dir, "SELECT DISTINCT cohort, outcome FROM attempts"))
    assert proc.returncode == 0, (sorted(outcomes), proc.stderr[-3000:])
    # The 2 h tokens expire once the enforcer's clock passes 2 h: 1.5 h in, after the 30 min
    # advance (the runner follows expiry as the clock passes it, not only at the event).
    assert {o for c, o in outcomes if c == "ci"} == {"allowed", "denied:service_token_expired"}
    assert {o for c, o in outcomes if c == "ci-unknown"} == {"denied:service_token_invalid"}


@pytest.mark.parametrize(
    ("policy", "email", "certificate", "expected"),
    [
        ("email_domain:example.com+certificate", "a@example.com", True, "allowed"),
        ("email_domain:example.com+certificate", "a@EXAMPLE.com", True, "allowed"),
        ("email_domain:example.com+certificate", "b@other.test", True, "denied:identity_denied"),
        # No certificate: the policy cannot hold whatever the login (I7), so no login at all.
        ("email_domain:example.com+certificate", "a@example.com", False, "denied:no_certificate"),
        ("email_domain:example.com", "a@example.com", False, "allowed"),
        ("email:a@example.com", "b@example.com", False, "denied:identity_denied"),
        # A certificate policy admits the laptop without a login; without one it cannot.
        ("certificate", "a@example.com", True, "allowed"),
        ("certificate", "a@example.com", False, "denied:no_certificate"),
    ],
)
def test_what_a_person_should_observe(
    policy: str, email: str, certificate: bool, expected: str
) -> None:
    from testbed.scenario import person_outcome

    assert person_outcome(policy, email, certificate) == expected


def test_set_policy_beside_people_is_refused(tmp_path: Path) -> None:
    text = people(tmp_path).read_text() + (
        '\n[[events]]\nat = "0.5s"\naction = "set_policy"\nvalue = "certificate"\n'
    )
    path = _write(tmp_path, text)
    with pytest.raises(ScenarioError) as bad:
        load_scenario(path)
    assert bad.value.field == "events[0].action" and "sessions outlive" in bad.value.problem
