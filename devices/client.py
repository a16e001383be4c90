"""A device's HTTP/1.1 client over mTLS on trio: every phase timed, every outcome classified.

One :class:`DeviceClient` is one device talking to one target (our enforcer, nginx, or a real
edge). It keeps what a real device keeps between requests, each switchable: a kept-alive
connection, a TLS session to resume, and a ``CF_Authorization`` cookie. A request returns an
:class:`Attempt` with the phase timings (connect, key store, TLS handshake, first byte, total)
and the outcome in the words of docs/access-flow.md: ``allowed``, ``denied:<code>``,
``tls_error:<alert or eof>``, ``http_<status>``, ``timeout`` or ``connect_error``.

TLS over a TCP address is pyOpenSSL in socket mode (:mod:`devices.openssl_tls`: the OpenSSL
``cryptography`` bundles, the enforcer's own) when the key store can hand its key to it (a
software store, or none); a hardware token (:mod:`devices.piv`), an in-memory connection (a
simulation) or a subclass that opts out (the HTTP/2 client) use the standard library's ``ssl``
through ``trio.SSLStream``. Both verify the server alike, resume sessions alike and name their
failures alike.

Timing uses ``trio.current_time()``, so on trio's MockClock the key store's simulated costs
(PIN verify, touch, on-token signature) show up exactly while the network costs nothing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import ClassVar, cast

import h11
import trio
import trio_websocket
from OpenSSL import SSL

from devices.keystore import KeyStore, KeyStoreError, OpenSSLKeyStore
from devices.openssl_tls import OpenSSLStream, client_context, open_socket
from devices.signer_tls import SignerTLSError, SignerTLSStream

TLSStream = trio.SSLStream[trio.SocketStream] | OpenSSLStream | SignerTLSStream

COOKIE_NAME = "CF_Authorization"


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a device connects: an address, and the name it asks for (SNI and Host)."""

    host: str
    port: int
    server_name: str
    ca_file: Path | None = None  # trust for the server certificate; None = system trust
    # How to reach the target; None = TCP to host:port. A simulation passes in-memory streams.
    connect: Callable[[], Awaitable[trio.abc.Stream]] | None = dataclasses.field(
        default=None, compare=False, repr=False
    )
    alpn: tuple[str, ...] = ("http/1.1",)  # what the device offers (the h2 client: h2 only)

    def make_context(self) -> ssl.SSLContext:
        """Return a fresh client TLS context that trusts this target's server certificate."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        ctx.set_alpn_protocols(list(self.alpn))
        return ctx

    def make_openssl_context(self) -> SSL.Context:
        """Return a fresh pyOpenSSL client context that trusts this target's server certificate."""
        return client_context(self.ca_file, self.server_name, self.alpn)


@dataclasses.dataclass(frozen=True)
class ClientOptions:
    """What a device keeps between requests, and how long it waits."""

    keep_alive: bool = True
    resume_sessions: bool = True
    reuse_cookie: bool = True
    always_new_handshake: bool = False  # a new connection and full handshake for every request
    timeout: float = 10.0
    # Seconds this device's clock is ahead (+) or behind (-). A skewed device judges the server
    # certificate's validity by its own clock, as real devices do (a classic IoT failure).
    clock_skew: float = 0.0


@dataclasses.dataclass
class Timings:
    """Phase durations of one attempt, in seconds (0 for a phase that did not happen)."""

    connect: float = 0.0
    key_store: float = 0.0
    handshake: float = 0.0
    first_byte: float = 0.0
    total: float = 0.0


@dataclasses.dataclass
class Attempt:
    """One request as the device saw it."""

    outcome: str
    status: int | None = None
    reason: str | None = None
    timings: Timings = dataclasses.field(default_factory=Timings)
    new_connection: bool = False
    resumed: bool = False
    cookie_sent: bool = False
    cookie_received: bool = False
    error: str | None = None
    body: bytes = b""
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    protocol: str = "http1"  # http1, h2 or grpc
    grpc_status: str | None = None  # a gRPC call's status code name (OK, UNAUTHENTICATED...)

    @property
    def allowed(self) -> bool:
        """True when the request got through."""
        return self.outcome == "allowed"


