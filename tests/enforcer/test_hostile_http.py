"""Hostile HTTP/1.1 over real TLS (issue 13): CONNECT, request targets, bodies read only once
admitted, header limits and bytes, keep-alive limits and timeouts, No Duration closing."""

from __future__ import annotations

import json
import ssl
from functools import partial

import h11
import pytest
import trio

import enforcer.http
import enforcer.server
from testbed.demo import AUTH_HOST, IOT_HOST
from tests.conftest import Served
from tests.wire import Connection, client_context, receive_until

SAFETY = 10  # seconds: no test waits longer; the enforcer's own timeouts are far shorter or longer


def ctx(served: Served, device: str | None = "valid") -> ssl.SSLContext:
    if device is None:
        return client_context(served.layout.edge_ca)
    cert, key = served.layout.device(device)
    return client_context(served.layout.edge_ca, cert, key)


async def read_all(conn: Connection) -> bytes:
    """Read until the server closes the connection (cleanly or not)."""
    return await receive_until(conn.stream, limit=SAFETY)


async def read_until(conn: Connection, marker: bytes) -> bytes:
    """Read until ``marker`` has arrived (or the connection ends)."""
    return await receive_until(conn.stream, marker, limit=SAFETY)


async def exchange(served: Served, raw: bytes, sni: str = AUTH_HOST, device: str | None = "valid"):
    """Send raw bytes on a new TLS connection; return everything the server sent until it closed."""
    conn = await Connection.open(served.port, sni, ctx(served, device))
    try:
        await conn.stream.send_all(raw)
        return await read_all(conn)
    finally:
        await conn.aclose()


def head_of(data: bytes) -> tuple[int, dict[str, str]]:
    """The status and headers of the first response in ``data``."""
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in head[1:])
    return int(head[0].split()[1]), headers


