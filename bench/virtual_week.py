"""A virtual week's cost per attempt: this build beside the build before issue 18's work on it.

``testbed run --workers W`` of a week of telemetry in virtual time (the shipped
``scenarios/week-in-virtual-time.toml`` with its cohorts scaled to ``--devices``, or with
``--full`` the shipped 10,000-device ``week-10k-in-virtual-time.toml``), run in turn by this
checkout and by a peer build: ``--baseline CHECKOUT`` (a source tree), by default the tree of
commit ``--baseline-ref`` (8f45cb3, main before this work) exported with ``git archive``.

Why that peer: the same scenario, seed and machine minute on the build before gives the ratio
that answers the goal (CPU per attempt, before vs after) and checks the outcome counts in the
same run (they must be identical: a speed-up that changes outcomes is a bug). A plain loop of
TLS handshakes would give a floor, not the before/after the goal asks for.

Printed per build: wall time of the whole command, CPU-seconds of the whole command (all its
processes: provisioning, shards, report), the shards' CPU from the schedule's start (the
simulation alone), attempts, CPU ms per attempt, and the outcome counts per cohort. Builds
alternate when ``--rounds`` > 1. CPU per attempt is the figure to compare; wall time on this
shared 2-core machine moves with the neighbours.

Rerun: ``.venv/bin/python bench/virtual_week.py`` (200 devices, about 6,000 attempts);
``--full`` for the 10,000-device week (295,432 attempts; minutes per build).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE_REF = "8f45cb3"  # main before issue 18's virtual-time work


def scaled(text: str, devices: int) -> str:
    """The 1,000-device week with every cohort scaled to ``devices`` in all."""
    factor = devices / 1000
    sizes: list[int] = []

    def size(m: re.Match[str]) -> str:
        n = max(1, round(int(m.group(1)) * factor))
        sizes.append(n)
        return f"size = {n}"

    # Cohort sizes are the only `size = N` at the start of a line (a burst's is inline).
    text = re.sub(r"(?m)^size = (\d+)", size, text)
    text = re.sub(r"(?m)^devices = \d+", f"devices = {sum(sizes)}", text)
    text = re.sub(r'(?m)^name = "week-in-virtual-time"', f'name = "week-{devices}"', text)
    return re.sub(r'"attempts > \d+"', '"attempts > 0"', text)


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _db(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def run_once(tree: Path, scenario: Path, workers: int, reports: Path) -> dict[str, object]:
    """Run the scenario with the build in ``tree``; return its figures."""
    python = tree / ".venv" / "bin" / "python"
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [
        str(python if python.exists() else sys.executable),
        "-m",
        "testbed.cli",
        "run",
        "--no-progress",
        "--workers",
        str(workers),
        "--reports",
        str(reports),
        str(scenario),
    ]
    cpu0, t0 = _children_cpu(), time.perf_counter()
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if done.returncode != 0:
        sys.exit(f"{tree}: testbed run exited {done.returncode}:\n{done.stderr[-2000:]}")
    run_dir = next(reports.iterdir())
    db = _db(run_dir / "results.sqlite")
    counts = Counter(
        {
            f"{c}/{o}": n
            for c, o, n in db.execute(
                "SELECT cohort, outcome, count(*) FROM attempts GROUP BY 1, 2"
            )
        }
    )
    db.close()
    metas = (
        [run_dir / "results.sqlite"]
        if workers == 1
        else sorted(run_dir.glob("shards/*-results.sqlite"))
    )
    schedule_cpu = 0.0
    for path in metas:
        db = _db(path)
        row = db.execute("SELECT value FROM run WHERE key = 'cpu_seconds'").fetchone()
        db.close()
        schedule_cpu += float(json.loads(row[0])) if row else 0.0
    attempts = sum(counts.values())
    return {
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "schedule_cpu_s": round(schedule_cpu, 1),
        "attempts": attempts,
        "cpu_ms_per_attempt": round(cpu / attempts * 1000, 3),
        "schedule_cpu_ms_per_attempt": round(schedule_cpu / attempts * 1000, 3),
        "outcomes": dict(sorted(counts.items())),
    }


def export(ref: str, into: Path) -> Path:
    """The source tree of ``ref`` in this repository, exported under ``into``."""
    tree = into / f"baseline-{ref}"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=200, help="fleet size of the scaled week")
    parser.add_argument("--full", action="store_true", help="the shipped 10,000-device week")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="runs per build, alternating")
    parser.add_argument("--baseline", type=Path, help="a source tree of the peer build")
    parser.add_argument("--baseline-ref", default=BASELINE_REF, help="git ref of the peer build")
    parser.add_argument("--no-baseline", action="store_true", help="this build only")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-virtual-week-"))
    try:
        if args.full:
            scenario = ROOT / "scenarios" / "week-10k-in-virtual-time.toml"
        else:
            scenario = work / f"week-{args.devices}.toml"
            text = (ROOT / "scenarios" / "week-in-virtual-time.toml").read_text()
            scenario.write_text(scaled(text, args.devices))
        builds = {"this": ROOT}
        if not args.no_baseline:
            builds["baseline"] = args.baseline or export(args.baseline_ref, work)
        print(f"scenario {scenario.name}, --workers {args.workers}; builds: {builds}", flush=True)
        figures: dict[str, list[dict[str, object]]] = {name: [] for name in builds}
        for r in range(args.rounds):
            for name, tree in builds.items():
                reports = work / f"{name}-{r}"
                reports.mkdir()
                got = run_once(tree, scenario, args.workers, reports)
                figures[name].append(got)
                print(f"round {r + 1} {name}: {json.dumps(got)}", flush=True)
                shutil.rmtree(reports)
        print()
        print(
            "| build | wall s | CPU s | schedule CPU s | attempts | CPU ms/attempt"
            " | schedule CPU ms/attempt |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        best = {}
        for name, runs in figures.items():
            b = min(runs, key=lambda f: float(f["cpu_ms_per_attempt"]))  # type: ignore[arg-type]
            best[name] = b
            print(
                f"| {name} | {b['wall_s']} | {b['cpu_s']} | {b['schedule_cpu_s']} | {b['attempts']}"
                f" | {b['cpu_ms_per_attempt']} | {b['schedule_cpu_ms_per_attempt']} |"
            )
        if "baseline" in best:
            this, base = best["this"], best["baseline"]
            ratio = float(this["cpu_ms_per_attempt"]) / float(base["cpu_ms_per_attempt"])  # type: ignore[arg-type]
            # Builds before 95c6950+1 recorded no cpu_seconds for a virtual run (0.0 here).
            base_sched = float(base["schedule_cpu_ms_per_attempt"])  # type: ignore[arg-type]
            sched = (
                float(this["schedule_cpu_ms_per_attempt"]) / base_sched  # type: ignore[arg-type]
                if base_sched
                else float("nan")
            )
            same = all(f["outcomes"] == base["outcomes"] for runs in figures.values() for f in runs)
            print(
                f"\nCPU per attempt this/baseline: {ratio:.2f} (whole command), {sched:.2f}"
                f" (schedule only); outcome counts identical: {'yes' if same else 'NO'}"
            )
            if not same:
                return 1
        print(f"\nrerun: .venv/bin/python bench/virtual_week.py {' '.join(sys.argv[1:])}".rstrip())
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
