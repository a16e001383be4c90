"""One timer for many tasks that wake on the same beat.

Every open WebSocket tunnel decides its access again once a second (access-flow A14). With a
timer each, ten thousand open tunnels are ten thousand timers and ten thousand store polls a
second; with a metronome they are one timer and one poll, and the tunnels only compare their
snapshot and clock with the last decision's (see ``enforcer.server._Session._recheck``).
"""

from __future__ import annotations

from collections.abc import Callable

import trio


class Metronome:
    """Wakes every waiting task together, at most ``period`` seconds after it began to wait.

    No task of its own: the first task to wait keeps time for the others (it sleeps, runs
    ``on_beat`` once for all, then wakes them). If that task is cancelled, the others wake
    early, which a waiter must treat like a beat, and the next one to wait keeps time.
    """

    def __init__(self, period: float, on_beat: Callable[[], object] | None = None) -> None:
        self.period = period
        self._on_beat = on_beat
        self._beat: trio.Event | None = None

    async def wait(self) -> None:
        """Return at the next beat (or sooner, if the task keeping time is cancelled)."""
        beat = self._beat
        if beat is not None:
            await beat.wait()
            return
        beat = self._beat = trio.Event()
        try:
            await trio.sleep(self.period)
            if self._on_beat is not None:
                self._on_beat()
        finally:
            self._beat = None
            beat.set()
