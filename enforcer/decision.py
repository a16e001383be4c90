"""The access decision for one request: a pure function of the request, a snapshot and ``now``.

No I/O and no clock reads happen here (the sans-IO habit of h11): the TLS and HTTP layers
gather an :class:`AccessRequest`, validate the client chain with :func:`check_chain` (which
they may memoise per connection), and act on the :class:`AccessDecision` they get back.

Order of the checks (SPEC A2-A9):

1. ``Host`` must equal the connection's SNI name, else 421 ``misdirected``.
2. The hostname needs an application, else 404 ``no_application``.
3. A presented certificate that fails validation denies the request with its reason, whatever
   tokens or policies say: we fail closed, so nothing is ever admitted on a connection that
   carries an expired, revoked or untrusted certificate.
4. A valid token for this application admits while the session duration is above zero; a bad
   one is noted (``token_invalid`` / ``token_expired``) and the certificate path decides.
5. Policies, in order: the first that holds decides (``deny`` -> 403 ``policy_denied``,
   ``bypass`` -> forwarded without a token, ``non_identity`` / ``allow`` -> admitted with a
   token, and a cookie when the session duration is above zero).
6. Nothing matched: 403 with ``no_certificate`` when none was presented, else ``policy_denied``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography import x509

from enforcer.application import Application
from enforcer.chain import CertificateFacts, ChainResult, ValidationCache, validate_chain
from enforcer.policy import Decision, RequestFacts, first_match
from enforcer.reasons import Reason
from enforcer.snapshot import Snapshot
from enforcer.tokens import TokenMemo, TokenStatus, access_claims, check, mint


class AdmittedBy(enum.StrEnum):
    """What admitted a request."""

    CERTIFICATE = "certificate"
    TOKEN = "token"
    BYPASS = "bypass"
    POLICY = "policy"  # a non-certificate rule (everyone, ip) in a non_identity/allow policy


@dataclasses.dataclass(frozen=True)
class AccessRequest:
    """What the I/O layers know about one request."""

    sni: str | None
    host: str | None
    client_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    token: str | None = None


@dataclasses.dataclass(frozen=True)
class AccessDecision:
    """What to do with a request: the status, why, and what to forward or send back."""

    status: int
    reason: Reason | None = None
    detail: str = ""
    notes: tuple[Reason, ...] = ()
    application: Application | None = None
    policy: str | None = None
    admitted_by: AdmittedBy | None = None
    certificate: CertificateFacts | None = None
    token: str | None = None  # forwarded to the origin in Cf-Access-Jwt-Assertion
    set_cookie: str | None = None  # sent to the client
    close_connection: bool = False
    claims: Mapping[str, Any] | None = None

    @property
    def allowed(self) -> bool:
        """True when the request goes to the origin."""
        return self.admitted_by is not None


def normalise_hostname(name: str | None) -> str | None:
    """Lower-case a hostname and drop a port and a trailing dot (``Host: A.test:8443.``)."""
    if name is None:
        return None
    host = name.strip().lower()
    if host.startswith("["):  # IPv6 literal
        host = host.split("]", 1)[0] + "]"
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".") or None


def check_chain(
    snapshot: Snapshot,
    hostname: str,
    chain: Sequence[x509.Certificate],
    now: dt.datetime,
    cache: ValidationCache | None = None,
) -> ChainResult | None:
    """Validate a presented chain (leaf first) for ``hostname``; None when none was presented.

    ``cache``, owned by the caller, memoises successes (see :class:`ValidationCache`): a hit is
    re-checked against ``now`` and the snapshot's revocations before it is returned.
    """
    if not chain:
        return None
    trust = snapshot.trust.get(hostname)
    if trust is None:
        return ChainResult(
            None, Reason.UNTRUSTED_ISSUER, "no root is associated with this hostname"
        )
    key = b""
    if cache is not None:
        key = cache.key(trust, chain)
        hit = cache.lookup(key, snapshot.revoked, now)
        if hit is not None:
            return hit
    result = validate_chain(
        chain[0], chain[1:], trust, snapshot.known_intermediates, snapshot.revoked, now
    )
    if cache is not None:
        cache.store(key, result)
    return result


def still_valid(result: ChainResult, snapshot: Snapshot, now: dt.datetime) -> bool:
    """Tell whether a memoised successful validation still holds at ``now`` (SPEC A14)."""
    facts = result.facts
    return (
        facts is not None
        and facts.chain_valid_from <= now <= facts.chain_valid_until
        and facts.sha256 not in snapshot.revoked
    )


def decide(
    request: AccessRequest,
    snapshot: Snapshot,
    chain: ChainResult | None,
    now: dt.datetime,
    tokens: TokenMemo | None = None,
) -> AccessDecision:
    """Decide one request (SPEC A2-A9); ``chain`` is the presented chain's validation, if any.

    ``tokens``, owned by the caller, memoises token signature checks (see :class:`TokenMemo`).
    """
    sni = normalise_hostname(request.sni)
    host = normalise_hostname(request.host)
    if sni is None or host != sni:
        return AccessDecision(
            421, Reason.MISDIRECTED, f"Host {request.host!r} differs from SNI {request.sni!r}"
        )
    app = snapshot.applications.get(host)
    if app is None:
        return AccessDecision(404, Reason.NO_APPLICATION, f"no application for {host}")
    close = app.no_duration

    def deny(
        reason: Reason, detail: str, notes: Sequence[Reason], policy: str | None = None
    ) -> AccessDecision:
        return AccessDecision(
            403,
            reason,
            detail,
            tuple(notes),
            app,
            policy,
            certificate=chain.facts if chain is not None else None,
            close_connection=close,
        )

    notes: list[Reason] = []
    if chain is not None and not chain.valid:
        assert chain.reason is not None
        return deny(chain.reason, chain.detail, notes)
    facts = chain.facts if chain is not None else None

    if request.token is not None:
        if app.no_duration:
            notes.append(Reason.TOKEN_INVALID)  # a No Duration application never honours one
        else:
            checked = check(
                request.token,
                snapshot.keyring,
                aud=app.aud,
                issuer=snapshot.issuer,
                now=now,
                memo=tokens,
            )
            if checked.status is TokenStatus.EXPIRED:
                notes.append(Reason.TOKEN_EXPIRED)
            elif checked.status is TokenStatus.INVALID:
                notes.append(Reason.TOKEN_INVALID)
            elif app.bind_token_to_certificate and (
                facts is None
                or (checked.claims or {}).get("cnf", {}).get("x5t#S256") != facts.x5t_s256
            ):
                notes.append(Reason.TOKEN_INVALID)  # SPEC A10: bound to another certificate
            else:
                return AccessDecision(
                    200,
                    notes=tuple(notes),
                    application=app,
                    admitted_by=AdmittedBy.TOKEN,
                    certificate=facts,
                    token=request.token,
                    claims=checked.claims,
                )

    policy = first_match(app.policies, RequestFacts(facts, request.client_ip))
    if policy is None:
        if facts is None:
            return deny(Reason.NO_CERTIFICATE, "no client certificate and no valid token", notes)
        return deny(Reason.POLICY_DENIED, "no policy admits this certificate", notes)
    if policy.decision is Decision.DENY:
        return deny(
            Reason.POLICY_DENIED, f"deny policy {policy.name!r} matched", notes, policy.name
        )
    if policy.decision is Decision.BYPASS:
        return AccessDecision(
            200,
            notes=tuple(notes),
            application=app,
            policy=policy.name,
            admitted_by=AdmittedBy.BYPASS,
            certificate=facts,
            close_connection=close,
        )

    # An application's No Duration wins over a policy's duration: its TLS layer already refuses
    # resumption and closes every connection, and a cookie must never reach its clients (A9).
    if app.no_duration or policy.session_duration is None:
        duration = app.session_duration
    else:
        duration = policy.session_duration
    no_duration = duration <= dt.timedelta(0)
    claims = access_claims(
        aud=app.aud,
        issuer=snapshot.issuer,
        now=now,
        lifetime=snapshot.no_duration_token_lifetime if no_duration else duration,
        common_name=facts.common_name if facts else None,
        x5t_s256=facts.x5t_s256 if facts else None,
        serial=facts.serial if facts else None,
    )
    token = mint(snapshot.keyring, claims)
    return AccessDecision(
        200,
        notes=tuple(notes),
        application=app,
        policy=policy.name,
        admitted_by=AdmittedBy.CERTIFICATE if facts else AdmittedBy.POLICY,
        certificate=facts,
        token=token,
        set_cookie=None if no_duration else app.cookie.set_cookie(token, duration),
        close_connection=close or no_duration,
        claims=claims,
    )
