"""Memory per open connection: thousands of kept-alive mTLS connections and WebSocket tunnels
held through one enforcer worker, beside nginx holding the same through one worker.

Theory of operation. For each target in turn (the enforcer with ``--workers 1``, then nginx
with ``worker_processes 1``) a device process opens ``--connections`` mTLS connections, each
with its own device certificate from a ``devices.provision`` fleet (``--fleet``, default one
per connection; a smaller fleet is reused round robin). A share of them
(``--websocket-share``) open a WebSocket tunnel to the echo origin; the rest stay kept-alive
HTTPS connections. Every connection sends telemetry every ``--interval`` seconds (a small POST
on the HTTPS ones, a WebSocket message answered by the echo origin on the tunnels), starting
as soon as it is open so that no connection goes idle for longer than the servers' keep-alive
timeouts while the others open. Once all are open, they are held for ``--duration`` seconds;
then the server's memory is read again and everything closes.

Memory is read from ``/proc/PID/smaps_rollup``: RSS (the headline), PSS and USS
(Private_Clean + Private_Dirty), for the enforcer's single process and for nginx's single
worker (the master process holds no connections). Per connection = (held - before) / number
of connections, where "before" is the server after one warm-up request and "held" the last
sample at the end of the hold (telemetry is spread over the interval, so at any instant nearly
every connection is idle). The device side is the RSS of the one trio process holding all
the devices (the product's ``devices.client.DeviceClient`` with a ``SoftwareKeyStore`` per
device), whole and per
connection. Targets are measured one after the other (memory does not move with the CPU
noise of neighbours the way throughput does); the nginx ratio comes from the same run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from harness import (
    HOST,
    NGINX,
    free_port,
    make_testbed,
    nginx_missing,
    start_enforcer,
    start_origin,
    start_server,
    stop,
)

from testbed.demo import AUTH_HOST

NGINX_CONF = """\
worker_processes 1; daemon off; master_process on;
worker_rlimit_nofile {nofile};
pid {tmp}/nginx.pid; error_log {tmp}/error.log warn;
events {{ worker_connections {worker_connections}; }}
http {{
    access_log {tmp}/access.log;  # the enforcer writes one too
    keepalive_requests 100000000; keepalive_timeout 75s;  # the enforcer's idle_timeout is 60 s
    client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fcgi;
    uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
    upstream origin {{ server {host}:{origin_port}; keepalive 32; }}
    server {{
        listen {host}:{port} ssl; server_name {server_name};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate {edge}/cert.pem; ssl_certificate_key {edge}/key.pem;
        ssl_client_certificate {client_ca}; ssl_verify_client optional; ssl_verify_depth 2;
        location / {{
            if ($ssl_client_verify != SUCCESS) {{ return 403; }}
            proxy_pass http://origin; proxy_http_version 1.1;
            proxy_set_header Connection ""; proxy_set_header Host $host;
            proxy_set_header X-Client-Cert-Sha256 $ssl_client_fingerprint;
        }}
        location /ws {{  # WebSocket tunnels to the same echo origin
            if ($ssl_client_verify != SUCCESS) {{ return 403; }}
            proxy_pass http://{host}:{origin_port}; proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection "upgrade";
            proxy_set_header Host $host; proxy_read_timeout 300s; proxy_send_timeout 300s;
        }}
    }}
}}
"""

TELEMETRY = b'{"device":"%d","temp_c":21.5,"battery":0.87,"seq":%d}'
KIB = 1024.0


def memory(pid: int) -> dict[str, int]:
    """RSS, PSS and USS of ``pid`` in bytes, from /proc/PID/smaps_rollup."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
        for line in f:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[name] = int(parts[0]) * 1024
    return {
        "rss": fields["Rss"],
        "pss": fields["Pss"],
        "uss": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0),
    }


