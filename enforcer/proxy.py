"""Forwarding an admitted request to its origin (HTTP/1.1 or HTTP/2), streaming both ways.

Theory of operation. The enforcer is the edge: what it forwards is all an origin knows about
a request, so everything here assumes a hostile client and a possibly broken origin.

- Headers (:func:`forwarded_headers`): one pass over the client's headers. Hop-by-hop headers,
  the ones the client's ``Connection:`` nominates, framing and ``Host`` are dropped; so is every
  header the enforcer owns (:data:`OWNED_HEADERS`, :data:`OWNED_HEADER_PREFIXES`), compared
  after lower-casing and turning ``_`` into ``-``, because WSGI/CGI origins read ``X_Foo`` and
  ``X-Foo`` as one variable. Names with ``_`` are dropped outright unless the application opts
  in (nginx's ``underscores_in_headers off``). Then the enforcer adds its own copies.
- Paths (:func:`join_path`): the origin URL's path prefix and the request path are joined on a
  segment boundary and dot segments are removed (RFC 3986 §5.2.4, ``%2e`` counted as a dot), so
  a request never reaches a path outside the prefix.
- Connections (:class:`OriginPool`): kept alive and reused only when h11 says the exchange
  ended cleanly with no byte left over, and checked for stray bytes before reuse; anything
  else is closed, so one client's leftovers never become another client's response.
- Bodies: a request body is bytes or an async iterator of bytes (streamed with the client's
  Content-Length, else chunked). A response body ends at h11's EndOfMessage, at a closed
  connection, or at PAUSED (a 2xx to CONNECT, a 101): nothing after those is HTTP, and h11
  would return PAUSED forever without reading, so no loop here waits on it.
- Schemes (:func:`origin_request`): ``http://`` is HTTP/1.1 below; ``h2c://``, ``grpc://``,
  ``grpcs://`` and an ``https://`` origin that selects ``h2`` in ALPN go to
  :mod:`enforcer.origin_h2` (one shared connection per origin, a stream per request, the
  body sent by a task of the exchange while the response streams back); an ``https://``
  origin that selects ``http/1.1`` is remembered and spoken to as below, over TLS.
- Fairness: every loop here awaits I/O, and the ones that move body bytes also reach a trio
  checkpoint at least every :data:`_FAIR_BYTES` (the enforcer's sockets return without one
  when data is ready).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import re
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import h11
import trio

from enforcer.application import ORIGIN_SCHEMES, TLS_SCHEMES, origin_scheme
from enforcer.http import HOP_BY_HOP, next_event, send
from enforcer.identity import USER_EMAIL_HEADER
from enforcer.origin_h2 import (
    H2Error,
    H2Origin,
    H2Origins,
    H2Stream,
    H2Target,
    NegotiatedHTTP1,
    client_tls_context,
    h2_request_headers,
    response_chunks,
    wait_head,
)
from enforcer.sockets import open_tcp

# The headers the enforcer owns. A client's copy never reaches an origin (whatever its case or
# its underscores): origins behind an edge trust these to say who the client is and how it
# connected. The enforcer sets its own X-Forwarded-For/-Proto/-Host, Forwarded,
# Cf-Access-Jwt-Assertion and, when the application forwards it, Cf-Client-Cert-*; the rest of
# the set is never sent, so an origin that reads it reads nothing forged.
OWNED_HEADERS = frozenset(
    {
        b"forwarded",  # RFC 7239
        b"true-client-ip",  # Akamai, Cloudflare Enterprise
        b"x-real-ip",  # nginx
        b"client-cert",  # RFC 9440
        b"client-cert-chain",  # RFC 9440
        b"x-client-verify",
        b"x-client-dn",
    }
)
OWNED_HEADER_PREFIXES = (
    b"cf-access-",  # Cf-Access-Jwt-Assertion, Cf-Access-Authenticated-User-Email, ...
    b"cf-client-cert-",  # Cf-Client-Cert-Sha256, Cf-Client-Cert-Der-Base64
    b"cf-connecting-ip",  # and Cf-Connecting-Ipv6
    b"x-forwarded-",  # X-Forwarded-For/-Proto/-Host/-Port/-Client-Cert (Envoy XFCC), ...
    b"ssl-client-",  # Ssl-Client-Verify, Ssl-Client-Cert (Apache-style)
    b"x-ssl-",  # X-SSL-Client-S-DN, X-SSL-Client-Cert, X-SSL-Cert (nginx/HAProxy-style)
    b"x-client-cert",  # X-Client-Cert, X-Client-Cert-Chain
)

# Dropped from every forwarded request: hop-by-hop (RFC 9110 §7.6.1), framing (set per
# forwarded body), Host (the origin's), and HTTP2-Settings, which belongs to an h2c upgrade.
_DROP = HOP_BY_HOP | {b"host", b"http2-settings"}

# Move a trio checkpoint at least this often while relaying bytes (see the module docstring).
_FAIR_BYTES = 256 * 1024
# An origin may send a few 1xx responses before its answer; more than this is an attack.
_MAX_INFORMATIONAL = 32
# The body of an answer that declines an upgrade is relayed whole; bound what we buffer.
_MAX_DECLINED_BODY = 1024 * 1024


def owned_header(name: bytes) -> bool:
    """True when ``name`` (lower case, ``_`` already turned into ``-``) is the enforcer's."""
    return name in OWNED_HEADERS or name.startswith(OWNED_HEADER_PREFIXES)


