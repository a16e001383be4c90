"""Drive one case over real TLS and compare every answer with the model.

For one provisioned case the runner makes, in order:

1. ``fresh``: a new connection and the drawn first request (maybe with a junk token);
2. the clock moves (when the target's clock can move) to the drawn jump;
3. ``kept-alive``: a second request on the same connection, unless the server closed it;
4. ``resumed``: a new connection resuming the first one's TLS session;
5. token replays, when the first request was admitted with a token: the token alone on the
   same application, on the other application, and tampered with.

Each answer is checked against :func:`model.expect` (status, reason, cookie, Max-Age,
Connection: close) and against the safety property :func:`model.forbidden_admission`; No
Duration hostnames must also refuse TLS resumption (A9).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import json
import secrets
import ssl
import urllib.parse
from collections.abc import Sequence
from typing import Any, Protocol

from cryptography import x509

from testbed.conformance import model
from testbed.conformance.strategies import (
    APP_HOST,
    OTHER_HOST,
    PEOPLE,
    Capabilities,
    CaseSpec,
)
from testbed.conformance.wire import AnyConnection, Observed, WireError, open_connection


class Divergence(AssertionError):
    """The target answered differently from the model; the message is the readable case."""


@dataclasses.dataclass(frozen=True)
class Provisioned:
    """A case as provisioned on a target: the model's world and the client's credentials."""

    t0: dt.datetime
    world: model.World
    chain: tuple[x509.Certificate, ...]  # leaf + the intermediates the client sends
    context_with_cert: ssl.SSLContext
    context_without_cert: ssl.SSLContext
    summary: str  # the PKI and application, for reports


class Target(Protocol):
    """What the runner needs from a target."""

    name: str
    caps: Capabilities
    address: tuple[str, int]

    def provision(self, spec: CaseSpec) -> Provisioned:
        """Configure the target for a case and return what the client and model need."""
        ...

    def set_time(self, at: dt.datetime) -> None:
        """Move the target's clock (targets without a clock ignore it)."""
        ...

    def now(self) -> dt.datetime:
        """The target's current time (its injected clock, or the wall clock)."""
        ...


@dataclasses.dataclass
class Step:
    """One request of a case: what was sent, when, what the model expected, what came back."""

    name: str
    request: model.Request
    at: dt.datetime
    expected: model.Expected
    observed: Observed | None
    problems: list[str]
    note: str = ""

    def render(self, t0: dt.datetime) -> str:
        """A readable block for a divergence report."""
        r = self.request
        offset = (self.at - t0).total_seconds()
        sent = f"SNI {r.sni}, Host {r.host}, {'certificate' if r.chain else 'no certificate'}" + (
            f", token for {r.token.app_host} ({'genuine' if r.token.genuine else 'bogus'})"
            if r.token
            else ""
        )
        if r.token is not None and r.token.person is not None:
            bound = "no certificate" if r.token.certificate is None else r.token.certificate[:12]
            sent += f" naming {r.token.person.email} (bound to {bound}, exp {r.token.exp:%H:%M:%S})"
        if r.person is not None:
            sent += f", logged in as {r.person.email} via {r.person.idp}"
        if r.service_token is not None:
            sent += f", service token {r.service_token.client_id[:12]}..."
        if r.browser:
            sent += ", Accept: text/html"
        note = f" ({self.note})" if self.note else ""
        lines = [f"  [{self.name}] at t0{offset:+.0f}s: {sent}{note}"]
        lines.append(f"      expected: {self.expected.describe()}")
        if self.observed is not None:
            o = self.observed
            got = [str(o.status)]
            if o.reason:
                got.append(o.reason)
            got.append(f"cookie Max-Age={o.max_age}" if o.cookie else "no cookie")
            if o.closed:
                got.append("GOAWAY" if o.protocol == "HTTP/2" else "Connection: close")
            lines.append(f"      observed: {', '.join(got)}")
        for p in self.problems:
            lines.append(f"      DIVERGENCE: {p}")
        return "\n".join(lines)


