"""The enforcer's /metrics over real TLS traffic, scraped over HTTP, parsed by prometheus-client."""

from __future__ import annotations

import functools
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from enforcer.admin import Operations, serve_admin, serve_operations
from enforcer.config import AdminSettings, ConfigError, load_config
from enforcer.server import open_listener
from testbed.demo import AUTH_HOST, DemoLayout
from tests.conftest import ADMIN_TOKEN, Served
from tests.enforcer.test_config import variant
from tests.testbed.test_cli import TESTBED, free_port, stop, wait_for_port
from tests.wire import admin_call, client_context, get

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when the scrape has no such sample)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(port: int, token: str = "") -> tuple[int, str]:
    status, body = await admin_call(port, "GET", "/metrics", token=token)
    return status, body.decode() if isinstance(body, bytes) else str(body)


async def operations_port(served: Served, nursery: trio.Nursery, host: str = "127.0.0.1") -> int:
    """Serve the operations endpoints of ``served`` on their own listener (metrics_port)."""
    listener = await open_listener(host, 0)
    settings = AdminSettings(host, 0, ADMIN_TOKEN, "demo")
    ops = Operations(served.enforcer.metrics, served.enforcer.readiness)
    return int(await nursery.start(serve_operations, ops, settings, listener, host))


def device(served: Served, name: str):
    cert, key = served.layout.device(name)
    return client_context(served.layout.edge_ca, cert, key)


async def test_known_traffic_is_counted_exactly(served: Served, nursery: trio.Nursery) -> None:
    port = await operations_port(served, nursery)
    # 7 requests on 7 connections: 4 admitted, 3 denied certificate_expired.
    for name in ["valid", "expired", "valid", "expired", "valid", "expired", "valid"]:
        await get(served.port, AUTH_HOST, device(served, name))
    status, text = await scrape(port)
    assert status == 200
    m = parse(text)
    assert value(m, "enforcer_connections_accepted_total") == 7
    assert value(m, "enforcer_handshakes_total", kind="full") == 7
    assert value(m, "enforcer_handshakes_total", kind="resumed") == 0
    assert value(m, "enforcer_handshake_duration_seconds_count", kind="full") == 7
    allowed = {"application": AUTH_HOST, "decision": "allowed", "reason": "none"}
    expired = {"application": AUTH_HOST, "decision": "denied", "reason": "certificate_expired"}
    assert value(m, "enforcer_decisions_total", **allowed) == 4
    assert value(m, "enforcer_decisions_total", **expired) == 3
    decisions = [v for (n, _), v in m.items() if n == "enforcer_decisions_total"]
    assert sum(decisions) == 7
    assert value(m, "enforcer_origin_request_duration_seconds_count", application=AUTH_HOST) == 4
    assert value(m, "enforcer_origin_errors_total", application=AUTH_HOST) == 0
    # Each admitted request got a session cookie: a token signed with the default algorithm.
    assert value(m, "enforcer_tokens_minted_total", algorithm="RS256") == 4
    # The valid chain validated once and then came from the cache; the expired one is refused
    # before the cache is asked about it again (it is not cached: only successes are).
    v = served.enforcer.validations
    assert value(m, "enforcer_validation_cache_hits_total") == v.hits == 3
    assert value(m, "enforcer_validation_cache_misses_total") == v.misses
    assert value(m, "enforcer_access_log_dropped_total") == 0
    assert value(m, "enforcer_accept_errors_total") == 0
    # Every connection closed: none is open once the server has seen the closes.
    with trio.fail_after(10):
        while value(parse((await scrape(port))[1]), "enforcer_connections_open") != 0:
            await trio.sleep(0.05)


async def test_a_resumed_session_and_a_returning_cookie(
    served: Served, nursery: trio.Nursery
) -> None:
    from tests.wire import Connection

    port = await operations_port(served, nursery)
    ctx = device(served, "valid")
    first = await Connection.open(served.port, AUTH_HOST, ctx)
    response = await first.request("/")
    cookie = response.header("set-cookie")
    assert cookie is not None
    # The same connection again, now with the cookie: verified once with pyjwt.
    await first.request("/", headers=[("cookie", cookie.split(";", 1)[0])])
    await first.request("/", headers=[("cookie", cookie.split(";", 1)[0])])
    session = first.ssl_object.session
    await first.aclose()
    second = await Connection.open(served.port, AUTH_HOST, ctx, session=session)
    assert second.ssl_object.session_reused
    await second.request("/", headers=[("cookie", cookie.split(";", 1)[0])])
    await second.aclose()
    m = parse((await scrape(port))[1])
    assert value(m, "enforcer_handshakes_total", kind="full") == 1
    assert value(m, "enforcer_handshakes_total", kind="resumed") == 1
    assert value(m, "enforcer_tokens_verified_total", algorithm="RS256") == 1
    assert value(m, "enforcer_token_memo_hits_total") == 2
    allowed = {"application": AUTH_HOST, "decision": "allowed", "reason": "none"}
    assert value(m, "enforcer_decisions_total", **allowed) == 4


