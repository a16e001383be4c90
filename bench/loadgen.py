"""The load generator's full mTLS handshakes per core, beside ``openssl s_time -new``.

Both clients make a new connection and a full TLS handshake with an EC P-256 device
certificate (leaf + one intermediate) per request, then ``GET /``, against the same nginx
(``ssl_verify_client optional``) on 127.0.0.1, one after the other in one run:

* ``testbed load --mode new-handshake --closed N`` with one worker process: a different
  device certificate for each of N devices, back to back; its CPU is what its shard process
  spent from the start of the schedule (``generator_cpu_seconds``);
* ``openssl s_time -new -www /`` with one device's certificate: one connection at a time, in
  C; its CPU is the process's user + system time (``RUSAGE_CHILDREN``).

* a plain pyOpenSSL loop (``--no-floor`` leaves it out): the generator's own TLS
  (:func:`devices.openssl_tls.client_context`, a context per device with its certificate and
  key, cycling through the same devices) in a blocking loop in one thread: connect, handshake,
  ``GET /``, read the answer, close; its CPU is that thread's. No trio, no h11, no results: the
  floor the generator's Python sits on, and what a generator could reach on this TLS.

The per-core figure is handshakes per CPU-second of the client itself, which the noise of a
shared machine disturbs far less than handshakes per wall second. The ratio
generator/s_time is the number to compare between runs; issue 18's goal is >= 1.0, and the
script says whether it holds. The two clients run in alternating windows (generator, s_time,
s_time, generator, ...; ``--rounds`` each), so a neighbour's load hits both alike; each
window pair gives a ratio too. Both are printed beside the client's
crypto ceiling from ``openssl speed`` (see bench/ceiling.py): per full handshake a client does
one X25519 key generation and one derivation, one ECDSA P-256 signature (its CertificateVerify)
and two ECDSA P-256 verifications (the server's CertificateVerify, and the edge certificate
against the edge CA it trusts).

    .venv/bin/python bench/loadgen.py [--duration 8] [--rounds 2] [--devices 16]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from ceiling import ceiling, openssl_speed  # bench/ceiling.py, beside this script
from OpenSSL import SSL
from rich.console import Console
from rich.table import Table

from devices.openssl_tls import client_context
from devices.provision import Cohort, provision, read_inventory
from testbed.nginx import NGINX, start_nginx, stop_nginx
from testbed.runner import write_edge

HOST = "auth.example.test"
CLIENT_PROFILE = {"x25519": 2, "ecdsa_sign": 1, "ecdsa_verify": 2, "rsa_sign": 0}
ROOT = Path(__file__).resolve().parents[1]
GOAL = 1.0  # issue 18: generator handshakes per CPU-second >= s_time's


def _add(total: dict[str, Any] | None, window: dict[str, Any]) -> dict[str, Any]:
    """Sum two clients' window figures (handshakes, CPU, wall); keep the last latencies."""
    if total is None:
        return dict(window)
    out = dict(window)
    for key in ("handshakes", "cpu_s", "wall_s"):
        out[key] = total[key] + window[key]
    out["per_s"] = out["handshakes"] / out["wall_s"] if out["wall_s"] else None
    out["per_cpu_s"] = out["handshakes"] / out["cpu_s"] if out["cpu_s"] else None
    return out


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_generator(url: str, ca: Path, fleet: Path, devices: int, duration: int) -> dict[str, Any]:
    """``testbed load`` against ``url``; its figures from the --json line."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as reports:
        out = subprocess.run(
            [
                *(sys.executable, "-m", "testbed.cli", "load", "--target", url),
                *("--ca", str(ca), "--hostname", HOST, "--fleet", str(fleet)),
                *("--closed", str(devices), "--duration", f"{duration}s", "--workers", "1"),
                *("--mode", "new-handshake", "--no-progress", "--json", "--reports", reports),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        )
    line = next(x for x in out.stdout.splitlines() if x.startswith("{"))
    figures = json.loads(line)
    latency = figures["latency_ms"]["total"]
    return {
        "handshakes": figures["attempts"],
        "per_s": figures["rate"],
        "cpu_s": figures["generator_cpu_s"],
        "per_cpu_s": figures["attempts_per_generator_cpu_s"],
        "p50_ms": latency["p50"],
        "p99_ms": latency["p99"],
        # The schedule's length, not the process's: its start-up is not measured.
        "wall_s": figures["attempts"] / figures["rate"] if figures["rate"] else duration,
        "process_wall_s": time.perf_counter() - started,
    }


def run_s_time(port: int, ca: Path, cert: Path, key: Path, duration: int) -> dict[str, Any]:
    """``openssl s_time -new`` against the port; connections per wall and CPU second."""
    before = _children_cpu()
    started = time.perf_counter()
    out = subprocess.run(
        [
            *("openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new", "-www", "/"),
            *("-time", str(duration), "-cert", str(cert), "-key", str(key), "-CAfile", str(ca)),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - started
    cpu = _children_cpu() - before
    # "N connections in U s; ... connections/user sec": U is user CPU, not wall time.
    match = re.search(r"(\d+) connections in [\d.]+s", out.stdout)
    if match is None:
        raise RuntimeError(f"openssl s_time printed no figures: {out.stdout}{out.stderr}")
    n = int(match.group(1))
    return {
        "handshakes": n,
        "per_s": n / wall,
        "cpu_s": cpu,
        "per_cpu_s": n / cpu if cpu else None,
        "wall_s": wall,
    }


def run_floor(port: int, ca: Path, fleet: Path, devices: int, duration: int) -> dict[str, Any]:
    """The plain pyOpenSSL loop (see the module doc) for ``duration`` seconds."""
    contexts = []
    for device in read_inventory(fleet)[:devices]:
        ctx = client_context(ca, HOST, ("http/1.1",))
        ctx.use_certificate_chain_file(str(fleet / device.cert_path))
        ctx.use_privatekey_file(str(fleet / device.key_path))
        contexts.append(ctx)
    request = f"GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()
    n = 0
    cpu0, started = time.thread_time(), time.perf_counter()
    while time.perf_counter() - started < duration:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        conn = SSL.Connection(contexts[n % len(contexts)], sock)
        conn.set_connect_state()
        conn.set_tlsext_host_name(HOST.encode())
        conn.do_handshake()
        conn.sendall(request)
        answer = b""
        while True:  # nginx closes after the answer (Connection: close)
            try:
                chunk = conn.recv(65536)
            except (SSL.ZeroReturnError, SSL.SysCallError):
                break
            if not chunk:
                break
            answer += chunk
        if not answer.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"the floor loop got {answer[:60]!r}")
        conn.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)
        sock.close()
        n += 1
    cpu, wall = time.thread_time() - cpu0, time.perf_counter() - started
    return {"handshakes": n, "per_s": n / wall, "cpu_s": cpu, "per_cpu_s": n / cpu, "wall_s": wall}


async def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Provision the fleet, start nginx, run both clients against it."""
    now = dt.datetime.now(dt.UTC)
    fleet = work / "fleet"
    provision(fleet, [Cohort("healthy", args.devices)], now, p12=False, workers=1)
    edge = work / "run"

    class _Target:  # write_edge reads only the hostnames
        hostname = HOST
        hostnames = (HOST,)

    class _Scenario:
        target = _Target()

    write_edge(_Scenario(), edge, now)  # type: ignore[arg-type]
    proc, port = await start_nginx(
        work / "nginx",
        cert=edge / "edge" / "cert.pem",
        key=edge / "edge" / "key.pem",
        client_ca=fleet / "ca" / "upload.pem",
        server_name=HOST,
    )
    try:
        ca = edge / "edge" / "ca.pem"
        device = read_inventory(fleet)[0]
        gen: dict[str, Any] | None = None
        s_time: dict[str, Any] | None = None
        floor: dict[str, Any] | None = None
        windows: list[float] = []
        clients = ("generator", "s_time") + (() if args.no_floor else ("floor",))
        for k in range(args.rounds):
            order = clients if k % 2 == 0 else clients[::-1]
            pair: dict[str, dict[str, Any]] = {}
            for client in order:
                if client == "floor":
                    pair[client] = await trio.to_thread.run_sync(
                        run_floor, port, ca, fleet, args.devices, args.duration
                    )
                    floor = _add(floor, pair[client])
                    continue
                if client == "generator":
                    pair[client] = await trio.to_thread.run_sync(
                        run_generator,
                        f"https://127.0.0.1:{port}",
                        ca,
                        fleet,
                        args.devices,
                        args.duration,
                    )
                else:
                    pair[client] = await trio.to_thread.run_sync(
                        run_s_time,
                        port,
                        ca,
                        fleet / device.cert_path,
                        fleet / device.key_path,
                        args.duration,
                    )
            gen, s_time = _add(gen, pair["generator"]), _add(s_time, pair["s_time"])
            if pair["s_time"]["per_cpu_s"]:
                windows.append(pair["generator"]["per_cpu_s"] / pair["s_time"]["per_cpu_s"])
    finally:
        await stop_nginx(proc)
    return {"generator": gen, "s_time": s_time, "floor": floor, "windows": windows}


