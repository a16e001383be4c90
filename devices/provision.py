"""Provisioning a device fleet: a CA hierarchy, device certificates in bulk and an inventory.

Theory of operation
-------------------
A fleet is a list of cohorts (:class:`Cohort`), each a number of devices with at most one
deliberate defect (:data:`DEFECTS`). :func:`provision` makes the CAs in the parent process, then
issues the devices in chunks on a pool of worker processes: each worker loads the CA keys once,
prebuilds the issuer name and the extension list, and per device only generates a key, builds
and signs one certificate and writes its files. Rows come back to the parent, which writes the
inventory in one transaction at the end. Workers are forked when the caller runs no other
thread, else started by forkserver (so a calling script needs the usual ``__main__`` guard).
Chunks last about a quarter of a second, so Ctrl-C stops the pool promptly.

Nothing is ever half written: everything goes into a hidden sibling folder
``.<DIR>.partial-<random>`` that is renamed onto ``DIR`` once complete (and removed on any
error). A process killed outright can leave that hidden folder behind, never a partial ``DIR``.

Layout of ``DIR``::

    ca/root.pem                 the fleet root
    ca/intermediate.pem         the first intermediate, issued by the root
    ca/intermediate-<k>.pem     k = 2..n, each issued by the one before; devices are issued
                                by the last one (by the root itself with ``intermediates=0``)
    ca/upload.pem               the intermediates (deepest first), then the root: what an
                                operator uploads to the enforcer as the fleet's root
    ca/foreign-root.pem         only with a foreign-ca cohort: a root the target must not trust
    ca/known-intermediates.pem  only with a missing-intermediate cohort: see below
    ca-keys/<name>.pem          the private key of ca/<name>.pem (root, intermediates), PKCS#8
                                PEM, mode 0600 in a 0700 folder: the fleet's operator signs CRLs
                                with them (:func:`fleet_crls`)
    devices/<id>/cert.pem       the leaf, then its intermediates deepest first (leaf alone for
                                missing-intermediate and self-signed)
    devices/<id>/key.pem        the private key, PKCS#8 PEM, unencrypted, mode 0600
    devices/<id>/device.p12     PKCS#12 of key, leaf and the same chain as cert.pem, mode 0600,
                                password ``testbed`` unless told otherwise; made on demand by
                                :func:`export_p12` (or up front with p12=True)
    inventory.sqlite            table ``devices`` (one row per device) and table ``fleet``

The ``devices`` table: id, cohort, key_store (``software``), key_type, serial and sha256
(lowercase hex; sha256 is the certificate's fingerprint), common_name, not_before and not_after
(ISO 8601 UTC, ``Z``), defect (NULL when healthy), expected, and cert_path, key_path, p12_path
relative to ``DIR`` (p12_path NULL without PKCS#12). The ``fleet`` table holds key/value facts:
name, created (``now``), size, key_type, intermediates, root_sha256 and p12_password.

Device ids are ``<cn-prefix><number>`` zero-padded to at least 3 digits (``device-001``); the
healthy cohort takes the first numbers. Every device's subject CN is its id, except wrong-cn.

Expected outcomes
-----------------
Each device records the outcome a correctly configured enforcer gives it (docs/access-flow.md:
``allowed`` or ``denied:<reason code>``) on a hostname that trusts ``ca/upload.pem`` and whose
policy is **Valid Certificate**:

* ``wrong-cn`` devices (CN ``rogue-<number>``) hold a valid chain, so they are recorded as
  ``allowed``; under a Common Name policy matching the fleet's ids they are
  ``denied:policy_denied`` (see :func:`expected_outcome`).
* ``revoked`` devices hold a valid certificate; ``denied:revoked`` assumes the operator has
  revoked every ``defect = 'revoked'`` row: by its ``serial`` in a CRL of the fleet's issuing CA
  (:func:`fleet_crls`), or by its ``sha256`` (until then they are admitted).
* ``missing-intermediate`` devices are issued by a second intermediate (a sibling of the
  fleet's, also under the root) that is neither in their cert.pem nor in ``upload.pem``. It is
  in ``known-intermediates.pem``: ``denied:missing_intermediate`` assumes the enforcer knows it
  (e.g. ``known-intermediates.pem`` + ``root.pem`` uploaded as a root for another hostname);
  otherwise the enforcer can only say ``denied:untrusted_issuer``. Uploading it with the
  fleet's root instead would admit these devices.

PKCS#12 files are expensive: even with the parameters ``openssl pkcs12 -export`` uses by
default (PBES2 with AES-256-CBC and a SHA-256 MAC, 2048 PBKDF2 iterations; cryptography's
``BestAvailableEncryption`` would use 20,000, ~10 ms a file) a file costs about as much as a
device's key and certificate. So by default none is made: no consumer in the testbed reads them
(key stores load key.pem), and :func:`export_p12` writes them, password protected as ever, for
the devices that need one (``testbed fleet export-p12``). ``p12=True`` makes them all up front;
``p12_kdf_rounds`` changes the iterations; the protection is moot here since key.pem is
unencrypted beside it. RSA-2048 device keys take tens of milliseconds each to
generate: keep such cohorts small.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
import math
import multiprocessing
import os
import re
import secrets
import shutil
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from devices.pkcs11 import (
    TOKEN_KEY_TYPES,
    Pkcs11Config,
    generate_on_token,
    store_certificate,
    token_uri,
)
from devices.pki import (
    KEY_TYPES,
    Issued,
    PrivateKey,
    generate_key,
    issue_ca,
    issue_crl,
    leaf_extensions,
    signature_hash,
    write_pem,
)

HEALTHY = "healthy"
DEFAULT_P12_PASSWORD = "testbed"
KEY_STORE = "software"
MAX_INTERMEDIATES = 6
# The outcome each defect gets under a Valid Certificate policy (module docstring).
DEFECTS: dict[str, str] = {
    "expired": "denied:certificate_expired",
    "not-yet-valid": "denied:certificate_not_yet_valid",
    "foreign-ca": "denied:untrusted_issuer",
    "wrong-cn": "allowed",
    "missing-intermediate": "denied:missing_intermediate",
    "wrong-eku": "denied:invalid_chain",
    "self-signed": "denied:untrusted_issuer",
    "revoked": "denied:revoked",
}
POLICIES = ("certificate", "common_name")
# Key types outside the enforcer's validation profile (docs/access-flow.md V1: its verifier,
# cryptography's, takes no Ed25519): a device whose path holds one is denied unsupported_key...
OUTSIDE_PROFILE = frozenset({"ed25519"})
# ... unless its chain never reaches a trusted root, which the enforcer reports first.
_BEFORE_PROFILE = frozenset({"foreign-ca", "self-signed", "missing-intermediate"})
_ISSUER_OF = {"foreign-ca": "foreign", "missing-intermediate": "missing"}
_COHORT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_COHORT_SPEC = re.compile(r"(?P<name>[^=]*)=(?P<count>[^:]*)(?::(?P<defect>.*))?")
_DAY = dt.timedelta(days=1)
_PEM = serialization.Encoding.PEM
_SCHEMA = """
CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    cohort TEXT NOT NULL,
    key_store TEXT NOT NULL,
    key_type TEXT NOT NULL,
    serial TEXT NOT NULL,
    sha256 TEXT NOT NULL UNIQUE,
    common_name TEXT NOT NULL,
    not_before TEXT NOT NULL,
    not_after TEXT NOT NULL,
    defect TEXT,
    expected TEXT NOT NULL,
    cert_path TEXT NOT NULL,
    key_path TEXT NOT NULL,
    p12_path TEXT
);
CREATE INDEX devices_cohort ON devices (cohort);
CREATE TABLE fleet (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_COLUMNS = (
    "id, cohort, key_store, key_type, serial, sha256, common_name, not_before, not_after, "
    "defect, expected, cert_path, key_path, p12_path"
)

Row = tuple[str, str, str, str, str, str, str, str, str, str | None, str, str, str, str | None]


def expected_outcome(
    defect: str | None, policy: str = "certificate", key_types: Iterable[str] = ()
) -> str:
    """Return a defect's access-flow outcome under a Valid Certificate or Common Name policy.

    ``key_types`` are the key types in the device's path (its own and its CAs'): one outside
    the enforcer's key profile makes it ``unsupported_key`` unless the path fails earlier.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")
    if defect is not None and defect not in DEFECTS:
        raise ValueError(f"unknown defect {defect!r}; expected one of {', '.join(DEFECTS)}")
    if defect not in _BEFORE_PROFILE and OUTSIDE_PROFILE.intersection(key_types):
        return "denied:unsupported_key"
    if defect is None:
        return "allowed"
    if defect == "wrong-cn" and policy == "common_name":
        return "denied:policy_denied"
    return DEFECTS[defect]


@dataclasses.dataclass(frozen=True)
class Cohort:
    """A number of devices sharing one deliberate defect (None: healthy)."""

    name: str
    size: int
    defect: str | None = None
    key_type: str | None = None  # None: the fleet's key type

    def __post_init__(self) -> None:
        if not _COHORT_NAME.fullmatch(self.name):
            raise ValueError(
                f"cohort name {self.name!r}: expected letters, digits, '.', '_' or '-'"
            )
        if self.size < 0:
            raise ValueError(f"cohort {self.name}: size {self.size} is negative")
        if self.defect is not None and self.defect not in DEFECTS:
            raise ValueError(
                f"cohort {self.name}: unknown defect {self.defect!r}; "
                f"expected one of {', '.join(DEFECTS)}"
            )
        if self.key_type is not None and self.key_type not in KEY_TYPES:
            raise ValueError(
                f"cohort {self.name}: unknown key type {self.key_type!r}; "
                f"expected one of {', '.join(KEY_TYPES)}"
            )

    @property
    def expected(self) -> str:
        """The outcome its devices record (under a Valid Certificate policy)."""
        return expected_outcome(self.defect)


def parse_cohort(text: str) -> Cohort:
    """Parse ``NAME=COUNT`` or ``NAME=COUNT:defect`` into a :class:`Cohort`."""
    match = _COHORT_SPEC.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r}: expected NAME=COUNT or NAME=COUNT:DEFECT")
    count = match["count"]
    if not (count.isascii() and count.isdigit()):
        raise ValueError(f"{text!r}: COUNT {count!r} is not a whole number")
    defect = match["defect"]
    if defect == "":
        raise ValueError(f"{text!r}: empty DEFECT; expected one of {', '.join(DEFECTS)}")
    try:
        return Cohort(match["name"], int(count), defect)
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None


def plan_cohorts(size: int, cohorts: Sequence[Cohort]) -> list[Cohort]:
    """Return the fleet's cohorts: ``healthy`` (the rest of ``size``) first, then ``cohorts``."""
    if size < 1:
        raise ValueError(f"size {size}: expected 1 or more")
    names = [c.name for c in cohorts]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"cohort {duplicates[0]!r} is given more than once")
    carved = sum(c.size for c in cohorts)
    if carved > size:
        raise ValueError(f"the cohorts hold {carved} devices, more than the size {size}")
    rest = size - carved
    if rest and HEALTHY in names:
        raise ValueError(
            f"cohort {HEALTHY!r} is the rest of the fleet ({rest} devices here); "
            "name yours differently or make the cohorts add up to the size"
        )
    return [Cohort(HEALTHY, rest), *cohorts] if rest else list(cohorts)


