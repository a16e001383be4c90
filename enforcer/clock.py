"""The one clock every validity, expiry and session check reads.

Decision code never reads a clock: it takes ``now`` as an argument. The I/O layers ask a
:class:`Clock` for ``now`` once per request and pass it down, so the same code runs on the
wall clock and on trio's ``MockClock`` (through :class:`TrioClock`).
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Protocol

import trio


class Clock(Protocol):
    """Something that tells the current time as an aware UTC datetime."""

    def now(self) -> dt.datetime:
        """Return the current time (aware, UTC)."""
        ...


class WallClock:
    """The system's real time."""

    def now(self) -> dt.datetime:
        """Return the wall-clock time in UTC."""
        return dt.datetime.fromtimestamp(time.time(), dt.UTC)


class TrioClock:
    """Wall time anchored at start, then advanced by trio's clock (real or ``MockClock``)."""

    def __init__(self, epoch: dt.datetime | None = None) -> None:
        self._epoch = epoch if epoch is not None else WallClock().now()
        self._start = trio.current_time()

    def now(self) -> dt.datetime:
        """Return the epoch plus the trio time elapsed since this clock was made."""
        return self._epoch + dt.timedelta(seconds=trio.current_time() - self._start)


class FixedClock:
    """A clock that only moves when told to; for tests and replays."""

    def __init__(self, at: dt.datetime) -> None:
        self._at = at

    def now(self) -> dt.datetime:
        """Return the time this clock was set to."""
        return self._at

    def set(self, at: dt.datetime) -> None:
        """Set the clock to ``at``."""
        self._at = at

    def advance(self, delta: dt.timedelta) -> None:
        """Move the clock forward by ``delta``."""
        self._at += delta
