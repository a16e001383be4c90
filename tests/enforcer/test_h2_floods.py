"""HTTP/2 floods over real TLS against a served enforcer: the attacker is stopped, others served.

Each test serves the demo configuration with a counting origin, runs one flood (testbed/h2floods)
on one TLS connection with ALPN h2 and a valid client certificate, and meanwhile sends good
HTTP/2 and HTTP/1.1 requests on other connections. Assertions are on codes, counts and success,
never on time.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as dt
import io
import json
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h11
import pytest
import trio
from h2.errors import ErrorCodes
from hpack import Encoder
from hyperframe.frame import RstStreamFrame

from enforcer.accesslog import AccessLog
from enforcer.clock import FixedClock
from enforcer.config import load_config
from enforcer.http import next_event, read_body, respond
from enforcer.server import Enforcer, open_listener, serve
from testbed.demo import AUTH_HOST, DemoLayout
from testbed.h2floods import FloodWriter, FrameReader, ServerAnswer
from tests.wire import client_context, get

GOOD = "/good"
ATTACK = "/attack"
HOLD = "/hold"  # the origin holds these requests until the test ends


@dataclasses.dataclass
class Bed:
    """A served enforcer whose origin counts the requests it sees, per path."""

    port: int
    layout: DemoLayout
    seen: collections.Counter[str]
    log_buffer: io.StringIO
    changed: trio.Event  # set (and replaced) whenever the origin sees a request

    def ctx(self, alpn: list[str] | None = None) -> ssl.SSLContext:
        cert, key = self.layout.device("valid")
        ctx = client_context(self.layout.edge_ca, cert, key)
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx

    def floods(self) -> list[dict[str, Any]]:
        """The access log's ``h2_flood`` events."""
        lines = [json.loads(line) for line in self.log_buffer.getvalue().splitlines()]
        return [r for r in lines if r.get("event") == "h2_flood"]


async def _counting_origin(bed: list[Bed], stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = await next_event(conn, stream)
            if not isinstance(event, h11.Request):
                return
            path = event.target.decode().split("?")[0]
            bed[0].seen[path] += 1
            bed[0].changed.set()
            bed[0].changed = trio.Event()
            if path == HOLD:
                await trio.sleep_forever()
            await read_body(conn, stream, 1 << 20)
            await respond(conn, stream, 200, [("content-type", "text/plain")], b"ok\n")
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    except (h11.ProtocolError, trio.BrokenResourceError, OSError):
        return
    finally:
        await stream.aclose()


@pytest.fixture
async def bed_for(
    nursery: trio.Nursery, demo: DemoLayout, tmp_path: Path
) -> Callable[..., Awaitable[Bed]]:
    """Return an async function serving the demo config (``[server]`` overrides as keywords)."""

    async def start(**server: object) -> Bed:
        box: list[Bed] = []
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        origin_port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, lambda s: _counting_origin(box, s), listeners)
        cfg = load_config(demo.config)
        origin = f"http://127.0.0.1:{origin_port}"
        cfg = dataclasses.replace(
            cfg,
            applications=tuple(dataclasses.replace(a, origin=origin) for a in cfg.applications),
            server=dataclasses.replace(cfg.server, **server),  # type: ignore[arg-type]
        )
        buffer = io.StringIO()
        clock = FixedClock(dt.datetime.now(dt.UTC))
        enforcer = Enforcer(cfg, clock, AccessLog(buffer), state_path=tmp_path / "state.sqlite")
        listener = await open_listener("127.0.0.1", 0)
        port = await nursery.start(serve, enforcer, listener)
        box.append(
            Bed(port, DemoLayout(demo.root, port), collections.Counter(), buffer, trio.Event())
        )
        return box[0]

    return start


async def open_h2(bed: Bed) -> trio.SSLStream[trio.SocketStream]:
    """A TLS connection to the enforcer that negotiated h2, with the valid device's certificate."""
    tcp = await trio.open_tcp_stream("127.0.0.1", bed.port)
    tls = trio.SSLStream(tcp, bed.ctx(["h2"]), server_hostname=AUTH_HOST)
    await tls.do_handshake()
    assert tls.selected_alpn_protocol() == "h2"
    return tls


