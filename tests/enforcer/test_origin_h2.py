"""Proxying to HTTP/2 origins (issue 16): h2c://, grpc:// and https:// with ALPN, over real sockets.

First ``origin_request`` on its own against real origins (an h2 echo origin, grpcio, TLS
origins), then through a served enforcer over real TLS with HTTP/1.1 clients (h11 and curl).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import io
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h11
import pytest
import trio

from devices.pki import issue_ca, issue_leaf
from enforcer import control, origin_h2
from enforcer.accesslog import AccessLog
from enforcer.application import origin_problem
from enforcer.clock import FixedClock
from enforcer.config import load_config
from enforcer.origin import serve_echo_origin_on
from enforcer.proxy import OriginError, OriginPool, forwarded_headers, origin_request
from enforcer.server import Enforcer, open_listener, serve
from testbed.demo import AUTH_HOST, DemoLayout
from tests.enforcer.test_hostile_origin import raw_origin, read_head, watchdog
from tests.h2_origins import (
    GRPC_HEADERS,
    H2EchoOrigin,
    grpc_frame,
    grpc_messages,
    origin_tls_context,
    serve_grpc,
)
from tests.wire import client_context, run

TIMEOUT = 10


async def collect(response: Any) -> bytes:
    return b"".join([chunk async for chunk in response.body])


@pytest.fixture
async def pool() -> AsyncIterator[OriginPool]:
    async with OriginPool().running() as running:
        yield running


@pytest.fixture
async def echo(nursery: trio.Nursery) -> H2EchoOrigin:
    origin = H2EchoOrigin()
    await nursery.start(origin.serve)
    return origin


@pytest.fixture
def grpc_port() -> Any:
    server, port = serve_grpc()
    yield port
    server.stop(None)


@dataclasses.dataclass
class OriginPKI:
    ca_pem: str
    cert_pem: bytes
    key_pem: bytes


@pytest.fixture(scope="module")
def origin_pki() -> OriginPKI:
    now = dt.datetime.now(dt.UTC)
    ca = issue_ca("origin test CA", now)
    leaf = issue_leaf(
        "localhost",
        ca,
        not_before=now - dt.timedelta(hours=1),
        not_after=now + dt.timedelta(days=1),
        client=False,
        dns_names=["localhost"],
    )
    return OriginPKI(ca.cert_pem().decode(), leaf.cert_pem(), leaf.key_pem())


def test_origin_urls_accept_the_h2_schemes() -> None:
    for ok in ("http://a:1", "h2c://a:1", "grpc://a:1", "https://a", "grpcs://a:443/x"):
        assert origin_problem(ok) is None, ok
    assert "expected a URL starting with one of" in (origin_problem("ws://a:1") or "")
    assert "names no host" in (origin_problem("h2c://:80") or "")
    assert "port" in (origin_problem("grpc://a:0") or "")


def test_te_trailers_survives_forwarding_and_other_te_values_do_not() -> None:
    out = forwarded_headers(
        [(b"host", b"app"), (b"te", b"trailers"), (b"content-type", b"application/grpc")],
        origin_host="o",
        client_ip=None,
        token=None,
        client_cert_der=None,
        client_cert_sha256=None,
    )
    assert (b"te", b"trailers") in out and (b"content-type", b"application/grpc") in out
    out = forwarded_headers(
        [(b"host", b"app"), (b"te", b"gzip")],
        origin_host="o",
        client_ip=None,
        token=None,
        client_cert_der=None,
        client_cert_sha256=None,
    )
    assert not [k for k, _ in out if k == b"te"]


# 1. origin_request against real h2 origins.


async def test_h2c_request_maps_headers_and_reuses_one_connection(
    echo: H2EchoOrigin, pool: OriginPool
) -> None:
    origin = f"h2c://127.0.0.1:{echo.port}/base"
    headers = [
        (b"host", b"origin.example"),
        (b"Connection", b"keep-alive"),
        (b"keep-alive", b"timeout=5"),
        (b"transfer-encoding", b"chunked"),
        (b"te", b"trailers"),
        (b"X-Mixed-Case", b"v"),
    ]
    with trio.fail_after(TIMEOUT):
        for _ in range(3):
            async with origin_request(
                origin, b"POST", b"/p?q=1", headers, b"hello", TIMEOUT, pool
            ) as response:
                seen = json.loads(await collect(response))
            assert response.status == 200
            assert (b"x-origin", b"h2-echo") in response.headers
            assert not [k for k, _ in response.headers if k.startswith(b":")]
    names = [k for k, _ in seen["headers"]]
    assert names[:4] == [":method", ":scheme", ":authority", ":path"]
    pseudo = dict(seen["headers"][:4])
    assert pseudo == {
        ":method": "POST",
        ":scheme": "http",
        ":authority": "origin.example",
        ":path": "/base/p?q=1",
    }
    assert ["te", "trailers"] in seen["headers"] and ["x-mixed-case", "v"] in seen["headers"]
    for dropped in ("host", "connection", "keep-alive", "transfer-encoding"):
        assert dropped not in names
    assert seen["body_bytes"] == 5
    assert echo.connections == 1  # three requests, one multiplexed connection


async def test_trailers_fill_the_response_after_the_body(
    echo: H2EchoOrigin, pool: OriginPool
) -> None:
    with trio.fail_after(TIMEOUT):
        async with origin_request(
            f"h2c://127.0.0.1:{echo.port}", b"GET", b"/trailers", [], b"", TIMEOUT, pool
        ) as response:
            assert response.trailers == []
            await collect(response)
            assert response.trailers == [(b"x-echo-trailer", b"done"), (b"grpc-status", b"0")]


async def test_a_large_streamed_upload_respects_the_origin_window(
    echo: H2EchoOrigin, pool: OriginPool
) -> None:
    # 3 MiB against the origin's 64 KiB initial window: only window updates let it through.
    parts = [bytes([i]) * 100_000 for i in range(31)]
    digest = hashlib.sha256(b"".join(parts)).hexdigest()

    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    total = sum(map(len, parts))
    with trio.fail_after(TIMEOUT):
        async with origin_request(
            f"h2c://127.0.0.1:{echo.port}",
            b"PUT",
            b"/up",
            [],
            body(),
            TIMEOUT,
            pool,
            content_length=total,
        ) as response:
            seen = json.loads(await collect(response))
    assert (seen["body_bytes"], seen["body_sha256"]) == (total, digest)
    assert ["content-length", str(total)] in seen["headers"]


async def test_the_response_streams_before_the_origin_finishes(
    echo: H2EchoOrigin, pool: OriginPool
) -> None:
    with trio.fail_after(TIMEOUT):
        async with origin_request(
            f"h2c://127.0.0.1:{echo.port}", b"GET", b"/slow", [], b"", TIMEOUT, pool
        ) as response:
            chunks = response.body
            first = await anext(chunks)
            assert first == b"first chunk\n"
            assert not echo.release.is_set()  # the origin is still holding the rest
            echo.release.set()
            assert await collect(response) == b"second chunk\n"


async def test_a_slow_consumer_holds_the_origin_back_within_one_window(
    echo: H2EchoOrigin, pool: OriginPool
) -> None:
    with trio.fail_after(TIMEOUT):
        async with origin_request(
            f"h2c://127.0.0.1:{echo.port}", b"GET", b"/forever", [], b"", TIMEOUT, pool
        ) as response:
            await anext(response.body)
            await trio.sleep(0.3)  # the consumer stalls; the origin would send megabytes here
            (conn,) = [c for group in pool.h2._conns.values() for c in group]
            buffered = sum(len(data) for s in conn.streams.values() for data, _ in s.chunks)
            assert 0 < buffered <= origin_h2.STREAM_WINDOW
            for _ in range(20):  # taking chunks lets it send again
                await anext(response.body)


async def test_an_origin_reset_fails_the_body_but_not_the_connection(
    echo: H2EchoOrigin, pool: OriginPool
) -> None:
    origin = f"h2c://127.0.0.1:{echo.port}"
    with trio.fail_after(TIMEOUT):
        with pytest.raises(OriginError, match="reset the stream"):
            async with origin_request(
                origin, b"GET", b"/reset-mid-body", [], b"", TIMEOUT, pool
            ) as response:
                await collect(response)
        with pytest.raises(OriginError, match="REFUSED_STREAM"):
            async with origin_request(
                origin, b"GET", b"/reset-before-head", [], b"", TIMEOUT, pool
            ):
                pass
        async with origin_request(origin, b"GET", b"/fine", [], b"", TIMEOUT, pool) as response:
            assert json.loads(await collect(response))["path"] == "/fine"
    assert echo.connections == 1


async def test_cancelling_the_caller_resets_only_its_stream(
    echo: H2EchoOrigin, pool: OriginPool
) -> None:
    origin = f"h2c://127.0.0.1:{echo.port}"
    with trio.fail_after(TIMEOUT):
        async with origin_request(origin, b"GET", b"/slow", [], b"", TIMEOUT, pool) as slow:
            assert await anext(slow.body) == b"first chunk\n"
            with trio.CancelScope() as scope:
                async with origin_request(
                    origin, b"GET", b"/forever", [], b"", TIMEOUT, pool
                ) as endless:
                    await anext(endless.body)
                    scope.cancel()
                    await trio.sleep_forever()
            await echo.reset_seen.wait()
            # The other stream on the same connection carries on.
            echo.release.set()
            assert await collect(slow) == b"second chunk\n"
    assert [code for _, code in echo.resets] == [8]  # CANCEL
    assert echo.connections == 1


async def test_max_concurrent_streams_one_serves_two_requests(nursery: trio.Nursery) -> None:
    echo = H2EchoOrigin(max_concurrent_streams=1)
    await nursery.start(echo.serve)
    origin = f"h2c://127.0.0.1:{echo.port}"
    results: list[bytes] = []

    async def one(path: bytes, pool: OriginPool) -> None:
        async with origin_request(origin, b"GET", path, [], b"", TIMEOUT, pool) as r:
            results.append(await collect(r))

    # One connection: the second request waits for the stream; eight: it opens another.
    for connections in (1, 8):
        async with OriginPool(max_h2_connections=connections).running() as pool:
            echo.release = trio.Event()
            results.clear()
            echo.requests.clear()
            with trio.fail_after(TIMEOUT):
                async with trio.open_nursery() as both:
                    both.start_soon(one, b"/slow", pool)
                    both.start_soon(one, b"/plain", pool)
                    while not echo.requests or (connections > 1 and not results):
                        await trio.sleep(0.01)
                    echo.release.set()
            assert len(results) == 2
    assert echo.most_open == 1
    assert echo.connections == 1 + 2  # the single connection, then two side by side


async def test_goaway_retires_a_connection_and_a_dead_one_is_replaced(
    nursery: trio.Nursery, pool: OriginPool
) -> None:
    polite = H2EchoOrigin(goaway_after=1)
    await nursery.start(polite.serve)
    origin = f"h2c://127.0.0.1:{polite.port}"
    with trio.fail_after(TIMEOUT):
        for i in range(3):
            async with origin_request(origin, b"GET", b"/%d" % i, [], b"", TIMEOUT, pool) as r:
                assert json.loads(await collect(r))["path"] == f"/{i}"
    assert polite.connections == 3  # each GOAWAY sent the next request to a new connection
    assert [r["stream"] for r in polite.requests] == [1, 1, 1]


async def test_a_connection_that_died_is_replaced(echo: H2EchoOrigin, pool: OriginPool) -> None:
    origin = f"h2c://127.0.0.1:{echo.port}"
    with trio.fail_after(TIMEOUT):
        async with origin_request(origin, b"GET", b"/a", [], b"", TIMEOUT, pool) as r:
            await collect(r)
        (conn,) = [c for group in pool.h2._conns.values() for c in group]
        echo.drop_connections()
        while conn.dead is None:  # the reader sees the connection end
            await trio.sleep(0.01)
        async with origin_request(origin, b"GET", b"/b", [], b"", TIMEOUT, pool) as r:
            assert json.loads(await collect(r))["path"] == "/b"
    assert echo.connections == 2


async def test_an_h2_origin_needs_the_pool_running(echo: H2EchoOrigin) -> None:
    with pytest.raises(OriginError, match="not running"):
        async with origin_request(
            f"h2c://127.0.0.1:{echo.port}", b"GET", b"/", [], b"", TIMEOUT, OriginPool()
        ):
            pass


async def test_a_closed_port_is_an_origin_error(pool: OriginPool) -> None:
    with trio.fail_after(TIMEOUT), pytest.raises(OriginError, match="cannot connect"):
        async with origin_request("h2c://127.0.0.1:9", b"GET", b"/", [], b"", TIMEOUT, pool):
            pass


async def test_grpc_unary_through_origin_request(grpc_port: int, pool: OriginPool) -> None:
    origin = f"grpc://127.0.0.1:{grpc_port}"
    headers = [(b"host", b"127.0.0.1"), *GRPC_HEADERS]
    with trio.fail_after(TIMEOUT):
        async with origin_request(
            origin, b"POST", b"/echo.Echo/Unary", headers, grpc_frame(b"abc"), TIMEOUT, pool
        ) as response:
            body = await collect(response)
        assert response.status == 200
        assert grpc_messages(body) == [b"cba"]
        trailers = dict(response.trailers)
        assert trailers[b"grpc-status"] == b"0"
        assert trailers[b"x-echo-trailer"] == b"unary"

        async with origin_request(
            origin, b"POST", b"/echo.Echo/Fail", headers, grpc_frame(b"it"), TIMEOUT, pool
        ) as response:
            body = await collect(response)
        found = dict(response.headers) | dict(response.trailers)  # trailers-only answers
        assert found[b"grpc-status"] == b"5"  # NOT_FOUND
        assert b"no such thing" in found[b"grpc-message"]

        async with origin_request(
            origin, b"POST", b"/echo.Echo/Stream", headers, grpc_frame(b"\x03z"), TIMEOUT, pool
        ) as response:
            body = await collect(response)
        assert grpc_messages(body) == [b"0:\x03z", b"1:\x03z", b"2:\x03z"]
        assert dict(response.trailers)[b"grpc-status"] == b"0"

        # A gRPC request that lost its `te: trailers` on the way (an HTTP/1.1 hop) still
        # reaches grpcio with it, which otherwise resets the stream.
        bare = [(b"host", b"127.0.0.1"), (b"content-type", b"application/grpc+proto")]
        async with origin_request(
            origin, b"POST", b"/echo.Echo/Unary", bare, grpc_frame(b"xy"), TIMEOUT, pool
        ) as response:
            assert grpc_messages(await collect(response)) == [b"yx"]


async def test_grpc_bidirectional_ping_pong_streams_both_ways_at_once(
    grpc_port: int, pool: OriginPool
) -> None:
    # Each message is sent only once the answer to the previous one arrived: a proxy that
    # sent the whole request before reading the response would wait here forever.
    answered = [trio.Event() for _ in range(3)]

    async def body() -> AsyncIterator[bytes]:
        for i, event in enumerate(answered):
            yield grpc_frame(b"m%d" % i)
            await event.wait()

    got: list[bytes] = []
    headers = [(b"host", b"127.0.0.1"), *GRPC_HEADERS]
    with trio.fail_after(TIMEOUT):
        async with origin_request(
            f"grpc://127.0.0.1:{grpc_port}",
            b"POST",
            b"/echo.Echo/Chat",
            headers,
            body(),
            TIMEOUT,
            pool,
        ) as response:
            buffer = b""
            async for chunk in response.body:
                buffer += chunk
                while len(buffer) >= 5 and len(buffer) >= 5 + int.from_bytes(buffer[1:5]):
                    size = int.from_bytes(buffer[1:5])
                    got.append(buffer[5 : 5 + size])
                    buffer = buffer[5 + size :]
                    answered[len(got) - 1].set()
    assert got == [b"echo:m0", b"echo:m1", b"echo:m2"]
    assert dict(response.trailers)[b"grpc-status"] == b"0"


async def test_https_origin_with_alpn_h2_and_a_ca_file(
    nursery: trio.Nursery, origin_pki: OriginPKI, pool: OriginPool
) -> None:
    tls = origin_tls_context(origin_pki.cert_pem, origin_pki.key_pem, ["h2"])
    echo = H2EchoOrigin(tls=tls)
    await nursery.start(echo.serve)
    origin = f"https://localhost:{echo.port}"
    with trio.fail_after(TIMEOUT):
        async with origin_request(
            origin, b"GET", b"/t", [], b"", TIMEOUT, pool, origin_ca=origin_pki.ca_pem
        ) as response:
            seen = json.loads(await collect(response))
        assert seen["scheme"] == "https"
        async with origin_request(
            f"grpcs://localhost:{echo.port}",
            b"POST",
            b"/svc/M",
            GRPC_HEADERS,
            b"",
            TIMEOUT,
            pool,
            origin_ca=origin_pki.ca_pem,
        ) as response:
            seen = json.loads(await collect(response))
        assert (seen["scheme"], seen["path"]) == ("https", "/svc/M")
        # The system trust store does not know the test CA: the origin is refused.
        with pytest.raises(OriginError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify"):
            async with origin_request(origin, b"GET", b"/t", [], b"", TIMEOUT, pool):
                pass


async def test_https_origin_selecting_http1_is_spoken_http1(
    nursery: trio.Nursery, origin_pki: OriginPKI, pool: OriginPool
) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    tls = origin_tls_context(origin_pki.cert_pem, origin_pki.key_pem, ["http/1.1"])
    nursery.start_soon(serve_echo_origin_on, [trio.SSLListener(listeners[0], tls)])
    origin = f"https://localhost:{port}"
    with trio.fail_after(TIMEOUT):
        for _ in range(2):  # the first learns http/1.1 from ALPN, the second goes straight
            async with origin_request(
                origin,
                b"GET",
                b"/one",
                [(b"host", b"localhost")],
                b"",
                TIMEOUT,
                pool,
                origin_ca=origin_pki.ca_pem,
            ) as response:
                seen = json.loads(await collect(response))
            assert seen["path"] == "/one" and seen["origin"] == "echo"
    assert (origin, origin_pki.ca_pem) in pool.http1_origins


async def test_an_http1_origins_chunked_trailers_fill_the_response_too(
    nursery: trio.Nursery, pool: OriginPool
) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        if await read_head(stream, bytearray()) is not None:
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\n\r\n"
            )

    origin = await raw_origin(nursery, handler)
    with trio.fail_after(TIMEOUT):
        async with origin_request(origin, b"GET", b"/", [(b"host", b"o")], b"", 5, pool) as r:
            assert await collect(r) == b"abc"
    assert r.trailers == [(b"grpc-status", b"0")]


# 2. Hostile origins cost a timeout and bounded memory, never a spinning loop.

Behaviour = Callable[[h2.connection.H2Connection, trio.SocketStream, int], Awaitable[None]]


async def hostile_origin(nursery: trio.Nursery, behave: Behaviour) -> str:
    """An h2c origin that reads one request's head, then does ``behave``."""

    async def handler(stream: trio.SocketStream) -> None:
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        conn = h2.connection.H2Connection(config)
        conn.initiate_connection()
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(conn.data_to_send())
            sid = 0
            while not sid:
                data = await stream.receive_some(65536)
                if not data:
                    return
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        sid = event.stream_id or 0
            await stream.send_all(conn.data_to_send())
            await behave(conn, stream, sid)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, handler, listeners)
    return f"h2c://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


