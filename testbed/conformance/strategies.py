"""Hypothesis strategies for conformance cases, and building their certificates.

A case is drawn as a small frozen *spec* (offsets in seconds, enum-like strings, flags) so
that hypothesis shrinks it well and a failing one prints readably; :func:`build_pki` then
turns the spec into real certificates. Keys come from a per-process pool (a few keys per type
and role, made once): generating an RSA key per example would dominate the run time.

What a case covers: a root with 0 to 3 intermediates, each with its own validity window and
key type; intermediates that are or are not CAs, with path-length limits and key usage
without ``keyCertSign``; intermediates presented, uploaded with the root, uploaded with a
decoy root only (``missing_intermediate``) or nowhere; leaves with every EKU shape, key usage
without ``digitalSignature``, SANs, forged signatures; roots associated with the protected
hostname, another one, both or none; optionally a managed-CA leaf that may be revoked; one to
three policies of every decision with include/require/exclude rules that match or not; session
durations including No Duration (``0s``) and policy overrides; SNI/Host choices; clock jumps
aimed at validity and token-expiry boundaries.

The validation profile (issue 14): keys and signatures inside it and, one time in eight, outside
it (Ed25519, Ed448, DSA, RSA-1024, P-192, P-224, secp256k1, SHA-1); chains deeper than the
target's ``max_chain_depth``; an intermediate uploaded as the trust anchor; CAs without key
usage; critical EKUs and SANs; CAs with dNSName name constraints above leaves with and without
SANs whose names fall inside or outside them.

People and service tokens (issue 17, access-flow I5-I11), when the target can express them:
identity rules (``email``, ``email_domain``, ``group``, ``login_method``) and service-token
rules in include/require/exclude beside the certificate rules, with values drawn from small
pools that hold the traps (a domain that is a suffix of another, an address in another case);
requests that carry a person's session token (bound to the leaf, to no certificate or to
another one; genuine, expired), a person established by a login (decided in process: the
callback's path), service-token headers (valid, wrong secret, unknown id, one that expires
within the case), and browsers (``Accept: text/html``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import secrets
import threading
from collections.abc import Mapping, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import strategies as st

from devices.pki import generate_key

APP_HOST = "app.conformance.test"
OTHER_HOST = "other.conformance.test"
NOAPP_HOST = "noapp.conformance.test"

# Keys inside the validation profile (docs/access-flow.md, "Validation profile") and outside it.
PROFILE_KEY_TYPES = ("ec-p256", "ec-p384", "ec-p521", "rsa-2048")
OUTSIDE_KEY_TYPES = ("ed25519", "ed448", "rsa-1024", "dsa-2048", "ec-p192", "ec-p224", "ec-k256")
KEY_TYPES = (*PROFILE_KEY_TYPES, *OUTSIDE_KEY_TYPES)
# Leaf keys a client can still complete a TLS handshake with (the others fail in TLS before
# the enforcer can judge the chain: no signature scheme exists for P-192, P-224 or secp256k1).
LEAF_KEY_TYPES = (*PROFILE_KEY_TYPES, "ed25519", "ed448", "rsa-1024", "dsa-2048")
# Hashes of certificate signatures; SHA-1 is outside the profile. cryptography no longer
# signs with SHA-1, so an RSA issuer's SHA-256 signature is redone by hand (see _with_sha1);
# below an EC, EdDSA or DSA issuer "sha1" falls back to SHA-256.
PROFILE_HASHES = ("sha256", "sha384", "sha512")
HASHES = (*PROFILE_HASHES, "sha1")
DAY = 86400
DURATIONS = {"0s": 0, "15m": 900, "1h": 3600, "24h": 86400, "720h": 2592000}

# Roles get their own pool slots so that, say, a forged leaf is never signed by its issuer.
_SLOTS = {"root": 0, "decoy": 1, "int1": 2, "int2": 3, "int3": 4, "leaf": 5, "forger": 6}
PrivateKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | dsa.DSAPrivateKey
)
_pool: dict[tuple[str, int], PrivateKey] = {}
_pool_lock = threading.Lock()
_dsa_parameters: list[dsa.DSAParameters] = []  # made once: DSA parameters take a second or two
_CURVES = {"ec-p521": ec.SECP521R1, "ec-p192": ec.SECP192R1, "ec-p224": ec.SECP224R1}


def _generate(key_type: str) -> PrivateKey:
    if key_type in _CURVES:
        return ec.generate_private_key(_CURVES[key_type]())
    if key_type == "ec-k256":
        return ec.generate_private_key(ec.SECP256K1())
    if key_type == "rsa-1024":
        return rsa.generate_private_key(public_exponent=65537, key_size=1024)
    if key_type == "ed448":
        return ed448.Ed448PrivateKey.generate()
    if key_type == "dsa-2048":
        if not _dsa_parameters:
            _dsa_parameters.append(dsa.generate_parameters(2048))
        return _dsa_parameters[0].generate_private_key()
    return generate_key(key_type)


def pooled_key(key_type: str, role: str) -> PrivateKey:
    """Return the pool's key for a type and role, generating it on first use in this process."""
    slot = (key_type, _SLOTS[role])
    with _pool_lock:
        if slot not in _pool:
            _pool[slot] = _generate(key_type)
        return _pool[slot]


