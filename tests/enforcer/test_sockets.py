"""The enforcer's own TCP stream and accept loop (enforcer/sockets.py), over real loopback.

They skip trio's checkpoint on most calls that do not block, so what must still hold is checked
where it would break: a peer that always has bytes ready still lets other tasks run (a
checkpoint every CALLS_PER_CHECKPOINT calls); a send larger than the socket buffers waits for a
slow reader and delivers every byte in order; a wait is still cancellable; a closed or reset
connection is a trio error, not a crash; the accept loop keeps at most max_connections
handlers, survives running out of file descriptors and says so once, not every 100 ms.
"""

from __future__ import annotations

import functools
import re
import socket
import subprocess
import sys
import textwrap

import pytest
import trio

from enforcer.sockets import CALLS_PER_CHECKPOINT, TCPStream, open_tcp, serve_tcp

BIG = 8 * 1024 * 1024


async def _listening() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, sock.getsockname()[1]


class Ticker:
    """A task that counts the checkpoints it is given, to see whether another task yields."""

    def __init__(self) -> None:
        self.ticks = 0
        self._last = 0
        self._run = 0
        self.longest = 0  # the most calls seen in a row without a tick

    async def run(self) -> None:
        while True:
            self.ticks += 1
            await trio.lowlevel.checkpoint()

    def call_done(self) -> None:
        self._run = self._run + 1 if self.ticks == self._last else 0
        self._last = self.ticks
        self.longest = max(self.longest, self._run)


@pytest.mark.parametrize("direction", ["receive", "send"])
async def test_calls_that_never_block_still_reach_a_checkpoint(direction: str) -> None:
    # Bytes already buffered (or buffer room to spare): no call blocks, so without a budget
    # the task would never yield and a peer could keep the whole process busy. The ticker
    # runs once per scheduler batch, before or after the stream's task: between two ticks the
    # task may make up to two budgets of calls.
    count = 2000
    listener, port = await _listening()
    ticker = Ticker()
    done = trio.Event()

    async def handler(stream: TCPStream) -> None:
        try:
            for _ in range(count):
                if direction == "receive":
                    assert await stream.receive_some(1)
                else:
                    await stream.send_all(b"x")
                ticker.call_done()
        finally:
            await stream.aclose()
            done.set()

    with socket.create_connection(("127.0.0.1", port)) as client:
        if direction == "receive":
            client.sendall(b"x" * count)  # in the server's receive buffer before it reads
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ticker.run)
                nursery.start_soon(serve_tcp, listener, handler, nursery)
                await done.wait()
                nursery.cancel_scope.cancel()
    listener.close()
    assert ticker.longest <= 2 * CALLS_PER_CHECKPOINT + 1


async def test_at_max_connections_the_next_waits_until_one_closes() -> None:
    listener, port = await _listening()
    served: list[int] = []

    async def handler(stream: TCPStream) -> None:
        try:
            served.append(len(served))
            await stream.send_all(b"hi")
            while await stream.receive_some():  # until the client closes
                pass
        finally:
            await stream.aclose()

    def connect() -> socket.socket:
        return socket.create_connection(("127.0.0.1", port), timeout=10)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            functools.partial(serve_tcp, max_connections=2), listener, handler, nursery
        )
        first, second = connect(), connect()
        with trio.fail_after(10):
            assert await trio.to_thread.run_sync(first.recv, 2) == b"hi"
            assert await trio.to_thread.run_sync(second.recv, 2) == b"hi"
        third = connect()  # the kernel completes it: it waits in the listen backlog
        await trio.sleep(0.3)
        assert len(served) == 2  # not accepted while two handlers run
        first.close()
        with trio.fail_after(10):
            assert await trio.to_thread.run_sync(third.recv, 2) == b"hi"
        assert len(served) == 3
        for c in (second, third):
            c.close()
        nursery.cancel_scope.cancel()
    listener.close()


async def test_a_send_larger_than_the_buffers_waits_for_a_slow_reader() -> None:
    payload = bytes(range(256)) * (BIG // 256)
    listener, port = await _listening()

    async def handler(stream: TCPStream) -> None:
        await stream.send_all(payload)  # far more than loopback buffers hold: it must wait
        await stream.aclose()

    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_tcp, listener, handler, nursery)
        client = await open_tcp("127.0.0.1", port)
        while chunk := await client.receive_some(65536):
            received += chunk
            if len(received) < 1024 * 1024:
                await trio.sleep(0.001)  # slow at first, so the server's sends block
        await client.aclose()
        nursery.cancel_scope.cancel()
    listener.close()
    assert received == payload


