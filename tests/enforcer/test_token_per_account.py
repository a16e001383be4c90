"""Token algorithm per account (access-flow J7, A11, J1), over real TLS to a served enforcer.

Two accounts: ``demo`` (the auth application, the enforcer's default RS256) and ``other`` (an
application moved onto the iot hostname). Each application's token is verified as an origin
would: pyjwt with the key its ``kid`` names in the JWKS fetched from ``/cdn-cgi/access/certs``.
Changing an account's algorithm keeps its earlier tokens valid until the old key's grace period
ends; rotation works per algorithm; bad bodies and config tables are refused naming the field.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import subprocess
import sys
from pathlib import Path

import jwt
import pytest

from enforcer import tokens
from enforcer.config import ConfigError, load_config
from enforcer.tokens import KeyRing, SigningKey, TokenStatus, generate_key
from testbed.demo import AUTH_HOST, IOT_HOST
from tests.conftest import Served
from tests.enforcer.test_admin_api import ok, refused
from tests.enforcer.test_sessions import serve_again
from tests.wire import client_context, get

DEMO = "/client/v4/accounts/demo/access"
OTHER = "/client/v4/accounts/other/access"
KTY = {"RS256": ("RSA", None), "ES256": ("EC", "P-256"), "EdDSA": ("OKP", "Ed25519")}


def ctx(served: Served, device: str | None = None):
    if device is None:
        return client_context(served.layout.edge_ca)
    return client_context(served.layout.edge_ca, *served.layout.device(device))


async def two_accounts(serve_config) -> Served:
    """The demo served with the iot hostname's application in account ``other``."""
    served = await serve_config(admin=True)
    apps = await ok(served, "GET", f"{DEMO}/apps")
    iot = next(a for a in apps if a["hostname"] == IOT_HOST)
    auth = next(a for a in apps if a["hostname"] == AUTH_HOST)
    await ok(served, "PUT", f"{DEMO}/apps/{auth['id']}", {"session_duration": "720h"})
    await ok(served, "DELETE", f"{DEMO}/apps/{iot['id']}")
    await ok(
        served,
        "POST",
        f"{OTHER}/apps",
        {
            "name": "other's iot",
            "domain": IOT_HOST,
            "origin": iot["origin"],
            "session_duration": "720h",  # outlives the grace period: the key decides, not exp
            "policies": [{"name": "valid", "include": [{"certificate": {}}]}],
        },
        status=201,
    )
    return served


async def token_of(served: Served, host: str) -> str:
    """A token minted for the valid device on ``host`` (its CF_Authorization cookie)."""
    response = await get(served.port, host, ctx(served, "valid"))
    assert response.status == 200, response.body
    cookie = response.header("set-cookie")
    assert cookie is not None and cookie.startswith("CF_Authorization=")
    return cookie.split(";", 1)[0].split("=", 1)[1]


async def jwks(served: Served, host: str = AUTH_HOST) -> dict:
    response = await get(served.port, host, ctx(served), "/cdn-cgi/access/certs")
    assert response.status == 200
    return response.json()  # type: ignore[no-any-return]


def origin_verify(token: str, document: dict, served: Served, host: str) -> dict:
    """What an origin does: the JWK the kid names, its own algorithm, aud, iss and times."""
    kid = jwt.get_unverified_header(token)["kid"]
    key = jwt.PyJWKSet.from_dict(document)[kid]
    app = served.enforcer.snapshot.applications[host]
    return jwt.decode(  # type: ignore[no-any-return]
        token,
        key,
        algorithms=[key.algorithm_name],
        audience=app.aud,
        issuer=served.enforcer.snapshot.issuer,
        options={"verify_iat": False, "verify_nbf": False, "verify_exp": False},
    )


async def admits(served: Served, host: str, token: str) -> bool:
    """Whether ``token`` admits on ``host`` (beside the certificate it was minted for)."""
    cookie = [("cookie", f"CF_Authorization={token}")]
    response = await get(served.port, host, ctx(served, "valid"), headers=cookie)
    if served.last().get("admitted_by") == "token":
        return True
    assert response.status == 200 and served.last()["notes"] == ["token_invalid"]
    return False


