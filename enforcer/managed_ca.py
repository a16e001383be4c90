"""A managed CA per zone (API Shield style): issue client certificates from CSRs, and a CRL."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

MAX_VALIDITY_DAYS = 3650


class CSRError(ValueError):
    """A CSR that cannot be used; the message says why."""


def create_ca(zone: str, now: dt.datetime) -> tuple[str, str]:
    """Create a zone's CA; return (certificate PEM, private key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"Managed CA for zone {zone}"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mtls-testbed enforcer"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=MAX_VALIDITY_DAYS + 365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode()


def _load(ca_pem: str, key_pem: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(ca_pem.encode())
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def parse_csr(csr_pem: str) -> x509.CertificateSigningRequest:
    """Parse and check a PEM CSR (signature valid, subject with a CN)."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError as exc:
        raise CSRError(f"not a PEM certificate signing request: {exc}") from None
    if not csr.is_signature_valid:
        raise CSRError("the CSR's signature does not verify")
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cns:
        raise CSRError("the CSR's subject has no common name (CN)")
    if len(cns) > 1:
        # Tools disagree on which CN counts (see enforcer.chain.common_name): issue none.
        values = ", ".join(repr(a.value) for a in cns)
        raise CSRError(
            f"the CSR's subject has {len(cns)} common names (CN) ({values}): send exactly one"
        )
    for attr in csr.subject:
        value = attr.value
        text = value if isinstance(value, str) else value.decode("latin-1")
        bad = next((ch for ch in text if _control(ch)), None)
        if bad is not None:
            name = attr.rfc4514_attribute_name
            what = "a NUL" if bad == "\0" else f"a control character (U+{ord(bad):04X})"
            raise CSRError(
                f"the CSR's subject {name} {text!r} contains {what}: subjects must be printable "
                "(a NUL truncates the name in C code and control characters forge log lines)"
            )
    return csr


def _control(ch: str) -> bool:
    """C0 controls (NUL included), DEL and C1 controls."""
    code = ord(ch)
    return code < 0x20 or 0x7F <= code < 0xA0


def issue(
    ca_pem: str,
    key_pem: str,
    csr: x509.CertificateSigningRequest,
    validity_days: int,
    now: dt.datetime,
) -> x509.Certificate:
    """Issue a client certificate for a checked CSR, valid ``validity_days`` from ``now``."""
    ca, key = _load(ca_pem, key_pem)
    builder = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(ca.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
    )
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        builder = builder.add_extension(san.value, critical=False)
    except x509.ExtensionNotFound:
        pass
    return builder.sign(key, hashes.SHA256())


def crl(
    ca_pem: str, key_pem: str, revoked: Iterable[tuple[int, dt.datetime]], now: dt.datetime
) -> x509.CertificateRevocationList:
    """Build the zone's CRL from (serial, revocation time) pairs, valid for a day."""
    ca, key = _load(ca_pem, key_pem)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(days=1))
    )
    for serial, when in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    return builder.sign(key, hashes.SHA256())