def children(pid: int) -> list[int]:
    """The live child processes of ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def raise_nofile(wanted: int) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE (soft, and hard when allowed) to ``wanted``; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted, wanted
        except (ValueError, OSError):
            wanted = hard  # not root: as far as the hard limit goes
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# ---- the device process ----------------------------------------------------------------------


def _devices_main(plan: dict[str, Any], out: Any, cmds: Any) -> None:
    """One process, one trio loop, every device: open, hold with telemetry, report, close."""
    out.put(("started", memory(os.getpid())))
    if plan["profile_devices"]:
        import cProfile

        run = "trio.run(_hold_devices, plan, out, cmds)"
        cProfile.runctx(run, globals(), locals(), plan["profile_devices"])
        return
    trio.run(_hold_devices, plan, out, cmds)


async def _hold_devices(plan: dict[str, Any], out: Any, cmds: Any) -> None:
    from devices.client import ClientOptions, DeviceClient, Target
    from devices.keystore import SoftwareKeyStore

    n, interval = plan["connections"], plan["interval"]
    target = Target(HOST, plan["port"], AUTH_HOST, Path(plan["edge_ca"]))
    options = ClientOptions(keep_alive=True, resume_sessions=False, timeout=plan["timeout"])
    devices = plan["devices"]
    websockets = round(n * plan["websocket_share"])
    limiter = trio.CapacityLimiter(plan["open_concurrency"])
    opened = trio.Event()
    stop = trio.Event()
    state = {"open": 0, "failed_open": 0, "telemetry": 0, "telemetry_errors": 0, "reconnects": 0}
    errors: dict[str, int] = {}
    counted = [0]

    def note_error(what: str) -> None:
        errors[what] = errors.get(what, 0) + 1

    def one_open() -> None:
        state["open"] += 1
        counted[0] += 1
        if counted[0] == n:
            opened.set()

    def failed_open(what: str) -> None:
        state["failed_open"] += 1
        note_error(what)
        counted[0] += 1
        if counted[0] == n:
            opened.set()

    async def telemetry_pause() -> bool:
        """Sleep until the next telemetry; False once the hold is over."""
        with trio.move_on_after(interval):
            await stop.wait()
        return not stop.is_set()

    async def https(i: int, client: DeviceClient) -> None:
        async with limiter:
            attempt = await client.request("/telemetry", method="POST", body=TELEMETRY % (i, 0))
        if not attempt.allowed:
            failed_open(f"https open: {attempt.outcome} {attempt.error or ''}"[:120])
            await client.aclose()
            return
        one_open()
        await trio.sleep(random.random() * interval)  # spread the rounds over the interval
        seq = 0
        while await telemetry_pause():
            seq += 1
            attempt = await client.request("/telemetry", method="POST", body=TELEMETRY % (i, seq))
            state["telemetry"] += 1
            if attempt.new_connection:
                state["reconnects"] += 1  # the server had closed the kept-alive connection
            if not attempt.allowed:
                state["telemetry_errors"] += 1
                note_error(f"https telemetry: {attempt.outcome}")
        await client.aclose()

    async def websocket(i: int, client: DeviceClient) -> None:
        await limiter.acquire_on_behalf_of(i)
        released = False
        try:
            async with client.websocket("/ws") as (attempt, ws):
                limiter.release_on_behalf_of(i)
                released = True
                if ws is None:
                    failed_open(f"websocket open: {attempt.outcome} {attempt.error or ''}"[:120])
                    return
                one_open()
                await trio.sleep(random.random() * interval)
                seq = 0
                while await telemetry_pause():
                    seq += 1
                    try:
                        await ws.send_message(TELEMETRY % (i, seq))
                        with trio.fail_after(plan["timeout"]):
                            await ws.get_message()
                        state["telemetry"] += 1
                    except Exception as exc:  # a closed tunnel: count it, stop this device
                        state["telemetry"] += 1
                        state["telemetry_errors"] += 1
                        note_error(f"websocket telemetry: {type(exc).__name__}")
                        return
        finally:
            if not released:
                limiter.release_on_behalf_of(i)

    async def device(i: int) -> None:
        cert, key = devices[i % len(devices)]
        client = DeviceClient(target, SoftwareKeyStore(Path(cert), Path(key)), options)
        if i < websockets:
            await websocket(i, client)
        else:
            await https(i, client)

    async with trio.open_nursery() as nursery:
        order = list(range(n))
        random.Random(1).shuffle(order)  # tunnels and HTTPS connections open interleaved
        t0 = time.monotonic()
        for i in order:
            nursery.start_soon(device, i)
        await opened.wait()
        out.put(("open", dict(state), memory(os.getpid()), time.monotonic() - t0))
        await trio.sleep(plan["duration"])
        out.put(("held", dict(state), memory(os.getpid()), errors))
        await trio.to_thread.run_sync(cmds.get)  # the parent has read the server's memory
        stop.set()
    out.put(("closed", dict(state), errors))


# ---- one target ------------------------------------------------------------------------------


def measure(target: str, port: int, server_pid: int, plan: dict[str, Any]) -> dict[str, Any]:
    """Hold ``plan['connections']`` on the server ``server_pid`` and read both sides' memory."""
    before = memory(server_pid)
    ctx = mp.get_context("spawn")
    out, cmds = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_devices_main, args=({**plan, "port": port}, out, cmds))
    proc.start()
    try:
        _, device_start = out.get(timeout=120)
        _, _, _, open_s = out.get(timeout=plan["timeout"] * 10 + 3600)
        server_open = memory(server_pid)
        samples = [server_open["rss"]]
        deadline = time.monotonic() + plan["duration"]
        while time.monotonic() < deadline - 1:
            time.sleep(min(5.0, deadline - 1 - time.monotonic()))
            samples.append(memory(server_pid)["rss"])
        _, held_state, device_held, errors = out.get(timeout=plan["duration"] + 600)
        server_held = memory(server_pid)
        samples.append(server_held["rss"])
        cmds.put("close")
        _, closed_state, errors = out.get(timeout=300)
    finally:
        proc.join(timeout=0 if sys.exc_info()[0] else 60)
        if proc.is_alive():
            proc.terminate()
    n = held_state["open"] or 1

    def per(a: dict[str, int], b: dict[str, int], k: str) -> float:
        return round((b[k] - a[k]) / n / KIB, 1)

    return {
        "target": target,
        "connections": held_state["open"],
        "failed_open": held_state["failed_open"],
        "open_s": round(open_s, 1),
        "server_before_mib": round(before["rss"] / KIB / KIB, 1),
        "server_held_mib": round(server_held["rss"] / KIB / KIB, 1),
        "server_peak_mib": round(max(samples) / KIB / KIB, 1),
        "rss_kib_per_conn": per(before, server_held, "rss"),
        "pss_kib_per_conn": per(before, server_held, "pss"),
        "uss_kib_per_conn": per(before, server_held, "uss"),
        "rss_kib_per_conn_at_open": per(before, server_open, "rss"),
        "device_rss_gib": round(device_held["rss"] / KIB**3, 3),
        "device_kib_per_conn": per(device_start, device_held, "rss"),
        "telemetry": closed_state["telemetry"],
        "telemetry_errors": closed_state["telemetry_errors"],
        "reconnects": closed_state["reconnects"],
        "errors": errors,
    }


