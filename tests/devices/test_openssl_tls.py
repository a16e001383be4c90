"""The device client's pyOpenSSL path (devices/openssl_tls.py) against a served enforcer, beside
the standard library's path: the same outcomes, the same error names, resumption, clock skew,
and a bounded run between checkpoints when the server always has bytes ready."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest
import trio
import trio.testing

from devices.client import ClientOptions, DeviceClient, Target
from devices.keystore import KeyStoreError, SoftwareKeyStore, write_encrypted_key
from devices.openssl_tls import CALLS_PER_CHECKPOINT, OpenSSLStream, client_context
from devices.pki import issue_ca, issue_leaf
from testbed.demo import AUTH_HOST
from tests.conftest import Served


class StdlibClient(DeviceClient):
    """The same client on the standard library's ssl (trio.SSLStream)."""

    native_tls = False


PATHS = {"pyopenssl": DeviceClient, "stdlib": StdlibClient}


def client(
    served: Served,
    path: str,
    name: str | None = "valid",
    *,
    host: str = AUTH_HOST,
    ca: Path | None = None,
    **options: object,
) -> DeviceClient:
    target = Target("127.0.0.1", served.port, host, ca or served.layout.edge_ca)
    store = SoftwareKeyStore(*served.layout.device(name)) if name else None
    return PATHS[path](target, store, ClientOptions(**options))  # type: ignore[arg-type]


async def outcome_of(c: DeviceClient) -> str:
    try:
        return (await c.request("/")).outcome
    finally:
        await c.aclose()


async def test_the_pyopenssl_path_is_taken_over_tcp_with_a_software_key(served: Served) -> None:
    native, stdlib = client(served, "pyopenssl"), client(served, "stdlib")
    try:
        assert (await native.request("/")).allowed and (await stdlib.request("/")).allowed
        assert isinstance(native._stream, OpenSSLStream)
        assert isinstance(stdlib._stream, trio.SSLStream)
    finally:
        await native.aclose()
        await stdlib.aclose()


@pytest.mark.parametrize("path", PATHS)
async def test_resumption_on_a_new_connection_per_request(served: Served, path: str) -> None:
    c = client(served, path, always_new_handshake=True, reuse_cookie=False)
    try:
        attempts = [await c.request("/") for _ in range(3)]
        assert all(a.allowed and a.new_connection for a in attempts)
        assert [a.resumed for a in attempts] == [False, True, True]
        assert c.handshakes == 3
    finally:
        await c.aclose()
    # Without resumption every handshake is a full one.
    c = client(served, path, always_new_handshake=True, resume_sessions=False)
    try:
        assert [(await c.request("/")).resumed for _ in range(2)] == [False, False]
    finally:
        await c.aclose()


@pytest.mark.parametrize("path", PATHS)
async def test_an_untrusted_server_is_refused_by_name(served: Served, path: str) -> None:
    foreign = served.layout.root / "ca" / "foreign-root.pem"
    assert await outcome_of(client(served, path, ca=foreign)) == (
        "tls_error:certificate_verify_failed"
    )


async def test_a_server_certificate_for_another_name_is_refused_alike(served: Served) -> None:
    # The enforcer answers an unknown name with its certificate for the demo hostnames, which
    # the device must not accept for this one.
    outcomes = {
        path: await outcome_of(client(served, path, host="elsewhere.example.test"))
        for path in PATHS
    }
    assert outcomes["pyopenssl"] == outcomes["stdlib"], outcomes
    assert outcomes["pyopenssl"].startswith("tls_error:"), outcomes


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("skew", "outcome"),
    [
        (-2 * 86400, "tls_error:server_certificate_not_yet_valid"),
        (400 * 86400, "tls_error:server_certificate_expired"),
        (3600, "allowed"),
    ],
)
async def test_clock_skew_is_judged_alike(
    served: Served, path: str, skew: int, outcome: str
) -> None:
    assert await outcome_of(client(served, path, clock_skew=float(skew))) == outcome


async def test_a_resumed_session_is_judged_by_the_skewed_clock_too(served: Served) -> None:
    # A resumed handshake sends no certificate: the session's is judged.
    c = client(served, "pyopenssl", always_new_handshake=True, reuse_cookie=False)
    try:
        assert (await c.request("/")).allowed
        c.options = ClientOptions(always_new_handshake=True, clock_skew=400 * 86400.0)
        attempt = await c.request("/")
        assert attempt.outcome == "tls_error:server_certificate_expired"
    finally:
        await c.aclose()


