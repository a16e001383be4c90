"""The relying party's caches and bounds (enforcer/oidc.py, access-flow I1), over real https.

A small https server stands in for a provider's JWKS endpoint so that the test can count the
enforcer's fetches and change the published keys; the cache's clock is stepped by hand (the
``monotonic`` the OidcClient is given), never slept on.
"""

from __future__ import annotations

import json
from typing import Any

import jwt
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import rsa

from enforcer.identity import IdentityProvider
from enforcer.oidc import (
    MAX_RESPONSE_BYTES,
    RETRY_AFTER_FAILURE,
    IdTokenRejected,
    OidcClient,
    ProviderMetadata,
    ProviderUnreachable,
)
from enforcer.proxy import OriginPool
from tests.https_stub import JsonStub
from tests.oidc_idp import OidcIdp, oidc_idp  # noqa: F401


def jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return {**out, "kid": kid, "alg": "RS256", "use": "sig"}


class KeysServer(JsonStub):
    """An https server publishing ``keys`` at /jwks (counted) and an oversized document at /big."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        self.requests = 0  # of any kind

    def answer(self, target: bytes, body: bytes) -> bytes:
        """The keys at /jwks (counted), a document over the size limit anywhere else."""
        self.requests += 1
        if target == b"/jwks":
            self.fetches += 1
            return json.dumps({"keys": self.keys}).encode()
        return b'{"keys": [' + b" " * (MAX_RESPONSE_BYTES + 1) + b"]}"


@pytest.fixture
async def keys_server(
    oidc_idp: OidcIdp,  # noqa: F811
    nursery: trio.Nursery,
) -> tuple[KeysServer, str]:
    server = KeysServer()
    port = await nursery.start(server.serve, oidc_idp.server_context())
    return server, f"https://127.0.0.1:{port}"


def provider(base: str, ca_pem: str, certs: str = "/jwks") -> IdentityProvider:
    # Every endpoint explicit: no discovery, only the JWKS is fetched.
    return IdentityProvider(
        id="p",
        name="p",
        issuer_url=base,
        client_id="c",
        client_secret="s",
        auth_url=f"{base}/auth",
        token_url=f"{base}/token",
        certs_url=f"{base}{certs}",
        ca_pem=ca_pem,
    )


async def test_the_jwks_is_cached_and_an_unknown_kid_refetches_at_most_once_a_minute(
    keys_server: tuple[KeysServer, str],
    oidc_idp: OidcIdp,  # noqa: F811
) -> None:
    server, base = keys_server
    k1, k2 = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
    server.keys = [jwk(k1, "k1")]
    clock = [1000.0]
    p = provider(base, oidc_idp.ca_pem)
    async with OriginPool().running() as pool:
        client = OidcClient(pool, monotonic=lambda: clock[0])
        assert (await client.signing_key(p, "k1"))["kid"] == "k1"
        assert (await client.signing_key(p, "k1"))["kid"] == "k1"
        assert server.fetches == 1  # cached
        # A kid it does not hold: fetched again once (the provider may have rotated)...
        with pytest.raises(IdTokenRejected, match="no key 'k2'"):
            await client.signing_key(p, "k2")
        assert server.fetches == 2
        # ...and not again within the minute, however many forged kids arrive.
        for forged in ("k2", "k3", "k4"):
            with pytest.raises(IdTokenRejected):
                await client.signing_key(p, forged)
        assert server.fetches == 2
        # The provider rotates; a minute later its new key is found.
        server.keys = [jwk(k1, "k1"), jwk(k2, "k2")]
        clock[0] += 61
        assert (await client.signing_key(p, "k2"))["kid"] == "k2"
        assert server.fetches == 3
        # After the cache lifetime a known kid refetches too.
        clock[0] += 3601
        await client.signing_key(p, "k1")
        assert server.fetches == 4


async def test_a_failing_provider_is_asked_once_per_retry_interval(
    keys_server: tuple[KeysServer, str],
    oidc_idp: OidcIdp,  # noqa: F811
) -> None:
    # Anyone can start a login: twenty at once while the provider answers nothing usable cost
    # one request to it, and the next ones fail at once until RETRY_AFTER_FAILURE has passed.
    server, base = keys_server
    broken = IdentityProvider(
        id="p", name="p", issuer_url=base, client_id="c", client_secret="s", ca_pem=oidc_idp.ca_pem
    )  # no explicit endpoints: discovery, which this server answers with an oversized document
    clock = [1000.0]
    async with OriginPool().running() as pool:
        client = OidcClient(pool, monotonic=lambda: clock[0])
        failures: list[str] = []

        async def start_login() -> None:
            try:
                await client.metadata(broken)
            except ProviderUnreachable as exc:
                failures.append(exc.check)

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(start_login)
        await start_login()
        assert failures == ["discovery"] * 21
        assert server.requests == 1
        clock[0] += RETRY_AFTER_FAILURE + 1
        await start_login()
        assert server.requests == 2


async def test_an_oversized_provider_answer_is_refused(
    keys_server: tuple[KeysServer, str],
    oidc_idp: OidcIdp,  # noqa: F811
) -> None:
    _, base = keys_server
    async with OriginPool().running() as pool:
        client = OidcClient(pool)
        with pytest.raises(ProviderUnreachable, match=f"over {MAX_RESPONSE_BYTES} bytes"):
            await client.signing_key(provider(base, oidc_idp.ca_pem, "/big"), "k1")


async def test_a_provider_behind_an_unknown_ca_is_unreachable(
    keys_server: tuple[KeysServer, str],
) -> None:
    _, base = keys_server
    async with OriginPool().running() as pool:
        client = OidcClient(pool)
        with pytest.raises(ProviderUnreachable, match="jwks"):
            await client.signing_key(provider(base, ca_pem=None), "k1")  # type: ignore[arg-type]


async def test_discovery_of_the_real_provider(oidc_idp: OidcIdp) -> None:  # noqa: F811
    p = IdentityProvider(
        id="p",
        name="p",
        issuer_url=oidc_idp.issuer,
        client_id="c",
        client_secret="s",
        ca_pem=oidc_idp.ca_pem,
    )
    async with OriginPool().running() as pool:
        meta = await OidcClient(pool).metadata(p)
        assert meta.authorization_endpoint.startswith(oidc_idp.issuer)
        assert meta.token_auth_method == "client_secret_basic"
        key = await OidcClient(pool).signing_key(p, oidc_idp.kid)
        assert key["kid"] == oidc_idp.kid and "d" not in key  # the public half only
        # An issuer that is not the document's own is refused (Discovery 4.3).
        wrong = IdentityProvider(
            id="p",
            name="p",
            issuer_url=oidc_idp.issuer + "/other",
            client_id="c",
            client_secret="s",
            ca_pem=oidc_idp.ca_pem,
        )
        with pytest.raises(ProviderUnreachable):
            await OidcClient(pool).metadata(wrong)


def test_client_secret_post_only_when_basic_is_not_offered() -> None:
    meta = ProviderMetadata("i", "a", "t", "j", ("client_secret_post",))
    assert meta.token_auth_method == "client_secret_post"
    both = ProviderMetadata("i", "a", "t", "j", ("client_secret_post", "client_secret_basic"))
    assert both.token_auth_method == "client_secret_basic"
