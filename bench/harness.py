"""What the enforcer-vs-nginx benchmarks share: a fleet, the two servers, and a client pool.

Theory of operation. The machine is small (2 cores), shared and noisy, so a figure only means
something as a ratio against a peer measured under the same conditions. Both servers are
started once and stay up; the same pool of client processes then drives them in alternating
windows (enforcer, nginx, enforcer, nginx, ...), so a burst of noise from a neighbour hits
both about equally, and every window gives one ratio. The clients are blocking stdlib ``ssl``
(Debian's OpenSSL) in ``--clients`` processes started once, each holding one ``SSLContext``
per device of its share of the fleet, built before measuring. A window starts at the same
monotonic instant in every process (CLOCK_MONOTONIC is system-wide on Linux), warms up, then
counts only requests started inside the window.

The fleet is ``--fleet`` EC P-256 device certificates issued by one intermediate under a
fleet root (``devices.provision``), so each full handshake carries a chain of leaf +
intermediate. Each client cycles through its own slice of the fleet, so after the first pass
every device is a returning one, as in a real fleet that reconnects; the clients count how many
handshakes were a device's first against that target.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime as dt
import multiprocessing as mp
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from devices.provision import Cohort, provision
from enforcer.origin import serve_echo_origin
from testbed.demo import AUTH_HOST, DemoLayout, write_demo

HOST = "127.0.0.1"
NGINX = "/usr/sbin/nginx"
NGINX_CONF = """\
worker_processes {workers}; daemon off; master_process on;
pid {tmp}/nginx.pid; error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {tmp}/access.log;  # the enforcer writes one too
    keepalive_requests 100000000; keepalive_timeout 60s;  # the cookie bench keeps one connection
    client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fcgi;
    uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
    upstream origin {{ server {host}:{origin_port}; keepalive 32; }}
    server {{
        listen {host}:{port} ssl; server_name {server_name};
        ssl_protocols TLSv1.2 TLSv1.3;  # nginx 1.22's default stops at TLSv1.2
        ssl_certificate {edge}/cert.pem; ssl_certificate_key {edge}/key.pem;
        ssl_client_certificate {client_ca}; ssl_verify_client optional; ssl_verify_depth 2;
        location / {{
            if ($ssl_client_verify != SUCCESS) {{ return 403; }}
{answer}
        }}
        location /cookie {{  # the cookie bench: nginx can only check that the cookie is there
            if ($http_cookie !~ "CF_Authorization=") {{ return 403; }}
            return 200 "ok";
        }}
    }}
}}
"""

# What nginx does with a verified request: answer itself, or (``nginx-proxy``) forward to the
# enforcer's echo origin over kept-alive connections, as an mTLS edge in front of an app does.
ANSWER = '            return 200 "ok";'
PROXY = """\
            proxy_pass http://origin; proxy_http_version 1.1;
            proxy_set_header Connection ""; proxy_set_header Host $host;
            proxy_set_header X-Client-Cert-Sha256 $ssl_client_fingerprint;"""

Result = dict[str, Any]


def free_port() -> int:
    """Return a TCP port that was free a moment ago on 127.0.0.1."""
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


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine so far (all processes, ours and neighbours')."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def program_missing(path: str, package: str) -> str | None:
    """Return None when ``path`` exists (apt-get installing ``package`` when possible), else why
    not."""
    if os.path.exists(path):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"{path} is missing and apt-get install {package} needs root and apt-get"
    cmd = ["apt-get", "install", "-y", package]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired:
        return f"apt-get install -y {package} timed out"
    return None if os.path.exists(path) else f"apt-get install failed: {r.stderr[-300:]}"


def nginx_missing() -> str | None:
    """Return None when nginx is available (installing it when possible), else why not."""
    return program_missing(NGINX, "nginx")


# ---- the fleet and the servers ---------------------------------------------------------------


@dataclasses.dataclass
class Testbed:
    """The demo PKI plus a fleet, and the files both servers are configured from."""

    tmp: Path
    layout: DemoLayout
    devices: list[tuple[Path, Path]]  # (cert.pem with the intermediate, key.pem)
    fleet_root: Path
    access_log: Path
    origin_port: int

    @property
    def edge_ca(self) -> Path:
        return self.layout.edge_ca


def make_testbed(
    tmp: Path, fleet: int, enforcer_port: int, origin_port: int, scheme: str = "http"
) -> Testbed:
    """Write the demo PKI and an enforcer config that also trusts a fleet of ``fleet`` devices.

    ``scheme`` is the origin's (``grpc`` for the HTTP/2 bench's gRPC origin).
    """
    now = dt.datetime.now(dt.UTC)
    origin = f"{scheme}://{HOST}:{origin_port}"
    layout = write_demo(tmp / "demo", enforcer_port, origin=origin, now=now)
    made = provision(tmp / "fleet", [Cohort("healthy", fleet)], now, workers=1, p12=False)
    devices = [(made.root / d.cert_path, made.root / d.key_path) for d in made.devices()]
    conf, access_log = layout.config.read_text(encoding="utf-8"), tmp / "enforcer-access.log"
    if 'access_log = "-"' not in conf:
        raise SystemExit(f"{layout.config}: no 'access_log = \"-\"' line to rewrite")
    conf = conf.replace('access_log = "-"', f'access_log = "{access_log}"')
    conf += (
        "\n[[roots]]\n"
        'name = "bench fleet root"\n'
        f'certificate = "{made.root / "ca" / "upload.pem"}"\n'
        f'associated_hostnames = ["{AUTH_HOST}"]\n'
    )
    layout.config.write_text(conf, encoding="utf-8")
    return Testbed(tmp, layout, devices, made.root / "ca" / "root.pem", access_log, origin_port)


def _run_origin(port: int) -> None:
    trio.run(serve_echo_origin, HOST, port)


def start_origin(port: int) -> Any:
    """Start the echo origin the enforcer forwards to, in its own process."""
    origin = mp.get_context("spawn").Process(target=_run_origin, args=(port,), daemon=True)
    origin.start()
    wait_port(port, origin.is_alive, "echo origin")
    return origin


def start_server(cmd: list[str], port: int, what: str, err: Path) -> subprocess.Popen[bytes]:
    """Start a server in its own session and wait until it listens."""
    with err.open("ab") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f, start_new_session=True)
    try:
        wait_port(port, lambda: proc.poll() is None, what)
    except BaseException:
        stop(proc)
        print(err.read_text(errors="replace"), file=sys.stderr)
        raise
    return proc


def algorithm_config(bed: Testbed, algorithm: str) -> Path:
    """The bench's enforcer config with tokens signed by ``algorithm`` (RS256: the config itself).

    Another algorithm gets its own key file and state file beside the config (the state's first
    key is what the enforcer signs with), so both enforcers can run at once.
    """
    if algorithm == "RS256":
        return bed.layout.config
    conf = bed.layout.config.read_text(encoding="utf-8")
    for old, new in (
        ('key_file = "signing-key.pem"', f'key_file = "signing-key-{algorithm}.pem"\n'
                                          f'algorithm = "{algorithm}"'),
        ('path = "state.sqlite"', f'path = "state-{algorithm}.sqlite"'),
    ):  # fmt: skip
        if old not in conf:
            raise SystemExit(f"{bed.layout.config}: no '{old}' line to rewrite")
        conf = conf.replace(old, new, 1)
    path = bed.layout.config.with_name(f"enforcer-{algorithm}.toml")
    path.write_text(conf, encoding="utf-8")
    return path


def start_enforcer(
    bed: Testbed,
    port: int,
    workers: int,
    testbed: str | None = None,
    algorithm: str = "RS256",
) -> subprocess.Popen[bytes]:
    """Start ``testbed enforcer serve`` with ``workers`` processes (another build's ``testbed``
    executable when given: a baseline, e.g. main's, to measure against in the same run), its
    tokens signed with ``algorithm``."""
    what = ("enforcer" if testbed is None else "baseline") + (
        "" if algorithm == "RS256" else f"-{algorithm}"
    )
    err = bed.tmp / f"{what}.err"
    exe = testbed or str(Path(sys.executable).with_name("testbed"))
    cmd = [exe, "enforcer", "serve", "--config", str(algorithm_config(bed, algorithm))]
    cmd += ["--port", str(port), "--workers", str(workers)]
    return start_server(cmd, port, what, err)


def start_nginx(
    bed: Testbed, port: int, workers: int, proxy: bool = False
) -> subprocess.Popen[bytes]:
    """Start nginx with ``workers`` worker processes, trusting the fleet root; with ``proxy``
    it forwards verified requests to the echo origin instead of answering them itself."""
    ndir = bed.tmp / f"nginx-{workers}{'-proxy' if proxy else ''}"
    ndir.mkdir(exist_ok=True)
    conf = NGINX_CONF.format(
        workers=workers, tmp=ndir, host=HOST, port=port, server_name=AUTH_HOST,
        edge=bed.layout.root / "edge", client_ca=bed.fleet_root,
        origin_port=bed.origin_port, answer=PROXY if proxy else ANSWER,
    )  # fmt: skip
    (ndir / "nginx.conf").write_text(conf, encoding="utf-8")
    cmd = [NGINX, "-p", str(ndir), "-e", str(ndir / "error.log"), "-c", str(ndir / "nginx.conf")]
    return start_server(cmd, port, "nginx", ndir / "error.log")


# ---- the clients -----------------------------------------------------------------------------


def client_context(cert: Path | None, key: Path | None, edge_ca: Path) -> ssl.SSLContext:
    """A client context trusting the edge CA, presenting ``cert`` when given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(edge_ca)
    return ctx


def read_response(tls: ssl.SSLSocket, buf: bytes = b"") -> tuple[int, dict[bytes, bytes], bytes]:
    """Read one whole response (Content-Length, chunked, or until close).

    Return (status, lower-cased headers, bytes read past the response).
    """
    data = buf

    def more() -> bool:
        nonlocal data
        chunk = tls.recv(65536)
        data += chunk
        return bool(chunk)

    while b"\r\n\r\n" not in data:
        if not more():
            raise ConnectionError(f"closed before the response head: {data[:80]!r}")
    head, _, data = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ValueError(f"not an HTTP response: {head[:80]!r}")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower()] = v.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        while True:
            while b"\r\n" not in data:
                if not more():
                    raise ConnectionError("closed mid-chunk")
            size_line, _, rest = data.partition(b"\r\n")
            size = int(size_line.split(b";", 1)[0], 16)
            while len(rest) < size + 2:
                if not more():
                    raise ConnectionError("closed mid-chunk")
                _, _, rest = data.partition(b"\r\n")
            data = rest[size + 2 :]
            if size == 0:  # no trailers are sent by the servers measured here
                return int(parts[1]), headers, data
    if b"content-length" in headers:
        length = int(headers[b"content-length"])
        while len(data) < length:
            if not more():
                raise ConnectionError("closed mid-body")
        return int(parts[1]), headers, data[length:]
    while more():  # delimited by the end of the connection
        pass
    return int(parts[1]), headers, b""


