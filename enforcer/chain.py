"""Client certificate chain validation, with a SPEC reason code for every failure.

Path validation itself is cryptography's ``x509.verification`` client verifier, run against
only the roots associated with the request's hostname. That verifier says *whether* a chain is
good; operators also need to know *why* one is not, so on failure we classify:

1. Walk issuer names and signatures from the leaf through the presented and uploaded
   intermediates. No associated root at the end means ``untrusted_issuer``, unless an
   intermediate the enforcer knows (uploaded with any root) would complete the path, which
   means ``missing_intermediate``.
2. A path that reaches an associated root but has a certificate outside its validity window at
   ``now`` is ``certificate_expired`` / ``certificate_not_yet_valid``, provided the verifier
   accepts the same chain at a time inside every window (else something else is wrong too).
3. Anything else the verifier refused (signature, basic constraints, key usage, EKU, depth,
   malformed) is ``invalid_chain``, with the verifier's message as the detail.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import functools
import hashlib
import itertools
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from enforcer.crl import issuer_key
from enforcer.lru import BoundedLRU
from enforcer.reasons import Reason

DEFAULT_MAX_CHAIN_DEPTH = 8


def _client_key_usage(policy: Policy, cert: x509.Certificate, usage: x509.KeyUsage | None) -> None:
    """A client leaf's key usage, when present, must allow the signature TLS asks of it."""
    if usage is None:
        return
    if usage.key_cert_sign:  # the web PKI profile's own check, which this one replaces
        raise ValueError("an end-entity certificate must not assert keyCertSign")
    if not usage.digital_signature:
        # The client signs its CertificateVerify: a key restricted to other uses may not.
        raise ValueError("the client certificate's key usage does not allow digitalSignature")


# IoT device certificates commonly carry only a CN; the web PKI profile would demand a SAN.
_EE_POLICY = (
    ExtensionPolicy.webpki_defaults_ee()
    .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
    .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, _client_key_usage)
)
_CA_POLICY = ExtensionPolicy.webpki_defaults_ca()
_SHA256 = hashes.SHA256()


def sha256_hex(der: bytes) -> str:
    """Return the lowercase hex SHA-256 of DER bytes (a certificate fingerprint)."""
    return hashlib.sha256(der).hexdigest()


def fingerprint(cert: x509.Certificate) -> str:
    """Return a certificate's SHA-256 fingerprint as lowercase hex."""
    return cert.fingerprint(hashes.SHA256()).hex()


def common_names(cert: x509.Certificate) -> tuple[str, ...]:
    """Return every CN attribute of the subject, in the order the certificate lists them."""
    return tuple(
        v if isinstance(v, str) else v.decode("utf-8", "replace")
        for v in (a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME))
    )


def common_name(cert: x509.Certificate) -> str | None:
    """Return the subject's CN, or None when it has none or several different ones.

    A subject may carry several CN attributes, and software disagrees on which one counts
    (code that searches with OpenSSL's ``X509_NAME_get_index_by_NID`` from the start finds the
    first, Go's ``pkix.Name`` keeps the last). Picking either lets a CA that signs a crafted
    subject hand a device the identity a ``common_name`` rule expects while other tools show
    another. So we fail closed: repeats of one value count as that value; two or more
    *different* values mean the certificate has no common name for policies and tokens (a
    ``common_name`` rule never matches it, the token's ``common_name`` claim is empty; other
    rules still may match), and :attr:`CertificateFacts.common_names` lists them all.
    """
    names = common_names(cert)
    if not names or any(n != names[0] for n in names[1:]):
        return None
    return names[0]


@dataclasses.dataclass(frozen=True)
class CertificateFacts:
    """What policies and tokens may know about a validated client certificate."""

    sha256: str
    common_name: str | None
    serial: str
    issuer_sha256: str
    root_sha256: str
    san_dns: tuple[str, ...]
    san_uris: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime
    # The window in which the whole chain is valid: a cached result holds only inside it.
    chain_valid_from: dt.datetime
    chain_valid_until: dt.datetime
    # Every CN attribute of the subject; several different ones leave ``common_name`` None.
    common_names: tuple[str, ...] = ()
    # (issuer's name-and-key id, serial) of each certificate below the anchor, leaf first: what
    # CRL lookups need (enforcer/crl.py), computed once per validation.
    issued_by: tuple[tuple[str, int], ...] = ()

    @property
    def ambiguous_common_name(self) -> bool:
        """True when the subject carries several different CNs (no CN rule matches it)."""
        return len(set(self.common_names)) > 1

    @functools.cached_property
    def x5t_s256(self) -> str:
        """The RFC 8705 ``x5t#S256`` confirmation value (base64url SHA-256, no padding)."""
        # Cached: every token use beside a certificate compares it (facts live in the
        # validation cache, so a returning device computes it once).
        return base64.urlsafe_b64encode(bytes.fromhex(self.sha256)).rstrip(b"=").decode()


