"""A reference model of docs/access-flow.md: what an enforcer must answer to one request.

Written from docs/access-flow.md alone, never from ``enforcer/``: each ``aN_...`` function restates
one requirement, and :func:`expect` composes them in the order the flow needs (A2, A3, A5's chain,
A4's token, A5's policies, A6-A9). Everything is pure: the caller passes ``now``.

Where docs/access-flow.md is silent the model says what it chose:

- Several reasons can apply at once (an expired intermediate *and* a wrong EKU). docs/access-flow.md
  gives no precedence, so :class:`Expected` holds the *set* of acceptable reason codes.
- A bad signature on the way to a root leaves no path at all, so both ``invalid_chain`` (the
  table's "bad signature") and ``untrusted_issuer`` (no associated root reached) are accepted.
- A presented certificate that fails validation denies the request even when a valid token
  would admit (fail closed; the brief's safety property demands it).
- A client leaf with a key usage extension must allow ``digitalSignature`` (it signs the TLS
  CertificateVerify); an intermediate must be a CA (basic constraints) whose key usage, when
  present, allows ``keyCertSign``, and whose ``pathLenConstraint`` holds.
- When a request carries both a valid token and a valid certificate, either may admit it, so
  whether a new cookie is set is not checked.
- The validation profile (issue 14): a key or certificate signature on the path outside it is
  ``unsupported_key``. Where the chain also fails otherwise, either reason is accepted; where no
  path reaches a root, a presented certificate outside the profile may be named instead of the
  missing issuer (the enforcer may check the profile before building the path). A trust
  anchor's own signature is not judged (no one verifies it); its key is.
- A trust anchor need not be self-signed; the path ends at the first uploaded anchor.
- Depth counts the intermediates between the leaf and the anchor; too many is ``invalid_chain``.
- Name constraints (dNSName subtrees) of every CA below the anchor bind the leaf's SAN DNS
  names; a leaf without SAN must have a CN that is a DNS name inside them. SAN URIs are not
  constrained by dNSName subtrees.

People and service tokens (access-flow I5-I11), restated from the document:

- I7: Kleene's connectives first (include any, require all, exclude none, an identity rule
  unknown without a person); a policy they leave unknown could hold after a login only when
  one person, logged in with one of the application's providers, satisfies it
  (:func:`i7_candidate_people` enumerates one person per class the rules tell apart), else it
  is skipped. A valid service token makes identity rules false (a machine); an invalid or
  expired one that would need a login gets its own reason instead.
- Identity arrives from a login (the callback: :attr:`Request.person`) or, on a No Duration
  application, inside the session token (I9: checked like a token, then the policies decide
  with it). With a duration above zero a valid session token admits on its own (A4).
- After a login nothing admitting is ``identity_denied``, even without a certificate; a
  matching ``deny`` policy stays ``policy_denied`` (I8). Beside a valid service token that no
  policy admits, I11 names ``policy_denied``: both are accepted there. Beside an invalid or
  expired service token, when a ``deny`` policy matched, its reason and ``policy_denied`` are.
- A service token is expired from its expiry instant on (I11: valid while ``now < expires``).
- I9: the identity cookie is set only by the login's admitted decision when the duration in
  force is zero (a No Duration application, or a ``0s`` policy, S2), for the policy's
  ``session_duration``, else 24 hours (a ``0s`` policy duration leaves its lifetime unchecked);
  a request that brought its session token gets none.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID

ZERO = dt.timedelta(0)
DECISIONS = ("non_identity", "allow", "deny", "bypass")
CERTIFICATE_RULE_KINDS = (
    "everyone",
    "certificate",
    "common_name",
    "certificate_fingerprint",
    "serial",
    "issuer_fingerprint",
    "san_dns",
    "san_uri",
    "ip",
)
# access-flow I6: rules about a person (unknown without a login) and about service tokens.
IDENTITY_RULE_KINDS = ("email", "email_domain", "group", "login_method")
SERVICE_TOKEN_RULE_KINDS = ("service_token", "any_valid_service_token")
RULE_KINDS = (*CERTIFICATE_RULE_KINDS, *IDENTITY_RULE_KINDS, *SERVICE_TOKEN_RULE_KINDS)
NO_DURATION_PERSON_LIFETIME = dt.timedelta(hours=24)  # I9: without a policy duration


@dataclasses.dataclass(frozen=True)
class Rule:
    """A policy rule: its kind and the value it compares (empty for valueless kinds)."""

    kind: str
    value: str = ""


@dataclasses.dataclass(frozen=True)
class Policy:
    """A policy: decision, include (any), require (all), exclude (none), optional duration."""

    name: str
    decision: str
    include: tuple[Rule, ...]
    require: tuple[Rule, ...] = ()
    exclude: tuple[Rule, ...] = ()
    session_duration: dt.timedelta | None = None


@dataclasses.dataclass(frozen=True)
class App:
    """An application: its hostname, session duration, ordered policies and login providers."""

    hostname: str
    session_duration: dt.timedelta
    policies: tuple[Policy, ...]
    # I1: ids of the identity providers that may log this application's users in.
    identity_providers: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Person:
    """A person's identity as a login establishes it (I4)."""

    email: str
    idp: str
    groups: frozenset[str] = frozenset()
    sub: str = ""