OriginConnector = Callable[[str, int], Awaitable[trio.abc.Stream]]
# An origin answered in-process: (method, target, headers, body) -> status, headers, body.
OriginApp = Callable[
    [bytes, bytes, list[tuple[bytes, bytes]], bytes],
    Awaitable[tuple[int, list[tuple[bytes, bytes]], bytes]],
]
RequestBody = bytes | AsyncIterator[bytes]


class OriginError(Exception):
    """The origin could not be reached or broke the protocol."""


@dataclasses.dataclass
class OriginResponse:
    """The origin's status line and headers, an iterator over its body, then its trailers.

    ``trailers`` is filled once ``body`` is exhausted (gRPC's status lives there); it stays
    empty for an origin that sent none.
    """

    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: AsyncIterator[bytes]
    trailers: list[tuple[bytes, bytes]] = dataclasses.field(default_factory=list)


_HEADER_SAFE = re.compile(r"[\x21-\x7e]{1,320}")


def forwarded_headers(
    client_headers: Sequence[tuple[bytes, bytes]],
    *,
    origin_host: str,
    client_ip: str | None,
    token: str | None,
    client_cert_der: bytes | None,
    client_cert_sha256: str | None,
    upgrade: bytes | None = None,
    underscores: bool = False,
    user_email: str | None = None,
) -> list[tuple[bytes, bytes]]:
    """Return the headers sent to the origin: the client's, cleaned, plus the access headers.

    ``underscores`` keeps client header names with ``_`` (never the enforcer's own ones);
    ``user_email`` is the admitted person's (``Cf-Access-Authenticated-User-Email``, I8).
    """
    kept: list[tuple[bytes, bytes]] = []
    original_host = b""
    nominated: list[bytes] = []
    for name, value in client_headers:
        k = name.lower()
        if b"_" in k:
            if not underscores:
                continue
            k = k.replace(b"_", b"-")
        if k in _DROP:
            if k == b"te" and value.strip().lower() == b"trailers":
                # The one TE value an HTTP/2 origin accepts, and gRPC servers require it.
                kept.append((b"te", b"trailers"))
                continue
            if k == b"host" and not original_host:
                original_host = value
            elif k == b"connection":
                nominated += value.split(b",")
            continue
        if k in OWNED_HEADERS or k.startswith(OWNED_HEADER_PREFIXES):
            continue
        kept.append((name, value))
    if nominated:
        # RFC 9110 §7.6.1: headers the client's Connection names are for this hop only.
        names = {n.strip().lower().replace(b"_", b"-") for n in nominated} - _DROP
        if names:
            kept = [(k, v) for k, v in kept if k.lower().replace(b"_", b"-") not in names]
    out = [(b"host", origin_host.encode()), *kept]
    out.append((b"x-forwarded-host", original_host))
    out.append((b"x-forwarded-proto", b"https"))
    if client_ip:
        # Only the peer: the enforcer is the edge, so a client's X-Forwarded-For proves nothing.
        out.append((b"x-forwarded-for", client_ip.encode()))
    out.append((b"forwarded", forwarded_value(client_ip, original_host)))
    if token:
        out.append((b"cf-access-jwt-assertion", token.encode()))
    if user_email and _HEADER_SAFE.fullmatch(user_email):
        # The provider's claim: only a value that cannot split or end the header is forwarded.
        out.append((USER_EMAIL_HEADER.encode(), user_email.encode()))
    if client_cert_der is not None and client_cert_sha256 is not None:
        out.append((b"cf-client-cert-der-base64", base64.b64encode(client_cert_der)))
        out.append((b"cf-client-cert-sha256", client_cert_sha256.encode()))
    if upgrade:
        # A WebSocket handshake is forwarded as one: the origin answers 101 and we tunnel.
        out += [(b"connection", b"upgrade"), (b"upgrade", upgrade)]
    return out