@dataclasses.dataclass(frozen=True)
class ChainResult:
    """A validation outcome: facts when valid, else a reason and a human-readable detail."""

    facts: CertificateFacts | None
    reason: Reason | None
    detail: str = ""

    @property
    def valid(self) -> bool:
        """True when the chain validated."""
        return self.facts is not None


@dataclasses.dataclass(frozen=True)
class HostTrust:
    """The trust for one hostname: the roots associated with it and their uploaded intermediates."""

    roots: tuple[x509.Certificate, ...]
    intermediates: tuple[x509.Certificate, ...]
    max_chain_depth: int = DEFAULT_MAX_CHAIN_DEPTH
    store: Store | None = dataclasses.field(default=None, compare=False, repr=False)
    # What the trust is, as bytes: two hostnames with the same digest judge every chain alike,
    # so a cached validation may be shared between them and never reaches any other hostname.
    digest: bytes = dataclasses.field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        h = hashlib.sha256(b"depth %d;" % self.max_chain_depth)
        for label, certs in ((b"roots", self.roots), (b"intermediates", self.intermediates)):
            h.update(b"%s %d;" % (label, len(certs)))
            for cert in certs:
                h.update(cert.fingerprint(_SHA256))
        object.__setattr__(self, "digest", h.digest())

    @classmethod
    def build(
        cls,
        roots: Sequence[x509.Certificate],
        intermediates: Sequence[x509.Certificate],
        max_chain_depth: int = DEFAULT_MAX_CHAIN_DEPTH,
    ) -> HostTrust:
        """Build the trust (and its verifier store, once) for one hostname."""
        roots_t = tuple(roots)
        return cls(
            roots=roots_t,
            intermediates=tuple(intermediates),
            max_chain_depth=max_chain_depth,
            store=Store(list(roots_t)) if roots_t else None,
        )


def _verify(
    trust: HostTrust,
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    at: dt.datetime,
) -> tuple[list[x509.Certificate] | None, str]:
    if trust.store is None:
        return None, "no root is associated with this hostname"
    verifier = (
        PolicyBuilder()
        .store(trust.store)
        .time(at)
        .max_chain_depth(trust.max_chain_depth)
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
        .build_client_verifier()
    )
    try:
        verified = verifier.verify(leaf, list(intermediates))
    except VerificationError as exc:
        return None, str(exc)
    return list(verified.chain), ""


