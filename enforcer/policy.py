"""Access policies: rules over request facts, include/require/exclude, first match decides.

Evaluation is three-valued (access-flow I7): without a person's identity an identity rule
(``email``, ``email_domain``, ``group``, ``login_method``) is *unknown*, not false, since a
login could make it true. Rules combine in Kleene's logic (include: any, require: all,
exclude: none), and the first policy that holds decides, unless one that is still unknown
comes first: then the request needs a login. A request that presents a valid service token is
a machine, which never logs in: for it identity rules are false.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import ipaddress
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from enforcer.chain import CertificateFacts
from enforcer.durations import DurationError, format_duration, parse_duration
from enforcer.identity import Identity
from enforcer.service_tokens import ServiceToken


class PolicyError(ValueError):
    """A policy or rule that cannot be understood; the message names the field."""


class Decision(enum.StrEnum):
    """What a matching policy does."""

    NON_IDENTITY = "non_identity"
    ALLOW = "allow"
    DENY = "deny"
    BYPASS = "bypass"


@dataclasses.dataclass(frozen=True)
class RequestFacts:
    """What rules may look at: the validated certificate, the client address, the person's
    identity (None: nobody logged in) and the service token (None: no valid one presented)."""

    certificate: CertificateFacts | None
    client_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    identity: Identity | None = None
    service_token: ServiceToken | None = None


# Rules about a person: unknown until a login (access-flow I6, I7).
IDENTITY_RULE_KINDS = frozenset({"email", "email_domain", "group", "login_method"})
# Rules about a service token: known from the request's headers alone (I11).
SERVICE_TOKEN_RULE_KINDS = frozenset({"service_token", "any_valid_service_token"})

# A three-valued truth: True, False, or None for unknown (access-flow I7).
Truth = bool | None


def _any(values: Sequence[Truth]) -> Truth:
    """Kleene disjunction: true if one is true, unknown if none is but one is unknown."""
    if any(v is True for v in values):
        return True
    return None if any(v is None for v in values) else False


def _all(values: Sequence[Truth]) -> Truth:
    """Kleene conjunction: false if one is false, unknown if none is but one is unknown."""
    if any(v is False for v in values):
        return False
    return None if any(v is None for v in values) else True


def _not(value: Truth) -> Truth:
    return None if value is None else not value


def email_domain(email: str) -> str:
    """The part of an email after its last ``@``, lower-cased (``""`` without one)."""
    _, at, domain = email.rpartition("@")
    return domain.lower() if at else ""


def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile("".join(".*" if ch == "*" else re.escape(ch) for ch in pattern) + r"\Z")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One rule: a kind (``certificate``, ``common_name``, ...) and the value it compares."""

    kind: str
    value: str = ""

    def matches(self, facts: RequestFacts) -> bool:
        """Tell whether the rule holds for these facts (an unknown rule does not)."""
        return self.evaluate(facts) is True

    def evaluate(self, facts: RequestFacts) -> Truth:
        """True, False, or None when only a login can tell (an identity rule, no identity)."""
        if self.kind in IDENTITY_RULE_KINDS:
            person = facts.identity
            if person is None:
                # A valid service token is a machine: it cannot log in, so the rule is false.
                return False if facts.service_token is not None else None
            if self.kind == "email":
                return person.email.lower() == self.value
            if self.kind == "email_domain":
                return email_domain(person.email) == self.value
            if self.kind == "group":
                return self.value in person.groups
            return person.idp == self.value  # login_method
        if self.kind == "service_token":
            return facts.service_token is not None and facts.service_token.id == self.value
        if self.kind == "any_valid_service_token":
            return facts.service_token is not None
        cert = facts.certificate
        if self.kind == "everyone":
            return True
        if self.kind == "ip":
            return facts.client_ip is not None and facts.client_ip in ipaddress.ip_network(
                self.value, strict=False
            )
        if cert is None:
            return False
        if self.kind == "certificate":
            return True
        if self.kind == "common_name":
            return cert.common_name == self.value
        if self.kind == "certificate_fingerprint":
            return cert.sha256 == self.value
        if self.kind == "serial":
            return cert.serial == self.value
        if self.kind == "issuer_fingerprint":
            return cert.issuer_sha256 == self.value
        if self.kind == "san_dns":
            return any(_glob(self.value).match(name) for name in cert.san_dns)
        if self.kind == "san_uri":
            return any(_glob(self.value).match(uri) for uri in cert.san_uris)
        raise AssertionError(f"unknown rule kind {self.kind}")  # parse_rule prevents this