@dataclasses.dataclass(frozen=True)
class ServiceToken:
    """A service token created through the admin API (I11)."""

    id: str
    client_id: str
    secret: str
    expires: dt.datetime


@dataclasses.dataclass(frozen=True)
class Credentials:
    """What a request presents in CF-Access-Client-Id / CF-Access-Client-Secret."""

    client_id: str
    secret: str


@dataclasses.dataclass(frozen=True)
class Root:
    """An uploaded root, the intermediates uploaded with it, and its associated hostnames."""

    certificate: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]
    hostnames: frozenset[str]


@dataclasses.dataclass(frozen=True)
class World:
    """Everything the enforcer is configured with, as the model sees it."""

    roots: tuple[Root, ...]
    apps: Mapping[str, App]
    revoked: frozenset[str] = frozenset()  # SHA-256 hex of revoked leaves
    max_chain_depth: int | None = None  # intermediates allowed on a path (None: not judged)
    service_tokens: tuple[ServiceToken, ...] = ()
    min_rsa_bits: int = 2048
    ec_curves: frozenset[str] = frozenset({"secp256r1", "secp384r1", "secp521r1"})


@dataclasses.dataclass(frozen=True)
class Token:
    """A token presented by a client, as the model knows it: whose, until when, untouched?"""

    app_host: str
    exp: dt.datetime
    genuine: bool = True  # signed by this enforcer and not tampered with
    certificate: str | None = None  # SHA-256 hex of the leaf it was minted for, if any
    person: Person | None = None  # I8: a person's session token carries the identity


@dataclasses.dataclass(frozen=True)
class Request:
    """One request: the connection's SNI, the Host header, the chain presented, a token."""

    sni: str | None
    host: str
    chain: tuple[x509.Certificate, ...] = ()  # leaf first; empty: no certificate
    token: Token | None = None
    client_ip: str = "127.0.0.1"
    person: Person | None = None  # I5: the identity a login (the callback) just established
    service_token: Credentials | None = None
    browser: bool = False  # I7: a GET with text/html in Accept


@dataclasses.dataclass(frozen=True)
class Expected:
    """What must happen: a status, the acceptable reason codes, cookie and connection facts.

    ``reasons`` is empty for an admitted request. ``cookie`` and ``close`` are None when the
    access flow leaves them open. ``token_exp`` is the ``exp`` a minted token must carry.
    """

    status: int
    reasons: frozenset[str] = frozenset()
    cookie: bool | None = False
    close: bool | None = None
    admitted_by: str | None = None
    cookie_max_age: int | None = None
    token_exp: dt.datetime | None = None
    # Other acceptable refusals (status, reason) where the document allows a different status.
    also: frozenset[tuple[int, str]] = frozenset()
    person: Person | None = None  # admitted as this person: I8 claims and the email header
    redirect: bool = False  # I7: a 302 to the login route
    service_token: str | None = None  # admitted beside this valid service token's client id

    def accepts(self, status: int, reason: str | None) -> bool:
        """True when a refusal with this status and reason is one the model allows."""
        if (status, reason) in self.also:
            return True
        return status == self.status and (not self.reasons or reason in self.reasons)

    @property
    def admitted(self) -> bool:
        """True when the request must reach the origin (or be answered 200 by it)."""
        return self.admitted_by is not None

    def describe(self) -> str:
        """A one-line human form, for divergence reports."""
        parts = [str(self.status)]
        if self.reasons:
            parts.append(" or ".join(sorted(self.reasons)))
        for status, reason in sorted(self.also):
            parts.append(f"or {status} {reason}")
        if self.redirect:
            parts.append("redirect to the login route")
        if self.admitted_by:
            parts.append(f"admitted by {self.admitted_by}")
        if self.person:
            parts.append(f"as {self.person.email}")
        if self.cookie is not None:
            parts.append("with cookie" if self.cookie else "no cookie")
        if self.cookie_max_age is not None:
            parts.append(f"Max-Age={self.cookie_max_age}")
        if self.close:
            parts.append("Connection: close")
        return ", ".join(parts)


