"""The report's figures, drawn from a summary dict into PNG files.

This is the only module that imports matplotlib. Figures are built with the object API on the
Agg canvas (no pyplot, so no global figure state and no GUI backend), in matplotlib's default
font, which ships with it. Every function takes the summary and a path, and draws a "no data"
figure rather than failing when the run recorded nothing to show.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from testbed.summary import fmt_span

ALLOWED_COLOR = "#2ca02c"
FALSE_ACCEPT_COLOR = "#d62728"
# Red is kept for false accepts; the other outcomes take these in a stable order.
_PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#aec7e8",
    "#ffbb78",
    "#c5b0d5",
    "#c49c94",
    "#f7b6d2",
    "#dbdb8d",
    "#9edae5",
)
_PHASES = (
    ("connect", "connect", "#1f77b4"),
    ("key_store", "key store", "#ff7f0e"),
    ("tls", "TLS handshake", "#9467bd"),
    ("first_byte", "first byte", "#17becf"),
    # A person's first request of a session logs in first (people cohorts only).
    ("login", "login (provider round trips)", "#bcbd22"),
    ("callback", "login callback", "#8c564b"),
)
_DPI = 100


def _distinct_colors(n: int, taken: Sequence[str]) -> list[str]:
    """``n`` colours, none in ``taken``: the palette first, then hues around the wheel.

    Outcomes and reasons grow with the enforcer's reason codes (unsupported_key and
    revocation_unknown came with issue 14) and the client's error kinds: two of them must
    never share a colour, however many there are.
    """
    used = {c.lower() for c in taken}
    out: list[str] = []
    for color in _PALETTE:
        if len(out) == n:
            return out
        if color not in used:
            out.append(color)
            used.add(color)
    step = 0
    while len(out) < n:
        # Golden-angle hues, away from the false-accept red and the allowed green.
        hue = (0.6 + step * 0.618033988749895) % 1.0
        level = 0.55 + 0.3 * ((step // 7) % 2)
        step += 1
        if hue < 0.05 or hue > 0.95 or 0.25 < hue < 0.42:
            continue
        color = "#{:02x}{:02x}{:02x}".format(*(round(v * 255) for v in _hsv(hue, 0.65, level)))
        if color not in used:
            out.append(color)
            used.add(color)
    return out


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    import colorsys

    return colorsys.hsv_to_rgb(h, s, v)


def outcome_colors(outcomes: Sequence[str]) -> dict[str, str]:
    """A colour per outcome: green for allowed, distinct colours in sorted order for the rest."""
    colors = {"allowed": ALLOWED_COLOR}
    others = sorted(o for o in set(outcomes) if o != "allowed")
    fresh = _distinct_colors(len(others), [ALLOWED_COLOR, FALSE_ACCEPT_COLOR])
    colors.update(zip(others, fresh, strict=True))
    return colors


def summary_colors(summary: Mapping[str, Any]) -> dict[str, str]:
    """Outcome colours for a whole summary, so one outcome looks the same in every figure."""
    colors = outcome_colors(list(summary["totals"]["outcomes"]))
    # Rejection reasons are the enforcer's codes: colour them as their denied: outcome.
    for cohort in summary["cohorts"].values():
        for reason in cohort["rejections"]:
            if reason not in colors and f"denied:{reason}" in colors:
                colors[reason] = colors[f"denied:{reason}"]
    extra = sorted(
        {r for c in summary["cohorts"].values() for r in c["rejections"] if r not in colors}
    )
    fresh = _distinct_colors(len(extra), [*colors.values(), FALSE_ACCEPT_COLOR])
    colors.update(zip(extra, fresh, strict=True))
    return colors


def _legend_outside(ax: Axes) -> None:
    """A legend to the right of the axes, where it hides no data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def _legend_height(entries: int) -> float:
    """Inches a legend of ``entries`` lines at font size 8 needs, with the title and margins."""
    return 0.9 + 0.2 * entries


def _figure(width: float = 9.0, height: float = 4.5) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=_DPI)
    return path


def _no_data(path: Path, title: str, message: str = "no data") -> Path:
    fig, ax = _figure()
    ax.set_title(title)
    ax.set_axis_off()
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=16, color="#777777")
    return _save(fig, path)


def _nan(value: Any) -> float:
    return math.nan if value is None else float(value)


