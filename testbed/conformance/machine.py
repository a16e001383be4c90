"""The stateful conformance test: a fleet, a clock and an operator, step by step.

A hypothesis ``RuleBasedStateMachine`` plays devices that open connections (fresh or
resuming an earlier TLS session) and send requests with or without their cookie, while the
clock advances, managed-CA certificates are revoked and reactivated, the root is rotated and
the session duration changes, all through the enforcer's admin API. After every request the
answer must equal the model's for the state the machine tracks; after every step the
invariants hold (no divergence so far, No Duration connections never serve a second request).

With a target that expresses people and service tokens (issue 17), the operator also switches
the application between three policy sets (devices only; a person from example.com AND a
certificate; a service token or a certificate), and requests may carry a person's session token
(minted with the enforcer's own key, bound to the device's certificate) and service-token
headers, so that revocations, clock jumps and duration changes meet sessions of people
(I8: revoking the certificate ends the session) and service tokens that expire (I11).

It needs a target whose clock can be set: the built-in enforcer.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ssl
from typing import Any

from cryptography import x509
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from devices.pki import write_pem
from testbed.conformance import model
from testbed.conformance.runner import Divergence, Step, compare, person_of, session_claims
from testbed.conformance.strategies import (
    APP_HOST,
    DAY,
    DURATIONS,
    IDP_A,
    IDP_B,
    IntermediateSpec,
    LeafSpec,
    PkiSpec,
    build_pki,
    csr_pem,
    key_pem,
    pem,
    pooled_key,
)
from testbed.conformance.targets import AdminTarget, model_policy
from testbed.conformance.wire import AnyConnection, WireError, client_context, open_connection

POLICY = {"name": "valid certificate", "include": [{"certificate": {}}]}
# Issue 17's policy sets (symbolic service-token ids are resolved per target).
POLICY_SETS: dict[str, list[dict[str, Any]]] = {
    "devices": [POLICY],
    "people": [
        {
            "name": "people on our devices",
            "decision": "allow",
            "include": [{"email_domain": {"domain": "example.com"}}],
            "require": [{"certificate": {}}],
        }
    ],
    "machines": [
        {
            "name": "ci or devices",
            "include": [{"service_token": {"token_id": "st-short"}}, {"certificate": {}}],
        }
    ],
}
DEVICES = ("a-long", "a-short", "b", "managed-1", "managed-2")
# A probe: a device (None: no certificate), a person's session token, a service token.
Probe = tuple[str | None, str | None, str | None]


@dataclasses.dataclass
class Device:
    """A device: its chain, TLS context, last session and cookie."""

    name: str
    chain: tuple[x509.Certificate, ...]
    context: ssl.SSLContext
    managed_id: str | None = None
    session: ssl.SSLSession | None = None
    cookie: str | None = None
    cookie_exp: dt.datetime | None = None


@dataclasses.dataclass
class Conn:
    """An open connection and what the machine knows about it."""

    connection: AnyConnection
    device: Device | None
    resumed: bool
    no_duration_at_handshake: bool
    served: int = 0
    closed: bool = False


class ConformanceMachine(RuleBasedStateMachine):
    """Devices, clock, revocations, rotations and durations against the model."""

    target: AdminTarget  # set by machine_for()

    connections = Bundle("connections")

    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []
        self.log: list[str] = []
        self.open: list[Conn] = []
        self.roots: dict[str, model.Root] = {}
        self.devices: dict[str, Device] = {}
        self.root_a = self.root_b = ""

    # ---- set-up ----

    @initialize()
    def provision(self) -> None:
        """Reset the fixture: root A on the hostname, B off, all active, 24h, clock at t0."""
        t = self.target
        a = t.admin
        assert t.clock is not None and t.base is not None
        self.t0 = t.base
        t.set_time(self.t0)
        fixture = t.machine_fixture
        if fixture is None or fixture[0] is not t.roots:
            self._build()
            t.machine_fixture = (t.roots, dict(self.roots), self.devices, self.root_a, self.root_b)
        else:
            _, roots, self.devices, self.root_a, self.root_b = fixture
            # The roots as first built: A (and the short-lived one) on the hostname, B off.
            self.roots = dict(roots)
            for rid, hosts in ((self.root_a, [APP_HOST]), (self.root_b, [])):
                a.call(
                    "PUT", a.account_path(f"/certificates/{rid}"), {"associated_hostnames": hosts}
                )
            for d in self.devices.values():
                d.session, d.cookie, d.cookie_exp = None, None, None
                if d.managed_id is not None:
                    a.call("PATCH", a.zone_path(f"/client_certificates/{d.managed_id}"), {})
        self.duration = "24h"
        self.people = t.caps.identity and t.session_minter is not None
        if self.people or t.caps.service_tokens:
            t._identity_setup()
        self.policy_set = "devices"
        body: dict[str, Any] = {"session_duration": self.duration, "policies": [POLICY]}
        if t.caps.identity:
            body["allowed_idps"] = []
        a.call("PUT", a.account_path(f"/apps/{t.app_ids[APP_HOST]}"), body)
        self.revoked: set[str] = set()
        self.now = self.t0
        self.anonymous = client_context(t.edge_ca)

    def _build(self) -> None:
        """Two roots (A with an intermediate, B), five devices, made once per target."""
        t = self.target
        a = t.admin
        inter = (IntermediateSpec(presented=True),)
        pki_a = build_pki(PkiSpec(intermediates=inter), self.t0)
        pki_a_short = build_pki(
            PkiSpec(intermediates=inter, leaf=LeafSpec(cn="device-short", not_after=3600)),
            self.t0,
        )
        pki_b = build_pki(PkiSpec(intermediates=(), leaf=LeafSpec(cn="device-b")), self.t0)
        t.clear_roots()
        self.root_a = t.upload_root([pki_a.root], (APP_HOST,))
        self.root_b = t.upload_root([pki_b.root], ())
        a.call(
            "PUT",
            a.zone_path("/certificate_authorities/hostname_associations"),
            {"hostnames": [APP_HOST]},
        )
        ca_pem = a.call("GET", a.zone_path("/client_certificates/ca"))["certificate"]
        ca = x509.load_pem_x509_certificate(ca_pem.encode())
        # A short-lived leaf under root A's intermediate: it expires within the run.
        short_leaf = pki_a_short.leaf
        assert pki_a.leaf is not None and short_leaf is not None and pki_b.leaf is not None
        self.roots = {
            "a": model.Root(pki_a.root, (), frozenset({APP_HOST})),
            "a-short": model.Root(pki_a_short.root, (), frozenset({APP_HOST})),
            "b": model.Root(pki_b.root, (), frozenset()),
            "managed": model.Root(ca, (), frozenset({APP_HOST})),
        }
        self.root_a_short = t.upload_root([pki_a_short.root], (APP_HOST,))
        self.devices = {}
        key = pooled_key("ec-p256", "leaf")
        chains = {
            "a-long": ((pki_a.leaf, *pki_a.presented), pki_a.leaf_key),
            "a-short": ((short_leaf, *pki_a_short.presented), pki_a_short.leaf_key),
            "b": ((pki_b.leaf,), pki_b.leaf_key),
        }
        for name in ("managed-1", "managed-2"):
            issued = a.call(
                "POST",
                a.zone_path("/client_certificates"),
                {"csr": csr_pem(key, name), "validity_days": 30},
            )
            leaf = x509.load_pem_x509_certificate(issued["certificate"].encode())
            chains[name] = ((leaf,), key)
            self.devices[name] = Device(name, (leaf,), self._context(name, (leaf,), key))
            self.devices[name].managed_id = issued["id"]
        for name in ("a-long", "a-short", "b"):
            chain, k = chains[name]
            self.devices[name] = Device(name, chain, self._context(name, chain, k))

    def _context(self, name: str, chain: tuple[x509.Certificate, ...], key: Any) -> ssl.SSLContext:
        folder = self.target.folder / "machine"
        write_pem(folder / f"{name}.pem", pem(*chain))
        write_pem(folder / f"{name}.key", key_pem(key), private=True)
        return client_context(self.target.edge_ca, folder / f"{name}.pem", folder / f"{name}.key")

    def world(self) -> model.World:
        """The model's view of the current configuration."""
        t = self.target
        app = model.App(
            APP_HOST,
            dt.timedelta(seconds=DURATIONS[self.duration]),
            tuple(model_policy(b) for b in self._policies()),
            tuple(t.ids[i] for i in (IDP_A, IDP_B)) if t.caps.identity else (),
        )
        return model.World(
            tuple(self.roots.values()),
            {APP_HOST: app},
            frozenset(self.revoked),
            t.caps.max_chain_depth,
            service_tokens=tuple(t.service_tokens.values()),
        )

    def _policies(self) -> list[dict[str, Any]]:
        """The current policy set, with the target's service-token ids."""
        ids = self.target.ids

        def resolve(rule: dict[str, Any]) -> dict[str, Any]:
            if "service_token" in rule:
                return {"service_token": {"token_id": ids[rule["service_token"]["token_id"]]}}
            return rule

        return [
            {**b, **{k: [resolve(r) for r in b.get(k, [])] for k in ("include", "require")}}
            for b in POLICY_SETS[self.policy_set]
        ]

    # ---- rules: devices ----

    @rule(
        target=connections,
        device=st.sampled_from((*DEVICES, None)),
        resume=st.booleans(),
        with_cookie=st.booleans(),
        person=st.sampled_from([None, None, "alice", "bob"]),
        service_token=st.sampled_from([None, None, "st-long", "st-short", "wrong-secret"]),
    )
    def visit(
        self,
        device: str | None,
        resume: bool,
        with_cookie: bool,
        person: str | None,
        service_token: str | None,
    ) -> Conn:
        """A device (or a client without a certificate) connects and sends a first request.

        (Connecting alone was a rule of its own; hypothesis then drew few requests among the
        operator's steps, so a visit is both.)
        """
        conn = self.connect(device, resume)
        owner = device or "a-long"
        self.request(conn, with_cookie, owner, person, service_token)
        return conn

    def connect(self, device: str | None, resume: bool) -> Conn:
        """A device (or a client without a certificate) opens a connection."""
        d = self.devices[device] if device else None
        ctx = d.context if d else self.anonymous
        session = d.session if d and resume else None
        conn = open_connection(
            self.target.caps.transport, self.target.address, APP_HOST, ctx, session=session
        )
        no_duration = self.duration == "0s"
        self.log.append(f"connect {device or 'anonymous'} resume={resume} -> {conn.resumed}")
        if conn.resumed and no_duration:
            self.problems.append(
                "a TLS session was resumed on a No Duration hostname (access-flow A9)"
            )
        handle = Conn(conn, d, conn.resumed, no_duration)
        self.open.append(handle)
        return handle

    @rule(
        conn=connections,
        with_cookie=st.booleans(),
        owner=st.sampled_from(DEVICES),
        person=st.sampled_from([None, None, "alice", "bob"]),
        service_token=st.sampled_from([None, None, "st-long", "st-short", "wrong-secret"]),
    )
    def request(
        self,
        conn: Conn,
        with_cookie: bool,
        owner: str,
        person: str | None,
        service_token: str | None,
    ) -> None:
        """Send a request with the device's cookie or without; anonymous ones borrow one.

        Without the cookie, a person's session token bound to the device's certificate may
        ride instead (minted an hour ago, valid for a day), and service-token headers may too.
        """
        if conn.closed or not conn.connection.usable:
            return
        t = self.target
        d = conn.device
        holder = d if d is not None else self.devices[owner]
        token, headers = None, []
        if with_cookie and holder.cookie and holder.cookie_exp:
            token = model.Token(
                APP_HOST, holder.cookie_exp, True, model.sha256_hex(holder.chain[0])
            )
            headers = [("cookie", f"CF_Authorization={holder.cookie}")]
        elif person is not None and self.people:
            who = person_of(t, person)
            bound = model.sha256_hex(holder.chain[0])
            exp = self.now + dt.timedelta(days=1)
            claims = session_claims(t, who, bound, self.now - dt.timedelta(hours=1), exp)
            token = model.Token(APP_HOST, exp, True, bound, who)
            headers = [("cookie", f"CF_Authorization={t.session_minter(claims)}")]
        credentials = None
        if service_token is not None and t.service_tokens:
            known = t.service_tokens["st-short" if service_token == "st-short" else "st-long"]
            secret = "0" * 64 if service_token == "wrong-secret" else known.secret
            credentials = model.Credentials(known.client_id, secret)
            headers += [
                ("cf-access-client-id", credentials.client_id),
                ("cf-access-client-secret", credentials.secret),
            ]
        request = model.Request(
            APP_HOST, APP_HOST, d.chain if d else (), token, service_token=credentials
        )
        expected = model.expect(self.world(), request, self.now)
        try:
            observed = conn.connection.request(APP_HOST, headers=headers)
            problems: list[str] = []
        except WireError as exc:
            observed, problems = None, [f"no response: {exc}"]
        step = Step(
            f"request {d.name if d else 'anonymous'}{' +cookie' if token else ''}",
            request,
            self.now,
            expected,
            observed,
            problems,
        )
        compare(step, self.target.caps, self.world(), d.chain[0] if d else None)
        conn.served += 1
        self.log.append(step.render(self.t0))
        self.problems += step.problems
        if observed is None or observed.closed:
            conn.closed = True
            conn.connection.close()
        if d is not None:
            d.session = conn.connection.session or d.session
            if observed is not None and observed.cookie:
                d.cookie, d.cookie_exp = observed.cookie, expected.token_exp

    def _probe(self, probe: Probe) -> None:
        """After an operator's step or the clock's, one device visits without its cookie.

        Hypothesis draws few requests among many operator steps; a probe after each change
        makes every change meet a request.
        """
        device, person, service_token = probe
        conn = self.connect(device, False)
        try:
            self.request(conn, False, device or "a-long", person, service_token)
        finally:
            conn.closed = True
            conn.connection.close()

    @rule(conn=connections)
    def hang_up(self, conn: Conn) -> None:
        """The client closes a connection."""
        conn.closed = True
        conn.connection.close()

    # ---- rules: time and the operator ----

    @rule(
        seconds=st.sampled_from([1, 59, 3600, DAY, 31 * DAY]),
        probe=st.tuples(
            st.sampled_from((*DEVICES, None)),
            st.sampled_from([None, "alice", "bob"]),
            st.sampled_from([None, "st-long", "st-short"]),
        ),
    )
    def advance_clock(self, seconds: int, probe: Probe) -> None:
        """Time passes on the enforcer's injected clock."""
        self.now += dt.timedelta(seconds=seconds)
        self.target.set_time(self.now)
        self.log.append(
            f"advance clock {seconds}s -> t0+{(self.now - self.t0).total_seconds():.0f}s"
        )
        self._probe(probe)

    @rule(
        name=st.sampled_from(["managed-1", "managed-2"]),
        revoke=st.booleans(),
        probe=st.tuples(
            st.sampled_from((*DEVICES, None)),
            st.sampled_from([None, "alice", "bob"]),
            st.sampled_from([None, "st-long", "st-short"]),
        ),
    )
    def revoke_or_reactivate(self, name: str, revoke: bool, probe: Probe) -> None:
        """The operator revokes (or reactivates) a managed-CA certificate."""
        a, d = self.target.admin, self.devices[name]
        path = a.zone_path(f"/client_certificates/{d.managed_id}")
        if revoke:
            a.call("DELETE", path)
            self.revoked.add(model.sha256_hex(d.chain[0]))
        else:
            a.call("PATCH", path, {})
            self.revoked.discard(model.sha256_hex(d.chain[0]))
        self.log.append(f"{'revoke' if revoke else 'reactivate'} {name}")
        self._probe(probe)

    @rule()
    def rotate_root(self) -> None:
        """The operator moves the hostname from root A to root B, or back."""
        a = self.target.admin
        to_b = APP_HOST in self.roots["a"].hostnames
        for key, rid, on in (("a", self.root_a, not to_b), ("b", self.root_b, to_b)):
            hosts = [APP_HOST] if on else []
            a.call("PUT", a.account_path(f"/certificates/{rid}"), {"associated_hostnames": hosts})
            self.roots[key] = dataclasses.replace(self.roots[key], hostnames=frozenset(hosts))
        self.log.append(f"rotate root -> {'B' if to_b else 'A'}")

    @rule(
        choice=st.sampled_from(sorted(POLICY_SETS)),
        probe=st.tuples(
            st.sampled_from((*DEVICES, None)),
            st.sampled_from([None, "alice", "bob"]),
            st.sampled_from([None, "st-long", "st-short"]),
        ),
    )
    def set_policies(self, choice: str, probe: Probe) -> None:
        """The operator switches the application's policies (devices, people, machines)."""
        t = self.target
        if choice != "devices" and not (t.caps.identity and t.caps.service_tokens):
            return
        self.policy_set = choice
        a = t.admin
        path = a.account_path(f"/apps/{t.app_ids[APP_HOST]}")
        a.call("PUT", path, {"policies": self._policies()})
        self.log.append(f"policies -> {choice}")
        self._probe(probe)

    @rule(duration=st.sampled_from(["0s", "15m", "24h"]))
    def set_session_duration(self, duration: str) -> None:
        """The operator changes the application's session duration."""
        a = self.target.admin
        path = a.account_path(f"/apps/{self.target.app_ids[APP_HOST]}")
        a.call("PUT", path, {"session_duration": duration})
        self.duration = duration
        self.log.append(f"session duration -> {duration}")

    # ---- invariants ----

    @precondition(lambda self: hasattr(self, "t0"))
    @invariant()
    def agrees_with_the_model(self) -> None:
        """Every answer so far equalled the model's."""
        if self.problems:
            raise Divergence("stateful run:\n" + "\n".join(self.log))

    def teardown(self) -> None:
        """Close whatever connections are still open."""
        for conn in self.open:
            conn.connection.close()


def machine_for(target: AdminTarget) -> type[ConformanceMachine]:
    """The machine class bound to one target."""
    if target.clock is None:
        raise ValueError("the stateful test needs a target whose clock can be set (builtin)")
    return type("ConformanceMachine", (ConformanceMachine,), {"target": target})
