"""``testbed run``: a scenario's fleet against its target, every attempt recorded as it happens.

Theory of operation. Before anything starts, the scenario is checked and the fleet provisioned
(``RUN_DIR/fleet``, or ``RUN_DIR/fleets/<pki>`` for several PKIs: see :mod:`testbed.pkis`).
Then one trio nursery owns everything that runs: the target (the embedded
enforcer and its echo origin, or nginx), the phases' schedulers, the timed events and the live
display. Open-loop phases compute each attempt's scheduled time from the arrival rate and give
the attempt to a free device; when no device is free the attempt is counted as dropped, as k6
counts dropped iterations. Latency is measured from the scheduled time, so a target that
stalls shows up as latency rather than as fewer attempts (no coordinated omission).

With ``clock = "virtual"`` the same code runs on trio's MockClock with in-memory streams between
devices, enforcer and origin: simulated time passes only while everything waits, so a week of
telemetry takes as long as its CPU work, and a seed reproduces the run. Between devices and
the enforcer the streams simulate the scenario's ``network`` (:mod:`testbed.network`): each
flight of bytes arrives half a round trip later, so virtual latencies count round trips.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import io
import math
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO, cast

import trio
import trio.testing
from cryptography.hazmat.primitives import serialization
from rich.console import Console
from rich.live import Live
from rich.table import Table

from devices.behaviour import run_behaviour
from devices.client import Attempt, ClientOptions, DeviceClient
from devices.client import Target as DeviceTarget
from devices.grpc_client import GrpcDeviceClient
from devices.h2_client import H2DeviceClient
from devices.keystore import KeyStore, SoftwareKeyStore
from devices.person import PersonAttempt, PersonClient, ServiceTokenClient
from devices.piv import MAX_RETRIES
from devices.pki import issue_ca, issue_leaf, write_pem
from enforcer import control
from enforcer.accesslog import AccessLog
from enforcer.clock import Clock, TrioClock, WallClock
from enforcer.config import load_config
from enforcer.durations import parse_duration
from enforcer.origin import _echo, echo_app, serve_echo_origin_on
from enforcer.server import Enforcer, open_listener, serve
from testbed.live import (
    LiveError,
    LiveOptions,
    LiveOutputs,
    ResultsFeed,
    finishing,
    live_for,
    live_options,
)
from testbed.network import link_pair
from testbed.pkis import Member, RunCrls, RunFleet, provision_pkis
from testbed.results import AttemptRow, ResultsWriter, shard_results
from testbed.scenario import (
    TOKEN_EVENTS,
    CohortSpec,
    Event,
    Phase,
    Scenario,
    grpc_run,
    policy_terms,
    refused_by_nginx,
)
from testbed.summary import fmt_rate, fmt_span
from testbed.thresholds import Threshold

EXIT_OK, EXIT_THRESHOLDS, EXIT_INTERRUPTED = 0, 1, 130

# Writes a finished run's report: called with the run directory and, when the run was judged,
# the summary it was judged on (None after an interruption: the report reads the results).
Render = Callable[[Path, "dict[str, Any] | None"], Any]
START_TIMEOUT = 300.0  # seconds shards wait for each other to be ready


class RunError(Exception):
    """A run cannot start on this machine; the message says what is missing."""


# What a device with the wrong PIN sees on its PIV token: refused, then blocked.
PIN_INCORRECT = "key_store_error:CKR_PIN_INCORRECT"
PIN_LOCKED = "key_store_error:CKR_PIN_LOCKED"


class OffsetClock:
    """A clock that can be moved forward by events (``advance_clock``)."""

    def __init__(self, base: Clock) -> None:
        self.base = base
        self.offset = dt.timedelta(0)

    def now(self) -> dt.datetime:
        """The base clock's time plus the offset."""
        return self.base.now() + self.offset


class BufferedLogFile(io.TextIOBase):
    """A virtual run's access log file, written in the run's own thread through a buffer.

    :class:`~enforcer.accesslog.AccessLog` hands each record of a file target to a writer
    thread, so that a stalled reader never blocks a server. A virtual run's records come one
    at a time, each waking that thread and trading the GIL with it: a measurable share of a
    virtual week's CPU. A target without a file descriptor (this one) is written at once
    instead; its lines reach the file every :data:`LOG_FLUSH_SECONDS` of wall time and at
    :meth:`close` (a killed run can lose that much of its access log, never of its results).
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self._file = open(path, "a", encoding="utf-8", buffering=1 << 20)  # noqa: SIM115
        self._flushed = time.monotonic()

    def write(self, text: str) -> int:
        """Buffer one line."""
        return self._file.write(text)

    def flush(self) -> None:
        """Hand the buffer to the OS, at most every LOG_FLUSH_SECONDS (AccessLog asks per line)."""
        now = time.monotonic()
        if now - self._flushed >= LOG_FLUSH_SECONDS and not self._file.closed:
            self._flushed = now
            self._file.flush()

    def close(self) -> None:
        """Write what is buffered and close the file."""
        if not self._file.closed:
            self._file.close()
        super().close()


LOG_FLUSH_SECONDS = 0.5


@dataclasses.dataclass
class Device:
    """One simulated device in a run."""

    id: str
    cohort: CohortSpec
    sha256: str
    common_name: str
    client: DeviceClient | PersonClient | ServiceTokenClient
    busy: bool = False
    email: str = ""  # a person's
    token_id: str = ""  # a service token's id on the target
    pin_tries: int = 0  # wrong PINs this device has tried on its PIV token
    # When (trio time) each change of expectation took effect, and what it was before.
    changes: list[tuple[float, str]] = dataclasses.field(default_factory=list)

    def expect(self, outcome: str) -> None:
        """Change what this device should now observe (after an event)."""
        self.changes.append((trio.current_time(), self.cohort.expected))
        self.cohort = dataclasses.replace(self.cohort, expected=outcome)

    def expected_for(self, outcome: str, started: float) -> str:
        """What an attempt running from ``started`` until now was expected to observe.

        An event's change takes effect on the target somewhere inside an attempt that spans
        it, so either side's expectation is right there: the one the outcome matches, else the
        latest.
        """
        during = [before for at, before in self.changes if at >= started]
        if outcome in during:
            return outcome
        return self.cohort.expected

    def tried(self) -> None:
        """Follow the token after an attempt: a wrong PIN locks it after MAX_RETRIES tries."""
        if self.cohort.expected != PIN_INCORRECT:
            return
        self.pin_tries += 1
        # Like a YubiKey (ykcs11): each of the MAX_RETRIES wrong VERIFYs answers
        # CKR_PIN_INCORRECT, and every later C_Login answers CKR_PIN_LOCKED.
        if self.pin_tries >= MAX_RETRIES:
            self.expect(PIN_LOCKED)


@dataclasses.dataclass
class RunOutcome:
    """Where a run wrote, and how it ended."""

    run_dir: Path
    exit_code: int
    thresholds: list[tuple[str, str, bool]]


def run_dir_for(scenario: Scenario, reports: Path) -> Path:
    """A new folder ``reports/<scenario>-<timestamp>``."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = reports / f"{scenario.name}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = reports / f"{scenario.name}-{stamp}-{n}"
    return path


# The scenario's idle_timeout is the enforcer's keep-alive idle_timeout (between requests);
# request_timeout (the first request's head, and any head once begun) keeps the enforcer's 30 s
# default: a device that connects and sends nothing is not to hold the connection for hours.
_ENFORCER_TOML = """\
# Written by `testbed run` for scenario {name}.
revoked = {revoked}

[server]
host = "127.0.0.1"
port = 0
access_log = "{run}/{prefix}access.log"
idle_timeout = "{idle}"

[state]
path = "{run}/{prefix}state.sqlite"

[signing]
key_file = "{run}/{prefix}signing-key.pem"

[[edge_certificates]]
hostnames = [{hosts}]
certificate = "{run}/edge/cert.pem"
private_key = "{run}/edge/key.pem"

{roots}
{identity_providers}
{applications}"""