# Time axes in the unit a reader thinks in: a virtual week is 7 days, not 604,800 s.
_TIME_UNITS = ((2 * 86400, 86400.0, "days"), (2 * 3600, 3600.0, "hours"), (600, 60.0, "min"))


def time_axis(summary: Mapping[str, Any]) -> tuple[float, str]:
    """Seconds per unit of the time axis, and the unit's name, from the run's length."""
    series = summary.get("series") or {}
    buckets = series.get("buckets") or []
    span = max(
        float(summary.get("totals", {}).get("duration_s") or 0.0),
        (buckets[-1]["t"] + series.get("bucket_s", 1)) if buckets else 0.0,
    )
    for above, seconds, name in _TIME_UNITS:
        if span > above:
            return seconds, name
    return 1.0, "s"


def _clock_word(summary: Mapping[str, Any]) -> str:
    """ "virtual " on the virtual clock: its milliseconds and seconds are simulated."""
    return "virtual " if summary.get("run", {}).get("clock") == "virtual" else ""


def _time_label(summary: Mapping[str, Any], unit: str, width: float, extra: str = "") -> str:
    return f"{_clock_word(summary)}run time ({unit}), {fmt_span(width)} buckets{extra}"


def _mark_timeline(ax: Axes, summary: Mapping[str, Any], scale: float = 1.0) -> None:
    """Shade every other phase and draw the run's events as dashed lines (times / ``scale``)."""
    for i, phase in enumerate(summary.get("phases", [])):
        start, duration = phase.get("start"), phase.get("duration")
        if start is None or duration is None:
            continue
        start, duration = start / scale, duration / scale
        if i % 2:
            ax.axvspan(start, start + duration, color="#000000", alpha=0.04, lw=0)
        ax.text(
            start,
            0.01,
            f" {phase['name']}",
            transform=ax.get_xaxis_transform(),
            va="bottom",
            fontsize=8,
            color="#555555",
        )
    phases_drawn = any(p.get("start") is not None for p in summary.get("phases", []))
    for event in summary.get("events", []):
        if phases_drawn and event["kind"] == "phase":
            continue  # the runner logs phase starts as events; the shading already shows them
        ax.axvline(event["t"] / scale, color="#444444", ls="--", lw=0.8)
        ax.text(
            event["t"] / scale,
            0.99,
            f" {event['kind']}",
            transform=ax.get_xaxis_transform(),
            va="top",
            fontsize=8,
            rotation=90,
            color="#444444",
        )


def latency_over_time(summary: Mapping[str, Any], path: Path) -> Path:
    """Total latency p50 and p99 per time bucket, with phases and events marked."""
    title = "Total latency over time (from the scheduled start)"
    buckets = summary["series"]["buckets"]
    if not any(b["attempts"] for b in buckets):
        return _no_data(path, title)
    width = summary["series"]["bucket_s"]
    scale, unit = time_axis(summary)
    t = [(b["t"] + width / 2) / scale for b in buckets]
    fig, ax = _figure()
    p50 = [_nan(b["p50"]) for b in buckets]
    p99 = [_nan(b["p99"]) for b in buckets]
    ax.plot(t, p99, label="p99", color="#ff7f0e", marker=".")
    ax.plot(t, p50, label="p50", color="#1f77b4", marker=".")
    values = [v for v in p50 + p99 if not math.isnan(v)]
    if _spans_orders(values):
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    _mark_timeline(ax, summary, scale)
    ax.set_title(title)
    ax.set_xlabel(_time_label(summary, unit, width))
    ax.set_ylabel(f"latency ({_clock_word(summary)}ms)")
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return _save(fig, path)


def _spans_orders(values: Sequence[float]) -> bool:
    """Whether a log axis helps: values span orders of magnitude (and none is zero)."""
    return bool(values) and min(values) > 0 and max(values) / min(values) > 20


