"""Durations, policies, tokens and the decision, as pure functions."""

from __future__ import annotations

import datetime as dt
import ipaddress

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given
from hypothesis import strategies as st

from enforcer.chain import CertificateFacts
from enforcer.durations import DurationError, format_duration, parse_duration
from enforcer.policy import Decision, PolicyError, RequestFacts, first_match, parse_policy
from enforcer.tokens import KeyRing, SigningKey, TokenStatus, access_claims, check, mint

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0s", 0),
        ("0", 0),
        ("15m", 900),
        ("24h", 86400),
        ("1h30m", 5400),
        ("720h", 2592000),
        ("1.5h", 5400),
        ("300ms", 0.3),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "1d", "h", "-5m", "5 m", "24"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(DurationError):
        parse_duration(text)


@given(st.integers(min_value=0, max_value=10**7))
def test_duration_round_trip(seconds: int) -> None:
    delta = dt.timedelta(seconds=seconds)
    assert parse_duration(format_duration(delta)) == delta


def facts(
    cn: str = "device-001", dns: tuple[str, ...] = (), uris: tuple[str, ...] = ()
) -> CertificateFacts:
    return CertificateFacts(
        sha256="ab" * 32,
        common_name=cn,
        serial="1f",
        issuer_sha256="cd" * 32,
        root_sha256="ef" * 32,
        san_dns=dns,
        san_uris=uris,
        not_before=NOW,
        not_after=NOW,
        chain_valid_from=NOW,
        chain_valid_until=NOW,
    )


def policy(**raw: object):
    return parse_policy({"name": "p", **raw}, "applications[0].policies[0]")


def test_rules() -> None:
    f = RequestFacts(
        facts(dns=("a.devices.test",), uris=("spiffe://fleet/device/7",)),
        ipaddress.ip_address("10.1.2.3"),
    )
    holds = [
        {"certificate": {}},
        {"common_name": {"common_name": "device-001"}},
        {"certificate_fingerprint": {"sha256": "AB:" * 31 + "AB"}},
        {"serial": {"serial": "0x1F"}},
        {"issuer_fingerprint": {"sha256": "cd" * 32}},
        {"san_dns": {"pattern": "*.devices.test"}},
        {"san_uri": {"pattern": "spiffe://fleet/*"}},
        {"ip": {"ip": "10.0.0.0/8"}},
        {"everyone": {}},
    ]
    for rule in holds:
        assert policy(include=[rule]).matches(f), rule
    fails = [
        {"common_name": {"common_name": "device-00"}},
        {"san_dns": {"pattern": "*.other.test"}},
        {"ip": {"ip": "192.168.0.0/16"}},
    ]
    for rule in fails:
        assert not policy(include=[rule]).matches(f), rule
    assert not policy(include=[{"certificate": {}}]).matches(RequestFacts(None))


def test_include_require_exclude_and_order() -> None:
    f = RequestFacts(facts())
    deny_999 = policy(decision="deny", include=[{"common_name": {"common_name": "device-999"}}])
    allow_all = policy(
        include=[{"certificate": {}}], exclude=[{"common_name": {"common_name": "device-001"}}]
    )
    allow_req = policy(
        include=[{"everyone": {}}],
        require=[{"certificate": {}}, {"common_name": {"common_name": "device-001"}}],
    )
    assert first_match([deny_999, allow_all, allow_req], f) is allow_req
    assert first_match([allow_all], f) is None
    assert policy(decision="bypass", include=[{"everyone": {}}]).decision is Decision.BYPASS


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"include": []}, "include: at least one rule"),
        ({"include": [{"common_name": {}}]}, 'common_name: expected { common_name = "..." }'),
        ({"include": [{"a": {}, "b": {}}]}, "exactly one key"),
        ({"include": [{"ip": {"ip": "10.0.0.0/33"}}]}, "ip.ip"),
        ({"include": [{"everyone": {}}], "session_duration": "soon"}, "session_duration"),
        ({"include": [{"everyone": {}}], "colour": "red"}, "unknown field"),
    ],
)
def test_policy_errors_name_the_field(raw: dict, message: str) -> None:
    with pytest.raises(PolicyError, match=r"applications\[0\]\.policies\[0\]") as info:
        policy(**raw)
    assert message in str(info.value)


@pytest.fixture(scope="module")
def ring() -> KeyRing:
    return KeyRing(
        SigningKey.from_private_key(
            rsa.generate_private_key(public_exponent=65537, key_size=2048), NOW
        )
    )


def claims(lifetime: dt.timedelta = dt.timedelta(hours=1)) -> dict:
    return access_claims(
        aud="a" * 64,
        issuer="https://iss",
        now=NOW,
        lifetime=lifetime,
        common_name="device-001",
        x5t_s256="x",
        serial="1",
    )


def test_token_expiry_boundary(ring: KeyRing) -> None:
    token = mint(ring, claims())
    assert (
        check(token, ring, aud="a" * 64, issuer="https://iss", now=NOW).status is TokenStatus.VALID
    )
    last = NOW + dt.timedelta(hours=1) - dt.timedelta(seconds=1)
    assert (
        check(token, ring, aud="a" * 64, issuer="https://iss", now=last).status is TokenStatus.VALID
    )
    at_exp = NOW + dt.timedelta(hours=1)
    assert (
        check(token, ring, aud="a" * 64, issuer="https://iss", now=at_exp).status
        is TokenStatus.EXPIRED
    )


def test_rotation_keeps_the_previous_key_for_the_grace_period(ring: KeyRing) -> None:
    old_token = mint(ring, claims(dt.timedelta(days=3)))
    new_key = SigningKey.from_private_key(
        rsa.generate_private_key(public_exponent=65537, key_size=2048), NOW
    )
    rotated = ring.rotated(new_key, NOW)
    kids = [k["kid"] for k in rotated.jwks(NOW)["keys"]]
    assert kids == [new_key.kid, ring.current.kid]
    assert (
        check(old_token, rotated, aud="a" * 64, issuer="https://iss", now=NOW).status
        is TokenStatus.VALID
    )
    after = NOW + rotated.grace_period + dt.timedelta(seconds=1)
    assert (
        check(old_token, rotated, aud="a" * 64, issuer="https://iss", now=after).status
        is TokenStatus.INVALID
    )
    assert [k["kid"] for k in rotated.jwks(after)["keys"]] == [new_key.kid]


def test_no_duration_application_wins_over_a_policy_duration(ring: KeyRing) -> None:
    from enforcer.application import Application
    from enforcer.chain import ChainResult
    from enforcer.decision import AccessRequest, decide
    from enforcer.snapshot import Snapshot

    long_policy = policy(include=[{"certificate": {}}], session_duration="24h")
    app = Application(
        "iot", "iot.test", "a" * 64, dt.timedelta(0), (long_policy,), "http://127.0.0.1:9"
    )
    snapshot = Snapshot.build(
        generation=1, applications=[app], roots=[], keyring=ring, issuer="https://iss"
    )
    decision = decide(
        AccessRequest("iot.test", "iot.test"), snapshot, ChainResult(facts(), None), NOW
    )
    assert decision.allowed and decision.set_cookie is None and decision.close_connection
    assert decision.claims is not None and decision.claims["exp"] - decision.claims["iat"] <= 5
