"""Service tokens (access-flow I11): a client id and a secret that automated clients present.

Cloudflare Access's shape: the client id is 32 hex characters followed by ``.access``, the
secret 64 hex characters (256 random bits). The enforcer keeps only the secret's SHA-256: with
256 random bits there is nothing to guess, so a slow password hash would only spend CPU on
every request (an attacker's requests included). The check is pure: it takes ``now``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import hmac
import re
import secrets
import uuid
from collections.abc import Mapping

from enforcer.identity import ServiceTokenCredentials

CLIENT_ID_SUFFIX = ".access"
CLIENT_ID_PATTERN = re.compile(r"[0-9a-f]{32}\.access")
SECRET_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
DEFAULT_DURATION = dt.timedelta(hours=8760)
# Longer presented values are refused before hashing: nothing valid is that long.
MAX_PRESENTED_LENGTH = 256


@dataclasses.dataclass(frozen=True)
class ServiceToken:
    """A service token as the enforcer keeps it: never its secret, only the secret's SHA-256."""

    id: str
    name: str
    client_id: str
    secret_sha256: str = dataclasses.field(repr=False)
    expires_at: dt.datetime
    account: str = ""


class TokenVerdict(enum.Enum):
    """What a presented service token is at ``now``."""

    VALID = "valid"
    INVALID = "invalid"  # unknown client id or wrong secret
    EXPIRED = "expired"


def new_id() -> str:
    """A new service token id (a UUID, as Cloudflare's)."""
    return str(uuid.uuid4())


def new_client_id() -> str:
    """A new client id: 32 random hex characters and ``.access``."""
    return secrets.token_hex(16) + CLIENT_ID_SUFFIX


def new_secret() -> str:
    """A new client secret: 64 hex characters (256 random bits)."""
    return secrets.token_hex(32)


def secret_sha256(secret: str) -> str:
    """The hex SHA-256 of a secret, what the enforcer stores."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def check(
    presented: ServiceTokenCredentials,
    tokens: Mapping[str, ServiceToken],
    now: dt.datetime,
) -> tuple[TokenVerdict, ServiceToken | None, str]:
    """Check presented credentials against the tokens (client id -> token) at ``now``.

    Returns the verdict, the token when its client id is known, and a detail for the log.
    """
    token = tokens.get(presented.client_id)
    if token is None:
        return TokenVerdict.INVALID, None, "unknown service token client id"
    secret = presented.client_secret
    if len(secret) > MAX_PRESENTED_LENGTH:
        return TokenVerdict.INVALID, token, "wrong service token secret"
    # Constant-time on the digests: the comparison says nothing about how much of it matched.
    if not hmac.compare_digest(secret_sha256(secret), token.secret_sha256):
        return TokenVerdict.INVALID, token, "wrong service token secret"
    if now >= token.expires_at:
        return (
            TokenVerdict.EXPIRED,
            token,
            f"service token {token.id} expired at {token.expires_at}",
        )
    return TokenVerdict.VALID, token, ""