GRPC_PATH = "/bench.Echo/Unary"


def _grpc_echo(request: bytes, context: Any) -> bytes:
    return request


def _run_grpc_origin(port: int) -> None:
    import concurrent.futures

    import grpc

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(_grpc_echo)}
    )
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"{HOST}:{port}")
    server.start()
    server.wait_for_termination()


def start_grpc_origin(port: int) -> Any:
    """Start a gRPC echo service (grpcio, ``/bench.Echo/Unary``) in its own process."""
    origin = mp.get_context("spawn").Process(target=_run_grpc_origin, args=(port,), daemon=True)
    origin.start()
    wait_port(port, origin.is_alive, "gRPC origin")
    return origin


def grpc_request(payload: bytes = b"telemetry" * 8) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The headers (without :authority) and framed body of one gRPC unary call."""
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":path", GRPC_PATH.encode()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]
    return headers, b"\x00" + len(payload).to_bytes(4, "big") + payload


def h2_connect(ctx: ssl.SSLContext, port: int) -> tuple[ssl.SSLSocket, Any]:
    """A new TLS connection with ALPN h2 and a started client-side HTTP/2 connection."""
    import h2.config
    import h2.connection

    raw = socket.create_connection((HOST, port), timeout=10)
    try:
        tls = ctx.wrap_socket(raw, server_hostname=AUTH_HOST)
    except BaseException:
        raw.close()
        raise
    if tls.selected_alpn_protocol() != "h2":
        tls.close()
        raise ConnectionError(f"ALPN {tls.selected_alpn_protocol()!r}, not h2")
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    conn.initiate_connection()
    tls.sendall(conn.data_to_send())
    return tls, conn


def h2_grpc_call(tls: ssl.SSLSocket, conn: Any, request: tuple[list[Any], bytes]) -> int:
    """One gRPC unary call on a new stream: 200 when grpc-status is 0, else an error code.

    A GOAWAY that refuses the stream raises ConnectionError (the caller reconnects).
    """
    import h2.events

    headers, body = request
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [*headers[:3], (b":authority", AUTH_HOST.encode()), *headers[3:]])
    conn.send_data(sid, body, end_stream=True)
    tls.sendall(conn.data_to_send())
    status, grpc_status = 0, None
    while True:
        data = tls.recv(65536)
        if not data:
            raise ConnectionError("closed before the end of the stream")
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived | h2.events.TrailersReceived):
                fields = dict(ev.headers)
                status = int(fields.get(b":status", status))
                grpc_status = fields.get(b"grpc-status", grpc_status)
            elif isinstance(ev, h2.events.DataReceived):
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                raise ConnectionError(f"stream reset ({ev.error_code!r})")
            elif isinstance(ev, h2.events.ConnectionTerminated) and ev.last_stream_id < sid:
                raise ConnectionError("GOAWAY before the stream")
            elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                out = conn.data_to_send()
                if out:
                    tls.sendall(out)
                if status == 200 and grpc_status == b"0":
                    return 200
                return 1000 + int(grpc_status or 99) if status == 200 else status
        out = conn.data_to_send()
        if out:
            tls.sendall(out)


def h2_full_handshake_call(ctx: ssl.SSLContext, port: int, request: tuple[list[Any], bytes]) -> int:
    """New connection, full handshake (ALPN h2), one gRPC call on one stream, close."""
    tls, conn = h2_connect(ctx, port)
    with tls:
        status = h2_grpc_call(tls, conn, request)
        conn.close_connection()
        with contextlib.suppress(OSError):
            tls.sendall(conn.data_to_send())
    return status


def full_handshake_request(ctx: ssl.SSLContext, port: int, request: bytes) -> int:
    """New connection, full handshake, one request with ``Connection: close``; the status."""
    with (
        socket.create_connection((HOST, port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=AUTH_HOST) as tls,  # no session=: no resumption
    ):
        tls.sendall(request)
        status, _, _ = read_response(tls)
    return status


@dataclasses.dataclass
class Window:
    """One measuring window for every client: where, what, and when (monotonic seconds)."""

    target: str
    port: int
    mode: str  # "handshake", "cookie", "h2-handshake" or "h2-stream"
    start_at: float
    warmup: float
    duration: float
    request: bytes
    # One handshake per device of each client's slice, then stop (warms a server's caches the
    # way a fleet that already connected once would have); nothing is measured.
    one_pass: bool = False


def add_window_options(ap: argparse.ArgumentParser) -> None:
    """The options every alternating-window bench takes: window length, rounds, clients."""
    ap.add_argument("--duration", type=float, default=4.0, help="measured s per window (4)")
    ap.add_argument("--rounds", type=int, default=3, help="windows per target (3)")
    ap.add_argument("--warmup", type=float, default=0.5, help="unmeasured s per window (0.5)")
    ap.add_argument("--clients", type=int, default=3, help="client processes (3)")


def _client_main(index: int, devices: Sequence[tuple[Path, Path]], edge_ca: Path, cmds: Any,
                 out: Any) -> None:  # fmt: skip
    """One client process: build its contexts once, then run the windows it is sent."""
    contexts = [client_context(c, k, edge_ca) for c, k in devices]
    bare = client_context(None, None, edge_ca)
    grpc_call = grpc_request()
    h2_keep: tuple[ssl.SSLSocket, Any] | None = None
    position: collections.Counter[str] = collections.Counter()
    seen: dict[str, set[int]] = collections.defaultdict(set)
    out.put(("ready", index))
    while (w := cmds.get()) is not None:
        latencies: list[float] = []
        errors: collections.Counter[str] = collections.Counter()
        first_uses = 0
        time.sleep(max(0.0, w.start_at - time.monotonic()))
        measure_from = w.start_at + w.warmup
        end = measure_from + w.duration
        cpu: float | None = None
        keep: ssl.SSLSocket | None = None
        leftover = b""
        passes = 0
        for ctx in contexts:  # ALPN as the window's protocol wants
            ctx.set_alpn_protocols(["h2"] if w.mode.startswith("h2") else ["http/1.1"])
        while (t0 := time.monotonic()) < end:
            if w.one_pass and passes >= len(contexts):
                break
            passes += 1
            if cpu is None and t0 >= measure_from:
                cpu = time.process_time()
            p0 = time.perf_counter()
            first = False
            try:
                if w.mode == "handshake":
                    i = position[w.target] % len(contexts)
                    position[w.target] += 1
                    first = i not in seen[w.target]
                    seen[w.target].add(i)
                    status = full_handshake_request(contexts[i], w.port, w.request)
                elif w.mode == "h2-handshake":
                    i = position[w.target] % len(contexts)
                    position[w.target] += 1
                    first = i not in seen[w.target]
                    seen[w.target].add(i)
                    status = h2_full_handshake_call(contexts[i], w.port, grpc_call)
                elif w.mode == "h2-stream":
                    # One device's kept connection; every call is a new stream on it.
                    if h2_keep is None:
                        h2_keep = h2_connect(contexts[0], w.port)
                    status = h2_grpc_call(*h2_keep, grpc_call)
                else:
                    if keep is None:
                        raw = socket.create_connection((HOST, w.port), timeout=10)
                        keep = bare.wrap_socket(raw, server_hostname=AUTH_HOST)
                    keep.sendall(w.request)
                    status, headers, leftover = read_response(keep, leftover)
                    if headers.get(b"connection", b"").lower() == b"close":
                        keep.close()
                        keep, leftover = None, b""
                error = None if status == 200 else f"HTTP {status}"
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                if keep is not None:
                    keep.close()
                    keep, leftover = None, b""
                if h2_keep is not None:
                    h2_keep[0].close()
                    h2_keep = None
            if t0 < measure_from:
                continue
            if error is None:
                latencies.append((time.perf_counter() - p0) * 1000)
                first_uses += first
            else:
                errors[error] += 1
        if keep is not None:
            keep.close()
        if h2_keep is not None:
            h2_keep[0].close()
            h2_keep = None
        client_cpu = time.process_time() - (cpu if cpu is not None else time.process_time())
        out.put(("done", index, latencies, dict(errors), client_cpu, first_uses))


class ClientPool:
    """``n`` client processes, each with its slice of the fleet, driven window by window."""

    def __init__(self, n: int, devices: Sequence[tuple[Path, Path]], edge_ca: Path) -> None:
        ctx = mp.get_context("spawn")
        self._out = ctx.Queue()
        self._cmds = [ctx.Queue() for _ in range(n)]
        slices = [list(devices[i::n]) for i in range(n)] if devices else [[] for _ in range(n)]
        self._procs = [
            ctx.Process(target=_client_main, args=(i, s, edge_ca, q, self._out), daemon=True)
            for i, (s, q) in enumerate(zip(slices, self._cmds, strict=True))
        ]
        for p in self._procs:
            p.start()
        for _ in self._procs:
            self._out.get(timeout=300)  # "ready": every context is built

    def warm(self, target: str, port: int, request: bytes, mode: str = "handshake") -> None:
        """One handshake per fleet device against ``port`` (see :attr:`Window.one_pass`)."""
        window = Window(target, port, mode, time.monotonic(), 0.0, 600.0, request, True)
        for q in self._cmds:
            q.put(window)
        done = [self._out.get(timeout=660) for _ in self._procs]
        errors = sum(sum(d[3].values()) for d in done)
        if errors:
            raise SystemExit(f"{target}: {errors} errors while warming: {done[0][3]}")

    def run(self, window: Window, server: Callable[[], float]) -> Result:
        """Run one window on every client; ``server()`` reads the server's CPU seconds."""
        for q in self._cmds:
            q.put(window)
        time.sleep(max(0.0, window.start_at + window.warmup - time.monotonic()))
        cpu0, machine0 = server(), machine_cpu_seconds()
        time.sleep(max(0.0, window.start_at + window.warmup + window.duration - time.monotonic()))
        cpu, machine = server() - cpu0, machine_cpu_seconds() - machine0
        done = [self._out.get(timeout=120) for _ in self._procs]
        latencies = [x for d in done for x in d[2]]
        errors: collections.Counter[str] = collections.Counter()
        for d in done:
            errors.update(d[3])
        return {
            "latencies": latencies,
            "errors": errors,
            "server_cpu_s": cpu,
            "client_cpu_s": sum(d[4] for d in done),
            "machine_cpu_s": machine,
            "first_uses": sum(d[5] for d in done),
        }

    def close(self) -> None:
        """Stop the client processes."""
        for q in self._cmds:
            q.put(None)
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()


