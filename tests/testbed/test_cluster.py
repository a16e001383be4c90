"""`--cluster`: load and virtual runs on a real Dask scheduler and two real workers (loopback)."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from devices.provision import Cohort, provision
from testbed.nginx import NGINX, free_port
from testbed.results import shard_results
from tests.testbed.test_run import ROOT, TESTBED, _attempts, run_cli, small

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[int], Path]]:
    """A `dask scheduler` and two `dask worker` processes (no nanny: a killed one stays dead)."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("Dask distributed is missing on CI (the test extra installs it)")
        pytest.skip("pip install -e '.[test]' installs Dask distributed")
    folder = tmp_path_factory.mktemp("dask")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = (folder / "dask.log").open("wb")
    scheduler = subprocess.Popen(
        [BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        stdout=logs,
        stderr=logs,
        cwd=ROOT,
    )
    workers = [
        subprocess.Popen(
            [
                BIN / "dask",
                "worker",
                address,
                "--nthreads",
                "1",
                "--no-nanny",
                "--no-dashboard",
                "--host",
                "127.0.0.1",
                "--name",
                f"w{k}",
                "--local-directory",
                str(folder / f"w{k}"),
            ],
            stdout=logs,
            stderr=logs,
            cwd=ROOT,
        )
        for k in range(2)
    ]
    try:
        _wait_for_workers(address, 2)
        yield address, [w.pid for w in workers], folder
    finally:
        for p in [*workers, scheduler]:
            p.terminate()
        for p in [*workers, scheduler]:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        logs.close()


def _wait_for_workers(address: str, n: int) -> None:
    # A separate process: the test process keeps no Dask client (and none of its warnings).
    code = (
        "import sys; from distributed import Client\n"
        f"c = Client({address!r}, timeout=30); c.wait_for_workers({n}, timeout=60); c.close()"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=ROOT)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twenty healthy devices and four expired ones (test_load.py's fleet)."""
    root = tmp_path_factory.mktemp("cluster") / "fleet"
    cohorts = [Cohort("healthy", 20), Cohort("expired", 4, "expired")]
    provision(root, cohorts, dt.datetime.now(dt.UTC), p12=False, workers=1)
    return root


def _rows(db: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return sorted(con.execute(sql))
    finally:
        con.close()


def _meta(run_dir: Path, key: str) -> object:
    row = _rows(run_dir / "results.sqlite", f"SELECT value FROM run WHERE key = '{key}'")
    return json.loads(row[0][0]) if row else None


def _load(fleet: Path, reports: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    result = run_cli(
        "load", "--fleet", str(fleet), "--reports", str(reports), "--no-progress", *args
    )
    runs = sorted(reports.glob("load-*"))
    return result, runs[-1] if runs else reports


def _devices_and_counts(run_dir: Path) -> tuple[list[tuple], list[tuple]]:
    db = run_dir / "results.sqlite"
    return (
        _rows(db, "SELECT DISTINCT device FROM attempts"),
        _rows(db, "SELECT cohort, outcome, count(*) FROM attempts GROUP BY 1, 2"),
    )


@pytest.mark.parametrize("target", ["embedded", "nginx"])
def test_a_load_on_the_cluster_equals_two_local_workers(
    cluster: tuple[str, list[int], Path], fleet: Path, tmp_path: Path, target: str
) -> None:
    if target == "nginx" and NGINX is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is missing on CI (.ci/run installs it)")
        pytest.skip("nginx is installed by .ci/run")
    address, _, _ = cluster
    shape = ("--target", target, "--rate", "10", "--duration", "3s")
    results = {}
    for how in (("--workers", "2"), ("--cluster", address)):
        result, run_dir = _load(fleet, tmp_path / how[0].strip("-"), *shape, *how)
        assert result.returncode == 0, result.stdout + result.stderr
        results[how[0]] = _devices_and_counts(run_dir)
    assert results["--cluster"] == results["--workers"]
    devices, counts = results["--cluster"]
    assert len(devices) > 2
    assert sum(n for _, _, n in counts) == 30
    expired = "denied:certificate_expired" if target == "embedded" else "http_400"
    assert {(c, o) for c, o, _ in counts} == {("healthy", "allowed"), ("expired", expired)}
    # Both workers ran a shard, started together, and streamed their rows back.
    report = _meta(run_dir, "cluster")
    assert isinstance(report, dict)
    assert sorted(s["worker"] for s in report["shards"]) == report["workers"]
    assert all(s["state"] == "done" and s["rows"] > 0 for s in report["shards"])
    assert report["start_skew_s"] >= 0 and report["lost_shards"] == []
    # The slice shipped to a shard holds its devices only: about half the fleet.
    assert all(s["shipped_bytes"] > 0 for s in report["shards"])


def test_a_virtual_run_on_the_cluster_equals_the_local_run(
    cluster: tuple[str, list[int], Path], tmp_path: Path
) -> None:
    address, _, _ = cluster
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
    for how in (("--workers", "2"), ("--cluster", address)):
        reports = tmp_path / how[0].strip("-")
        result = run_cli("run", str(path), "--reports", str(reports), "--no-progress", *how)
        assert result.returncode == 0, result.stdout + result.stderr
        db = next(reports.glob("split-*")) / "results.sqlite"
        outcomes[how[0]] = _rows(db, "SELECT device, outcome, count(*) FROM attempts GROUP BY 1, 2")
    assert outcomes["--cluster"] == outcomes["--workers"]
    assert len({d for d, _, _ in outcomes["--cluster"]}) == 9
    assert any(o == "denied:revoked" for _, o, _ in outcomes["--cluster"])


def test_a_target_the_workers_cannot_reach_is_refused(
    cluster: tuple[str, list[int], Path], fleet: Path, tmp_path: Path
) -> None:
    address, _, _ = cluster
    closed = free_port()  # nothing listens there
    result, _ = _load(
        fleet,
        tmp_path,
        *("--target", f"https://127.0.0.1:{closed}/", "--ca", str(fleet / "ca" / "upload.pem")),
        *("--rate", "5", "--duration", "2s", "--cluster", address),
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"127.0.0.1:{closed} is not reachable from every Dask worker" in result.stderr


def test_without_dask_cluster_says_how_to_install_it(fleet: Path, tmp_path: Path) -> None:
    # A `distributed` package that fails to import, first on the path: Dask is "not installed".
    shadow = tmp_path / "shadow" / "distributed"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no Dask here')\n")
    env = {**os.environ, "PYTHONPATH": str(shadow.parent)}
    result = subprocess.run(
        [
            *TESTBED,
            "load",
            "--fleet",
            str(fleet),
            "--target",
            "embedded",
            "--rate",
            "1",
            "--duration",
            "1s",
            "--reports",
            str(tmp_path / "r"),
            "--cluster",
            "local:2",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2
    assert "pip install 'mtls-testbed[cluster]'" in result.stderr
    assert not (tmp_path / "r").exists()


async def test_ctrl_c_stops_every_shard_and_writes_the_report(
    cluster: tuple[str, list[int], Path], fleet: Path, tmp_path: Path
) -> None:
    address, _, folder = cluster
    reports = tmp_path / "r"
    proc = await _started_load(fleet, reports, address, "120s", "--keys-in-memory")
    # --keys-in-memory: the shards' device keys are in RAM (/dev/shm), none in the workers'
    # own directories on disk.
    in_ram = list(Path("/dev/shm").glob("testbed-shard-*/run*/devices/*/key.pem"))
    in_ram += list(Path("/dev/shm").glob("testbed-shard-*/fleet*/devices/*/key.pem"))
    assert len(in_ram) >= 24
    assert not list(folder.glob("w*/**/key.pem"))
    proc.send_signal(signal.SIGINT)
    with trio.fail_after(60):
        code = await proc.wait()
    assert code == 130
    run_dir = _run(reports)
    assert (run_dir / "report.html").exists()
    report = _meta(run_dir, "cluster")
    assert isinstance(report, dict)
    # Both shards stopped and handed in their rows: the run holds exactly what they streamed.
    assert all(s["state"] == "done" for s in report["shards"])
    merged = _attempts(run_dir / "results.sqlite")
    assert merged == sum(_attempts(shard_results(run_dir, k)) for k in (0, 1))
    assert 0 < merged < 10 * 120


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (("--cluster", "local:0"), "expected tcp://HOST:PORT or local:N"),
        (("--keys-in-memory",), "--keys-in-memory: only with --cluster"),
    ],
)
def test_bad_cluster_options_exit_2(
    fleet: Path, tmp_path: Path, args: tuple[str, ...], problem: str
) -> None:
    result, _ = _load(
        fleet, tmp_path, "--target", "embedded", "--rate", "1", "--duration", "1s", *args
    )
    assert result.returncode == 2
    assert problem in result.stderr
    assert not list(tmp_path.glob("load-*"))


@pytest.mark.slow
def test_a_local_cluster_runs_the_load(fleet: Path, tmp_path: Path) -> None:
    result, run_dir = _load(
        fleet,
        tmp_path,
        *("--target", "embedded", "--rate", "10", "--duration", "2s", "--cluster", "local:2"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = _meta(run_dir, "cluster")
    assert isinstance(report, dict)
    assert len(report["workers"]) == 2 and len(report["shards"]) == 2
    assert _attempts(run_dir / "results.sqlite") == 20


async def _started_load(
    fleet: Path, reports: Path, address: str, duration: str, *args: str
) -> trio.Process:
    """A load at 10/s on the cluster, once both shards have streamed a few attempts."""
    command = ["load", "--fleet", str(fleet), "--reports", str(reports), "--no-progress"]
    command += ["--target", "embedded", "--rate", "10", "--duration", duration]
    proc = await trio.lowlevel.open_process(
        [*TESTBED, *command, "--cluster", address, *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with trio.fail_after(60):
        while not all(_attempts(shard_results(_run(reports), k)) >= 3 for k in (0, 1)):
            await trio.sleep(0.2)
    return proc


def _run(reports: Path) -> Path:
    runs = sorted(reports.glob("load-*"))
    return runs[-1] if runs else reports / "none"


# Last in the module: it kills one of the fixture's workers for good.
async def test_a_killed_worker_is_reported_lost_and_never_rerun(
    cluster: tuple[str, list[int], Path], fleet: Path, tmp_path: Path
) -> None:
    address, pids, _ = cluster
    reports = tmp_path / "r"
    proc = await _started_load(fleet, reports, address, "8s")
    os.kill(pids[1], signal.SIGKILL)
    with trio.fail_after(90):
        code = await proc.wait()
    assert code == 2
    run_dir = _run(reports)
    lost = _meta(run_dir, "lost_shards")
    assert isinstance(lost, list) and len(lost) == 1
    report = _meta(run_dir, "cluster")
    assert isinstance(report, dict)
    states = {s["shard"]: s["state"] for s in report["shards"]}
    assert sorted(states.values()) == ["done", "lost"]
    # The survivor ran its whole schedule; the lost shard kept what it streamed, and ran once.
    survivor = next(k for k, s in states.items() if s == "done")
    victim = lost[0]["shard"]
    assert lost[0]["worker"] == report["shards"][victim]["worker"]
    assert _attempts(shard_results(run_dir, survivor)) >= 30
    assert 3 <= _attempts(shard_results(run_dir, victim)) < 40
    assert _attempts(run_dir / "results.sqlite") == sum(
        _attempts(shard_results(run_dir, k)) for k in (0, 1)
    )
    assert (run_dir / "report.html").exists()
