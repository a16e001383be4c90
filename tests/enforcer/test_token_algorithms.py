"""Token algorithms: RS256 by default, ES256 and EdDSA by setting (access-flow A7, A11, J1, J7).

Over real TLS to a served enforcer: for each algorithm a device is admitted and its token is
verified as an origin would, with pyjwt and the JWKS fetched from ``/cdn-cgi/access/certs``;
a rotation from RS256 to ES256 keeps the RS256 tokens valid through the grace period and
publishes both keys; a token whose header claims another algorithm than its key's is refused;
the login cookie (HS256 under the key's ``mac_key``) works with every key type.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enforcer import tokens
from enforcer.config import ConfigError, load_config
from enforcer.login import LoginCookie, LoginFailed, mint_login_cookie, read_login_cookie
from enforcer.tokens import KeyRing, SigningKey, TokenStatus, generate_key
from testbed.demo import AUTH_HOST
from tests.conftest import Served
from tests.enforcer.test_admin_api import ok, refused
from tests.wire import client_context, get

ACC = "/client/v4/accounts/demo/access"
JWK_SHAPE = {
    "RS256": {"kty": "RSA", "fields": {"n", "e"}},
    "ES256": {"kty": "EC", "crv": "P-256", "fields": {"x", "y"}},
    "EdDSA": {"kty": "OKP", "crv": "Ed25519", "fields": {"x"}},
}


def ctx(served: Served, device: str | None = None):
    if device is None:
        return client_context(served.layout.edge_ca)
    return client_context(served.layout.edge_ca, *served.layout.device(device))


async def serve_with(serve_config, demo, algorithm: str, **kw) -> Served:
    cfg = dataclasses.replace(
        load_config(demo.config), signing_key_file=None, signing_algorithm=algorithm
    )
    return await serve_config(cfg, **kw)  # type: ignore[no-any-return]


async def admitted_token(served: Served) -> str:
    response = await get(served.port, AUTH_HOST, ctx(served, "valid"))
    assert response.status == 200
    cookie = response.header("set-cookie")
    assert cookie is not None and cookie.startswith("CF_Authorization=")
    return cookie.split(";", 1)[0].split("=", 1)[1]


async def published(served: Served) -> dict:
    response = await get(served.port, AUTH_HOST, ctx(served), "/cdn-cgi/access/certs")
    assert response.status == 200
    return response.json()  # type: ignore[no-any-return]


def origin_verify(token: str, jwks: dict, served: Served) -> dict:
    """What an origin does (PyJWKClient-style): the key by kid from the JWKS, aud, iss, times."""
    kid = jwt.get_unverified_header(token)["kid"]
    signing = jwt.PyJWKSet.from_dict(jwks)[kid]
    app = served.enforcer.snapshot.applications[AUTH_HOST]
    return jwt.decode(  # type: ignore[no-any-return]
        token,
        signing,
        algorithms=[signing.algorithm_name],
        audience=app.aud,
        issuer=served.enforcer.snapshot.issuer,
    )


@pytest.mark.parametrize("algorithm", ["RS256", "ES256", "EdDSA"])
async def test_each_algorithm_mints_tokens_an_origin_verifies(
    serve_config, demo, algorithm: str
) -> None:
    served = await serve_with(serve_config, demo, algorithm, admin=True)
    token = await admitted_token(served)
    assert jwt.get_unverified_header(token)["alg"] == algorithm
    jwks = await published(served)
    (jwk,) = jwks["keys"]
    shape = JWK_SHAPE[algorithm]
    assert jwk["kty"] == shape["kty"] and jwk.get("crv") == shape.get("crv")
    assert shape["fields"] <= set(jwk) and jwk["alg"] == algorithm and jwk["use"] == "sig"
    assert "d" not in jwk  # public material only
    claims = origin_verify(token, jwks, served)
    assert claims["common_name"] == "device-001"
    # The published certificate carries the same public key as the JWK.
    cert = x509.load_pem_x509_certificate(jwks["public_cert"]["cert"].encode())
    assert tokens.algorithm_of(cert.public_key()) == algorithm  # type: ignore[arg-type]
    # The token admits again (cookie alone: the demo's auth application opts out of binding).
    again = await get(
        served.port, AUTH_HOST, ctx(served), headers=[("cookie", f"CF_Authorization={token}")]
    )
    assert again.status == 200 and served.last()["admitted_by"] == "token"
    keys = await ok(served, "GET", f"{ACC}/keys")
    assert keys["algorithm"] == algorithm
    assert [k["algorithm"] for k in keys["keys"]] == [algorithm]


async def test_rotation_from_rs256_to_es256_keeps_rs256_tokens_through_the_grace_period(
    serve_config, demo
) -> None:
    served = await serve_with(serve_config, demo, "RS256", admin=True)
    old = await admitted_token(served)
    assert jwt.get_unverified_header(old)["alg"] == "RS256"
    # The setting takes effect at this rotation; tokens minted before stay valid.
    rotated = await ok(served, "POST", f"{ACC}/keys/rotate", {"algorithm": "ES256"})
    assert rotated["algorithm"] == "ES256"
    jwks = await published(served)
    assert sorted(k["kty"] for k in jwks["keys"]) == ["EC", "RSA"]
    assert {c["kid"] for c in jwks["public_certs"]} == {k["kid"] for k in jwks["keys"]}
    assert jwks["public_cert"]["kid"] == rotated["kid"]
    new = await admitted_token(served)
    assert jwt.get_unverified_header(new) == {"alg": "ES256", "typ": "JWT", "kid": rotated["kid"]}
    assert origin_verify(new, jwks, served)["common_name"] == "device-001"
    assert origin_verify(old, jwks, served)["common_name"] == "device-001"
    cookie = [("cookie", f"CF_Authorization={old}")]
    assert (await get(served.port, AUTH_HOST, ctx(served), headers=cookie)).status == 200
    # A rotation without a body keeps the current algorithm (RS256 users see no change).
    again = await ok(served, "POST", f"{ACC}/keys/rotate")
    assert again["algorithm"] == "ES256"
    # Past the grace period the RS256 key is gone from the JWKS and its tokens are refused.
    served.clock.advance(dt.timedelta(hours=24, seconds=1))
    jwks = await published(served)
    assert {k["kty"] for k in jwks["keys"]} == {"EC"}
    alone = await get(served.port, AUTH_HOST, ctx(served), headers=cookie)
    assert alone.status == 403 and served.last()["notes"] == ["token_invalid"]
    # An unknown algorithm or field is a 400 naming it.
    bad_alg = await refused(served, "POST", f"{ACC}/keys/rotate", {"algorithm": "HS256"})
    assert bad_alg.startswith("algorithm: 'HS256' is not one of")
    bad_field = await refused(served, "POST", f"{ACC}/keys/rotate", {"alg": "ES256"})
    assert bad_field.startswith("alg: unknown field")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signed(key: SigningKey, header_alg: str, claims: dict) -> str:
    """A token signed with the key's own algorithm whose header claims ``header_alg``."""
    header = {"alg": header_alg, "typ": "JWT", "kid": key.kid}
    head = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signer = jwt.get_algorithm_by_name(key.algorithm)
    prepared = signer.prepare_key(key.private_key)  # type: ignore[arg-type]
    return f"{head}.{_b64(signer.sign(head.encode(), prepared))}"


