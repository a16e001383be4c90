"""The HTTP/2 session of one TLS connection: h2 (python-hyper) driven from trio.

Theory of operation. h2 is sans-IO like h11: bytes go in with ``receive_data`` and come back
as events, frames to send accumulate until ``data_to_send``. This module moves the bytes and
turns streams into requests of the shared path (``enforcer/exchange.py``), so every stream gets
the access decision a request on a kept-alive HTTP/1.1 connection gets (access-flow A14, G1).

- One receive loop per connection (:meth:`H2Session.serve`) reads one bounded chunk from TLS,
  shows its raw frames to the connection's :class:`~enforcer.h2guard.FloodGuard` (flood
  defences: it may end the connection with GOAWAY(ENHANCE_YOUR_CALM) before h2 sees the
  chunk), hands it to h2, dispatches the events, flushes, and reaches a trio checkpoint: the
  work per checkpoint is one read's worth of frames (L10).
- Each stream is a task in the session's nursery, inside its own cancel scope: a client's
  RST_STREAM cancels it, so its origin exchange is aborted (G6).
- Writes from all tasks go through one lock (:meth:`H2Session.flush`): HPACK state makes the
  order of header blocks matter, so frames leave in the order h2 produced them.
- Flow control both ways. A request body is acknowledged to the client only as the origin
  takes it (a slow origin back-pressures the client, and what a stream buffers is bounded by
  its window); a response waits for the client's window and is cut to its max frame size.
- Graceful GOAWAY. h2 closes its whole state machine on ``close_connection``, so a GOAWAY that
  lets open streams finish is written as a raw frame after h2's pending output; streams the
  client opens past it are refused with REFUSED_STREAM (No Duration, G4; and the last stream
  that ``max_requests_per_connection`` allows).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio
from hyperframe.frame import GoAwayFrame

from enforcer.exchange import (
    HOP_BY_HOP_RESPONSE,
    HTTP2,
    MAX_BODY,
    Established,
    LogStatus,
    RequestHead,
    RequestPath,
)
from enforcer.h2guard import FloodGuard, H2Limits, Verdict
from enforcer.http import BodyTimeout, BodyTooLarge
from enforcer.proxy import Fairness, OriginResponse
from enforcer.tls import TLSError

if TYPE_CHECKING:  # the server imports this module
    from enforcer.server import Enforcer

log = logging.getLogger(__name__)
_RECEIVE_SIZE = 65536
ErrorCode = h2.errors.ErrorCodes | int
# Connection-specific header fields (RFC 9113 §8.2.2): never sent on HTTP/2 (and h2 refuses
# them in a request, but for ``te: trailers``, which is hop-by-hop for the origin anyway).
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te"}
)
# What an origin's response head or trailers may not pass on: its framing too.
_NOT_RELAYED = HOP_BY_HOP_RESPONSE | _CONNECTION_SPECIFIC
# The connection's receive window (Envoy's initial_connection_window_size): what all streams
# together may hold before the origins take it; each stream is held to its own window too.
CONNECTION_WINDOW = 1024 * 1024


class _ClientStalled(Exception):
    """The client kept a stream's flow-control window shut past request_timeout."""


