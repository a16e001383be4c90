"""Revocation in `testbed run`: CRLs of the fleet's own CAs, put in force on the target it runs.

The revoked cohort is listed in the first CRLs; a `revoke` event issues new ones mid-run. The
embedded enforcer gets its devices' issuer's CRL (`[[roots]] crl`, then `control.put_crl`);
nginx gets a CRL for every CA of the path (`ssl_crl`) and is reloaded. Both runs draw the same
devices, so their outcomes can be compared device by device.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import sqlite3
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from rich.console import Console

from devices.provision import Cohort, FleetKeysMissing, fleet_cas, fleet_crls, provision
from testbed.nginx import NGINX
from testbed.runner import RunOutcome, run_scenario
from testbed.scenario import ScenarioError, load_scenario
from tests.testbed.test_run import run_cli

SCENARIO = """
name = "{name}"
seed = 5
clock = "real"
thresholds = ["false_accepts == 0", "cohort.revoked.share:{refused} == 100%"]

[target]
kind = "{kind}"

[[cohorts]]
name = "healthy"
size = 6

[[cohorts]]
name = "revoked"
size = 2
defect = "revoked"
expected = "{refused}"

[[phases]]
name = "steady"
duration = "3s"
arrival = "constant"
rate = 20

[[events]]
at = "1.5s"
action = "revoke"
cohort = "healthy"
share = 0.5
"""
REFUSED = {"embedded": "denied:revoked", "nginx": "http_400"}


def run(tmp_path: Path, kind: str) -> RunOutcome:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{kind}.toml"
    path.write_text(SCENARIO.format(name=kind, kind=kind, refused=REFUSED[kind]))
    quiet = Console(file=io.StringIO())
    return run_scenario(load_scenario(path), tmp_path / "r", console=quiet, progress=False)


def attempts(run_dir: Path) -> list[tuple[str, str, float, str, int, int, str]]:
    """(device, cohort, scheduled, outcome, new_connection, resumed, expected) of each attempt."""
    con = sqlite3.connect(run_dir / "results.sqlite")
    try:
        return list(
            con.execute(
                "SELECT device, cohort, scheduled, outcome, new_connection, resumed, expected"
                " FROM attempts"
            )
        )
    finally:
        con.close()


def revoked_at(run_dir: Path) -> float:
    con = sqlite3.connect(run_dir / "results.sqlite")
    try:
        ((t,),) = con.execute("SELECT t FROM events WHERE kind = 'revoke'").fetchall()
    finally:
        con.close()
    return float(t)


def refused_after_the_event(run_dir: Path, refused: str) -> set[str]:
    """The healthy devices the revoke event revoked; each is refused once it is in force."""
    t = revoked_at(run_dir)
    healthy = [a for a in attempts(run_dir) if a[1] == "healthy"]
    assert healthy and all(a[3] == "allowed" for a in healthy if a[2] < t)
    # The runner expects a device refused once the event has taken effect on the target.
    revoked = [a for a in healthy if a[6] == refused]
    assert revoked and {a[3] for a in revoked} == {refused}
    assert all(a[2] >= t for a in revoked)
    return {a[0] for a in revoked}


def test_an_embedded_run_revokes_through_the_fleet_crl(tmp_path: Path) -> None:
    outcome = run(tmp_path, "embedded")
    assert outcome.exit_code == 0, outcome.thresholds
    run_dir = outcome.run_dir

    # No fingerprint list: the root carries its devices' issuer's CRL.
    config = (run_dir / "enforcer.toml").read_text()
    assert "revoked = []" in config
    assert f'crl = "{run_dir / "crl" / "fleet.pem"}"' in config

    rows = attempts(run_dir)
    assert {a[3] for a in rows if a[1] == "revoked"} == {"denied:revoked"}
    revoked = refused_after_the_event(run_dir, "denied:revoked")
    assert len(revoked) == 3  # half of the six healthy devices
    # Refused on kept-alive connections too: the enforcer decides every request.
    after = [a for a in rows if a[0] in revoked and a[6] == "denied:revoked"]
    assert any(not a[4] for a in after), "no revoked device was refused on a kept-alive connection"

    # The enforcer says why: the serial is in the CRL (not a fingerprint revocation).
    denials = [
        json.loads(line)
        for line in (run_dir / "access.log").read_text().splitlines()
        if '"reason":"revoked"' in line
    ]
    assert {d["certificate"]["common_name"] for d in denials} == revoked | {
        a[0] for a in rows if a[1] == "revoked"
    }
    assert all("CRL" in d["detail"] for d in denials), denials[0]["detail"]

    # The last CRL published lists the revoked cohort and the devices the event revoked.
    crl = x509.load_pem_x509_crl((run_dir / "crl" / "fleet.pem").read_bytes())
    assert len(list(crl)) == 2 + 3
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (.ci/run installs it)")
def test_nginx_refuses_the_same_devices_through_the_same_crls(tmp_path: Path) -> None:
    embedded = run(tmp_path / "e", "embedded")
    nginx = run(tmp_path / "n", "nginx")
    assert nginx.exit_code == 0, nginx.thresholds
    rows = attempts(nginx.run_dir)
    # nginx answers 400 to a certificate that fails verification, a revoked one included.
    assert {a[3] for a in rows if a[1] == "revoked"} == {"http_400"}
    assert (
        f"ssl_crl {nginx.run_dir / 'crl' / 'chain.pem'};"
        in (nginx.run_dir / "nginx" / "nginx.conf").read_text()
    )
    # The same seed revokes the same devices on both targets. nginx refuses them once it has
    # reloaded with the new CRLs (the runner expects it from then on), on new connections: the
    # reload closed the kept-alive ones.
    refused = refused_after_the_event(nginx.run_dir, "http_400")
    assert len(refused) == 3
    assert refused == refused_after_the_event(embedded.run_dir, "denied:revoked")


def test_fleet_crls_cover_every_ca_of_the_path(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    fleet = provision(
        tmp_path / "fleet",
        [Cohort("healthy", 1), Cohort("revoked", 1, "revoked")],
        now,
        intermediates=2,
        p12=False,
        workers=1,
    )
    keys = fleet.root / "ca-keys"
    assert keys.stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in keys.iterdir()) == [
        "intermediate-2.pem",
        "intermediate.pem",
        "root.pem",
    ]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in keys.iterdir())
    healthy, revoked = fleet.devices()
    crls = fleet_crls(
        fleet.root, [int(revoked.serial, 16)], now, next_update=now + dt.timedelta(days=1)
    )
    chain = fleet_cas(fleet.root)
    assert [c.issuer for c in crls] == [ca.certificate.subject for ca in chain]
    for crl, ca in zip(crls, chain, strict=True):
        assert crl.is_signature_valid(ca.certificate.public_key())  # type: ignore[arg-type]
    assert [len(list(c)) for c in crls] == [0, 0, 1]  # only the devices' issuer revokes
    # What nginx does with them (OpenSSL with CRL checks for the whole path).
    bundle = tmp_path / "crls.pem"
    bundle.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in crls))
    said = {}
    for device in (healthy, revoked):
        said[device.defect] = subprocess.run(
            [
                *("openssl", "verify", "-crl_check_all", "-purpose", "sslclient"),
                *("-CAfile", str(fleet.root / "ca" / "root.pem")),
                *("-untrusted", str(fleet.root / "ca" / "upload.pem")),
                *("-CRLfile", str(bundle)),
                str(fleet.root / device.cert_path),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    assert said[None].returncode == 0, said[None].stdout + said[None].stderr
    assert "certificate revoked" in said["revoked"].stdout + said["revoked"].stderr


def test_a_fleet_without_ca_keys_cannot_sign_crls(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    fleet = provision(tmp_path / "fleet", [Cohort("healthy", 1)], now, p12=False, workers=1)
    (fleet.root / "ca-keys" / "intermediate.pem").unlink()
    with pytest.raises(FleetKeysMissing, match=r"intermediate\.pem is missing.*provision"):
        fleet_crls(fleet.root, [], now, next_update=now + dt.timedelta(days=1))


@pytest.mark.parametrize(
    ("kind", "extra", "problem"),
    [
        ("external", "", "a revoked cohort needs a target the run starts"),
        (
            "nginx",
            '[[events]]\nat = "1s"\naction = "set_policy"\nvalue = "certificate"\n',
            "set_policy needs the embedded target",
        ),
    ],
)
def test_what_nginx_and_external_targets_cannot_follow(
    tmp_path: Path, kind: str, extra: str, problem: str
) -> None:
    text = SCENARIO.format(name=kind, kind=kind, refused="http_400")
    if kind == "external":
        ca = tmp_path / "ca.pem"
        ca.write_text("")
        text = text.replace(
            f'kind = "{kind}"', f'kind = "{kind}"\nurl = "https://127.0.0.1:1"\nca = "{ca}"'
        )
        text = text[: text.index("[[events]]")]  # events need a target the run starts
    path = tmp_path / "s.toml"
    path.write_text(text + extra)
    with pytest.raises(ScenarioError, match=problem):
        load_scenario(path)


def test_nginx_takes_a_revoked_cohort_and_revoke_events(tmp_path: Path) -> None:
    path = tmp_path / "nginx.toml"
    path.write_text(SCENARIO.format(name="nginx", kind="nginx", refused="http_400"))
    scenario = load_scenario(path)
    assert [e.action for e in scenario.events] == ["revoke"]


def test_crls_outlive_a_virtual_run_and_its_clock_advances(tmp_path: Path) -> None:
    # A CRL past its nextUpdate refuses every device (revocation_unknown): the run's CRLs must
    # stay current through virtual time and the enforcer clock's jumps.
    path = tmp_path / "virtual.toml"
    path.write_text(
        SCENARIO.format(name="virtual", kind="embedded", refused="denied:revoked")
        .replace('clock = "real"', 'clock = "virtual"')
        .replace('duration = "3s"', 'duration = "3h"')
        .replace('arrival = "constant"\nrate = 20', 'arrival = "active"\ndevices = 8')
        .replace('at = "1.5s"', 'at = "1h"')
        + '\n[[events]]\nat = "2h"\naction = "advance_clock"\nvalue = "720h"\n'
    )
    quiet = Console(file=io.StringIO())
    outcome = run_scenario(load_scenario(path), tmp_path / "r", console=quiet, progress=False)
    assert outcome.exit_code == 0, outcome.thresholds
    rows = attempts(outcome.run_dir)
    assert {a[3] for a in rows} == {"allowed", "denied:revoked"}
    assert len(refused_after_the_event(outcome.run_dir, "denied:revoked")) == 3
    # Healthy devices are still admitted after the clock moved 30 days on.
    assert any(a[3] == "allowed" and a[2] > 2 * 3600 for a in rows)


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (.ci/run installs it)")
def test_load_against_nginx_refuses_a_fleets_revoked_devices(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet"
    provision(
        fleet,
        [Cohort("healthy", 4), Cohort("revoked", 2, "revoked")],
        dt.datetime.now(dt.UTC),
        p12=False,
        workers=1,
    )
    result = run_cli(
        *("load", "--fleet", str(fleet), "--reports", str(tmp_path / "r"), "--no-progress"),
        *("--target", "nginx", "--rate", "10", "--duration", "2s"),
    )
    run_dir = next((tmp_path / "r").glob("load-*"))
    outcomes = {(a[1], a[3]) for a in attempts(run_dir)}
    assert outcomes == {("healthy", "allowed"), ("revoked", "http_400")}, result.stderr


def test_a_fleet_without_ca_keys_is_revoked_by_fingerprint(tmp_path: Path) -> None:
    # A fleet provisioned before CA keys were kept (`testbed load --fleet OLD`) has no CRL:
    # the enforcer's configuration lists its revoked devices' fingerprints instead.
    import shutil

    from enforcer.config import load_config
    from testbed.pkis import open_fleet
    from testbed.runner import write_enforcer_config

    now = dt.datetime.now(dt.UTC)
    folder = tmp_path / "fleet"
    provision(folder, [Cohort("ok", 1), Cohort("gone", 1, "revoked")], now, p12=False, workers=1)
    shutil.rmtree(folder / "ca-keys")
    fleet, first = open_fleet(folder)
    path = tmp_path / "s.toml"
    path.write_text(SCENARIO.format(name="old", kind="embedded", refused="denied:revoked"))
    config = load_config(
        write_enforcer_config(load_scenario(path), tmp_path / "run", fleet, "http://x.test", now)
    )
    assert config.revoked == {first["gone"].sha256}
    assert all(r.crl_file is None for r in config.roots)
