"""Chain validation reasons, one second either side of every boundary (pure, no sockets)."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from devices.pki import Issued, issue_ca, issue_leaf
from enforcer.chain import HostTrust, fingerprint, validate_chain
from enforcer.reasons import Reason

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
SECOND = dt.timedelta(seconds=1)


@pytest.fixture(scope="module")
def pki() -> dict[str, Issued]:
    root = issue_ca("root", NOW)
    inter = issue_ca("intermediate", NOW, issuer=root, path_length=0)
    other_root = issue_ca("other root", NOW)
    other_inter = issue_ca("other intermediate", NOW, issuer=other_root)
    return {"root": root, "inter": inter, "other_root": other_root, "other_inter": other_inter}


def leaf(pki: dict[str, Issued], **kw: object) -> Issued:
    args: dict[str, object] = {"not_before": NOW - DAY, "not_after": NOW + DAY}
    args.update(kw)
    issuer = args.pop("issuer", pki["inter"])
    return issue_leaf("device-001", issuer, **args)  # type: ignore[arg-type]


def check(
    pki, device: Issued, presented=("inter",), uploaded=(), known=(), revoked=frozenset(), at=NOW
):
    trust = HostTrust.build([pki["root"].certificate], [pki[n].certificate for n in uploaded])
    return validate_chain(
        device.certificate,
        [pki[n].certificate for n in presented],
        trust,
        [pki[n].certificate for n in known],
        revoked,
        at,
    )


def test_valid_chain_gives_facts(pki) -> None:
    device = leaf(pki)
    result = check(pki, device)
    assert result.valid and result.facts is not None
    assert result.facts.common_name == "device-001"
    assert result.facts.issuer_sha256 == fingerprint(pki["inter"].certificate)
    assert result.facts.root_sha256 == fingerprint(pki["root"].certificate)


def test_expiry_boundary(pki) -> None:
    device = leaf(pki)
    end = device.certificate.not_valid_after_utc
    assert check(pki, device, at=end).valid
    assert check(pki, device, at=end + SECOND).reason is Reason.CERTIFICATE_EXPIRED


def test_not_before_boundary(pki) -> None:
    device = leaf(pki)
    start = device.certificate.not_valid_before_utc
    assert check(pki, device, at=start).valid
    assert check(pki, device, at=start - SECOND).reason is Reason.CERTIFICATE_NOT_YET_VALID


def test_expired_intermediate_is_expired(pki) -> None:
    short_inter = issue_ca(
        "short intermediate", NOW, issuer=pki["root"], days=2, not_before=NOW - DAY
    )
    pki = {**pki, "short": short_inter}
    device = leaf(pki, issuer=short_inter, not_after=NOW + 300 * DAY)
    assert check(pki, device, presented=("short",)).valid
    later = short_inter.certificate.not_valid_after_utc + SECOND
    assert check(pki, device, presented=("short",), at=later).reason is Reason.CERTIFICATE_EXPIRED


def test_untrusted_issuer(pki) -> None:
    device = leaf(pki, issuer=pki["other_inter"])
    assert check(pki, device, presented=("other_inter",)).reason is Reason.UNTRUSTED_ISSUER


def test_expired_and_untrusted_is_untrusted(pki) -> None:
    device = leaf(pki, issuer=pki["other_inter"], not_after=NOW - SECOND)
    assert check(pki, device, presented=("other_inter",)).reason is Reason.UNTRUSTED_ISSUER


def test_uploaded_intermediate_completes_a_leaf_alone(pki) -> None:
    assert check(pki, leaf(pki), presented=(), uploaded=("inter",)).valid


def test_missing_intermediate(pki) -> None:
    device = leaf(pki)
    assert check(pki, device, presented=(), known=("inter",)).reason is Reason.MISSING_INTERMEDIATE
    assert check(pki, device, presented=(), known=()).reason is Reason.UNTRUSTED_ISSUER


def test_server_auth_only_eku_is_an_invalid_chain(pki) -> None:
    device = leaf(pki, eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    result = check(pki, device)
    assert result.reason is Reason.INVALID_CHAIN
    assert "EKU" in result.detail


def test_a_ca_certificate_as_leaf_is_an_invalid_chain(pki) -> None:
    result = validate_chain(
        pki["inter"].certificate,
        [],
        HostTrust.build([pki["root"].certificate], []),
        [],
        frozenset(),
        NOW,
    )
    assert result.reason is Reason.INVALID_CHAIN


def test_path_length_is_enforced(pki) -> None:
    # The intermediate has pathLen 0: a CA below it may not issue.
    sub = issue_ca("sub", NOW, issuer=pki["inter"])
    device = leaf({**pki, "sub": sub}, issuer=sub)
    result = check({**pki, "sub": sub}, device, presented=("sub", "inter"))
    assert result.reason is Reason.INVALID_CHAIN


def test_revoked(pki) -> None:
    device = leaf(pki)
    revoked = frozenset({fingerprint(device.certificate)})
    assert check(pki, device, revoked=revoked).reason is Reason.REVOKED
    assert check(pki, leaf(pki), revoked=revoked).valid


@pytest.mark.parametrize("key_type", ["ec-p256", "ec-p384", "rsa-2048"])
def test_device_key_types(pki, key_type: str) -> None:
    assert check(pki, leaf(pki, key_type=key_type)).valid


def test_an_ed25519_device_key_is_outside_the_profile(pki) -> None:
    # The profile (access-flow, validation profile): RSA and EC keys only, the leaf's included.
    result = check(pki, leaf(pki, key_type="ed25519"))
    assert result.reason is Reason.UNSUPPORTED_KEY
    assert "Ed25519" in result.detail


def test_a_leaf_without_san_is_accepted(pki) -> None:
    # IoT device certificates often carry only a CN; the web PKI profile would demand a SAN.
    device = leaf(pki)
    assert check(pki, device).facts.san_dns == ()
