"""The admin API against hostile clients, over raw sockets: it authenticates before reading,
cuts slow clients, answers Expect: 100-continue, refuses odd JSON and unsafe settings with 400,
and keeps serving through all of it."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import trio

from enforcer.config import ConfigError, load_config
from testbed.demo import AUTH_HOST, DemoLayout
from tests.conftest import ADMIN_TOKEN, Served
from tests.testbed.test_cli import TESTBED
from tests.wire import admin_call, receive_until, run

ACC = "/client/v4/accounts/demo/access"
APPS = f"{ACC}/apps"


@pytest.fixture
async def admin(serve_config) -> Served:
    return await serve_config(admin=True)


async def still_serves(served: Served) -> None:
    code, env = await admin_call(served.admin_port, "GET", f"{ACC}/mtls")
    assert code == 200 and env["result"]["enabled"] is True


async def read_until(stream: trio.SocketStream, marker: bytes, limit: float = 5) -> bytes:
    """Read until ``marker`` arrives or the server closes; fail after ``limit`` seconds."""
    return await receive_until(stream, marker, limit)


def head(method: str, path: str, *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: admin", *headers, "", ""]
    return "\r\n".join(lines).encode()


async def test_no_token_is_refused_before_the_body_is_read(admin: Served) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", admin.admin_port)
    try:
        # A 1 MB body announced and never sent: the answer must not wait for it.
        await stream.send_all(head("POST", APPS, "Content-Length: 1000000"))
        answer = await read_until(stream, b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 401 ")
        assert b"connection: close" in answer.lower()
    finally:
        await stream.aclose()
    await still_serves(admin)


async def test_a_wrong_token_with_a_whole_body_still_gets_its_401(admin: Served) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", admin.admin_port)
    body = b"{" + b" " * 900_000 + b"}"
    try:
        request = head("POST", APPS, "Authorization: Bearer nope", f"Content-Length: {len(body)}")
        async with trio.open_nursery() as nursery:
            # The client sends all of it; the refusal arrives whole all the same (no reset).
            nursery.start_soon(_send_ignoring_reset, stream, request + body)
            answer = await read_until(stream, b'"code": 10000')
        assert answer.startswith(b"HTTP/1.1 401 ")
    finally:
        await stream.aclose()
    await still_serves(admin)


async def _send_ignoring_reset(stream: trio.SocketStream, data: bytes) -> None:
    # The server closes after its answer: the rest of the body is not wanted.
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(data)


async def test_slow_clients_are_cut_and_others_are_served(admin: Served) -> None:
    """One client drips its head, another its body, a byte every 0.3 s: both are cut at the
    10 s request deadline (a drip would take a minute), and good calls go on meanwhile."""
    body = json.dumps({"enabled": True}).encode() + b" " * 200
    outcomes: dict[str, bytes] = {}

    async def drip(name: str, prefix: bytes, slow: bytes) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", admin.admin_port)
        try:
            await stream.send_all(prefix)
            for i in range(len(slow)):
                try:
                    await stream.send_all(slow[i : i + 1])
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                await trio.sleep(0.3)
            outcomes[name] = await read_until(stream, b"\r\n\r\n", limit=5)
        finally:
            await stream.aclose()

    slow_head = head(
        "GET", f"{ACC}/mtls", f"Authorization: Bearer {ADMIN_TOKEN}", "X-Pad: " + "p" * 200
    )
    slow_body_head = head(
        "PUT", f"{ACC}/mtls", f"Authorization: Bearer {ADMIN_TOKEN}", f"Content-Length: {len(body)}"
    )
    with trio.fail_after(25):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drip, "head", b"", slow_head)
            nursery.start_soon(drip, "body", slow_body_head, body)
            for _ in range(5):
                await trio.sleep(1)
                await still_serves(admin)
    assert outcomes["head"] == b""  # no request yet, nothing to answer: closed
    assert outcomes["body"].startswith(b"HTTP/1.1 408 ")


async def test_expect_100_continue_is_answered_after_authentication(admin: Served) -> None:
    body = json.dumps({"enabled": True}).encode()
    stream = await trio.open_tcp_stream("127.0.0.1", admin.admin_port)
    try:
        await stream.send_all(
            head(
                "PUT",
                f"{ACC}/mtls",
                f"Authorization: Bearer {ADMIN_TOKEN}",
                "Expect: 100-continue",
                f"Content-Length: {len(body)}",
            )
        )
        interim = await read_until(stream, b"\r\n\r\n")
        assert interim.startswith(b"HTTP/1.1 100 ")
        await stream.send_all(body)
        final = await read_until(stream, b'"success"')
        assert final.startswith(b"HTTP/1.1 200 ")
    finally:
        await stream.aclose()

    # Without the token: the final 401 at once, no 100, and the body is never asked for.
    stream = await trio.open_tcp_stream("127.0.0.1", admin.admin_port)
    try:
        await stream.send_all(
            head("PUT", f"{ACC}/mtls", "Expect: 100-continue", f"Content-Length: {len(body)}")
        )
        assert (await read_until(stream, b"\r\n\r\n")).startswith(b"HTTP/1.1 401 ")
    finally:
        await stream.aclose()


async def test_a_declared_body_over_the_limit_is_refused_unread(admin: Served) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", admin.admin_port)
    try:
        await stream.send_all(
            head(
                "POST",
                APPS,
                f"Authorization: Bearer {ADMIN_TOKEN}",
                "Expect: 100-continue",
                f"Content-Length: {2 * 1024 * 1024}",
            )
        )
        assert (await read_until(stream, b"\r\n\r\n")).startswith(b"HTTP/1.1 413 ")
    finally:
        await stream.aclose()
    await still_serves(admin)


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000 + b"]" * 100_000,  # past the recursion limit
        b'{"name": ' + b"[" * 500 + b"]" * 500 + b"}",  # parses, but deeper than any setting
        b'{"name": ' + b"9" * 4301 + b"}",  # over int()'s digit limit (4300)
        b'{"enabled": ' + b"1" * 5000 + b"}",
    ],
    ids=["recursion", "deep", "4301-digits", "5000-digits"],
)
async def test_odd_json_is_a_400_not_a_500(admin: Served, raw: bytes) -> None:
    for method, path in (("POST", APPS), ("PUT", f"{ACC}/mtls")):
        code, env = await admin_call(admin.admin_port, method, path, raw_body=raw)
        assert code == 400, env
        message = env["errors"][0]["message"]
        assert env["success"] is False and ("JSON" in message or "nested" in message), message
    await still_serves(admin)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"cookie": {"path": "/; Domain=evil.test"}}, "cookie.path"),
        ({"cookie": {"path": "/\r\nSet-Cookie: x=y"}}, "cookie.path"),
        ({"cookie": {"path": "/\n"}}, "cookie.path"),
        ({"cookie": {"domain": "example.test; Secure"}}, "cookie.domain"),
        ({"cookie": {"domain": "example.test\r"}}, "cookie.domain"),
        ({"origin": "http://127.0.0.1:0"}, "origin"),
        ({"origin": "http://127.0.0.1:65536"}, "origin"),
        ({"origin": "http://127.0.0.1:99999/x"}, "origin"),
        ({"origin": "http://127.0.0.1:-1"}, "origin"),
    ],
)
async def test_unsafe_cookie_attributes_and_ports_are_refused(
    admin: Served, change: dict[str, object], field: str
) -> None:
    apps = (await admin_call(admin.admin_port, "GET", APPS))[1]["result"]
    auth = next(a for a in apps if a["hostname"] == AUTH_HOST)
    before = (admin.controller.generation, admin.controller.objects)
    code, env = await admin_call(admin.admin_port, "PUT", f"{APPS}/{auth['id']}", change)
    assert code == 400, env
    assert env["errors"][0]["message"].startswith(f"{field}: ")
    assert (admin.controller.generation, admin.controller.objects) == before
    await still_serves(admin)


_DURATION = 'session_duration = "24h"\n'
_ORIGIN = 'origin = "http://127.0.0.1:9"'


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        (_DURATION, _DURATION + 'cookie = { path = "/;x" }\n', "cookie.path"),
        (_DURATION, _DURATION + 'cookie = { domain = "a\\nb" }\n', "cookie.domain"),
        (_ORIGIN, 'origin = "http://127.0.0.1:0"', "origin"),
        (_ORIGIN, 'origin = "http://127.0.0.1:70000"', "origin"),
    ],
    ids=["path-semicolon", "domain-newline", "port-0", "port-70000"],
)
def test_the_config_refuses_them_too(
    demo: DemoLayout, tmp_path: Path, old: str, new: str, field: str
) -> None:
    text = demo.config.read_text()
    assert old in text
    bad = demo.root / f"hostile-{tmp_path.name}.toml"  # beside the demo: its paths resolve
    bad.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError) as raised:
        load_config(bad)
    assert raised.value.field == f"applications[0].{field}"


async def test_the_admin_cli_refuses_a_lone_surrogate(admin: Served) -> None:
    # Bytes that are not UTF-8 on the command line become lone surrogates ('\udc80') in Python.
    result = await run(
        [
            *(a.encode() for a in TESTBED),
            *(
                a.encode()
                for a in (
                    "enforcer",
                    "admin",
                    "--url",
                    f"http://127.0.0.1:{admin.admin_port}",
                    "--token",
                    ADMIN_TOKEN,
                )
            ),
            b"apps",
            b"show",
            b"\x80",
        ]  # type: ignore[list-item]
    )
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert "Traceback" not in stderr
    assert "id: '\\udc80' is not valid UTF-8 text" in stderr
    await still_serves(admin)
