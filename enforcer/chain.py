"""Client certificate chain validation, with an access-flow reason code for every failure.

Path validation itself is cryptography's ``x509.verification`` client verifier, run against
only the trust anchors associated with the request's hostname (an anchor is the last
certificate of an uploaded root PEM, self-signed or not: OpenSSL's partial-chain behaviour).
Around it we keep a profile of our own:

- Keys and signatures (:class:`KeyProfile`): every public key on the path, the leaf's included,
  must be RSA of at least ``min_rsa_bits`` or EC on one of ``ec_curves``; every signature on
  the path but the anchor's own (which nobody verifies: trust in it comes from the upload) must
  be RSA PKCS#1 v1.5, RSA-PSS or ECDSA with SHA-256/384/512, byte for byte the encodings the
  verifier permits. Ed25519, Ed448, DSA, other curves, short RSA and SHA-1 are outside:
  cryptography's verifier does not accept Ed25519 and offers no way to allow it.
- Extensions (:data:`_EE_POLICY`, :data:`_CA_POLICY`): the web PKI defaults, relaxed where
  RFC 5280 allows what the device world does: a leaf without subjectAltName (its CN names it),
  a critical extendedKeyUsage, a CA certificate without keyUsage. The SAN criticality rules
  stay.
- Name constraints: the verifier applies them to SANs only, so a SAN-less leaf under a
  constrained CA must have a CN that is a DNS name inside every CA's permitted and outside its
  excluded dNSName subtrees (:func:`name_constraint_problem`).

The verifier says *whether* a chain is good; operators also need to know *why* one is not, so
on failure we classify, in this order:

1. Walk issuer names and signatures from the leaf through the presented and uploaded
   intermediates. No associated anchor at the end means ``untrusted_issuer``, unless an
   intermediate the enforcer knows (uploaded with any root) would complete the path, which
   means ``missing_intermediate``. The walk is bounded by the certificates it may use, not by
   ``max_chain_depth``, so that a path that is merely too long is still found.
2. A key or signature on that path outside the profile is ``unsupported_key`` (also when the
   verifier accepted the chain: it does not check the leaf's own key).
3. A path with more intermediates than ``max_chain_depth`` is ``invalid_chain``.
4. A path with a certificate outside its validity window at ``now`` is ``certificate_expired``
   / ``certificate_not_yet_valid``, provided the verifier accepts the same chain at a time
   inside every window (else something else is wrong too).
5. Anything else the verifier (or the name-constraint check) refused is ``invalid_chain``, with
   its message as the detail.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import functools
import hashlib
from collections.abc import Iterable, Mapping, Sequence

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, padding, rsa
from cryptography.x509.oid import (
    ExtendedKeyUsageOID,
    ExtensionOID,
    NameOID,
    PublicKeyAlgorithmOID,
    SignatureAlgorithmOID,
)
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from enforcer.lru import BoundedLRU
from enforcer.reasons import Reason

DEFAULT_MAX_CHAIN_DEPTH = 8


# -- the key and signature profile --------------------------------------------------------

# cryptography's curve names -> the names operators write in ``[validation] ec_curves``.
EC_CURVE_NAMES: Mapping[str, str] = {
    "secp256r1": "P-256",
    "secp384r1": "P-384",
    "secp521r1": "P-521",
}
DEFAULT_MIN_RSA_BITS = 2048
MAX_MIN_RSA_BITS = 16384

# The signature AlgorithmIdentifiers the verifier permits (CA/B BR 7.1.3.2), as DER: comparing
# bytes rejects exactly what it rejects, RSA-PSS with another salt length or MGF hash included.
_PERMITTED_SIGNATURES: Mapping[bytes, str] = {
    bytes.fromhex("300d06092a864886f70d01010b0500"): "RSA PKCS#1 v1.5 with SHA-256",
    bytes.fromhex("300d06092a864886f70d01010c0500"): "RSA PKCS#1 v1.5 with SHA-384",
    bytes.fromhex("300d06092a864886f70d01010d0500"): "RSA PKCS#1 v1.5 with SHA-512",
    bytes.fromhex(
        "304106092a864886f70d01010a3034a00f300d06096086480165030402010500a11c301a06092a864886"
        "f70d010108300d06096086480165030402010500a203020120"
    ): "RSA-PSS with SHA-256",
    bytes.fromhex(
        "304106092a864886f70d01010a3034a00f300d06096086480165030402020500a11c301a06092a864886"
        "f70d010108300d06096086480165030402020500a203020130"
    ): "RSA-PSS with SHA-384",
    bytes.fromhex(
        "304106092a864886f70d01010a3034a00f300d06096086480165030402030500a11c301a06092a864886"
        "f70d010108300d06096086480165030402030500a203020140"
    ): "RSA-PSS with SHA-512",
    bytes.fromhex("300a06082a8648ce3d040302"): "ECDSA with SHA-256",
    bytes.fromhex("300a06082a8648ce3d040303"): "ECDSA with SHA-384",
    bytes.fromhex("300a06082a8648ce3d040304"): "ECDSA with SHA-512",
}


def _oid_names(cls: type) -> dict[x509.ObjectIdentifier, str]:
    # RSA_WITH_SHA1 -> rsa-with-sha1: the names cryptography gives the OIDs, for details.
    return {
        value: name.lower().replace("_", "-")
        for name, value in vars(cls).items()
        if isinstance(value, x509.ObjectIdentifier)
    }


_KEY_NAMES = {
    **_oid_names(PublicKeyAlgorithmOID),
    PublicKeyAlgorithmOID.DSA: "DSA",
    PublicKeyAlgorithmOID.ED25519: "Ed25519",
    PublicKeyAlgorithmOID.ED448: "Ed448",
    PublicKeyAlgorithmOID.RSASSA_PSS: "RSA-PSS (id-RSASSA-PSS)",
}
_SIGNATURE_NAMES = _oid_names(SignatureAlgorithmOID)


def _der_element(der: bytes, at: int) -> tuple[int, int]:
    """Return where the content of the DER element at ``at`` starts and where the element ends."""
    length = der[at + 1]
    start = at + 2
    if length & 0x80:
        size = length & 0x7F
        length = int.from_bytes(der[start : start + size], "big")
        start += size
    return start, start + length


def signature_algorithm_der(cert: x509.Certificate) -> bytes:
    """Return the DER of a certificate's signatureAlgorithm (the field after tbsCertificate)."""
    der = cert.public_bytes(serialization.Encoding.DER)
    body, _ = _der_element(der, 0)
    _, tbs_end = _der_element(der, body)
    _, alg_end = _der_element(der, tbs_end)
    return der[tbs_end:alg_end]