async def test_huge_response_headers_are_refused(nursery: trio.Nursery, pool: OriginPool) -> None:
    async def behave(conn: h2.connection.H2Connection, stream: trio.SocketStream, sid: int) -> None:
        big = [(b"x-big-%d" % i, b"v" * 1000) for i in range(200)]  # 200 KB of headers
        conn.send_headers(sid, [(b":status", b"200"), *big], end_stream=True)
        await stream.send_all(conn.data_to_send())
        await trio.sleep_forever()

    origin = await hostile_origin(nursery, behave)
    with watchdog(5), trio.fail_after(TIMEOUT), pytest.raises(OriginError, match="broke HTTP/2"):
        async with origin_request(origin, b"GET", b"/", [], b"", TIMEOUT, pool):
            pass


async def test_endless_informational_responses_are_cut_off(
    nursery: trio.Nursery, pool: OriginPool
) -> None:
    async def behave(conn: h2.connection.H2Connection, stream: trio.SocketStream, sid: int) -> None:
        while True:
            conn.send_headers(sid, [(b":status", b"103"), (b"link", b"</a>; rel=preload")])
            await stream.send_all(conn.data_to_send())

    origin = await hostile_origin(nursery, behave)
    with watchdog(5), trio.fail_after(TIMEOUT), pytest.raises(OriginError, match="1xx"):
        async with origin_request(origin, b"GET", b"/", [], b"", TIMEOUT, pool):
            pass


