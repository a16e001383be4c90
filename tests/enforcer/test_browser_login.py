"""A person logs in through a real OpenID Connect provider (node oidc-provider, tests/idp) in a
real headless Chromium (tests/browser.py) holding a client certificate, and reaches the origin
only with both: the login AND the certificate (policy ``include email_domain example.com,
require certificate``). Denials are read from the page's text and the access log (selenium
cannot see response headers)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
import pytest
import trio

from enforcer.identity import CALLBACK_PATH, LOGIN_PATH, LOGOUT_PATH
from testbed.demo import AUTH_HOST
from tests.browser import Browser, ClientCertificate
from tests.conftest import Served
from tests.oidc_idp import OidcIdp, callback_uris, start_idp, stop_idp
from tests.wire import admin_call

ACC = "/client/v4/accounts/demo/access"
POLICY = {
    "name": "people of example.com on a managed device",
    "decision": "allow",
    "include": [{"email_domain": {"domain": "example.com"}}],
    "require": [{"certificate": {}}],
}


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcIdp]:
    """The real provider, once for this module's browsers."""
    process, provider = start_idp(tmp_path_factory.mktemp("browser-idp"))
    try:
        yield provider
    finally:
        stop_idp(process)


async def admin(served: Served, method: str, path: str, body: Any = None) -> Any:
    """An admin API call that must succeed; return its result."""
    assert served.admin_port is not None
    status, envelope = await admin_call(served.admin_port, method, path, body)
    assert status in (200, 201), (status, envelope)
    return envelope["result"]


@pytest.fixture
async def login_app(serve_config: Callable[..., Any], idp: OidcIdp) -> Served:
    """The demo enforcer with the provider configured and the auth app's policy for people."""
    served: Served = await serve_config(admin=True)
    client = await trio.to_thread.run_sync(
        idp.register_client, callback_uris([AUTH_HOST], served.port)
    )
    config = {
        "client_id": client.client_id,
        "client_secret": client.client_secret,
        "issuer_url": idp.issuer,
        "ca_pem": idp.ca_pem,
    }
    await admin(
        served,
        "POST",
        f"{ACC}/identity_providers",
        {"name": "test provider", "type": "oidc", "config": config},
    )
    apps = await admin(served, "GET", f"{ACC}/apps")
    auth = next(a for a in apps if a["hostname"] == AUTH_HOST)
    pid = auth["policies"][0]["id"]
    await admin(served, "PUT", f"{ACC}/apps/{auth['id']}/policies/{pid}", POLICY)
    return served


def requests(served: Served) -> list[dict[str, Any]]:
    """The access log's request records."""
    return [r for r in served.log() if "event" not in r]


def steps_of(records: list[dict[str, Any]]) -> list[tuple[str, int, str | None]]:
    """(path without query, status, reason or admitted_by) of each record but favicon loads."""
    return [(r["path"].split("?")[0], r["status"], r["reason"] or r["admitted_by"])
            for r in records if r["path"] != "/favicon.ico"]  # fmt: skip


async def start(
    open_browser: Callable[..., Any], served: Served, idp: OidcIdp, device: str | None
) -> Browser:
    """A browser trusting the edge and provider CAs, holding ``device``'s certificate (or none)."""
    cas = [served.layout.edge_ca, idp.workdir / "ca.pem"]
    client = ClientCertificate(*served.layout.device(device)) if device else None
    browser: Browser = await open_browser([AUTH_HOST], cas, client)
    return browser


async def log_in(browser: Browser, served: Served, idp: OidcIdp, email: str) -> None:
    """Go to the app, sign in at the provider's form, and wait to be back on the app's host."""
    await browser.get(f"https://{AUTH_HOST}:{served.port}/hello")
    form = urlsplit(await browser.url())
    assert (form.hostname, form.port) == ("127.0.0.1", idp.port), form  # the provider's page
    assert form.path.startswith("/interaction/")
    await browser.submit_form({"username": email, "password": idp.users[email].password})
    await browser.wait_for_host(AUTH_HOST)


