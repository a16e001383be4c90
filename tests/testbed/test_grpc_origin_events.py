"""A gRPC fleet's origin is the telemetry service the run starts: ``stop_origin`` stops it
(nginx answers 502, which grpcio reports as UNAVAILABLE) and ``start_origin`` serves it again
on the same port."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.nginx import NGINX
from tests.testbed.test_load_cli import rows
from tests.testbed.test_run import run_cli

SCENARIO = """\
name = "grpc-origin"
seed = 5
clock = "real"
thresholds = ["false_accepts == 0", "errors < 100%"]

[target]
kind = "nginx"

[[cohorts]]
name = "healthy"
size = 4
client = { protocol = "grpc" }

[[phases]]
name = "steady"
duration = "3s"
arrival = "constant"
rate = 10

[[events]]
at = "1s"
action = "stop_origin"

[[events]]
at = "2s"
action = "start_origin"
"""


@pytest.mark.skipif(NGINX is None, reason="nginx is installed by .ci/run")
def test_stop_and_start_the_telemetry_service(tmp_path: Path) -> None:
    path = tmp_path / "grpc-origin.toml"
    path.write_text(SCENARIO)
    reports = tmp_path / "reports"
    result = run_cli("run", str(path), "--reports", str(reports), "--no-progress")
    assert result.returncode == 0, result.stderr
    (run_dir,) = reports.iterdir()
    seen = rows(
        run_dir,
        "SELECT outcome, grpc_status, min(started), max(started) FROM attempts"
        " GROUP BY outcome, grpc_status ORDER BY outcome",
    )
    assert [(o, s) for o, s, _, _ in seen] == [("allowed", "OK"), ("http_502", "UNAVAILABLE")]
    (_, _, first_ok, last_ok), (_, _, first_down, last_down) = seen
    # Served before the stop, unavailable after it, and served again after the start.
    assert first_ok < first_down and last_down < last_ok