def in_profile(key_type: str) -> bool:
    """True for key types inside the default validation profile."""
    return key_type in PROFILE_KEY_TYPES


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a target can express; strategies only draw cases inside it."""

    clock: bool = True  # the target's clock can be set (validity and token boundaries)
    reasons: bool = True  # it answers 403 with X-Access-Denied-Reason codes
    tokens: bool = True  # cookies, tokens, session durations
    policies: bool = True  # policies beyond one Valid Certificate
    managed_ca: bool = True  # a managed CA that issues and revokes
    misdirected: bool = True  # Host != SNI is 421
    key_types: tuple[str, ...] = KEY_TYPES
    hashes: tuple[str, ...] = HASHES
    # The profile's own rules beyond keys: intermediates as trust anchors, SAN criticality.
    profile_rules: bool = True
    # The target's max_chain_depth when known (None: not judged; the cases stay under 8).
    max_chain_depth: int | None = None
    # Case families left out, by name (see KNOWN_FAMILIES): to run the rest of the suite
    # while a divergence already reported stays unfixed.
    skip: frozenset[str] = frozenset()
    # The wire the cases travel: "http1" (h11) or "h2" (one stream per request, :authority as
    # Host, so Host != SNI cases are connection coalescing).
    transport: str = "http1"
    # Issue 17: identity rules and people's session tokens (needs a target that can mint
    # session tokens with its own signing key: the built-in enforcer), service tokens created
    # through the admin API, and the login route's redirect for browsers.
    identity: bool = False
    service_tokens: bool = False
    browser: bool = False
    # The target decides in process too (enforcer.decision.decide): a person established by a
    # login (the callback's path, which needs an identity provider on the wire).
    in_process: bool = False
    # The origin gets the person's email in Cf-Access-Authenticated-User-Email (I8).
    email_header: bool = False

    def draws_key_types(self, ca: bool = True) -> tuple[str, ...]:
        """The key types cases may use for CAs (or, with ``ca=False``, for leaves)."""
        types = self.key_types if ca else tuple(k for k in self.key_types if k in LEAF_KEY_TYPES)
        if "outside-profile" in self.skip:
            types = tuple(k for k in types if in_profile(k))
        if ca and "ed25519-ca" in self.skip:
            types = tuple(k for k in types if k != "ed25519")
        return types

    def draws_hashes(self) -> tuple[str, ...]:
        """The signature hashes certificates may be signed with."""
        if "outside-profile" in self.skip:
            return tuple(h for h in self.hashes if h in PROFILE_HASHES)
        return self.hashes


# Families of cases that can be skipped with --skip (each names one kind of certificate).
KNOWN_FAMILIES = {
    "ed25519-ca": "roots and intermediates with Ed25519 keys (certificates signed with Ed25519)",
    "outside-profile": "keys and signatures outside the validation profile (Ed25519, Ed448, "
    "DSA, RSA-1024, P-192, P-224, secp256k1, SHA-1): unsupported_key",
    "leaf-key-usage": "client leaves whose key usage lacks digitalSignature",
    "mixed-chain": "an uploaded intermediate below one that is not uploaded",
}


@dataclasses.dataclass(frozen=True)
class IntermediateSpec:
    """One intermediate CA, in order from the root down."""

    key_type: str = "ec-p256"
    not_before: int = -DAY
    not_after: int = 365 * DAY
    is_ca: bool = True
    path_length: int | None = None
    key_cert_sign: bool = True
    presented: bool = True  # sent by the client
    uploaded: bool = False  # uploaded with the root
    known_elsewhere: bool = False  # uploaded with the decoy root
    signature: str = "sha256"  # the hash its issuer signs it with (Ed25519/Ed448: none)
    key_usage: bool = True  # False: no key usage extension (RFC 5280 allows it on a CA)
    permitted: tuple[str, ...] = ()  # name constraints: permitted dNSName subtrees
    excluded: tuple[str, ...] = ()  # name constraints: excluded dNSName subtrees


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """The client certificate."""

    cn: str = "device-1"
    key_type: str = "ec-p256"
    not_before: int = -DAY
    not_after: int = 30 * DAY
    eku: str = "client"  # client, server, both, none
    digital_signature: bool = True
    san_dns: tuple[str, ...] = ()
    san_uris: tuple[str, ...] = ()
    forged: bool = False  # signed by a key that is not its issuer's
    signature: str = "sha256"
    eku_critical: bool = False  # RFC 5280 allows a critical EKU
    san_critical: bool = False  # with a non-empty subject: refused by the profile


@dataclasses.dataclass(frozen=True)
class ManagedSpec:
    """A leaf issued by the target's managed CA instead of the PKI's."""

    hostnames: tuple[str, ...] = (APP_HOST,)
    validity_days: int = 30
    revoked: bool = False


@dataclasses.dataclass(frozen=True)
class PkiSpec:
    """A root, its intermediates, a leaf, and where the roots are associated."""

    root_key_type: str = "ec-p256"
    root_not_before: int = -DAY
    root_not_after: int = 3650 * DAY
    root_hostnames: tuple[str, ...] = (APP_HOST,)
    intermediates: tuple[IntermediateSpec, ...] = (IntermediateSpec(),)
    leaf: LeafSpec = LeafSpec()
    decoy_hostnames: tuple[str, ...] | None = None  # a second, unrelated root (None: none)
    managed: ManagedSpec | None = None
    root_key_usage: bool = True
    # The uploaded trust anchor: 0 the root, i the i-th intermediate (not self-signed; the
    # root and the intermediates above it are then not uploaded).
    anchor: int = 0


@dataclasses.dataclass(frozen=True)
class RuleSpec:
    """A rule kind and whether its value is made to match the leaf (or, for identity and
    service-token rules, the value itself: symbolic provider and token names are resolved
    when the case is provisioned)."""

    kind: str
    match: bool = True
    value: str = ""


# People (symbolic provider names; the target maps them to the ids it created).
IDP_A, IDP_B = "idp-a", "idp-b"
PEOPLE: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "alice": ("alice@example.com", IDP_A, ("engineering",)),
    "carol": ("carol@example.com", IDP_A, ("sales",)),
    "bob": ("bob@other.test", IDP_B, ()),
    "alice-upper": ("Alice@EXAMPLE.com", IDP_A, ("engineering",)),
    "dave": ("dave@mail.example.com", IDP_B, ("engineering", "sales")),
}
# Values of identity rules; each pool holds a trap (a suffix domain, another case).
IDENTITY_VALUES: dict[str, tuple[str, ...]] = {
    "email": ("alice@example.com", "carol@example.com", "bob@other.test", "ALICE@example.com"),
    "email_domain": ("example.com", "other.test", "ample.com", "Example.COM", "mail.example.com"),
    "group": ("engineering", "sales", "admins"),
    "login_method": (IDP_A, IDP_B),
}
SERVICE_TOKENS = ("st-long", "st-short")  # created once per target: 8760h and 1h
ST_DURATIONS = {"st-long": "8760h", "st-short": "1h"}
# What a request presents as a service token.
ST_PRESENTED = ("st-long", "st-short", "wrong-secret", "unknown-id")


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """A policy's shape; values are filled in from the leaf when the case is built."""

    decision: str = "non_identity"
    include: tuple[RuleSpec, ...] = (RuleSpec("certificate"),)
    require: tuple[RuleSpec, ...] = ()
    exclude: tuple[RuleSpec, ...] = ()
    session_duration: str | None = None


