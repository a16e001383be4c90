"""The access flow over real TLS on loopback: access-flow A1-A9, A11, with stdlib ssl clients."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import ssl

import jwt
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from enforcer.clock import TrioClock
from enforcer.config import load_config
from enforcer.snapshot import RootCertificate
from testbed.demo import AUTH_HOST, IOT_HOST
from tests.conftest import Served
from tests.wire import Connection, client_context, get

DEVICE_OUTCOMES = [
    # device, hostname, status, reason
    ("valid", AUTH_HOST, 200, None),
    ("leaf-only", AUTH_HOST, 200, None),
    ("expired", AUTH_HOST, 403, "certificate_expired"),
    ("not-yet-valid", AUTH_HOST, 403, "certificate_not_yet_valid"),
    ("foreign-ca", AUTH_HOST, 403, "untrusted_issuer"),
    ("wrong-cn", AUTH_HOST, 200, None),
    ("valid", IOT_HOST, 200, None),
    ("leaf-only", IOT_HOST, 403, "policy_denied"),
    ("expired", IOT_HOST, 403, "certificate_expired"),
    ("foreign-ca", IOT_HOST, 403, "untrusted_issuer"),
    ("wrong-cn", IOT_HOST, 403, "policy_denied"),
]


def ctx_for(served: Served, device: str | None):
    if device is None:
        return client_context(served.layout.edge_ca)
    cert, key = served.layout.device(device)
    return client_context(served.layout.edge_ca, cert, key)


@pytest.mark.parametrize(("device", "host", "status", "reason"), DEVICE_OUTCOMES)
async def test_each_demo_device(
    served: Served, device: str, host: str, status: int, reason: str | None
) -> None:
    response = await get(served.port, host, ctx_for(served, device))
    assert (response.status, response.reason) == (status, reason)
    record = served.last()
    assert record["status"] == status and record["reason"] == reason
    assert record["certificate"]["common_name"] is not None


async def test_no_certificate_is_403_not_a_handshake_failure(served: Served) -> None:
    response = await get(served.port, AUTH_HOST, ctx_for(served, None))
    assert response.status == 403
    assert response.reason == "no_certificate"
    assert b"certificate" in response.body


async def test_admitted_request_carries_a_verifiable_token(served: Served) -> None:
    response = await get(served.port, AUTH_HOST, ctx_for(served, "valid"))
    assert response.status == 200
    cookie = response.header("set-cookie")
    assert cookie is not None and cookie.startswith("CF_Authorization=")
    attrs = [a.strip() for a in cookie.split(";")]
    assert {"Path=/", "Max-Age=86400", "Secure", "HttpOnly", "SameSite=None"} <= set(attrs)
    token = attrs[0].split("=", 1)[1]

    # Verify it as an origin would: keys from /cdn-cgi/access/certs, signature, aud and iss.
    jwks = (
        await get(served.port, AUTH_HOST, ctx_for(served, None), "/cdn-cgi/access/certs")
    ).json()
    assert {"keys", "public_cert", "public_certs"} <= set(jwks)
    kid = jwt.get_unverified_header(token)["kid"]
    key = jwt.PyJWKSet.from_dict(jwks)[kid].key
    app = served.enforcer.snapshot.applications[AUTH_HOST]
    claims = jwt.decode(
        token,
        key,
        algorithms=["RS256"],
        audience=app.aud,
        issuer=served.enforcer.snapshot.issuer,
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )
    assert claims["aud"] == [app.aud]
    assert claims["type"] == "app" and claims["sub"] == ""
    assert claims["common_name"] == "device-001"
    assert claims["exp"] - claims["iat"] == 86400
    leaf = x509.load_pem_x509_certificates(served.layout.device("valid")[0].read_bytes())[0]
    digest = hashlib.sha256(leaf.public_bytes(Encoding.DER)).digest()
    assert claims["cnf"]["x5t#S256"] == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    # The origin received the same kind of token, and the client certificate (forwarding on).
    echoed = response.json()["headers"]
    assert (
        jwt.decode(
            echoed["cf-access-jwt-assertion"],
            key,
            algorithms=["RS256"],
            audience=app.aud,
            options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
        )["common_name"]
        == "device-001"
    )
    assert echoed["cf-client-cert-sha256"] == digest.hex()
    assert base64.b64decode(echoed["cf-client-cert-der-base64"]) == leaf.public_bytes(Encoding.DER)


async def test_client_cannot_spoof_the_access_headers(served: Served) -> None:
    spoof = [("Cf-Client-Cert-Sha256", "00" * 32), ("Cf-Client-Cert-Der-Base64", "AAAA")]
    response = await get(served.port, AUTH_HOST, ctx_for(served, "valid"), headers=spoof)
    echoed = response.json()["headers"]
    assert echoed["cf-client-cert-sha256"] != "00" * 32
    assert echoed["cf-client-cert-der-base64"] != "AAAA"


async def test_cookie_admits_without_a_certificate_until_it_expires(served: Served) -> None:
    first = await get(served.port, AUTH_HOST, ctx_for(served, "valid"))
    cookie = first.header("set-cookie").split(";")[0]
    again = await get(served.port, AUTH_HOST, ctx_for(served, None), headers=[("cookie", cookie)])
    assert again.status == 200
    assert served.last()["admitted_by"] == "token"
    assert again.header("set-cookie") is None

    served.clock.advance(dt.timedelta(hours=24, seconds=1))
    later = await get(served.port, AUTH_HOST, ctx_for(served, None), headers=[("cookie", cookie)])
    assert (later.status, later.reason) == (403, "no_certificate")
    assert served.last()["notes"] == ["token_expired"]


async def test_no_duration_sends_no_cookie_and_closes(served: Served) -> None:
    conn = await Connection.open(served.port, IOT_HOST, ctx_for(served, "valid"))
    try:
        response = await conn.request("/")
        assert response.status == 200
        assert response.header("set-cookie") is None
        assert response.header("connection") == "close"
        assert conn.closed_by_server
        # The origin still got a token, valid for that request only.
        token = response.json()["headers"]["cf-access-jwt-assertion"]
        claims = jwt.decode(token, options={"verify_signature": False})
        assert 0 < claims["exp"] - claims["iat"] <= 5
    finally:
        await conn.aclose()


async def test_no_duration_refuses_session_resumption(served: Served) -> None:
    async def resumed(host: str) -> bool:
        ctx = ctx_for(served, "valid")
        first = await Connection.open(served.port, host, ctx)
        await first.request("/")  # TLS 1.3 tickets arrive after the handshake
        session = first.ssl_object.session
        await first.aclose()
        second = await Connection.open(served.port, host, ctx, session=session)
        try:
            response = await second.request("/")
            assert response.status == 200
            return second.ssl_object.session_reused
        finally:
            await second.aclose()

    assert await resumed(AUTH_HOST) is True  # the control: resumption works where allowed
    assert await resumed(IOT_HOST) is False


async def test_cookie_never_admits_on_no_duration(served: Served) -> None:
    cookie = (
        (await get(served.port, AUTH_HOST, ctx_for(served, "valid")))
        .header("set-cookie")
        .split(";")[0]
    )
    response = await get(served.port, IOT_HOST, ctx_for(served, None), headers=[("cookie", cookie)])
    assert (response.status, response.reason) == (403, "no_certificate")
    assert "token_invalid" in served.last()["notes"]


async def test_host_must_match_sni(served: Served) -> None:
    response = await get(served.port, AUTH_HOST, ctx_for(served, "valid"), host=IOT_HOST)
    assert (response.status, response.reason) == (421, "misdirected")


async def test_keep_alive_serves_several_requests(served: Served) -> None:
    conn = await Connection.open(served.port, AUTH_HOST, ctx_for(served, "valid"))
    try:
        for _ in range(3):
            assert (await conn.request("/")).status == 200
        assert {r["connection"] for r in served.log()} == {served.last()["connection"]}
    finally:
        await conn.aclose()


async def test_a_root_authorises_only_its_associated_hostnames(serve_config, demo) -> None:
    config = load_config(demo.config)
    demo_root = dataclasses.replace(config.roots[0], associated_hostnames=(AUTH_HOST,))
    foreign = x509.load_pem_x509_certificates((demo.root / "ca" / "foreign-root.pem").read_bytes())[
        0
    ]
    foreign_root = RootCertificate("foreign", "foreign root", foreign, (), (IOT_HOST,))
    served = await serve_config(dataclasses.replace(config, roots=(demo_root, foreign_root)))
    cases = [
        ("valid", AUTH_HOST, 200, None),
        ("valid", IOT_HOST, 403, "untrusted_issuer"),
        ("foreign-ca", AUTH_HOST, 403, "untrusted_issuer"),
        ("foreign-ca", IOT_HOST, 403, "policy_denied"),  # its chain is good for iot; its CN is not
    ]
    for device, host, status, reason in cases:
        response = await get(served.port, host, ctx_for(served, device))
        assert (response.status, response.reason) == (status, reason), (device, host)


async def test_a_hostname_without_application_is_404_and_asks_no_certificate(
    serve_config, demo
) -> None:
    config = load_config(demo.config)
    edge = dataclasses.replace(
        config.edge_certificates[0],
        hostnames=(*config.edge_certificates[0].hostnames, "other.example.test"),
    )
    served = await serve_config(dataclasses.replace(config, edge_certificates=(edge,)))
    ctx = ctx_for(served, "valid")
    ctx.check_hostname = False  # the demo edge certificate does not name other.example.test
    conn = await Connection.open(served.port, "other.example.test", ctx)
    try:
        response = await conn.request("/")
        assert (response.status, response.reason) == (404, "no_application")
        assert served.last()["certificate"] is None  # no CertificateRequest, so none was sent
    finally:
        await conn.aclose()


async def test_no_sni_is_misdirected(served: Served) -> None:
    ctx = ctx_for(served, "valid")
    ctx.check_hostname = False
    tcp = await trio.open_tcp_stream("127.0.0.1", served.port)
    stream = trio.SSLStream(tcp, ctx, server_hostname=None)
    await stream.do_handshake()
    conn = Connection(stream)
    try:
        response = await conn.request("/", host=AUTH_HOST)
        assert (response.status, response.reason) == (421, "misdirected")
    finally:
        await conn.aclose()


@pytest.mark.parametrize("host", [AUTH_HOST, IOT_HOST])
async def test_tls_1_2_clients(served: Served, host: str) -> None:
    for device, status in (("valid", 200), ("expired", 403), (None, 403)):
        ctx = ctx_for(served, device)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        conn = await Connection.open(served.port, host, ctx)
        try:
            assert (await conn.request("/")).status == status
            assert conn.stream.version() == "TLSv1.2"
        finally:
            await conn.aclose()
    ctx = ctx_for(served, "valid")
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    first = await Connection.open(served.port, host, ctx)
    await first.request("/")
    session = first.ssl_object.session
    await first.aclose()
    second = await Connection.open(served.port, host, ctx, session=session)
    try:
        assert (await second.request("/")).status == 200
        assert second.ssl_object.session_reused is (host == AUTH_HOST)
    finally:
        await second.aclose()


async def test_certificate_bound_tokens(serve_config, demo) -> None:
    config = load_config(demo.config)
    apps = tuple(
        dataclasses.replace(a, bind_token_to_certificate=True) if a.hostname == AUTH_HOST else a
        for a in config.applications
    )
    served = await serve_config(dataclasses.replace(config, applications=apps))
    first = await get(served.port, AUTH_HOST, ctx_for(served, "valid"))
    cookie = ("cookie", first.header("set-cookie").split(";")[0])
    # A10: the token admits only beside the certificate it was bound to.
    same = await get(served.port, AUTH_HOST, ctx_for(served, "valid"), headers=[cookie])
    assert same.status == 200 and served.last()["admitted_by"] == "token"
    other = await get(served.port, AUTH_HOST, ctx_for(served, "wrong-cn"), headers=[cookie])
    assert other.status == 200 and served.last()["admitted_by"] == "certificate"
    assert served.last()["notes"] == ["token_invalid"]
    alone = await get(served.port, AUTH_HOST, ctx_for(served, None), headers=[cookie])
    assert (alone.status, alone.reason) == (403, "no_certificate")


async def test_runs_on_trio_mock_clock(serve_config, mock_clock) -> None:
    # A13: the enforcer's clock can be trio's; jumping virtual time expires the session.
    clock = TrioClock()
    served = await serve_config(clock=clock)
    first = await get(served.port, AUTH_HOST, ctx_for(served, "valid"))
    cookie = ("cookie", first.header("set-cookie").split(";")[0])
    assert (
        await get(served.port, AUTH_HOST, ctx_for(served, None), headers=[cookie])
    ).status == 200
    mock_clock.jump(24 * 3600)
    late = await get(served.port, AUTH_HOST, ctx_for(served, None), headers=[cookie])
    assert (late.status, late.reason) == (403, "no_certificate")
    assert served.last()["notes"] == ["token_expired"]


async def test_an_in_process_origin_answers_as_the_http_one_does(served: Served) -> None:
    # Simulations mount the echo origin in-process (OriginPool.app): same answer, no HTTP hop.
    import json

    from enforcer.origin import echo_app

    over_http = await get(served.port, AUTH_HOST, ctx_for(served, "valid"), path="/a?b=1")
    served.enforcer.origins.app = echo_app
    in_process = await get(served.port, AUTH_HOST, ctx_for(served, "valid"), path="/a?b=1")
    assert in_process.status == over_http.status == 200
    sent = json.loads(over_http.body)
    got = json.loads(in_process.body)
    assert got["path"] == sent["path"] == "/a?b=1"
    # The same forwarded headers reach it: the token and the client certificate among them.
    assert set(got["headers"]) == set(sent["headers"])
    assert got["headers"]["cf-access-jwt-assertion"].count(".") == 2

    async def refused(*args: object) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        raise OSError("connection refused")

    served.enforcer.origins.app = refused
    down = await get(served.port, AUTH_HOST, ctx_for(served, "valid"))
    assert down.status == 502
    assert served.last()["status"] == 502
