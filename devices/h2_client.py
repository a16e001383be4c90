"""A device's HTTP/2 client over mTLS on trio: the ``h2`` library over trio's SSLStream.

Theory of operation. :class:`H2DeviceClient` is a :class:`~devices.client.DeviceClient` whose
connection speaks HTTP/2: the same TCP connect, key store and TLS handshake (offering ALPN
``h2`` only, so a server that cannot speak it is seen at once: ``alpn_error:<what it chose>``),
the same phase timings, cookie jar, session resumption and :class:`~devices.client.Attempt`
outcomes. ``h2`` is sans-IO: the client feeds it the bytes it reads and sends the bytes it
returns; every read is a trio checkpoint, and a response body above :data:`MAX_BODY` ends the
attempt, so a hostile server cannot keep a device busy or make it buffer without bound.

One request is one stream. The device keeps its connection for the next request (with
``keep_alive``) unless the server sent GOAWAY or closed it: an application with No Duration
(one full handshake per request) answers the first stream and sends GOAWAY, so the next
request opens a new connection with a new handshake (:attr:`DeviceClient.handshakes` counts
them). A stream the server did not process -- refused (``REFUSED_STREAM``), above a GOAWAY's
last stream id, or sent on a connection the server had closed -- is retried once on a new
connection, as real clients do; an answered stream is never retried.

``first_byte`` is the time from the request's first byte sent to its response headers (as the
HTTP/1.1 client counts it: a server may answer before the body is sent).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Sequence
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

from devices.client import (
    COOKIE_NAME,
    Attempt,
    ClientOptions,
    DeviceClient,
    Target,
    _describe,
    classify,
    tls_error_name,
    tls_session,
)
from devices.keystore import KeyStore

MAX_BODY = 1 << 20  # bytes of response body a device reads before giving up on the answer
MAX_HEADER_LIST = 64 * 1024  # SETTINGS_MAX_HEADER_LIST_SIZE the device announces


class GracefulH2Connection(h2.connection.H2Connection):
    """An h2 client connection on which streams a GOAWAY covers can still complete.

    h2 moves a connection to CLOSED on receiving GOAWAY and then refuses every frame
    (python-hyper/h2#1181), but RFC 9113 section 6.8 lets streams up to the GOAWAY's last
    stream id complete, and servers use that: nginx (``keepalive_requests``), and an
    application with No Duration, send GOAWAY *before* the response of the stream they
    answer. So the connection stays open for receiving; the client opens no new stream on
    it (``H2DeviceClient._goaway``) and drops it once its stream has ended.
    """

    def _receive_goaway_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        frames, events = super()._receive_goaway_frame(frame)
        if self.state_machine.state is h2.connection.ConnectionState.CLOSED:
            self.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
        return frames, events


class _Stale(Exception):
    """The server never processed the stream: retry it on a new connection."""


class _Failed(Exception):
    """The exchange failed; ``outcome`` names how."""

    def __init__(self, outcome: str, error: str) -> None:
        super().__init__(error)
        self.outcome = outcome


@dataclasses.dataclass
class _Exchange:
    """One stream's response as it arrives."""

    stream_id: int
    status: int | None = None
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    trailers: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    chunks: list[bytes] = dataclasses.field(default_factory=list)
    size: int = 0
    ended: bool = False
    headers_at: float | None = None


def _text(pairs: Sequence[tuple[bytes | str, bytes | str]]) -> list[tuple[str, str]]:
    out = []
    for k, v in pairs:
        key = k.decode("latin-1") if isinstance(k, bytes) else k
        value = v.decode("latin-1") if isinstance(v, bytes) else v
        out.append((key.lower(), value))
    return out


class H2DeviceClient(DeviceClient):
    """A device's HTTP/2 connection, TLS session and cookie for one target."""

    # The standard library's TLS: its ALPN refusal ("no application protocol") is what this
    # client names alpn_error:refused; the HTTP/1.1 load path is the one pyOpenSSL speeds up.
    native_tls = False

    def __init__(
        self,
        target: Target,
        key_store: KeyStore | None,
        options: ClientOptions | None = None,
        now: Callable[[], dt.datetime] | None = None,
    ) -> None:
        super().__init__(dataclasses.replace(target, alpn=("h2",)), key_store, options, now)
        self._h2: h2.connection.H2Connection | None = None
        self._goaway = False  # the server said GOAWAY: no new stream on this connection

    async def request(
        self,
        path: str = "/",
        *,
        method: str = "GET",
        body: bytes = b"",
        headers: Sequence[tuple[str, str]] = (),
    ) -> Attempt:
        """Send one request on a stream (opening a connection if needed) and classify it."""
        attempt = await super().request(path, method=method, body=body, headers=headers)
        attempt.protocol = "h2"
        return attempt

    async def _request(
        self,
        attempt: Attempt,
        path: str,
        method: str,
        body: bytes,
        headers: Sequence[tuple[str, str]],
    ) -> bool:
        """Fill ``attempt``; return True when a reused connection did not take the stream."""
        fresh = self.options.always_new_handshake or not self.options.keep_alive
        if self._stream is None or self._h2 is None or self._goaway or fresh:
            if not await self._open(attempt):
                if "no application protocol" in (attempt.error or ""):
                    # The server speaks no protocol the device offered (h2): its TLS alert.
                    attempt.outcome = "alpn_error:refused"
                return False
            assert self._stream is not None
            selected = self._stream.selected_alpn_protocol()
            if selected != "h2":
                attempt.outcome = f"alpn_error:{selected or 'none'}"
                attempt.error = f"the server did not select h2 (ALPN: {selected or 'none'})"
                await self._drop()
                return False
            conn = GracefulH2Connection(
                h2.config.H2Configuration(client_side=True, header_encoding=None)
            )
            conn.local_settings = h2.settings.Settings(
                client=True,
                initial_values={
                    h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
                    h2.settings.SettingCodes.ENABLE_PUSH: 0,
                },
            )
            conn.initiate_connection()
            self._h2, self._goaway = conn, False
        assert self._stream is not None and self._h2 is not None
        conn = self._h2

        hdrs = [
            (":method", method),
            (":scheme", "https"),
            (":authority", self.target.server_name),
            (":path", path),
            ("user-agent", "mtls-testbed-device"),
        ]
        cookie = self.cookie if self.options.reuse_cookie else None
        if cookie:
            hdrs.append(("cookie", f"{COOKIE_NAME}={cookie}"))
            attempt.cookie_sent = True
        hdrs += [(k.lower(), v) for k, v in headers]
        if body or method in ("POST", "PUT", "PATCH"):
            hdrs.append(("content-length", str(len(body))))
        exchange = _Exchange(conn.get_next_available_stream_id())
        sent_at = trio.current_time()
        try:
            conn.send_headers(exchange.stream_id, hdrs, end_stream=not body)
            await self._flush()
            if body:
                await self._send_body(exchange, body)
            while not exchange.ended:
                await self._receive(exchange)
        except _Stale:
            await self._drop()
            if attempt.new_connection:
                attempt.outcome, attempt.error = "h2_error:refused_stream", "stream refused"
                return False
            return True
        except _Failed as exc:
            await self._drop()
            if not attempt.new_connection and exchange.status is None and exc.outcome == "eof":
                return True  # a kept connection the server had closed
            attempt.outcome, attempt.error = (
                ("tls_error:eof" if exc.outcome == "eof" else exc.outcome),
                str(exc),
            )
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            await self._drop()
            if not attempt.new_connection and exchange.status is None:
                return True
            attempt.outcome, attempt.error = tls_error_name(exc), _describe(exc)
            return False
        except h2.exceptions.ProtocolError as exc:
            await self._drop()
            attempt.outcome, attempt.error = "h2_error:protocol_error", _describe(exc)
            return False
        assert exchange.status is not None and exchange.headers_at is not None
        attempt.timings.first_byte = max(0.0, exchange.headers_at - sent_at)
        attempt.status = exchange.status
        attempt.headers = exchange.headers + exchange.trailers
        attempt.reason = next(
            (v for k, v in attempt.headers if k == "x-access-denied-reason"), None
        )
        attempt.outcome = classify(exchange.status, attempt.reason)
        attempt.body = b"".join(exchange.chunks)
        self._take_cookie(attempt)
        if self.options.resume_sessions and attempt.new_connection:
            # TLS 1.3 tickets arrive after the handshake (see DeviceClient).
            self._session = tls_session(self._stream)
        if self._goaway or fresh:
            await self._drop()
        return False

    async def _flush(self) -> None:
        assert self._stream is not None and self._h2 is not None
        data = self._h2.data_to_send()
        if not data:
            return
        try:
            await self._stream.send_all(data)
        except trio.BrokenResourceError:
            if not self._goaway:
                raise
            # After its GOAWAY the server may close as soon as it has answered: what was left
            # to send (window updates, settings acks) no longer matters.

    async def _send_body(self, exchange: _Exchange, body: bytes) -> None:
        """Send ``body`` on the stream within the flow-control windows, then end the stream."""
        assert self._h2 is not None
        conn, view, sid = self._h2, memoryview(body), exchange.stream_id
        while view:
            window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            if window <= 0:
                await self._receive(exchange)  # a WINDOW_UPDATE, or the answer itself
                if exchange.ended:
                    return  # answered before the whole body was sent (a denial)
                continue
            chunk, view = view[:window], view[window:]
            conn.send_data(sid, bytes(chunk), end_stream=not view)
            await self._flush()

    async def _receive(self, exchange: _Exchange) -> None:
        """Read once from the connection, apply its events to ``exchange``, send any replies."""
        assert self._stream is not None and self._h2 is not None
        data = await self._stream.receive_some(65536)
        if not data:
            raise _Failed("eof", "the server closed the connection")
        now = trio.current_time()
        for event in self._h2.receive_data(data):
            sid = getattr(event, "stream_id", None)
            if isinstance(event, h2.events.ConnectionTerminated):
                self._goaway = True
                last = event.last_stream_id
                if not exchange.ended and last is not None and last < exchange.stream_id:
                    raise _Stale()
                if event.error_code not in (h2.errors.ErrorCodes.NO_ERROR, None) and not (
                    exchange.ended
                ):
                    name = getattr(event.error_code, "name", str(event.error_code)).lower()
                    raise _Failed(f"h2_error:goaway_{name}", f"GOAWAY {event.error_code!r}")
            elif sid != exchange.stream_id:
                continue  # connection-level events (SETTINGS, PING): h2 answers them itself
            elif isinstance(event, h2.events.ResponseReceived):
                pairs = _text(event.headers)
                exchange.status = int(next(v for k, v in pairs if k == ":status"))
                exchange.headers = [(k, v) for k, v in pairs if not k.startswith(":")]
                exchange.headers_at = now
            elif isinstance(event, h2.events.InformationalResponseReceived):
                continue
            elif isinstance(event, h2.events.DataReceived):
                exchange.size += len(event.data)
                if exchange.size > MAX_BODY:
                    self._h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                    raise _Failed(
                        "h2_error:body_too_large", f"response body above {MAX_BODY} bytes"
                    )
                exchange.chunks.append(bytes(event.data))
                self._h2.acknowledge_received_data(event.flow_controlled_length, sid)
            elif isinstance(event, h2.events.TrailersReceived):
                exchange.trailers = _text(event.headers)
            elif isinstance(event, h2.events.StreamEnded):
                exchange.ended = True
            elif isinstance(event, h2.events.StreamReset):
                if event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM:
                    raise _Stale()
                name = getattr(event.error_code, "name", str(event.error_code)).lower()
                raise _Failed(f"h2_error:reset_{name}", f"RST_STREAM {event.error_code!r}")
        await self._flush()
        if exchange.ended and exchange.status is None:
            raise _Failed("h2_error:no_response", "the stream ended without response headers")

    async def _drop(self) -> None:
        self._h2 = None
        await super()._drop()