@dataclasses.dataclass(frozen=True)
class RequestSpec:
    """The first request: where it goes and what it carries."""

    sni: str = APP_HOST
    host_differs: bool = False
    present_certificate: bool = True
    junk_token: bool = False
    # Issue 17: a person's session token (a PEOPLE key), what it is bound to and whether it
    # expired before the request; a person established by a login (decided in process);
    # a service token presented (ST_PRESENTED); a browser's Accept.
    session_person: str | None = None
    session_binding: str = "leaf"  # leaf, none, other
    session_expired: bool = False
    login_person: str | None = None
    service_token: str | None = None
    browser: bool = False


JUMPS = (
    "none",
    "second",
    "hour",
    "day",
    "month",
    "token_exp_minus_1s",
    "token_exp",
    "leaf_not_after",
    "leaf_not_after_plus_1s",
    "leaf_not_before",
    "first_window_edge_plus_1s",
)
SERVICE_TOKEN_JUMPS = ("st_short_expiry", "st_short_expiry_plus_1s")


@dataclasses.dataclass(frozen=True)
class CaseSpec:
    """A whole case: the PKI, the protected application, the request and the clock jump."""

    pki: PkiSpec = PkiSpec()
    session_duration: str = "24h"
    policies: tuple[PolicySpec, ...] = (PolicySpec(),)
    request: RequestSpec = RequestSpec()
    jump: str = "none"
    # The providers that may log the application's users in (None: every one of the account).
    allowed_idps: tuple[str, ...] | None = None


