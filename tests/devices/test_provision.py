"""Fleet provisioning: layout, inventory, each defect for real, PKCS#12, the CLI, and curl."""

from __future__ import annotations

import datetime as dt
import http.server
import os
import shutil
import sqlite3
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from devices import provision as prov
from devices.pki import generate_key, issue_ca, issue_leaf, leaf_extensions, write_pem
from devices.provision import DEFECTS, Cohort, Device, Fleet, plan_cohorts, provision
from enforcer.chain import HostTrust, validate_chain
from testbed.cli import main

# Real time, not a fixed date: the curl test hands these certificates to OpenSSL, which checks
# them against the wall clock.
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
DAY = dt.timedelta(days=1)
TESTBED = [sys.executable, "-m", "testbed.cli"]
CURL = shutil.which("curl")


def certs(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def cn_of(cert: x509.Certificate | x509.CertificateSigningRequest) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def eku_of(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    """20 devices: 4 healthy, then 2 of every defect, with PKCS#12 files made on demand."""
    out = tmp_path_factory.mktemp("fleet") / "fleet"
    cohorts = plan_cohorts(20, [Cohort(f"c-{d}", 2, d) for d in DEFECTS])
    fleet = provision(out, cohorts, NOW, workers=1)
    # The default makes no PKCS#12: every PKCS#12 test below checks export_p12's files.
    assert not list(out.glob("devices/*/device.p12"))
    assert len(prov.export_p12(out)) == 20
    return fleet


@pytest.fixture(scope="module")
def devices(fleet: Fleet) -> dict[str, Device]:
    return {d.id: d for d in fleet.devices()}


def of_defect(devices: dict[str, Device], defect: str | None) -> list[Device]:
    found = [d for d in devices.values() if d.defect == defect]
    assert found, defect
    return found


def test_layout(fleet: Fleet) -> None:
    ca = fleet.root / "ca"
    assert sorted(p.name for p in ca.iterdir()) == [
        "foreign-root.pem",
        "intermediate.pem",
        "known-intermediates.pem",
        "root.pem",
        "upload.pem",
    ]
    assert certs(ca / "upload.pem") == [*certs(ca / "intermediate.pem"), *certs(ca / "root.pem")]
    folders = sorted(p.name for p in (fleet.root / "devices").iterdir())
    assert folders == [f"device-{n:03d}" for n in range(1, 21)]
    for folder in (fleet.root / "devices").iterdir():
        assert sorted(p.name for p in folder.iterdir()) == ["cert.pem", "device.p12", "key.pem"]
        assert (folder / "key.pem").stat().st_mode & 0o777 == 0o600
        assert (folder / "device.p12").stat().st_mode & 0o777 == 0o600
    # The work folder was renamed into place: nothing hidden is left beside it.
    assert [p.name for p in fleet.root.parent.iterdir()] == ["fleet"]


def test_inventory_rows_match_the_files(fleet: Fleet, devices: dict[str, Device]) -> None:
    assert len(devices) == 20
    for d in devices.values():
        leaf = certs(fleet.root / d.cert_path)[0]
        key = serialization.load_pem_private_key((fleet.root / d.key_path).read_bytes(), None)
        assert key.public_key() == leaf.public_key()
        assert d.sha256 == leaf.fingerprint(hashes.SHA256()).hex()
        assert d.serial == format(leaf.serial_number, "x")
        assert d.common_name == cn_of(leaf)
        assert d.not_before == leaf.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert d.not_after == leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert (d.key_store, d.key_type) == ("software", "ec-p256")
        assert d.p12_path == f"devices/{d.id}/device.p12"
        assert d.expected == prov.expected_outcome(d.defect)
    assert [d.cohort for d in devices.values()][:4] == ["healthy"] * 4
    con = sqlite3.connect(fleet.inventory)
    facts = dict(con.execute("SELECT key, value FROM fleet").fetchall())
    con.close()
    root = certs(fleet.root / "ca" / "root.pem")[0]
    assert facts["root_sha256"] == root.fingerprint(hashes.SHA256()).hex()
    assert facts["size"] == "20" and facts["p12_password"] == "testbed"


def test_healthy_and_revoked_devices_hold_a_good_chain(
    fleet: Fleet, devices: dict[str, Device]
) -> None:
    root = certs(fleet.root / "ca" / "root.pem")[0]
    inter = certs(fleet.root / "ca" / "intermediate.pem")[0]
    for d in [*of_defect(devices, None), *of_defect(devices, "revoked")]:
        leaf, *chain = certs(fleet.root / d.cert_path)
        assert chain == [inter]
        leaf.verify_directly_issued_by(inter)
        inter.verify_directly_issued_by(root)
        assert leaf.not_valid_before_utc < NOW < leaf.not_valid_after_utc
        assert eku_of(leaf) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert d.common_name == d.id


def test_each_defect_is_really_in_the_certificate(fleet: Fleet, devices: dict[str, Device]) -> None:
    ca = fleet.root / "ca"
    root, inter = certs(ca / "root.pem")[0], certs(ca / "intermediate.pem")[0]
    known = certs(ca / "known-intermediates.pem")
    foreign_root = certs(ca / "foreign-root.pem")[0]

    def chain(d: Device) -> list[x509.Certificate]:
        return certs(fleet.root / d.cert_path)

    for d in of_defect(devices, "expired"):
        assert chain(d)[0].not_valid_after_utc < NOW
    for d in of_defect(devices, "not-yet-valid"):
        assert chain(d)[0].not_valid_before_utc > NOW
    for d in of_defect(devices, "foreign-ca"):
        leaf, foreign = chain(d)
        leaf.verify_directly_issued_by(foreign)
        foreign.verify_directly_issued_by(foreign_root)
        assert foreign_root != root and leaf.issuer != inter.subject
    for d in of_defect(devices, "wrong-cn"):
        leaf, sent = chain(d)
        leaf.verify_directly_issued_by(inter)
        assert sent == inter and d.common_name.startswith("rogue-") and cn_of(leaf) != d.id
    for d in of_defect(devices, "missing-intermediate"):
        (leaf,) = chain(d)  # the leaf alone
        assert len(known) == 1 and known[0] not in certs(ca / "upload.pem")
        leaf.verify_directly_issued_by(known[0])
        known[0].verify_directly_issued_by(root)
    for d in of_defect(devices, "wrong-eku"):
        assert eku_of(chain(d)[0]) == [ExtendedKeyUsageOID.SERVER_AUTH]
    for d in of_defect(devices, "self-signed"):
        (leaf,) = chain(d)
        assert leaf.issuer == leaf.subject
        leaf.verify_directly_issued_by(leaf)
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_expected_outcome_per_cohort(devices: dict[str, Device]) -> None:
    by_cohort = {(d.cohort, d.defect, d.expected) for d in devices.values()}
    assert by_cohort == {
        ("healthy", None, "allowed"),
        ("c-expired", "expired", "denied:certificate_expired"),
        ("c-not-yet-valid", "not-yet-valid", "denied:certificate_not_yet_valid"),
        ("c-foreign-ca", "foreign-ca", "denied:untrusted_issuer"),
        ("c-wrong-cn", "wrong-cn", "allowed"),
        ("c-missing-intermediate", "missing-intermediate", "denied:missing_intermediate"),
        ("c-wrong-eku", "wrong-eku", "denied:invalid_chain"),
        ("c-self-signed", "self-signed", "denied:untrusted_issuer"),
        ("c-revoked", "revoked", "denied:revoked"),
    }
    assert prov.expected_outcome("wrong-cn", "common_name") == "denied:policy_denied"
    assert prov.expected_outcome(None, "common_name") == "allowed"


def test_expected_outcomes_agree_with_the_enforcers_chain_validation(
    fleet: Fleet, devices: dict[str, Device]
) -> None:
    """Upload upload.pem for the host, know known-intermediates.pem, revoke the revoked rows."""
    ca = fleet.root / "ca"
    root, *uploaded = reversed(certs(ca / "upload.pem"))
    trust = HostTrust.build([root], uploaded)
    known = [*uploaded, *certs(ca / "known-intermediates.pem")]
    revoked = frozenset(d.sha256 for d in devices.values() if d.defect == "revoked")
    for d in devices.values():
        leaf, *sent = certs(fleet.root / d.cert_path)
        result = validate_chain(leaf, sent, trust, known, revoked, NOW)
        outcome = "allowed" if result.valid else f"denied:{result.reason}"
        assert outcome == d.expected, (d.id, result.detail)


def test_p12_opens_with_the_password_only(fleet: Fleet, devices: dict[str, Device]) -> None:
    for d in [devices["device-001"], *of_defect(devices, "missing-intermediate")]:
        data = (fleet.root / str(d.p12_path)).read_bytes()
        key, cert, extra = pkcs12.load_key_and_certificates(data, b"testbed")
        leaf, *chain = certs(fleet.root / d.cert_path)
        assert cert == leaf and extra == chain
        assert key is not None and key.public_key() == leaf.public_key()
        with pytest.raises(ValueError):
            pkcs12.load_key_and_certificates(data, None)
        with pytest.raises(ValueError):
            pkcs12.load_key_and_certificates(data, b"wrong")


@pytest.mark.parametrize("count", [0, 3])
def test_intermediates(tmp_path: Path, count: int) -> None:
    fleet = provision(tmp_path / "f", [Cohort("healthy", 2)], NOW, intermediates=count, p12=False)
    ca = fleet.root / "ca"
    names = ["intermediate.pem", "intermediate-2.pem", "intermediate-3.pem"][:count]
    assert sorted(p.name for p in ca.iterdir()) == sorted(["root.pem", "upload.pem", *names])
    chain = [certs(ca / n)[0] for n in reversed(names)]  # deepest first
    root = certs(ca / "root.pem")[0]
    assert certs(ca / "upload.pem") == [*chain, root]
    leaf, *sent = certs(fleet.root / "devices" / "device-001" / "cert.pem")
    assert sent == chain
    for cert, issuer in zip([leaf, *chain], [*chain, root], strict=True):
        cert.verify_directly_issued_by(issuer)
    depth = [c.extensions.get_extension_for_class(x509.BasicConstraints).value for c in chain]
    assert [b.path_length for b in depth] == list(range(count))
    result = validate_chain(leaf, sent, HostTrust.build([root], chain), [], frozenset(), NOW)
    assert result.valid, result.detail


@pytest.mark.parametrize(
    ("key_type", "kind"),
    [
        ("ec-p384", ec.EllipticCurvePrivateKey),
        ("ed25519", ed25519.Ed25519PrivateKey),
        ("rsa-2048", rsa.RSAPrivateKey),
    ],
)
def test_key_types(tmp_path: Path, key_type: str, kind: type) -> None:
    cohorts = [Cohort("healthy", 1), Cohort("odd", 1, "self-signed", key_type="ec-p256")]
    fleet = provision(tmp_path / "f", cohorts, NOW, key_type=key_type, p12=True, p12_kdf_rounds=1)
    first, second = fleet.devices()
    assert (first.key_type, second.key_type) == (key_type, "ec-p256")
    key = serialization.load_pem_private_key((fleet.root / first.key_path).read_bytes(), None)
    assert isinstance(key, kind)
    p12 = pkcs12.load_key_and_certificates(
        (fleet.root / str(first.p12_path)).read_bytes(), b"testbed"
    )
    assert isinstance(p12[0], kind)


def test_a_pool_of_workers_issues_the_same_fleet(tmp_path: Path) -> None:
    cohorts = plan_cohorts(30, [Cohort("old", 5, "expired"), Cohort("gone", 5, "revoked")])
    seen: list[int] = []
    fleet = provision(tmp_path / "f", cohorts, NOW, workers=2, p12=False, on_progress=seen.append)
    rows = fleet.devices()
    assert [d.id for d in rows] == [f"device-{n:03d}" for n in range(1, 31)]
    assert sum(seen) == 30 and len(seen) > 2
    assert len({d.sha256 for d in rows}) == 30
    assert [d.cohort for d in rows] == ["healthy"] * 20 + ["old"] * 5 + ["gone"] * 5
    assert all((fleet.root / d.cert_path).is_file() for d in rows)


def test_a_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    real = prov._Issuer.write

    def flaky(self: prov._Issuer, *args: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 5:
            raise OSError(28, "No space left on device")
        return real(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(prov._Issuer, "write", flaky)
    with pytest.raises(OSError, match="No space"):
        provision(tmp_path / "f", [Cohort("healthy", 10)], NOW, p12=False)
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_a_fleet_and_nothing_else(tmp_path: Path) -> None:
    out = tmp_path / "f"
    first = provision(out, [Cohort("healthy", 2)], NOW, p12=False)
    with pytest.raises(ValueError, match="not empty"):
        provision(out, [Cohort("healthy", 3)], NOW, p12=False)
    before = first.devices()
    second = provision(out, [Cohort("healthy", 3)], NOW, p12=False, force=True)
    assert len(second.devices()) == 3 and second.devices()[0].sha256 != before[0].sha256
    assert [p.name for p in tmp_path.iterdir()] == ["f"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds no fleet"):
        provision(other, [Cohort("healthy", 1)], NOW, force=True)
    assert (other / "precious.txt").read_text() == "keep me"


def test_cohort_specs() -> None:
    assert prov.parse_cohort("old=5:expired") == Cohort("old", 5, "expired")
    assert prov.parse_cohort("more=7") == Cohort("more", 7)
    for spec, message in [
        ("old", "NAME=COUNT"),
        ("old=x:expired", "not a whole number"),
        ("old=5:rusty", "unknown defect 'rusty'"),
        ("old=5:", "empty DEFECT"),
        ("=5", "cohort name"),
    ]:
        with pytest.raises(ValueError, match=message):
            prov.parse_cohort(spec)
    assert plan_cohorts(3, [Cohort("a", 1, "expired")]) == [
        Cohort("healthy", 2),
        Cohort("a", 1, "expired"),
    ]
    assert plan_cohorts(1, [Cohort("a", 1)]) == [Cohort("a", 1)]
    with pytest.raises(ValueError, match="hold 4 devices, more than the size 3"):
        plan_cohorts(3, [Cohort("a", 2), Cohort("b", 2)])
    with pytest.raises(ValueError, match="more than once"):
        plan_cohorts(9, [Cohort("a", 2), Cohort("a", 2)])
    with pytest.raises(ValueError, match="rest of the fleet"):
        plan_cohorts(9, [Cohort("healthy", 2)])


def managed_ca() -> Callable[[str], str]:
    """A stand-in for the enforcer's managed CA: signs whatever key a CSR carries."""
    ca = issue_ca("managed CA", NOW)

    def issue(csr_pem: str) -> str:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        assert csr.is_signature_valid
        cert = (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(ca.certificate.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY)
            .not_valid_after(NOW + DAY)
            .sign(ca.key, hashes.SHA256())
        )
        return (cert.public_bytes(serialization.Encoding.PEM) + ca.cert_pem()).decode()

    return issue


def test_onboarding_keeps_the_key_local(tmp_path: Path) -> None:
    device = tmp_path / "device-042"
    cert = prov.onboard(device, managed_ca(), key_type="ed25519")
    key = serialization.load_pem_private_key((device / "key.pem").read_bytes(), None)
    assert isinstance(key, ed25519.Ed25519PrivateKey) and cert.public_key() == key.public_key()
    assert (device / "key.pem").stat().st_mode & 0o777 == 0o600
    assert cn_of(cert) == "device-042" and len(certs(device / "cert.pem")) == 2
    # Again with the key already there: it is reused, not replaced.
    key_pem = (device / "key.pem").read_bytes()
    prov.onboard(device, managed_ca(), common_name="renamed")
    assert (device / "key.pem").read_bytes() == key_pem
    assert cn_of(certs(device / "cert.pem")[0]) == "renamed"


def test_onboarding_refuses_a_certificate_for_another_key(tmp_path: Path) -> None:
    ca = issue_ca("lying CA", NOW)

    def lying(csr_pem: str) -> str:
        other = issue_leaf("device-1", ca, not_before=NOW - DAY, not_after=NOW + DAY)
        return other.cert_pem().decode()

    with pytest.raises(ValueError, match="another key"):
        prov.onboard(tmp_path / "device-1", lying)
    assert not (tmp_path / "device-1" / "cert.pem").exists()
    csr = prov.csr_for(generate_key(), "device-7")
    assert csr.is_signature_valid and cn_of(csr) == "device-7"


def provision_args(out: Path, *extra: str) -> list[str]:
    return ["fleet", "provision", "--size", "5", "--out", str(out), "--no-p12", *extra]


@pytest.mark.parametrize(
    ("extra", "option", "problem"),
    [
        (["--cohort", "old=6:expired"], "--cohort", "more than the size 5"),
        (["--cohort", "old=1:rusty"], "--cohort", "unknown defect 'rusty'"),
        (["--cohort", "old=1:[bold]x"], "--cohort", "unknown defect '[bold]x'"),
        (["--cohort", "old:expired"], "--cohort", "NAME=COUNT"),
        (["--cohort", "old=many"], "--cohort", "not a whole number"),
        (["--cohort", "a=1", "--cohort", "a=1"], "--cohort", "more than once"),
        (["--size", "0"], "--size", "expected 1 or more"),
        (["--intermediates", "9"], "--intermediates", "expected 0 to 6"),
        (["--workers", "0"], "--workers", "expected 1 or more"),
        (["--p12-password", "", "--cohort", "a=1"], "--p12-password", "must not be empty"),
        (["--cn-prefix", "dev ice"], "--cn-prefix", "expected letters"),
        (["--now", "yesterday"], "--now", "not an ISO 8601 time"),
        (["--now", "2026-01-01T00:00:00"], "--now", "no time zone"),
    ],
)
def test_cli_bad_input_exits_2_naming_the_option(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    option: str,
    problem: str,
) -> None:
    out = tmp_path / "f"
    args = provision_args(out, *extra)
    if "--p12-password" in extra:
        args.remove("--no-p12")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert option in err and problem in err, err
    assert not out.exists()


def test_cli_refuses_a_non_empty_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "f"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(provision_args(out)) == 2
    assert "--out" in (err := capsys.readouterr().err) and "not empty" in err and "--force" in err
    assert main(provision_args(out, "--force")) == 2
    assert "holds no fleet" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(
    ("extra", "option"), [(["--key-type", "dsa"], "--key-type"), (["--size", "x"], "--size")]
)
def test_cli_argparse_errors_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], option: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(provision_args(tmp_path / "f", *extra))
    assert exc.value.code == 2 and option in capsys.readouterr().err


def test_cli_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "fleet"
    args = [
        *TESTBED,
        "fleet",
        "provision",
        "--size",
        "12",
        "--out",
        str(out),
        "--cohort",
        "old=2:expired",
        "--cohort",
        "rogue=1:wrong-cn",
        "--cohort",
        "lost=1:missing-intermediate",
        "--workers",
        "2",
        "--p12",
        "--p12-kdf-rounds",
        "1",
        "--intermediates",
        "2",
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for word in ("healthy", "old", "rogue", "lost", "denied:missing_intermediate", "12 devices"):
        assert word in done.stdout
    rows = prov.read_inventory(out)
    assert len(rows) == 12 and {d.cohort for d in rows} == {"healthy", "old", "rogue", "lost"}
    assert all((out / str(d.p12_path)).is_file() for d in rows)
    assert (out / "ca" / "intermediate-2.pem").is_file()
    assert (out / "ca" / "known-intermediates.pem").is_file()
    again = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--out" in again.stderr
    forced = subprocess.run([*args, "--force"], capture_output=True, text=True, timeout=120)
    assert forced.returncode == 0, forced.stderr
    assert {d.sha256 for d in prov.read_inventory(out)}.isdisjoint(d.sha256 for d in rows)


def test_default_makes_no_p12_and_export_makes_one_on_demand(tmp_path: Path) -> None:
    fleet = provision(tmp_path / "f", [Cohort("healthy", 3)], NOW, workers=1)
    assert all(d.p12_path is None for d in fleet.devices())
    assert not list(fleet.root.glob("devices/*/device.p12"))
    (done,) = prov.export_p12(fleet.root, ["device-002"], kdf_rounds=1)
    path = fleet.root / "devices" / "device-002" / "device.p12"
    assert done.p12_path == "devices/device-002/device.p12" and path.is_file()
    assert path.stat().st_mode & 0o777 == 0o600
    assert [d.p12_path for d in fleet.devices()] == [None, done.p12_path, None]
    key, cert, _ = pkcs12.load_key_and_certificates(path.read_bytes(), b"testbed")
    assert cert == certs(fleet.root / done.cert_path)[0]
    assert key is not None and key.public_key() == cert.public_key()
    for wrong in (b"wrong", None):
        with pytest.raises(ValueError):
            pkcs12.load_key_and_certificates(path.read_bytes(), wrong)
    # Exported again with another password: replaced, and the new password recorded.
    prov.export_p12(fleet.root, ["device-002"], password="other", kdf_rounds=1)
    pkcs12.load_key_and_certificates(path.read_bytes(), b"other")
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(prov.FleetError, match="no device with id 'device-009'"):
        prov.export_p12(fleet.root, ["device-009"])


def test_cli_export_p12(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "f"
    assert main(["fleet", "provision", "--size", "3", "--out", str(out)]) == 0
    assert "export-p12" in capsys.readouterr().out
    export = ["fleet", "export-p12", "--fleet", str(out), "--kdf-rounds", "1"]
    assert main([*export, "--id", "device-003"]) == 0
    rows = prov.read_inventory(out)
    assert [d.p12_path for d in rows] == [None, None, "devices/device-003/device.p12"]
    pkcs12.load_key_and_certificates((out / str(rows[2].p12_path)).read_bytes(), b"testbed")
    capsys.readouterr()
    assert main([*export, "--id", "nope"]) == 2
    assert "inventory.sqlite" in (err := capsys.readouterr().err) and "'nope'" in err
    assert main(["fleet", "export-p12", "--fleet", str(tmp_path)]) == 2
    assert "--fleet" in (err := capsys.readouterr().err) and "not a fleet" in err
    assert main([*export, "--kdf-rounds", "0"]) == 2
    assert "--kdf-rounds" in capsys.readouterr().err
    bare = tmp_path / "bare"
    assert main(["fleet", "provision", "--size", "1", "--out", str(bare), "--no-p12"]) == 0
    assert main(["fleet", "export-p12", "--fleet", str(bare)]) == 2
    assert "p12_password" in capsys.readouterr().err
    assert main(["fleet", "export-p12", "--fleet", str(bare), "--password", "pw"]) == 0
    assert (bare / "devices" / "device-001" / "device.p12").stat().st_mode & 0o777 == 0o600


class _Echo(http.server.BaseHTTPRequestHandler):
    """Answers 200 with the client certificate's subject CN."""

    def do_GET(self) -> None:
        peer = self.connection.getpeercert()  # type: ignore[attr-defined]
        cn = dict(rdn[0] for rdn in peer["subject"])["commonName"]
        body = cn.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def tls_server(fleet: Fleet, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A stdlib HTTPS server that requires a client certificate from the fleet's root."""
    server_ca = issue_ca("fleet test server CA", NOW)
    edge = issue_leaf(
        "fleet.test",
        server_ca,
        not_before=NOW - DAY,
        not_after=NOW + DAY,
        client=False,
        dns_names=["fleet.test"],
    )
    write_pem(tmp_path / "server-ca.pem", server_ca.cert_pem())
    write_pem(tmp_path / "server.pem", edge.cert_pem())
    write_pem(tmp_path / "server-key.pem", edge.key_pem(), private=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "server.pem", tmp_path / "server-key.pem")
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(fleet.upload)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    # Handshakes happen in accept(); a refused client is an OSError there, which
    # socketserver drops quietly.
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1], tmp_path / "server-ca.pem"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_a_fleet_p12_works_with_real_curl(
    fleet: Fleet, devices: dict[str, Device], tls_server: tuple[int, Path]
) -> None:
    port, server_ca = tls_server

    def curl(device: Device) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                str(CURL),
                "-sS",
                "--max-time",
                "20",
                "--resolve",
                f"fleet.test:{port}:127.0.0.1",
                "--cacert",
                str(server_ca),
                "--cert",
                f"{fleet.root / str(device.p12_path)}:testbed",
                "--cert-type",
                "P12",
                f"https://fleet.test:{port}/",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )

    ok = curl(devices["device-001"])
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "device-001"
    # The server really checks: a device of the foreign root, or without its intermediate, fails.
    for defect in ("foreign-ca", "missing-intermediate"):
        refused = curl(of_defect(devices, defect)[0])
        assert refused.returncode != 0, (defect, refused.stdout)


def test_bulk_extensions_match_issue_leaf() -> None:
    ca = issue_ca("profile CA", NOW)
    for key_type in ("ec-p256", "rsa-2048"):
        single = issue_leaf(
            "device-1",
            ca,
            not_before=NOW,
            not_after=NOW + DAY,
            key=generate_key(key_type),
        )
        assert list(single.certificate.extensions) == leaf_extensions(ca.key, key_type)


def test_cli_now_and_environment_twins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TESTBED_FLEET_COHORTS", "old=1:expired gone=1:revoked")
    monkeypatch.setenv("TESTBED_FLEET_SIZE", "3")
    out = tmp_path / "f"
    args = ["fleet", "provision", "--out", str(out), "--no-p12", "--now", "2030-01-01T00:00:00Z"]
    assert main(args) == 0
    assert "Provisioned 3 devices" in capsys.readouterr().out
    rows = prov.read_inventory(out)
    assert [(d.cohort, d.not_before) for d in rows] == [
        ("healthy", "2029-12-31T00:00:00Z"),
        ("old", "2029-12-02T00:00:00Z"),
        ("gone", "2029-12-31T00:00:00Z"),
    ]


def test_workers_start_safely_beside_other_threads(tmp_path: Path) -> None:
    """With another thread alive, fork could copy a held lock: the pool uses forkserver."""
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert prov._start_method() == "forkserver"
        fleet = provision(tmp_path / "f", [Cohort("healthy", 4)], NOW, workers=2, p12=False)
    finally:
        stop.set()
        other.join()
    assert len(fleet.devices()) == 4


def _openssl() -> str:
    """The real openssl CLI; skipped without it, except on CI (CI=1), where it fails."""
    found = shutil.which("openssl")
    if found is None:
        message = "missing openssl: .ci/run installs it (apt-get install openssl)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def test_p12_files_use_openssls_defaults_and_openssl_reads_them(tmp_path: Path) -> None:
    """Up front (--p12) and on demand (export-p12): what `openssl pkcs12 -export` would write."""
    openssl = _openssl()
    made = provision(tmp_path / "up", [Cohort("healthy", 2)], NOW, workers=1, p12=True)
    later = provision(tmp_path / "later", [Cohort("healthy", 2)], NOW, workers=1)
    prov.export_p12(later.root, ["device-001"])
    for fleet in (made, later):
        device = fleet.devices()[0]
        path = fleet.root / str(device.p12_path)
        assert path.stat().st_mode & 0o777 == 0o600
        assert (fleet.root / device.key_path).stat().st_mode & 0o777 == 0o600
        info = subprocess.run(
            [openssl, "pkcs12", "-info", "-noout", "-in", str(path), "-passin", "pass:testbed"],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
        # OpenSSL 3's `pkcs12 -export` defaults, as `openssl pkcs12 -info` prints them.
        assert "MAC: sha256, Iteration 2048" in info, info
        bags = "PBES2, PBKDF2, AES-256-CBC, Iteration 2048, PRF hmacWithSHA256"
        assert info.count(bags) == 2, info  # the certificates' bag and the key's
        pem = subprocess.run(
            [openssl, "pkcs12", "-in", str(path), "-passin", "pass:testbed", "-nodes"],
            capture_output=True,
            check=True,
        ).stdout
        key = serialization.load_pem_private_key(pem, None)
        assert key.public_key() == certs(fleet.root / device.cert_path)[0].public_key()
        assert certs(fleet.root / device.cert_path)[0] in x509.load_pem_x509_certificates(pem)
        wrong = subprocess.run(
            [openssl, "pkcs12", "-in", str(path), "-passin", "pass:wrong", "-nodes"],
            capture_output=True,
        )
        assert wrong.returncode != 0 and b"PRIVATE KEY" not in wrong.stdout
