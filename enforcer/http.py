"""h11 glue: read events and send responses over any trio-style byte stream.

Theory of operation. h11 parses; this module moves bytes and applies the limits h11 leaves to
its caller. Every loop here either returns an event or awaits the stream, so no peer can keep
a task busy without reaching the stream's checkpoints: ``h11.PAUSED`` (after a request that may
switch protocols, or a 2xx to CONNECT on the client side) is returned, never retried, and the
body readers treat it as the end of the message. A server reads a request in three steps: the
head (:func:`read_head`, bounded by an idle wait for its first bytes and a deadline for the
rest), the checks of that head (:func:`head_refusal`, :func:`origin_form`), and only once the
request is admitted its body (:func:`body_chunks`, streamed, bounded in size and time).
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, Iterable, Sequence
from http import HTTPStatus
from typing import Protocol

import h11
import trio

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)


class ByteStream(Protocol):
    """The two stream methods h11 glue needs."""

    async def receive_some(self, max_bytes: int | None = ...) -> bytes | bytearray:
        """Receive some bytes; b"" at the end."""
        ...

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data``."""
        ...


class RequestLike(Protocol):
    """What the head checks read of a request: h11's Request or the enforcer's RequestHead."""

    @property
    def method(self) -> bytes:
        """The request method."""
        ...

    @property
    def target(self) -> bytes:
        """The request target (HTTP/2's :path)."""
        ...

    @property
    def headers(self) -> Sequence[tuple[bytes, bytes]]:
        """The header fields."""
        ...


class ClientBodyError(Exception):
    """A request body the server will not take; ``status`` is the answer to give."""

    status = 400


class BodyTooLarge(ClientBodyError):
    """A request body over the configured limit."""

    status = 413


class BodyTimeout(ClientBodyError):
    """A request body that did not arrive within the request timeout."""

    status = 408


class BadBody(ClientBodyError):
    """A request body that broke HTTP/1.1 framing, or a client that left mid-body."""

    status = 400


class HeadTimeout(Exception):
    """No complete request head arrived in time (idle between requests, or too slow)."""


class TargetError(Exception):
    """A request target that is neither origin-form, absolute-form, nor ``*`` for OPTIONS."""


async def next_event(conn: h11.Connection, stream: ByteStream) -> h11.Event | type[h11.PAUSED]:
    """Return h11's next event, reading from ``stream`` as needed.

    ``h11.PAUSED`` is returned as it is: h11 will not produce another event until the
    connection changes state, so looping on it would spin without ever awaiting.
    """
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
            continue
        return event  # type: ignore[return-value]


async def read_head(
    conn: h11.Connection, stream: ByteStream, *, idle: float, timeout: float
) -> h11.Event | type[h11.PAUSED]:
    """Return the next message head (or ConnectionClosed/PAUSED), raising HeadTimeout when slow.

    The first bytes may take ``idle`` seconds (a kept-alive connection between requests); from
    then on the whole head must arrive within ``timeout``, so one byte a second cannot hold a
    connection (slowloris).
    """
    event = conn.next_event()
    if event is not h11.NEED_DATA:
        return event  # type: ignore[return-value]  # pipelined: already buffered
    data: bytes | None = None
    with trio.move_on_after(idle):
        data = bytes(await stream.receive_some(65536))
    if data is None:
        raise HeadTimeout(f"no request within {idle:g} s")
    conn.receive_data(data)
    event = conn.next_event()
    if event is not h11.NEED_DATA:
        return event  # type: ignore[return-value]  # the whole head in one read: no timer
    with trio.move_on_after(timeout):
        return await next_event(conn, stream)
    raise HeadTimeout(f"the request head took over {timeout:g} s")


# Control bytes h11 lets through in header values (it refuses NUL, CR, LF, VT and FF only).
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def head_refusal(request: RequestLike, max_header_bytes: int) -> tuple[int, str] | None:
    """Why a reverse proxy refuses this request head outright, as (status, text), or None.

    Every refusal closes the connection: its body, if any, is never read. h11 bounds a head
    only while it is incomplete; the size here is the complete head as h11 parsed it (request
    line, header lines, blank line), so a head that arrived in one read is bounded too.
    """
    if request.method == b"CONNECT":
        # 501, not 405: the enforcer implements CONNECT for no target at all, and 405 would
        # owe an Allow header naming the origin's methods, which the enforcer does not know.
        return 501, "CONNECT is not supported: this is a reverse proxy.\n"
    # One pass over the headers (this runs for every request).
    size = len(request.method) + len(request.target) + 14
    control = content_length = transfer_encoding = False
    search = _CTL.search
    for name, value in request.headers:
        size += len(name) + len(value) + 4
        if search(value):
            control = True
        if name == b"content-length":
            content_length = True
        elif name == b"transfer-encoding":
            transfer_encoding = True
    if size > max_header_bytes:
        return 431, "Request header too large.\n"
    if control:
        return 400, "Control characters in a header value.\n"
    if content_length and transfer_encoding:
        # RFC 9112 6.1: the framing is ambiguous between proxies (request smuggling).
        return 400, "Both Content-Length and Transfer-Encoding.\n"
    return None


