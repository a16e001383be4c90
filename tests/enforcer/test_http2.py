"""HTTP/2 through the enforcer over real TLS: h2 clients, curl --http2, grpcio (access-flow G1-G9).

Every stream gets the access decision (G1), ``:authority`` must equal SNI (G3, with a client
that coalesces), No Duration serves one stream per connection (G4), gRPC denials speak gRPC
(D4), and the access log names the protocol and the stream (G9).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shutil
import socket
import ssl
import struct

import h2.errors
import pytest
import trio
import trio.testing
from cryptography import x509

from enforcer.config import ConfigError, load_config
from enforcer.reasons import GRPC_STATUS, Reason
from testbed.demo import AUTH_HOST, IOT_HOST
from tests.conftest import Served
from tests.enforcer.test_live_checks import revoke
from tests.h2wire import H2Client
from tests.wire import Connection, admin_call, client_context, receive_until, run


def ctx_for(served: Served, device: str | None) -> ssl.SSLContext:
    if device is None:
        return client_context(served.layout.edge_ca)
    cert, key = served.layout.device(device)
    return client_context(served.layout.edge_ca, cert, key)


def requests(served: Served) -> list[dict[str, object]]:
    return [r for r in served.log() if "event" not in r]


async def test_an_h2_stream_reaches_the_http1_origin(served: Served) -> None:
    client = await H2Client.open(served.port, AUTH_HOST, ctx_for(served, "valid"))
    try:
        response = await client.request("/a/b?c=1", headers=[("x-test", "1")])
    finally:
        await client.aclose()
    assert response.status == 200
    echo = json.loads(response.body)
    assert (echo["method"], echo["path"]) == ("GET", "/a/b?c=1")
    assert echo["headers"]["x-test"] == "1"
    assert echo["headers"]["x-forwarded-host"] == AUTH_HOST  # :authority became the Host
    assert echo["headers"]["cf-access-jwt-assertion"].count(".") == 2
    assert response.header("set-cookie").startswith("CF_Authorization=")  # type: ignore[union-attr]
    record = served.last()
    assert (record["http"], record["stream"], record["request"]) == ("HTTP/2", 1, 1)
    assert record["decision"] == "allowed" and record["host"] == AUTH_HOST


async def test_http1_requests_log_their_protocol_and_no_stream(served: Served) -> None:
    ctx = ctx_for(served, "valid")
    ctx.set_alpn_protocols(["http/1.1"])
    conn = await Connection.open(served.port, AUTH_HOST, ctx)
    try:
        assert conn.ssl_object.selected_alpn_protocol() == "http/1.1"
        assert (await conn.request("/")).status == 200
    finally:
        await conn.aclose()
    record = served.last()
    assert record["http"] == "HTTP/1.1" and "stream" not in record


async def test_a_client_offering_both_gets_h2(served: Served) -> None:
    ctx = ctx_for(served, "valid")
    ctx.set_alpn_protocols(["http/1.1", "h2"])  # the server's preference decides
    tcp = await trio.open_tcp_stream("127.0.0.1", served.port)
    stream = trio.SSLStream(tcp, ctx, server_hostname=AUTH_HOST)
    await stream.do_handshake()
    assert stream.selected_alpn_protocol() == "h2"
    await stream.aclose()


async def test_every_stream_is_decided_at_its_own_time(served: Served) -> None:
    client = await H2Client.open(served.port, AUTH_HOST, ctx_for(served, "valid"))
    try:
        assert (await client.request("/")).status == 200
        revoke(served, "valid")
        second = await client.request("/")
        assert (second.status, second.reason) == (403, "revoked")
        assert not client.closed  # the connection carries on; only the stream was denied
    finally:
        await client.aclose()
    assert [(r["stream"], r["status"]) for r in requests(served)] == [(1, 200), (3, 403)]


async def test_expiry_applies_to_the_next_stream(served: Served) -> None:
    leaf = x509.load_pem_x509_certificates(served.layout.device("valid")[0].read_bytes())[0]
    client = await H2Client.open(served.port, AUTH_HOST, ctx_for(served, "valid"))
    try:
        served.clock.set(leaf.not_valid_after_utc)  # the last valid second
        assert (await client.request("/")).status == 200
        served.clock.advance(dt.timedelta(seconds=1))
        late = await client.request("/")
        assert (late.status, late.reason) == (403, "certificate_expired")
    finally:
        await client.aclose()


async def test_a_cookie_split_over_fields_admits_a_stream(served: Served) -> None:
    # HTTP/2 clients may send each cookie as its own field (RFC 9113 §8.2.3).
    client = await H2Client.open(served.port, AUTH_HOST, ctx_for(served, "valid"))
    try:
        cookie = (await client.request("/")).header("set-cookie")
    finally:
        await client.aclose()
    assert cookie is not None
    anonymous = await H2Client.open(served.port, AUTH_HOST, ctx_for(served, None))
    try:
        fields = [("cookie", "theme=dark"), ("cookie", cookie.split(";")[0])]
        response = await anonymous.request("/", headers=fields)
        without = await anonymous.request("/")
    finally:
        await anonymous.aclose()
    assert response.status == 200 and served.log()[-2]["admitted_by"] == "token"
    assert (without.status, without.reason) == (403, "no_certificate")


async def test_a_token_in_cf_access_token_admits_a_stream(served: Served) -> None:
    # Non-browser clients (cloudflared access curl, gRPC metadata) send the token in a header.
    client = await H2Client.open(served.port, AUTH_HOST, ctx_for(served, "valid"))
    try:
        cookie = (await client.request("/")).header("set-cookie")
    finally:
        await client.aclose()
    assert cookie is not None
    token = cookie.split(";")[0].split("=", 1)[1]
    anonymous = await H2Client.open(served.port, AUTH_HOST, ctx_for(served, None))
    try:
        response = await anonymous.request("/", headers=[("cf-access-token", token)])
        forged = await anonymous.request("/", headers=[("cf-access-token", token[:-4] + "AAAA")])
    finally:
        await anonymous.aclose()
    assert response.status == 200 and served.log()[-2]["admitted_by"] == "token"
    # The client's header is the enforcer's to read, never the origin's.
    assert "cf-access-token" not in json.loads(response.body)["headers"]
    assert (forged.status, forged.reason) == (403, "no_certificate")


async def test_coalesced_stream_for_another_hostname_is_misdirected(served: Served) -> None:
    # Both demo hostnames share one edge certificate, so a browser-like client may reuse its
    # connection to AUTH_HOST for IOT_HOST (RFC 9113 §9.1.1): the stream gets 421, the
    # connection stays, and AUTH_HOST's streams go on being served on it.
    client = await H2Client.open(served.port, AUTH_HOST, ctx_for(served, "valid"))
    try:
        a = client.start("/", authority=AUTH_HOST)
        b = client.start("/", authority=IOT_HOST)
        await client.flush()
        first, other = await client.response(a), await client.response(b)
        assert first.status == 200
        assert (other.status, other.reason) == (421, "misdirected")
        again = await client.request("/", authority=AUTH_HOST)
        assert again.status == 200
        assert not client.closed and client.goaway_last is None
    finally:
        await client.aclose()
    by_stream = {r["stream"]: r for r in requests(served)}
    assert by_stream[b]["reason"] == "misdirected" and by_stream[b]["host"] == IOT_HOST


async def test_host_differing_from_authority_ends_the_connection(served: Served) -> None:
    # RFC 9113 §8.3.1: such a request is malformed; h2 refuses it as a connection error.
    client = await H2Client.open(served.port, AUTH_HOST, ctx_for(served, "valid"), validate=False)
    try:
        sid = client.start("/", headers=[("host", IOT_HOST)])
        await client.flush()
        response = await client.response(sid)
        await client.wait_closed()
    finally:
        await client.aclose()
    assert response.status is None
    assert client.goaway_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert requests(served) == []


async def test_no_duration_serves_one_stream_per_connection(served: Served) -> None:
    client = await H2Client.open(served.port, IOT_HOST, ctx_for(served, "valid"))
    try:
        first = client.start("/one")
        second = client.start("/two")
        await client.flush()
        one = await client.response(first)
        two = await client.response(second)
        assert one.status == 200 and one.header("set-cookie") is None
        assert two.reset == h2.errors.ErrorCodes.REFUSED_STREAM
        await client.wait_closed()
        assert client.goaway_last == first
        assert client.goaway_code == h2.errors.ErrorCodes.NO_ERROR
    finally:
        await client.aclose()
    assert [r["path"] for r in requests(served)] == ["/one"]  # the refused one never became one


async def test_the_last_stream_a_connection_allows_gets_a_goaway(serve_config) -> None:
    served = await serve_config(max_requests_per_connection=2)
    client = await H2Client.open(served.port, AUTH_HOST, ctx_for(served, "valid"))
    try:
        ids = [client.start(f"/{i}") for i in range(3)]
        await client.flush()
        got = [await client.response(sid) for sid in ids]
        assert [g.status for g in got[:2]] == [200, 200]
        assert got[2].reset == h2.errors.ErrorCodes.REFUSED_STREAM
        await client.wait_closed()
        assert client.goaway_last == ids[1]
    finally:
        await client.aclose()


async def test_an_idle_connection_is_closed(serve_config) -> None:
    served = await serve_config(idle_timeout=0.2)
    client = await H2Client.open(served.port, AUTH_HOST, ctx_for(served, "valid"))
    try:
        assert (await client.request("/")).status == 200
        await client.wait_closed()
        assert client.goaway_code == h2.errors.ErrorCodes.NO_ERROR
    finally:
        await client.aclose()


async def test_settings_the_enforcer_announces(serve_config) -> None:
    served = await serve_config(max_header_bytes=8192)
    client = await H2Client.open(served.port, AUTH_HOST, ctx_for(served, "valid"))
    try:
        assert (await client.request("/")).status == 200
    finally:
        await client.aclose()
    codes = h2.settings.SettingCodes
    assert client.remote_settings[codes.MAX_CONCURRENT_STREAMS] == 128
    assert client.remote_settings[codes.MAX_HEADER_LIST_SIZE] == 8192
    # RFC 8441's extended CONNECT (WebSocket over HTTP/2) is not offered.
    assert client.remote_settings.get(codes.ENABLE_CONNECT_PROTOCOL, 0) == 0


async def test_connect_gets_501_as_on_http1(served: Served) -> None:
    client = await H2Client.open(served.port, AUTH_HOST, ctx_for(served, "valid"))
    try:
        sid = client.start(pseudo=[(":method", "CONNECT"), (":authority", "example.com:443")])
        await client.flush()
        response = await client.response(sid)
        assert response.status == 501
        assert (await client.request("/")).status == 200  # the connection is still good
    finally:
        await client.aclose()
    assert requests(served)[0]["decision"] == "refused"


# gRPC denials (access-flow D4).


def grpc_headers() -> list[tuple[str, str]]:
    return [("content-type", "application/grpc"), ("te", "trailers")]


@pytest.mark.parametrize(
    ("device", "host", "code", "reason"),
    [
        (None, AUTH_HOST, 16, "no_certificate"),
        ("expired", AUTH_HOST, 16, "certificate_expired"),
        ("foreign-ca", AUTH_HOST, 16, "untrusted_issuer"),
        ("wrong-cn", IOT_HOST, 7, "policy_denied"),
    ],
)
async def test_grpc_denials_are_trailers_only_responses(
    served: Served, device: str | None, host: str, code: int, reason: str
) -> None:
    client = await H2Client.open(served.port, host, ctx_for(served, device))
    try:
        sid = client.start("/pkg.Svc/Method", method="POST", headers=grpc_headers(), end=False)
        await client.flush()
        await client.send_body(sid, b"\x00\x00\x00\x00\x00")
        response = await client.response(sid)
    finally:
        await client.aclose()
    assert response.status == 200 and response.body == b""
    assert response.header("content-type") == "application/grpc"
    assert response.header("grpc-status") == str(code)
    assert response.header("grpc-message") == reason
    assert response.reason == reason
    assert response.trailers == []  # trailers-only: one HEADERS frame with END_STREAM
    record = served.last()
    assert record["status"] == 200 and record["reason"] == reason


async def test_grpc_denial_over_http1(served: Served) -> None:
    conn = await Connection.open(served.port, AUTH_HOST, ctx_for(served, None))
    try:
        response = await conn.request("/pkg.Svc/Method", method="POST", headers=grpc_headers())
    finally:
        await conn.aclose()
    assert response.status == 200 and response.body == b""
    assert response.header("grpc-status") == "16"
    assert response.header("grpc-message") == "no_certificate"


def test_every_reason_code_has_a_grpc_status() -> None:
    assert set(GRPC_STATUS) == set(Reason)
    assert GRPC_STATUS[Reason.POLICY_DENIED] == 7
    assert {GRPC_STATUS[r] for r in Reason if r.value.startswith("certificate")} == {16}


# Bodies, flow control and cancellation.


async def test_a_request_body_streams_to_the_origin(served: Served) -> None:
    # Four times the stream's window: the enforcer must acknowledge as the origin reads.
    body = bytes(range(256)) * 1024
    client = await H2Client.open(served.port, AUTH_HOST, ctx_for(served, "valid"))
    try:
        response = await client.request(
            "/upload", method="POST", body=body, headers=[("content-length", str(len(body)))]
        )
        chunked = await client.request("/upload", method="POST", body=body)
    finally:
        await client.aclose()
    assert response.status == 200
    echo = json.loads(response.body)
    assert echo["body_bytes"] == len(body)
    assert echo["headers"]["content-length"] == str(len(body))  # kept when the client sent it
    echo = json.loads(chunked.body)
    assert echo["body_bytes"] == len(body)
    assert echo["headers"]["transfer-encoding"] == "chunked"  # else the origin gets it chunked


async def test_a_body_too_slow_or_too_large_is_answered_on_its_stream(
    serve_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    import enforcer.http2

    served = await serve_config(request_timeout=0.5)
    monkeypatch.setattr(enforcer.http2, "MAX_BODY", 1000)
    client = await H2Client.open(served.port, AUTH_HOST, ctx_for(served, "valid"))
    try:
        slow = client.start("/upload", method="POST", end=False)  # and never a DATA frame
        await client.flush()
        assert (await client.response(slow)).status == 408
        large = await client.request("/upload", method="POST", body=b"x" * 5000)
        assert large.status == 413
        assert (await client.request("/")).status == 200  # the connection carries on
    finally:
        await client.aclose()
    assert [r["status"] for r in requests(served)] == [408, 413, 200]


async def test_a_slow_origin_slows_the_client(served: Served) -> None:
    # The origin is one end of a lockstep stream (no buffer at all: a write returns once the
    # origin read it), reading 4 KiB at a time with pauses. The enforcer must acknowledge the
    # client's DATA only as the origin takes it, so at every read the client can have sent no
    # more than the origin read plus one stream window and a frame or two in flight. An
    # enforcer acknowledging on receipt lets the client run ahead by the whole body.
    import h11
    import trio.testing

    from enforcer.proxy import OriginPool

    to_origin, origin_end = trio.testing.lockstep_stream_pair()

    async def connect(host: str, port: int) -> trio.abc.Stream:
        return to_origin

    served.enforcer.origins = OriginPool(connect)
    size = 512 * 1024
    sent = 0
    taken = 0
    most_ahead = 0

    async def origin() -> None:
        nonlocal taken, most_ahead
        conn = h11.Connection(h11.SERVER)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await origin_end.receive_some(4096))
                most_ahead = max(most_ahead, sent - taken)
                await trio.sleep(0.002)
            elif isinstance(event, h11.Data):
                taken += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
        body = b"%d" % taken
        await origin_end.send_all(
            conn.send(h11.Response(status_code=200, headers=[("content-length", str(len(body)))]))
            + conn.send(h11.Data(data=body))
            + conn.send(h11.EndOfMessage())
        )

    client = await H2Client.open(served.port, AUTH_HOST, ctx_for(served, "valid"))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(origin)
            sid = client.start("/upload", method="POST", end=False)
            await client.flush()
            conn = client.conn
            while sent < size:
                window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if window <= 0:
                    await client.pump()
                    continue
                n = min(window, size - sent)
                conn.send_data(sid, b"x" * n)
                sent += n
                await client.flush()
            conn.end_stream(sid)
            await client.flush()
            response = await client.response(sid)
    finally:
        await client.aclose()
    assert response.status == 200 and bytes(response.body) == b"%d" % size
    assert 0 < most_ahead <= 65535 + 2 * 16384, most_ahead


async def test_a_large_response_respects_a_small_client_window(served: Served) -> None:
    size = 300_000

    async def big(*args: object) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        return 200, [(b"content-type", b"application/octet-stream")], b"x" * size

    served.enforcer.origins.app = big
    # A 1000-byte stream window: the client's h2 raises FlowControlError should the enforcer
    # send past it, so finishing at all shows it waited for every WINDOW_UPDATE.
    client = await H2Client.open(served.port, AUTH_HOST, ctx_for(served, "valid"), window=1000)
    try:
        response = await client.request("/big")
    finally:
        await client.aclose()
    assert response.status == 200 and len(response.body) == size
    assert response.largest_frame <= 1000 and response.data_frames >= size // 1000


async def test_a_client_that_reads_nothing_is_cut_after_request_timeout(serve_config) -> None:
    served = await serve_config(request_timeout=1.0)
    size = 64 * 1024 * 1024

    async def huge(*args: object) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        return 200, [(b"content-type", b"application/octet-stream")], b"x" * size

    served.enforcer.origins.app = huge
    # Windows wide open, so the enforcer is held by the socket, not by flow control (which
    # has its own bound); then the client never reads.
    client = await H2Client.open(served.port, AUTH_HOST, ctx_for(served, "valid"), window=2**31 - 1)
    try:
        client.conn.increment_flow_control_window(2**31 - 1 - 65535)
        client.start("/huge")
        await client.flush()
        with trio.fail_after(30):
            while not any(
                r.get("event") == "tls_error" and "read nothing" in str(r.get("detail"))
                for r in served.log()
            ):
                await trio.sleep(0.1)
    finally:
        await client.aclose()
    served.enforcer.origins.app = None
    other = await H2Client.open(served.port, AUTH_HOST, ctx_for(served, "valid"))
    try:
        assert (await other.request("/")).status == 200
    finally:
        await other.aclose()


def hang_the_origin(served: Served) -> tuple[trio.Event, trio.Event]:
    """Make the origin (in-process) never answer; return its (started, cancelled) events."""
    started, cancelled = trio.Event(), trio.Event()

    async def hangs(*args: object) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()
        raise AssertionError("unreachable")

    served.enforcer.origins.app = hangs
    return started, cancelled


async def test_a_client_reset_cancels_the_origin_exchange(served: Served) -> None:
    started, cancelled = hang_the_origin(served)
    client = await H2Client.open(served.port, AUTH_HOST, ctx_for(served, "valid"))
    try:
        sid = client.start("/slow")
        await client.flush()
        with trio.fail_after(10):
            await started.wait()
        client.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        await client.flush()
        with trio.fail_after(10):
            await cancelled.wait()
        served.enforcer.origins.app = None
        assert (await client.request("/")).status == 200  # the connection is still good
    finally:
        await client.aclose()


async def test_a_stream_reset_as_it_opens_is_never_decided(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    import enforcer.exchange

    decided = []
    original = enforcer.exchange.decide

    def counting(*args: object, **kwargs: object) -> object:
        decided.append(1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(enforcer.exchange, "decide", counting)
    client = await H2Client.open(served.port, AUTH_HOST, ctx_for(served, "valid"))
    try:
        sid = client.start("/reset")
        client.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        await client.flush()  # HEADERS and RST_STREAM in one TLS record, so in one read
        assert (await client.request("/after")).status == 200
    finally:
        await client.aclose()
    assert [r["path"] for r in requests(served)] == ["/after"]
    assert len(decided) == 1  # a rapid reset costs no decision (and no token signature)


async def test_a_client_that_vanishes_ends_its_streams_quietly(served: Served) -> None:
    started, cancelled = hang_the_origin(served)
    client = await H2Client.open(served.port, AUTH_HOST, ctx_for(served, "valid"))
    client.start("/slow")
    await client.flush()
    with trio.fail_after(10):
        await started.wait()
    # A TCP reset (SO_LINGER 0): no close_notify, no GOAWAY, and the next read fails.
    tcp = client.stream.transport_stream
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await trio.aclose_forcefully(tcp)
    with trio.fail_after(10):
        await cancelled.wait()
    await trio.testing.wait_all_tasks_blocked()  # the connection's task has finished
    served.enforcer.origins.app = None
    # The connection's end is at most a tls_error line, never an internal error.
    assert all("internal error" not in str(r.get("detail")) for r in served.log())


async def test_origin_trailers_end_the_stream(served: Served) -> None:
    # An in-process origin cannot send trailers; this checks the relay path that gRPC
    # origins (i16-origins) fill: OriginResponse.trailers go out as a last HEADERS frame.
    from enforcer import proxy

    original = proxy.OriginResponse

    class WithTrailers(original):  # type: ignore[misc,valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self.trailers = [(b"grpc-status", b"0"), (b"grpc-message", b"ok")]

    proxy.OriginResponse = WithTrailers  # type: ignore[misc]
    try:
        client = await H2Client.open(served.port, AUTH_HOST, ctx_for(served, "valid"))
        served.enforcer.origins.app = _echo_app
        try:
            response = await client.request("/")
        finally:
            await client.aclose()
    finally:
        proxy.OriginResponse = original  # type: ignore[misc]
    assert response.status == 200
    assert response.trailers == [("grpc-status", "0"), ("grpc-message", "ok")]


async def _echo_app(
    method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    from enforcer.origin import echo_app

    return await echo_app(method, target, headers, body)


# ALPN.


async def test_an_application_can_refuse_h2(serve_config, demo) -> None:
    config = load_config(demo.config)
    apps = tuple(
        dataclasses.replace(a, alpn=("http/1.1",)) if a.hostname == AUTH_HOST else a
        for a in config.applications
    )
    served = await serve_config(dataclasses.replace(config, applications=apps))

    async def selected(host: str, offer: list[str]) -> str | None:
        ctx = ctx_for(served, "valid")
        ctx.set_alpn_protocols(offer)
        tcp = await trio.open_tcp_stream("127.0.0.1", served.port)
        stream = trio.SSLStream(tcp, ctx, server_hostname=host)
        await stream.do_handshake()
        try:
            return stream.selected_alpn_protocol()
        finally:
            await stream.aclose()

    assert await selected(AUTH_HOST, ["h2", "http/1.1"]) == "http/1.1"
    assert await selected(AUTH_HOST, ["h2"]) is None  # no overlap: HTTP/1.1 without ALPN
    assert await selected(IOT_HOST, ["h2", "http/1.1"]) == "h2"


async def test_alpn_is_an_admin_api_application_field(serve_config) -> None:
    served = await serve_config(admin=True)
    app = f"/client/v4/accounts/demo/access/apps/config-0-{AUTH_HOST}"
    code, env = await admin_call(served.admin_port, "GET", app)
    assert code == 200 and env["result"]["alpn"] == ["h2", "http/1.1"]
    code, env = await admin_call(served.admin_port, "PUT", app, {"alpn": ["h3"]})
    assert code == 400 and "alpn" in json.dumps(env)
    code, _ = await admin_call(served.admin_port, "PUT", app, {"alpn": ["http/1.1"]})
    assert code == 200
    ctx = ctx_for(served, "valid")
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    conn = await Connection.open(served.port, AUTH_HOST, ctx)  # a new TLS context applies
    try:
        assert conn.ssl_object.selected_alpn_protocol() == "http/1.1"
        assert (await conn.request("/")).status == 200
    finally:
        await conn.aclose()


def test_alpn_config_is_checked(demo) -> None:
    text = demo.config.read_text()
    bad = demo.config.with_name("alpn-check.toml")  # beside the demo's, for its relative paths
    for value, problem in [
        ('["h3"]', "'h3' is not one of"),
        ("[]", "non-empty list"),
        ('["h2", "h2"]', "names a protocol twice"),
        ('"h2"', "expected a list"),
    ]:
        bad.write_text(text.replace("[[applications]]\n", f"[[applications]]\nalpn = {value}\n", 1))
        with pytest.raises(ConfigError, match="alpn") as caught:
            load_config(bad)
        assert problem in str(caught.value) and "applications[0]" in str(caught.value)
    bad.write_text(text.replace("[[applications]]\n", '[[applications]]\nalpn = ["h2"]\n', 1))
    assert load_config(bad).applications[0].alpn == ("h2",)


# Prior-knowledge h2c and the HTTP/2 preface where HTTP/1.1 was negotiated.

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


async def test_prior_knowledge_h2c_over_plain_tcp_is_refused(served: Served) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", served.port)
    try:
        await stream.send_all(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        answer = await receive_until(stream)
    finally:
        await stream.aclose()
    assert b"HTTP" not in answer  # no HTTP/2 SETTINGS, no HTTP/1.1 answer: not TLS at all
    tls_errors = [r for r in served.log() if r.get("event") == "tls_error"]
    assert "not a TLS ClientHello" in str(tls_errors[-1]["detail"])


async def test_the_h2_preface_over_http1_gets_400(served: Served) -> None:
    ctx = ctx_for(served, "valid")
    ctx.set_alpn_protocols(["http/1.1"])
    tcp = await trio.open_tcp_stream("127.0.0.1", served.port)
    stream = trio.SSLStream(tcp, ctx, server_hostname=AUTH_HOST)
    try:
        await stream.do_handshake()
        await stream.send_all(PREFACE)
        answer = await receive_until(stream)
    finally:
        await stream.aclose()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in answer.lower()


# Real clients: curl --http2 and grpcio.

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is installed by .ci/run")


@needs_curl
async def test_curl_http2(served: Served) -> None:
    ok = await run(
        [
            *served.layout.curl(AUTH_HOST, "valid"),
            "--http2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_version}",
        ]
    )
    assert ok.stdout == b"200 2", ok.stderr.decode()
    denied = await run(
        [
            *served.layout.curl(AUTH_HOST),
            "--http2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_version}",
        ]
    )
    assert denied.stdout == b"403 2", denied.stderr.decode()
    assert b"< x-access-denied-reason: no_certificate" in denied.stderr
    assert [r["http"] for r in requests(served)] == ["HTTP/2", "HTTP/2"]


@needs_curl
async def test_curl_http2_makes_a_full_handshake_per_no_duration_request(
    served: Served,
) -> None:
    base = f"https://{IOT_HOST}:{served.port}"
    cmd = served.layout.curl(IOT_HOST, "valid", "/first")
    result = await run(
        [
            *cmd,
            "--http2",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            f"{base}/second",
            "-w",
            "%{http_code} %{num_connects}\n",
        ]
    )
    assert result.stdout == b"200 1\n200 1\n", result.stderr.decode()
    logged = requests(served)
    assert [r["path"] for r in logged] == ["/first", "/second"]
    assert {r["http"] for r in logged} == {"HTTP/2"}
    assert len({r["connection"] for r in logged}) == 2  # two connections...
    assert not any(r["tls"]["resumed"] for r in logged)  # ...each a full handshake
    # The control: on a hostname with a session duration curl reuses its connection.
    served.log_buffer.truncate(0)
    served.log_buffer.seek(0)
    auth = f"https://{AUTH_HOST}:{served.port}"
    cmd = served.layout.curl(AUTH_HOST, "valid", "/first")
    result = await run([*cmd, "--http2", "-o", "/dev/null", "-o", "/dev/null", f"{auth}/second"])
    assert result.returncode == 0, result.stderr.decode()
    assert len({r["connection"] for r in requests(served)}) == 1


async def test_grpcio_sees_the_denial_statuses(served: Served) -> None:
    grpc = pytest.importorskip("grpc")
    layout = served.layout
    root = layout.edge_ca.read_bytes()

    def call(host: str, device: str | None) -> tuple[object, str]:
        if device is None:
            creds = grpc.ssl_channel_credentials(root)
        else:
            cert, key = layout.device(device)
            creds = grpc.ssl_channel_credentials(root, key.read_bytes(), cert.read_bytes())
        options = [("grpc.ssl_target_name_override", host), ("grpc.default_authority", host)]
        with grpc.secure_channel(f"127.0.0.1:{served.port}", creds, options=options) as channel:
            method = channel.unary_unary(
                "/pkg.Svc/Method", request_serializer=None, response_deserializer=None
            )
            try:
                method(b"ping", timeout=10)
            except grpc.RpcError as exc:
                return exc.code(), exc.details()
        raise AssertionError("the call was not denied")

    unauthenticated = await trio.to_thread.run_sync(call, AUTH_HOST, None)
    assert unauthenticated == (grpc.StatusCode.UNAUTHENTICATED, "no_certificate")
    denied = await trio.to_thread.run_sync(call, IOT_HOST, "wrong-cn")
    assert denied == (grpc.StatusCode.PERMISSION_DENIED, "policy_denied")
    assert {r["http"] for r in requests(served)} == {"HTTP/2"}


async def test_grpcio_makes_a_full_handshake_per_no_duration_call(served: Served) -> None:
    grpc = pytest.importorskip("grpc")
    layout = served.layout
    cert, key = layout.device("valid")
    creds = grpc.ssl_channel_credentials(
        layout.edge_ca.read_bytes(), key.read_bytes(), cert.read_bytes()
    )

    def calls(host: str, n: int) -> list[object]:
        # The echo origin answers JSON, not gRPC: each call fails on the client's side once
        # admitted (which is all this test needs: each call became a stream and a log line).
        options = [("grpc.ssl_target_name_override", host), ("grpc.default_authority", host)]
        codes = []
        with grpc.secure_channel(f"127.0.0.1:{served.port}", creds, options=options) as channel:
            method = channel.unary_unary(
                "/pkg.Svc/Method", request_serializer=None, response_deserializer=None
            )
            for _ in range(n):
                try:
                    method(b"ping", timeout=10)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
        return codes

    await trio.to_thread.run_sync(calls, IOT_HOST, 3)
    logged = requests(served)
    assert [r["decision"] for r in logged] == ["allowed"] * 3
    assert len({r["connection"] for r in logged}) == 3  # a new connection per call...
    assert not any(r["tls"]["resumed"] for r in logged)  # ...each a full handshake
    # The control: with a session duration, grpcio keeps one connection for all its calls.
    served.log_buffer.truncate(0)
    served.log_buffer.seek(0)
    await trio.to_thread.run_sync(calls, AUTH_HOST, 3)
    assert len({r["connection"] for r in requests(served)}) == 1
