"""The validation cache and the token memo never admit what a full check would refuse.

Each test first makes the cache hold a success (and asserts that a later request was answered
from it, so the test cannot pass by missing the cache), then changes one thing the cache key
does not see: the clock, a revocation, the hostname's roots, the signing keys. A naive cache
(keyed by the chain alone, or bounded only by the leaf's notAfter, or without the revocation
or key-ring checks on a hit) admits the request and fails the test. Every request is a new
connection, so the per-connection memo is not what refuses it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from devices.pki import issue_ca, issue_leaf, write_pem
from devices.provision import csr_for
from enforcer import control
from enforcer.chain import HostTrust, ValidationCache, validate_chain
from enforcer.config import load_config
from enforcer.lru import BoundedLRU
from enforcer.snapshot import RootCertificate
from enforcer.tokens import KeyRing, SigningKey, TokenMemo, TokenStatus, access_claims, check, mint
from testbed.demo import AUTH_HOST, IOT_HOST
from tests.conftest import Served
from tests.wire import client_context, get

DAY = dt.timedelta(days=1)
SECOND = dt.timedelta(seconds=1)


def device_ctx(served: Served, device: str = "valid") -> ssl.SSLContext:
    cert, key = served.layout.device(device)
    return client_context(served.layout.edge_ca, cert, key)


def leaf_of(served: Served, device: str = "valid") -> x509.Certificate:
    return x509.load_pem_x509_certificates(served.layout.device(device)[0].read_bytes())[0]


async def cached_success(served: Served, ctx: ssl.SSLContext, host: str = AUTH_HOST) -> None:
    """Two requests on two connections: the second must be answered by the cache."""
    before = served.enforcer.validations.hits
    for _ in range(2):
        assert (await get(served.port, host, ctx)).status == 200
    assert served.enforcer.validations.hits > before, "the cache was not used"


async def test_a_cached_success_is_reused_by_a_returning_device(served: Served) -> None:
    ctx = device_ctx(served)
    await cached_success(served, ctx)
    assert len(served.enforcer.validations) == 1


async def test_never_past_the_leaf_not_after(served: Served) -> None:
    ctx = device_ctx(served)
    await cached_success(served, ctx)
    served.clock.set(leaf_of(served).not_valid_after_utc)  # the last valid second: still a hit
    assert (await get(served.port, AUTH_HOST, ctx)).status == 200
    served.clock.advance(SECOND)
    response = await get(served.port, AUTH_HOST, ctx)
    assert (response.status, response.reason) == (403, "certificate_expired")


async def test_never_before_the_leaf_not_before(served: Served) -> None:
    ctx = device_ctx(served)
    await cached_success(served, ctx)
    served.clock.set(leaf_of(served).not_valid_before_utc - SECOND)
    response = await get(served.port, AUTH_HOST, ctx)
    assert (response.status, response.reason) == (403, "certificate_not_yet_valid")


async def test_never_past_an_intermediate_that_expires_before_the_leaf(
    serve_config: Callable[..., Any], demo: Any, tmp_path: Path
) -> None:
    now = dt.datetime.now(dt.UTC)
    root = issue_ca("short-lived chain root", now)
    inter = issue_ca("short-lived intermediate", now, issuer=root, days=10, path_length=0)
    leaf = issue_leaf("device-short", inter, not_before=now - DAY, not_after=now + 365 * DAY)
    write_pem(tmp_path / "cert.pem", leaf.cert_pem(), inter.cert_pem())
    write_pem(tmp_path / "key.pem", leaf.key_pem(), private=True)
    cfg = load_config(demo.config)
    extra = RootCertificate("short", "short-lived chain", root.certificate, (), (AUTH_HOST,))
    served: Served = await serve_config(dataclasses.replace(cfg, roots=(*cfg.roots, extra)))
    ctx = client_context(served.layout.edge_ca, tmp_path / "cert.pem", tmp_path / "key.pem")
    await cached_success(served, ctx)
    served.clock.set(inter.certificate.not_valid_after_utc + SECOND)  # the leaf is still valid
    response = await get(served.port, AUTH_HOST, ctx)
    assert (response.status, response.reason) == (403, "certificate_expired")


async def test_never_after_a_revocation_through_the_controller(
    serve_config: Callable[..., Any], tmp_path: Path
) -> None:
    served: Served = await serve_config()
    key = issue_ca("throwaway", dt.datetime.now(dt.UTC)).key  # any EC P-256 key
    csr = csr_for(key, "device-001").public_bytes(serialization.Encoding.PEM).decode()
    issued = await served.controller.write(
        lambda objects, now: control.create_client_cert(
            objects, "demo", {"csr": csr, "validity_days": 30}, now
        )
    )
    oid, pem = issued.result["id"], issued.result["certificate"]
    write_pem(tmp_path / "cert.pem", pem.encode())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_pem(tmp_path / "key.pem", key_pem, private=True)
    ctx = client_context(served.layout.edge_ca, tmp_path / "cert.pem", tmp_path / "key.pem")
    await cached_success(served, ctx)
    await served.controller.write(
        lambda objects, now: control.revoke_client_cert(objects, "demo", oid, now)
    )
    response = await get(served.port, AUTH_HOST, ctx)
    assert (response.status, response.reason) == (403, "revoked")


async def test_never_for_a_hostname_whose_roots_do_not_include_it(
    serve_config: Callable[..., Any], demo: Any
) -> None:
    cfg = load_config(demo.config)
    roots = tuple(dataclasses.replace(r, associated_hostnames=(AUTH_HOST,)) for r in cfg.roots)
    served: Served = await serve_config(dataclasses.replace(cfg, roots=roots))
    ctx = device_ctx(served)
    await cached_success(served, ctx, AUTH_HOST)
    # iot's policy admits this very certificate (CN device-001) if the chain were trusted there.
    response = await get(served.port, IOT_HOST, ctx)
    assert (response.status, response.reason) == (403, "untrusted_issuer")


async def test_never_after_the_root_is_dissociated_from_the_hostname(served: Served) -> None:
    ctx = device_ctx(served)
    await cached_success(served, ctx, IOT_HOST)
    (root_id,) = served.controller.objects["root"]
    await served.controller.write(
        lambda objects, now: control.update_root(
            objects, "demo", root_id, {"associated_hostnames": [AUTH_HOST]}, now
        )
    )
    response = await get(served.port, IOT_HOST, ctx)
    assert (response.status, response.reason) == (403, "untrusted_issuer")
    assert (await get(served.port, AUTH_HOST, ctx)).status == 200


# ---- the token memo --------------------------------------------------------------------------


def no_cert_ctx(served: Served) -> ssl.SSLContext:
    return client_context(served.layout.edge_ca)


async def memoised_cookie(served: Served) -> str:
    """Get a cookie with a certificate, then use it twice without: the second is a memo hit."""
    response = await get(served.port, AUTH_HOST, device_ctx(served))
    cookie = (response.header("set-cookie") or "").split(";", 1)[0]
    assert cookie.startswith("CF_Authorization=")
    before = served.enforcer.token_memo.hits
    for _ in range(2):
        response = await get(
            served.port, AUTH_HOST, no_cert_ctx(served), headers=[("cookie", cookie)]
        )
        assert response.status == 200
        assert served.last()["admitted_by"] == "token"
    assert served.enforcer.token_memo.hits > before, "the token memo was not used"
    return cookie


async def test_the_token_memo_never_admits_an_expired_token(served: Served) -> None:
    cookie = await memoised_cookie(served)
    served.clock.advance(dt.timedelta(hours=24))  # the demo's auth session is 24 h: exp reached
    response = await get(served.port, AUTH_HOST, no_cert_ctx(served), headers=[("cookie", cookie)])
    assert (response.status, response.reason) == (403, "no_certificate")
    assert served.last()["notes"] == ["token_expired"]


async def test_the_token_memo_never_admits_before_nbf(served: Served) -> None:
    cookie = await memoised_cookie(served)
    served.clock.advance(-dt.timedelta(minutes=5))
    response = await get(served.port, AUTH_HOST, no_cert_ctx(served), headers=[("cookie", cookie)])
    assert (response.status, response.reason) == (403, "no_certificate")
    assert served.last()["notes"] == ["token_invalid"]


async def test_the_token_memo_never_admits_a_token_of_a_removed_key(
    serve_config: Callable[..., Any], demo: Any
) -> None:
    cfg = load_config(demo.config)
    # A grace period shorter than the token's life: only the key ring can refuse it.
    served: Served = await serve_config(
        dataclasses.replace(cfg, grace_period=dt.timedelta(hours=1))
    )
    cookie = await memoised_cookie(served)
    await served.controller.write(
        lambda objects, now: control.rotate_keys(objects, served.controller.limits, now)
    )
    headers = [("cookie", cookie)]
    assert (await get(served.port, AUTH_HOST, no_cert_ctx(served), headers=headers)).status == 200
    served.clock.advance(dt.timedelta(hours=1) + SECOND)
    response = await get(served.port, AUTH_HOST, no_cert_ctx(served), headers=headers)
    assert (response.status, response.reason) == (403, "no_certificate")
    assert served.last()["notes"] == ["token_invalid"]


async def test_the_token_memo_never_admits_a_token_for_another_application(
    serve_config: Callable[..., Any], demo: Any
) -> None:
    cfg = load_config(demo.config)
    # iot with a session too, so that only the audience tells the two applications' tokens apart.
    apps = tuple(
        dataclasses.replace(a, session_duration=DAY, policies=cfg.applications[0].policies)
        for a in cfg.applications
    )
    served: Served = await serve_config(dataclasses.replace(cfg, applications=apps))
    cookie = await memoised_cookie(served)  # minted for auth, and memoised there
    headers = [("cookie", cookie)]
    response = await get(served.port, IOT_HOST, no_cert_ctx(served), headers=headers)
    assert (response.status, response.reason) == (403, "no_certificate")
    assert served.last()["notes"] == ["token_invalid"]


# ---- the pure pieces -------------------------------------------------------------------------


def test_the_lru_is_bounded_and_forgets_the_least_recently_used() -> None:
    lru: BoundedLRU[str, int] = BoundedLRU(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1  # "b" is now the least recently used
    lru.put("c", 3)
    assert (lru.get("b"), lru.get("a"), lru.get("c"), len(lru)) == (None, 1, 3, 2)


def test_only_successes_are_cached_and_a_failure_is_never_returned(demo: Any) -> None:
    cfg = load_config(demo.config)
    trust = HostTrust.build([cfg.roots[0].root], cfg.roots[0].intermediates)
    cache = ValidationCache()
    now = dt.datetime.now(dt.UTC)
    for device, valid in (("valid", True), ("expired", False), ("foreign-ca", False)):
        chain = x509.load_pem_x509_certificates(demo.device(device)[0].read_bytes())
        result = validate_chain(chain[0], chain[1:], trust, (), frozenset(), now)
        assert result.valid is valid
        key = cache.key(trust, chain)
        cache.store(key, result)
        assert (cache.lookup(key, frozenset(), now) is not None) is valid
    assert len(cache) == 1


def test_the_token_memo_keeps_only_tokens_whose_signature_verified() -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    now = dt.datetime.now(dt.UTC)
    ring = KeyRing(SigningKey.from_private_key(rsa.generate_private_key(65537, 2048), now))
    claims = access_claims(aud="a" * 64, issuer="https://iss", now=now, lifetime=DAY,
                           common_name="d", x5t_s256=None, serial=None)  # fmt: skip
    token = mint(ring, claims)
    head, payload, signature = token.split(".")
    tampered = f"{head}.{payload}.{signature[:-4]}AAAA"
    memo = TokenMemo()
    for t in (tampered, tampered):
        assert check(t, ring, aud="a" * 64, issuer="https://iss", now=now, memo=memo).status is (
            TokenStatus.INVALID
        )
    assert len(memo) == 0
    for _ in range(2):
        result = check(token, ring, aud="a" * 64, issuer="https://iss", now=now, memo=memo)
        assert result.status is TokenStatus.VALID
    assert (len(memo), memo.hits) == (1, 1)
