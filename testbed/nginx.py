"""nginx on loopback: a generated config (ssl_verify_client optional + a $ssl_client_verify
check), started, reloaded and stopped by a test or a run.

HTTP/2: ``http2=True`` offers ALPN h2 beside http/1.1 (nginx 1.22 here: ``listen ... ssl
http2``; 1.25.1 and later spell it ``http2 on;``, and accept the old form with a warning).
gRPC: ``grpc_upstream="127.0.0.1:PORT"`` makes every hostname with a CA a gRPC edge: verified
devices are passed to the upstream (``grpc_pass grpc://...``, HTTP/2 cleartext, the testbed's
telemetry service), and denials speak gRPC as the enforcer's do: HTTP 200 with
``content-type: application/grpc``, ``grpc-status: 16`` (UNAUTHENTICATED), a ``grpc-message``
and, where nginx knows the reason, ``x-access-denied-reason`` -- a Trailers-Only response, which
grpcio reads as the call's status. A missing certificate gets ``no_certificate`` (as over HTTP);
a certificate that does not verify (expired, unknown CA, revoked by the CRL...) is nginx's
internal status 495, sent to a named location by ``error_page 495``, whose ``grpc-message``
carries ``$ssl_client_verify`` (``FAILED:certificate has expired``) and no reason header:
nginx cannot name it in the enforcer's words, so a gRPC device classifies it as
``grpc_unauthenticated``, the counterpart of the HTTP clients' ``http_400``.

With a CRL file (``ssl_crl``), nginx checks revocation for every certificate of the client's
path (it sets OpenSSL's ``X509_V_FLAG_CRL_CHECK_ALL``): the file must hold a CRL for the root
and for each intermediate, not only for the devices' issuer, or every chain is refused. A new
CRL takes effect at :func:`reload_nginx`, which waits until nginx has re-read its files: a
plain-HTTP status server on another loopback port answers the configuration's generation.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

import trio

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)

# Everything above the server blocks; render_servers adds one per hostname and closes http.
CONFIG_HEAD = """
worker_processes 1;
daemon off;
master_process {master};
{user}pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
"""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_nginx(
    folder: Path,
    *,
    cert: Path,
    key: Path,
    client_ca: Path,
    server_name: str | Sequence[str],
    crl: Path | None = None,
    reloadable: bool = False,
    http2: bool = False,
    grpc_upstream: str | None = None,
    keepalive_requests: int | None = None,
) -> tuple[trio.Process, int]:
    """Start nginx with ``ssl_verify_client optional`` and a ``$ssl_client_verify`` check
    for a hostname (or several, each its own server with the same CA); ``http2``: ALPN h2
    too; ``grpc_upstream``: a gRPC edge in front of it; ``keepalive_requests``: requests per
    connection."""
    names = [server_name] if isinstance(server_name, str) else list(server_name)
    cas: dict[str, Path | None] = dict.fromkeys(names, client_ca)
    return await start_nginx_servers(
        folder,
        cert=cert,
        key=key,
        client_cas=cas,
        depth=3,
        crl=crl,
        reloadable=reloadable,
        http2=http2,
        grpc_upstream=grpc_upstream,
        keepalive_requests=keepalive_requests,
    )


async def wait_listening(port: int, proc: trio.Process, what: str, timeout: float = 15) -> None:
    """Wait until a process we started accepts connections on 127.0.0.1:``port``."""
    with trio.fail_after(timeout):
        while True:
            if proc.returncode is not None:
                raise RuntimeError(f"{what} exited with code {proc.returncode} before listening")
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


async def stop_nginx(proc: trio.Process) -> None:
    """Stop nginx and wait for it."""
    proc.terminate()
    with trio.fail_after(10):
        await proc.wait()


SERVER_BLOCK = """
    server {{
        listen 127.0.0.1:{port} ssl{http2};
        server_name {server_name};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;{keepalive}
{verify}
        location / {{
{body}
        }}
    }}
