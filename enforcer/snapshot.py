"""The enforcer's configuration as one immutable snapshot (SPEC A12).

A request reads the snapshot once and uses it to the end, so a change (a new root, a revoked
certificate, another session duration) applies to the next request as a whole, never half.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence

from cryptography import x509

from enforcer.application import Application
from enforcer.chain import DEFAULT_MAX_CHAIN_DEPTH, HostTrust, fingerprint
from enforcer.tokens import KeyRing


@dataclasses.dataclass(frozen=True)
class RootCertificate:
    """An uploaded root (an "mTLS certificate"), its intermediates and its hostnames."""

    id: str
    name: str
    root: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]
    associated_hostnames: tuple[str, ...]

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
        )
