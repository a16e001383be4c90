"""Scenario files: what to run against which target, checked whole before anything starts.

A scenario is a TOML file (see scenarios/*.toml and the README). Every problem is reported as
a :class:`ScenarioError` naming the file, the field and what was expected; ``testbed run``
turns it into exit code 2 before provisioning or listening.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from pathlib import Path

from devices.behaviour import Behaviour, BehaviourError, Periodic, parse_behaviour
from devices.pkcs11 import Pkcs11Config
from devices.pki import KEY_TYPES
from devices.provision import DEFECTS, expected_outcome
from enforcer.durations import DurationError, parse_duration
from enforcer.tomltable import TableReader, read_toml
from testbed.network import Network
from testbed.thresholds import Threshold, ThresholdError, parse_threshold

CLOCKS = ("real", "virtual")
TARGETS = ("embedded", "nginx", "external")
ARRIVALS = ("constant", "ramping", "active")
KEY_STORES = ("software", "piv", "pkcs11")
# What a cohort's devices speak (client.protocol): HTTP/1.1 (h11), HTTP/2 (h2) or gRPC calls to
# the telemetry service (grpcio). Which key stores each can use: see PROTOCOL_KEY_STORES.
PROTOCOLS = ("http1", "h2", "grpc")
PROTOCOL_KEY_STORES = {
    "http1": KEY_STORES,
    "h2": ("software", "piv"),  # a PKCS#11 key signs through tlslite-ng: HTTP/1.1 only
    "grpc": ("software",),
}
RPCS = ("report", "watch")
EVENTS = (
    "revoke",
    "rotate_root",
    "remove_root",
    "set_session_duration",
    "set_policy",
    "advance_clock",
    "stop_origin",
    "start_origin",
    "revoke_service_token",
    "token_removed",
    "token_reinserted",
    "pin_changed",
)
# Events on a pkcs11 cohort's token (``cohort`` names it).
TOKEN_EVENTS = ("token_removed", "token_reinserted", "pin_changed")
ORIGIN_EVENTS = ("stop_origin", "start_origin")
# What an nginx target can follow: a CRL and a reload (it has no admin API).
REVOCABLE_EVENTS = ("revoke", *ORIGIN_EVENTS)
# nginx answers 400 to a client certificate that does not verify, a revoked one included.
NGINX_REFUSED = "http_400"
# ... and to a gRPC device, the gRPC denial testbed/nginx.py configures (no reason header).
NGINX_REFUSED_GRPC = "grpc_unauthenticated"
# Virtual runs without a network table: a LAN-to-cloud round trip, no jitter.
DEFAULT_VIRTUAL_NETWORK = Network(rtt=0.020)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# A DNS name the edge certificate can hold: lower-case labels of letters, digits and '-'.
_HOSTNAME = re.compile(
    r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*"
)
# Events that change one application (``application`` names it; default: the first).
APPLICATION_EVENTS = ("set_session_duration", "set_policy")
MAX_APPLICATIONS = 64
# What a cohort is made of: devices (a certificate, no login), people (a login at the identity
# provider per session, with or without a laptop certificate) or service tokens (automated
# clients presenting CF-Access-Client-Id/-Secret, no certificate).
COHORT_KINDS = ("devices", "people", "service_tokens")
# What is wrong with a service-token cohort's tokens (None: nothing).
TOKEN_DEFECTS = ("wrong_secret", "unknown_client_id")
MAX_PEOPLE = 10_000
# Policy terms (application ``policy``, ``set_policy``): the certificate ones, and a login's.
CERTIFICATE_TERMS = ("certificate", "common_name")
IDENTITY_TERMS = ("email", "email_domain", "group")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+")


class ScenarioError(Exception):
    """A scenario problem, located by file and field."""

    def __init__(self, path: Path | str, field: str, problem: str) -> None:
        self.path, self.field, self.problem = str(path), field, problem
        super().__init__(f"{path}: {field}: {problem}" if field else f"{path}: {problem}")


@dataclasses.dataclass(frozen=True)
class Application:
    """An application on the target: a hostname, its session duration and its policy."""

    name: str  # "" for the target's own (a scenario without [[target.applications]])
    hostname: str
    session_duration: str = "24h"
    policy: str = "certificate"  # "certificate" or "common_name:<CN>"


@dataclasses.dataclass(frozen=True)
class Target:
    """What the fleet talks to.

    ``hostname``, ``session_duration`` and ``policy`` are the default application's (the
    first of ``declared``, when the scenario lists ``[[target.applications]]``).
    """

    kind: str = "embedded"
    hostname: str = "auth.example.test"
    session_duration: str = "24h"
    policy: str = "certificate"  # "certificate" or "common_name:<CN>"
    url: str | None = None  # external: https://host:port
    ca: Path | None = None  # external: the CA that signed the edge's server certificate
    workers: int = 1
    idle_timeout: str = "30s"  # the embedded enforcer's keep-alive idle timeout
    declared: tuple[Application, ...] = ()  # [[target.applications]], in the file's order

    @property
    def applications(self) -> tuple[Application, ...]:
        """Every application on the target, the default one first."""
        if self.declared:
            return self.declared
        return (Application("", self.hostname, self.session_duration, self.policy),)

    def application(self, name: str | None) -> Application:
        """The application called ``name`` (None: the default one)."""
        apps = self.applications
        return apps[0] if name is None else next(a for a in apps if a.name == name)

    @property
    def hostnames(self) -> list[str]:
        """Every application's hostname, the default one first."""
        return [a.hostname for a in self.applications]


@dataclasses.dataclass(frozen=True)
class PivSettings:
    """How a cohort's PIV tokens behave."""

    slot: str = "9a"
    pin: str = "123456"
    pin_policy: str | None = None
    touch_policy: str | None = None
    touch_delay: float = 0.5
    browser_pin_every_handshake: bool = False


