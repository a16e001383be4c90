"""A device's client TLS on the OpenSSL that ``cryptography`` bundles (pyOpenSSL), in socket mode.

Why not ``trio.SSLStream`` for a load generator. Python's ``ssl`` module is linked against the
system OpenSSL (3.0 here), whose client handshake costs ~1.7 ms of CPU on this machine against
~1.1 ms in the OpenSSL 4.0 bundled with ``cryptography`` (the enforcer's own TLS), and
``trio.SSLStream`` moves every TLS record through memory BIOs in Python. Here OpenSSL reads and
writes the non-blocking socket itself (``SSL_set_fd``); trio only waits, with
``wait_readable`` / ``wait_writable``, when OpenSSL says it would block.

What stays as it was with ``ssl.create_default_context``: the server certificate is verified
(``VERIFY_PEER``) against the target's CA file or the system's trust store, the name asked for
is checked against the certificate (no partial wildcards), TLS 1.2 is the lowest version, ALPN
offers the target's protocols, SNI names the target, and a session taken after a response can
be resumed by the next connection. Failures are ``trio.BrokenResourceError`` chained ``from``
pyOpenSSL's error, which :func:`devices.client.tls_error_name` names exactly as it names the
standard library's (``tls_error:certificate_verify_failed``, ``tls_error:eof``, an alert...).

The fairness rule (as ``enforcer/sockets.py`` keeps it on the server side, written separately
here because ``devices`` never imports ``enforcer``): a call that succeeds returns at once, a
wait is a checkpoint, and at most :data:`CALLS_PER_CHECKPOINT` calls that did not wait run
between two checkpoints, so a server that always has bytes ready cannot keep the generator's
other devices (or its timeouts) from running.

pyOpenSSL has no public call for the host name check or for "was this session resumed": those
two go through the ``cryptography`` bindings pyOpenSSL itself is built on (``OpenSSL._util``).
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path

import trio
from cryptography import x509
from OpenSSL import SSL
from OpenSSL._util import lib as _lib

__all__ = ["CALLS_PER_CHECKPOINT", "OpenSSLStream", "client_context", "open_socket"]

# A device's exchange makes a handful of calls per connection and waits for the server at least
# once, so it never reaches this; a server that always has bytes ready does.
CALLS_PER_CHECKPOINT = 16
_RECEIVE_SIZE = 65536


def client_context(ca_file: Path | None, server_name: str, alpn: Sequence[str]) -> SSL.Context:
    """Return a client context that verifies the server as ``server_name`` against ``ca_file``
    (None: the system trust store), offering ``alpn``."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_verify(SSL.VERIFY_PEER)
    if ca_file is not None:
        ctx.load_verify_locations(str(ca_file))
    else:
        # The bundled OpenSSL's own default paths point at its build machine: use the system's,
        # which is what the standard library's default context trusts.
        paths = ssl.get_default_verify_paths()
        if paths.cafile or paths.capath:
            ctx.load_verify_locations(paths.cafile, paths.capath)
    param = _lib.SSL_CTX_get0_param(ctx._context)
    try:
        ip = ipaddress.ip_address(server_name)
    except ValueError:
        _lib.X509_VERIFY_PARAM_set_hostflags(param, _lib.X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS)
        name = server_name.encode("idna")
        ok = _lib.X509_VERIFY_PARAM_set1_host(param, name, len(name))
    else:
        packed = ip.packed
        ok = _lib.X509_VERIFY_PARAM_set1_ip(param, packed, len(packed))
    if ok != 1:
        raise ValueError(f"cannot check the server certificate against {server_name!r}")
    if alpn:
        ctx.set_alpn_protos([p.encode() for p in alpn])
    return ctx


@functools.lru_cache(maxsize=256)
def ip_family(host: str) -> int | None:
    """``AF_INET`` or ``AF_INET6`` for an IP address, None for a name (a device's few targets:
    parsed once, not per connection)."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return None


async def open_socket(host: str, port: int) -> socket.socket:
    """Connect a non-blocking TCP socket to ``host:port`` (an IP address directly, a name with
    trio's happy eyeballs), with Nagle off: a TLS flight then the request must not wait."""
    family = ip_family(host)
    if family is None:
        tcp = await trio.open_tcp_stream(host, port)
        sock = socket.socket(fileno=tcp.socket.detach())
    else:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            code = sock.connect_ex((host, port))
            if code == errno.EINPROGRESS:
                await trio.lowlevel.wait_writable(sock)
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, f"connect to {host}:{port}: {errno.errorcode.get(code, code)}")
        except BaseException:
            sock.close()
            raise
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    return sock


