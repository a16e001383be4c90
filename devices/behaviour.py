"""Device behaviours: periodic telemetry with jitter, bursts, and reconnect with backoff.

A behaviour decides *when* a device sends; the :class:`~devices.client.DeviceClient` decides
*how*. Each is a small frozen dataclass that a scenario file can name (``kind = "periodic"``)
and parameterise; :func:`run_behaviour` drives one device with one behaviour until a count or a
deadline, on trio's clock (so a MockClock runs a week of telemetry in moments) and with a seeded
random generator (so runs are reproducible).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import trio

from devices.client import Attempt


class BehaviourError(ValueError):
    """A behaviour description that cannot be used; the message names the field."""


class Requester(Protocol):
    """What a behaviour drives: anything with the device client's ``request``."""

    async def request(self, path: str = "/", *, method: str = "GET", body: bytes = b"") -> Attempt:
        """Send one request and classify the outcome."""
        ...


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Waits after failures: ``initial`` seconds, times ``factor`` each time, up to ``maximum``."""

    initial: float = 1.0
    factor: float = 2.0
    maximum: float = 60.0
    jitter: float = 0.1  # +/- this fraction, so a fleet does not retry in lockstep

    def delay(self, failures: int, rng: random.Random) -> float:
        """The wait after ``failures`` consecutive failures (0 when there were none)."""
        if failures <= 0 or self.initial <= 0:
            return 0.0
        exponent = failures - 1
        if self.factor > 1:
            # Past this many failures the wait is at its maximum anyway; stopping the exponent
            # there keeps factor ** exponent finite for a device that fails for days.
            ceiling = math.log(max(self.maximum, self.initial) / self.initial, self.factor)
            exponent = min(exponent, math.ceil(ceiling))
        base = min(self.maximum, self.initial * self.factor**exponent)
        return base * (1 + rng.uniform(-self.jitter, self.jitter))


@dataclasses.dataclass(frozen=True)
class Periodic:
    """One request every ``interval`` seconds, +/- ``jitter`` (a fraction of the interval)."""

    interval: float = 60.0
    jitter: float = 0.1
    path: str = "/telemetry"
    method: str = "POST"
    body_bytes: int = 64
    backoff: Backoff = dataclasses.field(default_factory=Backoff)

    def gaps(self, rng: random.Random) -> Any:
        """Yield the waits before each request."""
        yield self.interval * rng.uniform(0, 1)  # devices do not all start at once
        while True:
            yield self.interval * (1 + rng.uniform(-self.jitter, self.jitter))


@dataclasses.dataclass(frozen=True)
class Burst:
    """``size`` requests ``spacing`` seconds apart, every ``every`` seconds."""

    size: int = 10
    every: float = 300.0
    spacing: float = 0.0
    path: str = "/telemetry"
    method: str = "POST"
    body_bytes: int = 64
    backoff: Backoff = dataclasses.field(default_factory=Backoff)

    def gaps(self, rng: random.Random) -> Any:
        """Yield the waits before each request."""
        yield self.every * rng.uniform(0, 1)  # the first request of the first burst
        while True:
            for _ in range(self.size - 1):
                yield self.spacing
            yield max(0.0, self.every - self.spacing * (self.size - 1))  # the next burst


@dataclasses.dataclass(frozen=True)
class Closed:
    """A closed loop: the next request as soon as the previous one ends (load tests)."""

    path: str = "/"
    method: str = "GET"
    body_bytes: int = 0
    # No backoff: a load test measures what the target does with the load it is given.
    backoff: Backoff = dataclasses.field(default_factory=lambda: Backoff(initial=0.0))

    def gaps(self, rng: random.Random) -> Any:
        """Yield the waits before each request: none."""
        while True:
            yield 0.0


Behaviour = Periodic | Burst | Closed
KINDS: dict[str, type[Periodic] | type[Burst] | type[Closed]] = {
    "periodic": Periodic,
    "burst": Burst,
    "closed": Closed,
}


def parse_behaviour(raw: Mapping[str, Any], where: str = "behaviour") -> Behaviour:
    """Build a behaviour from a scenario table such as ``{kind = "periodic", interval = 30}``."""
    kind = raw.get("kind")
    if kind not in KINDS:
        raise BehaviourError(f"{where}.kind: expected one of {sorted(KINDS)}, got {kind!r}")
    cls = KINDS[kind]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "kind":
            continue
        if key not in fields:
            raise BehaviourError(f"{where}.{key}: unknown field; expected one of {sorted(fields)}")
        if key == "backoff":
            if not isinstance(value, Mapping):
                raise BehaviourError(f"{where}.backoff: expected a table")
            known = {f.name for f in dataclasses.fields(Backoff)}
            extra = set(value) - known
            if extra:
                raise BehaviourError(f"{where}.backoff.{sorted(extra)[0]}: unknown field")
            value = Backoff(**{k: float(v) for k, v in value.items()})
        elif key in ("path", "method"):
            if not isinstance(value, str):
                raise BehaviourError(f"{where}.{key}: expected a string, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise BehaviourError(f"{where}.{key}: expected a non-negative number, got {value!r}")
        values[key] = value
    behaviour = cls(**values)
    if isinstance(behaviour, Periodic) and behaviour.interval <= 0:
        raise BehaviourError(f"{where}.interval: must be above 0")
    if isinstance(behaviour, Burst) and (behaviour.size < 1 or behaviour.every <= 0):
        raise BehaviourError(f"{where}: size must be at least 1 and every above 0")
    return behaviour


async def run_behaviour(
    device: Requester,
    behaviour: Behaviour,
    *,
    rng: random.Random,
    on_attempt: Callable[[Attempt, float], None],
    max_requests: int | None = None,
    until: float | None = None,
) -> int:
    """Drive ``device`` until ``max_requests`` or trio time ``until``; return the requests sent.

    ``on_attempt`` gets each attempt and the trio time it was scheduled for. After a failure
    (anything but ``allowed``) the device waits its backoff before the next scheduled send.
    """
    if max_requests is None and until is None:
        raise BehaviourError("run_behaviour needs max_requests or until, so that it ends")
    body = b"x" * behaviour.body_bytes
    failures = 0
    sent = 0
    scheduled = trio.current_time()
    for gap in behaviour.gaps(rng):
        if isinstance(behaviour, Closed):
            # Scheduled when the previous request ends: a closed loop has no schedule to
            # fall behind (and so, unlike an open loop, hides a target's stalls).
            scheduled = max(scheduled, trio.current_time())
        scheduled += gap + behaviour.backoff.delay(failures, rng)
        if until is not None and scheduled > until:
            break
        if scheduled > trio.current_time():
            await trio.sleep_until(scheduled)
        else:  # already due (a closed loop's every request): a checkpoint, without a timer
            await trio.lowlevel.checkpoint()
        attempt = await device.request(behaviour.path, method=behaviour.method, body=body)
        on_attempt(attempt, scheduled)
        sent += 1
        failures = 0 if attempt.allowed else failures + 1
        if max_requests is not None and sent >= max_requests:
            break
    return sent