def classify(status: int, denied_reason: str | None) -> str:
    """Name the outcome of an HTTP response the way docs/access-flow.md does."""
    if 200 <= status < 400:
        return "allowed"
    if status in (400, 401, 403) and denied_reason:
        # 401 login_required and 400 login_failed are the enforcer's decisions too (I7, I3).
        return f"denied:{denied_reason}"
    return f"http_{status}"


def tls_error_name(exc: BaseException) -> str:
    """Name a TLS failure: the alert or library reason, or ``eof``."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLError | SSL.Error | SignerTLSError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, SignerTLSError):
        return f"tls_error:{cause.name}"
    if isinstance(cause, SSL.Error):
        return _openssl_error_name(cause)
    if isinstance(cause, ssl.SSLError):
        reason = getattr(cause, "reason", None) or cause.__class__.__name__
        if isinstance(cause, ssl.SSLEOFError) or reason == "UNEXPECTED_EOF_WHILE_READING":
            return "tls_error:eof"
        return f"tls_error:{str(reason).lower()}"
    return "tls_error:eof"


def _openssl_error_name(exc: SSL.Error) -> str:
    """Name a pyOpenSSL failure as :func:`tls_error_name` names the standard library's."""
    if isinstance(exc, SSL.SysCallError | SSL.ZeroReturnError):
        return "tls_error:eof"  # the server closed or reset the connection
    # [(library, function, reason)], the reason in words ("tlsv1 alert unknown ca"): the
    # standard library names the same error by its code, TLSV1_ALERT_UNKNOWN_CA.
    errors = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
    reasons = [e[2] for e in errors if isinstance(e, tuple) and len(e) == 3 and e[2]]
    if not reasons:
        return "tls_error:eof"
    reason = str(reasons[-1]).lower().replace(" ", "_")
    if reason == "unexpected_eof_while_reading":
        return "tls_error:eof"
    return f"tls_error:{reason}"


