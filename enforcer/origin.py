"""A built-in echo origin: answers every request with JSON describing what it received."""

from __future__ import annotations

import json

import h11
import trio

from enforcer.http import next_event, read_body, respond


async def _echo(stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = await next_event(conn, stream)
            if not isinstance(event, h11.Request):
                return
            body = await read_body(conn, stream, 8 * 1024 * 1024)
            payload = {
                "origin": "echo",
                "method": event.method.decode(),
                "path": event.target.decode("latin-1"),
                "headers": {k.decode(): v.decode("latin-1") for k, v in event.headers},
                "body_bytes": len(body),
            }
            data = (json.dumps(payload, indent=2) + "\n").encode()
            await respond(conn, stream, 200, [("content-type", "application/json")], data)
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    except (h11.ProtocolError, trio.BrokenResourceError, OSError):
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
