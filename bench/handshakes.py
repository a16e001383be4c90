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
ratio enforcer/nginx for handshakes/s, measured back to back by the same client in one run;
compare ratios between runs, never absolute figures.
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
import subprocess
import sys
import tempfile
import time
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
worker_processes {workers};
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen {host}:{port} ssl;
        server_name {server_name};
        ssl_certificate {demo}/edge/cert.pem;
        ssl_certificate_key {demo}/edge/key.pem;
        ssl_client_certificate {demo}/ca/root.pem;
        ssl_verify_client optional;
        ssl_verify_depth 2;
        location / {{
            if ($ssl_client_verify != SUCCESS) {{ return 403; }}
            return 200 "ok";
        }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | mp.Process, what: str, timeout: float = 20.0) -> None:
    """Poll ``port`` until it accepts; fail if ``proc`` exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = proc.poll() is None if isinstance(proc, subprocess.Popen) else proc.is_alive()
        if not alive:
            raise SystemExit(f"{what} exited before listening on {HOST}:{port}")
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on {HOST}:{port} within {timeout:.0f} s")


def stop(proc: subprocess.Popen[bytes], first: signal.Signals) -> None:
    """Stop a process started in its own session: ``first``, then SIGTERM/SIGKILL its group."""
    if proc.poll() is not None:
        return
    for sig, wait in ((first, 5.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
        try:
            if sig == first:
                proc.send_signal(sig)
            else:
                os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # children (enforcer workers, nginx workers) left in the group
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def client_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    return ctx


def one_request(ctx: ssl.SSLContext, port: int) -> tuple[int, bytes, str]:
    """One fresh connection + full handshake + request; return (status, body, TLS version/cipher)."""
    with (
        socket.create_connection((HOST, port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=AUTH_HOST) as tls,
    ):
        tls.sendall(REQUEST)
        data = bytearray()
        for _ in range(10_000):  # bounded: responses here are a few hundred bytes
            chunk = tls.recv(65536)
            if not chunk:
                break
            data += chunk
            head, sep, body = bytes(data).partition(b"\r\n\r\n")
            if sep:
                lengths = [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")]
                if lengths and len(body) >= int(lengths[0].split(b":", 1)[1]):
                    break
        info = f"{tls.version()} {(tls.cipher() or ('?',))[0]}"
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ValueError(f"not an HTTP response: {bytes(data[:80])!r}")
    return int(parts[1]), body, info


def client_loop(port: int, files: tuple[Path, Path, Path], duration: float, barrier: Any, out: Any) -> None:
    """One client process: loop full handshakes until the deadline, report latencies and errors."""
    ctx = client_context(*files)
    barrier.wait(timeout=60)
    measure_from = time.monotonic() + WARMUP
    end = measure_from + duration
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    while (t0 := time.monotonic()) < end:
        p0 = time.perf_counter()
        try:
            status, _, _ = one_request(ctx, port)
            error = None if status == 200 else f"HTTP {status}"
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        if t0 >= measure_from:
            if error is None:
                latencies.append((time.perf_counter() - p0) * 1000)
            else:
                errors[error] += 1
    out.put((latencies, dict(errors)))


def run_origin(port: int) -> None:
    trio.run(serve_echo_origin, HOST, port)


def measure(port: int, files: tuple[Path, Path, Path], args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(args.clients + 1), ctx.Queue()
    procs = [ctx.Process(target=client_loop, args=(port, files, args.duration, barrier, out)) for _ in range(args.clients)]
    for p in procs:
        p.start()
    barrier.wait(timeout=60)
    results = [out.get(timeout=WARMUP + args.duration + 60) for _ in procs]
    for p in procs:
        p.join(timeout=10)
    lat = sorted(x for r in results for x in r[0])
    errors: collections.Counter[str] = collections.Counter()
    for r in results:
        errors.update(r[1])

    def pct(q: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))], 2) if lat else None

    return {
        "handshakes_per_s": round(len(lat) / args.duration, 1), "ok": len(lat),
        "p50_ms": pct(0.50), "p99_ms": pct(0.99), "errors": sum(errors.values()),
        "error_kinds": dict(errors.most_common(5)),
    }


def check(port: int, files: tuple[Path, Path, Path], what: str) -> str:
    """Fail loudly unless ``what`` answers 200 to the valid device; return the TLS version/cipher."""
    try:
        status, body, info = one_request(client_context(*files), port)
    except Exception as exc:
        raise SystemExit(f"{what}: the valid device's request failed: {exc!r}") from exc
    if status != 200:
        raise SystemExit(f"{what}: expected 200 for the valid device, got {status}: {body[:200]!r}")
    return info


def ensure_nginx() -> str | None:
    """Return None when nginx is available (installing it if possible), else why not."""
    if os.path.exists(NGINX):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"{NGINX} missing and cannot apt-get install it (not root or no apt-get)"
    try:
        r = subprocess.run(["apt-get", "install", "-y", "nginx"], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return "apt-get install -y nginx timed out"
    return None if os.path.exists(NGINX) else f"apt-get install -y nginx failed: {r.stderr.strip()[-300:]}"


def access_log_summary(path: Path) -> dict[str, int]:
    """Count the enforcer's access-log records by status / TLS error detail."""
    kinds: collections.Counter[str] = collections.Counter()
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                kinds["unparsable line"] += 1
                continue
            kinds[f"tls_error: {rec.get('detail')}" if rec.get("event") == "tls_error" else f"status {rec.get('status')}"] += 1
    return dict(kinds.most_common(8))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per target (default 10)")
    ap.add_argument("--clients", type=int, default=2, help="client processes (default 2)")
    ap.add_argument("--workers", type=int, default=1, help="enforcer workers = nginx worker_processes (default 1)")
    ap.add_argument("--skip-nginx", action="store_true", help="measure the enforcer only")
    args = ap.parse_args()
    if args.duration <= 0 or args.clients < 1 or args.workers < 1:
        ap.error("--duration must be > 0, --clients and --workers >= 1")
    console = Console()
    tmp = Path(tempfile.mkdtemp(prefix="bench-handshakes-"))
    origin_port, enforcer_port, nginx_port = free_port(), free_port(), free_port()
    layout = write_demo(tmp / "demo", enforcer_port, origin=f"http://{HOST}:{origin_port}")
    conf = layout.config.read_text(encoding="utf-8")
    access_log = tmp / "enforcer-access.log"
    assert 'access_log = "-"' in conf, "the demo config changed: no access_log line to rewrite"
    layout.config.write_text(conf.replace('access_log = "-"', f'access_log = "{access_log}"'), encoding="utf-8")
    cert, key = layout.device("valid")
    files = (cert, key, layout.edge_ca)
    results: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    origin = mp.get_context("spawn").Process(target=run_origin, args=(origin_port,), daemon=True)
    enforcer: subprocess.Popen[bytes] | None = None
    nginx: subprocess.Popen[bytes] | None = None
    enforcer_err = tmp / "enforcer.stderr"
    try:
        origin.start()
        wait_port(origin_port, origin, "echo origin")
        testbed = Path(sys.executable).with_name("testbed")
        cmd = [str(testbed), "enforcer", "serve", "--config", str(layout.config), "--port", str(enforcer_port), "--workers", str(args.workers)]
        with enforcer_err.open("wb") as err:
            enforcer = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            wait_port(enforcer_port, enforcer, "enforcer")
            tls_info = {"enforcer": check(enforcer_port, files, "enforcer")}
        except SystemExit:
            console.print(enforcer_err.read_text(errors="replace"))
            raise
        console.print(f"enforcer ready on {HOST}:{enforcer_port} ({tls_info['enforcer']}); measuring {args.duration:g} s...")
        results["enforcer"] = measure(enforcer_port, files, args)
        why = "--skip-nginx" if args.skip_nginx else ensure_nginx()
        if why:
            notes.append(f"nginx not measured: {why}")
        else:
            ndir = tmp / "nginx"
            ndir.mkdir()
            (ndir / "nginx.conf").write_text(NGINX_CONF.format(
                workers=args.workers, tmp=ndir, host=HOST, port=nginx_port, server_name=AUTH_HOST, demo=layout.root,
            ), encoding="utf-8")
            nginx = subprocess.Popen(
                [NGINX, "-p", str(ndir), "-e", str(ndir / "error.log"), "-c", str(ndir / "nginx.conf")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )
            try:
                wait_port(nginx_port, nginx, "nginx")
                tls_info["nginx"] = check(nginx_port, files, "nginx")
            except SystemExit:
                console.print((ndir / "error.log").read_text(errors="replace"))
                raise
            console.print(f"nginx ready on {HOST}:{nginx_port} ({tls_info['nginx']}); measuring {args.duration:g} s...")
            results["nginx"] = measure(nginx_port, files, args)
    finally:
        for proc, first in ((nginx, signal.SIGTERM), (enforcer, signal.SIGINT)):
            if proc is not None:
                stop(proc, first)
        if origin.is_alive():
            origin.terminate()
            origin.join(timeout=5)

    table = Table(title=f"Full mTLS handshakes ({args.clients} clients, {args.workers} worker(s), {args.duration:g} s)")
    for col in ("target", "handshakes/s", "p50 ms", "p99 ms", "errors"):
        table.add_column(col, justify="left" if col == "target" else "right")
    for name, r in results.items():
        table.add_row(name, f"{r['handshakes_per_s']:.1f}", str(r["p50_ms"]), str(r["p99_ms"]), str(r["errors"]))
    console.print(table)
    ratio = None
    if "nginx" in results and results["nginx"]["handshakes_per_s"]:
        ratio = round(results["enforcer"]["handshakes_per_s"] / results["nginx"]["handshakes_per_s"], 3)
        console.print(f"ratio enforcer/nginx (handshakes/s): [bold]{ratio}[/bold]")
    for name, r in results.items():
        for kind, n in r["error_kinds"].items():
            console.print(f"{name} client error x{n}: {kind}", markup=False)
    log_kinds = access_log_summary(access_log)
    stderr_lines = [ln for ln in enforcer_err.read_text(errors="replace").splitlines() if "listening" not in ln and "stopped" not in ln]
    if results["enforcer"]["errors"] or any(not k.startswith("status 200") for k in log_kinds):
        console.print(f"enforcer access log: {log_kinds}", markup=False)
    if stderr_lines:
        console.print("enforcer stderr:\n" + "\n".join(stderr_lines[-40:]), markup=False)
    for note in notes:
        console.print(note, markup=False)
    record = {
        "bench": "handshakes", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(), "duration_s": args.duration, "warmup_s": WARMUP, "clients": args.clients,
        "workers": args.workers, "tls": tls_info, "targets": results, "ratio_enforcer_nginx": ratio,
        "enforcer_access_log": log_kinds, "notes": notes,
    }
    print(json.dumps(record, separators=(",", ":")), flush=True)
    print(f"rerun: cd {shlex.quote(os.getcwd())} && {shlex.join(sys.orig_argv)}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return 1 if any(r["errors"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
