"""People log in with an identity provider (access-flow I1-I5, I7, I10), over the real wire.

The provider is the real node ``oidc-provider`` (tests/oidc_idp.py) over https; the enforcer is
served over TLS on loopback and configured through its admin API. A programmatic browser
(tests/login_client.py) presents the device certificate, follows the redirects and fills in
the provider's login form. Attacks on the callback (tampered ID tokens, replayed states,
missing or foreign login cookies, open redirects) are delivered over the wire too: forged ID
tokens come from a small https token endpoint that the provider's ``token_url`` points at,
signed with the provider's real key (or another one).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import hmac
import io
import json
import sqlite3
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import jwt
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from enforcer.accesslog import AccessLog
from enforcer.chain import fingerprint
from enforcer.clock import FixedClock
from enforcer.login import LoginFailed, UsedStates
from enforcer.server import Enforcer, open_listener, serve
from testbed.demo import AUTH_HOST, IOT_HOST, DemoLayout
from tests.conftest import Served
from tests.h2wire import H2Client, h2_context
from tests.https_stub import JsonStub
from tests.login_client import BROWSER_ACCEPT, LoginBrowser
from tests.oidc_idp import USERS, Client, OidcIdp, callback_uris, oidc_idp  # noqa: F401
from tests.wire import admin_call, client_context, get

ACC = "/client/v4/accounts/demo/access"
ALICE, CAROL, BOB = (USERS[e] for e in ("alice@example.com", "carol@example.com", "bob@other.test"))
PEOPLE_WITH_DEVICES = {
    "name": "example.com people on our devices",
    "decision": "allow",
    "include": [{"email_domain": {"domain": "example.com"}}],
    "require": [{"certificate": {}}],
}


async def ok(served: Served, method: str, path: str, body: Any = None) -> Any:
    code, env = await admin_call(served.admin_port, method, path, body)  # type: ignore[arg-type]
    assert code in (200, 201), env
    return env["result"]


@dataclasses.dataclass
class LoginSetup:
    """A served enforcer whose auth application logs people in at the test provider."""

    served: Served
    idp: OidcIdp
    client: Client
    idp_id: str
    hostname: str = AUTH_HOST

    def ctx(self, device: str | None = "valid") -> ssl.SSLContext:
        layout = self.served.layout
        if device is None:
            return client_context(layout.edge_ca)
        return client_context(layout.edge_ca, *layout.device(device))

    def browser(self, device: str | None = "valid", port: int | None = None) -> LoginBrowser:
        return LoginBrowser(self.hostname, port or self.served.port, self.ctx(device), self.idp)


async def configure(
    served: Served,
    idp: OidcIdp,
    policy: dict[str, Any],
    hostname: str = AUTH_HOST,
    **config: Any,
) -> LoginSetup:
    """Register a client for this enforcer's port, add the provider and the app's policy."""
    client = idp.register_client(callback_uris([hostname], served.port))
    provider = await ok(
        served,
        "POST",
        f"{ACC}/identity_providers",
        {
            "name": "test provider",
            "type": "oidc",
            "config": {
                "issuer_url": idp.issuer,
                "client_id": client.client_id,
                "client_secret": client.client_secret,
                "ca_pem": idp.ca_pem,
                **config,
            },
        },
    )
    apps = await ok(served, "GET", f"{ACC}/apps")
    app = next(a for a in apps if a["domain"] == hostname)
    pid = app["policies"][0]["id"]
    await ok(served, "PUT", f"{ACC}/apps/{app['id']}/policies/{pid}", policy)
    return LoginSetup(served, idp, client, provider["id"], hostname)


@pytest.fixture
async def setup(serve_config: Callable[..., Any], oidc_idp: OidcIdp) -> LoginSetup:  # noqa: F811
    served = await serve_config(admin=True)
    return await configure(served, oidc_idp, PEOPLE_WITH_DEVICES)


def claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def requests(served: Served) -> list[dict[str, Any]]:
    return [r for r in served.log() if "event" not in r]


# ---- the login, end to end --------------------------------------------------------------------


async def test_a_person_logs_in_and_reaches_the_origin_with_their_identity(
    setup: LoginSetup,
) -> None:
    browser = setup.browser()
    hops = await browser.login("/private?x=1", ALICE.email, ALICE.password)
    # I7: the browser was sent to the login route with the path it asked for.
    first = hops[0].response
    assert first.status == 302 and first.header("location") == (
        "/cdn-cgi/access/login?redirect_url=%2Fprivate%3Fx%3D1"
    )
    # I2: the login route sends it to the provider with PKCE, state, nonce and our callback.
    start = hops[1].response
    assert start.status == 302
    auth = urlsplit(start.header("location") or "")
    query = {k: v[0] for k, v in parse_qs(auth.query).items()}
    assert f"{auth.scheme}://{auth.netloc}".startswith(setup.idp.issuer)
    assert query["response_type"] == "code" and query["code_challenge_method"] == "S256"
    assert (
        query["redirect_uri"] == f"https://{AUTH_HOST}:{setup.served.port}/cdn-cgi/access/callback"
    )
    assert query["client_id"] == setup.client.client_id
    assert query["scope"] == "openid email profile"
    assert len(query["state"]) >= 32 and len(query["nonce"]) >= 32
    login_cookie = start.header("set-cookie") or ""
    assert login_cookie.startswith("CF_Access_Login=")
    for attribute in ("Path=/cdn-cgi/access/", "Max-Age=600", "Secure", "HttpOnly", "SameSite=Lax"):
        assert attribute in login_cookie
    # I5: the callback admits, sets the session cookie, clears the login cookie, goes back.
    callback = next(h for h in hops if "/cdn-cgi/access/callback" in h.url).response
    assert callback.status == 302 and callback.header("location") == "/private?x=1"
    set_cookies = callback.all("set-cookie")
    assert any(c.startswith("CF_Authorization=") for c in set_cookies)
    assert any(c.startswith("CF_Access_Login=;") and "Max-Age=0" in c for c in set_cookies)
    record = [r for r in requests(setup.served) if r["path"].startswith("/cdn-cgi/access/callback")]
    assert record[-1]["decision"] == "allowed" and record[-1]["status"] == 302
    # The origin gets the person's identity (I8).
    final = hops[-1].response
    assert final.status == 200, final.body
    echo = final.json()
    assert echo["path"] == "/private?x=1"
    assert echo["headers"]["cf-access-authenticated-user-email"] == ALICE.email
    token = claims(echo["headers"]["cf-access-jwt-assertion"])
    assert token["email"] == ALICE.email and token["groups"] == ["engineering"]
    assert token["idp"]["id"] == setup.idp_id and token["identity_nonce"]
    assert token["cnf"]["x5t#S256"]  # bound to the device certificate presented
    # The session cookie admits the next request without a login.
    again = await browser.request("/next")
    assert again.status == 200 and setup.served.last()["admitted_by"] == "token"


async def test_revoking_the_certificate_ends_the_persons_session(setup: LoginSetup) -> None:
    # I8: the session token is bound to the device certificate presented at the login, so
    # revoking that certificate ends the person's session, with or without the certificate.
    browser = setup.browser()
    hops = await browser.login("/", ALICE.email, ALICE.password)
    assert hops[-1].response.status == 200
    cert_path, _ = setup.served.layout.device("valid")
    leaf = x509.load_pem_x509_certificate(cert_path.read_bytes())
    await ok(setup.served, "POST", f"{ACC}/revocations", {"fingerprint_sha256": fingerprint(leaf)})
    again = await browser.request("/after")
    assert (again.status, again.header("x-access-denied-reason")) == (403, "revoked")
    # The cookie alone, on a connection without the certificate, admits nothing either.
    alone = LoginBrowser(setup.hostname, setup.served.port, setup.ctx(None), setup.idp)
    alone.cookies().update(browser.cookies())
    refused = await alone.request("/after", headers=[("accept", "application/json")])
    assert refused.status in (401, 403) and setup.served.last()["decision"] == "denied"
    assert "token_invalid" in setup.served.last()["notes"]


async def test_a_client_that_is_not_a_browser_gets_401_and_no_redirect(setup: LoginSetup) -> None:
    plain = await get(setup.served.port, AUTH_HOST, setup.ctx(), headers=[("accept", "*/*")])
    assert (plain.status, plain.reason) == (401, "login_required")
    assert plain.header("location") is None
    post = await setup.browser().request("/", method="POST", body=b"x=1")
    assert (post.status, post.reason) == (401, "login_required")
    head = await setup.browser().request("/x", method="HEAD")
    assert (
        head.status == 302 and head.header("location") == "/cdn-cgi/access/login?redirect_url=%2Fx"
    )


async def test_a_person_of_another_domain_is_denied_after_login(setup: LoginSetup) -> None:
    hops = await setup.browser().login("/", BOB.email, BOB.password)
    final = hops[-1].response
    assert (final.status, final.reason) == (403, "identity_denied")
    assert "/cdn-cgi/access/callback" in hops[-1].url
    assert "set-cookie" not in [k.lower() for k, _ in final.headers if k.lower() != "set-cookie"]
    assert not any(c.startswith("CF_Authorization=") for c in final.all("set-cookie"))


async def test_without_a_certificate_there_is_no_login(setup: LoginSetup) -> None:
    hops = await setup.browser(device=None).navigate("/")
    assert len(hops) == 1
    assert (hops[0].response.status, hops[0].response.reason) == (403, "no_certificate")


async def test_the_login_route_answers_on_http2(setup: LoginSetup) -> None:
    client = await H2Client.open(setup.served.port, AUTH_HOST, h2_context(setup.ctx()))
    try:
        response = await client.request("/cdn-cgi/access/login?redirect_url=/a")
        denied = await client.request("/", headers=[BROWSER_ACCEPT])
    finally:
        await client.aclose()
    assert response.status == 302
    assert (response.header("location") or "").startswith(setup.idp.issuer)
    assert (response.header("set-cookie") or "").startswith("CF_Access_Login=")
    assert denied.status == 302
    assert denied.header("location") == "/cdn-cgi/access/login?redirect_url=%2F"


async def test_a_login_under_no_duration_proves_the_device_on_every_request(
    serve_config: Callable[..., Any],
    oidc_idp: OidcIdp,  # noqa: F811
) -> None:
    served = await serve_config(admin=True)
    setup = await configure(served, oidc_idp, PEOPLE_WITH_DEVICES, hostname=IOT_HOST)
    browser = setup.browser()
    hops = await browser.login("/", ALICE.email, ALICE.password)
    callback = next(h for h in hops if "/cdn-cgi/access/callback" in h.url).response
    assert callback.status == 302 and callback.header("connection") == "close"
    final = hops[-1].response
    assert final.status == 200, final.body
    assert final.json()["headers"]["cf-access-authenticated-user-email"] == ALICE.email
    # I9: the identity cookie says who, the certificate of each new handshake admits...
    assert (await browser.request("/again")).status == 200
    assert served.last()["admitted_by"] == "identity"
    # ...and never admits without it.
    alone = setup.browser(device=None)
    alone.cookies().update(browser.cookies())
    refused = await alone.request("/again")
    assert (refused.status, refused.reason) == (403, "no_certificate")


# ---- open redirects ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    ["https://evil.test/", "//evil.test", "/\\evil.test", "evil.test", "/a\tb", "/" * 2000],
)
async def test_the_login_never_redirects_off_the_hostname(setup: LoginSetup, target: str) -> None:
    response = await setup.browser().request(f"/cdn-cgi/access/login?redirect_url={quote(target)}")
    assert (response.status, response.reason) == (400, "login_failed")
    assert response.header("location") is None and response.header("set-cookie") is None
    assert str(setup.served.last()["detail"]).startswith("redirect_url:")


# ---- forged ID tokens, delivered by a token endpoint the provider's token_url names -----------


class TokenEndpoint(JsonStub):
    """An https token endpoint answering whatever ID token a test forged (a hostile provider)."""

    def __init__(self) -> None:
        self.id_token = ""
        self.requests: list[dict[str, str]] = []

    def answer(self, target: bytes, body: bytes) -> bytes:
        """Record the form the enforcer posted; answer the forged ID token."""
        self.requests.append({k: v[0] for k, v in parse_qs(body.decode()).items()})
        tokens = {"access_token": "x", "token_type": "Bearer", "id_token": self.id_token}
        return json.dumps(tokens).encode()


@pytest.fixture
async def forged(
    serve_config: Callable[..., Any],
    oidc_idp: OidcIdp,  # noqa: F811
    nursery: trio.Nursery,
) -> tuple[LoginSetup, TokenEndpoint]:
    endpoint = TokenEndpoint()
    port = await nursery.start(endpoint.serve, oidc_idp.server_context())
    served = await serve_config(admin=True)
    setup = await configure(
        served, oidc_idp, PEOPLE_WITH_DEVICES, token_url=f"https://127.0.0.1:{port}/token"
    )
    return setup, endpoint


def id_token(setup: LoginSetup, login_nonce: str, **changes: Any) -> dict[str, Any]:
    now = int(setup.served.clock.now().timestamp())
    base = {
        "iss": setup.idp.issuer,
        "aud": setup.client.client_id,
        "sub": ALICE.email,
        "email": ALICE.email,
        "email_verified": True,
        "groups": list(ALICE.groups),
        "nonce": login_nonce,
        "iat": now,
        "exp": now + 300,
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def sign(setup: LoginSetup, payload: dict[str, Any], **kwargs: Any) -> str:
    key = kwargs.pop("key", setup.idp.signing_key)
    headers = {"kid": kwargs.pop("kid", setup.idp.kid)}
    return jwt.encode(payload, key, algorithm=kwargs.pop("algorithm", "RS256"), headers=headers)


async def start_login(browser: LoginBrowser) -> tuple[str, str]:
    """GET the login route; return (state, nonce) of the provider redirect."""
    response = await browser.request("/cdn-cgi/access/login?redirect_url=/after")
    assert response.status == 302, response.body
    query = parse_qs(urlsplit(response.header("location") or "").query)
    return query["state"][0], query["nonce"][0]


OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def forgeries(setup: LoginSetup, nonce: str) -> dict[str, tuple[str, str]]:
    """Forged ID token by attack -> (token, the check the access log must name)."""
    now = int(setup.served.clock.now().timestamp())
    good = id_token(setup, nonce)
    unsigned = jwt.encode(good, None, algorithm="none")
    return {
        "wrong aud": (sign(setup, id_token(setup, nonce, aud="someone-else")), "aud"),
        "wrong nonce": (sign(setup, id_token(setup, nonce, nonce="another-login")), "nonce"),
        "no nonce": (sign(setup, id_token(setup, nonce, nonce=None)), "nonce"),
        "expired": (sign(setup, id_token(setup, nonce, iat=now - 900, exp=now - 120)), "exp"),
        "issued in the future": (sign(setup, id_token(setup, nonce, iat=now + 600)), "iat"),
        "alg none": (unsigned, "algorithm"),
        "signed by another key": (sign(setup, good, key=OTHER_KEY), "signature"),
        "unknown kid": (sign(setup, good, key=OTHER_KEY, kid="forged-kid"), "signature"),
        "HS256 with the client secret": (
            sign(setup, good, key=setup.client.client_secret, algorithm="HS256"),
            "algorithm",
        ),
        "wrong iss": (sign(setup, id_token(setup, nonce, iss="https://evil.test")), "iss"),
        "several audiences, no azp": (
            sign(setup, id_token(setup, nonce, aud=[setup.client.client_id, "other"])),
            "azp",
        ),
        "no email": (sign(setup, id_token(setup, nonce, email=None)), "email"),
        "email not verified": (
            sign(setup, id_token(setup, nonce, email_verified=False)),
            "email",
        ),
    }


async def test_a_well_formed_id_token_from_the_token_endpoint_admits(
    forged: tuple[LoginSetup, TokenEndpoint],
) -> None:
    """The control case of the forgeries below: the harness itself can admit."""
    setup, endpoint = forged
    browser = setup.browser()
    state, nonce = await start_login(browser)
    endpoint.id_token = sign(setup, id_token(setup, nonce))
    response = await browser.request(f"/cdn-cgi/access/callback?code=c1&state={state}")
    assert response.status == 302 and response.header("location") == "/after", response.body
    # The code went to the token endpoint with the PKCE verifier and our redirect_uri.
    sent = endpoint.requests[-1]
    assert sent["code"] == "c1" and len(sent["code_verifier"]) >= 43
    assert sent["redirect_uri"].endswith("/cdn-cgi/access/callback")


async def test_forged_id_tokens_are_refused(forged: tuple[LoginSetup, TokenEndpoint]) -> None:
    setup, endpoint = forged
    refused = {}
    for attack in forgeries(setup, "placeholder"):
        browser = setup.browser()
        state, nonce = await start_login(browser)
        endpoint.id_token, check = forgeries(setup, nonce)[attack]
        response = await browser.request(f"/cdn-cgi/access/callback?code=c&state={state}")
        detail = str(setup.served.last()["detail"])
        refused[attack] = (response.status, response.reason, detail.split(":", 1)[0])
        assert refused[attack] == (400, "login_failed", check), (attack, detail)
        assert not any(c.startswith("CF_Authorization=") for c in response.all("set-cookie"))
    assert len(refused) == 13


async def test_a_state_is_used_once_on_every_worker(
    forged: tuple[LoginSetup, TokenEndpoint], nursery: trio.Nursery
) -> None:
    setup, endpoint = forged
    # A second worker: another Enforcer process on the same state database, following it.
    other = await serve_again(nursery, setup.served)
    browser = setup.browser()
    state, nonce = await start_login(browser)
    endpoint.id_token = sign(setup, id_token(setup, nonce))
    kept = dict(browser.cookies())
    callback = f"/cdn-cgi/access/callback?code=c&state={state}"
    assert (await browser.request(callback)).status == 302
    for port, served in ((setup.served.port, setup.served), (other.port, other)):
        replay = setup.browser(port=port)
        replay.cookies().update(kept)  # the same login cookie, sent again
        response = await replay.request(callback)
        assert (response.status, response.reason) == (400, "login_failed")
        assert served.last()["detail"] == "state: this state was already used"


async def test_a_callback_needs_this_browsers_login_cookie(
    forged: tuple[LoginSetup, TokenEndpoint],
) -> None:
    setup, endpoint = forged
    victim, attacker = setup.browser(), setup.browser()
    state, nonce = await start_login(victim)
    endpoint.id_token = sign(setup, id_token(setup, nonce))
    # No login cookie at all (a link sent to someone else, login CSRF).
    bare = await setup.browser().request(f"/cdn-cgi/access/callback?code=c&state={state}")
    assert (bare.status, bare.reason) == (400, "login_failed")
    assert str(setup.served.last()["detail"]).startswith("login_cookie:")
    # Another login's cookie with this state.
    await start_login(attacker)
    mismatch = await attacker.request(f"/cdn-cgi/access/callback?code=c&state={state}")
    assert (mismatch.status, mismatch.reason) == (400, "login_failed")
    assert str(setup.served.last()["detail"]).startswith("state:")
    # The victim's own browser completes the login.
    done = await victim.request(f"/cdn-cgi/access/callback?code=c&state={state}")
    assert done.status == 302
    # A session token is never taken for a login cookie.
    fake = setup.browser()
    state2, nonce2 = await start_login(fake)
    endpoint.id_token = sign(setup, id_token(setup, nonce2))
    fake.cookies()["CF_Access_Login"] = victim.cookies()["CF_Authorization"]
    wrong_kind = await fake.request(f"/cdn-cgi/access/callback?code=c&state={state2}")
    assert (wrong_kind.status, wrong_kind.reason) == (400, "login_failed")
    assert str(setup.served.last()["detail"]).startswith("login_cookie:")


async def test_a_made_up_code_leaves_no_used_state_behind(setup: LoginSetup) -> None:
    # A callback whose code the provider refuses logged nobody in: its state is not kept as
    # used, so made-up callbacks cannot fill the used-state table and lock people out.
    browser = setup.browser()
    state, _ = await start_login(browser)
    for _ in range(2):
        bogus = await browser.request(f"/cdn-cgi/access/callback?code=made-up&state={state}")
        assert (bogus.status, bogus.reason) == (400, "login_failed")
        assert str(setup.served.last()["detail"]).startswith("token:")
    db = sqlite3.connect(setup.served.controller.store.path)
    try:
        assert db.execute("SELECT COUNT(*) FROM login_states").fetchone() == (0,)
    finally:
        db.close()


async def test_a_login_cookie_is_not_a_session(setup: LoginSetup) -> None:
    browser = setup.browser()
    await start_login(browser)
    login_cookie = browser.cookies()["CF_Access_Login"]
    response = await get(
        setup.served.port,
        AUTH_HOST,
        setup.ctx(),
        headers=[("cookie", f"CF_Authorization={login_cookie}")],
    )
    assert (response.status, response.reason) == (401, "login_required")
    assert setup.served.last()["notes"] == ["token_invalid"]


def hs256(claims: dict[str, Any], secret: bytes, kid: str) -> str:
    # By hand: pyjwt itself refuses a PEM key as an HMAC secret, an attacker does not.
    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = b64(json.dumps(claims).encode())
    mac = hmac.new(secret, header + b"." + body, hashlib.sha256).digest()
    return (header + b"." + body + b"." + b64(mac)).decode()


async def test_a_login_cookie_cannot_be_forged_with_public_material(setup: LoginSetup) -> None:
    # The login cookie is an HMAC under a secret derived from the private signing key: the
    # public key (a classic HS256/RS256 confusion) or the published JWK cannot make one.
    browser = setup.browser()
    state, _ = await start_login(browser)
    claims = jwt.decode(browser.cookies()["CF_Access_Login"], options={"verify_signature": False})
    ring = setup.served.enforcer.snapshot.keyring
    public_pem = ring.current.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for secret in (public_pem, json.dumps(dict(ring.current.public_jwk)).encode()):
        forged = hs256(claims, secret, ring.current.kid)
        browser.cookies()["CF_Access_Login"] = forged
        response = await browser.request(f"/cdn-cgi/access/callback?code=c&state={state}")
        assert (response.status, response.reason) == (400, "login_failed")
        assert str(setup.served.last()["detail"]).startswith("login_cookie:")
    # The control: the same hand-made cookie under the enforcer's own secret gets past the
    # cookie check (and fails later, at the provider, on the made-up code).
    browser.cookies()["CF_Access_Login"] = hs256(claims, ring.current.mac_key, ring.current.kid)
    control = await browser.request(f"/cdn-cgi/access/callback?code=c&state={state}")
    assert control.status == 400 and str(setup.served.last()["detail"]).startswith("token:")


async def test_the_provider_saying_no_is_a_failed_login(setup: LoginSetup) -> None:
    browser = setup.browser()
    state, _ = await start_login(browser)
    response = await browser.request(
        f"/cdn-cgi/access/callback?error=access_denied&error_description=no&state={state}"
    )
    assert (response.status, response.reason) == (400, "login_failed")
    assert str(setup.served.last()["detail"]).startswith("provider:")


# ---- logout -----------------------------------------------------------------------------------


async def serve_again(nursery: trio.Nursery, served: Served) -> Served:
    """Another worker: a new Enforcer on the same state file, following others' commits."""
    clock = FixedClock(served.clock.now())
    buffer = io.StringIO()
    enforcer = Enforcer(
        served.enforcer.config,
        clock,
        AccessLog(buffer),
        state_path=served.controller.store.path,
        follow_store=True,
    )
    port = await nursery.start(serve, enforcer, await open_listener("127.0.0.1", 0))
    return Served(port, enforcer, DemoLayout(served.layout.root, port), clock, buffer)


