"""Running the enforcer: one trio loop, or N worker processes sharing the port (SO_REUSEPORT)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence

import trio

from enforcer.accesslog import AccessLog, keep_access_log
from enforcer.admin import Operations, serve_admin, serve_operations
from enforcer.clock import WallClock
from enforcer.config import ConfigError, EnforcerConfig, load_config
from enforcer.controller import crl_files, keep_crls_fresh, open_state
from enforcer.metrics import keep_metrics, shared_metrics_dir, worker_exited
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
    on_metrics: Callable[[int], None] | None = None,
) -> None:
    """Serve one configuration (and its admin API) on one trio loop until a signal stops it.

    The worker with the admin API also serves ``server.metrics_port`` (every worker's
    metrics, merged: see enforcer/metrics.py).
    """
    enforcer = Enforcer(
        config, WallClock(), AccessLog(config.server.access_log), follow_store=follow_store
    )
    listener = await open_listener(host, port, reuse_port=reuse_port)
    admin_listener = None
    if with_admin and config.admin is not None:
        admin_listener = await open_listener(config.admin.host, config.admin.port)
    metrics_listener = None
    if with_admin and config.server.metrics_port is not None:
        metrics_listener = await open_listener(
            config.server.metrics_host, config.server.metrics_port
        )
        if on_metrics:
            on_metrics(metrics_listener.socket.getsockname()[1])
    operations = Operations(enforcer.metrics, enforcer.readiness)
    if on_listening:
        on_listening(
            listener.socket.getsockname()[1],
            admin_listener.socket.getsockname()[1] if admin_listener else None,
        )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_on_signal, nursery.cancel_scope)
        nursery.start_soon(keep_access_log, enforcer.access_log)
        nursery.start_soon(serve, enforcer, listener)
        nursery.start_soon(keep_metrics, enforcer.metrics)
        if admin_listener is not None and config.admin is not None:
            nursery.start_soon(
                functools.partial(
                    serve_admin,
                    enforcer.controller,
                    config.admin,
                    admin_listener,
                    operations=operations,
                )
            )
        if metrics_listener is not None:
            nursery.start_soon(
                serve_operations,
                operations,
                config.admin,
                metrics_listener,
                config.server.metrics_host,
            )
        if refresh_crls:
            # One process fetches CRLs; the state store carries them to the other workers.
            nursery.start_soon(keep_crls_fresh, enforcer.controller, crl_files(config))
        for task in also:
            nursery.start_soon(task)


def _worker(
    config_path: str, host: str, port: int, index: int, metrics_port: int | None = None
) -> None:
    config = load_config(config_path)
    if metrics_port is not None:
        config = dataclasses.replace(
            config, server=dataclasses.replace(config.server, metrics_port=metrics_port)
        )
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


def run_workers(
    config_path: str, host: str, port: int, workers: int, *, metrics_port: int | None = None
) -> int:
    """Run ``workers`` processes on one port until Ctrl-C or SIGTERM; return an exit code."""
    # The workers' metrics meet in a private directory this process creates and removes.
    with shared_metrics_dir() as metrics_dir:
        return _run_workers(config_path, host, port, workers, metrics_port, metrics_dir)


def _run_workers(
    config_path: str,
    host: str,
    port: int,
    workers: int,
    metrics_port: int | None,
    metrics_dir: str,
) -> int:
    config = load_config(config_path)
    if port == 0:
        raise ConfigError(config.path, "server.port", "--workers > 1 needs a fixed port, not 0")
    # Seed the state once, before the workers race to do it.
    store, _, _ = open_state(config, WallClock().now())
    store.close()
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_worker, args=(config_path, host, port, i, metrics_port), daemon=True)
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
            if p.pid is not None and p.exitcode is not None:
                worker_exited(p.pid, metrics_dir)
    failed = [p.exitcode for p in procs if p.exitcode not in (0, -signal.SIGTERM, None)]
    return 1 if failed else 0
