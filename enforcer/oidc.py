"""OpenID Connect relying party: discovery, the provider's keys, the code exchange, ID tokens.

Access-flow I1-I4. :class:`OidcClient` is owned by the Enforcer (one per process): it caches
each provider's discovery document and JWKS, and talks to the provider through the enforcer's
own origin client (``enforcer.proxy.origin_request``: https verified with the provider's
``ca_pem``, or the system store), with a timeout and a cap on every response's size, so a slow
or hostile provider costs a bounded amount of time and memory per login.

:func:`verify_id_token` is pure: the claims are checked at the injected ``now`` (pyjwt's own
clock checks are off, as in enforcer/tokens.py). Every failure is an :class:`OidcError` whose
``check`` names what failed, for the access log.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hmac
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import quote_plus, urlencode, urlsplit

import jwt
import trio

from enforcer.identity import Identity, IdentityProvider
from enforcer.proxy import OriginError, OriginPool, origin_request

DISCOVERY_PATH = "/.well-known/openid-configuration"
MAX_RESPONSE_BYTES = 256 * 1024  # a discovery document, a JWKS or a token response
MAX_JWKS_KEYS = 64
REQUEST_TIMEOUT = 10.0  # seconds for one whole request to the provider
METADATA_LIFETIME = 3600.0  # seconds a discovery document is reused
JWKS_LIFETIME = 3600.0  # seconds a JWKS is reused
UNKNOWN_KID_INTERVAL = 60.0  # at most one JWKS fetch a minute for a key id not held (I1)
# After a failed discovery or JWKS fetch, logins fail at once for this long instead of asking
# the provider again: anyone can start a login, and a provider that is down or slow must not
# cost one outgoing connection (and a task waiting REQUEST_TIMEOUT) per request.
RETRY_AFTER_FAILURE = 10.0
LEEWAY = dt.timedelta(seconds=60)  # clock skew allowed on exp / iat / nbf (I3)
_T = TypeVar("_T")
NEVER_ALLOWED = ("none",)  # and every HS*: a client secret is not a provider's signature


class OidcError(Exception):
    """A login step failed; ``check`` names which (the access log's detail)."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"{check}: {message}")
        self.check = check
        self.message = message


class ProviderUnreachable(OidcError):
    """The provider could not be reached, or answered something unusable."""


class IdTokenRejected(OidcError):
    """The ID token failed one of the checks of access-flow I3."""


@dataclasses.dataclass(frozen=True)
class ProviderMetadata:
    """What the enforcer uses of a provider's discovery document (or explicit endpoints)."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    token_auth_methods: tuple[str, ...] = ("client_secret_basic",)

    @property
    def token_auth_method(self) -> str:
        """client_secret_basic unless the provider supports only client_secret_post."""
        if (
            "client_secret_basic" not in self.token_auth_methods
            and "client_secret_post" in self.token_auth_methods
        ):
            return "client_secret_post"
        return "client_secret_basic"


def allowed_algorithms(provider: IdentityProvider) -> tuple[str, ...]:
    """The provider's allowed ID-token algorithms, minus ``none`` and HS* whatever it says."""
    return tuple(
        a
        for a in provider.allowed_algorithms
        if a.lower() not in NEVER_ALLOWED and not a.upper().startswith("HS")
    )


def _https_url(url: str, what: str) -> tuple[str, str]:
    """Split an https URL into (origin, target); refuse anything else with a clear message."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "https" or not parts.hostname:
        raise ProviderUnreachable(what, f"{url!r} is not an https:// URL")
    if parts.username or parts.password:
        raise ProviderUnreachable(what, f"{url!r} carries credentials; name them in the provider")
    origin = f"https://{parts.netloc}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return origin, target


@dataclasses.dataclass
class _Keys:
    """A provider's JWKS as fetched: usable keys by kid, and when (trio time) it was fetched."""

    keys: dict[str, dict[str, Any]]
    fetched: float


class OidcClient:
    """Talks to identity providers for one enforcer process, caching metadata and JWKS.

    Cache lifetimes use trio's monotonic clock: they say when to fetch again, never whether a
    token is valid (that is the injected ``now`` of :func:`verify_id_token`).
    """

    def __init__(
        self,
        origins: OriginPool,
        timeout: float = REQUEST_TIMEOUT,
        monotonic: Callable[[], float] = trio.current_time,
    ) -> None:
        self.origins = origins
        self.timeout = timeout
        self.monotonic = monotonic  # seconds; tests step it to expire the caches
        # Keyed by everything that says where the document comes from: a provider changed
        # through the admin API (another issuer, CA or endpoint) never reuses a stale entry.
        self._metadata: dict[tuple[str, ...], tuple[ProviderMetadata, float]] = {}
        self._keys: dict[tuple[str, ...], _Keys] = {}
        self._unknown_kid_fetch: dict[tuple[str, ...], float] = {}
        # One fetch at a time per document, and its failure remembered (RETRY_AFTER_FAILURE).
        self._locks: dict[tuple[str, ...], trio.Lock] = {}
        self._failures: dict[tuple[str, ...], tuple[OidcError, float]] = {}

    async def _fetch_once(
        self,
        key: tuple[str, ...],
        fetch: Callable[[], Awaitable[_T]],
        cached: Callable[[], _T | None],
    ) -> _T:
        """Run ``fetch`` for ``key`` one task at a time: tasks that waited take what it got
        (``cached``), and a failure is answered again, without a fetch, for a while."""
        async with self._locks.setdefault(key, trio.Lock()):
            hit = cached()
            if hit is not None:
                return hit
            failed = self._failures.get(key)
            if failed is not None and self.monotonic() < failed[1] + RETRY_AFTER_FAILURE:
                exc = failed[0]
                raise type(exc)(exc.check, f"{exc.message} (not asked again for a few seconds)")
            try:
                result = await fetch()
            except OidcError as exc:
                self._failures[key] = (exc, self.monotonic())
                raise
            self._failures.pop(key, None)
            return result

    async def fetch(
        self,
        url: str,
        provider: IdentityProvider,
        what: str,
        *,
        method: bytes = b"GET",
        headers: Sequence[tuple[bytes, bytes]] = (),
        body: bytes = b"",
    ) -> tuple[int, bytes]:
        """One request to the provider: (status, body), the body capped at MAX_RESPONSE_BYTES."""
        origin, target = _https_url(url, what)
        host = urlsplit(url).netloc.encode()
        sent = [(b"host", host), (b"accept", b"application/json"), *headers]
        chunks: list[bytes] = []
        size = 0
        try:
            with trio.fail_after(self.timeout):
                async with origin_request(
                    origin,
                    method,
                    target.encode(),
                    sent,
                    body,
                    self.timeout,
                    self.origins,
                    origin_ca=provider.ca_pem,
                ) as response:
                    async for chunk in response.body:
                        size += len(chunk)
                        if size > MAX_RESPONSE_BYTES:
                            raise ProviderUnreachable(
                                what, f"{url} answered over {MAX_RESPONSE_BYTES} bytes"
                            )
                        chunks.append(chunk)
                    status = response.status
        except OriginError as exc:
            raise ProviderUnreachable(what, f"{url}: {exc}") from None
        except trio.TooSlowError:
            raise ProviderUnreachable(
                what, f"{url} did not answer within {self.timeout} s"
            ) from None
        return status, b"".join(chunks)

    async def _json(self, url: str, provider: IdentityProvider, what: str) -> dict[str, Any]:
        status, data = await self.fetch(url, provider, what)
        if status != 200:
            raise ProviderUnreachable(what, f"{url} answered HTTP {status}")
        return _json_object(data, url, what)

    async def metadata(self, provider: IdentityProvider) -> ProviderMetadata:
        """The provider's endpoints: discovery, overridden by explicit auth/token/certs URLs."""
        key = (
            provider.issuer_url,
            provider.ca_pem or "",
            provider.auth_url or "",
            provider.token_url or "",
            provider.certs_url or "",
        )

        def cached() -> ProviderMetadata | None:
            entry = self._metadata.get(key)
            fresh = entry is not None and self.monotonic() < entry[1] + METADATA_LIFETIME
            return entry[0] if entry is not None and fresh else None

        hit = cached()
        if hit is not None:
            return hit
        return await self._fetch_once(
            ("metadata", *key), lambda: self._discover(provider, key), cached
        )

    async def _discover(self, provider: IdentityProvider, key: tuple[str, ...]) -> ProviderMetadata:
        if provider.auth_url and provider.token_url and provider.certs_url:
            meta = ProviderMetadata(
                provider.issuer_url, provider.auth_url, provider.token_url, provider.certs_url
            )
        else:
            url = provider.issuer_url.rstrip("/") + DISCOVERY_PATH
            doc = await self._json(url, provider, "discovery")
            if doc.get("issuer") != provider.issuer_url:
                # OpenID Connect Discovery 4.3: the document must name the issuer it was
                # fetched for, or an attacker's document could redirect the whole login.
                raise ProviderUnreachable(
                    "discovery",
                    f"{url} names issuer {doc.get('issuer')!r}, not {provider.issuer_url!r}",
                )
            methods = doc.get("token_endpoint_auth_methods_supported")
            meta = ProviderMetadata(
                provider.issuer_url,
                provider.auth_url or _url_field(doc, "authorization_endpoint", url),
                provider.token_url or _url_field(doc, "token_endpoint", url),
                provider.certs_url or _url_field(doc, "jwks_uri", url),
                tuple(m for m in methods if isinstance(m, str))
                if isinstance(methods, list)
                else ("client_secret_basic",),
            )
        self._metadata[key] = (meta, self.monotonic())
        return meta

    async def _fetch_keys(
        self, provider: IdentityProvider, key: tuple[str, ...], since: float | None = None
    ) -> _Keys:
        # ``since``: a fetch made after that (by a task this one waited for) is taken as is.
        def cached() -> _Keys | None:
            entry = self._keys.get(key)
            return (
                entry if entry is not None and since is not None and entry.fetched > since else None
            )

        return await self._fetch_once(("jwks", *key), lambda: self._get_keys(provider, key), cached)

    async def _get_keys(self, provider: IdentityProvider, key: tuple[str, ...]) -> _Keys:
        meta = await self.metadata(provider)
        doc = await self._json(meta.jwks_uri, provider, "jwks")
        raw = doc.get("keys")
        if not isinstance(raw, list):
            raise ProviderUnreachable("jwks", f"{meta.jwks_uri} has no 'keys' list")
        keys: dict[str, dict[str, Any]] = {}
        for jwk in raw[:MAX_JWKS_KEYS]:
            # Encryption keys and keys without an id are of no use to check a signature.
            if (
                isinstance(jwk, dict)
                and isinstance(jwk.get("kid"), str)
                and jwk.get("use") != "enc"
            ):
                keys[jwk["kid"]] = jwk
        entry = _Keys(keys, self.monotonic())
        self._keys[key] = entry
        return entry

    async def signing_key(self, provider: IdentityProvider, kid: str) -> dict[str, Any]:
        """The provider's JWK named ``kid``: cached, fetched after its lifetime or once a
        minute at most when ``kid`` is unknown (a forged kid cannot make us hammer the provider).
        """
        key = (provider.issuer_url, provider.ca_pem or "", provider.certs_url or "")
        now = self.monotonic()
        entry = self._keys.get(key)
        fresh = entry is None or now >= entry.fetched + JWKS_LIFETIME
        if entry is None or fresh:
            entry = await self._fetch_keys(provider, key, since=now - JWKS_LIFETIME)
        jwk = entry.keys.get(kid)
        last = self._unknown_kid_fetch.get(key)
        if jwk is None and not fresh and (last is None or now >= last + UNKNOWN_KID_INTERVAL):
            # The provider may have rotated its keys since we fetched them.
            self._unknown_kid_fetch[key] = now
            entry = await self._fetch_keys(provider, key, since=now)
            jwk = entry.keys.get(kid)
        if jwk is None:
            raise IdTokenRejected("signature", f"the provider's JWKS has no key {kid!r}")
        return jwk

    async def exchange_code(
        self, provider: IdentityProvider, code: str, redirect_uri: str, code_verifier: str | None
    ) -> str:
        """Exchange an authorization code at the token endpoint; return the ID token."""
        meta = await self.metadata(provider)
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri}
        if code_verifier is not None:
            form["code_verifier"] = code_verifier
        headers = [(b"content-type", b"application/x-www-form-urlencoded")]
        if meta.token_auth_method == "client_secret_post":
            form |= {"client_id": provider.client_id, "client_secret": provider.client_secret}
        else:
            headers.append(
                (b"authorization", basic_auth(provider.client_id, provider.client_secret))
            )
        status, data = await self.fetch(
            meta.token_endpoint,
            provider,
            "token",
            method=b"POST",
            headers=headers,
            body=urlencode(form).encode(),
        )
        doc = _json_object(data, meta.token_endpoint, "token")
        if status != 200:
            error = doc.get("error_description") or doc.get("error") or f"HTTP {status}"
            raise OidcError("token", f"the token endpoint refused the code: {str(error)[:200]}")
        id_token = doc.get("id_token")
        if not isinstance(id_token, str) or not id_token:
            raise OidcError("token", "the token response has no id_token (is 'openid' a scope?)")
        return id_token

    async def id_token_claims(
        self, provider: IdentityProvider, id_token: str, nonce: str, now: dt.datetime
    ) -> dict[str, Any]:
        """Verify ``id_token`` (access-flow I3) with the provider's key; return its claims."""
        try:
            header = jwt.get_unverified_header(id_token)
        except jwt.PyJWTError as exc:
            raise IdTokenRejected("malformed", str(exc)) from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in allowed_algorithms(provider):
            raise IdTokenRejected(
                "algorithm", f"{alg!r} is not one of {list(allowed_algorithms(provider))}"
            )
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise IdTokenRejected("signature", "the ID token names no key id (kid)")
        jwk = await self.signing_key(provider, kid)
        return verify_id_token(id_token, jwk, provider, nonce, now)


