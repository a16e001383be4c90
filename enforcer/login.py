"""The login routes on every application's hostname: login, callback, logout (I2-I5, I10).

``GET /cdn-cgi/access/login`` starts an OpenID Connect authorization-code login (PKCE S256)
at one of the application's identity providers, binding ``state``, ``nonce`` and the PKCE
verifier to the browser in the signed ``CF_Access_Login`` cookie. ``GET
/cdn-cgi/access/callback`` checks the provider's answer against that cookie, uses the state
once (on every worker: used states live in the state database), exchanges the code, checks the
ID token (enforcer/oidc.py) and hands the identity to the pure ``decide`` with the
connection's certificate; admitted, the browser goes back to ``redirect_url`` with its session
cookie. ``GET /cdn-cgi/access/logout`` clears the session cookie and ends the session.

The login cookie is a JWT MACed (HS256) with a secret derived from the enforcer's current
signing key (``SigningKey.mac_key``), with ``type: "login"``
and the audience ``login:<aud>``: a session token (``type: "app"``, audience ``<aud>``) is never
accepted as a login cookie, nor a login cookie as a session token. Every failure answers 400
``login_failed``; the access log's detail names the check that failed.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import hashlib
import hmac
import ipaddress
import secrets
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

import jwt
import trio

from enforcer import control
from enforcer.application import COOKIE_NAME, Application
from enforcer.decision import AccessDecision, AccessRequest, decide
from enforcer.http import header_values
from enforcer.identity import CALLBACK_PATH, LOGIN_PATH, LOGOUT_PATH, IdentityProvider
from enforcer.oidc import OidcError, identity_from_id_token
from enforcer.reasons import Reason
from enforcer.snapshot import Snapshot
from enforcer.tokens import TokenStatus, check, parse_cookie_header

if TYPE_CHECKING:  # exchange imports this module
    from enforcer.exchange import RequestHead, RequestPath, Responder
    from enforcer.server import Enforcer

LOGIN_COOKIE = "CF_Access_Login"
LOGIN_LIFETIME = dt.timedelta(minutes=10)
LOGIN_TYPE = "login"
LOGIN_AUDIENCE_PREFIX = "login:"
# HMAC with the signing key's derived secret: only the enforcer reads its login cookies, and
# minting one for anyone who asks must stay cheap (an RS256 signature is ~1 ms here).
LOGIN_ALGORITHM = "HS256"
MAX_REDIRECT_URL = 1024  # the cookie carries it: a browser keeps cookies up to 4 KiB
MAX_QUERY_FIELDS = 16
MAX_USED_STATES = 100_000  # rows of the used-state table (each lives 10 minutes at most)
ROUTES = (LOGIN_PATH, CALLBACK_PATH, LOGOUT_PATH)


class LoginFailed(Exception):
    """A login step failed: 400 login_failed, ``check: message`` in the access log."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"{check}: {message}")
        self.check = check


@dataclasses.dataclass(frozen=True)
class LoginCookie:
    """What the login cookie binds to the browser between the login and the callback."""

    state: str
    nonce: str
    code_verifier: str | None
    idp: str
    redirect_url: str
    redirect_uri: str
    exp: int


def check_redirect_url(value: str) -> str:
    """Return ``value`` if it is a path on this hostname (I2), else raise LoginFailed."""
    if len(value) > MAX_REDIRECT_URL:
        raise LoginFailed("redirect_url", f"longer than {MAX_REDIRECT_URL} characters")
    if not value.startswith("/") or value.startswith("//"):
        raise LoginFailed("redirect_url", f"{value[:80]!r} is not a path starting with one '/'")
    # Browsers read "\" as "/" ("/\evil.test" is "//evil.test") and drop tabs and newlines.
    if "\\" in value or any(ord(c) < 0x21 or ord(c) == 0x7F for c in value):
        raise LoginFailed("redirect_url", f"{value[:80]!r} has a backslash or a control character")
    return value


