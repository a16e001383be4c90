"""HTTP/2 flood defences: a per-connection guard that decides when a peer has had enough.

Theory of operation
-------------------
HTTP/2 lets a peer make the server work without asking for anything it would log as a request:
open a stream and reset it at once (CVE-2023-44487, "rapid reset"), send PING or SETTINGS frames
the server must acknowledge, send CONTINUATION frames that never end a header block (the 2024
CONTINUATION floods, CVE-2024-27316 and kin), or frames with empty payloads that cost a parse
each. nginx and Envoy bound each of these; this module bounds them the same way (access-flow
G10).

The guard is sans-IO: no sockets, no trio, and the time is read from the callable it is given
(``trio.current_time`` in the server, a fake in tests). The HTTP/2 session hands it

* ``received(data)``: every chunk of bytes from the peer *before* ``H2Connection.receive_data``,
  so that the guard sees frames the h2 library hides (CONTINUATION, empty DATA, the PING and
  SETTINGS frames it acknowledges by itself, frames on streams it already closed) and can stop
  a flood before h2 decodes a header block or the session opens an origin request for it. The
  guard reads only the 9-byte frame headers, never payloads, so its work per chunk is a small
  constant per frame and the session's read size bounds it;
* ``sent(data)``: every chunk the session has written, which tells the guard which streams the
  enforcer has finished answering and how many DATA frames it sent, and clears the count of
  control frames the peer made it owe.

``received`` returns ``None`` or a :class:`Verdict`: the session sends GOAWAY with its error code
(ENHANCE_YOUR_CALM, as nginx and Envoy do) without handing the chunk to h2, and closes. (Envoy
closes without a GOAWAY when the peer does not read; the session's close gives a GOAWAY a
bounded moment to leave, so the difference costs at most that moment.)

The bounds, with the nginx/Envoy setting each follows:

* control frames (PING, SETTINGS, RST_STREAM, PRIORITY, unknown types) per second: a token bucket
  of ``max_control_frames_per_second`` tokens refilled at that rate;
* premature resets (Envoy's ``overload.premature_reset_*``): once the peer has opened
  ``premature_reset_streams`` streams, it may not have reset more than half of them before the
  enforcer answered and within ``premature_reset_seconds`` of their opening. A rapid-reset
  attacker is stopped after that many streams whatever the timing;
* new streams per received chunk (nginx 1.25.3): at most twice ``max_concurrent_streams``;
* a header block (HEADERS plus CONTINUATION): at most ``max_header_bytes`` of frame payload and
  ``MAX_CONTINUATION_FRAMES`` CONTINUATION frames;
* consecutive frames with an empty payload and no END_STREAM (Envoy's
  ``max_consecutive_inbound_frames_with_empty_payload``): ``max_empty_frames``;
* WINDOW_UPDATE frames (Envoy's ``max_inbound_window_update_frames_per_data_frame_sent``):
  at most ``5 + 2 * (streams opened + 10 * DATA frames sent)``;
* control frames owed and not yet written (Envoy's ``max_outbound_control_frames``):
  ``max_outbound_control_frames``.

Max concurrent streams, the HPACK table size and the header list size are HTTP/2 SETTINGS that
the session (enforcer/http2.py) advertises and h2 enforces: a stream over the limit is a
connection error (PROTOCOL_ERROR, which RFC 9113 §5.4.1 allows for this stream error), a
decoded header list over ``max_header_bytes`` is ENHANCE_YOUR_CALM.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from h2.errors import ErrorCodes

if TYPE_CHECKING:
    from enforcer.config import ServerSettings

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# A frame header: 24-bit length (as 16 + 8 bits), type, flags, R bit + 31-bit stream id.
_HEADER = struct.Struct(">HBBBL")

# Frame types (RFC 9113 §6) and the flags the guard reads.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE = range(9)
CONTINUATION = 9
FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4

# A legitimate header block within max_header_bytes needs one CONTINUATION per 16 KiB frame;
# h2 itself gives up at 64. Sixteen leaves room for peers that split blocks finely.
MAX_CONTINUATION_FRAMES = 16
# Envoy's allowance of WINDOW_UPDATE frames per DATA frame the server sends.
WINDOW_UPDATES_PER_DATA_FRAME = 10


@dataclasses.dataclass(frozen=True)
class H2Limits:
    """The HTTP/2 limits of one listener (``[server]`` in the configuration)."""

    max_concurrent_streams: int = 128
    max_header_bytes: int = 16 * 1024
    max_control_frames_per_second: int = 100
    max_outbound_control_frames: int = 1000
    max_empty_frames: int = 1
    premature_reset_streams: int = 100
    premature_reset_seconds: float = 1.0

    @classmethod
    def from_settings(cls, server: ServerSettings) -> H2Limits:
        """The limits a ``[server]`` table configures."""
        return cls(
            max_concurrent_streams=server.h2_max_concurrent_streams,
            max_header_bytes=server.max_header_bytes,
            max_control_frames_per_second=server.h2_max_control_frames_per_second,
            max_outbound_control_frames=server.h2_max_outbound_control_frames,
            max_empty_frames=server.h2_max_empty_frames,
            premature_reset_streams=server.h2_premature_reset_streams,
        )


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Why the connection must end: GOAWAY with ``error_code`` (ENHANCE_YOUR_CALM), then close."""

    error_code: ErrorCodes
    reason: str
    detail: str