@dataclasses.dataclass(frozen=True)
class KeyProfile:
    """Which public keys and signature algorithms a client chain may use (``[validation]``)."""

    min_rsa_bits: int = DEFAULT_MIN_RSA_BITS
    ec_curves: frozenset[str] = frozenset(EC_CURVE_NAMES.values())

    def __post_init__(self) -> None:
        if not DEFAULT_MIN_RSA_BITS <= self.min_rsa_bits <= MAX_MIN_RSA_BITS:
            raise ValueError(
                f"min_rsa_bits: {self.min_rsa_bits} is not between {DEFAULT_MIN_RSA_BITS} and "
                f"{MAX_MIN_RSA_BITS} (the verifier itself refuses RSA CAs under 2048 bits)"
            )
        unknown = sorted(set(self.ec_curves) - set(EC_CURVE_NAMES.values()))
        if unknown or not self.ec_curves:
            raise ValueError(
                f"ec_curves: {sorted(self.ec_curves)} must be a non-empty subset of "
                f"{sorted(EC_CURVE_NAMES.values())}"
                + (f" ({unknown[0]!r} is not one)" if unknown else "")
            )

    @property
    def fingerprint(self) -> bytes:
        """The profile as bytes, for the digest of a hostname's trust (and so the cache key)."""
        return b"rsa %d; ec %s;" % (self.min_rsa_bits, ",".join(sorted(self.ec_curves)).encode())

    def key_problem(self, cert: x509.Certificate) -> str | None:
        """Say why a certificate's public key is outside the profile, or None."""
        oid = cert.public_key_algorithm_oid
        if oid == PublicKeyAlgorithmOID.RSAES_PKCS1_v1_5:
            rsa_key = cert.public_key()
            assert isinstance(rsa_key, rsa.RSAPublicKey)
            if rsa_key.key_size >= self.min_rsa_bits:
                return None
        elif oid == PublicKeyAlgorithmOID.EC_PUBLIC_KEY:
            try:
                ec_key = cert.public_key()
            except (ValueError, UnsupportedAlgorithm):
                pass
            else:
                assert isinstance(ec_key, ec.EllipticCurvePublicKey)
                if EC_CURVE_NAMES.get(ec_key.curve.name) in self.ec_curves:
                    return None
        # Outside the profile: the detail is worth its cost (naming the subject is not cheap).
        return self._key_detail(cert)

    def _key_detail(self, cert: x509.Certificate) -> str:
        who = cert.subject.rfc4514_string() or "a certificate with an empty subject"
        oid = cert.public_key_algorithm_oid
        if oid == PublicKeyAlgorithmOID.RSAES_PKCS1_v1_5:
            rsa_key = cert.public_key()
            assert isinstance(rsa_key, rsa.RSAPublicKey)
            return (
                f"{who}: an RSA key of {rsa_key.key_size} bits; the profile requires at least "
                f"{self.min_rsa_bits} (validation.min_rsa_bits)"
            )
        if oid == PublicKeyAlgorithmOID.EC_PUBLIC_KEY:
            try:
                ec_key = cert.public_key()
            except (ValueError, UnsupportedAlgorithm):
                return f"{who}: an EC key on a curve this enforcer cannot load"
            assert isinstance(ec_key, ec.EllipticCurvePublicKey)
            curve = EC_CURVE_NAMES.get(ec_key.curve.name, ec_key.curve.name)
            return (
                f"{who}: an EC key on {curve}; the profile accepts "
                f"{', '.join(sorted(self.ec_curves))} (validation.ec_curves)"
            )
        name = _KEY_NAMES.get(oid, oid.dotted_string)
        return (
            f"{who}: its {name} key is outside the profile, which accepts RSA and EC keys only "
            "(cryptography's path validator refuses Ed25519, Ed448 and DSA)"
        )

    @staticmethod
    def signature_problem(cert: x509.Certificate) -> str | None:
        """Say why the signature algorithm on a certificate is outside the profile, or None."""
        if signature_algorithm_der(cert) in _PERMITTED_SIGNATURES:
            return None
        oid = cert.signature_algorithm_oid
        name = _SIGNATURE_NAMES.get(oid, oid.dotted_string)
        if oid == SignatureAlgorithmOID.RSASSA_PSS:
            name += (
                " whose parameters are not SHA-256/384/512 with MGF1 of the same hash and a "
                "salt of the digest's length"
            )
        return (
            f"{cert.subject.rfc4514_string()}: signed with {name}; the profile accepts RSA "
            "PKCS#1 v1.5, RSA-PSS and ECDSA with SHA-256, SHA-384 or SHA-512"
        )

    def path_problem(
        self, path: Sequence[x509.Certificate], *, verified: bool = False
    ) -> str | None:
        """Check a path (leaf first, anchor last): every key, every signature but the anchor's.

        ``verified``: the verifier accepted this path, so it already held every signature but
        the anchor's to exactly this set, and only the keys need a look.
        """
        for cert in path:
            problem = self.key_problem(cert)
            if problem is not None:
                return problem
        if verified:
            return None
        for cert in path[:-1]:
            problem = self.signature_problem(cert)
            if problem is not None:
                return problem
        return None