def warm(port: int, edge_ca: Path, cert: Path, key: Path) -> None:
    """One request and one tunnel message through the server, so 'before' is a warm server."""

    async def go() -> None:
        from devices.client import DeviceClient, Target
        from devices.keystore import SoftwareKeyStore

        client = DeviceClient(Target(HOST, port, AUTH_HOST, edge_ca), SoftwareKeyStore(cert, key))
        attempt = await client.request("/telemetry", method="POST", body=b"{}")
        await client.aclose()
        if not attempt.allowed:
            raise SystemExit(f"port {port}: warm-up request {attempt.outcome} {attempt.error}")
        async with client.websocket("/ws") as (attempt, ws):
            if ws is None:
                raise SystemExit(f"port {port}: warm-up tunnel {attempt.outcome} {attempt.error}")
            await ws.send_message(b"{}")
            await ws.get_message()

    trio.run(go)


def main() -> int:
    """Run the bench and print its table, a JSON line and the command that reruns it."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=10_000, help="held per target (10,000)")
    ap.add_argument("--duration", type=float, default=60.0, help="s held with telemetry (60)")
    ap.add_argument("--interval", type=float, default=10.0, help="s between telemetry (10)")
    ap.add_argument("--websocket-share", type=float, default=0.5, help="tunnels' share (0.5)")
    ap.add_argument("--fleet", type=int, default=0, help="device certificates (0: one each)")
    ap.add_argument("--open-concurrency", type=int, default=16, help="handshakes in flight (16)")
    ap.add_argument("--timeout", type=float, default=60.0, help="device request timeout s (60)")
    ap.add_argument("--profile-devices", help="write a cProfile of the device process here")
    ap.add_argument("--skip-nginx", action="store_true", help="measure the enforcer only")
    ap.add_argument("--testbed", help="another build's testbed executable (a baseline)")
    args = ap.parse_args()
    # SIGTERM (timeout, a stopped job) unwinds like Ctrl-C, so the servers are stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    n = args.connections
    # Per connection: the enforcer holds the client's socket and, for a tunnel, the origin's;
    # nginx the same; the device process one socket each. Plus room for files and pipes.
    sockets = n + round(n * args.websocket_share)
    nofile = raise_nofile(sockets + 1024)
    if nofile[0] < sockets + 256:
        raise SystemExit(f"RLIMIT_NOFILE is {nofile}: too low for {n} connections")
    why = None if args.skip_nginx else nginx_missing()
    if why:
        raise SystemExit(f"nginx: {why} (or pass --skip-nginx)")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-connections-") as d:
        tmp = Path(d)
        eport, nport, oport = free_port(), free_port(), free_port()
        t0 = time.monotonic()
        bed = make_testbed(tmp, args.fleet or n, eport, oport)
        # The enforcer's worker_connections: room for every held connection.
        conf = bed.layout.config.read_text(encoding="utf-8")
        if "\n[server]\n" not in conf:
            raise SystemExit(f"{bed.layout.config}: no [server] table to add max_connections to")
        conf = conf.replace("\n[server]\n", f"\n[server]\nmax_connections = {n + 512}\n", 1)
        bed.layout.config.write_text(conf, encoding="utf-8")
        print(f"fleet of {len(bed.devices)} devices in {time.monotonic() - t0:.1f} s", flush=True)
        plan = {
            "connections": n,
            "duration": args.duration,
            "interval": args.interval,
            "websocket_share": args.websocket_share,
            "open_concurrency": args.open_concurrency,
            "timeout": args.timeout,
            "profile_devices": args.profile_devices,
            "edge_ca": str(bed.edge_ca),
            "devices": [(str(c), str(k)) for c, k in bed.devices],
        }
        origin = start_origin(oport)
        procs = []
        try:
            targets = [("enforcer", eport)]
            procs.append(start_enforcer(bed, eport, 1, args.testbed))
            if not args.skip_nginx:
                ndir = tmp / "nginx"
                ndir.mkdir()
                conf = NGINX_CONF.format(
                    nofile=nofile[0], worker_connections=sockets + 512, tmp=ndir, host=HOST,
                    port=nport, server_name=AUTH_HOST, edge=bed.layout.root / "edge",
                    client_ca=bed.fleet_root, origin_port=oport,
                )  # fmt: skip
                (ndir / "nginx.conf").write_text(conf, encoding="utf-8")
                cmd = [NGINX, "-p", str(ndir), "-e", str(ndir / "error.log")]
                cmd += ["-c", str(ndir / "nginx.conf")]
                procs.append(start_server(cmd, nport, "nginx", ndir / "error.log"))
                targets.append(("nginx", nport))
            for (name, port), proc in zip(targets, procs, strict=True):
                warm(port, bed.edge_ca, *bed.devices[0])
                pid = proc.pid
                if name == "nginx":
                    workers = children(proc.pid)
                    if len(workers) != 1:
                        raise SystemExit(f"nginx: expected 1 worker process, found {workers}")
                    pid = workers[0]
                print(f"{name}: opening {n} connections ...", flush=True)
                results.append(measure(name, port, pid, plan))
                print(json.dumps(results[-1]), flush=True)
        finally:
            for proc in procs:
                stop(proc)
            origin.terminate()
        err = (tmp / ("enforcer.err" if args.testbed is None else "baseline.err")).read_text(
            errors="replace"
        )
    report(results, args, err)
    bad = any(r["failed_open"] or r["telemetry_errors"] for r in results)
    return 1 if bad else 0


def report(results: list[dict[str, Any]], args: argparse.Namespace, err: str) -> None:
    """Print the table, the ratio to nginx and the JSON line."""
    n = args.connections
    tunnels = round(n * args.websocket_share)
    print(
        f"\n{n} connections per target ({tunnels} WebSocket tunnels, {n - tunnels} kept-alive "
        f"HTTPS), held {args.duration:.0f} s with telemetry every {args.interval:.0f} s; "
        "server = the enforcer's one process / nginx's one worker; KiB per connection = "
        "(held - before) / connections\n"
    )
    cols = [
        ("target", "target"),
        ("connections", "open"),
        ("failed_open", "failed"),
        ("open_s", "open s"),
        ("server_before_mib", "before MiB"),
        ("server_held_mib", "held MiB"),
        ("rss_kib_per_conn", "RSS KiB/conn"),
        ("pss_kib_per_conn", "PSS KiB/conn"),
        ("uss_kib_per_conn", "USS KiB/conn"),
        ("device_rss_gib", "device GiB"),
        ("device_kib_per_conn", "device KiB/conn"),
        ("telemetry", "telemetry"),
        ("telemetry_errors", "tel. errors"),
        ("reconnects", "reconnects"),
    ]
    print("| " + " | ".join(c[1] for c in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(str(r[c[0]]) for c in cols) + " |")
    out: dict[str, Any] = {"bench": "connections", "results": results}
    by = {r["target"]: r for r in results}
    if "nginx" in by and by["nginx"]["rss_kib_per_conn"] > 0:
        ratio = by["enforcer"]["rss_kib_per_conn"] / by["nginx"]["rss_kib_per_conn"]
        uss = by["enforcer"]["uss_kib_per_conn"] / max(by["nginx"]["uss_kib_per_conn"], 0.1)
        out["ratio_rss"], out["ratio_uss"] = round(ratio, 2), round(uss, 2)
        print(
            f"\nenforcer / nginx memory per connection: {ratio:.2f} (RSS), {uss:.2f} (USS); "
            "goal <= 1.5"
        )
    device = by["enforcer"]["device_rss_gib"]
    print(f"device side, one process: {device:.2f} GiB RSS for {n} devices (goal < 2 GiB)")
    for r in results:
        if r["errors"]:
            print(f"{r['target']} errors: {r['errors']}")
    lines = [ln for ln in err.splitlines() if ln and "listening on" not in ln]
    if lines:
        print(f"enforcer stderr ({len(lines)} lines): {lines[:3]}")
    out["enforcer_stderr_lines"] = len(lines)
    print(json.dumps(out))
    argv = " ".join(sys.argv[1:])
    print(f"rerun: .venv/bin/python bench/connections.py {argv}".rstrip())


if __name__ == "__main__":
    sys.exit(main())
