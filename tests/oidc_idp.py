"""A real OpenID Connect provider for tests: node ``oidc-provider`` (tests/idp/) over https.

Use it by importing the fixture into a test module (``from tests.oidc_idp import oidc_idp``)
and asking for ``oidc_idp``: a session-wide provider on 127.0.0.1 with a CA made here, the test
users of :data:`USERS` (a username + password form that checks the password), a confidential
client, and :meth:`OidcIdp.register_client` to add a client whose redirect URIs name an
enforcer's port once it is known (RFC 7591 dynamic registration, behind an initial access token).
The provider's private signing JWK is exposed so that tampering tests can sign ID tokens with
the provider's real key.

Node and npm are needed: without them the fixture skips, except on CI (``CI`` set) where it
fails; ``npm ci`` runs into tests/idp when its node_modules is missing (`.ci/run` does it too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import ipaddress
import json
import os
import secrets
import shutil
import ssl
import subprocess
import threading
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from devices.pki import Issued, generate_key, issue_ca, write_pem
from enforcer.identity import IdentityProvider

IDP_DIR = Path(__file__).parent / "idp"
NODE = shutil.which("node")
NPM = shutil.which("npm")
READY_TIMEOUT = 60.0  # seconds for node to start and print its ready line (a loaded CI box)
CALLBACK = "/cdn-cgi/access/callback"


@dataclasses.dataclass(frozen=True)
class User:
    """A person who can log in at the test provider."""

    email: str
    password: str
    groups: tuple[str, ...]


USERS = {
    u.email: u
    for u in (
        User("alice@example.com", "alice-password", ("engineering",)),
        User("carol@example.com", "carol-password", ("sales",)),
        User("bob@other.test", "bob-password", ()),
    )
}


@dataclasses.dataclass(frozen=True)
class Client:
    """A client (relying party) registered at the provider."""

    client_id: str
    client_secret: str
    redirect_uris: tuple[str, ...]


def callback_uris(hostnames: Sequence[str], port: int) -> list[str]:
    """The enforcer's callback URLs for ``hostnames`` served on ``port``."""
    suffix = "" if port == 443 else f":{port}"
    return [f"https://{h}{suffix}{CALLBACK}" for h in hostnames]


@dataclasses.dataclass
class OidcIdp:
    """A running test provider."""

    issuer: str
    port: int
    ca_pem: str
    client: Client
    users: dict[str, User]
    signing_jwk: dict[str, Any]  # the provider's private signing key (RS256), as a JWK
    registration_token: str
    workdir: Path
    ca: Issued  # the CA of the provider's certificate: tests issue their own https servers' too

    @functools.cached_property
    def signing_key(self) -> rsa.RSAPrivateKey:
        """The provider's private signing key, to sign crafted ID tokens with."""
        key = jwt.PyJWK(self.signing_jwk).key
        assert isinstance(key, rsa.RSAPrivateKey)
        return key

    @property
    def kid(self) -> str:
        """The key id of the provider's signing key."""
        return str(self.signing_jwk["kid"])

    def server_context(self) -> ssl.SSLContext:
        """A server TLS context with a certificate of the provider's CA for 127.0.0.1."""
        server = _server_cert(self.ca, dt.datetime.now(dt.UTC))
        cert = self.workdir / f"extra-{secrets.token_hex(4)}.pem"
        key = cert.with_suffix(".key")
        write_pem(cert, server.cert_pem(), self.ca.cert_pem())
        write_pem(key, server.key_pem(), private=True)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        return ctx

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context that trusts the provider's CA."""
        return ssl.create_default_context(cadata=self.ca_pem)

    def register_client(
        self, redirect_uris: Sequence[str], auth_method: str = "client_secret_basic"
    ) -> Client:
        """Register a confidential client with these exact redirect URIs (RFC 7591)."""
        body = json.dumps(
            {
                "redirect_uris": list(redirect_uris),
                "response_types": ["code"],
                "grant_types": ["authorization_code"],
                "token_endpoint_auth_method": auth_method,
            }
        ).encode()
        request = urllib.request.Request(
            f"{self.issuer}/reg",
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {self.registration_token}",
            },
        )
        with urllib.request.urlopen(request, context=self.ssl_context(), timeout=30) as reply:
            registered = json.loads(reply.read())
        return Client(registered["client_id"], registered["client_secret"], tuple(redirect_uris))

    def provider(
        self, client: Client | None = None, id: str = "test-idp", **fields: Any
    ) -> IdentityProvider:
        """The enforcer's settings for this provider (``fields`` override, e.g. token_url)."""
        client = client or self.client
        return IdentityProvider(
            id=id,
            name="oidc-provider (tests)",
            issuer_url=self.issuer,
            client_id=client.client_id,
            client_secret=client.client_secret,
            ca_pem=self.ca_pem,
            **fields,
        )