DEFAULT_KEY_PROFILE = KeyProfile()


# -- extension policies ---------------------------------------------------------------------


def _client_key_usage(policy: Policy, cert: x509.Certificate, usage: x509.KeyUsage | None) -> None:
    """A client leaf's key usage, when present, must allow the signature TLS asks of it."""
    if usage is None:
        return
    if usage.key_cert_sign:  # the web PKI profile's own check, which this one replaces
        raise ValueError("an end-entity certificate must not assert keyCertSign")
    if not usage.digital_signature:
        # The client signs its CertificateVerify: a key restricted to other uses may not.
        raise ValueError("the client certificate's key usage does not allow digitalSignature")


def _client_san(
    policy: Policy, cert: x509.Certificate, san: x509.SubjectAlternativeName | None
) -> None:
    """cryptography's end-entity SAN checks (RFC 5280 4.1.2.6, 4.2.1.6), less the SAN's presence."""
    empty_subject = len(cert.subject) == 0
    if san is None:
        if empty_subject:
            raise ValueError("a certificate with an empty subject must carry a subjectAltName")
        return
    critical = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical
    if empty_subject and not critical:
        raise ValueError("EE subjectAltName MUST be critical when subject is empty")
    if not empty_subject and critical:
        raise ValueError("EE subjectAltName MUST NOT be critical when subject is nonempty")


