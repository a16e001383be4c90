"""Targets: where a case is provisioned and whose answers the runner checks.

- :class:`AdminTarget` provisions through the enforcer admin API (roots, the managed CA, the
  protected application and its policies). The built-in target is our enforcer served in
  this process with an injected :class:`~enforcer.clock.FixedClock`; a URL target is any
  enforcer that speaks the same admin API, whose clock cannot be moved.
- :class:`NginxTarget` writes the nginx configuration a case implies (one server per hostname,
  ``ssl_client_certificate`` holding the roots associated with it and their uploaded
  intermediates) and restarts nginx on loopback for every case.

Targets are used from hypothesis's worker thread; the trio loop in the main thread serves
the built-in enforcer and runs nginx, reached with ``trio.from_thread.run``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import secrets
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa

from devices.pki import issue_ca, issue_leaf, write_pem
from testbed.admin_cli import AdminClient, AdminError
from testbed.conformance import model
from testbed.conformance.runner import Provisioned, describe_pki
from testbed.conformance.strategies import (
    APP_HOST,
    DURATIONS,
    IDP_A,
    IDP_B,
    NOAPP_HOST,
    OTHER_HOST,
    PROFILE_HASHES,
    PROFILE_KEY_TYPES,
    SERVICE_TOKENS,
    ST_DURATIONS,
    Capabilities,
    CaseSpec,
    build_pki,
    csr_pem,
    key_pem,
    pem,
    policy_body,
    pooled_key,
)
from testbed.conformance.wire import Observed, client_context

ZONE = "conformance"
ACCOUNT = "conformance"
HOSTNAMES = (APP_HOST, OTHER_HOST, NOAPP_HOST)
VALID_CERTIFICATE = {"name": "valid certificate", "include": [{"certificate": {}}]}


class TargetError(Exception):
    """A target could not be set up or provisioned; the message says what to fix."""


def wall_now() -> dt.datetime:
    """The wall clock, to whole seconds: only for targets whose clock cannot be injected."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _parse_iso(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def model_policy(body: Mapping[str, Any]) -> model.Policy:
    """The model's form of a policy's admin-API body."""

    def rules(key: str) -> tuple[model.Rule, ...]:
        out = []
        for raw in body.get(key, []):
            ((kind, inner),) = raw.items()
            out.append(model.Rule(kind, next(iter(inner.values()), "")))
        return tuple(out)

    duration = body.get("session_duration")
    return model.Policy(
        name=str(body["name"]),
        decision=str(body.get("decision", "non_identity")),
        include=rules("include"),
        require=rules("require"),
        exclude=rules("exclude"),
        session_duration=None if duration is None else dt.timedelta(seconds=DURATIONS[duration]),
    )


def write_edge(folder: Path, now: dt.datetime) -> tuple[Path, Path, Path]:
    """An edge CA and a server certificate for the three conformance hostnames."""
    ca = issue_ca("conformance edge CA", now)
    edge = issue_leaf(
        APP_HOST,
        ca,
        not_before=now - dt.timedelta(days=1),
        not_after=now + dt.timedelta(days=3650),
        client=False,
        dns_names=HOSTNAMES,
    )
    write_pem(folder / "edge-ca.pem", ca.cert_pem())
    write_pem(folder / "edge-cert.pem", edge.cert_pem(), ca.cert_pem())
    write_pem(folder / "edge-key.pem", edge.key_pem(), private=True)
    return folder / "edge-ca.pem", folder / "edge-cert.pem", folder / "edge-key.pem"


def _contexts(
    folder: Path, edge_ca: Path, chain: tuple[x509.Certificate, ...], key: Any
) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert_file, key_file = folder / "client-cert.pem", folder / "client-key.pem"
    write_pem(cert_file, pem(*chain))
    write_pem(key_file, key_pem(key), private=True)
    with_cert = client_context(edge_ca, cert_file, key_file)
    if isinstance(key, dsa.DSAPrivateKey):
        with_cert.maximum_version = ssl.TLSVersion.TLSv1_2  # TLS 1.3 has no DSA signatures
    return with_cert, client_context(edge_ca)


def _apps_text(apps: Mapping[str, model.App], bodies: list[dict[str, Any]]) -> str:
    app = apps[APP_HOST]
    lines = [
        f"application {APP_HOST}: session_duration {app.session_duration}",
        *(f"  policy {b}" for b in bodies),
        f"application {OTHER_HOST}: 24h, Valid Certificate; {NOAPP_HOST}: served, no application",
    ]
    return "\n".join(lines)