async def test_a_header_claiming_another_algorithm_than_the_keys_is_refused(
    serve_config, demo
) -> None:
    served = await serve_with(serve_config, demo, "EdDSA")
    claims = jwt.decode(await admitted_token(served), options={"verify_signature": False})
    key = served.enforcer.snapshot.keyring.current
    for claimed, status in (("EdDSA", 200), ("ES256", 403), ("RS256", 403), ("none", 403)):
        token = _signed(key, claimed, claims)
        cookie = [("cookie", f"CF_Authorization={token}")]
        response = await get(served.port, AUTH_HOST, ctx(served), headers=cookie)
        assert response.status == status, claimed
        if status == 403:
            assert served.last()["notes"] == ["token_invalid"]
            assert "algorithm" in served.last()["detail"]


NOW = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


@pytest.mark.parametrize("algorithm", ["RS256", "ES256", "EdDSA"])
def test_check_uses_the_algorithm_of_the_key_the_kid_names(algorithm: str) -> None:
    ring = KeyRing(SigningKey.from_private_key(generate_key(algorithm), NOW))
    claims = tokens.access_claims(
        aud="a",
        issuer="i",
        now=NOW,
        lifetime=dt.timedelta(hours=1),
        common_name="d",
        x5t_s256=None,
        serial=None,
    )
    assert tokens.check(tokens.mint(ring, claims), ring, aud="a", issuer="i", now=NOW).status == (
        TokenStatus.VALID
    )
    for other in tokens.ALGORITHMS:
        if other != algorithm:
            forged = _signed(ring.current, other, claims)
            outcome = tokens.check(forged, ring, aud="a", issuer="i", now=NOW)
            assert outcome.status == TokenStatus.INVALID and "algorithm" in outcome.detail