@dataclasses.dataclass(frozen=True)
class Pkcs11Settings:
    """Where a pkcs11 cohort's keys are: ``key_store = { kind = "pkcs11", ... }``."""

    module: Path
    token: str | None = None
    slot: int | None = None
    pin_env: str | None = None  # the environment variable holding the user PIN
    pin_file: Path | None = None  # or a file holding it
    key_label: str = "{id}"  # each device's key label; {id} is the device id

    def config(self, device_id: str) -> Pkcs11Config:
        """The PKCS#11 location of one device's key."""
        return Pkcs11Config(
            self.module,
            token=self.token,
            slot=self.slot,
            pin_env=self.pin_env,
            pin_file=self.pin_file,
            key_label=self.key_label.replace("{id}", device_id),
        )


def _pkcs11_settings(r: TableReader) -> Pkcs11Settings:
    """``key_store = { kind = "pkcs11", module, token | slot, pin_env | pin_file, key_label }``."""
    r.unknown({"kind", "module", "token", "slot", "pin_env", "pin_file", "key_label"})
    module = r.file("module")
    if not module.is_file():
        raise r.error("module", f"{module}: no such PKCS#11 module")
    token = r.get("token", str, None, "a token label")
    slot = r.get("slot", int, None, "a slot id")
    if token is None and slot is None:
        raise r.error("token", "name the token (its label) or its slot")
    pin_env = r.get("pin_env", str, None, "an environment variable name")
    pin_file = r.file("pin_file") if "pin_file" in r.table else None
    if (pin_env is None) == (pin_file is None):
        raise r.error(
            "pin_env", "give the user PIN as exactly one of pin_env or pin_file (never inline)"
        )
    key_label = r.get("key_label", str, "{id}", "a key label, {id} for the device id")
    if not key_label:
        raise r.error("key_label", "must not be empty")
    return Pkcs11Settings(module, token, slot, pin_env, pin_file, key_label)


@dataclasses.dataclass(frozen=True)
class PkiSpec:
    """A CA hierarchy that issues some cohorts' certificates."""

    name: str
    key_type: str = "ec-p256"
    intermediates: int = 1
    trusted: bool = True  # its root is associated with the target's hostname


@dataclasses.dataclass(frozen=True)
class CohortSpec:
    """A group of devices: how many, what is wrong with them, how they behave."""

    name: str
    size: int
    defect: str | None
    expected: str
    key_store: str = "software"
    key_type: str | None = None
    behaviour: Behaviour = dataclasses.field(default_factory=Periodic)
    keep_alive: bool = True
    resume_sessions: bool = True
    reuse_cookie: bool = True
    always_new_handshake: bool = False
    clock_skew: float = 0.0
    piv: PivSettings = dataclasses.field(default_factory=PivSettings)
    pkcs11: Pkcs11Settings | None = None  # key_store = "pkcs11": where the keys are
    pki: str = "fleet"
    protocol: str = "http1"  # http1, h2 or grpc (client.protocol)
    rpc: str = "report"  # grpc: the call each attempt makes (unary Report or streaming Watch)
    watch_messages: int = 3  # grpc, rpc = "watch": commands each call reads
    application: str | None = None  # which of the target's applications (None: the default)
    kind: str = "devices"  # devices, people or service_tokens (COHORT_KINDS)
    # people: (email, password) of each person, cycled when the cohort is larger
    users: tuple[tuple[str, str], ...] = ()
    with_certificate: bool = True  # people: a laptop client certificate from the fleet
    token_defect: str | None = None  # service_tokens: wrong_secret or unknown_client_id
    token_duration: str = "8760h"  # service_tokens: the duration they are created with

    @property
    def provisioned(self) -> bool:
        """The cohort's members get certificates from the fleet's PKI."""
        return self.kind == "devices" or (self.kind == "people" and self.with_certificate)

    def user(self, index: int) -> tuple[str, str]:
        """The (email, password) of the cohort's ``index``-th person."""
        return self.users[index % len(self.users)]


@dataclasses.dataclass(frozen=True)
class IdentityProviderSpec:
    """``[identity_provider]``: the OpenID Connect provider people log in with (I1)."""

    issuer_url: str
    client_id: str
    client_secret_env: str  # the environment variable holding the client secret
    name: str = "identity provider"
    ca_file: Path | None = None  # the CA of a provider behind a private CA
    scopes: tuple[str, ...] = ("openid", "email", "profile")
    groups_claim: str = "groups"
    email_claim_name: str = "email"


@dataclasses.dataclass(frozen=True)
class Phase:
    """A stretch of the run with one arrival model."""

    name: str
    duration: float
    arrival: str  # constant | ramping | active
    rate: float = 0.0  # constant: attempts per second
    start_rate: float = 0.0  # ramping
    end_rate: float = 0.0
    devices: int = 0  # active: devices running their behaviour at once


@dataclasses.dataclass(frozen=True)
class Event:
    """A change made at a time in the run."""

    at: float
    action: str
    cohort: str | None = None
    share: float = 1.0
    value: str | None = None  # a duration, a CN, a clock advance
    pki: str | None = None  # rotate_root, remove_root: whose root (default: the first trusted)
    application: str | None = None  # set_session_duration, set_policy (None: the default)


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A whole, checked scenario."""

    path: Path
    name: str
    seed: int
    clock: str
    target: Target
    cohorts: tuple[CohortSpec, ...]
    phases: tuple[Phase, ...]
    events: tuple[Event, ...]
    thresholds: tuple[Threshold, ...]
    intermediates: int = 1
    key_type: str = "ec-p256"
    timeout: float = 10.0
    pkis: tuple[PkiSpec, ...] = (PkiSpec("fleet"),)
    network: Network = dataclasses.field(
        default_factory=Network
    )  # virtual runs: the simulated link between devices and edge
    identity_provider: IdentityProviderSpec | None = None

    @property
    def duration(self) -> float:
        """The sum of the phases' durations, in seconds."""
        return sum(p.duration for p in self.phases)

    @property
    def size(self) -> int:
        """Devices in the fleet."""
        return sum(c.size for c in self.cohorts)