def deny(status: int, *reasons: str, close: bool | None = None) -> Expected:
    """An expected refusal with the reasons that may explain it."""
    return Expected(status, frozenset(reasons), cookie=False, close=close)


# ---- certificate facts, read straight from the certificates ---------------------------------


def sha256_hex(cert: x509.Certificate) -> str:
    """The certificate's SHA-256 fingerprint, lower-case hex of the DER."""
    from cryptography.hazmat.primitives.serialization import Encoding

    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def common_name_of(cert: x509.Certificate) -> str | None:
    """The subject's CN, or None."""
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else None


def _extension(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.ExtensionType | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def san_values(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """The leaf's SAN DNS names and URIs."""
    san = _extension(cert, x509.SubjectAlternativeName)
    if not isinstance(san, x509.SubjectAlternativeName):
        return [], []
    return (
        list(san.get_values_for_type(x509.DNSName)),
        list(san.get_values_for_type(x509.UniformResourceIdentifier)),
    )


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        if cert.signature_algorithm_oid == SignatureAlgorithmOID.RSA_WITH_SHA1:
            # cryptography no longer verifies SHA-1 links: check the signature by hand, so
            # that such a link is judged by the profile (unsupported_key), not as no issuer.
            key = issuer.public_key()
            if not isinstance(key, rsa.RSAPublicKey):
                return False
            key.verify(
                cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), hashes.SHA1()
            )
        else:
            cert.verify_directly_issued_by(issuer)
    except Exception:  # wrong signature, wrong key type: not this issuer
        return False
    return True


# ---- A2, A3 -----------------------------------------------------------------------------------


def a2_host_matches_sni(request: Request) -> Expected | None:
    """A2: a Host that differs from the connection's SNI is 421 ``misdirected``."""
    host = request.host.lower().rstrip(".")
    if request.sni is None or host != request.sni.lower().rstrip("."):
        return deny(421, "misdirected")
    return None


def a3_application_exists(world: World, hostname: str) -> Expected | None:
    """A3: no application for the hostname is 404 ``no_application``."""
    return None if hostname in world.apps else deny(404, "no_application")


# ---- A5: the chain ----------------------------------------------------------------------------


def a5_trust_for(
    world: World, hostname: str
) -> tuple[list[x509.Certificate], list[x509.Certificate]]:
    """A5: only roots associated with the hostname, with the intermediates uploaded with them."""
    mine = [r for r in world.roots if hostname in r.hostnames]
    return [r.certificate for r in mine], [i for r in mine for i in r.intermediates]


def a5_build_path(
    leaf: x509.Certificate, pool: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]
) -> list[x509.Certificate] | None:
    """A5: the path leaf -> intermediates -> associated root, by names and signatures."""
    path = [leaf]
    for _ in range(16):
        current = path[-1]
        root = next((r for r in roots if _issued_by(current, r)), None)
        if root is not None:
            return [*path, root]
        nxt = next((c for c in pool if c not in path and _issued_by(current, c)), None)
        if nxt is None:
            return None
        path.append(nxt)
    return None


_PROFILE_SIGNATURES = frozenset(
    {
        SignatureAlgorithmOID.RSA_WITH_SHA256,
        SignatureAlgorithmOID.RSA_WITH_SHA384,
        SignatureAlgorithmOID.RSA_WITH_SHA512,
        SignatureAlgorithmOID.RSASSA_PSS,
        SignatureAlgorithmOID.ECDSA_WITH_SHA256,
        SignatureAlgorithmOID.ECDSA_WITH_SHA384,
        SignatureAlgorithmOID.ECDSA_WITH_SHA512,
    }
)
_PROFILE_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)


def a5_key_in_profile(world: World, cert: x509.Certificate) -> bool:
    """Profile: RSA of at least ``min_rsa_bits``, or EC on an allowed curve; nothing else."""
    try:
        key = cert.public_key()
    except Exception:  # a key type cryptography cannot even load is outside too
        return False
    if isinstance(key, rsa.RSAPublicKey):
        return key.key_size >= world.min_rsa_bits
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key.curve.name in world.ec_curves
    return False


def a5_signature_in_profile(cert: x509.Certificate) -> bool:
    """Profile: RSA PKCS#1 v1.5 or PSS, or ECDSA, with SHA-256/384/512."""
    if cert.signature_algorithm_oid not in _PROFILE_SIGNATURES:
        return False
    try:
        algorithm = cert.signature_hash_algorithm
    except Exception:  # an unknown hash
        return False
    return isinstance(algorithm, _PROFILE_HASHES)