# ---- strategies -------------------------------------------------------------------------------

_NOT_BEFORE = (-30 * DAY, -DAY, -60, 0, 60, DAY)
_NOT_AFTER = (-DAY, -60, 0, 60, DAY, 30 * DAY, 365 * DAY)
_COARSE_NOT_BEFORE = (-30 * DAY, -DAY, DAY)
_COARSE_NOT_AFTER = (-DAY, DAY, 30 * DAY, 365 * DAY)


@st.composite
def windows(draw: st.DrawFn, caps: Capabilities, valid_bias: bool = True) -> tuple[int, int]:
    """A validity window around now (offsets in seconds); mostly valid, sometimes not."""
    if valid_bias and draw(st.integers(0, 5)) != 5:
        return (-DAY, 365 * DAY)
    starts, ends = (
        (_NOT_BEFORE, _NOT_AFTER) if caps.clock else (_COARSE_NOT_BEFORE, _COARSE_NOT_AFTER)
    )
    start = draw(st.sampled_from(starts))
    end = draw(st.sampled_from([e for e in ends if e > start]))
    return start, end


def _key_type(draw: st.DrawFn, types: tuple[str, ...]) -> str:
    """Mostly a key inside the profile, one time in eight any key the target can take."""
    inside = [k for k in types if in_profile(k)] or list(types)
    return draw(st.sampled_from(list(types) if draw(st.integers(0, 7)) == 7 else inside))


def _signature(draw: st.DrawFn, caps: Capabilities) -> str:
    return "sha256" if draw(st.integers(0, 7)) != 7 else draw(st.sampled_from(caps.draws_hashes()))


# Name constraints a CA may carry: (permitted, excluded) dNSName subtrees.
NAME_CONSTRAINTS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("fleet.test",), ()),
    ((), ("factory-b.test",)),
    (("fleet.test", "example.test"), ("alt.example.test",)),
)


@st.composite
def intermediate_specs(draw: st.DrawFn, caps: Capabilities) -> IntermediateSpec:
    """One intermediate: usually sound, sometimes defective or not sent."""
    nb, na = draw(windows(caps))
    sound = draw(st.integers(0, 4)) != 4
    permitted, excluded = (
        draw(st.sampled_from(NAME_CONSTRAINTS)) if draw(st.integers(0, 5)) == 5 else ((), ())
    )
    return IntermediateSpec(
        key_type=_key_type(draw, caps.draws_key_types()),
        not_before=nb,
        not_after=na,
        is_ca=sound or draw(st.booleans()),
        path_length=None if sound else draw(st.sampled_from([None, 0, 1])),
        key_cert_sign=sound or draw(st.booleans()),
        presented=draw(st.integers(0, 5)) != 5,
        uploaded=draw(st.booleans()),
        known_elsewhere=draw(st.integers(0, 3)) == 3,
        signature=_signature(draw, caps),
        key_usage=draw(st.integers(0, 5)) != 5,
        permitted=permitted,
        excluded=excluded,
    )


# Common Names: single labels, DNS names inside and outside the name constraints, and one
# that is no DNS name at all (for SAN-less leaves under name-constrained CAs).
_CNS = (
    "device-1",
    "device-2",
    "sensor-7",
    "device-1.fleet.test",
    "device-1.factory-b.test",
    "Device 7",
)


@st.composite
def leaf_specs(draw: st.DrawFn, caps: Capabilities) -> LeafSpec:
    """A client leaf: usually sound, sometimes with a wrong EKU, key usage or signature."""
    nb, na = draw(windows(caps))
    sound = draw(st.integers(0, 4)) != 4
    dns = draw(st.sampled_from([(), ("d1.fleet.test",), ("d1.fleet.test", "alt.example.test")]))
    uris = draw(st.sampled_from([(), ("spiffe://fleet.test/device/1",)]))
    eku = "client" if sound else draw(st.sampled_from(["client", "server", "both", "none"]))
    return LeafSpec(
        cn=draw(st.sampled_from(_CNS)),
        key_type=_key_type(draw, caps.draws_key_types(ca=False)),
        not_before=nb,
        not_after=na,
        eku=eku,
        digital_signature=sound or "leaf-key-usage" in caps.skip or draw(st.booleans()),
        san_dns=dns,
        san_uris=uris,
        forged=not sound and draw(st.integers(0, 3)) == 3,
        signature=_signature(draw, caps),
        eku_critical=eku != "none" and draw(st.integers(0, 5)) == 5,
        san_critical=caps.profile_rules
        and bool(dns or uris)
        and not sound
        and draw(st.integers(0, 3)) == 3,
    )


_HOSTNAME_SETS: tuple[tuple[str, ...], ...] = (
    *([(APP_HOST,)] * 6),
    (APP_HOST, OTHER_HOST),
    (OTHER_HOST,),
    (),
)


