"""TCP for the enforcer's hot path: socket calls that wait only when they would block.

Why not ``trio.SocketStream``: it makes every send and receive a checkpoint, so a call that
did not block still yields to the scheduler and comes back through its run queue. A forwarded
mTLS request makes about fifteen such calls (accept, the handshake's flights, the request, the
origin hop, the response), and profiles of ``bench/handshakes.py`` showed trio's machinery as
the largest share of the enforcer's Python time. Here a call that succeeds returns at once;
one that would block waits in ``trio.lowlevel.wait_readable`` / ``wait_writable``, which are
checkpoints, so timeouts and cancellation work as before wherever a connection waits for its
peer. Every connection waits for its peer at least once per request (the handshake's second
flight, the next request), and the accept loop at every batch, so no task keeps the loop long.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger(__name__)
_RECEIVE_SIZE = 65536
# Out of descriptors or memory: trio.serve_listeners waits and retries, and so do we.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_BATCH = 64


class TCPStream(trio.abc.HalfCloseableStream):
    """A connected TCP socket as a trio stream, without a checkpoint on calls that succeed."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # not TCP (a Unix socket): nothing to tune
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self.socket = sock
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the connection was already closed")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data``, waiting only while the socket's buffer is full."""
        self._check_open()
        with memoryview(data) as view:
            sent = 0
            while sent < len(view):
                try:
                    sent += self.socket.send(view[sent:])
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self.socket)
                except OSError as exc:
                    raise trio.BrokenResourceError(f"connection lost: {exc}") from exc

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the socket can take more data."""
        self._check_open()
        await trio.lowlevel.wait_writable(self.socket)

    async def send_eof(self) -> None:
        """Shut down the sending side (TCP FIN)."""
        self._check_open()
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise trio.BrokenResourceError(f"connection lost: {exc}") from exc
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Return the bytes available (waiting for some); ``b""`` at the end of the stream."""
        self._check_open()
        while True:
            try:
                return self.socket.recv(max_bytes or _RECEIVE_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.socket)
            except OSError as exc:
                raise trio.BrokenResourceError(f"connection lost: {exc}") from exc

    async def aclose(self) -> None:
        """Close the socket (waking any task waiting on it)."""
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()
        await trio.lowlevel.checkpoint()


async def open_tcp(host: str, port: int) -> TCPStream:
    """Connect to ``host:port`` (trio's happy eyeballs) and return the connection as ours."""
    stream = await trio.open_tcp_stream(host, port)
    return TCPStream(socket.socket(fileno=stream.socket.detach()))


async def serve_tcp(
    listener: socket.socket,
    handler: Callable[[TCPStream], Awaitable[object]],
    nursery: trio.Nursery,
) -> None:
    """Accept connections on a listening socket until cancelled; one ``handler`` task each."""
    listener.setblocking(False)
    while True:
        # A checkpoint even when connections are queued: a busy listener still lets the
        # connections it started run. Then it takes what is queued, up to a batch.
        await trio.lowlevel.wait_readable(listener)
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno not in _RESOURCE_ERRNOS:
                    raise
                log.error("accept failed (%s): pausing for 100 ms", exc.strerror or exc)
                await trio.sleep(0.1)
                break
            nursery.start_soon(handler, TCPStream(conn))
