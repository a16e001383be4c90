"""nginx on loopback: a generated config (ssl_verify_client optional + a $ssl_client_verify
check), started and stopped by a test or a run."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import trio

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)

# Everything above the server blocks; render_servers adds one per hostname and closes http.
CONFIG_HEAD = """
worker_processes 1;
daemon off;
master_process off;
pid {dir}/nginx.pid;
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
    folder: Path, *, cert: Path, key: Path, client_ca: Path, server_name: str
) -> tuple[trio.Process, int]:
    """Start nginx with ``ssl_verify_client optional`` and a ``$ssl_client_verify`` check."""
    return await start_nginx_servers(
        folder, cert=cert, key=key, client_cas={server_name: client_ca}, depth=3
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
        listen 127.0.0.1:{port} ssl;
        server_name {server_name};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
{verify}
        location / {{
{body}
        }}
    }}
"""

VERIFY = """        ssl_client_certificate {client_ca};
        ssl_verify_client optional;
        ssl_verify_depth {depth};"""

CHECKED_BODY = """            if ($ssl_client_verify != SUCCESS) {
                add_header X-Access-Denied-Reason no_certificate always;
                return 403 "client certificate: $ssl_client_verify\\n";
            }
            return 200 "ok $ssl_client_s_dn\\n";"""

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
) -> str:
    """An nginx configuration with one server per hostname (``None``: served, no application).

    A hostname with a CA file checks client certificates against it (``ssl_verify_client
    optional`` and a ``$ssl_client_verify`` check); one without answers 404.
    """
    blocks = []
    for name, client_ca in client_cas.items():
        verify = VERIFY.format(client_ca=client_ca, depth=depth) if client_ca else ""
        body = CHECKED_BODY if client_ca else NO_APPLICATION_BODY
        blocks.append(
            SERVER_BLOCK.format(
                port=port, server_name=name, cert=cert, key=key, verify=verify, body=body
            )
        )
    return CONFIG_HEAD.format(dir=folder) + "".join(blocks) + "}\n"


async def start_nginx_servers(
    folder: Path,
    *,
    cert: Path,
    key: Path,
    client_cas: dict[str, Path | None],
    depth: int = 5,
) -> tuple[trio.Process, int]:
    """Start nginx with one server per hostname (see :func:`render_servers`)."""
    if NGINX is None:
        raise RuntimeError("nginx is not installed: install it (apt-get install nginx)")
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    conf = folder / "nginx.conf"
    conf.write_text(
        render_servers(folder, port, cert=cert, key=key, client_cas=client_cas, depth=depth)
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
