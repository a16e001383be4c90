"""Test clients that speak real TLS over loopback: stdlib ssl in trio, and the real curl/openssl."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import ssl
from collections.abc import Sequence
from typing import Any

import h11
import trio

# Re-exported: the conformance suite's wire client builds its TLS contexts the same way.
from testbed.conformance.wire import client_context as client_context


@dataclasses.dataclass
class Response:
    """A response as a client saw it."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """Return the first value of a header (case-insensitive)."""
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def all(self, name: str) -> list[str]:
        """Return every value of a header."""
        return [v for k, v in self.headers if k.lower() == name.lower()]

    @property
    def reason(self) -> str | None:
        """The X-Access-Denied-Reason header."""
        return self.header("x-access-denied-reason")

    def json(self) -> Any:
        """Decode the body as JSON."""
        return json.loads(self.body)


class Connection:
    """One TLS connection that can carry several HTTP/1.1 requests (keep-alive)."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(
        cls,
        port: int,
        sni: str,
        ctx: ssl.SSLContext,
        session: ssl.SSLSession | None = None,
    ) -> Connection:
        """Connect to 127.0.0.1:port and complete the handshake for ``sni``."""
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(tcp, ctx, server_hostname=sni)
        if session is not None:
            # trio.SSLStream has no session argument; the SSLObject takes one before handshaking.
            stream._ssl_object.session = session
        await stream.do_handshake()
        return cls(stream)

    @property
    def ssl_object(self) -> ssl.SSLObject:
        return self.stream._ssl_object  # the session lives on the SSLObject

    async def request(
        self,
        path: str = "/",
        host: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
        method: str = "GET",
        body: bytes = b"",
    ) -> Response:
        """Send one request and read the whole response."""
        hdrs = [("host", host or self.stream.server_hostname or "")]  # type: ignore[list-item]
        hdrs += list(headers)
        if body:
            hdrs.append(("content-length", str(len(body))))
        data = self.h11.send(h11.Request(method=method, target=path, headers=hdrs))
        if body:
            data += self.h11.send(h11.Data(data=body))
        data += self.h11.send(h11.EndOfMessage())
        await self.stream.send_all(data)
        status, resp_headers, chunks = 0, [], []
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                try:
                    self.h11.receive_data(await self.stream.receive_some(65536))
                except trio.BrokenResourceError:
                    self.h11.receive_data(b"")
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                resp_headers = [(k.decode(), v.decode()) for k, v in event.headers]
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("the server closed the connection without a response")
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        return Response(status, resp_headers, b"".join(chunks))

    @property
    def closed_by_server(self) -> bool:
        """True when the server said it closes the connection after its response."""
        return self.h11.their_state in (h11.MUST_CLOSE, h11.CLOSED)

    async def aclose(self) -> None:
        with trio.move_on_after(2):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.stream.aclose()


async def get(
    port: int,
    sni: str,
    ctx: ssl.SSLContext,
    path: str = "/",
    host: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
) -> Response:
    """One request on a new connection."""
    conn = await Connection.open(port, sni, ctx)
    try:
        return await conn.request(path, host=host, headers=headers)
    finally:
        await conn.aclose()


async def run(
    cmd: Sequence[str], stdin: bytes = b"", timeout: float = 30
) -> trio.CompletedProcess[bytes]:
    """Run a real program (curl, openssl) without blocking the served enforcer."""
    with trio.fail_after(timeout):
        return await trio.run_process(
            list(cmd), stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
        )


async def admin_call(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    token: str | None = None,
    raw_body: bytes | None = None,
) -> tuple[int, Any]:
    """Call the admin API over plain HTTP; return (status, decoded JSON envelope or bytes)."""
    from tests.conftest import ADMIN_TOKEN

    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    data = (
        raw_body if raw_body is not None else (b"" if body is None else json.dumps(body).encode())
    )
    headers = [("host", "admin"), ("content-length", str(len(data)))]
    tok = ADMIN_TOKEN if token is None else token
    if tok:
        headers.append(("authorization", f"Bearer {tok}"))
    try:
        out = conn.send(h11.Request(method=method, target=path, headers=headers))
        out += conn.send(h11.Data(data=data)) if data else b""
        out += conn.send(h11.EndOfMessage())
        await stream.send_all(out)
        status, chunks = 0, []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
    finally:
        await stream.aclose()
    payload = b"".join(chunks)
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload


async def receive_until(
    stream: trio.abc.ReceiveStream, marker: bytes | None = None, limit: float = 10
) -> bytes:
    """Read until ``marker`` arrives, or (no marker) until the peer closes; fail after ``limit``."""
    data = b""
    with trio.fail_after(limit):
        while marker is None or marker not in data:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not chunk:
                break
            data += chunk
    return data
