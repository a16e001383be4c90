"""A one-answer-per-connection https server for tests that play a hostile or counted peer."""

from __future__ import annotations

import ssl
from typing import Any

import h11
import trio


class JsonStub:
    """Serves ``answer(target, body)`` as a 200 JSON response to every request; subclass it."""

    def answer(self, target: bytes, body: bytes) -> bytes:
        """The JSON body for one request (its target and body)."""
        raise NotImplementedError

    async def serve(self, ctx: ssl.SSLContext, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on a loopback port (reported through ``task_status``) until cancelled."""
        listeners = await trio.open_ssl_over_tcp_listeners(0, ctx, host="127.0.0.1")
        task_status.started(listeners[0].transport_listener.socket.getsockname()[1])
        await trio.serve_listeners(self._one, listeners)

    async def _one(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            await self._answer(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass  # a client that gave up (a refused certificate): nothing to answer
        finally:
            await trio.aclose_forcefully(stream)

    async def _answer(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        conn = h11.Connection(h11.SERVER)
        target, body = b"", b""
        with trio.move_on_after(10):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Request):
                    target = event.target
                elif isinstance(event, h11.Data):
                    body += bytes(event.data)
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
            data = self.answer(target, body)
            headers = [("content-type", "application/json"), ("content-length", str(len(data)))]
            await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers)))
            await stream.send_all(conn.send(h11.Data(data=data)) + conn.send(h11.EndOfMessage()))
