"""TCP for the enforcer's hot path: socket calls that wait only when they would block.

Why not ``trio.SocketStream``: it makes every send and receive a checkpoint, so a call that
did not block still yields to the scheduler and comes back through its run queue. A forwarded
mTLS request makes about fifteen such calls (accept, the handshake's flights, the request, the
origin hop, the response), and profiles of ``bench/handshakes.py`` showed trio's machinery as
the largest share of the enforcer's Python time. Here a call that succeeds usually returns at
once; one that would block waits in ``trio.lowlevel.wait_readable`` / ``wait_writable``, which
are checkpoints, so timeouts and cancellation work as before wherever a connection waits.

The fairness rule. trio's checkpoint on every call is what stops a peer that always has bytes
ready from keeping its task (and so the whole process) running forever. We keep that bound
with a budget per stream instead of a checkpoint per call: at most :data:`CALLS_PER_CHECKPOINT`
successful calls, or :data:`BYTES_PER_CHECKPOINT` bytes, between two checkpoints, whatever the
peer sends. A wait for the peer is a checkpoint and refills the budget, so a request that
waits for its peer at least once (every real one does) never pays for an extra checkpoint.
The checkpoint comes before a call, never after a successful receive, so a cancellation there
loses no bytes.

The accept loop checkpoints at every batch, keeps at most ``max_connections`` handlers running
(the rest wait in the kernel's backlog, as nginx's ``worker_connections`` do) and logs running
out of descriptors once, then at most one summary per :data:`ACCEPT_ERROR_LOG_INTERVAL`.

Lingering close (:func:`linger`, nginx's ``lingering_close``). Closing a TCP socket whose
receive queue still holds bytes, or that gets more afterwards, makes the kernel answer with a
reset; a client still sending its request body then sees its send fail, or loses the response
it had not read yet, instead of our last answer. So a server that answers and closes while the
peer may still be sending first shuts down its sending side, then reads and drops what comes,
bounded in bytes, in total time and in time between reads, and only then closes.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger(__name__)
_RECEIVE_SIZE = 65536
# Out of descriptors or memory: trio.serve_listeners waits and retries, and so do we.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_BATCH = 64
# A request of the hot path makes a handful of calls per stream and waits for its peer at
# least once, so these are never reached by it; a peer that always has bytes ready is.
CALLS_PER_CHECKPOINT = 16
BYTES_PER_CHECKPOINT = 256 * 1024
ACCEPT_ERROR_PAUSE = 0.1
ACCEPT_ERROR_LOG_INTERVAL = 10.0
# A lingering close ends at the peer's EOF, or after this long in all, or once the peer sent
# nothing for LINGER_IDLE (it has stopped sending: what it sent is drained). nginx's
# lingering_time / lingering_timeout are 30 s / 5 s for clients anywhere on the Internet;
# clients here are devices on the same network, which send what is left of a body within
# milliseconds, and a lingering connection still holds a connection slot.
LINGER_SECONDS = 2.0
LINGER_IDLE = 0.5
# Each read drops at most this much: what a lingering connection holds is never more.
_LINGER_READ = 16384


class TCPStream(trio.abc.HalfCloseableStream):
    """A connected TCP socket as a trio stream, with a checkpoint per bounded amount of work."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # not TCP (a Unix socket): nothing to tune
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self.socket = sock
        self._closed = False
        self._calls = 0
        self._bytes = 0

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the connection was already closed")

    async def _checkpoint(self) -> None:
        # The budget is spent: yield before the next call (inlined test at each call site, as
        # this is the hot path; the await happens once per budget at most).
        self._calls = self._bytes = 0
        await trio.lowlevel.checkpoint()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data``, waiting only while the socket's buffer is full."""
        self._check_open()
        with memoryview(data) as view:
            sent = 0
            while sent < len(view):
                if self._calls >= CALLS_PER_CHECKPOINT or self._bytes >= BYTES_PER_CHECKPOINT:
                    await self._checkpoint()
                self._calls += 1
                try:
                    n = self.socket.send(view[sent:])
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self.socket)
                    self._calls = self._bytes = 0  # the wait was a checkpoint
                    continue
                except OSError as exc:
                    raise trio.BrokenResourceError(f"connection lost: {exc}") from exc
                sent += n
                self._bytes += n

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the socket can take more data."""
        self._check_open()
        await trio.lowlevel.wait_writable(self.socket)
        self._calls = self._bytes = 0

    async def send_eof(self) -> None:
        """Shut down the sending side (TCP FIN)."""
        self._check_open()
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise trio.BrokenResourceError(f"connection lost: {exc}") from exc
        await trio.lowlevel.checkpoint()
        self._calls = self._bytes = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Return the bytes available (waiting for some); ``b""`` at the end of the stream."""
        self._check_open()
        if self._calls >= CALLS_PER_CHECKPOINT or self._bytes >= BYTES_PER_CHECKPOINT:
            await self._checkpoint()
        self._calls += 1
        while True:
            try:
                data = self.socket.recv(max_bytes or _RECEIVE_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.socket)
                self._calls, self._bytes = 1, 0  # the wait was a checkpoint
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"connection lost: {exc}") from exc
            self._bytes += len(data)
            return data

    async def aclose(self) -> None:
        """Close the socket (waking any task waiting on it)."""
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()
        await trio.lowlevel.checkpoint()