def query_params(target: bytes) -> dict[str, str]:
    """The first value of each query parameter of a request target (bounded)."""
    query = target.split(b"?", 1)[1] if b"?" in target else b""
    try:
        pairs = parse_qsl(
            query.decode("ascii"),
            keep_blank_values=True,
            max_num_fields=MAX_QUERY_FIELDS,
            errors="strict",
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise LoginFailed("query", f"unusable query string: {exc}") from None
    params: dict[str, str] = {}
    for key, value in pairs:
        params.setdefault(key, value)
    return params


def providers_for(snapshot: Snapshot, app: Application) -> list[IdentityProvider]:
    """The identity providers that may log this application's users in, in its order."""
    known = snapshot.identity_providers
    return [known[i] for i in app.identity_providers if i in known]


def callback_uri(app: Application, host: str | None) -> str:
    """``https://{hostname}[:port]/cdn-cgi/access/callback`` for the application.

    The hostname is the application's (Host already equals SNI); the port is the one the
    browser named in Host, so the callback reaches this listener behind a port mapping. A forged
    port gains nothing: the provider redirects only to the URIs registered for its client.
    """
    port = ""
    if host and not host.endswith("]") and host.count(":") == 1:
        digits = host.rsplit(":", 1)[1]
        if digits.isdigit() and digits != "443":
            port = f":{int(digits)}"
    return f"https://{app.hostname}{port}{CALLBACK_PATH.decode()}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def pkce_challenge(verifier: str) -> str:
    """The S256 code challenge of a PKCE verifier (RFC 7636)."""
    return _b64(hashlib.sha256(verifier.encode()).digest())


def login_audience(app: Application) -> str:
    """The audience of an application's login cookies: never a session token's."""
    return LOGIN_AUDIENCE_PREFIX + app.aud


def mint_login_cookie(snapshot: Snapshot, app: Application, login: LoginCookie) -> str:
    """Sign the login cookie's claims with the enforcer's current key."""
    claims = {
        "type": LOGIN_TYPE,
        "aud": [login_audience(app)],
        "iss": snapshot.issuer,
        "iat": login.exp - int(LOGIN_LIFETIME.total_seconds()),
        "exp": login.exp,
        "state": login.state,
        "nonce": login.nonce,
        "idp": login.idp,
        "redirect_url": login.redirect_url,
        "redirect_uri": login.redirect_uri,
    }
    if login.code_verifier is not None:
        claims["code_verifier"] = login.code_verifier
    ring = snapshot.keyring
    return jwt.encode(
        claims, ring.current.mac_key, LOGIN_ALGORITHM, headers={"kid": ring.current.kid}
    )


def read_login_cookie(
    value: str, snapshot: Snapshot, app: Application, now: dt.datetime
) -> LoginCookie:
    """Verify a login cookie (signature, type, audience, issuer, expiry at ``now``)."""
    try:
        kid = jwt.get_unverified_header(value).get("kid")
        key = next((k for k in snapshot.keyring.accepted(now) if k.kid == kid), None)
        if key is None:
            raise LoginFailed("login_cookie", f"signed by an unknown key {kid!r}")
        claims: dict[str, Any] = jwt.decode(
            value,
            key.mac_key,
            algorithms=[LOGIN_ALGORITHM],
            audience=login_audience(app),
            issuer=snapshot.issuer,
            options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
        )
    except jwt.PyJWTError as exc:
        raise LoginFailed("login_cookie", f"not a valid login cookie: {exc}") from None
    if claims.get("type") != LOGIN_TYPE:
        raise LoginFailed("login_cookie", "not a login cookie")
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int) or now.timestamp() >= exp:
        raise LoginFailed("login_cookie", "expired: the login took over 10 minutes; start again")
    try:
        return LoginCookie(
            state=_str(claims, "state"),
            nonce=_str(claims, "nonce"),
            code_verifier=claims.get("code_verifier"),
            idp=_str(claims, "idp"),
            redirect_url=_str(claims, "redirect_url"),
            redirect_uri=_str(claims, "redirect_uri"),
            exp=exp,
        )
    except KeyError as exc:
        raise LoginFailed("login_cookie", f"no {exc.args[0]!r} claim") from None