_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _forwarded_token(value: bytes) -> bytes:
    """A Forwarded parameter value: a token when it is one, else a quoted string."""
    if value and not value.translate(None, _TCHAR):  # only token characters (RFC 9110 §5.6.2)
        return value
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def forwarded_value(client_ip: str | None, host: bytes) -> bytes:
    """The RFC 7239 ``Forwarded`` value for one hop: ``for=``, ``host=``, ``proto=https``."""
    if not client_ip:
        node = b"unknown"
    elif ":" in client_ip:
        node = b'"[' + client_ip.encode() + b']"'  # IPv6 is bracketed and quoted (§6)
    else:
        node = client_ip.encode()
    return b"for=" + node + b";host=" + _forwarded_token(host) + b";proto=https"


# Dot segments (RFC 3986 §5.2.4), with ``%2e`` as a dot: origins decode it before routing.
_DOT_SEGMENTS = {b".": 1, b"%2e": 1, b"..": 2, b".%2e": 2, b"%2e.": 2, b"%2e%2e": 2}


def _dots(segment: bytes) -> int:
    """1 for a ``.`` segment, 2 for ``..``, 0 otherwise (``..;x`` counts: Java reads it so)."""
    return _DOT_SEGMENTS.get(segment.split(b";", 1)[0].lower(), 0)


def remove_dot_segments(path: bytes) -> bytes:
    """Remove ``.`` and ``..`` segments from an absolute path; ``..`` never climbs above ``/``."""
    out: list[bytes] = []
    ends_in_dir = False
    for segment in path.split(b"/")[1:]:
        kind = _dots(segment)
        if kind == 2 and out:
            out.pop()
        if kind:
            ends_in_dir = True
            continue
        out.append(segment)
        ends_in_dir = False
    if ends_in_dir and out:
        out.append(b"")  # "/a/b/.." is "/a/", a directory
    return b"/" + b"/".join(out)


def join_path(prefix: bytes, target: bytes) -> bytes:
    """The target sent to the origin: ``prefix`` (no trailing ``/``) joined with ``target``.

    The path is joined on a segment boundary (``-x`` under ``/public`` is ``/public/-x``,
    never ``/public-x``) and its dot segments removed, so the result always stays under
    ``prefix``: a ``..`` above the root stays at the root, as RFC 3986 resolves it, rather
    than failing the request (the origin sees what it would see for the same path at its
    root). The query string is kept as sent.
    """
    path, sep, query = target.partition(b"?")
    if not path.startswith(b"/"):
        path = b"/" + path
    # A dot segment starts right after a "/" with "." or "%2e"; most paths have none.
    if b"/." in path or (b"/%" in path and b"/%2e" in path.lower()):
        path = remove_dot_segments(path)
    return prefix + path + sep + query


@functools.lru_cache(maxsize=256)
def origin_prefix(origin: str) -> bytes:
    """The path prefix of an origin URL, without its trailing ``/``."""
    return urlsplit(origin).path.rstrip("/").encode()


class Fairness:
    """Reaches a trio checkpoint after every ``limit`` bytes moved without one."""

    __slots__ = ("_left", "_limit")

    def __init__(self, limit: int = _FAIR_BYTES) -> None:
        self._limit = limit
        self._left = limit

    async def moved(self, n: int) -> None:
        """Count ``n`` bytes; checkpoint when the budget is spent."""
        self._left -= n + 64  # each step costs something too: many tiny chunks add up
        if self._left <= 0:
            self._left = self._limit
            await trio.lowlevel.checkpoint()