def compare(
    step: Step, caps: Capabilities, world: model.World, leaf: x509.Certificate | None
) -> None:
    """Fill ``step.problems`` with every way the observation differs from the model."""
    exp, obs, problems = step.expected, step.observed, step.problems
    if obs is None:
        return
    unsafe = model.forbidden_admission(world, step.request, step.at)
    admitted = obs.status == 200
    if admitted and unsafe:
        problems.append(f"SAFETY: admitted although {unsafe}")
    if not caps.reasons:
        # nginx and the like: only whether the request got in can be compared.
        if admitted != exp.admitted:
            problems.append(
                f"{'admitted' if admitted else 'refused'} (status {obs.status}), "
                f"the model {'admits' if exp.admitted else 'refuses'}"
            )
        return
    if (obs.status, obs.reason) in exp.also:
        return  # another refusal the document allows (see model.Expected.also)
    if obs.status != exp.status:
        problems.append(f"status {obs.status}, expected {exp.status}")
    if exp.redirect:
        # I7: to the login route on this hostname, with the request's path ("/") to return to.
        location = obs.header("location") or ""
        target = urllib.parse.urlsplit(location)
        back = urllib.parse.parse_qs(target.query).get("redirect_url")
        if obs.status == 302 and (target.path != "/cdn-cgi/access/login" or back != ["/"]):
            problems.append(
                f"redirected to {location!r}, not to /cdn-cgi/access/login?redirect_url=/ (I7)"
            )
        return
    if exp.reasons and obs.reason not in exp.reasons:
        problems.append(f"reason {obs.reason!r}, expected one of {sorted(exp.reasons)}")
    if not exp.reasons and obs.reason is not None:
        problems.append(f"reason header {obs.reason!r} on an admitted request")
    if admitted:
        problems.extend(_forwarding_problems(step, exp, obs, caps))
    if not caps.tokens:
        return
    if exp.cookie is not None and bool(obs.cookie) != exp.cookie:
        problems.append("a cookie was set" if obs.cookie else "no cookie was set")
    if obs.cookie and exp.cookie and exp.cookie_max_age is not None:
        if obs.max_age != exp.cookie_max_age:
            problems.append(f"cookie Max-Age {obs.max_age}, expected {exp.cookie_max_age}")
        problems.extend(
            _claim_problems(obs.cookie, exp, caps, leaf if step.request.chain else None)
        )
    if exp.close and not obs.closed:
        needed = (
            "a GOAWAY admitting no further stream"
            if caps.transport == "h2"
            else "Connection: close"
        )
        problems.append(
            f"the connection was kept open (access-flow A9: No Duration needs {needed})"
        )


def _forwarding_problems(
    step: Step, exp: model.Expected, obs: Observed, caps: Capabilities
) -> list[str]:
    """I8, I11: the person's email reaches the origin; a service token's headers never do."""
    headers = obs.forwarded_headers()
    if headers is None:
        return []  # answered in process, or an origin that does not echo
    out = []
    if caps.email_header and exp.admitted_by != "bypass":
        email = headers.get("cf-access-authenticated-user-email")
        want = exp.person.email if exp.person is not None else None
        if email != want:
            out.append(
                f"the origin got Cf-Access-Authenticated-User-Email {email!r}, "
                f"expected {want!r} (I8)"
            )
    leaked = sorted({"cf-access-client-id", "cf-access-client-secret"} & set(headers))
    if leaked:
        out.append(f"the service token's headers {leaked} reached the origin (I11)")
    return out