def latency_cdf(summary: Mapping[str, Any], path: Path) -> Path:
    """The distribution of total latency per cohort, as cumulative curves."""
    title = "Total latency distribution per cohort"
    curves = {name: c["cdf"] for name, c in summary["cohorts"].items() if c.get("cdf")}
    if not curves:
        return _no_data(path, title)
    fig, ax = _figure()
    values = [ms for cdf in curves.values() for _, ms in cdf]
    for name, cdf in curves.items():
        ax.step([ms for _, ms in cdf], [p / 100 for p, _ in cdf], where="post", label=name)
    if _spans_orders(values):
        ax.set_xscale("log")
    ax.set_title(title)
    ax.set_xlabel(f"total latency ({_clock_word(summary)}ms)")
    ax.set_ylabel("share of attempts at or below")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return _save(fig, path)


def phase_breakdown(summary: Mapping[str, Any], path: Path) -> Path:
    """Mean time per phase of a new connection, stacked, per cohort."""
    title = "Where a new connection's time goes (mean per cohort)"
    rows = [
        (name, c["breakdown"])
        for name, c in summary["cohorts"].items()
        if c["breakdown"].get("samples")
    ]
    if not rows:
        return _no_data(path, title, "no new connections")
    fig, ax = _figure(9.0, max(2.5, 1.0 + 0.45 * len(rows)))
    y = np.arange(len(rows))
    left = np.zeros(len(rows))
    for key, label, color in _PHASES:
        if key in ("login", "callback") and not any(b.get(key) for _, b in rows):
            continue  # no person logged in: no login segments (nor legend entries)
        widths = np.array([_nan(b.get(key)) for _, b in rows])
        widths = np.nan_to_num(widths)
        ax.barh(y, widths, left=left, color=color, label=label, height=0.6)
        left += widths
    for i, (_, b) in enumerate(rows):
        ax.text(left[i], i, f"  {left[i]:.3g} ms, n={b['samples']}", va="center", fontsize=8)
    ax.set_yticks(y, [name for name, _ in rows])
    ax.invert_yaxis()
    ax.set_title(title)
    ax.set_xlabel(f"{_clock_word(summary)}milliseconds")
    ax.set_xlim(0, max(float(left.max()) * 1.25, 1e-3))
    ax.grid(axis="x", alpha=0.3)
    _legend_outside(ax)
    return _save(fig, path)


def attempts_per_second(summary: Mapping[str, Any], path: Path) -> Path:
    """Attempts per second by outcome (stacked), and dropped attempts."""
    title = "Attempts per second by outcome"
    buckets = summary["series"]["buckets"]
    if not any(b["attempts"] or b["dropped"] for b in buckets):
        return _no_data(path, title)
    width = summary["series"]["bucket_s"]
    scale, unit = time_axis(summary)
    # Long runs count per hour: a sensor reporting every 6 h is 0.00005/s.
    per, per_name = (3600.0, "hour") if scale >= 3600 else (1.0, "s")
    # Steps are drawn from each bucket's start: repeat the last one so it spans its width.
    buckets = [*buckets, buckets[-1]]
    t = [b["t"] / scale for b in buckets[:-1]] + [(buckets[-1]["t"] + width) / scale]
    outcomes = sorted(
        {o for b in buckets for o in b["outcomes"]}, key=lambda o: (o != "allowed", o)
    )
    colors = summary_colors(summary)
    fig, ax = _figure(9.0, max(4.5, _legend_height(len(outcomes) + 1)))
    if outcomes:
        ax.stackplot(
            t,
            [[b["outcomes"].get(o, 0) * per / width for b in buckets] for o in outcomes],
            labels=outcomes,
            colors=[colors[o] for o in outcomes],
            step="post",
        )
    if any(b["dropped"] for b in buckets):
        ax.step(
            t,
            [b["dropped"] * per / width for b in buckets],
            where="post",
            color="#000000",
            ls="--",
            label="dropped",
        )
    _mark_timeline(ax, summary, scale)
    ax.set_title(title if per == 1 else "Attempts per hour by outcome")
    ax.set_xlabel(_time_label(summary, unit, width, " (by scheduled start)"))
    ax.set_ylabel(f"attempts per {_clock_word(summary)}{per_name}")
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return _save(fig, path)