def basic_auth(client_id: str, client_secret: str) -> bytes:
    """The client_secret_basic Authorization value (RFC 6749 2.3.1: each part form-encoded)."""
    pair = f"{quote_plus(client_id)}:{quote_plus(client_secret)}"
    return b"Basic " + base64.b64encode(pair.encode())


def verify_id_token(
    id_token: str,
    jwk: Mapping[str, Any],
    provider: IdentityProvider,
    nonce: str,
    now: dt.datetime,
) -> dict[str, Any]:
    """Check an ID token's signature, alg, iss, aud, azp, times and nonce at ``now`` (I3)."""
    try:
        alg = jwt.get_unverified_header(id_token).get("alg")
    except jwt.PyJWTError as exc:
        raise IdTokenRejected("malformed", str(exc)) from None
    allowed = allowed_algorithms(provider)
    if alg not in allowed:
        raise IdTokenRejected("algorithm", f"{alg!r} is not one of {list(allowed)}")
    if jwk.get("alg") not in (None, alg):
        raise IdTokenRejected("algorithm", f"the key is for {jwk.get('alg')!r}, the token {alg!r}")
    try:
        key = jwt.PyJWK(dict(jwk), algorithm=alg)
    except jwt.PyJWTError as exc:
        raise IdTokenRejected(
            "signature", f"the provider's key is unusable for {alg}: {exc}"
        ) from None
    try:
        claims: dict[str, Any] = jwt.decode(
            id_token,
            key,
            algorithms=[alg],
            audience=provider.client_id,
            issuer=provider.issuer_url,
            options={
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "require": ["iss", "aud", "exp", "iat", "sub"],
            },
        )
    except jwt.InvalidAudienceError as exc:
        raise IdTokenRejected("aud", f"{exc} (expected {provider.client_id!r})") from None
    except jwt.InvalidIssuerError as exc:
        raise IdTokenRejected("iss", f"{exc} (expected {provider.issuer_url!r})") from None
    except jwt.InvalidSignatureError as exc:
        raise IdTokenRejected("signature", str(exc)) from None
    except jwt.MissingRequiredClaimError as exc:
        raise IdTokenRejected("claims", str(exc)) from None
    except jwt.PyJWTError as exc:
        raise IdTokenRejected("malformed", str(exc)) from None
    audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
    azp = claims.get("azp")
    if (len(audiences) > 1 or azp is not None) and azp != provider.client_id:
        # OpenID Connect Core 3.1.3.7: with several audiences the token must be ours by azp.
        raise IdTokenRejected("azp", f"azp {azp!r} is not the client id {provider.client_id!r}")
    ts = now.timestamp()
    leeway = LEEWAY.total_seconds()
    exp, iat, nbf = (_number(claims, name) for name in ("exp", "iat", "nbf"))
    if exp is None or ts >= exp + leeway:
        raise IdTokenRejected("exp", f"expired at {_iso(exp)} (now {now.isoformat()})")
    if iat is None or iat > ts + leeway:
        raise IdTokenRejected(
            "iat", f"issued in the future, at {_iso(iat)} (now {now.isoformat()})"
        )
    if nbf is not None and nbf > ts + leeway:
        raise IdTokenRejected("nbf", f"not valid before {_iso(nbf)} (now {now.isoformat()})")
    if not isinstance(claims.get("nonce"), str) or not _same(claims["nonce"], nonce):
        raise IdTokenRejected("nonce", "the ID token's nonce is not this login's")
    return claims


