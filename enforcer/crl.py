"""Certificate revocation lists for uploaded roots: parse, verify, index, fetch.

Theory of operation. Each uploaded root (an "mTLS certificate" object) may hold one CRL,
issued by the root itself or by one of the intermediates uploaded with it. A CRL gets in only
after :func:`verify_crl` has found, among the root's certificates, the one whose subject is the
CRL's issuer and whose key verifies its signature, and has checked that it is current
(``thisUpdate`` not in the future, ``nextUpdate`` not past): else :class:`CrlError` says why and
the CRL in force stays. The CRL applies to every certificate whose issuer has the same name and
key as that certificate (:func:`issuer_key`), so a re-issued CA certificate with the same key is
covered too, and a CA of the same name with another key is not.

At request time :class:`RevocationIndex` (built once per snapshot) answers, with a few dict
lookups and no parsing, whether a validated chain is revoked (its serials are listed in their
issuer's CRL, or revoked by serial through the admin API), or whether its revocation status is
unknown (a CRL past its ``nextUpdate``, or a root told to fetch one that has none yet). Unknown
denies (``revocation_unknown``) unless the root says ``crl_fail_open``; then the request is
admitted with a note. Nothing here reads a clock: ``now`` is an argument.

Fetching (:func:`fetch_crl`) is plain HTTP with the standard library in a worker thread,
bounded in bytes (:data:`MAX_CRL_BYTES`) and time; the signature, not the transport, is what
makes a fetched CRL trustworthy, and a CRL older than the one in force is refused (replay).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enforcer.reasons import Reason

MAX_CRL_BYTES = 10 * 1024 * 1024
FETCH_TIMEOUT = 30.0
# A CRL made a moment ago by a CA whose clock runs a little ahead is not "from the future".
CLOCK_SKEW = dt.timedelta(minutes=5)


class CrlError(ValueError):
    """A CRL that cannot be used: unreadable, badly signed, for another issuer, or out of date."""


class FetchError(CrlError):
    """A CRL could not be fetched from its URL."""


def issuer_key(cert: x509.Certificate) -> str:
    """Identify a CA by its subject name and public key (hex SHA-256 of both, DER)."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(cert.subject.public_bytes() + b"\0" + spki).hexdigest()


def load_crl(data: bytes) -> x509.CertificateRevocationList:
    """Parse a CRL given as PEM or DER."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data.strip())
        return x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise CrlError(f"not a PEM or DER X.509 CRL: {exc}") from None


@dataclasses.dataclass(frozen=True)
class VerifiedCrl:
    """A CRL whose signature verified against one of a root's certificates."""

    der: bytes
    issuer: str
    issuer_key: str
    this_update: dt.datetime
    next_update: dt.datetime | None
    serials: frozenset[int]
    crl_number: int | None


def _crl_number(crl: x509.CertificateRevocationList) -> int | None:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return None


def _may_sign_crls(cert: x509.Certificate) -> bool:
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True  # RFC 5280 allows a CA without keyUsage; it may sign anything
    return bool(usage.crl_sign)


def parse_verified(
    crl: x509.CertificateRevocationList, certs: Sequence[x509.Certificate]
) -> VerifiedCrl:
    """Check that one of ``certs`` issued ``crl`` (name and signature); no time checks."""
    named = [c for c in certs if c.subject == crl.issuer]
    if not named:
        have = "; ".join(c.subject.rfc4514_string() for c in certs)
        raise CrlError(
            f"the CRL's issuer {crl.issuer.rfc4514_string()} is not this root or one of its "
            f"uploaded intermediates ({have}): upload the CRL under the root that issued it"
        )
    signer = next((c for c in named if _verifies(crl, c)), None)
    if signer is None:
        raise CrlError(
            f"the CRL's signature does not verify with the key of {crl.issuer.rfc4514_string()}: "
            "it was not signed by this CA (or it was altered)"
        )
    if not _may_sign_crls(signer):
        raise CrlError(
            f"{signer.subject.rfc4514_string()} has a keyUsage without cRLSign: it may not "
            "issue CRLs"
        )
    return VerifiedCrl(
        der=crl.public_bytes(serialization.Encoding.DER),
        issuer=crl.issuer.rfc4514_string(),
        issuer_key=issuer_key(signer),
        this_update=crl.last_update_utc,
        next_update=crl.next_update_utc,
        serials=frozenset(r.serial_number for r in crl),
        crl_number=_crl_number(crl),
    )


