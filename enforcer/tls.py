"""Server-side TLS for the enforcer: pyOpenSSL over trio, one context per hostname.

Theory of operation. trio's own ``SSLStream`` wraps stdlib ``ssl``, which cannot ask for a
client certificate without aborting the handshake when that certificate is untrusted. access-flow A1
needs the opposite: request a certificate, accept whatever comes (proof of possession is still
enforced by TLS through CertificateVerify), and let the access decision turn a bad certificate
into an HTTP 403. pyOpenSSL's verify callback does that. We run its ``Connection`` over memory
BIOs: bytes from the socket go in with ``bio_write``, OpenSSL's output comes out with
``bio_read`` and goes to the socket. Each OpenSSL call that wants more input raises
``WantReadError``; we then flush, read from the socket and retry.

Every TLS-level failure surfaces as :class:`TLSError` (chained with ``from``), the way trio
turns them into one ``BrokenResourceError``.

Fairness. The socket layer (``enforcer/sockets.py``) checkpoints within a bounded number of
socket calls, but one socket read can hold thousands of tiny TLS records that OpenSSL hands out
one per ``recv``, with no socket call in between. So this layer keeps its own budget: at most
:data:`CALLS_PER_CHECKPOINT` reads or writes without a checkpoint, each bounded by one record.
Every loop here either reads from the socket, or ends: ``do_handshake``'s ClientHello loop is
bounded by the reader's record and size caps, ``_retry`` reads once per ``WantReadError``, and
the handshake's deadline (``handshake_timeout``) is a trio cancel scope that fires at the next
checkpoint, which these budgets guarantee.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _openssl_lib

from enforcer.clienthello import ClientHelloReader, NotClientHello

log = logging.getLogger(__name__)
T = TypeVar("T")
_RECEIVE_SIZE = 65536
_SHA256 = hashes.SHA256()
# Hot-path requests make two or three TLS calls per request; a peer sending one-byte records
# makes one per record. 64 calls cost at most 64 records (~1 MiB) of decryption and parsing.
CALLS_PER_CHECKPOINT = 64


class TLSError(Exception):
    """The TLS layer failed: a bad ClientHello, an alert, or the peer went away."""


@dataclasses.dataclass(frozen=True)
class HostTLS:
    """What the TLS layer needs to know about one hostname."""

    hostname: str
    chain_pem: bytes
    key_pem: bytes
    request_client_certificate: bool
    allow_resumption: bool
    # Roots named in the CertificateRequest, so real devices can pick the right certificate.
    client_cas: tuple[x509.Certificate, ...] = ()
    # ALPN ids this hostname selects, in the server's order of preference.
    alpn: tuple[str, ...] = ("h2", "http/1.1")


def _accept_any(conn: Any, cert: Any, errno: int, depth: int, ok: int) -> bool:
    # The access decision judges the chain (access-flow A1, A5): never abort the handshake here.
    return True


def _alpn_selector(allowed: tuple[str, ...]) -> Callable[[Any, list[bytes]], Any]:
    """The ALPN callback of one hostname: its first allowed protocol that the client offers."""
    ours = [p.encode() for p in allowed]

    def select(conn: Any, offered: list[bytes]) -> Any:
        # The server's preference, not the client's order (RFC 7301 leaves the choice to us):
        # h2 whenever both sides have it. Without overlap the handshake goes on without ALPN.
        for protocol in ours:
            if protocol in offered:
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS

    return select


def build_context(host: HostTLS) -> SSL.Context:
    """Build the OpenSSL server context for one hostname (done once per configuration)."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    # An idle kept-alive connection or WebSocket tunnel then holds no record buffers (about
    # 34 KiB: 16 KiB plus overhead each way); OpenSSL allocates them again for the next
    # record. nginx runs with the same mode (see bench/connections.py for what it saves).
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    certs = x509.load_pem_x509_certificates(host.chain_pem)
    key = serialization.load_pem_private_key(host.key_pem, password=None)
    ctx.use_certificate(certs[0])
    for extra in certs[1:]:
        ctx.add_extra_chain_cert(extra)
    ctx.use_privatekey(key)  # type: ignore[arg-type]
    ctx.check_privatekey()
    ctx.set_alpn_select_callback(_alpn_selector(host.alpn))
    # A session made for one hostname must never resume on another.
    ctx.set_session_id(host.hostname.encode()[:32])
    if host.request_client_certificate:
        ctx.set_verify(SSL.VERIFY_PEER, _accept_any)
        for ca in host.client_cas:
            ctx.add_client_ca(ca)
    else:
        ctx.set_verify(SSL.VERIFY_NONE)
    if not host.allow_resumption:
        # No Duration (access-flow A9): every request needs a new full handshake with a certificate.
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        ctx.set_options(SSL.OP_NO_TICKET)
    return ctx