@dataclasses.dataclass
class Tunnel:
    """An origin connection that switched protocols (101), and the bytes it sent after."""

    stream: trio.abc.Stream
    response: h11.InformationalResponse
    trailing: bytes


def _host_port(origin: str) -> tuple[str, int]:
    url = urlsplit(origin)
    return url.hostname or "127.0.0.1", url.port or ORIGIN_SCHEMES.get(url.scheme.lower(), 80)


async def _connect(
    origin: str, timeout: float, connect: OriginConnector, ca_pem: str | None = None
) -> tuple[trio.abc.Stream, bytes]:
    """Connect to an origin URL; return the stream and the URL's path prefix.

    An https:// origin gets TLS offering only http/1.1 in ALPN (this is the HTTP/1.1 path).
    """
    host, port = _host_port(origin)
    try:
        with trio.fail_after(timeout):
            stream = await connect(host, port)
            if origin_scheme(origin) in TLS_SCHEMES:
                tls = trio.SSLStream(
                    stream, client_tls_context(ca_pem, ("http/1.1",)), server_hostname=host
                )
                try:
                    await tls.do_handshake()
                except BaseException:
                    await trio.aclose_forcefully(tls)
                    raise
                stream = tls
    except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
        cause = exc.__cause__ or exc
        raise OriginError(f"cannot connect to origin {origin}: {cause}") from exc
    return stream, origin_prefix(origin)


async def open_upgrade(
    origin: str,
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    timeout: float,
    connect: OriginConnector = open_tcp,
) -> Tunnel | tuple[h11.Response, bytes]:
    """Forward an Upgrade request; return a :class:`Tunnel` on 101, else the response and body."""
    if origin_scheme(origin) != "http":
        # WebSocket over HTTP/2 (RFC 8441) is not spoken to origins.
        raise OriginError(f"a WebSocket upgrade needs an http:// origin, not {origin}")
    stream, prefix = await _connect(origin, timeout, connect)
    conn = h11.Connection(h11.CLIENT)
    try:
        with trio.fail_after(timeout):
            request = h11.Request(method=method, target=join_path(prefix, target), headers=headers)
            await send(conn, stream, request)
            await send(conn, stream, h11.EndOfMessage())
            event = await next_event(conn, stream)
            informational = 0
            while isinstance(event, h11.InformationalResponse) and event.status_code != 101:
                informational += 1
                if informational > _MAX_INFORMATIONAL:
                    raise OriginError(f"origin {origin} sent over {_MAX_INFORMATIONAL} 1xx")
                event = await next_event(conn, stream)
            if isinstance(event, h11.InformationalResponse):  # 101
                data, _closed = conn.trailing_data
                return Tunnel(stream, event, bytes(data))
            if not isinstance(event, h11.Response):
                raise OriginError(f"origin {origin} sent {type(event).__name__} to an upgrade")
            body = bytearray()
            while True:
                ev = await next_event(conn, stream)
                if not isinstance(ev, h11.Data):
                    break  # EndOfMessage, ConnectionClosed or PAUSED: the body is over
                body += ev.data
                if len(body) > _MAX_DECLINED_BODY:
                    raise OriginError(
                        f"origin {origin} declined an upgrade with over {_MAX_DECLINED_BODY} bytes"
                    )
                await trio.lowlevel.checkpoint()
        await stream.aclose()
        return event, bytes(body)
    except (OSError, trio.BrokenResourceError, trio.TooSlowError, h11.ProtocolError) as exc:
        await trio.aclose_forcefully(stream)
        raise OriginError(f"origin {origin} failed during an upgrade: {exc!r}") from exc
    except OriginError:
        await trio.aclose_forcefully(stream)
        raise


# WebSocket framing (RFC 6455 §5.2), only as far as a tunnel must know where frames end.
_WS_CLOSE = 0x88  # FIN + opcode 8


def websocket_close_frame(code: int, reason: bytes = b"") -> bytes:
    """An unmasked (server-to-client) WebSocket Close frame with ``code`` and ``reason``."""
    payload = struct.pack("!H", code) + reason[:123]
    return bytes((_WS_CLOSE, len(payload))) + payload


