"""One request's path through the enforcer, the same for an HTTP/1.1 request and an HTTP/2 stream.

Theory of operation. The wire protocols differ in how a request arrives and how an answer
leaves; the access flow does not. :class:`RequestPath` is the part of a connection's HTTP side
that both protocols share: for every request (an HTTP/1.1 request on a kept-alive connection,
or one HTTP/2 stream) it reads the snapshot once (access-flow A12) and the clock once (A13),
refuses heads it never forwards (L6), checks Host and the authority against SNI (A2, H1-H3),
answers the signing keys (A11), validates the client chain (memoised per connection while it
still holds at ``now``, A14), calls the pure ``decide`` and writes the access-log line. What
differs is behind a :class:`Responder`: the HTTP/1.1 session (``enforcer/server.py``) is its
own responder, one request at a time; the HTTP/2 session (``enforcer/http2.py``) gives each
stream one.

A denial of a gRPC request (``content-type: application/grpc*``) is answered the way gRPC
clients understand (access-flow D4): HTTP 200 with no body and the status in a trailers-only
response, ``grpc-status`` and ``grpc-message`` beside ``x-access-denied-reason``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import ipaddress
import json
import logging
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlencode

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enforcer import login
from enforcer.application import CLIENT_TOKEN_HEADER, COOKIE_NAME, TOKEN_HEADER
from enforcer.chain import ChainResult, common_name, fingerprint
from enforcer.decision import (
    AccessDecision,
    AccessRequest,
    check_chain,
    decide,
    normalise_hostname,
    still_valid,
)
from enforcer.http import ClientBodyError, TargetError, head_refusal, header_values, origin_form
from enforcer.identity import (
    CLIENT_ID_HEADER,
    CLIENT_SECRET_HEADER,
    LOGIN_PATH,
    ServiceTokenCredentials,
)
from enforcer.metrics import NO_APPLICATION
from enforcer.proxy import (
    OriginError,
    OriginResponse,
    forwarded_headers,
    origin_request,
    request_content_length,
)
from enforcer.reasons import DENIAL_BODIES, GRPC_STATUS, Reason
from enforcer.snapshot import Snapshot
from enforcer.tls import ServerTLSStream
from enforcer.tokens import parse_cookie_header

if TYPE_CHECKING:  # the server imports this module
    from enforcer.server import Enforcer

log = logging.getLogger(__name__)
JWKS_PATH = b"/cdn-cgi/access/certs"
MAX_BODY = 8 * 1024 * 1024  # an admitted request's body; a denied one is never read
HTTP1 = "HTTP/1.1"
HTTP2 = "HTTP/2"
# Response headers that describe one hop's framing or connection, never relayed.
HOP_BY_HOP_RESPONSE = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"upgrade", b"trailer"}
)
LogStatus = Callable[[int], None]


@dataclasses.dataclass(frozen=True)
class RequestHead:
    """A request head as the shared path sees it, whichever protocol carried it.

    ``headers`` are the regular header fields with ``host`` among them (HTTP/2's
    ``:authority`` becomes ``host`` when the client sent no ``host``); ``authority`` is an
    authority the request named besides Host (HTTP/2's ``:authority`` when a ``host`` field
    came too), which must then equal Host. ``number`` counts requests (streams) on the
    connection from 1.
    """

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    protocol: str = HTTP1
    number: int = 1
    stream_id: int | None = None
    authority: bytes | None = None
    http_version: bytes = b"1.1"


class Responder(Protocol):
    """How one request is answered on its protocol: the part of a request that differs."""

    @property
    def started(self) -> bool:
        """True once the response head left (a failure can then only cut the response)."""
        ...

    async def answer(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        *,
        close: bool,
        head: bool = False,
    ) -> None:
        """Send a whole response of the enforcer's own; ``close`` ends the connection after it."""
        ...

    def body(self) -> AsyncGenerator[bytes, None]:
        """The admitted request's body, streamed as the origin takes it (L7)."""
        ...

    async def relay(
        self,
        response: OriginResponse,
        extra: list[tuple[bytes, bytes]],
        log_status: LogStatus,
        *,
        close: bool,
    ) -> None:
        """Stream the origin's response (plus ``extra`` headers); log just before it ends."""
        ...

    async def abort(self, why: str) -> None:
        """Cut a response already started (the origin or the client's body failed)."""
        ...