@dataclasses.dataclass(frozen=True)
class Device:
    """One row of the inventory; paths are relative to the fleet folder."""

    id: str
    cohort: str
    key_store: str
    key_type: str
    serial: str
    sha256: str
    common_name: str
    not_before: str
    not_after: str
    defect: str | None
    expected: str
    cert_path: str
    key_path: str
    p12_path: str | None


@dataclasses.dataclass(frozen=True)
class Fleet:
    """A provisioned fleet: where it is, its cohorts and how long it took."""

    root: Path
    cohorts: tuple[Cohort, ...]
    elapsed: float

    @property
    def size(self) -> int:
        """The number of devices."""
        return sum(c.size for c in self.cohorts)

    @property
    def inventory(self) -> Path:
        """The inventory database."""
        return self.root / "inventory.sqlite"

    @property
    def upload(self) -> Path:
        """The bundle an operator uploads to the enforcer (intermediates, then the root)."""
        return self.root / "ca" / "upload.pem"

    def devices(self) -> list[Device]:
        """Read the inventory's devices, ordered by id."""
        return read_inventory(self.root)


def read_inventory(root: Path) -> list[Device]:
    """Read the devices of the fleet in ``root``, ordered by id."""
    con = sqlite3.connect(f"file:{root / 'inventory.sqlite'}?mode=ro", uri=True)
    try:
        rows = con.execute(f"SELECT {_COLUMNS} FROM devices ORDER BY id").fetchall()
    finally:
        con.close()
    return [Device(*row) for row in rows]


