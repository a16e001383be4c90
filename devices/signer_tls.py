"""A device's client TLS whose CertificateVerify is signed by a call we provide: tlslite-ng on trio.

Why tlslite-ng. Neither the standard library's ``ssl`` nor pyOpenSSL accepts a signing callback
for the client key: they load keys, they do not delegate signatures. tlslite-ng is a TLS 1.2/1.3
implementation in Python whose private key is an object with a ``sign`` method; a subclass of its
``ECDSAKey`` or ``RSAKey`` that signs on a PKCS#11 token (:mod:`devices.pkcs11`) is enough to keep
the key in the token. The price is a handshake in Python (bench/pkcs11.py measures it).

How it runs on trio: tlslite-ng's ``*Async`` calls are generators over a non-blocking socket that
yield 0 (wants to read) or 1 (wants to write); we wait with ``trio.lowlevel.wait_readable`` /
``wait_writable``. Handshake steps run in a worker thread, because one of them signs on the token
(a YubiKey takes ~70 ms) and the event loop must keep running other devices meanwhile.

tlslite-ng does not verify the server's certificate: the ``checker`` here does, after the
handshake and before any request is sent, with ``cryptography``'s X.509 verifier (chain to the
target's CA file or the system's trust store, and the server name). Failures are
``trio.BrokenResourceError`` chained from :class:`SignerTLSError`, whose ``name``
:func:`devices.client.tls_error_name` reports (``tls_error:certificate_verify_failed``...).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import socket
import ssl
import warnings
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.x509 import verification

with warnings.catch_warnings():
    # tlslite-ng's package imports its asyncore integration (deprecated in 3.11), unused here.
    warnings.simplefilter("ignore", DeprecationWarning)
    from tlslite import HandshakeSettings, TLSConnection, X509CertChain
    from tlslite.constants import AlertDescription
    from tlslite.errors import (
        TLSAbruptCloseError,
        TLSAlert,
        TLSAuthenticationError,
        TLSError,
        TLSLocalAlert,
        TLSRemoteAlert,
    )
    from tlslite.utils.ecdsakey import ECDSAKey
    from tlslite.utils.rsakey import RSAKey

__all__ = ["CALLS_PER_CHECKPOINT", "Signer", "SignerTLSError", "SignerTLSStream", "signing_key"]

CALLS_PER_CHECKPOINT = 16
_RECEIVE_SIZE = 65536

#: sign(digest, hash name, padding "pss"/"pkcs1"/None) -> signature bytes (DER for ECDSA).
Signer = Callable[[bytes, str, str | None], bytes]

# OpenSSL's names for the alerts a server sends most, so that the outcome reads the same as on
# the other TLS paths (tls_error:tlsv1_alert_unknown_ca); others are alert_<name>.
_ALERT_NAMES = {
    "bad_certificate": "sslv3_alert_bad_certificate",
    "certificate_required": "tlsv13_alert_certificate_required",
    "handshake_failure": "sslv3_alert_handshake_failure",
    "unknown_ca": "tlsv1_alert_unknown_ca",
    "decrypt_error": "tlsv1_alert_decrypt_error",
    "protocol_version": "tlsv1_alert_protocol_version",
    "certificate_expired": "sslv3_alert_certificate_expired",
    "certificate_revoked": "sslv3_alert_certificate_revoked",
    "internal_error": "tlsv1_alert_internal_error",
}


class SignerTLSError(Exception):
    """A TLS failure on this path; ``name`` is what follows ``tls_error:`` in an outcome."""

    def __init__(self, name: str, detail: str) -> None:
        self.name = name
        super().__init__(f"{name}: {detail}")


class _VerifyFailed(TLSAuthenticationError):
    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(detail)


def _name_of(exc: BaseException) -> str:
    if isinstance(exc, _VerifyFailed):
        return "certificate_verify_failed"
    if isinstance(exc, TLSRemoteAlert):
        alert = AlertDescription.toStr(exc.description)
        return _ALERT_NAMES.get(alert, f"alert_{alert}")
    if isinstance(exc, TLSLocalAlert):
        return f"local_alert_{AlertDescription.toStr(exc.description)}"
    if isinstance(exc, TLSAbruptCloseError | OSError):
        return "eof"
    return type(exc).__name__.lower()


class _TokenECDSAKey(ECDSAKey):  # type: ignore[misc]
    """tlslite-ng's ECDSA key interface, signing through ``signer``; verifies with the public
    key from the certificate (tlslite checks its own signature before sending it)."""

    def __init__(self, public: Any, signer: Signer) -> None:
        self._public = public
        self._signer = signer
        self.public_key = public.public_key
        self.private_key = public.public_key  # tlslite reads .curve.baselen from it (TLS 1.2)
        self.key_type = "ecdsa"

    def __len__(self) -> int:
        return len(self._public)

    def hasPrivateKey(self) -> bool:
        return True

    def _sign(self, data: Any, hash_alg: str) -> bytearray:
        return bytearray(self._signer(bytes(data), hash_alg.lower(), None))

    def _verify(self, signature: Any, hash_bytes: Any) -> bool:
        return bool(self._public._verify(signature, hash_bytes))


class _TokenRSAKey(RSAKey):  # type: ignore[misc]
    """tlslite-ng's RSA key interface, signing (PSS or PKCS#1 v1.5) through ``signer``."""

    def __len__(self) -> int:
        return len(self._public)

    def __init__(self, public: Any, signer: Signer) -> None:
        # RSAKey.__init__ is abstract (it raises): set what tlslite-ng reads instead.
        self.n, self.e, self.key_type = public.n, public.e, public.key_type
        self._public = public
        self._signer = signer

    def hasPrivateKey(self) -> bool:
        return True

    def sign(
        self, bytes: Any, padding: str = "pkcs1", hashAlg: str | None = None, saltLen: Any = None
    ) -> bytearray:
        hash_name = (hashAlg or "sha256").lower()
        return bytearray(self._signer(bytes_(bytes), hash_name, padding))

    def verify(
        self,
        sigBytes: Any,
        bytes: Any,
        padding: str = "pkcs1",
        hashAlg: Any = None,
        saltLen: Any = None,
    ) -> bool:
        return bool(self._public.verify(sigBytes, bytes, padding, hashAlg, saltLen))

    def hashAndSign(
        self,
        bytes: Any,
        rsaScheme: str = "PKCS1",
        hAlg: str = "sha1",
        sLen: int = 0,
    ) -> bytearray:
        digest = hashlib.new(hAlg.lower(), bytes_(bytes)).digest()
        return self.sign(digest, rsaScheme.lower(), hAlg, sLen)


