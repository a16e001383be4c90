"""Runs split between processes: shards' results merged into one database, same outcomes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest
import trio

from testbed.results import AttemptRow, Results, ResultsWriter, merge_shards, shard_results
from tests.testbed.test_run import ROOT, TESTBED, _attempts, run_cli, signal_when, small


def _row(device: str, outcome: str, t: float) -> AttemptRow:
    return AttemptRow(
        device=device,
        cohort="healthy",
        phase="steady",
        expected="allowed",
        scheduled=t,
        started=t,
        connect_ms=1.0,
        key_store_ms=0.0,
        handshake_ms=2.0,
        first_byte_ms=3.0,
        service_ms=4.0,
        total_ms=4.0,
        outcome=outcome,
        status=200 if outcome == "allowed" else 403,
        reason=None if outcome == "allowed" else "revoked",
        new_connection=True,
        resumed=False,
    )


def test_merged_shards_equal_the_sum_of_their_parts(tmp_path: Path) -> None:
    parts = {0: (5, 2), 1: (7, 0), 2: (0, 3)}  # shard: (attempts, dropped)
    for shard, (attempts, dropped) in parts.items():
        writer = ResultsWriter(shard_results(tmp_path, shard))
        writer.event(0.0, "phase", "steady")
        for i in range(attempts):
            writer.attempt(_row(f"s{shard}-d{i}", "allowed" if i % 3 else "denied:revoked", i))
        for i in range(dropped):
            writer.dropped(float(i), "-", "steady")
        writer.close()

    assert merge_shards(tmp_path) == 3
    assert merge_shards(tmp_path) == 0  # merged once: a second merge adds nothing

    results = Results(tmp_path / "results.sqlite")
    try:
        rows = list(results.attempts())
        assert len(rows) == sum(a for a, _ in parts.values())
        assert sorted(r.device for r in rows) == sorted(
            f"s{s}-d{i}" for s, (a, _) in parts.items() for i in range(a)
        )
        assert len(results.dropped()) == sum(d for _, d in parts.values())
        assert results.events() == [(0.0, "phase", "steady")]  # the shared timeline, once
    finally:
        results.close()


def _per_device(run_dir: Path) -> list[tuple[str, str, int]]:
    con = sqlite3.connect(run_dir / "results.sqlite")
    try:
        return sorted(con.execute("SELECT device, outcome, count(*) FROM attempts GROUP BY 1, 2"))
    finally:
        con.close()


def test_a_virtual_run_split_between_processes_has_the_same_outcomes(tmp_path: Path) -> None:
    # Active devices and revocations are drawn from the whole fleet, so splitting it between
    # processes changes nothing a device sees, event included.
    path = small(
        tmp_path,
        name="split",
        clock="virtual",
        seed=5,
        duration="6h",
        arrival="active",
        arrival_fields="devices = 9",
        interval=600.0,
    )
    path.write_text(
        path.read_text()
        + '\n[[events]]\nat = "3h"\naction = "revoke"\ncohort = "healthy"\nshare = 0.5\n'
    )
    outcomes = {}
    for workers in (1, 2):
        reports = tmp_path / f"r{workers}"
        result = run_cli(
            "run", str(path), "--reports", str(reports), "--no-progress", "--workers", str(workers)
        )
        assert result.returncode == 0, result.stdout + result.stderr
        outcomes[workers] = _per_device(next(reports.glob("split-*")))
    assert outcomes[1] == outcomes[2]
    revoked = {d for d, outcome, _ in outcomes[2] if outcome == "denied:revoked"}
    assert len(revoked) == 2 + 3  # the revoked cohort, and half of the six healthy devices
    assert len({d for d, _, _ in outcomes[2]}) == 9


def test_more_workers_than_one_on_the_real_clock_is_refused(tmp_path: Path) -> None:
    result = run_cli(
        "run", str(small(tmp_path)), "--reports", str(tmp_path / "r"), "--workers", "2"
    )
    assert result.returncode == 2
    assert "virtual clock only" in result.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
async def test_a_split_run_stopped_midway_is_still_reported(tmp_path: Path, how: str) -> None:
    path = small(
        tmp_path,
        name=f"stopped-{how.lower()}",
        clock="virtual",
        duration="2000h",  # far longer than the test waits
        arrival="active",
        arrival_fields="devices = 10",
        interval=60.0,
    )
    reports = tmp_path / "r"

    def ready() -> bool:
        shards = list(reports.glob("*/shards/*-results.sqlite"))
        return len(shards) == 2 and all(_attempts(db) >= 20 for db in shards)

    args = ["run", str(path), "--reports", str(reports), "--no-progress", "--workers", "2"]
    code = await signal_when(args, ready, how)
    shards = sorted(reports.glob("*/shards/*-results.sqlite"))
    # Ctrl-C stops the shards; SIGKILL kills the parent and the kernel stops its shards. Either
    # way, what they wrote stops growing.
    assert code == (130 if how == "SIGINT" else -signal.SIGKILL)
    with trio.fail_after(30):
        while True:
            before = [_attempts(db) for db in shards]
            await trio.sleep(1.0)
            if [_attempts(db) for db in shards] == before:
                break
    run_dir = shards[0].parents[1]
    result = run_cli("report", str(run_dir))
    assert result.returncode == 0, result.stderr
    assert _attempts(run_dir / "results.sqlite") == sum(before)
    assert "interrupted" in (run_dir / "report.html").read_text().lower()


def _run_in_terminal(args: list[str], timeout: float = 180) -> tuple[int, str]:
    """Run the CLI on a pseudo-terminal, as a user does, and return its exit code and screen."""
    import pty
    import select
    import time

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [*TESTBED, *args], cwd=ROOT, stdin=slave, stdout=slave, stderr=slave, close_fds=True
    )
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return proc.wait(), b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("workers", [1, 2])
def test_the_live_display_shows_outcomes_as_they_come(tmp_path: Path, workers: int) -> None:
    if workers == 1:
        path = small(tmp_path, name="live", duration="4s")
    else:
        path = small(
            tmp_path,
            name="live",
            clock="virtual",
            duration="40h",  # about 2,400 attempts: a few seconds of wall time
            arrival="active",
            arrival_fields="devices = 10",
            interval=600.0,
        )
    code, screen = _run_in_terminal(
        ["run", str(path), "--reports", str(tmp_path / "r"), "--workers", str(workers)]
    )
    assert code == 0, screen
    # The live table's title and rows, drawn while the run went on (the final summary has
    # neither the "s of" title nor the dropped row).
    assert "live: " in screen and " s of " in screen
    assert "dropped" in screen and "allowed" in screen
    assert "denied:certificate_expired" in screen
    if workers == 2:
        assert "(2 shards)" in screen