class _Stream:
    """One HTTP/2 stream: the :class:`~enforcer.exchange.Responder` its request answers through."""

    def __init__(self, session: H2Session, stream_id: int, head: RequestHead) -> None:
        self.s = session
        self.id = stream_id
        self.head = head
        self.scope = trio.CancelScope()
        # DATA frames wait here until the body is wanted; flow control bounds them (see top).
        self._in, self._out = trio.open_memory_channel[tuple[bytes, int]](math.inf)
        self.unacked = 0  # flow-controlled bytes received and not yet acknowledged
        self.client_done = False  # END_STREAM (or a reset) from the client
        self.headers_sent = False
        self.done = False  # our side ended (END_STREAM sent, or reset)

    # Fed by the receive loop.

    def feed(self, data: bytes, flow: int) -> None:
        """Buffer a DATA frame's payload for the body reader."""
        self.unacked += flow
        if not self.client_done:
            self._in.send_nowait((data, flow))

    def end(self) -> None:
        """The client ended its side of the stream."""
        if not self.client_done:
            self.client_done = True
            self._in.close()

    # The Responder side (enforcer/exchange.py).

    @property
    def started(self) -> bool:
        """True once the response's HEADERS left."""
        return self.headers_sent

    async def answer(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        *,
        close: bool,
        head: bool = False,
    ) -> None:
        """Send a whole answer of the enforcer's own; an empty body ends with the HEADERS.

        ``close`` does not end an HTTP/2 connection: the other streams are not at fault, and
        No Duration already sent its GOAWAY when the stream opened.
        """
        out = self._response_head(status, headers)
        if body:
            out.append((b"content-length", b"%d" % len(body)))
        only_headers = not body or head
        await self._send_headers(out, end=only_headers)
        if not only_headers:
            await self._send_data(body, end=True)

    def body(self) -> AsyncGenerator[bytes, None]:
        """The request body, each chunk acknowledged once the next one is asked for."""
        return self._body()

    async def _body(self) -> AsyncGenerator[bytes, None]:
        s = self.s
        timeout = s.e.settings.request_timeout
        if any(k == b"expect" and v.lower() == b"100-continue" for k, v in self.head.headers):
            await self._send_headers([(b":status", b"100")], end=False, final=False)
        deadline = trio.current_time() + timeout
        size = 0
        taken = 0
        while True:
            if taken:
                # The origin took the last chunk: only now may the client send that much more.
                self._ack(taken)
                taken = 0
                await s.flush()
            try:
                with trio.fail_at(deadline):
                    data, flow = await self._out.receive()
            except trio.EndOfChannel:
                return
            except trio.TooSlowError:
                raise BodyTimeout(f"the request body took over {timeout:g} s") from None
            size += len(data)
            if size > MAX_BODY:
                raise BodyTooLarge(f"request body over {MAX_BODY} bytes")
            taken = flow
            if data:
                yield data

    def _ack(self, n: int) -> None:
        n = min(n, self.unacked)
        if n > 0:
            self.unacked -= n
            self.s.h2.acknowledge_received_data(n, self.id)

    async def relay(
        self,
        response: OriginResponse,
        extra: list[tuple[bytes, bytes]],
        log_status: LogStatus,
        *,
        close: bool,
    ) -> None:
        """Stream the origin's answer; its trailers (gRPC's status) end the stream."""
        if close:
            # A No Duration policy (S2) ends the connection: the GOAWAY leaves before the
            # response, so a client knows it by the end of the stream, as with G4's.
            self.s.goaway(self.s.highest_stream)
        await self._send_headers(self._response_head(response.status, [*response.headers, *extra]))
        fair = Fairness()
        try:
            async for chunk in response.body:
                await self._send_data(chunk)
                await fair.moved(len(chunk))
        finally:
            # A stream reset mid-body leaves the origin's iterator unfinished: close it here,
            # not in the garbage collector.
            aclose = getattr(response.body, "aclose", None)
            if aclose is not None:
                with trio.CancelScope(shield=True):
                    await aclose()
        log_status(response.status)  # before the end: once a client has its answer, it is logged
        trailers = [
            (k.lower(), v)
            for k, v in response.trailers
            if not k.startswith(b":") and k.lower() not in _NOT_RELAYED
        ]
        if trailers:
            await self._send_headers(trailers, end=True, final=False)
        else:
            self.s.h2.end_stream(self.id)
            self.done = True
            await self.s.flush()

    async def abort(self, why: str) -> None:
        """Reset this stream only: HTTP/2 cuts one response without the others."""
        log.info("connection %d stream %d: %s", self.s.conn_id, self.id, why)
        self.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
        await self.s.flush()

    def reset(self, code: ErrorCode) -> None:
        """Send RST_STREAM unless the stream already ended."""
        if not self.done:
            self.done = True
            with contextlib.suppress(h2.exceptions.ProtocolError):  # closed, or the connection
                self.s.h2.reset_stream(self.id, code)

    def _response_head(
        self, status: int, headers: Sequence[tuple[bytes, bytes]]
    ) -> list[tuple[bytes, bytes]]:
        out = [(b":status", b"%d" % status)]
        out += [
            (k.lower(), v)
            for k, v in headers
            if k.lower() not in _NOT_RELAYED and not k.startswith(b":")
        ]
        return out

    async def _send_headers(
        self, headers: list[tuple[bytes, bytes]], *, end: bool = False, final: bool = True
    ) -> None:
        self.s.h2.send_headers(self.id, headers, end_stream=end)
        if final:
            self.headers_sent = True
        if end:
            self.done = True
        await self.s.flush()

    async def _send_data(self, data: bytes, *, end: bool = False) -> None:
        """Send ``data`` within the client's flow-control window and max frame size."""
        conn = self.s.h2
        view = memoryview(data)
        while view:
            window = min(conn.local_flow_control_window(self.id), conn.max_outbound_frame_size)
            if window <= 0:
                await self.s.window_opened()
                continue
            n = min(window, len(view))
            conn.send_data(self.id, bytes(view[:n]), end_stream=end and n == len(view))
            view = view[n:]
            await self.s.flush()
        if end:
            if not data:
                conn.end_stream(self.id)
                await self.s.flush()
            self.done = True


