"""The person's login driver against a REAL OpenID Connect provider (node oidc-provider).

:meth:`devices.person.PersonClient.authorize` is what a person's client does between the
enforcer's redirect to the provider and the provider's redirect back to the callback: it reads
the provider's HTML login form (and consent form) generically and submits them. Here it starts
at the provider's authorization endpoint, as the enforcer's login route sends it, and must come
back to the registered redirect URI with a code that the provider's token endpoint exchanges
for an ID token naming the person.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import urllib.parse
import urllib.request

import jwt
import pytest
import trio

from devices.client import Target
from devices.person import CookieJar, LoginError, PersonClient, fill, parse_forms
from testbed.demo import AUTH_HOST
from tests.oidc_idp import OidcIdp, oidc_idp  # noqa: F401 - the fixture

VERIFIER = secrets.token_urlsafe(48)
CHALLENGE = base64.urlsafe_b64encode(hashlib.sha256(VERIFIER.encode()).digest()).rstrip(b"=")


def _authorization_url(idp: OidcIdp, state: str, nonce: str) -> str:
    with urllib.request.urlopen(
        f"{idp.issuer}/.well-known/openid-configuration", context=idp.ssl_context(), timeout=30
    ) as reply:
        endpoint = json.loads(reply.read())["authorization_endpoint"]
    query = urllib.parse.urlencode(
        {
            "response_type": "code",
            "client_id": idp.client.client_id,
            "redirect_uri": idp.client.redirect_uris[0],
            "scope": "openid email profile",
            "state": state,
            "nonce": nonce,
            "code_challenge": CHALLENGE.decode(),
            "code_challenge_method": "S256",
        }
    )
    return f"{endpoint}?{query}"


def _exchange(idp: OidcIdp, code: str) -> dict[str, object]:
    basic = base64.b64encode(f"{idp.client.client_id}:{idp.client.client_secret}".encode())
    request = urllib.request.Request(
        f"{idp.issuer}/token",
        data=urllib.parse.urlencode(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": idp.client.redirect_uris[0],
                "code_verifier": VERIFIER,
            }
        ).encode(),
        headers={"Authorization": f"Basic {basic.decode()}"},
        method="POST",
    )
    with urllib.request.urlopen(request, context=idp.ssl_context(), timeout=30) as reply:
        token = json.loads(reply.read())["id_token"]
    claims: dict[str, object] = jwt.decode(token, options={"verify_signature": False})
    return claims


def _person(idp: OidcIdp, email: str, password: str, tmp_path) -> PersonClient:  # type: ignore[no-untyped-def]
    ca = tmp_path / "idp-ca.pem"
    ca.write_text(idp.ca_pem)
    # The enforcer is not needed for this part: nothing is sent to it.
    return PersonClient(Target("127.0.0.1", 9, AUTH_HOST), email, password, idp_ca=ca)


@pytest.mark.trio
async def test_a_person_logs_in_at_the_real_provider(oidc_idp: OidcIdp, tmp_path) -> None:  # noqa: F811
    state, nonce = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    person = _person(oidc_idp, "alice@example.com", "alice-password", tmp_path)
    back = await person.authorize(_authorization_url(oidc_idp, state, nonce))
    u = urllib.parse.urlsplit(back)
    assert (u.hostname, u.path) == (AUTH_HOST, "/cdn-cgi/access/callback")
    query = dict(urllib.parse.parse_qsl(u.query))
    assert query["state"] == state
    claims = await trio.to_thread.run_sync(_exchange, oidc_idp, query["code"])
    assert claims["email"] == "alice@example.com" and claims["nonce"] == nonce


@pytest.mark.trio
async def test_a_wrong_password_is_refused_by_the_provider(oidc_idp: OidcIdp, tmp_path) -> None:  # noqa: F811
    person = _person(oidc_idp, "alice@example.com", "not-her-password", tmp_path)
    url = _authorization_url(oidc_idp, "s" * 16, "n" * 16)
    with pytest.raises(LoginError) as refused:
        await person.authorize(url)
    assert refused.value.code == "credentials_rejected"


def test_forms_are_read_generically() -> None:
    page = """<html><body>
    <form method="get" action="/search"><input name="q"></form>
    <form id="login" method="POST" action="/interaction/abc/login">
      <input type="hidden" name="csrf" value="t&amp;1">
      <input type="email" name="login" value="">
      <input type="password" name="password">
      <input type="checkbox" name="remember">
      <button type="submit" name="submit" value="go">Sign in</button>
    </form></body></html>"""
    forms = parse_forms(page)
    login = next(f for f in forms if f.password)
    assert (login.action, login.method, login.username) == (
        "/interaction/abc/login",
        "post",
        "login",
    )
    assert fill(login, "a@example.com", "pw") == [
        ("csrf", "t&1"),
        ("login", "a@example.com"),
        ("password", "pw"),
        ("submit", "go"),
    ]


@pytest.mark.trio
async def test_cookies_follow_path_and_max_age() -> None:
    jar = CookieJar()
    jar.take(
        "app.test",
        [
            ("set-cookie", "CF_Access_Login=abc; Path=/cdn-cgi/access/; Max-Age=600; HttpOnly"),
            ("set-cookie", "CF_Authorization=tok; Path=/; Max-Age=3600"),
        ],
    )
    assert (
        jar.header("app.test", "/cdn-cgi/access/callback")
        == "CF_Access_Login=abc; CF_Authorization=tok"
    )
    assert jar.header("app.test", "/") == "CF_Authorization=tok"
    jar.take("app.test", [("set-cookie", "CF_Access_Login=; Path=/cdn-cgi/access/; Max-Age=0")])
    assert jar.header("app.test", "/cdn-cgi/access/callback") == "CF_Authorization=tok"
    assert jar.header("other.test", "/") is None
