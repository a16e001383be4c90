"""An HTTP/2 test client: the h2 library over stdlib ssl in trio, with ALPN h2.

Streams are opened explicitly and read back as :class:`H2Response`; the client records what the
server did to the connection (GOAWAY and its last stream id, RST_STREAM codes), so tests can
check coalescing, per-stream decisions and No Duration on one connection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ssl
from collections.abc import Sequence

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trio


@dataclasses.dataclass
class H2Response:
    """What one stream got back."""

    stream_id: int
    status: int | None = None
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    body: bytearray = dataclasses.field(default_factory=bytearray)
    trailers: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    reset: int | None = None  # the RST_STREAM error code, when the server reset the stream
    ended: bool = False
    data_frames: int = 0
    largest_frame: int = 0

    def header(self, name: str) -> str | None:
        """The first value of a response header (case-insensitive)."""
        return next((v for k, v in self.headers if k == name.lower()), None)

    @property
    def reason(self) -> str | None:
        """The X-Access-Denied-Reason header."""
        return self.header("x-access-denied-reason")


def h2_context(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """``ctx`` offering ALPN h2 only."""
    ctx.set_alpn_protocols(["h2"])
    return ctx


class H2Client:
    """One TLS connection speaking HTTP/2 to the enforcer."""

    def __init__(
        self,
        stream: trio.SSLStream[trio.SocketStream],
        *,
        auto_ack: bool = True,
        validate: bool = True,
    ) -> None:
        self.stream = stream
        self.auto_ack = auto_ack
        # validate=False lets a test send what h2 would refuse to (a hostile client).
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=validate,
            normalize_outbound_headers=validate,
        )
        self.conn = h2.connection.H2Connection(config=config)
        self.responses: dict[int, H2Response] = {}
        self.goaway_last: int | None = None  # last_stream_id of the server's GOAWAY
        self.goaway_code: int | None = None
        self.closed = False  # the server closed the TCP/TLS connection
        self.remote_settings: dict[int, int] = {}
        self._buffer = b""

    @classmethod
    async def open(
        cls,
        port: int,
        sni: str,
        ctx: ssl.SSLContext,
        *,
        window: int | None = None,
        auto_ack: bool = True,
        validate: bool = True,
    ) -> H2Client:
        """Connect, handshake with ALPN h2 (which the server must select), send the preface."""
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(tcp, h2_context(ctx), server_hostname=sni)
        await stream.do_handshake()
        assert stream.selected_alpn_protocol() == "h2", stream.selected_alpn_protocol()
        client = cls(stream, auto_ack=auto_ack, validate=validate)
        if window is not None:
            client.conn.local_settings = h2.settings.Settings(
                client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
            )
        client.conn.initiate_connection()
        await client.flush()
        return client

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            await self.stream.send_all(data)

    def start(
        self,
        path: str = "/",
        *,
        authority: str | None = None,
        method: str = "GET",
        headers: Sequence[tuple[str, str]] = (),
        end: bool = True,
        pseudo: Sequence[tuple[str, str]] | None = None,
    ) -> int:
        """Queue a new stream's HEADERS (send with :meth:`flush`); return its id."""
        sid = self.conn.get_next_available_stream_id()
        if pseudo is None:
            pseudo = [
                (":method", method),
                (":scheme", "https"),
                (":authority", authority or str(self.stream.server_hostname)),
                (":path", path),
            ]
        hdrs = [(k.encode(), v.encode()) for k, v in [*pseudo, *headers]]
        self.conn.send_headers(sid, hdrs, end_stream=end)
        self.responses[sid] = H2Response(sid)
        return sid

    async def send_body(self, sid: int, data: bytes, *, end: bool = True) -> None:
        """Send ``data`` on a stream as the server's window allows, then (``end``) end it."""
        view = memoryview(data)
        while view:
            window = min(
                self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size
            )
            if window <= 0:
                await self.pump()
                continue
            n = min(window, len(view))
            self.conn.send_data(sid, bytes(view[:n]))
            view = view[n:]
            await self.flush()
        if end:
            self.conn.end_stream(sid)
            await self.flush()

    async def pump(self) -> list[h2.events.Event]:
        """Read once from the server and record what happened; [] once it closed."""
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.closed = True
            for r in self.responses.values():
                if not r.ended and r.reset is None:
                    r.reset = -1  # the connection ended under it
            return []
        events = self.conn.receive_data(self._take_goaway(data))
        for event in events:
            self._record(event)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.flush()
        return events

    def _take_goaway(self, data: bytes) -> bytes:
        """Record and drop GOAWAY frames, passing every other complete frame on to h2.

        h2 closes its whole state machine on a GOAWAY, so the streams the server still
        finishes after a graceful one could not be read; real clients (curl, grpcio) read them.
        """
        self._buffer += data
        out = bytearray()
        while len(self._buffer) >= 9:
            length = int.from_bytes(self._buffer[:3], "big")
            if len(self._buffer) < 9 + length:
                break
            frame, self._buffer = self._buffer[: 9 + length], self._buffer[9 + length :]
            if frame[3] == 7:  # GOAWAY: last stream id, error code
                self.goaway_last = int.from_bytes(frame[9:13], "big") & 0x7FFFFFFF
                self.goaway_code = int.from_bytes(frame[13:17], "big")
            else:
                out += frame
        return bytes(out)

    def _record(self, event: h2.events.Event) -> None:
        sid = getattr(event, "stream_id", None)
        r = self.responses.get(sid) if sid else None
        if isinstance(event, h2.events.ResponseReceived) and r is not None:
            for k, v in event.headers:
                if k == b":status":
                    r.status = int(v)
                else:
                    r.headers.append((k.decode(), v.decode()))
        elif isinstance(event, h2.events.TrailersReceived) and r is not None:
            r.trailers = [(k.decode(), v.decode()) for k, v in event.headers]
        elif isinstance(event, h2.events.DataReceived) and r is not None:
            r.body += event.data
            r.data_frames += 1
            r.largest_frame = max(r.largest_frame, len(event.data))
            if self.auto_ack and event.flow_controlled_length:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded) and r is not None:
            r.ended = True
        elif isinstance(event, h2.events.StreamReset) and r is not None:
            r.reset = int(event.error_code)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway_last = event.last_stream_id
            self.goaway_code = int(event.error_code)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            for code, change in event.changed_settings.items():
                self.remote_settings[int(code)] = change.new_value

    async def response(self, sid: int, limit: float = 20) -> H2Response:
        """Read until stream ``sid`` ended or was reset (or the connection closed)."""
        r = self.responses[sid]
        with trio.fail_after(limit):
            while not r.ended and r.reset is None:
                await self.pump()
        return r

    async def request(self, path: str = "/", **kwargs: object) -> H2Response:
        """One stream: send and read its whole response."""
        body = kwargs.pop("body", b"")
        assert isinstance(body, bytes)
        sid = self.start(path, end=not body, **kwargs)  # type: ignore[arg-type]
        await self.flush()
        if body:
            await self.send_body(sid, body)
        return await self.response(sid)

    async def wait_closed(self, limit: float = 20) -> None:
        """Read until the server closes the connection."""
        with trio.fail_after(limit):
            while not self.closed:
                await self.pump()

    async def aclose(self) -> None:
        with trio.move_on_after(2):
            with contextlib.suppress(
                trio.BrokenResourceError, trio.ClosedResourceError, h2.exceptions.ProtocolError
            ):
                self.conn.close_connection()
                await self.flush()
        await trio.aclose_forcefully(self.stream)