async def test_an_origin_that_never_opens_its_window_costs_a_timeout(
    nursery: trio.Nursery, pool: OriginPool
) -> None:
    stingy = H2EchoOrigin(ack=False)
    await nursery.start(stingy.serve)
    body = b"u" * 300_000  # more than the 64 KiB the origin's window allows
    # Whichever timer ends first (the upload's or the head's), the request costs 0.5 s.
    with watchdog(5), trio.fail_after(TIMEOUT), pytest.raises(OriginError, match=r"0\.5 s"):
        async with origin_request(
            f"h2c://127.0.0.1:{stingy.port}", b"POST", b"/", [], body, 0.5, pool
        ):
            pass


async def test_a_tls_origin_that_never_answers_the_handshake_costs_a_timeout(
    nursery: trio.Nursery, pool: OriginPool
) -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, host="127.0.0.1"), silent, 0)
    origin = f"https://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    with trio.fail_after(TIMEOUT), pytest.raises(OriginError, match="timed out"):
        async with origin_request(origin, b"GET", b"/", [], b"", 0.5, pool):
            pass


async def test_a_ping_flood_from_an_origin_that_never_reads_is_bounded(
    nursery: trio.Nursery, pool: OriginPool
) -> None:
    async def behave(conn: h2.connection.H2Connection, stream: trio.SocketStream, sid: int) -> None:
        while True:  # never reads again, so our PING acks pile up on our side
            for _ in range(1000):
                conn.ping(b"12345678")
            await stream.send_all(conn.data_to_send())

    origin = await hostile_origin(nursery, behave)
    with watchdog(5), trio.fail_after(TIMEOUT), pytest.raises(OriginError):
        async with origin_request(origin, b"GET", b"/", [], b"", 1, pool):
            pass
    (conn,) = [c for group in pool.h2._conns.values() for c in group]
    # Our reader stopped reading once a bounded amount of acks waited for the writer.
    assert 0 < len(conn._out) <= origin_h2._MAX_OUTBOUND + 2 * origin_h2._RECEIVE_BYTES


