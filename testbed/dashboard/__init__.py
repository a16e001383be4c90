"""``--dashboard``: a run's live page, served by the run itself, updated over a WebSocket.

Theory of operation. One port serves both the page and its WebSocket. Each connection's
request head is read with h11 (bounded: :data:`MAX_HEAD` bytes, :data:`HEAD_TIMEOUT` seconds);
a ``GET /ws`` asking to upgrade is handed, with the bytes already read put back in front of
the stream, to trio-websocket (:func:`trio_websocket.wrap_server_stream`), which does the
handshake and the framing. Anything else is a static file from ``testbed/dashboard/`` (the
page, its script and uPlot, vendored: the page works offline), or ``/state.json``.

A page that connects (or reconnects: a browser that lost its connection tries again every
two seconds) gets a ``snapshot`` (the whole state and the series so far), then an ``update``
a second with the state and the new point; the run's end sends ``final`` and closes with
code 1000, after which the page stops reconnecting. A client that does not keep up is not
waited for: its messages queue up to :data:`CLIENT_QUEUE` deep, and beyond that it is
disconnected (it reconnects and gets a fresh snapshot). At most :data:`MAX_CLIENTS` pages are
connected at once; more are refused with 503.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from typing import Any

import h11
import trio
import trio_websocket

from testbed.live import LiveRun

MAX_CLIENTS = 16
CLIENT_QUEUE = 8  # updates a slow page may lag behind before it is dropped
MAX_HEAD = 8192  # bytes of request head read before a connection is turned away
HEAD_TIMEOUT = 10.0
MAX_CONNECTIONS = 64  # open TCP connections (pages, page loads, stray clients) at once

_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
    "/uPlot.iife.min.js": ("uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    "/uPlot.min.css": ("uPlot.min.css", "text/css; charset=utf-8"),
}


def asset(name: str) -> bytes:
    """One of the page's files, as shipped in the package."""
    return resources.files("testbed.dashboard").joinpath(name).read_bytes()


def dumps(message: Any) -> str:
    """JSON for the page: NaN and infinities (no data) become null."""
    return json.dumps(_finite(message), separators=(",", ":"))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class _Prefixed(trio.abc.Stream):
    """A stream whose first bytes were already read (the request head): they come first."""

    def __init__(self, head: bytes, stream: trio.abc.Stream) -> None:
        self.head, self.stream = head, stream

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self.head:
            n = len(self.head) if max_bytes is None else max_bytes
            out, self.head = self.head[:n], self.head[n:]
            await trio.lowlevel.checkpoint()
            return out
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.stream.aclose()