def _calm(reason: str, detail: str) -> Verdict:
    return Verdict(ErrorCodes.ENHANCE_YOUR_CALM, reason, detail)


class _Bucket:
    """A token bucket: ``rate`` tokens a second, holding at most ``rate``."""

    def __init__(self, rate: int, now: float) -> None:
        self.rate = rate
        self.tokens = float(rate)
        self.at = now

    def take(self, now: float) -> bool:
        """Spend one token; False when none is left."""
        if now > self.at:
            self.tokens = min(float(self.rate), self.tokens + (now - self.at) * self.rate)
            self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


@dataclasses.dataclass
class GuardCounts:
    """What the guard has seen on one connection (for tests, logs and the bench)."""

    frames: int = 0
    streams_opened: int = 0
    premature_resets: int = 0
    control_frames: int = 0
    window_updates: int = 0
    data_frames_sent: int = 0
    owed_control_frames: int = 0


class FloodGuard:
    """Watches one HTTP/2 connection's frames and says when the peer is flooding it."""

    def __init__(self, limits: H2Limits, clock: Callable[[], float]) -> None:
        self.limits = limits
        self._clock = clock
        self.counts = GuardCounts()
        self.verdict: Verdict | None = None
        self._control = _Bucket(limits.max_control_frames_per_second, clock())
        self._preface_left = len(PREFACE)
        self._inbound = _FrameHeaders()
        self._highest_stream = 0
        # Streams the peer opened that the enforcer has not finished answering: id -> opened at.
        self._unanswered: dict[int, float] = {}
        self._empty_run = 0
        self._block_bytes = 0
        self._block_continuations = 0
        self._in_block = False
        # Our own frames: END_STREAM and RST_STREAM end a stream's answer; DATA frames count.
        self._outbound = _FrameHeaders()

    # -- inbound ---------------------------------------------------------------------------

    def received(self, data: bytes | bytearray | memoryview) -> Verdict | None:
        """Account for bytes from the peer; a verdict once the peer exceeds a limit."""
        if self.verdict is not None:
            return self.verdict
        now = self._clock()
        view = memoryview(data)
        if self._preface_left:
            # The preface's content is h2's to check; the guard only steps over it.
            n = min(self._preface_left, len(view))
            self._preface_left -= n
            view = view[n:]
        new_streams = 0
        for kind, flags, length, stream_id in self._inbound.feed(view):
            if self._frame(kind, flags, length, stream_id, now):
                new_streams += 1
                if new_streams > 2 * self.limits.max_concurrent_streams:
                    self.verdict = _calm(
                        "h2_stream_flood",
                        f"more than {2 * self.limits.max_concurrent_streams} new streams "
                        "in one read (nginx's per-iteration limit)",
                    )
            if self.verdict is not None:
                return self.verdict
        return None

    def _frame(self, kind: int, flags: int, length: int, stream_id: int, now: float) -> bool:
        """Account for one inbound frame header; True when it opens a stream."""
        c = self.counts
        c.frames += 1
        limits = self.limits
        opened = False
        empty = length == 0 and not (kind in (DATA, HEADERS) and flags & FLAG_END_STREAM)
        if kind in (DATA, HEADERS, CONTINUATION):
            self._empty_run = self._empty_run + 1 if empty else 0
            if self._empty_run > limits.max_empty_frames:
                self.verdict = _calm(
                    "h2_empty_frames",
                    f"more than {limits.max_empty_frames} consecutive frames with an empty "
                    "payload and no END_STREAM",
                )
                return False
        if kind == HEADERS:
            if stream_id > self._highest_stream:
                self._highest_stream = stream_id
                self._unanswered[stream_id] = now
                c.streams_opened += 1
                opened = True
            self._block_bytes = length
            self._block_continuations = 0
            self._in_block = not flags & FLAG_END_HEADERS
            self._check_block()
        elif kind == CONTINUATION:
            self._block_bytes += length
            self._block_continuations += 1
            if flags & FLAG_END_HEADERS:
                self._in_block = False
            self._check_block()
        elif kind == WINDOW_UPDATE:
            c.window_updates += 1
            allowed = 5 + 2 * (
                c.streams_opened + WINDOW_UPDATES_PER_DATA_FRAME * c.data_frames_sent
            )
            if c.window_updates > allowed:
                self.verdict = _calm(
                    "h2_window_update_flood",
                    f"{c.window_updates} WINDOW_UPDATE frames for {c.data_frames_sent} "
                    f"DATA frames sent and {c.streams_opened} streams",
                )
        elif kind != DATA:
            self._control_frame(kind, flags, stream_id, now)
        return opened

    def _check_block(self) -> None:
        limits = self.limits
        if self._block_bytes > limits.max_header_bytes:
            self.verdict = _calm(
                "h2_header_block_too_large",
                f"a header block over {limits.max_header_bytes} bytes (max_header_bytes)",
            )
        elif self._block_continuations > MAX_CONTINUATION_FRAMES:
            self.verdict = _calm(
                "h2_continuation_flood",
                f"more than {MAX_CONTINUATION_FRAMES} CONTINUATION frames in one header block",
            )

    def _control_frame(self, kind: int, flags: int, stream_id: int, now: float) -> None:
        """PING, SETTINGS, RST_STREAM, PRIORITY, GOAWAY, PUSH_PROMISE and unknown frames."""
        c = self.counts
        limits = self.limits
        if kind == GOAWAY:
            return  # the peer is leaving; h2 handles it
        c.control_frames += 1
        if kind in (PING, SETTINGS) and not flags & FLAG_ACK:
            c.owed_control_frames += 1  # h2 answers these by itself
        if kind == RST_STREAM:
            opened_at = self._unanswered.pop(stream_id, None)
            if opened_at is not None and now - opened_at < limits.premature_reset_seconds:
                c.premature_resets += 1
            if (
                c.streams_opened >= limits.premature_reset_streams
                and 2 * c.premature_resets > c.streams_opened
            ):
                self.verdict = _calm(
                    "h2_rapid_reset",
                    f"{c.premature_resets} of {c.streams_opened} streams reset before an answer "
                    "(CVE-2023-44487)",
                )
                return
        if not self._control.take(now):
            self.verdict = _calm(
                "h2_control_frame_flood",
                f"more than {limits.max_control_frames_per_second} control frames "
                "(PING, SETTINGS, RST_STREAM, PRIORITY) a second",
            )
        elif c.owed_control_frames > limits.max_outbound_control_frames:
            self.verdict = _calm(
                "h2_outbound_control_flood",
                f"more than {limits.max_outbound_control_frames} acknowledgements owed and "
                "unwritten (the peer is not reading)",
            )

    # -- outbound --------------------------------------------------------------------------

    def sent(self, data: bytes | bytearray | memoryview) -> None:
        """Account for bytes the session has written to the peer."""
        self.counts.owed_control_frames = 0
        for kind, flags, _, stream_id in self._outbound.feed(memoryview(data)):
            if kind == DATA:
                self.counts.data_frames_sent += 1
            if (kind in (DATA, HEADERS) and flags & FLAG_END_STREAM) or kind == RST_STREAM:
                self._unanswered.pop(stream_id, None)


class _FrameHeaders:
    """Finds the 9-byte frame headers in a byte stream fed in arbitrary chunks."""

    def __init__(self) -> None:
        self._head = bytearray()  # a frame header split across chunks
        self._skip = 0  # payload bytes of the current frame still to come

    def feed(self, view: memoryview) -> Iterator[tuple[int, int, int, int]]:
        """Yield ``(type, flags, length, stream id)`` of each frame header completed by ``view``."""
        i, end = 0, len(view)
        if self._skip:
            i = min(self._skip, end)
            self._skip -= i
        if self._head and i < end:
            need = 9 - len(self._head)
            self._head += view[i : i + need]
            i += min(need, end - i)
            if len(self._head) < 9:
                return
            hi, lo, kind, flags, stream_id = _HEADER.unpack(self._head)
            self._head.clear()
            length = hi << 8 | lo
            i += length
            yield kind, flags, length, stream_id & 0x7FFFFFFF
        while i + 9 <= end:
            hi, lo, kind, flags, stream_id = _HEADER.unpack_from(view, i)
            length = hi << 8 | lo
            i += 9 + length
            yield kind, flags, length, stream_id & 0x7FFFFFFF
        if i > end:
            self._skip = i - end
        elif i < end:
            self._head += view[i:end]