# kind -> (inner key holding the value, how to normalise it); None = the rule takes no value.
_RULE_KINDS: dict[str, tuple[str, Any] | None] = {
    "everyone": None,
    "certificate": None,
    "common_name": ("common_name", str),
    "certificate_fingerprint": ("sha256", lambda v: str(v).lower().replace(":", "")),
    "serial": ("serial", lambda v: str(v).lower().removeprefix("0x").lstrip("0") or "0"),
    "issuer_fingerprint": ("sha256", lambda v: str(v).lower().replace(":", "")),
    "san_dns": ("pattern", str),
    "san_uri": ("pattern", str),
    "ip": ("ip", str),
    "email": ("email", lambda v: str(v).strip().lower()),
    "email_domain": ("domain", lambda v: str(v).strip().lower().removeprefix("@")),
    "group": ("name", str),
    "login_method": ("id", str),
    "service_token": ("token_id", str),
    "any_valid_service_token": None,
}


def parse_rule(raw: object, where: str) -> Rule:
    """Parse one rule such as ``{"common_name": {"common_name": "X"}}`` found at ``where``."""
    if not isinstance(raw, Mapping) or len(raw) != 1:
        raise PolicyError(
            f"{where}: a rule is a table with exactly one key, one of {sorted(_RULE_KINDS)}"
        )
    ((kind, body),) = raw.items()
    if kind not in _RULE_KINDS:
        raise PolicyError(f"{where}: unknown rule {kind!r}; expected one of {sorted(_RULE_KINDS)}")
    spec = _RULE_KINDS[kind]
    if spec is None:
        return Rule(kind)
    key, normalise = spec
    if not isinstance(body, Mapping) or key not in body or not isinstance(body[key], str):
        raise PolicyError(f'{where}.{kind}: expected {{ {key} = "..." }}')
    value = normalise(body[key])
    if not value and kind in IDENTITY_RULE_KINDS | SERVICE_TOKEN_RULE_KINDS:
        raise PolicyError(f"{where}.{kind}.{key}: must not be empty")
    if kind == "ip":
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError as exc:
            raise PolicyError(f"{where}.ip.ip: {exc}") from None
    return Rule(kind, value)


RULE_KINDS = tuple(_RULE_KINDS)


def rule_from_text(text: str) -> dict[str, dict[str, str]]:
    """Turn ``kind`` or ``kind=value`` (as on a command line) into a rule's API form."""
    kind, sep, value = text.partition("=")
    kind = kind.strip()
    if kind not in _RULE_KINDS:
        raise PolicyError(f"{text!r}: unknown rule {kind!r}; expected one of {sorted(_RULE_KINDS)}")
    spec = _RULE_KINDS[kind]
    if spec is None:
        if sep:
            raise PolicyError(f"{text!r}: the {kind} rule takes no value")
        return {kind: {}}
    if not sep or not value:
        raise PolicyError(f"{text!r}: the {kind} rule needs a value, as in {kind}=VALUE")
    return {kind: {spec[0]: value}}


def rule_to_dict(rule: Rule) -> dict[str, dict[str, str]]:
    """Return a rule in its API form, the inverse of :func:`parse_rule`."""
    spec = _RULE_KINDS[rule.kind]
    return {rule.kind: {} if spec is None else {spec[0]: rule.value}}


@dataclasses.dataclass(frozen=True)
class Policy:
    """A named policy: a decision and its include (any), require (all) and exclude (none) rules."""

    name: str
    decision: Decision
    include: tuple[Rule, ...]
    require: tuple[Rule, ...] = ()
    exclude: tuple[Rule, ...] = ()
    session_duration: dt.timedelta | None = None

    def to_dict(self) -> dict[str, object]:
        """Return the policy in its API form, the inverse of :func:`parse_policy`."""
        out: dict[str, object] = {
            "name": self.name,
            "decision": self.decision.value,
            "include": [rule_to_dict(r) for r in self.include],
            "require": [rule_to_dict(r) for r in self.require],
            "exclude": [rule_to_dict(r) for r in self.exclude],
        }
        if self.session_duration is not None:
            out["session_duration"] = format_duration(self.session_duration)
        return out

    def matches(self, facts: RequestFacts) -> bool:
        """Tell whether include, require and exclude all hold (unknown does not hold)."""
        return self.evaluate(facts) is True

    def evaluate(self, facts: RequestFacts, providers: Collection[str] | None = None) -> Truth:
        """Three-valued (I7): True when it holds, False when no login could make it hold, None
        when one could. ``providers``: the ids a login may come from (None: any)."""
        include = [r.evaluate(facts) for r in self.include]
        require = [r.evaluate(facts) for r in self.require]
        exclude = [r.evaluate(facts) for r in self.exclude]
        # Kleene's connectives first: include any, require all, exclude none.
        truth = _all([_any(include), _all(require), _not(_any(exclude))])
        if truth is not None:
            return truth
        # Unknown in Kleene's logic is not yet "a login could make it hold": a policy such as
        # include email = a, exclude email = a holds for nobody. What is unknown are identity
        # rules only, so the question is whether one person satisfies a conjunction of them.
        must = [r for r, v in zip(self.require, require, strict=True) if v is None]
        must_not = [r for r, v in zip(self.exclude, exclude, strict=True) if v is None]
        if True in include:
            options: list[list[Rule]] = [must]
        else:
            options = [[r, *must] for r, v in zip(self.include, include, strict=True) if v is None]
        if any(_someone(option, must_not, providers) for option in options):
            return None
        return False