class OpenSSLStream(trio.abc.Stream):
    """A client TLS connection over a connected socket, as a trio stream (owns the socket)."""

    def __init__(
        self,
        sock: socket.socket,
        ctx: SSL.Context,
        server_name: str,
        session: SSL.Session | None = None,
    ) -> None:
        self._sock: socket.socket | None = sock
        self._conn = SSL.Connection(ctx, sock)
        self._conn.set_connect_state()
        if ip_family(server_name) is None:  # SNI carries names only (RFC 6066), as ssl sends it
            self._conn.set_tlsext_host_name(server_name.encode("idna"))
        if session is not None:
            self._conn.set_session(session)
        self._calls = 0

    async def _wait(self, readable: bool) -> None:
        # Called outside the ``except`` clause that saw WantRead/WantWrite: while that
        # exception lives, its traceback keeps pyOpenSSL's 64 KiB receive buffer, which an
        # idle kept-alive connection would then hold for as long as it waits.
        sock = self._socket()
        self._calls = 0
        if readable:
            await trio.lowlevel.wait_readable(sock)
        else:
            await trio.lowlevel.wait_writable(sock)

    async def _budget(self) -> None:
        self._calls += 1
        if self._calls > CALLS_PER_CHECKPOINT:
            self._calls = 0
            await trio.lowlevel.checkpoint()

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise trio.ClosedResourceError("this TLS stream is closed")
        return self._sock

    async def do_handshake(self) -> None:
        """Run the TLS handshake to its end (verifying the server)."""
        await self._budget()
        while True:
            self._socket()
            try:
                self._conn.do_handshake()
                return
            except SSL.WantReadError:
                readable = True
            except SSL.WantWriteError:
                readable = False
            except SSL.Error as exc:
                raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc
            await self._wait(readable)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data`` (encrypted)."""
        await self._budget()
        view = memoryview(data)
        while view:
            self._socket()
            try:
                view = view[self._conn.send(view) :]
                continue
            except SSL.WantReadError:
                readable = True
            except SSL.WantWriteError:
                readable = False
            except SSL.Error as exc:
                raise trio.BrokenResourceError(f"TLS send failed: {exc}") from exc
            await self._wait(readable)

    async def wait_send_all_might_not_block(self) -> None:
        """Return when the socket can take more bytes."""
        await trio.lowlevel.wait_writable(self._socket())

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Return some decrypted bytes; ``b""`` once the server closed with close_notify."""
        await self._budget()
        while True:
            self._socket()
            try:
                return self._conn.recv(max_bytes or _RECEIVE_SIZE)
            except SSL.WantReadError:
                readable = True
            except SSL.WantWriteError:
                readable = False
            except SSL.ZeroReturnError:
                return b""
            except SSL.Error as exc:
                # Without close_notify (SysCallError: EOF or reset) too: a truncated response
                # must not pass for a whole one, as trio.SSLStream treats it.
                raise trio.BrokenResourceError(f"TLS receive failed: {exc}") from exc
            await self._wait(readable)

    def close(self) -> None:
        """Close the socket now, sending nothing."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        # As `openssl s_time -new` ends each connection: marked shut down without sending
        # close_notify. Freed without that mark, OpenSSL would make the session unresumable.
        self._conn.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)
        trio.lowlevel.notify_closing(sock)
        sock.close()

    async def aclose(self) -> None:
        """Close the connection (see :meth:`close`)."""
        self.close()
        await trio.lowlevel.checkpoint()

    @property
    def session(self) -> SSL.Session | None:
        """The TLS session to resume on a later connection (TLS 1.3: after the first read)."""
        return self._conn.get_session()

    @property
    def session_reused(self) -> bool:
        """True when this connection resumed a session."""
        return bool(_lib.SSL_session_reused(self._conn._ssl))

    def selected_alpn_protocol(self) -> str | None:
        """The protocol the server selected by ALPN, if any."""
        chosen = self._conn.get_alpn_proto_negotiated()
        return chosen.decode() if chosen else None

    def server_certificate(self) -> x509.Certificate | None:
        """The server's leaf certificate (kept in a resumed session too)."""
        return self._conn.get_peer_certificate(as_cryptography=True)
