"""A provisioned fleet against the enforcer and against nginx: every cohort gets its outcome."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import pytest
import trio
from cryptography import x509

from devices.client import ClientOptions, DeviceClient, Target
from devices.keystore import SoftwareKeyStore
from devices.provision import DEFECTS, Cohort, Fleet, onboard, provision
from enforcer.config import load_config
from enforcer.snapshot import RootCertificate
from testbed.demo import AUTH_HOST, IOT_HOST
from testbed.nginx import NGINX, start_nginx, stop_nginx
from tests.conftest import Served
from tests.wire import admin_call


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    cohorts = [Cohort("healthy", 2, None)] + [Cohort(d, 1, d) for d in DEFECTS]
    # A device key outside the enforcer's key profile (access-flow V1): expected unsupported_key.
    cohorts.append(Cohort("ed25519", 1, None, key_type="ed25519"))
    return provision(
        tmp_path_factory.mktemp("fleet") / "fleet",
        cohorts,
        dt.datetime.now(dt.UTC),
        p12=False,
        workers=1,
    )


def certs(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


async def outcomes(fleet: Fleet, port: int, ca: Path) -> dict[str, tuple[str, str]]:
    """Each device's (expected, observed) outcome."""
    seen = {}
    for d in fleet.devices():
        target = Target("127.0.0.1", port, AUTH_HOST, ca)
        store = SoftwareKeyStore(fleet.root / d.cert_path, fleet.root / d.key_path)
        client = DeviceClient(target, store, ClientOptions(timeout=10))
        try:
            seen[d.id] = (d.cohort, (await client.request("/")).outcome)
        finally:
            await client.aclose()
    return seen


async def test_every_cohort_gets_its_outcome_from_the_enforcer(
    fleet: Fleet, serve_config, demo
) -> None:
    config = load_config(demo.config)
    bundle = certs(fleet.upload)
    root = RootCertificate("fleet", "fleet root", bundle[-1], tuple(bundle[:-1]), (AUTH_HOST,))
    # Intermediates the enforcer knows of (uploaded for another hostname) but that devices on
    # this hostname must send: what makes `missing_intermediate` distinguishable.
    known = fleet.root / "ca" / "known-intermediates.pem"
    roots = [root, RootCertificate("known", "known", bundle[-1], tuple(certs(known)), (IOT_HOST,))]
    revoked = frozenset(d.sha256 for d in fleet.devices() if d.defect == "revoked")
    served: Served = await serve_config(
        dataclasses.replace(config, roots=tuple(roots), revoked=revoked)
    )
    expected = {d.id: d.expected for d in fleet.devices()}
    observed = await outcomes(fleet, served.port, served.layout.edge_ca)
    assert {i: o for i, (_, o) in observed.items()} == expected
    assert set(expected.values()) >= {
        "allowed",
        "denied:certificate_expired",
        "denied:revoked",
        "denied:missing_intermediate",
        "denied:invalid_chain",
        "denied:unsupported_key",
    }


def nginx_expected(defect: str | None) -> str:
    """What nginx (`ssl_verify_client optional`, no CRL, no CN rule) answers each defect."""
    if defect in (None, "wrong-cn", "revoked"):
        return "allowed"  # nginx has no Common Name policy here and no CRL: it cannot know
    return "http_400"  # nginx answers 400 to a certificate it cannot verify


@pytest.mark.skipif(NGINX is None, reason="nginx is installed by .ci/run")
async def test_every_cohort_against_nginx(fleet: Fleet, demo, tmp_path) -> None:
    proc, port = await start_nginx(
        tmp_path / "nginx",
        cert=demo.root / "edge" / "cert.pem",
        key=demo.root / "edge" / "key.pem",
        client_ca=fleet.upload,
        server_name=AUTH_HOST,
    )
    try:
        observed = await outcomes(fleet, port, demo.edge_ca)
    finally:
        await stop_nginx(proc)
    defects = {d.id: d.defect for d in fleet.devices()}
    assert {i: o for i, (_, o) in observed.items()} == {
        i: nginx_expected(defects[i]) for i in defects
    }


async def test_onboarding_through_the_managed_ca(serve_config, tmp_path) -> None:
    served: Served = await serve_config(admin=True)

    async def issue(csr_pem: str) -> str:
        code, env = await admin_call(
            served.admin_port,
            "POST",
            "/client/v4/zones/demo/client_certificates",
            {"csr": csr_pem, "validity_days": 30},
        )
        assert code == 201, env
        return str(env["result"]["certificate"])

    device_dir = tmp_path / "sensor-9"
    # onboard() is synchronous (a device's provisioning step): run it in a thread and let it
    # call the admin API back in this trio loop.
    leaf = await trio.to_thread.run_sync(
        onboard, device_dir, lambda csr: trio.from_thread.run(issue, csr)
    )
    assert leaf.subject.rfc4514_string() == "CN=sensor-9"
    assert (device_dir / "key.pem").stat().st_mode & 0o077 == 0  # the key never left the device
    target = Target("127.0.0.1", served.port, AUTH_HOST, served.layout.edge_ca)
    client = DeviceClient(target, SoftwareKeyStore(device_dir / "cert.pem", device_dir / "key.pem"))
    try:
        assert (await client.request("/")).outcome == "allowed"
    finally:
        await client.aclose()