class Dashboard:
    """Serves one run's page and pushes its figures to every connected page."""

    def __init__(self, live: LiveRun) -> None:
        self.live = live
        self.clients: dict[int, trio.MemorySendChannel[str]] = {}
        self._next = 0
        self._connections = trio.CapacityLimiter(MAX_CONNECTIONS)
        self.closing = False  # the run is over: pages are told so, and stop reconnecting
        self.pages = 0  # WebSockets open (the run's end waits for them to close, briefly)

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` (0: any free port); report the port; serve until cancelled."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        task_status.started(listeners[0].socket.getsockname()[1])
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept, listener, nursery)

    async def _accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                stream = await listener.accept()
                try:
                    # Taken here, before the task starts: the cap holds however fast they come.
                    self._connections.acquire_on_behalf_of_nowait(stream)
                except trio.WouldBlock:
                    await stream.aclose()  # over the cap: no work for this one
                    continue
                nursery.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.SocketStream) -> None:
        try:
            async with stream:
                await self._handle(stream)
        finally:
            self._connections.release_on_behalf_of(stream)

    async def _handle(self, stream: trio.SocketStream) -> None:
        """Answer one connection: the page's files, its state, or its WebSocket."""
        try:
            head, request, conn = await self._read_head(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            return
        if request is None:
            await _respond(conn, stream, 400, "text/plain", b"bad request\n")
            return
        path = request.target.decode("ascii", "replace").split("?", 1)[0]
        upgrade = any(
            name == b"upgrade" and value.lower() == b"websocket" for name, value in request.headers
        )
        if path == "/ws" and upgrade:
            await self._websocket(head, stream)
        elif request.method != b"GET":
            await _respond(conn, stream, 405, "text/plain", b"GET only\n")
        elif path == "/state.json":
            body = dumps(self.live.snapshot()).encode()
            await _respond(conn, stream, 200, "application/json", body)
        elif path in _FILES:
            name, kind = _FILES[path]
            await _respond(conn, stream, 200, kind, asset(name))
        else:
            await _respond(conn, stream, 404, "text/plain", b"not found\n")

    async def _read_head(
        self, stream: trio.SocketStream
    ) -> tuple[bytes, h11.Request | None, h11.Connection]:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        head = b""
        with trio.fail_after(HEAD_TIMEOUT):
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError:
                    return head, None, conn
                if isinstance(event, h11.Request):
                    return head, event, conn
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(4096)
                    if not data:
                        return head, None, conn
                    head += data
                    conn.receive_data(data)
                else:
                    return head, None, conn

    async def _websocket(self, head: bytes, stream: trio.SocketStream) -> None:
        async with trio.open_nursery() as nursery:
            request = await trio_websocket.wrap_server_stream(
                nursery, _Prefixed(head, stream), max_message_size=4096
            )
            if len(self.clients) >= MAX_CLIENTS:
                await request.reject(503, body=b"too many dashboard pages open\n")
                nursery.cancel_scope.cancel()
                return
            ws = await request.accept()
            send, receive = trio.open_memory_channel[str](CLIENT_QUEUE)
            key = self._next
            self._next += 1
            # The snapshot first, then the updates queued after it: none is missed.
            self.clients[key] = send
            self.pages += 1
            try:
                await ws.send_message(dumps(self.live.snapshot()))
                nursery.start_soon(_drain, ws)
                async with receive:
                    async for message in receive:
                        await ws.send_message(message)
                # The run's end closes every page's queue; a page too far behind has its own
                # closed early, and reconnects.
                await ws.aclose(1000, "run finished" if self.closing else "too far behind")
            except trio_websocket.ConnectionClosed:
                pass
            finally:
                self.clients.pop(key, None)
                self.pages -= 1
                nursery.cancel_scope.cancel()

    async def broadcast(self, message: Any) -> None:
        """Queue a message for every page; drop pages too far behind (they reconnect)."""
        text = dumps(message)
        for key, send in list(self.clients.items()):
            try:
                send.send_nowait(text)
            except trio.WouldBlock:
                self.clients.pop(key, None)
                await send.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.clients.pop(key, None)
        await trio.lowlevel.checkpoint()

    async def close_all(self) -> None:
        """End every page's stream after what was queued: each socket closes with 1000."""
        self.closing = True
        for key, send in list(self.clients.items()):
            self.clients.pop(key, None)
            await send.aclose()
        # Let the pages' tasks send what they hold and close (bounded: a stuck page is left).
        with trio.move_on_after(5):
            while self.pages:
                await trio.sleep(0.05)


async def _drain(ws: trio_websocket.WebSocketConnection) -> None:
    """Read (and ignore) what the page sends, so that pings and a close are answered."""
    try:
        while True:
            await ws.get_message()
    except trio_websocket.ConnectionClosed:
        pass


async def _respond(
    conn: h11.Connection, stream: trio.abc.Stream, status: int, kind: str, body: bytes
) -> None:
    if conn.our_state is not h11.SEND_RESPONSE:
        # A head h11 could not read: answer on a fresh connection state.
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        conn.next_event()
    headers = [
        ("content-type", kind),
        ("content-length", str(len(body))),
        ("cache-control", "no-store"),
        ("connection", "close"),
    ]
    try:
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
        await stream.send_all(conn.send(h11.Data(data=body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
