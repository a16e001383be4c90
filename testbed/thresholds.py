"""Thresholds in the style of k6: ``handshake.p95 < 50ms``, ``false_accepts == 0``,
``errors <= 1%``, ``cohort.expired.share:denied:certificate_expired == 100%``,
``cohort.live.full_handshakes == 100%``. They decide a
run's exit code (with the gates of :mod:`testbed.verdict`).

A count with ``%`` is a share of the attempts: ``errors <= 1%`` holds when at most one attempt
in a hundred ended in an error (``dropped`` is a share of the scheduled attempts, recorded plus
dropped)."""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# What a run's summary measures (testbed.summary uses these): a device's phases, and a
# person's login and callback.
LATENCIES = (
    "total",
    "service",
    "handshake",
    "connect",
    "first_byte",
    "key_store",
    "login",
    "callback",
)
STATS = ("p50", "p90", "p95", "p99", "p99.9", "max", "mean")
COUNTS = ("false_accepts", "false_rejects", "attempts", "dropped", "errors", "decisions", "rate")
# A cohort's shares of its attempts: allowed, matched (its expected outcome), opened a new
# connection, made a full handshake (new and not resumed: what No Duration costs).
COHORT_SHARES = ("allowed", "matched", "new_connections", "full_handshakes")
# Counts that a ``%`` turns into a share of the attempts.
SHARE_COUNTS = ("false_accepts", "false_rejects", "dropped", "errors", "decisions")
OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    ">": operator.gt,
}
_EXPR = re.compile(
    r"^\s*(?P<metric>\S+)\s*(?P<op><=|>=|==|!=|<|>)\s*(?P<value>[0-9.]+)\s*(?P<unit>ms|s|%)?\s*$"
)


class ThresholdError(ValueError):
    """A threshold that cannot be understood."""


@dataclasses.dataclass(frozen=True)
class Threshold:
    """One check: a metric, an operator and a value (latencies in ms, shares in 0..1)."""

    text: str
    metric: str
    op: str
    value: float
    of_attempts: bool = False  # a count judged as a share of the attempts (``errors <= 1%``)

    def holds(self, observed: float) -> bool:
        """Tell whether the observed value passes."""
        if self.op == "==":
            return abs(observed - self.value) < 1e-9
        return OPERATORS[self.op](observed, self.value)


def _check_metric(name: str, cohorts: Sequence[str]) -> None:
    if name in COUNTS:
        return
    parts = name.split(".", 1)
    if parts[0] in LATENCIES and len(parts) == 2 and parts[1] in STATS:
        return
    if name.startswith("cohort."):
        rest = name[len("cohort.") :]
        # Cohort names may hold dots: take the longest cohort name the metric starts with.
        known = sorted((c for c in cohorts if rest.startswith(c + ".")), key=len, reverse=True)
        if not known:
            cohort = rest.partition(".")[0]
            raise ThresholdError(f"{name!r}: no cohort {cohort!r}; cohorts are {list(cohorts)}")
        what = rest[len(known[0]) + 1 :]
        if what in COHORT_SHARES or what.startswith("share:"):
            return
        sub = what.split(".", 1)
        if sub[0] in LATENCIES and len(sub) == 2 and sub[1] in STATS:
            return
        raise ThresholdError(
            f"{name!r}: after cohort.<name>. expected {', '.join(COHORT_SHARES)},"
            " share:<outcome> or a latency such as total.p99"
        )
    raise ThresholdError(
        f"{name!r} is not a metric: use {', '.join(COUNTS)}, <latency>.<stat> with latency in "
        f"{list(LATENCIES)} and stat in {list(STATS)}, or cohort.<name>.<...>"
    )


def parse_threshold(text: str, cohorts: Sequence[str]) -> Threshold:
    """Parse ``METRIC OP VALUE[ms|s|%]``."""
    match = _EXPR.match(text)
    if match is None:
        raise ThresholdError(f'{text!r}: expected METRIC OP VALUE, such as "handshake.p95 < 50ms"')
    metric, op, unit = match["metric"], match["op"], match["unit"]
    _check_metric(metric, cohorts)
    try:
        value = float(match["value"])
    except ValueError:
        raise ThresholdError(f"{text!r}: {match['value']!r} is not a number") from None
    share = unit == "%" and metric in SHARE_COUNTS
    if unit == "s":
        value *= 1000
    elif unit == "%":
        value /= 100
    is_latency = metric.split(".")[-2] in LATENCIES if "." in metric else False
    if unit in ("ms", "s") and not is_latency:
        raise ThresholdError(f"{text!r}: a time unit on {metric}, which is not a latency")
    return Threshold(text.strip(), metric, op, value, of_attempts=share)


def evaluate(
    thresholds: Sequence[Threshold],
    summary: Mapping[str, Any],
    metric: Callable[[Mapping[str, Any], str], float],
) -> list[tuple[str, str, bool]]:
    """Return (threshold, observed, held) for each threshold; a missing metric fails."""
    out = []
    for t in thresholds:
        try:
            observed = metric(summary, t.metric)
            if t.of_attempts:
                count = observed
                total = metric(summary, "attempts")
                if t.metric == "dropped":
                    total += count  # a share of what was scheduled
                observed = count / total if total else math.nan
        except KeyError as exc:
            out.append((t.text, f"no data ({exc})", False))
            continue
        if t.of_attempts:
            shown = f"{observed:.2%} ({count:g} of {total:g})" if total else "no data"
        else:
            shown = plain_number(observed)
        if observed != observed:  # NaN: no data for this metric
            out.append((t.text, "no data", False))
            continue
        out.append((t.text, shown, t.holds(observed)))
    return out


def plain_number(value: float) -> str:
    """Format a figure in plain digits (``29530``, ``12.346``, ``0.00037``), never ``2.953e+04``.

    The text stays a number that ``float()`` reads (summary.json and --json consumers do).
    """
    if value != value or value in (math.inf, -math.inf):
        return str(value)
    if value and abs(value) < 0.01:
        return f"{value:.2g}"  # small rates per virtual second keep their digits
    return f"{value:.3f}".rstrip("0").rstrip(".")