def _directly_issued(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception:  # InvalidSignature, ValueError, TypeError: all mean "not this one"
        return False
    return True


def _issuer_path(
    leaf: x509.Certificate,
    pool: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    max_depth: int,
) -> tuple[list[x509.Certificate], x509.Certificate | None]:
    """Follow issuer names and signatures from the leaf; return the path and the root reached."""
    path = [leaf]
    current = leaf
    for _ in range(max_depth + 1):
        for root in roots:
            if root.subject == current.issuer and _directly_issued(current, root):
                return path, root
        nxt = next(
            (
                c
                for c in pool
                if c.subject == current.issuer and c not in path and _directly_issued(current, c)
            ),
            None,
        )
        if nxt is None:
            return path, None
        path.append(nxt)
        current = nxt
    return path, None


def _facts(chain: Sequence[x509.Certificate]) -> CertificateFacts:
    leaf = chain[0]
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        dns, uris = (), ()
    return CertificateFacts(
        sha256=fingerprint(leaf),
        common_name=common_name(leaf),
        serial=format(leaf.serial_number, "x"),
        issuer_sha256=fingerprint(chain[1]) if len(chain) > 1 else fingerprint(leaf),
        root_sha256=fingerprint(chain[-1]),
        san_dns=dns,
        san_uris=uris,
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        chain_valid_from=max(c.not_valid_before_utc for c in chain),
        chain_valid_until=min(c.not_valid_after_utc for c in chain),
        common_names=common_names(leaf),
        issued_by=tuple(
            (issuer_key(issuer), cert.serial_number) for cert, issuer in itertools.pairwise(chain)
        ),
    )


def validate_chain(
    leaf: x509.Certificate,
    presented: Sequence[x509.Certificate],
    trust: HostTrust,
    known_intermediates: Sequence[x509.Certificate],
    revoked: frozenset[str],
    now: dt.datetime,
) -> ChainResult:
    """Validate a client chain for one hostname at ``now``; say why when it fails."""
    intermediates = [*presented, *trust.intermediates]
    chain, error = _verify(trust, leaf, intermediates, now)
    if chain is not None:
        facts = _facts(chain)
        if facts.sha256 in revoked:
            return ChainResult(None, Reason.REVOKED, "the certificate was revoked")
        return ChainResult(facts, None)

    path, root = _issuer_path(leaf, intermediates, trust.roots, trust.max_chain_depth)
    if root is None:
        extra = [c for c in known_intermediates if c not in intermediates]
        _, completed = _issuer_path(
            leaf, [*intermediates, *extra], trust.roots, trust.max_chain_depth
        )
        if completed is not None:
            return ChainResult(
                None,
                Reason.MISSING_INTERMEDIATE,
                f"issuer {path[-1].issuer.rfc4514_string()} was neither sent nor uploaded",
            )
        return ChainResult(
            None,
            Reason.UNTRUSTED_ISSUER,
            f"no root associated with this hostname issued {path[-1].issuer.rfc4514_string()}",
        )

    full = [*path, root]
    expired = [c for c in full if now > c.not_valid_after_utc]
    early = [c for c in full if now < c.not_valid_before_utc]
    if expired or early:
        reason = Reason.CERTIFICATE_EXPIRED if expired else Reason.CERTIFICATE_NOT_YET_VALID
        culprit = (expired or early)[0]
        detail = (
            f"{culprit.subject.rfc4514_string()} valid "
            f"{culprit.not_valid_before_utc.isoformat()} "
            f"to {culprit.not_valid_after_utc.isoformat()}"
        )
        start = max(c.not_valid_before_utc for c in full)
        end = min(c.not_valid_after_utc for c in full)
        if start <= end:
            inside = start + (end - start) / 2
            ok_inside, error_inside = _verify(trust, leaf, intermediates, inside)
            if ok_inside is None:
                return ChainResult(None, Reason.INVALID_CHAIN, error_inside)
        return ChainResult(None, reason, detail)
    return ChainResult(None, Reason.INVALID_CHAIN, error)


class ValidationCache:
    """Successful validations by (hostname trust, presented chain), reused while they hold.

    A full path build costs a few hundred microseconds of Python and Rust per handshake; a
    returning device presents the same leaf and intermediates, and the trust of its hostname
    rarely changes. So a success is remembered under the SHA-256 of the trust's digest and the
    presented certificates' fingerprints, and a hit is reused only after the checks that can
    change without the key changing: ``now`` must lie inside every certificate's validity
    window on the verified path (notBefore and notAfter, the earliest notAfter bounds the
    entry), and the leaf must not be revoked in the request's snapshot. Failures are never
    cached: their reason can change with the clock and with the known intermediates.

    This is a memo of the pure :func:`validate_chain`; it reads no clock and does no I/O.
    Proof of possession is not cached: OpenSSL verifies every handshake's CertificateVerify.
    """

    def __init__(self, size: int = 50_000) -> None:
        self._entries: BoundedLRU[bytes, ChainResult] = BoundedLRU(size)

    @property
    def hits(self) -> int:
        """Lookups answered from the cache."""
        return self._entries.hits

    @property
    def misses(self) -> int:
        """Lookups that found nothing (an expired or revoked hit counts as a hit then a drop)."""
        return self._entries.misses

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(trust: HostTrust, chain: Sequence[x509.Certificate]) -> bytes:
        """The cache key of a presented chain (leaf first) under one hostname's trust."""
        h = hashlib.sha256(trust.digest)
        for cert in chain:
            h.update(cert.fingerprint(_SHA256))
        return h.digest()

    def lookup(self, key: bytes, revoked: frozenset[str], now: dt.datetime) -> ChainResult | None:
        """Return the cached success for ``key`` if it still holds at ``now``, else None."""
        result = self._entries.get(key)
        if result is None:
            return None
        facts = result.facts
        if (
            facts is not None
            and facts.chain_valid_from <= now <= facts.chain_valid_until
            and facts.sha256 not in revoked
        ):
            return result
        # Past its window or revoked: the full validation must say which reason applies.
        self._entries.discard(key)
        return None

    def store(self, key: bytes, result: ChainResult) -> None:
        """Remember a successful validation (failures are ignored)."""
        if result.valid:
            self._entries.put(key, result)