class WebSocketFrames:
    """Follows frame boundaries in one direction of a WebSocket stream.

    A tunnel that ends a session must send a Close frame between two frames, never inside
    one; this counts header and payload bytes, nothing more (no unmasking, no validation).
    """

    __slots__ = ("_header", "_remaining")

    def __init__(self) -> None:
        self._header = b""
        self._remaining = 0

    @property
    def at_boundary(self) -> bool:
        """True when every frame fed so far is complete."""
        return self._remaining == 0 and not self._header

    def feed(self, data: bytes | bytearray) -> None:
        """Account for ``data``, the next bytes of the stream."""
        i, n = 0, len(data)
        while i < n:
            if self._remaining:
                take = min(self._remaining, n - i)
                self._remaining -= take
                i += take
                continue
            have = len(self._header)
            header = self._header + data[i : i + 14 - have]
            size = _ws_header_size(header)
            if size is None or len(header) < size:
                self._header = header  # the rest of the header comes with the next bytes
                return
            i += size - have
            self._header = b""
            self._remaining = _ws_payload_length(header[:size])


def _ws_header_size(header: bytes) -> int | None:
    if len(header) < 2:
        return None
    length = header[1] & 0x7F
    extended = 2 if length == 126 else 8 if length == 127 else 0
    return 2 + extended + (4 if header[1] & 0x80 else 0)


def _ws_payload_length(header: bytes) -> int:
    length = header[1] & 0x7F
    if length == 126:
        return int(struct.unpack("!H", header[2:4])[0])
    if length == 127:
        return int(struct.unpack("!Q", header[2:10])[0])
    return length


@dataclasses.dataclass
class _OriginConnection:
    """A kept-alive HTTP/1.1 connection to one origin."""

    stream: trio.abc.Stream
    h11: h11.Connection
    prefix: bytes
    ca_pem: str | None = None


def _has_stray_bytes(stream: trio.abc.Stream) -> bool:
    """True when an idle origin connection was closed or sent bytes nobody asked for."""
    sock = getattr(stream, "socket", None)
    if not isinstance(sock, socket.socket):
        return False  # not ours (an in-memory simulation): h11 will tell at the next read
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False  # open, and silent as an idle connection must be
    except OSError:
        return True
    return True  # b"" (the origin closed it) or a byte nobody asked for


class OriginPool:
    """Idle kept-alive connections to origins, reused by later requests.

    Opening a connection per forwarded request was most of the cost of forwarding; HTTP/1.1
    keep-alive to the origin is what reverse proxies do. A connection goes back to the pool
    only when both sides finished their messages cleanly and no byte is left over; before
    reuse it is checked for bytes that arrived since (one non-blocking peek).
    """

    def __init__(
        self, connect: OriginConnector = open_tcp, max_idle: int = 64, max_h2_connections: int = 8
    ) -> None:
        self.connect = connect
        # Set by a simulation: requests go to this callable instead of over HTTP (the way
        # httpx mounts an ASGI app), which spares the simulated origin's protocol work.
        self.app: OriginApp | None = None
        self.max_idle = max_idle
        self._idle: dict[tuple[str, str | None], list[_OriginConnection]] = {}
        # HTTP/2 origins: shared connections whose tasks live in ``running()``'s nursery.
        self.h2 = H2Origins(lambda: self.connect, max_h2_connections)
        # https:// origins that selected http/1.1 in ALPN: later requests skip the h2 attempt.
        self.http1_origins: set[tuple[str, str | None]] = set()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[OriginPool]:
        """Run the pool's HTTP/2 connections (their reader tasks) until exit; then close all.

        Only h2c://, grpc://, https:// and grpcs:// origins need it; http:// works without.
        """
        try:
            async with self.h2.running():
                yield self
        finally:
            with trio.CancelScope(shield=True):
                await self.aclose()

    async def acquire(
        self,
        origin: str,
        timeout: float,
        ca_pem: str | None = None,
        fresh: trio.abc.Stream | None = None,
    ) -> tuple[_OriginConnection, bool]:
        """An idle connection to ``origin`` (reused: True), ``fresh`` or a new one."""
        if fresh is not None:
            prefix = origin_prefix(origin)
            return _OriginConnection(fresh, h11.Connection(h11.CLIENT), prefix, ca_pem), False
        idle = self._idle.get((origin, ca_pem))
        while idle:
            conn = idle.pop()
            if not _has_stray_bytes(conn.stream):
                return conn, True
            await trio.aclose_forcefully(conn.stream)
        stream, prefix = await _connect(origin, timeout, self.connect, ca_pem)
        return _OriginConnection(stream, h11.Connection(h11.CLIENT), prefix, ca_pem), False

    async def release(self, origin: str, conn: _OriginConnection) -> None:
        """Keep a connection for reuse if it can carry another request, else close it."""
        idle = self._idle.setdefault((origin, conn.ca_pem), [])
        leftover, closed = conn.h11.trailing_data
        if (
            conn.h11.our_state is h11.DONE
            and conn.h11.their_state is h11.DONE
            and not leftover
            and not closed
            and len(idle) < self.max_idle
        ):
            conn.h11.start_next_cycle()
            idle.append(conn)
            return
        await trio.aclose_forcefully(conn.stream)

    async def aclose(self) -> None:
        """Close every idle connection, and every HTTP/2 connection."""
        self.h2.close_all()
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                await trio.aclose_forcefully(conn.stream)