def bytes_(data: Any) -> bytes:
    """``data`` (bytes, bytearray, memoryview) as bytes."""
    return bytes(data)


def signing_key(chain_pem: bytes, signer: Signer) -> tuple[X509CertChain, Any]:
    """tlslite-ng's certificate chain and a private-key object whose signatures are
    ``signer``'s, for the leaf key in ``chain_pem`` (EC or RSA)."""
    chain = X509CertChain()
    chain.parsePemList(chain_pem.decode())
    public = chain.x509List[0].publicKey
    if public.key_type == "ecdsa":
        return chain, _TokenECDSAKey(public, signer)
    if public.key_type in ("rsa", "rsa-pss"):
        return chain, _TokenRSAKey(public, signer)
    raise ValueError(f"unsupported certificate key type {public.key_type!r} (EC or RSA)")


def _trust(ca_file: Path | None) -> verification.Store:
    if ca_file is not None:
        return verification.Store(x509.load_pem_x509_certificates(ca_file.read_bytes()))
    paths = ssl.get_default_verify_paths()
    data = Path(paths.cafile).read_bytes() if paths.cafile else b""
    return verification.Store(x509.load_pem_x509_certificates(data))


def _checker(
    ca_file: Path | None, server_name: str, now: dt.datetime
) -> Callable[[TLSConnection], None]:
    def check(conn: TLSConnection) -> None:
        if conn.resumed:
            return  # the server proved nothing new; its chain was verified when the session began
        chain = conn.session.serverCertChain
        if chain is None or not chain.x509List:
            raise _VerifyFailed("the server sent no certificate")
        certs = [x509.load_der_x509_certificate(bytes(c.bytes)) for c in chain.x509List]
        try:
            import ipaddress

            try:
                subject: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(server_name))
            except ValueError:
                subject = x509.DNSName(server_name)
            verifier = (
                verification.PolicyBuilder()
                .store(_trust(ca_file))
                .time(now)
                .build_server_verifier(subject)  # type: ignore[arg-type]
            )
            verifier.verify(certs[0], certs[1:])
        except verification.VerificationError as e:
            raise _VerifyFailed(str(e)) from e

    return check


