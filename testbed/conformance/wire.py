"""Blocking TLS clients for the conformance runner: HTTP/1.1 (h11) and HTTP/2 (h2).

The runner lives in hypothesis's worker thread, so plain blocking sockets are the simplest
honest client: every request is a real TLS connection over loopback (or to a remote target).
Both transports answer the same questions (:class:`Observed`, ``usable``, ``resumed``), so
every case runs unchanged over either; on HTTP/2 a request's Host is its ``:authority``, so
the cases whose Host differs from the SNI are connection coalescing, and "the server closes"
is a GOAWAY that admits no further stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path

import h2.config
import h2.events
import h2.exceptions
import h11

from devices.h2_client import GracefulH2Connection

TIMEOUT = 15.0


class WireError(Exception):
    """The target closed or broke the connection where a response was expected."""


@dataclasses.dataclass
class Observed:
    """A response as the client saw it."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    closed: bool  # the server said it closes the connection (or closed it, or sent GOAWAY)
    protocol: str = "HTTP/1.1"

    def header(self, name: str) -> str | None:
        """The first value of a header (case-insensitive)."""
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    @property
    def reason(self) -> str | None:
        """The X-Access-Denied-Reason header."""
        return self.header("x-access-denied-reason")

    @property
    def cookie(self) -> str | None:
        """The CF_Authorization value the response sets, if any."""
        for k, v in self.headers:
            if k.lower() == "set-cookie" and v.startswith("CF_Authorization="):
                return v.split(";", 1)[0].split("=", 1)[1]
        return None

    @property
    def max_age(self) -> int | None:
        """The Max-Age attribute of the CF_Authorization cookie."""
        for k, v in self.headers:
            if k.lower() == "set-cookie" and v.startswith("CF_Authorization="):
                for attr in v.split(";"):
                    name, _, value = attr.strip().partition("=")
                    if name.lower() == "max-age":
                        return int(value)
        return None

    def forwarded_token(self) -> str | None:
        """The token the origin received, when the origin echoes request headers as JSON."""
        return self.forwarded("cf-access-jwt-assertion")

    def forwarded_headers(self) -> dict[str, str] | None:
        """The request headers the origin received (lower-case names), when it echoes them."""
        try:
            echoed = json.loads(self.body)
        except ValueError:
            return None
        headers = echoed.get("headers") if isinstance(echoed, dict) else None
        return headers if isinstance(headers, dict) else None

    def forwarded(self, name: str) -> str | None:
        """One header the origin received, when the origin echoes request headers as JSON."""
        value = (self.forwarded_headers() or {}).get(name)
        return value if isinstance(value, str) else None


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A TLS client context trusting ``ca``, presenting ``cert``/``key`` when given."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        # The client plays devices of every kind, weak keys and SHA-1 signatures included: the
        # enforcer must judge them, so the client's own security level must not refuse to
        # load and send them.
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


def tls_connect(
    address: tuple[str, int], sni: str, ctx: ssl.SSLContext, session: ssl.SSLSession | None
) -> ssl.SSLSocket:
    """A TCP connection and a completed handshake for ``sni`` (resuming ``session`` if given)."""
    raw = socket.create_connection(address, timeout=TIMEOUT)
    try:
        return ctx.wrap_socket(raw, server_hostname=sni, session=session)
    except BaseException:
        raw.close()
        raise


class _TLSConnection:
    """What both transports know of their TLS connection."""

    sock: ssl.SSLSocket

    @property
    def resumed(self) -> bool:
        """True when the handshake resumed a session."""
        return bool(self.sock.session_reused)

    @property
    def session(self) -> ssl.SSLSession | None:
        """The TLS session, for resuming later (TLS 1.3 tickets arrive with the first data)."""
        return self.sock.session