def _claim_problems(
    token: str, exp: model.Expected, caps: Capabilities, leaf: x509.Certificate | None
) -> list[str]:
    """A7/A8: the cookie's JWT carries the required claims, exp = iat + duration."""
    try:
        payload = token.split(".")[1]
        claims: dict[str, Any] = json.loads(
            base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        )
    except (IndexError, ValueError):
        return ["the cookie does not hold a JWT"]
    out = []
    missing = {"aud", "iss", "iat", "nbf", "exp", "type", "sub", "common_name"} - set(claims)
    if missing:
        out.append(f"token claims missing: {sorted(missing)}")
    if claims.get("type") != "app":
        out.append(f"token type {claims.get('type')!r}, expected 'app'")
    if (
        caps.clock
        and exp.token_exp is not None
        and claims.get("exp") != int(exp.token_exp.timestamp())
    ):
        out.append(f"token exp {claims.get('exp')}, expected {int(exp.token_exp.timestamp())}")
    if leaf is not None:
        want = base64.urlsafe_b64encode(bytes.fromhex(model.sha256_hex(leaf))).rstrip(b"=").decode()
        if claims.get("cnf", {}).get("x5t#S256") != want:
            out.append("token cnf.x5t#S256 is not the leaf's SHA-256 (RFC 8705)")
    person = exp.person
    if person is not None:
        # I8: the session token carries the person beside the certificate binding.
        idp = claims.get("idp")
        if claims.get("email") != person.email:
            out.append(f"token email {claims.get('email')!r}, expected {person.email!r} (I8)")
        if not isinstance(idp, dict) or idp.get("id") != person.idp:
            out.append(f"token idp {idp!r}, expected id {person.idp!r} (I8)")
        if sorted(claims.get("groups") or []) != sorted(person.groups):
            out.append(f"token groups {claims.get('groups')!r}, expected {sorted(person.groups)}")
        if not claims.get("identity_nonce"):
            out.append("token has no identity_nonce (I8)")
    elif "email" in claims:
        out.append(f"token names a person ({claims['email']!r}) although nobody logged in")
    if (
        exp.service_token is not None
        and leaf is None
        and claims.get("common_name") != exp.service_token
    ):
        out.append(
            f"token common_name {claims.get('common_name')!r}, expected the service "
            f"token's client id {exp.service_token!r} (I11)"
        )
    return out


def _unverified_exp(token: str | None) -> dt.datetime | None:
    """A JWT's ``exp``, read without verifying it (the model is told what the token says)."""
    try:
        payload = (token or "").split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return dt.datetime.fromtimestamp(int(claims["exp"]), dt.UTC)
    except (IndexError, ValueError, KeyError, TypeError):
        return None


def _tamper(token: str) -> str:
    head, payload, sig = [*token.split("."), "", ""][:3]
    i = len(payload) // 2
    flipped = "A" if payload[i : i + 1] != "A" else "B"
    return ".".join([head, payload[:i] + flipped + payload[i + 1 :], sig])


def jump_target(
    spec: CaseSpec,
    t0: dt.datetime,
    first: model.Expected,
    chain: Sequence[x509.Certificate],
    world: model.World | None = None,
) -> dt.datetime:
    """The time of the later steps: the drawn jump, resolved against this case's boundaries."""
    second = dt.timedelta(seconds=1)
    fixed = {"none": 0, "second": 1, "hour": 3600, "day": 86400, "month": 30 * 86400}
    if spec.jump in fixed:
        return t0 + dt.timedelta(seconds=fixed[spec.jump])
    leaf = chain[0] if chain else None
    candidates: dict[str, dt.datetime | None] = {
        "token_exp_minus_1s": first.token_exp - second if first.token_exp else None,
        "token_exp": first.token_exp,
        "leaf_not_after": leaf.not_valid_after_utc if leaf else None,
        "leaf_not_after_plus_1s": leaf.not_valid_after_utc + second if leaf else None,
        "leaf_not_before": leaf.not_valid_before_utc if leaf else None,
        "first_window_edge_plus_1s": min(
            (c.not_valid_after_utc for c in chain if c.not_valid_after_utc >= t0), default=t0
        )
        + second,
    }
    # The service token that expires within a case (the shortest-lived one).
    short = min((t.expires for t in world.service_tokens), default=None) if world else None
    candidates["st_short_expiry"] = short
    candidates["st_short_expiry_plus_1s"] = short + second if short else None
    at = candidates.get(spec.jump) or t0
    return max(at, t0)  # the clock never runs backwards within a case


@dataclasses.dataclass
class CaseRun:
    """The outcome of one case."""

    spec: CaseSpec
    provisioned: Provisioned
    steps: list[Step]

    @property
    def divergent(self) -> bool:
        """True when any step diverged."""
        return any(s.problems for s in self.steps)

    def report(self, target: str) -> str:
        """The readable case: PKI, application, every step, expected and observed."""
        lines = [
            f"target: {target}",
            f"case spec: {self.spec!r}",
            self.provisioned.summary,
            "steps:",
        ]
        lines += [s.render(self.provisioned.t0) for s in self.steps]
        return "\n".join(lines)


