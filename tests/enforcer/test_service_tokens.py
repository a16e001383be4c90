"""Service tokens and identity providers over the wire (access-flow I1, I8, I11).

The admin API creates, masks, validates and keeps (across a restart) identity providers and
service tokens; the real curl presents CF-Access-Client-Id/-Secret over TLS to a served
enforcer: admitted, wrong secret, expired (the enforcer's injected clock), revoked, rotated;
the two headers never reach the origin, and neither does a forged
Cf-Access-Authenticated-User-Email, while a person's session forwards the real one.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil

import jwt
import pytest
import trio

from enforcer.identity import Identity
from enforcer.tokens import access_claims, mint
from testbed.demo import AUTH_HOST
from tests.conftest import Served
from tests.enforcer.test_admin_api import ok, refused
from tests.enforcer.test_sessions import serve_again
from tests.wire import client_context, get, run

ACC = "/client/v4/accounts/demo/access"

needs_curl = pytest.mark.skipif(
    shutil.which("curl") is None and not os.environ.get("CI"),
    reason="curl is installed by .ci/run (on CI a missing curl fails)",
)


@pytest.fixture
async def admin(serve_config) -> Served:
    return await serve_config(admin=True)


async def app_id(served: Served, host: str) -> str:
    apps = await ok(served, "GET", f"{ACC}/apps")
    return str(next(a["id"] for a in apps if a["hostname"] == host))


async def machines_policy(served: Served, token_id: str) -> None:
    """Let the service token in on the auth application (after its certificate policy)."""
    auth = await app_id(served, AUTH_HOST)
    rule = {"service_token": {"token_id": token_id}}
    body = {"name": "ci", "decision": "non_identity", "include": [rule]}
    await ok(served, "POST", f"{ACC}/apps/{auth}/policies", body, 201)


async def curl(
    served: Served, client_id: str | None, secret: str | None, *extra: str
) -> tuple[int, dict[str, str], bytes]:
    """GET / on the auth hostname with the real curl; (status, response headers, body)."""
    cmd = [*served.layout.curl(AUTH_HOST), "-w", "\n%{http_code}", *extra]
    if client_id is not None:
        cmd += ["-H", f"CF-Access-Client-Id: {client_id}"]
    if secret is not None:
        cmd += ["-H", f"CF-Access-Client-Secret: {secret}"]
    done = await run(cmd)
    assert done.returncode == 0, done.stderr.decode()
    body, _, code = done.stdout.rpartition(b"\n")
    headers = {}
    for line in done.stderr.decode("latin-1").splitlines():
        if line.startswith("< ") and ":" in line:
            k, _, v = line[2:].partition(":")
            headers.setdefault(k.strip().lower(), v.strip())
    return int(code), headers, body


# ---- service tokens ------------------------------------------------------------------------------


@needs_curl
@pytest.mark.parametrize("protocol", ["--http1.1", "--http2"])
async def test_a_service_token_admits_curl_and_its_headers_stay_at_the_edge(
    admin: Served, protocol: str
) -> None:
    made = await ok(admin, "POST", f"{ACC}/service_tokens", {"name": "ci job"}, 201)
    assert made["client_id"].endswith(".access") and len(made["client_id"]) == 39
    assert len(made["client_secret"]) == 64 and made["duration"] == "8760h"
    await machines_policy(admin, made["id"])

    status, headers, body = await curl(admin, made["client_id"], made["client_secret"], protocol)
    assert status == 200, headers
    assert admin.last()["http"] == ("HTTP/2" if protocol == "--http2" else "HTTP/1.1")
    seen = json.loads(body)["headers"]
    assert "cf-access-client-id" not in seen and "cf-access-client-secret" not in seen
    claims = jwt.decode(seen["cf-access-jwt-assertion"], options={"verify_signature": False})
    assert claims["common_name"] == made["client_id"] and claims["service_token_id"] == made["id"]
    assert headers["set-cookie"].startswith("CF_Authorization=")
    line = admin.last()
    assert line["admitted_by"] == "service_token" and line["policy"] == "ci"
    assert line["service_token"] == made["client_id"]
    assert made["client_secret"] not in admin.log_buffer.getvalue()

    # Without the secret header it is no service token at all: the certificate path decides.
    status, headers, _ = await curl(admin, made["client_id"], None, protocol)
    assert (status, headers["x-access-denied-reason"]) == (403, "no_certificate")
    # A wrong secret, an unknown client id.
    status, headers, _ = await curl(admin, made["client_id"], "0" * 64, protocol)
    assert (status, headers["x-access-denied-reason"]) == (403, "service_token_invalid")
    status, headers, _ = await curl(admin, "f" * 32 + ".access", made["client_secret"])
    assert (status, headers["x-access-denied-reason"]) == (403, "service_token_invalid")
    assert admin.last()["notes"] == ["service_token_invalid"]


@needs_curl
async def test_expiry_refresh_rotation_and_revocation(admin: Served) -> None:
    made = await ok(
        admin, "POST", f"{ACC}/service_tokens", {"name": "short", "duration": "1h"}, 201
    )
    await machines_policy(admin, made["id"])
    cid, secret = made["client_id"], made["client_secret"]
    assert (await curl(admin, cid, secret))[0] == 200

    admin.clock.advance(dt.timedelta(hours=1))  # exactly at expires_at
    status, headers, _ = await curl(admin, cid, secret)
    assert (status, headers["x-access-denied-reason"]) == (403, "service_token_expired")

    refreshed = await ok(admin, "POST", f"{ACC}/service_tokens/{made['id']}/refresh")
    assert refreshed["expires_at"] > made["expires_at"] and "client_secret" not in refreshed
    assert (await curl(admin, cid, secret))[0] == 200

    rotated = await ok(admin, "POST", f"{ACC}/service_tokens/{made['id']}/rotate")
    assert rotated["client_id"] == cid and rotated["client_secret"] != secret
    assert (await curl(admin, cid, secret))[1]["x-access-denied-reason"] == "service_token_invalid"
    assert (await curl(admin, cid, rotated["client_secret"]))[0] == 200

    await ok(admin, "DELETE", f"{ACC}/service_tokens/{made['id']}")
    status, headers, _ = await curl(admin, cid, rotated["client_secret"])
    assert (status, headers["x-access-denied-reason"]) == (403, "service_token_invalid")
    assert await ok(admin, "GET", f"{ACC}/service_tokens") == []


async def test_service_token_api_never_shows_the_secret_and_validates(admin: Served) -> None:
    made = await ok(admin, "POST", f"{ACC}/service_tokens", {"name": "a", "duration": "24h"}, 201)
    listed = await ok(admin, "GET", f"{ACC}/service_tokens")
    one = await ok(admin, "GET", f"{ACC}/service_tokens/{made['id']}")
    assert listed == [one] and "client_secret" not in one
    stored = admin.controller.objects["service_token"][made["id"]]
    assert made["client_secret"] not in json.dumps(stored)
    renamed = await ok(
        admin, "PUT", f"{ACC}/service_tokens/{made['id']}", {"name": "b", "duration": "48h"}
    )
    assert (renamed["name"], renamed["duration"], renamed["expires_at"]) == (
        "b",
        "48h",
        made["expires_at"],  # a new duration applies at the next refresh
    )
    for body, message in [
        ({}, "name: required field is missing"),
        ({"name": 5}, "name: expected"),
        ({"name": "x", "duration": "0s"}, "duration: a service token needs a duration above"),
        ({"name": "x", "duration": "forever"}, "duration: "),
        ({"name": "x", "client_secret": "mine"}, "client_secret: unknown field"),
    ]:
        assert (await refused(admin, "POST", f"{ACC}/service_tokens", body)).startswith(message)
    assert "not found" in await refused(admin, "GET", f"{ACC}/service_tokens/nope", status=404)
    assert "not found" in await refused(
        admin, "GET", "/client/v4/accounts/other/access/service_tokens/" + made["id"], status=404
    )


# ---- identity providers --------------------------------------------------------------------------

IDP = {
    "name": "test idp",
    "type": "oidc",
    "config": {
        "client_id": "enforcer",
        "client_secret": "very-secret-value",
        "issuer_url": "https://127.0.0.1:9999/",
        "scopes": ["openid", "email"],
        "groups_claim": "groups",
    },
}


async def test_identity_providers_round_trip_masked_and_validated(admin: Served) -> None:
    made = await ok(admin, "POST", f"{ACC}/identity_providers", IDP, 201)
    config = made["config"]
    assert (
        config["client_secret"] == "********" and config["issuer_url"] == "https://127.0.0.1:9999"
    )
    assert config["pkce_enabled"] is True and config["email_claim_name"] == "email"
    assert await ok(admin, "GET", f"{ACC}/identity_providers") == [made]
    assert await ok(admin, "GET", f"{ACC}/identity_providers/{made['id']}") == made
    provider = admin.enforcer.snapshot.identity_providers[made["id"]]
    assert provider.client_secret == "very-secret-value" and provider.scopes == ("openid", "email")
    auth = admin.enforcer.snapshot.applications[AUTH_HOST]
    assert auth.identity_providers == (made["id"],)  # default: every provider of the account

    # A masked secret sent back keeps the stored one; a new one replaces it.
    back = {**IDP, "config": {**config, "client_secret": "********", "groups_claim": "roles"}}
    await ok(admin, "PUT", f"{ACC}/identity_providers/{made['id']}", back)
    provider = admin.enforcer.snapshot.identity_providers[made["id"]]
    assert (provider.client_secret, provider.groups_claim) == ("very-secret-value", "roles")

    for config_change, message in [
        ({"issuer_url": "http://idp.test"}, "config.issuer_url: expected an https:// URL"),
        ({"allowed_algorithms": ["HS256"]}, "config.allowed_algorithms: 'HS256' is not allowed"),
        ({"allowed_algorithms": ["none"]}, "config.allowed_algorithms: 'none' is not allowed"),
        ({"scopes": ["email"]}, "config.scopes: expected a list of scope names holding"),
        ({"client_id": ""}, "config.client_id: expected"),
        ({"ca_pem": "not pem"}, "config.ca_pem: not PEM CA certificates"),
        ({"tenant": "x"}, "config.tenant: unknown field"),
        ({"pkce_enabled": "yes"}, "config.pkce_enabled: expected true or false"),
    ]:
        body = {**IDP, "config": {**IDP["config"], **config_change}}
        assert (await refused(admin, "POST", f"{ACC}/identity_providers", body)).startswith(message)
    missing = {**IDP, "config": {k: v for k, v in IDP["config"].items() if k != "client_secret"}}
    assert "config.client_secret: required" in await refused(
        admin, "POST", f"{ACC}/identity_providers", missing
    )
    assert "type: 'saml'" in await refused(
        admin, "POST", f"{ACC}/identity_providers", {**IDP, "type": "saml"}
    )

    # allowed_idps: checked against the account's providers; a named provider stays until freed.
    app = await app_id(admin, AUTH_HOST)
    assert "allowed_idps: 'nope'" in await refused(
        admin, "PUT", f"{ACC}/apps/{app}", {"allowed_idps": ["nope"]}
    )
    other = await ok(admin, "POST", f"{ACC}/identity_providers", {**IDP, "name": "two"}, 201)
    allowed = admin.enforcer.snapshot.applications[AUTH_HOST].identity_providers
    assert sorted(allowed) == sorted([made["id"], other["id"]])
    await ok(admin, "PUT", f"{ACC}/apps/{app}", {"allowed_idps": [other["id"]]})
    assert admin.enforcer.snapshot.applications[AUTH_HOST].identity_providers == (other["id"],)
    assert "allowed_idps" in await refused(
        admin, "DELETE", f"{ACC}/identity_providers/{other['id']}", status=409
    )
    await ok(admin, "DELETE", f"{ACC}/identity_providers/{made['id']}")
    assert list(admin.enforcer.snapshot.identity_providers) == [other["id"]]


@needs_curl
async def test_providers_and_service_tokens_survive_a_restart(
    admin: Served, nursery: trio.Nursery
) -> None:
    idp = await ok(admin, "POST", f"{ACC}/identity_providers", IDP, 201)
    made = await ok(admin, "POST", f"{ACC}/service_tokens", {"name": "ci"}, 201)
    await machines_policy(admin, made["id"])
    again = await serve_again(nursery, admin)
    assert (
        again.enforcer.snapshot.identity_providers[idp["id"]].client_secret == "very-secret-value"
    )
    assert (await curl(again, made["client_id"], made["client_secret"]))[0] == 200


# ---- the person's email header -------------------------------------------------------------------


async def test_the_user_email_header_is_the_enforcers_own(admin: Served) -> None:
    forged = [("cf-access-authenticated-user-email", "boss@example.com")]
    device = client_context(admin.layout.edge_ca, *admin.layout.device("valid"))
    response = await get(admin.port, AUTH_HOST, device, headers=forged)
    assert response.status == 200
    assert "cf-access-authenticated-user-email" not in json.loads(response.body)["headers"]

    # A person's session token (minted with the enforcer's own key, as a login would, for a
    # provider that may log users in here, I8): the origin gets the person's email, never the
    # client's copy.
    idp = (await ok(admin, "POST", f"{ACC}/identity_providers", IDP, 201))["id"]
    snapshot = admin.enforcer.snapshot
    app = snapshot.applications[AUTH_HOST]
    alice = Identity("alice@example.com", "sub-a", idp, ("engineering",), None, "nonce")
    claims = access_claims(
        aud=app.aud,
        issuer=snapshot.issuer,
        now=admin.clock.now(),
        lifetime=dt.timedelta(hours=1),
        common_name=None,
        x5t_s256=None,
        serial=None,
        identity=alice,
    )
    cookie = ("cookie", f"CF_Authorization={mint(snapshot.keyring, claims)}")
    # The demo's auth application does not bind tokens to certificates: the cookie alone admits.
    response = await get(
        admin.port, AUTH_HOST, client_context(admin.layout.edge_ca), headers=[cookie, *forged]
    )
    assert response.status == 200
    assert json.loads(response.body)["headers"]["cf-access-authenticated-user-email"] == (
        "alice@example.com"
    )
    line = admin.last()
    assert line["identity"] == {"email": "alice@example.com", "idp": idp}
    assert line["admitted_by"] == "token"


# ---- a person's session token on a No Duration application (I9) ---------------------------------


def _x5t(cert_path) -> str:
    import base64
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    der = x509.load_pem_x509_certificate(cert_path.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


async def test_no_duration_person_session_over_tls(admin: Served) -> None:
    from testbed.demo import IOT_HOST

    iot = await app_id(admin, IOT_HOST)
    # A provider people could log in with (without one no login could satisfy the policy).
    idp = (await ok(admin, "POST", f"{ACC}/identity_providers", IDP, 201))["id"]
    person = {
        "name": "staff on devices",
        "decision": "allow",
        "include": [{"email_domain": {"domain": "example.com"}}],
        "require": [{"common_name": {"common_name": "device-001"}}],
        "session_duration": "1h",
    }
    await ok(admin, "PUT", f"{ACC}/apps/{iot}", {"policies": [person]})
    device = client_context(admin.layout.edge_ca, *admin.layout.device("valid"))
    need = await get(admin.port, IOT_HOST, device)
    assert (need.status, need.reason) == (401, "login_required")
    assert need.header("connection") == "close"

    snapshot = admin.enforcer.snapshot
    app = snapshot.applications[IOT_HOST]

    def session(email: str) -> tuple[str, str]:
        who = Identity(email, "sub", idp, (), None, "nonce")
        claims = access_claims(
            aud=app.aud,
            issuer=snapshot.issuer,
            now=admin.clock.now(),
            lifetime=dt.timedelta(hours=1),
            common_name="device-001",
            x5t_s256=_x5t(admin.layout.device("valid")[0]),
            serial=None,
            identity=who,
            identity_only=True,
        )
        return ("cookie", f"CF_Authorization={mint(snapshot.keyring, claims)}")

    alice = session("alice@example.com")
    admitted = await get(admin.port, IOT_HOST, device, headers=[alice])
    assert admitted.status == 200 and admitted.header("set-cookie") is None
    seen = json.loads(admitted.body)["headers"]
    assert seen["cf-access-authenticated-user-email"] == "alice@example.com"
    forwarded = jwt.decode(seen["cf-access-jwt-assertion"], options={"verify_signature": False})
    assert forwarded["exp"] - forwarded["iat"] == 5 and forwarded["email"] == "alice@example.com"
    line = admin.last()
    assert line["admitted_by"] == "identity" and line["identity"]["email"] == "alice@example.com"

    # The session never admits alone: without the certificate the policy cannot hold.
    alone = await get(admin.port, IOT_HOST, client_context(admin.layout.edge_ca), headers=[alice])
    assert (alone.status, alone.reason) == (403, "no_certificate")
    # Beside another device's certificate it names nobody (token_invalid noted), and that
    # device cannot satisfy the policy whoever logs in: policy_denied, no login offered.
    other = client_context(admin.layout.edge_ca, *admin.layout.device("wrong-cn"))
    assert (await get(admin.port, IOT_HOST, other, headers=[alice])).reason == "policy_denied"
    assert admin.last()["notes"] == ["token_invalid"] and "identity" not in admin.last()
    # Someone the policy does not admit.
    bob = await get(admin.port, IOT_HOST, device, headers=[session("bob@other.test")])
    assert (bob.status, bob.reason) == (403, "identity_denied")
    assert admin.last()["identity"] == {"email": "bob@other.test", "idp": idp}
    # Revoking the certificate ends the session (J3).
    await ok(admin, "POST", f"{ACC}/revocations", {"fingerprint_sha256": _sha256_hex(admin)}, 201)
    assert (await get(admin.port, IOT_HOST, device, headers=[alice])).reason == "revoked"


def _sha256_hex(served: Served) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    cert = x509.load_pem_x509_certificate(served.layout.device("valid")[0].read_bytes())
    return cert.fingerprint(hashes.SHA256()).hex()
