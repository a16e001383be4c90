"""A run's verdict: its declared thresholds plus the gates that no run goes without.

Theory of operation. A threshold a user did not think of must not be a hole in the verdict: a
load test against a URL whose certificate the devices cannot verify, or a run where devices
that should be kept out got in, used to exit 0 when nobody had written a threshold for it.
So every run, ``testbed run`` and ``testbed load`` alike, is judged on three gates besides what
it declares:

- ``false_accepts == 0``, unless a declared threshold already judges ``false_accepts`` (that
  one replaces the gate: a user can loosen it, not forget it);
- ``errors <= 1%`` (timeouts, refused connections, failed handshakes, 5xx: attempts that
  reached no decision and did not expect that failure), unless a declared threshold judges
  ``errors``; ``--max-errors`` sets the share on either command and is then always judged;
- ``decisions > 0``: at least one attempt reached a decision (or the outcome it expected).
  When none did, the observed value names the likely cause, such as ``every TLS handshake
  failed: certificate verify failed; pass --ca``.

Gates are recorded with the declared thresholds (marked ``(default)``), so ``summary.json``,
the reports and ``junit.xml`` show them, and any failure makes the exit code 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape

from testbed.thresholds import Threshold, evaluate, parse_threshold

DEFAULT_MAX_ERRORS = 0.01
DECISIONS_GATE = "decisions > 0"


def gates(
    declared: Sequence[Threshold],
    *,
    max_errors: float | None = None,
    error_budget: bool = True,
) -> list[Threshold]:
    """The declared thresholds followed by the default gates they do not already cover.

    ``max_errors`` set (a share, 0..1) always adds its error gate; left ``None``, the 1% gate
    is added only when no declared threshold judges ``errors``. ``error_budget=False`` leaves
    the error gate out (step runs judge errors step by step).
    """
    judged = {t.metric for t in declared}
    out = list(declared)
    if "false_accepts" not in judged:
        out.append(_default("false_accepts == 0"))
    if error_budget and (max_errors is not None or "errors" not in judged):
        share = DEFAULT_MAX_ERRORS if max_errors is None else max_errors
        out.append(_default(f"errors <= {share * 100:g}%"))
    if "decisions" not in judged:
        out.append(_default(DECISIONS_GATE))
    return out


def _default(text: str) -> Threshold:
    t = parse_threshold(text, ())
    return Threshold(f"{t.text} (default)", t.metric, t.op, t.value, t.of_attempts)


def judge(
    thresholds: Sequence[Threshold],
    summary: Mapping[str, Any],
) -> list[tuple[str, str, bool]]:
    """(threshold, observed, held) for each; a failed ``decisions`` gate names the likely cause."""
    from testbed.summary import metric

    verdicts = evaluate(thresholds, summary, metric)
    out = []
    for t, (text, observed, ok) in zip(thresholds, verdicts, strict=True):
        if t.metric == "decisions" and not ok:
            observed = f"{observed}: {no_decision_cause(summary)}"
        out.append((text, observed, ok))
    return out


# What the devices saw when nothing reached a decision -> the likely cause, checked in order
# against the error's text and the outcome's name. ``{ca}`` and ``{hostname}`` are hints in the
# words of the command that ran; ``{what}`` is the outcome.
_CAUSES: tuple[tuple[str, str], ...] = (
    ("hostname mismatch", "the target's certificate is not for the name sent; {hostname}"),
    ("certificate_verify_failed", "certificate verify failed; {ca}"),
    ("tls_error:", "{what}; check that the target speaks TLS there and accepts the SNI sent"),
    ("timeout", "no answer within the attempt's timeout; is the target serving on that port?"),
    ("connect_error", "no connection could be made; is the target listening?"),
    ("http_5", "the target answered {what}, an error of its own (is its origin up?)"),
    ("key_store_error:", "the devices' key stores failed ({what}) before any handshake"),
)
_HINTS = {
    "load": {
        "ca": "pass --ca with the CA that signed the target's server certificate",
        "hostname": "pass --hostname with a name the target's certificate holds",
    },
    "run": {
        "ca": "set target.ca in the scenario to the CA that signed the target's certificate",
        "hostname": (
            "set target.hostname (or each [[target.applications]]'s hostname) in the scenario"
            " to a name its certificate holds"
        ),
    },
}


def no_decision_cause(summary: Mapping[str, Any]) -> str:
    """Why no attempt of a run reached a decision, in words a user can act on."""
    totals = summary["totals"]
    attempts, dropped = totals["attempts"], totals["dropped"]
    if not attempts:
        if dropped:
            return f"no attempt was made: all {dropped:,} were dropped (no free device)"
        return "no attempt was made"
    outcomes: Mapping[str, int] = totals["outcomes"]
    top, count = max(outcomes.items(), key=lambda kv: kv[1])
    example = (totals.get("error_examples") or {}).get(top) or ""
    meta = summary["run"].get("meta") or {}
    hints = _HINTS["load" if "load" in meta else "run"]
    if top.startswith("tls_error:"):
        lead = "every TLS handshake failed" if count == attempts else "TLS handshakes failed"
        what = top.removeprefix("tls_error:").replace("_", " ")
    else:
        lead = f"every attempt ended in {top}" if count == attempts else f"most ended in {top}"
        what = top
    cause = what
    for needle, text in _CAUSES:
        if needle in example.lower() or needle in top:
            cause = text.format(what=what, **hints)
            break
    detail = f" (the devices saw: {example})" if example else ""
    return f"{lead}: {cause}{detail}"


def print_failures(verdicts: Sequence[tuple[str, str, bool]], console: Console) -> None:
    """Print each failed threshold or gate on one line (stderr in the CLI), so a log shows why."""
    for text, observed, ok in verdicts:
        if not ok:
            console.print(
                f"[bold red]FAILED[/] {escape(text)}: {escape(observed)}",
                highlight=False,
                soft_wrap=True,
            )