async def h2_requests(bed: Bed, n: int, path: str = GOOD) -> list[int]:
    """``n`` GETs on one HTTP/2 connection made with the h2 library (a well-behaved client)."""
    tls = await open_h2(bed)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    statuses: dict[int, int] = {}
    ended: set[int] = set()
    ids = []
    for _ in range(n):
        sid = conn.get_next_available_stream_id()
        ids.append(sid)
        headers = [(":method", "GET"), (":scheme", "https"), (":authority", AUTH_HOST)]
        conn.send_headers(sid, [*headers, (":path", path)], end_stream=True)
    await tls.send_all(conn.data_to_send())
    with trio.fail_after(30):
        while len(ended) < n:
            data = await tls.receive_some(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    assert event.stream_id is not None and event.headers is not None
                    statuses[event.stream_id] = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    assert event.stream_id is not None and event.data is not None
                    conn.acknowledge_received_data(len(event.data), event.stream_id)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    assert event.stream_id is not None
                    ended.add(event.stream_id)
            await tls.send_all(conn.data_to_send())
    await tls.aclose()
    return [statuses.get(i, 0) for i in ids]


@dataclasses.dataclass
class Attack:
    """What one flood connection sent and what the enforcer answered."""

    batches: int
    answer: ServerAnswer


async def flood(
    bed: Bed,
    batch: Callable[[FloodWriter], bytes],
    *,
    prelude: Callable[[FloodWriter], bytes] = lambda w: b"",
    max_batches: int = 2000,
    done: Callable[[ServerAnswer], bool] = lambda a: a.goaway is not None,
) -> Attack:
    """Send ``batch(writer)`` over and over until ``done`` (GOAWAY), or the enforcer closes."""
    tls = await open_h2(bed)
    writer = FloodWriter(AUTH_HOST, ATTACK)
    reader = FrameReader()
    sent = 0
    stopped = trio.Event()

    async def read() -> None:
        try:
            while not stopped.is_set():
                data = await tls.receive_some(65536)
                reader.feed(data)
                if not data or done(reader.answer):
                    break
        except trio.BrokenResourceError:
            reader.answer.closed = True
        stopped.set()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            try:
                await tls.send_all(writer.opening() + prelude(writer))
                while not stopped.is_set() and sent < max_batches:
                    await tls.send_all(batch(writer))
                    sent += 1
                    await trio.lowlevel.checkpoint()  # let the reader see a GOAWAY
            except trio.BrokenResourceError:
                pass  # the enforcer closed the connection under us
            await stopped.wait()
    with trio.move_on_after(2):
        await tls.aclose()
    return Attack(sent, reader.answer)


async def good_traffic(bed: Bed, results: list[int]) -> None:
    """Good clients: HTTP/2 with several streams, and HTTP/1.1, each on its own connection."""
    for _ in range(3):
        results.extend(await h2_requests(bed, 4))
        response = await get(bed.port, AUTH_HOST, bed.ctx(), path=GOOD)
        results.append(response.status)


async def attacked(bed: Bed, attack: Callable[[], Awaitable[Attack]]) -> tuple[Attack, list[int]]:
    """Run ``attack`` with good traffic beside it and after it; return both outcomes."""
    results: list[int] = []
    box: list[Attack] = []

    async def run_attack() -> None:
        box.append(await attack())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_attack)
        nursery.start_soon(good_traffic, bed, results)
    await good_traffic(bed, results)  # and the enforcer still serves once it is over
    return box[0], results


def assert_calmed(attack: Attack, reason: str, bed: Bed, results: list[int]) -> dict[str, Any]:
    """The attacker got GOAWAY(ENHANCE_YOUR_CALM) for ``reason``; every good request got 200."""
    assert attack.answer.goaway == ErrorCodes.ENHANCE_YOUR_CALM, attack
    assert attack.batches < 2000  # stopped long before the attacker ran out
    assert results == [200] * 30
    assert bed.seen[GOOD] == 30
    [record] = bed.floods()
    assert record["reason"] == reason
    return record


async def test_rapid_reset_is_stopped_and_the_origin_barely_sees_it(
    bed_for: Callable[..., Awaitable[Bed]],
) -> None:
    bed = await bed_for(h2_premature_reset_streams=100, h2_max_control_frames_per_second=100_000)
    attack, results = await attacked(bed, lambda: flood(bed, lambda w: w.rapid_reset(5)))
    record = assert_calmed(attack, "h2_rapid_reset", bed, results)
    # Stopped at the 100th reset stream, whatever the timing: h2 never saw a later one ...
    assert record["streams"] == 100
    assert attack.answer.last_stream_id is not None and attack.answer.last_stream_id < 200
    # ... and the origin saw no more requests than that (the resets cancel most before).
    assert bed.seen[ATTACK] <= 100