# 3. Through a served enforcer, HTTP/1.1 clients over real TLS.


@dataclasses.dataclass
class Served:
    port: int
    enforcer: Enforcer
    layout: DemoLayout


@pytest.fixture
async def serve_with_origin(
    nursery: trio.Nursery, demo: DemoLayout, tmp_path: Path
) -> Callable[..., Any]:
    async def start(origin: str, origin_ca: str | None = None) -> Served:
        cfg = load_config(demo.config)
        cfg = dataclasses.replace(
            cfg,
            applications=tuple(
                dataclasses.replace(a, origin=origin, origin_ca=origin_ca) for a in cfg.applications
            ),
        )
        clock = FixedClock(dt.datetime.now(dt.UTC))
        state = tmp_path / f"state-{trio.current_time()}.sqlite"
        enforcer = Enforcer(cfg, clock, AccessLog(io.StringIO()), state_path=state)
        port = await nursery.start(serve, enforcer, await open_listener("127.0.0.1", 0))
        return Served(port, enforcer, DemoLayout(demo.root, port))

    return start


def device_ctx(layout: DemoLayout) -> ssl.SSLContext:
    return client_context(layout.edge_ca, *layout.device("valid"))


class H11Client:
    """An HTTP/1.1 client over real TLS that keeps every event it sees (trailers too)."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, served: Served) -> H11Client:
        tcp = await trio.open_tcp_stream("127.0.0.1", served.port)
        stream = trio.SSLStream(tcp, device_ctx(served.layout), server_hostname=AUTH_HOST)
        await stream.do_handshake()
        return cls(stream)

    async def send(
        self,
        method: str,
        path: str,
        headers: list[tuple[str, str]] = (),  # type: ignore[assignment]
        body: bytes | None = None,
        chunks: list[bytes] | None = None,
    ) -> None:
        hdrs = [("host", AUTH_HOST), *headers]
        if body is not None:
            hdrs.append(("content-length", str(len(body))))
        elif chunks is not None:
            hdrs.append(("transfer-encoding", "chunked"))
        request = h11.Request(method=method, target=path, headers=hdrs)
        await self.stream.send_all(self.h11.send(request))
        for part in [body] if body is not None else chunks or []:
            if part:
                await self.stream.send_all(self.h11.send(h11.Data(data=part)))
        await self.stream.send_all(self.h11.send(h11.EndOfMessage()))

    async def event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            self.h11.receive_data(data)

    async def response(self) -> tuple[h11.Response, bytes, list[tuple[bytes, bytes]]]:
        head = await self.event()
        assert isinstance(head, h11.Response), head
        body = b""
        while True:
            event = await self.event()
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
                    self.h11.start_next_cycle()
                return head, body, list(event.headers)
            else:
                raise AssertionError(f"unexpected {event!r}")

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def test_http1_client_to_h2c_origin_gets_body_and_chunked_trailers(
    serve_with_origin: Callable[..., Any], echo: H2EchoOrigin
) -> None:
    served = await serve_with_origin(f"h2c://127.0.0.1:{echo.port}")
    client = await H11Client.open(served)
    try:
        with trio.fail_after(TIMEOUT):
            await client.send("GET", "/trailers")
            head, body, trailers = await client.response()
            assert head.status_code == 200
            assert (b"transfer-encoding", b"chunked") in head.headers
            assert json.loads(body)["authority"] == f"127.0.0.1:{echo.port}"
            assert trailers == [(b"x-echo-trailer", b"done"), (b"grpc-status", b"0")]
            # The same client connection carries on.
            await client.send("GET", "/again")
            head, body, trailers = await client.response()
            assert json.loads(body)["path"] == "/again" and trailers == []
    finally:
        await client.aclose()


async def test_curl_http1_sees_the_trailers(
    serve_with_origin: Callable[..., Any], echo: H2EchoOrigin
) -> None:
    served = await serve_with_origin(f"h2c://127.0.0.1:{echo.port}")
    cert, key = served.layout.device("valid")
    result = await run(
        [
            "curl",
            "-sS",
            "--http1.1",
            "-D",
            "-",  # curl hands trailers to its header callback: they follow the body here
            "--cacert",
            str(served.layout.edge_ca),
            "--cert",
            str(cert),
            "--key",
            str(key),
            "--resolve",
            f"{AUTH_HOST}:{served.port}:127.0.0.1",
            f"https://{AUTH_HOST}:{served.port}/trailers",
        ]
    )
    assert result.returncode == 0, result.stderr
    head, _, rest = result.stdout.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert b'"path": "/trailers"' in rest
    assert rest.endswith(b"x-echo-trailer: done\r\ngrpc-status: 0\r\n")


async def test_http1_client_grpc_unary_to_grpc_origin(
    serve_with_origin: Callable[..., Any], grpc_port: int
) -> None:
    served = await serve_with_origin(f"grpc://127.0.0.1:{grpc_port}")
    client = await H11Client.open(served)
    try:
        with trio.fail_after(TIMEOUT):
            await client.send(
                "POST",
                "/echo.Echo/Unary",
                [(k.decode(), v.decode()) for k, v in GRPC_HEADERS],
                body=grpc_frame(b"hello"),
            )
            head, body, trailers = await client.response()
        assert head.status_code == 200
        assert grpc_messages(body) == [b"olleh"]
        assert dict(trailers)[b"grpc-status"] == b"0"
    finally:
        await client.aclose()


async def test_http1_client_to_https_h2_origin(
    serve_with_origin: Callable[..., Any],
    nursery: trio.Nursery,
    origin_pki: OriginPKI,
) -> None:
    tls = origin_tls_context(origin_pki.cert_pem, origin_pki.key_pem, ["h2", "http/1.1"])
    echo = H2EchoOrigin(tls=tls)
    await nursery.start(echo.serve)
    served = await serve_with_origin(f"https://localhost:{echo.port}", origin_pki.ca_pem)
    client = await H11Client.open(served)
    try:
        with trio.fail_after(TIMEOUT):
            await client.send("GET", "/over-tls")
            head, body, _ = await client.response()
        assert head.status_code == 200
        assert json.loads(body)["scheme"] == "https"
    finally:
        await client.aclose()


async def test_an_https_origin_the_trust_store_cannot_verify_gives_502(
    serve_with_origin: Callable[..., Any],
    nursery: trio.Nursery,
    origin_pki: OriginPKI,
) -> None:
    tls = origin_tls_context(origin_pki.cert_pem, origin_pki.key_pem, ["h2"])
    echo = H2EchoOrigin(tls=tls)
    await nursery.start(echo.serve)
    served = await serve_with_origin(f"https://localhost:{echo.port}")  # no origin_ca
    client = await H11Client.open(served)
    try:
        with trio.fail_after(TIMEOUT):
            await client.send("GET", "/")
            head, _, _ = await client.response()
        assert head.status_code == 502
        assert echo.requests == []
    finally:
        await client.aclose()


async def test_origin_ca_through_the_control_plane(
    serve_with_origin: Callable[..., Any], origin_pki: OriginPKI
) -> None:
    served = await serve_with_origin("http://127.0.0.1:9")
    enforcer = served.enforcer
    app_id = f"config-0-{AUTH_HOST}"

    async def update(body: dict[str, Any]) -> None:
        await enforcer.controller.write(
            lambda objects, now: control.update_app(
                objects, "demo", app_id, body, enforcer.controller.limits, now
            )
        )

    with pytest.raises(control.ApiError, match="only an https:// or grpcs:// origin"):
        await update({"origin_ca": origin_pki.ca_pem})
    with pytest.raises(control.ApiError, match="not PEM CA certificates"):
        await update({"origin": "https://localhost:1", "origin_ca": "nope"})
    await update({"origin": "https://localhost:1", "origin_ca": origin_pki.ca_pem})
    app = enforcer.snapshot.applications[AUTH_HOST]
    assert (app.origin, app.origin_ca) == ("https://localhost:1", origin_pki.ca_pem)


async def test_a_large_chunked_upload_arrives_intact(
    serve_with_origin: Callable[..., Any], echo: H2EchoOrigin
) -> None:
    served = await serve_with_origin(f"h2c://127.0.0.1:{echo.port}")
    parts = [bytes([65 + i % 26]) * 50_000 for i in range(60)]  # 3 MB, chunked
    client = await H11Client.open(served)
    try:
        with trio.fail_after(TIMEOUT * 2):
            await client.send("POST", "/upload", chunks=parts)
            head, body, _ = await client.response()
        seen = json.loads(body)
        assert head.status_code == 200
        assert seen["body_bytes"] == sum(map(len, parts))
        assert seen["body_sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()
    finally:
        await client.aclose()


async def test_response_streams_to_the_client_before_the_origin_finishes(
    serve_with_origin: Callable[..., Any], echo: H2EchoOrigin
) -> None:
    served = await serve_with_origin(f"h2c://127.0.0.1:{echo.port}")
    client = await H11Client.open(served)
    try:
        with trio.fail_after(TIMEOUT):
            await client.send("GET", "/slow")
            head = await client.event()
            assert isinstance(head, h11.Response)
            first = await client.event()
            assert isinstance(first, h11.Data) and first.data == b"first chunk\n"
            assert not echo.release.is_set()
            echo.release.set()
            rest = await client.event()
            assert isinstance(rest, h11.Data) and rest.data == b"second chunk\n"
            assert isinstance(await client.event(), h11.EndOfMessage)
    finally:
        await client.aclose()


async def test_origin_reset_mid_body_aborts_the_client_and_serving_goes_on(
    serve_with_origin: Callable[..., Any], echo: H2EchoOrigin
) -> None:
    served = await serve_with_origin(f"h2c://127.0.0.1:{echo.port}")
    client = await H11Client.open(served)
    try:
        with trio.fail_after(TIMEOUT):
            await client.send("GET", "/reset-mid-body")
            assert isinstance(await client.event(), h11.Response)
            events = []
            while True:
                try:
                    event = await client.event()
                except h11.RemoteProtocolError:
                    break  # the connection ended inside the chunked body: aborted
                events.append(event)
                assert not isinstance(event, h11.EndOfMessage), "the body must not look complete"
    finally:
        await client.aclose()
    again = await H11Client.open(served)
    try:
        with trio.fail_after(TIMEOUT):
            await again.send("GET", "/reset-before-head")  # reset before any head: a 502
            head, _, _ = await again.response()
            assert head.status_code == 502
            await again.send("GET", "/after")
            head, body, _ = await again.response()
        assert head.status_code == 200 and json.loads(body)["path"] == "/after"
    finally:
        await again.aclose()


async def test_client_disconnect_resets_its_origin_stream_only(
    serve_with_origin: Callable[..., Any], echo: H2EchoOrigin
) -> None:
    served = await serve_with_origin(f"h2c://127.0.0.1:{echo.port}")
    slow = await H11Client.open(served)
    endless = await H11Client.open(served)
    try:
        with trio.fail_after(TIMEOUT):
            await slow.send("GET", "/slow")
            assert isinstance(await slow.event(), h11.Response)
            assert isinstance(await slow.event(), h11.Data)
            await endless.send("GET", "/forever")
            assert isinstance(await endless.event(), h11.Response)
            assert isinstance(await endless.event(), h11.Data)
            await endless.aclose()  # the client goes away mid-response
            await echo.reset_seen.wait()
            echo.release.set()
            rest = await slow.event()
            assert isinstance(rest, h11.Data) and rest.data == b"second chunk\n"
            assert isinstance(await slow.event(), h11.EndOfMessage)
    finally:
        await slow.aclose()
    assert [code for _, code in echo.resets] == [8]  # CANCEL, for the endless stream only
    assert echo.connections == 1  # both requests shared one origin connection


async def test_two_concurrent_clients_with_max_concurrent_streams_one(
    serve_with_origin: Callable[..., Any], nursery: trio.Nursery
) -> None:
    echo = H2EchoOrigin(max_concurrent_streams=1)
    await nursery.start(echo.serve)
    served = await serve_with_origin(f"h2c://127.0.0.1:{echo.port}")
    bodies: list[bytes] = []

    async def one(path: str) -> None:
        client = await H11Client.open(served)
        try:
            await client.send("GET", path)
            _, body, _ = await client.response()
            bodies.append(body)
        finally:
            await client.aclose()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as both:
            both.start_soon(one, "/slow")
            both.start_soon(one, "/plain")
            while len(echo.requests) < 1:
                await trio.sleep(0.01)
            echo.release.set()
    assert len(bodies) == 2 and echo.most_open == 1


# The end-to-end h2 client -> enforcer -> grpc:// origin test (grpcio as the client) needs the
# enforcer's HTTP/2 server (branch i16-server); it belongs with that merge.