def origin_form(request: RequestLike) -> tuple[bytes, bytes | None]:
    """Return the request's target in origin-form, and the authority an absolute-form one named.

    Raises :class:`TargetError` for any other form (``-internal/x``, userinfo, no authority).
    """
    target = request.target
    if target.startswith(b"/"):
        return target, None
    if target == b"*" and request.method == b"OPTIONS":
        return target, None
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise TargetError(f"request target {target[:80]!r} is not origin-form or absolute-form")
    end = len(rest)
    for stop in (b"/", b"?", b"#"):
        at = rest.find(stop)
        if at != -1:
            end = min(end, at)
    authority, path = rest[:end], rest[end:]
    if not authority or b"@" in authority:
        raise TargetError(f"request target {target[:80]!r} has no usable authority")
    if path.startswith(b"#"):
        raise TargetError(f"request target {target[:80]!r} carries a fragment")
    if not path.startswith(b"/"):
        path = b"/" + path
    return path, authority


def finish_buffered_body(conn: h11.Connection) -> bool:
    """Consume the current request body from what h11 already holds; True when it ended.

    Never reads the stream, so what it consumes is bounded by one read: a denied request's
    body is not read, and the caller closes the connection when this returns False.
    """
    try:
        while conn.their_state is h11.SEND_BODY:
            event = conn.next_event()
            if not isinstance(event, h11.Data | h11.EndOfMessage):
                return False
    except h11.RemoteProtocolError:
        return False
    return True


async def body_chunks(
    conn: h11.Connection, stream: ByteStream, limit: int, timeout: float
) -> AsyncGenerator[bytes, None]:
    """Yield the current request's body as it arrives, at most ``limit`` bytes in ``timeout`` s.

    Sends ``100 Continue`` first when the client waits for it: calling this is what says the
    body is wanted. Raises a :class:`ClientBodyError` (413, 408 or 400) when the body fails.
    """
    if conn.client_is_waiting_for_100_continue:
        await send(
            conn, stream, h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
        )
    size = 0
    deadline: float | None = None
    while True:
        try:
            # What h11 has buffered needs no timer: a bodiless request's end (the hot path's
            # GET) costs no cancel scope. The clock starts at the first wait for the client.
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if deadline is None:
                    deadline = trio.current_time() + timeout
                with trio.fail_at(deadline):
                    event = await next_event(conn, stream)
        except trio.TooSlowError:
            raise BodyTimeout(f"the request body took over {timeout:g} s") from None
        except h11.RemoteProtocolError as exc:
            raise BadBody(f"bad request body: {exc}") from exc
        if isinstance(event, h11.Data):
            size += len(event.data)
            if size > limit:
                raise BodyTooLarge(f"request body over {limit} bytes")
            yield bytes(event.data)
        elif isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
            return
        else:
            raise BadBody("the client closed the connection in the middle of the body")


async def read_body(conn: h11.Connection, stream: ByteStream, limit: int) -> bytes:
    """Read the current message's body up to ``limit`` bytes."""
    parts: list[bytes] = []
    size = 0
    while True:
        event = await next_event(conn, stream)
        if isinstance(event, h11.Data):
            size += len(event.data)
            if size > limit:
                raise BodyTooLarge(f"request body over {limit} bytes")
            parts.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
            return b"".join(parts)  # PAUSED: the message ended (CONNECT, Upgrade)
        else:
            raise h11.RemoteProtocolError(f"unexpected {type(event).__name__} in a body")


async def send(conn: h11.Connection, stream: ByteStream, event: h11.Event) -> None:
    """Serialise one event and send it."""
    data = conn.send(event)
    if data:
        await stream.send_all(data)


async def respond(
    conn: h11.Connection,
    stream: ByteStream,
    status: int,
    headers: Iterable[tuple[str, str]] | Iterable[tuple[bytes, bytes]],
    body: bytes,
    *,
    head: bool = False,
) -> None:
    """Send a whole response with a Content-Length (headers only when answering HEAD)."""
    hdrs = [
        (k if isinstance(k, bytes) else k.encode(), v if isinstance(v, bytes) else v.encode())
        for k, v in headers
    ]
    hdrs.append((b"content-length", str(len(body)).encode()))
    data = (
        conn.send(h11.Response(status_code=status, headers=hdrs, reason=reason_phrase(status)))
        or b""
    )
    if body and not head:
        data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    # One write, so one TLS record and one segment: each send costs a syscall and a wake-up.
    await stream.send_all(data)


def reason_phrase(status: int) -> bytes:
    """Return the standard reason phrase of a status code (empty when unknown)."""
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def header_values(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[str]:
    """Return every value of header ``name`` (lower-case bytes), decoded as Latin-1."""
    return [v.decode("latin-1") for k, v in headers if k.lower() == name]