async def test_no_label_names_a_device_or_a_client(served: Served, nursery: trio.Nursery) -> None:
    port = await operations_port(served, nursery)
    for name in ["valid", "expired", "foreign-ca", "wrong-cn", "leaf-only"]:
        await get(served.port, AUTH_HOST, device(served, name), host="unknown.example.test")
        await get(served.port, AUTH_HOST, device(served, name))
    text = (await scrape(port))[1]
    labels = {v for (_, ls), _ in parse(text).items() for _, v in ls}
    assert not [x for x in labels if "device-" in x or "127.0.0.1" in x or "unknown." in x]
    assert "none" in labels  # the misdirected requests match no application


async def test_metrics_off_loopback_need_the_admin_token(
    served: Served, nursery: trio.Nursery
) -> None:
    # Bound to every address (not loopback): /metrics is the admin API's, the probes are open.
    port = await operations_port(served, nursery, host="0.0.0.0")
    status, _ = await scrape(port)
    assert status == 401
    status, _ = await scrape(port, token="wrong-token-0123456789")
    assert status == 401
    status, text = await scrape(port, token=ADMIN_TOKEN)
    assert status == 200 and "enforcer_connections_accepted_total" in text
    status, body = await admin_call(port, "GET", "/healthz", token="")
    assert (status, body) == (200, b"ok\n")
    status, body = await admin_call(port, "GET", "/readyz", token="")
    assert status == 200 and body == {"ready": True}  # no details for a stranger
    status, body = await admin_call(port, "GET", "/readyz", token=ADMIN_TOKEN)
    assert status == 200 and body["checks"]["state_store"] == "ok"
    # This listener serves nothing else, token or not.
    status, _ = await admin_call(port, "GET", "/client/v4/accounts/demo/access/apps")
    assert status == 404


async def test_the_admin_listener_serves_metrics(served: Served, nursery: trio.Nursery) -> None:
    e = served.enforcer
    listener = await open_listener("127.0.0.1", 0)
    settings = AdminSettings("127.0.0.1", 0, ADMIN_TOKEN, "demo")
    port = await nursery.start(
        functools.partial(
            serve_admin,
            e.controller,
            settings,
            listener,
            operations=Operations(e.metrics, e.readiness),
        )
    )
    await get(served.port, AUTH_HOST, device(served, "expired"))
    status, text = await scrape(port)  # loopback: no token needed
    assert status == 200
    expired = {"application": AUTH_HOST, "decision": "denied", "reason": "certificate_expired"}
    assert value(parse(text), "enforcer_decisions_total", **expired) == 1
    # The API itself still needs the token.
    status, _ = await admin_call(port, "GET", "/client/v4/accounts/demo/access/apps", token="")
    assert status == 401


