"""Access policies: rules over certificate facts, include/require/exclude, first match decides."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import ipaddress
import re
from collections.abc import Mapping, Sequence
from typing import Any

from enforcer.chain import CertificateFacts
from enforcer.durations import DurationError, format_duration, parse_duration


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
    """What rules may look at: the validated certificate (if any) and the client address."""

    certificate: CertificateFacts | None
    client_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None


def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile("".join(".*" if ch == "*" else re.escape(ch) for ch in pattern) + r"\Z")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One rule: a kind (``certificate``, ``common_name``, ...) and the value it compares."""

    kind: str
    value: str = ""

    def matches(self, facts: RequestFacts) -> bool:
        """Tell whether the rule holds for these facts."""
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
        """Tell whether include, require and exclude all hold."""
        return (
            any(r.matches(facts) for r in self.include)
            and all(r.matches(facts) for r in self.require)
            and not any(r.matches(facts) for r in self.exclude)
        )


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


def first_match(policies: Sequence[Policy], facts: RequestFacts) -> Policy | None:
    """Return the first policy, in order, whose rules hold; None when none does."""
    for policy in policies:
        if policy.matches(facts):
            return policy
    return None
