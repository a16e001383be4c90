"""Running the enforcer: one trio loop, or N worker processes sharing the port (SO_REUSEPORT)."""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence

import trio

from enforcer.accesslog import AccessLog, keep_access_log
from enforcer.admin import serve_admin
from enforcer.clock import WallClock
from enforcer.config import ConfigError, EnforcerConfig, load_config
from enforcer.controller import crl_files, keep_crls_fresh, open_state
from enforcer.server import Enforcer, open_listener, serve

log = logging.getLogger(__name__)


async def stop_on_signal(scope: trio.CancelScope) -> None:
    """Cancel ``scope`` on SIGINT or SIGTERM: Ctrl-C stops the server cleanly."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return


async def serve_config(
    config: EnforcerConfig,
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
    follow_store: bool = False,
    with_admin: bool = True,
    refresh_crls: bool = True,
    on_listening: Callable[[int, int | None], None] | None = None,
    also: Sequence[Callable[[], Awaitable[None]]] = (),
) -> None:
    """Serve one configuration (and its admin API) on one trio loop until a signal stops it."""
    enforcer = Enforcer(
        config, WallClock(), AccessLog(config.server.access_log), follow_store=follow_store
    )
    listener = await open_listener(host, port, reuse_port=reuse_port)
    admin_listener = None
    if with_admin and config.admin is not None:
        admin_listener = await open_listener(config.admin.host, config.admin.port)
    if on_listening:
        on_listening(
            listener.socket.getsockname()[1],
            admin_listener.socket.getsockname()[1] if admin_listener else None,
        )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_on_signal, nursery.cancel_scope)
        nursery.start_soon(keep_access_log, enforcer.access_log)
        nursery.start_soon(serve, enforcer, listener)
        if admin_listener is not None and config.admin is not None:
            nursery.start_soon(serve_admin, enforcer.controller, config.admin, admin_listener)
        if refresh_crls:
            # One process fetches CRLs; the state store carries them to the other workers.
            nursery.start_soon(keep_crls_fresh, enforcer.controller, crl_files(config))
        for task in also:
            nursery.start_soon(task)


def _worker(config_path: str, host: str, port: int, index: int) -> None:
    config = load_config(config_path)
    # Every worker follows the shared state database; the first also serves the admin API.
    trio.run(
        functools.partial(
            serve_config,
            config,
            host,
            port,
            reuse_port=True,
            follow_store=True,
            with_admin=index == 0,
            refresh_crls=index == 0,
        )
    )


def run_workers(config_path: str, host: str, port: int, workers: int) -> int:
    """Run ``workers`` processes on one port until Ctrl-C or SIGTERM; return an exit code."""
    config = load_config(config_path)
    if port == 0:
        raise ConfigError(config.path, "server.port", "--workers > 1 needs a fixed port, not 0")
    # Seed the state once, before the workers race to do it.
    store, _, _ = open_state(config, WallClock().now())
    store.close()
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_worker, args=(config_path, host, port, i), daemon=True)
        for i in range(workers)
    ]

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM stops the workers as Ctrl-C does

    def hang_up(signum: int, frame: object) -> None:
        for p in procs:  # each worker reopens its own access log (logrotate signals this pid)
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signal.SIGHUP)

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, hang_up)
    for p in procs:
        p.start()
    print(f"enforcer: {workers} workers listening on {host}:{port} (Ctrl-C stops)", file=sys.stderr)
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
    failed = [p.exitcode for p in procs if p.exitcode not in (0, -signal.SIGTERM, None)]
    return 1 if failed else 0