class AdminTarget:
    """A target provisioned through the enforcer admin API."""

    def __init__(
        self,
        name: str,
        caps: Capabilities,
        address: tuple[str, int],
        edge_ca: Path,
        admin: AdminClient,
        folder: Path,
        clock: Any | None = None,
        base: dt.datetime | None = None,
    ) -> None:
        self.name = name
        self.caps = caps
        self.address = address
        self.edge_ca = edge_ca
        self.admin = admin
        self.folder = folder
        self.clock = clock
        self.base = base
        self.roots: list[str] = []  # ids of the roots uploaded so far
        self.app_ids: dict[str, str] = {}
        self._ca_cert: x509.Certificate | None = None
        # The stateful machine's roots and devices, built once per target and reset per run.
        self.machine_fixture: Any = None
        # Issue 17: the identity providers and service tokens made once per target (symbolic
        # name -> id, and the service tokens as the model sees them, secrets included).
        self.ids: dict[str, str] = {}
        self.service_tokens: dict[str, model.ServiceToken] = {}
        # Set for an enforcer served in this process: mints a session token from claims with
        # the enforcer's own signing key, and decides a request in process.
        self.session_minter: Any = None
        self.in_process: Any = None
        self.issuer = ""
        self.auds: dict[str, str] = {}

    # ---- set-up ----

    def prepare(self, origin: str) -> None:
        """Switch mTLS on and make sure both applications exist (creating them if needed)."""
        a = self.admin
        a.call("PUT", a.account_path("/mtls"), {"enabled": True})
        apps = {app["domain"]: app["id"] for app in a.call("GET", a.account_path("/apps"))}
        for host in (APP_HOST, OTHER_HOST):
            # Opted out of certificate binding (on by default): the replays check that a
            # token alone admits, as access-flow A4 describes, and the model says so.
            body = {
                "session_duration": "24h",
                "bind_token_to_certificate": False,
                "policies": [VALID_CERTIFICATE],
            }
            if host in apps:
                a.call("PUT", a.account_path(f"/apps/{apps[host]}"), body)
            else:
                created = a.call(
                    "POST", a.account_path("/apps"), {"domain": host, "origin": origin, **body}
                )
                apps[host] = created["id"]
        self.app_ids = {h: apps[h] for h in (APP_HOST, OTHER_HOST)}
        self.auds = {
            app["domain"]: app["aud"]
            for app in a.call("GET", a.account_path("/apps"))
            if app["domain"] in self.app_ids
        }

    def _identity_setup(self) -> None:
        """Two identity providers and two service tokens, made once (at the target's base time).

        The providers are never contacted: logins are not made on the wire here (the login
        helper's tests do that against a real provider); session tokens are minted instead.
        """
        if self.ids:
            return
        a = self.admin
        for name in (IDP_A, IDP_B):
            body = {
                "name": f"conformance {name}",
                "type": "oidc",
                "config": {
                    "client_id": f"conformance-{name}",
                    "client_secret": secrets.token_hex(16),
                    "issuer_url": f"https://{name}.conformance.invalid",
                },
            }
            self.ids[name] = a.call("POST", a.account_path("/identity_providers"), body)["id"]
        for name in SERVICE_TOKENS:
            made = a.call(
                "POST",
                a.account_path("/service_tokens"),
                {"name": f"conformance {name}", "duration": ST_DURATIONS[name]},
            )
            self.ids[name] = made["id"]
            self.service_tokens[name] = model.ServiceToken(
                made["id"], made["client_id"], made["client_secret"], _parse_iso(made["expires_at"])
            )

    def now(self) -> dt.datetime:
        """The target's time."""
        return self.clock.now() if self.clock is not None else wall_now()

    def set_time(self, at: dt.datetime) -> None:
        """Set the injected clock (a URL target's clock cannot move)."""
        if self.clock is not None:
            self.clock.set(at)

    # ---- per case ----

    def upload_root(self, certs: list[x509.Certificate], hostnames: tuple[str, ...]) -> str:
        """Upload a root (intermediates first, root last) for the hostnames; return its id."""
        a = self.admin
        body = {
            "name": f"conformance {secrets.token_hex(3)}",
            "certificate": pem(*certs).decode(),
            "associated_hostnames": list(hostnames),
        }
        rid: str = a.call("POST", a.account_path("/certificates"), body)["id"]
        self.roots.append(rid)
        return rid

    def clear_roots(self) -> None:
        """Detach and delete every root this target uploaded."""
        a = self.admin
        for rid in self.roots:
            path = a.account_path(f"/certificates/{rid}")
            a.call("PUT", path, {"associated_hostnames": []})
            a.call("DELETE", path)
        self.roots = []

    def provision(self, spec: CaseSpec) -> Provisioned:
        """Upload the case's roots, issue its managed leaf, set the application's policies."""
        t0 = self.base if self.base is not None else wall_now()
        self.set_time(t0)
        pki = build_pki(spec.pki, t0)
        a = self.admin
        try:
            if self.caps.identity or self.caps.service_tokens:
                self._identity_setup()
            self.clear_roots()
            # The last certificate of the PEM is the trust anchor (the root or an intermediate).
            self.upload_root([*pki.uploaded, pki.anchor], spec.pki.root_hostnames)
            roots = [model.Root(pki.anchor, pki.uploaded, frozenset(spec.pki.root_hostnames))]
            if pki.decoy is not None:
                hosts = spec.pki.decoy_hostnames or ()
                self.upload_root([*pki.decoy_uploaded, pki.decoy], hosts)
                roots.append(model.Root(pki.decoy, pki.decoy_uploaded, frozenset(hosts)))
            managed = spec.pki.managed
            ca_hosts = managed.hostnames if managed else ()
            a.call(
                "PUT",
                a.zone_path("/certificate_authorities/hostname_associations"),
                {"hostnames": list(ca_hosts)},
            )
            if self._ca_cert is None:
                ca_pem = a.call("GET", a.zone_path("/client_certificates/ca"))["certificate"]
                self._ca_cert = x509.load_pem_x509_certificate(ca_pem.encode())
            roots.append(model.Root(self._ca_cert, (), frozenset(ca_hosts)))
            revoked: frozenset[str] = frozenset()
            leaf_key = pki.leaf_key
            if managed is not None:
                leaf_key = pooled_key("ec-p256", "leaf")
                issued = a.call(
                    "POST",
                    a.zone_path("/client_certificates"),
                    {
                        "csr": csr_pem(leaf_key, spec.pki.leaf.cn),
                        "validity_days": managed.validity_days,
                    },
                )
                leaf = x509.load_pem_x509_certificate(issued["certificate"].encode())
                if managed.revoked:
                    a.call("DELETE", a.zone_path(f"/client_certificates/{issued['id']}"))
                    revoked = frozenset({model.sha256_hex(leaf)})
                chain: tuple[x509.Certificate, ...] = (leaf,)
                issuer = self._ca_cert
            else:
                assert pki.leaf is not None
                chain, issuer = (pki.leaf, *pki.presented), pki.issuer
            bodies = [
                policy_body(p, i, chain[0], issuer, self.ids) for i, p in enumerate(spec.policies)
            ]
            app_body: dict[str, Any] = {
                "session_duration": spec.session_duration,
                "policies": bodies,
            }
            providers: tuple[str, ...] = ()
            if self.caps.identity:
                allowed = [self.ids[i] for i in spec.allowed_idps or ()]
                app_body["allowed_idps"] = allowed  # empty: every provider of the account
                providers = tuple(allowed) or (self.ids[IDP_A], self.ids[IDP_B])
            a.call("PUT", a.account_path(f"/apps/{self.app_ids[APP_HOST]}"), app_body)
        except AdminError as exc:
            raise TargetError(
                f"{self.name}: provisioning through the admin API failed: {exc}"
            ) from exc
        apps = {
            APP_HOST: model.App(
                APP_HOST,
                dt.timedelta(seconds=DURATIONS[spec.session_duration]),
                tuple(model_policy(b) for b in bodies),
                providers,
            ),
            OTHER_HOST: model.App(
                OTHER_HOST,
                dt.timedelta(hours=24),
                (model_policy(VALID_CERTIFICATE),),
                (self.ids[IDP_A], self.ids[IDP_B]) if self.caps.identity else (),
            ),
        }
        world = model.World(
            tuple(roots),
            apps,
            revoked,
            self.caps.max_chain_depth,
            service_tokens=tuple(self.service_tokens.values()),
        )
        with_cert, without = _contexts(self.folder, self.edge_ca, chain, leaf_key)
        summary = describe_pki(world, chain, t0, _apps_text(apps, bodies))
        return Provisioned(t0, world, chain, with_cert, without, summary)