def main() -> None:
    """Measure and print a table and one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=8, help="seconds per window")
    parser.add_argument("--rounds", type=int, default=2, help="windows per client (alternating)")
    parser.add_argument("--no-floor", action="store_true", help="skip the plain pyOpenSSL loop")
    parser.add_argument("--devices", type=int, default=16, help="generator devices (closed loop)")
    parser.add_argument("--speed-seconds", type=int, default=2, help="per openssl speed test")
    args = parser.parse_args()
    if NGINX is None:
        sys.exit("bench/loadgen.py needs nginx (apt-get install nginx)")
    with tempfile.TemporaryDirectory() as tmp:
        figures = trio.run(measure, args, Path(tmp))
    gen, s_time = figures["generator"], figures["s_time"]
    top = ceiling(openssl_speed(args.speed_seconds), CLIENT_PROFILE)
    ratio_cpu = gen["per_cpu_s"] / s_time["per_cpu_s"] if s_time["per_cpu_s"] else None
    ratio_wall = gen["per_s"] / s_time["per_s"] if s_time["per_s"] else None
    table = Table(title="Full mTLS handshakes against nginx, new connection per request")
    for column in ("client", "handshakes", "per wall s", "client CPU s", "per CPU s (per core)"):
        table.add_column(column, justify="left" if column == "client" else "right")
    table.add_row(
        f"testbed load ({args.devices} devices, 1 worker)",
        str(gen["handshakes"]),
        f"{gen['per_s']:.1f}",
        f"{gen['cpu_s']:.2f}",
        f"{gen['per_cpu_s']:.1f}",
    )
    table.add_row(
        "openssl s_time -new (1 certificate)",
        str(s_time["handshakes"]),
        f"{s_time['per_s']:.1f}",
        f"{s_time['cpu_s']:.2f}",
        f"{s_time['per_cpu_s']:.1f}" if s_time["per_cpu_s"] else "-",
    )
    floor = figures["floor"]
    if floor is not None:
        table.add_row(
            "plain pyOpenSSL loop (the generator's TLS, no trio/h11/results)",
            str(floor["handshakes"]),
            f"{floor['per_s']:.1f}",
            f"{floor['cpu_s']:.2f}",
            f"{floor['per_cpu_s']:.1f}",
        )
    table.add_row("ceiling (openssl speed, public-key work only)", "", "", "", f"{top:.0f}")
    console = Console()
    console.print(table)
    console.print(
        f"generator/s_time per core: [bold]{ratio_cpu:.2f}[/]; per wall second: {ratio_wall:.2f}"
        f" (generator p50 {gen['p50_ms']:.1f} ms, p99 {gen['p99_ms']:.1f} ms)"
    )
    floor_ratio = (
        floor["per_cpu_s"] / s_time["per_cpu_s"] if floor and s_time["per_cpu_s"] else None
    )
    if floor_ratio is not None:
        console.print(
            f"plain pyOpenSSL loop/s_time per core: {floor_ratio:.2f} (the generator's TLS"
            f" without its Python: generator/floor {gen['per_cpu_s'] / floor['per_cpu_s']:.2f})"
        )
    held = ratio_cpu is not None and ratio_cpu >= GOAL
    console.print(
        f"per window pair: {', '.join(f'{r:.2f}' for r in figures['windows'])};"
        f" goal generator/s_time per core >= {GOAL:.1f}: "
        + ("[bold green]met[/]" if held else "[bold red]not met[/]")
    )
    console.print(
        f"rerun: .venv/bin/python bench/loadgen.py --duration {args.duration}"
        f" --rounds {args.rounds} --devices {args.devices}"
    )
    print(
        json.dumps(
            {
                "bench": "loadgen",
                "duration_s": args.duration,
                "devices": args.devices,
                **{f"generator_{k}": v for k, v in gen.items()},
                **{f"s_time_{k}": v for k, v in s_time.items()},
                **{f"floor_{k}": v for k, v in (floor or {}).items()},
                "floor_per_s_time": (
                    floor["per_cpu_s"] / s_time["per_cpu_s"]
                    if floor and s_time["per_cpu_s"]
                    else None
                ),
                "rounds": args.rounds,
                "ratio_per_core": ratio_cpu,
                "ratio_per_core_windows": figures["windows"],
                "goal": GOAL,
                "goal_met": held,
                "client_ceiling_per_core": top,
                "generator_share_of_ceiling": gen["per_cpu_s"] / top,
                "ratio_per_wall_s": ratio_wall,
            }
        )
    )


if __name__ == "__main__":
    main()
