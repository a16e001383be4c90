"""PKCS#11 key stores on a real SoftHSM2 token: key generation, CSR and TLS signatures on the token,
a full mTLS handshake to a served enforcer, and the token's errors under their CKR_ names."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import shutil
import subprocess
from pathlib import Path

import pkcs11
import pkcs11.exceptions as p11e
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from devices.client import DeviceClient, Target
from devices.keystore import KeyStoreError
from devices.pkcs11 import (
    MAX_PIN_FAILURES,
    Pkcs11Config,
    Pkcs11KeyStore,
    TokenError,
    ckr_name,
    generate_on_token,
    reinitialize,
    store_certificate,
    token_session,
)
from devices.pki import issue_ca
from devices.provision import read_inventory
from testbed.cli import main
from testbed.demo import AUTH_HOST
from testbed.nginx import NGINX, start_nginx, stop_nginx
from tests.conftest import Served
from tests.wire import admin_call

MODULES = (
    Path("/usr/lib/softhsm/libsofthsm2.so"),
    Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"),
)
PIN = "246810"
SO_PIN = "13579111"
LABEL = "devices"


def softhsm_module() -> Path:
    """The SoftHSM2 PKCS#11 module; skip without it, except on CI, where it must be there."""
    found = next((m for m in MODULES if m.exists()), None)
    if found is None or shutil.which("softhsm2-util") is None:
        if os.environ.get("CI"):
            pytest.fail("SoftHSM2 is not installed (apt-get install softhsm2; see .ci/run)")
        pytest.skip("SoftHSM2 is not installed (apt-get install softhsm2)")
    return found


def need_nginx() -> None:
    """Skip without nginx, except on CI, where it must be there."""
    if NGINX is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed (see .ci/run)")
        pytest.skip("nginx is installed by .ci/run")


@dataclasses.dataclass
class SoftToken:
    """A SoftHSM2 token initialised for one test."""

    module: Path
    tokens: Path  # the token directory (SoftHSM2's object store)

    def config(self, key_label: str = "device", **changes: object) -> Pkcs11Config:
        base = Pkcs11Config(self.module, token=LABEL, pin_env="TEST_TOKEN_PIN", key_label=key_label)
        return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SoftToken:
    """A fresh SoftHSM2 token (its own SOFTHSM2_CONF), the user PIN in $TEST_TOKEN_PIN."""
    module = softhsm_module()
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n")
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    # softhsm2-util takes the PINs as arguments: these are throwaway test PINs; the key store
    # itself reads the user PIN only from the environment or a file.
    subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            LABEL,
            "--pin",
            PIN,
            "--so-pin",
            SO_PIN,
        ],
        check=True,
        capture_output=True,
    )
    monkeypatch.setenv("TEST_TOKEN_PIN", PIN)
    reinitialize(module)  # the module re-reads SOFTHSM2_CONF at C_Initialize
    yield SoftToken(module, tokens)
    reinitialize(module)


def test_key_generated_on_the_token_is_sensitive_and_the_csr_signed_there(
    token: SoftToken,
) -> None:
    csr = generate_on_token(token.config(), "ec-p256", "sensor-1")
    assert csr.is_signature_valid
    assert isinstance(csr.public_key(), ec.EllipticCurvePublicKey)
    session = token_session(token.config()).session()
    key = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, label="device")
    assert key[pkcs11.Attribute.SENSITIVE] and not key[pkcs11.Attribute.EXTRACTABLE]
    with pytest.raises(p11e.AttributeSensitive):
        key[pkcs11.Attribute.VALUE]  # the private value cannot be read out
    rsa_csr = generate_on_token(token.config("rsa-device"), "rsa-2048", "sensor-2")
    assert rsa_csr.is_signature_valid and isinstance(rsa_csr.public_key(), rsa.RSAPublicKey)


async def provisioned(served: Served, token: SoftToken, key_type: str = "ec-p256") -> Path:
    """A key made on the token, certified by the enforcer's managed CA (CSR route); the
    certificate is stored on the token and returned as a chain file."""
    label = f"device-{key_type}"
    csr = await trio.to_thread.run_sync(
        generate_on_token, token.config(label), key_type, f"token-{key_type}"
    )
    code, env = await admin_call(
        served.admin_port,
        "POST",
        "/client/v4/zones/demo/client_certificates",
        {"csr": csr.public_bytes(serialization.Encoding.PEM).decode(), "validity_days": 30},
    )
    assert code == 201, env
    chain = str(env["result"]["certificate"]).encode()
    leaf = x509.load_pem_x509_certificates(chain)[0]
    store_certificate(token.config(label), leaf)
    path = token.tokens.parent / f"{label}.pem"
    path.write_bytes(chain)
    return path