# One per application of the scenario's target, each with the run's one origin.
_APPLICATION_TOML = """\
[[applications]]
name = "{name}"
hostname = "{host}"
session_duration = "{session}"
origin = "{origin}"

{policies}"""

_POLICY_TOML = """\
[[applications.policies]]
name = "{name}"
decision = "{decision}"
include = [{include}]
{require}"""

# The enforcer's rule for each policy term of a scenario (testbed.scenario.policy_terms).
_RULE_FIELDS = {
    "common_name": "common_name",
    "email": "email",
    "email_domain": "domain",
    "group": "name",
}


def policy_rules(policy: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A scenario policy's (include, require) rules in the admin API's shape."""
    rules: list[dict[str, Any]] = [
        {"certificate": {}} if rule == "certificate" else {rule: {_RULE_FIELDS[rule]: value}}
        for rule, value in policy_terms(policy)
    ]
    return rules[:1], rules[1:]


def policy_decision(policy: str) -> str:
    """``allow`` for a policy with a login's terms, else ``non_identity`` (a device's)."""
    return (
        "allow"
        if any(r in _RULE_FIELDS and r != "common_name" for r, _ in policy_terms(policy))
        else "non_identity"
    )


def _toml_rules(rules: list[dict[str, Any]]) -> str:
    return ", ".join(
        "{ "
        + ", ".join(
            f"{k} = {{ " + ", ".join(f'{f} = "{v}"' for f, v in inner.items()) + " }"
            for k, inner in rule.items()
        )
        + " }"
        for rule in rules
    )


def _policies_toml(policy: str, service_tokens: bool) -> str:
    """The application's policies: service tokens first (when a cohort uses them), then the
    scenario's policy."""
    out = []
    if service_tokens:
        out.append(
            _POLICY_TOML.format(
                name="service-tokens",
                decision="non_identity",
                include="{ any_valid_service_token = {} }",
                require="",
            )
        )
    include, require = policy_rules(policy)
    out.append(
        _POLICY_TOML.format(
            name="fleet",
            decision=policy_decision(policy),
            include=_toml_rules(include),
            require=f"require = [{_toml_rules(require)}]\n" if require else "",
        )
    )
    return "\n".join(out)


# The scenario's [identity_provider], for every application of the account (no allowed_idps).
# The client secret stays in the environment variable the scenario names: never on disk here.
_IDP_TOML = """\
[[identity_providers]]
id = "idp"
name = "{name}"
type = "oidc"
issuer_url = "{issuer_url}"
client_id = "{client_id}"
client_secret_env = "{client_secret_env}"
scopes = [{scopes}]
groups_claim = "{groups_claim}"
email_claim_name = "{email_claim_name}"
{ca}"""


def identity_providers_toml(scenario: Scenario) -> str:
    """The enforcer configuration's ``[[identity_providers]]`` for a scenario (or nothing)."""
    idp = scenario.identity_provider
    if idp is None:
        return ""
    return _IDP_TOML.format(
        name=idp.name,
        issuer_url=idp.issuer_url,
        client_id=idp.client_id,
        client_secret_env=idp.client_secret_env,
        scopes=_quoted(idp.scopes),
        groups_claim=idp.groups_claim,
        email_claim_name=idp.email_claim_name,
        ca=f'ca_file = "{idp.ca_file}"\n' if idp.ca_file else "",
    )


def write_edge(scenario: Scenario, run_dir: Path, now: dt.datetime) -> None:
    """Write the edge's server PKI for a run, once (shards share it)."""
    if (run_dir / "edge" / "key.pem").exists():
        return
    hosts = scenario.target.hostnames
    edge_ca = issue_ca("testbed run edge CA", now)
    # One certificate for every application's hostname, as an edge serving several has.
    edge = issue_leaf(
        hosts[0],
        edge_ca,
        not_before=now - dt.timedelta(days=1),
        not_after=now + dt.timedelta(days=400),
        client=False,
        dns_names=hosts,
    )
    write_pem(run_dir / "edge" / "ca.pem", edge_ca.cert_pem())
    write_pem(run_dir / "edge" / "cert.pem", edge.cert_pem(), edge_ca.cert_pem())
    write_pem(run_dir / "edge" / "key.pem", edge.key_pem(), private=True)


def crl_lifetime(scenario: Scenario) -> dt.timedelta:
    """How long a run's CRLs stay current: the whole run, its clock advances, and a week."""
    advanced = sum(
        (parse_duration(e.value or "0s") for e in scenario.events if e.action == "advance_clock"),
        dt.timedelta(0),
    )
    # A CRL past its nextUpdate refuses every device (revocation_unknown): a run must never
    # outlive its CRLs, whatever its length in virtual time.
    return dt.timedelta(seconds=scenario.duration) + advanced + dt.timedelta(days=7)


def _prefix(shard: int | None) -> str:
    # Each shard of a virtual run has its own enforcer, hence its own state, log and CRLs.
    return "" if shard is None else f"shards/{shard}-"


def start_crls(
    scenario: Scenario, run_dir: Path, fleet: RunFleet, now: dt.datetime, shard: int | None = None
) -> RunCrls:
    """Publish a run's first CRLs (its revoked cohorts) in ``RUN_DIR/crl``."""
    return RunCrls.start(fleet, run_dir / f"{_prefix(shard)}crl", now, crl_lifetime(scenario))


def write_enforcer_config(
    scenario: Scenario,
    run_dir: Path,
    fleet: RunFleet,
    origin: str,
    now: dt.datetime,
    *,
    shard: int | None = None,
    crls: RunCrls | None = None,
) -> Path:
    """Write the embedded enforcer's configuration (and its edge PKI) for a run or a shard."""
    write_edge(scenario, run_dir, now)
    crls = crls or start_crls(scenario, run_dir, fleet, now, shard)
    hosts = scenario.target.hostnames
    roots = []
    for pki, pki_fleet in fleet.fleets:
        # A trusted PKI reaches every application; an untrusted PKI's root is known, but bound
        # to another hostname (access-flow A5).
        bound = _quoted(hosts if pki.trusted else [f"{pki.name}.elsewhere.invalid"])
        # The devices' issuer's CRL revokes the revoked cohort, as the fleet's operator would.
        crl = crls.issuing(pki.name)
        roots.append(
            f'[[roots]]\nid = "{pki.name}"\nname = "{pki.name} root"\n'
            f'certificate = "{pki_fleet.upload}"\nassociated_hostnames = [{bound}]\n'
            + (f'crl = "{crl}"\n' if crl is not None else "")
        )
        known = pki_fleet.root / "ca" / "known-intermediates.pem"
        if pki.trusted and known.exists():
            # The enforcer knows this intermediate (uploaded for a hostname no device uses), so
            # it can tell devices that did not send it: missing_intermediate.
            bundle = run_dir / "edge" / f"known-{pki.name}.pem"
            root = (pki_fleet.root / "ca" / "root.pem").read_bytes()
            bundle.write_bytes(known.read_bytes() + root)
            roots.append(
                f'[[roots]]\nid = "known-{pki.name}"\n'
                f'name = "known intermediates of {pki.name}"\ncertificate = "{bundle}"\n'
                'associated_hostnames = ["known-intermediates.invalid"]\n'
            )
    # A fleet provisioned before CA keys were kept has no CRL: its devices are revoked by
    # fingerprint instead, with the same outcome.
    revoked = [
        m.sha256
        for m in fleet.members()
        if m.device.defect == "revoked" and crls.issuing(m.pki) is None
    ]
    prefix = _prefix(shard)
    path = run_dir / f"{prefix}enforcer.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    applications = [
        _APPLICATION_TOML.format(
            # The target's own application (no [[target.applications]]) is the scenario's.
            name=app.name or scenario.name,
            host=app.hostname,
            session=app.session_duration,
            origin=origin,
            policies=_policies_toml(
                app.policy,
                any(
                    c.kind == "service_tokens" and scenario.target.application(c.application) == app
                    for c in scenario.cohorts
                ),
            ),
        )
        for app in scenario.target.applications
    ]
    path.write_text(
        _ENFORCER_TOML.format(
            name=scenario.name,
            run=run_dir,
            prefix=prefix,
            hosts=_quoted(hosts),
            roots="\n".join(roots),
            revoked="[" + ", ".join(f'"{fp}"' for fp in revoked) + "]",
            idle=scenario.target.idle_timeout,
            applications="\n".join(applications),
            identity_providers=identity_providers_toml(scenario),
        )
    )
    return path