def summarise(windows: Sequence[Result], duration: float, workers: int) -> Result:
    """Merge a target's windows into handshakes/s, percentiles and CPU shares."""
    lat = sorted(x for w in windows for x in w["latencies"])
    n, seconds = len(lat), duration * len(windows)
    cpu = sum(w["server_cpu_s"] for w in windows)
    client = sum(w["client_cpu_s"] for w in windows)
    machine = sum(w["machine_cpu_s"] for w in windows)
    errors: collections.Counter[str] = collections.Counter()
    for w in windows:
        errors.update(w["errors"])

    def pct(q: float) -> float | None:
        return round(lat[min(n - 1, int(q * n))], 2) if lat else None

    first = sum(w["first_uses"] for w in windows)
    return {
        "per_s": round(n / seconds, 1),
        "ok": n,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors.most_common(5)),
        "server_cpu_s": round(cpu, 2),
        "per_server_cpu_s": round(n / cpu, 1) if cpu else None,
        # How busy the server's workers were: near 1.0 means the clients kept them saturated.
        "server_busy": round(cpu / (seconds * workers), 2),
        "client_cpu_s": round(client, 2),
        "client_cpu_share": round(client / machine, 2) if machine else None,
        "machine_busy": round(machine / (seconds * (os.cpu_count() or 1)), 2),
        "returning_share": round(1 - first / n, 3) if n else None,
        "window_rates": [round(len(w["latencies"]) / duration, 1) for w in windows],
    }