async def _one(data: bytes) -> AsyncIterator[bytes]:
    if data:
        yield data


_ORIGIN_FAILURES = (OSError, trio.BrokenResourceError, trio.TooSlowError, h11.ProtocolError)


class _ClientBodyFailed(Exception):
    """Reading the client's body failed; ``error`` goes to the caller unchanged."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


async def _pull(body: AsyncIterator[bytes]) -> bytes | None:
    """The next non-empty chunk of a client's body, or None at its end.

    No timer here: the iterator times the client itself (``http.body_chunks`` answers a slow
    body with 408), and a second timer of the same length would race it and turn the client's
    slowness into an error of ours.
    """
    try:
        while True:
            chunk = await anext(body)
            if chunk:
                return bytes(chunk)
            await trio.lowlevel.checkpoint()  # an iterator of empty chunks must not spin
    except StopAsyncIteration:
        return None
    except Exception as exc:  # the caller answers it (400, 408, 413): not the origin's fault
        raise _ClientBodyFailed(exc) from exc


def request_content_length(headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    """The Content-Length of a message h11 parsed (it checked the value), or None."""
    for k, v in headers:
        if k.lower() == b"content-length":
            return int(v)
    return None


@asynccontextmanager
async def origin_request(
    origin: str,
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    body: RequestBody,
    timeout: float,
    pool: OriginPool,
    *,
    content_length: int | None = None,
    origin_ca: str | None = None,
) -> AsyncIterator[OriginResponse]:
    """Send one request to ``origin`` and yield its streamed response.

    The origin URL's scheme says how: http:// is HTTP/1.1; h2c:// and grpc:// are HTTP/2 with
    prior knowledge; https:// is TLS speaking what the origin selects in ALPN (h2 or
    http/1.1), grpcs:// TLS with h2 only. ``origin_ca`` (PEM) verifies a TLS origin instead of
    the system trust store. ``body`` is the whole body, or an iterator streamed to the origin
    with ``content_length`` (the client's) when known, else chunked (HTTP/1.1) or DATA frames
    (HTTP/2). An exception raised by the iterator (the client's body failed) propagates
    unchanged after the origin stream or connection is closed.
    """
    rest: AsyncIterator[bytes] | None = None
    if isinstance(body, bytes | bytearray | memoryview):
        first = bytes(body)
    else:
        try:
            pulled = await _pull(body)
        except _ClientBodyFailed as failed:
            raise failed.error from None
        first, rest = pulled or b"", body if pulled is not None else None
    if rest is None:
        framing = (b"content-length", b"%d" % len(first))
    elif content_length is not None:
        framing = (b"content-length", b"%d" % content_length)
    else:
        framing = (b"transfer-encoding", b"chunked")
    hdrs = [*headers, framing]
    if pool.app is not None:
        data = first
        if rest is not None:
            parts = [first]
            try:
                while (chunk := await _pull(rest)) is not None:
                    parts.append(chunk)
            except _ClientBodyFailed as failed:
                raise failed.error from None
            data = b"".join(parts)
            hdrs[-1] = (b"content-length", b"%d" % len(data))
        try:
            status, out, answer = await pool.app(
                method, join_path(origin_prefix(origin), target), hdrs, data
            )
        except OSError as exc:
            raise OriginError(f"origin {origin} failed: {exc!r}") from exc
        yield OriginResponse(
            status, b"", [*out, (b"content-length", b"%d" % len(answer))], _one(answer)
        )
        return
    scheme = origin_scheme(origin)
    fresh: trio.abc.Stream | None = None
    if scheme != "http" and (scheme != "https" or (origin, origin_ca) not in pool.http1_origins):
        host, port = _host_port(origin)
        h2_target = H2Target(origin, host, port, scheme in TLS_SCHEMES, origin_ca)
        length = len(first) if rest is None and first else content_length
        h2_headers = h2_request_headers(
            method,
            join_path(origin_prefix(origin), target),
            b"https" if h2_target.tls else b"http",
            f"{host}:{port}".encode(),
            [*headers, *([(b"content-length", b"%d" % length)] if length is not None else [])],
        )
        for attempt in (1, 2):
            try:
                h2_conn, h2_stream = await pool.h2.open_stream(
                    h2_target,
                    h2_headers,
                    rest is None and not first,
                    timeout,
                    http1_fallback=scheme == "https",
                )
            except NegotiatedHTTP1 as negotiated:
                pool.http1_origins.add((origin, origin_ca))
                fresh = negotiated.stream
                break
            except (H2Error, trio.TooSlowError) as exc:
                raise _h2_failure(origin, exc, timeout) from exc
            try:
                async with _h2_exchange(
                    h2_conn, h2_stream, origin, first, rest, timeout
                ) as response:
                    yield response
                return
            except _Unprocessed as unprocessed:
                # The origin refused the stream (REFUSED_STREAM, or GOAWAY below its id):
                # it did nothing with it, so a whole body can be sent again, once.
                if attempt == 2 or rest is not None:
                    raise OriginError(str(unprocessed)) from None
    streamed = False  # a chunk left the iterator: the request can no longer be replayed
    fair = Fairness()
    for attempt in (1, 2):
        conn, reused = await pool.acquire(origin, timeout, origin_ca, fresh)
        fresh = None
        stream = conn.stream
        try:
            # Sending and the wait for the response head each have ``timeout``; a whole body
            # (the hot path's GET) leaves with its head and end in one write.
            with trio.fail_after(timeout) as sending:
                request = h11.Request(
                    method=method, target=join_path(conn.prefix, target), headers=hdrs
                )
                wire = conn.h11.send(request) or b""
                if first:
                    wire += conn.h11.send(h11.Data(data=first)) or b""
                if rest is None:
                    wire += conn.h11.send(h11.EndOfMessage()) or b""
                await stream.send_all(wire)
                if rest is None:
                    # Nothing more to send: the same scope, restarted, times the answer.
                    sending.deadline = trio.current_time() + timeout
                    event = await next_event(conn.h11, stream)
            while rest is not None and (chunk := await _pull(rest)) is not None:
                streamed = True
                with trio.fail_after(timeout):
                    await send(conn.h11, stream, h11.Data(data=chunk))
                await fair.moved(len(chunk))
            with trio.fail_after(timeout):
                if rest is not None:
                    await send(conn.h11, stream, h11.EndOfMessage())
                    event = await next_event(conn.h11, stream)
                informational = 0
                while isinstance(event, h11.InformationalResponse):
                    informational += 1
                    if informational > _MAX_INFORMATIONAL:
                        raise OriginError(f"origin {origin} sent over {_MAX_INFORMATIONAL} 1xx")
                    event = await next_event(conn.h11, stream)
        except _ClientBodyFailed as failed:
            await trio.aclose_forcefully(stream)
            raise failed.error from None
        except OriginError:
            await trio.aclose_forcefully(stream)
            raise
        except _ORIGIN_FAILURES as exc:
            await trio.aclose_forcefully(stream)
            if reused and attempt == 1 and not streamed:
                continue  # the origin closed an idle kept-alive connection: retry on a new one
            raise OriginError(f"origin {origin} failed: {exc!r}") from exc
        except BaseException:
            # Cancelled while the origin has the request (a client reset its HTTP/2 stream, or
            # left): close the connection now rather than when the collector finds it.
            await trio.aclose_forcefully(stream)
            raise
        if isinstance(event, h11.ConnectionClosed) and reused and attempt == 1 and not streamed:
            await trio.aclose_forcefully(stream)
            continue
        break
    if not isinstance(event, h11.Response):
        await trio.aclose_forcefully(stream)
        raise OriginError(f"origin {origin} sent {type(event).__name__} instead of a response")

    async def chunks() -> AsyncIterator[bytes]:
        while True:
            try:
                # What h11 has buffered (a small body and its end came in one read) needs no
                # timer; each wait for the origin has ``timeout``.
                ev = conn.h11.next_event()
                if ev is h11.NEED_DATA:
                    with trio.fail_after(timeout):
                        ev = await next_event(conn.h11, stream)
            except _ORIGIN_FAILURES as exc:
                raise OriginError(f"origin {origin} failed mid-body: {exc!r}") from exc
            if not isinstance(ev, h11.Data):
                # EndOfMessage or ConnectionClosed; or PAUSED after a 2xx to CONNECT (or a
                # 101), where h11 stops parsing and would answer PAUSED forever.
                if isinstance(ev, h11.EndOfMessage) and ev.headers:
                    response.trailers = list(ev.headers)  # a chunked body's trailer section
                return
            yield bytes(ev.data)
            await fair.moved(len(ev.data))

    response = OriginResponse(event.status_code, bytes(event.reason), list(event.headers), chunks())
    try:
        yield response
    finally:
        with trio.CancelScope(shield=True):
            await pool.release(origin, conn)


class _Unprocessed(Exception):
    """The origin refused an h2 stream without processing it: the request may be retried."""


def _h2_failure(origin: str, exc: Exception, timeout: float) -> OriginError:
    """The OriginError for an h2 failure or a timer (which says nothing itself) that ran out."""
    return OriginError(str(exc) or f"origin {origin} timed out after {timeout:g} s")


async def _no_body() -> AsyncIterator[bytes]:
    return
    yield b""  # an async generator that yields nothing


@asynccontextmanager
async def _h2_exchange(
    conn: H2Origin,
    stream: H2Stream,
    origin: str,
    first: bytes,
    rest: AsyncIterator[bytes] | None,
    timeout: float,
) -> AsyncIterator[OriginResponse]:
    """Stream the body on an open h2 stream while yielding the streamed response.

    Both directions run at once (a gRPC bidirectional call answers each message before the
    next is sent): the body goes from a task in this exchange's own nursery, which ends with
    it. Leaving (normally, by an exception or by cancellation) resets the stream with CANCEL
    if it is still open: the origin stops working on a request nobody waits for, and only
    this stream ends (the connection is shared).
    """
    client_failed: list[Exception] = []

    async def send_body() -> None:
        # Never raises: a failure ends the stream, and the response side reports it.
        try:
            going = not stream.sent_all
            if going and first:
                with trio.fail_after(timeout):
                    going = await conn.send_data(stream, first)
            fair = Fairness()
            while going and rest is not None and (chunk := await _pull(rest)) is not None:
                with trio.fail_after(timeout):
                    going = await conn.send_data(stream, chunk)
                await fair.moved(len(chunk))
            if going:
                conn.end(stream)
        except _ClientBodyFailed as failed:
            client_failed.append(failed.error)
            conn.abandon(stream, f"the client's body failed: {failed.error}")
        except trio.TooSlowError:
            conn.abandon(stream, f"origin {origin} took no request body for {timeout:g} s")
        except H2Error as exc:
            conn.abandon(stream, str(exc))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_body)
            try:
                status = await wait_head(conn, stream, timeout)
            except H2Error as exc:
                if client_failed:
                    raise client_failed[0] from None  # the caller answers it (413, 408, 400)
                if stream.unprocessed:
                    raise _Unprocessed(str(exc)) from exc
                raise _h2_failure(origin, exc, timeout) from exc
            response = OriginResponse(status, b"", list(stream.headers), _no_body())

            def keep(trailers: list[tuple[bytes, bytes]]) -> None:
                response.trailers = list(trailers)

            response.body = response_chunks(conn, stream, timeout, keep, OriginError)
            yield response
            nursery.cancel_scope.cancel()  # a body still going has nobody left to answer it
    except BaseExceptionGroup as group:
        # The nursery wraps what the caller or this exchange raised; give it back as it was.
        raise _single(group) from None
    finally:
        conn.finish(stream)


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception a nursery wrapped, or the group when there are several."""
    if len(group.exceptions) == 1 and not isinstance(group.exceptions[0], BaseExceptionGroup):
        return group.exceptions[0]
    return group