def a5_outside_profile(world: World, path: Sequence[x509.Certificate], anchored: bool) -> bool:
    """Profile: any key on the path, or any signature below the anchor, outside the profile.

    ``anchored``: the path ends at a trust anchor, whose own signature is not judged.
    """
    signed = path[:-1] if anchored else path
    return not all(a5_key_in_profile(world, c) for c in path) or not all(
        a5_signature_in_profile(c) for c in signed
    )


def a5_too_deep(world: World, path: Sequence[x509.Certificate]) -> bool:
    """Depth: more intermediates between the leaf and the anchor than ``max_chain_depth``."""
    return world.max_chain_depth is not None and len(path) - 2 > world.max_chain_depth


_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def is_dns_name(text: str) -> bool:
    """A DNS name: dot-separated LDH labels of 1-63 characters, 253 at most in all."""
    labels = text.lower().split(".")
    return len(text) <= 253 and all(_DNS_LABEL.fullmatch(label) for label in labels)


def _within(name: str, subtree: str) -> bool:
    name, subtree = name.lower().rstrip("."), subtree.lower().lstrip(".")
    return name == subtree or name.endswith("." + subtree)


def a5_name_constraints(path: Sequence[x509.Certificate]) -> bool:
    """Name constraints of the CAs below the anchor hold for the leaf's DNS names.

    The leaf's SAN dNSNames are its names; without a SAN, its CN is, and must be a DNS name.
    """
    constraints = [
        nc for nc in (_extension(c, x509.NameConstraints) for c in path[1:-1]) if nc is not None
    ]
    if not constraints:
        return True
    leaf = path[0]
    san = _extension(leaf, x509.SubjectAlternativeName)
    if isinstance(san, x509.SubjectAlternativeName):
        names = list(san.get_values_for_type(x509.DNSName))
    else:
        cn = common_name_of(leaf)
        if cn is None or not is_dns_name(cn):
            return False
        names = [cn]
    for nc in constraints:
        assert isinstance(nc, x509.NameConstraints)
        permitted = [g.value for g in nc.permitted_subtrees or () if isinstance(g, x509.DNSName)]
        excluded = [g.value for g in nc.excluded_subtrees or () if isinstance(g, x509.DNSName)]
        for name in names:
            if permitted and not any(_within(name, p) for p in permitted):
                return False
            if any(_within(name, e) for e in excluded):
                return False
    return True


def a5_san_criticality(leaf: x509.Certificate) -> bool:
    """RFC 5280 4.2.1.6: a SAN is critical exactly when the subject is empty."""
    try:
        ext = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return True
    return ext.critical == (len(leaf.subject) == 0)


def a5_reach_root(
    world: World, hostname: str, chain: Sequence[x509.Certificate]
) -> Expected | None:
    """A5: no path to an associated root is ``untrusted_issuer`` (or ``missing_intermediate``)."""
    roots, uploaded = a5_trust_for(world, hostname)
    leaf, presented = chain[0], list(chain[1:])
    if a5_build_path(leaf, [*presented, *uploaded], roots) is not None:
        return None
    known = [i for r in world.roots for i in r.intermediates]
    # A leaf whose claimed issuer exists but did not sign it has a bad signature.
    everything = [*presented, *known, *roots, *(r.certificate for r in world.roots)]
    forged = any(c.subject == leaf.issuer for c in everything) and not any(
        _issued_by(leaf, c) for c in everything
    )
    reasons = {"untrusted_issuer"}
    if forged:
        reasons.add("invalid_chain")
    completed = a5_build_path(leaf, [*presented, *uploaded, *known], roots)
    if completed is not None:
        reasons = {"missing_intermediate"} | ({"invalid_chain"} if forged else set())
        if a5_too_deep(world, completed):
            reasons.add("invalid_chain")
    # The profile may be checked before the path is built: a presented (or uploaded)
    # certificate outside it may be named instead of the missing issuer.
    seen = [*chain, *uploaded, *known]
    if any(not a5_key_in_profile(world, c) or not a5_signature_in_profile(c) for c in seen):
        reasons.add("unsupported_key")
    return deny(403, *reasons)


def a5_validity(path: Sequence[x509.Certificate], now: dt.datetime) -> set[str]:
    """A5: every certificate in the path must be inside its validity window at ``now``."""
    reasons = set()
    for cert in path:
        if now > cert.not_valid_after_utc:
            reasons.add("certificate_expired")
        if now < cert.not_valid_before_utc:
            reasons.add("certificate_not_yet_valid")
    return reasons