def _client_eku(policy: Policy, cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None) -> None:
    """cryptography's end-entity EKU check (clientAuth; anyExtendedKeyUsage is not enough)."""
    if eku is not None and policy.extended_key_usage not in list(eku):
        raise ValueError("required EKU not found")


def _ca_eku(policy: Policy, cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None) -> None:
    """cryptography's CA EKU check (clientAuth or anyExtendedKeyUsage), any criticality."""
    allowed = (policy.extended_key_usage, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE)
    if eku is not None and not any(usage in allowed for usage in eku):
        raise ValueError("required EKU not found")


def _ca_key_usage(policy: Policy, cert: x509.Certificate, usage: x509.KeyUsage | None) -> None:
    """A CA's key usage, when present, must allow certificate signing (RFC 5280 6.1.4 (n))."""
    if usage is not None and not usage.key_cert_sign:
        raise ValueError("keyUsage.keyCertSign must be asserted in a CA certificate")


# IoT device certificates commonly carry only a CN; the web PKI profile would demand a SAN.
# RFC 5280 lets any extendedKeyUsage be critical and lets a relying party accept a CA without
# keyUsage (6.1.4 (n) checks keyCertSign only when the extension is present).
_EE_POLICY = (
    ExtensionPolicy.webpki_defaults_ee()
    .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, _client_san)
    .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, _client_key_usage)
    .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _client_eku)
)
_CA_POLICY = (
    ExtensionPolicy.webpki_defaults_ca()
    .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, _ca_key_usage)
    .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _ca_eku)
)
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


# -- name constraints for SAN-less leaves ----------------------------------------------------


def is_dns_name(value: str) -> bool:
    """Tell whether ``value`` is a DNS name by cryptography's rules (LDH labels, no wildcard)."""
    if not value or len(value) > 253:
        return False
    return all(
        label
        and len(label) <= 63
        and not label.startswith("-")
        and not label.endswith("-")
        and all(ch.isascii() and (ch.isalnum() or ch == "-") for ch in label)
        for label in value.split(".")
    )


def dns_constraint_matches(constraint: str, name: str) -> bool:
    """RFC 5280 4.2.1.10: ``name`` is ``constraint`` with zero or more labels added on the left."""
    want = constraint.lower().split(".")
    have = name.lower().split(".")
    return len(have) >= len(want) and have[len(have) - len(want) :] == want


def _dns_subtrees(subtrees: Iterable[x509.GeneralName] | None) -> list[str]:
    return [g.value for g in subtrees or () if isinstance(g, x509.DNSName)]