class ContextsBySNI:
    """The per-hostname contexts, with a default for unknown or missing SNI."""

    def __init__(self, hosts: Iterable[HostTLS], default: HostTLS) -> None:
        self._contexts = {h.hostname: build_context(h) for h in hosts}
        # Unknown SNI offers every protocol: its only answer is 421 or 404, in either one.
        self._default = build_context(
            dataclasses.replace(default, request_client_certificate=False, alpn=("h2", "http/1.1"))
        )

    def for_name(self, sni: str | None) -> SSL.Context:
        """Return the context for an SNI name (the default one when unknown)."""
        if sni is not None and sni in self._contexts:
            return self._contexts[sni]
        return self._default


class IntermediatesMemo:
    """Intermediates a leaf was presented with, for re-checking resumed sessions (access-flow A14).

    A resumed handshake carries no certificates and OpenSSL keeps only the leaf in the session,
    so we remember what the full handshake sent, least-recently-used first out, bounded by the
    DER bytes held (``max_bytes``, the ``intermediates_memo_bytes`` setting). The server puts a
    chain here only once it has validated, so unauthenticated clients can neither grow it nor
    evict the devices whose sessions it serves.
    """

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._data: OrderedDict[bytes, tuple[tuple[x509.Certificate, ...], int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def put(self, leaf: x509.Certificate, intermediates: Sequence[x509.Certificate]) -> None:
        """Remember the intermediates sent with ``leaf`` (counted by their DER size)."""
        key = leaf.fingerprint(_SHA256)
        certs = tuple(intermediates)
        old = self._data.get(key)
        if old is not None and old[0] == certs:
            self._data.move_to_end(key)  # the usual case: a returning device, same chain
            return
        size = len(key) + sum(len(c.public_bytes(serialization.Encoding.DER)) for c in certs)
        if old is not None:
            self.bytes -= old[1]
            del self._data[key]
        if size > self.max_bytes:
            return
        self._data[key] = (certs, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self._data.popitem(last=False)
            self.bytes -= dropped

    def get(self, leaf: x509.Certificate) -> tuple[x509.Certificate, ...]:
        """Return the intermediates last sent with ``leaf`` (empty when unknown)."""
        entry = self._data.get(leaf.fingerprint(_SHA256))
        return entry[0] if entry is not None else ()


class ServerTLSStream:
    """A TLS server connection over a trio stream, driven through memory BIOs."""

    def __init__(self, transport: trio.abc.Stream, contexts: ContextsBySNI) -> None:
        self.transport = transport
        self._contexts = contexts
        self._conn: SSL.Connection | None = None
        self._send_lock = trio.Lock()
        self._eof = False
        self._calls = 0  # TLS reads and writes since the last checkpoint (see the top)
        self.sni: str | None = None
        # Set when the next write is the connection's last: it then leaves with close_notify in
        # one segment at aclose(). Any read that must wait flushes first, so nothing is stuck.
        self.hold_output = False

    @property
    def connection(self) -> SSL.Connection:
        """The pyOpenSSL connection (after :meth:`do_handshake` started)."""
        assert self._conn is not None
        return self._conn

    async def do_handshake(self) -> None:
        """Read the ClientHello, pick the hostname's context, and complete the handshake."""
        # Each pass reads from the socket (a checkpoint within the socket layer's budget), and
        # the reader refuses a ClientHello past its record and size caps: the loop is bounded.
        reader = ClientHelloReader()
        try:
            while True:
                chunk = await self._receive_raw()
                if not chunk:
                    raise TLSError("the client closed the connection before its ClientHello")
                if reader.feed(chunk):
                    break
            # Normalised like Host (lower case, no trailing dot) before the context lookup.
            self.sni = reader.server_name()
        except NotClientHello as exc:
            raise TLSError(f"not a TLS ClientHello we accept: {exc}") from exc
        self._conn = SSL.Connection(self._contexts.for_name(self.sni), None)
        self._conn.set_accept_state()
        self._conn.bio_write(bytes(reader.data))
        # What the last step produces (TLS 1.3 session tickets) waits for our next write or
        # our next wait for input: usually the request is already here, so the tickets leave
        # with the response in one segment instead of one of their own.
        await self._retry(self._conn.do_handshake, flush_after=False)

    async def _receive_raw(self) -> bytes:
        try:
            return bytes(await self.transport.receive_some(_RECEIVE_SIZE))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise TLSError(f"connection lost: {exc}") from exc

    async def _flush(self) -> None:
        # Take OpenSSL's output under the lock: with a sender and a receiver task on one
        # connection (a WebSocket tunnel), records must reach the socket in the order made.
        # Reading exactly what is pending spares the WantReadError of an empty BIO.
        conn = self.connection
        async with self._send_lock:
            out = b""
            while n := _pending_output(conn):
                out += conn.bio_read(n)
            if out:
                try:
                    await self.transport.send_all(out)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    raise TLSError(f"connection lost: {exc}") from exc

    async def _retry(self, fn: Callable[[], T], *, flush_after: bool = True) -> T:
        # Whatever OpenSSL writes is flushed before we wait for the peer (WantReadError), so a
        # peer waiting for our bytes is never stuck; ``flush_after=False`` leaves the output of
        # a successful call for the next flush (our next write, next wait, or aclose).
        conn = self.connection
        while True:
            try:
                result = fn()
            except SSL.WantReadError:
                # Waited for below, outside this clause: while the exception lives, its
                # traceback keeps pyOpenSSL's receive buffer (64 KiB per idle connection).
                pass
            except SSL.ZeroReturnError:
                raise
            except SSL.SysCallError as exc:
                self._eof = True
                raise TLSError(f"the peer closed the connection: {exc}") from exc
            except SSL.Error as exc:
                await self._flush_quietly()  # deliver our alert before giving up
                raise TLSError(_describe(exc)) from exc
            else:
                if flush_after:
                    await self._flush()
                return result
            await self._flush()
            if self._eof:
                raise TLSError("the peer closed the connection mid-message")
            data = await self._receive_raw()
            if data:
                conn.bio_write(data)
            else:
                self._eof = True
                conn.bio_shutdown()

    async def _flush_quietly(self) -> None:
        with contextlib.suppress(TLSError):
            await self._flush()

    async def _spend(self) -> None:
        # One TLS read or write; yield once the budget is spent (see the module docstring).
        self._calls += 1
        if self._calls > CALLS_PER_CHECKPOINT:
            self._calls = 0
            await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = _RECEIVE_SIZE) -> bytes:
        """Return decrypted bytes; ``b""`` at a clean or abrupt end of the stream."""
        await self._spend()
        try:
            return await self._retry(
                lambda: self.connection.recv(max_bytes or _RECEIVE_SIZE), flush_after=False
            )
        except SSL.ZeroReturnError:
            return b""
        except TLSError:
            if self._eof:
                return b""
            raise

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send ``data``."""
        await self._spend()
        conn = self.connection
        view = memoryview(data)
        while view:
            try:
                n = conn.send(bytes(view[:16384]))
            except SSL.Error as exc:
                raise TLSError(_describe(exc)) from exc
            view = view[n:]
        if not self.hold_output:
            await self._flush()

    async def flush(self) -> None:
        """Send whatever OpenSSL has produced and not yet sent."""
        await self._flush()

    async def send_close_notify(self) -> None:
        """Send what is held, then close_notify, within a second; the socket stays open."""
        try:
            if self._conn is not None:
                with trio.move_on_after(1):
                    if not self._eof and not self._conn.get_shutdown() & SSL.SENT_SHUTDOWN:
                        with contextlib.suppress(SSL.Error):
                            self._conn.shutdown()
                    await self._flush()  # a held response, then close_notify
        except TLSError:
            pass

    async def aclose(self) -> None:
        """Send close_notify when possible, then close the socket."""
        try:
            await self.send_close_notify()
        finally:
            await self.transport.aclose()

    def peer_chain(self) -> list[x509.Certificate]:
        """Return the client's leaf and the intermediates it sent (leaf first; [] when none)."""
        conn = self.connection
        leaf = conn.get_peer_certificate(as_cryptography=True)
        if leaf is None:
            return []
        rest = conn.get_peer_cert_chain(as_cryptography=True) or []
        # OpenSSL's server side does not list the leaf in the chain, but be robust either way.
        return [leaf, *(c for c in rest if c != leaf)]

    def session_reused(self) -> bool:
        """True when this handshake resumed an earlier TLS session."""
        return bool(_openssl_lib.SSL_session_reused(self.connection._ssl))

    def protocol(self) -> str:
        """The negotiated protocol version, such as ``TLSv1.3``."""
        return str(self.connection.get_protocol_version_name())

    def alpn(self) -> str | None:
        """The application protocol ALPN selected (``h2``, ``http/1.1``), None without ALPN."""
        selected = self.connection.get_alpn_proto_negotiated()
        return selected.decode("ascii") if selected else None


def _pending_output(conn: SSL.Connection) -> int:
    """Bytes OpenSSL has written to the connection's outgoing memory BIO and not yet read."""
    # BIO_get_mem_data returns the length held (the pointer is not wanted): reading exactly
    # that much spares the WantReadError pyOpenSSL raises when bio_read finds the BIO empty.
    return int(_openssl_lib.BIO_get_mem_data(conn._from_ssl, _ffi.NULL))


def _describe(exc: SSL.Error) -> str:
    parts = []
    for item in exc.args[0] if exc.args and isinstance(exc.args[0], list) else []:
        if isinstance(item, tuple) and len(item) == 3:
            parts.append(str(item[2]))
    return ", ".join(parts) or repr(exc)