# ---------------------------------------------------------------------------------------------
# Issuing (runs in the worker processes, or inline for one worker)


@dataclasses.dataclass(frozen=True)
class _CA:
    """A CA as pickled to the workers: its key, certificate and the chain devices send."""

    key_pem: bytes
    cert_pem: bytes
    chain_pem: bytes  # what follows a leaf in cert.pem: this CA and its parents, not the root

    @classmethod
    def of(cls, issued: Issued, parents: Sequence[Issued]) -> _CA:
        chain = b"" if _is_root(issued) else issued.cert_pem()
        chain += b"".join(p.cert_pem() for p in parents if not _is_root(p))
        return cls(issued.key_pem(), issued.cert_pem(), chain)


def _is_root(issued: Issued) -> bool:
    return issued.certificate.issuer == issued.certificate.subject


@dataclasses.dataclass(frozen=True)
class _Job:
    """Everything a worker needs, pickled once per worker."""

    out: str
    cas: dict[str, _CA]  # "fleet", and "missing" / "foreign" when a cohort needs them
    now: dt.datetime
    validity_days: int
    cn_prefix: str
    width: int
    p12_password: bytes | None
    p12_kdf_rounds: int | None
    # Devices' keys made on this PKCS#11 token (labelled and id'd by device id) instead of in
    # key.pem; one issuing process, since every key comes from the one token.
    token: Pkcs11Config | None = None


@dataclasses.dataclass(frozen=True)
class _Chunk:
    """Consecutive devices of one cohort."""

    cohort: str
    defect: str | None
    key_type: str
    numbers: range


