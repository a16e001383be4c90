"""A simulated network link for virtual runs: bytes arrive half a round trip after they are sent.

On trio's MockClock an in-memory stream delivers instantly, so a virtual run would measure
only its simulated key-store costs. :func:`link_pair` gives two stream ends in which every
flight (one ``send_all``) is delivered to the other end one-way delay later, in order, as TCP
would: the sender never waits for it, the receiver sleeps until it is due (on the MockClock
that costs no wall time). The one-way delay is ``(rtt + u) / 2`` with ``u`` drawn uniformly
in ``[-jitter, +jitter]`` from the caller's seeded generator.
"""

from __future__ import annotations

import collections
import dataclasses
import random

import trio
import trio.lowlevel


@dataclasses.dataclass(frozen=True)
class Network:
    """Round-trip time and its jitter, in seconds (0: deliver at once, as before)."""

    rtt: float = 0.0
    jitter: float = 0.0

    def one_way(self, rng: random.Random) -> float:
        """One flight's delay: half a round trip, give or take half the jitter."""
        if self.jitter:
            return max(0.0, (self.rtt + rng.uniform(-self.jitter, self.jitter)) / 2)
        return self.rtt / 2


class _Pipe:
    """One direction: flights stamped with the time they are due, in sending order."""

    def __init__(self) -> None:
        self.flights: collections.deque[tuple[float, bytearray]] = collections.deque()
        self.eof = False  # the sender closed; its EOF is the last flight
        self.reader_closed = False
        self.lot = trio.lowlevel.ParkingLot()

    def put(self, due: float, data: bytes) -> None:
        # Never before the previous flight: bytes on one connection stay in order.
        last = self.flights[-1][0] if self.flights else 0.0
        self.flights.append((max(due, last), bytearray(data)))
        self.lot.unpark_all()


class LinkStream(trio.abc.Stream):
    """One end of a simulated link (see :func:`link_pair`)."""

    def __init__(self, send: _Pipe, receive: _Pipe, network: Network, rng: random.Random) -> None:
        self._send, self._receive = send, receive
        self._network, self._rng = network, rng
        self._closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Queue one flight for delivery a one-way delay from now."""
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise trio.ClosedResourceError("this end of the link is closed")
        if self._send.reader_closed:
            # As a kernel takes bytes for a peer that has closed: the sender learns it from
            # the EOF it reads, after the flights already on their way (a server's last
            # response, then its close), not from this send.
            return
        if data:
            self._send.put(trio.current_time() + self._network.one_way(self._rng), bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        """Sending never blocks: the link buffers."""
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """The next bytes once they are due; b"" after the other end closed."""
        pipe = self._receive
        while True:
            if self._closed:
                raise trio.ClosedResourceError("this end of the link is closed")
            if pipe.flights:
                due, data = pipe.flights[0]
                await trio.sleep_until(due)
                if self._closed:
                    raise trio.ClosedResourceError("this end of the link is closed")
                if data is _EOF_MARK:
                    return b""
                n = len(data) if max_bytes is None else min(max_bytes, len(data))
                chunk = bytes(data[:n])
                del data[:n]
                if not data:
                    pipe.flights.popleft()
                return chunk
            await pipe.lot.park()

    async def aclose(self) -> None:
        """Close this end: the other end reads EOF a one-way delay later."""
        if not self._closed:
            self._closed = True
            self._receive.reader_closed = True
            self._receive.lot.unpark_all()
            if not self._send.eof:
                self._send.eof = True
                due = trio.current_time() + self._network.one_way(self._rng)
                last = self._send.flights[-1][0] if self._send.flights else 0.0
                self._send.flights.append((max(due, last), _EOF_MARK))
                self._send.lot.unpark_all()
        await trio.lowlevel.checkpoint()


_EOF_MARK = bytearray()  # identity-compared: an empty flight is never queued otherwise


def link_pair(network: Network, rng: random.Random) -> tuple[LinkStream, LinkStream]:
    """Two connected ends of a simulated link: (client, server)."""
    up, down = _Pipe(), _Pipe()
    return LinkStream(up, down, network, rng), LinkStream(down, up, network, rng)