POLICY_FORMS = (
    "certificate or common_name:<CN> (a device's), or a login's email:<address>,"
    " email_domain:<domain> or group:<name>; several joined with '+' (the first is the policy's"
    " include, the others its require: email_domain:example.com+certificate is a login from"
    " example.com on a device with a certificate)"
)


def policy_terms(policy: str) -> tuple[tuple[str, str], ...]:
    """The (rule, value) terms of a policy string; ValueError names what is wrong."""
    terms = []
    for part in policy.split("+"):
        rule, _, value = part.partition(":")
        if rule == "certificate" and not value:
            terms.append((rule, ""))
        elif rule in ("common_name", *IDENTITY_TERMS) and value:
            if any(c in value for c in '"\\') or not value.isprintable():
                # Values are written into the enforcer's TOML and compared as given.
                raise ValueError(
                    f"{part!r}: quotes, backslashes and control characters are refused"
                )
            if rule == "email" and not _EMAIL.fullmatch(value):
                raise ValueError(f"{part!r}: {value!r} is not an email address")
            terms.append((rule, value))
        else:
            raise ValueError(f"{policy!r}: {part!r} is not a policy term; expected {POLICY_FORMS}")
    return tuple(terms)


def needs_login(policy: str) -> bool:
    """The policy holds only after a login (it has an identity term)."""
    return any(rule in IDENTITY_TERMS for rule, _ in policy_terms(policy))


def _policy(r: TableReader, default: str) -> str:
    policy = r.get("policy", str, default, POLICY_FORMS)
    try:
        policy_terms(policy)
    except ValueError as exc:
        raise r.error("policy", str(exc)) from None
    return str(policy)


def person_outcome(policy: str, email: str, with_certificate: bool) -> str:
    """What a person with a valid certificate (or none) should observe under ``policy``
    (docs/access-flow.md I5-I7): groups are the provider's, so a group term is not judged
    here (a cohort under one declares ``expected``)."""
    terms = policy_terms(policy)
    if not with_certificate and any(rule in CERTIFICATE_TERMS for rule, _ in terms):
        return "denied:no_certificate"  # I7: a policy needing a certificate cannot hold
    if not needs_login(policy):
        return "allowed"  # a certificate policy admits the laptop without a login
    for rule, value in terms:
        domain = email.rsplit("@", 1)[-1].lower()
        if (rule == "email" and value.lower() != email.lower()) or (
            rule == "email_domain" and value.lower() != domain
        ):
            return "denied:identity_denied"
    return "allowed"


def _session_duration(r: TableReader, default: str) -> str:
    duration = r.get("session_duration", str, default, "a Go duration such as 0s or 24h")
    try:
        parse_duration(duration)
    except DurationError as exc:
        raise r.error("session_duration", str(exc)) from None
    return str(duration)


def _application(r: TableReader, session_duration: str, policy: str) -> Application:
    r.unknown({"name", "hostname", "session_duration", "policy"})
    name = r.get("name", str, what="an application name")
    if not _NAME.fullmatch(name):
        raise r.error("name", f"{name!r}: use letters, digits, '.', '_' and '-'")
    hostname = r.get("hostname", str, what="the application's hostname").lower().rstrip(".")
    if not _HOSTNAME.fullmatch(hostname):
        raise r.error("hostname", f"{hostname!r} is not a DNS name such as app.example.test")
    if hostname.endswith(".invalid"):
        # The run binds untrusted roots and known intermediates to names under .invalid.
        raise r.error("hostname", f"{hostname!r}: names under .invalid are the testbed's own")
    return Application(name, hostname, _session_duration(r, session_duration), _policy(r, policy))


def _applications(r: TableReader, session_duration: str, policy: str) -> tuple[Application, ...]:
    """``[[target.applications]]``: checked for repeated names and hostnames."""
    if "applications" not in r.table:
        return ()
    if "hostname" in r.table:
        raise r.error(
            "hostname",
            "with [[target.applications]] each application has its own hostname: remove"
            " target.hostname (the first application is the default one)",
        )
    apps = [_application(a, session_duration, policy) for a in r.tables("applications")]
    if not apps:
        raise r.error("applications", "expected at least one [[target.applications]]")
    if len(apps) > MAX_APPLICATIONS:
        raise r.error("applications", f"{len(apps)} applications: at most {MAX_APPLICATIONS}")
    for field, values in (
        ("name", [a.name for a in apps]),
        ("hostname", [a.hostname for a in apps]),
    ):
        for i, value in enumerate(values):
            if value in values[:i]:
                first = values.index(value)
                raise r.error(
                    f"applications[{i}].{field}",
                    f"{value!r} is also applications[{first}]'s {field}: each application needs"
                    f" its own {field}",
                )
    return tuple(apps)


def _target(r: TableReader, path: Path) -> Target:
    r.unknown(
        {
            "kind",
            "hostname",
            "session_duration",
            "policy",
            "url",
            "ca",
            "workers",
            "idle_timeout",
            "applications",
        }
    )
    kind = r.choice("kind", TARGETS, "embedded")
    # With [[target.applications]], these two are the applications' defaults.
    policy = _policy(r, "certificate")
    duration = _session_duration(r, "24h")
    declared = _applications(r, duration, policy)
    url = r.get("url", str, None, "https://host:port")
    ca = r.get("ca", str, None, "a PEM file")
    if kind == "external":
        if not url or not re.fullmatch(r"https://[^/:]+(:\d+)?/?", url):
            raise r.error(
                "url", f'an external target needs url = "https://host[:port]", got {url!r}'
            )
        if ca is None:
            raise r.error("ca", "an external target needs the CA file that signed its certificate")
    ca_path = None
    if ca is not None:
        ca_path = Path(ca) if Path(ca).is_absolute() else path.parent / ca
        if not ca_path.exists():
            raise r.error("ca", f"{ca_path} does not exist")
    workers = int(r.number("workers", 1, minimum=1))
    idle = r.get("idle_timeout", str, "30s", "a Go duration such as 30s or 12h")
    try:
        parse_duration(idle)
    except DurationError as exc:
        raise r.error("idle_timeout", str(exc)) from None
    first = declared[0] if declared else None
    return Target(
        kind,
        first.hostname
        if first
        else r.get("hostname", str, "auth.example.test", "a hostname").lower(),
        first.session_duration if first else duration,
        first.policy if first else policy,
        url,
        ca_path,
        workers,
        idle,
        declared,
    )


