"""Who a request comes from beyond its certificate: a person's login, or a service token.

These are the identity facts of access-flow I1-I12: the decision core (enforcer/decision.py)
takes them as inputs beside the certificate facts, so it stays pure. The login routes
(enforcer/login.py) establish an :class:`Identity` at an OpenID Connect provider; the session
token carries it afterwards. A service token's credentials arrive in two request headers.
"""

from __future__ import annotations

import dataclasses

# Routes on every application's hostname (Cloudflare's /cdn-cgi/access/ namespace).
LOGIN_PATH = b"/cdn-cgi/access/login"
CALLBACK_PATH = b"/cdn-cgi/access/callback"
LOGOUT_PATH = b"/cdn-cgi/access/logout"
# Request headers of a service token (Cloudflare Access), owned: never forwarded to the origin.
CLIENT_ID_HEADER = "cf-access-client-id"
CLIENT_SECRET_HEADER = "cf-access-client-secret"
# Set on the forwarded request of a person's session (owned: a client's copy is stripped).
USER_EMAIL_HEADER = "cf-access-authenticated-user-email"


@dataclasses.dataclass(frozen=True)
class Identity:
    """Who a person is, as their identity provider said at login."""

    email: str
    sub: str
    idp: str  # the identity provider's id: what a ``login_method`` rule names
    groups: tuple[str, ...] = ()
    name: str | None = None
    # Random per login; the session token carries it (Cloudflare's ``identity_nonce``).
    identity_nonce: str = ""


@dataclasses.dataclass(frozen=True)
class ServiceTokenCredentials:
    """What a request presented as a service token (``CF-Access-Client-Id``/``-Secret``)."""

    client_id: str
    client_secret: str


@dataclasses.dataclass(frozen=True)
class IdentityProvider:
    """An OpenID Connect provider configured for an account (Cloudflare's ``type = "oidc"``)."""

    id: str
    name: str
    issuer_url: str  # discovery at {issuer_url}/.well-known/openid-configuration; the ``iss``
    client_id: str
    client_secret: str
    scopes: tuple[str, ...] = ("openid", "email", "profile")
    email_claim_name: str = "email"
    groups_claim: str = "groups"
    # Explicit endpoints override discovery (Cloudflare's generic OIDC fields).
    auth_url: str | None = None
    token_url: str | None = None
    certs_url: str | None = None
    pkce_enabled: bool = True
    allowed_algorithms: tuple[str, ...] = ("RS256", "ES256", "PS256", "EdDSA")
    # PEM CA certificates that verify the provider's https endpoints instead of the system store.
    ca_pem: str | None = None
    type: str = "oidc"
