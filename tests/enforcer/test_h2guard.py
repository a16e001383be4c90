"""The HTTP/2 flood guard on real frame bytes, with a clock the tests move."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import given
from hypothesis import strategies as st

from enforcer.config import ConfigError, load_config
from enforcer.h2guard import (
    MAX_CONTINUATION_FRAMES,
    PREFACE,
    FloodGuard,
    H2Limits,
    Verdict,
)
from testbed.demo import DemoLayout
from testbed.h2floods import KINDS, FloodWriter

BLOCK = b"\x82\x87\x84"  # :method GET, :scheme https, :path / (HPACK static table)


class Clock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def wire(frames: Iterable[Frame]) -> bytes:
    return b"".join(f.serialize() for f in frames)


def request(stream_id: int, end_stream: bool = True) -> HeadersFrame:
    flags = ["END_HEADERS", "END_STREAM"] if end_stream else ["END_HEADERS"]
    return HeadersFrame(stream_id, BLOCK, flags=flags)


def answer(stream_id: int) -> bytes:
    """The enforcer's response frames for a stream: HEADERS then DATA with END_STREAM."""
    return wire([HeadersFrame(stream_id, b"\x88", flags=["END_HEADERS"]),
                 DataFrame(stream_id, b"ok", flags=["END_STREAM"])])  # fmt: skip


def opening() -> bytes:
    return PREFACE + wire([SettingsFrame(0, {SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})])


def guard(clock: Clock | None = None, **limits: int) -> FloodGuard:
    g = FloodGuard(H2Limits(**limits), clock or Clock())
    assert g.received(opening()) is None
    return g


def feed_frames(g: FloodGuard, frames: Iterable[Frame]) -> tuple[int, Verdict | None]:
    """Feed frames one read each; return how many went in and the verdict, if any."""
    n = 0
    for f in frames:
        n += 1
        verdict = g.received(f.serialize())
        if verdict is not None:
            return n, verdict
    return n, None


def test_a_good_client_is_never_stopped() -> None:
    clock = Clock()
    g = guard(clock, max_control_frames_per_second=10)
    for i in range(1, 2000, 2):
        assert g.received(wire([request(i), WindowUpdateFrame(0, window_increment=100)])) is None
        g.sent(answer(i))
        clock.t += 0.01
    assert g.counts.streams_opened == 1000
    assert g.counts.premature_resets == 0


def test_rapid_reset_is_stopped_after_the_configured_number_of_streams() -> None:
    g = guard(max_control_frames_per_second=100_000, premature_reset_streams=50)
    frames = (f for i in range(1, 10_000, 2) for f in (request(i), RstStreamFrame(i)))
    n, verdict = feed_frames(g, frames)
    assert verdict is not None
    assert verdict.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert verdict.reason == "h2_rapid_reset"
    assert n == 100  # 50 HEADERS and 50 RST_STREAM: the 50th reset ends it
    assert g.counts.streams_opened == 50
    # Once decided, every later read gets the same verdict.
    assert g.received(request(10_001).serialize()) is verdict


def test_rapid_reset_in_one_read_is_stopped_by_the_per_read_stream_limit() -> None:
    g = guard(max_concurrent_streams=10, premature_reset_streams=1_000_000)
    data = wire(f for i in range(1, 200, 2) for f in (request(i), RstStreamFrame(i)))
    verdict = g.received(data)
    assert verdict is not None and verdict.reason == "h2_stream_flood"
    assert g.counts.streams_opened == 21


def test_resets_of_answered_or_old_streams_are_not_premature() -> None:
    clock = Clock()
    g = guard(clock, max_control_frames_per_second=100_000, premature_reset_streams=10)
    for i in range(1, 400, 2):
        assert g.received(request(i, end_stream=False).serialize()) is None
        if i % 4 == 1:
            g.sent(answer(i))  # answered, then reset: a client cancelling late
        else:
            clock.t += 1.0  # reset a second after opening: a long call cancelled
        assert g.received(RstStreamFrame(i).serialize()) is None
    assert g.counts.premature_resets == 0


def test_half_the_streams_reset_is_tolerated_more_is_not() -> None:
    g = guard(max_control_frames_per_second=100_000, premature_reset_streams=10)
    for i in range(1, 200, 4):  # one stream answered, the next reset at once
        assert g.received(request(i).serialize()) is None
        g.sent(answer(i))
        assert g.received(wire([request(i + 2), RstStreamFrame(i + 2)])) is None
    verdict = g.received(wire([request(1001), RstStreamFrame(1001)]))
    assert verdict is not None and verdict.reason == "h2_rapid_reset"