def shape(document: dict) -> list[tuple[str, str | None]]:
    return sorted((k["kty"], k.get("crv")) for k in document["keys"])


async def test_two_accounts_sign_with_their_own_algorithms(serve_config) -> None:
    served = await two_accounts(serve_config)
    assert await ok(served, "GET", f"{OTHER}/signing") == {
        "account_id": "other",
        "algorithm": "RS256",
        "setting": None,
        "kid": (await ok(served, "GET", f"{DEMO}/keys"))["current_kid"],
    }
    es = await ok(served, "PUT", f"{OTHER}/signing", {"algorithm": "ES256"})
    assert es["algorithm"] == es["setting"] == "ES256"
    demo_signing = await ok(served, "GET", f"{DEMO}/signing")
    assert demo_signing["algorithm"] == "RS256" and demo_signing["setting"] is None

    auth_token, iot_token = await token_of(served, AUTH_HOST), await token_of(served, IOT_HOST)
    assert jwt.get_unverified_header(auth_token)["alg"] == "RS256"
    assert jwt.get_unverified_header(iot_token) == {"alg": "ES256", "typ": "JWT", "kid": es["kid"]}
    # One JWKS on every hostname with every accepted key; each token verifies as an origin would.
    document = await jwks(served, IOT_HOST)
    assert shape(document) == [("EC", "P-256"), ("RSA", None)]
    ec_jwk = next(k for k in document["keys"] if k["kty"] == "EC")
    assert ec_jwk["kid"] == es["kid"] and ec_jwk["alg"] == "ES256" and {"x", "y"} <= set(ec_jwk)
    assert "d" not in ec_jwk
    assert origin_verify(auth_token, document, served, AUTH_HOST)["common_name"] == "device-001"
    assert origin_verify(iot_token, document, served, IOT_HOST)["common_name"] == "device-001"
    # The origin's check is real: the other application's audience refuses the token.
    with pytest.raises(jwt.InvalidAudienceError):
        origin_verify(iot_token, document, served, AUTH_HOST)
    assert await admits(served, AUTH_HOST, auth_token)
    assert await admits(served, IOT_HOST, iot_token)

    # The account moves to EdDSA: new tokens EdDSA; nobody signs ES256 any more, so its key
    # enters the grace period and the ES256 token keeps admitting until it ends.
    ed = await ok(served, "PUT", f"{OTHER}/signing", {"algorithm": "EdDSA"})
    new_iot = await token_of(served, IOT_HOST)
    assert jwt.get_unverified_header(new_iot)["kid"] == ed["kid"]
    document = await jwks(served)
    assert shape(document) == [("EC", "P-256"), ("OKP", "Ed25519"), ("RSA", None)]
    assert origin_verify(new_iot, document, served, IOT_HOST)["common_name"] == "device-001"
    assert origin_verify(iot_token, document, served, IOT_HOST)["common_name"] == "device-001"
    keys = await ok(served, "GET", f"{DEMO}/keys")
    assert set(keys["current_keys"]) == {"RS256", "EdDSA"}
    assert keys["account_algorithms"] == {"other": "EdDSA"}
    es_key = next(k for k in keys["keys"] if k["algorithm"] == "ES256")
    assert es_key["accepted_until"] is not None
    served.clock.advance(dt.timedelta(hours=23, minutes=59))
    assert await admits(served, IOT_HOST, iot_token)
    served.clock.advance(dt.timedelta(minutes=1, seconds=1))
    assert not await admits(served, IOT_HOST, iot_token)
    assert shape(await jwks(served)) == [("OKP", "Ed25519"), ("RSA", None)]
    assert await admits(served, IOT_HOST, new_iot)
    # Back to the default (null): RS256 signs again, with the key that never stopped.
    back = await ok(served, "PUT", f"{OTHER}/signing", {"algorithm": None})
    assert back["setting"] is None and back["kid"] == keys["current_kid"]
    assert jwt.get_unverified_header(await token_of(served, IOT_HOST))["alg"] == "RS256"


