"""The Dask engine's overhead: a load run with ``--cluster local:2`` beside ``--workers 2``.

Both run the same closed loop (``--closed N``: N devices, back to back, a new connection and a
full handshake with its own certificate for every request) against the same kind of target
(the embedded enforcer, started by the client, one process) for the same ``--duration``, one
after the other in one run, alternating (workers, cluster, cluster, workers, ... ``--rounds``
each) so a neighbour's load hits both alike. The figure is handshakes per wall second of the
schedule (attempts / the run's duration), read from ``testbed load --json``; the ratio
cluster/workers is the engine's cost: 1.0 means Dask adds nothing once the shards run.

What the ratio leaves out, printed beside it: the wall time of the whole command, which for
``local:2`` includes starting and stopping a LocalCluster (a few seconds; a long-running
``dask scheduler`` costs it once, not per run), and shipping the fleet slices.

    .venv/bin/python bench/cluster.py [--duration 10] [--rounds 1] [--devices 40]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from devices.provision import Cohort, provision

ROOT = Path(__file__).resolve().parents[1]


def load(fleet: Path, reports: Path, duration: float, devices: int, how: list[str]) -> dict:
    """One ``testbed load`` run; its figures and the command's wall time."""
    began = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "testbed.cli",
            "load",
            "--fleet",
            str(fleet),
            "--target",
            "embedded",
            "--closed",
            str(devices),
            "--duration",
            f"{duration}s",
            "--reports",
            str(reports),
            "--no-progress",
            "--json",
            *how,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    wall = time.perf_counter() - began
    if result.returncode != 0:
        sys.exit(f"{' '.join(how)}: exit {result.returncode}\n{result.stderr[-2000:]}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    attempts = figures["attempts"]
    return {
        "attempts": attempts,
        "per_s": attempts / figures["duration_s"],
        "command_s": wall,
        "outcomes": figures["outcomes"],
    }


def main() -> None:
    """Measure, print the figures, the ratio and the command that reruns it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--devices", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fleet = Path(tmp) / "fleet"
        provision(fleet, [Cohort("healthy", args.devices)], dt.datetime.now(dt.UTC), p12=False)
        runs: dict[str, list[dict]] = {"workers": [], "cluster": []}
        order = ["workers", "cluster"]
        for r in range(args.rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                how = ["--workers", "2"] if name == "workers" else ["--cluster", "local:2"]
                runs[name].append(load(fleet, Path(tmp) / "r", args.duration, args.devices, how))
    for name, label in (("workers", "--workers 2"), ("cluster", "--cluster local:2")):
        rates = [x["per_s"] for x in runs[name]]
        command = statistics.median(x["command_s"] for x in runs[name])
        print(
            f"{label:>18}: {statistics.median(rates):7.1f} handshakes/s"
            f" (runs: {', '.join(f'{x:.1f}' for x in rates)}; command {command:.1f} s wall)"
        )
    ratio = statistics.median(x["per_s"] for x in runs["cluster"]) / statistics.median(
        x["per_s"] for x in runs["workers"]
    )
    print(f"ratio cluster/workers: {ratio:.2f} (1.0: Dask costs nothing once the shards run)")
    print(
        "rerun: .venv/bin/python bench/cluster.py"
        f" --duration {args.duration:g} --rounds {args.rounds} --devices {args.devices}"
    )


if __name__ == "__main__":
    main()
