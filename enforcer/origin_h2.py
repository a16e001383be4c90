"""HTTP/2 to origins: one multiplexed connection per origin, shared by concurrent requests.

Theory of operation. An ``h2c://``, ``grpc://`` (prior knowledge over TCP), ``https://`` or
``grpcs://`` origin that selected ``h2`` in ALPN is reached over one :class:`H2Origin`
connection that many requests share, each on its own stream. The ``h2`` library is sans-IO;
this module moves its bytes.

- Tasks. Each connection has a reader and a writer task, in a nursery of the connection that
  lives in the pool's nursery (:class:`H2Origins`, run by ``OriginPool.running()``), so a
  connection outlives the request that opened it and dies with the pool. Requests never read
  or write the socket: they change the ``h2`` state, queue its output for the writer and wait
  on events the reader sets. A request cancelled at any await therefore never leaves half a
  frame on the wire, and the reader never waits for a write (an origin blocked writing to us
  while we were blocked writing to it would deadlock).
- Streams. A connection takes new streams while it is alive, has seen the origin's SETTINGS,
  received no GOAWAY and has fewer open than the origin's MAX_CONCURRENT_STREAMS (and our
  :data:`MAX_STREAMS`). When every connection is full another is opened, up to
  ``max_connections`` per origin; then requests wait (for ``timeout`` at most).
- Flow control, both ways. The request body is sent by a task of the exchange (see
  ``proxy._h2_exchange``) while the response streams back, so a bidirectional gRPC call works.
  Request DATA is sent only within the origin's window, split by
  its max frame size, and the request waits for WINDOW_UPDATE (or the stream's end) when the
  window is spent; it also waits for the writer to catch up, so at most
  :data:`_MAX_AHEAD` bytes are queued. Response DATA is acknowledged only when the consumer
  asks for the next chunk, so a slow client back-pressures the origin: what is buffered per
  stream is bounded by our stream window (:data:`STREAM_WINDOW`), and the connection window
  is large enough that one stalled stream never starves the others.
- Cancellation. A request leaving its context manager with its stream still open (the
  client went away, its scope was cancelled, it stopped reading) resets that stream with
  CANCEL; the connection and its other streams carry on. The origin resetting a stream, or the
  connection dying, fails that stream's waits with :class:`~enforcer.proxy.OriginError`.
- Hostile origins. The reader receives at most :data:`_RECEIVE_BYTES` per call, handles the
  events ``h2`` made of them and reaches a trio checkpoint before the next read; it stops
  reading while more than :data:`_MAX_OUTBOUND` bytes of our answers (PING and SETTINGS acks)
  wait for an origin that does not read. ``h2`` bounds header lists (64 KiB) and CONTINUATION
  runs; 1xx responses are capped per stream. Every request wait is bounded by its timeout.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

if TYPE_CHECKING:
    from enforcer.proxy import OriginConnector

log = logging.getLogger(__name__)

# Streams we open on one connection at most, whatever the origin allows (nginx's
# http2_max_concurrent_streams default).
MAX_STREAMS = 128
# Our receive window per stream: what one stream may buffer before its consumer takes it.
STREAM_WINDOW = 128 * 1024
# The connection's receive window: every stream's window at once, so that a stalled stream
# (a slow client) never holds the window the other streams need.
CONNECTION_WINDOW = STREAM_WINDOW * MAX_STREAMS
# Response header lists over this are a protocol error of the origin (h2's default too).
MAX_HEADER_LIST = 64 * 1024
# Bytes the reader takes per receive; a checkpoint follows each.
_RECEIVE_BYTES = 64 * 1024
# The reader pauses while this much of our output waits for an origin that does not read.
_MAX_OUTBOUND = 1024 * 1024
# A request sending its body waits for the writer once this much of it is queued.
_MAX_AHEAD = 64 * 1024
# An origin may send a few 1xx responses before its answer; more than this is an attack.
_MAX_INFORMATIONAL = 32

# Request headers that belong to one HTTP/1.1 connection (RFC 9113 §8.2.2), never sent in h2.
CONNECTION_SPECIFIC = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"http2-settings",
    }
)


class H2Error(Exception):
    """An h2 origin failed: the stream was reset or the connection died (the reason says)."""


def h2_request_headers(
    method: bytes,
    path: bytes,
    scheme: bytes,
    authority: bytes,
    headers: Sequence[tuple[bytes, bytes]],
) -> list[tuple[bytes, bytes]]:
    """HTTP/1.1-style request headers as an h2 header list: pseudo-headers first.

    ``:authority`` is the ``host`` header when there is one (the origin's, set by
    ``forwarded_headers``), else ``authority``. Connection-specific headers are dropped, and
    ``te`` unless it is ``trailers``, which gRPC servers require: a gRPC request gets it
    whatever the client sent (the enforcer relays trailers), since grpcio resets a stream
    without it.
    """
    out: list[tuple[bytes, bytes]] = []
    host = authority
    te = grpc = False
    for name, value in headers:
        k = name.lower()
        if k == b"host":
            host = value
            continue
        if k in CONNECTION_SPECIFIC or k.startswith(b":"):
            continue
        if k == b"te":
            if value.strip().lower() != b"trailers" or te:
                continue
            te = True
        grpc = grpc or (k == b"content-type" and value.lower().startswith(b"application/grpc"))
        out.append((k, value))
    if grpc and not te:
        out.append((b"te", b"trailers"))
    return [
        (b":method", method),
        (b":scheme", scheme),
        (b":authority", host),
        (b":path", path),
        *out,
    ]


@functools.lru_cache(maxsize=64)
def client_tls_context(ca_pem: str | None, alpn: tuple[str, ...]) -> ssl.SSLContext:
    """A TLS client context for origins: the system trust store, or only ``ca_pem``."""
    ctx = ssl.create_default_context(cadata=ca_pem) if ca_pem else ssl.create_default_context()
    ctx.set_alpn_protocols(list(alpn))
    return ctx


class H2Stream:
    """One request's stream: what the reader saw on it, for the request's task to take."""

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.informational = 0
        self.chunks: collections.deque[tuple[bytes, int]] = collections.deque()
        self.trailers: list[tuple[bytes, bytes]] = []
        self.ended = False  # the origin ended its side (END_STREAM)
        self.sent_all = False  # we ended our side
        self.error: str | None = None
        # The origin did nothing with it (REFUSED_STREAM, or GOAWAY below its id): a retry
        # on another connection is safe (RFC 9113 §8.7).
        self.unprocessed = False
        self._changed = trio.Event()

    def wake(self) -> None:
        """Wake the request waiting on this stream."""
        self._changed.set()
        self._changed = trio.Event()

    async def changed(self) -> None:
        """Wait for the next change (a response head, data, the end, a window update...)."""
        await self._changed.wait()

    def fail(self, reason: str) -> None:
        if self.error is None and not self.ended:
            self.error = reason
        self.wake()


class H2Origin:
    """One HTTP/2 connection to an origin, shared by concurrent requests (one stream each)."""

    def __init__(self, stream: trio.abc.Stream, origin: str, timeout: float) -> None:
        self.transport = stream
        self.origin = origin
        self.timeout = timeout
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config)
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
            },
        )
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.streams: dict[int, H2Stream] = {}
        self.dead: str | None = None
        self.goaway = False
        self.exhausted = False  # no stream id left
        self.settings_seen = trio.Event()
        self.on_slot_free: Callable[[], None] = lambda: None
        self._out = bytearray()
        self._kick = trio.Event()
        self._queued = 0  # bytes ever queued for the writer
        self._sent = 0  # bytes ever written
        self._progress = trio.Event()
        self._scope = trio.CancelScope()
        self._queue()

    # -- capacity ---------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """How many streams this connection may have open at once."""
        return min(self.h2.remote_settings.max_concurrent_streams, MAX_STREAMS)

    @property
    def usable(self) -> bool:
        """True when a new stream may start here now."""
        return (
            self.dead is None
            and not self.goaway
            and not self.exhausted
            and self.settings_seen.is_set()
            and len(self.streams) < self.capacity
        )

    @property
    def retired(self) -> bool:
        """True when no new stream will ever start here (dead, GOAWAY or out of ids)."""
        return self.dead is not None or self.goaway or self.exhausted

    # -- tasks ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Read and write until the connection dies or the pool closes; then close it."""
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._reader)
                    nursery.start_soon(self._writer)
        except Exception:
            # A bug must cost this connection's streams, never the pool (nor the server).
            log.exception("connection to origin %s: unexpected error", self.origin)
            self.die("internal error (see the server log)")
        finally:
            self.die("the origin pool closed")
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.transport)

    async def _reader(self) -> None:
        try:
            while self.dead is None:
                while len(self._out) > _MAX_OUTBOUND and self.dead is None:
                    await self._progress.wait()  # the origin must read our acks first
                data = await self.transport.receive_some(_RECEIVE_BYTES)
                if not data:
                    self.die("the origin closed the connection")
                    return
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    self.die(f"the origin broke HTTP/2: {exc}")
                    return
                for event in events:
                    self._handle(event)
                self._queue()
                # Bounded work per iteration: one receive's events, then a checkpoint (our
                # sockets return without one while bytes are ready).
                await trio.lowlevel.checkpoint()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.die(f"the connection to the origin failed: {exc!r}")

    async def _writer(self) -> None:
        try:
            while self.dead is None:
                if not self._out:
                    await self._kick.wait()
                    self._kick = trio.Event()
                    continue
                data = bytes(self._out)
                self._out.clear()
                with trio.move_on_after(self.timeout) as scope:
                    await self.transport.send_all(data)
                if scope.cancelled_caught:
                    self.die(f"the origin read nothing for {self.timeout:g} s")
                    return
                self._sent += len(data)
                self._progress.set()
                self._progress = trio.Event()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.die(f"the connection to the origin failed: {exc!r}")

    def die(self, reason: str) -> None:
        """Mark the connection dead: every stream on it fails, its tasks end."""
        if self.dead is not None:
            return
        self.dead = reason
        for stream in self.streams.values():
            stream.fail(f"origin {self.origin}: {reason}")
        self._kick.set()
        self._progress.set()
        self.settings_seen.set()  # wakes a request waiting for the first SETTINGS
        self._scope.cancel()
        self.on_slot_free()

    def _queue(self) -> None:
        """Move what h2 wants to send to the writer's buffer and wake the writer."""
        data = self.h2.data_to_send()
        if data:
            self._out += data
            self._queued += len(data)
            self._kick.set()

    # -- events from the origin -------------------------------------------------------------

    def _handle(self, event: h2.events.Event) -> None:
        sid = getattr(event, "stream_id", None)
        stream = self.streams.get(sid) if sid else None
        if isinstance(event, h2.events.ResponseReceived) and stream is not None:
            headers = list(event.headers or ())
            status = next((v for k, v in headers if k == b":status"), b"")
            if len(status) != 3 or not status.isdigit():
                self._reset(stream, h2.errors.ErrorCodes.PROTOCOL_ERROR)
                stream.fail(f"origin {self.origin} sent the status {status!r}")
                return
            stream.status = int(status)
            stream.headers = [(k, v) for k, v in headers if not k.startswith(b":")]
            stream.wake()
        elif isinstance(event, h2.events.InformationalResponseReceived) and stream is not None:
            stream.informational += 1
            if stream.informational > _MAX_INFORMATIONAL:
                self._reset(stream, h2.errors.ErrorCodes.PROTOCOL_ERROR)
                stream.fail(f"origin {self.origin} sent over {_MAX_INFORMATIONAL} 1xx")
        elif isinstance(event, h2.events.DataReceived):
            length = event.flow_controlled_length or 0
            if stream is None:
                # A stream we gave up on: hand the window back at once.
                if sid and length:
                    self.h2.acknowledge_received_data(length, sid)
                return
            stream.chunks.append((bytes(event.data or b""), length))
            stream.wake()
        elif isinstance(event, h2.events.TrailersReceived) and stream is not None:
            stream.trailers = [(k, v) for k, v in event.headers or () if not k.startswith(b":")]
        elif isinstance(event, h2.events.StreamEnded) and stream is not None:
            stream.ended = True
            stream.wake()
        elif isinstance(event, h2.events.StreamReset) and stream is not None:
            code = event.error_code
            if code == h2.errors.ErrorCodes.NO_ERROR and stream.ended:
                stream.wake()  # "stop sending, the response is complete" (RFC 9113 §8.1)
            else:
                stream.unprocessed = code == h2.errors.ErrorCodes.REFUSED_STREAM
                stream.fail(f"origin {self.origin} reset the stream ({_code_name(code)})")
        elif isinstance(event, h2.events.WindowUpdated):
            targets = self.streams.values() if not event.stream_id else [stream] if stream else []
            for s in targets:
                s.wake()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self.settings_seen.set()
            for s in self.streams.values():
                s.wake()  # the initial window or the frame size may have changed
            self.on_slot_free()  # MAX_CONCURRENT_STREAMS may have grown
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = True
            last = event.last_stream_id or 0
            for s in self.streams.values():
                if s.id > last:
                    s.unprocessed = True
                if s.id > last or event.error_code != h2.errors.ErrorCodes.NO_ERROR:
                    s.fail(
                        f"origin {self.origin} sent GOAWAY ({_code_name(event.error_code)}) "
                        f"before stream {s.id} was processed"
                    )
            self.on_slot_free()

    # -- what requests do -------------------------------------------------------------------

    def start(self, headers: list[tuple[bytes, bytes]], end_stream: bool) -> H2Stream:
        """Open a stream with ``headers`` (the caller checked :attr:`usable`)."""
        try:
            sid = self.h2.get_next_available_stream_id()
        except h2.exceptions.NoAvailableStreamIDError:
            self.exhausted = True
            raise H2Error(f"origin {self.origin}: no stream id left on this connection") from None
        stream = H2Stream(sid)
        self.streams[sid] = stream
        try:
            self.h2.send_headers(sid, headers, end_stream=end_stream)
        except h2.exceptions.ProtocolError as exc:
            del self.streams[sid]
            raise H2Error(f"cannot send the request to origin {self.origin}: {exc}") from exc
        stream.sent_all = end_stream
        self._queue()
        return stream

    async def send_data(self, stream: H2Stream, data: bytes, *, end: bool = False) -> bool:
        """Send ``data`` within the origin's windows; False when the origin stopped the stream.

        Waits (without a timer: the caller times it) for window updates and for the writer.
        """
        view = memoryview(data)
        while view:
            self._check(stream)
            if stream.ended:
                return False  # the origin answered without waiting for the rest
            try:
                allowed = min(
                    self.h2.local_flow_control_window(stream.id),
                    self.h2.max_outbound_frame_size,
                    len(view),
                )
                if allowed > 0:
                    self.h2.send_data(stream.id, view[:allowed].tobytes())
            except h2.exceptions.ProtocolError as exc:
                raise H2Error(f"cannot send to origin {self.origin}: {exc}") from exc
            if allowed <= 0:
                await stream.changed()  # a WINDOW_UPDATE, a SETTINGS change, or the end
                continue
            view = view[allowed:]
            self._queue()
            await self._drained(self._queued - _MAX_AHEAD)
        if end:
            self.end(stream)
        return True

    def end(self, stream: H2Stream) -> None:
        """End our side of ``stream`` (the request is complete)."""
        self._check(stream)
        if not self._open(stream):
            return  # the origin already closed it (a complete answer, then NO_ERROR)
        try:
            self.h2.end_stream(stream.id)
        except h2.exceptions.ProtocolError as exc:
            raise H2Error(f"cannot end the request to origin {self.origin}: {exc}") from exc
        stream.sent_all = True
        self._queue()

    async def _drained(self, mark: int) -> None:
        while self._sent < mark and self.dead is None:
            await self._progress.wait()

    def _check(self, stream: H2Stream) -> None:
        if stream.error is not None:
            raise H2Error(stream.error)
        if self.dead is not None:
            raise H2Error(f"origin {self.origin}: {self.dead}")

    def _open(self, stream: H2Stream) -> bool:
        state = self.h2.streams.get(stream.id)
        return state is not None and not state.closed

    def _reset(self, stream: H2Stream, code: h2.errors.ErrorCodes) -> None:
        if self.dead is None and self._open(stream):
            try:
                self.h2.reset_stream(stream.id, code)
            except h2.exceptions.ProtocolError:
                return
            self._queue()

    def abandon(self, stream: H2Stream, reason: str) -> None:
        """Give up on ``stream`` from our side: reset it (CANCEL) and fail its waits."""
        self._reset(stream, h2.errors.ErrorCodes.CANCEL)
        stream.fail(reason)

    def finish(self, stream: H2Stream) -> None:
        """The request is over: reset the stream if still open, hand back its window."""
        self._reset(stream, h2.errors.ErrorCodes.CANCEL)
        unacked = sum(length for _, length in stream.chunks)
        stream.chunks.clear()
        if unacked and self.dead is None:
            self.h2.acknowledge_received_data(unacked, stream.id)
            self._queue()
        self.streams.pop(stream.id, None)
        if self.retired and not self.streams:
            self.die("no stream left on a connection that takes no new ones")
        self.on_slot_free()

    def acknowledge(self, stream: H2Stream, length: int) -> None:
        """The consumer took ``length`` flow-controlled bytes: let the origin send more."""
        if length and self.dead is None:
            self.h2.acknowledge_received_data(length, stream.id)
            self._queue()