class H2Session(RequestPath):
    """The HTTP/2 side of one established TLS connection (see the module docstring)."""

    def __init__(self, enforcer: Enforcer, conn: Established) -> None:
        super().__init__(enforcer, conn)
        settings = enforcer.settings
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config=config)
        codes = h2.settings.SettingCodes
        # No ENABLE_CONNECT_PROTOCOL: WebSocket over HTTP/2 (RFC 8441) is not offered.
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                codes.MAX_CONCURRENT_STREAMS: settings.h2_max_concurrent_streams,
                codes.MAX_HEADER_LIST_SIZE: settings.max_header_bytes,
                codes.HEADER_TABLE_SIZE: settings.h2_header_table_size,
                codes.INITIAL_WINDOW_SIZE: settings.h2_initial_window_size,
            },
        )
        # h2 applies our settings once the client acknowledges them; the decoder's bounds
        # hold from the first HEADERS frame.
        self.h2.decoder.max_header_list_size = settings.max_header_bytes
        self.h2.decoder.max_allowed_table_size = settings.h2_header_table_size
        # Flood defences (enforcer/h2guard.py) on its own monotonic clock: rates, not validity.
        self.guard = FloodGuard(H2Limits.from_settings(settings), trio.current_time)
        self.streams: dict[int, _Stream] = {}
        self.count = 0  # streams accepted on this connection
        self.highest_stream = 0
        self._goaway_last: int | None = None  # set once a graceful GOAWAY went out
        self._raw: list[bytes] = []  # frames written past h2 (the graceful GOAWAY)
        self._write_lock = trio.Lock()
        self._window = trio.Event()
        self._receiving: trio.CancelScope | None = None
        self._idle_since = trio.current_time()
        self._nursery: trio.Nursery | None = None
        self._broken: TLSError | None = None

    async def serve(self) -> bool:
        """Serve streams until the client leaves, idles out, or a GOAWAY drained them.

        True when it ended with our graceful GOAWAY: the client may still be sending frames,
        so the close lingers (enforcer/server.py).
        """
        graceful = False
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)  # 65535: RFC 9113's
        await self.flush()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    graceful = await self._receive_loop(nursery)
                except TLSError as exc:
                    self._broken = exc  # raised below, outside the nursery's exception group
                nursery.cancel_scope.cancel()  # the client left: its streams cannot finish
        finally:
            if self._broken is None:
                await self._close_quietly()
        if self._broken is not None:
            raise self._broken
        return graceful

    async def _receive_loop(self, nursery: trio.Nursery) -> bool:
        while True:
            if self._goaway_last is not None and not self.streams:
                return True  # drained after a graceful GOAWAY
            with trio.CancelScope() as scope:
                self._receiving = scope
                self._set_idle_deadline()
                data = await self.tls.receive_some(_RECEIVE_SIZE)
            self._receiving = None
            if scope.cancelled_caught:
                if self._goaway_last is None and not self.streams:
                    self.goaway(self.highest_stream)  # idle: tell the client, then close
                    await self.flush()
                    return True
                continue  # the last stream after a GOAWAY ended: loop to return
            if not data:
                return False
            # The guard sees the raw frames first: a flood ends before h2 decodes its header
            # blocks or a stream of it reaches the origin.
            if (verdict := self.guard.received(data)) is not None:
                self._flood(verdict)
                return False
            try:
                events = self.h2.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                # h2 has queued a GOAWAY with the error's code; it leaves with the close.
                log.info("connection %d: HTTP/2 protocol error: %s", self.conn_id, exc)
                return False
            for event in events:
                self._dispatch(event, nursery)
            await self.flush()
            # One read's worth of frames per checkpoint, whatever flush did (L10).
            await trio.lowlevel.checkpoint()

    def _flood(self, verdict: Verdict) -> None:
        """End the connection with the guard's GOAWAY, and log why."""
        log.info("connection %d: %s: %s", self.conn_id, verdict.reason, verdict.detail)
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection(verdict.error_code, last_stream_id=self.highest_stream)
        counts = self.guard.counts
        self.e.access_log.write(
            {
                "time": self.e.clock.now().isoformat(),
                "event": "h2_flood",
                "connection": self.conn_id,
                "client_ip": self.peer,
                "sni": self.tls.sni,
                "reason": verdict.reason,
                "detail": verdict.detail,
                "frames": counts.frames,
                "streams": counts.streams_opened,
            }
        )

    def _set_idle_deadline(self) -> None:
        scope = self._receiving
        if scope is None:
            return
        if self.streams:
            scope.deadline = math.inf
        else:
            settings = self.e.settings
            # The first stream may take request_timeout (as HTTP/1.1's first request);
            # later, no stream open for idle_timeout ends the connection (L3, G8).
            wait = settings.idle_timeout if self.count else settings.request_timeout
            scope.deadline = self._idle_since + wait

    def _dispatch(self, event: h2.events.Event, nursery: trio.Nursery) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._open(event, nursery)
        elif isinstance(event, h2.events.DataReceived):
            assert event.stream_id is not None and event.data is not None
            flow = event.flow_controlled_length or 0
            stream = self.streams.get(event.stream_id)
            if stream is not None and not stream.done:
                stream.feed(event.data, flow)
            elif flow:
                # Nobody will read it: give the window back at once.
                self.h2.acknowledge_received_data(flow, event.stream_id)
            if event.stream_ended and stream is not None:
                stream.end()
        elif isinstance(event, h2.events.StreamEnded | h2.events.TrailersReceived):
            assert event.stream_id is not None
            # Request trailers are not forwarded (the origin gets a plain body).
            if (stream := self.streams.get(event.stream_id)) is not None and (
                isinstance(event, h2.events.StreamEnded) or event.stream_ended
            ):
                stream.end()
        elif isinstance(event, h2.events.StreamReset):
            assert event.stream_id is not None
            if (stream := self.streams.get(event.stream_id)) is not None:
                stream.done = True  # h2 closed it: nothing more may be sent
                stream.end()
                stream.scope.cancel()  # G6: the origin exchange is aborted
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._window.set()
            self._window = trio.Event()
        elif isinstance(event, h2.events.ConnectionTerminated):
            # The client's GOAWAY: h2 now refuses to send anything, so the streams end.
            assert self._nursery is not None
            self._nursery.cancel_scope.cancel()

    def _open(self, event: h2.events.RequestReceived, nursery: trio.Nursery) -> None:
        assert event.stream_id is not None and event.headers is not None
        sid = event.stream_id
        self.highest_stream = max(self.highest_stream, sid)
        if self._goaway_last is not None and sid > self._goaway_last:
            # Past our GOAWAY: the client retries it on a new connection (G4).
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        self.count += 1
        settings = self.e.settings
        last = self.count >= settings.max_requests_per_connection
        if last or self.no_duration_sni(self.e.snapshot):
            # No Duration: one stream per connection, so one full handshake per request (G4).
            self.goaway(sid)
        stream = _Stream(self, sid, _head(event.headers, sid, self.count))
        self.streams[sid] = stream
        if event.stream_ended:
            stream.end()
        nursery.start_soon(self._run, stream, last)

    async def _run(self, stream: _Stream, last: bool) -> None:
        open_streams = self.e.metrics.streams_open
        open_streams.inc()
        try:
            with stream.scope:
                if stream.done:
                    # Reset in the same read that opened it (rapid reset): the decision, a
                    # token signature among its costs, is never made for it.
                    return
                await self.exchange(stream.head, stream, last=last)
        except (h2.exceptions.ProtocolError, _ClientStalled) as exc:
            # The client reset the stream (or ended the connection) while we answered it,
            # or stopped reading it: the stream ends, the others go on.
            log.debug("connection %d stream %d: %s", self.conn_id, stream.id, exc)
        except TLSError as exc:
            self._broken = exc  # the connection itself failed: end every stream
            assert self._nursery is not None
            self._nursery.cancel_scope.cancel()
        except Exception:
            # A bug must cost one stream, never the connection.
            log.exception("connection %d stream %d: unexpected error", self.conn_id, stream.id)
            stream.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
        finally:
            open_streams.dec()
            self._release(stream)
        # The RST_STREAM or WINDOW_UPDATE the release made; not when the session is ending
        # (the nursery's cancellation skips it), which closes the connection anyway.
        if self._broken is None:
            try:
                await self.flush()
            except TLSError as exc:
                self._broken = exc
                assert self._nursery is not None
                self._nursery.cancel_scope.cancel()

    def _release(self, stream: _Stream) -> None:
        # What the origin never took goes back to the connection's window; a client still
        # sending a body it no longer needs to is told to stop, without error (RFC 9113 §8.1).
        if not stream.done:
            stream.reset(h2.errors.ErrorCodes.CANCEL)
        elif not stream.client_done:
            with contextlib.suppress(h2.exceptions.ProtocolError):  # closed, or the connection
                self.h2.reset_stream(stream.id, h2.errors.ErrorCodes.NO_ERROR)
        stream.end()
        if stream.unacked:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.acknowledge_received_data(stream.unacked, stream.id)
            stream.unacked = 0
        del self.streams[stream.id]
        if not self.streams:
            self._idle_since = trio.current_time()
            if self._goaway_last is not None and self._receiving is not None:
                self._receiving.cancel()  # drained: the receive loop closes the connection
        self._set_idle_deadline()

    def goaway(self, last_stream_id: int) -> None:
        """Announce that no stream after ``last_stream_id`` will be served; open ones finish."""
        if self._goaway_last is not None:
            last_stream_id = min(last_stream_id, self._goaway_last)
        self._goaway_last = last_stream_id
        frame = GoAwayFrame(0)
        frame.last_stream_id = last_stream_id
        frame.error_code = h2.errors.ErrorCodes.NO_ERROR
        self._raw.append(frame.serialize())

    async def window_opened(self) -> None:
        """Wait until the client opens a flow-control window (at most request_timeout)."""
        timeout = self.e.settings.request_timeout
        with trio.move_on_after(timeout):
            await self._window.wait()
            return
        raise _ClientStalled(f"the client's flow-control window stayed shut for {timeout:g} s")

    async def flush(self, *, timeout: float | None = None) -> None:
        """Send what h2 (and a GOAWAY of ours) produced, in the order produced.

        Once h2 has handed its bytes over they must reach the socket whole: a stream cancelled
        mid-write (its client reset it) would otherwise cut a frame, or drop HEADERS whose
        HPACK state the client's decoder then lacks, breaking every stream. So the write is
        shielded from cancellation and bounded by its own deadline instead (``timeout``,
        ``request_timeout`` by default): a client that reads nothing for that long has its
        connection ended, as nginx's ``send_timeout`` does.
        """
        limit = self.e.settings.request_timeout if timeout is None else timeout
        async with self._write_lock:
            data = self.h2.data_to_send()
            if self._raw:
                data += b"".join(self._raw)
                self._raw.clear()
            if data:
                with trio.CancelScope(shield=True, deadline=trio.current_time() + limit) as scope:
                    await self.tls.send_all(data)
                if scope.cancelled_caught:
                    raise TLSError(
                        f"the client read nothing for {limit:g} s (request_timeout): "
                        "connection ended"
                    )
                self.guard.sent(data)

    async def _close_quietly(self) -> None:
        with trio.CancelScope(shield=True, deadline=trio.current_time() + 1):
            try:
                if self.h2.state_machine.state is not h2.connection.ConnectionState.CLOSED:
                    last = self._goaway_last
                    self.h2.close_connection(
                        last_stream_id=self.highest_stream if last is None else last
                    )
                await self.flush(timeout=1)
            except (TLSError, h2.exceptions.ProtocolError):
                pass


def _head(headers: Sequence[tuple[bytes, bytes]], stream_id: int, number: int) -> RequestHead:
    """The shared path's view of a stream's HEADERS (h2 has validated the pseudo-headers)."""
    pseudo: dict[bytes, bytes] = {}
    regular: list[tuple[bytes, bytes]] = []
    has_host = False
    for name, value in headers:
        if name.startswith(b":"):
            pseudo[name] = value
        elif name not in _CONNECTION_SPECIFIC or (name == b"te" and value == b"trailers"):
            # ``te: trailers`` goes on: gRPC origins reset a stream without it (F3).
            has_host = has_host or name == b"host"
            regular.append((name, value))
    method = pseudo.get(b":method", b"")
    authority = pseudo.get(b":authority")
    target = pseudo.get(b":path", b"" if method == b"CONNECT" else b"/")
    if authority is not None and not has_host:
        regular.insert(0, (b"host", authority))
        authority = None  # it is the Host: nothing else to compare
    return RequestHead(
        method=method,
        target=target,
        headers=regular,
        protocol=HTTP2,
        number=number,
        stream_id=stream_id,
        authority=authority,
        http_version=b"2",
    )
