"""HTTP/2 and gRPC through the enforcer and through nginx (``grpc_pass``), same client, same run.

Two figures per target, both gRPC unary calls (``/bench.Echo/Unary``, a 72-byte message) to
the same grpcio echo service (a separate process on the same cores), proxied over HTTP/2:

* ``h2-handshake``: a NEW TCP connection and a full mTLS handshake (ALPN ``h2``, no session
  resumption) per call, one stream per connection, as a No Duration application forces; each
  client process cycles through its slice of the ``--fleet`` distinct device certificates
  (leaf + intermediate), warmed by one pass first, as in ``handshakes.py``;
* ``h2-stream``: calls as new streams on one kept connection per client process (one device),
  so the per-stream work (the access decision, token minting, forwarding to the origin) is
  measured without the handshake.

Targets, both on 127.0.0.1, up for the whole run, measured in alternating windows (ABBA) by
the same client processes (``harness.py``):

* the enforcer (``testbed enforcer serve --workers N``), host ``auth.example.test``, origin
  ``grpc://`` the echo service: per stream it decides (chain, policy), mints an RS256 token,
  forwards the call over a multiplexed HTTP/2 origin connection, relays the trailers and logs;
* nginx 1.22 (``worker_processes N``), ``listen ... ssl http2``, ``ssl_verify_client optional``
  against the fleet root, 403 unless verified, else ``grpc_pass`` to the same echo service.

Compare ratios, never absolute figures: the machine is small, shared and noisy.

    .venv/bin/python bench/http2.py [--workers 1] [--fleet 200] [--duration 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import (
    HOST,
    NGINX,
    ClientPool,
    Result,
    Window,
    add_window_options,
    client_context,
    cpu_seconds,
    free_port,
    grpc_request,
    h2_full_handshake_call,
    make_testbed,
    nginx_missing,
    start_enforcer,
    start_grpc_origin,
    start_server,
    stop,
    summarise,
)
from rich.console import Console
from rich.table import Table

from testbed.demo import AUTH_HOST

NGINX_GRPC_CONF = """\
worker_processes {workers}; daemon off; master_process on;
pid {tmp}/nginx.pid; error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {tmp}/access.log;  # the enforcer writes one too
    keepalive_requests 100000000; keepalive_timeout 60s;  # h2-stream keeps one connection
    client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fcgi;
    uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
    upstream grpc_origin {{ server {host}:{origin_port}; keepalive 32; }}
    server {{
        listen {host}:{port} ssl http2; server_name {server_name};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate {edge}/cert.pem; ssl_certificate_key {edge}/key.pem;
        ssl_client_certificate {client_ca}; ssl_verify_client optional; ssl_verify_depth 2;
        location / {{
            if ($ssl_client_verify != SUCCESS) {{ return 403; }}
            grpc_pass grpc://grpc_origin;
        }}
    }}
}}
"""
MODES = ("h2-handshake", "h2-stream")
TARGETS = ("enforcer", "nginx-grpc")


def start_nginx_grpc(bed: Any, port: int, workers: int) -> Any:
    """nginx with HTTP/2 and ``grpc_pass`` to the echo service, trusting the fleet root."""
    ndir = bed.tmp / f"nginx-grpc-{workers}"
    ndir.mkdir(exist_ok=True)
    conf = NGINX_GRPC_CONF.format(
        workers=workers, tmp=ndir, host=HOST, port=port, server_name=AUTH_HOST,
        edge=bed.layout.root / "edge", client_ca=bed.fleet_root, origin_port=bed.origin_port,
    )  # fmt: skip
    (ndir / "nginx.conf").write_text(conf, encoding="utf-8")
    cmd = [NGINX, "-p", str(ndir), "-e", str(ndir / "error.log"), "-c", str(ndir / "nginx.conf")]
    return start_server(cmd, port, "nginx", ndir / "error.log")


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b rounded, or None when either is missing."""
    return round(a / b, 3) if a and b else None