def _verifies(crl: x509.CertificateRevocationList, cert: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(cert.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False  # a key type that cannot sign CRLs


def verify_crl(data: bytes, certs: Sequence[x509.Certificate], now: dt.datetime) -> VerifiedCrl:
    """Parse ``data`` and check issuer, signature and dates at ``now``; raise CrlError if unfit."""
    return check_dates(parse_verified(load_crl(data), certs), now)


def check_dates(verified: VerifiedCrl, now: dt.datetime) -> VerifiedCrl:
    """Check that a verified CRL is current at ``now`` (not from the future, not expired)."""
    if verified.this_update > now + CLOCK_SKEW:
        raise CrlError(
            f"the CRL's thisUpdate {verified.this_update.isoformat()} is in the future "
            f"(now {now.isoformat()}, {CLOCK_SKEW} of clock skew allowed): check the issuer's clock"
        )
    if verified.next_update is not None and verified.next_update < now:
        raise CrlError(
            f"the CRL expired: its nextUpdate {verified.next_update.isoformat()} is past "
            f"(now {now.isoformat()}); fetch a fresh one from the issuer"
        )
    return verified


# ---- the request-time index ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CrlEntry:
    """The CRL in force for one issuing CA."""

    root_id: str
    root_name: str
    issuer: str
    serials: frozenset[int]
    next_update: dt.datetime | None
    fail_open: bool


@dataclasses.dataclass(frozen=True)
class MissingCrl:
    """A root told to fetch a CRL (``crl_url``) that has none yet: its status is unknown."""

    root_id: str
    root_name: str
    fail_open: bool


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What revocation says about a validated chain: a reason, why, and whether it admits."""

    reason: Reason
    detail: str
    admitted: bool = False


def _policy(fail_open: bool) -> str:
    return (
        "admitted because the root says crl_fail_open = true"
        if fail_open
        else "denied because the root fails closed (crl_fail_open = false)"
    )


@dataclasses.dataclass(frozen=True)
class RevocationIndex:
    """Revocation by CRL and by serial, indexed for request-time lookups (one per snapshot)."""

    by_issuer: Mapping[str, CrlEntry] = dataclasses.field(default_factory=dict)
    missing: Mapping[str, MissingCrl] = dataclasses.field(default_factory=dict)
    # Admin revocations by serial: root (anchor) fingerprint -> leaf serials (lowercase hex).
    serials_by_root: Mapping[str, frozenset[str]] = dataclasses.field(default_factory=dict)
    # For tokens, which carry a serial but not their issuer: per application hostname, every
    # serial revoked under a root associated with it, and the instant after which a
    # fail-closed root's status becomes unknown (a token is refused from then on).
    serials_by_host: Mapping[str, frozenset[str]] = dataclasses.field(default_factory=dict)
    unknown_after_by_host: Mapping[str, dt.datetime] = dataclasses.field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.by_issuer or self.missing or self.serials_by_root)

    def check(
        self,
        issued_by: Iterable[tuple[str, int]],
        root_sha256: str,
        leaf_serial: str,
        now: dt.datetime,
    ) -> Verdict | None:
        """Judge a validated path: ``issued_by`` is (issuer key, serial) per non-anchor cert."""
        unknown: list[Verdict] = []
        if leaf_serial in self.serials_by_root.get(root_sha256, ()):
            return Verdict(
                Reason.REVOKED, f"serial {leaf_serial} was revoked through the admin API"
            )
        for key, serial in issued_by:
            entry = self.by_issuer.get(key)
            if entry is None:
                continue
            if serial in entry.serials:
                return Verdict(
                    Reason.REVOKED,
                    f"serial {serial:x} is listed in the CRL of {entry.issuer} "
                    f"(root {entry.root_name!r})",
                )
            if entry.next_update is not None and now > entry.next_update:
                unknown.append(
                    Verdict(
                        Reason.REVOCATION_UNKNOWN,
                        f"the CRL of {entry.issuer} (root {entry.root_name!r}) is past its "
                        f"nextUpdate {entry.next_update.isoformat()}: " + _policy(entry.fail_open),
                        entry.fail_open,
                    )
                )
        missing = self.missing.get(root_sha256)
        if missing is not None:
            unknown.append(
                Verdict(
                    Reason.REVOCATION_UNKNOWN,
                    f"root {missing.root_name!r} has a crl_url but no CRL fetched yet: "
                    + _policy(missing.fail_open),
                    missing.fail_open,
                )
            )
        if not unknown:
            return None
        # Fail closed wins: one CA in the path that fails closed denies the whole path.
        return next((v for v in unknown if not v.admitted), unknown[0])

    def token_refusal(self, hostname: str, serial: object, now: dt.datetime) -> str | None:
        """Say why a token for ``hostname`` minted for certificate ``serial`` may not admit."""
        if isinstance(serial, str) and serial.lower() in self.serials_by_host.get(hostname, ()):
            return f"the certificate it was minted for (serial {serial}) is revoked"
        after = self.unknown_after_by_host.get(hostname)
        if after is not None and now > after:
            return "the revocation status of this application's certificates is unknown"
        return None


# ---- fetching -----------------------------------------------------------------------------------


def check_url(url: str) -> str | None:
    """Say what is wrong with a CRL URL, or None when it is a usable http:// URL."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:
        return f"{url!r} is not a URL: {exc}"
    if parts.scheme != "http" or not parts.hostname:
        return (
            f"{url!r}: expected an http:// URL with a host (CRLs are signed; plain HTTP is usual)"
        )
    return None


def _fetch_blocking(url: str, max_bytes: int, timeout: float) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "mtls-testbed-enforcer"})
    try:
        # The URL was checked to be http:// (check_url), so no file:// or other scheme opens.
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data: bytes = response.read(max_bytes + 1)
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the response's socket
        raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise FetchError(f"{url}: {getattr(exc, 'reason', exc)}") from None
    if len(data) > max_bytes:
        raise FetchError(f"{url}: the CRL is over {max_bytes} bytes; refused")
    return data


async def fetch_crl(
    url: str, *, max_bytes: int = MAX_CRL_BYTES, timeout: float = FETCH_TIMEOUT
) -> bytes:
    """Fetch a CRL over HTTP (bounded in bytes and time) without blocking the trio loop."""
    problem = check_url(url)
    if problem:
        raise FetchError(problem)
    with trio.move_on_after(timeout) as scope:
        return await trio.to_thread.run_sync(
            _fetch_blocking, url, max_bytes, timeout, abandon_on_cancel=True
        )
    assert scope.cancelled_caught
    raise FetchError(f"{url}: no answer within {timeout:g} s")
