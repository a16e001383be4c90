"""A scenario whose cohort keeps its keys in a SoftHSM2 token: `testbed run` against the embedded
enforcer, with the token removed, reinserted and its PIN changed mid-run."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from devices.pkcs11 import reinitialize
from testbed.scenario import ScenarioError, load_scenario
from tests.devices.test_pkcs11 import (  # noqa: F401 (a fixture)
    LABEL,
    SoftToken,
    need_nginx,
    token,
)

ROOT = Path(__file__).resolve().parents[2]
CLI = (sys.executable, "-m", "testbed.cli")

SCENARIO = """
name = "tokens"
seed = 1
clock = "real"
thresholds = ["false_accepts == 0"]

[target]
kind = "embedded"

[[cohorts]]
name = "tokens"
size = 2
key_store = {{kind = "pkcs11", module = "{module}", token = "{label}", pin_env = "TEST_TOKEN_PIN"}}
behaviour = {{ kind = "periodic", interval = 0.4 }}

[[cohorts]]
name = "files"
size = 2

[[phases]]
name = "steady"
duration = "4s"
arrival = "constant"
rate = 12

[[events]]
at = "1.2s"
action = "token_removed"
cohort = "tokens"

[[events]]
at = "2.2s"
action = "token_reinserted"
cohort = "tokens"

[[events]]
at = "3s"
action = "pin_changed"
cohort = "tokens"
value = "NEW_TOKEN_PIN"
"""


def write(tmp_path: Path, token: SoftToken, text: str = SCENARIO) -> Path:  # noqa: F811
    path = tmp_path / "tokens.toml"
    path.write_text(text.format(module=token.module, label=LABEL))
    return path


def test_a_token_cohort_runs_through_removal_reinsertion_and_a_pin_change(
    tmp_path: Path,
    token: SoftToken,  # noqa: F811
) -> None:
    path = write(tmp_path, token)
    reinitialize(token.module)  # this process lets go of the token: the run's process owns it
    env = {**os.environ, "NEW_TOKEN_PIN": "135792"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "testbed.cli",
            "run",
            str(path),
            "--reports",
            str(tmp_path / "r"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    db = next((tmp_path / "r").glob("tokens-*/results.sqlite"))
    con = sqlite3.connect(db)
    rows = con.execute(
        "SELECT scheduled, outcome, expected, key_store_ms, handshake_ms FROM attempts "
        "WHERE cohort = 'tokens' ORDER BY scheduled"
    ).fetchall()
    events = [k for (k,) in con.execute("SELECT kind FROM events")]
    con.close()
    assert {"token_removed", "token_reinserted", "pin_changed"} <= set(events)

    def during(start: float, end: float) -> set[str]:
        return {o for at, o, *_ in rows if start <= at < end}

    # By scheduled time; an attempt that started late on this shared machine may run into the
    # next event, which the runner allows (either side's expectation), so each stretch shows
    # its own outcome and at most its neighbour's.
    removed = "key_store_error:CKR_DEVICE_REMOVED"
    refused = {"key_store_error:CKR_PIN_INCORRECT", "key_store_error:CKR_PIN_LOCKED"}
    assert "allowed" in during(0, 1.1) <= {"allowed", removed}
    assert removed in during(1.3, 2.1) <= {removed, "allowed"}
    assert "allowed" in during(2.3, 2.9) <= {"allowed"} | refused
    # The token's PIN changed; the devices' PIN source did not: refused, then not presented.
    assert during(3.3, 4) and during(3.3, 4) <= refused
    # Every attempt saw what the runner expected of it then (the runner's own judgement).
    assert all(o == e for _, o, e, *_ in rows), [r for r in rows if r[1] != r[2]]
    # Full handshakes on the token record its signing time in the key_store phase.
    assert any(ks > 0 and hs >= ks for _, o, _, ks, hs in rows if o == "allowed")


def test_bad_pkcs11_cohorts_name_the_field(tmp_path: Path, token: SoftToken) -> None:  # noqa: F811
    cases = [
        (', pin_env = "TEST_TOKEN_PIN"}', "}", "cohorts[0].key_store.pin_env", "exactly one"),
        ('clock = "real"', 'clock = "virtual"', "clock", "PKCS#11 token"),
        (
            'key_store = {{kind = "pkcs11", module = "{module}", token = "{label}", '
            'pin_env = "TEST_TOKEN_PIN"}}',
            'key_store = "pkcs11"',
            "cohorts[0].key_store",
            "needs a table",
        ),
        (
            'cohort = "tokens"\\nvalue',
            'cohort = "files"\\nvalue',
            "events[2].cohort",
            "pkcs11 cohort",
        ),
        ('value = "NEW_TOKEN_PIN"', "", "events[2].value", "pin_changed needs"),
    ]
    for old, new, field, problem in cases:
        old, new = old.replace("\\n", "\n"), new.replace("\\n", "\n")
        text = SCENARIO.replace(old, new, 1)
        assert text != SCENARIO, old
        path = write(tmp_path, token, text)
        with pytest.raises(ScenarioError) as info:
            load_scenario(path)
        message = str(info.value)
        assert message.startswith(f"{path}: {field}: ") and problem in message, message


NGINX_SCENARIO = """
name = "tokens-nginx"
seed = 1
clock = "real"
thresholds = ["false_accepts == 0", "cohort.tokens.matched == 100%"]

[target]
kind = "nginx"

[[cohorts]]
name = "tokens"
size = 2
key_store = {{kind = "pkcs11", module = "{module}", token = "{label}", pin_env = "TEST_TOKEN_PIN"}}
behaviour = {{ kind = "periodic", interval = 0.4 }}

[[cohorts]]
name = "expired"
size = 1
defect = "expired"

[[phases]]
name = "steady"
duration = "2s"
arrival = "constant"
rate = 8
"""


def test_a_token_cohort_runs_against_nginx(tmp_path: Path, token: SoftToken) -> None:  # noqa: F811
    need_nginx()
    path = write(tmp_path, token, NGINX_SCENARIO)
    reinitialize(token.module)  # the run's process owns the token
    result = subprocess.run(
        [*CLI, "run", str(path), "--reports", str(tmp_path / "r"), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    db = next((tmp_path / "r").glob("tokens-nginx-*/results.sqlite"))
    con = sqlite3.connect(db)
    rows = con.execute(
        "SELECT cohort, outcome, key_store_ms, handshake_ms, new_connection FROM attempts"
    ).fetchall()
    con.close()
    tokens = [r for r in rows if r[0] == "tokens"]
    assert tokens and {o for _, o, *_ in tokens} == {"allowed"}
    # nginx checked the chain of a handshake the token signed: its signing time is recorded.
    assert any(ks > 0 and hs >= ks for _, _, ks, hs, new in tokens if new)
    assert {o for c, o, *_ in rows if c == "expired"} - {"allowed"}
