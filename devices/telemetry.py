"""The telemetry gRPC service's messages and stubs, compiled from ``telemetry.proto`` at import.

``grpc.protos_and_services`` runs grpcio-tools' protoc in-process and imports the result as
``devices.telemetry_pb2`` / ``devices.telemetry_pb2_grpc``: no generated code lives in git, so
the ``.proto`` is the one source of truth. protoc finds the file on ``sys.path``; an editable
install puts no folder there (its finder maps package names), so the folder holding this
package is added for the duration of the import only.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import grpc

PROTO = Path(__file__).with_name("telemetry.proto")
SERVICE = "telemetry.Telemetry"


def _load() -> tuple[Any, Any]:
    root = str(PROTO.parent.parent)
    added = root not in sys.path
    if added:
        sys.path.append(root)
    try:
        return grpc.protos_and_services("devices/telemetry.proto")  # type: ignore[no-any-return]
    finally:
        if added:
            sys.path.remove(root)


# Messages (Reading, Ack, WatchRequest, Command) and the stub/servicer classes.
messages, services = _load()
Reading = messages.Reading
Ack = messages.Ack
WatchRequest = messages.WatchRequest
Command = messages.Command
TelemetryStub = services.TelemetryStub
TelemetryServicer = services.TelemetryServicer
add_servicer = services.add_TelemetryServicer_to_server