def measure(args: argparse.Namespace, bed: Any, pool: ClientPool, console: Console) -> Result:
    """Start both servers and measure every mode in alternating windows."""
    servers: dict[str, tuple[Any, int]] = {}
    workers = args.workers
    windows: dict[str, dict[str, list[Result]]] = {m: {} for m in MODES}
    try:
        servers["enforcer"] = (start_enforcer(bed, port := free_port(), workers), port)
        if not args.skip_nginx:
            servers["nginx-grpc"] = (start_nginx_grpc(bed, port := free_port(), workers), port)
        probe = client_context(*bed.devices[0], bed.edge_ca)
        probe.set_alpn_protocols(["h2"])
        for name, (_, port) in servers.items():
            status = h2_full_handshake_call(probe, port, grpc_request())
            if status != 200:
                raise SystemExit(f"{name}: a gRPC call of the first device got {status}, not 200")
        names = list(servers)
        for name in names:
            console.print(f"  one pass of the fleet through {name} ...")
            pool.warm(name, servers[name][1], b"", mode="h2-handshake")
        for mode in MODES:
            windows[mode] = {n: [] for n in names}
            for r in range(args.rounds):
                for name in names if r % 2 == 0 else names[::-1]:  # ABBA
                    proc, port = servers[name]
                    console.print(f"  {mode}, round {r + 1}: {name} ...")
                    window = Window(name, port, mode, time.monotonic() + 0.2, args.warmup,
                                    args.duration, b"")  # fmt: skip
                    windows[mode][name].append(pool.run(window, lambda p=proc: cpu_seconds(p.pid)))
    finally:
        for proc, _ in servers.values():
            stop(proc)
    out: Result = {}
    for mode in MODES:
        res = {n: summarise(w, args.duration, workers) for n, w in windows[mode].items()}
        if "nginx-grpc" in res:
            enf, ng = res["enforcer"], res["nginx-grpc"]
            res["ratio"] = ratio(enf["per_s"], ng["per_s"])
            res["ratio_per_round"] = [
                ratio(len(e["latencies"]), len(n["latencies"]))
                for e, n in zip(windows[mode]["enforcer"], windows[mode]["nginx-grpc"], strict=True)
            ]
            res["ratio_per_server_cpu_s"] = ratio(enf["per_server_cpu_s"], ng["per_server_cpu_s"])
        out[mode] = res
    return out


def main() -> int:
    """Run the benchmark; print its table, ratios, JSON line and rerun command."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    add_window_options(ap)
    ap.add_argument("--workers", type=int, default=1, help="server worker processes (1)")
    ap.add_argument("--fleet", type=int, default=200, help="distinct devices (200)")
    ap.add_argument("--skip-nginx", action="store_true", help="measure the enforcer only")
    args = ap.parse_args()
    if args.duration <= 0 or args.clients < 1 or args.workers < 1 or args.fleet < 1:
        ap.error("--duration must be > 0; --clients, --workers and --fleet 1 or more")
    console = Console(soft_wrap=True, highlight=False, width=170)
    notes: list[str] = []
    if not args.skip_nginx and (why := nginx_missing()):
        notes.append(f"nginx not measured: {why}")
        args.skip_nginx = True
    tmp = Path(tempfile.mkdtemp(prefix="bench-http2-"))
    origin_port = free_port()
    console.print(f"provisioning {args.fleet} devices and starting {args.clients} clients ...")
    bed = make_testbed(tmp, args.fleet, free_port(), origin_port, scheme="grpc")
    origin = start_grpc_origin(origin_port)
    pool = ClientPool(args.clients, bed.devices, bed.edge_ca)
    try:
        results = measure(args, bed, pool, console)
    finally:
        pool.close()
        origin.terminate()
        origin.join(timeout=5)

    title = f"gRPC over HTTP/2: {args.clients} clients, fleet of {args.fleet}, "
    title += f"{args.workers} worker(s), {args.rounds} x {args.duration:g} s per target"
    table = Table(title=title)
    cols = ("mode", "target", "calls/s", "p50 ms", "p99 ms", "errors", "per server CPU-s",
            "server busy", "client CPU", "ratio")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="left" if col in ("mode", "target") else "right")
    for mode, res in results.items():
        for name in TARGETS:
            if name not in res:
                continue
            r = res[name]
            table.add_row(
                mode, name, str(r["per_s"]), str(r["p50_ms"]), str(r["p99_ms"]), str(r["errors"]),
                str(r["per_server_cpu_s"]), str(r["server_busy"]), str(r["client_cpu_share"]),
                str(res.get("ratio")) if name == "enforcer" else "",
            )  # fmt: skip
    console.print(table)
    for mode, res in results.items():
        if "ratio" in res:
            console.print(
                f"{mode}: ratio enforcer/nginx-grpc [bold]{res['ratio']}[/bold] (per window "
                f"{res['ratio_per_round']}), per server CPU-second {res['ratio_per_server_cpu_s']}"
            )
        for name in TARGETS:
            for kind, n in res.get(name, {}).get("error_kinds", {}).items():
                console.print(f"{mode}, {name}: {n} x {kind}", markup=False)
    err = (tmp / "enforcer.err").read_text(errors="replace").splitlines()
    err = [x for x in err if "listening on" not in x and "stopped" not in x and x.strip()]
    if err:
        console.print("enforcer stderr:\n" + "\n".join(err[-40:]), markup=False)
    for note in notes:
        console.print(note, markup=False)
    for res in results.values():
        for name in TARGETS:
            if name in res:
                res[name].pop("window_rates", None)
    record = {
        "bench": "http2", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(), "duration_s": args.duration, "rounds": args.rounds,
        "clients": args.clients, "fleet": args.fleet, "workers": args.workers,
        "results": results, "notes": notes,
    }  # fmt: skip
    print(json.dumps(record))
    rerun = ["python", "bench/http2.py", "--workers", str(args.workers), "--fleet", str(args.fleet)]
    rerun += ["--duration", f"{args.duration:g}", "--rounds", str(args.rounds)]
    rerun += ["--clients", str(args.clients)]
    print(f"rerun: {shlex.join(rerun)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