def run_case(target: Target, spec: CaseSpec) -> CaseRun:
    """Provision ``spec`` on ``target``, make the requests, and compare each with the model."""
    prov = target.provision(spec)
    caps, world, t0 = target.caps, prov.world, prov.t0
    target.set_time(t0)
    req = spec.request
    host = req.sni
    if req.host_differs:
        host = OTHER_HOST if req.sni == APP_HOST else APP_HOST
    chain = prov.chain if req.present_certificate else ()
    leaf = prov.chain[0] if prov.chain else None
    ctx = prov.context_with_cert if req.present_certificate else prov.context_without_cert
    steps: list[Step] = []
    run = CaseRun(spec, prov, steps)

    def step(
        name: str,
        request: model.Request,
        at: dt.datetime,
        conn: AnyConnection,
        headers: Sequence[tuple[str, str]] = (),
        note: str = "",
        expected: model.Expected | None = None,
    ) -> Step:
        expected = expected or model.expect(world, request, at)
        try:
            observed: Observed | None = conn.request(request.host, headers=headers)
            problems: list[str] = []
        except WireError as exc:
            observed, problems = None, [f"no response: {exc}"]
        s = Step(name, request, at, expected, observed, problems, note)
        compare(s, caps, world, leaf)
        steps.append(s)
        return s

    now = t0 if caps.clock else target.now()
    junk = (
        model.Token(APP_HOST, now + dt.timedelta(days=1), genuine=False) if req.junk_token else None
    )
    first_request = model.Request(req.sni, host, chain, junk)
    first_headers = [("cookie", "CF_Authorization=not.a.token")] if junk else []
    first_request, extra, session_headers = _identity_inputs(target, spec, first_request, leaf, now)
    first_headers += session_headers
    try:
        conn = open_connection(caps.transport, target.address, req.sni, ctx)
    except (ssl.SSLError, OSError) as exc:
        # A1: a handshake must not abort over the client certificate; report, don't crash.
        expected = model.expect(world, first_request, now)
        problem = f"TLS handshake failed: {exc} (access-flow A1: invalid certificates become 403s)"
        steps.append(Step("fresh", first_request, now, expected, None, [problem]))
        return run
    try:
        first = step("fresh", first_request, now, conn, [*first_headers, *extra])
        judged = [first]  # the steps at which the enforcer validated the chain
        session = conn.session
        later = jump_target(spec, t0, first.expected, chain, world) if caps.clock else target.now()
        target.set_time(later)
        plain = dataclasses.replace(first_request, token=None)
        if first.observed is not None and not first.observed.closed and conn.usable:
            # A chain refused on a connection stays refused on it (the enforcer keeps the
            # failure for the connection, so a client pipelining on a bad chain costs one
            # validation): only a new connection is judged again.
            stuck = first.expected if model.chain_refused(world, first_request, now) else None
            kept = step("kept-alive", plain, later, conn, extra, expected=stuck)
            if stuck is None:
                judged.append(kept)
    finally:
        conn.close()
    if req.login_person is not None and caps.in_process:
        _callback_step(target, spec, world, plain, later, steps, leaf)

    app = world.apps.get(req.sni)
    if first.observed is not None and session is not None:
        conn = open_connection(caps.transport, target.address, req.sni, ctx, session=session)
        try:
            resumed = plain
            if conn.resumed and not _chain_remembered(judged):
                # A resumed session carries only the leaf; the enforcer remembers the
                # intermediates of every chain it validated (A14), passed or failed, and
                # has none for a chain it never validated.
                resumed = dataclasses.replace(plain, chain=plain.chain[:1])
            s = step("resumed" if conn.resumed else "reconnected", resumed, later, conn, extra)
            if (
                conn.resumed
                and app is not None
                and app.session_duration <= model.ZERO
                and caps.tokens
            ):
                s.problems.append(
                    "a TLS session was resumed on a No Duration hostname (access-flow A9)"
                )
        finally:
            conn.close()

    if caps.tokens and first.observed is not None and first.observed.status == 200:
        _token_steps(target, prov, first, later, steps, leaf)
    return run


def person_of(target: Any, name: str) -> model.Person:
    """The model's person for a PEOPLE key, with the target's id of their provider."""
    email, idp, groups = PEOPLE[name]
    ids = getattr(target, "ids", {})
    return model.Person(email, ids.get(idp, idp), frozenset(groups), sub=f"sub-{name}")


