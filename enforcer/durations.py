"""Go-style durations (``0s``, ``15m``, ``24h``, ``1h30m``), the format session durations use."""

from __future__ import annotations

import datetime as dt
import re

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


class DurationError(ValueError):
    """A string that is not a Go-style duration."""


def parse_duration(text: str) -> dt.timedelta:
    """Parse a Go-style duration such as ``24h`` or ``1h30m`` (``0`` and ``0s`` are zero)."""
    s = text.strip()
    if s in ("0", "0s"):
        return dt.timedelta(0)
    if s.startswith("-"):
        raise DurationError(f"{text!r}: a duration cannot be negative")
    s = s.removeprefix("+")
    pos = 0
    seconds = 0.0
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None:
            raise DurationError(
                f"{text!r} is not a Go duration: expected numbers with units ns, us, ms, s, m, h "
                "(for example 0s, 15m, 24h, 1h30m)"
            )
        seconds += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not s:
        raise DurationError("an empty string is not a duration (use 0s for No Duration)")
    return dt.timedelta(seconds=seconds)


def format_duration(delta: dt.timedelta) -> str:
    """Format a timedelta the way Go prints durations of whole seconds (``24h0m0s`` -> ``24h``)."""
    total = int(delta.total_seconds())
    if total == 0:
        return "0s"
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    out = ""
    if h:
        out += f"{h}h"
    if m:
        out += f"{m}m"
    if s:
        out += f"{s}s"
    return out