@pytest.mark.parametrize(
    "flood",
    [
        lambda i: PingFrame(0, opaque_data=i.to_bytes(8, "big")),
        lambda i: SettingsFrame(0, {}),
        lambda i: PriorityFrame(1, depends_on=0, stream_weight=15),
        lambda i: RstStreamFrame(2 * i + 1),
    ],
    ids=["ping", "settings", "priority", "rst_stream"],
)
def test_control_frames_are_limited_per_second(flood: Callable[[int], Frame]) -> None:
    clock = Clock()
    g = guard(clock, max_control_frames_per_second=100, premature_reset_streams=1_000_000)
    # At the allowed rate the peer is never stopped ...
    for i in range(1000):
        assert g.received(flood(i).serialize()) is None
        g.sent(b"")  # the acknowledgements were written
        clock.t += 0.01
    # ... but a burst beyond one second's allowance is.
    clock.t += 1.0
    n, verdict = feed_frames(g, (flood(i) for i in range(1000, 10_000)))
    assert verdict is not None
    assert verdict.reason == "h2_control_frame_flood"
    assert verdict.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert n == 101


def test_acknowledgements_owed_to_a_peer_that_does_not_read_are_bounded() -> None:
    g = guard(max_control_frames_per_second=100_000, max_outbound_control_frames=30)
    g.sent(b"")  # the SETTINGS ACK for the opening was written
    for _ in range(30):
        assert g.received(PingFrame(0).serialize()) is None
    g.sent(wire([PingFrame(0, flags=["ACK"])] * 30))  # written out: nothing owed now
    n, verdict = feed_frames(g, (PingFrame(0) for _ in range(1000)))
    assert verdict is not None and verdict.reason == "h2_outbound_control_flood"
    assert n == 31


def test_continuation_frames_per_header_block_are_limited() -> None:
    g = guard()
    frames = [HeadersFrame(1, b"\x82", flags=[])] + [
        ContinuationFrame(1, b"\x87") for _ in range(10_000)
    ]
    n, verdict = feed_frames(g, frames)
    assert verdict is not None and verdict.reason == "h2_continuation_flood"
    assert n == 1 + MAX_CONTINUATION_FRAMES + 1


def test_a_header_block_is_limited_to_max_header_bytes() -> None:
    g = guard(max_header_bytes=4096)
    frames = [HeadersFrame(1, b"\x00" * 1000, flags=[])] + [
        ContinuationFrame(1, b"\x00" * 1000) for _ in range(100)
    ]
    n, verdict = feed_frames(g, frames)
    assert verdict is not None and verdict.reason == "h2_header_block_too_large"
    assert n == 5  # 5000 bytes > 4096
    # A block that ends within the limit is fine, and the next block starts afresh.
    g = guard(max_header_bytes=4096)
    for i in range(1, 41, 2):
        block = [HeadersFrame(i, b"\x00" * 2000, flags=[]), ContinuationFrame(i, b"\x00" * 2000)]
        block[1].flags.add("END_HEADERS")
        assert g.received(wire(block)) is None


@pytest.mark.parametrize(
    "empty",
    [
        lambda: DataFrame(1, b""),
        lambda: ContinuationFrame(1, b""),
        lambda: HeadersFrame(1, b"", flags=[]),
    ],
    ids=["data", "continuation", "headers"],
)
def test_consecutive_empty_frames_are_limited(empty: Callable[[], Frame]) -> None:
    g = guard(max_empty_frames=1)
    assert g.received(request(1, end_stream=False).serialize()) is None
    n, verdict = feed_frames(g, (empty() for _ in range(1000)))
    assert verdict is not None and verdict.reason == "h2_empty_frames"
    assert n == 2


def test_empty_frames_with_end_stream_or_between_data_are_fine() -> None:
    g = guard(max_empty_frames=1)
    for i in range(1, 201, 2):
        frames = [
            request(i, end_stream=False),
            DataFrame(i, b""),
            DataFrame(i, b"x"),
            DataFrame(i, b"", flags=["END_STREAM"]),
        ]
        assert g.received(wire(frames)) is None


def test_window_updates_are_limited_by_the_data_frames_sent() -> None:
    g = guard()
    n, verdict = feed_frames(g, (WindowUpdateFrame(0, window_increment=1) for _ in range(100)))
    assert verdict is not None and verdict.reason == "h2_window_update_flood"
    assert n == 6  # 5 + 2 * (0 streams + 10 * 0 DATA frames)
    g = guard()
    g.sent(wire([DataFrame(1, b"x" * 100) for _ in range(3)]))
    for _ in range(65):  # 5 + 2 * 10 * 3
        assert g.received(WindowUpdateFrame(0, window_increment=1).serialize()) is None
    assert g.received(WindowUpdateFrame(0, window_increment=1).serialize()) is not None


