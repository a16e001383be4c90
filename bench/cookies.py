"""Cookie-reuse requests per second: the enforcer against nginx, keep-alive, same run.

A device that was admitted by its certificate gets a ``CF_Authorization`` cookie; the requests
that follow on a kept-alive connection carry only that cookie (no certificate, no new
handshake). Each of ``--clients`` processes opens one TLS connection (without a client
certificate) and sends ``GET /cookie`` with the cookie, again and again on that connection.

* The enforcer verifies the token (RS256 signature, aud, iss, exp, nbf; the signature check is
  memoised per token string, every other check runs per request), then forwards the request to
  the echo origin over a kept-alive origin connection and writes an access-log line.
* nginx cannot verify a JWT without a module; it checks that a ``CF_Authorization`` cookie is
  present, answers ``200 "ok"`` and writes an access-log line.

So the ratio is the cost of a real token check plus a proxy hop against a static answer. Both
servers run with ``--workers`` workers and are measured in alternating windows (see
``harness.py``). Compare ratios, never absolute figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import (
    HOST,
    ClientPool,
    Result,
    Window,
    add_window_options,
    client_context,
    cpu_seconds,
    free_port,
    make_testbed,
    nginx_missing,
    read_response,
    start_enforcer,
    start_nginx,
    start_origin,
    stop,
    summarise,
)
from rich.console import Console
from rich.table import Table

from testbed.demo import AUTH_HOST


def get_cookie(bed: Any, port: int) -> str:
    """Ask the enforcer once with the first device's certificate; return its cookie."""
    ctx = client_context(*bed.devices[0], bed.edge_ca)
    request = f"GET / HTTP/1.1\r\nHost: {AUTH_HOST}\r\nConnection: close\r\n\r\n".encode()
    with (
        socket.create_connection((HOST, port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=AUTH_HOST) as tls,
    ):
        tls.sendall(request)
        status, headers, _ = read_response(tls)
    cookie = headers.get(b"set-cookie", b"").decode().split(";", 1)[0]
    if status != 200 or not cookie.startswith("CF_Authorization="):
        raise SystemExit(f"enforcer: no cookie for the first device (status {status})")
    return cookie


def main() -> int:
    """Run the benchmark; print its table, ratio, JSON line and rerun command."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    add_window_options(ap)
    ap.add_argument("--workers", type=int, default=1, help="workers of each server (1)")
    ap.add_argument(
        "--baseline",
        help="another build's testbed executable: its enforcer is measured in the same windows",
    )
    args = ap.parse_args()
    if args.duration <= 0 or args.clients < 1 or args.workers < 1 or args.rounds < 1:
        ap.error("--duration must be > 0; --clients, --workers and --rounds 1 or more")
    console = Console(soft_wrap=True, highlight=False, width=170)
    why = nginx_missing()
    if why:
        raise SystemExit(f"nginx is needed for the comparison: {why}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-cookies-"))
    origin_port = free_port()
    bed = make_testbed(tmp, 1, free_port(), origin_port)
    origin = start_origin(origin_port)
    pool = ClientPool(args.clients, [], bed.edge_ca)
    servers: dict[str, Any] = {}
    windows: dict[str, list[Result]] = {}
    try:
        servers["enforcer"] = (start_enforcer(bed, port := free_port(), args.workers), port)
        if args.baseline:
            baseline = start_enforcer(bed, port := free_port(), args.workers, args.baseline)
            servers["baseline"] = (baseline, port)
        servers["nginx"] = (start_nginx(bed, port := free_port(), args.workers), port)
        windows.update({name: [] for name in servers})
        cookie = get_cookie(bed, servers["enforcer"][1])
        request = f"GET /cookie HTTP/1.1\r\nHost: {AUTH_HOST}\r\nCookie: {cookie}\r\n\r\n"
        names = list(servers)
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                proc, port = servers[name]
                console.print(f"  round {r + 1}: {name} ...")
                window = Window(name, port, "cookie", time.monotonic() + 0.2, args.warmup,
                                args.duration, request.encode())  # fmt: skip
                windows[name].append(pool.run(window, lambda p=proc: cpu_seconds(p.pid)))
    finally:
        for proc, _ in servers.values():
            stop(proc)
        pool.close()
        origin.terminate()
        origin.join(timeout=5)

    results = {n: summarise(w, args.duration, args.workers) for n, w in windows.items()}
    enf, ngx = results["enforcer"], results["nginx"]
    ratio = round(enf["per_s"] / ngx["per_s"], 3) if ngx["per_s"] else None
    cpu_ratio = (
        round(enf["per_server_cpu_s"] / ngx["per_server_cpu_s"], 3)
        if enf["per_server_cpu_s"] and ngx["per_server_cpu_s"]
        else None
    )
    per_window = [
        round(len(e["latencies"]) / len(n["latencies"]), 3) if n["latencies"] else None
        for e, n in zip(windows["enforcer"], windows["nginx"], strict=True)
    ]
    to_baseline = None
    if "baseline" in results and results["baseline"]["per_s"]:
        base = results["baseline"]
        to_baseline = {
            "requests_per_s": round(enf["per_s"] / base["per_s"], 3),
            "per_server_cpu_s": round(enf["per_server_cpu_s"] / base["per_server_cpu_s"], 3),
            "per_window": [
                round(len(e["latencies"]) / len(b["latencies"]), 3) if b["latencies"] else None
                for e, b in zip(windows["enforcer"], windows["baseline"], strict=True)
            ],
        }
    table = Table(
        title=f"Cookie-reuse requests on kept-alive connections: {args.clients} clients, "
        f"{args.workers} worker(s), {args.rounds} x {args.duration:g} s per target"
    )
    cols = ("target", "requests/s", "p50 ms", "p99 ms", "errors", "per server CPU-s",
            "server busy", "client CPU")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="left" if col == "target" else "right")
    for name, r in results.items():
        table.add_row(
            name, str(r["per_s"]), str(r["p50_ms"]), str(r["p99_ms"]), str(r["errors"]),
            str(r["per_server_cpu_s"]), str(r["server_busy"]), str(r["client_cpu_share"]),
        )  # fmt: skip
    console.print(table)
    console.print(
        f"ratio enforcer/nginx, requests/s: [bold]{ratio}[/bold] (per window {per_window}); "
        f"per server CPU-second: {cpu_ratio}"
    )
    if to_baseline:
        console.print(f"ratio enforcer/baseline: {to_baseline}", markup=False)
    for name, r in results.items():
        r.pop("returning_share", None)
        r.pop("window_rates", None)
        for kind, n in r["error_kinds"].items():
            console.print(f"{name}: {n} x {kind}", markup=False)
    record = {
        "bench": "cookies", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(), "duration_s": args.duration, "rounds": args.rounds,
        "clients": args.clients, "workers": args.workers, "targets": results,
        "ratio_enforcer_nginx": ratio, "ratio_per_window": per_window,
        "ratio_per_server_cpu_s": cpu_ratio, "ratio_to_baseline": to_baseline,
    }  # fmt: skip
    print(json.dumps(record, separators=(",", ":")), flush=True)
    print(f"rerun: cd {shlex.quote(os.getcwd())} && {shlex.join(sys.orig_argv)}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return 1 if any(r["errors"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