async def test_resets_after_the_origin_got_the_request_are_bounded(
    bed_for: Callable[..., Awaitable[Bed]],
) -> None:
    """The costly rapid reset: each reset comes once the origin is working on the request."""
    bed = await bed_for(h2_max_control_frames_per_second=100_000)
    tls = await open_h2(bed)
    writer, reader = FloodWriter(AUTH_HOST, HOLD), FrameReader()
    await tls.send_all(writer.opening())

    ended = trio.Event()  # GOAWAY or close

    async def read() -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            while (data := await tls.receive_some(65536)) and reader.answer.goaway is None:
                reader.feed(data)
        ended.set()

    async def first(*events: trio.Event) -> None:
        async with trio.open_nursery() as race:
            for event in events:

                async def wait(event: trio.Event = event) -> None:
                    await event.wait()
                    race.cancel_scope.cancel()

                race.start_soon(wait)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            for _ in range(300):
                changed = bed.changed
                stream_id = writer.next_stream
                try:
                    await tls.send_all(writer.requests(1))
                    await first(changed, ended)  # the origin has the request: reset it
                    if ended.is_set():
                        break
                    await tls.send_all(RstStreamFrame(stream_id, error_code=8).serialize())
                except trio.BrokenResourceError:
                    break
            nursery.cancel_scope.cancel()
    with trio.move_on_after(2):
        await tls.aclose()
    assert reader.answer.goaway == ErrorCodes.ENHANCE_YOUR_CALM, reader.answer
    [record] = bed.floods()
    assert record["reason"] == "h2_rapid_reset" and record["streams"] == 100
    assert bed.seen[HOLD] == 100  # 300 without the guard (max_requests_per_connection: 1000)
    assert await h2_requests(bed, 2) == [200, 200]


async def test_rapid_reset_in_large_writes_is_stopped_by_the_streams_per_read_bound(
    bed_for: Callable[..., Awaitable[Bed]],
) -> None:
    # Only nginx's bound is left: 2 x 16 streams per read, whatever the reset share or rate.
    bed = await bed_for(
        h2_max_concurrent_streams=16,
        h2_premature_reset_streams=1_000_000,
        h2_max_control_frames_per_second=100_000,
    )
    attack, results = await attacked(bed, lambda: flood(bed, lambda w: w.rapid_reset(1000)))
    record = assert_calmed(attack, "h2_stream_flood", bed, results)
    # Cut within the attacker's first write of 1000 streams, however the reads split it (33
    # when the first read holds more than 32).
    assert record["streams"] < 1000
    assert bed.seen[ATTACK] < 1000


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("ping", "h2_control_frame_flood"),
        ("settings", "h2_control_frame_flood"),
        ("priority", "h2_control_frame_flood"),
        ("window_update", "h2_window_update_flood"),
    ],
)
async def test_control_frame_floods_are_stopped(
    bed_for: Callable[..., Awaitable[Bed]], kind: str, reason: str
) -> None:
    bed = await bed_for()
    make: dict[str, Callable[[FloodWriter], bytes]] = {
        "ping": lambda w: w.pings(10),
        "settings": lambda w: w.settings(10),
        "priority": lambda w: w.priority(10),
        "window_update": lambda w: w.window_updates(10),
    }
    attack, results = await attacked(bed, lambda: flood(bed, make[kind]))
    assert_calmed(attack, reason, bed, results)


async def test_a_continuation_flood_is_stopped(bed_for: Callable[..., Awaitable[Bed]]) -> None:
    bed = await bed_for()
    opened: list[int] = []

    def prelude(w: FloodWriter) -> bytes:
        sid, data = w.open_header_block()
        opened.append(sid)
        return data

    attack, results = await attacked(
        bed, lambda: flood(bed, lambda w: w.continuations(opened[0], 4, 100), prelude=prelude)
    )
    assert_calmed(attack, "h2_continuation_flood", bed, results)
    assert bed.seen[ATTACK] == 0


