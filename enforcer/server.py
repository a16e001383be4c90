"""The enforcer server: accept loop, TLS, HTTP and the access decision, wired together.

Each connection is one task in the listener's nursery. It peeks the ClientHello, completes the
handshake with the hostname's context, then hands the connection to the protocol ALPN chose:
the HTTP/2 session (``enforcer/http2.py``), or the HTTP/1.1 session here, which serves requests
one after the other. Both feed every request (every stream) to the shared request path in
``enforcer/exchange.py``: it reads the current snapshot once, asks the clock once, validates the
client chain (memoised per connection while the snapshot and the chain's validity window hold,
which is what re-checks kept-alive and resumed connections, access-flow A14), calls the pure
``decide`` and acts on the decision. WebSocket tunnels are HTTP/1.1's alone and live here.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import itertools
import logging
import socket
import time
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path

import h11
import trio
from cryptography import x509

from enforcer.accesslog import AccessLog
from enforcer.chain import ValidationCache
from enforcer.clock import Clock, WallClock
from enforcer.config import EdgeCertificate, EnforcerConfig
from enforcer.controller import Controller, limits_of, open_state
from enforcer.decision import AccessDecision, AccessRequest, AdmittedBy, decide
from enforcer.exchange import (
    HOP_BY_HOP_RESPONSE,
    HTTP1,
    MAX_BODY,
    Established,
    LogStatus,
    RequestHead,
    RequestPath,
    Responder,
    ip_or_none,
    plain,
    presented_service_token,
    presented_token,
)
from enforcer.http import (
    HeadTimeout,
    body_chunks,
    finish_buffered_body,
    header_values,
    read_head,
    respond,
    send,
)
from enforcer.http2 import H2Session
from enforcer.login import UsedStates
from enforcer.metrics import EnforcerMetrics, Readiness
from enforcer.metronome import Metronome
from enforcer.oidc import OidcClient
from enforcer.proxy import (
    Fairness,
    OriginError,
    OriginPool,
    OriginResponse,
    Tunnel,
    WebSocketFrames,
    open_upgrade,
    websocket_close_frame,
)
from enforcer.reasons import Reason
from enforcer.snapshot import Snapshot
from enforcer.sockets import TCPStream, linger, serve_tcp
from enforcer.tls import ContextsBySNI, HostTLS, IntermediatesMemo, ServerTLSStream, TLSError
from enforcer.tokens import TokenMemo

log = logging.getLogger(__name__)
# The memo of failed chains' intermediates gets this fraction of intermediates_memo_bytes.
FAILED_MEMO_SHARE = 16
# A lingering close (enforcer/sockets.py) drops at most this much: the largest body a client
# may legitimately still be sending when answered (MAX_BODY, what an admitted request may
# send), plus room for TLS records' and frames' overhead. Less would let the reset come back
# for exactly the clients that upload; an HTTP/2 client can have even less in flight (its
# flow-control window). The bytes are read raw, never decrypted: a peer keeping a connection
# lingering costs reads of at most this much, for at most LINGER_SECONDS.
LINGER_BYTES = MAX_BODY + 65536


def tls_hosts(
    edges: Sequence[EdgeCertificate], snapshot: Snapshot
) -> tuple[list[HostTLS], HostTLS]:
    """Return the TLS settings of every served hostname, and the default for unknown SNI."""
    hosts = []
    for edge in edges:
        for name in edge.hostnames:
            app = snapshot.applications.get(name)
            trust = snapshot.trust.get(name)
            hosts.append(
                HostTLS(
                    hostname=name,
                    chain_pem=edge.chain_pem,
                    key_pem=edge.key_pem,
                    request_client_certificate=app is not None,
                    allow_resumption=app is None or not app.no_duration,
                    client_cas=trust.roots if trust else (),
                    alpn=app.alpn if app is not None else ("h2", "http/1.1"),
                )
            )
    return hosts, hosts[0]


class Enforcer:
    """The running enforcer: the current snapshot, TLS contexts and what connections share.

    ``snapshot`` and ``contexts`` are replaced whole by :meth:`apply` when the control plane
    changes something; a connection reads ``contexts`` once, a request reads ``snapshot`` once.
    """

    def __init__(
        self,
        config: EnforcerConfig,
        clock: Clock | None = None,
        access_log: AccessLog | None = None,
        *,
        state_path: Path | None = None,
        follow_store: bool = False,
    ) -> None:
        self.config = config
        self.settings = config.server
        self.clock = clock or WallClock()
        self.access_log = access_log or AccessLog(config.server.access_log)
        self.intermediates = IntermediatesMemo(config.server.intermediates_memo_bytes)
        # Chains that failed get a small memo of their own, so that a resumed session of a
        # refused device is refused for the same reason as its full handshake, while
        # unauthenticated chains can only ever evict each other, never a validated device's.
        self.failed_intermediates = IntermediatesMemo(
            config.server.intermediates_memo_bytes // FAILED_MEMO_SHARE
        )
        # Memos of the pure checks, shared by all connections: a returning device skips the
        # path build and a returning cookie skips pyjwt; each hit is re-checked at ``now``.
        self.validations = ValidationCache()
        self.token_memo = TokenMemo()
        # How the enforcer reaches origins (TCP, or in-memory streams in a simulation), and
        # the kept-alive connections it reuses.
        self.origins = OriginPool()
        # People's logins (access-flow I1-I3): the providers' documents and keys cached for this
        # process, and the used login states, shared with the other workers through the store.
        self.oidc = OidcClient(self.origins)
        self._ids = itertools.count(1)
        self._tls_key: tuple[HostTLS, ...] | None = None
        self.contexts: ContextsBySNI | None = None
        store, generation, objects = open_state(config, self.clock.now(), state_path)
        self.controller = Controller(
            store, generation, objects, limits_of(config), self.clock, self.apply
        )
        # Worker processes share one database: each checks for others' commits per request.
        self._follow = follow_store
        self._data_version = store.data_version()
        self.login_states = UsedStates(store.path)
        # Open tunnels re-decide their access on this one beat (see enforcer/metronome.py).
        self.tunnel_beat = Metronome(_TUNNEL_RECHECK, on_beat=self.refresh)
        self.apply(self.controller.snapshot())
        self.metrics = EnforcerMetrics()
        self.metrics.watch(self.validations, self.token_memo, self.access_log)
        self.readiness = Readiness(self)

    @classmethod
    def from_config(
        cls, config: EnforcerConfig, clock: Clock | None = None, access_log: AccessLog | None = None
    ) -> Enforcer:
        """Build the enforcer from a checked configuration and its state database."""
        return cls(config, clock, access_log)

    def apply(self, snapshot: Snapshot) -> None:
        """Make ``snapshot`` the one requests read, rebuilding TLS contexts when they change."""
        hosts, default = tls_hosts(self.config.edge_certificates, snapshot)
        key = (*hosts, default)
        if key != self._tls_key:
            self.contexts = ContextsBySNI(hosts, default)
            self._tls_key = key
        self.snapshot = snapshot

    def refresh(self) -> None:
        """Pick up commits made by other processes (worker mode); cheap when nothing changed."""
        if not self._follow:
            return
        version = self.controller.store.data_version()
        if version != self._data_version:
            self._data_version = version
            self.controller.reload()

    async def handle(self, transport: trio.abc.Stream) -> None:
        """Serve one client connection until it closes."""
        conn_id = next(self._ids)
        peer = _peer_ip(transport)
        started = time.perf_counter()
        metrics = self.metrics
        metrics.connections_accepted.inc()
        self.refresh()
        assert self.contexts is not None
        tls = ServerTLSStream(transport, self.contexts)
        lingering = False  # the close is ours and the client may still be sending
        metrics.connections_open.inc()  # and down in the finally below
        try:
            with trio.move_on_after(self.settings.handshake_timeout) as scope:
                await tls.do_handshake()
            if scope.cancelled_caught:
                self._log_tls(conn_id, peer, tls.sni, "handshake timed out")
                return
            handshake_seconds = time.perf_counter() - started
            handshake_ms = handshake_seconds * 1000
            chain = self._client_chain(tls)
            resumed = tls.session_reused()
            if resumed:
                metrics.handshakes_resumed.inc()
                metrics.handshake_resumed_seconds.observe(handshake_seconds)
            else:
                metrics.handshakes_full.inc()
                metrics.handshake_full_seconds.observe(handshake_seconds)
            conn = Established(tls, conn_id, peer, handshake_ms, chain, resumed, tls.protocol())
            alpn = tls.alpn()
            if alpn == "h2":
                lingering = await H2Session(self, conn).serve()
                return
            app = self.snapshot.applications.get(tls.sni or "")
            if app is not None and "http/1.1" not in app.alpn:
                # ALPN found no protocol in common (or the client offered none): the
                # application speaks HTTP/2 only, and HTTP/1.1 is what would follow.
                self._log_tls(
                    conn_id, peer, tls.sni, f"ALPN {alpn!r}: this hostname speaks h2 only"
                )
                return
            lingering = await _Session(self, conn).serve()
        except TLSError as exc:
            self._log_tls(conn_id, peer, tls.sni, str(exc))
        except Exception:
            # A bug must cost one connection, never the server: log it and keep serving.
            log.exception("connection %d: unexpected error", conn_id)
            self._log_tls(conn_id, peer, tls.sni, "internal error (see the server log)")
        finally:
            try:
                # Only over TCP: resets are TCP's, and a simulated link loses nothing.
                if lingering and isinstance(transport, TCPStream):
                    # The last response must leave whole (shielded, as in aclose); the
                    # lingering is not shielded, so that stopping the server ends it.
                    with trio.CancelScope(shield=True):
                        await tls.send_close_notify()
                    await linger(transport, LINGER_BYTES)
            finally:
                metrics.connections_open.dec()
                with trio.CancelScope(shield=True):
                    await tls.aclose()

    def _client_chain(self, tls: ServerTLSStream) -> list[x509.Certificate]:
        # A resumed session carries only the leaf: the intermediates come from the memos that
        # ``_Session._validate`` fills, the validated one first.
        chain = tls.peer_chain()
        if len(chain) == 1 and tls.session_reused():
            rest = self.intermediates.get(chain[0]) or self.failed_intermediates.get(chain[0])
            chain = [chain[0], *rest]
        return chain

    def _log_tls(self, conn_id: int, peer: str | None, sni: str | None, detail: str) -> None:
        self.metrics.tls_errors.inc()
        self.access_log.write(
            {
                "time": self.clock.now().isoformat(),
                "event": "tls_error",
                "connection": conn_id,
                "client_ip": peer,
                "sni": sni,
                "detail": detail,
            }
        )


class _Session(RequestPath):
    """The HTTP/1.1 side of one established TLS connection, one request at a time.

    It is its own :class:`~enforcer.exchange.Responder`: the shared request path answers
    through :meth:`answer` and :meth:`relay`, and reads an admitted body through :meth:`body`.
    """

    def __init__(self, enforcer: Enforcer, conn: Established) -> None:
        super().__init__(enforcer, conn)
        self.h11 = h11.Connection(
            h11.SERVER, max_incomplete_event_size=enforcer.settings.max_header_bytes
        )
        self.requests = 0
        self._method = b"GET"  # the current request's, for the framing of its response

    async def serve(self) -> bool:
        """Serve requests until the connection ends, closes or times out.

        True when we close it by choice while the client may still be sending (a body we did
        not read, or bytes after the request): then the close lingers. A client that went
        quiet, or broke the protocol, is just closed.
        """
        settings = self.e.settings
        while True:
            try:
                # The first request may take request_timeout to start (nginx's
                # client_header_timeout); a kept-alive connection waits idle_timeout.
                event = await read_head(
                    self.h11,
                    self.tls,
                    idle=settings.idle_timeout if self.requests else settings.request_timeout,
                    timeout=settings.request_timeout,
                )
            except HeadTimeout:
                return False  # closed without an answer, as nginx on client_header_timeout
            except h11.RemoteProtocolError as exc:
                await self._protocol_error(exc)
                return False
            if not isinstance(event, h11.Request):
                return False  # ConnectionClosed, PAUSED or garbage after a response
            self.requests += 1
            self._method = event.method
            head = RequestHead(
                method=event.method,
                target=event.target,
                headers=list(event.headers),
                protocol=HTTP1,
                number=self.requests,
                http_version=event.http_version,
            )
            await self.exchange(
                head, self, last=self.requests >= settings.max_requests_per_connection
            )
            if self.h11.our_state is h11.SWITCHED_PROTOCOL:
                return False  # a tunnel ended
            if self.h11.our_state is h11.MUST_CLOSE or self.h11.their_state is not h11.DONE:
                # MUST_CLOSE, or a body left unread: the connection cannot carry more; the
                # close sends what is held.
                return self._client_may_send()
            self.tls.hold_output = False
            await self.tls.flush()  # the connection stays: the response must not wait
            try:
                self.h11.start_next_cycle()
            except h11.LocalProtocolError:
                return False

    def _client_may_send(self) -> bool:
        """True when the client may still be sending: a body unread, or bytes past the request."""
        # As nginx's ``lingering_close on``: a request read whole, with nothing after it, closes
        # at once (its client has nothing left to send).
        finished = self.h11.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)
        return not finished or bool(self.h11.trailing_data[0])

    async def _protocol_error(self, exc: h11.RemoteProtocolError) -> None:
        if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            status = exc.error_status_hint
            text = "Request header too large.\n" if status == 431 else "Bad request.\n"
            await self._plain(status, text, close=True)

    async def _plain(self, status: int, text: str, *, close: bool) -> None:
        await self.answer(status, *plain(text), close=close)

    def _hold_if_last(self, closing: bool) -> None:
        """Let the response about to be sent leave with close_notify when it is the last."""
        self.tls.hold_output = closing or self.h11.their_state is h11.MUST_CLOSE

    # The Responder side (enforcer/exchange.py).

    @property
    def started(self) -> bool:
        """True once the response head left."""
        return self.h11.our_state is not h11.SEND_RESPONSE

    async def answer(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        *,
        close: bool,
        head: bool = False,
    ) -> None:
        """Send a whole answer of the enforcer's own (Content-Length framed)."""
        # An answer given before the request's body was read closes the connection unless
        # the body already ended in what was read (a denied body is never read); so does
        # any answer on a No Duration hostname, and the connection's last allowed request.
        close = close or not finish_buffered_body(self.h11)
        if close:
            headers = [*headers, (b"connection", b"close")]
        self._hold_if_last(close)
        with contextlib.suppress(h11.LocalProtocolError):
            await respond(self.h11, self.tls, status, headers, body, head=head)

    def body(self) -> AsyncGenerator[bytes, None]:
        """The admitted request's body; asking for it sends 100 Continue when awaited."""
        return body_chunks(self.h11, self.tls, MAX_BODY, self.e.settings.request_timeout)

    async def relay(
        self,
        response: OriginResponse,
        extra: list[tuple[bytes, bytes]],
        log_status: LogStatus,
        *,
        close: bool,
    ) -> None:
        """Stream the origin's answer back; log just before the last byte."""
        out = [(k, v) for k, v in response.headers if k.lower() not in HOP_BY_HOP_RESPONSE]
        out += extra
        if close:
            out.append((b"connection", b"close"))
        head = (
            self.h11.send(
                h11.Response(status_code=response.status, headers=out, reason=response.reason)
            )
            or b""
        )
        if not _small_body(response.headers):
            # Possibly a stream (chunked, or large): the client gets the head at once.
            await self.tls.send_all(head)
            head = b""
        # A small response leaves in one write (head, body and end together), one chunk
        # behind so that the log line is written before it ends. A stream goes out chunk by
        # chunk as it comes (its end, the EndOfMessage, still after the log line): the client
        # must not wait for the origin's next chunk to see this one.
        pending = b""
        streaming = not head
        async for chunk in response.body:
            if streaming:
                await self.tls.send_all(self.h11.send(h11.Data(data=chunk)) or b"")
                continue
            if pending:
                await self.tls.send_all(head + (self.h11.send(h11.Data(data=pending)) or b""))
                head = b""
            pending = chunk
        log_status(response.status)
        tail = head
        if pending:
            tail += self.h11.send(h11.Data(data=pending)) or b""
        tail += self.h11.send(h11.EndOfMessage(headers=self._trailers(response))) or b""
        self._hold_if_last(close)
        await self.tls.send_all(tail)

    def _trailers(self, response: OriginResponse) -> list[tuple[bytes, bytes]]:
        # Only a chunked response carries trailers: HTTP/1.1, a body allowed (h11 frames a
        # response without Content-Length so); elsewhere they are dropped, as nginx does.
        if (
            not response.trailers
            or self.h11.their_http_version != b"1.1"
            or self._method == b"HEAD"
            or response.status in (204, 304)
        ):
            return []
        return [(k, v) for k, v in response.trailers if k.lower() not in HOP_BY_HOP_RESPONSE]

    async def abort(self, why: str) -> None:
        """A response cut short cannot be repaired on HTTP/1.1: the connection ends."""
        raise TLSError(why)

    async def admitted(
        self,
        request: RequestHead,
        port: Responder,
        decision: AccessDecision,
        hostname: str | None,
        body: AsyncGenerator[bytes, None],
        log_status: LogStatus,
    ) -> bool:
        """Tunnel an admitted WebSocket upgrade (F7, F8); anything else is forwarded."""
        upgrade = _upgrade_protocol(request)
        if upgrade is None or hostname is None:
            return False
        async for _ in body:
            pass  # an upgrade request's body (normally none) is not forwarded
        log_status(101)
        await self._tunnel(request, decision, upgrade, hostname)
        return True

    async def _tunnel(
        self, request: RequestHead, decision: AccessDecision, upgrade: bytes, hostname: str
    ) -> None:
        """Forward a WebSocket upgrade to the origin and pipe bytes both ways while admitted.

        Every :data:`_TUNNEL_RECHECK` seconds the access decision is made again with the
        opening request's facts (see :meth:`_recheck`); once it denies, the client gets a
        Close frame (1008, policy violation), both sides are closed and the log says why.
        """
        app = decision.application
        assert app is not None
        headers = self.origin_headers(request, decision, upgrade)
        timeout = self.e.settings.request_timeout
        try:
            result = await open_upgrade(
                app.origin, request.method, request.target, headers, timeout, self.e.origins.connect
            )
        except OriginError as exc:
            log.warning("connection %d: %s", self.conn_id, exc)
            self.e.metrics.origin(app.hostname)[1].inc()
            await self._plain(502, "The origin is unreachable.\n", close=True)
            return
        if not isinstance(result, Tunnel):
            response, body = result  # the origin declined the upgrade: relay its answer
            out = [(k, v) for k, v in response.headers if k.lower() not in HOP_BY_HOP_RESPONSE]
            out += [(b"content-length", str(len(body)).encode()), (b"connection", b"close")]
            await send(
                self.h11, self.tls, h11.Response(status_code=response.status_code, headers=out)
            )
            await send(self.h11, self.tls, h11.Data(data=body))
            await send(self.h11, self.tls, h11.EndOfMessage())
            return
        out = list(result.response.headers)
        if decision.set_cookie:
            out.append((b"set-cookie", decision.set_cookie.encode()))
        await send(
            self.h11,
            self.tls,
            h11.InformationalResponse(status_code=101, headers=out, reason=b"Switching Protocols"),
        )
        client_bytes, _ = self.h11.trailing_data
        origin = result.stream
        # Where the origin's frames end: a Close frame may only go between two of them.
        frames = WebSocketFrames()
        downstream = trio.CancelScope()
        downstream_done = trio.Event()
        intact = True  # False once a send to the client was cut short: no frame may follow

        async def upstream(done: trio.CancelScope) -> None:
            fair = Fairness()
            try:
                while data := await self.tls.receive_some(65536):
                    await origin.send_all(data)
                    await fair.moved(len(data))
            except (TLSError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            done.cancel()

        async def down(done: trio.CancelScope) -> None:
            nonlocal intact
            fair = Fairness()
            try:
                with downstream:
                    if result.trailing:
                        await self._send_whole(result.trailing, timeout)
                        frames.feed(result.trailing)
                    while data := await origin.receive_some(65536):
                        # Shielded: a recheck that ends the tunnel waits for this write, so
                        # the client never gets half a frame followed by our Close frame.
                        if not await self._send_whole(data, timeout):
                            intact = False
                            break
                        frames.feed(data)
                        await fair.moved(len(data))
            except (TLSError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                intact = False
            finally:
                downstream_done.set()
            if not downstream.cancelled_caught:
                done.cancel()  # the origin ended the tunnel

        async def recheck(done: trio.CancelScope) -> None:
            denied = await self._recheck(request, decision, hostname)
            self._log_tunnel_closed(request, denied)
            downstream.cancel()
            await downstream_done.wait()
            if intact and frames.at_boundary:
                reason = denied.reason or Reason.POLICY_DENIED
                frame = websocket_close_frame(1008, f"access ended: {reason.value}".encode())
                with trio.move_on_after(timeout):
                    await self.tls.send_all(frame)
            done.cancel()

        self.e.metrics.tunnels_open.inc()
        try:
            if client_bytes:
                await origin.send_all(bytes(client_bytes))
            async with trio.open_nursery() as nursery:
                scope = nursery.cancel_scope
                nursery.start_soon(upstream, scope)
                nursery.start_soon(down, scope)
                nursery.start_soon(recheck, scope)
        except (TLSError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self.e.metrics.tunnels_open.dec()
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(origin)

    async def _send_whole(self, data: bytes | bytearray, timeout: float) -> bool:
        """Send ``data`` to the client, immune to cancellation but not to ``timeout``."""
        with trio.CancelScope(shield=True, deadline=trio.current_time() + timeout) as scope:
            await self.tls.send_all(data)
        return not scope.cancelled_caught

    async def _recheck(
        self, request: RequestHead, opened: AccessDecision, hostname: str
    ) -> AccessDecision:
        """Re-decide a tunnel's access every second until it is denied; return the denial.

        The decision is made again with the opening request's facts (SNI, Host, address, the
        token that admitted it) against the current snapshot, after picking up other workers'
        commits, and at the clock's ``now``: so a revoked or expired certificate, an expired
        token, a changed policy or a deleted application all end the tunnel within a second.
        A decision is a pure function of its inputs, so while the snapshot is the same object
        and ``now`` has not crossed the next instant at which one of its time checks flips
        (:func:`_recheck_after`), the last one still holds and is not made again: a new one
        validates the chain again, and thousands of open tunnels need not do that every
        second; none of them signs a token (``issue_token=False``).
        """
        host_values = header_values(request.headers, b"host")
        # The credentials that admitted the opening request, and only those: its token (or,
        # for a person under No Duration, the session token that named them), its service token.
        token = None
        if opened.admitted_by is AdmittedBy.TOKEN:
            token = opened.token
        elif opened.admitted_by is AdmittedBy.IDENTITY:
            token = presented_token(request.headers)
        access = AccessRequest(
            sni=self.tls.sni,
            host=host_values[0] if len(host_values) == 1 else None,
            client_ip=ip_or_none(self.peer),
            token=token,
            service_token=presented_service_token(request.headers)
            if opened.admitted_by is AdmittedBy.SERVICE_TOKEN
            else None,
        )
        last: tuple[Snapshot, dt.datetime, dt.datetime] | None = None
        while True:
            # One beat for every tunnel of this enforcer, which also picks up other workers'
            # commits once for all of them (Enforcer.tunnel_beat).
            await self.e.tunnel_beat.wait()
            snapshot = self.e.snapshot
            now = self.e.clock.now()
            if last is not None and snapshot is last[0] and last[1] <= now < last[2]:
                continue
            chain = self._validate(snapshot, hostname, now) if self.chain else None
            # Only the verdict matters here: a token would be signed for nobody.
            decision = decide(access, snapshot, chain, now, self.e.token_memo, issue_token=False)
            if not decision.allowed:
                return decision
            last = (snapshot, now, _recheck_after(decision, snapshot, now))

    def _log_tunnel_closed(self, request: RequestHead, denied: AccessDecision) -> None:
        self.e.access_log.write(
            {
                "time": self.e.clock.now().isoformat(),
                "event": "tunnel_closed",
                "connection": self.conn_id,
                "client_ip": self.peer,
                "sni": self.tls.sni,
                "host": next(iter(header_values(request.headers, b"host")), None),
                "path": request.target.decode("latin-1"),
                "reason": (denied.reason or Reason.POLICY_DENIED).value,
                "detail": denied.detail or None,
            }
        )


_SMALL_BODY = 65536


def _small_body(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """True when a response declares a Content-Length small enough to send in one write."""
    lengths = [v for k, v in headers if k.lower() == b"content-length"]
    return len(lengths) == 1 and lengths[0].strip().isdigit() and int(lengths[0]) <= _SMALL_BODY


def _upgrade_protocol(request: RequestHead) -> bytes | None:
    """``b"websocket"`` when a GET asks to upgrade to WebSocket, else None.

    Only WebSocket is tunnelled (and re-checked while open). Any other upgrade, ``h2c`` above
    all (which would carry later requests past every per-request check), is forwarded as a
    plain request: Upgrade, Connection and HTTP2-Settings are hop-by-hop and never reach the
    origin, which answers it as HTTP/1.1, as nginx does without ``proxy_set_header Upgrade``.
    """
    if request.method != b"GET":
        return None
    connection = b",".join(v for k, v in request.headers if k == b"connection").lower()
    if b"upgrade" not in [t.strip() for t in connection.split(b",")]:
        return None
    protocols = b",".join(v for k, v in request.headers if k == b"upgrade").lower()
    if b"websocket" not in [p.strip() for p in protocols.split(b",")]:
        return None
    return b"websocket"


# How often an open tunnel's access is decided again; and the longest a decision is trusted
# without being made again even when nothing it depends on changed (a safety net).
_TUNNEL_RECHECK = 1.0
_TUNNEL_FULL_RECHECK = dt.timedelta(seconds=10)
_JUST_AFTER = dt.timedelta(microseconds=1)


def _recheck_after(decision: AccessDecision, snapshot: Snapshot, now: dt.datetime) -> dt.datetime:
    """The first instant at which ``decision`` could change while the snapshot stays the same.

    With one snapshot, ``decide`` depends on ``now`` only through the chain's validity window
    (inclusive), the admitting token's ``exp`` and the retired signing keys' acceptance ends.
    """
    times = [now + _TUNNEL_FULL_RECHECK]
    if decision.certificate is not None:
        times.append(decision.certificate.chain_valid_until + _JUST_AFTER)
    if decision.admitted_by is AdmittedBy.TOKEN and decision.claims:
        exp = decision.claims.get("exp")
        if isinstance(exp, int | float):
            times.append(dt.datetime.fromtimestamp(exp, dt.UTC))
    service_token_id = decision.claims.get("service_token_id") if decision.claims else None
    if decision.admitted_by is AdmittedBy.SERVICE_TOKEN and service_token_id is not None:
        times += [
            t.expires_at for t in snapshot.service_tokens.values() if t.id == service_token_id
        ]
    times += [r.accepted_until + _JUST_AFTER for r in snapshot.keyring.retired]
    return min(t for t in times if t > now)  # the first is always later than now


def _peer_ip(transport: trio.abc.Stream) -> str | None:
    try:
        return str(transport.socket.getpeername()[0])  # type: ignore[attr-defined]
    except (OSError, AttributeError, IndexError):
        return None


class ListenError(OSError):
    """A listener could not be bound; the message names the address."""


async def open_listener(host: str, port: int, *, reuse_port: bool = False) -> trio.SocketListener:
    """Bind a TCP listener; with ``reuse_port`` several processes can share the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        await sock.bind((host, port))
    except (OSError, OverflowError) as exc:
        sock.close()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ListenError(f"cannot listen on {host}:{port}: {reason}") from exc
    sock.listen(1024)
    return trio.SocketListener(sock)


async def serve(
    enforcer: Enforcer,
    listener: trio.SocketListener,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the enforcer on a bound listener until cancelled; report the bound port."""
    bound = listener.socket.getsockname()[1]
    log.info("enforcer listening on port %d", bound)
    # The listening socket leaves trio's wrapper for ours (see enforcer/sockets.py).
    sock = socket.socket(fileno=listener.socket.detach())
    try:
        # The origin pool's HTTP/2 connections live as long as serving does.
        async with enforcer.origins.running(), trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(
                    serve_tcp,
                    max_connections=enforcer.settings.max_connections,
                    on_accept_error=enforcer.metrics.accept_errors.inc,
                ),
                sock,
                enforcer.handle,
                nursery,
            )
            task_status.started(bound)
    finally:
        trio.lowlevel.notify_closing(sock)
        sock.close()
        with trio.CancelScope(shield=True):
            await enforcer.origins.aclose()