def grpc_request(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """True when the request is gRPC (any ``application/grpc`` content type)."""
    return any(
        k.lower() == b"content-type" and v.lower().startswith(b"application/grpc")
        for k, v in headers
    )


def denial(
    status: int, reason: Reason, *, grpc: bool
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The enforcer's answer to a denied request: (status, headers, body) (A6, D4)."""
    if grpc:
        # A trailers-only response: HTTP 200 and the gRPC status in the one HEADERS frame.
        code = GRPC_STATUS[reason]
        return (
            200,
            [
                (b"content-type", b"application/grpc"),
                (b"grpc-status", b"%d" % code),
                (b"grpc-message", reason.value.encode()),
                (b"x-access-denied-reason", reason.value.encode()),
            ],
            b"",
        )
    return (
        status,
        [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"x-access-denied-reason", reason.value.encode()),
        ],
        (DENIAL_BODIES.get(reason, "Forbidden.") + "\n").encode(),
    )


def plain(text: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Headers and body of a short plain-text answer."""
    return [(b"content-type", b"text/plain; charset=utf-8")], text.encode()


@dataclasses.dataclass(frozen=True)
class Established:
    """What the TLS handshake established about one connection."""

    tls: ServerTLSStream
    conn_id: int
    peer: str | None
    handshake_ms: float
    chain: Sequence[x509.Certificate]  # the client's, leaf first ([] without one)
    resumed: bool
    tls_version: str


class RequestPath:
    """The protocol-neutral side of one TLS connection's requests (see the module docstring)."""

    def __init__(self, enforcer: Enforcer, conn: Established) -> None:
        self.e = enforcer
        self.tls = conn.tls
        self.conn_id = conn.conn_id
        self.peer = conn.peer
        self.handshake_ms = conn.handshake_ms
        self.chain = list(conn.chain)
        self.resumed = conn.resumed
        self.tls_version = conn.tls_version
        self._memo: tuple[int, str, ChainResult | None] | None = None

    def no_duration_sni(self, snapshot: Snapshot) -> bool:
        """True when the connection's SNI names a No Duration application (access-flow A9)."""
        app = snapshot.applications.get(normalise_hostname(self.tls.sni) or "")
        return app is not None and app.no_duration

    def _validate(self, snapshot: Snapshot, hostname: str, now: dt.datetime) -> ChainResult | None:
        # Memoised per connection for one snapshot generation and hostname: a success while
        # it still holds at ``now`` (access-flow A14), a failure for good, so that a client
        # pipelining requests on a chain that failed costs one validation, not one per request.
        if self._memo is not None:
            generation, host, memo = self._memo
            if (
                generation == snapshot.generation
                and host == hostname
                and (memo is None or not memo.valid or still_valid(memo, snapshot, now))
            ):
                return memo
        cap = self.e.settings.max_client_certificates
        result: ChainResult | None
        if len(self.chain) > cap:
            # Refused before any path building: the work per chain stays bounded.
            result = ChainResult(
                None,
                Reason.INVALID_CHAIN,
                f"the client presented {len(self.chain)} certificates; at most {cap} are "
                "accepted (server.max_client_certificates)",
            )
        else:
            result = check_chain(snapshot, hostname, self.chain, now, self.e.validations)
        if result is not None and len(self.chain) > 1:
            # Remembered for this leaf's resumed sessions; a failed chain only in the small
            # memo of failed chains (see Enforcer.__init__).
            kept = self.e.intermediates if result.valid else self.e.failed_intermediates
            kept.put(self.chain[0], self.chain[1:])
        self._memo = (snapshot.generation, hostname, result)
        return result

    async def exchange(self, request: RequestHead, port: Responder, *, last: bool = False) -> None:
        """Check the head, decide, then read the body and forward only an admitted request."""
        e = self.e
        e.refresh()
        snapshot = e.snapshot  # one consistent snapshot for the whole request (access-flow A12)
        now = e.clock.now()
        t0 = time.perf_counter()
        sni = self.tls.sni
        # Under No Duration every answer closes (access-flow A9), whatever the decision says.
        close_after = last or self.no_duration_sni(snapshot)

        refusal = head_refusal(request, e.settings.max_header_bytes)
        detail = refusal[1].strip() if refusal else ""
        try:
            target, authority = origin_form(request)
        except TargetError as exc:
            if refusal is None:
                refusal, detail = (400, "Bad request target.\n"), str(exc)
            target, authority = request.target, None
        if refusal is not None:
            # Before the access decision: a reverse proxy never serves these (CONNECT), or
            # the head itself is unsafe to forward; the body is not read.
            status, text = refusal
            self._log(request, now, t0, status=status, refused=detail)
            await port.answer(status, *plain(text), close=True)
            return
        host_values = header_values(request.headers, b"host")
        host = host_values[0] if len(host_values) == 1 else None
        hostname = normalise_hostname(host)
        for named in (authority, request.authority):
            if named is not None and normalise_hostname(named.decode("latin-1")) != hostname:
                what = "request target authority" if named is authority else ":authority"
                decision = AccessDecision(
                    421,
                    Reason.MISDIRECTED,
                    f"{what} {named.decode('latin-1')!r} differs from Host {host!r}",
                    close_connection=True,
                )
                await self._deny(request, port, decision, now, t0, close=True)
                return
        if target is not request.target:
            # The origin always receives origin-form: an absolute-form target could name
            # another application behind a shared origin.
            request = dataclasses.replace(request, target=target)
        path = target.split(b"?", 1)[0]

        jwks_app = snapshot.applications.get(hostname) if hostname and hostname == sni else None
        if path == JWKS_PATH and request.method in (b"GET", b"HEAD") and jwks_app is not None:
            # The signing keys are public: an origin fetches them to verify CF_Authorization.
            doc = json.dumps(snapshot.keyring.jwks(now), indent=2).encode()
            # Log before answering: once a client has its answer, the line is in the log.
            self._log(request, now, t0, status=200)
            await port.answer(
                200,
                [(b"content-type", b"application/json")],
                doc,
                close=close_after,  # access-flow A9: every response closes
                head=request.method == b"HEAD",
            )
            return

        if path in login.ROUTES and jwks_app is not None:
            # The login routes answer on every application's hostname, before any policy.
            route = login.LoginRoute(self, request, port, snapshot, jwks_app, now, t0, close_after)
            await route.serve()
            return

        chain_result = (
            self._validate(snapshot, hostname, now) if hostname and hostname == sni else None
        )
        access = AccessRequest(
            sni=sni,
            host=host,
            client_ip=ip_or_none(self.peer),
            token=presented_token(request.headers),
            service_token=presented_service_token(request.headers),
        )
        decision = decide(access, snapshot, chain_result, now, self.e.token_memo)
        decision_ms = (time.perf_counter() - t0) * 1000

        if decision.reason is Reason.LOGIN_REQUIRED and browser(request):
            # I7: a browser is sent to log in, and comes back to this path afterwards.
            await self._to_login(request, port, decision, now, t0, decision_ms, close_after)
            return
        if not decision.allowed:
            await self._deny(
                request,
                port,
                decision,
                now,
                t0,
                decision_ms=decision_ms,
                close=decision.close_connection or close_after,
            )
            return
        if close_after and not decision.close_connection:
            decision = dataclasses.replace(decision, close_connection=True)
        # Admitted: only now is the body wanted (and 100 Continue sent); it streams.
        body = port.body()
        logged = False

        def log_status(status: int) -> None:
            nonlocal logged
            logged = True
            self._log(request, now, t0, decision=decision, decision_ms=decision_ms, status=status)

        try:
            # aclosing: a body left unfinished (the origin answered early) is closed here.
            async with contextlib.aclosing(body):
                if await self.admitted(request, port, decision, hostname, body, log_status):
                    return
                await self._forward(request, port, body, decision, log_status)
        except ClientBodyError as exc:
            log.debug("connection %d: %s", self.conn_id, exc)
            if port.started:
                await port.abort(f"client body failed mid-response: {exc}")
                return
            if not logged:
                log_status(exc.status)
            answer = {413: "Request body too large.\n", 408: "Request body timed out.\n"}
            await port.answer(
                exc.status, *plain(answer.get(exc.status, "Bad request.\n")), close=True
            )

    async def admitted(
        self,
        request: RequestHead,
        port: Responder,
        decision: AccessDecision,
        hostname: str | None,
        body: AsyncGenerator[bytes, None],
        log_status: LogStatus,
    ) -> bool:
        """A protocol's own handling of an admitted request (HTTP/1.1 upgrades); True if done."""
        return False

    async def _deny(
        self,
        request: RequestHead,
        port: Responder,
        decision: AccessDecision,
        now: dt.datetime,
        t0: float,
        *,
        decision_ms: float | None = None,
        close: bool,
    ) -> None:
        """Log and send a denial (the status logged is the one sent: 200 for gRPC)."""
        reason = decision.reason or Reason.POLICY_DENIED
        status, headers, body = denial(decision.status, reason, grpc=grpc_request(request.headers))
        self._log(request, now, t0, decision=decision, decision_ms=decision_ms, status=status)
        await port.answer(status, headers, body, close=close)

    async def _to_login(
        self,
        request: RequestHead,
        port: Responder,
        decision: AccessDecision,
        now: dt.datetime,
        t0: float,
        decision_ms: float,
        close: bool,
    ) -> None:
        """Answer a browser that needs a login: 302 to the login route (access-flow I7)."""
        query = urlencode({"redirect_url": request.target.decode("latin-1")})
        location = f"{LOGIN_PATH.decode()}?{query}".encode()
        self._log(request, now, t0, decision=decision, decision_ms=decision_ms, status=302)
        await port.answer(
            302,
            [(b"location", location), (b"cache-control", b"no-store")],
            b"",
            close=decision.close_connection or close,
            head=request.method == b"HEAD",
        )

    def origin_headers(
        self, request: RequestHead, decision: AccessDecision, upgrade: bytes | None = None
    ) -> list[tuple[bytes, bytes]]:
        """The headers an admitted request carries to its origin (F1-F4)."""
        app = decision.application
        assert app is not None
        leaf_der = (
            self.chain[0].public_bytes(serialization.Encoding.DER)
            if app.forward_client_certificate and self.chain
            else None
        )
        return forwarded_headers(
            request.headers,
            origin_host=app.origin.split("://", 1)[1].split("/", 1)[0],
            client_ip=self.peer,
            token=decision.token,
            client_cert_der=leaf_der,
            client_cert_sha256=decision.certificate.sha256
            if decision.certificate and leaf_der
            else None,
            upgrade=upgrade,
            underscores=app.underscores_in_headers,
            user_email=decision.identity.email if decision.identity else None,
        )

    async def _forward(
        self,
        request: RequestHead,
        port: Responder,
        body: AsyncGenerator[bytes, None],
        decision: AccessDecision,
        log_status: LogStatus,
    ) -> None:
        """Forward to the origin and let the responder stream its answer back."""
        app = decision.application
        assert app is not None
        extra: list[tuple[bytes, bytes]] = []
        if decision.set_cookie:
            extra.append((b"set-cookie", decision.set_cookie.encode()))
        origin_seconds, origin_errors = self.e.metrics.origin(app.hostname)
        sent = time.perf_counter()
        try:
            async with origin_request(
                app.origin,
                request.method,
                request.target,
                self.origin_headers(request, decision),
                body,
                self.e.settings.request_timeout,
                self.e.origins,
                content_length=request_content_length(request.headers),
                origin_ca=app.origin_ca,
            ) as response:
                origin_seconds.observe(time.perf_counter() - sent)
                await port.relay(response, extra, log_status, close=decision.close_connection)
        except OriginError as exc:
            origin_errors.inc()
            log.warning("connection %d: %s", self.conn_id, exc)
            if port.started:
                await port.abort(f"origin failed mid-response: {exc}")
                return
            log_status(502)
            await port.answer(
                502, *plain("The origin is unreachable.\n"), close=decision.close_connection
            )

    def _log(
        self,
        request: RequestHead,
        now: dt.datetime,
        t0: float,
        *,
        decision: AccessDecision | None = None,
        decision_ms: float | None = None,
        status: int | None = None,
        refused: str | None = None,
    ) -> None:
        """Write the access-log line of a request; ``refused`` names a refusal before deciding."""
        cert = decision.certificate if decision else None
        leaf = self.chain[0] if self.chain else None
        outcome = (
            ("allowed" if decision.allowed else "denied")
            if decision
            else ("refused" if refused else "served")
        )
        reason = decision.reason.value if decision and decision.reason else None
        app = decision.application if decision else None
        self.e.metrics.decided(app.hostname if app else NO_APPLICATION, outcome, reason or "none")
        record = {
            "time": now.isoformat(),
            "connection": self.conn_id,
            "request": request.number,
            "client_ip": self.peer,
            "sni": self.tls.sni,
            "host": next(iter(header_values(request.headers, b"host")), None),
            "method": request.method.decode("latin-1"),
            "path": request.target.decode("latin-1"),
            "status": status if status is not None else (decision.status if decision else None),
            "decision": outcome,
            "reason": reason,
            "detail": decision.detail if decision and decision.detail else refused,
            "notes": [n.value for n in decision.notes] if decision else [],
            "policy": decision.policy if decision else None,
            "admitted_by": decision.admitted_by.value
            if decision and decision.admitted_by
            else None,
            "certificate": {
                "sha256": cert.sha256 if cert else fingerprint(leaf) if leaf else None,
                "common_name": cert.common_name if cert else common_name(leaf) if leaf else None,
                "serial": cert.serial
                if cert
                else format(leaf.serial_number, "x")
                if leaf
                else None,
            }
            if leaf
            else None,
            "tls": {"protocol": self.tls_version, "resumed": self.resumed},
            "http": request.protocol,
            "handshake_ms": round(self.handshake_ms, 3),
            "decision_ms": round(decision_ms, 3) if decision_ms is not None else None,
            "total_ms": round((time.perf_counter() - t0) * 1000, 3),
        }
        if decision is not None and decision.identity is not None:
            record["identity"] = {"email": decision.identity.email, "idp": decision.identity.idp}
        presented = presented_service_token(request.headers)
        if presented is not None:
            # The client id only (never the secret), cut to a bounded length: it is the peer's.
            record["service_token"] = presented.client_id[:MAX_LOGGED_CLIENT_ID]
        if request.stream_id is not None:
            record["stream"] = request.stream_id
        self.e.access_log.write(record)


def browser(request: RequestHead) -> bool:
    """A browser's navigation (I7): GET or HEAD accepting text/html."""
    if request.method not in (b"GET", b"HEAD"):
        return False
    return any("text/html" in v.lower() for v in header_values(request.headers, b"accept"))


def presented_token(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The access token a request presents: its cookie, else the assertion or token header."""
    token = parse_cookie_header(header_values(headers, b"cookie"), COOKIE_NAME)
    if token is None:
        assertion = header_values(headers, TOKEN_HEADER.encode())
        assertion = assertion or header_values(headers, CLIENT_TOKEN_HEADER.encode())
        token = assertion[0] if assertion else None
    return token


MAX_LOGGED_CLIENT_ID = 128


def presented_service_token(
    headers: Sequence[tuple[bytes, bytes]],
) -> ServiceTokenCredentials | None:
    """The service token a request presents (access-flow I11): both headers, else None.

    A header sent twice is ambiguous and counts as the first value (as the token headers do).
    """
    ids = header_values(headers, CLIENT_ID_HEADER.encode())
    secrets = header_values(headers, CLIENT_SECRET_HEADER.encode())
    if not ids or not secrets:
        return None
    return ServiceTokenCredentials(ids[0].strip(), secrets[0].strip())


def ip_or_none(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client's address as an ip_address, or None when unknown."""
    try:
        return ipaddress.ip_address(text) if text else None
    except ValueError:
        return None
