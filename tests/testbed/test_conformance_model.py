"""The conformance model itself: hand-made cases with known answers (no network)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.conformance import model
from testbed.conformance.strategies import (
    APP_HOST,
    DAY,
    NOAPP_HOST,
    OTHER_HOST,
    IntermediateSpec,
    LeafSpec,
    PkiSpec,
    build_pki,
)

T0 = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
VALID = model.Policy("valid", "non_identity", (model.Rule("certificate"),))


def world(
    spec: PkiSpec | None = None,
    duration: dt.timedelta = dt.timedelta(hours=24),
    policies: tuple[model.Policy, ...] = (VALID,),
    max_chain_depth: int | None = None,
) -> tuple[model.World, tuple]:
    spec = spec or PkiSpec()
    pki = build_pki(spec, T0)
    roots = [model.Root(pki.anchor, pki.uploaded, frozenset(spec.root_hostnames))]
    if pki.decoy is not None:
        roots.append(
            model.Root(pki.decoy, pki.decoy_uploaded, frozenset(spec.decoy_hostnames or ()))
        )
    apps = {
        APP_HOST: model.App(APP_HOST, duration, policies),
        OTHER_HOST: model.App(OTHER_HOST, dt.timedelta(hours=24), (VALID,)),
    }
    assert pki.leaf is not None
    return model.World(tuple(roots), apps, max_chain_depth=max_chain_depth), (
        pki.leaf,
        *pki.presented,
    )


def ask(w: model.World, chain: tuple, **kw: object) -> model.Expected:
    at = kw.pop("at", T0)
    request = model.Request(APP_HOST, APP_HOST, chain)
    return model.expect(w, dataclasses.replace(request, **kw), at)  # type: ignore[arg-type]


def test_valid_certificate_is_admitted_with_a_cookie_for_the_duration() -> None:
    w, chain = world()
    e = ask(w, chain)
    assert (e.status, e.admitted_by, e.cookie, e.cookie_max_age) == (
        200,
        "certificate",
        True,
        86400,
    )
    assert e.token_exp == T0 + dt.timedelta(hours=24)


def test_host_and_sni_and_missing_application() -> None:
    w, chain = world()
    assert model.expect(w, model.Request(APP_HOST, OTHER_HOST, chain), T0).reasons == {
        "misdirected"
    }
    assert model.expect(w, model.Request(NOAPP_HOST, NOAPP_HOST), T0).status == 404


@pytest.mark.parametrize(
    ("offset", "reason"),
    [
        (30 * DAY, None),  # the last valid second: notAfter is inclusive
        (30 * DAY + 1, "certificate_expired"),
        (-DAY - 1, "certificate_not_yet_valid"),
    ],
)
def test_validity_boundaries(offset: int, reason: str | None) -> None:
    w, chain = world()
    e = model.expect(w, model.Request(APP_HOST, APP_HOST, chain), T0 + dt.timedelta(seconds=offset))
    assert e.reasons == (frozenset({reason}) if reason else frozenset())


def test_a_root_associated_with_another_hostname_is_untrusted() -> None:
    w, chain = world(PkiSpec(root_hostnames=(OTHER_HOST,)))
    assert ask(w, chain).reasons == {"untrusted_issuer"}
    assert model.forbidden_admission(w, model.Request(APP_HOST, APP_HOST, chain), T0)


def test_an_intermediate_known_elsewhere_is_missing_not_untrusted() -> None:
    inter = IntermediateSpec(presented=False, known_elsewhere=True)
    w, chain = world(PkiSpec(intermediates=(inter,)))
    assert ask(w, chain).reasons == {"missing_intermediate"}
    unknown = IntermediateSpec(presented=False)
    w, chain = world(PkiSpec(intermediates=(unknown,)))
    assert ask(w, chain).reasons == {"untrusted_issuer"}


@pytest.mark.parametrize(
    "spec",
    [
        PkiSpec(leaf=LeafSpec(eku="server")),
        PkiSpec(leaf=LeafSpec(digital_signature=False)),
        PkiSpec(intermediates=(IntermediateSpec(is_ca=False),)),
        PkiSpec(intermediates=(IntermediateSpec(key_cert_sign=False),)),
        PkiSpec(intermediates=(IntermediateSpec(path_length=0), IntermediateSpec())),
    ],
)
def test_structural_defects_are_invalid_chain(spec: PkiSpec) -> None:
    w, chain = world(spec)
    assert ask(w, chain).reasons == {"invalid_chain"}


def test_no_eku_and_both_ekus_are_fine() -> None:
    for eku in ("none", "both"):
        w, chain = world(PkiSpec(leaf=LeafSpec(eku=eku)))
        assert ask(w, chain).status == 200


def test_a_forged_leaf_may_be_invalid_or_untrusted() -> None:
    w, chain = world(PkiSpec(leaf=LeafSpec(forged=True)))
    assert ask(w, chain).reasons == {"invalid_chain", "untrusted_issuer"}


def test_several_defects_accept_any_of_their_reasons() -> None:
    spec = PkiSpec(leaf=LeafSpec(eku="server", not_after=-60, not_before=-DAY))
    w, chain = world(spec)
    assert ask(w, chain).reasons == {"invalid_chain", "certificate_expired"}


def test_no_duration_sends_no_cookie_closes_and_ignores_tokens() -> None:
    w, chain = world(duration=dt.timedelta(0))
    e = ask(w, chain)
    assert (e.status, e.cookie, e.close) == (200, False, True)
    token = model.Token(APP_HOST, T0 + dt.timedelta(hours=1))
    e = ask(w, (), token=token)
    assert e.reasons == {"no_certificate"} and e.close


def test_tokens_admit_only_their_application_until_expiry_untampered() -> None:
    w, _ = world()
    token = model.Token(APP_HOST, T0 + dt.timedelta(hours=1))
    assert ask(w, (), token=token).admitted_by == "token"
    other = model.expect(w, model.Request(OTHER_HOST, OTHER_HOST, (), token), T0)
    assert other.reasons == {"no_certificate"}
    late = model.expect(w, model.Request(APP_HOST, APP_HOST, (), token), token.exp)
    assert late.reasons == {"no_certificate"}
    assert ask(w, (), token=dataclasses.replace(token, genuine=False)).status == 403


def test_a_valid_token_never_rescues_a_bad_certificate() -> None:
    w, chain = world(PkiSpec(leaf=LeafSpec(not_after=-60, not_before=-DAY)))
    token = model.Token(APP_HOST, T0 + dt.timedelta(hours=1))
    assert ask(w, chain, token=token).reasons == {"certificate_expired"}


def test_revoked_leaf() -> None:
    w, chain = world()
    w = dataclasses.replace(w, revoked=frozenset({model.sha256_hex(chain[0])}))
    assert ask(w, chain).reasons == {"revoked"}
    assert model.forbidden_admission(w, model.Request(APP_HOST, APP_HOST, chain), T0)


def test_policies_first_match_with_include_require_exclude() -> None:
    cn = model.Rule("common_name", "device-1")
    wrong = model.Rule("common_name", "someone-else")
    deny = model.Policy("deny", "deny", (wrong,))
    allow = model.Policy("cn", "non_identity", (cn,), exclude=(model.Rule("ip", "127.0.0.0/8"),))
    bypass = model.Policy("bypass", "bypass", (model.Rule("everyone"),), require=(cn,))
    w, chain = world(policies=(deny, allow, bypass))
    e = ask(w, chain)
    assert (e.admitted_by, e.cookie) == ("bypass", False)  # allow excluded by ip; bypass holds
    w, chain = world(policies=(model.Policy("only", "non_identity", (wrong,)),))
    assert ask(w, chain).reasons == {"policy_denied"}
    assert ask(w, ()).reasons == {"no_certificate"}


def test_a_policy_duration_overrides_the_application_but_not_no_duration() -> None:
    short = model.Policy(
        "short",
        "non_identity",
        (model.Rule("certificate"),),
        session_duration=dt.timedelta(hours=1),
    )
    w, chain = world(policies=(short,))
    assert ask(w, chain).cookie_max_age == 3600
    w, chain = world(duration=dt.timedelta(0), policies=(short,))
    assert ask(w, chain).cookie is False


# ---- the validation profile (issue 14; docs/access-flow.md) -----------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        PkiSpec(leaf=LeafSpec(key_type="rsa-1024")),
        PkiSpec(leaf=LeafSpec(key_type="dsa-2048")),
        PkiSpec(leaf=LeafSpec(key_type="ed25519")),
        PkiSpec(leaf=LeafSpec(key_type="ed448")),
        PkiSpec(leaf=LeafSpec(key_type="ec-p192")),
        PkiSpec(root_key_type="ed25519"),  # an Ed25519 CA: the documented profile, not a bug
        PkiSpec(intermediates=(IntermediateSpec(key_type="ec-p224"),)),
        PkiSpec(intermediates=(IntermediateSpec(key_type="ec-k256"),)),
        PkiSpec(intermediates=(IntermediateSpec(key_type="dsa-2048"),)),
        PkiSpec(intermediates=(IntermediateSpec(key_type="ed448"),)),
        PkiSpec(root_key_type="rsa-2048", intermediates=(), leaf=LeafSpec(signature="sha1")),
    ],
)
def test_keys_and_signatures_outside_the_profile_are_unsupported_key(spec: PkiSpec) -> None:
    w, chain = world(spec)
    assert ask(w, chain).reasons == {"unsupported_key"}
    assert model.forbidden_admission(w, model.Request(APP_HOST, APP_HOST, chain), T0)


@pytest.mark.parametrize("key_type", ["ec-p256", "ec-p384", "ec-p521", "rsa-2048"])
def test_keys_inside_the_profile_are_admitted(key_type: str) -> None:
    spec = PkiSpec(
        root_key_type=key_type,
        intermediates=(IntermediateSpec(key_type=key_type, signature="sha512"),),
        leaf=LeafSpec(key_type=key_type, signature="sha384"),
    )
    w, chain = world(spec)
    assert ask(w, chain).status == 200


def test_the_profile_is_configurable() -> None:
    w, chain = world(PkiSpec(leaf=LeafSpec(key_type="ec-p384")))
    narrow = dataclasses.replace(w, ec_curves=frozenset({"secp256r1"}))
    assert ask(narrow, chain).reasons == {"unsupported_key"}
    w, chain = world(PkiSpec(leaf=LeafSpec(key_type="rsa-2048")))
    assert ask(dataclasses.replace(w, min_rsa_bits=3072), chain).reasons == {"unsupported_key"}


def test_a_profile_fault_beside_another_accepts_either_reason() -> None:
    spec = PkiSpec(leaf=LeafSpec(key_type="rsa-1024", not_before=-DAY, not_after=-60))
    w, chain = world(spec)
    assert ask(w, chain).reasons == {"unsupported_key", "certificate_expired"}
    # Without a path, a presented certificate outside the profile may be named instead.
    w, chain = world(dataclasses.replace(spec, root_hostnames=(OTHER_HOST,)))
    assert ask(w, chain).reasons == {"unsupported_key", "untrusted_issuer"}


def test_a_chain_deeper_than_max_chain_depth_is_invalid_chain() -> None:
    three = PkiSpec(intermediates=(IntermediateSpec(),) * 3)
    w, chain = world(three, max_chain_depth=2)
    assert ask(w, chain).reasons == {"invalid_chain"}
    w, chain = world(three, max_chain_depth=3)
    assert ask(w, chain).status == 200


def test_an_intermediate_is_a_trust_anchor() -> None:
    # Only intermediate 2 is uploaded (not self-signed): the path ends there, and the depth
    # counts from it.
    spec = PkiSpec(intermediates=(IntermediateSpec(),) * 3, anchor=2)
    w, chain = world(spec, max_chain_depth=1)
    anchor = w.roots[0].certificate
    assert anchor.issuer != anchor.subject
    assert ask(w, chain).status == 200
    # Without intermediate 3 (the one between the leaf and the anchor) no path remains.
    assert ask(w, chain[:1]).reasons == {"untrusted_issuer"}


def test_rfc_5280_allows_a_critical_eku_and_a_ca_without_key_usage() -> None:
    spec = PkiSpec(
        root_key_usage=False,
        intermediates=(IntermediateSpec(key_usage=False),),
        leaf=LeafSpec(eku_critical=True),
    )
    w, chain = world(spec)
    assert ask(w, chain).status == 200


@pytest.mark.parametrize(
    ("constraints", "leaf", "admitted"),
    [
        # The case: a CA excluding factory-b.test, a SAN-less leaf named inside it.
        (((), ("factory-b.test",)), LeafSpec(cn="device-1.factory-b.test"), False),
        (((), ("factory-b.test",)), LeafSpec(cn="device-1.fleet.test"), True),
        (((), ("factory-b.test",)), LeafSpec(cn="Device 7"), False),  # no DNS name at all
        ((("fleet.test",), ()), LeafSpec(cn="device-1.fleet.test"), True),
        ((("fleet.test",), ()), LeafSpec(cn="device-1"), False),
        ((("fleet.test",), ()), LeafSpec(san_dns=("d1.fleet.test",)), True),
        ((("fleet.test",), ()), LeafSpec(san_dns=("d1.fleet.test", "alt.example.test")), False),
        # dNSName subtrees do not constrain URIs.
        (
            (("fleet.test",), ()),
            LeafSpec(san_dns=("d1.fleet.test",), san_uris=("spiffe://x/y",)),
            True,
        ),
        (
            (("fleet.test", "example.test"), ("alt.example.test",)),
            LeafSpec(san_dns=("alt.example.test",)),
            False,
        ),
    ],
)
def test_name_constraints_bind_san_and_san_less_leaves(
    constraints: tuple[tuple[str, ...], tuple[str, ...]], leaf: LeafSpec, admitted: bool
) -> None:
    permitted, excluded = constraints
    inter = IntermediateSpec(permitted=permitted, excluded=excluded)
    w, chain = world(PkiSpec(intermediates=(inter,), leaf=leaf))
    e = ask(w, chain)
    assert (e.status == 200) is admitted, e.describe()
    if not admitted:
        assert e.reasons == {"invalid_chain"}


def test_a_critical_san_beside_a_subject_is_invalid_chain() -> None:
    w, chain = world(PkiSpec(leaf=LeafSpec(san_dns=("d1.fleet.test",), san_critical=True)))
    assert ask(w, chain).reasons == {"invalid_chain"}


# ---- people and service tokens (access-flow I5-I11) -------------------------------------------

IDP_A, IDP_B = "idp-a", "idp-b"
ALICE = model.Person("alice@example.com", IDP_A, frozenset({"engineering"}))
BOB = model.Person("bob@other.test", IDP_B)
DOMAIN = model.Rule("email_domain", "example.com")
CERT = model.Rule("certificate")
LOGIN_AND_CERTIFICATE = model.Policy("people", "allow", (DOMAIN,), require=(CERT,))


def people_world(
    *policies: model.Policy,
    duration: dt.timedelta = dt.timedelta(hours=24),
    providers: tuple[str, ...] = (IDP_A, IDP_B),
    tokens: tuple[model.ServiceToken, ...] = (),
) -> tuple[model.World, tuple]:
    w, chain = world(duration=duration, policies=policies)
    app = dataclasses.replace(w.apps[APP_HOST], identity_providers=providers)
    return dataclasses.replace(w, apps={**w.apps, APP_HOST: app}, service_tokens=tokens), chain


def test_login_and_certificate_is_one_policy() -> None:
    w, chain = people_world(LOGIN_AND_CERTIFICATE)
    # No login yet, a certificate: a login could admit (I7): 401, a browser is redirected.
    e = ask(w, chain)
    assert (e.status, e.reasons) == (401, {"login_required"})
    assert ask(w, chain, browser=True).redirect
    # No certificate: the policy cannot hold whatever the login, so no login is asked (I7).
    assert ask(w, ()).reasons == {"no_certificate"}
    assert ask(w, (), browser=True).reasons == {"no_certificate"}
    # After a login with both: admitted as the person, with a cookie carrying them (I5, I8).
    e = ask(w, chain, person=ALICE)
    assert (e.status, e.person, e.cookie) == (200, ALICE, True)
    # A person from another domain: identity_denied (D1, I5).
    assert ask(w, chain, person=BOB).reasons == {"identity_denied"}


def test_the_first_policy_that_could_hold_after_a_login_stops_the_evaluation() -> None:
    people = model.Policy("people", "allow", (DOMAIN,))
    devices = model.Policy("devices", "non_identity", (CERT,))
    w, chain = people_world(people, devices)
    assert ask(w, chain).reasons == {"login_required"}  # the device policy is never reached
    w, chain = people_world(devices, people)
    assert ask(w, chain).admitted_by == "certificate"
    assert ask(w, ()).reasons == {"login_required"}


def test_three_values_are_about_every_identity_not_kleene() -> None:
    # include email = a AND exclude email = a can hold for nobody: skipped, not a login.
    a = model.Rule("email", "alice@example.com")
    never = model.Policy("never", "allow", (a,), exclude=(a,))
    w, chain = people_world(never, model.Policy("devices", "non_identity", (CERT,)))
    assert ask(w, chain).admitted_by == "certificate"
    # include certificate OR email: holds for every identity with a certificate.
    either = model.Policy("either", "non_identity", (CERT, a))
    w, chain = people_world(either)
    assert ask(w, chain).admitted_by == "certificate"
    assert ask(w, ()).reasons == {"login_required"}
    # exclude email alone: a login could still make it hold (anyone but alice).
    but = model.Policy("but", "non_identity", (CERT,), exclude=(a,))
    w, chain = people_world(but)
    assert ask(w, chain).reasons == {"login_required"}
    assert ask(w, chain, person=ALICE).reasons == {"identity_denied"}


def test_a_login_method_no_allowed_provider_offers_cannot_hold() -> None:
    via_b = model.Policy("b", "allow", (model.Rule("login_method", IDP_B),))
    w, chain = people_world(via_b, providers=(IDP_A,))
    assert ask(w, chain).reasons == {"policy_denied"}
    w, chain = people_world(via_b, providers=(IDP_A, IDP_B))
    assert ask(w, chain).reasons == {"login_required"}
    assert ask(w, chain, person=BOB).status == 200


@pytest.mark.parametrize(
    ("rule", "person", "matches"),
    [
        (model.Rule("email", "ALICE@example.COM"), ALICE, True),
        (model.Rule("email", "alice@example.co"), ALICE, False),
        (model.Rule("email_domain", "EXAMPLE.com"), ALICE, True),
        # The part after the last @, exactly: a suffix is not the domain.
        (model.Rule("email_domain", "ample.com"), ALICE, False),
        (model.Rule("email_domain", "com"), ALICE, False),
        (model.Rule("email_domain", "other.test"), model.Person("x@y@other.test", IDP_A), True),
        (model.Rule("group", "engineering"), ALICE, True),
        (model.Rule("group", "sales"), ALICE, False),
        (model.Rule("login_method", IDP_A), ALICE, True),
        (model.Rule("login_method", IDP_B), ALICE, False),
    ],
)
def test_identity_rules(rule: model.Rule, person: model.Person, matches: bool) -> None:
    w, chain = people_world(model.Policy("p", "allow", (rule,)))
    assert (ask(w, chain, person=person).status == 200) is matches


def test_no_duration_with_a_person_checks_the_device_and_carries_the_identity() -> None:
    w, chain = people_world(LOGIN_AND_CERTIFICATE, duration=dt.timedelta(0))
    leaf = model.sha256_hex(chain[0])
    session = model.Token(APP_HOST, T0 + dt.timedelta(hours=1), True, leaf, ALICE)
    e = ask(w, chain, token=session)
    # The token does not admit on its own: the policies decide with its person (I9)...
    assert (e.status, e.admitted_by, e.person, e.close) == (200, "certificate", ALICE, True)
    assert e.cookie is False  # only the login's decision sets the identity cookie (I9)
    # A login under No Duration gets an identity cookie for 24 h without a policy duration.
    e = ask(w, chain, person=ALICE)
    assert (e.cookie, e.cookie_max_age, e.close) == (True, 86400, True)
    # Without a certificate the policy cannot hold; the token (binding off) still names the
    # person, so the denial is identity_denied (I8).
    assert ask(w, (), token=session).reasons == {"identity_denied"}
    # Minted for another certificate, the token brings nobody: a login is needed.
    stolen = dataclasses.replace(session, certificate="00" * 32)
    assert ask(w, chain, token=stolen).reasons == {"login_required"}
    # An expired or bogus session token brings nobody either: a login is needed again.
    assert ask(w, chain, token=session, at=session.exp).reasons == {"login_required"}
    bogus = dataclasses.replace(session, genuine=False)
    assert ask(w, chain, token=bogus).reasons == {"login_required"}
    # With a duration above zero the same token admits on its own (A4), as the person.
    w, chain = people_world(LOGIN_AND_CERTIFICATE)
    session = dataclasses.replace(session, certificate=model.sha256_hex(chain[0]))
    e = ask(w, chain, token=session)
    assert (e.admitted_by, e.person) == ("token", ALICE)


def test_service_tokens() -> None:
    made = model.ServiceToken("st-1", "client.access", "s3cret", T0 + dt.timedelta(hours=1))
    only = model.Policy("ci", "non_identity", (model.Rule("service_token", "st-1"),))
    w, _ = people_world(only, tokens=(made,))
    good = model.Credentials("client.access", "s3cret")
    e = ask(w, (), service_token=good)
    assert (e.status, e.admitted_by, e.service_token) == (200, "policy", "client.access")
    bad_secret = model.Credentials("client.access", "guess")
    assert ask(w, (), service_token=bad_secret).reasons == {"service_token_invalid"}
    unknown = model.Credentials("nobody.access", "s3cret")
    assert ask(w, (), service_token=unknown).reasons == {"service_token_invalid"}
    # Valid before its expiry instant, expired from it on (I11, as J1's exp).
    before = made.expires - dt.timedelta(seconds=1)
    assert ask(w, (), service_token=good, at=before).status == 200
    assert ask(w, (), service_token=good, at=made.expires).reasons == {"service_token_expired"}
    # A valid token that no policy admits is policy_denied (I11); none at all: no_certificate.
    other = model.Policy("other", "non_identity", (model.Rule("service_token", "st-2"),))
    w, _ = people_world(other, tokens=(made,))
    assert ask(w, (), service_token=good).reasons == {"policy_denied"}
    assert ask(w, ()).reasons == {"no_certificate"}
    anyone = model.Policy("any", "non_identity", (model.Rule("any_valid_service_token"),))
    w, _ = people_world(anyone, tokens=(made,))
    assert ask(w, (), service_token=good).status == 200


def test_a_bad_service_token_is_refused_rather_than_sent_to_log_in() -> None:
    made = model.ServiceToken("st-1", "client.access", "s3cret", T0 + dt.timedelta(hours=1))
    w, chain = people_world(model.Policy("people", "allow", (DOMAIN,)), tokens=(made,))
    e = ask(w, chain, service_token=model.Credentials("client.access", "guess"))
    assert (e.status, e.reasons) == (403, {"service_token_invalid"})
    assert ask(
        w, chain, service_token=model.Credentials("client.access", "guess"), browser=True
    ).reasons == {"service_token_invalid"}


def test_a_policy_every_person_satisfies_still_needs_the_login() -> None:
    # Kleene leaves it unknown; every person a login can bring (only idp-a) satisfies it; a
    # token is minted for a person, never for an absent one (I7).
    via_a = model.Policy("a", "allow", (model.Rule("login_method", IDP_A),))
    w, chain = people_world(via_a, providers=(IDP_A,))
    assert ask(w, chain).reasons == {"login_required"}
    # No provider at all: no login, the identity rule cannot hold.
    w, chain = people_world(via_a, providers=())
    assert ask(w, chain).reasons == {"policy_denied"}


def test_a_valid_service_token_is_a_machine_that_never_logs_in() -> None:
    made = model.ServiceToken("st-1", "c.access", "s", T0 + dt.timedelta(hours=1))
    both = model.Policy(
        "both", "allow", (DOMAIN,), require=(model.Rule("any_valid_service_token"),)
    )
    w, _ = people_world(both, tokens=(made,))
    machine = model.Credentials("c.access", "s")
    assert ask(w, (), service_token=machine).reasons == {"policy_denied"}
    assert ask(w, ()).reasons == {"no_certificate"}  # require cannot hold: no login either
    assert ask(w, (), service_token=machine, person=ALICE).status == 200


# ---- the model against enforcer/policy.py, pure: the three-valued evaluation -----------------


_VALUES = {
    "email": ["alice@example.com", "ALICE@example.com", "bob@other.test"],
    "email_domain": ["example.com", "other.test", "ample.com", "mail.example.com"],
    "group": ["engineering", "sales"],
    "login_method": [IDP_A, IDP_B],
    "service_token": ["st-1", "st-2"],
    "ip": ["127.0.0.0/8", "192.0.2.0/24"],
}
_KEYS = {
    "email": "email",
    "email_domain": "domain",
    "group": "name",
    "login_method": "id",
    "service_token": "token_id",
    "ip": "ip",
}
_PEOPLE = [
    ALICE,
    BOB,
    model.Person("carol@example.com", IDP_A, frozenset({"sales"})),
    model.Person("dave@mail.example.com", IDP_B, frozenset({"engineering", "sales"})),
]


@st.composite
def _rules(draw: st.DrawFn) -> model.Rule:
    kind = draw(st.sampled_from([*_VALUES, "everyone", "any_valid_service_token"]))
    return model.Rule(kind, draw(st.sampled_from(_VALUES[kind])) if kind in _VALUES else "")


@st.composite
def _policies(draw: st.DrawFn) -> model.Policy:
    return model.Policy(
        "p",
        draw(st.sampled_from(["allow", "non_identity"])),
        tuple(draw(st.lists(_rules(), min_size=1, max_size=3))),
        tuple(draw(st.lists(_rules(), max_size=2))),
        tuple(draw(st.lists(_rules(), max_size=2))),
    )


def _enforcer_policy(policy: model.Policy) -> object:
    from enforcer.policy import parse_policy

    def body(rule: model.Rule) -> dict[str, dict[str, str]]:
        return {rule.kind: {_KEYS[rule.kind]: rule.value} if rule.kind in _KEYS else {}}

    return parse_policy(
        {
            "name": policy.name,
            "decision": policy.decision,
            "include": [body(r) for r in policy.include],
            "require": [body(r) for r in policy.require],
            "exclude": [body(r) for r in policy.exclude],
        },
        "policy",
    )


@settings(
    max_examples=200 if os.environ.get("CI") else 500,
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
)
@given(
    _policies(),
    st.sampled_from([None, *_PEOPLE]),
    st.sampled_from([None, "st-1", "st-2"]),
    st.sampled_from(["127.0.0.1", "192.0.2.7"]),
)
def test_the_three_valued_evaluation_matches_enforcer_policy(
    policy: model.Policy, person: model.Person | None, token: str | None, ip: str
) -> None:
    """Two-valued with a person or a valid service token, three-valued otherwise: the model's
    I7 and enforcer/policy.py's must agree exactly."""
    import ipaddress

    from enforcer.identity import Identity
    from enforcer.policy import RequestFacts
    from enforcer.service_tokens import ServiceToken

    service = None
    model_token = None
    if token is not None:
        expires = T0 + dt.timedelta(hours=1)
        service = ServiceToken(token, token, f"{token}.access", "00" * 32, expires)
        model_token = model.ServiceToken(token, f"{token}.access", "", expires)
    identity = None
    if person is not None:
        identity = Identity(person.email, "sub", person.idp, tuple(sorted(person.groups)))
    facts = RequestFacts(None, ipaddress.ip_address(ip), identity, service)
    real = _enforcer_policy(policy).evaluate(facts, (IDP_A, IDP_B))  # type: ignore[attr-defined]
    app = model.App(APP_HOST, dt.timedelta(hours=24), (policy,), (IDP_A, IDP_B))
    mine = model.i7_policy_value(policy, app, model.Facts((), ip, person, model_token))
    assert real is mine
