"""The enforcer's configuration as one immutable snapshot (access-flow A12).

A request reads the snapshot once and uses it to the end, so a change (a new root, a revoked
certificate, another session duration) applies to the next request as a whole, never half.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography import x509

from enforcer.application import Application
from enforcer.chain import (
    DEFAULT_KEY_PROFILE,
    DEFAULT_MAX_CHAIN_DEPTH,
    HostTrust,
    KeyProfile,
    fingerprint,
)
from enforcer.crl import RevocationIndex
from enforcer.identity import IdentityProvider
from enforcer.service_tokens import ServiceToken
from enforcer.tokens import KeyRing


@dataclasses.dataclass(frozen=True)
class RootCertificate:
    """An uploaded root (an "mTLS certificate"), its intermediates and its hostnames.

    ``root`` is the trust anchor: the last certificate of the uploaded PEM, usually self-signed
    but possibly an intermediate trusted on its own (see :func:`enforcer.chain.split_anchor`).
    """

    id: str
    name: str
    root: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]
    associated_hostnames: tuple[str, ...]
    # Revocation settings (config ``[[roots]]``; the admin API keeps them on the stored root).
    crl_file: Path | None = None
    crl_url: str | None = None
    crl_refresh: str = "1h"
    crl_fail_open: bool = False

    @property
    def fingerprint(self) -> str:
        """The root's SHA-256 fingerprint (hex)."""
        return fingerprint(self.root)

    @property
    def expires_on(self) -> dt.datetime:
        """When the root expires."""
        return self.root.not_valid_after_utc


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Everything one request's decision needs, frozen."""

    generation: int
    applications: Mapping[str, Application]
    roots: tuple[RootCertificate, ...]
    trust: Mapping[str, HostTrust]
    known_intermediates: tuple[x509.Certificate, ...]
    revoked: frozenset[str]
    keyring: KeyRing
    issuer: str
    no_duration_token_lifetime: dt.timedelta
    # Hostname -> epoch second: a token of that application whose ``iat`` is earlier was
    # minted before an operator ended its sessions (per application or account-wide).
    session_cutoffs: Mapping[str, int] = dataclasses.field(default_factory=dict)
    # CRLs in force and revocations by serial (see enforcer/crl.py); empty: nothing to check.
    revocation: RevocationIndex = dataclasses.field(default_factory=RevocationIndex)
    # Identity providers by id, of every account (access-flow I1); applications name theirs.
    identity_providers: Mapping[str, IdentityProvider] = dataclasses.field(default_factory=dict)
    # Service tokens by client id, of every account (I11); a token counts for its account's apps.
    service_tokens: Mapping[str, ServiceToken] = dataclasses.field(default_factory=dict)
    # ``identity_nonce`` of sessions ended by a logout (I10): their tokens no longer admit.
    ended_identity_nonces: frozenset[str] = frozenset()
    # ``revoked`` as RFC 8705 ``x5t#S256`` values (base64url), the form tokens carry in ``cnf``:
    # derived here once per snapshot so that checking a token is one set lookup per request.
    revoked_x5t: frozenset[str] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Derived, not passed: dataclasses.replace(snapshot, revoked=...) recomputes it.
        object.__setattr__(self, "revoked_x5t", frozenset(map(x5t_of_hex, self.revoked)))

    @classmethod
    def build(
        cls,
        *,
        generation: int,
        applications: Sequence[Application],
        roots: Sequence[RootCertificate],
        keyring: KeyRing,
        issuer: str,
        no_duration_token_lifetime: dt.timedelta = dt.timedelta(seconds=5),
        revoked: frozenset[str] = frozenset(),
        max_chain_depth: int = DEFAULT_MAX_CHAIN_DEPTH,
        sessions_revoked_before: Mapping[str, dt.datetime] | None = None,
        key_profile: KeyProfile = DEFAULT_KEY_PROFILE,
        revocation: RevocationIndex | None = None,
        identity_providers: Sequence[IdentityProvider] = (),
        service_tokens: Sequence[ServiceToken] = (),
        ended_identity_nonces: frozenset[str] = frozenset(),
    ) -> Snapshot:
        """Index applications by hostname and build each hostname's trust once."""
        hostnames = {h for r in roots for h in r.associated_hostnames}
        hostnames |= {a.hostname for a in applications}
        trust = {}
        for host in sorted(hostnames):
            mine = [r for r in roots if host in r.associated_hostnames]
            trust[host] = HostTrust.build(
                [r.root for r in mine],
                [i for r in mine for i in r.intermediates],
                max_chain_depth,
                key_profile,
            )
        return cls(
            generation=generation,
            applications={a.hostname: a for a in applications},
            roots=tuple(roots),
            trust=trust,
            known_intermediates=tuple(i for r in roots for i in r.intermediates),
            revoked=revoked,
            keyring=keyring,
            issuer=issuer,
            no_duration_token_lifetime=no_duration_token_lifetime,
            session_cutoffs={
                host: session_cutoff(t) for host, t in (sessions_revoked_before or {}).items()
            },
            revocation=revocation or RevocationIndex(),
            identity_providers={p.id: p for p in identity_providers},
            service_tokens={t.client_id: t for t in service_tokens},
            ended_identity_nonces=ended_identity_nonces,
        )


def x5t_of_hex(sha256_hex: str) -> str:
    """Turn a hex SHA-256 fingerprint into its ``x5t#S256`` form (base64url, no padding)."""
    try:
        raw = bytes.fromhex(sha256_hex)
    except ValueError:
        return ""  # not a fingerprint: matches no token (x5t values are never empty)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def session_cutoff(revoked_before: dt.datetime) -> int:
    """The first ``iat`` (whole epoch seconds) a token may carry after sessions revoked then.

    Tokens carry ``iat`` in whole seconds (as Cloudflare's do), so a token minted in the same
    second as the revocation but before it has ``iat`` equal to the second's floor. Rounding
    the cutoff up refuses it: we fail closed, at the price of refusing, for the rest of that
    one second, a token minted just after the revocation (its holder presents the certificate
    again and the certificate path decides).
    """
    return math.ceil(revoked_before.timestamp())
