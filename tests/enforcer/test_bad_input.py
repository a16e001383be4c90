"""Bad input from clients: a clear answer, and the server keeps serving."""

from __future__ import annotations

import base64
import datetime as dt
import json

import jwt
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import rsa

from enforcer.tokens import SigningKey
from testbed.demo import AUTH_HOST
from tests.conftest import Served
from tests.wire import Connection, client_context, get, receive_until


def ctx(served: Served, device: str | None = None):
    if device is None:
        return client_context(served.layout.edge_ca)
    cert, key = served.layout.device(device)
    return client_context(served.layout.edge_ca, cert, key)


async def still_serves(served: Served) -> None:
    assert (await get(served.port, AUTH_HOST, ctx(served, "valid"))).status == 200


async def read_until_closed(stream: trio.SocketStream, limit: float = 10) -> bytes:
    data = b""
    with trio.fail_after(limit):
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


async def test_garbage_instead_of_a_client_hello(served: Served) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", served.port)
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: auth.example.test\r\n\r\n")
    assert await read_until_closed(stream) == b""
    await stream.aclose()
    assert "not a TLS ClientHello" in served.log()[-1]["detail"]
    await still_serves(served)


async def test_a_client_that_stalls_mid_handshake(serve_config) -> None:
    served = await serve_config(handshake_timeout=0.3)
    stream = await trio.open_tcp_stream("127.0.0.1", served.port)
    await stream.send_all(bytes.fromhex("160301020001"))  # a record header and one byte
    assert await read_until_closed(stream) == b""
    await stream.aclose()
    assert served.log()[-1]["detail"] == "handshake timed out"
    await still_serves(served)


async def test_a_client_that_drops_mid_handshake(served: Served) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", served.port)
    await stream.send_all(bytes.fromhex("16030100"))
    await stream.aclose()
    await still_serves(served)


async def test_an_oversized_header_gets_431(served: Served) -> None:
    conn = await Connection.open(served.port, AUTH_HOST, ctx(served, "valid"))
    try:
        response = await conn.request("/", headers=[("x-big", "a" * 64 * 1024)])
        assert response.status == 431
    finally:
        await conn.aclose()
    await still_serves(served)


async def test_a_malformed_request_gets_400(served: Served) -> None:
    conn = await Connection.open(served.port, AUTH_HOST, ctx(served, "valid"))
    await conn.stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
    data = await receive_until(conn.stream, limit=5)
    assert data.startswith(b"HTTP/1.1 400")
    await conn.aclose()
    await still_serves(served)


def _b64(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


@pytest.fixture
async def real_token(served: Served) -> str:
    response = await get(served.port, AUTH_HOST, ctx(served, "valid"))
    return response.header("set-cookie").split(";")[0].split("=", 1)[1]


def forged_tokens(served: Served, real: str) -> dict[str, str]:
    snap = served.enforcer.snapshot
    signer = snap.keyring.current.private_key
    header, payload, signature = real.split(".")
    claims = jwt.decode(real, options={"verify_signature": False})
    now = int(served.clock.now().timestamp())
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    kid = jwt.get_unverified_header(real)["kid"]
    other_app = next(a for h, a in snap.applications.items() if h != AUTH_HOST)

    def signed(changes: dict, key=signer, kid: str = kid, alg: str = "RS256") -> str:
        return jwt.encode({**claims, **changes}, key, algorithm=alg, headers={"kid": kid})

    flipped = signature[:-4] + ("AAAA" if signature[-4:] != "AAAA" else "BBBB")
    return {
        "alg none": _b64({"alg": "none", "typ": "JWT", "kid": kid}) + "." + payload + ".",
        "HS256": signed({}, key="a-shared-secret-of-at-least-32-bytes!!", alg="HS256"),
        "foreign key, same kid": signed({}, key=other_key),
        "foreign key, own kid": signed(
            {}, key=other_key, kid=SigningKey.from_private_key(other_key, served.clock.now()).kid
        ),
        "foreign aud": signed({"aud": ["0" * 64]}),
        "another application's aud": signed({"aud": [other_app.aud]}),
        "foreign iss": signed({"iss": "https://evil.example"}),
        "tampered payload": header
        + "."
        + _b64({**claims, "common_name": "device-999"})
        + "."
        + signature,
        "tampered signature": header + "." + payload + "." + flipped,
        "expired": signed({"exp": now - 1, "iat": now - 100, "nbf": now - 100}),
        "not yet valid": signed({"nbf": now + 100}),
        "garbage": "not-a-jwt",
    }


async def test_forged_tokens_never_admit(served: Served, real_token: str) -> None:
    for name, token in forged_tokens(served, real_token).items():
        for header in (("cookie", f"CF_Authorization={token}"), ("cf-access-jwt-assertion", token)):
            response = await get(served.port, AUTH_HOST, ctx(served), headers=[header])
            assert (response.status, response.reason) == (403, "no_certificate"), name
            expected = "token_expired" if name == "expired" else "token_invalid"
            assert served.last()["notes"] == [expected], name
        await still_serves(served)
    # The control: the real token does admit, by cookie and by header.
    for header in (
        ("cookie", f"CF_Authorization={real_token}"),
        ("cf-access-jwt-assertion", real_token),
    ):
        assert (await get(served.port, AUTH_HOST, ctx(served), headers=[header])).status == 200


async def test_a_token_is_checked_against_the_enforcer_clock(
    served: Served, real_token: str
) -> None:
    served.clock.advance(dt.timedelta(hours=23, minutes=59, seconds=59))
    ok = await get(
        served.port, AUTH_HOST, ctx(served), headers=[("cookie", f"CF_Authorization={real_token}")]
    )
    assert ok.status == 200
    served.clock.advance(dt.timedelta(seconds=2))
    late = await get(
        served.port, AUTH_HOST, ctx(served), headers=[("cookie", f"CF_Authorization={real_token}")]
    )
    assert late.status == 403


async def test_head_of_the_signing_keys_has_no_body(served: Served) -> None:
    conn = await Connection.open(served.port, AUTH_HOST, ctx(served))
    try:
        response = await conn.request("/cdn-cgi/access/certs", method="HEAD")
        assert response.status == 200 and response.body == b""
        assert int(response.header("content-length")) > 0
        again = await conn.request("/cdn-cgi/access/certs")  # the connection is still good
        assert "keys" in again.json()
    finally:
        await conn.aclose()


async def test_a_client_that_stalls_mid_body_gets_408(serve_config) -> None:
    served = await serve_config(request_timeout=0.3)
    conn = await Connection.open(served.port, AUTH_HOST, ctx(served, "valid"))
    try:
        head = f"POST / HTTP/1.1\r\nHost: {AUTH_HOST}\r\nContent-Length: 100\r\n\r\nabc"
        await conn.stream.send_all(head.encode())
        with trio.fail_after(10):
            data = await conn.stream.receive_some(65536)
        assert data.startswith(b"HTTP/1.1 408")
    finally:
        await conn.aclose()
    await still_serves(served)
