"""Running the enforcer: one trio loop, or N worker processes sharing the port (SO_REUSEPORT)."""

from __future__ import annotations

import functools
import logging
import multiprocessing
import signal
import sys
from collections.abc import Callable

import trio

from enforcer.accesslog import AccessLog
from enforcer.clock import WallClock
from enforcer.config import ConfigError, EnforcerConfig, load_config
from enforcer.server import Enforcer, open_listener, serve

log = logging.getLogger(__name__)


async def serve_config(
    config: EnforcerConfig,
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
    on_listening: Callable[[int], None] | None = None,
) -> None:
    """Serve one configuration on one trio loop until cancelled."""
    enforcer = Enforcer.from_config(config, WallClock(), AccessLog(config.server.access_log))
    listener = await open_listener(host, port, reuse_port=reuse_port)
    if on_listening:
        on_listening(listener.socket.getsockname()[1])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_on_signal, nursery.cancel_scope)
        await serve(enforcer, listener)


async def stop_on_signal(scope: trio.CancelScope) -> None:
    """Cancel ``scope`` on SIGINT or SIGTERM: Ctrl-C stops the server cleanly."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return


def _worker(config_path: str, host: str, port: int) -> None:
    config = load_config(config_path)
    trio.run(functools.partial(serve_config, config, host, port, reuse_port=True))


def run_workers(config_path: str, host: str, port: int, workers: int) -> int:
    """Run ``workers`` processes on one port until Ctrl-C; return an exit code."""
    config = load_config(config_path)
    if config.signing_key_file is None:
        raise ConfigError(
            config.path,
            "signing.key_file",
            "required with --workers > 1, so that every worker signs and accepts the same tokens",
        )
    config.snapshot(WallClock().now())  # creates the signing key once, before the workers start
    if port == 0:
        raise ConfigError(config.path, "server.port", "--workers > 1 needs a fixed port, not 0")
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_worker, args=(config_path, host, port), daemon=True)
        for _ in range(workers)
    ]

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM stops the workers as Ctrl-C does

    signal.signal(signal.SIGTERM, terminate)
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
