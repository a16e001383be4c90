"""A built-in echo origin: answers every request with JSON describing what it received.

It also accepts WebSocket upgrades (through trio-websocket) and echoes every message back, so
device telemetry channels can be tested end to end through the enforcer.
"""

from __future__ import annotations

import json

import h11
import trio
import trio_websocket

from enforcer.http import next_event, read_body, respond

_HEAD_LIMIT = 64 * 1024


class _Prefixed(trio.abc.Stream):
    """A stream that first returns bytes already read, then reads on from the real one."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            n = len(self._prefix) if max_bytes is None else max_bytes
            out, self._prefix = self._prefix[:n], self._prefix[n:]
            await trio.lowlevel.checkpoint()
            return out
        return bytes(await self._stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()


async def _websocket_echo(stream: trio.abc.Stream) -> None:
    async with trio.open_nursery() as nursery:
        request = await trio_websocket.wrap_server_stream(nursery, stream)
        ws = await request.accept()
        try:
            while True:
                message = await ws.get_message()
                await ws.send_message(message)
        except trio_websocket.ConnectionClosed:
            pass
        nursery.cancel_scope.cancel()


def _describe(
    method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
) -> bytes:
    payload = {
        "origin": "echo",
        "method": method.decode(),
        "path": target.decode("latin-1"),
        "headers": {k.decode().lower(): v.decode("latin-1") for k, v in headers},
        "body_bytes": len(body),
    }
    return (json.dumps(payload, indent=2) + "\n").encode()


async def echo_app(
    method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The echo origin answered in-process (``OriginPool.app``): the same JSON, no HTTP."""
    await trio.lowlevel.checkpoint()
    return 200, [(b"content-type", b"application/json")], _describe(method, target, headers, body)


async def _echo(stream: trio.SocketStream) -> None:
    try:
        head = b""
        while b"\r\n\r\n" not in head and len(head) < _HEAD_LIMIT:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            head += chunk
        if b"\r\nupgrade: websocket" in head.lower():
            await _websocket_echo(_Prefixed(stream, head))
            return
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(head)
        while True:
            event = await next_event(conn, stream)
            if not isinstance(event, h11.Request):
                return
            body = await read_body(conn, stream, 8 * 1024 * 1024)
            data = _describe(event.method, event.target, list(event.headers), body)
            await respond(conn, stream, 200, [("content-type", "application/json")], data)
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    except (h11.ProtocolError, trio.BrokenResourceError, trio_websocket.HandshakeError, OSError):
        return
    finally:
        await stream.aclose()


async def serve_echo_origin(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the echo origin until cancelled; report the bound port through ``task_status``."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await serve_echo_origin_on(listeners)


async def serve_echo_origin_on(listeners: list[trio.SocketListener]) -> None:
    """Serve the echo origin on already-bound listeners until cancelled."""
    await trio.serve_listeners(_echo, listeners)