def _code_name(code: object) -> str:
    try:
        return h2.errors.ErrorCodes(code).name  # type: ignore[arg-type]
    except ValueError:
        return str(code)


@dataclasses.dataclass(frozen=True)
class H2Target:
    """Where and how to reach an h2 origin."""

    origin: str
    host: str
    port: int
    tls: bool
    ca_pem: str | None


class NegotiatedHTTP1(Exception):
    """An ``https://`` origin selected HTTP/1.1 in ALPN; ``stream`` is the open connection."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        super().__init__("the origin selected http/1.1")
        self.stream = stream


class H2Origins:
    """The HTTP/2 connections to origins, keyed by origin URL and trust, and their tasks."""

    def __init__(self, connect: Callable[[], OriginConnector], max_connections: int = 8) -> None:
        self._connect = connect
        self.max_connections = max_connections
        self._conns: dict[tuple[str, str | None], list[H2Origin]] = {}
        self._freed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._opening: dict[tuple[str, str | None], int] = {}  # connections being opened

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Give connections a nursery to live in; on exit close them all.

        Nested use (two servers sharing one enforcer) shares the outer nursery.
        """
        if self._nursery is not None:
            yield
            return
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                yield
            finally:
                self._nursery = None
                self.close_all()
                nursery.cancel_scope.cancel()

    def close_all(self) -> None:
        """Kill every connection (its task closes the socket)."""
        conns, self._conns = self._conns, {}
        for group in conns.values():
            for conn in group:
                conn.die("the origin pool closed")

    def _slot_freed(self) -> None:
        self._freed.set()
        self._freed = trio.Event()

    async def open_stream(
        self,
        target: H2Target,
        headers: list[tuple[bytes, bytes]],
        end_stream: bool,
        timeout: float,
        *,
        http1_fallback: bool,
    ) -> tuple[H2Origin, H2Stream]:
        """Start a stream on a usable connection, opening one when all are full.

        With ``http1_fallback`` (https://), an origin that selects http/1.1 raises
        :class:`NegotiatedHTTP1` carrying the connection.
        """
        key = (target.origin, target.ca_pem)
        with trio.fail_after(timeout):
            while True:
                group = []
                for c in self._conns.get(key, []):
                    if c.retired and not c.streams:
                        c.die("no stream left on a connection that takes no new ones")
                    else:
                        group.append(c)
                self._conns[key] = group
                usable = next((c for c in group if c.usable), None)
                if usable is not None:
                    try:
                        return usable, usable.start(headers, end_stream)
                    except H2Error:
                        if not usable.exhausted:
                            raise
                        continue  # out of stream ids: it is retired, try the others
                opening = self._opening.get(key, 0)
                if sum(not c.retired for c in group) + opening < self.max_connections:
                    self._opening[key] = opening + 1
                    try:
                        conn = await self._open(target, timeout, http1_fallback)
                    finally:
                        self._opening[key] -= 1
                        self._slot_freed()  # a waiter may now open one, or use this one
                    group = self._conns.setdefault(key, [])
                    group.append(conn)
                    if conn.usable:
                        return conn, conn.start(headers, end_stream)
                    if conn.dead is not None:
                        raise H2Error(f"origin {target.origin}: {conn.dead}")
                    continue
                await self._freed.wait()

    async def _open(self, target: H2Target, timeout: float, http1_fallback: bool) -> H2Origin:
        if self._nursery is None:
            raise H2Error(
                f"cannot reach the HTTP/2 origin {target.origin}: the origin pool is not "
                "running (serve inside `async with pool.running()`)"
            )
        nursery = self._nursery
        stream = await _open_transport(target, self._connect(), http1_fallback)
        conn = H2Origin(stream, target.origin, timeout)
        conn.on_slot_free = self._slot_freed
        nursery.start_soon(conn.run)
        try:
            await conn.settings_seen.wait()  # the origin's preface: it speaks h2, and its limits
        except BaseException:
            conn.die("the request that opened the connection gave up")  # its task closes it
            raise
        return conn