@pytest.mark.parametrize("path", PATHS)
async def test_no_certificate_and_refused_devices_get_the_same_answers(
    served: Served, path: str
) -> None:
    assert await outcome_of(client(served, path, None)) == "denied:no_certificate"
    assert await outcome_of(client(served, path, "foreign-ca")) == "denied:untrusted_issuer"


async def test_key_store_problems_are_named_on_the_pyopenssl_path(
    served: Served, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives import serialization

    cert, key = served.layout.device("valid")
    other_cert, other_key = served.layout.device("expired")
    target = Target("127.0.0.1", served.port, AUTH_HOST, served.layout.edge_ca)
    mismatched = SoftwareKeyStore(cert, other_key)
    with pytest.raises(KeyStoreError, match="does not match the certificate"):
        mismatched.openssl_context(target.make_openssl_context)
    attempt = await DeviceClient(target, mismatched).request("/")
    assert attempt.outcome == "key_store_error:KeyStoreError"

    private = serialization.load_pem_private_key(key.read_bytes(), None)
    write_encrypted_key(private, tmp_path / "key.pem", b"secret")  # type: ignore[arg-type]
    with pytest.raises(KeyStoreError, match="the private key is encrypted"):
        SoftwareKeyStore(cert, tmp_path / "key.pem").openssl_context(target.make_openssl_context)
    encrypted = SoftwareKeyStore(cert, tmp_path / "key.pem", b"secret")
    assert await outcome_of(DeviceClient(target, encrypted)) == "allowed"
    assert other_cert.exists()


def stdlib_server_and_client(
    tmp_path: Path,
) -> tuple[trio.SSLStream[trio.SocketStream], OpenSSLStream]:
    """A stdlib TLS server and our client over a socket pair (neither has shaken hands yet)."""
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    ca = issue_ca("test edge CA", now)
    leaf = issue_leaf(
        "edge.test",
        ca,
        not_before=now - dt.timedelta(days=1),
        not_after=now + dt.timedelta(days=1),
        client=False,
        dns_names=["edge.test"],
    )
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem())
    (tmp_path / "cert.pem").write_bytes(leaf.cert_pem() + ca.cert_pem())
    (tmp_path / "key.pem").write_bytes(leaf.key_pem())
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")

    mine, theirs = socket.socketpair()
    mine.setblocking(False)
    server = trio.SSLStream(
        trio.SocketStream(trio.socket.from_stdlib_socket(theirs)), server_ctx, server_side=True
    )
    stream = OpenSSLStream(mine, client_context(tmp_path / "ca.pem", "edge.test", ()), "edge.test")
    return server, stream


async def test_a_server_that_always_has_bytes_ready_cannot_starve_other_tasks(
    tmp_path: Path,
) -> None:
    server, stream = stdlib_server_and_client(tmp_path)
    ticks = 0
    reads_between: list[int] = []

    async def other_task() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        await stream.do_handshake()
        # Far more than the client reads below, written (as far as the socket takes it) before
        # it reads: every read finds bytes ready and none waits.
        nursery.start_soon(server.send_all, b"x" * 64 * 1024 * 4)
        await trio.sleep(0.1)
        nursery.start_soon(other_task)
        await trio.lowlevel.checkpoint()
        seen, reads = ticks, 0
        for _ in range(4 * CALLS_PER_CHECKPOINT):
            assert await stream.receive_some(64)
            reads += 1
            if ticks != seen:
                reads_between.append(reads)
                seen, reads = ticks, 0
        nursery.cancel_scope.cancel()
    stream.close()
    await trio.aclose_forcefully(server)
    assert reads_between, "the other task never ran while the client read"
    # trio runs a batch of ready tasks in random order: the client may go first in two batches
    # in a row, so the other task waits two budgets at most.
    assert max(reads_between) <= 2 * (CALLS_PER_CHECKPOINT + 1)


async def test_an_idle_connection_pins_no_receive_buffer(tmp_path: Path) -> None:
    """Waiting for the server happens outside the WantReadError: a live one pins 64 KiB."""
    import gc

    from OpenSSL import SSL

    server, stream = stdlib_server_and_client(tmp_path)
    received: list[bytes] = []

    async def read() -> None:
        received.append(await stream.receive_some())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        await stream.do_handshake()
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        assert not [o for o in gc.get_objects() if isinstance(o, SSL.WantReadError)]
        await server.send_all(b"telemetry")
    stream.close()
    await trio.aclose_forcefully(server)
    assert received == [b"telemetry"]