async def test_rotation_and_grace_per_algorithm(serve_config) -> None:
    served = await two_accounts(serve_config)
    await ok(served, "PUT", f"{OTHER}/signing", {"algorithm": "ES256"})
    auth_old, iot_old = await token_of(served, AUTH_HOST), await token_of(served, IOT_HOST)
    before = await ok(served, "GET", f"{DEMO}/keys")

    # Rotating ES256 replaces only the ES256 key; the default stays RS256.
    rotated = await ok(served, "POST", f"{DEMO}/keys/rotate", {"algorithm": "ES256"})
    assert rotated["algorithm"] == "ES256" and rotated["default_algorithm"] == "RS256"
    assert rotated["rotated"] == {"ES256": rotated["kid"]}
    iot_new = await token_of(served, IOT_HOST)
    assert jwt.get_unverified_header(iot_new)["kid"] == rotated["kid"]
    assert (
        jwt.get_unverified_header(await token_of(served, AUTH_HOST))["kid"]
        == (before["current_kid"])
    )
    document = await jwks(served)
    assert shape(document) == [("EC", "P-256"), ("EC", "P-256"), ("RSA", None)]
    for token, host in ((iot_old, IOT_HOST), (iot_new, IOT_HOST), (auth_old, AUTH_HOST)):
        assert origin_verify(token, document, served, host)["common_name"] == "device-001"

    # Twelve hours on, a rotation without a body replaces both current keys.
    served.clock.advance(dt.timedelta(hours=12))
    both = await ok(served, "POST", f"{DEMO}/keys/rotate")
    assert set(both["rotated"]) == {"RS256", "ES256"} and both["algorithm"] == "RS256"
    assert shape(await jwks(served)) == [("EC", "P-256")] * 3 + [("RSA", None)] * 2
    # Each replaced key keeps its own grace period: the first ES256 key's ends first.
    served.clock.advance(dt.timedelta(hours=12, seconds=1))
    assert not await admits(served, IOT_HOST, iot_old)
    assert await admits(served, IOT_HOST, iot_new)
    assert await admits(served, AUTH_HOST, auth_old)
    served.clock.advance(dt.timedelta(hours=12))
    assert not await admits(served, IOT_HOST, iot_new)
    assert not await admits(served, AUTH_HOST, auth_old)
    assert shape(await jwks(served)) == [("EC", "P-256"), ("RSA", None)]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"algorithm": "HS256"}, "algorithm: 'HS256' is not one of ['RS256', 'ES256', 'EdDSA']"),
        ({"algorithm": "none"}, "algorithm: 'none' is not one of"),
        ({"algorithm": 256}, "algorithm: expected one of ['RS256', 'ES256', 'EdDSA'], or null"),
        ({}, "algorithm: required field is missing"),
        ({"algorithm": "ES256", "alg": "x"}, "alg: unknown field; expected one of ['algorithm']"),
        (["ES256"], "the request body must be a JSON object"),
    ],
)
async def test_bad_signing_bodies_are_400_and_change_nothing(
    serve_config, body, message: str
) -> None:
    served = await serve_config(admin=True)
    assert (await refused(served, "PUT", f"{DEMO}/signing", body)).startswith(message)


def _with_accounts(demo, tmp_path: Path, tables: str) -> Path:
    path = demo.root / f"accounts-{tmp_path.name}.toml"  # beside the demo: its paths resolve
    path.write_text(demo.config.read_text() + tables)
    return path


@pytest.mark.parametrize(
    ("tables", "field", "problem"),
    [
        ('[[accounts]]\nid = "demo"\ntoken_algorithm = "PS256"\n', "accounts[0].token_algorithm",
         "'PS256' is not one of"),
        ('[[accounts]]\nid = "demo"\n', "accounts[0].token_algorithm", "required field"),
        ('[[accounts]]\nid = "a b"\ntoken_algorithm = "ES256"\n', "accounts[0].id", "'a b'"),
        ('[[accounts]]\nid = "x"\ntoken_algorithm = "ES256"\n[[accounts]]\nid = "x"\n'
         'token_algorithm = "EdDSA"\n', "accounts[1].id", "'x' is used twice"),
        ('[[accounts]]\nid = "x"\nalgorithm = "ES256"\n', "accounts[0].algorithm",
         "unknown field"),
    ],
)  # fmt: skip
def test_config_account_errors_name_file_and_field(
    demo, tmp_path: Path, tables: str, field: str, problem: str
) -> None:
    path = _with_accounts(demo, tmp_path, tables)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert str(path) in str(raised.value) and field in str(raised.value)
    assert problem in str(raised.value)


