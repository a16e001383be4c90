"""The telemetry gRPC service a run starts as its applications' origin (``grpc://``).

A grpcio server on an insecure loopback port (TLS ends at the edge in front of it: the
enforcer or nginx's ``grpc_pass``), in grpcio's own threads beside trio. It counts calls per
device and per method, so a test or a run can see that a call really reached the origin.
``Report`` acknowledges a reading; ``Watch`` streams ``count`` commands (at most
:data:`MAX_WATCH`) and ends the call.

The device id is taken from the message; the edge's identity headers, when one adds them
(``cf-access-*`` style metadata), are counted apart by :attr:`TelemetryService.metadata`.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from typing import Any

import grpc
import trio

from devices import telemetry

MAX_WATCH = 1000  # commands per Watch call: a device asking for more gets this many


class TelemetryService(telemetry.TelemetryServicer):  # type: ignore[misc]
    """The servicer: counts calls per (method, device) under a lock (grpcio's threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: Counter[tuple[str, str]] = Counter()
        self.metadata: list[dict[str, str]] = []  # invocation metadata of the last calls
        self.port = 0

    def _count(self, method: str, device: str, context: grpc.ServicerContext) -> int:
        with self._lock:
            self.calls[(method, device)] += 1
            if len(self.metadata) >= 100:  # the last 100 are enough to look at
                del self.metadata[0]
            self.metadata.append({k: str(v) for k, v in context.invocation_metadata()})
            return self.calls[(method, device)]

    def Report(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Acknowledge a reading with the count of this device's reports so far."""
        received = self._count("Report", request.device_id, context)
        return telemetry.Ack(sequence=request.sequence, received=received)

    def Watch(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        """Stream ``count`` commands to the device."""
        self._count("Watch", request.device_id, context)
        for k in range(min(request.count, MAX_WATCH)):
            if not context.is_active():
                return
            yield telemetry.Command(device_id=request.device_id, sequence=k + 1, name="ping")

    def count(self, method: str | None = None, device: str | None = None) -> int:
        """Calls counted so far, of one method and/or one device (None: all)."""
        with self._lock:
            return sum(
                n
                for (m, d), n in self.calls.items()
                if (method is None or m == method) and (device is None or d == device)
            )


def start_telemetry(host: str = "127.0.0.1", port: int = 0) -> tuple[grpc.Server, TelemetryService]:
    """Start the service on ``host:port`` (0: any free port; see ``service.port``)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="telemetry"))
    service = TelemetryService()
    telemetry.add_servicer(service, server)
    service.port = server.add_insecure_port(f"{host}:{port}")
    if not service.port:
        raise OSError(f"the telemetry service cannot listen on {host}:{port}")
    server.start()
    return server, service


@contextlib.asynccontextmanager
async def serve_telemetry(
    host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[TelemetryService]:
    """Serve the telemetry service while the block runs; its origin is ``grpc://host:port``."""
    server, service = start_telemetry(host, port)
    try:
        yield service
    finally:
        # stop() returns an event; waiting for it in a thread keeps trio responsive.
        done = server.stop(grace=0.5)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(done.wait, 5.0)