def identity_from_id_token(
    claims: Mapping[str, Any], provider: IdentityProvider, identity_nonce: str
) -> Identity:
    """The person an ID token names (access-flow I4); a missing email is a failed login."""
    email = claims.get(provider.email_claim_name)
    if not isinstance(email, str) or "@" not in email or len(email) > 320:
        raise IdTokenRejected(
            "email", f"the ID token has no usable {provider.email_claim_name!r} claim"
        )
    if claims.get("email_verified") is False:
        # The provider itself says the address is unproven (anyone may have typed it): rules
        # on email and email_domain must not trust it. A provider that omits the claim is
        # taken at its word, as most enterprise providers only issue verified addresses.
        raise IdTokenRejected("email", f"the provider has not verified {email[:320]!r}")
    groups = claims.get(provider.groups_claim)
    if isinstance(groups, str):
        groups = [groups]
    name = claims.get("name")
    return Identity(
        email=email,
        sub=str(claims.get("sub", "")),
        idp=provider.id,
        groups=tuple(g for g in groups if isinstance(g, str))[:256]
        if isinstance(groups, list)
        else (),
        name=name if isinstance(name, str) else None,
        identity_nonce=identity_nonce,
    )


def _json_object(data: bytes, url: str, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProviderUnreachable(what, f"{url} did not answer JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ProviderUnreachable(what, f"{url} answered JSON that is not an object")
    return doc


def _url_field(doc: Mapping[str, Any], name: str, url: str) -> str:
    value = doc.get(name)
    if not isinstance(value, str) or not value.startswith("https://"):
        raise ProviderUnreachable(
            "discovery", f"{url} has no https {name!r}; set it in the provider's settings"
        )
    return value


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _iso(ts: float | None) -> str:
    if ts is None:
        return "(missing)"
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
