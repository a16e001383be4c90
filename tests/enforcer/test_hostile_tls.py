"""Hostile TLS clients against a served enforcer: nobody starves, nothing grows without bound.

The attackers are raw sockets driven from a thread of their own, so that a server that stopped
yielding to trio could not stop them too (in the server's own trio run, a frozen loop would
also freeze an in-process attacker and hide the freeze). Good clients are real TLS clients
(``tests/wire.py``) with the demo's devices. Timeouts are safety nets only.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives import serialization

from devices.pki import Issued, issue_ca, issue_leaf, write_pem
from enforcer.clienthello import MAX_RECORDS
from enforcer.server import FAILED_MEMO_SHARE
from enforcer.sockets import TCPStream, serve_tcp
from enforcer.tls import (
    CALLS_PER_CHECKPOINT,
    ContextsBySNI,
    HostTLS,
    IntermediatesMemo,
    ServerTLSStream,
)
from testbed.demo import AUTH_HOST, DemoLayout
from tests.conftest import Served
from tests.wire import Connection, client_context, get

ANNOUNCED = 60_000  # the ClientHello size the attackers announce
DAY = dt.timedelta(days=1)


def device_ctx(served: Served, device: str = "valid") -> ssl.SSLContext:
    cert, key = served.layout.device(device)
    return client_context(served.layout.edge_ca, cert, key)


def _record(payload: bytes) -> bytes:
    return b"\x16\x03\x01" + struct.pack(">H", len(payload)) + payload


class Dripper(threading.Thread):
    """A raw-socket client that drips a never-ending ClientHello until the server cuts it."""

    def __init__(
        self, port: int, *, one_byte_records: bool, interval: float, limit: float, burst: int = 0
    ) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.one_byte_records = one_byte_records
        self.burst = burst  # 1-byte records sent at once before the drip starts
        self.interval = interval
        self.limit = limit  # the attacker gives up after this long, whatever happens
        self.stop = threading.Event()
        self.connected = threading.Event()
        self.sent = 0
        self.elapsed: float | None = None  # from connect to the server closing it
        self.cut = threading.Event()

    def run(self) -> None:
        header = b"\x01" + ANNOUNCED.to_bytes(3, "big")
        with socket.create_connection(("127.0.0.1", self.port)) as sock:
            sock.settimeout(self.interval)
            start = time.monotonic()
            if self.one_byte_records:
                pieces = [_record(bytes([b])) for b in header]  # the header, a byte a record
                if self.burst:
                    pieces.append(_record(b"\x00") * self.burst)
            else:
                # One record announcing 16 KiB, then its bytes one at a time.
                pieces = [b"\x16\x03\x01\x40\x00" + header]
            self.connected.set()
            try:
                while not self.stop.is_set() and time.monotonic() - start < self.limit:
                    piece = pieces.pop(0) if pieces else None
                    if piece is None:
                        piece = _record(b"\x00") if self.one_byte_records else b"\x00"
                    sock.sendall(piece)
                    self.sent += 1
                    try:
                        if sock.recv(1) == b"":
                            break  # the server closed the connection
                    except TimeoutError:
                        continue  # nothing from the server: drip the next piece
                else:
                    return
            except OSError:
                pass  # reset by the server
            self.elapsed = time.monotonic() - start
            self.cut.set()


async def test_a_client_hello_dripped_in_one_byte_records_does_not_freeze_the_server(
    serve_config: Callable[..., Any],
) -> None:
    # Before: every read re-parsed all the records so far and a read that found bytes never
    # yielded, so the server froze for as long as the attacker kept dripping (the safety net
    # below then fires). Now the reader refuses a ClientHello spread over too many records.
    # A first burst of a few thousand records makes the old parser slow from the start, so
    # the freeze begins at once (it would after ~10 s of dripping alone); the deadline is long
    # so that only the fix, not the deadline, can end the attack before the safety net fires.
    served: Served = await serve_config(handshake_timeout=20.0)
    attacker = Dripper(served.port, one_byte_records=True, interval=0.0005, limit=30, burst=3000)
    attacker.start()
    try:
        ctx = device_ctx(served)
        done = 0
        with trio.fail_after(15):
            # Good clients keep asking while the attacker drips, until it has been dealt with.
            while done < 5 or not attacker.cut.is_set():
                response = await get(served.port, AUTH_HOST, ctx)
                assert response.status == 200
                done += 1
    finally:
        attacker.stop.set()
        await trio.to_thread.run_sync(attacker.join)
    errors = [r for r in served.log() if r.get("event") == "tls_error"]
    assert any(f"more than {MAX_RECORDS} records" in str(r["detail"]) for r in errors), errors


async def test_the_handshake_deadline_cuts_a_dripping_client_beside_good_clients(
    serve_config: Callable[..., Any],
) -> None:
    # A ClientHello under every cap (one 16 KiB record) but dripped a byte every 2 ms: good
    # clients are served while it is connected, and it is cut at handshake_timeout.
    timeout = 3.0
    served: Served = await serve_config(handshake_timeout=timeout)
    attacker = Dripper(served.port, one_byte_records=False, interval=0.002, limit=30)
    attacker.start()
    try:
        await trio.to_thread.run_sync(attacker.connected.wait)
        ctx = device_ctx(served)
        with trio.fail_after(20):
            for _ in range(5):
                assert (await get(served.port, AUTH_HOST, ctx)).status == 200
            assert not attacker.cut.is_set()  # the good requests did not wait for its end
            await trio.to_thread.run_sync(attacker.cut.wait)
    finally:
        attacker.stop.set()
        await trio.to_thread.run_sync(attacker.join)
    assert attacker.elapsed is not None and attacker.elapsed >= timeout * 0.9
    errors = [r for r in served.log() if r.get("event") == "tls_error"]
    assert any(r["detail"] == "handshake timed out" for r in errors), errors


async def test_an_sni_with_a_trailing_dot_finds_the_hostname(served: Served) -> None:
    # "auth.example.test." is the same name as "auth.example.test" (RFC 1034 absolute form):
    # before, the context lookup missed, the default context asked for no certificate and the
    # valid device was refused with no_certificate.
    ctx = device_ctx(served)
    ctx.check_hostname = False  # the edge certificate names the host without the dot
    conn = await Connection.open(served.port, AUTH_HOST + ".", ctx)
    try:
        response = await conn.request("/", host=AUTH_HOST + ".")
    finally:
        await conn.aclose()
    assert (response.status, response.reason) == (200, None)
    assert served.last()["sni"] == AUTH_HOST
    assert served.last()["certificate"] is not None


async def test_many_tiny_tls_records_in_one_read_still_reach_checkpoints(
    demo: DemoLayout,
) -> None:
    # One socket read can hold thousands of 1-byte TLS records, which OpenSSL hands out one
    # per recv with no socket call between: the TLS layer must yield on its own budget. A
    # ticker task counts the checkpoints it gets. The ticker runs once per scheduler batch,
    # before or after the reader, so the reader may see up to two budgets of reads between two
    # ticks; without the budget it sees all 3000.
    host = HostTLS(
        AUTH_HOST,
        (demo.root / "edge" / "cert.pem").read_bytes(),
        (demo.root / "edge" / "key.pem").read_bytes(),
        request_client_certificate=False,
        allow_resumption=True,
    )
    contexts = ContextsBySNI([host], host)
    count = 3000
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    sent = threading.Event()
    release = threading.Event()

    def client() -> None:
        ctx = client_context(demo.edge_ca)
        raw = socket.create_connection(("127.0.0.1", port))
        with ctx.wrap_socket(raw, server_hostname=AUTH_HOST) as tls:
            for _ in range(count):
                tls.send(b"x")  # one TLS record each
            sent.set()
            release.wait(20)

    ticks = 0
    longest: list[int] = []

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async def handler(stream: TCPStream) -> None:
        tls = ServerTLSStream(stream, contexts)
        try:
            await tls.do_handshake()
            await trio.to_thread.run_sync(sent.wait)
            got, run, worst, last = 0, 0, 0, ticks
            while got < count:
                got += len(await tls.receive_some(65536))
                run = run + 1 if ticks == last else 0
                last = ticks
                worst = max(worst, run)
            longest.append(worst)
        finally:
            release.set()
            await tls.aclose()

    thread = threading.Thread(target=client, daemon=True)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            nursery.start_soon(serve_tcp, listener, handler, nursery)
            thread.start()
            while not longest:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    listener.close()
    await trio.to_thread.run_sync(thread.join)
    assert longest[0] <= 2 * CALLS_PER_CHECKPOINT + 1


def _junk_certificates(count: int) -> list[Issued]:
    now = dt.datetime.now(dt.UTC)
    return [issue_ca(f"junk {i}", now) for i in range(count)]


async def test_a_chain_longer_than_max_client_certificates_is_refused(
    serve_config: Callable[..., Any], tmp_path: Path
) -> None:
    # The valid device, its intermediate and junk certificates after them: the verifier would
    # ignore the junk and admit (as before), but building paths through a long presented
    # chain is the amplification; past the cap it is refused without building any.
    served: Served = await serve_config(max_client_certificates=4)
    cert_path, key_path = served.layout.device("valid")
    junk = _junk_certificates(3)
    write_pem(tmp_path / "long.pem", cert_path.read_bytes(), *(j.cert_pem() for j in junk))
    ctx = client_context(served.layout.edge_ca, tmp_path / "long.pem", key_path)
    misses = served.enforcer.validations.misses
    response = await get(served.port, AUTH_HOST, ctx)
    assert (response.status, response.reason) == (403, "invalid_chain")
    record = served.last()
    assert "presented 5 certificates; at most 4" in str(record["detail"])
    assert served.enforcer.validations.misses == misses  # no validation was attempted
    # At the cap it still validates as usual.
    assert (await get(served.port, AUTH_HOST, device_ctx(served))).status == 200


async def test_a_failed_chain_is_validated_once_per_connection(served: Served) -> None:
    # A chain that fails validation, with requests one after the other on one connection:
    # before, each request re-ran the path build (failures are not in the ValidationCache);
    # now the connection decides it once. The cache's misses count the full validations.
    ctx = device_ctx(served, "foreign-ca")
    conn = await Connection.open(served.port, AUTH_HOST, ctx)
    before = served.enforcer.validations.misses
    try:
        for _ in range(6):
            response = await conn.request("/")
            assert (response.status, response.reason) == (403, "untrusted_issuer")
            assert not conn.closed_by_server
    finally:
        await conn.aclose()
    assert served.enforcer.validations.misses - before == 1


def _junk_chain(tmp_path: Path, i: int) -> tuple[Path, Path]:
    now = dt.datetime.now(dt.UTC)
    root = issue_ca(f"junk root {i}", now)
    inter = issue_ca(f"junk intermediate {i}", now, issuer=root, path_length=0)
    leaf = issue_leaf(f"junk-{i}", inter, not_before=now - DAY, not_after=now + DAY)
    write_pem(tmp_path / f"junk-{i}.pem", leaf.cert_pem(), inter.cert_pem(), root.cert_pem())
    write_pem(tmp_path / f"junk-{i}.key", leaf.key_pem(), private=True)
    return tmp_path / f"junk-{i}.pem", tmp_path / f"junk-{i}.key"


async def test_unauthenticated_chains_never_enter_the_intermediates_memo(
    serve_config: Callable[..., Any], tmp_path: Path
) -> None:
    served: Served = await serve_config(intermediates_memo_bytes=4096)
    # Take the intermediate out of the uploaded trust: the resumed session below validates
    # only if the memo still holds what the device sent in its full handshake.
    snap = served.enforcer.snapshot
    trust = {h: dataclasses.replace(t, intermediates=()) for h, t in snap.trust.items()}
    served.enforcer.snapshot = dataclasses.replace(
        snap, generation=snap.generation + 1, trust=trust
    )
    ctx = device_ctx(served)
    first = await Connection.open(served.port, AUTH_HOST, ctx)
    assert (await first.request("/")).status == 200
    session = first.ssl_object.session
    await first.aclose()
    memo = served.enforcer.intermediates
    assert len(memo) == 1

    # Junk chains (leaf, intermediate, root of nobody's), each more than the bound can hold
    # beside the device's entry: with a request and without one.
    for i in range(12):
        cert, key = _junk_chain(tmp_path, i)
        junk_ctx = client_context(served.layout.edge_ca, cert, key)
        conn = await Connection.open(served.port, AUTH_HOST, junk_ctx)
        try:
            if i % 2:
                assert (await conn.request("/")).reason == "untrusted_issuer"
        finally:
            await conn.aclose()
    assert len(memo) == 1
    assert memo.bytes <= 4096
    # Failed chains have their own small memo (so their resumed sessions keep their reason).
    assert served.enforcer.failed_intermediates.bytes <= 4096 // FAILED_MEMO_SHARE

    second = await Connection.open(served.port, AUTH_HOST, ctx, session=session)
    try:
        assert second.ssl_object.session_reused
        assert (await second.request("/")).status == 200
    finally:
        await second.aclose()


def test_the_intermediates_memo_is_bounded_by_bytes() -> None:
    now = dt.datetime.now(dt.UTC)
    root = issue_ca("memo root", now)
    inters = [issue_ca(f"memo intermediate {i}", now, issuer=root) for i in range(6)]
    leaves = [
        issue_leaf(f"memo-{i}", inters[i], not_before=now - DAY, not_after=now + DAY)
        for i in range(6)
    ]
    size = len(inters[0].certificate.public_bytes(serialization.Encoding.DER)) + 32
    memo = IntermediatesMemo(max_bytes=3 * size + size // 2)  # room for three entries
    for leaf, inter in zip(leaves, inters, strict=True):
        memo.put(leaf.certificate, [inter.certificate])
        assert memo.bytes <= memo.max_bytes
    assert len(memo) == 3
    # Least recently used first out: the three newest are kept, the oldest are gone.
    assert memo.get(leaves[0].certificate) == ()
    assert memo.get(leaves[5].certificate) == (inters[5].certificate,)
    # The same chain again is a touch, not a second copy.
    memo.put(leaves[3].certificate, [inters[3].certificate])
    memo.put(leaves[0].certificate, [inters[0].certificate])
    assert memo.get(leaves[3].certificate) == (inters[3].certificate,)
    assert memo.get(leaves[4].certificate) == ()


async def test_max_connections_holds_further_clients_in_the_backlog(
    serve_config: Callable[..., Any],
) -> None:
    # The setting reaches the accept loop: with one connection allowed, a second client's
    # handshake waits (in the kernel's backlog) until the first connection closes.
    served: Served = await serve_config(max_connections=1)
    ctx = device_ctx(served)
    first = await Connection.open(served.port, AUTH_HOST, ctx)
    assert (await first.request("/")).status == 200  # kept alive: it holds the only slot
    second: list[Connection] = []

    async def open_second() -> None:
        second.append(await Connection.open(served.port, AUTH_HOST, ctx))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(open_second)
            await trio.sleep(0.5)
            assert not second  # not served while the first connection is open
            await first.aclose()
        assert (await second[0].request("/")).status == 200
        await second[0].aclose()