async def linger(
    stream: trio.abc.HalfCloseableStream,
    max_bytes: int,
    *,
    seconds: float | None = None,
    idle: float | None = None,
) -> None:
    """Stop sending, then drop what the peer still sends, within bounds; the caller closes."""
    seconds = LINGER_SECONDS if seconds is None else seconds
    idle = LINGER_IDLE if idle is None else idle
    # Every read is a checkpoint within the stream's budget (trio.SocketStream: always; ours:
    # every few calls), and the bytes are counted and dropped at once: a peer that keeps
    # sending costs at most ``max_bytes`` of reads and ``seconds`` of a connection slot.
    with trio.move_on_after(seconds):
        try:
            await stream.send_eof()
            discarded = 0
            while discarded < max_bytes:
                with trio.move_on_after(idle):
                    n = len(await stream.receive_some(_LINGER_READ))
                    if n:
                        discarded += n
                        continue
                return  # the peer's EOF, or it went quiet
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return  # it reset or closed first: nothing left to protect


async def open_tcp(host: str, port: int) -> TCPStream:
    """Connect to ``host:port`` (trio's happy eyeballs) and return the connection as ours."""
    stream = await trio.open_tcp_stream(host, port)
    return TCPStream(socket.socket(fileno=stream.socket.detach()))


class _AcceptErrors:
    """Rate-limited logging of failed accepts: the first at once, then a count per interval."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._last = -math.inf
        self._suppressed = 0
        self.failing = False  # since the last accept that worked

    def recovered(self) -> None:
        """An accept worked again: log the failures not logged yet, if any."""
        if self._suppressed:
            log.warning("accept works again after %d more failures", self._suppressed)
        self._suppressed = 0
        self.failing = False

    def failed(self, exc: OSError) -> None:
        """Log an accept that failed, or count it when one was logged less than an interval ago."""
        self.failing = True
        now = time.monotonic()
        if now - self._last < self._interval:
            self._suppressed += 1
            return
        if self._suppressed:
            log.error(
                "accept failed (%s) %d more times in the last %.1f s; pausing %d ms after each",
                exc.strerror or exc,
                self._suppressed,
                now - self._last,
                ACCEPT_ERROR_PAUSE * 1000,
            )
        else:
            log.error(
                "accept failed (%s): pausing for %d ms (further failures are counted and "
                "logged at most every %.1f s)",
                exc.strerror or exc,
                ACCEPT_ERROR_PAUSE * 1000,
                self._interval,
            )
        self._last = now
        self._suppressed = 0


async def serve_tcp(
    listener: socket.socket,
    handler: Callable[[TCPStream], Awaitable[object]],
    nursery: trio.Nursery,
    *,
    max_connections: int = 1024,
    error_log_interval: float = ACCEPT_ERROR_LOG_INTERVAL,
    on_accept_error: Callable[[], object] | None = None,
) -> None:
    """Accept connections until cancelled: a ``handler`` task each, ``max_connections`` at once."""
    if max_connections < 1:
        raise ValueError(f"max_connections must be at least 1, not {max_connections}")
    listener.setblocking(False)
    errors = _AcceptErrors(error_log_interval)
    active = 0
    room = trio.Event()

    async def run(conn: socket.socket) -> None:
        nonlocal active
        try:
            await handler(TCPStream(conn))
        finally:
            active -= 1
            room.set()

    while True:
        if active >= max_connections:
            # At the limit: accept nothing, so new connections wait in the kernel's listen
            # backlog (as with nginx's worker_connections) until a handler ends.
            room = trio.Event()
            await room.wait()
            continue
        # A checkpoint even when connections are queued: a busy listener still lets the
        # connections it started run. Then it takes what is queued, up to a batch.
        await trio.lowlevel.wait_readable(listener)
        for _ in range(min(_ACCEPT_BATCH, max_connections - active)):
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno not in _RESOURCE_ERRNOS:
                    raise
                errors.failed(exc)
                if on_accept_error is not None:
                    on_accept_error()
                await trio.sleep(ACCEPT_ERROR_PAUSE)
                break
            if errors.failing:
                errors.recovered()
            active += 1
            nursery.start_soon(run, conn)