def _pki(r: TableReader, key_type: str, intermediates: int) -> PkiSpec:
    r.unknown({"name", "key_type", "intermediates", "trusted"})
    name = r.get("name", str, what="a PKI name")
    if not _NAME.fullmatch(name):
        raise r.error("name", f"{name!r}: use letters, digits, '.', '_' and '-'")
    n = int(r.number("intermediates", intermediates))
    if not 0 <= n <= 3:
        raise r.error("intermediates", f"{n} is not between 0 and 3")
    return PkiSpec(
        name=name,
        key_type=r.choice("key_type", KEY_TYPES, key_type),
        intermediates=n,
        trusted=r.get("trusted", bool, True, "true or false"),
    )


def _unknown_application(name: str, target: Target) -> str:
    if not target.declared:
        return (
            f"{name!r}: this target has one application (target.hostname); declare"
            " [[target.applications]] to give it several"
        )
    return (
        f"{name!r} is not one of the [[target.applications]]: {[a.name for a in target.declared]}"
    )


def _users(r: TableReader, size: int | None) -> tuple[tuple[tuple[str, str], ...], int]:
    """A people cohort's users (``users`` listed, or ``user_pattern`` with ``{i}``) and size."""
    password = r.get("password", str, None, "the people's password at the identity provider")
    env = r.get("password_env", str, None, "an environment variable holding the password")
    if password is not None and env is not None:
        raise r.error("password_env", "give password or password_env, not both")
    if env is not None:
        password = os.environ.get(env)
        if password is None:
            raise r.error("password_env", f"the environment variable {env} is not set")
    if ("users" in r.table) == ("user_pattern" in r.table):
        raise r.error(
            "users",
            'a people cohort needs users = ["a@example.com", ...] or user_pattern ='
            ' "user{i}@example.com" (one of them)',
        )
    users: list[tuple[str, str]] = []
    if "user_pattern" in r.table:
        pattern = r.get("user_pattern", str, what='a pattern such as "user{i}@example.com"')
        if pattern.count("{i}") != 1 or not _EMAIL.fullmatch(pattern.replace("{i}", "1")):
            raise r.error("user_pattern", f"{pattern!r}: expected an email with one {{i}}")
        if size is None:
            raise r.error("size", "a user_pattern cohort needs a size")
        if password is None:
            raise r.error("password", "the people of a user_pattern need a password")
        users = [(pattern.replace("{i}", str(i)), password) for i in range(1, size + 1)]
    else:
        raw = r.get("users", list, what="a list of emails or {email, password} tables")
        if not raw:
            raise r.error("users", "expected at least one user")
        for i, u in enumerate(raw):
            where = f"users[{i}]"
            if isinstance(u, dict):
                extra = set(u) - {"email", "password"}
                if extra:
                    raise r.error(where, f"unknown keys {sorted(extra)}: expected email, password")
                email, pw = u.get("email"), u.get("password", password)
            else:
                email, pw = u, password
            if not isinstance(email, str) or not _EMAIL.fullmatch(email):
                raise r.error(where, f"{email!r} is not an email address")
            if not isinstance(pw, str):
                raise r.error(where, f"{email}: no password (give password on the cohort or here)")
            users.append((email, pw))
    if len(users) > MAX_PEOPLE or (size or 0) > MAX_PEOPLE:
        raise r.error("size", f"at most {MAX_PEOPLE} people in a cohort")
    return tuple(users), size or len(users)


