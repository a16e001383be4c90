"""The gRPC device client: real grpcio calls (unary Report, server-streaming Watch) to the
telemetry service through nginx's ``grpc_pass``, each device with its own certificate."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from devices import telemetry
from devices.client import ClientOptions, Target
from devices.grpc_client import GrpcDeviceClient, GrpcUnsupported
from devices.keystore import SoftwareKeyStore, write_encrypted_key
from devices.piv import PivKeyStore, PivToken
from testbed.demo import AUTH_HOST, DemoLayout
from testbed.nginx import NGINX, free_port, start_nginx, stop_nginx
from testbed.telemetry import TelemetryService, serve_telemetry

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is installed by .ci/run")


@contextlib.asynccontextmanager
async def grpc_edge(
    layout: DemoLayout, folder: Path, **kwargs: object
) -> AsyncIterator[tuple[int, TelemetryService]]:
    """The telemetry service behind nginx (grpc_pass, client certificates checked)."""
    async with serve_telemetry() as service:
        proc, port = await start_nginx(
            folder,
            cert=layout.root / "edge" / "cert.pem",
            key=layout.root / "edge" / "key.pem",
            client_ca=layout.root / "ca" / "uploaded-chain.pem",
            server_name=AUTH_HOST,
            grpc_upstream=f"127.0.0.1:{service.port}",
            **kwargs,  # type: ignore[arg-type]
        )
        try:
            yield port, service
        finally:
            await stop_nginx(proc)


def device(
    layout: DemoLayout, port: int, name: str | None, rpc: str = "report", **options: object
) -> GrpcDeviceClient:
    target = Target("127.0.0.1", port, AUTH_HOST, layout.edge_ca)
    store = SoftwareKeyStore(*layout.device(name)) if name else None
    return GrpcDeviceClient(
        target,
        store,
        ClientOptions(**options),  # type: ignore[arg-type]
        device_id=name or "anonymous",
        rpc=rpc,
        watch_messages=4,
    )


def test_the_proto_compiles_at_import() -> None:
    # grpc.protos_and_services compiled devices/telemetry.proto: no generated code in git.
    assert telemetry.PROTO.exists()
    assert not list(telemetry.PROTO.parent.glob("*_pb2*.py"))
    reading = telemetry.Reading(device_id="d", sequence=3, values={"t": 1.5})
    assert telemetry.Reading.FromString(reading.SerializeToString()) == reading
    assert (
        telemetry.messages.DESCRIPTOR.services_by_name["Telemetry"].full_name == telemetry.SERVICE
    )


@pytest.mark.parametrize("rpc", ["report", "watch"])
async def test_calls_through_nginx_grpc_pass(demo: DemoLayout, tmp_path: Path, rpc: str) -> None:
    async with grpc_edge(demo, tmp_path / "nginx") as (port, service):
        attempts = {}
        for name in ("valid", "expired", "foreign-ca", None):
            client = device(demo, port, name, rpc)
            try:
                attempts[name] = await client.request()
            finally:
                await client.aclose()
        method = "Report" if rpc == "report" else "Watch"
        # Only the allowed device's call reached the service.
        assert service.count() == 1 and service.count(method, "valid") == 1
    valid = attempts["valid"]
    assert valid.outcome == "allowed" and valid.grpc_status == "OK" and valid.protocol == "grpc"
    assert valid.body == (b"1" if rpc == "report" else b"4")  # response messages read
    for name in ("expired", "foreign-ca"):
        # nginx's gRPC denial of a certificate that does not verify: no reason header.
        a = attempts[name]
        assert (a.outcome, a.grpc_status, a.reason) == (
            "grpc_unauthenticated",
            "UNAUTHENTICATED",
            None,
        )
    assert "certificate has expired" in (attempts["expired"].error or "")
    missing = attempts[None]
    assert (missing.outcome, missing.grpc_status, missing.reason) == (
        "denied:no_certificate",
        "UNAUTHENTICATED",
        "no_certificate",
    )
    for a in attempts.values():
        assert a.new_connection
        assert a.timings.handshake > 0 and a.timings.first_byte > 0
        assert a.timings.total >= a.timings.handshake


async def test_a_kept_channel_makes_one_handshake(demo: DemoLayout, tmp_path: Path) -> None:
    async with grpc_edge(demo, tmp_path / "nginx") as (port, service):
        kept = device(demo, port, "valid")
        fresh = device(demo, port, "valid", keep_alive=False)
        try:
            kept_attempts = [await kept.request() for _ in range(3)]
            fresh_attempts = [await fresh.request() for _ in range(3)]
        finally:
            await kept.aclose()
            await fresh.aclose()
        assert service.count("Report", "valid") == 6
    assert all(a.allowed for a in kept_attempts + fresh_attempts)
    assert [a.new_connection for a in kept_attempts] == [True, False, False]
    assert [a.new_connection for a in fresh_attempts] == [True] * 3
    assert kept_attempts[1].timings.handshake == 0
    assert kept.handshakes == 1 and fresh.handshakes == 3


async def test_goaway_after_each_call_reconnects_a_kept_channel(
    demo: DemoLayout, tmp_path: Path
) -> None:
    # keepalive_requests 1: nginx sends GOAWAY after each stream, as No Duration will.
    async with grpc_edge(demo, tmp_path / "nginx", keepalive_requests=1) as (port, service):
        client = device(demo, port, "valid", rpc="watch")
        try:
            attempts = [await client.request() for _ in range(3)]
            # grpcio reports connectivity changes from its own thread: wait until it has.
            with trio.move_on_after(5):
                while client.handshakes < 3:
                    await trio.sleep(0.02)
        finally:
            await client.aclose()
        assert service.count("Watch", "valid") == 3
    assert [a.outcome for a in attempts] == ["allowed"] * 3
    assert client.handshakes == 3
    # Each attempt says it made a new connection, without waiting for grpcio's callbacks.
    assert [a.new_connection for a in attempts] == [True] * 3


async def test_an_encrypted_key_is_decrypted_in_memory(demo: DemoLayout, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    cert, key = demo.device("valid")
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    encrypted = tmp_path / "key.enc.pem"
    write_encrypted_key(private, encrypted, b"secret")  # type: ignore[arg-type]
    async with grpc_edge(demo, tmp_path / "nginx") as (port, _):
        target = Target("127.0.0.1", port, AUTH_HOST, demo.edge_ca)
        client = GrpcDeviceClient(target, SoftwareKeyStore(cert, encrypted, b"secret"))
        try:
            assert (await client.request()).allowed
        finally:
            await client.aclose()


async def test_a_refused_connection_is_a_connect_error(demo: DemoLayout) -> None:
    client = device(demo, free_port(), "valid")
    try:
        attempt = await client.request()
    finally:
        await client.aclose()
    assert attempt.outcome == "connect_error" and attempt.grpc_status == "UNAVAILABLE"


def test_a_piv_token_or_an_in_memory_target_cannot_speak_grpc(demo: DemoLayout) -> None:
    token = PivToken()
    token.generate("9a")
    target = Target("127.0.0.1", 1, AUTH_HOST, demo.edge_ca)
    with pytest.raises(GrpcUnsupported, match="a piv key store cannot be used for gRPC"):
        GrpcDeviceClient(target, PivKeyStore(token, "9a", "123456"))

    async def connect() -> trio.abc.Stream:
        raise AssertionError("never called")

    memory = Target("memory", 0, AUTH_HOST, demo.edge_ca, connect=connect)
    with pytest.raises(GrpcUnsupported, match="needs a real socket"):
        GrpcDeviceClient(memory, None)