def rejections(summary: Mapping[str, Any], path: Path) -> Path:
    """Rejections per cohort, stacked by reason."""
    title = "Rejections by reason per cohort"
    rows = [(name, c["rejections"]) for name, c in summary["cohorts"].items() if c["rejections"]]
    if not rows:
        return _no_data(path, title, "no rejections")
    reasons = sorted({r for _, rej in rows for r in rej})
    colors = summary_colors(summary)
    # Tall enough for the legend too: a run can meet every reason code and error kind.
    fig, ax = _figure(9.0, max(2.5, 1.2 + 0.45 * len(rows), _legend_height(len(reasons))))
    y = np.arange(len(rows))
    left = np.zeros(len(rows))
    for reason in reasons:
        widths = np.array([float(rej.get(reason, 0)) for _, rej in rows])
        ax.barh(y, widths, left=left, color=colors[reason], label=reason, height=0.6)
        left += widths
    for i in range(len(rows)):
        ax.text(left[i], i, f"  {int(left[i]):,}", va="center", fontsize=8)
    ax.set_yticks(y, [name for name, _ in rows])
    ax.invert_yaxis()
    ax.set_title(title)
    ax.set_xlabel("attempts")
    ax.set_xlim(0, float(left.max()) * 1.12)
    ax.grid(axis="x", alpha=0.3)
    _legend_outside(ax)
    return _save(fig, path)


def outcome_matrix(summary: Mapping[str, Any], path: Path) -> Path:
    """Expected versus observed outcomes; false accepts in red whatever their count."""
    title = "Expected vs observed outcome"
    matrix: Mapping[str, Mapping[str, int]] = summary["matrix"]
    if not matrix:
        return _no_data(path, title)
    expected = sorted(matrix)
    observed = sorted(
        {o for row in matrix.values() for o in row}, key=lambda o: (o != "allowed", o)
    )
    counts = np.array([[matrix[e].get(o, 0) for o in observed] for e in expected], dtype=float)
    peak = math.log1p(counts.max())
    image = np.ones((len(expected), len(observed), 4))
    for i, e in enumerate(expected):
        for j, o in enumerate(observed):
            n = counts[i, j]
            if not n:
                continue
            if e.startswith("denied") and o == "allowed":
                image[i, j] = to_rgba(FALSE_ACCEPT_COLOR)  # always full strength: never fade
                continue
            base = ALLOWED_COLOR if e == o else "#ff7f0e"
            strength = 0.25 + 0.75 * math.log1p(n) / peak
            image[i, j] = to_rgba(base, alpha=strength)
    fig, ax = _figure(
        min(max(6.0, 2.5 + 1.3 * len(observed)), 16.0),
        min(max(3.0, 1.8 + 0.6 * len(expected)), 12.0),
    )
    ax.imshow(image, aspect="auto", interpolation="nearest")
    for i, e in enumerate(expected):
        for j, o in enumerate(observed):
            n = int(counts[i, j])
            if not n:
                continue
            false_accept = e.startswith("denied") and o == "allowed"
            label = f"{n}\nFALSE ACCEPT" if false_accept else str(n)
            ax.text(
                j,
                i,
                label,
                ha="center",
                va="center",
                fontsize=9,
                fontweight="bold" if false_accept else "normal",
                color="#ffffff" if false_accept else "#000000",
            )
    # Thin cell borders, so neighbouring cells of one colour stay apart.
    ax.set_xticks(np.arange(-0.5, len(observed)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(expected)), minor=True)
    ax.grid(which="minor", color="#cccccc", lw=0.8)
    ax.tick_params(which="minor", length=0)
    ax.set_xticks(range(len(observed)), observed, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(expected)), expected, fontsize=8)
    ax.set_xlabel("observed")
    ax.set_ylabel("expected")
    ax.set_title(title)
    return _save(fig, path)


PlotFunction = Callable[[Mapping[str, Any], Path], Path]
# File name, caption and function of every figure, in report order.
PLOTS: tuple[tuple[str, str, PlotFunction], ...] = (
    ("outcome_matrix.png", "Expected vs observed outcome", outcome_matrix),
    ("latency_over_time.png", "Total latency over time", latency_over_time),
    ("attempts_per_second.png", "Attempts per second by outcome", attempts_per_second),
    ("latency_cdf.png", "Total latency distribution per cohort", latency_cdf),
    ("phase_breakdown.png", "Handshake phase breakdown", phase_breakdown),
    ("rejections.png", "Rejections by reason", rejections),
)


def render_all(summary: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """Draw every figure into ``out_dir``; return file name to path."""
    return {name: draw(summary, out_dir / name) for name, _, draw in PLOTS}
