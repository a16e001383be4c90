"""The tunnels' shared beat (enforcer/metronome.py) and the re-check's unsigned decision."""

from __future__ import annotations

import trio
import trio.testing

from enforcer.chain import ChainResult
from enforcer.decision import AccessRequest, decide
from enforcer.metronome import Metronome
from enforcer.tokens import KeyRing
from tests.enforcer.test_sessions import NOW, _snapshot, ring  # noqa: F401 (a fixture)
from tests.enforcer.test_units import facts


def test_every_waiter_wakes_on_one_beat_and_the_store_is_polled_once() -> None:
    clock = trio.testing.MockClock(autojump_threshold=0)
    polls: list[float] = []

    async def main() -> list[float]:
        metronome = Metronome(1.0, on_beat=lambda: polls.append(trio.current_time()))
        woke: list[float] = []

        async def waiter(delay: float) -> None:
            await trio.sleep(delay)
            await metronome.wait()
            woke.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(waiter, i / 400)  # joining at any moment of the period
        return woke

    woke = trio.run(main, clock=clock)
    assert woke == [1.0] * 200  # together, on the beat of the first to wait
    assert polls == [1.0]


def test_cancelling_the_task_that_keeps_time_wakes_the_others_and_a_new_one_keeps_it() -> None:
    clock = trio.testing.MockClock(autojump_threshold=0)

    async def main() -> tuple[list[float], int]:
        metronome = Metronome(1.0)
        beats = 0
        woke: list[float] = []

        async def follower() -> None:
            await trio.sleep(0.1)
            await metronome.wait()  # an early wake: the keeper was cancelled at 0.5
            woke.append(trio.current_time())
            await metronome.wait()  # the next beat, kept by this waiter or its twin
            woke.append(trio.current_time())

        def count() -> None:
            nonlocal beats
            beats += 1

        metronome._on_beat = count
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(0.5):
                nursery.start_soon(follower)
                nursery.start_soon(follower)
                await metronome.wait()  # this task keeps time, and is cancelled at 0.5
        return woke, beats

    woke, beats = trio.run(main, clock=clock)
    assert woke == [0.5, 0.5, 1.5, 1.5]
    assert beats == 1  # the cancelled keeper polled nothing; the next keeper polled once


def test_a_recheck_decides_as_a_request_would_without_signing_a_token(ring: KeyRing) -> None:  # noqa: F811
    snapshot = _snapshot(ring)
    request = AccessRequest("auth.test", "auth.test")
    chain = ChainResult(facts(), None)
    signed = decide(request, snapshot, chain, NOW)
    unsigned = decide(request, snapshot, chain, NOW, issue_token=False)
    assert signed.allowed and signed.token is not None and signed.set_cookie is not None
    assert unsigned.token is None and unsigned.set_cookie is None
    assert (unsigned.status, unsigned.admitted_by, unsigned.policy, unsigned.claims) == (
        signed.status,
        signed.admitted_by,
        signed.policy,
        signed.claims,
    )