def _cohort(r: TableReader, target: Target, pkis: dict[str, PkiSpec]) -> CohortSpec:
    kind = r.choice("kind", COHORT_KINDS, "devices")
    if kind != "devices":
        return _client_cohort(r, kind, target, pkis)
    r.unknown(
        {
            "kind",
            "pki",
            "name",
            "size",
            "defect",
            "expected",
            "key_store",
            "key_type",
            "behaviour",
            "client",
            "piv",
            "application",
        }
    )
    name = r.get("name", str, what="a cohort name")
    if not _NAME.fullmatch(name):
        raise r.error("name", f"{name!r}: use letters, digits, '.', '_' and '-'")
    size = int(r.number("size", minimum=1))
    defect = r.get("defect", str, None, f"one of {list(DEFECTS)}")
    if defect is not None and defect not in DEFECTS:
        raise r.error("defect", f"{defect!r} is not one of {list(DEFECTS)}")
    pki = r.get("pki", str, next(iter(pkis)), "a PKI name")
    if pki not in pkis:
        raise r.error("pki", f"{pki!r} is not one of the [[pkis]]: {sorted(pkis)}")
    key_type = r.get("key_type", str, None, f"one of {list(KEY_TYPES)}")
    if key_type is not None and key_type not in KEY_TYPES:
        raise r.error("key_type", f"{key_type!r} is not one of {list(KEY_TYPES)}")
    application = r.get("application", str, None, "an application name")
    if application is not None and application not in [a.name for a in target.declared]:
        raise r.error("application", _unknown_application(application, target))
    app = target.application(application)
    policy = "common_name" if app.policy.startswith("common_name:") else "certificate"
    # A root bound to another hostname authorises nothing here, whatever else is wrong.
    path_keys = (key_type or pkis[pki].key_type, pkis[pki].key_type)
    default = (
        expected_outcome(defect, policy, path_keys)
        if pkis[pki].trusted
        else "denied:untrusted_issuer"
    )
    if default == "allowed" and needs_login(app.policy):
        # A device never logs in: a policy that needs a login answers 401 (I7).
        default = "denied:login_required"
    expected = r.get("expected", str, default, "an outcome such as allowed")
    behaviour_raw = r.get("behaviour", dict, {"kind": "periodic"}, "a behaviour table")
    try:
        behaviour = parse_behaviour(behaviour_raw, r.field("behaviour"))
    except BehaviourError as exc:
        raise ScenarioError(r.path, "", str(exc)) from None
    client = r.sub("client")
    client.unknown(
        {
            "keep_alive",
            "resume_sessions",
            "reuse_cookie",
            "always_new_handshake",
            "clock_skew",
            "protocol",
            "rpc",
            "watch_messages",
        }
    )
    protocol = client.choice("protocol", PROTOCOLS, "http1")
    pkcs11 = None
    if isinstance(r.table.get("key_store"), dict):
        store = r.sub("key_store")
        key_store = store.choice("kind", KEY_STORES)
        if key_store != "pkcs11":
            raise store.error(
                "kind", f'a table configures "pkcs11"; write key_store = "{key_store}"'
            )
        pkcs11 = _pkcs11_settings(store)
    else:
        key_store = r.choice("key_store", KEY_STORES, "software")
        if key_store == "pkcs11":
            raise r.error(
                "key_store",
                'pkcs11 needs a table: { kind = "pkcs11", module, token, pin_env, key_label }',
            )
    if key_store not in PROTOCOL_KEY_STORES[protocol]:
        raise client.error(
            "protocol",
            f"{protocol} cannot use a {key_store} key store: grpcio takes the private key as PEM"
            " bytes and a token never exports it (and a pkcs11 key signs through an HTTP/1.1-only"
            " client); use http1, or key_store = software",
        )
    if protocol != "grpc" and ("rpc" in client.table or "watch_messages" in client.table):
        raise client.error(
            "rpc" if "rpc" in client.table else "watch_messages",
            'only a gRPC cohort makes calls: set protocol = "grpc" or remove it',
        )
    rpc = client.choice("rpc", RPCS, "report")
    watch_messages = int(client.number("watch_messages", 3, minimum=1))
    if watch_messages > 1000:
        raise client.error("watch_messages", f"{watch_messages} is above 1000")
    piv = r.sub("piv")
    piv.unknown(
        {"slot", "pin", "pin_policy", "touch_policy", "touch_delay", "browser_pin_every_handshake"}
    )
    return CohortSpec(
        pki=pki,
        name=name,
        size=size,
        defect=defect,
        expected=expected,
        key_store=key_store,
        pkcs11=pkcs11,
        key_type=key_type,
        behaviour=behaviour,
        keep_alive=client.get("keep_alive", bool, True, "true or false"),
        resume_sessions=client.get("resume_sessions", bool, True, "true or false"),
        reuse_cookie=client.get("reuse_cookie", bool, True, "true or false"),
        always_new_handshake=client.get("always_new_handshake", bool, False, "true or false"),
        clock_skew=client.seconds("clock_skew", "0s") if "clock_skew" in client.table else 0.0,
        piv=PivSettings(
            slot=piv.choice("slot", ("9a", "9c", "9d", "9e"), "9a"),
            pin=piv.get("pin", str, "123456", "the PIN the device knows"),
            pin_policy=piv.get("pin_policy", str, None, "never, once or always"),
            touch_policy=piv.get("touch_policy", str, None, "never, always or cached"),
            touch_delay=piv.seconds("touch_delay", "0.5s") if "touch_delay" in piv.table else 0.5,
            browser_pin_every_handshake=piv.get(
                "browser_pin_every_handshake", bool, False, "true or false"
            ),
        ),
        protocol=protocol,
        rpc=rpc,
        watch_messages=watch_messages,
        application=application,
    )


