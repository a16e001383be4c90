"""People and automated clients beside the devices: a person who logs in, a service token.

A :class:`PersonClient` is one person on one laptop: an email and a password for the identity
provider (IdP) and, optionally, the laptop's client certificate from a fleet key store. It
behaves like a browser, programmatically: a navigation (``Accept: text/html``) to the
application, the enforcer's 302 to its login route, the route's 302 to the provider's
authorization endpoint, the provider's HTML login form (parsed generically with
:mod:`html.parser`: the form's action, its hidden inputs, the username and password fields,
then a consent form when the provider shows one), the provider's 302 back to the enforcer's
callback, the ``CF_Authorization`` cookie; then the session's requests carry the cookie (and
the certificate, on the same kind of mTLS connection a device makes: :mod:`devices.client`).

A :class:`ServiceTokenClient` is an automated client without a certificate: every request
carries ``CF-Access-Client-Id`` and ``CF-Access-Client-Secret``.

Every request returns an :class:`~devices.client.Attempt`; a person's is a
:class:`PersonAttempt` whose ``login`` and ``callback`` say how long the provider's round trips
and the enforcer's callback took, when this request had to log in first. Outcomes name the
enforcer's reason codes (``denied:login_required``, ``denied:identity_denied``,
``denied:login_failed``, ``denied:no_certificate``...); a login the provider did not complete
is ``login_error:<what>`` (``login_error:credentials_rejected`` for a wrong password).

This module is the devices' side: it never imports the enforcer; the route paths and header
names below are the wire's (docs/access-flow.md I2, I3, I11).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ssl
import urllib.parse
from collections.abc import Sequence
from html.parser import HTMLParser
from pathlib import Path

import h11
import trio

from devices.client import (
    COOKIE_NAME,
    Attempt,
    ClientOptions,
    DeviceClient,
    Target,
    open_tcp,
)
from devices.keystore import KeyStore

LOGIN_PATH = "/cdn-cgi/access/login"
CALLBACK_PATH = "/cdn-cgi/access/callback"
CLIENT_ID_HEADER = "CF-Access-Client-Id"
CLIENT_SECRET_HEADER = "CF-Access-Client-Secret"
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
# What a person's client reads from a provider, at most: a login page is a few KiB. A provider
# that sends more (or redirects without end) fails the login rather than the load generator.
MAX_PAGE = 512 * 1024
MAX_HEADERS = 64 * 1024
MAX_HOPS = 20  # redirects and form posts in one login
MAX_FORMS = 16
MAX_FIELDS = 64
MAX_COOKIES = 64
USERNAME_NAMES = ("login", "username", "user", "email", "identifier", "user_name")


class LoginError(Exception):
    """The login did not complete at the provider; ``code`` names what went wrong."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code, self.detail = code, detail


# -- HTML forms ------------------------------------------------------------------------------


@dataclasses.dataclass
class Form:
    """One HTML form: where it goes, and its fields in document order."""

    action: str
    method: str = "get"
    fields: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    password: str | None = None  # the password field's name
    username: str | None = None  # the username/login/email field's name
    submit: tuple[str, str] | None = None  # the first named submit button


class FormParser(HTMLParser):
    """Collect the forms of a page (bounded: :data:`MAX_FORMS` forms, :data:`MAX_FIELDS` each)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[Form] = []
        self._form: Form | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        """Open a form, or add an input or button to the open one."""
        a = {k.lower(): (v or "") for k, v in attrs}
        if tag == "form":
            if len(self.forms) < MAX_FORMS:
                self._form = Form(a.get("action", ""), (a.get("method") or "get").lower())
                self.forms.append(self._form)
            return
        form = self._form
        if form is None or tag not in ("input", "button") or len(form.fields) >= MAX_FIELDS:
            return
        name, kind = a.get("name", ""), (a.get("type") or ("submit" if tag == "button" else "text"))
        kind = kind.lower()
        if not name:
            return
        if kind == "submit":
            if form.submit is None:
                form.submit = (name, a.get("value", ""))
            return
        if kind in ("checkbox", "radio") and "checked" not in a:
            return
        if kind == "password":
            form.password = form.password or name
        elif kind in ("text", "email") and name.lower() in USERNAME_NAMES:
            form.username = form.username or name
        form.fields.append((name, a.get("value", "")))

    def handle_endtag(self, tag: str) -> None:
        """Close the open form."""
        if tag == "form":
            self._form = None


def parse_forms(html: str) -> list[Form]:
    """The forms of an HTML page."""
    parser = FormParser()
    parser.feed(html)
    parser.close()
    return parser.forms


def fill(form: Form, email: str, password: str) -> list[tuple[str, str]]:
    """The fields a person submits: the form's own, with the username and password typed in."""
    typed = {form.username: email, form.password: password} if form.password else {}
    out = [(name, typed.get(name, value)) for name, value in form.fields]
    if form.submit is not None:
        out.append(form.submit)
    return out


