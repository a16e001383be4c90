"""Behaviours on trio's clock: exact virtual schedules, backoff, a real device and enforcer."""

from __future__ import annotations

import itertools
import random

import pytest
import trio

from devices.behaviour import (
    Backoff,
    BehaviourError,
    Burst,
    Periodic,
    parse_behaviour,
    run_behaviour,
)
from devices.client import Attempt, ClientOptions, DeviceClient, Target
from devices.keystore import SoftwareKeyStore
from testbed.demo import AUTH_HOST


class Scripted:
    """A stand-in target that answers with a scripted list of outcomes and records send times."""

    def __init__(self, outcomes: list[str]) -> None:
        self.outcomes = outcomes
        self.sent_at: list[float] = []

    async def request(self, path: str = "/", *, method: str = "GET", body: bytes = b"") -> Attempt:
        self.sent_at.append(trio.current_time())
        return Attempt(
            outcome=self.outcomes[len(self.sent_at) - 1]
            if len(self.sent_at) <= len(self.outcomes)
            else "allowed"
        )


async def test_periodic_with_jitter_on_virtual_time(autojump_clock) -> None:
    async def schedule(seed: int) -> list[float]:
        target = Scripted([])
        start = trio.current_time()
        await run_behaviour(
            target,
            Periodic(interval=60, jitter=0.1),
            rng=random.Random(seed),
            on_attempt=lambda a, s: None,
            max_requests=100,
        )
        return [t - start for t in target.sent_at]

    times = await schedule(7)
    assert len(times) == 100
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(54 <= g <= 66 for g in gaps)
    assert min(gaps) != max(gaps)  # there is jitter
    assert await schedule(7) == pytest.approx(times)  # the same seed, the same schedule
    assert await schedule(8) != pytest.approx(times)


async def test_bursts(autojump_clock) -> None:
    target = Scripted([])
    await run_behaviour(
        target,
        Burst(size=5, every=300, spacing=1),
        rng=random.Random(1),
        on_attempt=lambda a, s: None,
        max_requests=10,
    )
    first, second = target.sent_at[:5], target.sent_at[5:]
    assert [round(b - a, 6) for a, b in itertools.pairwise(first)] == [1.0] * 4
    assert second[0] - first[0] == pytest.approx(300)


async def test_backoff_after_failures_then_reset(autojump_clock) -> None:
    target = Scripted(["connect_error", "connect_error", "tls_error:eof", "allowed", "allowed"])
    behaviour = Periodic(
        interval=10, jitter=0, backoff=Backoff(initial=5, factor=2, maximum=60, jitter=0)
    )
    scheduled: list[float] = []
    await run_behaviour(
        target,
        behaviour,
        rng=random.Random(0),
        on_attempt=lambda a, s: scheduled.append(s),
        max_requests=5,
    )
    gaps = [b - a for a, b in itertools.pairwise(scheduled)]
    assert gaps == pytest.approx([10 + 5, 10 + 10, 10 + 20, 10])


async def test_until_bounds_the_run(autojump_clock) -> None:
    target = Scripted([])
    sent = await run_behaviour(
        target,
        Periodic(interval=3600, jitter=0),
        rng=random.Random(0),
        on_attempt=lambda a, s: None,
        until=trio.current_time() + 7 * 86400,
    )
    assert 167 <= sent <= 168  # a week of hourly telemetry


def test_parse_behaviour_errors_name_the_field() -> None:
    assert parse_behaviour({"kind": "periodic", "interval": 30}).interval == 30
    assert (
        parse_behaviour({"kind": "burst", "size": 3, "backoff": {"initial": 2}}).backoff.initial
        == 2
    )
    for raw, message in (
        ({"kind": "sometimes"}, "kind: expected one of"),
        ({"kind": "periodic", "interval": -1}, "interval"),
        ({"kind": "periodic", "every": 3}, "every: unknown field"),
        ({"kind": "burst", "size": 0}, "size must be at least 1"),
        ({"kind": "burst", "backoff": {"initial": 1, "x": 2}}, "backoff.x"),
    ):
        with pytest.raises(BehaviourError, match=r"cohorts\.a\.behaviour") as info:
            parse_behaviour(raw, "cohorts.a.behaviour")
        assert message in str(info.value)


async def test_a_real_device_sends_telemetry_to_the_enforcer(served) -> None:
    target = Target("127.0.0.1", served.port, AUTH_HOST, served.layout.edge_ca)
    client = DeviceClient(target, SoftwareKeyStore(*served.layout.device("valid")), ClientOptions())
    outcomes: list[str] = []
    try:
        await run_behaviour(
            client,
            Periodic(interval=0.02, jitter=0.5, method="POST", body_bytes=128),
            rng=random.Random(3),
            on_attempt=lambda a, s: outcomes.append(a.outcome),
            max_requests=5,
        )
    finally:
        await client.aclose()
    assert outcomes == ["allowed"] * 5
    posts = [r for r in served.log() if r["method"] == "POST"]
    assert len(posts) == 5 and {r["path"] for r in posts} == {"/telemetry"}


def test_backoff_stays_at_its_maximum_however_long_a_device_fails() -> None:
    # A device with an expired certificate fails every attempt for a virtual week: the
    # thousandth failure waits the maximum, it does not overflow 2.0 ** 1023.
    rng = random.Random(1)
    backoff = Backoff(initial=1, factor=2, maximum=60, jitter=0)
    assert [backoff.delay(n, rng) for n in (1, 2, 3, 7, 8)] == [1, 2, 4, 60, 60]
    assert backoff.delay(5000, rng) == 60
    assert Backoff(initial=0.5, factor=3, maximum=0.1, jitter=0).delay(10**6, rng) == 0.1
    assert Backoff(initial=0, factor=2).delay(10**6, rng) == 0
