"""Issuing certificates: CA hierarchies, device (client) certificates and server certificates.

The devices' provisioning, and the demo's, use these building blocks; every validity window is
given relative to an explicit ``now`` so that fleets can be made for any clock.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "ed25519")


def generate_key(kind: str = "ec-p256") -> PrivateKey:
    """Generate a private key of one of :data:`KEY_TYPES`."""
    if kind == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key type {kind!r}; expected one of {KEY_TYPES}")


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _hash_for(key: PrivateKey) -> hashes.HashAlgorithm | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


@dataclasses.dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    certificate: x509.Certificate
    key: PrivateKey

    def cert_pem(self) -> bytes:
        """The certificate as PEM."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _key_usage(*, ca: bool, key: PrivateKey | None = None) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=not ca and isinstance(key, rsa.RSAPrivateKey),
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def issue_ca(
    cn: str,
    now: dt.datetime,
    *,
    issuer: Issued | None = None,
    key_type: str = "ec-p256",
    days: int = 3650,
    not_before: dt.datetime | None = None,
    path_length: int | None = None,
) -> Issued:
    """Issue a CA certificate: self-signed when ``issuer`` is None, else an intermediate."""
    key = generate_key(key_type)
    signer_key = issuer.key if issuer else key
    start = not_before or now - dt.timedelta(days=1)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn, "mtls-testbed"))
        .issuer_name(issuer.certificate.subject if issuer else _name(cn, "mtls-testbed"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()),
            critical=False,
        )
    )
    return Issued(builder.sign(signer_key, _hash_for(signer_key)), key)


def issue_leaf(
    cn: str,
    issuer: Issued,
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
    key: PrivateKey | None = None,
    key_type: str = "ec-p256",
    client: bool = True,
    dns_names: Sequence[str] = (),
    uris: Sequence[str] = (),
    eku: Sequence[x509.ObjectIdentifier] | None = None,
) -> Issued:
    """Issue an end-entity certificate: for clients, or for servers with ``client=False``."""
    key = key or generate_key(key_type)
    usages = (
        eku
        if eku is not None
        else [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False, key=key), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.UniformResourceIdentifier(u) for u in uris]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Issued(builder.sign(issuer.key, _hash_for(issuer.key)), key)


def write_pem(path: Path, *parts: bytes, private: bool = False) -> None:
    """Write PEM blocks to ``path`` (mode 0600 for private keys), creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not private:
        path.write_bytes(b"".join(parts))
        return
    # The mode is 0600 before the key's first byte is written, never chmod-ed afterwards.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_CREAT
        f.write(b"".join(parts))


def signature_hash(key: PrivateKey) -> hashes.SHA256 | None:
    """Return the hash to sign with ``key``: SHA-256, or None for Ed25519 (it hashes itself)."""
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def leaf_extensions(
    issuer_key: PrivateKey,
    key_type: str = "ec-p256",
    eku: Sequence[x509.ObjectIdentifier] = (ExtendedKeyUsageOID.CLIENT_AUTH,),
) -> list[x509.Extension[x509.ExtensionType]]:
    """Return the extensions :func:`issue_leaf` gives a ``key_type`` leaf, built once for reuse."""
    if key_type not in KEY_TYPES:
        raise ValueError(f"unknown key type {key_type!r}; expected one of {KEY_TYPES}")
    # Same profile as issue_leaf (minus SANs), so bulk-issued devices look like single ones.
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_type.startswith("rsa"),
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    values: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (usage, True),
        (x509.ExtendedKeyUsage(list(eku)), False),
        (x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False),
    ]
    return [x509.Extension(value.oid, critical, value) for value, critical in values]


def issue_crl(
    issuer: Issued,
    serials: Iterable[int],
    *,
    this_update: dt.datetime,
    next_update: dt.datetime,
    number: int = 1,
) -> x509.CertificateRevocationList:
    """Issue a CRL signed by ``issuer`` that lists ``serials`` (none: an empty CRL)."""
    if next_update <= this_update:
        raise ValueError(
            f"next_update {next_update.isoformat()} is not after this_update"
            f" {this_update.isoformat()}: a CRL must say until when it is current"
        )
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.certificate.subject)
        .last_update(this_update)
        .next_update(next_update)
        # RFC 5280 5.2: conforming CRL issuers include the CRL number and the AKI.
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )
    for serial in sorted(set(serials)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(this_update)
            .build()
        )
    return builder.sign(issuer.key, _hash_for(issuer.key))
