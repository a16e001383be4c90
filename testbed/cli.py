"""The ``testbed`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import trio
from rich.console import Console

from enforcer.config import ConfigError, is_loopback, load_config
from enforcer.origin import serve_echo_origin_on
from enforcer.server import ListenError
from enforcer.workers import run_workers, serve_config
from testbed.admin_cli import add_admin_parser, run_admin
from testbed.conformance.cli import add_conformance_parser, run_conformance
from testbed.demo import (
    AUTH_HOST,
    IOT_HOST,
    DemoError,
    DemoLayout,
    check_ports_free,
    lock_demo_dir,
    write_demo,
)
from testbed.fleet_cli import add_fleet_parser, run_fleet
from testbed.live import add_live_arguments, options_from
from testbed.load_cli import add_load_parser, run_load_cli
from testbed.report_cli import add_report_parser, run_report_cli

EXIT_USAGE = 2


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"TESTBED_{name}", default)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser (every option has a TESTBED_* environment twin)."""
    parser = argparse.ArgumentParser(
        prog="testbed", description="IoT fleet simulator and mTLS enforcement testbed"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    enf = sub.add_parser("enforcer", help="run the mTLS enforcer").add_subparsers(
        dest="action", required=True
    )
    serve = enf.add_parser("serve", help="serve a configuration until Ctrl-C")
    serve.add_argument(
        "--config",
        default=_env("CONFIG"),
        required=_env("CONFIG") is None,
        help="enforcer TOML file (env TESTBED_CONFIG)",
    )
    serve.add_argument(
        "--host", default=_env("HOST"), help="listen address (default: the config's server.host)"
    )
    serve.add_argument(
        "--port",
        type=int,
        default=_env("PORT"),
        help="listen port (default: the config's server.port)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=_env("WORKERS", "1"),
        help="worker processes sharing the port (env TESTBED_WORKERS)",
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve /metrics, /healthz and /readyz on this port (default: the config's "
        "server.metrics_port; see docs/metrics.md)",
    )

    add_admin_parser(enf)

    run = sub.add_parser("run", help="run a scenario file and write its report")
    run.add_argument("scenario", help="a scenario TOML file (see scenarios/)")
    run.add_argument(
        "--reports",
        default=_env("REPORTS", "reports"),
        help="where run folders go (env TESTBED_REPORTS)",
    )
    run.add_argument("--no-progress", action="store_true", help="no live display")
    add_live_arguments(run)
    run.add_argument(
        "--max-errors",
        type=_share,
        default=_env("MAX_ERRORS"),
        help="share of attempts that may end in errors (timeouts, transport errors, 5xx)"
        " before the run fails, e.g. 5%% (default: 1%%, or the scenario's own errors"
        " thresholds; env TESTBED_MAX_ERRORS)",
    )
    run.add_argument(
        "--workers",
        type=int,
        help="virtual clock: split the fleet between N processes, each with its own embedded"
        " enforcer (the same seed gives the same outcomes for active phases whatever N);"
        " default 1, or one per Dask worker with --cluster",
    )
    from testbed.cluster import add_cluster_options

    add_cluster_options(run)

    demo = enf.add_parser(
        "demo", help="write a demo PKI and configuration into a folder and serve it"
    )
    demo.add_argument(
        "--out", default=_env("DEMO_OUT", "demo"), help="folder to write (env TESTBED_DEMO_OUT)"
    )
    demo.add_argument(
        "--admin-port",
        type=int,
        default=_env("ADMIN_PORT"),
        help="admin API port (default: the port + 1; env TESTBED_ADMIN_PORT)",
    )
    demo.add_argument(
        "--port",
        type=int,
        default=_env("PORT", "8443"),
        help="enforcer port (default 8443)",
    )

    add_fleet_parser(sub)
    add_load_parser(sub)
    add_report_parser(sub)
    add_conformance_parser(sub)
    return parser


def _share(text: str) -> float:
    """A share from ``5%`` or ``0.05``, between 0 and 1."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a share like 1% or 0.01, got {text!r}"
        ) from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a share between 0% and 100%, got {text!r}")
    return value


def _fail(message: str) -> int:
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {message}", highlight=False)
    return EXIT_USAGE


def cmd_serve(args: argparse.Namespace) -> int:
    """Run ``testbed enforcer serve``."""
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return _fail(str(exc))
    host = args.host or config.server.host
    port = int(args.port) if args.port is not None else config.server.port
    if args.workers < 1:
        return _fail("--workers: expected 1 or more")
    if args.metrics_port is not None:
        if not 0 <= args.metrics_port <= 65535:
            return _fail(f"--metrics-port: {args.metrics_port} is not a TCP port (0-65535)")
        server = dataclasses.replace(config.server, metrics_port=args.metrics_port)
        config = dataclasses.replace(config, server=server)
        if config.admin is None and not is_loopback(server.metrics_host):
            return _fail(
                f"--metrics-port: server.metrics_host {server.metrics_host} is not a loopback "
                "address, so metrics need the admin token: configure [admin]"
            )
    try:
        if args.workers > 1:
            return run_workers(
                args.config, host, port, args.workers, metrics_port=args.metrics_port
            )

        def listening(bound: int, admin: int | None) -> None:
            extra = f", admin API on {config.admin.host}:{admin}" if config.admin else ""
            print(
                f"enforcer: listening on {host}:{bound}{extra} (Ctrl-C stops)",
                file=sys.stderr,
                flush=True,
            )

        # The state is opened and the snapshot built before anything listens, so a bad
        # config or state fails with exit 2 first.
        def metrics_listening(bound: int) -> None:
            print(
                f"enforcer: metrics on http://{config.server.metrics_host}:{bound}/metrics",
                file=sys.stderr,
                flush=True,
            )

        trio.run(
            lambda: serve_config(
                config, host, port, on_listening=listening, on_metrics=metrics_listening
            )
        )
        print("enforcer: stopped", file=sys.stderr)
    except ConfigError as exc:
        return _fail(str(exc))
    except ListenError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    except KeyboardInterrupt:
        print("enforcer: stopped", file=sys.stderr)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run ``testbed run SCENARIO``."""
    from testbed.cluster import ClusterError, open_cluster
    from testbed.runner import RunError, run_scenario
    from testbed.scenario import ScenarioError, load_scenario

    if args.workers is not None and args.workers < 1:
        return _fail(f"--workers: expected 1 or more, got {args.workers}")
    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as exc:
        return _fail(str(exc))
    console = Console(stderr=True)
    cluster = None
    try:
        cluster, workers = open_cluster(args)
        outcome = run_scenario(
            scenario,
            Path(args.reports),
            console=console,
            progress=not args.no_progress,
            render=_render,
            workers=workers,
            max_errors=args.max_errors,
            live=options_from(args),
            cluster=cluster,
        )
    except (RunError, ClusterError) as exc:
        return _fail(str(exc))
    finally:
        if cluster is not None:
            cluster.close()
    out = Console(soft_wrap=True)  # a long run folder path stays whole in a CI log
    if outcome.exit_code == 130:
        out.print(
            f"interrupted: results so far in {outcome.run_dir}; `testbed report {outcome.run_dir}`"
        )
    out.print(f"report: {outcome.run_dir / 'report.html'}", highlight=False)
    return outcome.exit_code


def _render(run_dir: Path, summary: dict[str, Any] | None = None) -> None:
    try:
        from testbed.report import load_summary, print_summary, write_report
    except ImportError:  # pragma: no cover - reports arrive with their module
        return
    summary = summary if summary is not None else load_summary(run_dir)
    write_report(run_dir, summary)
    print_summary(summary)  # its console: the terminal's width, or wide in a log


def demo_instructions(layout: DemoLayout) -> str:
    """Return the curl commands that reproduce the seeds' test against the demo."""

    def q(cmd: list[str]) -> str:
        return shlex.join(cmd)

    lines = [
        f"Demo written to {layout.root}/ and served on 127.0.0.1:{layout.port}.",
        "",
        "# No client certificate: 403 with X-Access-Denied-Reason: no_certificate",
        q(layout.curl(AUTH_HOST)),
        "# A valid device: 200 and a CF_Authorization Set-Cookie (24h session)",
        q(layout.curl(AUTH_HOST, "valid")),
        "# The leaf alone: admitted, the intermediate was uploaded with the root",
        q(layout.curl(AUTH_HOST, "leaf-only")),
    ]
    for device, reason in (
        ("expired", "certificate_expired"),
        ("not-yet-valid", "certificate_not_yet_valid"),
        ("foreign-ca", "untrusted_issuer"),
    ):
        lines += [f"# {device}: 403 {reason}", q(layout.curl(AUTH_HOST, device))]
    lines += [
        "# No Duration, Common Name device-001: 200, no cookie, Connection: close",
        q(layout.curl(IOT_HOST, "valid")),
        "# wrong-cn (device-999) on the Common Name application: 403 policy_denied",
        q(layout.curl(IOT_HOST, "wrong-cn")),
        "# The signing keys an origin verifies CF_Authorization with",
        q(layout.curl(AUTH_HOST, path="/cdn-cgi/access/certs")),
        "",
        f"Admin API on http://127.0.0.1:{layout.admin_port} (token in {layout.root}/admin.token,"
        " account and zone id: demo), for example:",
        f"testbed enforcer admin --url http://127.0.0.1:{layout.admin_port}"
        f" --token-file {layout.root}/admin.token --account demo --zone demo show",
        "",
        "Ctrl-C stops the demo. Access log lines follow.",
    ]
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run ``testbed enforcer demo``."""
    out = Path(args.out)
    admin_port = args.admin_port if args.admin_port is not None else args.port + 1
    try:
        # Ports first, then the folder's lock, then writing: a demo that cannot start, or a
        # folder another demo serves, is left exactly as it was.
        check_ports_free("127.0.0.1", [args.port, admin_port])
        lock_fd = lock_demo_dir(out)
    except DemoError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"{out}: cannot use the demo folder: {exc.strerror or exc}")

    async def main() -> None:
        # Bind the origin first: the configuration names its port.
        origin_listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        origin_port = origin_listeners[0].socket.getsockname()[1]
        layout = write_demo(
            out, args.port, f"http://127.0.0.1:{origin_port}", admin_port=admin_port
        )
        config = load_config(layout.config)

        def listening(bound: int, admin: int | None) -> None:
            text = demo_instructions(DemoLayout(out, bound, admin or admin_port))
            Console().print(text, highlight=False, soft_wrap=True)

        await serve_config(
            config,
            "127.0.0.1",
            args.port,
            on_listening=listening,
            also=[lambda: serve_echo_origin_on(origin_listeners)],
        )

    try:
        trio.run(main)
        print("demo: stopped", file=sys.stderr)
    except ConfigError as exc:
        return _fail(str(exc))
    except ListenError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"cannot serve the demo: {exc.strerror or exc}")
    except KeyboardInterrupt:
        print("demo: stopped", file=sys.stderr)
    finally:
        os.close(lock_fd)  # releases the folder's lock
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``testbed`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if args.command == "run":
        return cmd_run(args)
    if args.command == "load":
        return run_load_cli(args, _render)
    if args.command == "enforcer" and args.action == "serve":
        return cmd_serve(args)
    if args.command == "enforcer" and args.action == "demo":
        return cmd_demo(args)
    if args.command == "enforcer" and args.action == "admin":
        return run_admin(args)
    if args.command == "fleet":
        return run_fleet(args)
    if args.command in ("report", "compare"):
        return run_report_cli(args)
    if args.command == "conformance":
        return run_conformance(args)
    return _fail(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
