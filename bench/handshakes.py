"""Full mTLS handshakes per second: the enforcer against nginx, same client, same fleet, same run.

Every request is a NEW TCP connection and a full TLS handshake (no session resumption) in
which a device presents its EC P-256 certificate with its chain (leaf + one intermediate), then
sends ``GET /`` with ``Connection: close`` and reads the whole response. The devices come from
a fleet of ``--fleet`` distinct certificates; each client process cycles through its own slice,
and before measuring every device connects once to each server (``--no-warm-fleet`` skips
that), so the measured handshakes are by returning devices (the share is printed), as in a
fleet in its steady state. With N workers each worker has its own caches and the kernel spreads
connections over them (SO_REUSEPORT), so a returning device may be new to the worker it reaches.

Targets, both on 127.0.0.1, both up for the whole run and measured in alternating windows by
the same client processes (see ``harness.py``), for each worker count in ``--workers``:

* the enforcer (``testbed enforcer serve --workers N``) for ``auth.example.test``: it validates
  the chain (or finds it in its validation cache), evaluates the policy, mints a token
  (``Set-Cookie`` and the assertion header), forwards the request to an echo origin (a separate
  process on the same cores) and writes a JSON access-log line. One enforcer per token
  algorithm in ``--algorithms`` (RS256, the default, and ES256), each with its own key and
  state, all measured in the same windows, with ratios to each peer (issue 18 goal 1:
  enforcer / nginx-proxy per server CPU-second >= 0.8 with RS256, >= 1.0 with ES256);
* nginx (``worker_processes N``) with ``ssl_verify_client optional`` against the fleet root
  (depth 2), answering 403 unless ``$ssl_client_verify = SUCCESS``, else ``200 "ok"``.

Compare ratios, never absolute figures: the machine is small, shared and noisy.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import (
    ClientPool,
    Result,
    Window,
    add_window_options,
    client_context,
    cpu_seconds,
    free_port,
    full_handshake_request,
    make_testbed,
    nginx_missing,
    start_enforcer,
    start_nginx,
    start_origin,
    stop,
    summarise,
)
from rich.console import Console
from rich.table import Table

from testbed.demo import AUTH_HOST

REQUEST = f"GET / HTTP/1.1\r\nHost: {AUTH_HOST}\r\nConnection: close\r\n\r\n".encode()


def access_log_summary(path: Path) -> Result:
    """The enforcer's access log: records by status (or TLS error), median phase timings."""
    kinds: collections.Counter[str] = collections.Counter()
    ms: dict[str, list[float]] = {"handshake_ms": [], "decision_ms": [], "total_ms": []}
    if not path.exists():
        return {"records": {}}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            kinds["unparsable line"] += 1
            continue
        if rec.get("event") == "tls_error":
            kinds[f"tls_error: {rec.get('detail')}"] += 1
            continue
        kinds[f"status {rec.get('status')}"] += 1
        for key, values in ms.items():
            if isinstance(rec.get(key), int | float):
                values.append(rec[key])
    medians = {f"median_{k}": round(statistics.median(v), 2) for k, v in ms.items() if v}
    return {"records": dict(kinds.most_common(8)), **medians}


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b rounded, or None when either is missing."""
    return round(a / b, 3) if a and b else None


# Each peer the enforcer is compared with, and the key of the ratio. nginx answers verified
# requests itself; nginx-proxy forwards them to the same echo origin as the enforcer does.
PEERS = (
    ("nginx", "ratio"),
    ("nginx-proxy", "ratio_to_nginx_proxy"),
    ("baseline", "ratio_to_baseline"),
)
ALGORITHMS = ("RS256", "ES256", "EdDSA")
# Issue 18 goal 1: enforcer / nginx-proxy full handshakes per server CPU-second, 1 worker.
GOALS = {"RS256": 0.8, "ES256": 1.0}


def enforcer_name(algorithm: str) -> str:
    """The target name of the enforcer signing its tokens with ``algorithm``."""
    return "enforcer" if algorithm == "RS256" else f"enforcer-{algorithm}"


def ratio_key(key: str, algorithm: str) -> str:
    """The JSON key of a ratio for the enforcer with ``algorithm`` (RS256's keep their names)."""
    return key if algorithm == "RS256" else f"{algorithm}_{key}"


ALGORITHM_OF = {enforcer_name(a): a for a in ALGORITHMS}
TARGETS = (*(enforcer_name(a) for a in ALGORITHMS), "baseline", "nginx", "nginx-proxy")


def measure_workers(
    args: argparse.Namespace, bed: Any, pool: ClientPool, workers: int, console: Console
) -> dict[str, Any]:
    """Start both servers with ``workers`` workers and measure them in alternating windows."""
    servers = {}
    try:
        for alg in args.algorithms:
            proc = start_enforcer(bed, port := free_port(), workers, algorithm=alg)
            servers[enforcer_name(alg)] = (proc, port)
        if args.baseline:
            baseline = start_enforcer(bed, port := free_port(), workers, args.baseline)
            servers["baseline"] = (baseline, port)
        if not args.skip_nginx:
            servers["nginx"] = (start_nginx(bed, port := free_port(), workers), port)
            proxy = start_nginx(bed, port := free_port(), workers, proxy=True)
            servers["nginx-proxy"] = (proxy, port)
        probe = client_context(*bed.devices[0], bed.edge_ca)
        for name, (_, port) in servers.items():
            status = full_handshake_request(probe, port, REQUEST)
            if status != 200:
                raise SystemExit(f"{name}: the first fleet device got {status}, not 200")
        windows: dict[str, list[Result]] = {name: [] for name in servers}
        names = list(servers)
        if args.warm_fleet:
            for name in names:
                console.print(f"  {workers} worker(s): one pass of the fleet through {name} ...")
                pool.warm(f"{name}/{workers}", servers[name][1], REQUEST)
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:  # ABBA: drift hits both alike
                proc, port = servers[name]
                console.print(f"  {workers} worker(s), round {r + 1}: {name} ...")
                # A fresh server per worker count: the clients count first uses per server.
                window = Window(f"{name}/{workers}", port, "handshake", time.monotonic() + 0.2,
                                args.warmup, args.duration, REQUEST)  # fmt: skip
                windows[name].append(pool.run(window, lambda p=proc: cpu_seconds(p.pid)))
    finally:
        for proc, _ in servers.values():
            stop(proc)
    out: dict[str, Any] = {n: summarise(w, args.duration, workers) for n, w in windows.items()}
    for alg in args.algorithms:
        name = enforcer_name(alg)
        for peer, key in PEERS:
            if peer not in out:
                continue
            enf, other, key = out[name], out[peer], ratio_key(key, alg)
            out[key] = ratio(enf["per_s"], other["per_s"])
            out[f"{key}_per_round"] = [
                ratio(len(e["latencies"]), len(n["latencies"]))
                for e, n in zip(windows[name], windows[peer], strict=True)
            ]
            out[f"{key}_per_server_cpu_s"] = ratio(
                enf["per_server_cpu_s"], other["per_server_cpu_s"]
            )
    return out


def goal_lines(results: dict[str, Any]) -> list[str]:
    """Issue 18 goal 1 per algorithm: enforcer / nginx-proxy per server CPU-second, 1 worker."""
    one, lines = results.get("1", {}), []
    for alg, target in GOALS.items():
        got = one.get(f"{ratio_key('ratio_to_nginx_proxy', alg)}_per_server_cpu_s")
        if got is None:
            continue
        verdict = "met" if got >= target else "NOT met"
        lines.append(
            f"goal 1, {alg}: enforcer / nginx-proxy per server CPU-second, 1 worker: {got} "
            f"(goal >= {target}): {verdict}"
        )
    return lines


def main() -> int:
    """Run the benchmark; print its table, ratios, JSON line and rerun command."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    add_window_options(ap)
    ap.add_argument("--workers", default="1,2", help="worker counts to measure (1,2)")
    ap.add_argument("--fleet", type=int, default=500, help="distinct devices (500)")
    ap.add_argument("--skip-nginx", action="store_true", help="measure the enforcer only")
    ap.add_argument(
        "--no-warm-fleet",
        dest="warm_fleet",
        action="store_false",
        help="skip the unmeasured first pass of every device through each server",
    )
    ap.add_argument(
        "--baseline",
        help="another build's testbed executable (e.g. a main checkout's .venv/bin/testbed): "
        "its enforcer is measured in the same windows, and the ratio to it printed",
    )
    ap.add_argument(
        "--algorithms",
        default="RS256,ES256",
        help="token algorithms: one enforcer per algorithm, measured in the same windows "
        f"(RS256,ES256; any of {','.join(ALGORITHMS)})",
    )
    args = ap.parse_args()
    args.algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    if not args.algorithms or set(args.algorithms) - set(ALGORITHMS):
        ap.error(f"--algorithms: a comma-separated list of {', '.join(ALGORITHMS)}")
    worker_counts = [int(w) for w in args.workers.split(",")]
    if args.duration <= 0 or args.clients < 1 or min(worker_counts) < 1 or args.fleet < 1:
        ap.error("--duration must be > 0; --clients, --workers and --fleet 1 or more")
    console = Console(soft_wrap=True, highlight=False, width=170)
    notes: list[str] = []
    if not args.skip_nginx and (why := nginx_missing()):
        notes.append(f"nginx not measured: {why}")
        args.skip_nginx = True
    tmp = Path(tempfile.mkdtemp(prefix="bench-handshakes-"))
    origin_port = free_port()
    console.print(f"provisioning {args.fleet} devices and starting {args.clients} clients ...")
    bed = make_testbed(tmp, args.fleet, free_port(), origin_port)
    origin = start_origin(origin_port)
    pool = ClientPool(args.clients, bed.devices, bed.edge_ca)
    results: dict[str, Any] = {}
    try:
        for workers in worker_counts:
            results[str(workers)] = measure_workers(args, bed, pool, workers, console)
    finally:
        pool.close()
        origin.terminate()
        origin.join(timeout=5)

    table = Table(title=f"Full mTLS handshakes: {args.clients} clients, fleet of {args.fleet}, "
                  f"{args.rounds} x {args.duration:g} s per target")  # fmt: skip
    cols = ("workers", "target", "handshakes/s", "p50 ms", "p99 ms", "errors",
            "per server CPU-s", "server busy", "client CPU", "returning", "ratio")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="left" if col == "target" else "right")
    for workers, res in results.items():
        for name in TARGETS:
            if name not in res:
                continue
            r = res[name]
            table.add_row(
                workers, name, str(r["per_s"]), str(r["p50_ms"]), str(r["p99_ms"]),
                str(r["errors"]), str(r["per_server_cpu_s"]), str(r["server_busy"]),
                str(r["client_cpu_share"]), str(r["returning_share"]),
                str(res.get(ratio_key("ratio", ALGORITHM_OF[name])))
                if name in ALGORITHM_OF else "",
            )  # fmt: skip
    console.print(table)
    for workers, res in results.items():
        for alg in args.algorithms:
            for peer, key in PEERS:
                key = ratio_key(key, alg)
                if key in res:
                    console.print(
                        f"{workers} worker(s): ratio {enforcer_name(alg)}/{peer} "
                        f"[bold]{res[key]}[/bold] (per window {res[f'{key}_per_round']}), "
                        f"per server CPU-second [bold]{res[f'{key}_per_server_cpu_s']}[/bold]"
                    )
        for name in TARGETS:
            for kind, n in res.get(name, {}).get("error_kinds", {}).items():
                console.print(f"{workers} worker(s), {name}: {n} x {kind}", markup=False)
    goals = goal_lines(results)
    for line in goals:
        console.print(line, markup=False)
    log_kinds = access_log_summary(bed.access_log)  # readiness probes show up as tls_error
    console.print(f"enforcer access log (warm-ups included): {log_kinds}", markup=False)
    err = [
        line
        for alg in args.algorithms
        if (path := tmp / f"{enforcer_name(alg)}.err").exists()
        for line in path.read_text(errors="replace").splitlines()
    ]
    err = [x for x in err if "listening on" not in x and "stopped" not in x and x.strip()]
    if err:
        console.print("enforcer stderr:\n" + "\n".join(err[-60:]), markup=False)
    for note in notes:
        console.print(note, markup=False)
    for res in results.values():
        for r in (res.get(name) for name in TARGETS):
            if r:
                r.pop("window_rates", None)
    record = {
        "bench": "handshakes", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(), "duration_s": args.duration, "rounds": args.rounds,
        "warmup_s": args.warmup, "clients": args.clients, "fleet": args.fleet,
        "algorithms": args.algorithms, "goals": goals,
        "workers": results, "enforcer_access_log": log_kinds,
        "enforcer_stderr_lines": len(err), "notes": notes,
    }  # fmt: skip
    print(json.dumps(record, separators=(",", ":")), flush=True)
    print(f"rerun: cd {shlex.quote(os.getcwd())} && {shlex.join(sys.orig_argv)}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    failed = any(res[n]["errors"] for res in results.values() for n in TARGETS if n in res)
    return 1 if failed or err else 0


if __name__ == "__main__":
    sys.exit(main())