async def test_logout_ends_the_session_on_every_worker(
    setup: LoginSetup, nursery: trio.Nursery
) -> None:
    other = await serve_again(nursery, setup.served)
    browser = setup.browser()
    hops = await browser.login("/", CAROL.email, CAROL.password)
    assert hops[-1].response.status == 200
    session = browser.cookies()["CF_Authorization"]
    cookie = [("cookie", f"CF_Authorization={session}"), ("accept", "*/*")]
    on_other = await get(other.port, AUTH_HOST, setup.ctx(), headers=cookie)
    assert on_other.status == 200 and other.last()["admitted_by"] == "token"

    out = await browser.request("/cdn-cgi/access/logout")
    assert out.status == 200
    cleared = out.header("set-cookie") or ""
    assert cleared.startswith("CF_Authorization=;") and "Max-Age=0" in cleared
    assert "CF_Authorization" not in browser.cookies()

    for served in (setup.served, other):
        old = await get(served.port, AUTH_HOST, setup.ctx(), headers=cookie)
        assert (old.status, old.reason) == (401, "login_required")
        assert served.last()["notes"] == ["token_invalid"]
        # (the same cookie and certificate were admitted on the other worker before the logout)
    # Logging out again with the ended session writes nothing more to the state database.
    generation = setup.served.controller.store.generation()
    browser.cookies()["CF_Authorization"] = session
    repeat = await browser.request("/cdn-cgi/access/logout")
    assert repeat.status == 200
    assert setup.served.controller.store.generation() == generation
    # A browser with the old cookie is sent to log in again.
    browser.cookies()["CF_Authorization"] = session
    again = await browser.request("/")
    assert again.status == 302 and (again.header("location") or "").startswith(
        "/cdn-cgi/access/login"
    )


