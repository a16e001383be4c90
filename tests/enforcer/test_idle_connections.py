"""What an idle connection holds: no OpenSSL record buffers, no receive buffer, and it still works.

Thousands of kept-alive connections and WebSocket tunnels sit idle most of the time, so what
each holds while waiting is the enforcer's memory per device (``bench/connections.py`` measures
it beside nginx; the figures live there, not here). These tests check the mechanisms: the TLS
contexts release OpenSSL's record buffers between records, a connection waiting for its peer
keeps no pending ``WantReadError`` (whose traceback would pin pyOpenSSL's 64 KiB receive
buffer), and an idle connection or tunnel then carries its next request or message as before.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator

import trio
import trio.testing
import trio_websocket
from OpenSSL import SSL

from testbed.demo import AUTH_HOST
from tests.conftest import Served
from tests.wire import Connection, client_context


def waiting_reads() -> list[SSL.WantReadError]:
    """The WantReadError exceptions still alive (each pins the receive buffer of its call)."""
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, SSL.WantReadError)]


async def test_every_context_releases_record_buffers_when_idle(served: Served) -> None:
    contexts = served.enforcer.contexts
    assert contexts is not None
    for ctx in (contexts.for_name(AUTH_HOST), contexts.for_name(None)):
        assert ctx.set_mode(0) & SSL.MODE_RELEASE_BUFFERS  # set_mode(0) returns the mode


async def test_an_idle_kept_alive_connection_holds_no_pending_read_and_still_works(
    served: Served,
) -> None:
    ctx = client_context(served.layout.edge_ca, *served.layout.device("valid"))
    conn = await Connection.open(served.port, AUTH_HOST, ctx)
    try:
        first = await conn.request("/telemetry", method="POST", body=b'{"seq":1}')
        assert first.status == 200
        await trio.testing.wait_all_tasks_blocked()  # the server waits for the next request
        assert waiting_reads() == []
        second = await conn.request("/telemetry", method="POST", body=b'{"seq":2}')
        assert second.status == 200
        assert second.json()["body_bytes"] == len(b'{"seq":2}')
    finally:
        await conn.aclose()


@contextlib.asynccontextmanager
async def tunnel(served: Served) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    ctx = client_context(served.layout.edge_ca, *served.layout.device("valid"))
    tcp = await trio.open_tcp_stream("127.0.0.1", served.port)
    stream = trio.SSLStream(tcp, ctx, server_hostname=AUTH_HOST)
    await stream.do_handshake()
    async with trio.open_nursery() as nursery:
        ws = await trio_websocket.wrap_client_stream(nursery, stream, AUTH_HOST, "/ws")
        try:
            yield ws
        finally:
            with trio.move_on_after(1):
                await ws.aclose()
            await trio.aclose_forcefully(stream)
            nursery.cancel_scope.cancel()


async def test_an_idle_tunnel_holds_no_pending_read_and_still_carries_messages(
    served: Served,
) -> None:
    async with tunnel(served) as ws:
        await ws.send_message(b'{"seq":1}')
        assert await ws.get_message() == b'{"seq":1}'
        await trio.testing.wait_all_tasks_blocked()  # both directions wait for bytes
        assert waiting_reads() == []
        await ws.send_message(b'{"seq":2}')
        assert await ws.get_message() == b'{"seq":2}'
