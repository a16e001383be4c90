"""The HTTP/2 device client over real sockets: against nginx (``listen ... ssl http2``) with
client certificates, and against a small TLS h2 server of our own for what nginx will not do
on request (GOAWAY after every stream, REFUSED_STREAM, a tiny flow-control window, a cookie,
an endless body)."""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import pytest
import trio

from devices.client import COOKIE_NAME, ClientOptions, Target
from devices.h2_client import MAX_BODY, H2DeviceClient
from devices.keystore import SoftwareKeyStore
from testbed.demo import AUTH_HOST, DemoLayout
from testbed.nginx import NGINX, start_nginx, stop_nginx

needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is installed by .ci/run")


def client(layout: DemoLayout, port: int, name: str | None, **options: object) -> H2DeviceClient:
    target = Target("127.0.0.1", port, AUTH_HOST, layout.edge_ca)
    store = SoftwareKeyStore(*layout.device(name)) if name else None
    return H2DeviceClient(target, store, ClientOptions(**options))  # type: ignore[arg-type]


async def nginx(layout: DemoLayout, folder: Path, **kwargs: object) -> tuple[trio.Process, int]:
    return await start_nginx(
        folder,
        cert=layout.root / "edge" / "cert.pem",
        key=layout.root / "edge" / "key.pem",
        client_ca=layout.root / "ca" / "uploaded-chain.pem",
        server_name=AUTH_HOST,
        **kwargs,  # type: ignore[arg-type]
    )


# -- against nginx ----------------------------------------------------------------------------


@needs_nginx
async def test_outcomes_and_timings_against_nginx(demo: DemoLayout, tmp_path: Path) -> None:
    proc, port = await nginx(demo, tmp_path / "nginx", http2=True)
    try:
        attempts = {}
        for name in ("valid", "leaf-only", "expired", "foreign-ca", None):
            c = client(demo, port, name)
            attempts[name] = await c.request("/")
            await c.aclose()
    finally:
        await stop_nginx(proc)
    assert {n: a.outcome for n, a in attempts.items()} == {
        "valid": "allowed",
        "leaf-only": "allowed",
        "expired": "http_400",
        "foreign-ca": "http_400",
        None: "denied:no_certificate",
    }
    assert attempts[None].reason == "no_certificate" and attempts[None].status == 403
    assert attempts["valid"].body.startswith(b"ok ")
    for a in attempts.values():
        t = a.timings
        assert a.protocol == "h2" and a.new_connection
        assert t.connect > 0 and t.handshake > 0 and t.first_byte > 0
        assert t.total >= t.connect + t.handshake
    # Every request really was HTTP/2.
    log = (tmp_path / "nginx" / "access.log").read_text().splitlines()
    assert len(log) == 5 and all('"GET / HTTP/2.0"' in line for line in log)


@needs_nginx
async def test_a_kept_connection_carries_the_next_streams(demo: DemoLayout, tmp_path: Path) -> None:
    proc, port = await nginx(demo, tmp_path / "nginx", http2=True)
    c = client(demo, port, "valid")
    try:
        attempts = [await c.request("/", method="POST", body=b"x" * 64) for _ in range(3)]
    finally:
        await c.aclose()
        await stop_nginx(proc)
    assert [a.outcome for a in attempts] == ["allowed"] * 3
    assert [a.new_connection for a in attempts] == [True, False, False]
    assert c.handshakes == 1
    assert attempts[1].timings.handshake == 0 and attempts[1].timings.first_byte > 0


@needs_nginx
async def test_goaway_after_each_request_means_a_handshake_per_request(
    demo: DemoLayout, tmp_path: Path
) -> None:
    # nginx's keepalive_requests 1: after one stream, GOAWAY (as No Duration on the enforcer).
    proc, port = await nginx(demo, tmp_path / "nginx", http2=True, keepalive_requests=1)
    c = client(demo, port, "valid", resume_sessions=False)
    try:
        attempts = [await c.request("/") for _ in range(3)]
    finally:
        await c.aclose()
        await stop_nginx(proc)
    assert [a.outcome for a in attempts] == ["allowed"] * 3
    assert all(a.new_connection and a.timings.handshake > 0 for a in attempts)
    assert c.handshakes == 3


@needs_nginx
async def test_a_server_without_h2_is_named(demo: DemoLayout, tmp_path: Path) -> None:
    proc, port = await nginx(demo, tmp_path / "nginx")  # HTTP/1.1 only
    c = client(demo, port, "valid")
    try:
        attempt = await c.request("/")
    finally:
        await c.aclose()
        await stop_nginx(proc)
    assert attempt.outcome == "alpn_error:refused"
    assert "no application protocol" in (attempt.error or "")


# -- against a TLS h2 server of our own ---------------------------------------------------------


@dataclasses.dataclass
class Behaviour:
    """What the test server does."""

    goaway_after_each: bool = False
    refuse_stream: int | None = None  # a stream id answered with RST_STREAM(REFUSED_STREAM)
    body_size: int = 0  # response body bytes beyond the echo (to test the client's bound)