class _Issuer:
    """Issues and writes devices; built once per worker so the per-device work stays small."""

    def __init__(self, job: _Job) -> None:
        self.job = job
        self.devices = f"{job.out}/devices"
        self.signers: dict[str, tuple[x509.Name, PrivateKey, bytes, list[x509.Certificate]]] = {}
        for label, ca in job.cas.items():
            key = _load_key(ca.key_pem)
            cert = x509.load_pem_x509_certificate(ca.cert_pem)
            chain = x509.load_pem_x509_certificates(ca.chain_pem) if ca.chain_pem else []
            self.signers[label] = (cert.subject, key, ca.chain_pem, chain)
        self.extensions: dict[tuple[str, str, bool], list[x509.Extension[x509.ExtensionType]]] = {}
        password = job.p12_password
        self.encryption: serialization.KeySerializationEncryption | None = None
        if password is not None:
            self.encryption = _p12_encryption(password, job.p12_kdf_rounds)
        self.sha256 = hashes.SHA256()

    def window(self, defect: str | None) -> tuple[dt.datetime, dt.datetime]:
        """The validity window of a device with ``defect``."""
        now, days = self.job.now, dt.timedelta(days=self.job.validity_days)
        if defect == "expired":
            return now - 30 * _DAY, now - _DAY
        if defect == "not-yet-valid":
            return now + _DAY, now + _DAY + days
        # A day of slack before now, for devices whose clocks run a little behind.
        return now - _DAY, now + days

    def extensions_for(
        self, label: str, key_type: str, server_only: bool
    ) -> list[x509.Extension[x509.ExtensionType]]:
        """The leaf extensions for one issuer, key type and EKU, built once per worker."""
        cached = self.extensions.get((label, key_type, server_only))
        if cached is None:
            eku = [
                ExtendedKeyUsageOID.SERVER_AUTH if server_only else ExtendedKeyUsageOID.CLIENT_AUTH
            ]
            cached = leaf_extensions(self.signers[label][1], key_type, eku)
            self.extensions[(label, key_type, server_only)] = cached
        return cached

    def issue(self, chunk: _Chunk) -> list[Row]:
        """Issue, write and describe the devices of one chunk."""
        job, defect, key_type = self.job, chunk.defect, chunk.key_type
        label = _ISSUER_OF.get(defect or "", "fleet")
        issuer_name, issuer_key, chain_pem, chain = self.signers[label]
        if defect in ("missing-intermediate", "self-signed"):
            chain_pem, chain = b"", []  # the point of these cohorts: cert.pem holds the leaf alone
        extensions = self.extensions_for(label, key_type, defect == "wrong-eku")
        sign_hash = signature_hash(issuer_key)
        start, end = self.window(defect)
        # Certificates keep whole seconds, as _iso does: the chunk shares one validity window.
        same = (chunk.cohort, KEY_STORE if job.token is None else "pkcs11", key_type)
        issuer_type = "ed25519" if isinstance(issuer_key, ed25519.Ed25519PrivateKey) else ""
        expected = expected_outcome(defect, key_types=(key_type, issuer_type))
        window = (_iso(start), _iso(end), defect, expected)
        rows: list[Row] = []
        files: list[tuple[str, bytes, bytes, bytes | None]] = []
        for number in chunk.numbers:
            device_id = f"{job.cn_prefix}{number:0{job.width}d}"
            cn = f"rogue-{number:0{job.width}d}" if defect == "wrong-cn" else device_id
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
            if job.token is not None:
                rows.append(
                    self.issue_on_token(
                        device_id,
                        cn,
                        key_type,
                        (issuer_name, issuer_key),
                        (start, end),
                        extensions,
                        chain_pem,
                        same,
                        window,
                    )
                )
                continue
            key = generate_key(key_type)
            if defect == "self-signed":
                issuer_name, issuer_key, sign_hash = subject, key, signature_hash(key)
                extensions = leaf_extensions(key, key_type)
            cert = x509.CertificateBuilder(
                issuer_name,
                subject,
                key.public_key(),
                x509.random_serial_number(),
                start,
                end,
                extensions,
            ).sign(issuer_key, sign_hash)
            paths, serialised = self.serialise(device_id, key, cert, chain_pem, chain)
            files.append(serialised)
            serial = format(cert.serial_number, "x")
            sha256 = cert.fingerprint(self.sha256).hex()
            rows.append((device_id, *same, serial, sha256, cn, *window, *paths))
        # The chunk's files are written together, after its certificates: measured faster than
        # writing each device's as it is made (bench/README.md, provisioning).
        if files:
            self.write(files)
        return rows

    def issue_on_token(
        self,
        device_id: str,
        cn: str,
        key_type: str,
        issuer: tuple[x509.Name, PrivateKey],
        window: tuple[dt.datetime, dt.datetime],
        extensions: list[x509.Extension[x509.ExtensionType]],
        chain_pem: bytes,
        same: tuple[str, str, str],
        described: tuple[str, str, str | None, str],
    ) -> Row:
        """One device whose key pair is generated on the token: its CSR is signed there, the
        certificate stored there beside the key and in cert.pem; no key file is written."""
        assert self.job.token is not None
        config = dataclasses.replace(self.job.token, key_label=device_id, key_id=device_id.encode())
        csr = generate_on_token(config, key_type, cn)
        cert = x509.CertificateBuilder(
            issuer[0],
            csr.subject,
            csr.public_key(),
            x509.random_serial_number(),
            window[0],
            window[1],
            extensions,
        ).sign(issuer[1], signature_hash(issuer[1]))
        store_certificate(config, cert)
        rel = f"devices/{device_id}"
        os.mkdir(f"{self.devices}/{device_id}")
        _write(f"{self.devices}/{device_id}/cert.pem", cert.public_bytes(_PEM) + chain_pem, 0o644)
        serial = format(cert.serial_number, "x")
        sha256 = cert.fingerprint(self.sha256).hex()
        uri = token_uri(config)
        return (device_id, *same, serial, sha256, cn, *described, f"{rel}/cert.pem", uri, None)

    def serialise(
        self,
        device_id: str,
        key: PrivateKey,
        cert: x509.Certificate,
        chain_pem: bytes,
        chain: list[x509.Certificate],
    ) -> tuple[tuple[str, str, str | None], tuple[str, bytes, bytes, bytes | None]]:
        """One device's paths relative to the fleet folder, and its files' bytes."""
        rel = f"devices/{device_id}"
        cert_pem, key_pem = cert.public_bytes(_PEM) + chain_pem, _key_pem(key)
        if self.encryption is None:
            return (f"{rel}/cert.pem", f"{rel}/key.pem", None), (device_id, cert_pem, key_pem, None)
        p12 = pkcs12.serialize_key_and_certificates(
            device_id.encode(), key, cert, chain or None, self.encryption
        )
        paths = (f"{rel}/cert.pem", f"{rel}/key.pem", f"{rel}/device.p12")
        return paths, (device_id, cert_pem, key_pem, p12)

    def write(self, files: list[tuple[str, bytes, bytes, bytes | None]]) -> None:
        """Write devices' folders and files (key.pem and device.p12 0600)."""
        # Plain strings, not pathlib: at 100,000 devices its overhead shows. Names relative to
        # the open devices/ folder (openat) spare the kernel the walk down the absolute path.
        at = os.open(self.devices, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for device_id, cert_pem, key_pem, p12 in files:
                os.mkdir(device_id, dir_fd=at)
                _write(f"{device_id}/cert.pem", cert_pem, 0o644, at)
                _write(f"{device_id}/key.pem", key_pem, 0o600, at)
                if p12 is not None:
                    _write(f"{device_id}/device.p12", p12, 0o600, at)
        finally:
            os.close(at)


_WORKER: _Issuer | None = None


# What ``openssl pkcs12 -export`` (OpenSSL 3) uses by default, as ``openssl pkcs12 -info`` shows
# on a file it made: PBES2 (PBKDF2 with HMAC-SHA256, AES-256-CBC) for the key and certificate
# bags at 2048 iterations, and an HMAC-SHA256 MAC at 2048 iterations. cryptography's
# BestAvailableEncryption uses 20,000 rounds instead: ~10 ms per file against ~1 ms.
OPENSSL_P12_KDF_ROUNDS = 2048


def _p12_encryption(
    password: bytes, kdf_rounds: int | None
) -> serialization.KeySerializationEncryption:
    """How device.p12 files are encrypted: as ``openssl pkcs12 -export`` does by default.

    ``kdf_rounds`` replaces OpenSSL's default 2048 PBKDF2 iterations (key, certificates, MAC).
    """
    return (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(OPENSSL_P12_KDF_ROUNDS if kdf_rounds is None else kdf_rounds)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(hashes.SHA256())
        .build(password)
    )


def _load_key(pem: bytes) -> PrivateKey:
    key = serialization.load_pem_private_key(pem, None)
    if not isinstance(key, PrivateKey):
        raise ValueError(f"unsupported key type {type(key).__name__}; expected one of {KEY_TYPES}")
    return key


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _write(path: str | Path, data: bytes, mode: int, dir_fd: int | None = None) -> None:
    # os.open sets the mode at creation: a private key is never readable by others, even briefly.
    # Raw os.write, not a file object: that saves three system calls per file at fleet scale.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(path, flags, mode, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _init_worker(job: _Job) -> None:
    global _WORKER
    # Ctrl-C reaches the whole process group: the parent stops the pool and cleans up; a
    # worker finishes its (short) chunk rather than dying with a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER = _Issuer(job)


def _issue_chunk(chunk: _Chunk) -> list[Row]:
    assert _WORKER is not None, "the pool's initializer sets the issuer"
    return _WORKER.issue(chunk)


# ---------------------------------------------------------------------------------------------
# The fleet


def _device_ms(job: _Job, key_type: str) -> float:
    """Roughly what one device costs a worker, in milliseconds (measured on a small VM)."""
    ms = 0.7 + (80.0 if key_type.startswith("rsa") else 0.0)
    if job.p12_password is not None:
        rounds = job.p12_kdf_rounds or OPENSSL_P12_KDF_ROUNDS
        ms += 1.0 + rounds / 2_000
    return ms


def _chunks(cohorts: Sequence[Cohort], job: _Job, key_type: str, workers: int) -> Iterator[_Chunk]:
    total = sum(c.size for c in cohorts)
    # Several chunks per worker keep every core and the progress bar busy to the end, and
    # chunks of about a quarter of a second let Ctrl-C stop the pool promptly.
    spread = math.ceil(total / (workers * 8))
    first = 1
    for cohort in cohorts:
        kind = cohort.key_type or key_type
        size = max(1, min(spread, 500, round(250 / _device_ms(job, kind))))
        numbers = range(first, first + cohort.size)
        for i in range(0, cohort.size, size):
            yield _Chunk(cohort.name, cohort.defect, kind, numbers[i : i + size])
        first += cohort.size


def _make_cas(
    out: Path, cohorts: Sequence[Cohort], now: dt.datetime, intermediates: int, name: str
) -> tuple[dict[str, _CA], str]:
    """Issue the CAs and write ``ca/``; return them as workers need them, and the root's SHA-256."""
    # CAs start a year back so that expired devices' windows sit well inside their issuers'.
    start = now - 365 * _DAY
    ca_dir = out / "ca"
    root = issue_ca(f"mtls-testbed fleet {name} root", now, not_before=start, days=21 * 365)
    chain = [root]  # root first, deepest last
    for k in range(1, intermediates + 1):
        chain.append(
            issue_ca(
                f"mtls-testbed fleet {name} intermediate {k}",
                now,
                issuer=chain[-1],
                not_before=start,
                days=11 * 365,
                path_length=intermediates - k,
            )
        )
    write_pem(ca_dir / "root.pem", root.cert_pem())
    for k, inter in enumerate(chain[1:], start=1):
        write_pem(
            ca_dir / ("intermediate.pem" if k == 1 else f"intermediate-{k}.pem"), inter.cert_pem()
        )
    write_pem(ca_dir / "upload.pem", *(c.cert_pem() for c in reversed(chain)))
    # The CA keys stay with the fleet (apart from the public ca/ folder) so that its operator
    # can publish CRLs for it later: a run revokes devices mid-way with them.
    keys_dir = out / "ca-keys"
    keys_dir.mkdir(mode=0o700)
    for ca_name, issued in zip(_chain_names(intermediates), chain, strict=True):
        _write(keys_dir / ca_name, issued.key_pem(), 0o600)
    cas = {"fleet": _CA.of(chain[-1], list(reversed(chain[:-1])))}
    defects = {c.defect for c in cohorts if c.size}
    if "missing-intermediate" in defects:
        missing = issue_ca(
            f"mtls-testbed fleet {name} unsent intermediate",
            now,
            issuer=root,
            not_before=start,
            days=11 * 365,
            path_length=0,
        )
        write_pem(ca_dir / "known-intermediates.pem", missing.cert_pem())
        cas["missing"] = _CA.of(missing, [])
    if "foreign-ca" in defects:
        foreign_root = issue_ca(f"mtls-testbed foreign {name} root", now, not_before=start)
        foreign = issue_ca(
            f"mtls-testbed foreign {name} intermediate",
            now,
            issuer=foreign_root,
            not_before=start,
            path_length=0,
        )
        write_pem(ca_dir / "foreign-root.pem", foreign_root.cert_pem())
        cas["foreign"] = _CA.of(foreign, [])
    return cas, root.certificate.fingerprint(hashes.SHA256()).hex()


def _chain_names(intermediates: int) -> list[str]:
    """The file names of a fleet's CA chain in ``ca/`` (and ``ca-keys/``), root first."""
    names = ["root.pem"]
    names += [
        "intermediate.pem" if k == 1 else f"intermediate-{k}.pem"
        for k in range(1, intermediates + 1)
    ]
    return names


def _write_inventory(path: Path, rows: list[Row], facts: dict[str, str]) -> None:
    con = sqlite3.connect(path)
    try:
        with con:  # one transaction: the inventory holds every device or none
            con.executescript(_SCHEMA)
            con.executemany(
                f"INSERT INTO devices ({_COLUMNS}) VALUES ({', '.join('?' * 14)})", rows
            )
            con.executemany("INSERT INTO fleet (key, value) VALUES (?, ?)", facts.items())
    finally:
        con.close()


def check_out_dir(out: Path, *, force: bool = False) -> None:
    """Raise ValueError unless ``out`` is free: missing, empty, or (with force) a fleet."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    if not any(out.iterdir()):
        return
    if not force:
        raise ValueError(f"{out} is not empty (--force replaces a fleet written earlier)")
    if not (out / "inventory.sqlite").is_file():
        # --force replaces a fleet, never an arbitrary folder someone pointed us at.
        raise ValueError(f"{out} is not empty and holds no fleet (no inventory.sqlite)")


def provision(
    out: Path,
    cohorts: Sequence[Cohort],
    now: dt.datetime,
    *,
    key_type: str = "ec-p256",
    intermediates: int = 1,
    p12: bool = False,
    p12_password: str = DEFAULT_P12_PASSWORD,
    p12_kdf_rounds: int | None = None,
    workers: int | None = None,
    cn_prefix: str = "device-",
    validity_days: int = 365,
    force: bool = False,
    name: str | None = None,
    on_progress: Callable[[int], None] | None = None,
    token: Pkcs11Config | None = None,
) -> Fleet:
    """Provision ``cohorts`` (see :func:`plan_cohorts`) into ``out``, all or nothing; with
    ``token``, every device's key pair is generated on that PKCS#11 token."""
    began = time.perf_counter()
    if now.tzinfo is None:
        raise ValueError(f"now {now.isoformat()} has no time zone; pass an aware datetime")
    if key_type not in KEY_TYPES:
        raise ValueError(f"unknown key type {key_type!r}; expected one of {', '.join(KEY_TYPES)}")
    if not 0 <= intermediates <= MAX_INTERMEDIATES:
        raise ValueError(f"intermediates {intermediates}: expected 0 to {MAX_INTERMEDIATES}")
    if p12 and not p12_password:
        raise ValueError("the PKCS#12 password must not be empty")
    if p12_kdf_rounds is not None and p12_kdf_rounds < 1:
        raise ValueError(f"PKCS#12 KDF rounds {p12_kdf_rounds}: expected 1 or more")
    if validity_days < 1:
        raise ValueError(f"validity {validity_days} days: expected 1 or more")
    if not re.fullmatch(r"[A-Za-z0-9_.-]*", cn_prefix):
        raise ValueError(f"CN prefix {cn_prefix!r}: expected letters, digits, '.', '_' or '-'")
    total = sum(c.size for c in cohorts)
    if total < 1:
        raise ValueError("the fleet has no devices")
    check_out_dir(out, force=force)
    if token is not None:
        if p12:
            raise ValueError("a key on a PKCS#11 token cannot be exported into a device.p12")
        if any(c.defect == "self-signed" and c.size for c in cohorts):
            raise ValueError("self-signed devices cannot be provisioned into a PKCS#11 token")
        if key_type not in TOKEN_KEY_TYPES:
            raise ValueError(
                f"key type {key_type!r} cannot be generated on a PKCS#11 token here; "
                f"expected one of {', '.join(TOKEN_KEY_TYPES)}"
            )
        workers = 1  # one token: its keys are made one after another
    if workers is None:
        workers = 1 if total < 200 else os.cpu_count() or 1
    workers = max(1, workers)
    name = name or secrets.token_hex(3)

    out = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    partial.mkdir()
    try:
        cas, root_sha256 = _make_cas(partial, cohorts, now, intermediates, name)
        (partial / "devices").mkdir()
        job = _Job(
            out=str(partial),
            cas=cas,
            now=now,
            validity_days=validity_days,
            cn_prefix=cn_prefix,
            width=max(3, len(str(total))),
            p12_password=p12_password.encode() if p12 else None,
            p12_kdf_rounds=p12_kdf_rounds,
            token=token,
        )
        chunks = list(_chunks(cohorts, job, key_type, workers))
        rows = _issue_all(job, chunks, workers, on_progress)
        rows.sort()
        facts = {
            "name": name,
            "created": _iso(now),
            "size": str(total),
            "key_type": key_type,
            "intermediates": str(intermediates),
            "root_sha256": root_sha256,
            # key.pem beside every device.p12 is unencrypted anyway: the password guards nothing.
            # Recorded even when no PKCS#12 is made yet: export_p12 uses it later.
            "p12_password": "" if token is not None else p12_password,
        }
        if token is not None:
            facts["key_store"] = "pkcs11"
            facts["pkcs11_module"] = str(token.module)
            facts["pkcs11_token"] = token.token or f"slot {token.slot}"
        _write_inventory(partial / "inventory.sqlite", rows, facts)
        _replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return Fleet(out, tuple(cohorts), time.perf_counter() - began)


def _issue_all(
    job: _Job,
    chunks: list[_Chunk],
    workers: int,
    on_progress: Callable[[int], None] | None,
) -> list[Row]:
    rows: list[Row] = []
    if workers == 1:
        issuer = _Issuer(job)
        for chunk in chunks:
            rows += issuer.issue(chunk)
            if on_progress:
                on_progress(len(chunk.numbers))
        return rows
    context = multiprocessing.get_context(_start_method())
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_init_worker, initargs=(job,)
    )
    try:
        futures = [pool.submit(_issue_chunk, chunk) for chunk in chunks]
        for future in concurrent.futures.as_completed(futures):
            done = future.result()
            rows += done
            if on_progress:
                on_progress(len(done))
    finally:
        # On error or Ctrl-C, drop the queued chunks rather than issuing the whole fleet.
        pool.shutdown(wait=True, cancel_futures=True)
    return rows