# -- cookies (what a browser keeps per host, enough for a login) -----------------------------


@dataclasses.dataclass
class _Cookie:
    value: str
    path: str
    expires: float | None  # trio time, from Max-Age


class CookieJar:
    """Cookies per host: name, value, path and Max-Age (bounded: :data:`MAX_COOKIES`)."""

    def __init__(self) -> None:
        self._cookies: dict[tuple[str, str], _Cookie] = {}

    def take(self, host: str, headers: Sequence[tuple[str, str]]) -> None:
        """Keep the ``Set-Cookie`` headers of a response from ``host``."""
        for name, value in headers:
            if name.lower() != "set-cookie":
                continue
            parts = [p.strip() for p in value.split(";")]
            if "=" not in parts[0]:
                continue
            key, val = parts[0].split("=", 1)
            attrs = {
                p.split("=", 1)[0].lower(): (p.split("=", 1)[1] if "=" in p else "")
                for p in parts[1:]
            }
            path = attrs.get("path") or "/"
            expires = None
            if "max-age" in attrs:
                with contextlib.suppress(ValueError):
                    expires = trio.current_time() + int(attrs["max-age"])
            gone = not val or (expires is not None and expires <= trio.current_time())
            # An Expires in the past is how most servers (oidc-provider) clear a cookie.
            gone = gone or "1970" in attrs.get("expires", "")
            if gone:
                self._cookies.pop((host, key), None)
            elif len(self._cookies) < MAX_COOKIES or (host, key) in self._cookies:
                self._cookies[(host, key)] = _Cookie(val, path, expires)

    def get(self, host: str, name: str) -> str | None:
        """A cookie's value, when it is held and not expired."""
        cookie = self._cookies.get((host, name))
        if cookie is None:
            return None
        if cookie.expires is not None and trio.current_time() >= cookie.expires:
            del self._cookies[(host, name)]
            return None
        return cookie.value

    def drop(self, host: str, name: str) -> None:
        """Forget one cookie."""
        self._cookies.pop((host, name), None)

    def header(self, host: str, path: str) -> str | None:
        """The ``Cookie`` header for a request to ``host`` at ``path``."""
        pairs = []
        for (h, name), c in list(self._cookies.items()):
            if h != host or not path.startswith(c.path.rstrip("/") or "/"):
                continue
            if self.get(h, name) is not None:
                pairs.append(f"{name}={c.value}")
        return "; ".join(pairs) or None


# -- one exchange with the provider ----------------------------------------------------------


@dataclasses.dataclass
class Response:
    """A provider's answer, bounded by :data:`MAX_PAGE`."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of a header."""
        return next((v for k, v in self.headers if k == name), None)