class Connection(_TLSConnection):
    """One TLS connection carrying HTTP/1.1 requests one after the other."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    def open(
        cls,
        address: tuple[str, int],
        sni: str,
        ctx: ssl.SSLContext,
        session: ssl.SSLSession | None = None,
    ) -> Connection:
        """Connect and complete the handshake for ``sni`` (resuming ``session`` if given)."""
        return cls(tls_connect(address, sni, ctx, session))

    @property
    def usable(self) -> bool:
        """True when another request may be sent on this connection."""
        return self.h11.our_state is h11.IDLE and self.h11.their_state is h11.IDLE

    def request(
        self, host: str, path: str = "/", headers: Sequence[tuple[str, str]] = ()
    ) -> Observed:
        """Send one GET and read the whole response."""
        out = self.h11.send(
            h11.Request(method="GET", target=path, headers=[("host", host), *headers])
        )
        out += self.h11.send(h11.EndOfMessage())
        try:
            self.sock.sendall(out)
        except OSError as exc:
            raise WireError(f"sending the request failed: {exc}") from exc
        status, resp_headers, chunks = 0, [], []
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = self.sock.recv(65536)
                except ssl.SSLError as exc:
                    raise WireError(f"TLS error while reading the response: {exc}") from exc
                except OSError:
                    data = b""
                self.h11.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                resp_headers = [(k.decode(), v.decode("latin-1")) for k, v in event.headers]
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise WireError("the server closed the connection without a response")
        closed = self.h11.their_state in (h11.MUST_CLOSE, h11.CLOSED)
        if not closed and self.h11.our_state is h11.DONE:
            self.h11.start_next_cycle()
        return Observed(status, resp_headers, b"".join(chunks), closed)

    def close(self) -> None:
        """Close the connection, ignoring errors from a peer that already went."""
        with contextlib.suppress(OSError):
            self.sock.close()


class H2Connection(_TLSConnection):
    """One TLS connection carrying HTTP/2 streams one after the other (ALPN ``h2``)."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        # A GOAWAY sent before the response of the stream it covers (No Duration) must not
        # end the stream (python-hyper/h2#1181): see GracefulH2Connection.
        self.h2 = GracefulH2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        # Set when the server sent GOAWAY: streams above it are refused, none may start.
        self.goaway_last: int | None = None
        self.dead = False
        self.h2.initiate_connection()
        self._flush()

    @classmethod
    def open(
        cls,
        address: tuple[str, int],
        sni: str,
        ctx: ssl.SSLContext,
        session: ssl.SSLSession | None = None,
    ) -> H2Connection:
        """Connect, complete the handshake for ``sni`` and check that ``h2`` was selected."""
        ctx.set_alpn_protocols(["h2"])
        sock = tls_connect(address, sni, ctx, session)
        if sock.selected_alpn_protocol() != "h2":
            sock.close()
            raise WireError(
                f"the target selected ALPN {sock.selected_alpn_protocol()!r}, not h2 "
                "(run without --http2, or enable h2 on the target)"
            )
        try:
            return cls(sock)
        except OSError as exc:
            sock.close()
            raise WireError(f"sending the HTTP/2 preface failed: {exc}") from exc

    @property
    def usable(self) -> bool:
        """True when the server still accepts new streams on this connection."""
        return not self.dead and self.goaway_last is None

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(
        self, host: str, path: str = "/", headers: Sequence[tuple[str, str]] = ()
    ) -> Observed:
        """Send one GET stream (``:authority`` = ``host``) and read its whole response."""
        stream_id = self.h2.get_next_available_stream_id()
        head = [(":method", "GET"), (":scheme", "https"), (":authority", host), (":path", path)]
        head += [(k.lower(), v) for k, v in headers]
        try:
            self.h2.send_headers(
                stream_id, [(k.encode(), v.encode("latin-1")) for k, v in head], end_stream=True
            )
            self._flush()
        except (OSError, h2.exceptions.ProtocolError) as exc:
            raise WireError(f"sending the request failed: {exc}") from exc
        status, resp_headers, chunks = 0, [], []
        done = False
        while not done:
            try:
                data = self.sock.recv(65536)
            except ssl.SSLError as exc:
                raise WireError(f"TLS error while reading the response: {exc}") from exc
            except OSError:
                data = b""
            if not data:
                self.dead = True
                raise WireError("the server closed the connection without a response")
            try:
                events = self.h2.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                self.dead = True
                raise WireError(f"the server broke HTTP/2: {exc}") from exc
            for event in events:
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                    for k, v in event.headers:
                        if k == b":status":
                            status = int(v)
                        else:
                            resp_headers.append((k.decode(), v.decode("latin-1")))
                elif isinstance(event, h2.events.TrailersReceived):
                    resp_headers += [(k.decode(), v.decode("latin-1")) for k, v in event.headers]
                elif isinstance(event, h2.events.DataReceived):
                    chunks.append(bytes(event.data))
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                    done = True
                elif isinstance(event, h2.events.StreamReset) and event.stream_id == stream_id:
                    raise WireError(f"the server reset the stream (error {event.error_code!r})")
                elif isinstance(event, h2.events.ConnectionTerminated):
                    self.goaway_last = event.last_stream_id or 0
                    if not done and self.goaway_last < stream_id:
                        raise WireError(
                            f"GOAWAY (last stream {self.goaway_last}) refused stream {stream_id}"
                        )
            try:
                self._flush()
            except OSError:
                self.dead = True
        return Observed(status, resp_headers, b"".join(chunks), not self.usable, "HTTP/2")

    def close(self) -> None:
        """Close the connection, ignoring errors from a peer that already went."""
        with contextlib.suppress(OSError, h2.exceptions.ProtocolError):
            self.h2.close_connection()
            self._flush()
        with contextlib.suppress(OSError):
            self.sock.close()


AnyConnection = Connection | H2Connection


def open_connection(
    transport: str,
    address: tuple[str, int],
    sni: str,
    ctx: ssl.SSLContext,
    session: ssl.SSLSession | None = None,
) -> AnyConnection:
    """Open a connection of ``transport`` (``http1`` or ``h2``)."""
    kind = H2Connection if transport == "h2" else Connection
    return kind.open(address, sni, ctx, session=session)