def _start_method() -> str:
    """Return fork when safe (it is fastest and needs no main-module guard), else forkserver."""
    methods = multiprocessing.get_all_start_methods()
    # Forking a process with other threads can copy a held lock into the child.
    if "fork" in methods and threading.active_count() == 1:
        return "fork"
    return "forkserver" if "forkserver" in methods else "spawn"


def _replace(partial: Path, out: Path) -> None:
    """Move the finished fleet onto ``out`` (replacing an empty folder or an older fleet)."""
    if out.exists() and any(out.iterdir()):
        old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
        out.rename(old)
        partial.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        # rename(2) replaces an empty folder in one step.
        partial.rename(out)
    # mkdir-like permissions: the fleet's CA files are meant to be read by servers and tools.
    umask = os.umask(0)
    os.umask(umask)
    out.chmod(0o777 & ~umask)


# ---------------------------------------------------------------------------------------------
# PKCS#12 on demand


class FleetError(ValueError):
    """A fleet folder or a request about it is unusable; the message names the file or field."""


def export_p12(
    root: Path,
    ids: Iterable[str] | None = None,
    *,
    password: str | None = None,
    kdf_rounds: int | None = None,
) -> list[Device]:
    """Write ``devices/<id>/device.p12`` (mode 0600) for ``ids`` (default: every device).

    The PKCS#12 holds key.pem's key, the leaf and the chain in cert.pem, encrypted like those
    :func:`provision` makes with ``p12=True`` under ``password`` (default: the fleet's recorded
    ``p12_password``). A device.p12 already there is replaced. The inventory's ``p12_path`` is
    set for each device in one transaction. Returns the exported devices, ordered by id.
    """
    inventory = root / "inventory.sqlite"
    if not inventory.is_file():
        raise FleetError(f"{inventory}: missing; {root} is not a fleet")
    if kdf_rounds is not None and kdf_rounds < 1:
        raise FleetError(f"PKCS#12 KDF rounds {kdf_rounds}: expected 1 or more")
    con = sqlite3.connect(inventory)
    try:
        facts = dict(con.execute("SELECT key, value FROM fleet").fetchall())
        if password is None:
            password = facts.get("p12_password") or ""
            if not password:
                raise FleetError(
                    f"{inventory}: fleet field p12_password is empty (provisioned with --no-p12);"
                    " give a password"
                )
        if not password:
            raise FleetError("the PKCS#12 password must not be empty")
        rows = con.execute(f"SELECT {_COLUMNS} FROM devices ORDER BY id").fetchall()
        devices = {row[0]: Device(*row) for row in rows}
        if ids is None:
            wanted = list(devices.values())
        else:
            wanted = []
            for device_id in dict.fromkeys(ids):
                if device_id not in devices:
                    raise FleetError(f"{inventory}: no device with id {device_id!r}")
                wanted.append(devices[device_id])
            wanted.sort(key=lambda d: d.id)
        encryption = _p12_encryption(password.encode(), kdf_rounds)
        done: list[Device] = []
        for device in wanted:
            chain = _load_certs(root / device.cert_path)
            key_pem = _read_file(root / device.key_path, "key_path")
            try:
                key = _load_key(key_pem)
            except ValueError as exc:
                raise FleetError(
                    f"{root / device.key_path} (inventory field key_path): not a private key"
                    f" ({exc})"
                ) from None
            p12_rel = str(Path(device.key_path).parent / "device.p12")
            p12_path = root / p12_rel
            data = pkcs12.serialize_key_and_certificates(
                device.id.encode(), key, chain[0], chain[1:] or None, encryption
            )
            p12_path.unlink(missing_ok=True)  # O_EXCL below: never write through a symlink
            _write(p12_path, data, 0o600)
            done.append(dataclasses.replace(device, p12_path=p12_rel))
        with con:
            con.executemany(
                "UPDATE devices SET p12_path = ? WHERE id = ?", [(d.p12_path, d.id) for d in done]
            )
            con.execute(
                "INSERT OR REPLACE INTO fleet (key, value) VALUES ('p12_password', ?)", (password,)
            )
    finally:
        con.close()
    return done