@contextlib.contextmanager
def event_instant() -> Iterator[None]:
    """On a virtual clock, hold virtual time still while an event is carried out.

    An event writes to the enforcer (its SQLite commit runs in a thread): on a MockClock that
    jumps as soon as every task waits, virtual time would run on while the thread works, and
    the event would take effect minutes or hours after its ``at``, by as much as the devices
    get done in those wall milliseconds (in tests/testbed/test_virtual_week.py's copy the
    revocation "at 48h" took effect up to 0.7 h late, and 2.8 to 5 h late once attempts kept
    their connections and cost less). Virtual runs reject anything an event would sleep on
    (they are embedded only, without gRPC or people), so nothing waits on virtual time here.
    """
    clock = trio.lowlevel.current_clock()
    if not isinstance(clock, trio.testing.MockClock):
        yield
        return
    threshold = clock.autojump_threshold
    clock.autojump_threshold = math.inf
    try:
        yield
    finally:
        clock.autojump_threshold = threshold


def _quoted(hostnames: Sequence[str]) -> str:
    return ", ".join(f'"{h}"' for h in hostnames)


def _key_store(device_dir: Path, cohort: CohortSpec) -> KeyStore:
    cert, key = device_dir / "cert.pem", device_dir / "key.pem"
    if cohort.key_store == "software":
        return SoftwareKeyStore(cert, key)
    if cohort.key_store == "pkcs11":
        return _pkcs11_key_store(device_dir, cohort)
    from devices.piv import PivKeyStore, PivToken

    piv = cohort.piv

    async def touch() -> None:
        await trio.sleep(piv.touch_delay)

    token = PivToken(browser_pin_every_handshake=piv.browser_pin_every_handshake, touch=touch)
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    token.import_key(
        piv.slot,
        private,
        cert.read_bytes(),
        pin_policy=piv.pin_policy,
        touch_policy=piv.touch_policy,
    )
    return PivKeyStore(token, piv.slot, piv.pin)


def _pkcs11_key_store(device_dir: Path, cohort: CohortSpec) -> KeyStore:
    """A device of a pkcs11 cohort: its fleet key put on the token (unless already there)."""
    from cryptography import x509

    from devices.pkcs11 import Pkcs11KeyStore, import_key

    assert cohort.pkcs11 is not None
    config = cohort.pkcs11.config(device_dir.name)
    cert = device_dir / "cert.pem"
    import_key(
        config,
        (device_dir / "key.pem").read_bytes(),
        x509.load_pem_x509_certificate(cert.read_bytes()),
    )
    return Pkcs11KeyStore(config, cert)


def make_client(
    target: DeviceTarget,
    store: KeyStore | None,
    options: ClientOptions,
    cohort: CohortSpec,
    device_id: str,
    limiter: trio.CapacityLimiter | None = None,
) -> DeviceClient:
    """The device client for a cohort's protocol: HTTP/1.1, HTTP/2 or gRPC (``limiter``
    bounds the worker threads of gRPC calls)."""
    if cohort.protocol == "h2":
        return H2DeviceClient(target, store, options)
    if cohort.protocol == "grpc":
        return GrpcDeviceClient(
            target,
            store,
            options,
            device_id=device_id,
            rpc=cohort.rpc,
            watch_messages=cohort.watch_messages,
            limiter=limiter,
        )
    return DeviceClient(target, store, options)


# gRPC calls run in worker threads (grpcio blocks): this many at once per process.
GRPC_THREADS = 64


def arrival_times(phase: Phase, start: float) -> list[float]:
    """Scheduled times of a constant or ramping phase's attempts (open loop)."""
    if phase.arrival == "constant":
        n = int(phase.rate * phase.duration)
        return [start + k / phase.rate for k in range(n)]
    a, b, d = phase.start_rate, phase.end_rate, phase.duration
    # The rate ramps linearly: attempts so far N(t) = a t + (b - a) t^2 / (2 d); solve N(t) = k.
    total = int((a + b) / 2 * d)
    times = []
    for k in range(total):
        if abs(b - a) < 1e-12:
            t = k / a
        else:
            c2 = (b - a) / (2 * d)
            t = (-a + math.sqrt(a * a + 4 * c2 * k)) / (2 * c2)
        times.append(start + t)
    return times