def _client_cohort(
    r: TableReader, kind: str, target: Target, pkis: dict[str, PkiSpec]
) -> CohortSpec:
    """A cohort of people or of service tokens (``kind``)."""
    common = {"kind", "name", "size", "expected", "behaviour", "client", "application"}
    if kind == "people":
        r.unknown(
            common
            | {"users", "user_pattern", "password", "password_env", "with_certificate", "pki"}
            | {"key_type"}
        )
    else:
        r.unknown(common | {"defect", "duration"})
    name = r.get("name", str, what="a cohort name")
    if not _NAME.fullmatch(name):
        raise r.error("name", f"{name!r}: use letters, digits, '.', '_' and '-'")
    size = int(r.number("size", minimum=1)) if "size" in r.table else None
    application = r.get("application", str, None, "an application name")
    if application is not None and application not in [a.name for a in target.declared]:
        raise r.error("application", _unknown_application(application, target))
    app = target.application(application)
    client = r.sub("client")
    client.unknown({"keep_alive", "resume_sessions"})
    behaviour_raw = r.get("behaviour", dict, {"kind": "periodic"}, "a behaviour table")
    try:
        behaviour = parse_behaviour(behaviour_raw, r.field("behaviour"))
    except BehaviourError as exc:
        raise ScenarioError(r.path, "", str(exc)) from None
    users: tuple[tuple[str, str], ...] = ()
    with_certificate = False
    pki = next(iter(pkis))
    key_type = None
    token_defect = None
    duration = "8760h"
    if kind == "people":
        users, size = _users(r, size)
        with_certificate = r.get("with_certificate", bool, True, "true or false")
        if not with_certificate and ("pki" in r.table or "key_type" in r.table):
            raise r.error(
                "pki" if "pki" in r.table else "key_type",
                "people without a certificate (with_certificate = false) have no PKI",
            )
        pki = r.get("pki", str, pki, "a PKI name")
        if pki not in pkis:
            raise r.error("pki", f"{pki!r} is not one of the [[pkis]]: {sorted(pkis)}")
        key_type = r.get("key_type", str, None, f"one of {list(KEY_TYPES)}")
        if key_type is not None and key_type not in KEY_TYPES:
            raise r.error("key_type", f"{key_type!r} is not one of {list(KEY_TYPES)}")
        seen = {
            person_outcome(app.policy, email, with_certificate)
            if pkis[pki].trusted or not with_certificate
            else "denied:untrusted_issuer"
            for email, _ in users[: size or len(users)]
        }
        groups = any(rule == "group" for rule, _ in policy_terms(app.policy))
        if groups and "expected" not in r.table:
            # Groups are the provider's claim: the scenario cannot tell who is in which.
            raise r.error(
                "expected",
                f"policy {app.policy!r} names a group, which the identity provider decides:"
                " set expected (allowed, or denied:identity_denied)",
            )
        if len(seen) > 1 and "expected" not in r.table:
            raise r.error(
                "users",
                f"these people would observe different outcomes under policy {app.policy!r}:"
                f" {sorted(seen)}; split them into cohorts, or set expected",
            )
        default = seen.pop()
    else:
        if size is None:
            raise r.error("size", "a service_tokens cohort needs a size (tokens to create)")
        token_defect = r.get("defect", str, None, f"one of {list(TOKEN_DEFECTS)}")
        if token_defect is not None and token_defect not in TOKEN_DEFECTS:
            raise r.error("defect", f"{token_defect!r} is not one of {list(TOKEN_DEFECTS)}")
        duration = r.get("duration", str, "8760h", "a Go duration such as 1h or 8760h")
        try:
            if parse_duration(duration).total_seconds() <= 0:
                raise DurationError("a service token's duration must be above 0")
        except DurationError as exc:
            raise r.error("duration", str(exc)) from None
        default = "denied:service_token_invalid" if token_defect else "allowed"
    assert size is not None
    return CohortSpec(
        name=name,
        size=size,
        defect=None,
        expected=r.get("expected", str, default, "an outcome such as allowed"),
        key_type=key_type,
        behaviour=behaviour,
        keep_alive=client.get("keep_alive", bool, True, "true or false"),
        resume_sessions=client.get("resume_sessions", bool, True, "true or false"),
        pki=pki,
        application=application,
        kind=kind,
        users=users,
        with_certificate=with_certificate,
        token_defect=token_defect,
        token_duration=duration,
    )


def _identity_provider(top: TableReader) -> IdentityProviderSpec | None:
    """``[identity_provider]``: where the embedded enforcer sends people to log in."""
    if "identity_provider" not in top.table:
        return None
    r = top.sub("identity_provider")
    r.unknown(
        {
            "name",
            "issuer_url",
            "client_id",
            "client_secret_env",
            "ca_file",
            "scopes",
            "groups_claim",
            "email_claim_name",
        }
    )
    issuer = r.get("issuer_url", str, what="the provider's issuer, https://...")
    if not re.fullmatch(r"https://[^/?#\s]+(/[^?#\s]*)?", issuer):
        raise r.error("issuer_url", f"{issuer!r}: expected an https URL (the provider's issuer)")
    secret_env = r.get(
        "client_secret_env", str, what="the environment variable holding the client secret"
    )
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", secret_env):
        raise r.error("client_secret_env", f"{secret_env!r} is not an environment variable name")
    if not os.environ.get(secret_env):
        raise r.error(
            "client_secret_env",
            f"the environment variable {secret_env} is not set: export the client secret"
            " registered at the provider in it",
        )
    ca = r.get("ca_file", str, None, "a PEM file")
    ca_path = None
    if ca is not None:
        ca_path = Path(ca) if Path(ca).is_absolute() else r.path.parent / ca
        if not ca_path.is_file():
            raise r.error("ca_file", f"{ca_path} does not exist")
    scopes = r.get("scopes", list, ["openid", "email", "profile"], "a list of scopes")
    if "openid" not in scopes or not all(isinstance(x, str) and x for x in scopes):
        raise r.error("scopes", f"{scopes!r}: a list of scope names holding openid")
    return IdentityProviderSpec(
        issuer_url=issuer.rstrip("/")
        if issuer.endswith("/") and issuer.count("/") == 3
        else issuer,
        client_id=r.get("client_id", str, what="the client id registered at the provider"),
        client_secret_env=secret_env,
        name=r.get("name", str, "identity provider", "a name"),
        ca_file=ca_path,
        scopes=tuple(scopes),
        groups_claim=r.get("groups_claim", str, "groups", "a claim name"),
        email_claim_name=r.get("email_claim_name", str, "email", "a claim name"),
    )


def people_problem(
    clock: str,
    target_kind: str,
    cohorts: Sequence[CohortSpec],
    idp: IdentityProviderSpec | None,
) -> tuple[str, str] | None:
    """(field, problem) when a run cannot carry its people or service-token cohorts."""
    people = [c for c in cohorts if c.kind == "people"]
    tokens = [c for c in cohorts if c.kind == "service_tokens"]
    if people and clock == "virtual":
        # The provider is a real server on the wall clock: its codes, sessions and ID tokens
        # expire by real seconds, and the enforcer would judge them by the virtual clock
        # (iat/exp with 60 s of leeway). Mixing the two clocks would test nothing.
        return (
            "clock",
            f"cohort {people[0].name} is kind = people: a login goes to a real identity provider"
            ' on the wall clock, which virtual time cannot drive; use clock = "real"',
        )
    if (people or tokens) and target_kind != "embedded":
        first = (people or tokens)[0]
        return (
            "target.kind",
            f"cohort {first.name} is kind = {first.kind}: it needs the embedded enforcer (the"
            " run configures its identity provider and creates its service tokens)",
        )
    if people and idp is None:
        return (
            "identity_provider",
            f"cohort {people[0].name} is kind = people: add an [identity_provider] table"
            " (issuer_url, client_id, client_secret_env, ca_file)",
        )
    grpc = [c for c in cohorts if c.protocol == "grpc"]
    if grpc and (people or tokens):
        return ("cohorts", "people and service tokens speak HTTP: not beside gRPC cohorts")
    return None


