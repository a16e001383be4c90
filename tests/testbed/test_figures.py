"""How figures and false accepts read in reports: plain numbers, and every false accept marked."""

from __future__ import annotations

import pytest

from testbed.report import _matrix_html
from testbed.thresholds import plain_number


@pytest.mark.parametrize(
    ("value", "text"),
    [(29530.0, "29530"), (0.0, "0"), (12.3456, "12.346"), (0.975, "0.975"), (0.00037, "0.00037")],
)
def test_threshold_figures_are_plain_numbers(value: float, text: str) -> None:
    # A virtual week's attempts once read 2.953e+04; the text must stay a number for float().
    assert plain_number(value) == text
    assert float(plain_number(value)) == pytest.approx(value, rel=1e-3)


def test_the_matrix_marks_every_false_accept() -> None:
    # nginx's expectation for an unverifiable certificate is http_400, not denied:*: a device
    # expected refused that got in is a false accept whatever the form of its expectation.
    summary = {"matrix": {"http_400": {"allowed": 2}, "allowed": {"allowed": 5}}}
    html = _matrix_html(summary)
    rows = html.split("<tr>")
    nginx_row = next(r for r in rows if "http_400</code></td>" in r or "<code>http_400" in r)
    assert " fa" in nginx_row
    healthy = next(r for r in rows if r.count("allowed") and "http_400" not in r and "<td" in r)
    assert " fa" not in healthy
