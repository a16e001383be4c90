"""Where a device keeps its private key: one interface, :class:`KeyStore`, for every kind of store.

The device client asks its key store for a client :class:`ssl.SSLContext` before each TLS
handshake and adds the returned cost (seconds) to that handshake's timing. This module holds the
interface and the plain software store (a PEM file, optionally encrypted); hardware tokens live in
:mod:`devices.piv`.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from OpenSSL import SSL

from devices.pki import PrivateKey

__all__ = [
    "KeyStore",
    "KeyStoreError",
    "OpenSSLKeyStore",
    "SoftwareKeyStore",
    "write_encrypted_key",
    "write_private_file",
]


class KeyStoreError(Exception):
    """A key store could not provide the device's certificate and key for a handshake."""


@runtime_checkable
class KeyStore(Protocol):
    """A device's certificate chain and private key, handed to TLS one handshake at a time."""

    kind: str  # "software" or "piv"

    async def handshake_context(
        self, make_context: Callable[[], ssl.SSLContext]
    ) -> tuple[ssl.SSLContext, float]:
        """Return a client SSLContext holding this device's certificate chain and private key for
        one TLS handshake, and the seconds of key-store cost that handshake adds (PIN verify,
        touch, on-token signature).

        ``make_context()`` returns a fresh client context already trusting the server; the store
        loads its chain and key into it. Time the store spent awaiting (a touch) has already
        passed on trio's clock when this returns and is not part of the returned cost.
        """
        ...


@runtime_checkable
class OpenSSLKeyStore(Protocol):
    """A key store that can also hand its chain and key to pyOpenSSL (devices.openssl_tls)."""

    def openssl_context(self, make_context: Callable[[], SSL.Context]) -> SSL.Context:
        """Return a pyOpenSSL client context (from ``make_context()``, built once and kept)
        holding this device's certificate chain and private key; no key-store cost."""
        ...


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file readable by its owner only (mode 0600 from the start)."""
    # Created with 0600 rather than chmod-ed afterwards, so the key is never world-readable, even
    # for an instant; O_EXCL refuses to write through an existing file or symlink.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_encrypted_key(key: PrivateKey, path: Path, password: bytes) -> None:
    """Write ``key`` to ``path`` as password-encrypted PKCS#8 PEM (mode 0600)."""
    if not password:
        raise KeyStoreError(f"{path}: refusing to encrypt a key with an empty password")
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private_file(path, pem)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise KeyStoreError(f"{path}: cannot read the {what} file: {e.strerror or e}") from e


def _check_key(path: Path, data: bytes, password: bytes | None) -> PrivateKeyTypes:
    """Return the key; raise a KeyStoreError saying exactly what is wrong with it, if anything."""
    try:
        return serialization.load_pem_private_key(data, password)
    except TypeError as e:
        # cryptography signals a password/encryption mismatch with TypeError.
        if password is None:
            raise KeyStoreError(
                f"{path}: the private key is encrypted; configure its password"
            ) from e
        raise KeyStoreError(
            f"{path}: a password was configured but the private key is not encrypted; "
            "remove the password or encrypt the key"
        ) from e
    except ValueError as e:
        if password is not None and b"ENCRYPTED" in data:
            raise KeyStoreError(
                f"{path}: wrong password: the private key could not be decrypted"
            ) from e
        raise KeyStoreError(f"{path}: not a PEM private key ({e})") from e


class SoftwareKeyStore:
    """A private key in a PEM file (optionally PKCS#8 encrypted) next to its certificate chain."""

    kind: str = "software"

    def __init__(self, cert_path: Path, key_path: Path, password: bytes | None = None) -> None:
        """Use the chain in ``cert_path`` and the key in ``key_path`` (files are read lazily)."""
        self.cert_path = Path(cert_path)
        self.key_path = Path(key_path)
        self._password = password
        # One context per make_context (bound to a target, hence to its ALPN list): a device
        # that speaks h2 to one target and HTTP/1.1 to another keeps both. Keyed by identity,
        # and bounded: a key store serves a device's few targets.
        self._contexts: dict[Callable[[], ssl.SSLContext], ssl.SSLContext] = {}
        self._openssl: dict[Callable[[], SSL.Context], SSL.Context] = {}

    def __repr__(self) -> str:
        return f"SoftwareKeyStore(cert_path={self.cert_path!r}, key_path={self.key_path!r})"

    async def handshake_context(
        self, make_context: Callable[[], ssl.SSLContext]
    ) -> tuple[ssl.SSLContext, float]:
        """Return the cached client context (built on first use) and a cost of 0.0 seconds."""
        # The signature happens for real inside OpenSSL during the handshake, so the measured
        # handshake already includes it: nothing to add.
        ctx = self._contexts.get(make_context)
        if ctx is None:
            if len(self._contexts) >= 8:
                self._contexts.clear()
            ctx = self._contexts[make_context] = self._build(make_context)
        return ctx, 0.0

    def openssl_context(self, make_context: Callable[[], SSL.Context]) -> SSL.Context:
        """Return the cached pyOpenSSL client context (built on first use), as
        :meth:`handshake_context` does for the standard library's."""
        ctx = self._openssl.get(make_context)
        if ctx is None:
            if len(self._openssl) >= 8:
                self._openssl.clear()
            ctx = self._openssl[make_context] = self._build_openssl(make_context)
        return ctx

    def pem_credentials(self) -> tuple[bytes, bytes]:
        """Return the certificate chain and the private key as PEM bytes (the key unencrypted).

        For clients that take key material as bytes rather than an SSLContext (grpcio's
        ``ssl_channel_credentials``). An encrypted key is decrypted in memory only.
        """
        chain = _read(self.cert_path, "certificate")
        data = _read(self.key_path, "private key")
        _check_key(self.key_path, data, self._password)
        if self._password is None:
            return chain, data
        key = serialization.load_pem_private_key(data, self._password)
        return chain, key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def _build(self, make_context: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        # Diagnose with cryptography first: OpenSSL's errors for a wrong password or a
        # mismatched key are terse, and we want to name the file and the problem.
        _read(self.cert_path, "certificate")
        _check_key(self.key_path, _read(self.key_path, "private key"), self._password)
        ctx = make_context()
        try:
            ctx.load_cert_chain(self.cert_path, self.key_path, password=self._password)
        except ssl.SSLError as e:
            if "KEY_VALUES_MISMATCH" in str(e):
                raise KeyStoreError(
                    f"{self.key_path}: the private key does not match the certificate in "
                    f"{self.cert_path}"
                ) from e
            raise KeyStoreError(
                f"{self.cert_path}: cannot load the certificate chain ({e.reason or e})"
            ) from e
        return ctx

    def _build_openssl(self, make_context: Callable[[], SSL.Context]) -> SSL.Context:
        # The same diagnosis first, so both TLS libraries fail with the same messages.
        _read(self.cert_path, "certificate")
        key = _check_key(self.key_path, _read(self.key_path, "private key"), self._password)
        ctx = make_context()
        try:
            ctx.use_certificate_chain_file(str(self.cert_path))
        except SSL.Error as e:
            raise KeyStoreError(f"{self.cert_path}: cannot load the certificate chain ({e})") from e
        try:
            ctx.use_privatekey(key)  # type: ignore[arg-type]
            ctx.check_privatekey()
        except SSL.Error as e:
            raise KeyStoreError(
                f"{self.key_path}: the private key does not match the certificate in "
                f"{self.cert_path}"
            ) from e
        return ctx