@st.composite
def pki_specs(draw: st.DrawFn, caps: Capabilities) -> PkiSpec:
    """A PKI tree with 0 to 3 intermediates, a leaf and the roots' hostnames."""
    nb, na = draw(windows(caps))
    managed = None
    if caps.managed_ca and draw(st.integers(0, 9)) == 9:
        managed = ManagedSpec(
            hostnames=draw(st.sampled_from(_HOSTNAME_SETS)),
            validity_days=draw(st.sampled_from([1, 30])),
            revoked=draw(st.booleans()),
        )
    intermediates = draw(st.lists(intermediate_specs(caps), max_size=3))
    if "mixed-chain" in caps.skip:
        # Uploaded intermediates form a root-side run: below the first one not uploaded with
        # the root, none is uploaded anywhere. OpenSSL (nginx) stops building at the first
        # certificate of its trust store, so it needs this.
        gap = False
        for i, inter in enumerate(intermediates):
            if gap:
                intermediates[i] = dataclasses.replace(inter, uploaded=False, known_elsewhere=False)
            gap = gap or not inter.uploaded
    root_key_type = _key_type(draw, caps.draws_key_types())
    anchor = 0
    if caps.profile_rules and intermediates and draw(st.integers(0, 5)) == 5:
        # An intermediate as the trust anchor. It is a sound CA, and neither its key nor its
        # signature (which no one checks once it is the anchor) is outside the profile: the
        # model need not guess whether an anchor's own signature counts.
        anchor = draw(st.integers(1, len(intermediates)))
        profile_key = draw(st.sampled_from(PROFILE_KEY_TYPES))
        root_key_type = root_key_type if in_profile(root_key_type) else profile_key
        for i in range(anchor):
            inter = intermediates[i]
            intermediates[i] = dataclasses.replace(
                inter,
                key_type=inter.key_type if in_profile(inter.key_type) else profile_key,
                signature="sha256",
                **(
                    {
                        "is_ca": True,
                        "path_length": None,
                        "key_cert_sign": True,
                        "permitted": (),
                        "excluded": (),
                    }
                    if i == anchor - 1
                    else {}
                ),
            )
    return PkiSpec(
        root_key_type=root_key_type,
        root_not_before=nb,
        root_not_after=na,
        root_hostnames=draw(st.sampled_from(_HOSTNAME_SETS)),
        intermediates=tuple(intermediates),
        leaf=draw(leaf_specs(caps)),
        decoy_hostnames=draw(st.sampled_from([None, None, (APP_HOST,), (OTHER_HOST,), ()])),
        managed=managed,
        root_key_usage=draw(st.integers(0, 7)) != 7,
        anchor=anchor,
    )


_CERT_RULES = (
    "certificate",
    "common_name",
    "certificate_fingerprint",
    "serial",
    "issuer_fingerprint",
    "san_dns",
    "san_uri",
)


@st.composite
def rule_specs(draw: st.DrawFn, caps: Capabilities | None = None) -> RuleSpec:
    """A rule of any kind the target can express, made to match the leaf or not."""
    kinds = [*_CERT_RULES, "common_name", "everyone", "ip"]
    if caps is not None and caps.identity:
        kinds += [*IDENTITY_VALUES, *IDENTITY_VALUES, "email_domain"]
    if caps is not None and caps.service_tokens:
        kinds += ["service_token", "any_valid_service_token"]
    kind = draw(st.sampled_from(kinds))
    if kind in IDENTITY_VALUES:
        return RuleSpec(kind, value=draw(st.sampled_from(IDENTITY_VALUES[kind])))
    if kind == "service_token":
        return RuleSpec(kind, value=draw(st.sampled_from(SERVICE_TOKENS)))
    if kind == "any_valid_service_token":
        return RuleSpec(kind)
    return RuleSpec(kind, draw(st.integers(0, 2)) != 2)


@st.composite
def people_policy_specs(draw: st.DrawFn, caps: Capabilities) -> PolicySpec:
    """The issue's shapes: a person (by domain, group, email) AND a certificate, and kin."""
    person = draw(
        st.sampled_from(
            [
                RuleSpec("email_domain", value="example.com"),
                RuleSpec("group", value="engineering"),
                RuleSpec("email", value="bob@other.test"),
                RuleSpec("login_method", value=IDP_B),
            ]
        )
    )
    device = draw(
        st.sampled_from([RuleSpec("certificate"), RuleSpec("common_name", draw(st.booleans()))])
    )
    shape = draw(st.integers(0, 3))
    include, require = ((person,), (device,)) if shape != 1 else ((device,), (person,))
    if shape == 3:
        include, require = (person, device), ()
    return PolicySpec(
        decision=draw(st.sampled_from(["allow", "allow", "non_identity", "deny", "bypass"])),
        include=include,
        require=require,
        exclude=(draw(rule_specs(caps)),) if draw(st.integers(0, 4)) == 4 else (),
        session_duration=draw(st.sampled_from([None, None, "0s", "1h"])) if caps.tokens else None,
    )