async def test_two_workers_are_one_view(demo: DemoLayout, nursery: trio.Nursery) -> None:
    port, metrics_port = free_port(), free_port()
    before = _metrics_dirs()
    proc = await trio.lowlevel.open_process(
        [
            *TESTBED,
            *("enforcer", "serve", "--config", str(demo.config), "--port", str(port)),
            *("--workers", "2", "--metrics-port", str(metrics_port)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_for_port(port, proc)
        await wait_for_port(metrics_port, proc)
        layout = DemoLayout(demo.root, port)
        cert, key = layout.device("expired")
        ctx = client_context(layout.edge_ca, cert, key)
        # New connections land on either worker (SO_REUSEPORT); twelve all on one worker
        # happens once in 2048 runs, so the merged counts are both workers'.
        for _ in range(12):
            assert (await get(port, AUTH_HOST, ctx)).reason == "certificate_expired"
        status, text = await scrape(metrics_port)
        assert status == 200
        m = parse(text)
        expired = {"application": AUTH_HOST, "decision": "denied", "reason": "certificate_expired"}
        assert value(m, "enforcer_decisions_total", **expired) == 12
        # wait_for_port's probe was a connection too (closed before any handshake).
        assert value(m, "enforcer_connections_accepted_total") == 13
        assert value(m, "enforcer_handshakes_total", kind="full") == 12
        # The demo's origin is not running: the readiness probe says so.
        status, body = await admin_call(metrics_port, "GET", "/readyz", token="")
        assert status == 503 and body["ready"] is False
        assert any(v.startswith("unreachable") for v in body["checks"].values())
        dirs = _metrics_dirs() - before
        assert dirs, "the parent made no metrics directory"
        assert all(oct(d.stat().st_mode & 0o777) == "0o700" for d in dirs)
    finally:
        assert await stop(proc) == 0
    assert not [d for d in dirs if d.exists()], "the parent left its metrics directory behind"


def _metrics_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("enforcer-metrics-*"))


@pytest.mark.parametrize(
    ("new", "field", "problem"),
    [
        ("[server]\nmetrics_port = 70000", "server.metrics_port", "not a TCP port"),
        ('[server]\nmetrics_port = "9100"', "server.metrics_port", "expected"),
        ('[server]\nreadiness_origins = "most"', "server.readiness_origins", "not one of"),
    ],
)
def test_bad_metrics_settings_are_named(
    demo: DemoLayout, tmp_path: Path, new: str, field: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(variant(demo, tmp_path, "[server]", new))
    assert info.value.field == field and problem in str(info.value)


def test_metrics_off_loopback_without_an_admin_token_are_refused(
    demo: DemoLayout, tmp_path: Path
) -> None:
    path = variant(
        demo, tmp_path, "[server]", '[server]\nmetrics_port = 9100\nmetrics_host = "0.0.0.0"'
    )
    text = path.read_text()
    start = text.index("[admin]")
    path.write_text(text[:start] + text[text.index("[[managed_ca]]") :])
    with pytest.raises(ConfigError, match="not a loopback address") as info:
        load_config(path)
    assert info.value.field == "server.metrics_host"


async def test_the_cli_refuses_a_bad_metrics_port(demo: DemoLayout) -> None:
    result = await trio.run_process(
        [*TESTBED, "enforcer", "serve", "--config", str(demo.config), "--metrics-port", "70000"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 2
    assert b"--metrics-port: 70000 is not a TCP port" in result.stderr


async def test_the_grafana_dashboard_queries_only_exposed_metrics(
    served: Served, nursery: trio.Nursery
) -> None:
    import json
    import re

    port = await operations_port(served, nursery)
    text = (await scrape(port))[1]
    # (prometheus-client's *_created series, one per counter in one process, are left out.)
    families = {
        f.name for f in text_string_to_metric_families(text) if not f.name.endswith("_created")
    }
    dashboard = json.loads(
        (Path(__file__).parents[2] / "deploy/grafana-dashboard.json").read_text()
    )
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    used = {n for e in exprs for n in re.findall(r"\benforcer_[a-z0-9_]+", e)}
    unknown = {n for n in used if re.sub(r"_(total|bucket|count|sum)$", "", n) not in families}
    assert not unknown, f"the dashboard queries metrics the enforcer does not expose: {unknown}"
    # Every metric the enforcer exposes is on the dashboard.
    shown = {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in used}
    assert families <= shown, f"not on the dashboard: {families - shown}"


async def test_an_open_websocket_tunnel_is_counted(served: Served, nursery: trio.Nursery) -> None:
    from tests.enforcer.test_hostile_origin import websocket

    port = await operations_port(served, nursery)
    async with websocket(served.port, device(served, "valid")) as ws:
        await ws.send_message("ping")
        await ws.get_message()
        m = parse((await scrape(port))[1])
        assert value(m, "enforcer_tunnels_open") == 1
        assert value(m, "enforcer_connections_open") == 1
    with trio.fail_after(10):
        while value(parse((await scrape(port))[1]), "enforcer_tunnels_open") != 0:
            await trio.sleep(0.05)


async def test_an_open_http2_stream_is_counted(served: Served, nursery: trio.Nursery) -> None:
    from tests.enforcer.test_http2 import ctx_for
    from tests.h2wire import H2Client

    port = await operations_port(served, nursery)
    client = await H2Client.open(served.port, AUTH_HOST, ctx_for(served, "valid"))
    try:
        # A streaming upload the client has not finished: its stream stays open at the edge.
        sid = client.start("/upload", method="POST", end=False)
        await client.send_body(sid, b"first chunk", end=False)
        with trio.fail_after(10):
            while value(parse((await scrape(port))[1]), "enforcer_http2_streams_open") != 1:
                await trio.sleep(0.05)
        await client.send_body(sid, b"", end=True)
        assert (await client.response(sid)).status == 200
        with trio.fail_after(10):
            while value(parse((await scrape(port))[1]), "enforcer_http2_streams_open") != 0:
                await trio.sleep(0.05)
    finally:
        await client.aclose()


def test_accept_errors_are_counted() -> None:
    # In a process of its own with a low descriptor limit (as tests/enforcer/test_sockets.py
    # does): the accept loop hits EMFILE, and each failure reaches the metric.
    script = textwrap.dedent(
        """
        import functools, resource, socket, trio
        from enforcer.metrics import EnforcerMetrics
        from enforcer.sockets import TCPStream, serve_tcp

        metrics = EnforcerMetrics()

        async def handler(stream: TCPStream) -> None:
            try:
                await stream.receive_some()
            except trio.BrokenResourceError:
                pass
            finally:
                await stream.aclose()

        async def main() -> None:
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(256)
            port = listener.getsockname()[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    functools.partial(serve_tcp, on_accept_error=metrics.accept_errors.inc),
                    listener,
                    handler,
                    nursery,
                )
                clients = []
                while True:
                    try:
                        clients.append(socket.create_connection(("127.0.0.1", port)))
                    except OSError:
                        break
                    await trio.sleep(0)
                clients.pop().close()
                clients.append(socket.create_connection(("127.0.0.1", port)))
                await trio.sleep(0.5)
                for c in clients:
                    c.close()
                nursery.cancel_scope.cancel()
            print(metrics.render().decode())

        trio.run(main)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert value(parse(out.stdout), "enforcer_accept_errors_total") >= 1