def _missing_tool(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must install it: see .ci/run)")
    pytest.skip(reason)


def _ensure_node_modules() -> None:
    if (IDP_DIR / "node_modules" / "oidc-provider").is_dir():
        return
    if NPM is None:
        _missing_tool("npm is not installed: cannot install tests/idp")
    assert NPM is not None
    done = subprocess.run(
        [NPM, "ci", "--no-audit", "--no-fund", "--prefix", str(IDP_DIR)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        pytest.fail(f"npm ci in {IDP_DIR} failed:\n{done.stdout}\n{done.stderr}")


def _signing_jwk() -> dict[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key))
    jwk.update(kid=f"idp-{secrets.token_hex(8)}", alg="RS256", use="sig")
    return jwk


def _start(workdir: Path, hostnames: Sequence[str]) -> tuple[subprocess.Popen[str], OidcIdp]:
    now = dt.datetime.now(dt.UTC)
    ca = issue_ca("mtls-testbed test OIDC provider CA", now)
    server = _server_cert(ca, now)
    write_pem(workdir / "ca.pem", ca.cert_pem())
    write_pem(workdir / "server.pem", server.cert_pem(), ca.cert_pem())
    write_pem(workdir / "server-key.pem", server.key_pem(), private=True)
    jwk = _signing_jwk()
    client = Client(
        "enforcer-tests",
        secrets.token_urlsafe(32),
        tuple(callback_uris(hostnames, 443)),
    )
    registration_token = secrets.token_urlsafe(32)
    config = {
        "host": "127.0.0.1",
        "port": 0,
        "tls": {"cert": str(workdir / "server.pem"), "key": str(workdir / "server-key.pem")},
        "clients": [
            {
                "client_id": client.client_id,
                "client_secret": client.client_secret,
                "redirect_uris": list(client.redirect_uris),
            }
        ],
        "users": [
            {"email": u.email, "password": u.password, "groups": list(u.groups)}
            for u in USERS.values()
        ],
        "jwks": {"keys": [jwk]},
        "cookie_keys": [secrets.token_urlsafe(32)],
        "registration_token": registration_token,
    }
    config_path = workdir / "idp.json"
    fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(config, f)
    assert NODE is not None
    stderr = open(workdir / "node.stderr", "w", encoding="utf-8")  # noqa: SIM115 - node's lifetime
    process = subprocess.Popen(
        [NODE, str(IDP_DIR / "provider.js"), str(config_path)],
        cwd=IDP_DIR,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    stderr.close()
    ready = _ready_line(process)
    if ready is None:
        process.kill()
        process.wait()
        log = (workdir / "node.stderr").read_text(encoding="utf-8")
        pytest.fail(f"the test OIDC provider did not start within {READY_TIMEOUT} s:\n{log}")
    idp = OidcIdp(
        issuer=ready["issuer"],
        port=ready["port"],
        ca_pem=ca.cert_pem().decode(),
        client=client,
        users=dict(USERS),
        signing_jwk=jwk,
        registration_token=registration_token,
        workdir=workdir,
        ca=ca,
    )
    return process, idp


def _server_cert(ca: Issued, now: dt.datetime) -> Issued:
    # issue_leaf names DNS SANs only; Python's ssl and Chromium want the IP for https://127.0.0.1.
    key = generate_key("ec-p256")
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(certificate, key)


def _ready_line(process: subprocess.Popen[str]) -> dict[str, Any] | None:
    # readline blocks: read in a thread so a silent node is bounded by READY_TIMEOUT.
    result: list[dict[str, Any]] = []

    def read() -> None:
        assert process.stdout is not None
        line = process.stdout.readline()
        if line:
            with contextlib.suppress(json.JSONDecodeError):
                result.append(json.loads(line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(READY_TIMEOUT)
    return result[0] if result and result[0].get("ready") else None


def start_idp(
    workdir: Path, hostnames: Sequence[str] = ()
) -> tuple[subprocess.Popen[str], OidcIdp]:
    """Start the provider in ``workdir`` (skips or fails when node is missing); stop it yourself."""
    if NODE is None:
        _missing_tool("node is not installed: the test OIDC provider needs Node 20")
    _ensure_node_modules()
    return _start(workdir, hostnames)


def stop_idp(process: subprocess.Popen[str]) -> None:
    """Stop a provider started by :func:`start_idp`."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.stdout is not None:
        process.stdout.close()


@pytest.fixture(scope="session")
def oidc_idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcIdp]:
    """A real OpenID Connect provider (oidc-provider) on 127.0.0.1 for the whole session."""
    from testbed.demo import AUTH_HOST, IOT_HOST

    process, idp = start_idp(tmp_path_factory.mktemp("oidc-idp"), [AUTH_HOST, IOT_HOST])
    try:
        yield idp
    finally:
        stop_idp(process)