@st.composite
def policy_specs(draw: st.DrawFn, caps: Capabilities) -> PolicySpec:
    """A policy of any decision with include/require/exclude rules."""
    if not caps.policies:
        return PolicySpec()
    if (caps.identity or caps.service_tokens) and draw(st.integers(0, 2)) == 2:
        if caps.identity and draw(st.booleans()):
            return draw(people_policy_specs(caps))
        return PolicySpec(
            include=(draw(rule_specs(caps)),),
            require=(draw(rule_specs(caps)),) if draw(st.booleans()) else (),
        )
    if draw(st.booleans()):
        # The seeds' two policies, Valid Certificate and Common Name, half of the time.
        kind = draw(st.sampled_from(["certificate", "common_name"]))
        return PolicySpec(include=(RuleSpec(kind, draw(st.integers(0, 2)) != 2),))
    return PolicySpec(
        decision=draw(st.sampled_from(["non_identity", "non_identity", "allow", "deny", "bypass"])),
        include=tuple(draw(st.lists(rule_specs(caps), min_size=1, max_size=2))),
        require=tuple(draw(st.lists(rule_specs(caps), max_size=1))),
        exclude=tuple(draw(st.lists(rule_specs(caps), max_size=1))),
        session_duration=draw(st.sampled_from([None, None, None, "0s", "1h"]))
        if caps.tokens
        else None,
    )


@st.composite
def request_specs(draw: st.DrawFn, caps: Capabilities) -> RequestSpec:
    """The first request's SNI, Host, certificate, junk token, person and service token."""
    spec = RequestSpec(
        sni=draw(st.sampled_from([APP_HOST] * 6 + [OTHER_HOST, NOAPP_HOST])),
        host_differs=caps.misdirected and draw(st.integers(0, 9)) == 9,
        present_certificate=draw(st.integers(0, 5)) != 5,
        junk_token=caps.tokens and draw(st.integers(0, 5)) == 5,
    )
    people = sorted(PEOPLE)
    if caps.identity and caps.tokens and not spec.junk_token and draw(st.integers(0, 2)) == 2:
        spec = dataclasses.replace(
            spec,
            session_person=draw(st.sampled_from(people)),
            session_binding=draw(st.sampled_from(["leaf", "leaf", "leaf", "none", "other"])),
            session_expired=draw(st.integers(0, 5)) == 5,
        )
    if caps.identity and caps.in_process and draw(st.integers(0, 2)) == 2:
        spec = dataclasses.replace(spec, login_person=draw(st.sampled_from(people)))
    if caps.service_tokens and draw(st.integers(0, 2)) == 2:
        spec = dataclasses.replace(spec, service_token=draw(st.sampled_from(ST_PRESENTED)))
    if caps.browser and draw(st.integers(0, 3)) == 3:
        spec = dataclasses.replace(spec, browser=True)
    return spec


def case_specs(caps: Capabilities | None = None) -> st.SearchStrategy[CaseSpec]:
    """Whole cases inside what the target can express."""
    caps = caps or Capabilities()
    durations = list(DURATIONS) if caps.tokens else ["24h"]
    jumps = JUMPS if caps.clock else ("none",)
    if caps.clock and caps.service_tokens:
        jumps = (*jumps, *SERVICE_TOKEN_JUMPS)
    idps = [None, None, (IDP_A,), (IDP_B,)] if caps.identity else [None]
    return st.builds(
        CaseSpec,
        pki=pki_specs(caps),
        session_duration=st.sampled_from(durations),
        policies=st.lists(policy_specs(caps), min_size=1, max_size=3 if caps.policies else 1).map(
            tuple
        ),
        request=request_specs(caps),
        jump=st.sampled_from(jumps),
        allowed_idps=st.sampled_from(idps),
    )


# ---- building certificates ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BuiltPki:
    """The certificates of a case, and what to upload where."""

    root: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]  # root side first
    leaf: x509.Certificate | None  # None until a managed CA issues it
    leaf_key: PrivateKey
    presented: tuple[x509.Certificate, ...]  # intermediates the client sends, leaf side first
    uploaded: tuple[x509.Certificate, ...]  # uploaded with the anchor (below it)
    decoy: x509.Certificate | None
    decoy_uploaded: tuple[x509.Certificate, ...]
    anchor: x509.Certificate  # the uploaded trust anchor: the root or an intermediate

    @property
    def issuer(self) -> x509.Certificate:
        """The certificate that issued the leaf (in the PKI)."""
        return self.intermediates[-1] if self.intermediates else self.root