def session_claims(
    target: Any,
    person: model.Person,
    certificate: str | None,
    iat: dt.datetime,
    exp: dt.datetime,
    host: str = APP_HOST,
) -> dict[str, Any]:
    """A person's session token claims, as access-flow A7 and I8 list them."""
    claims: dict[str, Any] = {
        "aud": [target.auds[host]],
        "iss": target.issuer,
        "iat": int(iat.timestamp()),
        "nbf": int(iat.timestamp()),
        "exp": int(exp.timestamp()),
        "type": "app",
        "sub": person.sub,
        "common_name": "",
        "email": person.email,
        "idp": {"id": person.idp, "type": "oidc"},
        "identity_nonce": secrets.token_hex(8),
        "groups": sorted(person.groups),
    }
    if certificate is not None:
        x5t = base64.urlsafe_b64encode(bytes.fromhex(certificate)).rstrip(b"=").decode()
        claims["cnf"] = {"x5t#S256": x5t}
    return claims


def _identity_inputs(
    target: Any,
    spec: CaseSpec,
    request: model.Request,
    leaf: x509.Certificate | None,
    now: dt.datetime,
) -> tuple[model.Request, list[tuple[str, str]], list[tuple[str, str]]]:
    """The first request's person (a session token), service token and browser Accept.

    Returns the model's request, the headers every step sends (service token, Accept) and the
    first step's session cookie.
    """
    req = spec.request
    every: list[tuple[str, str]] = []
    first: list[tuple[str, str]] = []
    minter = getattr(target, "session_minter", None)
    if req.session_person is not None and minter is not None:
        person = person_of(target, req.session_person)
        other = hashlib.sha256(b"another device").hexdigest()
        certificate = {
            "leaf": model.sha256_hex(leaf) if leaf is not None else None,
            "none": None,
            "other": other,
        }[req.session_binding]
        # Minted an hour before the case; expired one second before it, or valid for a day.
        iat = now - dt.timedelta(hours=1)
        exp = now - dt.timedelta(seconds=1) if req.session_expired else now + dt.timedelta(days=1)
        value = minter(session_claims(target, person, certificate, iat, exp))
        token = model.Token(APP_HOST, exp, True, certificate, person)
        request = dataclasses.replace(request, token=token)
        first.append(("cookie", f"CF_Authorization={value}"))
    tokens = getattr(target, "service_tokens", {})
    if req.service_token is not None and tokens:
        long = tokens["st-long"]
        credentials = {
            "st-long": model.Credentials(long.client_id, long.secret),
            "st-short": model.Credentials(tokens["st-short"].client_id, tokens["st-short"].secret),
            "wrong-secret": model.Credentials(long.client_id, "0" * 64),
            "unknown-id": model.Credentials("0" * 32 + ".access", long.secret),
        }[req.service_token]
        request = dataclasses.replace(request, service_token=credentials)
        every += [
            ("cf-access-client-id", credentials.client_id),
            ("cf-access-client-secret", credentials.secret),
        ]
    if req.browser:
        request = dataclasses.replace(request, browser=True)
        every.append(("accept", "text/html,application/xhtml+xml,*/*;q=0.8"))
    if target.caps.identity and (request.token is None or request.token.person is None):
        # Nobody's email may reach the origin from the client: a forged header is stripped (F1).
        every.append(("cf-access-authenticated-user-email", "forged@example.com"))
    return request, every, first


def _callback_step(
    target: Any,
    spec: CaseSpec,
    world: model.World,
    request: model.Request,
    at: dt.datetime,
    steps: list[Step],
    leaf: x509.Certificate | None,
) -> None:
    """I5: the callback's decision, with the person a login established, decided in process."""
    assert spec.request.login_person is not None
    if request.sni != request.host or request.host != APP_HOST:
        return
    request = dataclasses.replace(
        request, person=person_of(target, spec.request.login_person), browser=False
    )
    expected = model.expect(world, request, at)
    observed = target.in_process(request, at)
    s = Step("callback (in process)", request, at, expected, observed, [])
    compare(s, target.caps, world, leaf)
    steps.append(s)


