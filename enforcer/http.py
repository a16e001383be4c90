"""h11 glue: read events and send responses over any trio-style byte stream."""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus
from typing import Protocol

import h11

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


class BodyTooLarge(Exception):
    """A request body over the configured limit."""


async def next_event(conn: h11.Connection, stream: ByteStream) -> h11.Event | type[h11.PAUSED]:
    """Return h11's next event, reading from ``stream`` as needed."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
            continue
        return event  # type: ignore[return-value]


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
        elif isinstance(event, h11.EndOfMessage):
            return b"".join(parts)
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
    headers: Iterable[tuple[str, str]],
    body: bytes,
    *,
    head: bool = False,
) -> None:
    """Send a whole response with a Content-Length (headers only when answering HEAD)."""
    hdrs = [(k.encode(), v.encode()) for k, v in headers]
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