def _str(claims: Mapping[str, Any], name: str) -> str:
    value = claims.get(name)
    if not isinstance(value, str):
        raise KeyError(name)
    return value


def login_cookie_header(value: str, max_age: int) -> bytes:
    """The Set-Cookie value of the login cookie (I2: HttpOnly, Secure, Lax, its own path)."""
    return (
        f"{LOGIN_COOKIE}={value}; Path=/cdn-cgi/access/; Max-Age={max_age}; Secure; HttpOnly; "
        "SameSite=Lax"
    ).encode()


class UsedStates:
    """Login states already used, in a table of the state database shared by all workers.

    A state is recorded by its SHA-256 until its login cookie expires; a second use is refused
    (I3). Writes run in a thread, one at a time per process; SQLite serialises the processes.
    """

    _SCHEMA = """
    CREATE TABLE IF NOT EXISTS login_states (state TEXT PRIMARY KEY, expires REAL NOT NULL);
    CREATE INDEX IF NOT EXISTS login_states_expires ON login_states (expires);
    """

    def __init__(self, path: Path | str, max_rows: int = MAX_USED_STATES) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA busy_timeout = 10000")
        self._db.executescript(self._SCHEMA)
        self.max_rows = max_rows
        self._lock = trio.Lock()

    def close(self) -> None:
        """Close the database connection."""
        self._db.close()

    def _use(self, digest: str, expires: float, now: float) -> str | None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM login_states WHERE expires <= ?", (now,))
            (rows,) = db.execute("SELECT COUNT(*) FROM login_states").fetchone()
            if rows >= self.max_rows:
                problem: str | None = f"over {self.max_rows} logins in progress; try again later"
            else:
                cursor = db.execute(
                    "INSERT OR IGNORE INTO login_states (state, expires) VALUES (?, ?)",
                    (digest, expires),
                )
                problem = None if cursor.rowcount == 1 else "this state was already used"
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return problem

    async def use(self, state: str, expires: int, now: dt.datetime) -> None:
        """Record ``state`` as used until ``expires``; raise LoginFailed if it was used."""
        digest = hashlib.sha256(state.encode()).hexdigest()
        async with self._lock:
            try:
                problem = await trio.to_thread.run_sync(
                    self._use, digest, float(expires), now.timestamp()
                )
            except sqlite3.Error as exc:
                raise LoginFailed("state", f"cannot record the state: {exc}") from None
        if problem is not None:
            raise LoginFailed("state", problem)

    async def forget(self, state: str) -> None:
        """Drop a used state whose login failed at the provider, so failed callbacks (codes
        an attacker made up) cannot fill the table and lock people out; a code that worked
        keeps its state used until it expires."""
        digest = hashlib.sha256(state.encode()).hexdigest()
        async with self._lock:
            with contextlib.suppress(sqlite3.Error):
                await trio.to_thread.run_sync(self._forget, digest)

    def _forget(self, digest: str) -> None:
        self._db.execute("DELETE FROM login_states WHERE state = ?", (digest,))