class Run:
    """One scenario run: its devices, its target and its records."""

    def __init__(
        self,
        scenario: Scenario,
        run_dir: Path,
        console: Console,
        *,
        shard: int = 0,
        shards: int = 1,
        target: DeviceTarget | None = None,
        ready: Any = None,
        writer: ResultsWriter | None = None,
    ) -> None:
        self.scenario = scenario
        self.run_dir = run_dir
        self.console = console
        self.shard, self.shards = shard, shards
        self.target = target  # a target the parent process started (shards of `testbed load`)
        # A multiprocessing barrier: shards on the real clock start together once all are
        # ready, so their schedules add up to the scenario's.
        self.ready = ready
        # Separate random streams, so that what one shard draws does not change another's:
        # revocations and active devices are the same whatever the number of shards.
        self.rng = random.Random(f"{scenario.seed}:pick:{shard}")
        self.events_rng = random.Random(f"{scenario.seed}:events")
        self.writer = writer or ResultsWriter(
            run_dir / "results.sqlite" if shards == 1 else shard_results(run_dir, shard),
            batched=scenario.clock == "virtual",
        )
        self.devices: list[Device] = []  # this shard's devices
        self.members: list[Member] = []  # every device of the fleet, in every shard
        self.counts: Counter[str] = Counter()
        self.dropped = 0
        self.start = 0.0
        self.enforcer: Enforcer | None = None
        self.clock: OffsetClock | None = None
        self.crls: RunCrls | None = None  # what this run revokes, for the target it started
        self._nginx: tuple[trio.Process, Path] | None = None  # nginx and its folder
        self.origin_up = True
        self._origin_scope: trio.CancelScope | None = None
        self._origin_listeners: list[trio.SocketListener] = []
        self.interrupted = False
        self._origin_port = 0
        self.telemetry: Any = None  # the telemetry gRPC service, when this run started one
        self._cpu0 = 0.0
        self._links: Counter[str] = Counter()  # simulated connections opened, by device
        # When each service token expires on the enforcer's clock (advance_clock follows it).
        self._token_expiry: dict[str, dt.datetime] = {}
        self.extra_ids: list[str] = []  # clients without certificates, in every shard
        self._log_file: BufferedLogFile | None = None  # a virtual run's access log

    # -- recording -----------------------------------------------------------------------------

    def record(
        self, device: Device, phase: str, attempt: Attempt, scheduled: float, started: float
    ) -> None:
        t = attempt.timings
        end = trio.current_time()
        # Judged against what was expected while it ran, not when an event changed it later.
        expected = device.expected_for(attempt.outcome, max(started, end - t.total))
        self.writer.attempt(
            AttemptRow(
                device=device.id,
                cohort=device.cohort.name,
                phase=phase,
                expected=expected,
                scheduled=scheduled - self.start,
                started=started - self.start,
                connect_ms=t.connect * 1000,
                key_store_ms=t.key_store * 1000,
                handshake_ms=t.handshake * 1000,
                first_byte_ms=t.first_byte * 1000,
                service_ms=(end - started) * 1000,
                total_ms=(end - scheduled) * 1000,
                outcome=attempt.outcome,
                status=attempt.status,
                reason=attempt.reason,
                new_connection=attempt.new_connection,
                resumed=attempt.resumed,
                error=attempt.error,
                cookie_sent=attempt.cookie_sent,
                protocol=attempt.protocol,
                grpc_status=attempt.grpc_status,
                kind=device.cohort.kind,
                login_ms=attempt.login * 1000 if isinstance(attempt, PersonAttempt) else 0.0,
                callback_ms=attempt.callback * 1000 if isinstance(attempt, PersonAttempt) else 0.0,
                logged_in=isinstance(attempt, PersonAttempt) and attempt.logged_in,
            )
        )
        self.counts[attempt.outcome] += 1
        device.tried()

    # -- the target ----------------------------------------------------------------------------

    async def _memory_connect_enforcer(
        self, nursery: trio.Nursery, device: str = ""
    ) -> trio.abc.Stream:
        network = self.scenario.network
        if not network.rtt:
            client, server = trio.testing.memory_stream_pair()
        else:
            # Each device's connections draw their own delays, keyed by the device and its
            # connection count: trio's scheduling order (or the number of shards) changes none.
            self._links[device] += 1
            n = self._links[device]
            rng = random.Random(f"{self.scenario.seed}:network:{device}:{n}")
            # TCP's SYN and SYN-ACK: one round trip before the device can send.
            await trio.sleep(network.one_way(rng) + network.one_way(rng))
            client, server = link_pair(network, rng)  # type: ignore[assignment]
        assert self.enforcer is not None
        nursery.start_soon(self.enforcer.handle, server)  # type: ignore[arg-type]
        return client

    def _device_target(
        self, target: DeviceTarget, device: str, nursery: trio.Nursery
    ) -> DeviceTarget:
        if target.connect is None or not self.scenario.network.rtt:
            return target
        # A simulated link per device: its delays are drawn from the device's own stream.
        connect = functools.partial(self._memory_connect_enforcer, nursery, device)
        return dataclasses.replace(target, connect=connect)

    async def _memory_connect_origin(self, nursery: trio.Nursery) -> trio.abc.Stream:
        if not self.origin_up:
            raise OSError("connection refused (the origin is stopped)")
        client, server = trio.testing.memory_stream_pair()
        nursery.start_soon(_echo, server)  # type: ignore[arg-type]
        return client

    async def _virtual_origin(
        self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        if not self.origin_up:
            raise OSError("connection refused (the origin is stopped)")
        return await echo_app(method, target, headers, body)

    async def start_target(
        self, nursery: trio.Nursery, fleet: RunFleet, now: dt.datetime
    ) -> DeviceTarget:
        s = self.scenario
        if s.target.kind == "external":
            from urllib.parse import urlsplit

            url = urlsplit(s.target.url or "")
            return DeviceTarget(
                url.hostname or "",
                url.port or 443,
                s.target.hostname or url.hostname or "",
                s.target.ca,
            )
        if s.target.kind == "nginx":
            from testbed.nginx import start_nginx, stop_nginx

            self.crls = start_crls(s, self.run_dir, fleet, now)
            write_enforcer_config(s, self.run_dir, fleet, "http://127.0.0.1:9", now, crls=self.crls)
            # A gRPC fleet's nginx passes verified devices to the telemetry service.
            upstream = await self._start_origin(nursery) if grpc_run(s) else None
            try:
                proc, port = await start_nginx(
                    self.run_dir / "nginx",
                    cert=self.run_dir / "edge" / "cert.pem",
                    key=self.run_dir / "edge" / "key.pem",
                    client_ca=fleet.client_ca(self.run_dir / "edge" / "client-ca.pem"),
                    # Every application's hostname, each verified against the fleet's CAs.
                    server_name=s.target.hostnames,
                    # The same CRLs as the embedded enforcer's, one for each CA of the path.
                    crl=self.crls.chain,
                    reloadable=any(e.action == "revoke" for e in s.events),
                    http2=any(c.protocol != "http1" for c in s.cohorts),
                    grpc_upstream=upstream.removeprefix("grpc://") if upstream else None,
                )
            except (RuntimeError, trio.TooSlowError) as exc:
                raise RunError(
                    f"{s.path}: target.kind: nginx did not start: {exc or 'not listening'}"
                    f" (its files are in {self.run_dir / 'nginx'})"
                ) from None

            async def stopper() -> None:
                try:
                    await trio.sleep_forever()
                finally:
                    with trio.CancelScope(shield=True):
                        await stop_nginx(proc)

            nursery.start_soon(stopper)
            self._nginx = (proc, self.run_dir / "nginx")
            return DeviceTarget(
                "127.0.0.1", port, s.target.hostname, self.run_dir / "edge" / "ca.pem"
            )
        # The embedded enforcer.
        virtual = s.clock == "virtual"
        origin = "http://origin.invalid" if virtual else await self._start_origin(nursery)
        shard = self.shard if self.shards > 1 else None
        self.crls = start_crls(s, self.run_dir, fleet, now, shard)
        config = load_config(
            write_enforcer_config(s, self.run_dir, fleet, origin, now, shard=shard, crls=self.crls)
        )
        self.clock = OffsetClock(TrioClock(now) if virtual else WallClock())
        if virtual:
            self._log_file = BufferedLogFile(config.server.access_log)
            access_log = AccessLog(cast(TextIO, self._log_file))
        else:
            access_log = AccessLog(config.server.access_log)
        self.enforcer = Enforcer(config, self.clock, access_log)
        ca = self.run_dir / "edge" / "ca.pem"
        if virtual:
            # The origin answers in-process: a week of telemetry need not pay for HTTP twice.
            self.enforcer.origins.app = self._virtual_origin
            self.enforcer.origins.connect = lambda host, port: self._memory_connect_origin(nursery)
            return DeviceTarget(
                "memory",
                0,
                s.target.hostname,
                ca,
                connect=lambda: self._memory_connect_enforcer(nursery),
            )
        listener = await open_listener("127.0.0.1", 0)
        nursery.start_soon(serve, self.enforcer, listener)
        return DeviceTarget("127.0.0.1", listener.socket.getsockname()[1], s.target.hostname, ca)

    async def _start_origin(self, nursery: trio.Nursery) -> str:
        """Start the run's origin: the telemetry gRPC service for a gRPC fleet, else the echo
        origin; return its URL."""
        if grpc_run(self.scenario):
            self._origin_port = await nursery.start(self._serve_telemetry, 0)
            return f"grpc://127.0.0.1:{self._origin_port}"
        self._origin_listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = self._origin_port = self._origin_listeners[0].socket.getsockname()[1]
        await self._run_origin(nursery)
        return f"http://127.0.0.1:{port}"

    async def _serve_telemetry(
        self, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve the telemetry service until stop_origin (or the run's end) cancels it."""
        from testbed.telemetry import serve_telemetry

        scope = trio.CancelScope()
        self._origin_scope = scope
        with scope:
            async with serve_telemetry("127.0.0.1", port) as service:
                self.telemetry = service
                task_status.started(service.port)
                await trio.sleep_forever()

    async def _run_origin(self, nursery: trio.Nursery) -> None:
        scope = trio.CancelScope()
        self._origin_scope = scope
        listeners = self._origin_listeners

        async def origin() -> None:
            with scope:
                await serve_echo_origin_on(listeners)

        nursery.start_soon(origin)

    # -- events --------------------------------------------------------------------------------

    async def apply(self, event: Event, nursery: trio.Nursery) -> str:
        """Carry out one timed event; return what was done."""
        action = event.action
        if action == "stop_origin":
            self.origin_up = False
            if self._origin_scope is not None:
                self._origin_scope.cancel()
                # Close the port too, so connections are refused rather than left waiting.
                for listener in self._origin_listeners:
                    await listener.aclose()
            return "origin stopped"
        if action == "start_origin":
            self.origin_up = True
            if self._origin_port and grpc_run(self.scenario):
                await nursery.start(self._serve_telemetry, self._origin_port)
            elif self._origin_port:
                self._origin_listeners = await trio.open_tcp_listeners(
                    self._origin_port, host="127.0.0.1"
                )
                await self._run_origin(nursery)
            return "origin started"
        if action == "revoke":
            return await self._revoke(event)
        if action in TOKEN_EVENTS:
            return await self._token_event(event)
        assert self.enforcer is not None and self.clock is not None
        controller = self.enforcer.controller
        account = "demo"
        if action == "advance_clock":
            delta = parse_duration(event.value or "0s")
            self.clock.offset += delta
            self._tokens_expired()
            return f"enforcer clock advanced {event.value}"
        if action == "revoke_service_token":
            return await self._revoke_service_tokens(event)
        roots = control.list_roots(controller.objects, account).result
        pki = event.pki or next(p.name for p in self.scenario.pkis if p.trusted)
        fleet_root = next(r for r in roots if r["name"] == f"{pki} root")
        if action == "remove_root":
            await controller.write(
                lambda objects, now: control.update_root(
                    objects, account, fleet_root["id"], {"associated_hostnames": []}, now
                )
            )
            self._untrust(pki)
            return f"{pki} root removed from the hostname"
        if action == "rotate_root":
            new = issue_ca(f"rotated {pki} root", self.clock.now())
            pem = new.cert_pem().decode()
            hosts = self.scenario.target.hostnames

            def rotate(objects: Any, now: dt.datetime) -> control.Outcome:
                added = control.create_root(
                    objects,
                    account,
                    {
                        "name": f"rotated {pki} root",
                        "certificate": pem,
                        "associated_hostnames": hosts,
                    },
                    now,
                )
                removed = control.update_root(
                    objects, account, fleet_root["id"], {"associated_hostnames": []}, now
                )
                return control.Outcome(None, added.changes + removed.changes)

            await controller.write(rotate)
            self._untrust(pki)
            return f"{pki} root replaced by a new root: its devices are no longer trusted"
        spec = self.scenario.target.application(event.application)
        app = next(
            a
            for a in control.list_apps(controller.objects, account).result
            if a["hostname"] == spec.hostname
        )
        # The application's name in what the run records (the target's own has none).
        named = f" on {spec.name}" if spec.name else ""
        if action == "set_session_duration":
            await controller.write(
                lambda objects, now: control.update_app(
                    objects,
                    account,
                    app["id"],
                    {"session_duration": event.value},
                    controller.limits,
                    now,
                )
            )
            return f"session duration set to {event.value}{named}"
        if action == "set_policy":
            value = event.value or "certificate"
            include, require = policy_rules(value)
            policy: dict[str, Any] = {
                "name": "fleet",
                "decision": policy_decision(value),
                "include": include,
            }
            if require:
                policy["require"] = require
            tokens = any(
                c.kind == "service_tokens"
                and self.scenario.target.application(c.application) == spec
                for c in self.scenario.cohorts
            )
            service = {
                "name": "service-tokens",
                "decision": "non_identity",
                "include": [{"any_valid_service_token": {}}],
            }
            await controller.write(
                lambda objects, now: control.update_app(
                    objects,
                    account,
                    app["id"],
                    {"policies": [service, policy] if tokens else [policy]},
                    controller.limits,
                    now,
                )
            )
            terms = policy_terms(value)
            wanted = terms[0][1] if terms[0][0] == "common_name" and len(terms) == 1 else None
            for d in self.devices:
                if self.scenario.target.application(d.cohort.application) != spec:
                    continue  # another application's policy is unchanged
                if d.cohort.kind != "devices":
                    continue  # people are refused beside set_policy; tokens have their policy
                if (
                    wanted is not None
                    and d.cohort.expected == "allowed"
                    and d.common_name != wanted
                ):
                    d.expect("denied:policy_denied")
                elif wanted is None and d.cohort.expected == "denied:policy_denied":
                    d.expect("allowed")
            return f"policy set to {value}{named}"
        raise AssertionError(action)

    async def _token_event(self, event: Event) -> str:
        """A pkcs11 cohort's token removed, reinserted, or its PIN changed.

        The devices reconnect for their next attempt (a device whose token goes away or whose
        PIN changes starts over), so that it is a new handshake on the token.
        """
        from devices.pkcs11 import Pkcs11KeyStore

        spec = next(c for c in self.scenario.cohorts if c.name == event.cohort)
        mine = [d for d in self.devices if d.cohort.name == event.cohort]
        stores = [
            d.client.key_store
            for d in mine
            if isinstance(d.client, DeviceClient) and isinstance(d.client.key_store, Pkcs11KeyStore)
        ]
        if event.action == "pin_changed":
            new_pin = os.environ.get(event.value or "")
            if not new_pin:
                raise RunError(f"pin_changed: the environment variable {event.value} is not set")
            if stores:
                # In this thread, with no checkpoint until every device's expectation follows:
                # no attempt may see the new PIN under the old expectation.
                stores[0].key.session.change_pin(new_pin)
        for d in mine:
            store = getattr(d.client, "key_store", None)
            if isinstance(store, Pkcs11KeyStore):
                if event.action == "token_removed":
                    store.remove()
                elif event.action == "token_reinserted":
                    store.reinsert()
            if event.action == "token_removed":
                d.expect("key_store_error:CKR_DEVICE_REMOVED")
            elif event.action == "token_reinserted":
                d.expect(spec.expected)
            elif spec.pkcs11 is not None and spec.pkcs11.pin_env != event.value:
                d.expect(PIN_INCORRECT)  # its PIN source still holds the old PIN
        for d in mine:
            if isinstance(d.client, DeviceClient):
                # Not closed under an attempt in flight: its next request reconnects.
                d.client.reconnect()
        return f"{event.action.replace('_', ' ')}: cohort {event.cohort} ({len(mine)} devices)"

    async def _revoke(self, event: Event) -> str:
        """Revoke a share of a cohort: new CRLs, put in force on the target this run started."""
        # CRLs rather than revocations by serial through the admin API: they are what the
        # fleet's operator publishes, and nginx can take nothing else, so both targets judge
        # the very same file (and the enforcer's CRL checks: issuer, signature, dates, replay).
        members = [d for d in self.members if d.cohort == event.cohort]
        chosen = self.events_rng.sample(members, max(1, round(len(members) * event.share)))
        assert self.crls is not None
        changed = self.crls.revoke(chosen)
        # The embedded enforcer checks a CRL's dates on its own clock, which events can move.
        self.crls.publish(self.clock.now() if self.clock else dt.datetime.now(dt.UTC))
        if self._nginx is not None:
            from testbed.nginx import reload_nginx

            await reload_nginx(*self._nginx)
            refused = refused_by_nginx(self.scenario)
        else:
            assert self.enforcer is not None
            controller = self.enforcer.controller
            roots = control.list_roots(controller.objects, "demo").result
            for pki in sorted(changed):
                root_id = next(r["id"] for r in roots if r["name"] == f"{pki} root")
                body = {"crl": self.crls.pem(pki)}
                await controller.write(
                    lambda objects, now, root_id=root_id, body=body: control.put_crl(
                        objects, "demo", root_id, body, now
                    )
                )
            refused = "denied:revoked"
        revoked = {d.id for d in chosen}
        for mine in self.devices:
            # A revoked device is refused from now on.
            if mine.id in revoked and mine.cohort.expected == "allowed":
                mine.expect(refused)
        return (
            f"revoked {len(chosen)} of {len(members)} devices of cohort {event.cohort}"
            f" (CRL number {self.crls.number})"
        )

    async def admin(self, method: str, path: str, body: Any = None) -> Any:
        """Call the embedded enforcer's admin API (its real routes and checks, in process);
        return the envelope's result, or raise RunError with the API's errors."""
        import json
        import secrets

        import h11

        from enforcer.admin import AdminServer
        from enforcer.config import AdminSettings

        assert self.enforcer is not None
        token = secrets.token_hex(16)
        server = AdminServer(self.enforcer.controller, AdminSettings("127.0.0.1", 0, token))
        data = b"" if body is None else json.dumps(body).encode()
        request = h11.Request(
            method=method,
            target=f"/client/v4/accounts/demo/access/{path}",
            headers=[
                ("host", "admin"),
                ("authorization", f"Bearer {token}"),
                ("content-type", "application/json"),
                ("content-length", str(len(data))),
            ],
        )
        status, _, answer = await server.dispatch(request, data)
        envelope = json.loads(answer or b"{}")
        if status >= 300 or not envelope.get("success", False):
            raise RunError(
                f"{self.scenario.path}: the enforcer's admin API refused {method} {path}:"
                f" {status} {envelope.get('errors')}"
            )
        return envelope.get("result")

    async def _create_service_tokens(self) -> None:
        """Create each service-token cohort's tokens through the admin API (at run start)."""
        for d in self.devices:
            if d.cohort.kind != "service_tokens":
                continue
            assert isinstance(d.client, ServiceTokenClient)
            created = await self.admin(
                "POST", "service_tokens", {"name": d.id, "duration": d.cohort.token_duration}
            )
            d.token_id = created["id"]
            client_id, secret = created["client_id"], created["client_secret"]
            if d.cohort.token_defect == "wrong_secret":
                secret = ("0" if secret[0] != "0" else "1") + secret[1:]
            elif d.cohort.token_defect == "unknown_client_id":
                client_id = ("0" if client_id[0] != "0" else "1") + client_id[1:]
            d.client.client_id, d.client.client_secret = client_id, secret
            if self.clock is not None:
                self._token_expiry[d.id] = self.clock.now() + parse_duration(
                    d.cohort.token_duration
                )

    def _tokens_expired(self) -> None:
        """Service tokens past their expiry on the enforcer's clock are expected refused."""
        assert self.clock is not None
        now = self.clock.now()
        for d in self.devices:
            expires = self._token_expiry.get(d.id)
            if expires is not None and now >= expires:
                del self._token_expiry[d.id]
                if d.cohort.expected == "allowed":
                    d.expect("denied:service_token_expired")

    async def _expire_tokens(self) -> None:
        """Follow the service tokens' expiry as the run's clock passes it (advance_clock
        events check it themselves)."""
        while self._token_expiry and self.clock is not None:
            first = min(self._token_expiry.values())
            await trio.sleep(max((first - self.clock.now()).total_seconds(), 0.0))
            self._tokens_expired()

    async def _revoke_service_tokens(self, event: Event) -> str:
        """Delete a share of a service-token cohort's tokens through the admin API."""
        mine = [d for d in self.devices if d.cohort.name == event.cohort]
        chosen = (
            self.events_rng.sample(mine, max(1, round(len(mine) * event.share))) if mine else []
        )
        for d in chosen:
            await self.admin("DELETE", f"service_tokens/{d.token_id}")
            self._token_expiry.pop(d.id, None)
            if d.cohort.expected == "allowed":
                d.expect("denied:service_token_invalid")
        return f"revoked {len(chosen)} of {len(mine)} service tokens of cohort {event.cohort}"

    def _untrust(self, pki: str) -> None:
        # The PKI's root is no longer associated with the hostname: its chains are untrusted.
        for d in self.devices:
            if d.cohort.pki == pki and d.cohort.expected.startswith(("allowed", "denied:")):
                d.expect("denied:untrusted_issuer")

    # -- phases --------------------------------------------------------------------------------

    async def attempt(self, device: Device, phase: str, scheduled: float) -> None:
        """Run one open-loop attempt on a device already claimed for it; free it after."""
        assert device.busy, "claim the device before starting its attempt"
        try:
            started = trio.current_time()
            b = device.cohort.behaviour
            result = await device.client.request(b.path, method=b.method, body=b"x" * b.body_bytes)
            self.record(device, phase, result, scheduled, started)
        finally:
            device.busy = False

    async def open_loop(self, phase: Phase, start: float) -> None:
        async with trio.open_nursery() as nursery:
            for k, scheduled in enumerate(arrival_times(phase, start)):
                if k % self.shards != self.shard:
                    continue  # another shard's arrival
                await trio.sleep_until(scheduled)
                device = self._free_device()
                if device is None:
                    self.dropped += 1
                    self.writer.dropped(scheduled - self.start, "-", phase.name)
                    continue
                # Claimed here, not in the task: the task starts only at a later checkpoint,
                # and the next arrival must not be handed the same device meanwhile.
                device.busy = True
                nursery.start_soon(self.attempt, device, phase.name, scheduled)

    def _free_device(self) -> Device | None:
        n = len(self.devices)
        if n == 0:
            return None
        first = self.rng.randrange(n)
        for k in range(n):
            device = self.devices[(first + k) % n]
            if not device.busy:
                return device
        return None

    async def active(self, phase: Phase, start: float) -> None:
        # Drawn from the whole fleet, so the same devices run whatever the number of shards.
        rng = random.Random(f"{self.scenario.seed}:active:{phase.name}")
        ids = [m.id for m in self.members] + self.extra_ids
        chosen = rng.sample(ids, min(phase.devices, len(ids)))
        seeds = {d: rng.randrange(2**32) for d in chosen}
        mine = [d for d in self.devices if d.id in seeds]
        until = start + phase.duration
        async with trio.open_nursery() as nursery:
            for device in mine:
                seed = seeds[device.id]

                async def drive(d: Device = device, s: int = seed) -> None:
                    def on_attempt(a: Attempt, scheduled: float) -> None:
                        self.record(d, phase.name, a, scheduled, scheduled)

                    await run_behaviour(
                        d.client,
                        d.cohort.behaviour,
                        rng=random.Random(s),
                        on_attempt=on_attempt,
                        until=until,
                    )

                nursery.start_soon(drive)

    # -- the whole run ---------------------------------------------------------------------------

    async def main(self, fleet: RunFleet, now: dt.datetime, progress: bool) -> None:
        """Start the target and the devices, run the phases and events, then stop everything."""
        try:
            await self._main(fleet, now, progress)
        finally:
            if self._log_file is not None:
                self._log_file.close()
            if self._cpu0:  # the schedule started (self.start is 0.0 on a MockClock)
                # What this process spent from the start: a load generator near a whole core
                # is measuring itself, not its target.
                self.writer.set_meta(cpu_seconds=time.process_time() - self._cpu0)

    async def _main(self, fleet: RunFleet, now: dt.datetime, progress: bool) -> None:
        s = self.scenario
        async with trio.open_nursery() as nursery:
            target = self.target or await self.start_target(nursery, fleet, now)
            by_name = {c.name: c for c in s.cohorts}
            # Each cohort's devices send their application's hostname (SNI, Host, :authority).
            targets = {
                c.name: dataclasses.replace(
                    target,
                    server_name=s.target.application(c.application).hostname or target.server_name,
                )
                for c in s.cohorts
            }
            limiter = trio.CapacityLimiter(GRPC_THREADS)
            self.members = fleet.members()
            # Each member's place in its cohort: a person's place picks their user.
            seen: Counter[str] = Counter()
            positions = {}
            for m in self.members:
                positions[m.id] = seen[m.cohort]
                seen[m.cohort] += 1
            for i, d in enumerate(self.members):
                if i % self.shards != self.shard:
                    continue  # another shard's device
                cohort = by_name[d.cohort]
                options = ClientOptions(
                    keep_alive=cohort.keep_alive,
                    resume_sessions=cohort.resume_sessions,
                    reuse_cookie=cohort.reuse_cookie,
                    always_new_handshake=cohort.always_new_handshake,
                    timeout=s.timeout,
                    clock_skew=cohort.clock_skew,
                )
                store = _key_store(d.fleet / "devices" / d.id, cohort)
                client = make_client(
                    self._device_target(targets[cohort.name], d.id, nursery),
                    store,
                    options,
                    cohort,
                    d.id,
                    limiter,
                )
                if isinstance(client, GrpcDeviceClient):
                    client.load_credentials()
                elif isinstance(store, SoftwareKeyStore):
                    # Load the key and chain now, as a device does when it boots, so that no
                    # attempt's latency includes reading the fleet's files.
                    await client.preload()
                device = Device(d.id, cohort, d.sha256, d.device.common_name, client)
                if cohort.kind == "people":
                    device.email, password = cohort.user(positions[d.id])
                    device.client = self._person(
                        targets[cohort.name],
                        d.id,
                        nursery,
                        cohort,
                        device.email,
                        password,
                        store,
                        options,
                    )
                self.devices.append(device)
            self._add_clients(targets, nursery)
            if any(d.cohort.kind == "service_tokens" for d in self.devices):
                await self._create_service_tokens()
                nursery.start_soon(self._expire_tokens)
            if self.ready is not None:
                await trio.to_thread.run_sync(
                    self.ready.wait, START_TIMEOUT, abandon_on_cancel=True
                )
            self.start = trio.current_time()
            self._cpu0 = time.process_time()
            self.writer.set_meta(start_epoch=time.time())
            if self.shards == 1:
                self.writer.set_meta(started_at=dt.datetime.now(dt.UTC).isoformat())

            async def events() -> None:
                for event in sorted(s.events, key=lambda e: e.at):
                    await trio.sleep_until(self.start + event.at)
                    with event_instant():
                        detail = await self.apply(event, nursery)
                    self.writer.event(event.at, event.action, detail)

            nursery.start_soon(events)
            nursery.start_soon(self._stop_on_signal, nursery.cancel_scope)
            if progress:
                nursery.start_soon(self.display)
            t = self.start
            for phase in s.phases:
                self.writer.event(t - self.start, "phase", phase.name)
                if phase.arrival == "active":
                    await self.active(phase, t)
                else:
                    await self.open_loop(phase, t)
                t += phase.duration
                await trio.sleep_until(t)
            for d in self.devices:
                await d.client.aclose()
            nursery.cancel_scope.cancel()

    def _person(
        self,
        target: DeviceTarget,
        device_id: str,
        nursery: trio.Nursery,
        cohort: CohortSpec,
        email: str,
        password: str,
        store: KeyStore | None,
        options: ClientOptions,
    ) -> PersonClient:
        idp = self.scenario.identity_provider
        return PersonClient(
            self._device_target(target, device_id, nursery),
            email,
            password,
            store,
            options,
            idp_ca=idp.ca_file if idp else None,
        )

    def _add_clients(self, targets: dict[str, DeviceTarget], nursery: trio.Nursery) -> None:
        """People without certificates and service tokens: clients with no fleet member."""
        s = self.scenario
        k = len(self.members)
        for cohort in s.cohorts:
            if cohort.provisioned:
                continue
            for i in range(cohort.size):
                device_id = f"{cohort.name}-{i + 1:05d}"
                self.extra_ids.append(device_id)
                k += 1
                if (k - 1) % self.shards != self.shard:
                    continue  # another shard's client
                options = ClientOptions(
                    keep_alive=cohort.keep_alive,
                    resume_sessions=cohort.resume_sessions,
                    timeout=s.timeout,
                )
                target = targets[cohort.name]
                if cohort.kind == "people":
                    email, password = cohort.user(i)
                    client: PersonClient | ServiceTokenClient = self._person(
                        target, device_id, nursery, cohort, email, password, None, options
                    )
                else:
                    email = ""
                    client = ServiceTokenClient(
                        self._device_target(target, device_id, nursery), "", "", options
                    )
                self.devices.append(Device(device_id, cohort, "", "", client, email=email))

    async def _stop_on_signal(self, scope: trio.CancelScope) -> None:
        # Ctrl-C ends the run cleanly: what was written stays, and the report still renders.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                self.interrupted = True
                scope.cancel()
                return

    async def display(self) -> None:
        step = max(0.5, self.scenario.duration / 400)  # few wake-ups, even for a virtual week
        if not self.console.is_terminal:
            # A CI log cannot redraw a live table: a plain line every so often instead.
            lines = ProgressLines(self.console)
            while True:
                await trio.sleep(step)
                lines.maybe(self._table)
        with Live(
            self._table(), console=self.console, refresh_per_second=2, transient=True
        ) as live:
            while True:
                await trio.sleep(step)
                live.update(self._table())

    def _table(self) -> Table:
        # The display starts after self.start is set (MockClock starts at 0.0: no truth test).
        elapsed = trio.current_time() - self.start
        virtual = " (virtual)" if self.scenario.clock == "virtual" else ""
        title = (
            f"{self.scenario.name}: {fmt_span(elapsed)} of"
            f" {fmt_span(self.scenario.duration)}{virtual}"
        )
        return progress_table(title, self.counts, self.dropped, elapsed)


class ProgressLines:
    """Progress as plain lines, at most one per ``TESTBED_PROGRESS_EVERY`` wall seconds (10)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.every = float(os.environ.get("TESTBED_PROGRESS_EVERY", "10"))
        self.last = time.monotonic()

    def maybe(self, table: Callable[[], Table]) -> None:
        """Print the progress table's rows on one line when the interval has passed."""
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        t = table()
        cells = [[str(c) for c in col.cells] for col in t.columns]
        rows = ", ".join(f"{a} {b}" for a, b in zip(*cells[:2], strict=True))
        self.console.print(f"{t.title}: {rows}", markup=True, highlight=False, soft_wrap=True)


def progress_table(title: str, counts: Counter[str], dropped: int, elapsed: float) -> Table:
    """The live display: outcomes so far, dropped attempts and the rate."""
    total = sum(counts.values())
    table = Table(title=title, title_justify="left")
    table.add_column("outcome")
    table.add_column("attempts", justify="right")
    for outcome, n in counts.most_common():
        table.add_row(outcome, str(n))
    table.add_row("[dim]dropped[/]", str(dropped))
    table.add_row("[bold]total[/]", f"{total} ({fmt_rate(total / elapsed if elapsed else None)}/s)")
    return table


def run_scenario(
    scenario: Scenario,
    reports: Path,
    *,
    console: Console | None = None,
    progress: bool = True,
    render: Render | None = None,
    workers: int = 1,
    max_errors: float | None = None,
    live: LiveOptions | None = None,
    cluster: Any = None,
) -> RunOutcome:
    """Run a checked scenario; write its results and report; return the exit code to use.

    With ``cluster`` (a :class:`testbed.cluster.Cluster`), its ``workers`` shards run there.

    It is judged on its thresholds and the default gates; ``max_errors`` (a share) replaces
    the 1% error budget, which a scenario otherwise overrides by declaring an ``errors``
    threshold of its own. ``live``: the dashboard, metrics endpoint and progress line
    (outside a terminal the progress line replaces the live table).
    """
    from testbed.nginx import NGINX
    from testbed.verdict import gates

    if scenario.target.kind == "nginx" and NGINX is None:
        # Checked before anything is written: a missing program is not worth a run folder.
        raise RunError(
            f"{scenario.path}: target.kind: nginx is not installed (apt-get install nginx)"
        )
    if cluster is not None and scenario.clock != "virtual":
        raise RunError(
            f"--cluster: `testbed run` runs on a cluster on the virtual clock only ({scenario.path}"
            f" has clock = {scenario.clock!r}); use `testbed load --cluster` on the real clock"
        )
    if workers > 1 and scenario.clock != "virtual":
        # On the real clock, shards of one run would each start their own target: a different
        # system under test. `testbed load` shares one target between processes.
        raise RunError(
            f"--workers {workers}: a run is split between processes on the virtual clock only"
            f" ({scenario.path} has clock = {scenario.clock!r}); use `testbed load` for"
            " multi-process load on the real clock"
        )
    console = console or Console(stderr=True)
    run_dir = run_dir_for(scenario, reports.resolve())
    judged = gates(scenario.thresholds, max_errors=max_errors)
    # Outside a terminal the live outputs' thread prints the progress lines.
    options = live_options(live, progress and not console.is_terminal)
    progress = progress and console.is_terminal
    if workers > 1 or cluster is not None:
        feed = ResultsFeed([shard_results(run_dir, k) for k in range(workers)], shards=True)
    else:
        feed = ResultsFeed([run_dir / "results.sqlite"])
    outputs = None
    if options.any:
        outputs = LiveOutputs(live_for(scenario, judged, options), feed, options)
        try:
            outputs.__enter__()
        except LiveError as exc:
            raise RunError(str(exc)) from None
    try:
        render = finishing(outputs, render)
        outcome = _run_scenario(
            scenario, run_dir, console, progress, render, workers, judged, outputs, cluster
        )
    except BaseException:
        if outputs is not None:
            outputs.finish("failed", None)
        raise
    if outputs is not None:
        status = "interrupted" if outcome.exit_code == EXIT_INTERRUPTED else "finished"
        outputs.finish(status, outcome.thresholds if status == "finished" else None)
    return outcome


def _run_scenario(
    scenario: Scenario,
    run_dir: Path,
    console: Console,
    progress: bool,
    render: Render | None,
    workers: int,
    judged: Sequence[Threshold],
    outputs: LiveOutputs | None,
    cluster: Any,
) -> RunOutcome:
    run_dir.mkdir(parents=True)
    now = dt.datetime.now(dt.UTC)
    began = time.perf_counter()
    fleet = provision_pkis(scenario, run_dir, now)
    # A virtual run's wall time is its CPU: its attempts are committed in batches.
    writer = ResultsWriter(run_dir / "results.sqlite", batched=scenario.clock == "virtual")
    writer.set_meta(**run_meta(scenario), workers=workers)
    if workers > 1 or cluster is not None:
        from testbed.shards import jobs_for, run_shards

        write_edge(scenario, run_dir, now)
        writer.set_meta(started_at=dt.datetime.now(dt.UTC).isoformat())
        jobs = jobs_for(scenario, run_dir, fleet, now, workers)
        ended = trio.run(
            functools.partial(
                run_shards,
                jobs,
                executor=cluster.shards(jobs) if cluster is not None else None,
                console=console,
                progress=progress,
                title=lambda t: (
                    f"{scenario.name}: {t:,.1f} s of {scenario.duration:,.0f} s ({workers} shards)"
                ),
            )
        )
        if outputs is not None:
            for k, code in ended.failed:
                outputs.live.set_shard(str(k), "failed", detail=f"exit code {code}")
        if ended.failed:
            # Not a verdict on the target: the run is incomplete, like an interrupted one.
            writer.set_meta(failed_shards=[k for k, _ in ended.failed])
            if ended.cluster.get("lost_shards"):
                writer.set_meta(lost_shards=ended.cluster["lost_shards"])
            finish_run(scenario, run_dir, writer, began, True, render)
            raise RunError(
                "shard "
                + ", ".join(f"{k} (exit code {code})" for k, code in ended.failed)
                + f" failed, see the messages above; what the shards wrote is in {run_dir}"
            )
        interrupted = ended.interrupted
    else:
        run = Run(scenario, run_dir, console, writer=writer)
        virtual = scenario.clock == "virtual"
        clock = trio.testing.MockClock(autojump_threshold=0) if virtual else None
        try:
            trio.run(run.main, fleet, now, progress, clock=clock)
        except BaseExceptionGroup as group:
            writer.close()
            # A target that cannot start fails inside the run's nursery: RunError, exit 2.
            reraise_first(group, RunError)
        interrupted = run.interrupted
    if outputs is not None:
        outputs.live.finish("reporting", None)  # the schedule is over; the report is rendered
    return finish_run(
        scenario, run_dir, writer, began, interrupted, render, thresholds=judged, console=console
    )


def reraise_first(group: BaseExceptionGroup[Any], kind: type[Exception]) -> NoReturn:
    """Raise the first ``kind`` error found in a nursery's exception group, else the group."""
    matched, _ = group.split(kind)
    if matched is None:
        raise group
    first: BaseException = matched
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    raise first from None


SCENARIO_TEXT_LIMIT = 256 * 1024  # a scenario file is a few KiB; never copy a stray big file


def versions() -> dict[str, str]:
    """The versions a run was made with, for its report."""
    import importlib.metadata
    import platform
    import ssl

    def dist(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {
        "testbed": dist("mtls-testbed"),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "cryptography": dist("cryptography"),
        "trio": dist("trio"),
    }


def scenario_text(path: Path) -> str | None:
    """The scenario file's text, as the run read it (None when the run has no file)."""
    try:
        if path.is_file() and path.stat().st_size <= SCENARIO_TEXT_LIMIT:
            return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        pass
    return None


def run_meta(scenario: Scenario) -> dict[str, Any]:
    """The facts about a scenario that a run records before it starts."""
    t = scenario.target
    return {
        "scenario": scenario.name,
        "scenario_path": str(scenario.path),
        "scenario_text": scenario_text(scenario.path),
        "versions": versions(),
        "seed": scenario.seed,
        "clock": scenario.clock,
        "target": t.kind,
        "target_detail": {
            "kind": t.kind,
            "url": t.url,
            "hostname": t.hostname,
            "ca": None if t.ca is None else str(t.ca),
            "session_duration": t.session_duration,
            "policy": t.policy,
            "enforcer_workers": t.workers,
            # [[target.applications]]: each with its hostname, session duration and policy.
            "applications": [dataclasses.asdict(a) for a in t.declared],
        },
        "timeout": scenario.timeout,
        # Where a virtual run's latencies come from: the simulated link's delays, in seconds.
        "network": dataclasses.asdict(scenario.network) if scenario.clock == "virtual" else None,
        "cohorts": {
            c.name: {
                "size": c.size,
                "expected": c.expected,
                "defect": c.defect,
                "protocol": c.protocol,
                "application": t.application(c.application).name or None,
                "kind": c.kind,
                "with_certificate": c.provisioned,
                "users": sorted({email for email, _ in c.users}) if c.kind == "people" else None,
            }
            for c in scenario.cohorts
        },
        "phases": [
            {
                "name": p.name,
                "start": sum(q.duration for q in scenario.phases[:i]),
                "duration": p.duration,
                "arrival": p.arrival,
                "rate": p.rate,
                "start_rate": p.start_rate,
                "end_rate": p.end_rate,
                "devices": p.devices,
            }
            for i, p in enumerate(scenario.phases)
        ],
        "thresholds_declared": [t.text for t in scenario.thresholds],
        # Where people log in (never the secret: only the variable that holds it).
        "identity_provider": (
            None
            if scenario.identity_provider is None
            else {
                "name": scenario.identity_provider.name,
                "issuer_url": scenario.identity_provider.issuer_url,
                "client_id": scenario.identity_provider.client_id,
            }
        ),
    }


def finish_run(
    scenario: Scenario,
    run_dir: Path,
    writer: ResultsWriter,
    began: float,
    interrupted: bool,
    render: Render | None,
    *,
    thresholds: Sequence[Threshold] | None = None,
    console: Console | None = None,
) -> RunOutcome:
    """Record how a run ended, judge it and render its report.

    ``thresholds`` are what the run is judged on; by default the scenario's own with the gates
    every run has (:func:`testbed.verdict.gates`). Failed ones are printed on ``console``
    (stderr by default), one line each, after the report's tables.
    """
    from testbed.verdict import gates, print_failures

    if not interrupted:
        writer.set_meta(
            finished_at=dt.datetime.now(dt.UTC).isoformat(),
            wall_seconds=time.perf_counter() - began,
        )
    judged = gates(scenario.thresholds) if thresholds is None else thresholds
    verdicts, summary = _judge(judged, run_dir, writer) if not interrupted else ([], None)
    writer.close()
    if render is not None:
        render(run_dir, summary)
    if interrupted:
        return RunOutcome(run_dir, EXIT_INTERRUPTED, [])
    print_failures(verdicts, console or Console(stderr=True))
    return RunOutcome(
        run_dir, EXIT_OK if all(ok for _, _, ok in verdicts) else EXIT_THRESHOLDS, verdicts
    )


def _judge(
    thresholds: Sequence[Threshold], run_dir: Path, writer: ResultsWriter
) -> tuple[list[tuple[str, str, bool]], dict[str, Any]]:
    """Judge the run and record the verdicts; return them and the run's summary with them.

    The summary is read once for the verdicts and the report alike: reading 300,000 attempts
    takes seconds, and a split run's parent does it after every shard has finished.
    """
    from testbed.results import Results
    from testbed.summary import summarize
    from testbed.verdict import judge

    results = Results(run_dir / "results.sqlite")
    try:
        summary = summarize(results)
    finally:
        results.close()
    verdicts = judge(thresholds, summary)
    writer.thresholds(verdicts)
    # As summarize() reads them back from the thresholds table just written.
    summary["thresholds"] = [{"expression": e, "observed": o, "ok": ok} for e, o, ok in verdicts]
    return verdicts, summary