def test_serve_exits_2_on_a_bad_account_table(demo, tmp_path: Path) -> None:
    path = _with_accounts(demo, tmp_path, '[[accounts]]\nid = "demo"\ntoken_algorithm = "X"\n')
    result = subprocess.run(
        [sys.executable, "-m", "testbed.cli", "enforcer", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert str(path) in result.stderr and "accounts[0].token_algorithm" in result.stderr


async def test_the_config_seeds_account_algorithms(serve_config, demo, tmp_path: Path) -> None:
    path = _with_accounts(
        demo,
        tmp_path,
        '[[accounts]]\nid = "demo"\ntoken_algorithm = "EdDSA"\n'
        '[[accounts]]\nid = "other"\ntoken_algorithm = "ES256"\n',
    )
    config = dataclasses.replace(load_config(path), signing_key_file=None)
    assert config.account_algorithms == {"demo": "EdDSA", "other": "ES256"}
    served = await serve_config(config, admin=True)
    token = await token_of(served, AUTH_HOST)
    assert jwt.get_unverified_header(token)["alg"] == "EdDSA"
    document = await jwks(served)
    # The default (RS256, [signing] algorithm) and each account's algorithm have a key.
    assert shape(document) == [("EC", "P-256"), ("OKP", "Ed25519"), ("RSA", None)]
    assert origin_verify(token, document, served, AUTH_HOST)["common_name"] == "device-001"
    assert (await ok(served, "GET", f"{DEMO}/mtls"))["enabled"] is True  # merged, not replaced
    signing = await ok(served, "GET", f"{OTHER}/signing")
    assert signing["algorithm"] == signing["setting"] == "ES256"


def test_the_ring_signs_each_account_with_its_algorithms_key() -> None:
    """Pure: the key is an input; an account names an algorithm the ring must hold a key for."""
    now = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    rs, es = (SigningKey.from_private_key(generate_key(a), now) for a in ("RS256", "ES256"))
    ring = KeyRing(rs, others=(es,), account_algorithms={"b": "ES256"})
    claims = tokens.access_claims(
        aud="a", issuer="i", now=now, lifetime=dt.timedelta(hours=1), common_name="d",
        x5t_s256=None, serial=None,
    )  # fmt: skip
    for account, key in (("a", rs), ("b", es), (None, rs)):
        token = tokens.mint(ring, claims, account)
        assert jwt.get_unverified_header(token)["kid"] == key.kid
        assert tokens.check(token, ring, aud="a", issuer="i", now=now).status == TokenStatus.VALID
    assert [k.kid for k in ring.accepted(now)] == [rs.kid, es.kid]
    with pytest.raises(ValueError, match=r"no current signing key for \['EdDSA'\]"):
        KeyRing(rs, others=(es,), account_algorithms={"c": "EdDSA"})


async def test_the_setting_and_its_keys_survive_a_restart(serve_config, nursery) -> None:
    served = await two_accounts(serve_config)
    es = await ok(served, "PUT", f"{OTHER}/signing", {"algorithm": "ES256"})
    before = await token_of(served, IOT_HOST)
    again = await serve_again(nursery, served)
    after = await token_of(again, IOT_HOST)
    assert jwt.get_unverified_header(after)["kid"] == es["kid"]
    assert jwt.get_unverified_header(await token_of(again, AUTH_HOST))["alg"] == "RS256"
    assert await admits(again, IOT_HOST, before)
    assert shape(await jwks(again)) == [("EC", "P-256"), ("RSA", None)]