def body_of(data: bytes, method: str = "POST") -> bytes:
    """The body of the final response in ``data`` (chunked or not), decoded by h11."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
    conn.receive_data(data)
    conn.receive_data(b"")
    parts = []
    while not isinstance(event := conn.next_event(), h11.EndOfMessage):
        if isinstance(event, h11.Data):
            parts.append(bytes(event.data))
    return b"".join(parts)


def last_request(served: Served) -> dict[str, object]:
    return served.last()


# 1. CONNECT ---------------------------------------------------------------------------------


async def test_connect_is_refused_before_the_access_decision_and_the_origin(
    served: Served,
) -> None:
    # An in-process origin that records what reaches it and answers 200 (a real HTTP origin
    # answering 2xx to CONNECT made the old proxy spin; this one cannot hang the test run).
    seen: list[bytes] = []

    async def origin(method, target, headers, body):
        seen.append(method)
        return 200, [], b"tunnel open"

    served.enforcer.origins.app = origin
    connect = b"CONNECT auth.example.test:443 HTTP/1.1\r\nHost: auth.example.test\r\n\r\n"
    data = await exchange(served, connect)
    status, headers = head_of(data)
    assert status == 501
    assert headers["connection"] == "close"
    assert seen == []
    assert last_request(served)["decision"] == "refused"


async def test_body_readers_end_at_paused_after_a_2xx_to_connect() -> None:
    # h11 pauses a client after a 2xx to CONNECT: the readers must return, not spin on PAUSED.
    async def origin(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 Connection established\r\n\r\nraw tunnel bytes")
        await trio.sleep(SAFETY)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, origin, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        for reader in ("read_body", "body_chunks"):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            conn = h11.Connection(h11.CLIENT)
            await stream.send_all(
                conn.send(h11.Request(method="CONNECT", target="o:443", headers=[("host", "o")]))
                + conn.send(h11.EndOfMessage())
            )
            with trio.fail_after(SAFETY):
                event = conn.next_event()
                while event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                    event = conn.next_event()
                assert isinstance(event, h11.Response) and event.status_code == 200
                if reader == "read_body":
                    assert await enforcer.http.read_body(conn, stream, 1024) == b""
                else:
                    assert [
                        c async for c in enforcer.http.body_chunks(conn, stream, 1024, SAFETY)
                    ] == []
            assert conn.their_state is h11.SWITCHED_PROTOCOL
            await stream.aclose()
        nursery.cancel_scope.cancel()


# 2. Request targets -------------------------------------------------------------------------


async def test_absolute_form_naming_another_application_is_misdirected(served: Served) -> None:
    conn = await Connection.open(served.port, AUTH_HOST, ctx(served))
    try:
        response = await conn.request(f"http://{IOT_HOST}/", host=AUTH_HOST)
        assert (response.status, response.reason) == (421, "misdirected")
        assert conn.closed_by_server
    finally:
        await conn.aclose()


@pytest.mark.parametrize(
    "target, expected",
    [
        (f"http://{AUTH_HOST}/x?y=1", "/x?y=1"),
        (f"HTTPS://{AUTH_HOST.upper()}:443?q", "/?q"),
        (f"https://{AUTH_HOST}", "/"),
    ],
)
async def test_absolute_form_reaches_the_origin_in_origin_form(
    served: Served, target: str, expected: str
) -> None:
    conn = await Connection.open(served.port, AUTH_HOST, ctx(served))
    try:
        response = await conn.request(target)
        assert response.status == 200
        assert response.json()["path"] == expected
        assert (await conn.request("/again")).json()["path"] == "/again"  # still kept alive
    finally:
        await conn.aclose()


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET -internal/x HTTP/1.1",
        b"GET * HTTP/1.1",
        b"GET http://user@auth.example.test/ HTTP/1.1",
        b"GET ftp://auth.example.test/ HTTP/1.1",
        b"GET http:///x HTTP/1.1",
    ],
)
async def test_a_target_of_no_known_form_gets_400(served: Served, request_line: bytes) -> None:
    data = await exchange(served, request_line + b"\r\nHost: auth.example.test\r\n\r\n")
    status, headers = head_of(data)
    assert (status, headers["connection"]) == (400, "close")


async def test_options_asterisk_is_a_known_form(served: Served) -> None:
    conn = await Connection.open(served.port, AUTH_HOST, ctx(served))
    try:
        response = await conn.request("*", method="OPTIONS")
        assert response.status == 200
    finally:
        await conn.aclose()


# 3. Bodies: decided first, read only when admitted ------------------------------------------

BIG_POST = b"POST / HTTP/1.1\r\nHost: auth.example.test\r\nContent-Length: 8000000\r\n"


async def test_a_denied_request_is_answered_before_its_body_is_read(served: Served) -> None:
    conn = await Connection.open(served.port, AUTH_HOST, ctx(served, None))
    try:
        await conn.stream.send_all(BIG_POST + b"\r\n")
        data = await read_until(conn, b"\r\n\r\n")  # no body byte has been sent
        status, headers = head_of(data)
        assert (status, headers["x-access-denied-reason"]) == (403, "no_certificate")
        assert headers["connection"] == "close"
        await read_all(conn)  # and the connection ends: the body is never read
    finally:
        await conn.aclose()
    assert last_request(served)["decision"] == "denied"


async def test_a_denied_request_expecting_100_gets_its_final_status_only(served: Served) -> None:
    conn = await Connection.open(served.port, AUTH_HOST, ctx(served, None))
    try:
        await conn.stream.send_all(BIG_POST + b"Expect: 100-continue\r\n\r\n")
        data = await read_all(conn)
        assert data.startswith(b"HTTP/1.1 403 ")
        assert b" 100 " not in data
    finally:
        await conn.aclose()


async def test_an_admitted_request_gets_100_continue_then_its_body_is_forwarded(
    served: Served,
) -> None:
    conn = await Connection.open(served.port, AUTH_HOST, ctx(served))
    try:
        head = b"POST /up HTTP/1.1\r\nHost: auth.example.test\r\nContent-Length: 5000\r\n"
        await conn.stream.send_all(head + b"Expect: 100-continue\r\n\r\n")
        interim = await read_until(conn, b"\r\n\r\n")
        assert interim.startswith(b"HTTP/1.1 100 ")
        await conn.stream.send_all(b"x" * 5000)
        data = await read_until(conn, b"0\r\n\r\n")
        assert head_of(data)[0] == 200
        assert json.loads(body_of(data))["body_bytes"] == 5000
    finally:
        await conn.aclose()


async def test_an_admitted_body_reaches_the_origin_whole(served: Served) -> None:
    body = bytes(range(256)) * 1200  # 300 KiB, several TLS records
    conn = await Connection.open(served.port, AUTH_HOST, ctx(served))
    try:
        response = await conn.request("/up", method="POST", body=body)
        assert (response.status, response.json()["method"]) == (200, "POST")
        assert response.json()["body_bytes"] == len(body)
        assert (await conn.request("/next")).status == 200  # the connection carries on
    finally:
        await conn.aclose()


async def test_an_admitted_chunked_body_reaches_the_origin_whole(served: Served) -> None:
    parts = [b"a" * 100_000, b"b" * 70_000, b"c"]
    raw = b"POST /up HTTP/1.1\r\nHost: auth.example.test\r\nTransfer-Encoding: chunked\r\n"
    raw += b"Connection: close\r\n\r\n"
    raw += b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"
    data = await exchange(served, raw)
    assert head_of(data)[0] == 200
    assert json.loads(body_of(data))["body_bytes"] == sum(map(len, parts))


async def test_an_admitted_body_over_the_limit_gets_413_and_closes(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(enforcer.server, "MAX_BODY", 1000)
    conn = await Connection.open(served.port, AUTH_HOST, ctx(served))
    try:
        response = await conn.request("/", method="POST", body=b"x" * 2000)
        assert response.status == 413
        assert conn.closed_by_server
    finally:
        await conn.aclose()


# 4, 5. Head limits and bytes ----------------------------------------------------------------


async def test_a_30_kb_header_in_one_write_gets_431(served: Served) -> None:
    conn = await Connection.open(served.port, AUTH_HOST, ctx(served))
    try:
        response = await conn.request("/", headers=[("x-big", "a" * 30_000)])
        assert response.status == 431
        assert conn.closed_by_server
    finally:
        await conn.aclose()


@pytest.mark.parametrize("ctl", [b"\x01", b"\x08", b"\x1b", b"\x1f", b"\x7f"])
async def test_control_bytes_in_a_header_value_get_400(served: Served, ctl: bytes) -> None:
    raw = b"GET / HTTP/1.1\r\nHost: auth.example.test\r\nX-Note: a" + ctl + b"b\r\n\r\n"
    status, headers = head_of(await exchange(served, raw))
    assert (status, headers["connection"]) == (400, "close")


async def test_obs_text_and_tabs_in_header_values_still_pass(served: Served) -> None:
    raw = b"GET / HTTP/1.1\r\nHost: auth.example.test\r\nX-Note: a\tb \xe9\r\n"
    raw += b"Connection: close\r\n\r\n"
    status, _ = head_of(await exchange(served, raw))
    assert status == 200


async def test_content_length_with_transfer_encoding_gets_400_and_closes(served: Served) -> None:
    raw = (
        b"POST / HTTP/1.1\r\nHost: auth.example.test\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        b"GET /smuggled HTTP/1.1\r\nHost: auth.example.test\r\n\r\n"
    )
    data = await exchange(served, raw)
    status, headers = head_of(data)
    assert (status, headers["connection"]) == (400, "close")
    assert data.count(b"HTTP/1.1 ") == 1  # the smuggled request is never answered


# 6. Keep-alive limits and timeouts ----------------------------------------------------------


async def test_an_idle_kept_alive_connection_is_closed(serve_config) -> None:
    served = await serve_config(idle_timeout=0.5)
    conn = await Connection.open(served.port, AUTH_HOST, ctx(served))
    try:
        await trio.sleep(1)  # the first request has request_timeout to start, not idle_timeout
        assert (await conn.request("/")).status == 200
        assert not conn.closed_by_server
        assert await read_all(conn) == b""  # then idle_timeout ends it (before SAFETY)
    finally:
        await conn.aclose()


@pytest.mark.parametrize("device", ["valid", None])
async def test_a_connection_serves_at_most_max_requests(serve_config, device) -> None:
    served = await serve_config(max_requests_per_connection=3)
    conn = await Connection.open(served.port, AUTH_HOST, ctx(served, device))
    try:
        statuses = []
        for _ in range(3):
            response = await conn.request("/")
            statuses.append(response.status)
            closing = response.header("connection") == "close"
            assert closing == (len(statuses) == 3)
        assert set(statuses) == ({200} if device else {403})
        assert conn.closed_by_server
        assert await read_all(conn) == b""
    finally:
        await conn.aclose()


async def test_a_slowloris_head_is_cut_at_request_timeout(serve_config) -> None:
    served = await serve_config(request_timeout=1.0, idle_timeout=30.0)
    conn = await Connection.open(served.port, AUTH_HOST, ctx(served))
    closed = trio.Event()
    sent = 0

    async def reader() -> None:
        await read_all(conn)
        closed.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            with trio.fail_after(SAFETY):
                await conn.stream.send_all(b"GET / HTTP/1.1\r\nHost: auth.example.test\r\nX-Slow: ")
                while not closed.is_set():
                    try:
                        await conn.stream.send_all(b"a")
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        break
                    sent += 1
                    with trio.move_on_after(0.2):
                        await closed.wait()
                await closed.wait()
    finally:
        await conn.aclose()
    assert sent < SAFETY / 0.2  # cut while still dripping, never answered


# 7. No Duration -----------------------------------------------------------------------------


async def test_a_421_on_a_no_duration_hostname_closes(served: Served) -> None:
    conn = await Connection.open(served.port, IOT_HOST, ctx(served))
    try:
        response = await conn.request("/", host=AUTH_HOST)
        assert (response.status, response.reason) == (421, "misdirected")
        assert response.header("connection") == "close"
        assert conn.closed_by_server
    finally:
        await conn.aclose()
