"""Good HTTP/2 clients' latency beside rapid-reset attackers (CVE-2023-44487), guarded and loose.

Two enforcers run side by side from the same demo configuration: ``guarded`` with the default
HTTP/2 flood bounds, and ``loose`` with every bound of enforcer/h2guard.py as high as the
configuration allows (``h2_premature_reset_streams`` 1,000,000, ``h2_max_control_frames_per_second``
100,000, ``h2_max_concurrent_streams`` 1024), which is roughly an enforcer without the guard.
Good clients are threads, each holding one HTTP/2 connection (ALPN h2, the demo's valid device
certificate) and sending one GET after another, measuring each stream's round trip. Attackers
are a separate process (so they share no interpreter with the good clients): each attacker
opens a TLS connection, sends requests each reset at once (``--burst`` HEADERS + RST_STREAM pairs
per write, at most ``--rate`` a second) and reconnects whenever the enforcer ends the
connection. The rate is capped so that the attacker, sharing the machine's 2 cores, is not what
slows the good clients; the enforcer's CPU seconds per window show what the attack costs it.

Windows alternate per round (quiet / attacked for each enforcer, order reversed every round) so
the machine's noise hits all alike. Figures: good requests' p50/p99 latency and count per window
kind, the attackers' streams and connections, and how many attack streams reached the access
decision (the enforcer's access log lines for ``/attack``). Compare within one run only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import shlex
import socket
import ssl
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
from harness import HOST, cpu_seconds, free_port, start_origin, start_server, stop
from rich.console import Console
from rich.table import Table

from testbed.demo import AUTH_HOST, DemoLayout, write_demo
from testbed.h2floods import FloodWriter, FrameReader

LOOSE = {
    "h2_premature_reset_streams": 1_000_000,
    "h2_max_control_frames_per_second": 100_000,
    "h2_max_concurrent_streams": 1024,
}


def context(layout: DemoLayout) -> ssl.SSLContext:
    """A client context for the demo's valid device, offering only h2."""
    ctx = ssl.create_default_context(cafile=str(layout.edge_ca))
    ctx.load_cert_chain(*layout.device("valid"))
    ctx.set_alpn_protocols(["h2"])
    return ctx


def connect(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    """A TLS connection that negotiated h2."""
    sock = socket.create_connection((HOST, port), timeout=10)
    tls = ctx.wrap_socket(sock, server_hostname=AUTH_HOST)
    if tls.selected_alpn_protocol() != "h2":
        raise SystemExit(f"the enforcer on {port} did not select h2")
    return tls


class GoodClient:
    """One well-behaved HTTP/2 connection, one GET at a time (reconnects when it ends)."""

    def __init__(self, port: int, ctx: ssl.SSLContext) -> None:
        self.port, self.ctx = port, ctx
        self.tls: ssl.SSLSocket | None = None
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))

    def _open(self) -> None:
        self.tls = connect(self.port, self.ctx)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.tls.sendall(self.conn.data_to_send())

    def get(self) -> int:
        """One GET /good; its status (0: the connection failed under it)."""
        if self.tls is None:
            self._open()
        assert self.tls is not None
        conn = self.conn
        sid = conn.get_next_available_stream_id()
        hdrs = [(":method", "GET"), (":scheme", "https"), (":authority", AUTH_HOST)]
        conn.send_headers(sid, [*hdrs, (":path", "/good")], end_stream=True)
        status = 0
        try:
            self.tls.sendall(conn.data_to_send())
            while True:
                data = self.tls.recv(65536)
                if not data:
                    raise ConnectionError("closed")
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                        status = int(dict(ev.headers or [])[b":status"])
                    elif isinstance(ev, h2.events.DataReceived) and ev.data:
                        conn.acknowledge_received_data(len(ev.data), ev.stream_id or 0)
                    elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
                        if ev.stream_id == sid:
                            self.tls.sendall(conn.data_to_send())
                            return status
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        raise ConnectionError("goaway")
                self.tls.sendall(conn.data_to_send())
        except (OSError, ConnectionError, h2.exceptions.ProtocolError):
            self.tls.close()
            self.tls = None
            return status


