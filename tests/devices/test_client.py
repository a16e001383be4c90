"""Device clients over real sockets: outcomes, timings, cookies, sessions, WebSockets, nginx."""

from __future__ import annotations

import json

import pytest
import trio
import trio_websocket

from devices.client import ClientOptions, DeviceClient, Target
from devices.keystore import SoftwareKeyStore
from testbed.demo import AUTH_HOST, IOT_HOST
from testbed.nginx import NGINX, start_nginx, stop_nginx
from tests.conftest import Served

EXPECTED = {
    "valid": "allowed",
    "leaf-only": "allowed",
    "expired": "denied:certificate_expired",
    "not-yet-valid": "denied:certificate_not_yet_valid",
    "foreign-ca": "denied:untrusted_issuer",
    "wrong-cn": "allowed",
}


def device(
    served: Served, name: str | None, host: str = AUTH_HOST, **options: object
) -> DeviceClient:
    target = Target("127.0.0.1", served.port, host, served.layout.edge_ca)
    store = SoftwareKeyStore(*served.layout.device(name)) if name else None
    return DeviceClient(target, store, ClientOptions(**options))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(EXPECTED))
async def test_outcomes_against_the_enforcer(served: Served, name: str) -> None:
    client = device(served, name)
    try:
        attempt = await client.request("/")
        assert attempt.outcome == EXPECTED[name]
        assert attempt.new_connection
    finally:
        await client.aclose()


async def test_no_certificate_is_denied(served: Served) -> None:
    client = device(served, None)
    assert (await client.request("/")).outcome == "denied:no_certificate"
    await client.aclose()


async def test_phase_timings_and_keep_alive(served: Served) -> None:
    client = device(served, "valid", reuse_cookie=False)
    try:
        first = await client.request("/")
        t = first.timings
        assert first.new_connection and t.connect > 0 and t.handshake > 0 and t.first_byte > 0
        assert t.total >= t.connect + t.handshake
        second = await client.request("/")
        assert not second.new_connection and second.timings.handshake == 0
        assert second.allowed
        assert len({r["connection"] for r in served.log()}) == 1
    finally:
        await client.aclose()


async def test_cookie_jar_reuse_on_and_off(served: Served) -> None:
    for reuse, admitted_by in ((True, "token"), (False, "certificate")):
        client = device(served, "valid", reuse_cookie=reuse, keep_alive=False)
        try:
            first = await client.request("/")
            assert first.cookie_received and not first.cookie_sent
            second = await client.request("/")
            assert second.allowed and second.cookie_sent is reuse
            assert served.last()["admitted_by"] == admitted_by
        finally:
            await client.aclose()


async def test_always_new_handshake_and_resumption(served: Served) -> None:
    client = device(served, "valid", always_new_handshake=True, reuse_cookie=False)
    try:
        attempts = [await client.request("/") for _ in range(3)]
        assert all(a.new_connection for a in attempts)
        assert [a.resumed for a in attempts] == [False, True, True]
    finally:
        await client.aclose()
    client = device(served, "valid", always_new_handshake=True, resume_sessions=False)
    try:
        attempts = [await client.request("/") for _ in range(2)]
        assert [a.resumed for a in attempts] == [False, False]
    finally:
        await client.aclose()


async def test_no_duration_means_a_full_handshake_every_time(served: Served) -> None:
    client = device(served, "valid", host=IOT_HOST)
    try:
        attempts = [await client.request("/") for _ in range(3)]
        assert all(a.allowed and a.new_connection and not a.resumed for a in attempts)
        assert not any(a.cookie_received for a in attempts)
    finally:
        await client.aclose()


async def test_clock_skew_is_judged_on_the_server_certificate(served: Served) -> None:
    # The demo edge certificate is valid from a day ago for a year.
    for skew, outcome in (
        (-2 * 86400, "tls_error:server_certificate_not_yet_valid"),
        (400 * 86400, "tls_error:server_certificate_expired"),
        (3600, "allowed"),
    ):
        client = device(served, "valid", clock_skew=float(skew))
        try:
            assert (await client.request("/")).outcome == outcome
        finally:
            await client.aclose()


async def test_the_cookie_expires_on_trio_time(served: Served, mock_clock) -> None:
    client = device(served, "valid", keep_alive=False)
    try:
        assert (await client.request("/")).cookie_received
        assert client.cookie is not None
        mock_clock.jump(86400)
        assert client.cookie is None
    finally:
        await client.aclose()


async def test_connect_error_timeout_and_tls_error(served: Served, nursery: trio.Nursery) -> None:
    closed = trio.socket.socket()
    await closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    target = Target("127.0.0.1", port, AUTH_HOST, served.layout.edge_ca)
    assert (await DeviceClient(target, None).request("/")).outcome == "connect_error"

    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, silent, listeners)
    target = Target(
        "127.0.0.1", listeners[0].socket.getsockname()[1], AUTH_HOST, served.layout.edge_ca
    )
    attempt = await DeviceClient(target, None, ClientOptions(timeout=0.3)).request("/")
    assert attempt.outcome == "timeout"

    # Trusting the wrong CA for the server: the device refuses the handshake.
    wrong = Target(
        "127.0.0.1", served.port, AUTH_HOST, served.layout.root / "ca" / "foreign-root.pem"
    )
    attempt = await DeviceClient(wrong, None).request("/")
    assert attempt.outcome == "tls_error:certificate_verify_failed"


