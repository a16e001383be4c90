"""The suite: hypothesis drives cases (and the stateful machine) against one target.

Every property runs in the calling thread with blocking I/O; the caller keeps the trio loop
that serves the target alive (see :func:`testbed.conformance.cli.run`). A divergence is
shrunk by hypothesis to a small case and reported with the seed that reproduces it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import traceback
from collections.abc import Callable, Iterator

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Flaky

from testbed.conformance.runner import Divergence, Target, run_case
from testbed.conformance.strategies import CaseSpec, case_specs

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PropertyResult:
    """The outcome of one property: how many cases ran, and each divergence found."""

    name: str
    description: str
    examples: int = 0
    divergences: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None

    @property
    def passed(self) -> bool:
        """True when nothing diverged and nothing broke."""
        return not self.divergences and self.error is None


def hypothesis_settings(examples: int, shrink: bool = True) -> settings:
    """Settings for a conformance run: no deadline (TLS is slow), no example database."""
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if shrink else [])
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=phases,
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=True,
        print_blob=False,
    )


def _collect(exc: BaseException, out: list[str]) -> None:
    if isinstance(exc, Divergence):
        out.append(str(exc))
    elif isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            _collect(inner, out)
    else:
        raise exc


@contextlib.contextmanager
def shrink_budget(seconds: float | None) -> Iterator[None]:
    """Bound the time hypothesis spends shrinking a failure (its own default is 5 minutes).

    Hypothesis has no public setting for this; it reads a module constant, which we set for
    the duration of a run. Should a future hypothesis rename it, the budget is just not applied.
    """
    from hypothesis.internal.conjecture import engine

    if seconds is None or not hasattr(engine, "MAX_SHRINKING_SECONDS"):
        yield
        return
    saved = engine.MAX_SHRINKING_SECONDS
    engine.MAX_SHRINKING_SECONDS = seconds  # type: ignore[assignment]
    try:
        yield
    finally:
        engine.MAX_SHRINKING_SECONDS = saved


def run_property(
    name: str,
    description: str,
    body: Callable[[], None],
    shrink_seconds: float | None = None,
) -> PropertyResult:
    """Run a hypothesis-decorated ``body``; turn its divergences into a result."""
    result = PropertyResult(name, description)
    try:
        with shrink_budget(shrink_seconds):
            body()
    except Flaky as exc:
        result.error = f"the target answered the same case differently on a rerun: {exc}"
    except (Divergence, BaseExceptionGroup) as exc:
        try:
            _collect(exc, result.divergences)
        except Exception as other:  # a crash inside a group: report it, don't hide it
            result.error = _crash(other)
    except Exception as exc:
        # A crash of the suite or of a target (an admin call refused, a socket error) is an
        # error of this property, reported with its traceback; the other properties still run.
        result.error = _crash(exc)
    return result


def _crash(exc: BaseException) -> str:
    trace = "".join(traceback.format_exception(exc))
    return f"{type(exc).__name__}: {exc}\n{trace}"


def check_cases(
    target: Target,
    examples: int,
    rng_seed: int,
    *,
    shrink: bool = True,
    shrink_seconds: float | None = None,
) -> PropertyResult:
    """Property: for every generated case, every answer of the target equals the model's."""
    counter = [0]

    @hypothesis_settings(examples, shrink)
    @seed(rng_seed)
    @given(case_specs(target.caps))
    def cases(spec: CaseSpec) -> None:
        counter[0] += 1
        run = run_case(target, spec)
        if run.divergent:
            raise Divergence(run.report(target.name))

    result = run_property(
        "cases",
        "fresh, kept-alive and resumed connections and token replays agree with the model",
        cases,
        shrink_seconds,
    )
    result.examples = counter[0]
    return result


def check_stateful(
    target: Target,
    examples: int,
    rng_seed: int,
    *,
    steps: int = 20,
    shrink_seconds: float | None = None,
) -> PropertyResult:
    """Stateful property: devices, clock, revocations, rotations, durations vs the model."""
    from hypothesis.stateful import get_state_machine_test

    from testbed.conformance.machine import machine_for
    from testbed.conformance.targets import AdminTarget

    if not isinstance(target, AdminTarget) or target.clock is None:
        return PropertyResult(
            "stateful",
            "skipped: the stateful test needs the built-in target (an injectable clock)",
        )
    counter = [0]
    machine = machine_for(target)

    class Counted(machine):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            counter[0] += 1
            super().__init__()

    run_settings = settings(hypothesis_settings(examples), stateful_step_count=steps)
    test = seed(rng_seed)(get_state_machine_test(Counted, settings=run_settings))
    result = run_property(
        "stateful",
        "connections, cookies, clock, revocation, rotation and durations agree with the model",
        test,
        shrink_seconds,
    )
    result.examples = counter[0]
    return result