def measure(port: int, ctx: ssl.SSLContext, clients: int, seconds: float) -> dict[str, Any]:
    """Good clients' latencies for ``seconds`` against ``port``."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def run() -> None:
        client = GoodClient(port, ctx)
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                status = client.get()
            except OSError:
                status = 0
            with lock:
                if status == 200:
                    latencies.append(time.monotonic() - t0)
                else:
                    errors[0] += 1

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": latencies, "errors": errors[0]}


def _attacker_main(port: int, edge_ca: str, cert: str, key: str, burst: int, rate: float,
                   stop_ev: Any, ready: Any, out: Any, attackers: int) -> None:  # fmt: skip
    """The attackers' process: threads that rapid-reset and reconnect until stopped."""
    ctx = ssl.create_default_context(cafile=edge_ca)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    totals = {"connections": 0, "streams": 0, "goaway_enhance_your_calm": 0, "cut": 0}
    lock = threading.Lock()

    def attacker() -> None:
        due = time.monotonic()
        while not stop_ev.is_set():
            writer, reader = FloodWriter(AUTH_HOST, "/attack"), FrameReader()
            try:
                tls = connect(port, ctx)
            except OSError:
                continue
            ready.set()  # the measuring starts once an attack is under way
            try:
                tls.sendall(writer.opening())
                while not stop_ev.is_set() and reader.answer.goaway is None:
                    # Paced: the attacker must not be what saturates the machine.
                    due += burst / rate
                    if (wait := due - time.monotonic()) > 0:
                        time.sleep(wait)
                    else:
                        due = time.monotonic()
                    tls.sendall(writer.rapid_reset(burst))
                    tls.settimeout(0.0)
                    try:
                        while data := tls.recv(65536):
                            reader.feed(data)
                    except (ssl.SSLWantReadError, BlockingIOError):
                        pass
                    tls.settimeout(10)
            except OSError:
                pass
            finally:
                tls.close()
            with lock:
                totals["connections"] += 1
                totals["streams"] += writer.streams_opened
                totals["goaway_enhance_your_calm"] += reader.answer.goaway == 0xB
                totals["cut"] += reader.answer.goaway is None and not stop_ev.is_set()

    threads = [threading.Thread(target=attacker, daemon=True) for _ in range(attackers)]
    for t in threads:
        t.start()
    stop_ev.wait()
    for t in threads:
        t.join(timeout=15)
    out.put(totals)