class NginxTarget:
    """nginx on loopback, restarted with the configuration each case implies."""

    name = "nginx"
    caps = Capabilities(
        clock=False,
        reasons=False,
        tokens=False,
        policies=False,
        managed_ca=False,
        misdirected=False,
        # OpenSSL's own profile (security level, no partial chains, SAN criticality) differs
        # from ours: nginx draws only what both accept alike.
        key_types=PROFILE_KEY_TYPES,
        hashes=PROFILE_HASHES,
        profile_rules=False,
    )

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.edge_ca, self.edge_cert, self.edge_key = write_edge(folder, wall_now())
        self.address = ("127.0.0.1", 0)
        self._proc: trio.Process | None = None
        self._nobody = issue_ca("conformance nobody", wall_now())

    def now(self) -> dt.datetime:
        """nginx reads the wall clock."""
        return wall_now()

    def set_time(self, at: dt.datetime) -> None:
        """nginx's clock cannot move: cases for nginx have no clock jumps."""

    def provision(self, spec: CaseSpec) -> Provisioned:
        """Write the CA files and configuration for the case and (re)start nginx."""
        from testbed.nginx import start_nginx_servers, stop_nginx

        t0 = wall_now()
        pki = build_pki(spec.pki, t0)
        assert pki.leaf is not None
        roots = [model.Root(pki.anchor, pki.uploaded, frozenset(spec.pki.root_hostnames))]
        if pki.decoy is not None:
            roots.append(
                model.Root(pki.decoy, pki.decoy_uploaded, frozenset(spec.pki.decoy_hostnames or ()))
            )
        cas: dict[str, Path | None] = {}
        for host in (APP_HOST, OTHER_HOST):
            mine = [
                c for r in roots if host in r.hostnames for c in (*r.intermediates, r.certificate)
            ]
            path = self.folder / f"client-ca-{host}.pem"
            # nginx needs a CA file even when no root is associated: one that trusts nobody.
            write_pem(path, pem(*mine) if mine else self._nobody.cert_pem())
            cas[host] = path
        cas[NOAPP_HOST] = None
        if self._proc is not None:
            trio.from_thread.run(stop_nginx, self._proc)
        self._proc, port = trio.from_thread.run(
            lambda: start_nginx_servers(
                self.folder / "nginx", cert=self.edge_cert, key=self.edge_key, client_cas=cas
            )
        )
        self.address = ("127.0.0.1", port)
        apps = {
            h: model.App(h, dt.timedelta(hours=24), (model_policy(VALID_CERTIFICATE),))
            for h in (APP_HOST, OTHER_HOST)
        }
        world = model.World(tuple(roots), apps)
        chain = (pki.leaf, *pki.presented)
        with_cert, without = _contexts(self.folder, self.edge_ca, chain, pki.leaf_key)
        text = "nginx: ssl_verify_client optional; each server's ssl_client_certificate = its roots"
        return Provisioned(
            t0, world, chain, with_cert, without, describe_pki(world, chain, t0, text)
        )

    async def aclose(self) -> None:
        """Stop nginx."""
        from testbed.nginx import stop_nginx

        if self._proc is not None:
            await stop_nginx(self._proc)
            self._proc = None


