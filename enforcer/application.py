"""Applications: a protected hostname, its session duration, cookie settings and policies."""

from __future__ import annotations

import dataclasses
import datetime as dt
import ssl
from urllib.parse import urlsplit

from enforcer.policy import Policy

COOKIE_NAME = "CF_Authorization"
TOKEN_HEADER = "cf-access-jwt-assertion"
# What non-browser clients send their token in (cloudflared access curl): read after the
# assertion header; the cf-access- prefix is owned, so it never reaches the origin.
CLIENT_TOKEN_HEADER = "cf-access-token"
SAME_SITE_VALUES = ("None", "Lax", "Strict")
# The application protocols the enforcer speaks, by their ALPN ids, in its order of preference.
ALPN_PROTOCOLS = ("h2", "http/1.1")


@dataclasses.dataclass(frozen=True)
class CookieSettings:
    """Attributes of the ``CF_Authorization`` cookie (access-flow A8)."""

    path: str = "/"
    domain: str | None = None
    secure: bool = True
    http_only: bool = True
    same_site: str = "None"

    def set_cookie(self, token: str, max_age: dt.timedelta) -> str:
        """Return the Set-Cookie header value that carries ``token`` for ``max_age``."""
        parts = [f"{COOKIE_NAME}={token}", f"Path={self.path}"]
        if self.domain:
            parts.append(f"Domain={self.domain}")
        parts.append(f"Max-Age={int(max_age.total_seconds())}")
        if self.secure:
            parts.append("Secure")
        if self.http_only:
            parts.append("HttpOnly")
        if self.same_site:
            parts.append(f"SameSite={self.same_site}")
        return "; ".join(parts)


@dataclasses.dataclass(frozen=True)
class Application:
    """One protected hostname and how requests to it are admitted and forwarded."""

    name: str
    hostname: str
    aud: str
    session_duration: dt.timedelta
    policies: tuple[Policy, ...]
    origin: str
    forward_client_certificate: bool = False
    # On by default: a token admits only beside the certificate it was minted for (access-flow A10);
    # ``False`` lets a token alone admit (browser-style sessions), never beside another one.
    bind_token_to_certificate: bool = True
    # Forward client header names with "_" (nginx underscores_in_headers); the enforcer's own
    # headers are stripped whatever their spelling.
    underscores_in_headers: bool = False
    # PEM certificates that verify an https:// or grpcs:// origin instead of the system store.
    origin_ca: str | None = None
    cookie: CookieSettings = dataclasses.field(default_factory=CookieSettings)
    # ALPN ids the hostname negotiates (a subset of ALPN_PROTOCOLS, kept in that order).
    alpn: tuple[str, ...] = ALPN_PROTOCOLS
    # The account that owns the application: its service tokens are the ones that count (I11).
    account: str = ""
    # Ids of the identity providers that may log this application's users in (access-flow I1):
    # its ``allowed_idps``, or every provider of its account, resolved when the snapshot is built.
    identity_providers: tuple[str, ...] = ()

    @property
    def no_duration(self) -> bool:
        """True for No Duration (``0s``): a full handshake for every request, no cookie."""
        return self.session_duration <= dt.timedelta(0)


def cookie_attribute_problem(value: str) -> str | None:
    """Why ``value`` cannot be a cookie Path or Domain attribute, or None when it can."""
    # RFC 6265 attribute values are US-ASCII without controls or ';': anything else would end
    # the attribute early or split the Set-Cookie header (response splitting).
    for ch in value:
        if ch == ";" or not " " <= ch <= "~":
            return f"{value!r} contains {ch!r}; use printable ASCII without ';'"
    return None


def alpn_problem(values: object) -> str | None:
    """Why ``values`` cannot be an application's ``alpn`` list, or None when it can."""
    if not isinstance(values, list) or not values:
        return f"expected a non-empty list drawn from {list(ALPN_PROTOCOLS)}, got {values!r}"
    for value in values:
        if value not in ALPN_PROTOCOLS:
            return f"{value!r} is not one of {list(ALPN_PROTOCOLS)}"
    if len(set(values)) != len(values):
        return f"{values!r} names a protocol twice"
    return None


def alpn_tuple(values: list[str]) -> tuple[str, ...]:
    """A checked ``alpn`` list in the enforcer's order of preference (h2 first)."""
    return tuple(p for p in ALPN_PROTOCOLS if p in values)


# Origin URL schemes: how the enforcer speaks to the origin, and its default port.
# h2c and grpc are HTTP/2 with prior knowledge over TCP; https offers h2 and http/1.1 in ALPN
# and speaks what the origin selects; grpcs insists on h2.
ORIGIN_SCHEMES = {"http": 80, "h2c": 80, "grpc": 80, "https": 443, "grpcs": 443}
TLS_SCHEMES = frozenset({"https", "grpcs"})


def origin_scheme(origin: str) -> str:
    """The scheme of a checked origin URL (``http``, ``h2c``, ``grpc``, ``https``, ``grpcs``)."""
    return origin.split("://", 1)[0].lower()


def origin_problem(origin: str) -> str | None:
    """Why ``origin`` cannot be an application's origin URL, or None when it can."""
    scheme, sep, _ = origin.partition("://")
    if not sep or scheme.lower() not in ORIGIN_SCHEMES:
        schemes = ", ".join(f"{s}://" for s in ORIGIN_SCHEMES)
        return f"expected a URL starting with one of {schemes}; got {origin!r}"
    if not urlsplit(origin).hostname:
        return f"{origin!r} names no host"
    try:
        port = urlsplit(origin).port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        return f"{origin!r}: the port must be a number from 1 to 65535"
    return None


def origin_ca_problem(origin: str, pem: str) -> str | None:
    """Why ``pem`` cannot verify ``origin``'s certificate, or None when it can."""
    if origin_scheme(origin) not in TLS_SCHEMES:
        return "only an https:// or grpcs:// origin has a certificate to verify"
    try:
        ssl.create_default_context(cadata=pem)
    except (ssl.SSLError, ValueError) as exc:
        return f"not PEM CA certificates: {exc}"
    return None
