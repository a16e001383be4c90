"""Path-validation vectors in the style of x509-limbo: one chain per rule, with its verdict.

Every chain is built here with cryptography's builders (one SHA-1 signature is re-signed by
hand, since cryptography no longer signs with SHA-1). Each vector names the rule it checks
(access-flow: validation profile, name constraints, depth, trust anchors, extensions), the
expected reason code (None: admitted), and runs through :func:`validate_chain` directly. A
sample then runs over real TLS against a served enforcer whose configuration uploads the
vector's anchor, so that what the function says is what a device sees.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import re
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from enforcer.chain import DEFAULT_KEY_PROFILE, HostTrust, KeyProfile, validate_chain
from enforcer.config import ConfigError, load_config
from enforcer.reasons import Reason
from testbed.demo import AUTH_HOST, DemoLayout
from tests.conftest import Served
from tests.wire import admin_call, get

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
DAY = dt.timedelta(days=1)

Key = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | dsa.DSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


@functools.cache
def key(kind: str, slot: int = 0) -> Key:
    """One private key per kind and slot, made once: key generation dominates the suite."""
    curves = {
        "p192": ec.SECP192R1,
        "p224": ec.SECP224R1,
        "p256": ec.SECP256R1,
        "p384": ec.SECP384R1,
        "p521": ec.SECP521R1,
        "secp256k1": ec.SECP256K1,
    }
    if kind in curves:
        return ec.generate_private_key(curves[kind]())
    if kind.startswith("rsa"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(kind[3:]))
    if kind == "dsa":
        return dsa.generate_private_key(2048)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "ed448":
        return ed448.Ed448PrivateKey.generate()
    raise ValueError(kind)


@dataclasses.dataclass(frozen=True)
class Node:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: Key

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _name(cn: str | None) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])


def _ku(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


_DEFAULT = object()


def issue(
    cn: str | None,
    signer: Node | None = None,
    *,
    key_kind: str = "p256",
    slot: int = 0,
    ca: bool = False,
    key_usage: object = _DEFAULT,
    eku: Sequence[x509.ObjectIdentifier] | None = (ExtendedKeyUsageOID.CLIENT_AUTH,),
    eku_critical: bool = False,
    san: Sequence[str] = (),
    san_critical: bool = False,
    name_constraints: x509.NameConstraints | None = None,
    hash_alg: hashes.HashAlgorithm | None = None,
    pss_salt: int | None = None,
    not_after: dt.datetime = NOW + 30 * DAY,
) -> Node:
    """Issue one certificate: self-signed when ``signer`` is None."""
    k = key(key_kind, slot)
    signer_key = signer.key if signer else k
    issuer_name = signer.cert.subject if signer else _name(cn)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_name)
        .public_key(k.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    if ca:
        b = b.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(k.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    usage = _ku(ca) if key_usage is _DEFAULT else key_usage
    if usage is not None:
        b = b.add_extension(usage, critical=True)  # type: ignore[arg-type]
    if eku is not None and (not ca or eku_critical or eku != (ExtendedKeyUsageOID.CLIENT_AUTH,)):
        b = b.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=eku_critical)
    if san:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in san]), critical=san_critical
        )
    if name_constraints is not None:
        b = b.add_extension(name_constraints, critical=True)
    if isinstance(signer_key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return Node(b.sign(signer_key, None), k)
    algorithm = hash_alg or hashes.SHA256()
    if pss_salt is not None:
        pss = padding.PSS(padding.MGF1(algorithm), pss_salt)
        return Node(b.sign(signer_key, algorithm, rsa_padding=pss), k)  # type: ignore[arg-type]
    return Node(b.sign(signer_key, algorithm), k)  # type: ignore[arg-type]


def resigned_with_sha1(node: Node, signer: Node) -> Node:
    """Re-sign an RSA PKCS#1 v1.5 SHA-256 certificate with SHA-1, same key and fields.

    cryptography refuses to sign certificates with SHA-1 any more; the two OIDs have the same
    length and so does the signature, so swapping them in the DER keeps every length right.
    """
    sha256_rsa = bytes.fromhex("06092a864886f70d01010b")
    sha1_rsa = bytes.fromhex("06092a864886f70d010105")
    assert isinstance(signer.key, rsa.RSAPrivateKey)
    der = node.cert.public_bytes(serialization.Encoding.DER)
    tbs = node.cert.tbs_certificate_bytes.replace(sha256_rsa, sha1_rsa)
    signature = signer.key.sign(tbs, padding.PKCS1v15(), hashes.SHA1())
    der = der.replace(node.cert.tbs_certificate_bytes, tbs).replace(sha256_rsa, sha1_rsa)
    der = der.replace(node.cert.signature, signature)
    cert = x509.load_der_x509_certificate(der)
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name == "sha1"
    return Node(cert, node.key)


@dataclasses.dataclass(frozen=True)
class Case:
    """A chain to judge: the leaf, what the client sends after it, and the uploaded anchors."""

    leaf: Node
    presented: tuple[Node, ...]
    anchors: tuple[Node, ...]
    profile: KeyProfile = DEFAULT_KEY_PROFILE
    max_chain_depth: int = 8

    def judge(self, at: dt.datetime = NOW) -> tuple[Reason | None, str]:
        trust = HostTrust.build(
            [a.cert for a in self.anchors], [], self.max_chain_depth, self.profile
        )
        result = validate_chain(
            self.leaf.cert, [p.cert for p in self.presented], trust, [], frozenset(), at
        )
        return result.reason, result.detail


@functools.cache
def root() -> Node:
    return issue("vector root", ca=True, slot=1)


@functools.cache
def inter() -> Node:
    return issue("vector intermediate", root(), ca=True, slot=2)


def under_inter(leaf: Node, **kw: object) -> Case:
    return Case(leaf, (inter(),), (root(),), **kw)  # type: ignore[arg-type]


def device(cn: str | None = "device-1", **kw: object) -> Node:
    return issue(cn, inter(), **kw)  # type: ignore[arg-type]


def constrained(**nc: list[x509.GeneralName] | None) -> Node:
    """An intermediate under the vector root carrying name constraints."""
    constraints = x509.NameConstraints(
        permitted_subtrees=nc.get("permitted"), excluded_subtrees=nc.get("excluded")
    )
    return issue("factory ca", root(), ca=True, slot=3, name_constraints=constraints)


def dns(*names: str) -> list[x509.GeneralName]:
    return [x509.DNSName(n) for n in names]


# ---- the vectors ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Vector:
    rule: str
    build: Callable[[], Case]
    expected: Reason | None
    detail: str = ""  # a regular expression the detail must match


VECTORS: dict[str, Vector] = {}


def vector(rule: str, expected: Reason | None, detail: str = "") -> Callable[..., object]:
    def register(build: Callable[[], Case]) -> Callable[[], Case]:
        VECTORS[build.__name__] = Vector(rule, build, expected, detail)
        return build

    return register


OK = None
KEY = Reason.UNSUPPORTED_KEY
BAD = Reason.INVALID_CHAIN


# Profile: keys (every certificate, the leaf's included) and signatures.
@vector("profile", OK)
def ec_p256_leaf() -> Case:
    return under_inter(device())


@vector("profile", OK)
def ec_p384_leaf() -> Case:
    return under_inter(device(key_kind="p384"))


@vector("profile", OK)
def ec_p521_leaf_signed_sha512() -> Case:
    return under_inter(device(key_kind="p521", hash_alg=hashes.SHA512()))


@vector("profile", OK)
def rsa_2048_leaf() -> Case:
    return under_inter(device(key_kind="rsa2048"))


@vector("profile", OK)
def rsa_3072_ca_signing_with_pss() -> Case:
    ca = issue("rsa ca", root(), ca=True, key_kind="rsa3072")
    leaf = issue("device-1", ca, pss_salt=padding.PSS.DIGEST_LENGTH)
    return Case(leaf, (ca,), (root(),))


@vector("profile", KEY, "RSA key of 1024 bits")
def rsa_1024_leaf() -> Case:
    return under_inter(device(key_kind="rsa1024"))


@vector("profile", KEY, "dsa|DSA key")
def dsa_leaf() -> Case:
    return under_inter(device(key_kind="dsa"))


@vector("profile", KEY, "secp192r1")
def p192_leaf() -> Case:
    return under_inter(device(key_kind="p192"))


@vector("profile", KEY, "secp224r1")
def p224_leaf() -> Case:
    return under_inter(device(key_kind="p224"))


@vector("profile", KEY, "secp256k1")
def secp256k1_leaf() -> Case:
    return under_inter(device(key_kind="secp256k1"))


@vector("profile", KEY, "Ed25519 key")
def ed25519_leaf() -> Case:
    return under_inter(device(key_kind="ed25519"))


@vector("profile", KEY, "Ed448 key")
def ed448_leaf() -> Case:
    return under_inter(device(key_kind="ed448"))


@vector("profile", KEY, "CN=weak ca: an RSA key of 1024 bits")
def rsa_1024_intermediate() -> Case:
    ca = issue("weak ca", root(), ca=True, key_kind="rsa1024")
    return Case(issue("device-1", ca), (ca,), (root(),))


@vector("profile", KEY, "CN=dsa ca")
def dsa_intermediate() -> Case:
    ca = issue("dsa ca", root(), ca=True, key_kind="dsa")
    return Case(issue("device-1", ca), (ca,), (root(),))


@vector("profile", KEY, "CN=p192 ca")
def p192_intermediate() -> Case:
    ca = issue("p192 ca", root(), ca=True, key_kind="p192")
    return Case(issue("device-1", ca), (ca,), (root(),))


@vector("profile", KEY, "CN=weak root")
def rsa_1024_root() -> Case:
    weak = issue("weak root", ca=True, key_kind="rsa1024")
    return Case(issue("device-1", weak), (), (weak,))


@vector("profile", KEY, "rsa-with-sha1")
def sha1_signed_leaf() -> Case:
    ca = issue("rsa ca", root(), ca=True, key_kind="rsa2048")
    return Case(resigned_with_sha1(issue("device-1", ca), ca), (ca,), (root(),))


@vector("profile", OK)
def sha1_self_signature_of_the_anchor_is_not_checked() -> Case:
    # Nobody verifies an anchor's own signature (trust comes from the upload), as in OpenSSL.
    old = issue("old root", ca=True, key_kind="rsa2048")
    old = resigned_with_sha1(old, old)
    return Case(issue("device-1", old), (), (old,))


@vector("profile", KEY, "ecdsa-with-sha224")
def ecdsa_sha224_signature() -> Case:
    return under_inter(device(hash_alg=hashes.SHA224()))


@vector("profile", KEY, "rsassa-pss whose parameters")
def rsa_pss_with_maximal_salt() -> Case:
    ca = issue("rsa ca", root(), ca=True, key_kind="rsa2048")
    return Case(issue("device-1", ca, pss_salt=padding.PSS.MAX_LENGTH), (ca,), (root(),))


@vector("profile", KEY, "at least 3072")
def rsa_2048_under_min_rsa_bits_3072() -> Case:
    return under_inter(device(key_kind="rsa2048"), profile=KeyProfile(min_rsa_bits=3072))


@vector("profile", KEY, "P-256; the profile accepts P-384")
def p256_when_only_p384_is_configured() -> Case:
    return under_inter(device(key_kind="p384"), profile=KeyProfile(ec_curves=frozenset({"P-384"})))


@vector("profile", OK)
def p384_chain_when_only_p384_is_configured() -> Case:
    top = issue("p384 root", ca=True, key_kind="p384", slot=1)
    ca = issue("p384 ca", top, ca=True, key_kind="p384", slot=2)
    leaf = issue("device-1", ca, key_kind="p384")
    return Case(leaf, (ca,), (top,), profile=KeyProfile(ec_curves=frozenset({"P-384"})))


@vector("profile, before validity", KEY, "RSA key of 1024 bits")
def expired_rsa_1024_leaf() -> Case:
    return under_inter(device(key_kind="rsa1024", not_after=NOW - DAY / 2))


@vector("profile, after trust", Reason.UNTRUSTED_ISSUER)
def rsa_1024_leaf_of_an_untrusted_issuer() -> Case:
    stranger = issue("stranger root", ca=True, slot=4)
    return Case(issue("device-1", stranger, key_kind="rsa1024"), (), (root(),))


# Ed25519 CAs: outside the profile (cryptography's verifier does not accept them).
@vector("profile: Ed25519 CA", KEY, "CN=ed25519 ca: its Ed25519 key")
def ed25519_intermediate() -> Case:
    ca = issue("ed25519 ca", root(), ca=True, key_kind="ed25519")
    return Case(issue("device-1", ca), (ca,), (root(),))


@vector("profile: Ed25519 CA", KEY, "Ed25519 key")
def ed25519_root() -> Case:
    top = issue("ed25519 root", ca=True, key_kind="ed25519", slot=1)
    return Case(issue("device-1", top), (), (top,))


# Name constraints and leaves without SAN.
@vector("name constraints", BAD, "'factory-b.test' that CN=factory ca excludes")
def san_less_cn_in_an_excluded_subtree() -> Case:
    ca = constrained(excluded=dns("factory-b.test"))
    return Case(issue("device-1.factory-b.test", ca), (ca,), (root(),))


@vector("name constraints", BAD, "excludes")
def san_less_cn_in_an_excluded_subtree_any_case() -> Case:
    ca = constrained(excluded=dns("factory-b.test"))
    return Case(issue("DEVICE-1.Factory-B.TEST", ca), (ca,), (root(),))


@vector("name constraints", OK)
def san_less_cn_outside_the_excluded_subtree() -> Case:
    ca = constrained(excluded=dns("factory-b.test"))
    return Case(issue("device-1.factory-a.test", ca), (ca,), (root(),))


@vector("name constraints", OK)
def san_less_cn_label_boundary_is_not_excluded() -> Case:
    ca = constrained(excluded=dns("factory-b.test"))
    return Case(issue("device-1.xfactory-b.test", ca), (ca,), (root(),))


@vector("name constraints", OK)
def san_less_cn_inside_the_permitted_subtree() -> Case:
    ca = constrained(permitted=dns("factory-a.test"))
    return Case(issue("device-1.factory-a.test", ca), (ca,), (root(),))


@vector("name constraints", OK)
def san_less_cn_equal_to_the_permitted_name() -> Case:
    ca = constrained(permitted=dns("factory-a.test"))
    return Case(issue("factory-a.test", ca), (ca,), (root(),))


@vector("name constraints", BAD, "outside the DNS names CN=factory ca permits")
def san_less_cn_outside_the_permitted_subtree() -> Case:
    ca = constrained(permitted=dns("factory-a.test"))
    return Case(issue("device-1.factory-b.test", ca), (ca,), (root(),))


@vector("name constraints", BAD, "is not a DNS name")
def san_less_cn_that_is_not_a_dns_name() -> Case:
    ca = constrained(excluded=dns("factory-b.test"))
    return Case(issue("Device 001", ca), (ca,), (root(),))


@vector("name constraints", OK)
def san_less_cn_under_ip_only_constraints() -> Case:
    import ipaddress

    ca = constrained(permitted=[x509.IPAddress(ipaddress.ip_network("10.0.0.0/8"))])
    return Case(issue("device-1", ca), (ca,), (root(),))


@vector("name constraints", BAD, "excludes")
def san_less_cn_excluded_by_the_anchor() -> Case:
    nc = x509.NameConstraints(permitted_subtrees=None, excluded_subtrees=dns("factory-b.test"))
    top = issue("constrained root", ca=True, slot=5, name_constraints=nc)
    return Case(issue("device-1.factory-b.test", top), (), (top,))


@vector("name constraints", BAD)
def san_in_an_excluded_subtree() -> Case:
    # The verifier's own check, for comparison: a SAN is constrained as it always was.
    ca = constrained(excluded=dns("factory-b.test"))
    return Case(issue("device-1", ca, san=["device-1.factory-b.test"]), (ca,), (root(),))


@vector("name constraints", OK)
def san_less_cn_not_a_dns_name_without_constraints() -> Case:
    # Without name constraints a CN-only leaf keeps any CN (the IoT relaxation).
    return under_inter(device("Device 001"))


# SAN criticality (cryptography's checks, restored).
@vector("SAN criticality", BAD, "MUST NOT be critical when subject is nonempty")
def critical_san_with_a_subject() -> Case:
    return under_inter(device(san=["device-1.test"], san_critical=True))


@vector("SAN criticality", BAD, "MUST be critical when subject is empty")
def non_critical_san_with_an_empty_subject() -> Case:
    return under_inter(device(None, san=["device-1.test"]))


@vector("SAN criticality", OK)
def critical_san_with_an_empty_subject() -> Case:
    return under_inter(device(None, san=["device-1.test"], san_critical=True))


@vector("SAN criticality", BAD, "empty subject must carry a subjectAltName")
def empty_subject_without_san() -> Case:
    return under_inter(device(None))


# Depth: a chain longer than max_chain_depth names its problem.
def _ladder(n: int) -> tuple[Node, tuple[Node, ...]]:
    ca, cas = root(), []
    for i in range(n):
        ca = issue(f"rung {i}", ca, ca=True, slot=10 + i)
        cas.insert(0, ca)
    return issue("device-1", ca), tuple(cas)


@vector("depth", BAD, "3 intermediates; at most 2 .*max_chain_depth")
def three_intermediates_over_a_depth_of_two() -> Case:
    leaf, cas = _ladder(3)
    return Case(leaf, cas, (root(),), max_chain_depth=2)


@vector("depth", OK)
def two_intermediates_at_a_depth_of_two() -> Case:
    leaf, cas = _ladder(2)
    return Case(leaf, cas, (root(),), max_chain_depth=2)


# Trust anchors that are not self-signed.
@vector("anchor", OK)
def intermediate_as_anchor() -> Case:
    return Case(device(), (), (inter(),))


@vector("anchor", OK)
def intermediate_as_anchor_with_its_root_sent_along() -> Case:
    return Case(device(), (inter(), root()), (inter(),))


@vector("anchor", Reason.UNTRUSTED_ISSUER)
def sibling_of_the_anchor() -> Case:
    sibling = issue("sibling intermediate", root(), ca=True, slot=6)
    return Case(issue("device-1", sibling), (sibling,), (inter(),))


# RFC 5280 allows these; the web PKI profile did not.
@vector("extensions", OK)
def critical_eku() -> Case:
    return under_inter(device(eku_critical=True))


@vector("extensions", BAD, "EKU")
def critical_eku_without_client_auth() -> Case:
    return under_inter(device(eku=[ExtendedKeyUsageOID.SERVER_AUTH], eku_critical=True))


@vector("extensions", BAD, "EKU")
def any_eku_alone_on_a_leaf() -> Case:
    return under_inter(device(eku=[ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE]))


@vector("extensions", OK)
def ca_without_key_usage() -> Case:
    ca = issue("no ku ca", root(), ca=True, key_usage=None, slot=7)
    return Case(issue("device-1", ca), (ca,), (root(),))


@vector("extensions", BAD, "keyCertSign")
def ca_key_usage_without_key_cert_sign() -> Case:
    ca = issue("no certsign ca", root(), ca=True, key_usage=_ku(False), slot=7)
    return Case(issue("device-1", ca), (ca,), (root(),))


@vector("extensions", OK)
def ca_with_critical_client_auth_eku() -> Case:
    ca = issue("eku ca", root(), ca=True, eku=[ExtendedKeyUsageOID.CLIENT_AUTH], eku_critical=True)
    return Case(issue("device-1", ca), (ca,), (root(),))


@vector("extensions", BAD, "EKU")
def ca_with_server_auth_eku_only() -> Case:
    ca = issue("server ca", root(), ca=True, eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    return Case(issue("device-1", ca), (ca,), (root(),))


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_vector(name: str) -> None:
    v = VECTORS[name]
    reason, detail = v.build().judge()
    assert reason is v.expected, f"{v.rule}: {name}: {reason} ({detail})"
    if v.detail:
        assert re.search(v.detail, detail), detail


def test_the_profile_is_part_of_the_trust_digest() -> None:
    # The validation cache is keyed by the trust's digest: two profiles must never share it.
    anchors = [root().cert]
    default = HostTrust.build(anchors, [])
    stricter = HostTrust.build(anchors, [], profile=KeyProfile(min_rsa_bits=3072))
    assert default.digest != stricter.digest
    assert default.digest == HostTrust.build(anchors, [], profile=KeyProfile()).digest


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        ({"min_rsa_bits": 1024}, "not between 2048 and 16384"),
        ({"ec_curves": frozenset()}, "non-empty subset"),
        ({"ec_curves": frozenset({"P-192"})}, "'P-192' is not one"),
    ],
)
def test_a_profile_outside_what_the_verifier_allows_is_refused(
    profile: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        KeyProfile(**profile)  # type: ignore[arg-type]


# ---- the configuration ---------------------------------------------------------------------


def config_with_anchor(
    demo: DemoLayout, tmp_path: Path, anchor_pem: bytes, extra: str = ""
) -> Path:
    """The demo configuration with its [[roots]] certificate replaced by ``anchor_pem``."""
    bundle = tmp_path / "anchor.pem"
    bundle.write_bytes(anchor_pem)
    text = demo.config.read_text()
    old = '"ca/uploaded-chain.pem"'
    assert old in text
    text = text.replace(old, f'"{bundle}"')
    for rel in ('"edge/', '"signing-key.pem"', '"admin.token"'):
        text = text.replace(rel, f'"{demo.root}/{rel[1:]}')
    path = tmp_path / "enforcer.toml"
    path.write_text(text + extra)
    return path


def test_the_validation_table_is_read(demo: DemoLayout, tmp_path: Path) -> None:
    extra = '\n[validation]\nmin_rsa_bits = 3072\nec_curves = ["P-384", "P-521"]\n'
    config = load_config(config_with_anchor(demo, tmp_path, root().pem(), extra))
    assert config.key_profile == KeyProfile(3072, frozenset({"P-384", "P-521"}))
    assert load_config(config_with_anchor(demo, tmp_path, root().pem())).key_profile == (
        DEFAULT_KEY_PROFILE
    )


@pytest.mark.parametrize(
    ("extra", "field", "problem"),
    [
        ("min_rsa_bits = 1024", "validation.min_rsa_bits", "not between 2048 and 16384"),
        ("min_rsa_bits = 20000", "validation.min_rsa_bits", "not between 2048 and 16384"),
        ('ec_curves = ["P-192"]', "validation.ec_curves", "'P-192' is not one of"),
        ("ec_curves = []", "validation.ec_curves", "the list is empty"),
        ("max_depth = 3", "validation", "max_depth"),
    ],
)
def test_bad_validation_settings_are_named(
    demo: DemoLayout, tmp_path: Path, extra: str, field: str, problem: str
) -> None:
    path = config_with_anchor(demo, tmp_path, root().pem(), f"\n[validation]\n{extra}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.field.startswith(field) and problem in str(info.value), info.value


def test_a_root_pem_with_a_self_signed_certificate_before_the_anchor_is_refused(
    demo: DemoLayout, tmp_path: Path
) -> None:
    path = config_with_anchor(demo, tmp_path, root().pem() + inter().pem())
    with pytest.raises(ConfigError, match="certificate 1 of 2 is self-signed but not last"):
        load_config(path)


# ---- over TLS ------------------------------------------------------------------------------


def device_context(
    served: Served, tmp_path: Path, leaf: Node, presented: Sequence[Node]
) -> ssl.SSLContext:
    """A client presenting ``leaf`` and ``presented``; legacy keys allowed on the client side."""
    chain = tmp_path / f"chain-{leaf.cert.serial_number:x}.pem"
    chain.write_bytes(leaf.pem() + b"".join(p.pem() for p in presented))
    key_path = tmp_path / f"key-{leaf.cert.serial_number:x}.pem"
    key_path.write_bytes(
        leaf.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ctx = ssl.create_default_context(cafile=str(served.layout.edge_ca))
    # The client's OpenSSL would refuse to send an RSA-1024 key at its default level: the
    # point is to see what the enforcer does with one.
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.load_cert_chain(str(chain), str(key_path))
    return ctx


TLS_SAMPLE = [
    "rsa_1024_leaf",
    "dsa_leaf",
    "sha1_signed_leaf",
    "ed25519_intermediate",
    "ed25519_root",
    "san_less_cn_in_an_excluded_subtree",
    "san_less_cn_outside_the_excluded_subtree",
    "three_intermediates_over_a_depth_of_two",
    "critical_eku",
    "ca_without_key_usage",
    "ec_p256_leaf",
]


@pytest.mark.parametrize("name", TLS_SAMPLE)
async def test_vector_over_tls(
    serve_config: Callable[..., object], demo: DemoLayout, tmp_path: Path, name: str
) -> None:
    v = VECTORS[name]
    case = v.build()
    (anchor,) = case.anchors
    config = load_config(config_with_anchor(demo, tmp_path, anchor.pem()))
    served: Served = await serve_config(  # type: ignore[operator]
        config, max_chain_depth=case.max_chain_depth
    )
    ctx = device_context(served, tmp_path, case.leaf, case.presented)
    if isinstance(case.leaf.key, dsa.DSAPrivateKey):
        # TLS 1.3 has no DSA signature scheme: such a client sends no certificate at all.
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    response = await get(served.port, AUTH_HOST, ctx)
    expected = (200, None) if v.expected is None else (403, v.expected.value)
    assert (response.status, response.reason) == expected, served.last()


def sibling() -> Node:
    return issue("sibling intermediate", root(), ca=True, slot=6)


async def test_an_intermediate_in_the_config_is_a_trust_anchor_over_tls(
    serve_config: Callable[..., object], demo: DemoLayout, tmp_path: Path
) -> None:
    config = load_config(config_with_anchor(demo, tmp_path, inter().pem()))
    served: Served = await serve_config(config)  # type: ignore[operator]
    other = sibling()
    cases = [
        (device(), (), 200, None),
        (device(), (inter(), root()), 200, None),
        (issue("device-2", other), (other,), 403, "untrusted_issuer"),
        (issue("device-3", other), (other, root()), 403, "untrusted_issuer"),
    ]
    for leaf, presented, status, reason in cases:
        response = await get(
            served.port, AUTH_HOST, device_context(served, tmp_path, leaf, presented)
        )
        assert (response.status, response.reason) == (status, reason), served.last()


async def test_an_intermediate_uploaded_through_the_admin_api_is_a_trust_anchor(
    serve_config: Callable[..., object], tmp_path: Path
) -> None:
    served: Served = await serve_config(admin=True)  # type: ignore[operator]
    accounts = "/client/v4/accounts/demo/access/certificates"
    mine = device_context(served, tmp_path, device(), ())
    other = sibling()
    theirs = device_context(served, tmp_path, issue("device-2", other), (other,))
    assert (await get(served.port, AUTH_HOST, mine)).reason == "untrusted_issuer"

    body = {"name": "factory a", "associated_hostnames": [AUTH_HOST]}
    swapped = {**body, "certificate": (root().pem() + inter().pem()).decode()}
    status, envelope = await admin_call(served.admin_port, "POST", accounts, swapped)
    assert status == 400, envelope
    assert "certificate 1 of 2 is self-signed but not last" in envelope["errors"][0]["message"]

    anchor = {**body, "certificate": inter().pem().decode()}
    status, envelope = await admin_call(served.admin_port, "POST", accounts, anchor)
    assert status == 201, envelope
    assert envelope["result"]["fingerprint"] == inter().cert.fingerprint(hashes.SHA256()).hex()
    assert (await get(served.port, AUTH_HOST, mine)).status == 200
    assert (await get(served.port, AUTH_HOST, theirs)).reason == "untrusted_issuer"


async def test_the_configured_profile_reaches_validation_over_tls(
    serve_config: Callable[..., object], demo: DemoLayout, tmp_path: Path
) -> None:
    extra = "\n[validation]\nmin_rsa_bits = 3072\n"
    config = load_config(config_with_anchor(demo, tmp_path, root().pem(), extra))
    served: Served = await serve_config(config)  # type: ignore[operator]
    rsa_device = device_context(served, tmp_path, device(key_kind="rsa2048"), (inter(),))
    ec_device = device_context(served, tmp_path, device(), (inter(),))
    response = await get(served.port, AUTH_HOST, rsa_device)
    assert (response.status, response.reason) == (403, "unsupported_key")
    assert "at least 3072" in str(served.last()["detail"])
    assert (await get(served.port, AUTH_HOST, ec_device)).status == 200