# ---- the built-in enforcer, served in this process ------------------------------------------

# Below the default (8) so that the cases' chains (up to 3 intermediates) can exceed it.
BUILTIN_MAX_CHAIN_DEPTH = 2
BUILTIN_CONFIG = """
[server]
host = "127.0.0.1"
port = 0
max_chain_depth = {depth}
access_log = "access.log"

[signing]
key_file = "signing-key.pem"

[state]
path = "state.sqlite"

[admin]
port = 0
token = "{token}"
account_id = "{account}"

[[edge_certificates]]
hostnames = {hostnames}
certificate = "edge-cert.pem"
private_key = "edge-key.pem"
"""


async def serve_builtin(nursery: trio.Nursery, folder: Path) -> AdminTarget:
    """Serve our enforcer, its admin API and an echo origin on loopback; return the target."""
    import json

    from enforcer.accesslog import AccessLog
    from enforcer.admin import serve_admin
    from enforcer.clock import FixedClock
    from enforcer.config import load_config
    from enforcer.origin import serve_echo_origin
    from enforcer.server import Enforcer, open_listener, serve

    folder.mkdir(parents=True, exist_ok=True)
    base = wall_now()
    edge_ca, _, _ = write_edge(folder, base)
    token = secrets.token_hex(16)
    (folder / "enforcer.toml").write_text(
        BUILTIN_CONFIG.format(
            token=token,
            account=ACCOUNT,
            hostnames=json.dumps(list(HOSTNAMES)),
            depth=BUILTIN_MAX_CHAIN_DEPTH,
        )
    )
    config = load_config(folder / "enforcer.toml")
    clock = FixedClock(base)
    origin_port = await nursery.start(serve_echo_origin, "127.0.0.1", 0)
    enforcer = Enforcer(config, clock, AccessLog(io.StringIO()), state_path=config.state_path)
    port = await nursery.start(serve, enforcer, await open_listener("127.0.0.1", 0))
    assert config.admin is not None
    admin_port = await nursery.start(
        serve_admin, enforcer.controller, config.admin, await open_listener("127.0.0.1", 0)
    )
    admin = AdminClient(f"http://127.0.0.1:{admin_port}", token, ACCOUNT, ZONE)
    target = AdminTarget(
        "builtin",
        Capabilities(
            max_chain_depth=BUILTIN_MAX_CHAIN_DEPTH,
            identity=True,
            service_tokens=True,
            in_process=True,
            email_header=True,
            browser=True,
        ),
        ("127.0.0.1", port),
        edge_ca,
        admin,
        folder,
        clock,
        base,
    )
    target.session_minter = lambda claims: _mint(enforcer, claims)
    target.in_process = lambda request, at: decide_in_process(enforcer, request, at, target.ids)
    target.issuer = enforcer.snapshot.issuer
    await trio.to_thread.run_sync(target.prepare, f"http://127.0.0.1:{origin_port}")
    return target