def _phase(r: TableReader) -> Phase:
    r.unknown({"name", "duration", "arrival", "rate", "from", "to", "devices"})
    arrival = r.choice("arrival", ARRIVALS)
    phase = Phase(
        name=r.get("name", str, what="a phase name"),
        duration=r.seconds("duration"),
        arrival=arrival,
        rate=r.number("rate", 0.0) if arrival == "constant" else 0.0,
        start_rate=r.number("from", 0.0) if arrival == "ramping" else 0.0,
        end_rate=r.number("to", 0.0) if arrival == "ramping" else 0.0,
        devices=int(r.number("devices", 0)) if arrival == "active" else 0,
    )
    if phase.duration <= 0:
        raise r.error("duration", "must be above 0")
    if arrival == "constant" and phase.rate <= 0:
        raise r.error("rate", "a constant arrival needs rate > 0 (attempts per second)")
    if arrival == "ramping" and "to" not in r.table:
        raise r.error("to", "a ramping arrival needs from and to (attempts per second)")
    if arrival == "active" and phase.devices < 1:
        raise r.error("devices", "an active phase needs devices >= 1")
    return phase


def _event(
    r: TableReader,
    cohorts: set[str],
    pkis: dict[str, PkiSpec],
    target: Target,
    token_cohorts: set[str],
    pkcs11_cohorts: set[str],
) -> Event:
    r.unknown({"at", "action", "cohort", "share", "value", "pki", "application"})
    action = r.choice("action", EVENTS)
    event = Event(
        at=r.seconds("at"),
        action=action,
        cohort=r.get("cohort", str, None, "a cohort name"),
        share=r.number("share", 1.0),
        value=r.get("value", str, None, "a value"),
        pki=r.get("pki", str, None, "a PKI name"),
        application=r.get("application", str, None, "an application name"),
    )
    if event.application is not None:
        if action not in APPLICATION_EVENTS:
            raise r.error(
                "application",
                f"only {' and '.join(APPLICATION_EVENTS)} change one application; {action}"
                " takes none",
            )
        if event.application not in [a.name for a in target.declared]:
            raise r.error("application", _unknown_application(event.application, target))
    trusted = [name for name, spec in pkis.items() if spec.trusted]
    if event.pki is not None and (
        action not in ("rotate_root", "remove_root") or event.pki not in trusted
    ):
        raise r.error("pki", f"only rotate_root and remove_root take a pki, one of {trusted}")
    if action in ("rotate_root", "remove_root") and not trusted:
        raise r.error("action", f"{action} needs a trusted PKI, and none is")
    if action == "revoke" and event.cohort not in cohorts:
        raise r.error(
            "cohort", f"revoke needs a cohort with certificates, one of {sorted(cohorts)}"
        )
    if action == "revoke_service_token" and event.cohort not in token_cohorts:
        raise r.error(
            "cohort",
            f"revoke_service_token needs a service_tokens cohort, one of {sorted(token_cohorts)}",
        )
    if not 0 < event.share <= 1:
        raise r.error("share", f"{event.share} is not in (0, 1]")
    if action in TOKEN_EVENTS and event.cohort not in pkcs11_cohorts:
        raise r.error("cohort", f"{action} needs a pkcs11 cohort, one of {sorted(pkcs11_cohorts)}")
    if action == "pin_changed" and not event.value:
        raise r.error("value", "pin_changed needs value = the environment variable of the new PIN")
    if action == "set_session_duration":
        try:
            parse_duration(event.value or "")
        except DurationError as exc:
            raise r.error("value", str(exc)) from None
    if action == "set_policy" and not (
        event.value == "certificate" or (event.value or "").startswith("common_name:")
    ):
        # A device's policy: what a login policy admits depends on who holds a session.
        raise r.error("value", 'set_policy needs value = "certificate" or "common_name:<CN>"')
    if action == "set_policy":
        try:
            policy_terms(event.value or "")
        except ValueError as exc:
            raise r.error("value", f"set_policy: {exc}") from None
    if action == "advance_clock":
        try:
            parse_duration(event.value or "")
        except DurationError as exc:
            raise r.error("value", str(exc)) from None
    return event


def _network(top: TableReader, clock: str) -> Network:
    if "network" not in top.table:
        # A modest round trip by default, so that a virtual run's latencies mean something;
        # the shipped virtual scenarios get the same outcome counts with it as with none.
        return DEFAULT_VIRTUAL_NETWORK if clock == "virtual" else Network()
    if clock != "virtual":
        raise top.error(
            "network", 'a simulated network needs clock = "virtual" (the real one has its own)'
        )
    r = top.sub("network")
    r.unknown({"rtt", "jitter"})
    rtt, jitter = r.seconds("rtt", "0s"), r.seconds("jitter", "0s")
    if jitter > rtt:
        raise r.error(
            "jitter", f"{jitter:g}s is above the rtt ({rtt:g}s): a delay cannot be negative"
        )
    return Network(rtt, jitter)


def protocol_problem(
    cohorts: Sequence[CohortSpec], clock: str, target_kind: str
) -> tuple[str, str] | None:
    """(field, problem) when a run cannot carry its cohorts' protocols, else None: gRPC in
    virtual time, gRPC from a key store that cannot export its key, gRPC beside HTTP."""
    grpc = [c for c in cohorts if c.protocol == "grpc"]
    if grpc and clock == "virtual":
        return (
            "clock",
            f"cohort {grpc[0].name} has client.protocol = grpc, which needs real sockets (grpcio"
            ' runs its own): use clock = "real", or protocol http1 or h2',
        )
    for c in grpc:
        if c.key_store not in PROTOCOL_KEY_STORES["grpc"]:
            return (
                "cohorts",
                f"cohort {c.name}: grpc cannot use a {c.key_store} key store: grpcio takes the"
                " private key as PEM bytes and a PIV token never exports it; use http1 or h2",
            )
    others = [c.name for c in cohorts if c.protocol != "grpc"]
    if grpc and others and target_kind != "external":
        # One origin for every application: the telemetry gRPC service answers gRPC only.
        return (
            "cohorts",
            f"cohort {grpc[0].name} speaks grpc and cohort {others[0]} does not: the run's"
            " applications share one origin (the telemetry gRPC service for grpc cohorts, the echo"
            " origin for HTTP); give every cohort the same kind of protocol",
        )
    return None