async def test_the_login_routes_take_get_only(setup: LoginSetup) -> None:
    response = await setup.browser().request("/cdn-cgi/access/login", method="POST", body=b"a=1")
    assert response.status == 405 and response.header("allow") == "GET"


async def test_an_unreachable_provider_is_a_failed_login(
    serve_config: Callable[..., Any],
    oidc_idp: OidcIdp,  # noqa: F811
) -> None:
    served = await serve_config(admin=True)
    # Nothing listens on port 9 of loopback: discovery fails, the login says so.
    setup = await configure(served, oidc_idp, PEOPLE_WITH_DEVICES, issuer_url="https://127.0.0.1:9")
    response = await setup.browser().request("/cdn-cgi/access/login")
    assert (response.status, response.reason) == (400, "login_failed")
    assert str(served.last()["detail"]).startswith("discovery:")
    assert response.header("location") is None


async def test_used_states_are_pruned_and_bounded(tmp_path: Any) -> None:
    states = UsedStates(tmp_path / "state.sqlite", max_rows=2)
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    t = int(now.timestamp())
    await states.use("a", t + 600, now)
    with pytest.raises(LoginFailed, match="already used"):
        await states.use("a", t + 600, now)
    await states.use("b", t + 600, now)
    with pytest.raises(LoginFailed, match="logins in progress"):
        await states.use("c", t + 600, now)
    # Expired states leave the table: room again, and a state past its cookie is moot anyway.
    later = now + dt.timedelta(minutes=11)
    await states.use("c", t + 1260, later)
    states.close()