def _chain_remembered(steps: Sequence[Step]) -> bool:
    """Whether an earlier step had its chain validated, so the enforcer holds its intermediates.

    The enforcer validates a presented chain whenever Host names the SNI's hostname, and keeps
    the intermediates of a chain that passed (for its resumed sessions) and, in a smaller memo
    of their own, of one that failed, so that a refused device's resumed session keeps its
    reason.
    """
    return any(
        s.request.sni is not None
        and s.request.host.lower().rstrip(".") == s.request.sni.lower().rstrip(".")
        for s in steps
    )


def _token_steps(
    target: Target,
    prov: Provisioned,
    first: Step,
    at: dt.datetime,
    steps: list[Step],
    leaf: x509.Certificate | None,
) -> None:
    """Replay the first answer's token: same app, other app, tampered (A4, A9)."""
    assert first.observed is not None
    world, host = prov.world, first.request.host
    app = world.apps.get(host)
    token = first.observed.cookie
    exp = first.expected.token_exp
    if token is None and app is not None and app.session_duration <= model.ZERO:
        # No Duration: the token only went to the origin; a client that got hold of it anyway
        # must still be refused (A9). If it names a person, it still says who they are while
        # it lasts (I9): its own exp is what the model needs then.
        token = first.observed.forwarded_token()
        exp = _unverified_exp(token) or at + dt.timedelta(days=1)
    if token is None or exp is None:
        return
    other = OTHER_HOST if host == APP_HOST else APP_HOST
    replays = [
        ("token replay", host, token, True),
        ("token on another app", other, token, True),
        ("tampered token", host, _tamper(token), False),
    ]
    for name, where, value, genuine in replays:
        minted_for = model.sha256_hex(leaf) if leaf is not None else None
        token = model.Token(host, exp, genuine, minted_for, first.expected.person)
        request = model.Request(where, where, (), token)
        conn = open_connection(
            target.caps.transport, target.address, where, prov.context_without_cert
        )
        try:
            expected = model.expect(world, request, at)
            try:
                observed: Observed | None = conn.request(
                    where, headers=[("cookie", f"CF_Authorization={value}")]
                )
                problems: list[str] = []
            except WireError as exc:
                observed, problems = None, [f"no response: {exc}"]
            s = Step(name, request, at, expected, observed, problems)
            compare(s, target.caps, world, leaf)
            steps.append(s)
        finally:
            conn.close()


def describe_pki(
    world: model.World, chain: Sequence[x509.Certificate], t0: dt.datetime, apps_text: str
) -> str:
    """The PKI and configuration of a case, for humans."""

    def cert_line(c: x509.Certificate) -> str:
        def off(t: dt.datetime) -> str:
            return f"t0{(t - t0).total_seconds():+.0f}s"

        bits = [
            f"CN={model.common_name_of(c)!r}",
            f"issuer CN={c.issuer.rfc4514_string()!r}",
            f"valid {off(c.not_valid_before_utc)}..{off(c.not_valid_after_utc)}",
            f"key {type(c.public_key()).__name__.removesuffix('PublicKey').lstrip('_')}",
            f"sha256 {model.sha256_hex(c)[:16]}...",
        ]
        for ext in c.extensions:
            v = ext.value
            if isinstance(v, x509.BasicConstraints):
                bits.append(f"CA={v.ca} pathlen={v.path_length}")
            elif isinstance(v, x509.KeyUsage):
                bits.append(
                    f"KU(digitalSignature={v.digital_signature}, keyCertSign={v.key_cert_sign})"
                )
            elif isinstance(v, x509.ExtendedKeyUsage):
                bits.append(f"EKU={[o._name for o in v]}")
            elif isinstance(v, x509.SubjectAlternativeName):
                bits.append(f"SAN={[str(n.value) for n in v]}")
        return "      " + ", ".join(bits)

    lines = [f"t0 = {t0.isoformat()}", "roots (as uploaded):"]
    for r in world.roots:
        lines.append(f"  root for {sorted(r.hostnames) or 'no hostname'}:")
        lines.append(cert_line(r.certificate))
        for i in r.intermediates:
            lines.append("    uploaded intermediate:")
            lines.append(cert_line(i))
    lines.append("client presents (leaf first):" if chain else "client has no certificate")
    lines += [cert_line(c) for c in chain]
    if world.revoked:
        lines.append(f"revoked leaves: {sorted(f[:16] + '...' for f in world.revoked)}")
    lines.append(apps_text)
    return "\n".join(lines)
