"""docs/access-log.md is the access log's schema: the documented fields are exactly those written.

Request lines are checked on real TLS traffic (an admitted device, a denied one, a service
token presented, a refused CONNECT); every line must have the documented *always* fields and
nothing undocumented. The code that builds the lines is read too (its dict literals), so that a
field added to a rarely written line (``h2_flood``, ``tunnel_closed``) cannot go undocumented.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import trio

from testbed.demo import AUTH_HOST
from tests.conftest import Served
from tests.wire import Connection, client_context, get

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "access-log.md"
ROW = re.compile(r"^\| `([a-z0-9_.]+)` \| (always|optional) \| ([^|]+) \|")
Fields = dict[str, str]  # field -> always / optional


def documented() -> dict[str, Fields]:
    """The schema of each kind of line (``request`` or an event name), from the doc's tables."""
    kinds: dict[str, Fields] = {}
    kind: str | None = None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line == "## Request lines":
            kind = "request"
        elif m := re.fullmatch(r"### `([a-z0-9_]+)`", line):
            kind = m.group(1)
        elif line.startswith("## "):
            kind = None
        elif kind and (row := ROW.match(line)):
            kinds.setdefault(kind, {})[row.group(1)] = row.group(2)
    return kinds


def top(fields: Fields, presence: str | None = None) -> set[str]:
    return {f for f, p in fields.items() if "." not in f and presence in (None, p)}


def nested(fields: Fields, parent: str) -> set[str]:
    return {f.split(".", 1)[1] for f in fields if f.startswith(parent + ".")}


def check_line(record: dict[str, object], schema: dict[str, Fields]) -> None:
    kind = str(record.get("event", "request"))
    assert kind in schema, f"line of kind {kind!r} is not documented: {record}"
    fields = schema[kind]
    keys = set(record)
    assert top(fields, "always") <= keys, f"{kind}: missing {top(fields, 'always') - keys}"
    assert keys <= top(fields), f"{kind}: undocumented {keys - top(fields)}"
    for key, value in record.items():
        if isinstance(value, dict):
            assert set(value) == nested(fields, key), f"{kind}.{key}: {set(value)}"


async def test_the_lines_written_match_the_documented_fields(served: Served) -> None:
    layout = served.layout
    valid = client_context(layout.edge_ca, *layout.device("valid"))
    expired = client_context(layout.edge_ca, *layout.device("expired"))
    await get(served.port, AUTH_HOST, valid)
    await get(served.port, AUTH_HOST, expired)
    headers = [("cf-access-client-id", "ci.access"), ("cf-access-client-secret", "nope")]
    await get(served.port, AUTH_HOST, client_context(layout.edge_ca), headers=headers)
    conn = await Connection.open(served.port, AUTH_HOST, valid)
    try:
        await conn.request(f"{AUTH_HOST}:443", method="CONNECT")
    finally:
        await conn.aclose()
    # Not TLS at all: a tls_error line.
    stream = await trio.open_tcp_stream("127.0.0.1", served.port)
    await stream.send_all(b"GET / HTTP/1.1\r\n\r\n")
    await stream.aclose()
    with trio.fail_after(10):
        while not any(r.get("event") == "tls_error" for r in served.log()):
            await trio.sleep(0.02)

    schema = documented()
    lines = served.log()
    for record in lines:
        check_line(record, schema)
    decisions = {r.get("decision") for r in lines}
    assert {"allowed", "denied", "refused"} <= decisions
    assert any("service_token" in r for r in lines)
    assert any(r.get("certificate") for r in lines)


def test_the_code_writes_exactly_the_documented_fields() -> None:
    schema = documented()
    assert "request" in schema and len(schema) >= 5
    events: dict[str, set[str]] = {}
    request_keys: set[str] = set()
    optional_request_keys: set[str] = set()
    for path in (ROOT / "enforcer").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
                event = next(
                    (
                        v.value
                        for k, v in zip(node.keys, node.values, strict=True)
                        if isinstance(k, ast.Constant) and k.value == "event"
                    ),
                    None,
                )
                if isinstance(event, str):
                    events[event] = {str(k) for k in keys}
            if (
                isinstance(node, ast.FunctionDef)
                and node.name == "_log"
                and path.name == ("exchange.py")
            ):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Dict) and any(
                        isinstance(k, ast.Constant) and k.value == "decision" for k in inner.keys
                    ):
                        request_keys = {
                            str(k.value) for k in inner.keys if isinstance(k, ast.Constant)
                        }
                    if (
                        isinstance(inner, ast.Subscript)
                        and isinstance(inner.ctx, ast.Store)
                        and isinstance(inner.value, ast.Name)
                        and inner.value.id == "record"
                        and isinstance(inner.slice, ast.Constant)
                    ):
                        optional_request_keys.add(str(inner.slice.value))
    assert {k for k in schema if k != "request"} == set(events), "events written vs documented"
    for event, keys in events.items():
        assert keys == top(schema[event]), (
            f"{event}: written {keys}, documented {top(schema[event])}"
        )
    assert request_keys == top(schema["request"], "always")
    assert optional_request_keys == top(schema["request"], "optional")
