"""Full mTLS handshakes per second: the enforcer against nginx, same client, same run.

Every request is a NEW TCP connection and a full TLS handshake (no session resumption) in
which the client presents an EC P-256 device certificate with its chain (leaf + one
intermediate), then sends ``GET /`` with ``Connection: close`` and reads the whole response.
The client is plain blocking stdlib ``ssl`` in ``--clients`` processes, each looping for a
1 s warm-up and then ``--duration`` seconds; only requests started after the warm-up count.

Targets, both serving the demo PKI (``testbed.demo.write_demo``) on 127.0.0.1:

* the enforcer (``testbed enforcer serve``) for ``auth.example.test``: it validates the
  chain, evaluates the policy and forwards the request to an echo origin (one more local
  HTTP hop, served by a separate process on the same cores);
* nginx with ``ssl_verify_client optional`` against the device root (depth 2), answering
  403 unless ``$ssl_client_verify = SUCCESS``, else ``200 "ok"``.

The absolute numbers mean little: the machine is small, shared and noisy. What matters is the
ratio enforcer/nginx for handshakes/s, measured back to back by the same client in one run, and
the ratio of handshakes per server CPU-second (from /proc, less sensitive to the client and to
neighbours). Compare ratios between runs, never absolute figures.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import multiprocessing as mp
import os
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from rich.console import Console
from rich.table import Table

from enforcer.origin import serve_echo_origin
from testbed.demo import AUTH_HOST, write_demo

HOST = "127.0.0.1"
WARMUP = 1.0
REQUEST = f"GET / HTTP/1.1\r\nHost: {AUTH_HOST}\r\nConnection: close\r\n\r\n".encode()
NGINX = "/usr/sbin/nginx"
NGINX_CONF = """\
worker_processes {workers}; daemon off; master_process on;
pid {tmp}/nginx.pid; error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {tmp}/access.log;  # the enforcer writes one too
    client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fcgi;
    uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
    server {{
        listen {host}:{port} ssl; server_name {server_name};
        ssl_protocols TLSv1.2 TLSv1.3;  # nginx 1.22's default stops at TLSv1.2
        ssl_certificate {demo}/edge/cert.pem; ssl_certificate_key {demo}/edge/key.pem;
        ssl_client_certificate {demo}/ca/root.pem; ssl_verify_client optional; ssl_verify_depth 2;
        location / {{
            if ($ssl_client_verify != SUCCESS) {{ return 403; }}
            return 200 "ok";
        }}
    }}
}}
"""

Files = tuple[Path, Path, Path]  # device cert.pem (leaf + intermediate), key.pem, edge CA
Result = dict[str, Any]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, alive: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll ``port`` until it accepts; fail if ``alive()`` turns false or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise SystemExit(f"{what} exited before listening on {HOST}:{port}")
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on {HOST}:{port} within {timeout:.0f} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process started with its own session, and its children: SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 3.0)):
        try:
            os.killpg(proc.pid, sig)  # the group is ours: start_new_session=True
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def cpu_seconds(pgid: int = -1, pid: int = -1) -> float:
    """User + system CPU seconds of the live processes in group ``pgid``, or process ``pid``."""
    total = 0
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # not a process, or gone meanwhile
        if int(fields[2]) == pgid or entry == str(pid):  # fields[0] is field 3 (state) of proc(5)
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def client_context(files: Files) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(files[0], files[1])
    ctx.load_verify_locations(files[2])
    return ctx


def one_request(ctx: ssl.SSLContext, port: int) -> tuple[int, bytes, str]:
    """New connection, full handshake, one request; return (status, body, TLS version + cipher)."""
    with (
        socket.create_connection((HOST, port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=AUTH_HOST) as tls,  # no session=: no resumption
    ):
        tls.sendall(REQUEST)
        data = b""
        for _ in range(1000):  # bounded: the responses here are a few hundred bytes
            chunk = tls.recv(65536)
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            length = [h for h in head.lower().split(b"\r\n") if h.startswith(b"content-length:")]
            if sep and length and len(body) >= int(length[0].split(b":", 1)[1]):
                break
        info = f"{tls.version()} {(tls.cipher() or ('?',))[0]}"
    head, _, body = data.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ValueError(f"not an HTTP response: {data[:80]!r}")
    return int(parts[1]), body, info


def client_loop(port: int, files: Files, duration: float, barrier: Any, out: Any) -> None:
    """One client process: full handshakes until the deadline; report latencies and errors."""
    ctx = client_context(files)
    barrier.wait(timeout=60)
    measure_from = time.monotonic() + WARMUP
    end = measure_from + duration
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    cpu: float | None = None
    while (t0 := time.monotonic()) < end:
        if cpu is None and t0 >= measure_from:
            cpu = time.process_time()
        p0 = time.perf_counter()
        try:
            status, _, _ = one_request(ctx, port)
            error = None if status == 200 else f"HTTP {status}"
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        if t0 < measure_from:
            continue
        if error is None:
            latencies.append((time.perf_counter() - p0) * 1000)
        else:
            errors[error] += 1
    out.put((latencies, dict(errors), time.process_time() - (cpu or time.process_time())))


def run_origin(port: int) -> None:
    trio.run(serve_echo_origin, HOST, port)


def measure(
    port: int, files: Files, args: argparse.Namespace, pgid: int, origin: int = -1
) -> Result:
    """Drive one target with ``args.clients`` processes; the server's CPU is group ``pgid``'s."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(args.clients + 1), ctx.Queue()
    procs = [
        ctx.Process(target=client_loop, args=(port, files, args.duration, barrier, out))
        for _ in range(args.clients)
    ]
    for p in procs:
        p.start()
    barrier.wait(timeout=60)
    start = time.monotonic()
    time.sleep(WARMUP)
    cpu0, origin0 = cpu_seconds(pgid), cpu_seconds(pid=origin)
    time.sleep(max(0.0, start + WARMUP + args.duration - time.monotonic()))
    cpu, origin_cpu = cpu_seconds(pgid) - cpu0, cpu_seconds(pid=origin) - origin0
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=10)
    lat = sorted(x for r in results for x in r[0])
    errors: collections.Counter[str] = collections.Counter()
    for r in results:
        errors.update(r[1])

    def pct(q: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))], 2) if lat else None

    return {
        "handshakes_per_s": round(len(lat) / args.duration, 1),
        "ok": len(lat),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "errors": sum(errors.values()),
        "server_cpu_s": round(cpu, 2),
        "origin_cpu_s": round(origin_cpu, 2) if origin > 0 else None,
        "client_cpu_s": round(sum(r[2] for r in results), 2),
        "handshakes_per_cpu_s": round(len(lat) / cpu, 1) if cpu else None,
        "error_kinds": dict(errors.most_common(5)),
    }