async def test_person_with_login_and_certificate_reaches_the_origin(
    login_app: Served, idp: OidcIdp, open_browser: Callable[..., Any], tmp_path: Path
) -> None:
    browser = await start(open_browser, login_app, idp, "valid")
    await log_in(browser, login_app, idp, "alice@example.com")

    assert urlsplit(await browser.url()).path == "/hello"
    echo = await browser.json()
    assert echo["origin"] == "echo" and echo["path"] == "/hello"
    assert echo["headers"]["cf-access-authenticated-user-email"] == "alice@example.com"
    await browser.screenshot(tmp_path / "alice-origin.png")

    cookies = {c["name"]: c for c in await browser.cookies()}
    session = cookies["CF_Authorization"]
    assert session["httpOnly"] and session["secure"]
    claims = jwt.decode(session["value"], options={"verify_signature": False})
    assert claims["email"] == "alice@example.com" and claims["common_name"] == "device-001"

    # The log tells the story: login required, the login route, the callback admitting the
    # identity with the certificate, then the session cookie on every request.
    expected = [
        ("/hello", 302, "login_required"),
        (LOGIN_PATH.decode(), 302, None),
        (CALLBACK_PATH.decode(), 302, "identity"),
        ("/hello", 200, "token"),
    ]
    assert steps_of(requests(login_app)) == expected
    assert {r["certificate"]["common_name"] for r in requests(login_app)} == {"device-001"}
    # The provider serves no favicon (its 404 is its own affair); nothing else may fail.
    errors = [e["message"] for e in await browser.console() if e["level"] == "SEVERE"]
    unexpected = [e for e in errors if not e.startswith(f"{idp.issuer}/favicon.ico ")]
    assert unexpected == [], errors

    # Logout clears the cookie in the real browser (the clearing cookie's attributes must match
    # the session's for that), and the session is over: the next visit needs a login again.
    seen = len(requests(login_app))
    await browser.get(f"https://{AUTH_HOST}:{login_app.port}{LOGOUT_PATH.decode()}")
    assert "CF_Authorization" not in {c["name"] for c in await browser.cookies()}
    await browser.get(f"https://{AUTH_HOST}:{login_app.port}/hello")
    # The provider's own session signs her in again without its form.
    assert steps_of(requests(login_app)[seen:]) == [
        (LOGOUT_PATH.decode(), 200, None),
        *expected,
    ]


async def test_person_without_a_certificate_is_refused_before_the_provider(
    login_app: Served, idp: OidcIdp, open_browser: Callable[..., Any], tmp_path: Path
) -> None:
    browser = await start(open_browser, login_app, idp, None)
    await browser.get(f"https://{AUTH_HOST}:{login_app.port}/hello")

    assert urlsplit(await browser.url()).hostname == AUTH_HOST  # never sent to the provider
    assert await browser.text() == "A valid client certificate is required."
    await browser.screenshot(tmp_path / "no-certificate.png")
    records = requests(login_app)
    assert [(r["path"], r["status"], r["reason"]) for r in records if r["path"] == "/hello"] == [
        ("/hello", 403, "no_certificate")
    ]
    assert not any(r["path"].startswith("/cdn-cgi/") for r in records)
    assert await browser.cookies() == []


async def test_person_from_another_domain_is_refused_with_identity_denied(
    login_app: Served, idp: OidcIdp, open_browser: Callable[..., Any], tmp_path: Path
) -> None:
    browser = await start(open_browser, login_app, idp, "valid")
    await log_in(browser, login_app, idp, "bob@other.test")

    assert await browser.text() == "Access denied for this identity."
    await browser.screenshot(tmp_path / "bob-denied.png")
    denied = [r for r in requests(login_app) if r["reason"] == "identity_denied"]
    assert len(denied) == 1 and denied[0]["status"] == 403
    assert denied[0]["certificate"]["common_name"] == "device-001"
    assert "CF_Authorization" not in {c["name"] for c in await browser.cookies()}
