"""Identity and service-token rules, three-valued evaluation and decide(), as pure functions.

Access-flow I6-I9, I11: the rule kinds (parse, text and API forms), Kleene evaluation of
include/require/exclude with an unknown identity, "login needed" before a policy that holds,
service tokens (valid, wrong secret, expired, another account's), the identity carried by the
session token (I8) and No Duration with a person (I9).
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given
from hypothesis import strategies as st

from enforcer import service_tokens
from enforcer.application import Application
from enforcer.chain import ChainResult
from enforcer.decision import AccessRequest, AdmittedBy, decide
from enforcer.identity import Identity, IdentityProvider, ServiceTokenCredentials
from enforcer.policy import (
    PolicyError,
    RequestFacts,
    evaluate,
    parse_policy,
    parse_rule,
    rule_from_text,
    rule_to_dict,
)
from enforcer.reasons import Reason
from enforcer.service_tokens import ServiceToken, TokenVerdict
from enforcer.snapshot import Snapshot
from enforcer.tokens import KeyRing, SigningKey, check, identity_of
from tests.enforcer.test_units import facts

NOW = dt.datetime(2026, 6, 1, 12, tzinfo=dt.UTC)
ALICE = Identity("Alice@Example.com", "sub-alice", "idp-1", ("engineering",), None, "n-1")
BOB = Identity("bob@other.test", "sub-bob", "idp-2", (), None, "n-2")
SECRET = "s" * 64
TOKEN = ServiceToken(
    "tok-1",
    "ci",
    "c" * 32 + ".access",
    service_tokens.secret_sha256(SECRET),
    NOW + dt.timedelta(hours=1),
    "demo",
)


def policy(name: str = "p", decision: str = "allow", **rules: object):
    return parse_policy({"name": name, "decision": decision, **rules}, "p")


# ---- rule kinds ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        ({"email": {"email": "a@example.com"}}, "email=a@example.com"),
        ({"email_domain": {"domain": "example.com"}}, "email_domain=example.com"),
        ({"group": {"name": "engineering"}}, "group=engineering"),
        ({"login_method": {"id": "idp-1"}}, "login_method=idp-1"),
        ({"service_token": {"token_id": "tok-1"}}, "service_token=tok-1"),
        ({"any_valid_service_token": {}}, "any_valid_service_token"),
    ],
)
def test_new_rule_kinds_round_trip(raw: dict, text: str) -> None:
    assert rule_to_dict(parse_rule(raw, "r")) == raw
    assert rule_from_text(text) == raw


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"email_domain": {"name": "x"}}, r'r\.email_domain: expected \{ domain = "\.\.\." \}'),
        ({"email": {"email": ""}}, r"r\.email\.email: must not be empty"),
        ({"service_token": {"token_id": 5}}, r"r\.service_token: expected"),
        ({"group": "engineering"}, r"r\.group: expected \{ name"),
    ],
)
def test_bad_identity_rules_name_the_field(raw: dict, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_rule(raw, "r")


def test_rule_from_text_for_new_kinds_refuses_missing_or_extra_values() -> None:
    with pytest.raises(PolicyError, match="needs a value"):
        rule_from_text("email_domain")
    with pytest.raises(PolicyError, match="takes no value"):
        rule_from_text("any_valid_service_token=x")


def test_email_and_domain_ignore_case_group_and_idp_do_not() -> None:
    f = RequestFacts(None, identity=ALICE)
    assert parse_rule({"email": {"email": "ALICE@example.COM"}}, "r").evaluate(f) is True
    assert parse_rule({"email_domain": {"domain": "@EXAMPLE.com"}}, "r").evaluate(f) is True
    assert parse_rule({"email_domain": {"domain": "ample.com"}}, "r").evaluate(f) is False
    assert parse_rule({"group": {"name": "engineering"}}, "r").evaluate(f) is True
    assert parse_rule({"group": {"name": "Engineering"}}, "r").evaluate(f) is False
    assert parse_rule({"login_method": {"id": "idp-1"}}, "r").evaluate(f) is True
    assert parse_rule({"login_method": {"id": "idp-2"}}, "r").evaluate(f) is False
    # The domain is after the LAST @: "a@evil.test@example.com" is not from evil.test.
    tricky = RequestFacts(
        None, identity=dataclasses.replace(ALICE, email="a@evil.test@example.com")
    )
    assert parse_rule({"email_domain": {"domain": "evil.test"}}, "r").evaluate(tricky) is False


def test_identity_rules_are_unknown_without_identity_and_false_for_a_service_token() -> None:
    rule = parse_rule({"email_domain": {"domain": "example.com"}}, "r")
    assert rule.evaluate(RequestFacts(facts())) is None
    assert rule.matches(RequestFacts(facts())) is False
    assert rule.evaluate(RequestFacts(None, service_token=TOKEN)) is False
    st_rule = parse_rule({"service_token": {"token_id": "tok-1"}}, "r")
    assert st_rule.evaluate(RequestFacts(None)) is False  # no login gives a service token
    assert st_rule.evaluate(RequestFacts(None, service_token=TOKEN)) is True
    other = dataclasses.replace(TOKEN, id="tok-2")
    assert st_rule.evaluate(RequestFacts(None, service_token=other)) is False
    anyone = parse_rule({"any_valid_service_token": {}}, "r")
    assert anyone.evaluate(RequestFacts(None, service_token=other)) is True
    assert anyone.evaluate(RequestFacts(facts())) is False


# ---- three-valued evaluation (I7) ---------------------------------------------------------------

PERSON_WITH_DEVICE = dict(
    include=[{"email_domain": {"domain": "example.com"}}], require=[{"certificate": {}}]
)


@pytest.mark.parametrize(
    ("certificate", "identity", "expected"),
    [
        (True, None, "login"),  # could hold after a login
        (False, None, None),  # needs a certificate the request lacks: never a login (I7)
        (True, ALICE, "p"),
        (False, ALICE, None),
        (True, BOB, None),
    ],
)
def test_require_combines_identity_with_the_certificate(
    certificate: bool, identity: Identity | None, expected: str | None
) -> None:
    ev = evaluate(
        [policy(**PERSON_WITH_DEVICE)],
        RequestFacts(facts() if certificate else None, identity=identity),
    )
    got = "login" if ev.login_needed else ev.policy.name if ev.policy else None
    assert got == expected


def test_an_unknown_policy_before_one_that_holds_needs_a_login() -> None:
    people = policy("people", include=[{"group": {"name": "engineering"}}])
    devices = policy("devices", "non_identity", include=[{"certificate": {}}])
    ev = evaluate([people, devices], RequestFacts(facts()))
    assert ev.login_needed and ev.login_needed_by is people and ev.policy is None
    # Order decides (P3): the device policy first admits without a login.
    assert evaluate([devices, people], RequestFacts(facts())).policy is devices
    # An unknown exclude makes the policy unknown; a false include makes it false anyway.
    excl = policy(
        "x", include=[{"certificate": {}}], exclude=[{"email": {"email": "bob@other.test"}}]
    )
    assert evaluate([excl], RequestFacts(facts())).login_needed
    assert evaluate([excl], RequestFacts(facts(), identity=ALICE)).policy is excl
    assert evaluate([excl], RequestFacts(facts(), identity=BOB)).policy is None
    no = policy(
        "n", include=[{"common_name": {"common_name": "other"}}], exclude=[{"group": {"name": "g"}}]
    )
    assert evaluate([no], RequestFacts(facts())) == evaluate([], RequestFacts(facts()))


_RULES = st.sampled_from(
    [
        {"everyone": {}},
        {"certificate": {}},
        {"common_name": {"common_name": "device-001"}},
        {"common_name": {"common_name": "other"}},
        {"email_domain": {"domain": "example.com"}},
        {"email": {"email": "bob@other.test"}},
        {"group": {"name": "engineering"}},
        {"login_method": {"id": "idp-2"}},
        {"any_valid_service_token": {}},
    ]
)


@given(
    include=st.lists(_RULES, min_size=1, max_size=3),
    require=st.lists(_RULES, max_size=2),
    exclude=st.lists(_RULES, max_size=2),
    certificate=st.booleans(),
)
def test_unknown_means_some_login_could_make_it_hold(
    include: list, require: list, exclude: list, certificate: bool
) -> None:
    """I7 exactly: False when nobody could satisfy it, None when someone could, True for all.

    The candidates cover every distinction the sampled rules draw (their email, a fresh one in
    their domain and outside it; with and without their group; their provider and another).
    """
    p = policy(include=include, require=require, exclude=exclude)
    cert = facts() if certificate else None
    without = p.evaluate(RequestFacts(cert))
    people = [
        Identity(email, "s", idp, groups)
        for email in ("bob@other.test", "x@example.com", "x@fresh.test")
        for groups in ((), ("engineering",))
        for idp in ("idp-2", "idp-9")
    ]
    with_each = {p.evaluate(RequestFacts(cert, identity=who)) for who in people}
    assert None not in with_each
    if without is True:
        assert with_each == {True}
    elif without is False:
        assert with_each == {False}
    else:
        assert True in with_each
    # With a valid service token nothing is unknown: a machine never logs in.
    assert p.evaluate(RequestFacts(cert, service_token=TOKEN)) is not None


# ---- service tokens (I11) ---------------------------------------------------------------------


def test_service_token_check() -> None:
    good = ServiceTokenCredentials(TOKEN.client_id, SECRET)
    tokens = {TOKEN.client_id: TOKEN}
    assert service_tokens.check(good, tokens, NOW)[0] is TokenVerdict.VALID
    wrong = ServiceTokenCredentials(TOKEN.client_id, "t" * 64)
    assert service_tokens.check(wrong, tokens, NOW)[0] is TokenVerdict.INVALID
    unknown = ServiceTokenCredentials("d" * 32 + ".access", SECRET)
    assert service_tokens.check(unknown, tokens, NOW)[:2] == (TokenVerdict.INVALID, None)
    at_expiry = service_tokens.check(good, tokens, TOKEN.expires_at)
    assert at_expiry[0] is TokenVerdict.EXPIRED
    just_before = TOKEN.expires_at - dt.timedelta(microseconds=1)
    assert service_tokens.check(good, tokens, just_before)[0] is TokenVerdict.VALID
    huge = ServiceTokenCredentials(TOKEN.client_id, SECRET + "x" * 10_000)
    assert service_tokens.check(huge, tokens, NOW)[0] is TokenVerdict.INVALID


def test_generated_ids_and_secrets_have_cloudflare_shapes() -> None:
    assert service_tokens.CLIENT_ID_PATTERN.fullmatch(service_tokens.new_client_id())
    secret = service_tokens.new_secret()
    assert len(secret) == 64 and int(secret, 16) >= 0
    assert service_tokens.new_secret() != secret
    assert service_tokens.SECRET_SHA256_PATTERN.fullmatch(service_tokens.secret_sha256(secret))


# ---- decide() ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ring() -> KeyRing:
    return KeyRing(
        SigningKey.from_private_key(
            rsa.generate_private_key(public_exponent=65537, key_size=2048), NOW
        )
    )


IDP = IdentityProvider("idp-1", "test", "https://idp.test", "client", "secret")


def snapshot(
    ring: KeyRing, *policies, duration: str | dt.timedelta = dt.timedelta(hours=24), **app
) -> Snapshot:
    app.setdefault("identity_providers", ("idp-1",))
    application = Application(
        "auth", "auth.test", "a" * 64, duration, tuple(policies), "http://o", account="demo", **app
    )
    return Snapshot.build(
        generation=1,
        applications=[application],
        roots=[],
        keyring=ring,
        issuer="https://iss",
        identity_providers=[IDP],
        service_tokens=[TOKEN],
    )


def req(**kw: object) -> AccessRequest:
    return AccessRequest("auth.test", "auth.test", **kw)  # type: ignore[arg-type]


DEVICE = ChainResult(facts(), None)
PERSON_POLICY = policy("people", **PERSON_WITH_DEVICE)
MACHINES = policy("machines", "non_identity", include=[{"service_token": {"token_id": "tok-1"}}])


def test_login_required_then_identity_admitted_with_claims(ring: KeyRing) -> None:
    snap = snapshot(ring, PERSON_POLICY)
    need = decide(req(), snap, DEVICE, NOW)
    assert (need.status, need.reason, need.policy) == (401, Reason.LOGIN_REQUIRED, "people")
    # Without the certificate the person's policy cannot hold: the certificate's reason (I7).
    bare = decide(req(), snap, None, NOW)
    assert (bare.status, bare.reason) == (403, Reason.NO_CERTIFICATE)
    admitted = decide(req(identity=ALICE), snap, DEVICE, NOW)
    assert admitted.status == 200 and admitted.admitted_by is AdmittedBy.IDENTITY
    assert admitted.identity == ALICE and admitted.set_cookie is not None
    claims = admitted.claims
    assert claims is not None
    assert claims["email"] == ALICE.email and claims["sub"] == "sub-alice"
    assert claims["idp"] == {"id": "idp-1", "type": "oidc"}
    assert claims["identity_nonce"] == "n-1" and claims["groups"] == ["engineering"]
    assert claims["cnf"] == {"x5t#S256": facts().x5t_s256} and claims["common_name"] == "device-001"
    assert identity_of(claims) == ALICE
    denied = decide(req(identity=BOB), snap, DEVICE, NOW)
    assert (denied.status, denied.reason) == (403, Reason.IDENTITY_DENIED)
    assert denied.identity == BOB and denied.token is None and denied.set_cookie is None


def test_the_session_token_carries_the_identity_and_admits(ring: KeyRing) -> None:
    snap = snapshot(ring, PERSON_POLICY)
    admitted = decide(req(identity=ALICE), snap, DEVICE, NOW)
    assert admitted.token is not None
    again = decide(req(token=admitted.token), snap, DEVICE, NOW)
    assert again.admitted_by is AdmittedBy.TOKEN and again.identity == ALICE
    # A failed chain still denies with its reason (P6), identity or not.
    bad = ChainResult(None, Reason.REVOKED, "revoked")
    assert decide(req(token=admitted.token), snap, bad, NOW).reason is Reason.REVOKED
    assert decide(req(identity=ALICE), snap, bad, NOW).reason is Reason.REVOKED


def test_removing_the_provider_ends_its_sessions(ring: KeyRing) -> None:
    snap = snapshot(ring, PERSON_POLICY)
    session = decide(req(identity=ALICE), snap, DEVICE, NOW).token
    assert session is not None
    assert decide(req(token=session), snap, DEVICE, NOW).admitted_by is AdmittedBy.TOKEN
    # The provider deleted, or no longer in the application's allowed_idps: the token is
    # refused and the person must log in again (with a provider that may still log them in).
    gone = snapshot(ring, PERSON_POLICY, identity_providers=())
    refused = decide(req(token=session), gone, DEVICE, NOW)
    assert refused.admitted_by is None and Reason.TOKEN_INVALID in refused.notes
    # A device's token, which names no provider, is not affected.
    device_token = decide(
        req(),
        snapshot(
            ring, policy("d", "non_identity", include=[{"certificate": {}}]), identity_providers=()
        ),
        DEVICE,
        NOW,
    ).token
    assert device_token is not None
    kept = decide(req(token=device_token), gone, DEVICE, NOW)
    assert kept.admitted_by is AdmittedBy.TOKEN


def test_no_duration_with_a_person(ring: KeyRing) -> None:
    """I9: the session token never admits alone; bound to the certificate, it names the person."""
    hourly = policy("people", session_duration="1h", **PERSON_WITH_DEVICE)
    snap = snapshot(ring, hourly, duration=dt.timedelta(0))
    login = decide(req(identity=ALICE), snap, DEVICE, NOW)
    assert login.status == 200 and login.close_connection
    assert login.set_cookie is not None and "Max-Age=3600" in login.set_cookie
    session = login.set_cookie.split(";", 1)[0].split("=", 1)[1]
    claims = check(session, ring, aud="a" * 64, issuer="https://iss", now=NOW).claims
    assert claims is not None and claims["exp"] - claims["iat"] == 3600 and claims["identity_only"]
    # The forwarded token is the short No Duration one, not the session.
    assert (
        login.token != session and login.claims and login.claims["exp"] - login.claims["iat"] == 5
    )
    # Next request: the session token names Alice, her device's certificate is validated again.
    later = decide(req(token=session), snap, DEVICE, NOW + dt.timedelta(minutes=30))
    assert later.status == 200 and later.admitted_by is AdmittedBy.IDENTITY
    assert later.identity == ALICE and later.set_cookie is None  # no sliding session
    # Never on its own: without the certificate the policy cannot hold.
    alone = decide(req(token=session), snap, None, NOW)
    assert (alone.status, alone.reason) == (403, Reason.NO_CERTIFICATE)
    # Beside another certificate: not Alice's session any more, a login is needed.
    other = ChainResult(dataclasses.replace(facts(), sha256="99" * 32), None)
    assert decide(req(token=session), snap, other, NOW).reason is Reason.LOGIN_REQUIRED
    # Expired: a login again.
    late = decide(req(token=session), snap, DEVICE, NOW + dt.timedelta(hours=2))
    assert late.reason is Reason.LOGIN_REQUIRED and Reason.TOKEN_EXPIRED not in late.notes
    # Without a policy duration the identity cookie lasts 24 hours.
    plain = snapshot(ring, PERSON_POLICY, duration=dt.timedelta(0))
    cookie = decide(req(identity=ALICE), plain, DEVICE, NOW).set_cookie
    assert cookie is not None and "Max-Age=86400" in cookie
    # A device token (no identity) still never admits under No Duration (A9).
    devices = snapshot(ring, policy("d", include=[{"certificate": {}}]), duration=dt.timedelta(0))
    minted = decide(req(), devices, DEVICE, NOW)
    assert minted.set_cookie is None
    replay = decide(req(token=minted.token), devices, None, NOW)
    assert replay.reason is Reason.NO_CERTIFICATE and replay.notes == (Reason.TOKEN_INVALID,)


def test_an_identity_only_token_never_admits_alone_on_an_application_with_a_duration(
    ring: KeyRing,
) -> None:
    zero = policy("people", session_duration="0s", **PERSON_WITH_DEVICE)
    snap = snapshot(ring, zero)
    login = decide(req(identity=ALICE), snap, DEVICE, NOW)
    assert login.set_cookie is not None
    session = login.set_cookie.split(";", 1)[0].split("=", 1)[1]
    again = decide(req(token=session), snap, DEVICE, NOW)
    assert again.admitted_by is AdmittedBy.IDENTITY  # evaluated again, not admitted by the token


@pytest.mark.parametrize(
    ("secret", "at", "status", "reason"),
    [
        (SECRET, NOW, 200, None),
        ("t" * 64, NOW, 403, Reason.SERVICE_TOKEN_INVALID),
        (SECRET, TOKEN.expires_at, 403, Reason.SERVICE_TOKEN_EXPIRED),
    ],
)
def test_service_tokens_in_decide(
    ring: KeyRing, secret: str, at: dt.datetime, status: int, reason: Reason | None
) -> None:
    snap = snapshot(ring, PERSON_POLICY, MACHINES)
    d = decide(req(service_token=ServiceTokenCredentials(TOKEN.client_id, secret)), snap, None, at)
    assert (d.status, d.reason) == (status, reason)
    if status == 200:
        assert d.admitted_by is AdmittedBy.SERVICE_TOKEN and d.identity is None
        assert d.claims and d.claims["common_name"] == TOKEN.client_id
        assert d.claims["service_token_id"] == "tok-1" and "cnf" not in d.claims
        assert d.set_cookie is not None and "Max-Age=86400" in d.set_cookie
    else:
        assert d.notes == (reason,)


def test_service_token_reasons_and_precedence(ring: KeyRing) -> None:
    wrong = ServiceTokenCredentials(TOKEN.client_id, "t" * 64)
    good = ServiceTokenCredentials(TOKEN.client_id, SECRET)
    # A bad service token with a certificate policy that admits: admitted, the token noted.
    devices = snapshot(ring, policy("d", "non_identity", include=[{"certificate": {}}]))
    d = decide(req(service_token=wrong), devices, DEVICE, NOW)
    assert d.admitted_by is AdmittedBy.CERTIFICATE and d.notes == (Reason.SERVICE_TOKEN_INVALID,)
    # A valid one that no policy admits is policy_denied (I11).
    assert decide(req(service_token=good), devices, None, NOW).reason is Reason.POLICY_DENIED
    # A person's policy first: a valid service token is a machine, it is never asked to log in.
    both = snapshot(ring, PERSON_POLICY, MACHINES)
    assert (
        decide(req(service_token=good), both, DEVICE, NOW).admitted_by is AdmittedBy.SERVICE_TOKEN
    )
    # A bad one before an unknown person's policy: the token's reason, not a login.
    assert (
        decide(req(service_token=wrong), both, DEVICE, NOW).reason is Reason.SERVICE_TOKEN_INVALID
    )
    # Another account's token is unknown here.
    foreign = dataclasses.replace(
        snapshot(ring, MACHINES),
        service_tokens={TOKEN.client_id: dataclasses.replace(TOKEN, account="other")},
    )
    assert (
        decide(req(service_token=good), foreign, None, NOW).reason is Reason.SERVICE_TOKEN_INVALID
    )


def test_deny_and_bypass_with_identity(ring: KeyRing) -> None:
    deny_bob = policy("no bob", "deny", include=[{"email": {"email": "bob@other.test"}}])
    everyone = policy("all", "bypass", include=[{"everyone": {}}])
    snap = snapshot(ring, deny_bob, everyone)
    assert decide(req(), snap, None, NOW).reason is Reason.LOGIN_REQUIRED
    assert decide(req(identity=BOB), snap, None, NOW).reason is Reason.POLICY_DENIED
    alice = decide(req(identity=ALICE), snap, None, NOW)
    assert (
        alice.admitted_by is AdmittedBy.BYPASS and alice.identity == ALICE and alice.token is None
    )


def test_minted_session_token_verifies_with_the_public_key(ring: KeyRing) -> None:
    d = decide(req(identity=ALICE), snapshot(ring, PERSON_POLICY), DEVICE, NOW)
    assert d.token is not None
    claims = jwt.decode(
        d.token,
        ring.current.public_key,
        algorithms=["RS256"],
        audience="a" * 64,
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )
    assert claims["email"] == ALICE.email


def test_a_policy_no_login_can_satisfy_is_skipped_not_a_login() -> None:
    """I7's "could hold after a login" exactly, not only Kleene's unknown."""
    cert = RequestFacts(facts())
    never = [
        policy(
            include=[{"email": {"email": "a@x.test"}}], exclude=[{"email": {"email": "a@x.test"}}]
        ),
        policy(
            include=[{"email": {"email": "a@x.test"}}],
            require=[{"email_domain": {"domain": "y.test"}}],
        ),
        policy(
            include=[{"email_domain": {"domain": "x.test"}}],
            require=[{"email_domain": {"domain": "y.test"}}],
        ),
        policy(include=[{"group": {"name": "g"}}], exclude=[{"group": {"name": "g"}}]),
        policy(
            include=[{"email": {"email": "a@x.test"}}],
            exclude=[{"email_domain": {"domain": "X.test"}}],
        ),
        policy(include=[{"login_method": {"id": "p"}}], require=[{"login_method": {"id": "q"}}]),
        policy(
            include=[{"certificate": {}}],
            require=[{"group": {"name": "g"}}],
            exclude=[{"group": {"name": "g"}}],
        ),
    ]
    for p in never:
        assert p.evaluate(cert) is False, p
        assert not evaluate([p], cert).login_needed
    could = [
        policy(
            include=[{"email": {"email": "a@x.test"}}], exclude=[{"email": {"email": "b@x.test"}}]
        ),
        policy(
            include=[{"email_domain": {"domain": "x.test"}}],
            exclude=[{"email": {"email": "b@x.test"}}],
        ),
        policy(
            include=[{"group": {"name": "g"}}, {"email": {"email": "a@x.test"}}],
            exclude=[{"group": {"name": "g"}}],
        ),
        policy(include=[{"certificate": {}}], exclude=[{"login_method": {"id": "p"}}]),
    ]
    for p in could:
        assert p.evaluate(cert) is None, p
    # Logins come only from the application's providers: with none, nobody can log in.
    by_p = policy(include=[{"login_method": {"id": "p"}}])
    assert by_p.evaluate(cert, ("p", "q")) is None
    assert by_p.evaluate(cert, ("q",)) is False
    assert by_p.evaluate(cert, ()) is False
    not_p = policy(include=[{"certificate": {}}], exclude=[{"login_method": {"id": "p"}}])
    assert not_p.evaluate(cert, ("p",)) is False and not_p.evaluate(cert, ("p", "q")) is None
    domain = policy(include=[{"email_domain": {"domain": "x.test"}}])
    assert domain.evaluate(cert, ()) is False and domain.evaluate(cert, ("q",)) is None


def test_without_identity_providers_identity_policies_are_skipped(ring: KeyRing) -> None:
    snap = snapshot(ring, PERSON_POLICY, identity_providers=())
    d = decide(req(), snap, DEVICE, NOW)
    assert (d.status, d.reason) == (403, Reason.POLICY_DENIED)  # P1: no provider, no login


def test_a_fresh_login_wins_over_an_older_session(ring: KeyRing) -> None:
    snap = snapshot(ring, PERSON_POLICY)
    alice = decide(req(identity=ALICE), snap, DEVICE, NOW)
    carol = dataclasses.replace(ALICE, email="carol@example.com", sub="sub-carol")
    switched = decide(req(identity=carol, token=alice.token), snap, DEVICE, NOW)
    assert switched.admitted_by is AdmittedBy.IDENTITY and switched.identity == carol
    assert switched.set_cookie is not None and switched.token != alice.token