def _read_file(path: Path, field: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise FleetError(f"{path} (inventory field {field}): {exc.strerror or exc}") from None


def _load_certs(path: Path) -> list[x509.Certificate]:
    data = _read_file(path, "cert_path")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise FleetError(
            f"{path} (inventory field cert_path): not PEM certificates ({exc})"
        ) from None


# ---------------------------------------------------------------------------------------------
# Revocation: CRLs signed with the fleet's own CA keys


class FleetKeysMissing(ValueError):
    """A fleet folder has no CA keys (``ca-keys/``), so no CRL can be signed for it."""


def fleet_cas(root: Path) -> list[Issued]:
    """Load the fleet's CA chain with its keys from ``root``: root first, devices' issuer last."""
    chain: list[Issued] = []
    for name in _chain_names(MAX_INTERMEDIATES):
        cert_path, key_path = root / "ca" / name, root / "ca-keys" / name
        if not cert_path.exists():
            break
        if not key_path.exists():
            raise FleetKeysMissing(
                f"{key_path} is missing: {root} was provisioned without its CA keys, so no CRL"
                " can be signed for it; provision the fleet again"
            )
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        chain.append(Issued(cert, _load_key(key_path.read_bytes())))
    if not chain:
        raise FleetKeysMissing(f"{root / 'ca' / 'root.pem'} is missing: {root} is not a fleet")
    return chain


def fleet_crls(
    root: Path,
    serials: Iterable[int],
    now: dt.datetime,
    *,
    next_update: dt.datetime,
    number: int = 1,
) -> list[x509.CertificateRevocationList]:
    """Issue a CRL per CA of the fleet's chain, root first; the issuing CA's lists ``serials``.

    The issuing CA's CRL is the one that revokes devices. The others are empty, for verifiers
    that check every certificate of the path (OpenSSL's ``X509_V_FLAG_CRL_CHECK_ALL``, as
    nginx's ``ssl_crl`` sets): they refuse a chain when any CA in it has no CRL.
    """
    chain = fleet_cas(root)
    wanted = list(serials)
    return [
        issue_crl(
            ca,
            wanted if ca is chain[-1] else (),
            this_update=now,
            next_update=next_update,
            number=number,
        )
        for ca in chain
    ]


# ---------------------------------------------------------------------------------------------
# Onboarding through a managed CA: the key stays on the device, only a CSR leaves it


def csr_for(key: PrivateKey, common_name: str) -> x509.CertificateSigningRequest:
    """Return a CSR for ``key`` with subject CN ``common_name``."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return (
        x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, signature_hash(key))
    )


def onboard(
    device_dir: Path,
    issue: Callable[[str], str],
    *,
    common_name: str | None = None,
    key_type: str = "ec-p256",
) -> x509.Certificate:
    """Have ``issue`` (CSR PEM -> certificate PEM) certify the device's key; write cert.pem."""
    key_path = device_dir / "key.pem"
    if key_path.exists():
        key = _load_key(key_path.read_bytes())
    else:
        key = generate_key(key_type)
        device_dir.mkdir(parents=True, exist_ok=True)
        _write(key_path, _key_pem(key), 0o600)
    csr = csr_for(key, common_name or device_dir.name)
    returned = x509.load_pem_x509_certificates(issue(csr.public_bytes(_PEM).decode()).encode())
    if returned[0].public_key() != key.public_key():
        # A certificate for another key would leave the device unable to prove possession.
        raise ValueError(f"the CA returned a certificate for another key than {key_path}")
    write_pem(device_dir / "cert.pem", *(c.public_bytes(_PEM) for c in returned))
    return returned[0]
