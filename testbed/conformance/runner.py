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
import json
import ssl
from collections.abc import Sequence
from typing import Any, Protocol

from cryptography import x509

from testbed.conformance import model
from testbed.conformance.strategies import (
    APP_HOST,
    OTHER_HOST,
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
    if obs.status != exp.status:
        problems.append(f"status {obs.status}, expected {exp.status}")
    if exp.reasons and obs.reason not in exp.reasons:
        problems.append(f"reason {obs.reason!r}, expected one of {sorted(exp.reasons)}")
    if not exp.reasons and obs.reason is not None:
        problems.append(f"reason header {obs.reason!r} on an admitted request")
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
    return out


def _tamper(token: str) -> str:
    head, payload, sig = [*token.split("."), "", ""][:3]
    i = len(payload) // 2
    flipped = "A" if payload[i : i + 1] != "A" else "B"
    return ".".join([head, payload[:i] + flipped + payload[i + 1 :], sig])


def jump_target(
    spec: CaseSpec, t0: dt.datetime, first: model.Expected, chain: Sequence[x509.Certificate]
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
    try:
        conn = open_connection(caps.transport, target.address, req.sni, ctx)
    except (ssl.SSLError, OSError) as exc:
        # A1: a handshake must not abort over the client certificate; report, don't crash.
        expected = model.expect(world, first_request, now)
        problem = f"TLS handshake failed: {exc} (access-flow A1: invalid certificates become 403s)"
        steps.append(Step("fresh", first_request, now, expected, None, [problem]))
        return run
    try:
        junk_headers = [("cookie", "CF_Authorization=not.a.token")] if junk else []
        first = step("fresh", first_request, now, conn, junk_headers)
        judged = [first]  # the steps at which the enforcer validated the chain
        session = conn.session
        later = jump_target(spec, t0, first.expected, chain) if caps.clock else target.now()
        target.set_time(later)
        plain = dataclasses.replace(first_request, token=None)
        if first.observed is not None and not first.observed.closed and conn.usable:
            # A chain refused on a connection stays refused on it (the enforcer keeps the
            # failure for the connection, so a client pipelining on a bad chain costs one
            # validation): only a new connection is judged again.
            stuck = first.expected if model.chain_refused(world, first_request, now) else None
            kept = step("kept-alive", plain, later, conn, expected=stuck)
            if stuck is None:
                judged.append(kept)
    finally:
        conn.close()

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
            s = step("resumed" if conn.resumed else "reconnected", resumed, later, conn)
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
        # must still be refused (A9).
        token, exp = first.observed.forwarded_token(), at + dt.timedelta(days=1)
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
        request = model.Request(where, where, (), model.Token(host, exp, genuine, minted_for))
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