async def test_a_wait_for_data_is_cancellable_and_close_wakes_it() -> None:
    listener, port = await _listening()
    accepted: list[TCPStream] = []

    async def handler(stream: TCPStream) -> None:
        accepted.append(stream)
        try:
            await trio.sleep_forever()
        finally:
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_tcp, listener, handler, nursery)
        client = await open_tcp("127.0.0.1", port)
        with trio.move_on_after(0.2) as scope:
            await client.receive_some()  # the server never sends
        assert scope.cancelled_caught

        async def reader() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await client.receive_some()

        nursery.start_soon(reader)
        await trio.sleep(0.05)
        await client.aclose()  # wakes the reader with ClosedResourceError
        with pytest.raises(trio.ClosedResourceError):
            await client.send_all(b"x")
        nursery.cancel_scope.cancel()
    listener.close()


async def test_a_reset_connection_is_a_broken_resource() -> None:
    listener, port = await _listening()
    done = trio.Event()
    errors: list[BaseException] = []

    async def handler(stream: TCPStream) -> None:
        try:
            while await stream.receive_some():
                pass
            while True:  # the peer reset: sends fail with a trio error
                await stream.send_all(b"x" * 65536)
        except trio.BrokenResourceError as exc:
            errors.append(exc)
        finally:
            await stream.aclose()
            done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_tcp, listener, handler, nursery)
        client = socket.create_connection(("127.0.0.1", port))
        # SO_LINGER 0: close() sends RST instead of FIN.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.close()
        with trio.fail_after(10):
            await done.wait()
        nursery.cancel_scope.cancel()
    listener.close()
    assert errors and "connection lost" in str(errors[0])


@pytest.mark.parametrize("log_interval", [10.0, 0.2])
def test_the_accept_loop_survives_running_out_of_descriptors(log_interval: float) -> None:
    # In a process of its own, with a low descriptor limit: clients exhaust it (EMFILE on
    # accept), the loop pauses instead of crashing, and once they leave it serves again.
    # It logs the first failure, then at most a summary per interval (before: a line every
    # 100 ms for as long as descriptors ran out).
    script = textwrap.dedent(
        """
        import functools, resource, socket, trio
        from enforcer.sockets import TCPStream, serve_tcp

        async def handler(stream: TCPStream) -> None:
            try:
                await stream.send_all(b"hi")
                await stream.receive_some()
            except trio.BrokenResourceError:
                pass  # a client that left while the server could not accept it
            finally:
                await stream.aclose()

        async def main() -> None:
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(256)
            port = listener.getsockname()[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    functools.partial(serve_tcp, error_log_interval=LOG_INTERVAL),
                    listener,
                    handler,
                    nursery,
                )
                clients = []
                for _ in range(20):  # the client sockets count against the limit too
                    clients.append(socket.create_connection(("127.0.0.1", port)))
                while True:  # connect until this process has no descriptor left
                    try:
                        clients.append(socket.create_connection(("127.0.0.1", port)))
                    except OSError:
                        break
                    await trio.sleep(0)  # the server accepts what it can
                # One more connection, on a descriptor freed for it: the kernel completes it,
                # and the server, with none left, must fail to accept it (EMFILE).
                clients.pop().close()
                clients.append(socket.create_connection(("127.0.0.1", port)))
                await trio.sleep(1.0)  # the loop hit EMFILE, paused and retried ~10 times
                for c in clients:
                    c.close()
                await trio.sleep(0.3)
                def fresh_client() -> bytes:
                    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                        return c.recv(2)

                # In a thread: a blocking call here would stop the server's loop too.
                assert await trio.to_thread.run_sync(fresh_client) == b"hi", "not serving"
                nursery.cancel_scope.cancel()
            print("served after EMFILE")

        trio.run(main)
        """
    )
    script = f"LOG_INTERVAL = {log_interval}\n" + script
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "served after EMFILE" in out.stdout
    lines = [line for line in out.stderr.splitlines() if "accept failed" in line]
    assert lines  # it did run out, and said so
    if log_interval > 5:
        assert len(lines) == 1, lines  # the second of EMFILE fits inside one interval
    else:
        # About a second of failures every 100 ms: summaries that count those not logged.
        counts = [int(m) for m in re.findall(r"(\d+) more times", out.stderr)]
        assert counts, lines