def percentile(values: list[float], p: float) -> float | None:
    """The ``p`` percentile of ``values`` in ms (nearest rank), or None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return round(1000 * ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))], 2)


def attack_log_lines(path: Path) -> dict[str, int]:
    """Access log lines of attack streams that reached the decision, and flood events."""
    decided = floods = 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == "h2_flood":
            floods += 1
        elif rec.get("path") == "/attack":
            decided += 1
    return {"attack_streams_decided": decided, "h2_flood_events": floods}


def main() -> int:
    """Run the benchmark; print its table, JSON line and rerun command."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--duration", type=float, default=4.0, help="measured s per window (4)")
    ap.add_argument("--rounds", type=int, default=2, help="windows of each kind (2)")
    ap.add_argument("--clients", type=int, default=4, help="good client threads (4)")
    ap.add_argument("--attackers", type=int, default=2, help="attacker threads (2)")
    ap.add_argument("--burst", type=int, default=20, help="HEADERS+RST pairs per write (20)")
    ap.add_argument(
        "--rate", type=float, default=5000, help="reset streams/s per attacker, at most (5000)"
    )
    args = ap.parse_args()
    if args.duration <= 0 or args.rate <= 0:
        ap.error("--duration and --rate must be > 0")
    if min(args.rounds, args.clients, args.attackers, args.burst) < 1:
        ap.error("--rounds, --clients, --attackers and --burst must be 1 or more")
    console = Console(soft_wrap=True, highlight=False, width=170)
    tmp = Path(tempfile.mkdtemp(prefix="bench-h2floods-"))
    origin_port = free_port()
    origin = start_origin(origin_port)
    beds: dict[str, Any] = {}
    procs = []
    try:
        for name in ("guarded", "loose"):
            port = free_port()
            layout = write_demo(tmp / name, port, f"http://{HOST}:{origin_port}")
            conf = layout.config.read_text(encoding="utf-8")
            log = tmp / f"{name}-access.log"
            conf = conf.replace('access_log = "-"', f'access_log = "{log}"')
            if name == "loose":
                extra = "".join(f"{k} = {v}\n" for k, v in LOOSE.items())
                conf = conf.replace("[server]\n", "[server]\n" + extra, 1)
            layout.config.write_text(conf, encoding="utf-8")
            exe = str(Path(sys.executable).with_name("testbed"))
            cmd = [exe, "enforcer", "serve", "--config", str(layout.config), "--port", str(port)]
            procs.append(proc := start_server(cmd, port, name, tmp / f"{name}.err"))
            beds[name] = {"port": port, "layout": layout, "log": log, "proc": proc}
        kinds = [(e, a) for e in beds for a in ("quiet", "attacked")]
        results: dict[str, dict[str, Any]] = {
            f"{e} {a}": {"latencies": [], "errors": 0, "attack": {}} for e, a in kinds
        }
        for r in range(args.rounds):
            for e, a in kinds if r % 2 == 0 else kinds[::-1]:
                bed = beds[e]
                console.print(f"  round {r + 1}: {e} {a} ...")
                ctx = context(bed["layout"])
                attack = None
                if a == "attacked":
                    mpc = mp.get_context("spawn")
                    stop_ev, ready, out = mpc.Event(), mpc.Event(), mpc.Queue()
                    cert, key = bed["layout"].device("valid")
                    attack = mpc.Process(
                        target=_attacker_main, daemon=True,
                        args=(bed["port"], str(bed["layout"].edge_ca), str(cert), str(key),
                              args.burst, args.rate, stop_ev, ready, out, args.attackers),
                    )  # fmt: skip
                    attack.start()
                    if not ready.wait(60):
                        raise SystemExit("the attackers could not connect")
                    time.sleep(0.2)
                cpu0 = cpu_seconds(bed["proc"].pid)
                got = measure(bed["port"], ctx, args.clients, args.duration)
                res = results[f"{e} {a}"]
                res["enforcer_cpu_s"] = res.get("enforcer_cpu_s", 0.0) + (
                    cpu_seconds(bed["proc"].pid) - cpu0
                )
                res["latencies"] += got["latencies"]
                res["errors"] += got["errors"]
                if attack is not None:
                    stop_ev.set()
                    totals = out.get(timeout=60)
                    attack.join(timeout=10)
                    for k, v in totals.items():
                        res["attack"][k] = res["attack"].get(k, 0) + v
    finally:
        for p in procs:
            stop(p)
        origin.terminate()
        origin.join(timeout=5)

    table = Table(title=(
        f"Good HTTP/2 GETs ({args.clients} clients, kept connections) beside {args.attackers} "
        f"rapid-reset attackers ({args.burst} HEADERS+RST per write, at most {args.rate:g}/s "
        "each): "
        f"{args.rounds} x {args.duration:g} s per kind"
    ))  # fmt: skip
    cols = ("window", "good requests", "p50 ms", "p99 ms", "errors", "enforcer CPU-s",
            "attack streams written", "attack connections", "GOAWAY calm")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="left" if col == "window" else "right")
    summary: dict[str, Any] = {}
    for name, res in results.items():
        lat = res["latencies"]
        atk = res["attack"]
        summary[name] = {
            "good_requests": len(lat),
            "p50_ms": percentile(lat, 50),
            "p99_ms": percentile(lat, 99),
            "errors": res["errors"],
            "enforcer_cpu_s": round(res.get("enforcer_cpu_s", 0.0), 2),
            **atk,
        }
        table.add_row(name, str(len(lat)), str(summary[name]["p50_ms"]),
                      str(summary[name]["p99_ms"]), str(res["errors"]),
                      str(summary[name]["enforcer_cpu_s"]),
                      str(atk.get("streams", "")), str(atk.get("connections", "")),
                      str(atk.get("goaway_enhance_your_calm", "")))  # fmt: skip
    console.print(table)
    for name, bed in beds.items():
        counts = attack_log_lines(bed["log"])
        summary[f"{name} log"] = counts
        console.print(
            f"{name}: {counts['attack_streams_decided']} attack streams reached the access "
            f"decision; {counts['h2_flood_events']} h2_flood events",
            markup=False,
        )
    for name in beds:
        q, a = summary[f"{name} quiet"], summary[f"{name} attacked"]
        if q["p50_ms"] and a["p50_ms"] and q["p99_ms"] and a["p99_ms"]:
            console.print(
                f"{name}: attacked / quiet p50 {a['p50_ms'] / q['p50_ms']:.2f}, "
                f"p99 {a['p99_ms'] / q['p99_ms']:.2f}",
                markup=False,
            )
    record = {
        "bench": "h2floods",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "args": vars(args),
        "results": summary,
    }
    print(json.dumps(record))
    cmd = [sys.executable, "bench/h2floods.py", *sys.argv[1:]]
    console.print("rerun: " + shlex.join(cmd), markup=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