@st.composite
def mixed_traffic(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    """A client's frames (good and hostile mixed) and split points for them."""
    frames: list[Frame] = []
    stream = 1
    for kind in draw(st.lists(st.sampled_from("hrpswdc"), max_size=60)):
        if kind == "h":
            frames.append(request(stream))
            stream += 2
        elif kind == "r":
            frames += [request(stream), RstStreamFrame(stream)]
            stream += 2
        elif kind == "p":
            frames.append(PingFrame(0))
        elif kind == "s":
            frames.append(SettingsFrame(0, {}))
        elif kind == "w":
            frames.append(WindowUpdateFrame(0, window_increment=7))
        elif kind == "d":
            frames += [request(stream, end_stream=False), DataFrame(stream, b"")]
            stream += 2
        else:
            head = HeadersFrame(stream, b"\x82", flags=[])
            frames += [head, ContinuationFrame(stream, b"\x87" * 300, flags=["END_HEADERS"])]
            stream += 2
    data = opening() + wire(frames)
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=20))
    return data, sorted(cuts)


@given(mixed_traffic())
def test_the_verdict_does_not_depend_on_how_the_bytes_are_split(
    case: tuple[bytes, list[int]],
) -> None:
    data, cuts = case
    limits = {"max_control_frames_per_second": 20, "premature_reset_streams": 5}
    whole = FloodGuard(H2Limits(**limits), Clock())
    whole_verdict = whole.received(data)
    split = FloodGuard(H2Limits(**limits), Clock())
    split_verdict = None
    for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
        split_verdict = split.received(data[a:b])
        if split_verdict is not None:
            break
    # The per-read stream limit is the only rule that looks at read boundaries; it is far away.
    assert (whole_verdict and whole_verdict.reason) == (split_verdict and split_verdict.reason)
    if whole_verdict is None:
        assert whole.counts == split.counts


def server_variant(demo: DemoLayout, tmp_path: Path, line: str) -> Path:
    """The demo configuration with ``line`` added to ``[server]``, written to ``tmp_path``."""
    text = demo.config.read_text().replace("[server]", f"[server]\n{line}", 1)
    for name in ('"ca/', '"edge/', '"signing-key.pem"', '"admin.token"'):
        text = text.replace(name, f'"{demo.root}/{name[1:]}')
    path = tmp_path / "enforcer.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("h2_max_concurrent_streams", 0, "is not between 1 and 1024"),
        ("h2_header_table_size", 1 << 20, "is not between 0 and 65536"),
        ("h2_max_control_frames_per_second", 0, "is not between 1 and 100000"),
        ("h2_max_empty_frames", -1, "is not between 0 and 1000"),
        ("h2_premature_reset_streams", "many", "expected"),
    ],
)
def test_config_limits_are_checked(
    demo: DemoLayout, tmp_path: Path, field: str, value: object, problem: str
) -> None:
    path = server_variant(demo, tmp_path, f"{field} = {value!r}".replace("'", '"'))
    with pytest.raises(ConfigError, match=re.escape(str(path))) as info:
        load_config(path)
    assert info.value.field == f"server.{field}"
    assert problem in info.value.problem


def test_config_limits_reach_the_guard(demo: DemoLayout, tmp_path: Path) -> None:
    path = server_variant(demo, tmp_path, "h2_max_concurrent_streams = 9")
    limits = H2Limits.from_settings(load_config(path).server)
    assert limits == H2Limits(max_concurrent_streams=9)


def flood_batch(w: FloodWriter, kind: str, stream: list[int]) -> bytes:
    """One more frame of the ``kind`` flood (the first one opens what the flood needs)."""
    if kind == "continuation":
        if not stream:
            sid, data = w.open_header_block()
            stream.append(sid)
            return data
        return w.continuations(stream[0], 1)
    if kind == "empty_data":
        if not stream:
            sid, data = w.open_stream()
            stream.append(sid)
            return data
        return w.empty_data(stream[0], 1)
    make = {
        "rapid_reset": w.rapid_reset,
        "ping": w.pings,
        "settings": w.settings,
        "priority": w.priority,
        "empty_headers": w.empty_headers,
        "window_update": w.window_updates,
    }[kind]
    return make(1)


@pytest.mark.parametrize("kind", KINDS)
def test_every_flood_is_stopped_before_h2_is_overrun(kind: str) -> None:
    """The flood writer's frames, through the guard into h2's server side, frame by frame."""
    limits = H2Limits()
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    g = FloodGuard(limits, Clock())
    w = FloodWriter("auth.example.test")
    opening = w.opening() + w.requests(3)
    assert g.received(opening) is None
    events = conn.receive_data(opening)
    assert sum(isinstance(e, h2.events.RequestReceived) for e in events) == 3
    g.sent(conn.data_to_send())
    stream: list[int] = []
    frames, verdict = 0, None
    while verdict is None and frames < 10_000:
        data = flood_batch(w, kind, stream)
        frames += 1
        if (verdict := g.received(data)) is None:
            conn.receive_data(data)  # h2 itself never gives up first
            g.sent(conn.data_to_send())
    assert verdict is not None, f"the {kind} flood was never stopped"
    assert verdict.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert frames <= 2 * limits.max_control_frames_per_second
