"""A blocking TLS + HTTP/1.1 client for the conformance runner (stdlib ssl and h11).

The runner lives in hypothesis's worker thread, so plain blocking sockets are the simplest
honest client: every request is a real TLS connection over loopback (or to a remote target).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path

import h11

TIMEOUT = 15.0


class WireError(Exception):
    """The target closed or broke the connection where a response was expected."""


@dataclasses.dataclass
class Observed:
    """A response as the client saw it."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    closed: bool  # the server said it closes the connection (or closed it)

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
        try:
            echoed = json.loads(self.body)
        except ValueError:
            return None
        headers = echoed.get("headers", {}) if isinstance(echoed, dict) else {}
        value = headers.get("cf-access-jwt-assertion")
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


class Connection:
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
        raw = socket.create_connection(address, timeout=TIMEOUT)
        try:
            sock = ctx.wrap_socket(raw, server_hostname=sni, session=session)
        except BaseException:
            raw.close()
            raise
        return cls(sock)

    @property
    def resumed(self) -> bool:
        """True when the handshake resumed a session."""
        return bool(self.sock.session_reused)

    @property
    def session(self) -> ssl.SSLSession | None:
        """The TLS session, for resuming later (TLS 1.3 tickets arrive with the first data)."""
        return self.sock.session

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