def _mint(enforcer: Any, claims: Mapping[str, Any]) -> str:
    """Sign claims with the enforcer's current signing key, as its own tokens are (A7)."""
    from enforcer.tokens import mint

    return mint(enforcer.snapshot.keyring, claims)


def decide_in_process(
    enforcer: Any, request: model.Request, at: dt.datetime, ids: Mapping[str, str]
) -> Observed:
    """Decide ``request`` with the served enforcer's own snapshot, as its callback route would.

    The login callback establishes an identity before the decision (I5); without an identity
    provider on the wire this is how the suite reaches that path: ``enforcer.decision.decide``
    with ``AccessRequest.identity`` set, the certificate validated by ``check_chain``.
    """
    import ipaddress

    from enforcer.decision import AccessRequest, check_chain, decide, normalise_hostname
    from enforcer.identity import Identity, ServiceTokenCredentials

    snapshot = enforcer.snapshot
    host = normalise_hostname(request.host) or ""
    chain = check_chain(snapshot, host, request.chain, at) if request.chain else None
    person = request.person
    identity = None
    if person is not None:
        identity = Identity(
            email=person.email,
            sub=person.sub or person.email,
            idp=person.idp,
            groups=tuple(sorted(person.groups)),
            identity_nonce=secrets.token_hex(8),
        )
    credentials = None
    if request.service_token is not None:
        credentials = ServiceTokenCredentials(
            request.service_token.client_id, request.service_token.secret
        )
    decision = decide(
        AccessRequest(
            request.sni,
            request.host,
            ipaddress.ip_address(request.client_ip),
            None,
            identity,
            credentials,
        ),
        snapshot,
        chain,
        at,
    )
    headers: list[tuple[str, str]] = []
    if decision.reason is not None:
        headers.append(("x-access-denied-reason", str(decision.reason)))
    if decision.set_cookie:
        headers.append(("set-cookie", decision.set_cookie))
    return Observed(decision.status, headers, b"", decision.close_connection, protocol="in-process")


@dataclasses.dataclass(frozen=True)
class UrlSettings:
    """What an operator supplies for a URL target."""

    url: str  # https://host:port the enforcer listens on
    ca: Path  # PEM that verifies its edge certificate for the conformance hostnames
    admin_url: str
    admin_token: str
    origin: str  # origin for the applications the suite creates


def url_target(settings: UrlSettings, folder: Path) -> AdminTarget:
    """A remote enforcer provisioned through its admin API; its clock is the wall clock."""
    from urllib.parse import urlsplit

    parts = urlsplit(settings.url)
    if parts.scheme != "https" or not parts.hostname:
        raise TargetError(f"--target: {settings.url!r} is not an https://host:port URL")
    if not settings.ca.is_file():
        raise TargetError(f"--ca: {settings.ca} is not a readable PEM file")
    admin = AdminClient(settings.admin_url, settings.admin_token, ACCOUNT, ZONE)
    caps = Capabilities(clock=False)
    folder.mkdir(parents=True, exist_ok=True)
    target = AdminTarget(
        settings.url, caps, (parts.hostname, parts.port or 443), settings.ca, admin, folder
    )
    try:
        target.prepare(settings.origin)
    except AdminError as exc:
        raise TargetError(f"--admin-url: preparing the target failed: {exc}") from exc
    return target