async def fetch(
    url: str,
    ctx: ssl.SSLContext,
    *,
    method: str = "GET",
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
) -> Response:
    """One HTTPS request on its own connection (a provider's page, a form post)."""
    u = urllib.parse.urlsplit(url)
    if u.scheme != "https" or not u.hostname:
        raise LoginError("insecure_provider", f"the login went to {url!r}, not an https URL")
    port = u.port or 443
    tcp = await open_tcp(u.hostname, port)
    stream = trio.SSLStream(tcp, ctx, server_hostname=u.hostname)
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADERS)
    target = (u.path or "/") + (f"?{u.query}" if u.query else "")
    hdrs = [
        ("host", u.netloc),
        ("user-agent", "mtls-testbed-person"),
        ("accept", BROWSER_ACCEPT),
        ("connection", "close"),
        *headers,
    ]
    if body or method == "POST":
        hdrs.append(("content-length", str(len(body))))
    try:
        await stream.do_handshake()
        data = conn.send(h11.Request(method=method, target=target, headers=hdrs))
        data += conn.send(h11.Data(data=body)) if body else b""
        data += conn.send(h11.EndOfMessage())
        await stream.send_all(data)
        response: h11.Response | None = None
        chunks: list[bytes] = []
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(65536)))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_PAGE:
                    raise LoginError("provider_page_too_large", f"{url}: above {MAX_PAGE} bytes")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
    except (OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
        raise LoginError("provider_unreachable", f"{url}: {type(exc).__name__}: {exc}") from exc
    finally:
        await trio.aclose_forcefully(stream)
    if response is None:
        raise LoginError("provider_unreachable", f"{url}: no response")
    return Response(
        response.status_code,
        [(k.decode().lower(), v.decode("latin-1")) for k, v in response.headers],
        b"".join(chunks),
    )


# -- the person ------------------------------------------------------------------------------


@dataclasses.dataclass
class PersonAttempt(Attempt):
    """A person's request: an :class:`Attempt`, with the login it needed first (seconds)."""

    login: float = 0.0  # the first navigation, the login route and the provider's round trips
    callback: float = 0.0  # the enforcer's callback: code exchange, ID token, decision
    logged_in: bool = False  # this request logged in first


class PersonClient:
    """A person on a laptop: a browser-like login at the provider, then the session's requests.

    ``target`` is the enforcer (its ``server_name`` the application's hostname); a URL on that
    hostname goes to the enforcer, any other https URL to the provider, trusted with
    ``idp_ca`` (None: the system's trust).
    """

    def __init__(
        self,
        target: Target,
        email: str,
        password: str,
        key_store: KeyStore | None = None,
        options: ClientOptions | None = None,
        *,
        idp_ca: Path | None = None,
    ) -> None:
        self.email, self.password = email, password
        self.options = options or ClientOptions()
        # The jar keeps the cookies (the session's and the login's), not the device client.
        self.http = DeviceClient(
            target, key_store, dataclasses.replace(self.options, reuse_cookie=False)
        )
        self.host = target.server_name
        self.jar = CookieJar()
        self._idp_ctx = ssl.create_default_context(cafile=str(idp_ca) if idp_ca else None)
        self.logins = 0  # logins completed

    @property
    def session(self) -> str | None:
        """The ``CF_Authorization`` cookie this person holds, while it lasts."""
        return self.jar.get(self.host, COOKIE_NAME)

    def forget_session(self) -> None:
        """Drop the session cookie (a closed browser)."""
        self.jar.drop(self.host, COOKIE_NAME)

    async def aclose(self) -> None:
        """Close the kept-alive connection to the enforcer."""
        await self.http.aclose()

    async def _enforcer(
        self,
        attempt: PersonAttempt,
        path: str,
        *,
        method: str = "GET",
        body: bytes = b"",
        browser: bool = False,
    ) -> Attempt:
        """One request to the enforcer with this person's cookies; its connection timings
        are added to ``attempt``'s."""
        headers = [("accept", BROWSER_ACCEPT)] if browser else []
        cookie = self.jar.header(self.host, path.split("?", 1)[0])
        if cookie:
            headers.append(("cookie", cookie))
        a = await self.http.request(path, method=method, body=body, headers=headers)
        self.jar.take(self.host, a.headers)
        t, u = attempt.timings, a.timings
        t.connect += u.connect
        t.key_store += u.key_store
        t.handshake += u.handshake
        if a.new_connection:
            attempt.new_connection = True
            attempt.resumed = a.resumed
        return a

    async def request(self, path: str = "/", *, method: str = "GET", body: bytes = b"") -> Attempt:
        """Send one request of the session, logging in first when there is no session."""
        start = trio.current_time()
        attempt = PersonAttempt(outcome="timeout")
        # A login is several exchanges: each has the client's timeout, the whole login a few.
        with trio.move_on_after(self.options.timeout * 4):
            try:
                await self._request(attempt, path, method, body)
            except LoginError as exc:
                attempt.outcome, attempt.error = f"login_error:{exc.code}", exc.detail
        attempt.timings.total = trio.current_time() - start
        return attempt

    async def _request(self, attempt: PersonAttempt, path: str, method: str, body: bytes) -> None:
        if self.session is None and not await self._login(attempt, path):
            return
        a = await self._enforcer(attempt, path, method=method, body=body)
        if (a.status == 401 or _login_redirect(a)) and not attempt.logged_in:
            # The session ended on the enforcer (logout, revocation, expiry): log in again,
            # once (a session just made and refused at once is the enforcer's answer).
            self.forget_session()
            if not await self._login(attempt, path):
                return
            a = await self._enforcer(attempt, path, method=method, body=body)
        self._finish(attempt, a)
        attempt.cookie_sent = True  # the request went with the session cookie

    def _finish(self, attempt: PersonAttempt, a: Attempt) -> None:
        """Take the enforcer's answer as the attempt's outcome."""
        attempt.outcome, attempt.status, attempt.reason = a.outcome, a.status, a.reason
        attempt.error, attempt.headers, attempt.body = a.error, a.headers, a.body
        attempt.timings.first_byte = a.timings.first_byte
        attempt.cookie_received = attempt.cookie_received or a.cookie_received

    async def _login(self, attempt: PersonAttempt, path: str) -> bool:
        """Navigate to ``path`` and log in; True once the session cookie is held, else the
        attempt holds the outcome."""
        start, setup = trio.current_time(), _setup(attempt)
        a = await self._enforcer(attempt, path, browser=True)
        if not _login_redirect(a):
            # No login offered: the enforcer decided at once (a certificate refusal, a
            # non-browser 401) or let the person in without one.
            self._finish(attempt, a)
            return False
        attempt.logged_in = True
        url = urllib.parse.urljoin(f"https://{self.host}{path}", _location(a) or "")
        for _ in range(MAX_HOPS):
            u = urllib.parse.urlsplit(url)
            if u.hostname != self.host:
                url = await self.authorize(url)
                continue
            local = (u.path or "/") + (f"?{u.query}" if u.query else "")
            if u.path == CALLBACK_PATH:
                attempt.login = self._since(attempt, start, setup)
                return await self._callback(attempt, local)
            a = await self._enforcer(attempt, local, browser=True)
            if a.status not in (301, 302, 303, 307, 308):
                attempt.login = self._since(attempt, start, setup)
                self._finish(attempt, a)
                return False
            url = urllib.parse.urljoin(url, _location(a) or "")
        raise LoginError("too_many_redirects", f"no callback after {MAX_HOPS} steps")

    @staticmethod
    def _since(attempt: PersonAttempt, start: float, setup: float) -> float:
        """Time since ``start``, less the enforcer connections opened meanwhile (their connect
        and handshake are the attempt's own phases, not the login's)."""
        return max(trio.current_time() - start - (_setup(attempt) - setup), 0.0)

    async def authorize(self, url: str) -> str:
        """Follow the provider from ``url`` (its authorization endpoint), logging in on its
        forms, until it sends the browser back to the application; return that URL."""
        submitted: set[str] = set()
        for _ in range(MAX_HOPS):
            if urllib.parse.urlsplit(url).hostname == self.host:
                return url
            url = await self._provider_step(url, submitted)
        raise LoginError("too_many_redirects", f"the provider did not redirect back: {url}")

    async def _provider_step(self, url: str, submitted: set[str]) -> str:
        """One page of the provider: follow its redirect or submit its form; the next URL."""
        host = urllib.parse.urlsplit(url).netloc
        cookie = self.jar.header(host, urllib.parse.urlsplit(url).path or "/")
        r = await fetch(url, self._idp_ctx, headers=[("cookie", cookie)] if cookie else [])
        for _ in range(2):  # a page, then perhaps the answer to its form
            self.jar.take(host, r.headers)
            if r.status in (301, 302, 303, 307, 308):
                location = r.header("location")
                if not location:
                    raise LoginError("provider_error", f"{url}: {r.status} without a Location")
                return urllib.parse.urljoin(url, location)
            forms = parse_forms(r.body.decode("utf-8", "replace"))
            form = next((f for f in forms if f.password), None) or (forms[0] if forms else None)
            action = urllib.parse.urljoin(url, (form.action if form else "") or url)
            if form is not None and form.password and action in submitted:
                # The same login form again after the password (often with a 401 or 400): the
                # provider refused it.
                raise LoginError("credentials_rejected", f"{url}: {self.email}'s login refused")
            if r.status != 200:
                raise LoginError(f"provider_http_{r.status}", f"{url}: {r.body[:200]!r}")
            if form is None:
                raise LoginError("no_login_form", f"{url}: a page without a form")
            if form.password:
                if form.username is None:
                    raise LoginError(
                        "no_login_form", f"{url}: no username field beside the password"
                    )
                submitted.add(action)
            encoded = urllib.parse.urlencode(fill(form, self.email, self.password))
            host = urllib.parse.urlsplit(action).netloc
            cookie = self.jar.header(host, urllib.parse.urlsplit(action).path or "/")
            headers = [("cookie", cookie)] if cookie else []
            if form.method == "post":
                headers.append(("content-type", "application/x-www-form-urlencoded"))
                r = await fetch(
                    action, self._idp_ctx, method="POST", headers=headers, body=encoded.encode()
                )
            else:
                sep = "&" if urllib.parse.urlsplit(action).query else "?"
                r = await fetch(action + sep + encoded, self._idp_ctx, headers=headers)
            url = action
        self.jar.take(host, r.headers)
        location = r.header("location")
        if r.status in (301, 302, 303, 307, 308) and location:
            return urllib.parse.urljoin(url, location)
        raise LoginError("provider_error", f"{url}: forms without end ({r.status})")

    async def _callback(self, attempt: PersonAttempt, local: str) -> bool:
        """The provider's redirect back to the enforcer: the session cookie, or the denial."""
        start = trio.current_time()
        a = await self._enforcer(attempt, local, browser=True)
        attempt.callback = trio.current_time() - start
        if a.status in (301, 302, 303, 307, 308) and self.session is not None:
            self.logins += 1
            attempt.cookie_received = True
            return True
        self._finish(attempt, a)
        if a.status in (301, 302, 303):
            # Redirected without a session: the enforcer answered the callback but set no
            # cookie (No Duration keeps the token from the client).
            attempt.outcome = "login_error:no_session_cookie"
        return False


def _setup(attempt: Attempt) -> float:
    """Connection setup so far: connect and handshake (the handshake includes the key store)."""
    return attempt.timings.connect + attempt.timings.handshake


def _location(a: Attempt) -> str | None:
    return next((v for k, v in a.headers if k.lower() == "location"), None)


def _login_redirect(a: Attempt) -> bool:
    """The enforcer sent the browser to its login route (I7)."""
    location = _location(a) or ""
    return a.status in (302, 303) and urllib.parse.urlsplit(location).path == LOGIN_PATH


# -- a service token -------------------------------------------------------------------------


class ServiceTokenClient:
    """An automated client without a certificate, presenting a service token (I11)."""

    def __init__(
        self,
        target: Target,
        client_id: str,
        client_secret: str,
        options: ClientOptions | None = None,
    ) -> None:
        self.client_id, self.client_secret = client_id, client_secret
        self.http = DeviceClient(target, None, options)

    async def request(self, path: str = "/", *, method: str = "GET", body: bytes = b"") -> Attempt:
        """One request with the token's headers."""
        return await self.http.request(
            path,
            method=method,
            body=body,
            headers=[
                (CLIENT_ID_HEADER, self.client_id),
                (CLIENT_SECRET_HEADER, self.client_secret),
            ],
        )

    async def aclose(self) -> None:
        """Close the kept-alive connection."""
        await self.http.aclose()
