"""What reaches an origin, and what an origin can do back (issue 13), over real loopback sockets.

Forged identity headers (any spelling), origin path joining, pooled connections an origin
left dirty, a 2xx to CONNECT, streamed request bodies, and WebSocket tunnels that are decided
again while they stay open (token expiry, policy change, revocation, another worker's
revocation) or refused as tunnels (h2c).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import io
import signal
import ssl
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import trio
import trio_websocket
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from enforcer import control
from enforcer.accesslog import AccessLog
from enforcer.application import Application
from enforcer.chain import fingerprint
from enforcer.clock import FixedClock
from enforcer.config import ConfigError, EnforcerConfig, load_config
from enforcer.http import BodyTooLarge
from enforcer.origin import echo_app, serve_echo_origin
from enforcer.proxy import (
    OriginError,
    OriginPool,
    WebSocketFrames,
    forwarded_headers,
    join_path,
    origin_request,
    remove_dot_segments,
    websocket_close_frame,
)
from enforcer.server import Enforcer, open_listener, serve
from enforcer.store import Change
from testbed.demo import AUTH_HOST, DemoLayout
from tests.conftest import Served
from tests.wire import Connection, admin_call, client_context, get

ACCOUNT = "demo"
AUTH_APP = f"config-0-{AUTH_HOST}"


def ctx_for(layout: DemoLayout, device: str | None) -> ssl.SSLContext:
    if device is None:
        return client_context(layout.edge_ca)
    return client_context(layout.edge_ca, *layout.device(device))


def leaf_of(layout: DemoLayout, device: str) -> x509.Certificate:
    return x509.load_pem_x509_certificates(layout.device(device)[0].read_bytes())[0]


def with_auth_app(config: EnforcerConfig, **changes: Any) -> EnforcerConfig:
    """The config with the auth application changed."""
    apps = tuple(
        dataclasses.replace(a, **changes) if a.hostname == AUTH_HOST else a
        for a in config.applications
    )
    return dataclasses.replace(config, applications=apps)


def auth_app(enforcer: Enforcer) -> Application:
    return enforcer.snapshot.applications[AUTH_HOST]


async def update_auth_app(enforcer: Enforcer, body: dict[str, Any]) -> None:
    """Change the auth application through the control plane (a real committed write)."""
    controller = enforcer.controller
    await controller.write(
        lambda objects, now: control.update_app(
            objects, ACCOUNT, AUTH_APP, body, controller.limits, now
        )
    )


async def revoke(enforcer: Enforcer, leaf: x509.Certificate) -> None:
    """Revoke a certificate through the control plane."""
    fp = fingerprint(leaf)
    await enforcer.controller.write(
        lambda objects, now: control.Outcome(
            {"fingerprint": fp}, (Change("revocation", fp, {"fingerprint": fp}),)
        )
    )


async def echoed(served: Served, device: str | None, **kwargs: Any) -> dict[str, Any]:
    response = await get(served.port, AUTH_HOST, ctx_for(served.layout, device), **kwargs)
    assert response.status == 200, response
    return response.json()  # type: ignore[no-any-return]


class Spinning(Exception):
    """The code under test ran without ever yielding to trio."""


@contextlib.contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Break a loop that never reaches a checkpoint, which ``trio.fail_after`` cannot do."""

    def alarm(signum: int, frame: FrameType | None) -> None:
        raise Spinning(f"no trio checkpoint for {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


async def raw_origin(nursery: trio.Nursery, handler: Any) -> str:
    """Serve ``handler(stream)`` on loopback; return the origin URL."""

    async def quietly(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await handler(stream)

    serve_tcp = functools.partial(trio.serve_tcp, host="127.0.0.1")
    listeners = await nursery.start(serve_tcp, quietly, 0)
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


async def read_head(stream: trio.abc.Stream, buffer: bytearray) -> bytes | None:
    """The next request head from ``stream`` (bodies are not expected), or None at the end."""
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buffer += data
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    buffer[:] = rest
    return head


# 1. Underscored header names.

FORGED_UNDERSCORED = [
    ("Cf_Client_Cert_Sha256", "00" * 32),
    ("Cf_Client_Cert_Der_Base64", "AAAA"),
    ("Cf_Access_Jwt_Assertion", "forged.jwt.value"),
    ("X_Forwarded_For", "10.0.0.1"),
]


async def test_underscored_header_names_never_reach_the_origin(served: Served) -> None:
    body = await echoed(served, "valid", headers=[*FORGED_UNDERSCORED, ("X_Custom", "1")])
    headers = body["headers"]
    assert [k for k in headers if "_" in k] == []
    digest = hashlib.sha256(leaf_of(served.layout, "valid").public_bytes(Encoding.DER)).hexdigest()
    assert headers["cf-client-cert-sha256"] == digest
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["cf-access-jwt-assertion"] != "forged.jwt.value"


async def test_an_application_may_allow_underscores_but_never_for_owned_headers(
    serve_config: Any, demo: DemoLayout
) -> None:
    config = with_auth_app(load_config(demo.config), underscores_in_headers=True)
    served = await serve_config(config)
    extra = [("Transfer_Encoding", "chunked"), ("X_Real_IP", "10.0.0.2"), ("Ssl_Client_Verify", "")]
    body = await echoed(served, "valid", headers=[*FORGED_UNDERSCORED, *extra, ("X_Custom", "1")])
    headers = body["headers"]
    assert headers["x_custom"] == "1"
    assert [k for k in headers if "_" in k] == ["x_custom"]


async def test_underscores_in_headers_through_the_admin_api(serve_config: Any) -> None:
    served: Served = await serve_config(admin=True)
    path = f"/client/v4/accounts/{ACCOUNT}/access/apps/{AUTH_APP}"
    code, envelope = await admin_call(served.admin_port, "GET", path)
    assert code == 200 and envelope["result"]["underscores_in_headers"] is False
    assert "x_custom" not in (await echoed(served, "valid", headers=[("X_Custom", "1")]))["headers"]

    code, envelope = await admin_call(served.admin_port, "PUT", path, {"underscores_in_headers": 1})
    assert code == 400 and "underscores_in_headers" in str(envelope)
    code, envelope = await admin_call(
        served.admin_port, "PUT", path, {"underscores_in_headers": True}
    )
    assert code == 200 and envelope["result"]["underscores_in_headers"] is True
    assert auth_app(served.enforcer).underscores_in_headers
    headers = (await echoed(served, "valid", headers=[("X_Custom", "1"), *FORGED_UNDERSCORED]))[
        "headers"
    ]
    assert [k for k in headers if "_" in k] == ["x_custom"]


def test_underscores_in_headers_in_the_config_file(demo: DemoLayout, tmp_path: Path) -> None:
    def auth_with(line: str) -> Application:
        # Beside the demo's config: its certificate paths are relative to it.
        path = demo.config.with_name(f"underscores-{tmp_path.name}.toml")
        path.write_text(text.replace(anchor, anchor + line + "\n"))
        try:
            return {a.hostname: a for a in load_config(path).applications}[AUTH_HOST]
        finally:
            path.unlink()

    text = demo.config.read_text()
    anchor = "forward_client_certificate = true\n"
    assert anchor in text
    assert not auth_with("").underscores_in_headers
    assert auth_with("underscores_in_headers = true").underscores_in_headers
    with pytest.raises(ConfigError, match="underscores_in_headers"):
        auth_with('underscores_in_headers = "yes"')


# 2. Identity headers the enforcer owns, and Connection-nominated headers.

FORGED_IDENTITY = [
    ("Cf-Access-Authenticated-User-Email", "admin@example.test"),
    ("Cf-Connecting-Ip", "10.0.0.3"),
    ("True-Client-IP", "10.0.0.4"),
    ("X-Forwarded-Client-Cert", "Hash=00;Subject=CN=admin"),
    ("Forwarded", "for=10.0.0.5;proto=http"),
    ("X-Real-IP", "10.0.0.6"),
    ("Ssl-Client-Verify", "SUCCESS"),
    ("X-SSL-Client-S-DN", "CN=admin"),
    ("X-Forwarded-Host", "evil.example"),
    ("X-Forwarded-For", "10.0.0.7"),
    ("X-Forwarded-Proto", "http"),
    ("Client-Cert", ":AAAA:"),
]


async def test_forged_identity_headers_never_arrive_and_ours_do(served: Served) -> None:
    forged = FORGED_IDENTITY
    headers = (await echoed(served, "valid", headers=forged))["headers"]
    for name, value in forged:
        assert headers.get(name.lower()) != value, name
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "https"
    assert headers["x-forwarded-host"] == AUTH_HOST
    assert headers["forwarded"] == f"for=127.0.0.1;host={AUTH_HOST};proto=https"
    for owned in (
        "cf-access-authenticated-user-email",
        "cf-connecting-ip",
        "true-client-ip",
        "x-forwarded-client-cert",
        "x-real-ip",
        "ssl-client-verify",
        "x-ssl-client-s-dn",
        "client-cert",
    ):
        assert owned not in headers


async def test_headers_named_by_connection_stay_on_the_first_hop(served: Served) -> None:
    sent = [("Connection", "keep-alive, X-Hop"), ("X-Hop", "secret"), ("X-Kept", "1")]
    headers = (await echoed(served, "valid", headers=sent))["headers"]
    assert "x-hop" not in headers
    assert headers["x-kept"] == "1"


def test_forwarded_headers_in_one_pass() -> None:
    out = forwarded_headers(
        [
            (b"host", b"a.test:8443"),
            (b"connection", b"X-Hop, Cf-Access-Jwt-Assertion"),
            (b"x-hop", b"1"),
            (b"x_hop", b"2"),
            (b"x-forwarded-prefix", b"/admin"),
            (b"accept", b"*/*"),
        ],
        origin_host="127.0.0.1:9000",
        client_ip="2001:db8::1",
        token="t.o.k",
        client_cert_der=None,
        client_cert_sha256=None,
        underscores=True,
    )
    assert out == [
        (b"host", b"127.0.0.1:9000"),
        (b"accept", b"*/*"),
        (b"x-forwarded-host", b"a.test:8443"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-for", b"2001:db8::1"),
        (b"forwarded", b'for="[2001:db8::1]";host="a.test:8443";proto=https'),
        # Nominating the enforcer's own header does not remove the enforcer's copy.
        (b"cf-access-jwt-assertion", b"t.o.k"),
    ]


# 3. Origin path joining.


@pytest.mark.parametrize(
    ("prefix", "target", "joined"),
    [
        (b"/public", b"-internal/x", b"/public/-internal/x"),
        (b"/public", b"/", b"/public/"),
        (b"/public", b"/a/b?q=/../x", b"/public/a/b?q=/../x"),
        (b"/public", b"/../secret", b"/public/secret"),
        (b"/public", b"/a/../../../etc/passwd", b"/public/etc/passwd"),
        (b"/public", b"/%2e%2e/%2E%2e/x", b"/public/x"),
        (b"/public", b"/a/.%2E/b", b"/public/b"),
        (b"/public", b"/a/%2e/b/.", b"/public/a/b/"),
        (b"/public", b"/a/b/..", b"/public/a/"),
        (b"/public", b"/..;/admin", b"/public/admin"),
        (b"/public", b"/a//b/.../c", b"/public/a//b/.../c"),
        (b"/public", b"/file.txt", b"/public/file.txt"),
        (b"", b"/a/./b", b"/a/b"),
        (b"", b"..", b"/"),
        (b"", b"/x?", b"/x?"),
    ],
)
def test_join_path(prefix: bytes, target: bytes, joined: bytes) -> None:
    assert join_path(prefix, target) == joined


def test_remove_dot_segments_follows_rfc_3986() -> None:
    # The examples of RFC 3986 §5.2.4 and §5.4.2 that start at the root.
    assert remove_dot_segments(b"/a/b/c/./../../g") == b"/a/g"
    assert remove_dot_segments(b"/b/c/d;p/../../g") == b"/b/g"
    assert remove_dot_segments(b"/./g") == b"/g"
    assert remove_dot_segments(b"/g.") == b"/g."
    assert remove_dot_segments(b"/..g") == b"/..g"


async def test_requests_stay_under_the_origin_path(served: Served) -> None:
    echo = auth_app(served.enforcer).origin
    await update_auth_app(served.enforcer, {"origin": echo + "/public"})
    # A target that is not origin-form (``-internal/x``) never gets this far: 400, see
    # test_hostile_http.py::test_a_target_of_no_known_form_gets_400.
    cases = {
        "/../secret?q=/../1": "/public/secret?q=/../1",
        "/%2e%2e/%2E%2e/x": "/public/x",
        "/a/./b/../c": "/public/a/c",
        "/": "/public/",
    }
    for target, expected in cases.items():
        assert (await echoed(served, "valid", path=target))["path"] == expected, target


# 4. Pooled origin connections an origin left dirty.

SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled"


def answer(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


@pytest.mark.parametrize("late", [False, True], ids=["with-the-head", "after-the-head"])
async def test_an_origin_answering_head_with_a_body_cannot_answer_another_client(
    served: Served, nursery: trio.Nursery, late: bool
) -> None:
    late_sent = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        buffer = bytearray()
        while (head := await read_head(stream, buffer)) is not None:
            method, target = head.split(b" ")[:2]
            if method != b"HEAD":
                await stream.send_all(answer(b"own:" + target))
            elif late:
                # The body follows the head a moment later: it is not in h11's buffer when
                # the response ends, but in the socket when the connection is reused.
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 29\r\n\r\n")
                await trio.sleep(0.05)
                await stream.send_all(SMUGGLED)
                late_sent.set()
            else:
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 29\r\n\r\n" + SMUGGLED)

    origin = await raw_origin(nursery, handler)
    await update_auth_app(served.enforcer, {"origin": origin})
    ctx = ctx_for(served.layout, "valid")
    first = await Connection.open(served.port, AUTH_HOST, ctx)
    try:
        head = await first.request("/first", method="HEAD")
        assert (head.status, head.body) == (200, b"")
    finally:
        await first.aclose()
    if late:
        with trio.fail_after(5):
            await late_sent.wait()
    second = await get(served.port, AUTH_HOST, ctx, path="/second")
    assert (second.status, second.body) == (200, b"own:/second")


# 5. A 2xx to CONNECT from the origin.


async def test_a_2xx_to_connect_ends_the_body_instead_of_spinning(nursery: trio.Nursery) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        if await read_head(stream, bytearray()) is not None:
            await stream.send_all(b"HTTP/1.1 200 Connection established\r\n\r\ntunnel bytes")
            await trio.sleep_forever()

    origin = await raw_origin(nursery, handler)
    pool = OriginPool()
    with watchdog(5), trio.fail_after(5):
        async with origin_request(
            origin, b"CONNECT", b"example.test:443", [(b"host", b"example.test:443")], b"", 5, pool
        ) as response:
            assert response.status == 200
            body = [chunk async for chunk in response.body]
    assert body == []
    assert not any(pool._idle.values())  # a switched connection is never reused


async def test_an_origin_sending_1xx_forever_is_cut_off(nursery: trio.Nursery) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        if await read_head(stream, bytearray()) is not None:
            with contextlib.suppress(trio.BrokenResourceError):
                while True:
                    await stream.send_all(b"HTTP/1.1 102 Processing\r\n\r\n" * 1000)

    origin = await raw_origin(nursery, handler)
    with watchdog(5), trio.fail_after(5), pytest.raises(OriginError, match="1xx"):
        async with origin_request(origin, b"GET", b"/", [(b"host", b"o")], b"", 5, OriginPool()):
            pass


# 7. Streamed request bodies.


async def chunks_of(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        await trio.lowlevel.checkpoint()
        yield part


async def test_a_streamed_body_reaches_the_origin_with_its_length_or_chunked(
    nursery: trio.Nursery,
) -> None:
    port = await nursery.start(serve_echo_origin, "127.0.0.1", 0)
    origin = f"http://127.0.0.1:{port}"
    pool = OriginPool()

    async def send(body: Any, length: int | None = None) -> dict[str, Any]:
        import json

        with trio.fail_after(5):
            async with origin_request(
                origin, b"POST", b"/in", [(b"host", b"o")], body, 5, pool, content_length=length
            ) as response:
                return json.loads(b"".join([c async for c in response.body]))  # type: ignore[no-any-return]

    known = await send(chunks_of(b"ab", b"", b"cd"), 4)
    assert known["body_bytes"] == 4 and known["headers"]["content-length"] == "4"
    assert "transfer-encoding" not in known["headers"]
    unknown = await send(chunks_of(b"ab", b"cd", b"e"))
    assert unknown["body_bytes"] == 5 and unknown["headers"]["transfer-encoding"] == "chunked"
    empty = await send(chunks_of())
    assert empty["body_bytes"] == 0 and empty["headers"]["content-length"] == "0"
    whole = await send(b"xyz")
    assert whole["body_bytes"] == 3 and whole["headers"]["content-length"] == "3"

    async def too_large() -> AsyncIterator[bytes]:
        yield b"ab"
        raise BodyTooLarge("request body over 2 bytes")

    # The client's failure reaches the caller as it was (it answers 413), not as the origin's.
    with pytest.raises(BodyTooLarge):
        await send(too_large(), 10)

    pool.app = echo_app
    in_process = await send(chunks_of(b"ab", b"cd"))
    assert in_process["body_bytes"] == 4 and in_process["headers"]["content-length"] == "4"


# 6. WebSocket tunnels, decided again while open.


@contextlib.asynccontextmanager
async def websocket(
    port: int, ctx: ssl.SSLContext, cookie: str | None = None
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, ctx, server_hostname=AUTH_HOST)
    await stream.do_handshake()
    extra = [(b"cookie", cookie.encode())] if cookie else []
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            ws = await trio_websocket.wrap_client_stream(
                nursery, stream, AUTH_HOST, "/telemetry", extra_headers=extra
            )
        try:
            yield ws
        finally:
            with trio.move_on_after(1):
                await ws.aclose()
            await trio.aclose_forcefully(stream)
            nursery.cancel_scope.cancel()


async def still_open(ws: trio_websocket.WebSocketConnection, seconds: float) -> None:
    """Exchange messages for ``seconds`` (past a recheck): the tunnel must stay open."""
    with trio.fail_after(seconds + 5):
        end = trio.current_time() + seconds
        while trio.current_time() < end:
            await ws.send_message("ping")
            assert await ws.get_message() == "ping"
            await trio.sleep(0.1)


async def close_code(ws: trio_websocket.WebSocketConnection) -> int:
    """Keep talking until the tunnel is closed; return the close code the client got."""
    with trio.fail_after(5):
        try:
            while True:
                await ws.send_message("ping")
                await ws.get_message()
                await trio.sleep(0.1)
        except trio_websocket.ConnectionClosed as exc:
            return int(exc.reason.code)


def tunnel_closed(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in log if r.get("event") == "tunnel_closed"]


async def test_a_tunnel_opened_with_a_token_closes_when_the_token_expires(
    serve_config: Any, demo: DemoLayout
) -> None:
    # Explicitly unbound, so that the token alone admits a client without a certificate.
    config = with_auth_app(load_config(demo.config), bind_token_to_certificate=False)
    served: Served = await serve_config(config)
    first = await get(served.port, AUTH_HOST, ctx_for(served.layout, "valid"))
    cookie = first.header("set-cookie")
    assert cookie is not None
    async with websocket(served.port, ctx_for(served.layout, None), cookie.split(";")[0]) as ws:
        assert [r["admitted_by"] for r in served.log() if r.get("status") == 101] == ["token"]
        await still_open(ws, 1.5)
        served.clock.advance(dt.timedelta(hours=24, seconds=1))
        assert await close_code(ws) == 1008
    [closed] = tunnel_closed(served.log())
    assert closed["reason"] == "no_certificate" and closed["path"] == "/telemetry"


async def test_a_tunnel_closes_when_its_certificate_expires(served: Served) -> None:
    # Nothing in the state changes: only the clock passes the chain's last valid second.
    async with websocket(served.port, ctx_for(served.layout, "valid")) as ws:
        await still_open(ws, 1.5)
        not_after = leaf_of(served.layout, "valid").not_valid_after_utc
        served.clock.set(not_after + dt.timedelta(seconds=1))
        assert await close_code(ws) == 1008
    [closed] = tunnel_closed(served.log())
    assert closed["reason"] == "certificate_expired"


async def test_a_policy_change_closes_a_tunnel(served: Served) -> None:
    async with websocket(served.port, ctx_for(served.layout, "valid")) as ws:
        await still_open(ws, 1.5)
        only_another = {"name": "another", "include": [{"common_name": {"common_name": "x"}}]}
        await update_auth_app(served.enforcer, {"policies": [only_another]})
        assert await close_code(ws) == 1008
    [closed] = tunnel_closed(served.log())
    assert closed["reason"] == "policy_denied"


async def test_a_revocation_closes_a_tunnel_with_a_close_frame(served: Served) -> None:
    async with websocket(served.port, ctx_for(served.layout, "valid")) as ws:
        await still_open(ws, 0.2)
        await revoke(served.enforcer, leaf_of(served.layout, "valid"))
        assert await close_code(ws) == 1008
    [closed] = tunnel_closed(served.log())
    assert closed["reason"] == "revoked"


async def test_a_revocation_by_another_worker_closes_a_tunnel(
    nursery: trio.Nursery, demo: DemoLayout, tmp_path: Path
) -> None:
    # Two workers: two enforcers on one state database, each following the other's commits.
    origin_port = await nursery.start(serve_echo_origin, "127.0.0.1", 0)
    config = load_config(demo.config)
    config = dataclasses.replace(
        config,
        applications=tuple(
            dataclasses.replace(a, origin=f"http://127.0.0.1:{origin_port}")
            for a in config.applications
        ),
    )
    clock = FixedClock(dt.datetime.now(dt.UTC))
    state = tmp_path / "state.sqlite"
    log = io.StringIO()
    serving = Enforcer(config, clock, AccessLog(log), state_path=state, follow_store=True)
    other = Enforcer(config, clock, AccessLog(io.StringIO()), state_path=state, follow_store=True)
    port = await nursery.start(serve, serving, await open_listener("127.0.0.1", 0))
    layout = DemoLayout(demo.root, port)
    async with websocket(port, ctx_for(layout, "valid")) as ws:
        await still_open(ws, 0.2)
        await revoke(other, leaf_of(layout, "valid"))
        assert await close_code(ws) == 1008
    import json

    records = [json.loads(line) for line in log.getvalue().splitlines()]
    assert [r["reason"] for r in tunnel_closed(records)] == ["revoked"]


async def test_h2c_is_not_tunnelled(served: Served) -> None:
    upgrade = [
        ("Connection", "Upgrade, HTTP2-Settings"),
        ("Upgrade", "h2c"),
        ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"),
    ]
    conn = await Connection.open(served.port, AUTH_HOST, ctx_for(served.layout, "valid"))
    try:
        response = await conn.request("/", headers=upgrade)
        assert response.status == 200
        headers = response.json()["headers"]
        assert {"upgrade", "http2-settings", "connection"}.isdisjoint(headers)
        # Still HTTP/1.1 on both sides: the same connection carries the next request.
        assert (await conn.request("/again")).json()["path"] == "/again"
    finally:
        await conn.aclose()


def test_websocket_frame_boundaries() -> None:
    def frame(payload: bytes, masked: bool = False) -> bytes:
        n = len(payload)
        mask = 0x80 if masked else 0
        if n < 126:
            head = bytes((0x82, mask | n))
        elif n < 65536:
            head = bytes((0x82, mask | 126)) + struct.pack("!H", n)
        else:
            head = bytes((0x82, mask | 127)) + struct.pack("!Q", n)
        return head + (b"\x01\x02\x03\x04" if masked else b"") + payload

    stream = frame(b"a" * 5) + frame(b"b" * 300, masked=True) + frame(b"c" * 70000) + frame(b"")
    ends = set()
    total = 0
    for f in (frame(b"a" * 5), frame(b"b" * 300, masked=True), frame(b"c" * 70000), frame(b"")):
        total += len(f)
        ends.add(total)
    frames = WebSocketFrames()
    for i in range(len(stream)):  # one byte at a time: headers split everywhere
        frames.feed(stream[i : i + 1])
        assert frames.at_boundary == (i + 1 in ends), i
    whole = WebSocketFrames()
    whole.feed(stream)
    assert whole.at_boundary
    close = websocket_close_frame(1008, b"access ended")
    assert close[:2] == bytes((0x88, 14)) and struct.unpack("!H", close[2:4]) == (1008,)


def test_client_cert_headers_are_the_enforcers_own() -> None:
    der = b"\x30\x03\x02\x01\x01"
    out = dict(
        forwarded_headers(
            [(b"host", b"a"), (b"cf-client-cert-sha256", b"00")],
            origin_host="o",
            client_ip="127.0.0.1",
            token=None,
            client_cert_der=der,
            client_cert_sha256="ab",
        )
    )
    assert out[b"cf-client-cert-sha256"] == b"ab"
    assert out[b"cf-client-cert-der-base64"] == base64.b64encode(der)