async def _open_transport(
    target: H2Target, connect: OriginConnector, http1_fallback: bool
) -> trio.abc.Stream:
    try:
        stream = await connect(target.host, target.port)
    except OSError as exc:
        raise H2Error(f"cannot connect to origin {target.origin}: {exc}") from exc
    if not target.tls:
        return stream
    alpn = ("h2", "http/1.1") if http1_fallback else ("h2",)
    tls = trio.SSLStream(
        stream, client_tls_context(target.ca_pem, alpn), server_hostname=target.host
    )
    try:
        await tls.do_handshake()
    except (trio.BrokenResourceError, OSError) as exc:
        await trio.aclose_forcefully(tls)
        cause = exc.__cause__ or exc
        raise H2Error(f"TLS to origin {target.origin} failed: {cause}") from exc
    except BaseException:  # cancelled (the request's timer): the socket is ours to close
        await trio.aclose_forcefully(tls)
        raise
    selected = tls.selected_alpn_protocol()
    if selected == "h2":
        return tls
    if http1_fallback and selected in (None, "http/1.1"):
        raise NegotiatedHTTP1(tls)
    await trio.aclose_forcefully(tls)
    raise H2Error(f"origin {target.origin} did not select h2 in ALPN (got {selected!r})")


async def response_chunks(
    conn: H2Origin,
    stream: H2Stream,
    timeout: float,
    on_trailers: Callable[[list[tuple[bytes, bytes]]], None],
    fail: Callable[[str], Exception],
) -> AsyncIterator[bytes]:
    """The response body of ``stream``; each chunk acknowledged once the consumer wants more."""
    while True:
        if stream.chunks:
            data, length = stream.chunks.popleft()
            if data:
                yield data
            # Acknowledged only now: the consumer took the chunk (a slow client holds the
            # origin back through the window instead of growing a buffer here).
            conn.acknowledge(stream, length)
            continue
        if stream.error is not None:
            raise fail(stream.error)
        if stream.ended:
            on_trailers(stream.trailers)
            return
        with trio.move_on_after(timeout) as scope:
            await stream.changed()
        if scope.cancelled_caught:
            raise fail(f"origin {conn.origin} sent nothing for {timeout:g} s mid-body")


async def wait_head(conn: H2Origin, stream: H2Stream, timeout: float) -> int:
    """Wait for the response head of ``stream`` (a timer of ``timeout``); return its status."""
    with trio.move_on_after(timeout):
        while stream.status is None:
            if stream.error is not None:
                raise H2Error(stream.error)
            if stream.ended:
                raise H2Error(f"origin {conn.origin} ended the stream without a response")
            await stream.changed()
    if stream.status is None:
        raise H2Error(f"origin {conn.origin} sent no response within {timeout:g} s")
    return stream.status