_HASHES = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}
_HASHES["sha1"] = hashes.SHA256  # signed with SHA-256, then redone with SHA-1 (RSA only)
_SHA256_RSA = bytes.fromhex("06092a864886f70d01010b")  # the OID sha256WithRSAEncryption, DER
_SHA1_RSA = bytes.fromhex("06092a864886f70d010105")  # sha1WithRSAEncryption: the same length


def _sign_hash(key: PrivateKey, name: str = "sha256") -> hashes.HashAlgorithm | None:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return _HASHES[name]()


def _signed(
    builder: x509.CertificateBuilder, key: PrivateKey, name: str = "sha256"
) -> x509.Certificate:
    """Sign with ``key`` and the named hash; "sha1" is made by hand below an RSA issuer.

    The two algorithm OIDs have the same length and so does an RSA signature, so swapping
    them in the DER and re-signing the new TBS bytes with SHA-1 keeps every length right.
    """
    cert = builder.sign(key, _sign_hash(key, name))
    if name != "sha1" or not isinstance(key, rsa.RSAPrivateKey):
        return cert
    tbs = cert.tbs_certificate_bytes.replace(_SHA256_RSA, _SHA1_RSA)
    signature = key.sign(tbs, padding.PKCS1v15(), hashes.SHA1())
    der = cert.public_bytes(serialization.Encoding.DER)
    der = der.replace(cert.tbs_certificate_bytes, tbs).replace(_SHA256_RSA, _SHA1_RSA)
    return x509.load_der_x509_certificate(der.replace(cert.signature, signature))


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mtls-testbed conformance"),
        ]
    )


def _usage(*, digital_signature: bool, cert_sign: bool, encipher: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=encipher,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _ca_cert(
    cn: str,
    key: PrivateKey,
    issuer_name: x509.Name | None,
    issuer_key: PrivateKey,
    t0: dt.datetime,
    nb: int,
    na: int,
    *,
    is_ca: bool = True,
    path_length: int | None = None,
    cert_sign: bool = True,
    key_usage: bool = True,
    signature: str = "sha256",
    permitted: tuple[str, ...] = (),
    excluded: tuple[str, ...] = (),
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_name or _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(t0 + dt.timedelta(seconds=nb))
        .not_valid_after(t0 + dt.timedelta(seconds=na))
        .add_extension(
            x509.BasicConstraints(ca=is_ca, path_length=path_length if is_ca else None),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if key_usage:
        builder = builder.add_extension(
            _usage(digital_signature=True, cert_sign=cert_sign, encipher=False), critical=True
        )
    if permitted or excluded:
        builder = builder.add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.DNSName(n) for n in permitted] or None,
                excluded_subtrees=[x509.DNSName(n) for n in excluded] or None,
            ),
            critical=True,
        )
    return _signed(builder, issuer_key, signature)


_EKUS = {
    "client": [ExtendedKeyUsageOID.CLIENT_AUTH],
    "server": [ExtendedKeyUsageOID.SERVER_AUTH],
    "both": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
    "none": None,
}


def _leaf_cert(
    spec: LeafSpec,
    key: PrivateKey,
    issuer: x509.Certificate,
    issuer_key: PrivateKey,
    t0: dt.datetime,
) -> x509.Certificate:
    signer = pooled_key(spec.key_type, "forger") if spec.forged else issuer_key
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, spec.cn)]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(t0 + dt.timedelta(seconds=spec.not_before))
        .not_valid_after(t0 + dt.timedelta(seconds=spec.not_after))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _usage(
                digital_signature=spec.digital_signature,
                # A key usage extension must assert some bit: keep one when digitalSignature is off.
                cert_sign=False,
                encipher=isinstance(key, rsa.RSAPrivateKey) or not spec.digital_signature,
            ),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    eku = _EKUS[spec.eku]
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=spec.eku_critical)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in spec.san_dns]
    sans += [x509.UniformResourceIdentifier(u) for u in spec.san_uris]
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(sans), critical=spec.san_critical
        )
    return _signed(builder, signer, spec.signature)


