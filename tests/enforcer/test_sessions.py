"""Sessions end when they must: revoked certificates, ended sessions, tokens beside others.

Over real TLS to a served enforcer (issue 13): a token minted for a certificate stops admitting
once that certificate is revoked; the admin API ends an application's or the account's
sessions, durably; a token never admits beside another certificate, and a token alone admits
only where the operator opted out of certificate binding. Also: subjects with several CNs, the
managed CA's refusals, and the pure decision's 421 under No Duration.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
from pathlib import Path

import jwt
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from enforcer.accesslog import AccessLog
from enforcer.application import Application
from enforcer.chain import ChainResult, common_name, fingerprint
from enforcer.clock import FixedClock
from enforcer.config import load_config
from enforcer.control import Outcome, rotate_keys
from enforcer.decision import AccessRequest, decide
from enforcer.reasons import Reason
from enforcer.server import Enforcer, open_listener, serve
from enforcer.snapshot import Snapshot, session_cutoff
from enforcer.store import Change
from enforcer.tokens import KeyRing, SigningKey, TokenMemo
from testbed.demo import AUTH_HOST, IOT_HOST, DemoLayout
from tests.conftest import Served
from tests.enforcer.test_admin_api import make_csr, ok, refused
from tests.wire import admin_call, client_context, get

ACC = "/client/v4/accounts/demo/access"
ZONE = "/client/v4/zones/demo"


def ctx(served: Served, device: str | None = None):
    if device is None:
        return client_context(served.layout.edge_ca)
    return client_context(served.layout.edge_ca, *served.layout.device(device))


def cookie_of(response) -> tuple[str, str]:
    value = response.header("set-cookie")
    assert value is not None and value.startswith("CF_Authorization="), response.headers
    return ("cookie", value.split(";", 1)[0])


def claims_of(cookie: tuple[str, str]) -> dict:
    return jwt.decode(cookie[1].split("=", 1)[1], options={"verify_signature": False})


async def app_id(served: Served, hostname: str) -> str:
    apps = await ok(served, "GET", f"{ACC}/apps")
    return next(a["id"] for a in apps if a["hostname"] == hostname)


@pytest.fixture
async def admin(serve_config) -> Served:
    # The demo's auth application opts out of binding: a cookie alone admits there, which is
    # what a session revocation must be able to end.
    served = await serve_config(admin=True)
    # Mid-second, so that "the same second as the revocation" is never a whole second.
    served.clock.set(served.clock.now().replace(microsecond=500_000))
    return served


# ---- revoking a certificate ends its sessions ------------------------------------------------


async def test_revoking_a_managed_certificate_ends_its_cookie(admin: Served, tmp_path) -> None:
    csr, key = make_csr(tmp_path, "sensor-7")
    issued = await ok(admin, "POST", f"{ZONE}/client_certificates", {"csr": csr}, 201)
    cert = tmp_path / "sensor-7.pem"
    cert.write_text(issued["certificate"])
    device = client_context(admin.layout.edge_ca, cert, key)
    first = await get(admin.port, AUTH_HOST, device)
    assert first.status == 200
    cookie = cookie_of(first)
    assert claims_of(cookie)["cnf"]["x5t#S256"]  # the token names the certificate
    # The cookie alone admits before the revocation (and the token memo now knows it).
    assert (await get(admin.port, AUTH_HOST, ctx(admin), headers=[cookie])).status == 200
    assert admin.last()["admitted_by"] == "token"

    await ok(admin, "DELETE", f"{ZONE}/client_certificates/{issued['id']}")

    alone = await get(admin.port, AUTH_HOST, ctx(admin), headers=[cookie])
    assert (alone.status, alone.reason) == (403, "no_certificate")
    assert admin.last()["notes"] == ["token_invalid"]
    assert "revoked" in admin.last()["detail"]
    # Beside another valid certificate the cookie does not admit either: that certificate
    # does, on its own identity.
    other = await get(admin.port, AUTH_HOST, ctx(admin, "valid"), headers=[cookie])
    assert other.status == 200 and admin.last()["admitted_by"] == "certificate"
    assert admin.last()["notes"] == ["token_invalid"]
    assert claims_of(cookie_of(other))["common_name"] == "device-001"

    # Reactivated, the certificate's sessions count again (revocation is the only reason).
    await ok(admin, "PATCH", f"{ZONE}/client_certificates/{issued['id']}", {"reactivate": True})
    assert (await get(admin.port, AUTH_HOST, ctx(admin), headers=[cookie])).status == 200


async def test_revoking_an_uploaded_device_through_the_controller_ends_its_cookie(
    served: Served,
) -> None:
    first = await get(served.port, AUTH_HOST, ctx(served, "valid"))
    cookie = cookie_of(first)
    # Also after a key rotation: the old key stays accepted for its grace period, the
    # revocation still wins.
    await served.controller.write(
        lambda objects, now: rotate_keys(objects, served.controller.limits, now)
    )
    assert (await get(served.port, AUTH_HOST, ctx(served), headers=[cookie])).status == 200
    leaf = x509.load_pem_x509_certificates(served.layout.device("valid")[0].read_bytes())[0]
    fp = fingerprint(leaf)
    await served.controller.write(
        lambda objects, now: Outcome(None, (Change("revocation", fp, {"fingerprint": fp}),))
    )
    alone = await get(served.port, AUTH_HOST, ctx(served), headers=[cookie])
    assert (alone.status, alone.reason) == (403, "no_certificate")
    assert served.last()["notes"] == ["token_invalid"]


# ---- ending sessions through the admin API ------------------------------------------------------


async def serve_again(nursery: trio.Nursery, served: Served) -> Served:
    """A new Enforcer on the same state file: a restart, as far as the state goes."""
    config = served.enforcer.config
    clock = FixedClock(served.clock.now())
    buffer = io.StringIO()
    enforcer = Enforcer(config, clock, AccessLog(buffer), state_path=served.controller.store.path)
    port = await nursery.start(serve, enforcer, await open_listener("127.0.0.1", 0))
    return Served(port, enforcer, DemoLayout(served.layout.root, port), clock, buffer)


async def test_revoking_an_applications_tokens(admin: Served, nursery: trio.Nursery) -> None:
    before = cookie_of(await get(admin.port, AUTH_HOST, ctx(admin, "valid")))
    assert (await get(admin.port, AUTH_HOST, ctx(admin), headers=[before])).status == 200

    auth = await app_id(admin, AUTH_HOST)
    result = await ok(admin, "POST", f"{ACC}/apps/{auth}/revoke_tokens")
    assert result["app_id"] == auth

    refused_now = await get(admin.port, AUTH_HOST, ctx(admin), headers=[before])
    assert (refused_now.status, refused_now.reason) == (403, "no_certificate")
    assert admin.last()["notes"] == ["token_invalid"]
    # With the certificate the device is admitted again, by the certificate, and gets a new
    # cookie. Tokens carry iat in whole seconds, so the cutoff is the next whole second: a token
    # minted in the revocation's own second is refused too (fail closed).
    admin.clock.advance(dt.timedelta(seconds=1))
    again = await get(admin.port, AUTH_HOST, ctx(admin, "valid"), headers=[before])
    assert again.status == 200 and admin.last()["admitted_by"] == "certificate"
    after = cookie_of(again)
    assert (await get(admin.port, AUTH_HOST, ctx(admin), headers=[after])).status == 200
    assert admin.last()["admitted_by"] == "token"

    # A restart (a new enforcer on the same state file) keeps the revocation.
    restarted = await serve_again(nursery, admin)
    old = await get(restarted.port, AUTH_HOST, ctx(restarted), headers=[before])
    assert (old.status, old.reason) == (403, "no_certificate")
    assert (await get(restarted.port, AUTH_HOST, ctx(restarted), headers=[after])).status == 200


async def test_revoking_every_session_minted_before_a_time(
    admin: Served, nursery: trio.Nursery
) -> None:
    t0 = admin.clock.now()
    early = cookie_of(await get(admin.port, AUTH_HOST, ctx(admin, "valid")))
    admin.clock.advance(dt.timedelta(seconds=10))
    late = cookie_of(await get(admin.port, AUTH_HOST, ctx(admin, "wrong-cn")))

    cut = (t0 + dt.timedelta(seconds=5)).isoformat()
    result = await ok(admin, "POST", f"{ACC}/revoke_tokens", {"before": cut})
    assert result["account_id"] == "demo"
    denied = await get(admin.port, AUTH_HOST, ctx(admin), headers=[early])
    assert (denied.status, denied.reason) == (403, "no_certificate")
    assert admin.last()["notes"] == ["token_invalid"]
    assert (await get(admin.port, AUTH_HOST, ctx(admin), headers=[late])).status == 200
    # An earlier time never undoes a later revocation.
    await ok(admin, "POST", f"{ACC}/revoke_tokens", {"before": t0.isoformat()})
    assert (await get(admin.port, AUTH_HOST, ctx(admin), headers=[early])).status == 403

    # The default is now: every session so far ends; one minted later admits.
    await ok(admin, "POST", f"{ACC}/revoke_tokens")
    assert (await get(admin.port, AUTH_HOST, ctx(admin), headers=[late])).status == 403
    admin.clock.advance(dt.timedelta(seconds=1))
    fresh = cookie_of(await get(admin.port, AUTH_HOST, ctx(admin, "valid")))
    assert (await get(admin.port, AUTH_HOST, ctx(admin), headers=[fresh])).status == 200

    restarted = await serve_again(nursery, admin)
    for cookie, status in ((early, 403), (late, 403), (fresh, 200)):
        response = await get(restarted.port, AUTH_HOST, ctx(restarted), headers=[cookie])
        assert response.status == status


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"before": "yesterday"}, "before: 'yesterday' is not an ISO-8601 time"),
        ({"before": "2026-01-01T00:00:00"}, "has no time zone"),
        ({"before": "2999-01-01T00:00:00Z"}, "is in the future"),
        ({"before": 5}, "before: expected an ISO-8601 time"),
        ({"after": "2026-01-01T00:00:00Z"}, "after: unknown field"),
    ],
)
async def test_bad_revocation_bodies_are_400(admin: Served, body: dict, message: str) -> None:
    assert message in await refused(admin, "POST", f"{ACC}/revoke_tokens", body)


async def test_revoking_tokens_of_an_unknown_application_is_404(admin: Served) -> None:
    msg = await refused(admin, "POST", f"{ACC}/apps/nope/revoke_tokens", status=404)
    assert "application 'nope' not found" in msg
    code, env = await admin_call(admin.admin_port, "GET", f"{ACC}/revoke_tokens")
    assert code == 405 and "use POST" in env["errors"][0]["message"]


async def test_revoke_sessions_from_the_command_line(admin: Served, capsys) -> None:
    from testbed.cli import main
    from tests.conftest import ADMIN_TOKEN

    def cli(*args: str) -> int:
        url = f"http://127.0.0.1:{admin.admin_port}"
        return main(["enforcer", "admin", "--url", url, "--token", ADMIN_TOKEN, "--json", *args])

    cookie = cookie_of(await get(admin.port, AUTH_HOST, ctx(admin, "valid")))
    auth = await app_id(admin, AUTH_HOST)
    assert await trio.to_thread.run_sync(cli, "revoke-sessions", "--app", auth) == 0
    assert json.loads(capsys.readouterr().out)["app_id"] == auth
    assert (await get(admin.port, AUTH_HOST, ctx(admin), headers=[cookie])).status == 403

    admin.clock.advance(dt.timedelta(seconds=1))
    fresh = cookie_of(await get(admin.port, AUTH_HOST, ctx(admin, "valid")))
    at = (admin.clock.now() + dt.timedelta(seconds=1)).isoformat()
    admin.clock.advance(dt.timedelta(seconds=2))
    assert await trio.to_thread.run_sync(cli, "revoke-sessions", "--before", at) == 0
    assert json.loads(capsys.readouterr().out)["account_id"] == "demo"
    assert (await get(admin.port, AUTH_HOST, ctx(admin), headers=[fresh])).status == 403
    assert await trio.to_thread.run_sync(cli, "revoke-sessions", "--before", "soon") == 1
    assert "before: 'soon' is not an ISO-8601 time" in capsys.readouterr().err


# ---- tokens beside certificates, and the binding default ------------------------------------


async def test_a_token_never_admits_beside_another_certificate(admin: Served) -> None:
    # Binding is off on the demo's auth application, and still device A's token does not
    # lend its identity to device B's certificate.
    a_cookie = cookie_of(await get(admin.port, AUTH_HOST, ctx(admin, "valid")))
    response = await get(admin.port, AUTH_HOST, ctx(admin, "wrong-cn"), headers=[a_cookie])
    assert response.status == 200
    assert admin.last()["admitted_by"] == "certificate"
    assert admin.last()["notes"] == ["token_invalid"]
    echoed = response.json()["headers"]
    forwarded = jwt.decode(echoed["cf-access-jwt-assertion"], options={"verify_signature": False})
    b_leaf = x509.load_pem_x509_certificates(admin.layout.device("wrong-cn")[0].read_bytes())[0]
    assert forwarded["common_name"] == common_name(b_leaf) != "device-001"
    assert echoed["cf-client-cert-sha256"] == fingerprint(b_leaf)
    # Opted out of binding: the token alone admits.
    assert (await get(admin.port, AUTH_HOST, ctx(admin), headers=[a_cookie])).status == 200


async def test_binding_is_the_default(serve_config, demo, tmp_path) -> None:
    text = demo.config.read_text()
    assert "bind_token_to_certificate = false" in text
    bound = demo.root / f"bound-{tmp_path.name}.toml"  # beside the demo: its paths are relative
    bound.write_text(
        "\n".join(line for line in text.splitlines() if "bind_token_to_certificate" not in line)
    )
    config = load_config(bound)
    assert config.applications[0].bind_token_to_certificate is True
    served = await serve_config(config, admin=True)

    first = await get(served.port, AUTH_HOST, ctx(served, "valid"))
    cookie = cookie_of(first)
    same = await get(served.port, AUTH_HOST, ctx(served, "valid"), headers=[cookie])
    assert same.status == 200 and served.last()["admitted_by"] == "token"
    alone = await get(served.port, AUTH_HOST, ctx(served), headers=[cookie])
    assert (alone.status, alone.reason) == (403, "no_certificate")
    assert served.last()["notes"] == ["token_invalid"]
    other = await get(served.port, AUTH_HOST, ctx(served, "wrong-cn"), headers=[cookie])
    assert other.status == 200 and served.last()["admitted_by"] == "certificate"

    # The admin API's default is the same; an explicit false opts out.
    iot = await app_id(served, IOT_HOST)
    await ok(served, "DELETE", f"{ACC}/apps/{iot}")
    body = {"domain": IOT_HOST, "origin": "http://127.0.0.1:9", "policies": []}
    created = await ok(served, "POST", f"{ACC}/apps", body, 201)
    assert created["bind_token_to_certificate"] is True
    updated = await ok(
        served, "PUT", f"{ACC}/apps/{created['id']}", {"bind_token_to_certificate": False}
    )
    assert updated["bind_token_to_certificate"] is False
    assert Application(
        "a", "h", "a" * 64, dt.timedelta(hours=1), (), "http://o"
    ).bind_token_to_certificate


# ---- several CNs --------------------------------------------------------------------------------


def _leaf(
    issuer_key: ec.EllipticCurvePrivateKey, issuer: x509.Name, cns: list[str], now: dt.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn) for cn in cns])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )
    return cert, key


def _write(folder: Path, name: str, cert: x509.Certificate, key) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_several_different_cns_never_match_a_common_name_rule(
    admin: Served, tmp_path
) -> None:
    now = admin.clock.now()
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "two-cn test root")])
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=2))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False
        )
        .sign(root_key, hashes.SHA256())
    )
    pem = root.public_bytes(serialization.Encoding.PEM).decode()
    body = {"name": "two-cn", "certificate": pem, "associated_hostnames": [IOT_HOST]}
    await ok(admin, "POST", f"{ACC}/certificates", body, 201)

    # iot admits only CN device-001.
    outcomes = {
        "single": (["device-001"], 200),
        "repeated": (["device-001", "device-001"], 200),
        "first": (["device-001", "intruder"], 403),
        "last": (["intruder", "device-001"], 403),
    }
    for name, (cns, status) in outcomes.items():
        leaf, key = _leaf(root_key, root_name, cns, now)
        device = client_context(admin.layout.edge_ca, *_write(tmp_path, name, leaf, key))
        response = await get(admin.port, IOT_HOST, device)
        assert response.status == status, name
        record = admin.last()
        if status == 403:
            assert response.reason == "policy_denied"
            assert record["certificate"]["common_name"] is None  # no CN rules for it
        else:
            assert record["certificate"]["common_name"] == "device-001"


def test_facts_list_every_cn() -> None:
    from enforcer.chain import _facts

    now = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ca")])
    leaf, _ = _leaf(key, name, ["a", "b"], now)
    facts = _facts([leaf])
    assert facts.common_name is None and facts.common_names == ("a", "b")
    assert facts.ambiguous_common_name


# ---- the managed CA refuses ambiguous or unprintable subjects ------------------------------------


def _csr(attributes: list[x509.NameAttribute]) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes))
    return csr.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        (
            [
                x509.NameAttribute(NameOID.COMMON_NAME, "sensor-1"),
                x509.NameAttribute(NameOID.COMMON_NAME, "device-001"),
            ],
            "has 2 common names (CN) ('sensor-1', 'device-001'): send exactly one",
        ),
        ([x509.NameAttribute(NameOID.COMMON_NAME, "device-001\x00.evil")], "contains a NUL"),
        (
            [
                x509.NameAttribute(NameOID.COMMON_NAME, "sensor-1"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "acme\r\nfake: log"),
            ],
            "subject O 'acme\\r\\nfake: log' contains a control character (U+000D)",
        ),
        ([x509.NameAttribute(NameOID.COMMON_NAME, "sensor\x1b[31m")], "(U+001B)"),
    ],
)
async def test_managed_ca_refuses_ambiguous_or_unprintable_subjects(
    admin: Served, attributes: list[x509.NameAttribute], message: str
) -> None:
    msg = await refused(admin, "POST", f"{ZONE}/client_certificates", {"csr": _csr(attributes)})
    assert msg.startswith("csr: ") and message in msg
    assert admin.controller.objects.get("client_cert", {}) == {}


# ---- the pure decision ------------------------------------------------------------------------


NOW = dt.datetime(2026, 6, 1, 12, 0, 0, 500_000, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def ring() -> KeyRing:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return KeyRing(SigningKey.from_private_key(key, NOW))


def _snapshot(ring: KeyRing, **build: object) -> Snapshot:
    from enforcer.policy import parse_policy

    policy = parse_policy({"name": "p", "include": [{"certificate": {}}]}, "p")
    apps = [
        Application("auth", "auth.test", "a" * 64, dt.timedelta(hours=24), (policy,), "http://o"),
        Application("iot", "iot.test", "b" * 64, dt.timedelta(0), (policy,), "http://o"),
    ]
    return Snapshot.build(
        generation=1, applications=apps, roots=[], keyring=ring, issuer="https://iss", **build
    )


def test_a_misdirected_request_closes_a_no_duration_connection(ring: KeyRing) -> None:
    snapshot = _snapshot(ring)
    on_iot = decide(AccessRequest("iot.test", "auth.test"), snapshot, None, NOW)
    assert (on_iot.status, on_iot.reason, on_iot.close_connection) == (
        421,
        Reason.MISDIRECTED,
        True,
    )
    on_auth = decide(AccessRequest("auth.test", "iot.test"), snapshot, None, NOW)
    assert (on_auth.status, on_auth.close_connection) == (421, False)
    unknown = decide(AccessRequest("other.test", "iot.test"), snapshot, None, NOW)
    assert (unknown.status, unknown.close_connection) == (421, False)


def test_session_cutoff_rounds_up_to_the_next_second() -> None:
    assert session_cutoff(NOW) == int(NOW.timestamp()) + 1
    whole = NOW.replace(microsecond=0)
    assert session_cutoff(whole) == int(whole.timestamp())


def test_revocations_apply_to_memoised_tokens(ring: KeyRing) -> None:
    from tests.enforcer.test_units import facts

    device = facts()
    unbound = _snapshot(ring)
    unbound = dataclasses.replace(
        unbound,
        applications={
            h: dataclasses.replace(a, bind_token_to_certificate=False)
            for h, a in unbound.applications.items()
        },
    )
    minted = decide(
        AccessRequest("auth.test", "auth.test"), unbound, ChainResult(device, None), NOW
    )
    assert minted.token is not None
    memo = TokenMemo()
    alone = AccessRequest("auth.test", "auth.test", token=minted.token)
    assert decide(alone, unbound, None, NOW, memo).admitted_by is not None
    assert decide(alone, unbound, None, NOW, memo).admitted_by is not None
    assert memo.hits == 1
    revoked = dataclasses.replace(unbound, revoked=frozenset({device.sha256}))
    refused_ = decide(alone, revoked, None, NOW, memo)
    assert (refused_.status, refused_.notes) == (403, (Reason.TOKEN_INVALID,))
    assert memo.hits == 2  # answered from the memo, and still refused
    ended = dataclasses.replace(unbound, session_cutoffs={"auth.test": session_cutoff(NOW)})
    assert decide(alone, ended, None, NOW, memo).notes == (Reason.TOKEN_INVALID,)