@dataclasses.dataclass
class Seen:
    connections: int = 0
    requests: list[dict[str, str]] = dataclasses.field(default_factory=list)
    bodies: list[int] = dataclasses.field(default_factory=list)


async def _serve_h2(stream: trio.SSLStream[trio.SocketStream], b: Behaviour, seen: Seen) -> None:
    await stream.do_handshake()
    seen.connections += 1
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding="latin-1")
    )
    conn.initiate_connection()
    await stream.send_all(conn.data_to_send())
    bodies: dict[int, int] = {}
    pending: dict[int, bytes] = {}
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                if ev.stream_id == b.refuse_stream:
                    conn.reset_stream(ev.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                    continue
                seen.requests.append(dict(ev.headers))
                bodies[ev.stream_id] = 0
            elif isinstance(ev, h2.events.DataReceived):
                bodies[ev.stream_id] = bodies.get(ev.stream_id, 0) + len(ev.data)
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id in bodies:
                sid = ev.stream_id
                seen.bodies.append(bodies[sid])
                headers = [(":status", "200"), ("x-body", str(bodies[sid]))]
                cookie = seen.requests[-1].get("cookie", "")
                if COOKIE_NAME not in cookie:
                    headers.append(("set-cookie", f"{COOKIE_NAME}=token-{sid}; Max-Age=60"))
                conn.send_headers(sid, headers)
                pending[sid] = b"y" * b.body_size + cookie.encode()
        for sid in list(pending):
            # As much as the windows allow, frame by frame.
            while sid in pending:
                window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                chunk, rest = pending[sid][:window], pending[sid][window:]
                if not rest:
                    conn.send_data(sid, chunk, end_stream=True)
                    del pending[sid]
                    if b.goaway_after_each:
                        conn.close_connection(last_stream_id=sid)
                elif not chunk:
                    break
                else:
                    conn.send_data(sid, chunk)
                    pending[sid] = rest
        await stream.send_all(conn.data_to_send())


@pytest.fixture
async def h2_server(
    nursery: trio.Nursery, demo: DemoLayout
) -> AsyncIterator[tuple[int, Behaviour, Seen]]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(demo.root / "edge" / "cert.pem", demo.root / "edge" / "key.pem")
    ctx.load_verify_locations(demo.root / "ca" / "uploaded-chain.pem")
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.set_alpn_protocols(["h2"])
    behaviour, seen = Behaviour(), Seen()
    listeners = await trio.open_ssl_over_tcp_listeners(
        0, ctx, host="127.0.0.1", https_compatible=True
    )

    async def handler(stream: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            await _serve_h2(stream, behaviour, seen)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h2.exceptions.ProtocolError):
            pass  # the client went away, or spoke after our GOAWAY
        finally:
            await trio.aclose_forcefully(stream)

    nursery.start_soon(trio.serve_listeners, handler, listeners)
    yield listeners[0].transport_listener.socket.getsockname()[1], behaviour, seen


async def test_cookie_sent_back_on_the_next_connection(
    demo: DemoLayout, h2_server: tuple[int, Behaviour, Seen]
) -> None:
    port, behaviour, seen = h2_server
    behaviour.goaway_after_each = True
    c = client(demo, port, "valid")
    try:
        first, second = await c.request("/"), await c.request("/")
    finally:
        await c.aclose()
    assert first.cookie_received and not first.cookie_sent
    assert second.cookie_sent and second.new_connection
    assert seen.requests[1]["cookie"] == f"{COOKIE_NAME}=token-1"
    assert seen.requests[1][":authority"] == AUTH_HOST
    assert seen.connections == 2 and c.handshakes == 2


async def test_a_refused_stream_is_retried_on_a_new_connection(
    demo: DemoLayout, h2_server: tuple[int, Behaviour, Seen]
) -> None:
    port, behaviour, seen = h2_server
    behaviour.refuse_stream = 3  # the second stream of the first connection
    c = client(demo, port, "valid", reuse_cookie=False)
    try:
        first, second = await c.request("/"), await c.request("/")
    finally:
        await c.aclose()
    assert first.allowed and first.new_connection
    assert second.allowed and second.new_connection
    assert seen.connections == 2 and len(seen.requests) == 2


async def test_a_body_beyond_the_window_is_sent_with_flow_control(
    demo: DemoLayout, h2_server: tuple[int, Behaviour, Seen]
) -> None:
    port, _, seen = h2_server
    # Above the 65,535-byte windows: the client must wait for the server's WINDOW_UPDATEs.
    c = client(demo, port, "valid")
    try:
        attempt = await c.request("/upload", method="POST", body=b"z" * 300_000)
    finally:
        await c.aclose()
    assert attempt.allowed
    assert ("x-body", "300000") in attempt.headers and seen.bodies == [300_000]


async def test_an_endless_body_is_cut_off(
    demo: DemoLayout, h2_server: tuple[int, Behaviour, Seen]
) -> None:
    port, behaviour, _ = h2_server
    behaviour.body_size = MAX_BODY + 100_000
    c = client(demo, port, "valid")
    try:
        attempt = await c.request("/")
    finally:
        await c.aclose()
    assert attempt.outcome == "h2_error:body_too_large"
