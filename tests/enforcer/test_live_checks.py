"""access-flow A12-A14: changes and the clock reach kept-alive and resumed connections at once."""

from __future__ import annotations

import dataclasses
import datetime as dt

from cryptography import x509

from enforcer.chain import fingerprint
from testbed.demo import AUTH_HOST
from tests.conftest import Served
from tests.wire import Connection, client_context


def valid_ctx(served: Served):
    cert, key = served.layout.device("valid")
    return client_context(served.layout.edge_ca, cert, key)


def revoke(served: Served, device: str) -> None:
    leaf = x509.load_pem_x509_certificates(served.layout.device(device)[0].read_bytes())[0]
    snap = served.enforcer.snapshot
    served.enforcer.snapshot = dataclasses.replace(
        snap, generation=snap.generation + 1, revoked=snap.revoked | {fingerprint(leaf)}
    )


async def test_revocation_applies_to_the_next_request_on_a_kept_alive_connection(
    served: Served,
) -> None:
    conn = await Connection.open(served.port, AUTH_HOST, valid_ctx(served))
    try:
        assert (await conn.request("/")).status == 200
        revoke(served, "valid")
        response = await conn.request("/")
        assert (response.status, response.reason) == (403, "revoked")
    finally:
        await conn.aclose()


async def test_expiry_applies_on_a_kept_alive_connection(served: Served) -> None:
    leaf = x509.load_pem_x509_certificates(served.layout.device("valid")[0].read_bytes())[0]
    conn = await Connection.open(served.port, AUTH_HOST, valid_ctx(served))
    try:
        served.clock.set(leaf.not_valid_after_utc)  # the last valid second
        assert (await conn.request("/")).status == 200
        served.clock.advance(dt.timedelta(seconds=1))
        response = await conn.request("/")
        assert (response.status, response.reason) == (403, "certificate_expired")
    finally:
        await conn.aclose()


async def test_resumed_session_is_rechecked(served: Served) -> None:
    ctx = valid_ctx(served)
    first = await Connection.open(served.port, AUTH_HOST, ctx)
    assert (await first.request("/")).status == 200
    session = first.ssl_object.session
    await first.aclose()

    revoke(served, "valid")
    second = await Connection.open(served.port, AUTH_HOST, ctx, session=session)
    try:
        assert second.ssl_object.session_reused
        response = await second.request("/")
        assert (response.status, response.reason) == (403, "revoked")
        assert served.last()["tls"]["resumed"] is True
    finally:
        await second.aclose()


async def test_resumed_session_keeps_the_intermediates_it_was_sent(served: Served) -> None:
    # The valid device sends leaf + intermediate; take the intermediate out of the uploaded
    # trust so that the resumed connection only validates if the enforcer remembered it.
    snap = served.enforcer.snapshot
    trust = {h: dataclasses.replace(t, intermediates=()) for h, t in snap.trust.items()}
    served.enforcer.snapshot = dataclasses.replace(
        snap, generation=snap.generation + 1, trust=trust
    )
    ctx = valid_ctx(served)
    first = await Connection.open(served.port, AUTH_HOST, ctx)
    assert (await first.request("/")).status == 200
    session = first.ssl_object.session
    await first.aclose()
    second = await Connection.open(served.port, AUTH_HOST, ctx, session=session)
    try:
        assert second.ssl_object.session_reused
        assert (await second.request("/")).status == 200
    finally:
        await second.aclose()


async def test_a_request_in_flight_keeps_its_snapshot(served: Served) -> None:
    # A12: the decision reads the snapshot once; replacing it between requests changes the
    # next decision, never half of one. Swap in an application change and check both sides.
    conn = await Connection.open(served.port, AUTH_HOST, valid_ctx(served))
    try:
        before = await conn.request("/")
        assert before.header("set-cookie") is not None
        snap = served.enforcer.snapshot
        app = dataclasses.replace(
            snap.applications[AUTH_HOST], session_duration=dt.timedelta(minutes=15)
        )
        served.enforcer.snapshot = dataclasses.replace(
            snap, generation=snap.generation + 1, applications={**snap.applications, AUTH_HOST: app}
        )
        after = await conn.request("/")
        assert "Max-Age=900" in after.header("set-cookie")
    finally:
        await conn.aclose()
