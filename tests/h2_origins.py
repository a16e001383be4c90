"""Origins that speak HTTP/2 for tests: an h2 echo origin (h2c, or TLS with ALPN) and grpcio.

The echo origin answers every stream with JSON describing what it received (method, path,
headers, body length and SHA-256). The path chooses a behaviour:

- ``/trailers``: the JSON, then trailers (``x-echo-trailer: done``, ``grpc-status: 0``).
- ``/slow``: one chunk, then the rest only after the test sets ``origin.release``.
- ``/forever``: chunks until the stream is reset (flow control respected).
- ``/reset-mid-body``: a head and one chunk, then RST_STREAM(INTERNAL_ERROR).
- ``/reset-before-head``: RST_STREAM(REFUSED_STREAM) at once.

Everything it sees is recorded: requests, resets received (stream id and code), the number
of connections and the most streams it had open at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import ssl
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

CHUNK = b"x" * 16384


@dataclasses.dataclass
class H2EchoOrigin:
    """An HTTP/2 echo origin and what it saw."""

    max_concurrent_streams: int = 100
    tls: ssl.SSLContext | None = None
    ack: bool = True  # False: never send WINDOW_UPDATE for request bodies
    goaway_after: int | None = None  # GOAWAY (NO_ERROR) with the Nth answer on a connection
    requests: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    resets: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    connections: int = 0
    most_open: int = 0
    release: trio.Event = dataclasses.field(default_factory=trio.Event)
    reset_seen: trio.Event = dataclasses.field(default_factory=trio.Event)
    port: int = 0
    scopes: list[trio.CancelScope] = dataclasses.field(default_factory=list)

    def drop_connections(self) -> None:
        """Close every connection abruptly (no GOAWAY), as a crashing origin would."""
        for scope in self.scopes:
            scope.cancel()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve on 127.0.0.1 until cancelled; report the port."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, tcp: trio.SocketStream) -> None:
        self.connections += 1
        stream: trio.abc.Stream = tcp
        if self.tls is not None:
            stream = trio.SSLStream(tcp, self.tls, server_side=True)
        scope = trio.CancelScope()
        self.scopes.append(scope)
        try:
            with scope:
                await _EchoConnection(self, stream).run()
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


class _EchoConnection:
    def __init__(self, origin: H2EchoOrigin, stream: trio.abc.Stream) -> None:
        self.origin = origin
        self.stream = stream
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config)
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: origin.max_concurrent_streams
            },
        )
        self.lock = trio.Lock()
        self.changed = trio.Event()
        self.heads: dict[int, list[tuple[bytes, bytes]]] = {}
        self.bodies: dict[int, hashlib._Hash] = {}
        self.lengths: dict[int, int] = {}
        self.reset: set[int] = set()
        self.answered = 0

    async def flush(self) -> None:
        async with self.lock:
            data = self.h2.data_to_send()
            if data:
                await self.stream.send_all(data)

    def wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def run(self) -> None:
        self.h2.initiate_connection()
        await self.flush()
        async with trio.open_nursery() as nursery:
            while True:
                data = await self.stream.receive_some(65536)
                if not data:
                    break
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError:
                    break
                for event in events:
                    self.handle(event, nursery)
                self.origin.most_open = max(self.origin.most_open, len(self.heads))
                await self.flush()
            nursery.cancel_scope.cancel()

    def handle(self, event: h2.events.Event, nursery: trio.Nursery) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self.heads[event.stream_id] = list(event.headers or ())
            self.bodies[event.stream_id] = hashlib.sha256()
            self.lengths[event.stream_id] = 0
            path = dict(event.headers or ()).get(b":path", b"")
            if path.startswith(b"/reset-before-head"):
                self.h2.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                self.heads.pop(event.stream_id)
        elif isinstance(event, h2.events.DataReceived):
            sid = event.stream_id
            if sid in self.bodies:
                self.bodies[sid].update(event.data or b"")
                self.lengths[sid] += len(event.data or b"")
            if self.origin.ack:
                self.h2.acknowledge_received_data(event.flow_controlled_length or 0, sid)
        elif isinstance(event, h2.events.StreamEnded):
            if event.stream_id in self.heads:
                nursery.start_soon(self.answer, event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            self.origin.resets.append((event.stream_id, int(event.error_code or 0)))
            self.origin.reset_seen.set()
            self.reset.add(event.stream_id or 0)
            self.heads.pop(event.stream_id or 0, None)
            self.wake()
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self.wake()

    async def send_body(self, sid: int, data: bytes, end: bool = False) -> None:
        view = memoryview(data)
        while view:
            if sid in self.reset:
                return
            window = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
            if window <= 0:
                await self.changed.wait()
                continue
            self.h2.send_data(sid, view[:window].tobytes())
            view = view[window:]
            await self.flush()
        if end:
            self.h2.end_stream(sid)
            await self.flush()

    async def answer(self, sid: int) -> None:
        headers = self.heads[sid]
        pseudo = {k: v for k, v in headers if k.startswith(b":")}
        path = pseudo.get(b":path", b"/")
        record = {
            "method": pseudo.get(b":method", b"").decode(),
            "path": path.decode(),
            "scheme": pseudo.get(b":scheme", b"").decode(),
            "authority": pseudo.get(b":authority", b"").decode(),
            "headers": [[k.decode(), v.decode("latin-1")] for k, v in headers],
            "body_bytes": self.lengths[sid],
            "body_sha256": self.bodies[sid].hexdigest(),
            "stream": sid,
        }
        self.origin.requests.append(record)
        body = (json.dumps(record) + "\n").encode()
        try:
            if path.startswith(b"/slow"):
                self.h2.send_headers(sid, [(b":status", b"200"), (b"x-origin", b"h2-echo")])
                await self.send_body(sid, b"first chunk\n")
                await self.origin.release.wait()
                await self.send_body(sid, b"second chunk\n", end=True)
            elif path.startswith(b"/forever"):
                self.h2.send_headers(sid, [(b":status", b"200")])
                while sid not in self.reset:
                    await self.send_body(sid, CHUNK)
            elif path.startswith(b"/reset-mid-body"):
                self.h2.send_headers(sid, [(b":status", b"200")])
                await self.send_body(sid, b"partial body")
                self.h2.reset_stream(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
                await self.flush()
            else:
                self.h2.send_headers(
                    sid,
                    [
                        (b":status", b"200"),
                        (b"content-type", b"application/json"),
                        (b"x-origin", b"h2-echo"),
                    ],
                )
                trailers = path.startswith(b"/trailers")
                self.answered += 1
                if self.answered == self.origin.goaway_after:
                    # In the same write as the answer's end: the client reads both at once.
                    await self.send_body(sid, body)
                    self.h2.end_stream(sid)
                    self.h2.close_connection(last_stream_id=sid)
                    await self.flush()
                    return
                await self.send_body(sid, body, end=not trailers)
                if trailers:
                    self.h2.send_headers(
                        sid,
                        [(b"x-echo-trailer", b"done"), (b"grpc-status", b"0")],
                        end_stream=True,
                    )
                    await self.flush()
        except h2.exceptions.StreamClosedError:
            pass  # the enforcer reset it: recorded in ``resets``
        finally:
            self.heads.pop(sid, None)


def origin_tls_context(cert_pem: bytes, key_pem: bytes, alpn: list[str]) -> ssl.SSLContext:
    """A server context for a TLS origin selecting from ``alpn``."""
    import tempfile
    from pathlib import Path

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert.write_bytes(cert_pem)
        key.write_bytes(key_pem)
        ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(alpn)
    return ctx


# A real gRPC service (grpcio), raw bytes in and out: /echo.Echo/Unary answers the request
# bytes reversed; /echo.Echo/Fail answers NOT_FOUND with a message; /echo.Echo/Stream sends
# the request bytes back N times (N = the first byte); /echo.Echo/Chat answers each message
# of a bidirectional stream as it comes.


def _unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.set_trailing_metadata((("x-echo-trailer", "unary"),))
    return request[::-1]


def _fail(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.abort(grpc.StatusCode.NOT_FOUND, f"no such thing: {request.decode(errors='replace')}")
    return b""  # pragma: no cover - abort raises


def _stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for i in range(request[0] if request else 0):
        yield b"%d:" % i + request


def _chat(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    for request in requests:
        yield b"echo:" + request


def serve_grpc() -> tuple[grpc.Server, int]:
    """Start a grpcio server on an insecure 127.0.0.1 port; return it and the port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handlers: dict[str, Any] = {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "Fail": grpc.unary_unary_rpc_method_handler(_fail),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
        "Chat": grpc.stream_stream_rpc_method_handler(_chat),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("echo.Echo", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def grpc_frame(message: bytes) -> bytes:
    """One length-prefixed gRPC message (uncompressed)."""
    return b"\0" + len(message).to_bytes(4, "big") + message


def grpc_messages(body: bytes) -> list[bytes]:
    """Split a gRPC body into its messages."""
    out = []
    while body:
        n = int.from_bytes(body[1:5], "big")
        out.append(body[5 : 5 + n])
        body = body[5 + n :]
    return out


GRPC_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
]