def a5_leaf_usage(leaf: x509.Certificate) -> bool:
    """A5: EKU must allow clientAuth when present; key usage must allow digitalSignature."""
    eku = _extension(leaf, x509.ExtendedKeyUsage)
    if isinstance(eku, x509.ExtendedKeyUsage) and ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        return False
    ku = _extension(leaf, x509.KeyUsage)
    return not (isinstance(ku, x509.KeyUsage) and not ku.digital_signature)


def a5_ca_constraints(path: Sequence[x509.Certificate]) -> bool:
    """A5: intermediates are CAs that may sign certificates, within their path length."""
    for depth, cert in enumerate(path[1:-1], start=1):
        bc = _extension(cert, x509.BasicConstraints)
        if not isinstance(bc, x509.BasicConstraints) or not bc.ca:
            return False
        below = depth - 1  # intermediates between this one and the leaf
        if bc.path_length is not None and below > bc.path_length:
            return False
        ku = _extension(cert, x509.KeyUsage)
        if isinstance(ku, x509.KeyUsage) and not ku.key_cert_sign:
            return False
    return True


def a5_revocation(world: World, leaf: x509.Certificate) -> bool:
    """A5: a revoked leaf is refused."""
    return sha256_hex(leaf) not in world.revoked


def a5_chain(
    world: World, hostname: str, chain: Sequence[x509.Certificate], now: dt.datetime
) -> tuple[Expected | None, list[x509.Certificate]]:
    """A5: validate a presented chain; a refusal, or None and the validated path."""
    refused = a5_reach_root(world, hostname, chain)
    if refused is not None:
        return refused, []
    roots, uploaded = a5_trust_for(world, hostname)
    path = a5_build_path(chain[0], [*chain[1:], *uploaded], roots)
    assert path is not None
    reasons = a5_validity(path, now)
    if (
        not a5_leaf_usage(path[0])
        or not a5_ca_constraints(path)
        or a5_too_deep(world, path)
        or not a5_name_constraints(path)
        or not a5_san_criticality(path[0])
    ):
        reasons.add("invalid_chain")
    if a5_outside_profile(world, path, anchored=True):
        reasons.add("unsupported_key")
    if not a5_revocation(world, path[0]):
        reasons.add("revoked")
    return (deny(403, *reasons) if reasons else None), path


def chain_validates(
    world: World, hostname: str, chain: Sequence[x509.Certificate], now: dt.datetime
) -> bool:
    """True when ``chain`` validates for ``hostname`` at ``now`` (A5, revocation included)."""
    if not chain or hostname not in world.apps:
        return False
    refused, _ = a5_chain(world, hostname, chain, now)
    return refused is None


def chain_refused(world: World, request: Request, now: dt.datetime) -> bool:
    """True when ``request`` is refused for its presented chain (A2 and A3 having passed)."""
    if not request.chain or a2_host_matches_sni(request) is not None:
        return False
    hostname = request.host.lower().rstrip(".")
    if hostname not in world.apps:
        return False
    refused, _ = a5_chain(world, hostname, request.chain, now)
    return refused is not None


# ---- A4: tokens -------------------------------------------------------------------------------


def a4_token_admits(
    app: App,
    token: Token | None,
    now: dt.datetime,
    revoked: frozenset[str] = frozenset(),
    presented: x509.Certificate | None = None,
) -> bool:
    """A4/A9: a genuine, unexpired token for this application admits while its duration > 0.

    Issue 13: not once the certificate it was minted for is revoked, and not beside another
    certificate than that one. (The suite's applications opt out of certificate binding, so a
    token alone admits.)
    """
    return (
        token is not None
        and token.genuine
        and token.app_host == app.hostname
        and app.session_duration > ZERO
        and now < token.exp
        and token.certificate not in revoked
        and (presented is None or token.certificate == sha256_hex(presented))
        and i8_provider_still_allowed(app, token)
    )


def i8_provider_still_allowed(app: App, token: Token) -> bool:
    """I8: a person's session lasts only while their provider may log them in to the app."""
    return token.person is None or token.person.idp in app.identity_providers


# ---- A5: policies -----------------------------------------------------------------------------


def _glob(pattern: str, text: str) -> bool:
    regex = "".join(".*" if ch == "*" else re.escape(ch) for ch in pattern)
    return re.fullmatch(regex, text) is not None


@dataclasses.dataclass(frozen=True)
class Facts:
    """What rules look at: the validated path, the address, the person, a valid service token."""

    path: Sequence[x509.Certificate]  # empty: no (valid) certificate
    client_ip: str
    person: Person | None = None  # None: nobody logged in (identity rules unknown, I7)
    service_token: ServiceToken | None = None  # only a valid one (I11)