class SignerTLSStream(trio.abc.Stream):
    """A client TLS connection (tlslite-ng) over a connected socket, as a trio stream."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock: socket.socket | None = sock
        self._conn = TLSConnection(sock)
        self._calls = 0

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise trio.ClosedResourceError("this TLS stream is closed")
        return self._sock

    async def _wait(self, want: int) -> None:
        self._calls = 0
        if want == 0:
            await trio.lowlevel.wait_readable(self._socket())
        else:
            await trio.lowlevel.wait_writable(self._socket())

    async def _budget(self) -> None:
        self._calls += 1
        if self._calls > CALLS_PER_CHECKPOINT:
            self._calls = 0
            await trio.lowlevel.checkpoint()

    async def do_handshake(
        self,
        chain_pem: bytes,
        signer: Signer,
        server_name: str,
        ca_file: Path | None,
        alpn: Sequence[str],
        now: dt.datetime,
        session: Any = None,
    ) -> None:
        """Run the handshake (client certificate signed by ``signer``) and verify the server."""
        chain, key = signing_key(chain_pem, signer)
        settings = HandshakeSettings()
        settings.minVersion = (3, 3)
        settings.maxVersion = (3, 4)
        # tlslite-ng 0.8 decides whether to compress the client's Certificate (RFC 8879) from
        # its own ClientHello instead of the server's CertificateRequest, and OpenSSL rejects
        # the CompressedCertificate it did not ask for: neither offer nor send compression.
        settings.certificate_compression_send = []
        settings.certificate_compression_receive = []
        handshake = self._conn.handshakeClientCert(
            chain,
            key,
            session=session,
            settings=settings,
            checker=_checker(ca_file, server_name, now),
            serverName=server_name if _is_name(server_name) else None,
            alpn=[bytearray(p.encode()) for p in alpn] or None,
            async_=True,
        )
        await self._drive(handshake, in_thread=True, what="handshake")

    async def _drive(self, gen: Generator[Any, None, None], *, in_thread: bool, what: str) -> Any:
        """Run a tlslite-ng generator to its end, waiting on the socket when it asks; return
        its last non-wait value."""
        last: Any = None
        while True:
            self._socket()
            try:
                if in_thread:
                    step = await trio.to_thread.run_sync(next, gen, None)
                else:
                    await self._budget()
                    step = next(gen, None)
            except (TLSError, TLSAlert, OSError) as exc:
                raise trio.BrokenResourceError(f"TLS {what} failed: {exc!r}") from SignerTLSError(
                    _name_of(exc), repr(exc)
                )
            if step is None:
                return last
            if step in (0, 1) and isinstance(step, int):
                await self._wait(step)
                continue
            last = step

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data`` (encrypted)."""
        await self._drive(self._conn.writeAsync(bytes(data)), in_thread=False, what="send")

    async def wait_send_all_might_not_block(self) -> None:
        """Return when the socket can take more bytes."""
        await trio.lowlevel.wait_writable(self._socket())

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Return some decrypted bytes; ``b""`` once the server closed."""
        got = await self._drive(
            self._conn.readAsync(max_bytes or _RECEIVE_SIZE), in_thread=False, what="receive"
        )
        return bytes(got) if got else b""

    def close(self) -> None:
        """Close the socket now, sending nothing."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        trio.lowlevel.notify_closing(sock)
        sock.close()

    async def aclose(self) -> None:
        """Close the connection (see :meth:`close`)."""
        self.close()
        await trio.lowlevel.checkpoint()

    @property
    def session(self) -> Any:
        """The TLS session to resume on a later connection."""
        return self._conn.session

    @property
    def session_reused(self) -> bool:
        """True when this connection resumed a session."""
        return bool(self._conn.resumed)

    def selected_alpn_protocol(self) -> str | None:
        """The protocol the server selected by ALPN, if any."""
        session = self._conn.session
        chosen = getattr(session, "appProto", None) if session is not None else None
        return bytes(chosen).decode() if chosen else None

    def server_certificate(self) -> x509.Certificate | None:
        """The server's leaf certificate."""
        session = self._conn.session
        if session is None or session.serverCertChain is None:
            return None
        return x509.load_der_x509_certificate(bytes(session.serverCertChain.x509List[0].bytes))


def _is_name(server_name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(server_name)
    except ValueError:
        return True
    return False