async def test_websocket_telemetry_through_the_enforcer(
    served: Served, nursery: trio.Nursery
) -> None:
    async with device(served, "valid").websocket("/telemetry") as (attempt, ws):
        assert attempt.outcome == "allowed" and ws is not None
        for i in range(3):
            reading = json.dumps({"seq": i, "temperature": 20 + i})
            await ws.send_message(reading)
            assert await ws.get_message() == reading
    record = [r for r in served.log() if r.get("status") == 101]
    assert record and record[-1]["path"] == "/telemetry"


async def test_websocket_refused_without_a_certificate(
    served: Served, nursery: trio.Nursery
) -> None:
    async with device(served, None).websocket("/telemetry") as (attempt, ws):
        assert ws is None and attempt.outcome == "denied:no_certificate" and attempt.status == 403
    async with device(served, "expired").websocket("/telemetry") as (attempt, ws):
        assert ws is None and attempt.outcome == "denied:certificate_expired"


async def test_a_revoked_certificate_ends_its_websocket(
    served: Served, nursery: trio.Nursery
) -> None:
    import dataclasses

    from cryptography import x509

    from enforcer.chain import fingerprint

    leaf = x509.load_pem_x509_certificates(served.layout.device("valid")[0].read_bytes())[0]
    async with device(served, "valid").websocket("/telemetry") as (_attempt, ws):
        assert ws is not None
        await ws.send_message("before")
        assert await ws.get_message() == "before"
        snap = served.enforcer.snapshot
        served.enforcer.snapshot = dataclasses.replace(
            snap, generation=snap.generation + 1, revoked=snap.revoked | {fingerprint(leaf)}
        )
        with trio.fail_after(5), pytest.raises(trio_websocket.ConnectionClosed):
            while True:
                await ws.send_message("after")
                await ws.get_message()
                await trio.sleep(0.1)


@pytest.mark.skipif(NGINX is None, reason="nginx is installed by .ci/run")
async def test_devices_against_nginx(served: Served, tmp_path) -> None:
    layout = served.layout
    proc, port = await start_nginx(
        tmp_path / "nginx",
        cert=layout.root / "edge" / "cert.pem",
        key=layout.root / "edge" / "key.pem",
        client_ca=layout.root / "ca" / "uploaded-chain.pem",
        server_name=AUTH_HOST,
    )
    try:
        outcomes = {}
        for name in ("valid", "leaf-only", "expired", "not-yet-valid", "foreign-ca", None):
            target = Target("127.0.0.1", port, AUTH_HOST, layout.edge_ca)
            store = SoftwareKeyStore(*layout.device(name)) if name else None
            client = DeviceClient(target, store)
            outcomes[name] = (await client.request("/")).outcome
            await client.aclose()
    finally:
        await stop_nginx(proc)
    # nginx with `ssl_verify_client optional` answers 400 to a certificate it cannot verify,
    # and our configured 403 (with the reason header) when none was sent.
    assert outcomes == {
        "valid": "allowed",
        "leaf-only": "allowed",
        "expired": "http_400",
        "not-yet-valid": "http_400",
        "foreign-ca": "http_400",
        None: "denied:no_certificate",
    }


async def test_token_costs_show_up_in_the_timings(served: Served) -> None:
    from cryptography.hazmat.primitives import serialization

    from devices.piv import PivKeyStore, PivToken

    cert_path, key_path = served.layout.device("valid")
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    token = PivToken()
    token.import_key("9c", key, cert_path.read_bytes())  # 9c: PIN always, P-256 sign 72 ms
    target = Target("127.0.0.1", served.port, AUTH_HOST, served.layout.edge_ca)
    client = DeviceClient(
        target, PivKeyStore(token, "9c", "123456"), ClientOptions(always_new_handshake=True)
    )
    try:
        first = await client.request("/")
        assert first.allowed
        assert first.timings.key_store >= 0.072 + 0.009
        assert first.timings.handshake >= first.timings.key_store
        resumed = await client.request("/")
        assert resumed.allowed and resumed.resumed and resumed.timings.key_store < 0.072
    finally:
        await client.aclose()
    wrong = DeviceClient(target, PivKeyStore(token, "9c", "000000"))
    assert (await wrong.request("/")).outcome == "key_store_error:CKR_PIN_INCORRECT"
    await wrong.aclose()


async def test_addresses_connect_directly_and_names_through_happy_eyeballs(
    served: Served,
) -> None:
    # An IP address (v4, v6) skips happy eyeballs; a name still resolves. All three reach the
    # served enforcer and are admitted; a refused address reads as "connection refused".
    from devices.client import open_tcp

    port = served.port
    hosts = ["127.0.0.1", "localhost"]
    v6 = trio.socket.socket(trio.socket.AF_INET6)
    try:
        await v6.bind(("::1", 0))
        hosts.append("::1")  # only when this machine has IPv6 loopback; the enforcer
    except OSError:  # listens on 127.0.0.1, so ::1 is expected to be refused
        pass
    finally:
        v6.close()
    cert, key = served.layout.device("valid")
    for host in hosts:
        target = Target(host, port, AUTH_HOST, served.layout.edge_ca)
        client = DeviceClient(target, SoftwareKeyStore(cert, key))
        try:
            attempt = await client.request("/")
        finally:
            await client.aclose()
        if host == "::1":
            assert attempt.outcome == "connect_error"
            assert attempt.error == "connection refused"
        else:
            assert attempt.outcome == "allowed", (host, attempt)
    stream = await open_tcp("127.0.0.1", port)
    assert isinstance(stream, trio.SocketStream)
    await stream.aclose()