def start(
    cmd: list[str], port: int, what: str, err: Path, files: Files
) -> tuple[subprocess.Popen[bytes], str]:
    """Start a server in its own session; return it once it answers 200 to the valid device."""
    with err.open("ab") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f, start_new_session=True)
    try:
        wait_port(port, lambda: proc.poll() is None, what)
        status, body, info = one_request(client_context(files), port)
        if status != 200:
            raise SystemExit(f"{what}: the valid device got {status}, not 200: {body[:200]!r}")
        return proc, info
    except BaseException:
        stop(proc)
        print(err.read_text(errors="replace"), file=sys.stderr)
        raise


def nginx_missing() -> str | None:
    """Return None when nginx is available (installing it when possible), else why not."""
    if os.path.exists(NGINX):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"{NGINX} is missing and apt-get install needs root and apt-get"
    cmd = ["apt-get", "install", "-y", "nginx"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired:
        return "apt-get install -y nginx timed out"
    return None if os.path.exists(NGINX) else f"apt-get install failed: {r.stderr[-300:]}"


def access_log_summary(path: Path) -> Result:
    """The enforcer's access log: records by status (or TLS error), median phase timings."""
    kinds: collections.Counter[str] = collections.Counter()
    ms: dict[str, list[float]] = {"handshake_ms": [], "decision_ms": [], "total_ms": []}
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


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--duration", type=float, default=10.0, help="measured s per target")
    ap.add_argument("--clients", type=int, default=2, help="client processes (default 2)")
    ap.add_argument("--workers", type=int, default=1, help="enforcer and nginx workers")
    ap.add_argument("--skip-nginx", action="store_true", help="measure the enforcer only")
    args = ap.parse_args()
    if args.duration <= 0 or args.clients < 1 or args.workers < 1:
        ap.error("--duration must be > 0, --clients and --workers 1 or more")
    console = Console(soft_wrap=True, highlight=False)
    tmp = Path(tempfile.mkdtemp(prefix="bench-handshakes-"))
    origin_port, enforcer_port, nginx_port = free_port(), free_port(), free_port()
    layout = write_demo(tmp / "demo", enforcer_port, origin=f"http://{HOST}:{origin_port}")
    conf, access_log = layout.config.read_text(encoding="utf-8"), tmp / "enforcer-access.log"
    if 'access_log = "-"' not in conf:
        raise SystemExit(f"{layout.config}: no 'access_log = \"-\"' line to rewrite")
    conf = conf.replace('access_log = "-"', f'access_log = "{access_log}"')
    layout.config.write_text(conf, encoding="utf-8")
    cert, key = layout.device("valid")
    files: Files = (cert, key, layout.edge_ca)
    results: dict[str, dict[str, Any]] = {}
    tls: dict[str, str] = {}
    notes: list[str] = []
    origin = mp.get_context("spawn").Process(target=run_origin, args=(origin_port,), daemon=True)
    servers: list[subprocess.Popen[bytes]] = []
    try:
        origin.start()
        wait_port(origin_port, origin.is_alive, "echo origin")
        testbed = str(Path(sys.executable).with_name("testbed"))
        cmd = [testbed, "enforcer", "serve", "--config", str(layout.config)]
        cmd += ["--port", str(enforcer_port), "--workers", str(args.workers)]
        proc, tls["enforcer"] = start(cmd, enforcer_port, "enforcer", tmp / "enforcer.err", files)
        servers.append(proc)
        console.print(f"enforcer: {tls['enforcer']}; measuring {args.duration:g} s...")
        results["enforcer"] = measure(enforcer_port, files, args, proc.pid, origin.pid or -1)
        why = "--skip-nginx" if args.skip_nginx else nginx_missing()
        if why:
            notes.append(f"nginx not measured: {why}")
        else:
            ndir = tmp / "nginx"
            ndir.mkdir()
            nconf = NGINX_CONF.format(
                workers=args.workers, tmp=ndir, host=HOST, port=nginx_port,
                server_name=AUTH_HOST, demo=layout.root,
            )  # fmt: skip
            (ndir / "nginx.conf").write_text(nconf, encoding="utf-8")
            cmd = [NGINX, "-p", str(ndir), "-e", str(ndir / "error.log")]
            cmd += ["-c", str(ndir / "nginx.conf")]
            proc, tls["nginx"] = start(cmd, nginx_port, "nginx", ndir / "error.log", files)
            servers.append(proc)
            console.print(f"nginx: {tls['nginx']}; measuring {args.duration:g} s...")
            results["nginx"] = measure(nginx_port, files, args, proc.pid)
    finally:
        for proc in servers:
            stop(proc)
        if origin.is_alive():
            origin.terminate()
        origin.join(timeout=5)

    title = f"Full mTLS handshakes: {args.clients} clients, {args.workers} worker(s), "
    table = Table(title=title + f"{args.duration:g} s")
    for col in ("target", "handshakes/s", "p50 ms", "p99 ms", "errors", "handshakes/CPU-s"):
        table.add_column(col, justify="left" if col == "target" else "right")
    for name, r in results.items():
        cells = ("handshakes_per_s", "p50_ms", "p99_ms", "errors", "handshakes_per_cpu_s")
        table.add_row(name, *(str(r[c]) for c in cells))
    console.print(table)
    ratio = cpu_ratio = None
    if "nginx" in results and results["nginx"]["handshakes_per_s"]:
        enf, ngx = results["enforcer"], results["nginx"]
        ratio = round(enf["handshakes_per_s"] / ngx["handshakes_per_s"], 3)
        if enf["handshakes_per_cpu_s"] and ngx["handshakes_per_cpu_s"]:
            cpu_ratio = round(enf["handshakes_per_cpu_s"] / ngx["handshakes_per_cpu_s"], 3)
        console.print(f"ratio enforcer/nginx, handshakes/s: [bold]{ratio}[/bold]")
        console.print(f"ratio enforcer/nginx, handshakes per server CPU-second: {cpu_ratio}")
    for name, r in results.items():
        for kind, n in r["error_kinds"].items():
            console.print(f"{name}: {n} x {kind}", markup=False)
    log_kinds = access_log_summary(access_log)  # one tls_error is the readiness probe
    console.print(f"enforcer access log (warm-up included): {log_kinds}", markup=False)
    err = (tmp / "enforcer.err").read_text(errors="replace").splitlines()
    err = [x for x in err if "listening on" not in x and x != "enforcer: stopped"]
    if err:
        console.print("enforcer stderr:\n" + "\n".join(err[-60:]), markup=False)
    for note in notes:
        console.print(note, markup=False)
    record = {
        "bench": "handshakes", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(), "duration_s": args.duration, "warmup_s": WARMUP,
        "clients": args.clients, "workers": args.workers, "tls": tls, "targets": results,
        "ratio_enforcer_nginx": ratio, "ratio_per_cpu_s": cpu_ratio,
        "enforcer_access_log": log_kinds, "enforcer_stderr_lines": len(err), "notes": notes,
    }  # fmt: skip
    print(json.dumps(record, separators=(",", ":")), flush=True)
    print(f"rerun: cd {shlex.quote(os.getcwd())} && {shlex.join(sys.orig_argv)}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return 1 if any(r["errors"] for r in results.values()) or err else 0


if __name__ == "__main__":
    sys.exit(main())