def a5_rule_matches(rule: Rule, path: Sequence[x509.Certificate], client_ip: str) -> bool:
    """A5: one certificate or address rule against the validated path and the client address."""
    if rule.kind == "everyone":
        return True
    if rule.kind == "ip":
        return ipaddress.ip_address(client_ip) in ipaddress.ip_network(rule.value, strict=False)
    if rule.kind in IDENTITY_RULE_KINDS or rule.kind in SERVICE_TOKEN_RULE_KINDS:
        return False  # no person, no service token
    if not path:
        return False  # every other rule needs a valid certificate
    leaf = path[0]
    dns, uris = san_values(leaf)
    value = rule.value.lower().replace(":", "")
    checks: dict[str, Callable[[], bool]] = {
        "certificate": lambda: True,
        "common_name": lambda: common_name_of(leaf) == rule.value,
        "certificate_fingerprint": lambda: sha256_hex(leaf) == value,
        "serial": lambda: int(value or "0", 16) == leaf.serial_number,
        "issuer_fingerprint": lambda: sha256_hex(path[1]) == value,
        "san_dns": lambda: any(_glob(rule.value, n) for n in dns),
        "san_uri": lambda: any(_glob(rule.value, u) for u in uris),
    }
    return checks[rule.kind]()


def domain_of(email: str) -> str:
    """I6: the part of an email after its last ``@``, in lower case."""
    return email.rpartition("@")[2].lower()


def i6_rule_matches(rule: Rule, facts: Facts, person: Person | None) -> bool:
    """I6: one rule of any kind, for a known person (or none) and a valid service token."""
    if rule.kind in SERVICE_TOKEN_RULE_KINDS:
        token = facts.service_token
        if token is None:
            return False
        return rule.kind == "any_valid_service_token" or token.id == rule.value
    if rule.kind in IDENTITY_RULE_KINDS:
        if person is None:
            return False
        if rule.kind == "email":
            return person.email.lower() == rule.value.lower()
        if rule.kind == "email_domain":
            return domain_of(person.email) == rule.value.lower()
        if rule.kind == "group":
            return rule.value in person.groups
        return person.idp == rule.value  # login_method
    return a5_rule_matches(rule, facts.path, facts.client_ip)


def i6_policy_holds(policy: Policy, facts: Facts, person: Person | None) -> bool:
    """P2: any include, all require, no exclude, for one (known or absent) person."""
    return (
        any(i6_rule_matches(r, facts, person) for r in policy.include)
        and all(i6_rule_matches(r, facts, person) for r in policy.require)
        and not any(i6_rule_matches(r, facts, person) for r in policy.exclude)
    )


def _rules(policy: Policy) -> tuple[Rule, ...]:
    return (*policy.include, *policy.require, *policy.exclude)


def i7_candidate_people(policy: Policy, app: App) -> list[Person]:
    """One person per class of identities the policy's rules can tell apart (I7).

    A rule compares the email with given addresses, the email's domain with given domains, the
    groups with given names, the provider with given ids: an identity's answers depend only on
    which of these it equals, so these people stand for every identity a login could bring.
    """
    rules = _rules(policy)
    emails = {r.value.lower() for r in rules if r.kind == "email"}
    emails |= {f"someone-else@{r.value.lower()}" for r in rules if r.kind == "email_domain"}
    emails.add("someone-else@nowhere.invalid")
    groups = sorted({r.value for r in rules if r.kind == "group"})
    group_sets = [
        frozenset(g for i, g in enumerate(groups) if mask >> i & 1)
        for mask in range(2 ** len(groups))
    ]
    return [
        Person(email, idp, gs)
        for email in sorted(emails)
        for idp in app.identity_providers
        for gs in group_sets
    ]


def i7_policy_value(policy: Policy, app: App, facts: Facts) -> bool | None:
    """I7: True when it holds, False when it cannot, None when a login could make it hold."""
    if facts.person is not None or facts.service_token is not None:
        # A known person, or a machine (a valid service token: identity rules are false).
        return i6_policy_holds(policy, facts, facts.person)
    value = _kleene_policy(policy, facts)
    if value is not None:
        return value
    could = any(i6_policy_holds(policy, facts, p) for p in i7_candidate_people(policy, app))
    return None if could else False


def a5_policy_holds(policy: Policy, path: Sequence[x509.Certificate], client_ip: str) -> bool:
    """Policy: any include, all require, no exclude (no person, no service token)."""
    return i6_policy_holds(policy, Facts(path, client_ip), None)


def a5_first_policy(app: App, path: Sequence[x509.Certificate], client_ip: str) -> Policy | None:
    """Policies in order: the first that holds decides (no person, no service token)."""
    return next((p for p in app.policies if a5_policy_holds(p, path, client_ip)), None)


