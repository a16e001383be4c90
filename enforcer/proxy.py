"""Forwarding an admitted request to its origin over plain HTTP/1.1, streaming the response."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import h11
import trio

from enforcer.http import HOP_BY_HOP, next_event, send
from enforcer.sockets import open_tcp

# Headers only the enforcer may set: a client sending them must not reach the origin with them.
TRUSTED_HEADERS = frozenset(
    {
        b"cf-access-jwt-assertion",
        b"cf-client-cert-der-base64",
        b"cf-client-cert-sha256",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-proto",
    }
)


OriginConnector = Callable[[str, int], Awaitable[trio.abc.Stream]]
# An origin answered in-process: (method, target, headers, body) -> status, headers, body.
OriginApp = Callable[
    [bytes, bytes, list[tuple[bytes, bytes]], bytes],
    Awaitable[tuple[int, list[tuple[bytes, bytes]], bytes]],
]


class OriginError(Exception):
    """The origin could not be reached or broke the protocol."""


@dataclasses.dataclass
class OriginResponse:
    """The origin's status line and headers, and an iterator over its body."""

    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: AsyncIterator[bytes]


def forwarded_headers(
    client_headers: Sequence[tuple[bytes, bytes]],
    *,
    origin_host: str,
    client_ip: str | None,
    token: str | None,
    client_cert_der: bytes | None,
    client_cert_sha256: str | None,
    upgrade: bytes | None = None,
) -> list[tuple[bytes, bytes]]:
    """Return the headers sent to the origin: the client's, cleaned, plus the access headers."""
    out = [
        (k, v)
        for k, v in client_headers
        if k.lower() not in HOP_BY_HOP and k.lower() not in TRUSTED_HEADERS and k.lower() != b"host"
    ]
    original_host = next((v for k, v in client_headers if k.lower() == b"host"), b"")
    out.insert(0, (b"host", origin_host.encode()))
    out.append((b"x-forwarded-host", original_host))
    out.append((b"x-forwarded-proto", b"https"))
    if client_ip:
        out.append((b"x-forwarded-for", client_ip.encode()))
    if token:
        out.append((b"cf-access-jwt-assertion", token.encode()))
    if client_cert_der is not None and client_cert_sha256 is not None:
        out.append((b"cf-client-cert-der-base64", base64.b64encode(client_cert_der)))
        out.append((b"cf-client-cert-sha256", client_cert_sha256.encode()))
    if upgrade:
        # A WebSocket handshake is forwarded as one: the origin answers 101 and we tunnel.
        out += [(b"connection", b"upgrade"), (b"upgrade", upgrade)]
    return out


@dataclasses.dataclass
class Tunnel:
    """An origin connection that switched protocols (101), and the bytes it sent after."""

    stream: trio.abc.Stream
    response: h11.InformationalResponse
    trailing: bytes


async def _connect(
    origin: str, timeout: float, connect: OriginConnector
) -> tuple[trio.abc.Stream, bytes]:
    """Connect to an origin URL; return the stream and the URL's path prefix."""
    url = urlsplit(origin)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    try:
        with trio.fail_after(timeout):
            stream = await connect(host, port)
    except (OSError, trio.TooSlowError) as exc:
        raise OriginError(f"cannot connect to origin {origin}: {exc}") from exc
    return stream, url.path.rstrip("/").encode()


async def open_upgrade(
    origin: str,
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    timeout: float,
    connect: OriginConnector = open_tcp,
) -> Tunnel | tuple[h11.Response, bytes]:
    """Forward an Upgrade request; return a :class:`Tunnel` on 101, else the response and body."""
    stream, prefix = await _connect(origin, timeout, connect)
    conn = h11.Connection(h11.CLIENT)
    try:
        with trio.fail_after(timeout):
            await send(
                conn, stream, h11.Request(method=method, target=prefix + target, headers=headers)
            )
            await send(conn, stream, h11.EndOfMessage())
            event = await next_event(conn, stream)
            if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
                data, _closed = conn.trailing_data
                return Tunnel(stream, event, bytes(data))
            if not isinstance(event, h11.Response):
                raise OriginError(f"origin {origin} sent {type(event).__name__} to an upgrade")
            body = bytearray()
            while True:
                ev = await next_event(conn, stream)
                if isinstance(ev, h11.Data):
                    body += ev.data
                elif isinstance(ev, h11.EndOfMessage | h11.ConnectionClosed):
                    break
        await stream.aclose()
        return event, bytes(body)
    except (OSError, trio.BrokenResourceError, trio.TooSlowError, h11.ProtocolError) as exc:
        await stream.aclose()
        raise OriginError(f"origin {origin} failed during an upgrade: {exc!r}") from exc


