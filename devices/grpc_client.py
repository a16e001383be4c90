"""A device's gRPC client: real telemetry calls made with grpcio, timed and classified.

Theory of operation. grpcio is a C core with its own threads and its own sockets, so it cannot
run on trio's streams: each call runs in a worker thread (``trio.to_thread.run_sync``, bounded
by a :class:`trio.CapacityLimiter`, trio's default thread limiter unless one is given) while
trio goes on running the rest of the fleet. That also means a gRPC device needs a real socket:
a virtual-time run (in-memory streams) cannot carry it, and :class:`GrpcDeviceClient` refuses a
target with a ``connect`` function.

Keys. grpcio takes the client certificate chain and private key as PEM bytes
(``grpc.ssl_channel_credentials``), not as an ``ssl.SSLContext``: a software key store hands
them over (:meth:`~devices.keystore.SoftwareKeyStore.pem_credentials`); a PIV token never
exports its key, so a PIV device cannot speak gRPC (:class:`GrpcUnsupported`; it can speak
HTTP/1.1 and h2, whose TLS runs in Python's ``ssl``).

Connections follow the device's :class:`~devices.client.ClientOptions`, as the HTTP clients
do: with ``keep_alive`` (and not ``always_new_handshake``) the device keeps one channel and
grpcio keeps its connection, reconnecting by itself after a GOAWAY (an application with No
Duration sends one after every stream, so each call is then a new full handshake); otherwise
every call gets a new channel, closed after it. Channels never share connections
(``grpc.use_local_subchannel_pool``), and grpcio's own retries are off, so one attempt is one
call. :attr:`GrpcDeviceClient.handshakes` counts the connections grpcio made ready (from the
channel's connectivity callbacks, which grpcio delivers asynchronously: read it after a call).
An attempt's ``new_connection`` does not wait for them: it is a new channel, or a kept one
that was not READY when the call started (grpcio reconnects it for the call).

Timings (seconds, on the wall clock: grpcio runs on real time only): ``handshake`` is TCP
connect + TLS handshake + HTTP/2 preface, up to the channel being READY (grpcio does not
report the phases apart, so ``connect`` stays 0); ``first_byte`` is the first response
message (for a call that ends without one, its status); ``total`` the whole attempt.

Outcomes, in the words of docs/access-flow.md: ``OK`` is ``allowed``; ``UNAUTHENTICATED`` or
``PERMISSION_DENIED`` with a reason (the ``x-access-denied-reason`` metadata, initial or
trailing, else a ``grpc-message`` that is a reason code) is ``denied:<reason>``, without one
``grpc_unauthenticated`` / ``grpc_permission_denied``; a connection refused is
``connect_error``; a deadline is ``timeout``; an HTTP answer that is not gRPC (grpcio says
"Received http2 header with status: 400") is ``http_<status>`` as over HTTP; anything else is
``grpc_<code>`` (``grpc_unavailable``...). :attr:`Attempt.grpc_status` keeps the code's name,
``Attempt.headers`` the initial then trailing metadata, ``Attempt.body`` the number of response
messages read (ASCII digits: the messages themselves are the service's, not the device's).
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from collections.abc import Sequence
from typing import Any

import grpc
import trio

from devices import telemetry
from devices.client import COOKIE_NAME, Attempt, ClientOptions, DeviceClient, Target, classify
from devices.keystore import KeyStore, KeyStoreError, SoftwareKeyStore

RPCS = ("report", "watch")
_REASON = re.compile(r"[a-z][a-z0-9_]{1,63}")
_HTTP_STATUS = re.compile(r"Received http2 header with status: (\d{3})")
_REFUSED = ("Connection refused", "connection refused", "ECONNREFUSED")


def _connectivity(channel: grpc.Channel) -> grpc.ChannelConnectivity | None:
    """The channel's state now, without connecting (None if this grpcio cannot tell)."""
    # grpcio has no public synchronous getter (subscribe() reports later, from a thread); its
    # Channel wraps the core channel, which answers at once.
    core = getattr(channel, "_channel", None)
    check = getattr(core, "check_connectivity_state", None)
    if check is None:
        return None
    from grpc import _common

    state = _common.CYGRPC_CONNECTIVITY_STATE_TO_CHANNEL_CONNECTIVITY.get(check(False))
    return state if isinstance(state, grpc.ChannelConnectivity) else None


class GrpcUnsupported(ValueError):
    """A device that cannot make gRPC calls (its key store or its target); says why."""


@dataclasses.dataclass
class _Result:
    """What the worker thread saw of one call."""

    code: grpc.StatusCode | None = None
    details: str = ""
    initial: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    trailing: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    handshake: float = 0.0
    first_message: float = 0.0
    messages: int = 0
    new_channel: bool = False
    reconnect: bool = False  # a kept channel that had to connect again (after a GOAWAY)
    ready: bool = False