def i7_first_policy(app: App, facts: Facts) -> Policy | Literal[True] | None:
    """P3 in three values: the first policy that holds, None when none does, True for a login."""
    for policy in app.policies:
        value = i7_policy_value(policy, app, facts)
        if value is None:
            return True
        if value:
            return policy
    return None


def _kleene_rule(rule: Rule, facts: Facts) -> bool | None:
    """A rule in three values: an identity rule is unknown without a person."""
    if facts.person is None and rule.kind in IDENTITY_RULE_KINDS:
        return None
    return i6_rule_matches(rule, facts, facts.person)


def _kleene_policy(policy: Policy, facts: Facts) -> bool | None:
    """P2 in Kleene's logic: include any, require all, exclude none (I7)."""

    def any3(values: list[bool | None]) -> bool | None:
        return True if True in values else (None if None in values else False)

    def all3(values: list[bool | None]) -> bool | None:
        return False if False in values else (None if None in values else True)

    include = any3([_kleene_rule(r, facts) for r in policy.include])
    require = all3([_kleene_rule(r, facts) for r in policy.require])
    excluded = any3([_kleene_rule(r, facts) for r in policy.exclude])
    return all3([include, require, None if excluded is None else not excluded])


# ---- I9, I11: identity in a No Duration session, service tokens ------------------------------


def i9_token_person(
    app: App,
    token: Token | None,
    now: dt.datetime,
    revoked: frozenset[str] = frozenset(),
    presented: x509.Certificate | None = None,
) -> Person | None:
    """I9: on a No Duration application the session token brings its person, once checked.

    Its signature, audience, expiry, binding to the certificate just presented and revocation
    are checked as a token's (A4, J1-J3), but it never admits on its own.
    """
    if (
        token is None
        or token.person is None
        or not token.genuine
        or token.app_host != app.hostname
        or not now < token.exp
        or (token.certificate is not None and token.certificate in revoked)
        or (presented is not None and token.certificate != sha256_hex(presented))
        or not i8_provider_still_allowed(app, token)
    ):
        return None
    return token.person


def i11_service_token(
    world: World, presented: Credentials | None, now: dt.datetime
) -> tuple[str | None, ServiceToken | None]:
    """I11: the presented service token's state: None (none presented), valid, invalid, expired."""
    if presented is None:
        return None, None
    token = next((t for t in world.service_tokens if t.client_id == presented.client_id), None)
    if token is None or token.secret != presented.secret:
        return "service_token_invalid", None
    if now >= token.expires:
        return "service_token_expired", None
    return "valid", token


# ---- A6-A9: the answer ------------------------------------------------------------------------


def a9_effective_duration(app: App, policy: Policy) -> dt.timedelta:
    """A8/A9: the policy's duration overrides the application's, except under No Duration."""
    if app.session_duration <= ZERO or policy.session_duration is None:
        return app.session_duration
    return policy.session_duration


def a7_admit(
    app: App,
    policy: Policy,
    certificate: bool,
    now: dt.datetime,
    person: Person | None = None,
    service_token: ServiceToken | None = None,
    logged_in: bool = True,
) -> Expected:
    """A7-A9, I8, I9: admitted by a policy; a cookie exactly when the duration is above zero.

    ``logged_in``: the person comes from a login just made, not from a No Duration session
    token (I9: only the login's decision sets the identity cookie).
    """
    if policy.decision == "bypass":
        return Expected(200, cookie=False, admitted_by="bypass", close=_app_close(app))
    by = "certificate" if certificate else "policy"
    client_id = service_token.client_id if service_token else None
    whole_now = now.replace(microsecond=0)
    duration = a9_effective_duration(app, policy)
    if person is not None and duration <= ZERO:
        # I9: the device is proved on every request; only a login's decision sets the cookie
        # that carries the person, for the policy's duration, else 24 hours.
        lifetime = policy.session_duration
        if lifetime is None:
            lifetime = NO_DURATION_PERSON_LIFETIME
        if not logged_in:
            return Expected(200, cookie=False, close=True, admitted_by=by, person=person)
        if lifetime <= ZERO:
            return Expected(200, cookie=None, close=True, admitted_by=by, person=person)
        seconds = int(lifetime.total_seconds())
        return Expected(
            200,
            cookie=True,
            close=True,
            admitted_by=by,
            cookie_max_age=seconds,
            token_exp=whole_now + dt.timedelta(seconds=seconds),
            person=person,
            service_token=client_id,
        )
    if duration <= ZERO:
        return Expected(
            200, cookie=False, close=True, admitted_by=by, person=person, service_token=client_id
        )
    seconds = int(duration.total_seconds())
    return Expected(
        200,
        cookie=True,
        admitted_by=by,
        cookie_max_age=seconds,
        token_exp=whole_now + dt.timedelta(seconds=seconds),
        person=person,
        service_token=client_id,
    )