@dataclasses.dataclass
class _OriginConnection:
    """A kept-alive HTTP/1.1 connection to one origin."""

    stream: trio.abc.Stream
    h11: h11.Connection
    prefix: bytes


class OriginPool:
    """Idle kept-alive connections to origins, reused by later requests.

    Opening a connection per forwarded request was most of the cost of forwarding; HTTP/1.1
    keep-alive to the origin is what reverse proxies do. A connection goes back to the pool
    only when both sides finished their messages cleanly.
    """

    def __init__(self, connect: OriginConnector = open_tcp, max_idle: int = 64) -> None:
        self.connect = connect
        # Set by a simulation: requests go to this callable instead of over HTTP (the way
        # httpx mounts an ASGI app), which spares the simulated origin's protocol work.
        self.app: OriginApp | None = None
        self.max_idle = max_idle
        self._idle: dict[str, list[_OriginConnection]] = {}

    async def acquire(self, origin: str, timeout: float) -> tuple[_OriginConnection, bool]:
        """An idle connection to ``origin`` (reused: True) or a new one."""
        idle = self._idle.get(origin)
        if idle:
            return idle.pop(), True
        stream, prefix = await _connect(origin, timeout, self.connect)
        return _OriginConnection(stream, h11.Connection(h11.CLIENT), prefix), False

    async def release(self, origin: str, conn: _OriginConnection) -> None:
        """Keep a connection for reuse if it can carry another request, else close it."""
        idle = self._idle.setdefault(origin, [])
        if (
            conn.h11.our_state is h11.DONE
            and conn.h11.their_state is h11.DONE
            and len(idle) < self.max_idle
        ):
            conn.h11.start_next_cycle()
            idle.append(conn)
            return
        await trio.aclose_forcefully(conn.stream)

    async def aclose(self) -> None:
        """Close every idle connection."""
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                await trio.aclose_forcefully(conn.stream)


async def _one(data: bytes) -> AsyncIterator[bytes]:
    if data:
        yield data


_ORIGIN_FAILURES = (OSError, trio.BrokenResourceError, trio.TooSlowError, h11.ProtocolError)


@asynccontextmanager
async def origin_request(
    origin: str,
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    timeout: float,
    pool: OriginPool,
) -> AsyncIterator[OriginResponse]:
    """Send one request to ``origin`` (an http:// URL) and yield its streamed response."""
    hdrs = [*headers, (b"content-length", str(len(body)).encode())]
    if pool.app is not None:
        try:
            status, out, data = await pool.app(method, target, hdrs, body)
        except OSError as exc:
            raise OriginError(f"origin {origin} failed: {exc!r}") from exc
        yield OriginResponse(
            status, b"", [*out, (b"content-length", b"%d" % len(data))], _one(data)
        )
        return
    for attempt in (1, 2):
        conn, reused = await pool.acquire(origin, timeout)
        stream = conn.stream
        try:
            with trio.fail_after(timeout):
                request = h11.Request(method=method, target=conn.prefix + target, headers=hdrs)
                await send(conn.h11, stream, request)
                if body:
                    await send(conn.h11, stream, h11.Data(data=body))
                await send(conn.h11, stream, h11.EndOfMessage())
                event = await next_event(conn.h11, stream)
                while isinstance(event, h11.InformationalResponse):
                    event = await next_event(conn.h11, stream)
        except _ORIGIN_FAILURES as exc:
            await trio.aclose_forcefully(stream)
            if reused and attempt == 1:
                continue  # the origin closed an idle kept-alive connection: retry on a new one
            raise OriginError(f"origin {origin} failed: {exc!r}") from exc
        if isinstance(event, h11.ConnectionClosed) and reused and attempt == 1:
            await trio.aclose_forcefully(stream)
            continue
        break
    if not isinstance(event, h11.Response):
        await trio.aclose_forcefully(stream)
        raise OriginError(f"origin {origin} sent {type(event).__name__} instead of a response")

    async def chunks() -> AsyncIterator[bytes]:
        while True:
            try:
                with trio.fail_after(timeout):
                    ev = await next_event(conn.h11, stream)
            except _ORIGIN_FAILURES as exc:
                raise OriginError(f"origin {origin} failed mid-body: {exc!r}") from exc
            if isinstance(ev, h11.Data):
                yield bytes(ev.data)
            elif isinstance(ev, h11.EndOfMessage | h11.ConnectionClosed):
                return

    try:
        yield OriginResponse(event.status_code, bytes(event.reason), list(event.headers), chunks())
    finally:
        with trio.CancelScope(shield=True):
            await pool.release(origin, conn)
