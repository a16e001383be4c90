"""The access decision for one request: a pure function of the request, a snapshot and ``now``.

No I/O and no clock reads happen here (the sans-IO habit of h11): the TLS and HTTP layers
gather an :class:`AccessRequest`, validate the client chain with :func:`check_chain` (which
they may memoise per connection), and act on the :class:`AccessDecision` they get back.

Order of the checks (access-flow A2-A9):

1. ``Host`` must equal the connection's SNI name, else 421 ``misdirected``.
2. The hostname needs an application, else 404 ``no_application``.
3. A presented certificate that fails validation denies the request with its reason, whatever
   tokens or policies say: we fail closed, so nothing is ever admitted on a connection that
   carries an expired, revoked or untrusted certificate. Revoked includes a serial listed in
   a CRL of its issuer or revoked by serial under its root (enforcer/crl.py); a CRL past its
   nextUpdate denies ``revocation_unknown``, or, under a root that fails open, admits with
   that note.
4. A valid token for this application admits while the session duration is above zero; a bad
   one is noted (``token_invalid`` / ``token_expired``) and the certificate path decides.
   Valid means, beyond its signature and times (:func:`enforcer.tokens.check`): the
   certificate it was minted for (its ``cnf.x5t#S256``) is not revoked; it was minted (``iat``)
   after the last time the operator ended the application's or the account's sessions; and
   when the request presents a certificate, the token was minted for that one. An application
   that binds tokens to certificates (the default) also refuses a token without a certificate.
5. Policies, in order: the first that holds decides (``deny`` -> 403 ``policy_denied``,
   ``bypass`` -> forwarded without a token, ``non_identity`` / ``allow`` -> admitted with a
   token, and a cookie when the session duration is above zero).
6. Nothing matched: 403 with ``no_certificate`` when none was presented, else ``policy_denied``.

Identity (access-flow I5-I11) adds inputs, not I/O: a presented service token is checked
against the snapshot's tokens (SHA-256 of the secret, constant-time, expiry at ``now``) before
step 4, and the person is the login callback's ``request.identity`` or the one a valid session
token names. Evaluation is three-valued (enforcer/policy.py): a policy that could hold after a
login, before any that holds, answers 401 ``login_required``; a known person nothing admits is
403 ``identity_denied``; a bad service token names the denial when nothing admits. Under No
Duration a session token never admits: a valid one, bound to the certificate presented, only
says who the person is, and a login's admitted decision sets an identity-only cookie (I9).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography import x509

from enforcer import service_tokens
from enforcer.application import Application
from enforcer.chain import CertificateFacts, ChainResult, ValidationCache, validate_chain
from enforcer.crl import Verdict as RevocationVerdict
from enforcer.identity import Identity, ServiceTokenCredentials
from enforcer.policy import Decision, RequestFacts, evaluate
from enforcer.reasons import Reason
from enforcer.service_tokens import ServiceToken
from enforcer.snapshot import Snapshot
from enforcer.tokens import (
    IDENTITY_ONLY_CLAIM,
    TokenMemo,
    TokenStatus,
    access_claims,
    check,
    identity_of,
    mint,
)


class AdmittedBy(enum.StrEnum):
    """What admitted a request."""

    CERTIFICATE = "certificate"
    TOKEN = "token"
    BYPASS = "bypass"
    POLICY = "policy"  # a non-certificate rule (everyone, ip) in a non_identity/allow policy
    IDENTITY = "identity"  # a policy, for a person whose identity is known (login or token)
    SERVICE_TOKEN = "service_token"  # a policy, for a request with a valid service token


@dataclasses.dataclass(frozen=True)
class AccessRequest:
    """What the I/O layers know about one request."""

    sni: str | None
    host: str | None
    client_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    token: str | None = None
    # A person's identity just established by a login (the callback route); afterwards it
    # arrives inside ``token``.
    identity: Identity | None = None
    service_token: ServiceTokenCredentials | None = None


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
    identity: Identity | None = None  # the person admitted (from a login or the token)

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
            return _with_revocation(hit, snapshot, now)
    result = validate_chain(
        chain[0], chain[1:], trust, snapshot.known_intermediates, snapshot.revoked, now
    )
    if cache is not None:
        cache.store(key, result)
    return _with_revocation(result, snapshot, now)


def _revocation(
    facts: CertificateFacts, snapshot: Snapshot, now: dt.datetime
) -> RevocationVerdict | None:
    """What the CRLs and revocations by serial say about a validated chain (none: None)."""
    if not snapshot.revocation:
        return None  # no CRL and no serial revoked anywhere: nothing to look up
    return snapshot.revocation.check(facts.issued_by, facts.root_sha256, facts.serial, now)


def _with_revocation(result: ChainResult, snapshot: Snapshot, now: dt.datetime) -> ChainResult:
    # Applied after the validation cache, never stored in it: a CRL can change (or go past its
    # nextUpdate) while the chain itself stays valid.
    if result.facts is None:
        return result
    verdict = _revocation(result.facts, snapshot, now)
    if verdict is None or verdict.admitted:
        return result
    return ChainResult(None, verdict.reason, verdict.detail)


def still_valid(result: ChainResult, snapshot: Snapshot, now: dt.datetime) -> bool:
    """Tell whether a memoised successful validation still holds at ``now`` (access-flow A14)."""
    facts = result.facts
    return (
        facts is not None
        and facts.chain_valid_from <= now <= facts.chain_valid_until
        and facts.sha256 not in snapshot.revoked
        and ((verdict := _revocation(facts, snapshot, now)) is None or verdict.admitted)
    )


def token_refusal(
    claims: Mapping[str, Any],
    app: Application,
    snapshot: Snapshot,
    facts: CertificateFacts | None,
    now: dt.datetime | None = None,
) -> str | None:
    """Say why a token whose signature and times hold may not admit this request, or None.

    Run on every use of a token, memoised or not: a few set or dict lookups, no decoding.
    """
    nonce = claims.get("identity_nonce")
    if nonce and nonce in snapshot.ended_identity_nonces:
        return "its session was ended by a logout (access-flow I10)"
    idp = claims.get("idp")
    if isinstance(idp, Mapping) and idp.get("id") not in app.identity_providers:
        # A person's session lasts only while their provider may log them in here: deleting
        # the provider, or dropping it from allowed_idps, ends its sessions (I8).
        return f"its identity provider {str(idp.get('id'))[:64]!r} no longer logs users in here"
    cnf = claims.get("cnf")
    minted_for = cnf.get("x5t#S256") if isinstance(cnf, Mapping) else None
    if minted_for is not None and minted_for in snapshot.revoked_x5t:
        return "the certificate it was minted for is revoked"
    if snapshot.revocation and now is not None:
        # A token names its certificate's serial but not its issuer: it is refused when the
        # serial is revoked under any root associated with the application's hostname (the
        # roots its certificate was validated against), see enforcer/crl.py.
        refused = snapshot.revocation.token_refusal(app.hostname, claims.get("serial_number"), now)
        if refused is not None:
            return refused
    cutoff = snapshot.session_cutoffs.get(app.hostname)
    if cutoff is not None:
        iat = claims.get("iat")
        if isinstance(iat, bool) or not isinstance(iat, int | float) or iat < cutoff:
            return "minted before the application's (or account's) sessions were ended"
    if facts is not None:
        # Whatever the binding setting: a token never lends its identity to another
        # certificate (the origin would get one device's token with another's certificate).
        if minted_for is None:
            return "minted without a certificate, and a certificate was presented"
        if minted_for != facts.x5t_s256:
            return "minted for another certificate than the one presented"
    elif app.bind_token_to_certificate:
        return "bound to a certificate and none was presented (access-flow A10)"
    return None


def decide(
    request: AccessRequest,
    snapshot: Snapshot,
    chain: ChainResult | None,
    now: dt.datetime,
    tokens: TokenMemo | None = None,
    *,
    issue_token: bool = True,
) -> AccessDecision:
    """Decide one request (access-flow A2-A9); ``chain``: the presented chain's validation, if any.

    ``tokens``, owned by the caller, memoises token signature checks (see :class:`TokenMemo`).
    ``issue_token=False`` decides without signing the token an admission would carry (its
    claims are still built): for a caller that only needs the verdict, such as an open
    tunnel's re-check, since a signature (RSA by default) costs more than the rest together.
    """
    sni = normalise_hostname(request.sni)
    host = normalise_hostname(request.host)
    if sni is None or host != sni:
        # The connection belongs to the SNI's application: under No Duration every answer on it
        # closes it (A9), a misdirected one included, so no second request rides that handshake.
        sni_app = snapshot.applications.get(sni) if sni is not None else None
        return AccessDecision(
            421,
            Reason.MISDIRECTED,
            f"Host {request.host!r} differs from SNI {request.sni!r}",
            close_connection=sni_app is not None and sni_app.no_duration,
        )
    app = snapshot.applications.get(host)
    if app is None:
        return AccessDecision(404, Reason.NO_APPLICATION, f"no application for {host}")
    close = app.no_duration

    def deny(
        reason: Reason,
        detail: str,
        notes: Sequence[Reason],
        policy: str | None = None,
        identity: Identity | None = None,  # who was denied, for the access log
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
            identity=identity,
        )

    notes: list[Reason] = []
    token_detail = ""  # why a presented token did not admit, for the access log
    if chain is not None and not chain.valid:
        assert chain.reason is not None
        return deny(chain.reason, chain.detail, notes)
    facts = chain.facts if chain is not None else None
    admitted_detail = ""  # for the access log of an admitted request
    if facts is not None and (verdict := _revocation(facts, snapshot, now)) is not None:
        # Only an admitting verdict gets here (check_chain turned the others into denials):
        # a CRL past its nextUpdate under a root that fails open. The log says so.
        notes.append(verdict.reason)
        admitted_detail = verdict.detail

    # Service token (I11): checked before anything admits, so that a bad one is noted even
    # when a cookie admits, and names the denial when nothing does.
    service_token: ServiceToken | None = None
    service_refusal: tuple[Reason, str] | None = None
    if request.service_token is not None:
        service_token, service_refusal = _service_token(request.service_token, app, snapshot, now)
        if service_refusal is not None:
            notes.append(service_refusal[0])

    # The person: just logged in (the callback), or named by a session token (I5, I8, I9).
    identity = request.identity
    token_identity = False  # the identity came from a presented token
    # A login just made wins over any session the browser still holds (another person's).
    if request.token is not None and identity is None:
        checked = check(
            request.token,
            snapshot.keyring,
            aud=app.aud,
            issuer=snapshot.issuer,
            now=now,
            memo=tokens,
        )
        refused = None
        if checked.status is TokenStatus.VALID:
            refused = token_refusal(checked.claims or {}, app, snapshot, facts, now)
        claims = checked.claims or {}
        person = identity_of(claims) if checked.status is TokenStatus.VALID else None
        identity_only = app.no_duration or claims.get(IDENTITY_ONLY_CLAIM) is True
        usable = checked.status is TokenStatus.VALID and refused is None
        if identity_only and usable and person is not None:
            # I9: the session token never admits on its own under No Duration, but a valid
            # one, bound to the certificate just presented, says who the person is.
            if identity is None:
                identity = person
                token_identity = True
        elif app.no_duration:
            notes.append(Reason.TOKEN_INVALID)  # a No Duration application honours no token
            token_detail = "a No Duration application honours no token"
            if not usable:
                token_detail += f" ({refused or checked.detail})"
        elif checked.status is TokenStatus.EXPIRED:
            notes.append(Reason.TOKEN_EXPIRED)
            token_detail = checked.detail
        elif not usable or identity_only:
            notes.append(Reason.TOKEN_INVALID)
            token_detail = refused or checked.detail or "an identity-only token never admits"
        else:
            return AccessDecision(
                200,
                detail=admitted_detail,
                notes=tuple(notes),
                application=app,
                admitted_by=AdmittedBy.TOKEN,
                certificate=facts,
                token=request.token,
                claims=checked.claims,
                identity=person,
            )

    evaluation = evaluate(
        app.policies,
        RequestFacts(facts, request.client_ip, identity, service_token),
        app.identity_providers,
    )
    policy = evaluation.policy
    if policy is None:
        if service_refusal is not None:
            # A machine that presented a bad service token: it cannot log in either (I11).
            return deny(*service_refusal, notes, identity=identity)
        if evaluation.login_needed_by is not None:
            needs = evaluation.login_needed_by.name
            return AccessDecision(
                401,
                Reason.LOGIN_REQUIRED,
                f"policy {needs!r} needs a login",
                tuple(notes),
                app,
                needs,
                certificate=facts,
                close_connection=close,
            )
        if service_token is not None:
            return deny(
                Reason.POLICY_DENIED, f"no policy admits service token {service_token.id}", notes
            )
        if identity is not None:
            return deny(
                Reason.IDENTITY_DENIED,
                f"no policy admits {identity.email}",
                notes,
                identity=identity,
            )
        if facts is None:
            detail = "no client certificate and no valid token"
            if token_detail:
                detail += f" (token: {token_detail})"
            return deny(Reason.NO_CERTIFICATE, detail, notes)
        return deny(Reason.POLICY_DENIED, "no policy admits this certificate", notes)
    if policy.decision is Decision.DENY:
        return deny(
            Reason.POLICY_DENIED,
            f"deny policy {policy.name!r} matched",
            notes,
            policy.name,
            identity,
        )
    if policy.decision is Decision.BYPASS:
        return AccessDecision(
            200,
            detail=admitted_detail,
            notes=tuple(notes),
            application=app,
            policy=policy.name,
            admitted_by=AdmittedBy.BYPASS,
            certificate=facts,
            close_connection=close,
            identity=identity,
        )

    # An application's No Duration wins over a policy's duration: its TLS layer already refuses
    # resumption and closes every connection, and a cookie must never reach its clients (A9).
    if app.no_duration or policy.session_duration is None:
        duration = app.session_duration
    else:
        duration = policy.session_duration
    no_duration = duration <= dt.timedelta(0)
    idp = snapshot.identity_providers.get(identity.idp) if identity is not None else None

    def claims_for(lifetime: dt.timedelta, identity_only: bool = False) -> dict[str, Any]:
        return access_claims(
            aud=app.aud,
            issuer=snapshot.issuer,
            now=now,
            lifetime=lifetime,
            common_name=(
                service_token.client_id if service_token else facts.common_name if facts else None
            ),
            x5t_s256=facts.x5t_s256 if facts else None,
            serial=facts.serial if facts else None,
            identity=identity,
            idp_type=idp.type if idp is not None else "oidc",
            service_token_id=service_token.id if service_token else None,
            identity_only=identity_only,
        )

    claims = claims_for(snapshot.no_duration_token_lifetime if no_duration else duration)
    # The application's account picks the key (its token algorithm, access-flow J7).
    token = mint(snapshot.keyring, claims, app.account) if issue_token else None
    set_cookie = None if no_duration or token is None else app.cookie.set_cookie(token, duration)
    if issue_token and no_duration and identity is not None and not token_identity:
        # I9: a person just logged in under No Duration gets a cookie that carries the identity
        # only (it never admits alone), for the policy's duration, else 24 hours.
        lifetime = policy.session_duration or IDENTITY_SESSION_DEFAULT
        if lifetime <= dt.timedelta(0):
            lifetime = IDENTITY_SESSION_DEFAULT
        session = mint(snapshot.keyring, claims_for(lifetime, identity_only=True), app.account)
        set_cookie = app.cookie.set_cookie(session, lifetime)
    if service_token is not None:
        admitted_by = AdmittedBy.SERVICE_TOKEN
    elif identity is not None:
        admitted_by = AdmittedBy.IDENTITY
    else:
        admitted_by = AdmittedBy.CERTIFICATE if facts else AdmittedBy.POLICY
    return AccessDecision(
        200,
        detail=admitted_detail,
        notes=tuple(notes),
        application=app,
        policy=policy.name,
        admitted_by=admitted_by,
        certificate=facts,
        token=token,
        set_cookie=set_cookie,
        close_connection=close or no_duration,
        claims=claims,
        identity=identity,
    )


# The identity cookie's lifetime under No Duration when the policy sets none (I9).
IDENTITY_SESSION_DEFAULT = dt.timedelta(hours=24)


def _service_token(
    presented: ServiceTokenCredentials, app: Application, snapshot: Snapshot, now: dt.datetime
) -> tuple[ServiceToken | None, tuple[Reason, str] | None]:
    """The valid service token a request presents for ``app``, or why it is refused (I11)."""
    verdict, token, detail = service_tokens.check(presented, snapshot.service_tokens, now)
    if token is not None and app.account and token.account and token.account != app.account:
        # Another account's token is as unknown here as one never created.
        verdict, detail = service_tokens.TokenVerdict.INVALID, "unknown service token client id"
    if verdict is service_tokens.TokenVerdict.VALID:
        return token, None
    if verdict is service_tokens.TokenVerdict.EXPIRED:
        return None, (Reason.SERVICE_TOKEN_EXPIRED, detail)
    return None, (Reason.SERVICE_TOKEN_INVALID, f"{detail} ({presented.client_id[:64]!r})")