def name_constraint_problem(chain: Sequence[x509.Certificate]) -> str | None:
    """Say why a SAN-less leaf's CN breaks a CA's name constraints on its path, or None.

    cryptography's verifier applies name constraints to subjectAltName entries only, and a
    leaf without that extension has none: its CN, which policies and tokens use as its name,
    would escape every constraint. So when any CA on the path (anchor included) carries name
    constraints, each CN of a SAN-less leaf must be a DNS name inside every CA's permitted
    dNSName subtrees (when it lists any) and outside all excluded ones. A malformed DNS
    constraint fails closed, as it does in the verifier.
    """
    leaf = chain[0]
    # Scanning the (cached) extensions beats get_extension_for_class's exception when absent.
    if any(ext.oid == ExtensionOID.SUBJECT_ALTERNATIVE_NAME for ext in leaf.extensions):
        return None  # the verifier checked its SAN entries
    constrained = [
        (ca, ext.value)
        for ca in chain[1:]
        for ext in ca.extensions
        if isinstance(ext.value, x509.NameConstraints)
    ]
    if not constrained:
        return None
    names = common_names(leaf)
    first_ca = constrained[0][0].subject.rfc4514_string()
    if not names:
        return f"the leaf has no subjectAltName and no CN, and {first_ca} carries name constraints"
    for cn in names:
        if not is_dns_name(cn):
            return (
                f"the leaf has no subjectAltName and its CN {cn!r} is not a DNS name, which "
                f"the name constraints of {first_ca} require"
            )
        for ca, nc in constrained:
            ca_name = ca.subject.rfc4514_string()
            permitted = _dns_subtrees(nc.permitted_subtrees)
            excluded = _dns_subtrees(nc.excluded_subtrees)
            bad = next((c for c in [*permitted, *excluded] if not is_dns_name(c)), None)
            if bad is not None:
                return f"malformed DNS name constraint {bad!r} in {ca_name}"
            if permitted and not any(dns_constraint_matches(c, cn) for c in permitted):
                return (
                    f"the leaf's CN {cn!r} (it has no subjectAltName) is outside the DNS names "
                    f"{ca_name} permits: {', '.join(permitted)}"
                )
            hit = next((c for c in excluded if dns_constraint_matches(c, cn)), None)
            if hit is not None:
                return (
                    f"the leaf's CN {cn!r} (it has no subjectAltName) is in the DNS subtree "
                    f"{hit!r} that {ca_name} excludes"
                )
    return None


# -- trust anchors --------------------------------------------------------------------------


class AnchorError(ValueError):
    """An uploaded root PEM that does not end with its trust anchor."""


def split_anchor(
    certs: Sequence[x509.Certificate],
) -> tuple[x509.Certificate, tuple[x509.Certificate, ...]]:
    """Split an uploaded root PEM into its trust anchor (the last) and its intermediates.

    The anchor need not be self-signed: trusting a factory's issuing CA without its root is
    OpenSSL's partial-chain behaviour, and cryptography's verifier ends a path at any
    certificate in its store. A self-signed certificate anywhere else is refused: it means the
    order is wrong (a root before its intermediate would silently make the intermediate the
    anchor and ignore the root).
    """
    if not certs:
        raise AnchorError("no certificate: expected PEM intermediates (optional), then the anchor")
    misplaced = [i for i, c in enumerate(certs[:-1]) if c.subject == c.issuer]
    if misplaced:
        raise AnchorError(
            f"certificate {misplaced[0] + 1} of {len(certs)} is self-signed but not last: "
            "expected PEM intermediates (optional) followed by the trust anchor (a root, or an "
            "intermediate to trust on its own)"
        )
    return certs[-1], tuple(certs[:-1])