def build_pki(spec: PkiSpec, t0: dt.datetime) -> BuiltPki:
    """Make the certificates a spec describes, with validity windows relative to ``t0``."""
    tag = secrets.token_hex(3)  # fresh names per case: no case sees another's certificates
    root_key = pooled_key(spec.root_key_type, "root")
    root = _ca_cert(
        f"conformance root {tag}",
        root_key,
        None,
        root_key,
        t0,
        spec.root_not_before,
        spec.root_not_after,
        key_usage=spec.root_key_usage,
    )
    chain: list[x509.Certificate] = []
    issuer, issuer_key = root, root_key
    for i, ispec in enumerate(spec.intermediates, start=1):
        key = pooled_key(ispec.key_type, f"int{i}")
        cert = _ca_cert(
            f"conformance intermediate {i} {tag}",
            key,
            issuer.subject,
            issuer_key,
            t0,
            ispec.not_before,
            ispec.not_after,
            is_ca=ispec.is_ca,
            path_length=ispec.path_length,
            cert_sign=ispec.key_cert_sign,
            key_usage=ispec.key_usage,
            signature=ispec.signature,
            permitted=ispec.permitted,
            excluded=ispec.excluded,
        )
        chain.append(cert)
        issuer, issuer_key = cert, key
    leaf_key = pooled_key(spec.leaf.key_type, "leaf")
    leaf = None
    if spec.managed is None:
        leaf = _leaf_cert(spec.leaf, leaf_key, issuer, issuer_key, t0)
    decoy = None
    if spec.decoy_hostnames is not None or any(i.known_elsewhere for i in spec.intermediates):
        decoy_key = pooled_key("ec-p256", "decoy")
        decoy = _ca_cert(
            f"conformance decoy root {tag}", decoy_key, None, decoy_key, t0, -DAY, 3650 * DAY
        )
    pairs = list(zip(spec.intermediates, chain, strict=True))
    anchor = chain[spec.anchor - 1] if spec.anchor else root
    return BuiltPki(
        root=root,
        intermediates=tuple(chain),
        leaf=leaf,
        leaf_key=leaf_key,
        presented=tuple(c for s, c in reversed(pairs) if s.presented),
        # Only intermediates below the anchor are uploaded with it.
        uploaded=tuple(c for s, c in pairs[spec.anchor :] if s.uploaded),
        decoy=decoy,
        decoy_uploaded=tuple(c for s, c in pairs if s.known_elsewhere),
        anchor=anchor,
    )


# Identity and service-token rules in their API form: kind -> the inner key of the value.
_VALUE_KEYS = {
    "email": "email",
    "email_domain": "domain",
    "group": "name",
    "login_method": "id",
    "service_token": "token_id",
}


def rule_value(
    rule: RuleSpec,
    leaf: x509.Certificate,
    issuer: x509.Certificate,
    ids: Mapping[str, str] | None = None,
) -> dict[str, dict[str, str]]:
    """A rule's API form, with a value that matches the leaf (or deliberately does not).

    ``ids`` maps the symbolic provider and service-token names to the target's ids.
    """
    from testbed.conformance.model import common_name_of, san_values, sha256_hex

    nowhere = hashlib.sha256(b"no such certificate").hexdigest()
    dns, _ = san_values(leaf)
    if rule.kind in ("everyone", "certificate", "any_valid_service_token"):
        return {rule.kind: {}}
    if rule.kind in _VALUE_KEYS:
        return {rule.kind: {_VALUE_KEYS[rule.kind]: (ids or {}).get(rule.value, rule.value)}}
    values = {
        "common_name": ("common_name", common_name_of(leaf) or "", "someone-else"),
        "certificate_fingerprint": ("sha256", sha256_hex(leaf), nowhere),
        "serial": ("serial", format(leaf.serial_number, "x"), "1"),
        "issuer_fingerprint": ("sha256", sha256_hex(issuer), nowhere),
        "san_dns": (
            "pattern",
            ("*" + dns[0][dns[0].find(".") :]) if dns else "*.fleet.test",
            "*.nowhere.test",
        ),
        "san_uri": ("pattern", "spiffe://fleet.test/*", "spiffe://elsewhere.test/*"),
        "ip": ("ip", "127.0.0.0/8", "192.0.2.0/24"),
    }
    key, good, bad = values[rule.kind]
    return {rule.kind: {key: good if rule.match else bad}}


def policy_body(
    spec: PolicySpec,
    index: int,
    leaf: x509.Certificate | None,
    issuer: x509.Certificate,
    ids: Mapping[str, str] | None = None,
) -> dict[str, object]:
    """A policy's admin-API body for this leaf (a placeholder leaf when none was presented)."""

    def rules(items: Sequence[RuleSpec]) -> list[dict[str, dict[str, str]]]:
        assert leaf is not None
        return [rule_value(r, leaf, issuer, ids) for r in items]

    body: dict[str, object] = {
        "name": f"policy-{index}",
        "decision": spec.decision,
        "include": rules(spec.include),
        "require": rules(spec.require),
        "exclude": rules(spec.exclude),
    }
    if spec.session_duration is not None:
        body["session_duration"] = spec.session_duration
    return body


def pem(*certs: x509.Certificate) -> bytes:
    """Certificates as concatenated PEM."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key: PrivateKey) -> bytes:
    """A private key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def csr_pem(key: PrivateKey, cn: str) -> str:
    """A CSR for ``cn`` signed with ``key`` (for the managed CA)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, _sign_hash(key))
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()
