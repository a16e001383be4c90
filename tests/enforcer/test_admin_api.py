"""The admin API over real sockets: round trips, auth, bad bodies, managed CA and revocation."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from testbed.demo import AUTH_HOST, IOT_HOST
from tests.conftest import Served
from tests.wire import Connection, admin_call, client_context, get

ACC = "/client/v4/accounts/demo/access"
ZONE = "/client/v4/zones/demo"


@pytest.fixture
async def admin(serve_config) -> Served:
    return await serve_config(admin=True)


async def ok(served: Served, method: str, path: str, body=None, status: int = 200):
    code, env = await admin_call(served.admin_port, method, path, body)
    assert code == status, env
    assert env["success"] is True and env["errors"] == []
    return env["result"]


async def refused(served: Served, method: str, path: str, body=None, status: int = 400) -> str:
    before = (served.controller.generation, served.controller.objects)
    code, env = await admin_call(served.admin_port, method, path, body)
    assert code == status, env
    assert env["success"] is False and env["result"] is None
    # Nothing changed: no commit, same objects.
    assert (served.controller.generation, served.controller.objects) == before
    return env["errors"][0]["message"]


def make_csr(tmp_path: Path, cn: str) -> tuple[str, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
    )
    key_path = tmp_path / f"{cn}.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode(), key_path


async def test_roots_round_trip(admin: Served, demo) -> None:
    assert (await ok(admin, "GET", f"{ACC}/mtls"))["enabled"] is True  # seeded from the config
    msg = await refused(admin, "PUT", f"{ACC}/mtls", {"enabled": False})
    assert "cannot be disabled" in msg

    seeded = await ok(admin, "GET", f"{ACC}/certificates")
    assert [r["associated_hostnames"] for r in seeded] == [[AUTH_HOST, IOT_HOST]]

    foreign_pem = (demo.root / "ca" / "foreign-root.pem").read_text()
    created = await ok(
        admin,
        "POST",
        f"{ACC}/certificates",
        {"name": "foreign", "certificate": foreign_pem, "associated_hostnames": [AUTH_HOST]},
        201,
    )
    rid = created["id"]
    assert (await ok(admin, "GET", f"{ACC}/certificates/{rid}"))["certificate"] == foreign_pem
    assert len(await ok(admin, "GET", f"{ACC}/certificates")) == 2

    # The foreign device is admitted on auth now, and still not on iot.
    foreign = client_context(admin.layout.edge_ca, *admin.layout.device("foreign-ca"))
    assert (await get(admin.port, AUTH_HOST, foreign)).status == 200
    assert (await get(admin.port, IOT_HOST, foreign)).reason == "untrusted_issuer"

    msg = await refused(admin, "DELETE", f"{ACC}/certificates/{rid}", status=409)
    assert "associated hostnames" in msg
    await ok(admin, "PUT", f"{ACC}/certificates/{rid}", {"associated_hostnames": []})
    assert (await get(admin.port, AUTH_HOST, foreign)).reason == "untrusted_issuer"
    await ok(admin, "DELETE", f"{ACC}/certificates/{rid}")
    await refused(admin, "GET", f"{ACC}/certificates/{rid}", status=404)


async def test_applications_and_policies_round_trip(admin: Served) -> None:
    apps = await ok(admin, "GET", f"{ACC}/apps")
    auth = next(a for a in apps if a["hostname"] == AUTH_HOST)
    valid = client_context(admin.layout.edge_ca, *admin.layout.device("valid"))
    wrong_cn = client_context(admin.layout.edge_ca, *admin.layout.device("wrong-cn"))

    # Switch auth to No Duration with a Common Name policy, in two calls.
    updated = await ok(admin, "PUT", f"{ACC}/apps/{auth['id']}", {"session_duration": "0s"})
    assert updated["session_duration"] == "0s" and updated["aud"] == auth["aud"]
    response = await get(admin.port, AUTH_HOST, valid)
    assert response.status == 200 and response.header("set-cookie") is None
    assert response.header("connection") == "close"

    pid = auth["policies"][0]["id"]
    policy = await ok(
        admin,
        "PUT",
        f"{ACC}/apps/{auth['id']}/policies/{pid}",
        {"include": [{"common_name": {"common_name": "device-999"}}]},
    )
    assert policy["include"] == [{"common_name": {"common_name": "device-999"}}]
    assert (await get(admin.port, AUTH_HOST, valid)).reason == "policy_denied"
    assert (await get(admin.port, AUTH_HOST, wrong_cn)).status == 200

    added = await ok(
        admin,
        "POST",
        f"{ACC}/apps/{auth['id']}/policies",
        {"name": "everyone else", "decision": "deny", "include": [{"everyone": {}}]},
        201,
    )
    listed = await ok(admin, "GET", f"{ACC}/apps/{auth['id']}/policies")
    assert [p["id"] for p in listed] == [pid, added["id"]]
    assert (await ok(admin, "GET", f"{ACC}/apps/{auth['id']}/policies/{added['id']}"))[
        "decision"
    ] == "deny"
    await ok(admin, "DELETE", f"{ACC}/apps/{auth['id']}/policies/{added['id']}")

    await ok(admin, "DELETE", f"{ACC}/apps/{auth['id']}")
    assert (await get(admin.port, AUTH_HOST, valid)).status == 404
    created = await ok(
        admin,
        "POST",
        f"{ACC}/apps",
        {
            "name": "auth again",
            "domain": AUTH_HOST,
            "origin": auth["origin"],
            "session_duration": "15m",
            "policies": [{"name": "any", "include": [{"certificate": {}}]}],
        },
        201,
    )
    assert len(created["aud"]) == 64 and created["aud"] != auth["aud"]
    again = await get(admin.port, AUTH_HOST, valid)
    assert again.status == 200 and "Max-Age=900" in again.header("set-cookie")


@pytest.mark.parametrize(
    ("method", "path", "body", "message"),
    [
        (
            "POST",
            f"{ACC}/apps",
            {"domain": "x.example.test", "origin": "http://o"},
            "no edge certificate serves",
        ),
        ("POST", f"{ACC}/apps", {"domain": AUTH_HOST, "origin": "http://o"}, "already protects"),
        (
            "PUT",
            f"{ACC}/apps/config-0-{AUTH_HOST}",
            {"session_duration": "1 day"},
            "session_duration: ",
        ),
        ("POST", f"{ACC}/apps", {"origin": "http://o"}, "hostname: required field is missing"),
        (
            "POST",
            f"{ACC}/certificates",
            {"name": "x", "certificate": "not pem"},
            "certificate: not PEM",
        ),
        ("POST", f"{ACC}/certificates", {"certificate": "x"}, "name: required field is missing"),
        ("POST", f"{ACC}/certificates", {"name": 3, "certificate": "x"}, "name: expected"),
        ("POST", f"{ZONE}/client_certificates", {"csr": "nope"}, "csr: not a PEM"),
        ("POST", f"{ZONE}/client_certificates", {"csr": "x", "validity_days": 0}, "validity_days"),
        (
            "PUT",
            f"{ZONE}/certificate_authorities/hostname_associations",
            {"hostnames": ["bad host"]},
            "not a fully qualified",
        ),
        ("POST", f"{ACC}/apps", {"domain": "a.test", "colour": "red"}, "colour: unknown field"),
    ],
)
async def test_bad_bodies_are_400_and_change_nothing(
    admin: Served, method: str, path: str, body, message: str
) -> None:
    status = 409 if "already protects" in message else 400
    assert message in await refused(admin, method, path, body, status)


async def test_bad_policy_in_an_app_changes_nothing(admin: Served) -> None:
    apps = await ok(admin, "GET", f"{ACC}/apps")
    app = apps[0]
    msg = await refused(
        admin,
        "PUT",
        f"{ACC}/apps/{app['id']}",
        {"session_duration": "1h", "policies": [{"name": "p", "include": [{"common_name": {}}]}]},
    )
    assert "policies[0].include[0].common_name" in msg
    assert (await ok(admin, "GET", f"{ACC}/apps/{app['id']}"))["session_duration"] == app[
        "session_duration"
    ]


async def test_malformed_json_is_400(admin: Served) -> None:
    code, env = await admin_call(admin.admin_port, "POST", f"{ACC}/apps", raw_body=b"{not json")
    assert code == 400 and "not valid JSON" in env["errors"][0]["message"]


@pytest.mark.parametrize("token", ["", "wrong-token-wrong-token", "Bearer"])
async def test_every_call_without_the_token_is_401_and_changes_nothing(
    admin: Served, token: str, tmp_path
) -> None:
    csr, _ = make_csr(tmp_path, "x")
    calls = [
        ("GET", f"{ACC}/certificates", None),
        ("POST", f"{ACC}/certificates", {"name": "x", "certificate": "x"}),
        ("PUT", f"{ACC}/mtls", {"enabled": True}),
        ("GET", f"{ACC}/apps", None),
        ("DELETE", f"{ACC}/apps/config-0-auth.example.test", None),
        ("POST", f"{ACC}/keys/rotate", None),
        ("POST", f"{ZONE}/client_certificates", {"csr": csr}),
        ("GET", f"{ZONE}/client_certificates/crl", None),
        ("GET", "/client/v4/nowhere", None),
    ]
    before = (admin.controller.generation, admin.controller.objects)
    for method, path, body in calls:
        code, env = await admin_call(admin.admin_port, method, path, body, token=token)
        assert code == 401, (method, path)
        assert env["success"] is False and env["errors"][0]["code"] == 10000
    assert (admin.controller.generation, admin.controller.objects) == before


async def test_issued_certificate_is_admitted_then_revoked_on_the_same_connection(
    admin: Served, tmp_path
) -> None:
    csr, key = make_csr(tmp_path, "sensor-42")
    issued = await ok(
        admin, "POST", f"{ZONE}/client_certificates", {"csr": csr, "validity_days": 30}, 201
    )
    assert issued["status"] == "active" and issued["common_name"] == "sensor-42"
    cert = tmp_path / "sensor-42.pem"
    cert.write_text(issued["certificate"])
    ca = await ok(admin, "GET", f"{ZONE}/client_certificates/ca")
    assert ca["hostnames"] == [AUTH_HOST, IOT_HOST]

    conn = await Connection.open(
        admin.port, AUTH_HOST, client_context(admin.layout.edge_ca, cert, key)
    )
    try:
        assert (await conn.request("/")).status == 200
        revoked = await ok(admin, "DELETE", f"{ZONE}/client_certificates/{issued['id']}")
        assert revoked["status"] == "revoked"
        response = await conn.request("/")
        assert (response.status, response.reason) == (403, "revoked")
        await ok(admin, "PATCH", f"{ZONE}/client_certificates/{issued['id']}", {"reactivate": True})
        assert (await conn.request("/")).status == 200
    finally:
        await conn.aclose()

    code, crl_pem = await admin_call(admin.admin_port, "GET", f"{ZONE}/client_certificates/crl")
    assert code == 200
    crl = x509.load_pem_x509_crl(crl_pem)
    assert crl.get_revoked_certificate_by_serial_number(int(issued["serial_number"], 16)) is None
    await ok(admin, "DELETE", f"{ZONE}/client_certificates/{issued['id']}")
    code, crl_pem = await admin_call(admin.admin_port, "GET", f"{ZONE}/client_certificates/crl")
    crl = x509.load_pem_x509_crl(crl_pem)
    ca_cert = x509.load_pem_x509_certificate(ca["certificate"].encode())
    assert crl.is_signature_valid(ca_cert.public_key())
    assert (
        crl.get_revoked_certificate_by_serial_number(int(issued["serial_number"], 16)) is not None
    )
    listed = await ok(admin, "GET", f"{ZONE}/client_certificates?status=revoked")
    assert [c["id"] for c in listed] == [issued["id"]]


async def test_key_rotation_keeps_old_tokens_for_the_grace_period(admin: Served) -> None:
    valid = client_context(admin.layout.edge_ca, *admin.layout.device("valid"))
    old_cookie = (await get(admin.port, AUTH_HOST, valid)).header("set-cookie").split(";")[0]
    old_kid = jwt.get_unverified_header(old_cookie.split("=", 1)[1])["kid"]
    rotated = await ok(admin, "POST", f"{ACC}/keys/rotate")
    assert rotated["kid"] != old_kid
    jwks = (
        await get(
            admin.port, AUTH_HOST, client_context(admin.layout.edge_ca), "/cdn-cgi/access/certs"
        )
    ).json()
    assert [k["kid"] for k in jwks["keys"]] == [rotated["kid"], old_kid]
    new_cookie = (await get(admin.port, AUTH_HOST, valid)).header("set-cookie").split(";")[0]
    assert jwt.get_unverified_header(new_cookie.split("=", 1)[1])["kid"] == rotated["kid"]

    anonymous = client_context(admin.layout.edge_ca)
    assert (
        await get(admin.port, AUTH_HOST, anonymous, headers=[("cookie", old_cookie)])
    ).status == 200
    admin.clock.advance(dt.timedelta(hours=24, seconds=1))  # past the grace period
    # The old key is no longer published; the old token (also expired by now) is refused.
    jwks = (await get(admin.port, AUTH_HOST, anonymous, "/cdn-cgi/access/certs")).json()
    assert [k["kid"] for k in jwks["keys"]] == [rotated["kid"]]
    assert (
        await get(admin.port, AUTH_HOST, anonymous, headers=[("cookie", old_cookie)])
    ).status == 403