@dataclasses.dataclass(frozen=True)
class HostTrust:
    """The trust for one hostname: the roots associated with it and their uploaded intermediates."""

    roots: tuple[x509.Certificate, ...]
    intermediates: tuple[x509.Certificate, ...]
    max_chain_depth: int = DEFAULT_MAX_CHAIN_DEPTH
    profile: KeyProfile = DEFAULT_KEY_PROFILE
    store: Store | None = dataclasses.field(default=None, compare=False, repr=False)
    # What the trust is, as bytes: two hostnames with the same digest judge every chain alike,
    # so a cached validation may be shared between them and never reaches any other hostname.
    digest: bytes = dataclasses.field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        h = hashlib.sha256(b"depth %d;" % self.max_chain_depth)
        h.update(self.profile.fingerprint)
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
        profile: KeyProfile = DEFAULT_KEY_PROFILE,
    ) -> HostTrust:
        """Build the trust (and its verifier store, once) for one hostname."""
        roots_t = tuple(roots)
        return cls(
            roots=roots_t,
            intermediates=tuple(intermediates),
            max_chain_depth=max_chain_depth,
            profile=profile,
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
    chain = list(verified.chain)
    problem = name_constraint_problem(chain)
    if problem is not None:
        return None, problem
    return chain, ""


def _directly_issued(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except ValueError:
        # Also raised for legacy algorithms (SHA-1) it will not check: the walk must still
        # find such a path, so that the profile names the algorithm instead of the issuer
        # looking untrusted.
        return _legacy_signature_verifies(cert, issuer)
    except Exception:  # InvalidSignature, TypeError: all mean "not this one"
        return False
    return True


def _legacy_signature_verifies(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Verify a signature made with a hash ``verify_directly_issued_by`` refuses (SHA-1...)."""
    if cert.issuer != issuer.subject:
        return False
    try:
        key = issuer.public_key()
        digest = cert.signature_hash_algorithm
        if digest is None:
            return False
        if isinstance(key, rsa.RSAPublicKey):
            pad = cert.signature_algorithm_parameters
            if not isinstance(pad, padding.PKCS1v15 | padding.PSS):
                return False
            key.verify(cert.signature, cert.tbs_certificate_bytes, pad, digest)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(digest))
        elif isinstance(key, dsa.DSAPublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, digest)
        else:
            return False
    except Exception:  # InvalidSignature, UnsupportedAlgorithm, ValueError: not this one
        return False
    return True


def _issuer_path(
    leaf: x509.Certificate,
    pool: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
) -> tuple[list[x509.Certificate], x509.Certificate | None]:
    """Follow issuer names and signatures from the leaf; return the path and the anchor reached.

    Each step adds a certificate of ``pool`` not yet on the path, so the walk ends within
    ``len(pool) + 1`` steps whatever the chain's depth: a path too long for
    ``max_chain_depth`` still reaches its anchor, and the caller says it is too long.
    """
    path = [leaf]
    current = leaf
    for _ in range(len(pool) + 1):
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


def _depth(path: Sequence[x509.Certificate]) -> int:
    """The intermediates on a path (leaf first, anchor excluded) that count towards the depth.

    As in RFC 5280 and cryptography's verifier, self-issued intermediates do not count.
    """
    return sum(1 for c in path[1:] if c.subject != c.issuer)


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
        problem = trust.profile.path_problem(chain, verified=True)
        if problem is not None:
            return ChainResult(None, Reason.UNSUPPORTED_KEY, problem)
        facts = _facts(chain)
        if facts.sha256 in revoked:
            return ChainResult(None, Reason.REVOKED, "the certificate was revoked")
        return ChainResult(facts, None)

    path, root = _issuer_path(leaf, intermediates, trust.roots)
    if root is None:
        extra = [c for c in known_intermediates if c not in intermediates]
        _, completed = _issuer_path(leaf, [*intermediates, *extra], trust.roots)
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
    problem = trust.profile.path_problem(full)
    if problem is not None:
        return ChainResult(None, Reason.UNSUPPORTED_KEY, problem)
    depth = _depth(path)
    if depth > trust.max_chain_depth:
        return ChainResult(
            None,
            Reason.INVALID_CHAIN,
            f"the path to {root.subject.rfc4514_string()} has {depth} intermediates; at most "
            f"{trust.max_chain_depth} are accepted (server.max_chain_depth)",
        )
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
