"""h2 and gRPC devices through the embedded enforcer (``testbed load --protocol``, scenarios
with ``client.protocol``, No Duration on h2).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.testbed.test_load_cli import load, rows
from tests.testbed.test_protocols import scenario, small_fleet
from tests.testbed.test_run import run_cli


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four healthy devices and two expired ones."""
    return small_fleet(tmp_path_factory.mktemp("protocols-enforcer") / "fleet")


# -- the embedded enforcer ------------------------------------------------------------------------


def test_grpc_load_through_the_embedded_enforcer(fleet: Path, tmp_path: Path) -> None:
    result, run_dir = load(
        tmp_path / "reports",
        *("--target", "embedded", "--fleet", str(fleet), "--protocol", "grpc"),
        *("--rate", "10", "--duration", "2s", "--mode", "keepalive", "--json"),
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["false_accepts"] == 0 and figures["errors"] == 0
    # The enforcer's gRPC denial carries the reason: the expired devices match the inventory.
    assert set(figures["outcomes"]) == {"allowed", "denied:certificate_expired"}
    assert run_dir is not None
    seen = rows(run_dir, "SELECT DISTINCT grpc_status FROM attempts ORDER BY 1")
    assert seen == [("OK",), ("UNAUTHENTICATED",)]


def test_h2_load_through_the_embedded_enforcer(fleet: Path, tmp_path: Path) -> None:
    result, _ = load(
        tmp_path / "reports",
        *("--target", "embedded", "--fleet", str(fleet), "--protocol", "h2"),
        *("--rate", "10", "--duration", "2s", "--mode", "keepalive", "--json"),
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert set(figures["outcomes"]) == {"allowed", "denied:certificate_expired"}


def test_no_duration_means_a_handshake_per_h2_request(tmp_path: Path) -> None:
    # session_duration 0s: the enforcer sends GOAWAY after each stream; the kept-alive h2
    # devices reconnect, so every attempt is a new connection with a full handshake.
    path = scenario(
        tmp_path,
        client='protocol = "h2", keep_alive = true, reuse_cookie = true',
        target="embedded",
        expired="",
        thresholds=["false_accepts == 0", "cohort.healthy.matched == 100%"],
    )
    path.write_text(
        path.read_text().replace('kind = "embedded"', 'kind = "embedded"\nsession_duration = "0s"')
    )
    reports = tmp_path / "reports"
    result = run_cli("run", str(path), "--reports", str(reports), "--no-progress")
    assert result.returncode == 0, result.stderr
    (run_dir,) = reports.iterdir()
    ((attempts, new),) = rows(
        run_dir, "SELECT count(*), sum(new_connection) FROM attempts WHERE cohort = 'healthy'"
    )
    assert attempts > 0 and new == attempts


def test_h2_devices_in_virtual_time(tmp_path: Path) -> None:
    path = scenario(
        tmp_path,
        client='protocol = "h2"',
        target="embedded",
        clock="virtual",
        expired="",
        duration="60s",
        thresholds=["false_accepts == 0", "cohort.healthy.matched == 100%"],
    )
    reports = tmp_path / "reports"
    result = run_cli("run", str(path), "--reports", str(reports), "--no-progress")
    assert result.returncode == 0, result.stderr
    (run_dir,) = reports.iterdir()
    assert rows(run_dir, "SELECT DISTINCT protocol FROM attempts") == [("h2",)]