def grpc_run(scenario: Scenario) -> bool:
    """The scenario's devices make gRPC calls (its origin is the telemetry service)."""
    return any(c.protocol == "grpc" for c in scenario.cohorts)


def refused_by_nginx(scenario: Scenario) -> str:
    """What nginx's refusal of a certificate that does not verify looks like to the devices."""
    return NGINX_REFUSED_GRPC if grpc_run(scenario) else NGINX_REFUSED


def load_scenario(path: str | Path) -> Scenario:
    """Read and check a scenario file; raise :class:`ScenarioError` on the first problem."""
    p = Path(path)
    top = read_toml(p, ScenarioError)
    top.unknown(
        {
            "name",
            "seed",
            "clock",
            "timeout",
            "target",
            "fleet",
            "pkis",
            "cohorts",
            "phases",
            "events",
            "thresholds",
            "network",
            "identity_provider",
        }
    )
    name = top.get("name", str, p.stem, "a name")
    if not _NAME.fullmatch(name):
        raise top.error("name", f"{name!r}: use letters, digits, '.', '_' and '-'")
    clock = top.choice("clock", CLOCKS, "real")
    target = _target(top.sub("target"), p)
    if clock == "virtual" and target.kind != "embedded":
        raise top.error("clock", "virtual time needs the embedded target (in-memory streams)")
    network = _network(top, clock)
    fleet = top.sub("fleet")
    fleet.unknown({"intermediates", "key_type"})
    key_type = fleet.choice("key_type", KEY_TYPES, "ec-p256")
    intermediates = int(fleet.number("intermediates", 1))
    pki_list = [_pki(r, key_type, intermediates) for r in top.tables("pkis")] or [
        PkiSpec("fleet", key_type, intermediates)
    ]
    pkis = {p.name: p for p in pki_list}
    if len(pkis) != len(pki_list):
        raise top.error("pkis", f"PKI names repeat: {[p.name for p in pki_list]}")
    cohorts = tuple(_cohort(r, target, pkis) for r in top.tables("cohorts"))
    if not cohorts:
        raise top.error("cohorts", "at least one [[cohorts]] is required")
    names = [c.name for c in cohorts]
    if len(set(names)) != len(names):
        raise top.error("cohorts", f"cohort names repeat: {names}")
    on_token = next((c.name for c in cohorts if c.key_store == "pkcs11"), None)
    if on_token is not None and clock == "virtual":
        # A token signs in real time over real sockets; virtual runs use in-memory streams.
        raise top.error(
            "clock", f'cohort {on_token} keeps its keys on a PKCS#11 token: use clock = "real"'
        )
    problem = protocol_problem(cohorts, clock, target.kind)
    if problem is not None:
        raise top.error(*problem)
    idp = _identity_provider(top)
    problem = people_problem(clock, target.kind, cohorts, idp)
    if problem is not None:
        raise top.error(*problem)
    if target.kind == "external" and any(c.defect == "revoked" for c in cohorts):
        # The run publishes CRLs to the targets it starts; an external one never sees them.
        raise top.error(
            "cohorts", "a revoked cohort needs a target the run starts (embedded or nginx)"
        )
    phases = tuple(_phase(r) for r in top.tables("phases"))
    if not phases:
        raise top.error("phases", "at least one [[phases]] is required")
    certified = {c.name for c in cohorts if c.provisioned}
    tokens = {c.name for c in cohorts if c.kind == "service_tokens"}
    on_tokens = {c.name for c in cohorts if c.key_store == "pkcs11"}
    events = tuple(
        _event(r, certified, pkis, target, tokens, on_tokens) for r in top.tables("events")
    )
    for i, e in enumerate(events):
        app = target.application(e.application)
        people = [
            c.name
            for c in cohorts
            if c.kind == "people" and target.application(c.application) == app
        ]
        if e.action == "set_policy" and people:
            # A person's session outlives a policy change (the token admits, A4): what each
            # should observe would depend on who holds a session at that instant.
            raise top.error(
                f"events[{i}].action",
                f"set_policy on application {app.name or app.hostname!r}, which people cohort"
                f" {people[0]} calls: their sessions outlive a policy change (A4), so the run"
                " cannot say what each should observe; put the people on another application",
            )
    allowed = REVOCABLE_EVENTS if target.kind == "nginx" else ORIGIN_EVENTS
    if target.kind != "embedded" and any(e.action not in allowed for e in events):
        wrong = next(e.action for e in events if e.action not in allowed)
        raise top.error(
            "events",
            f"{wrong} needs the embedded target"
            + (" (nginx takes revoke: a new CRL and a reload)" if target.kind == "nginx" else ""),
        )
    raw_thresholds = top.get(
        "thresholds", list, [], 'a list of strings such as "false_accepts == 0"'
    )
    thresholds = []
    for i, text in enumerate(raw_thresholds):
        if not isinstance(text, str):
            raise top.error(f"thresholds[{i}]", f"expected a string, got {text!r}")
        try:
            thresholds.append(parse_threshold(text, names))
        except ThresholdError as exc:
            raise top.error(f"thresholds[{i}]", str(exc)) from None
    return Scenario(
        path=p,
        name=name,
        seed=int(top.number("seed", 1)),
        clock=clock,
        target=target,
        cohorts=cohorts,
        phases=phases,
        events=events,
        thresholds=tuple(thresholds),
        intermediates=intermediates,
        key_type=key_type,
        timeout=top.seconds("timeout", "10s"),
        pkis=tuple(pki_list),
        network=network,
        identity_provider=idp,
    )
