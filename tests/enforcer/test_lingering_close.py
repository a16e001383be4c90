"""Lingering close over real TLS: an answer that closes the connection while the client is still
sending its body reaches the client (no TCP reset), and a client that keeps sending is cut."""

from __future__ import annotations

import ssl

import pytest
import trio

import enforcer.server
import enforcer.sockets
from testbed.demo import AUTH_HOST, IOT_HOST
from tests.conftest import Served
from tests.h2wire import H2Client
from tests.wire import Connection, client_context, receive_until

SAFETY = 20  # seconds: generous caps only; the enforcer's bounds are far shorter
BODY = 1024 * 1024


def ctx(served: Served, device: str | None) -> ssl.SSLContext:
    if device is None:
        return client_context(served.layout.edge_ca)
    cert, key = served.layout.device(device)
    return client_context(served.layout.edge_ca, cert, key)


def post_head(host: str, length: int) -> bytes:
    return f"POST /up HTTP/1.1\r\nHost: {host}\r\nContent-Length: {length}\r\n\r\n".encode()


@pytest.fixture
def patient_linger(monkeypatch: pytest.MonkeyPatch) -> None:
    """Idle bound raised: a test client descheduled on a busy machine is not taken for gone."""
    monkeypatch.setattr(enforcer.sockets, "LINGER_IDLE", 5.0)
    monkeypatch.setattr(enforcer.sockets, "LINGER_SECONDS", 10.0)


@pytest.mark.usefixtures("patient_linger")
@pytest.mark.parametrize(
    ("host", "device", "reason"),
    [(AUTH_HOST, None, "no_certificate"), (IOT_HOST, "wrong-cn", "policy_denied")],
)
async def test_a_denial_reaches_a_client_still_sending_its_body(
    served: Served, host: str, device: str | None, reason: str
) -> None:
    # As most clients do: send the whole request (1 MiB of body, more than the socket
    # buffers hold while the enforcer reads nothing), then read. The enforcer answers 403
    # and closes after the head; without a lingering close the kernel resets the connection
    # under the client's send, and the client never sees the 403.
    conn = await Connection.open(served.port, host, ctx(served, device))
    try:
        with trio.fail_after(SAFETY):
            await conn.stream.send_all(post_head(host, BODY) + b"x" * BODY)
        data = await receive_until(conn.stream, limit=SAFETY)  # until the enforcer closes
    finally:
        await conn.aclose()
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
    assert head.startswith("http/1.1 403 ")
    assert f"x-access-denied-reason: {reason}" in head
    assert "connection: close" in head
    assert served.last()["decision"] == "denied"


@pytest.mark.usefixtures("patient_linger")
async def test_an_http2_goaway_reaches_a_client_still_sending(serve_config) -> None:
    # No Duration over HTTP/2: the denied stream is answered, GOAWAY, and the connection
    # closes while the client still sends the stream's body (its windows allow it all).
    served = await serve_config(h2_initial_window_size=4 * BODY)
    client = await H2Client.open(served.port, IOT_HOST, ctx(served, "wrong-cn"))
    try:
        with trio.fail_after(SAFETY):
            while client.conn.outbound_flow_control_window < BODY // 2:
                await client.pump()  # the enforcer's SETTINGS and connection WINDOW_UPDATE
            sid = client.start("/up", method="POST", end=False)
            await client.flush()
            await client.send_body(sid, b"x" * (BODY // 2), end=False)
        response = await client.response(sid, limit=SAFETY)
        await client.wait_closed(limit=SAFETY)
    finally:
        await client.aclose()
    assert (response.status, response.reason) == (403, "policy_denied")
    assert client.goaway_last == sid


async def send_until_cut(conn: Connection, chunk: bytes, pause: float) -> int:
    """Send ``chunk`` after ``chunk`` until the enforcer cuts the connection; return bytes sent."""
    sent = 0
    with trio.fail_after(SAFETY):
        while True:
            try:
                await conn.stream.send_all(chunk)
            except trio.BrokenResourceError:
                return sent
            sent += len(chunk)
            await trio.sleep(pause)


@pytest.mark.parametrize(
    ("chunk", "pause"),
    [
        (b"x" * 65536, 0),  # as fast as loopback goes: the byte bound ends it
        (b"x" * 100, 0.05),  # a trickle, never idle long: the time bound ends it
    ],
)
async def test_a_client_that_keeps_sending_is_cut(
    served: Served, chunk: bytes, pause: float
) -> None:
    conn = await Connection.open(served.port, AUTH_HOST, ctx(served, None))
    try:
        await conn.stream.send_all(post_head(AUTH_HOST, 2**40))  # a body that never ends
        sent = await send_until_cut(conn, chunk, pause)
    finally:
        await conn.aclose()
    # Cut: whatever the pace, the enforcer dropped at most the byte bound (plus what the
    # sockets' buffers held when it closed).
    assert sent < enforcer.server.LINGER_BYTES + 16 * 1024 * 1024
    assert served.last()["reason"] == "no_certificate"