def _pairs(metadata: Any) -> list[tuple[str, str]]:
    out = []
    for key, value in metadata or ():
        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        out.append((str(key).lower(), text))
    return out


class GrpcDeviceClient(DeviceClient):
    """A device's gRPC channel to one target, making telemetry calls (Report or Watch)."""

    def __init__(
        self,
        target: Target,
        key_store: KeyStore | None,
        options: ClientOptions | None = None,
        *,
        device_id: str = "device",
        rpc: str = "report",
        watch_messages: int = 3,
        limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        super().__init__(target, key_store, options)
        if target.connect is not None:
            raise GrpcUnsupported(
                "gRPC needs a real socket (grpcio runs its own): a virtual-time run's in-memory"
                " streams cannot carry it; use a real-clock run, or protocol http1 or h2"
            )
        if key_store is not None and not isinstance(key_store, SoftwareKeyStore):
            raise GrpcUnsupported(
                f"a {key_store.kind} key store cannot be used for gRPC: grpcio takes the private"
                " key as PEM bytes, and a hardware token never exports it; use protocol http1"
                " or h2 (Python's ssl), or a software key store"
            )
        if rpc not in RPCS:
            raise GrpcUnsupported(f"rpc: expected one of {list(RPCS)}, got {rpc!r}")
        self.device_id = device_id
        self.rpc = rpc
        self.watch_messages = watch_messages
        self.limiter = limiter
        self.handshakes = 0  # connections grpcio made ready, over every channel of this device
        self._grpc_channel: grpc.Channel | None = None
        self._sequence = 0
        self._credentials: grpc.ChannelCredentials | None = None
        self._lock = threading.Lock()  # the channel, between worker threads

    # -- channels (worker threads) ----------------------------------------------------------------

    def _make_credentials(self) -> grpc.ChannelCredentials:
        root = self.target.ca_file.read_bytes() if self.target.ca_file else None
        if self.key_store is None:
            return grpc.ssl_channel_credentials(root_certificates=root)
        assert isinstance(self.key_store, SoftwareKeyStore)
        chain, key = self.key_store.pem_credentials()
        return grpc.ssl_channel_credentials(
            root_certificates=root, private_key=key, certificate_chain=chain
        )

    def load_credentials(self) -> None:
        """Read the device's chain and key now (as a device does at boot), not on first call."""
        if self._credentials is None:
            self._credentials = self._make_credentials()

    def _on_state(self, state: grpc.ChannelConnectivity) -> None:
        if state is grpc.ChannelConnectivity.READY:
            self.handshakes += 1

    def _open_channel(self) -> grpc.Channel:
        if self._credentials is None:
            self._credentials = self._make_credentials()
        channel = grpc.secure_channel(
            f"{self.target.host}:{self.target.port}",
            self._credentials,
            options=[
                # The SNI and the name checked on the server certificate when connecting by
                # IP; :authority too, which the enforcer compares with the SNI.
                ("grpc.ssl_target_name_override", self.target.server_name),
                ("grpc.default_authority", self.target.server_name),
                # One attempt is one call on this channel's own connection.
                ("grpc.enable_retries", 0),
                ("grpc.use_local_subchannel_pool", 1),
                ("grpc.primary_user_agent", "mtls-testbed-device"),
            ],
        )
        # Subscribing starts grpcio's connectivity poller; try_to_connect here, not in a later
        # subscription, which the poller would only see at its next 0.2 s wake-up.
        channel.subscribe(self._on_state, try_to_connect=True)
        return channel

    @staticmethod
    def _close_channel(channel: grpc.Channel) -> None:
        channel.close()

    def _wait_ready(self, channel: grpc.Channel, timeout: float) -> bool:
        """Connect; True once READY, False at the first failure or the deadline."""
        settled = threading.Event()
        state: list[grpc.ChannelConnectivity] = []

        def watch(s: grpc.ChannelConnectivity) -> None:
            state.append(s)
            if s in (
                grpc.ChannelConnectivity.READY,
                grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                grpc.ChannelConnectivity.SHUTDOWN,
            ):
                settled.set()

        channel.subscribe(watch)
        try:
            settled.wait(timeout)
        finally:
            channel.unsubscribe(watch)
        return bool(state) and state[-1] is grpc.ChannelConnectivity.READY

    def _call(self, metadata: Sequence[tuple[str, str]], deadline: float) -> _Result:
        """Make one call (in a worker thread) and report what happened."""
        result = _Result()
        fresh = not self.options.keep_alive or self.options.always_new_handshake
        with self._lock:
            channel = None if fresh else self._grpc_channel
            if channel is None:
                channel = self._open_channel()
                result.new_channel = True
                if not fresh:
                    self._grpc_channel = channel
        try:
            start = time.perf_counter()
            if result.new_channel:
                result.ready = self._wait_ready(channel, max(0.0, deadline - start))
                if result.ready:
                    result.handshake = time.perf_counter() - start
            else:
                # A kept channel that is not READY now (IDLE after the GOAWAY of an application
                # with No Duration) connects again for this call. Asked here, synchronously:
                # the connectivity callbacks come late and can miss a READY that lasted only
                # one call.
                state = _connectivity(channel)
                result.reconnect = state is not None and state is not grpc.ChannelConnectivity.READY
            stub = telemetry.TelemetryStub(channel)
            self._sequence += 1
            sent = time.perf_counter()
            remaining = max(0.001, deadline - sent)
            try:
                if self.rpc == "report":
                    reading = telemetry.Reading(
                        device_id=self.device_id,
                        sequence=self._sequence,
                        timestamp=time.time(),
                        values={"temperature": 21.5},
                    )
                    future = stub.Report.future(reading, metadata=metadata, timeout=remaining)
                    future.result()
                    result.first_message = time.perf_counter() - sent
                    result.messages = 1
                    call: Any = future
                else:
                    request = telemetry.WatchRequest(
                        device_id=self.device_id, count=self.watch_messages
                    )
                    call = stub.Watch(request, metadata=metadata, timeout=remaining)
                    for _ in call:
                        if not result.messages:
                            result.first_message = time.perf_counter() - sent
                        result.messages += 1
                result.code = call.code()
                result.details = call.details() or ""
                result.initial = _pairs(call.initial_metadata())
                result.trailing = _pairs(call.trailing_metadata())
            except grpc.RpcError as exc:
                failed: Any = exc  # a grpc.Call as well
                result.code = failed.code()
                result.details = failed.details() or ""
                result.initial = _pairs(failed.initial_metadata())
                result.trailing = _pairs(failed.trailing_metadata())
                if not result.messages:
                    result.first_message = time.perf_counter() - sent
        finally:
            if fresh:
                self._close_channel(channel)
        return result

    # -- the device's side (trio) ------------------------------------------------------------------

    async def request(
        self,
        path: str = "/",
        *,
        method: str = "POST",
        body: bytes = b"",
        headers: Sequence[tuple[str, str]] = (),
    ) -> Attempt:
        """Make one telemetry call (this client's ``rpc``; path and method are the service's)."""
        start = trio.current_time()
        attempt = Attempt(outcome="timeout", protocol="grpc")
        metadata = [(k.lower(), v) for k, v in headers]
        cookie = self.cookie if self.options.reuse_cookie else None
        if cookie:
            metadata.append(("cookie", f"{COOKIE_NAME}={cookie}"))
            attempt.cookie_sent = True
        deadline = time.perf_counter() + self.options.timeout
        handshakes = self.handshakes
        try:
            result = await trio.to_thread.run_sync(
                self._call, metadata, deadline, limiter=self.limiter, abandon_on_cancel=True
            )
        except KeyStoreError as exc:
            attempt.outcome, attempt.error = f"key_store_error:{type(exc).__name__}", str(exc)
            attempt.timings.total = trio.current_time() - start
            return attempt
        self._fill(attempt, result)
        attempt.new_connection = (
            result.new_channel or result.reconnect or self.handshakes > handshakes
        )
        attempt.timings.total = trio.current_time() - start
        return attempt

    def _fill(self, attempt: Attempt, result: _Result) -> None:
        attempt.timings.handshake = result.handshake
        attempt.timings.first_byte = result.first_message
        code = result.code
        attempt.grpc_status = code.name if code is not None else None
        attempt.headers = result.initial + result.trailing
        attempt.body = str(result.messages).encode()
        reason = next((v for k, v in attempt.headers if k == "x-access-denied-reason"), None)
        if code is grpc.StatusCode.OK:
            attempt.status, attempt.outcome = 200, "allowed"
        elif code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            attempt.status = 200
            if reason is None and _REASON.fullmatch(result.details):
                reason = result.details
            attempt.reason = reason
            attempt.outcome = f"denied:{reason}" if reason else f"grpc_{code.name.lower()}"
            attempt.error = result.details or None
        elif code is grpc.StatusCode.DEADLINE_EXCEEDED:
            attempt.outcome, attempt.error = "timeout", result.details
        else:
            http = _HTTP_STATUS.search(result.details)
            if http is not None:
                attempt.status = int(http.group(1))
                attempt.reason = reason
                attempt.outcome = classify(attempt.status, reason)
            elif any(s in result.details for s in _REFUSED):
                attempt.outcome = "connect_error"
            else:
                name = code.name.lower() if code is not None else "unknown"
                attempt.outcome = f"grpc_{name}"
            attempt.error = result.details or None
        if attempt.outcome == "allowed" or attempt.reason:
            self._take_cookie(attempt)

    async def aclose(self) -> None:
        """Close the kept channel, if any."""
        with self._lock:
            channel, self._grpc_channel = self._grpc_channel, None
        if channel is not None:
            await trio.to_thread.run_sync(self._close_channel, channel)