def device(served: Served, store: Pkcs11KeyStore) -> DeviceClient:
    return DeviceClient(Target("127.0.0.1", served.port, AUTH_HOST, served.layout.edge_ca), store)


@pytest.mark.parametrize("key_type", ["ec-p256", "rsa-2048"])
async def test_handshake_signed_on_the_token(serve_config, token: SoftToken, key_type) -> None:
    served: Served = await serve_config(admin=True)
    chain = await provisioned(served, token, key_type)
    # The chain from the file, then from the token's own certificate object.
    for cert_path in (chain, None):
        store = Pkcs11KeyStore(token.config(f"device-{key_type}"), cert_path)
        client = device(served, store)
        try:
            attempt = await client.request("/")
            assert attempt.outcome == "allowed", (attempt.error, str(served.log()))
            assert attempt.timings.key_store > 0  # the token's real signing time
            assert attempt.timings.handshake >= attempt.timings.key_store
        finally:
            await client.aclose()
        assert served.last()["certificate"]["common_name"] == f"token-{key_type}"  # type: ignore[index]


async def test_wrong_pin_then_locked_then_a_new_pin(
    serve_config, token: SoftToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    served: Served = await serve_config(admin=True)
    chain = await provisioned(served, token)
    reinitialize(token.module)  # log out: the next handshake logs in with the PIN it reads now
    monkeypatch.setenv("TEST_TOKEN_PIN", "999999")
    client = device(served, Pkcs11KeyStore(token.config("device-ec-p256"), chain))
    try:
        for _ in range(MAX_PIN_FAILURES):
            attempt = await client.request("/")
            assert attempt.outcome == "key_store_error:CKR_PIN_INCORRECT", attempt.error
        attempt = await client.request("/")
        assert attempt.outcome == "key_store_error:CKR_PIN_LOCKED"
        assert "no longer presents" in str(attempt.error)
        monkeypatch.setenv("TEST_TOKEN_PIN", PIN)  # the PIN source changed
        assert (await client.request("/")).outcome == "allowed"
    finally:
        await client.aclose()
    assert ckr_name(p11e.PinLocked()) == "CKR_PIN_LOCKED"  # a token's own lock, named alike
    assert ckr_name(p11e.DeviceRemoved()) == "CKR_DEVICE_REMOVED"


async def test_removed_token_fails_and_reinserted_token_signs(
    serve_config, token: SoftToken
) -> None:
    served: Served = await serve_config(admin=True)
    chain = await provisioned(served, token)
    client = device(served, Pkcs11KeyStore(token.config("device-ec-p256"), chain))
    client.options = dataclasses.replace(client.options, keep_alive=False, resume_sessions=False)
    try:
        assert (await client.request("/")).outcome == "allowed"
        # "Removal" on SoftHSM2: its token directory is moved away under the open session, so
        # the module no longer finds the key object (a USB token pulled out says
        # CKR_DEVICE_REMOVED instead; SoftHSM2 has no such state).
        (token_dir,) = list(token.tokens.iterdir())
        away = token.tokens.parent / "away"
        token_dir.rename(away)
        attempt = await client.request("/")
        assert attempt.outcome == "key_store_error:CKR_OBJECT_HANDLE_INVALID", attempt.error
        # Back in, and the module re-initialised (what a re-plug means to a PKCS#11 module).
        away.rename(token_dir)
        reinitialize(token.module)
        assert (await client.request("/")).outcome == "allowed"
        # The scenario event: the device loses its token (session closed, nothing signs).
        store = client.key_store
        assert isinstance(store, Pkcs11KeyStore)
        store.remove()
        assert (await client.request("/")).outcome == "key_store_error:CKR_DEVICE_REMOVED"
        store.reinsert()
        logins = store.key.session.logins
        assert (await client.request("/")).outcome == "allowed"
        assert store.key.session.logins == logins + 1  # a new session, logged in again
    finally:
        await client.aclose()


def test_configuration_errors_name_the_problem(token: SoftToken, tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError, match="exactly one"):
        Pkcs11Config(token.module, token=LABEL, key_label="k")
    missing = token.config(pin_env="NO_SUCH_PIN_VARIABLE")
    with pytest.raises(KeyStoreError, match="NO_SUCH_PIN_VARIABLE"):
        token_session(missing).session()
    pin_file = tmp_path / "pin"
    pin_file.write_text(PIN + "\n")
    reinitialize(token.module)  # one session per token: forget the one configured above
    from_file = token.config(pin_env=None, pin_file=pin_file)
    assert token_session(from_file).session() is not None
    with pytest.raises(TokenError, match="NO_SUCH_TOKEN"):
        token_session(token.config(token="nope")).session()


async def test_handshake_to_nginx_signed_on_the_token(
    served: Served, token: SoftToken, tmp_path: Path
) -> None:
    need_nginx()
    now = dt.datetime.now(dt.UTC)
    ca = issue_ca("token test CA", now)
    csr = generate_on_token(token.config(), "ec-p256", "token-nginx")
    leaf = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(ca.certificate.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(ca.key, hashes.SHA256())
    )
    store_certificate(token.config(), leaf)  # the chain comes from the token
    client_ca = tmp_path / "client-ca.pem"
    client_ca.write_bytes(ca.cert_pem())
    layout = served.layout
    proc, port = await start_nginx(
        tmp_path / "nginx",
        cert=layout.root / "edge" / "cert.pem",
        key=layout.root / "edge" / "key.pem",
        client_ca=client_ca,
        server_name=AUTH_HOST,
    )
    try:
        target = Target("127.0.0.1", port, AUTH_HOST, layout.edge_ca)
        client = DeviceClient(target, Pkcs11KeyStore(token.config()))
        attempt = await client.request("/")
        await client.aclose()
        # And a server this device must not trust: verified and refused before any request.
        wrong = Target("127.0.0.1", port, AUTH_HOST, client_ca)
        refused = DeviceClient(wrong, Pkcs11KeyStore(token.config()))
        distrusted = await refused.request("/")
        await refused.aclose()
    finally:
        await stop_nginx(proc)
    assert attempt.outcome == "allowed", attempt.error
    assert attempt.timings.key_store > 0
    assert distrusted.outcome == "tls_error:certificate_verify_failed"


async def test_fleet_provisioned_into_the_token(
    served: Served, token: SoftToken, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    need_nginx()
    out = tmp_path / "fleet"
    base = ["fleet", "provision", "--size", "3", "--out", str(out), "--cohort", "old=1:expired"]
    pkcs11_args = ["--key-store", "pkcs11", "--module", str(token.module), "--token", LABEL]
    # Bad options first: each named, exit 2, nothing made.
    assert main([*base, "--key-store", "pkcs11", "--token", LABEL]) == 2
    assert main([*base, *pkcs11_args, "--pin-env", "NO_SUCH_PIN_VARIABLE"]) == 2
    assert main([*base, *pkcs11_args, "--pin-env", "TEST_TOKEN_PIN", "--p12"]) == 2
    assert "--p12: a key on a token" in capsys.readouterr().err
    assert not out.exists()
    assert (
        await trio.to_thread.run_sync(main, [*base, *pkcs11_args, "--pin-env", "TEST_TOKEN_PIN"])
        == 0
    )
    devices = read_inventory(out)
    assert [d.key_store for d in devices] == ["pkcs11"] * 3
    assert devices[0].key_path == (
        "pkcs11:token=devices;object=device-001;id=%64%65%76%69%63%65%2d%30%30%31;type=private"
    )
    assert not list(out.glob("devices/*/key.pem"))  # no key left the token
    config = token.config("device-001")
    leaf = x509.load_pem_x509_certificates((out / devices[0].cert_path).read_bytes())[0]
    assert Pkcs11KeyStore(config).key.certificate_der() == leaf.public_bytes(
        serialization.Encoding.DER
    )
    # The fleet's CA trusted by nginx: the token's devices get in, the expired one does not.
    proc, port = await start_nginx(
        tmp_path / "nginx",
        cert=served.layout.root / "edge" / "cert.pem",
        key=served.layout.root / "edge" / "key.pem",
        client_ca=out / "ca" / "upload.pem",
        server_name=AUTH_HOST,
    )
    outcomes = {}
    try:
        for d in devices:
            target = Target("127.0.0.1", port, AUTH_HOST, served.layout.edge_ca)
            client = DeviceClient(target, Pkcs11KeyStore(token.config(d.id), out / d.cert_path))
            outcomes[d.id] = (await client.request("/")).outcome
            await client.aclose()
    finally:
        await stop_nginx(proc)
    assert outcomes == {"device-001": "allowed", "device-002": "allowed", "device-003": "http_400"}