def _app_close(app: App) -> bool | None:
    # A9: every response for a No Duration application closes the connection.
    return True if app.session_duration <= ZERO else None


def i7_login(request: Request, close: bool | None, token_state: str | None) -> Expected:
    """I7: a login could admit: a browser is sent to the login route, others get 401.

    A bad service token gets its own reason instead: a machine cannot log in (I7, I11).
    """
    if token_state in ("service_token_invalid", "service_token_expired"):
        assert token_state is not None
        return deny(403, token_state, close=close)
    if request.browser:
        return Expected(302, cookie=False, close=close, redirect=True)
    return deny(401, "login_required", close=close)


def p7_nothing_matched(
    facts: Facts, certificate: bool, token_state: str | None, close: bool | None
) -> Expected:
    """P7, I5, I11: the reason when no policy holds."""
    if token_state in ("service_token_invalid", "service_token_expired"):
        assert token_state is not None
        extra = {"identity_denied"} if facts.person is not None else set()
        return deny(403, token_state, *extra, close=close)
    if facts.person is not None:
        # I8: identity_denied, even without a certificate; I11 names policy_denied for a
        # valid service token no policy admits: both apply.
        extra = {"policy_denied"} if token_state == "valid" else set()
        return deny(403, "identity_denied", *extra, close=close)
    reason = "policy_denied" if certificate or token_state else "no_certificate"
    return deny(403, reason, close=close)


def expect(world: World, request: Request, now: dt.datetime) -> Expected:
    """What the enforcer must answer to ``request`` at ``now`` (access-flow A2-A9, I5-I11)."""
    return _expect(world, request, now)


def _expect(world: World, request: Request, now: dt.datetime) -> Expected:
    misdirected = a2_host_matches_sni(request)
    if misdirected is not None:
        return misdirected
    hostname = request.host.lower().rstrip(".")
    missing = a3_application_exists(world, hostname)
    if missing is not None:
        return missing
    app = world.apps[hostname]
    close = _app_close(app)
    path: list[x509.Certificate] = []
    if request.chain:
        refused, path = a5_chain(world, hostname, request.chain, now)
        if refused is not None:
            return dataclasses.replace(refused, close=close)
    presented = request.chain[0] if request.chain else None
    if a4_token_admits(app, request.token, now, world.revoked, presented):
        assert request.token is not None
        return Expected(
            200,
            cookie=None if path else False,
            admitted_by="token",
            close=close,
            person=request.token.person,
        )
    person = request.person
    if person is None and app.session_duration <= ZERO:
        person = i9_token_person(app, request.token, now, world.revoked, presented)
    token_state, service_token = i11_service_token(world, request.service_token, now)
    facts = Facts(path, request.client_ip, person, service_token)
    policy = i7_first_policy(app, facts)
    if policy is True:
        return i7_login(request, close, token_state)
    if policy is None:
        return p7_nothing_matched(facts, bool(path), token_state, close)
    if policy.decision == "deny":
        extra = set()
        if token_state in ("service_token_invalid", "service_token_expired"):
            extra.add(token_state)  # "when nothing admits", I11
        return deny(403, "policy_denied", *extra, close=close)
    logged_in = request.person is not None
    return a7_admit(app, policy, bool(path), now, person, service_token, logged_in)


def forbidden_admission(world: World, request: Request, now: dt.datetime) -> str | None:
    """The safety property: why admitting this request would be a security failure, or None.

    Nothing may be admitted with a presented certificate that is expired, not yet valid,
    revoked, or from a root not associated with the hostname, whatever else holds (A5, A14).
    """
    if not request.chain or a2_host_matches_sni(request) is not None:
        return None
    hostname = request.host.lower().rstrip(".")
    if hostname not in world.apps:
        return None
    leaf = request.chain[0]
    roots, uploaded = a5_trust_for(world, hostname)
    known = [i for r in world.roots for i in r.intermediates]
    path = a5_build_path(leaf, [*request.chain[1:], *uploaded, *known], roots)
    if path is None:
        return "the certificate does not chain to a root associated with this hostname"
    bad = a5_validity(path, now)
    if "certificate_expired" in bad:
        return "a certificate in the chain is expired"
    if "certificate_not_yet_valid" in bad:
        return "a certificate in the chain is not yet valid"
    if a5_outside_profile(world, path, anchored=True):
        return "a key or signature in the chain is outside the validation profile"
    if not a5_revocation(world, leaf):
        return "the certificate is revoked"
    return None