@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA"])
async def test_the_login_cookie_works_with_every_key_type(serve_config, demo, algorithm) -> None:
    served = await serve_with(serve_config, demo, algorithm)
    snapshot = served.enforcer.snapshot
    app = snapshot.applications[AUTH_HOST]
    now = served.clock.now()
    login = LoginCookie(
        "s", "n", None, "idp", "/", f"https://{AUTH_HOST}/cb", int(now.timestamp()) + 60
    )
    assert read_login_cookie(mint_login_cookie(snapshot, app, login), snapshot, app, now) == login
    # The mac_key is secret: the public JWK or PEM of the key cannot make a login cookie.
    pem = snapshot.keyring.current.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claims = jwt.decode(
        mint_login_cookie(snapshot, app, login), options={"verify_signature": False}
    )
    kid = snapshot.keyring.current.kid
    jwk = json.dumps(dict(snapshot.keyring.current.public_jwk)).encode()
    # Control: the same hand-made HS256 under the real mac_key is accepted.
    assert read_login_cookie(
        _hs256(claims, snapshot.keyring.current.mac_key, kid), snapshot, app, now
    )
    for secret in (pem, jwk):
        with pytest.raises(LoginFailed):
            read_login_cookie(_hs256(claims, secret, kid), snapshot, app, now)


def _hs256(claims: dict, secret: bytes, kid: str) -> str:
    """An HS256 token made by hand (pyjwt refuses PEM secrets, an attacker would not)."""
    header = {"alg": "HS256", "typ": "JWT", "kid": kid}
    head = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{head}.{_b64(hmac.new(secret, head.encode(), hashlib.sha256).digest())}"


def test_config_algorithm_errors_name_the_field(demo, tmp_path: Path) -> None:
    text = demo.config.read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("[signing]\n", '[signing]\nalgorithm = "HS256"\n', 1))
    with pytest.raises(ConfigError, match=r"signing\.algorithm: 'HS256' is not one of"):
        load_config(bad)
    # A key file of another type than the algorithm names the key file and both algorithms.
    key_file = tmp_path / "ec.pem"
    key_file.write_bytes(
        generate_key("ES256").private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    cfg = dataclasses.replace(load_config(demo.config), signing_key_file=key_file)
    with pytest.raises(
        ConfigError, match=r"signing\.key_file: .*signs ES256, not the configured RS256"
    ):
        cfg.signing_key(NOW)
    assert dataclasses.replace(cfg, signing_algorithm="ES256").signing_key(NOW).algorithm == "ES256"
