"""Deliberately broken enforcers, to show that the suite catches what it claims to catch.

Each mutant patches one function of the real enforcer (never its source files) through a
``setattr``-like callable: pytest's ``monkeypatch.setattr`` in tests, :func:`applied` (which
restores everything on exit) for the CLI's hidden ``--mutant`` option. The patched enforcer
is then served over real TLS like the real one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from collections.abc import Callable, Iterator, Sequence
from typing import Any

Setattr = Callable[[Any, str, Any], None]


def ignore_expiry(setattr: Setattr) -> None:
    """Judge an expired leaf at its last valid second: expiry is ignored."""
    import enforcer.exchange as exchange

    original = exchange.check_chain

    def check_chain(
        snapshot: Any, hostname: str, chain: Sequence[Any], now: dt.datetime, *rest: Any
    ) -> Any:
        if chain and now > chain[0].not_valid_after_utc:
            now = chain[0].not_valid_after_utc
        return original(snapshot, hostname, chain, now, *rest)

    setattr(exchange, "check_chain", check_chain)


def cookie_under_no_duration(setattr: Setattr) -> None:
    """Honour a presented token even when the application has No Duration."""
    import enforcer.exchange as exchange
    import enforcer.server as server
    from enforcer.decision import AdmittedBy, normalise_hostname

    original = exchange.decide

    def decide(request: Any, snapshot: Any, chain: Any, now: dt.datetime, *rest: Any) -> Any:
        app = snapshot.applications.get(normalise_hostname(request.host))
        if request.token is not None and app is not None and app.no_duration:
            lenient = dataclasses.replace(app, session_duration=dt.timedelta(hours=1))
            apps = {**snapshot.applications, app.hostname: lenient}
            decision = original(
                request, dataclasses.replace(snapshot, applications=apps), chain, now, *rest
            )
            if decision.admitted_by is AdmittedBy.TOKEN:
                return decision
        return original(request, snapshot, chain, now, *rest)

    # The request path (HTTP/1.1 and HTTP/2) and the WebSocket tunnels' re-checks.
    setattr(exchange, "decide", decide)
    setattr(server, "decide", decide)


def foreign_root(setattr: Setattr) -> None:
    """Validate against every uploaded root, whatever hostnames they are associated with."""
    import enforcer.exchange as exchange
    from enforcer.chain import HostTrust

    original = exchange.check_chain

    def check_chain(
        snapshot: Any, hostname: str, chain: Sequence[Any], now: dt.datetime, *rest: Any
    ) -> Any:
        everything = HostTrust.build(
            [r.root for r in snapshot.roots], [i for r in snapshot.roots for i in r.intermediates]
        )
        trust = {**snapshot.trust, hostname: everything}
        return original(dataclasses.replace(snapshot, trust=trust), hostname, chain, now, *rest)

    setattr(exchange, "check_chain", check_chain)


def skip_common_name(setattr: Setattr) -> None:
    """Let a Common Name rule match any valid certificate."""
    from enforcer.policy import Rule

    # Policies evaluate their rules in three values (access-flow I7) through Rule.evaluate.
    original = Rule.evaluate

    def evaluate(self: Any, facts: Any) -> Any:
        if self.kind == "common_name":
            return facts.certificate is not None
        return original(self, facts)

    setattr(Rule, "evaluate", evaluate)


def no_recheck(setattr: Setattr) -> None:
    """Trust a connection's first validation forever (no A14 re-check on kept-alive/resumed)."""
    import enforcer.exchange as exchange

    setattr(exchange, "still_valid", lambda result, snapshot, now: result.facts is not None)


def identity_unknown_false(setattr: Setattr) -> None:
    """Read an identity rule as false without a login (I7's unknown): no login is ever asked."""
    from enforcer.policy import IDENTITY_RULE_KINDS, Rule

    original = Rule.evaluate

    def evaluate(self: Any, facts: Any) -> Any:
        if self.kind in IDENTITY_RULE_KINDS and facts.identity is None:
            return False
        return original(self, facts)

    setattr(Rule, "evaluate", evaluate)


def require_ignores_identity(setattr: Setattr) -> None:
    """Leave identity rules out of ``require``: "login AND certificate" admits any person."""
    from enforcer.policy import IDENTITY_RULE_KINDS, Policy

    original = Policy.evaluate

    def evaluate(self: Any, facts: Any, *rest: Any) -> Any:
        kept = tuple(r for r in self.require if r.kind not in IDENTITY_RULE_KINDS)
        return original(dataclasses.replace(self, require=kept), facts, *rest)

    setattr(Policy, "evaluate", evaluate)


def service_token_expiry_ignored(setattr: Setattr) -> None:
    """Judge a service token at its last valid instant: its expiry is ignored."""
    import enforcer.service_tokens as service_tokens

    original = service_tokens.check

    def check(presented: Any, tokens: Any, now: dt.datetime) -> Any:
        token = tokens.get(presented.client_id)
        if token is not None and now >= token.expires_at:
            now = token.expires_at - dt.timedelta(seconds=1)
        return original(presented, tokens, now)

    setattr(service_tokens, "check", check)


def email_domain_suffix(setattr: Setattr) -> None:
    """Match ``email_domain`` as a suffix of the email (``ample.com`` admits example.com)."""
    from enforcer.policy import Rule

    original = Rule.evaluate

    def evaluate(self: Any, facts: Any) -> Any:
        if self.kind == "email_domain" and facts.identity is not None:
            return facts.identity.email.lower().endswith(self.value)
        return original(self, facts)

    setattr(Rule, "evaluate", evaluate)


MUTANTS: dict[str, tuple[str, Callable[[Setattr], None]]] = {
    "ignore-expiry": ("ignores certificate expiry", ignore_expiry),
    "cookie-under-no-duration": ("honours cookies under No Duration", cookie_under_no_duration),
    "foreign-root": ("accepts a root associated with another hostname", foreign_root),
    "skip-common-name": ("skips the Common Name check", skip_common_name),
    "no-recheck": ("never re-checks kept-alive or resumed connections", no_recheck),
    "identity-unknown-false": (
        "reads identity rules as false without a login (I7)",
        identity_unknown_false,
    ),
    "require-ignores-identity": (
        "ignores identity rules in require (I6)",
        require_ignores_identity,
    ),
    "service-token-expiry-ignored": (
        "ignores service-token expiry (I11)",
        service_token_expiry_ignored,
    ),
    "email-domain-suffix": ("matches email_domain as a suffix (I6)", email_domain_suffix),
}


@contextlib.contextmanager
def applied(name: str | None) -> Iterator[None]:
    """Apply a mutant for the duration of the block (no-op for None), then restore."""
    if name is None:
        yield
        return
    saved: list[tuple[Any, str, Any]] = []

    def setattr_(obj: Any, attr: str, value: Any) -> None:
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    MUTANTS[name][1](setattr_)
    try:
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)