def parse_policy(raw: object, where: str) -> Policy:
    """Parse one policy table; errors name ``where`` and the field."""
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where}: a policy is a table")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise PolicyError(f"{where}.name: required, a non-empty string")
    decision_raw = raw.get("decision", "non_identity")
    try:
        decision = Decision(decision_raw)
    except ValueError:
        raise PolicyError(
            f"{where}.decision: {decision_raw!r} is not one of {[d.value for d in Decision]}"
        ) from None
    lists: dict[str, tuple[Rule, ...]] = {}
    for field in ("include", "require", "exclude"):
        items = raw.get(field, [])
        if not isinstance(items, Sequence) or isinstance(items, str):
            raise PolicyError(f"{where}.{field}: expected a list of rules")
        lists[field] = tuple(
            parse_rule(item, f"{where}.{field}[{i}]") for i, item in enumerate(items)
        )
    if not lists["include"]:
        raise PolicyError(f"{where}.include: at least one rule is required")
    duration = None
    if "session_duration" in raw:
        try:
            duration = parse_duration(str(raw["session_duration"]))
        except DurationError as exc:
            raise PolicyError(f"{where}.session_duration: {exc}") from None
    unknown = set(raw) - {"name", "decision", "include", "require", "exclude", "session_duration"}
    if unknown:
        raise PolicyError(f"{where}: unknown field(s) {sorted(unknown)}")
    return Policy(name, decision, lists["include"], lists["require"], lists["exclude"], duration)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """The policies' verdict: the policy that decides, or the one that needs a login first.

    At most one is set; neither means no policy can hold (P7).
    """

    policy: Policy | None = None
    login_needed_by: Policy | None = None

    @property
    def login_needed(self) -> bool:
        """True when a policy that could hold after a login comes before any that holds."""
        return self.login_needed_by is not None


def evaluate(
    policies: Sequence[Policy], facts: RequestFacts, providers: Collection[str] | None = None
) -> Evaluation:
    """Evaluate policies in order (P3, I7): the first that holds decides; one that a login
    (with one of ``providers``; None: any) could make hold, before it, means a login is
    needed; those that cannot hold are skipped."""
    for policy in policies:
        truth = policy.evaluate(facts, providers)
        if truth is True:
            return Evaluation(policy=policy)
        if truth is None:
            return Evaluation(login_needed_by=policy)
    return Evaluation()


def _someone(
    true: Sequence[Rule], false: Sequence[Rule], providers: Collection[str] | None
) -> bool:
    """Whether one person, logged in with one of ``providers``, makes every identity rule of
    ``true`` hold and none of ``false``: a conjunction of literals, decided attribute by
    attribute (an email and its domain, groups, the provider)."""

    def values(rules: Sequence[Rule], kind: str) -> set[str]:
        return {r.value for r in rules if r.kind == kind}

    emails, not_emails = values(true, "email"), values(false, "email")
    domains, not_domains = values(true, "email_domain"), values(false, "email_domain")
    if len(emails) > 1 or len(domains) > 1 or emails & not_emails:
        return False
    if emails:
        # email rules are stored lower-case, so the domain is the rule's own.
        domains = domains | {email_domain(next(iter(emails)))}
        if len(domains) > 1:
            return False
    if domains & not_domains:
        return False
    # Otherwise a fresh address (in the one domain, or in a fresh domain) avoids every
    # excluded email and domain.
    if values(true, "group") & values(false, "group"):
        return False
    idps, not_idps = values(true, "login_method"), values(false, "login_method")
    if len(idps) > 1 or idps & not_idps:
        return False
    if providers is None:
        return True  # a provider nobody named is always possible
    candidates = set(providers) - not_idps
    return bool(candidates & idps) if idps else bool(candidates)


def first_match(policies: Sequence[Policy], facts: RequestFacts) -> Policy | None:
    """Return the policy that decides (see :func:`evaluate`); None when none does or a login
    is needed first."""
    return evaluate(policies, facts).policy