@dataclasses.dataclass
class LoginRoute:
    """One request to a login route, with what the request path already established."""

    path: RequestPath
    request: RequestHead
    port: Responder
    snapshot: Snapshot
    app: Application
    now: dt.datetime
    t0: float
    close: bool

    @property
    def host(self) -> str | None:
        """The request's Host (already checked against SNI)."""
        values = header_values(self.request.headers, b"host")
        return values[0] if values else None

    def cookie(self, name: str) -> str | None:
        """A cookie of the request."""
        return parse_cookie_header(header_values(self.request.headers, b"cookie"), name)

    async def serve(self) -> None:
        """Answer the route; a LoginFailed becomes 400 login_failed."""
        route = self.request.target.split(b"?", 1)[0]
        if self.request.method != b"GET":
            self.path._log(self.request, self.now, self.t0, status=405, refused="GET only")
            await self.port.answer(
                405,
                [(b"allow", b"GET"), (b"content-type", b"text/plain; charset=utf-8")],
                b"Method not allowed.\n",
                close=self.close,
            )
            return
        try:
            if route == LOGIN_PATH:
                await self.login()
            elif route == CALLBACK_PATH:
                await self.callback()
            else:
                await self.logout()
        except (LoginFailed, OidcError) as exc:
            decision = AccessDecision(
                400,
                Reason.LOGIN_FAILED,
                str(exc),
                application=self.app,
                close_connection=self.close,
            )
            await self.path._deny(
                self.request, self.port, decision, self.now, self.t0, close=self.close
            )

    async def _redirect(
        self, location: str, cookies: list[bytes], decision: AccessDecision | None = None
    ) -> None:
        headers = [
            (b"location", location.encode()),
            (b"cache-control", b"no-store"),
            *((b"set-cookie", c) for c in cookies),
        ]
        self.path._log(self.request, self.now, self.t0, decision=decision, status=302)
        await self.port.answer(302, headers, b"", close=self.close)

    async def login(self) -> None:
        """I2: 302 to the provider's authorization endpoint, with the login cookie."""
        params = query_params(self.request.target)
        redirect_url = check_redirect_url(params.get("redirect_url") or "/")
        providers = providers_for(self.snapshot, self.app)
        if not providers:
            raise LoginFailed(
                "idp", f"no identity provider may log users in to {self.app.hostname}"
            )
        wanted = params.get("idp")
        provider = next((p for p in providers if p.id == wanted), None) if wanted else providers[0]
        if provider is None:
            raise LoginFailed("idp", f"{wanted!r} is not an identity provider of this application")
        meta = await self.path.e.oidc.metadata(provider)
        login = LoginCookie(
            state=secrets.token_urlsafe(32),
            nonce=secrets.token_urlsafe(32),
            code_verifier=secrets.token_urlsafe(48) if provider.pkce_enabled else None,
            idp=provider.id,
            redirect_url=redirect_url,
            redirect_uri=callback_uri(self.app, self.host),
            exp=int(self.now.timestamp() + LOGIN_LIFETIME.total_seconds()),
        )
        query = {
            "response_type": "code",
            "client_id": provider.client_id,
            "redirect_uri": login.redirect_uri,
            "scope": " ".join(provider.scopes),
            "state": login.state,
            "nonce": login.nonce,
        }
        if login.code_verifier is not None:
            query |= {
                "code_challenge": pkce_challenge(login.code_verifier),
                "code_challenge_method": "S256",
            }
        sep = "&" if "?" in meta.authorization_endpoint else "?"
        cookie = mint_login_cookie(self.snapshot, self.app, login)
        max_age = int(LOGIN_LIFETIME.total_seconds())
        await self._redirect(
            meta.authorization_endpoint + sep + urlencode(query),
            [login_cookie_header(cookie, max_age)],
        )

    async def callback(self) -> None:
        """I3-I5: check the provider's answer, exchange the code, decide with the identity."""
        params = query_params(self.request.target)
        if "error" in params:
            description = params.get("error_description", "")[:200]
            raise LoginFailed(
                "provider", f"the provider answered {params['error'][:64]!r}: {description}"
            )
        value = self.cookie(LOGIN_COOKIE)
        if value is None:
            raise LoginFailed(
                "login_cookie", f"no {LOGIN_COOKIE} cookie: start at {LOGIN_PATH.decode()}"
            )
        login = read_login_cookie(value, self.snapshot, self.app, self.now)
        state = params.get("state", "")
        if not hmac.compare_digest(state.encode(), login.state.encode()):
            raise LoginFailed("state", "the state is not the login cookie's")
        provider = next(
            (p for p in providers_for(self.snapshot, self.app) if p.id == login.idp), None
        )
        if provider is None:
            raise LoginFailed("idp", f"{login.idp!r} may no longer log users in here")
        if "iss" in params and params["iss"] != provider.issuer_url:
            # RFC 9207: the answer names another issuer than the one the login went to.
            raise LoginFailed("iss", f"the answer comes from {params['iss'][:200]!r}")
        code = params.get("code")
        if not code:
            raise LoginFailed("code", "the callback has no code")
        # Used before the exchange: a replay racing the first use is refused too.
        await self.path.e.login_states.use(login.state, login.exp, self.now)
        oidc = self.path.e.oidc
        try:
            id_token = await oidc.exchange_code(
                provider, code, login.redirect_uri, login.code_verifier
            )
        except OidcError:
            # The provider took no code from this state: nothing was logged in with it.
            await self.path.e.login_states.forget(login.state)
            raise
        claims = await oidc.id_token_claims(provider, id_token, login.nonce, self.now)
        identity = identity_from_id_token(claims, provider, secrets.token_urlsafe(24))
        hostname = self.app.hostname
        sni = self.path.tls.sni
        chain = self.path._validate(self.snapshot, hostname, self.now)
        access = AccessRequest(
            sni=sni, host=self.host, client_ip=_ip(self.path.peer), identity=identity
        )
        decision = decide(access, self.snapshot, chain, self.now, self.path.e.token_memo)
        clear = login_cookie_header("", 0)
        if not decision.allowed:
            await self.path._deny(
                self.request,
                self.port,
                decision,
                self.now,
                self.t0,
                close=decision.close_connection or self.close,
            )
            return
        cookies = [clear]
        if decision.set_cookie:
            cookies.insert(0, decision.set_cookie.encode())
        await self._redirect(login.redirect_url, cookies, decision)

    async def logout(self) -> None:
        """I10: clear the session cookie and end the session on every worker."""
        cleared = self.app.cookie.set_cookie("", dt.timedelta(0)).encode()
        ended = await end_session(self.path.e, self.cookie(COOKIE_NAME), self.app, self.now)
        self.path._log(self.request, self.now, self.t0, status=200)
        text = "You are logged out.\n" if ended else "No session to end; the cookie is cleared.\n"
        await self.port.answer(
            200,
            [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"cache-control", b"no-store"),
                (b"set-cookie", cleared),
            ],
            text.encode(),
            close=self.close,
        )


async def end_session(
    enforcer: Enforcer, token: str | None, app: Application, now: dt.datetime
) -> bool:
    """End the person's session a session token names (I10); False when it names none.

    The ended ``identity_nonce`` is a durable change of the state database, so every worker
    refuses the token from its next request on (they follow the store), and a restart too.
    """
    if token is None:
        return False
    snapshot = enforcer.snapshot
    checked = check(token, snapshot.keyring, aud=app.aud, issuer=snapshot.issuer, now=now)
    nonce = (checked.claims or {}).get("identity_nonce")
    if checked.status is not TokenStatus.VALID or not isinstance(nonce, str) or not nonce:
        return False
    if nonce in snapshot.ended_identity_nonces:
        return True  # already ended: a repeated logout writes nothing (each write is durable)
    expires = dt.datetime.fromtimestamp(float((checked.claims or {})["exp"]), dt.UTC)
    await enforcer.controller.write(
        lambda objects, at: control.end_identity_session(objects, nonce, expires, at)
    )
    return True


def _ip(peer: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    # As exchange.ip_or_none (which imports this module, so not imported from there).
    try:
        return ipaddress.ip_address(peer) if peer else None
    except ValueError:
        return None
