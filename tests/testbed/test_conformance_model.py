"""The conformance model itself: hand-made cases with known answers (no network)."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

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
) -> tuple[model.World, tuple]:
    spec = spec or PkiSpec()
    pki = build_pki(spec, T0)
    roots = [model.Root(pki.root, pki.uploaded, frozenset(spec.root_hostnames))]
    if pki.decoy is not None:
        roots.append(
            model.Root(pki.decoy, pki.decoy_uploaded, frozenset(spec.decoy_hostnames or ()))
        )
    apps = {
        APP_HOST: model.App(APP_HOST, duration, policies),
        OTHER_HOST: model.App(OTHER_HOST, dt.timedelta(hours=24), (VALID,)),
    }
    assert pki.leaf is not None
    return model.World(tuple(roots), apps), (pki.leaf, *pki.presented)


def ask(w: model.World, chain: tuple, **kw: object) -> model.Expected:
    request = model.Request(APP_HOST, APP_HOST, chain)
    return model.expect(w, dataclasses.replace(request, **kw), kw.pop("at", T0))  # type: ignore[arg-type]


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
