"""Admin writes while requests flow: every response matches one whole state, never half of one."""

from __future__ import annotations

import trio

from testbed.demo import AUTH_HOST
from tests.conftest import Served
from tests.wire import Connection, admin_call, client_context

ACC = "/client/v4/accounts/demo/access"
# Two states that one PUT switches between: the session duration and the policy change together.
STATES = {
    "A": {"session_duration": "24h", "cn": "device-001", "max_age": "86400"},
    "B": {"session_duration": "15m", "cn": "device-999", "max_age": "900"},
}
WRITES = 30


def body(state: str) -> dict:
    s = STATES[state]
    return {
        "session_duration": s["session_duration"],
        "policies": [
            {"name": "only " + s["cn"], "include": [{"common_name": {"common_name": s["cn"]}}]}
        ],
    }


def explain(device_cn: str, status: int, cookie: str | None, reason: str | None) -> set[str]:
    """The states a response is consistent with (empty: a half-applied change showed)."""
    fits = set()
    for name, s in STATES.items():
        if device_cn == s["cn"]:
            if status == 200 and cookie is not None and f"Max-Age={s['max_age']};" in cookie:
                fits.add(name)
        elif status == 403 and reason == "policy_denied":
            fits.add(name)
    return fits


async def test_no_request_sees_a_half_applied_change(serve_config) -> None:
    served: Served = await serve_config(admin=True)
    app_id = f"config-0-{AUTH_HOST}"
    code, _ = await admin_call(served.admin_port, "PUT", f"{ACC}/apps/{app_id}", body("A"))
    assert code == 200
    observed: list[tuple[str, set[str]]] = []
    done = trio.Event()

    async def writer() -> None:
        for i in range(WRITES):
            code, env = await admin_call(
                served.admin_port, "PUT", f"{ACC}/apps/{app_id}", body("AB"[i % 2])
            )
            assert code == 200, env
            await trio.sleep(0)
        done.set()

    async def device(name: str, cn: str) -> None:
        ctx = client_context(served.layout.edge_ca, *served.layout.device(name))
        conn = await Connection.open(served.port, AUTH_HOST, ctx)
        try:
            while not done.is_set():
                response = await conn.request("/")
                fits = explain(cn, response.status, response.header("set-cookie"), response.reason)
                observed.append((cn, fits))
        finally:
            await conn.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        nursery.start_soon(device, "valid", "device-001")
        nursery.start_soon(device, "wrong-cn", "device-999")

    assert len(observed) >= 10
    half = [o for o in observed if not o[1]]
    assert half == [], f"{len(half)} responses fit no whole state"
    # Both states were seen by both devices: the checker did look at changes in flight.
    assert {frozenset(f) for _, f in observed} >= {frozenset("A"), frozenset("B")}