async def test_a_header_block_over_max_header_bytes_is_stopped(
    bed_for: Callable[..., Awaitable[Bed]],
) -> None:
    bed = await bed_for()
    opened: list[int] = []

    def prelude(w: FloodWriter) -> bytes:
        sid, data = w.open_header_block()
        opened.append(sid)
        return data

    attack, results = await attacked(
        bed, lambda: flood(bed, lambda w: w.continuations(opened[0], 1, 8000), prelude=prelude)
    )
    assert_calmed(attack, "h2_header_block_too_large", bed, results)


@pytest.mark.parametrize("kind", ["empty_data", "empty_headers"])
async def test_empty_frame_floods_are_stopped(
    bed_for: Callable[..., Awaitable[Bed]], kind: str
) -> None:
    bed = await bed_for()
    opened: list[int] = []

    def prelude(w: FloodWriter) -> bytes:
        if kind == "empty_headers":
            return b""
        sid, data = w.open_stream()
        opened.append(sid)
        return data

    def batch(w: FloodWriter) -> bytes:
        return w.empty_data(opened[0], 10) if kind == "empty_data" else w.empty_headers(10)

    attack, results = await attacked(bed, lambda: flood(bed, batch, prelude=prelude))
    assert_calmed(attack, "h2_empty_frames", bed, results)


async def test_streams_over_max_concurrent_streams_are_refused(
    bed_for: Callable[..., Awaitable[Bed]],
) -> None:
    bed = await bed_for(h2_max_concurrent_streams=4)
    # Streams whose request bodies never come stay open; the fifth is one too many.
    attack = await flood(bed, lambda w: w.open_stream()[1], max_batches=5)
    assert attack.answer.server_settings[0x3] == 4  # SETTINGS_MAX_CONCURRENT_STREAMS
    refused = attack.answer.resets.get(9) in (ErrorCodes.REFUSED_STREAM, ErrorCodes.PROTOCOL_ERROR)
    assert refused or attack.answer.goaway == ErrorCodes.PROTOCOL_ERROR, attack
    assert await h2_requests(bed, 4) == [200] * 4


async def test_header_lists_over_max_header_bytes_are_refused(
    bed_for: Callable[..., Awaitable[Bed]],
) -> None:
    bed = await bed_for(max_header_bytes=16 * 1024)
    # Within the limit: served.
    attack = await flood(
        bed, lambda w: w.big_header(10_000)[1], max_batches=1, done=lambda a: 1 in a.statuses
    )
    assert attack.answer.statuses == {1: 200}, attack
    # Over it, as sent (20 KB of header block) or once decompressed (an HPACK bomb: one 4 KB
    # header indexed once and repeated by reference): the connection ends, the server serves on.
    attack = await flood(bed, lambda w: w.big_header(20_000)[1], max_batches=1)
    assert attack.answer.goaway == ErrorCodes.ENHANCE_YOUR_CALM, attack
    assert 1 not in attack.answer.statuses

    def bomb(w: FloodWriter) -> bytes:
        from hyperframe.frame import HeadersFrame

        base = [(":method", "GET"), (":scheme", "https"), (":authority", AUTH_HOST)]
        block = w.encoder.encode([*base, (":path", ATTACK)] + [("x-bomb", "b" * 4000)] * 8)
        assert len(block) < 5000
        return HeadersFrame(1, block, flags=["END_HEADERS", "END_STREAM"]).serialize()

    attack = await flood(bed, bomb, max_batches=1)
    assert attack.answer.goaway == ErrorCodes.ENHANCE_YOUR_CALM, attack
    assert bed.seen[ATTACK] == 1  # the request within the limit, only
    assert await h2_requests(bed, 2) == [200, 200]


async def test_an_hpack_table_larger_than_advertised_is_refused(
    bed_for: Callable[..., Awaitable[Bed]],
) -> None:
    bed = await bed_for(h2_header_table_size=4096)

    def oversized(w: FloodWriter) -> bytes:
        w.encoder = Encoder()
        w.encoder.header_table_size = 65536  # announces a table 16 times what we allow
        return w.requests(1)

    attack = await flood(bed, oversized, max_batches=1)
    assert attack.answer.server_settings[0x1] == 4096  # SETTINGS_HEADER_TABLE_SIZE
    # h2 reports the HPACK error as PROTOCOL_ERROR (RFC 9113 would allow COMPRESSION_ERROR).
    assert attack.answer.goaway in (ErrorCodes.PROTOCOL_ERROR, ErrorCodes.COMPRESSION_ERROR)
    assert await h2_requests(bed, 1) == [200]