async def open_tcp(host: str, port: int) -> trio.SocketStream:
    """Connect to ``host:port``: an IP address directly, a name with trio's happy eyeballs."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return await trio.open_tcp_stream(host, port)
    # One address: nothing for happy eyeballs to race, and its nursery and task per connection
    # cost a load generator ~0.2 ms of CPU per attempt (bench/loadgen.py).
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


class DeviceClient:
    """A device's connection, TLS session and cookie for one target."""

    # pyOpenSSL in socket mode where it can (see the module doc); a subclass may opt out.
    native_tls: ClassVar[bool] = True

    def __init__(
        self,
        target: Target,
        key_store: KeyStore | None,
        options: ClientOptions | None = None,
        now: Callable[[], dt.datetime] | None = None,
    ) -> None:
        self.target = target
        self._now = now or (lambda: dt.datetime.now(dt.UTC))
        self.key_store = key_store
        self.options = options or ClientOptions()
        self._stream: TLSStream | None = None
        self._h11: h11.Connection | None = None
        self._session: ssl.SSLSession | SSL.Session | None = None
        self._cookie: str | None = None
        self._cookie_expires: float | None = None
        self.handshakes = 0  # TLS handshakes completed (full or resumed), over all connections
        self._context: ssl.SSLContext | None = None  # without a key store
        self._openssl_context: SSL.Context | None = None  # without a key store
        # A load test sends the same request again and again: h11 validates it once.
        self._last_request: tuple[object, h11.Request] | None = None
        self._reconnect = False  # the next request opens a new connection (see reconnect)

    @property
    def cookie(self) -> str | None:
        """The ``CF_Authorization`` cookie this device holds and still believes valid."""
        # Max-Age is relative, so it runs on trio's clock, which skew does not change.
        if self._cookie_expires is not None and trio.current_time() >= self._cookie_expires:
            self._cookie = self._cookie_expires = None
        return self._cookie

    def device_now(self) -> dt.datetime:
        """This device's idea of the time: the injected clock plus its skew."""
        return self._now() + dt.timedelta(seconds=self.options.clock_skew)

    def _server_certificate_problem(self, stream: TLSStream) -> str | None:
        if self.options.clock_skew == 0:
            return None
        if isinstance(stream, OpenSSLStream | SignerTLSStream):
            leaf = stream.server_certificate()
            if leaf is None:
                return None
            not_before = leaf.not_valid_before_utc.timestamp()
            not_after = leaf.not_valid_after_utc.timestamp()
        else:
            cert = stream.getpeercert()
            if not cert:
                return None
            not_before = ssl.cert_time_to_seconds(str(cert["notBefore"]))
            not_after = ssl.cert_time_to_seconds(str(cert["notAfter"]))
        now = self.device_now().timestamp()
        if now < not_before:
            return "tls_error:server_certificate_not_yet_valid"
        if now > not_after:
            return "tls_error:server_certificate_expired"
        return None

    def _native_tls(self) -> bool:
        """True when this connection's TLS is pyOpenSSL in socket mode (see the module doc)."""
        return (
            self.native_tls
            and self.target.connect is None
            # Not isinstance(..., OpenSSLKeyStore): a runtime protocol check costs more per
            # attempt than this whole test (bench/loadgen.py's profile).
            and (self.key_store is None or hasattr(self.key_store, "openssl_context"))
            and not getattr(self.key_store, "external_signer", False)
        )

    async def preload(self) -> None:
        """Load the key and chain into the TLS context the next connection will use, as a
        device does when it boots (so that no attempt's latency includes reading files)."""
        if getattr(self.key_store, "external_signer", False):
            # A token: open (and log in) its session and read the chain, off the event loop.
            await trio.to_thread.run_sync(self.key_store.tls_signer)  # type: ignore[union-attr]
        elif self._native_tls():
            if self.key_store is not None:
                cast(OpenSSLKeyStore, self.key_store).openssl_context(
                    self.target.make_openssl_context
                )
            elif self._openssl_context is None:
                self._openssl_context = self.target.make_openssl_context()
        elif self.key_store is not None:
            await self.key_store.handshake_context(self.target.make_context)

    def _request_event(self, method: str, path: str, headers: list[tuple[str, str]]) -> h11.Request:
        """The h11 request, built (and validated) once while the same one is sent again."""
        key = (method, path, tuple(headers))
        if self._last_request is None or self._last_request[0] != key:
            self._last_request = (key, h11.Request(method=method, target=path, headers=headers))
        return self._last_request[1]

    def reconnect(self) -> None:
        """Make the next request open a new connection (a new handshake through the key store);
        a request in flight finishes on the current one (it is not closed under it)."""
        self._reconnect = True

    def forget_cookie(self) -> None:
        """Drop the cookie (as a device that restarts would)."""
        self._cookie = self._cookie_expires = None

    async def _connect_openssl(self, timings: Timings) -> OpenSSLStream:
        start = trio.current_time()
        sock = await open_socket(self.target.host, self.target.port)
        timings.connect = trio.current_time() - start
        try:
            start = trio.current_time()
            if self.key_store is not None:
                store = cast(OpenSSLKeyStore, self.key_store)
                ctx = store.openssl_context(self.target.make_openssl_context)
            else:
                # One context for the client's life, as on the standard library's path.
                if self._openssl_context is None:
                    self._openssl_context = self.target.make_openssl_context()
                ctx = self._openssl_context
            session = self._session if self.options.resume_sessions else None
            stream = OpenSSLStream(
                sock,
                ctx,
                self.target.server_name,
                session if isinstance(session, SSL.Session) else None,
            )
        except BaseException:
            sock.close()
            raise
        timings.key_store = trio.current_time() - start
        try:
            start = trio.current_time()
            await stream.do_handshake()
            timings.handshake = trio.current_time() - start + timings.key_store
        except BaseException:
            stream.close()
            raise
        return stream

    async def _connect_signer(self, timings: Timings) -> SignerTLSStream:
        """TLS whose CertificateVerify the key store signs (a PKCS#11 token): tlslite-ng."""
        start = trio.current_time()
        sock = await open_socket(self.target.host, self.target.port)
        timings.connect = trio.current_time() - start
        stream = SignerTLSStream(sock)
        try:
            chain, signer, cost = self.key_store.tls_signer()  # type: ignore[union-attr]
            session = self._session if self.options.resume_sessions else None
            start = trio.current_time()
            await stream.do_handshake(
                chain,
                signer,
                self.target.server_name,
                self.target.ca_file,
                self.target.alpn,
                self._now(),
                session if not isinstance(session, ssl.SSLSession | SSL.Session) else None,
            )
            timings.handshake = trio.current_time() - start
            # The token's real signing time, measured around each call into it (PKCS#11).
            timings.key_store = cost.seconds
        except BaseException:
            stream.close()
            raise
        return stream

    async def _connect(self, timings: Timings) -> TLSStream:
        if getattr(self.key_store, "external_signer", False) and self.target.connect is None:
            return await self._connect_signer(timings)
        if self._native_tls():
            return await self._connect_openssl(timings)
        start = trio.current_time()
        if self.target.connect is not None:
            tcp = await self.target.connect()
        else:
            tcp = await open_tcp(self.target.host, self.target.port)
        timings.connect = trio.current_time() - start
        try:
            cost = 0.0
            if self.key_store is not None:
                start = trio.current_time()
                ctx, cost = await self.key_store.handshake_context(self.target.make_context)
                timings.key_store = trio.current_time() - start  # PIN prompts, touch waits
            else:
                # One context for the client's life: a TLS session resumes only on the context
                # that made it (a key store keeps its own for the same reason).
                if self._context is None:
                    self._context = self.target.make_context()
                ctx = self._context
            stream = trio.SSLStream(tcp, ctx, server_hostname=self.target.server_name)
            if self.options.resume_sessions and isinstance(self._session, ssl.SSLSession):
                # trio.SSLStream takes no session argument; its SSLObject takes one before the
                # handshake starts.
                stream._ssl_object.session = self._session
            start = trio.current_time()
            await stream.do_handshake()
            waited = timings.key_store  # before the handshake: touch waits and the like
            if cost > 0 and not stream._ssl_object.session_reused:
                # The token's work (PIN verify, on-token signature) belongs to a full handshake;
                # a resumed one signs nothing. It is simulated, so it is added here.
                await trio.sleep(cost)
                timings.key_store += cost
            timings.handshake = trio.current_time() - start + waited
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise
        return stream

    async def request(
        self,
        path: str = "/",
        *,
        method: str = "GET",
        body: bytes = b"",
        headers: Sequence[tuple[str, str]] = (),
    ) -> Attempt:
        """Send one request (opening a connection if needed) and classify what happened."""
        start = trio.current_time()
        attempt = Attempt(outcome="timeout")
        with trio.move_on_after(self.options.timeout):
            stale = await self._request(attempt, path, method, body, headers)
            if stale:
                # A kept-alive connection the server had closed: retry once on a new one, as
                # real clients do (the request was never answered).
                attempt = Attempt(outcome="timeout")
                await self._request(attempt, path, method, body, headers)
        attempt.timings.total = trio.current_time() - start
        if attempt.outcome == "timeout":
            await self._drop()
        return attempt

    async def _request(
        self,
        attempt: Attempt,
        path: str,
        method: str,
        body: bytes,
        headers: Sequence[tuple[str, str]],
    ) -> bool:
        """Fill ``attempt``; return True when a reused connection turned out to be closed."""
        if (
            self._stream is None
            or self.options.always_new_handshake
            or not self.options.keep_alive
            or self._reconnect
        ):
            self._reconnect = False
            if not await self._open(attempt):
                return False
            self._h11 = h11.Connection(h11.CLIENT)
        assert self._stream is not None and self._h11 is not None
        stream, conn = self._stream, self._h11

        hdrs = [("host", self.target.server_name), ("user-agent", "mtls-testbed-device")]
        if not self.options.keep_alive or self.options.always_new_handshake:
            hdrs.append(("connection", "close"))
        cookie = self.cookie if self.options.reuse_cookie else None
        if cookie:
            hdrs.append(("cookie", f"{COOKIE_NAME}={cookie}"))
            attempt.cookie_sent = True
        hdrs += list(headers)
        if body or method in ("POST", "PUT", "PATCH"):
            hdrs.append(("content-length", str(len(body))))
        sent_at = trio.current_time()
        response: h11.Response | None = None
        try:
            data = conn.send(self._request_event(method, path, hdrs))
            if body:
                data += conn.send(h11.Data(data=body))
            data += conn.send(h11.EndOfMessage())
            await stream.send_all(data)
            chunks: list[bytes] = []
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    chunk = await stream.receive_some(65536)
                    if chunk and response is None and not attempt.timings.first_byte:
                        attempt.timings.first_byte = trio.current_time() - sent_at
                    conn.receive_data(chunk)
                    continue
                if isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise trio.BrokenResourceError("the server closed the connection")
        except (trio.BrokenResourceError, h11.ProtocolError) as exc:
            await self._drop()
            if not attempt.new_connection and response is None:
                return True
            attempt.outcome, attempt.error = tls_error_name(exc), _describe(exc)
            return False
        assert response is not None
        attempt.status = response.status_code
        attempt.headers = [(k.decode(), v.decode("latin-1")) for k, v in response.headers]
        attempt.reason = next(
            (v for k, v in attempt.headers if k == "x-access-denied-reason"), None
        )
        attempt.outcome = classify(response.status_code, attempt.reason)
        attempt.body = b"".join(chunks)
        self._take_cookie(attempt)
        if self.options.resume_sessions and attempt.new_connection:
            # TLS 1.3 tickets arrive after the handshake: take the session after the first
            # response on a new connection (reading it is not free, so only then).
            self._session = tls_session(stream)
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
            await self._drop()
        else:
            conn.start_next_cycle()
        return False

    async def _open(self, attempt: Attempt) -> bool:
        """Open a new connection (TCP, key store, TLS) into ``self._stream``; False on failure,
        with the failure in ``attempt``."""
        await self._drop()
        try:
            self._stream = await self._connect(attempt.timings)
        except OSError as exc:
            attempt.outcome, attempt.error = "connect_error", _describe(exc)
            return False
        except trio.BrokenResourceError as exc:
            attempt.outcome, attempt.error = tls_error_name(exc), _describe(exc)
            return False
        except KeyStoreError as exc:  # PIN, touch, a locked token: the device cannot sign
            code = getattr(exc, "code", type(exc).__name__)
            attempt.outcome, attempt.error = f"key_store_error:{code}", str(exc)
            return False
        self.handshakes += 1
        problem = self._server_certificate_problem(self._stream)
        if problem is not None:
            attempt.outcome, attempt.error = problem, "judged by the device's skewed clock"
            await self._drop()
            return False
        attempt.new_connection = True
        attempt.resumed = session_reused(self._stream)
        return True

    def _take_cookie(self, attempt: Attempt) -> None:
        for name, value in attempt.headers:
            if name != "set-cookie" or not value.startswith(f"{COOKIE_NAME}="):
                continue
            parts = [p.strip() for p in value.split(";")]
            self._cookie = parts[0].split("=", 1)[1]
            max_age = next(
                (p.split("=", 1)[1] for p in parts[1:] if p.lower().startswith("max-age=")), None
            )
            self._cookie_expires = trio.current_time() + int(max_age) if max_age else None
            attempt.cookie_received = True

    async def _drop(self) -> None:
        stream, self._stream, self._h11 = self._stream, None, None
        if isinstance(stream, OpenSSLStream | SignerTLSStream):
            stream.close()  # nothing to wait for: no checkpoint, no cancelled scope
        elif stream is not None:
            await trio.aclose_forcefully(stream)

    async def aclose(self) -> None:
        """Close the kept-alive connection, if any."""
        await self._drop()

    @asynccontextmanager
    async def websocket(
        self, path: str = "/telemetry"
    ) -> AsyncIterator[tuple[Attempt, trio_websocket.WebSocketConnection | None]]:
        """Open a WebSocket channel on a new mTLS connection: ``(attempt, ws or None)``."""
        attempt = Attempt(outcome="timeout", new_connection=True)
        start = trio.current_time()
        stream = None
        with trio.move_on_after(self.options.timeout):
            try:
                stream = await self._connect(attempt.timings)
            except OSError as exc:
                attempt.outcome, attempt.error = "connect_error", _describe(exc)
            except trio.BrokenResourceError as exc:
                attempt.outcome, attempt.error = tls_error_name(exc), _describe(exc)
            except KeyStoreError as exc:
                code = getattr(exc, "code", type(exc).__name__)
                attempt.outcome, attempt.error = f"key_store_error:{code}", str(exc)
        if stream is not None:
            extra = []
            if self.options.reuse_cookie and self.cookie:
                extra.append((b"cookie", f"{COOKIE_NAME}={self.cookie}".encode()))
                attempt.cookie_sent = True
            try:
                async with trio.open_nursery() as nursery:
                    try:
                        with trio.fail_after(self.options.timeout):
                            ws = await trio_websocket.wrap_client_stream(
                                nursery, stream, self.target.server_name, path, extra_headers=extra
                            )
                    except _WS_FAILURES as exc:
                        self._websocket_failed(attempt, exc)
                        nursery.cancel_scope.cancel()
                    else:
                        attempt.status, attempt.outcome = 101, "allowed"
                        attempt.timings.total = trio.current_time() - start
                        try:
                            yield attempt, ws
                        finally:
                            with trio.CancelScope(shield=True):
                                await ws.aclose()
                            nursery.cancel_scope.cancel()
                        return
            except* _WS_FAILURES as group:
                # trio-websocket's reader task may raise the rejection before (or besides) the
                # handshake call itself.
                if attempt.status is None:
                    first: BaseException = group
                    while isinstance(first, BaseExceptionGroup):
                        first = first.exceptions[0]
                    self._websocket_failed(attempt, first)
            finally:
                await trio.aclose_forcefully(stream)
        attempt.timings.total = trio.current_time() - start
        yield attempt, None

    @staticmethod
    def _websocket_failed(attempt: Attempt, exc: BaseException) -> None:
        if isinstance(exc, trio_websocket.ConnectionRejected):
            headers = {k.decode().lower(): v.decode("latin-1") for k, v in exc.headers or []}
            attempt.status = exc.status_code
            attempt.reason = headers.get("x-access-denied-reason")
            attempt.outcome = classify(exc.status_code or 0, attempt.reason)
        elif isinstance(exc, trio.TooSlowError):
            attempt.outcome = "timeout"
        else:
            attempt.outcome, attempt.error = tls_error_name(exc), _describe(exc)


def tls_session(stream: TLSStream) -> ssl.SSLSession | SSL.Session | None:
    """The TLS session a later connection can resume, whichever library the stream uses."""
    if isinstance(stream, OpenSSLStream | SignerTLSStream):
        return stream.session  # type: ignore[no-any-return]
    return stream._ssl_object.session


def session_reused(stream: TLSStream) -> bool:
    """True when the stream's handshake resumed a session."""
    if isinstance(stream, OpenSSLStream | SignerTLSStream):
        return stream.session_reused
    return stream._ssl_object.session_reused


_WS_FAILURES = (
    trio_websocket.ConnectionRejected,
    trio_websocket.HandshakeError,
    trio.BrokenResourceError,
    trio.TooSlowError,
)


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    text = f"{type(exc).__name__}: {exc}"
    if cause is not None and str(cause) not in text:
        text += f" ({type(cause).__name__}: {cause})"
    if isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED:
        return "connection refused"
    return text