"""

VERIFY = """        ssl_client_certificate {client_ca};
        ssl_verify_client optional;
        ssl_verify_depth {depth};"""

CRL = """
        ssl_crl {crl};"""

# Answers the configuration's generation, so that a reload can be seen to have happened.
STATUS_SERVER = """
    server {{
        listen 127.0.0.1:{port};
        location / {{
            include {dir}/generation.conf;
        }}
    }}
"""

CHECKED_BODY = """            if ($ssl_client_verify != SUCCESS) {
                add_header X-Access-Denied-Reason no_certificate always;
                return 403 "client certificate: $ssl_client_verify\\n";
            }
            return 200 "ok $ssl_client_s_dn\\n";"""

# gRPC: the check as CHECKED_BODY, then grpc_pass; denials as Trailers-Only gRPC responses.
GRPC_BODY = """            default_type application/grpc;
            if ($ssl_client_verify != SUCCESS) {{
                add_header grpc-status 16 always;
                add_header grpc-message no_certificate always;
                add_header X-Access-Denied-Reason no_certificate always;
                return 200;
            }}
            grpc_pass grpc://{upstream};"""

# A certificate that fails verification never reaches a location: nginx finalises the request
# with 495 at the server level, where this error page turns it into a gRPC status.
GRPC_CERT_ERROR = """
        error_page 495 = @grpc_certificate_error;
        location @grpc_certificate_error {
            default_type application/grpc;
            add_header grpc-status 16 always;
            add_header grpc-message "client certificate: $ssl_client_verify" always;
            return 200;
        }"""

NO_APPLICATION_BODY = """            add_header X-Access-Denied-Reason no_application always;
            return 404 "no application\\n";"""


def render_servers(
    folder: Path,
    port: int,
    *,
    cert: Path,
    key: Path,
    client_cas: dict[str, Path | None],
    depth: int = 5,
    crl: Path | None = None,
    status_port: int | None = None,
    http2: bool = False,
    grpc_upstream: str | None = None,
    keepalive_requests: int | None = None,
) -> str:
    """An nginx configuration with one server per hostname (``None``: served, no application).

    A hostname with a CA file checks client certificates against it (``ssl_verify_client
    optional`` and a ``$ssl_client_verify`` check), and against ``crl`` when given (a CRL for
    every CA of the path); one without answers 404. ``status_port``: a plain-HTTP server there
    answers the generation in ``generation.conf`` (see :func:`reload_nginx`). ``http2``: offer
    ALPN h2 too; ``grpc_upstream`` (``host:port``, implies ``http2``): pass verified devices to
    that gRPC server, and deny in gRPC (see the module's docstring). ``keepalive_requests``:
    requests per connection (HTTP/2 too: after the last, nginx sends GOAWAY), as an edge
    that wants a handshake per request would set it to 1.
    """
    http2 = http2 or grpc_upstream is not None
    blocks = []
    if status_port is not None:
        blocks.append(STATUS_SERVER.format(port=status_port, dir=folder))
    for name, client_ca in client_cas.items():
        verify = VERIFY.format(client_ca=client_ca, depth=depth) if client_ca else ""
        if client_ca and crl is not None:
            verify += CRL.format(crl=crl)
        body = CHECKED_BODY if client_ca else NO_APPLICATION_BODY
        if client_ca and grpc_upstream is not None:
            body = GRPC_BODY.format(upstream=grpc_upstream)
            verify += GRPC_CERT_ERROR
        blocks.append(
            SERVER_BLOCK.format(
                port=port,
                server_name=name,
                cert=cert,
                key=key,
                verify=verify,
                body=body,
                http2=" http2" if http2 else "",
                keepalive=(
                    f"\n        keepalive_requests {keepalive_requests};"
                    if keepalive_requests
                    else ""
                ),
            )
        )
    # Only a master process reloads: nginx without one (the simpler default) stops accepting
    # connections after a SIGHUP. Its worker runs as root when we do, as the single process did.
    reloadable = status_port is not None
    head = CONFIG_HEAD.format(
        dir=folder,
        master="on" if reloadable else "off",
        user="user root;\n" if reloadable and os.geteuid() == 0 else "",
    )
    return head + "".join(blocks) + "}\n"


async def start_nginx_servers(
    folder: Path,
    *,
    cert: Path,
    key: Path,
    client_cas: dict[str, Path | None],
    depth: int = 5,
    crl: Path | None = None,
    reloadable: bool = False,
    http2: bool = False,
    grpc_upstream: str | None = None,
    keepalive_requests: int | None = None,
) -> tuple[trio.Process, int]:
    """Start nginx with one server per hostname (see :func:`render_servers`).

    ``reloadable``: run a master process and a status server, so that :func:`reload_nginx`
    can make it re-read its files (a new CRL) without a restart.
    """
    if NGINX is None:
        raise RuntimeError("nginx is not installed: install it (apt-get install nginx)")
    port = free_port()
    status_port = _other_port(port) if reloadable else None
    folder.mkdir(parents=True, exist_ok=True)
    if status_port is not None:
        _write_generation(folder, status_port, 1)
    conf = folder / "nginx.conf"
    conf.write_text(
        render_servers(
            folder,
            port,
            cert=cert,
            key=key,
            client_cas=client_cas,
            depth=depth,
            crl=crl,
            status_port=status_port,
            http2=http2,
            grpc_upstream=grpc_upstream,
            keepalive_requests=keepalive_requests,
        )
    )
    proc = await trio.lowlevel.open_process(
        [NGINX, "-c", str(conf), "-p", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        await wait_listening(port, proc, "nginx")
    except RuntimeError as exc:
        log = folder / "error.log"
        said = log.read_text(errors="replace").strip() if log.exists() else ""
        raise RuntimeError(f"{exc}: {said}" if said else str(exc)) from None
    return proc, port


def _other_port(taken: int) -> int:
    """A free port on 127.0.0.1 other than ``taken`` (the status server's)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port != taken:
            return port


def _write_generation(folder: Path, status_port: int, generation: int) -> None:
    # nginx reads generation.conf (the status server's answer); we read status.json.
    (folder / "generation.conf").write_text(f'return 200 "{generation}\\n";\n')
    (folder / "status.json").write_text(json.dumps({"port": status_port, "generation": generation}))


async def _generation(port: int) -> str:
    """What the status server on ``port`` answers (the body of ``GET /``)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET / HTTP/1.0\r\nHost: status\r\n\r\n")
        data = b""
        while len(data) < 4096:  # a few bytes are expected: stop reading a runaway answer
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            data += chunk
    return data.partition(b"\r\n\r\n")[2].decode(errors="replace").strip()


def _children(pid: int) -> set[int]:
    """The child processes of ``pid`` (nginx's workers), where Linux's /proc tells them."""
    try:
        return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()  # not Linux (or no /proc): the reload is seen by its generation alone


async def reload_nginx(proc: trio.Process, folder: Path, timeout: float = 15) -> None:
    """Have a running nginx re-read its configuration and files (a new CRL); wait until it has.

    A reload that fails (a broken file) leaves nginx on its old configuration: this raises
    RuntimeError with what nginx logged, rather than letting a run go on against stale files.
    """
    status = json.loads((folder / "status.json").read_text())
    generation = int(status["generation"]) + 1
    _write_generation(folder, int(status["port"]), generation)
    old_workers = _children(proc.pid)
    proc.send_signal(signal.SIGHUP)
    try:
        with trio.fail_after(timeout):
            while True:
                if proc.returncode is not None:
                    raise RuntimeError(f"nginx exited with code {proc.returncode} on reload")
                try:
                    if await _generation(int(status["port"])) == str(generation):
                        break
                except (OSError, trio.BrokenResourceError):
                    pass  # nginx is between configurations
                await trio.sleep(0.05)
            # The old worker finishes its requests and closes its idle keep-alive connections
            # before it exits; until then a kept-alive client is still served under the old CRL.
            while old_workers & _children(proc.pid):
                await trio.sleep(0.05)
    except trio.TooSlowError:
        log = folder / "error.log"
        said = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
        raise RuntimeError(
            f"nginx did not reload within {timeout:g} s" + (f": {' '.join(said)}" if said else "")
        ) from None
