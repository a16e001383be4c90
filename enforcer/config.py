"""The enforcer's TOML configuration: parsed, checked and turned into a :class:`Snapshot`.

Every error names the file, the field and the problem, and nothing listens until the whole
file is good. Relative paths are resolved against the configuration file's folder.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enforcer import crl
from enforcer.application import (
    ALPN_PROTOCOLS,
    SAME_SITE_VALUES,
    Application,
    CookieSettings,
    alpn_problem,
    alpn_tuple,
    cookie_attribute_problem,
    origin_ca_problem,
    origin_problem,
)
from enforcer.chain import (
    DEFAULT_KEY_PROFILE,
    DEFAULT_MAX_CHAIN_DEPTH,
    EC_CURVE_NAMES,
    AnchorError,
    KeyProfile,
    fingerprint,
    split_anchor,
)
from enforcer.control import (
    IDP_CONFIG_FIELDS,
    ApiError,
    identity_provider_of,
    idp_config,
)  # the admin API's checks: the same rules
from enforcer.durations import format_duration
from enforcer.identity import IdentityProvider
from enforcer.policy import PolicyError, parse_policy
from enforcer.private_files import tighten
from enforcer.service_tokens import (
    CLIENT_ID_PATTERN,
    DEFAULT_DURATION,
    SECRET_SHA256_PATTERN,
    ServiceToken,
)
from enforcer.snapshot import RootCertificate
from enforcer.tokens import ALGORITHMS, DEFAULT_ALGORITHM, SigningKey, load_or_create_key
from enforcer.tomltable import TableReader, read_toml

DEFAULT_ISSUER = "https://access.testbed.local"


# What /readyz needs of the configured origins: every one reachable, at least one, or none.
READINESS_ORIGINS = ("all", "any", "none")


class ConfigError(Exception):
    """A configuration problem, located by file and field."""

    def __init__(self, path: Path | str, field: str, problem: str) -> None:
        self.path = str(path)
        self.field = field
        self.problem = problem
        super().__init__(f"{path}: {field}: {problem}" if field else f"{path}: {problem}")


@dataclasses.dataclass(frozen=True)
class EdgeCertificate:
    """A server certificate chain and key, served for its hostnames (chosen by SNI)."""

    hostnames: tuple[str, ...]
    chain_pem: bytes
    key_pem: bytes = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """Listener and limit settings."""

    host: str = "127.0.0.1"
    port: int = 8443
    access_log: str = "-"
    handshake_timeout: float = 10.0
    request_timeout: float = 30.0
    max_header_bytes: int = 16 * 1024
    max_chain_depth: int = DEFAULT_MAX_CHAIN_DEPTH
    # Limits on what one peer may hold (README, Security model); nginx's names in comments.
    max_connections: int = 1024  # per worker process (worker_connections)
    idle_timeout: float = 60.0  # a kept-alive connection between requests (keepalive_timeout)
    max_requests_per_connection: int = 1000  # (keepalive_requests)
    max_client_certificates: int = DEFAULT_MAX_CHAIN_DEPTH + 2  # leaf, intermediates, root
    intermediates_memo_bytes: int = 64 * 1024 * 1024
    # HTTP/2 (README, HTTP/2 and gRPC); the header list is bounded by max_header_bytes, and
    # max_requests_per_connection counts streams. nginx's and Envoy's names in comments.
    h2_max_concurrent_streams: int = 128  # http2_max_concurrent_streams; max_concurrent_streams
    h2_header_table_size: int = 4096  # HPACK table (nginx's fixed size); hpack_table_size
    h2_initial_window_size: int = 65535  # a stream's receive window; initial_stream_window_size
    # HTTP/2 flood bounds (enforcer/h2guard.py, README "HTTP/2 limits").
    h2_max_control_frames_per_second: int = 100  # PING, SETTINGS, RST_STREAM, PRIORITY
    h2_max_outbound_control_frames: int = 1000  # Envoy max_outbound_control_frames
    h2_max_empty_frames: int = 1  # Envoy max_consecutive_inbound_frames_with_empty_payload
    h2_premature_reset_streams: int = 100  # Envoy overload.premature_reset_total_stream_count
    # /metrics, /healthz and /readyz on a listener of their own (docs/metrics.md); without a
    # token only on loopback. readiness_origins: which origins /readyz needs reachable.
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    readiness_origins: str = "all"


@dataclasses.dataclass(frozen=True)
class AdminSettings:
    """The admin API's listener and bearer token."""

    host: str
    port: int
    token: str = dataclasses.field(repr=False)
    account_id: str = "demo"


@dataclasses.dataclass(frozen=True)
class ConfiguredServiceToken:
    """A ``[[service_tokens]]`` table: a token whose secret the operator holds (only its hash
    is in the file), and the duration a refresh extends it by."""

    token: ServiceToken
    duration: dt.timedelta = DEFAULT_DURATION


@dataclasses.dataclass(frozen=True)
class ManagedCA:
    """A zone whose managed CA the configuration creates, and the hostnames that trust it."""

    zone: str
    hostnames: tuple[str, ...]


def default_state_path(config_path: Path) -> Path:
    """Where state lives when the config does not say: a file per config under a state folder."""
    base = os.environ.get("TESTBED_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "mtls-testbed"
    )
    digest = hashlib.sha256(str(config_path.resolve()).encode()).hexdigest()[:12]
    return Path(base) / f"{config_path.stem}-{digest}.sqlite"


@dataclasses.dataclass(frozen=True)
class EnforcerConfig:
    """A whole, checked configuration."""

    path: Path
    server: ServerSettings
    edge_certificates: tuple[EdgeCertificate, ...]
    roots: tuple[RootCertificate, ...]
    applications: tuple[Application, ...]
    signing_key_file: Path | None
    issuer: str
    grace_period: dt.timedelta
    no_duration_token_lifetime: dt.timedelta
    revoked: frozenset[str]
    state_path: Path = Path("state.sqlite")
    admin: AdminSettings | None = None
    managed_cas: tuple[ManagedCA, ...] = ()
    account_id: str = "demo"
    key_profile: KeyProfile = DEFAULT_KEY_PROFILE  # [validation]
    # [[identity_providers]] and [[service_tokens]] (access-flow I1, I11): seeds, as O5 says.
    identity_providers: tuple[IdentityProvider, ...] = ()
    service_tokens: tuple[ConfiguredServiceToken, ...] = ()
    # Hostname -> the ``allowed_idps`` of its [[applications]] table (empty: all providers).
    allowed_idps: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # [signing] algorithm: the enforcer's default token algorithm, what the state's first key
    # signs (later: the rotate route). [[accounts]] token_algorithm: an account's own (J7).
    signing_algorithm: str = DEFAULT_ALGORITHM
    account_algorithms: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def signing_key(self, now: dt.datetime) -> SigningKey:
        """Load the configured signing key (creating its file when missing), or make one."""
        try:
            return load_or_create_key(
                str(self.signing_key_file) if self.signing_key_file else None,
                now,
                self.signing_algorithm,
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(self.path, "signing.key_file", str(exc)) from None

    @property
    def served_hostnames(self) -> frozenset[str]:
        """Every hostname an edge certificate serves."""
        return frozenset(h for e in self.edge_certificates for h in e.hostnames)


# [server] HTTP/2 flood bounds: (default, lowest, highest). The highest values still stop a
# flood; none can switch its bound off.
H2_FLOOD_LIMITS: dict[str, tuple[int, int, int]] = {
    "h2_max_control_frames_per_second": (100, 1, 100_000),
    "h2_max_outbound_control_frames": (1000, 1, 100_000),
    "h2_max_empty_frames": (1, 0, 1000),
    "h2_premature_reset_streams": (100, 1, 1_000_000),
}


def _certificates(reader: TableReader, name: str) -> list[x509.Certificate]:
    path, data = reader.read(name)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise reader.error(name, f"{path} is not PEM certificates: {exc}") from None
    return certs


def _edge(reader: TableReader) -> EdgeCertificate:
    reader.unknown({"hostnames", "certificate", "private_key"})
    hostnames = reader.hostnames("hostnames")
    certs = _certificates(reader, "certificate")
    key_path, key_pem = reader.read("private_key")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise reader.error(
            "private_key", f"{key_path} is not an unencrypted PEM private key: {exc}"
        ) from None
    if key.public_key() != certs[0].public_key():
        raise reader.error("private_key", f"{key_path} does not match the first certificate")
    chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    return EdgeCertificate(hostnames, chain_pem, key_pem)


def _root(reader: TableReader) -> RootCertificate:
    reader.unknown({"id", "name", "certificate", "associated_hostnames", *ROOT_CRL_FIELDS})
    name = reader.get("name", str, what="a name for the root")
    certs = _certificates(reader, "certificate")
    try:
        root, intermediates = split_anchor(certs)
    except AnchorError as exc:
        raise reader.error("certificate", str(exc)) from None
    return RootCertificate(
        id=reader.get("id", str, fingerprint(root)[:32]),
        name=name,
        root=root,
        intermediates=intermediates,
        associated_hostnames=reader.hostnames("associated_hostnames"),
        **_root_crl(reader, certs),
    )


ROOT_CRL_FIELDS = ("crl", "crl_url", "crl_refresh", "crl_fail_open")


def _root_crl(reader: TableReader, certs: list[x509.Certificate]) -> dict[str, Any]:
    """A root's revocation settings; a ``crl`` file must be a CRL of one of ``certs``."""
    out: dict[str, Any] = {}
    if "crl" in reader.table:
        path, data = reader.read("crl")
        try:
            crl.parse_verified(crl.load_crl(data), certs)
        except crl.CrlError as exc:
            raise reader.error("crl", f"{path}: {exc}") from None
        out["crl_file"] = path
    if "crl_url" in reader.table:
        url = reader.get("crl_url", str)
        if problem := crl.check_url(url):
            raise reader.error("crl_url", problem)
        out["crl_url"] = url
    refresh = reader.duration("crl_refresh", "1h")
    if refresh < dt.timedelta(seconds=1):
        raise reader.error("crl_refresh", "use 1s or more (e.g. 1h)")
    out["crl_refresh"] = format_duration(refresh)
    out["crl_fail_open"] = reader.get("crl_fail_open", bool, False)
    return out


_COOKIE_FIELDS = {"path", "domain", "secure", "http_only", "same_site"}


def _application(reader: TableReader) -> Application:
    reader.unknown(
        {
            "name",
            "hostname",
            "aud",
            "session_duration",
            "origin",
            "policies",
            "forward_client_certificate",
            "bind_token_to_certificate",
            "underscores_in_headers",
            "cookie",
            "alpn",
            "origin_ca",
            "allowed_idps",
        }
    )
    hostname = reader.get("hostname", str, what="the application's hostname").lower().rstrip(".")
    origin = reader.get("origin", str, what="the origin URL, such as http://127.0.0.1:9000")
    problem = origin_problem(origin)
    if problem:
        raise reader.error("origin", problem)
    origin_ca = None
    if "origin_ca" in reader.table:
        ca_path, ca_data = reader.read("origin_ca")
        origin_ca = ca_data.decode("utf-8", "replace")
        if problem := origin_ca_problem(origin, origin_ca):
            raise reader.error("origin_ca", f"{ca_path}: {problem}")
    aud = reader.get("aud", str, hashlib.sha256(f"aud:{hostname}".encode()).hexdigest())
    cookie_r = reader.sub("cookie")
    cookie_r.unknown(_COOKIE_FIELDS)
    same_site = cookie_r.get("same_site", str, "None")
    if same_site not in SAME_SITE_VALUES:
        raise cookie_r.error("same_site", f"{same_site!r} is not one of {list(SAME_SITE_VALUES)}")
    attributes = {
        "path": cookie_r.get("path", str, "/"),
        "domain": cookie_r.get("domain", str, None),
    }
    for name, value in attributes.items():
        if value is not None and (problem := cookie_attribute_problem(value)):
            raise cookie_r.error(name, problem)
    cookie = CookieSettings(
        path=attributes["path"],
        domain=attributes["domain"],
        secure=cookie_r.get("secure", bool, True),
        http_only=cookie_r.get("http_only", bool, True),
        same_site=same_site,
    )
    policies_raw = reader.get(
        "policies", list, what="a list of policies ([[applications.policies]])"
    )
    try:
        policies = tuple(
            parse_policy(p, f"{reader.field('policies')}[{i}]") for i, p in enumerate(policies_raw)
        )
    except PolicyError as exc:
        raise ConfigError(reader.path, "", str(exc)) from None
    if not policies:
        raise reader.error("policies", "at least one policy is required")
    alpn = reader.get("alpn", list, list(ALPN_PROTOCOLS), what='a list such as ["h2", "http/1.1"]')
    if problem := alpn_problem(alpn):
        raise reader.error("alpn", problem)
    return Application(
        name=reader.get("name", str, hostname),
        hostname=hostname,
        aud=aud,
        session_duration=reader.duration("session_duration", "24h"),
        policies=policies,
        origin=origin.rstrip("/"),
        forward_client_certificate=reader.get("forward_client_certificate", bool, False),
        bind_token_to_certificate=reader.get("bind_token_to_certificate", bool, True),
        underscores_in_headers=reader.get("underscores_in_headers", bool, False),
        origin_ca=origin_ca,
        cookie=cookie,
        alpn=alpn_tuple(alpn),
    )


def load_config(path: str | Path) -> EnforcerConfig:
    """Read and check an enforcer TOML file; raise :class:`ConfigError` on the first problem."""
    p = Path(path)
    top = read_toml(p, ConfigError)
    top.unknown(
        {
            "server",
            "signing",
            "edge_certificates",
            "roots",
            "applications",
            "revoked",
            "state",
            "admin",
            "managed_ca",
            "validation",
            "identity_providers",
            "service_tokens",
            "accounts",
        }
    )

    s = top.sub("server")
    s.unknown(
        {
            "host",
            "port",
            "access_log",
            "handshake_timeout",
            "request_timeout",
            "max_header_bytes",
            "max_chain_depth",
            "max_connections",
            "idle_timeout",
            "max_requests_per_connection",
            "max_client_certificates",
            "intermediates_memo_bytes",
            "h2_max_concurrent_streams",
            "h2_header_table_size",
            "h2_initial_window_size",
            *H2_FLOOD_LIMITS,
            "metrics_host",
            "metrics_port",
            "readiness_origins",
        }
    )
    port = s.get("port", int, 8443)
    if not 0 <= port <= 65535:
        raise s.error("port", f"{port} is not a TCP port (0-65535)")
    depth = s.get("max_chain_depth", int, DEFAULT_MAX_CHAIN_DEPTH)
    if not 1 <= depth <= 32:
        raise s.error("max_chain_depth", f"{depth} is not between 1 and 32 intermediates")
    header_bytes = s.get("max_header_bytes", int, 16 * 1024)
    if not 1024 <= header_bytes <= 1024 * 1024:
        raise s.error("max_header_bytes", f"{header_bytes} is not between 1024 and 1048576")
    bounded = {
        "max_connections": (1024, 1, 1_000_000),
        "max_requests_per_connection": (1000, 1, 10_000_000),
        "max_client_certificates": (depth + 2, 1, 64),
        "intermediates_memo_bytes": (64 * 1024 * 1024, 0, 1 << 40),
        "h2_max_concurrent_streams": (128, 1, 1024),
        "h2_header_table_size": (4096, 0, 65536),
        "h2_initial_window_size": (65535, 1024, 2**31 - 1),
        **H2_FLOOD_LIMITS,
    }
    limits: dict[str, int] = {}
    for name, (default, low, high) in bounded.items():
        value = s.get(name, int, default)
        if not low <= value <= high:
            raise s.error(name, f"{value} is not between {low} and {high}")
        limits[name] = value
    metrics_port = s.get("metrics_port", int, None)
    if metrics_port is not None and not 0 <= metrics_port <= 65535:
        raise s.error("metrics_port", f"{metrics_port} is not a TCP port (0-65535)")
    server = ServerSettings(
        host=s.get("host", str, "127.0.0.1"),
        metrics_host=s.get("metrics_host", str, "127.0.0.1"),
        metrics_port=metrics_port,
        readiness_origins=s.choice("readiness_origins", READINESS_ORIGINS, "all"),
        port=port,
        access_log=s.get("access_log", str, "-"),
        handshake_timeout=s.duration("handshake_timeout", "10s").total_seconds(),
        request_timeout=s.duration("request_timeout", "30s").total_seconds(),
        max_header_bytes=header_bytes,
        max_chain_depth=depth,
        idle_timeout=s.duration("idle_timeout", "60s").total_seconds(),
        **limits,
    )

    g = top.sub("signing")
    g.unknown({"key_file", "algorithm", "issuer", "grace_period", "no_duration_token_lifetime"})
    algorithm = g.choice("algorithm", ALGORITHMS, DEFAULT_ALGORITHM)
    key_file = g.file("key_file") if "key_file" in g.table else None

    edges = tuple(_edge(r) for r in top.tables("edge_certificates"))
    if not edges:
        raise top.error("edge_certificates", "at least one [[edge_certificates]] is required")
    roots = tuple(_root(r) for r in top.tables("roots"))
    ids = [r.id for r in roots]
    for i, rid in enumerate(ids):
        if rid in ids[:i]:
            raise ConfigError(
                p, f"roots[{i}].id", f"{rid!r} is used twice: give each root its own id"
            )
    apps = tuple(_application(r) for r in top.tables("applications"))
    seen: set[str] = set()
    served = {h for e in edges for h in e.hostnames}
    for i, app in enumerate(apps):
        where = f"applications[{i}].hostname"
        if app.hostname in seen:
            raise ConfigError(p, where, f"{app.hostname} has two applications")
        if app.hostname not in served:
            raise ConfigError(p, where, f"no [[edge_certificates]] serves {app.hostname}")
        seen.add(app.hostname)

    revoked_raw = top.get("revoked", list, [], what="a list of SHA-256 fingerprints")
    revoked_list = [str(r).lower().replace(":", "") for r in revoked_raw]
    for i, fp in enumerate(revoked_list):
        if not re.fullmatch(r"[0-9a-f]{64}", fp):
            raise ConfigError(
                p, f"revoked[{i}]", f"{revoked_raw[i]!r} is not a SHA-256 fingerprint"
            )
    revoked = frozenset(revoked_list)

    st = top.sub("state")
    st.unknown({"path"})
    state_path = st.file("path") if "path" in st.table else default_state_path(p)

    admin = None
    account_id = "demo"
    if "admin" in top.table:
        a = top.sub("admin")
        a.unknown({"host", "port", "token", "token_file", "token_env", "account_id"})
        account_id = _identifier(a, "account_id", "demo")
        admin_port = a.get("port", int, 8444)
        if not 0 <= admin_port <= 65535:
            raise a.error("port", f"{admin_port} is not a TCP port (0-65535)")
        admin = AdminSettings(
            host=a.get("host", str, "127.0.0.1"),
            port=admin_port,
            token=_admin_token(a),
            account_id=account_id,
        )

    if server.metrics_port is not None and admin is None and not is_loopback(server.metrics_host):
        raise s.error(
            "metrics_host",
            f"{server.metrics_host} is not a loopback address: metrics there need the admin "
            "token, so configure [admin] (or keep metrics_host on 127.0.0.1)",
        )

    key_profile = _validation(top.sub("validation"))

    providers = tuple(_identity_provider(r) for r in top.tables("identity_providers"))
    provider_ids = [idp.id for idp in providers]
    for i, pid in enumerate(provider_ids):
        if pid in provider_ids[:i]:
            raise ConfigError(p, f"identity_providers[{i}].id", f"{pid!r} is used twice")
    allowed_idps: dict[str, tuple[str, ...]] = {}
    for i, r in enumerate(top.tables("applications")):
        names = r.get("allowed_idps", list, [], what="a list of [[identity_providers]] ids")
        for name in names:
            if name not in provider_ids:
                raise r.error(
                    "allowed_idps", f"{name!r} is not the id of an [[identity_providers]] table"
                )
        if names:
            allowed_idps[apps[i].hostname] = tuple(dict.fromkeys(names))
    tokens = tuple(_service_token(r, account_id) for r in top.tables("service_tokens"))
    for i, tok in enumerate(tokens):
        if any(t.token.id == tok.token.id for t in tokens[:i]):
            raise ConfigError(p, f"service_tokens[{i}].id", f"{tok.token.id!r} is used twice")
        if any(t.token.client_id == tok.token.client_id for t in tokens[:i]):
            raise ConfigError(p, f"service_tokens[{i}].client_id", "is used twice")

    account_algorithms: dict[str, str] = {}
    for i, r in enumerate(top.tables("accounts")):
        r.unknown({"id", "token_algorithm"})
        aid = _identifier(r, "id", None)
        if aid in account_algorithms:
            raise ConfigError(p, f"accounts[{i}].id", f"{aid!r} is used twice")
        account_algorithms[aid] = r.choice("token_algorithm", ALGORITHMS)

    managed = []
    for r in top.tables("managed_ca"):
        r.unknown({"zone", "hostnames"})
        managed.append(ManagedCA(_identifier(r, "zone", None), r.hostnames("hostnames")))
    return EnforcerConfig(
        path=p,
        server=server,
        edge_certificates=edges,
        roots=roots,
        applications=apps,
        signing_key_file=key_file,
        signing_algorithm=algorithm,
        issuer=g.get("issuer", str, DEFAULT_ISSUER),
        grace_period=g.duration("grace_period", "24h"),
        no_duration_token_lifetime=g.duration("no_duration_token_lifetime", "5s"),
        revoked=revoked,
        state_path=state_path,
        admin=admin,
        managed_cas=tuple(managed),
        account_id=account_id,
        key_profile=key_profile,
        identity_providers=providers,
        service_tokens=tokens,
        allowed_idps=allowed_idps,
        account_algorithms=account_algorithms,
    )


# The admin API's config fields, with the secret and the CA read from files or the environment.
_IDP_FIELDS = set(IDP_CONFIG_FIELDS - {"ca_pem"}) | {
    "id",
    "name",
    "type",
    "client_secret_file",
    "client_secret_env",
    "ca_file",
}


def _identity_provider(r: TableReader) -> IdentityProvider:
    """An ``[[identity_providers]]`` table: an OpenID Connect provider (access-flow I1)."""
    r.unknown(_IDP_FIELDS)
    pid = _identifier(r, "id", None)
    name = r.get("name", str, pid)
    if r.get("type", str, "oidc") != "oidc":
        raise r.error("type", f'{r.table["type"]!r} is not supported; only "oidc" is')
    given = [
        k for k in ("client_secret", "client_secret_file", "client_secret_env") if k in r.table
    ]
    if len(given) != 1:
        raise r.error(
            "client_secret",
            "give exactly one of client_secret, client_secret_file or client_secret_env"
            + (f" (got {given})" if given else ""),
        )
    if "client_secret_file" in r.table:
        path = r.file("client_secret_file")
        if path.exists():
            tighten(path, "identity provider client secret")  # a secret on disk is 0600
        _, data = r.read("client_secret_file")
        secret = data.decode("utf-8", "replace").strip()
    elif "client_secret_env" in r.table:
        env = r.get("client_secret_env", str)
        secret = os.environ.get(env, "")
        if not secret:
            raise r.error("client_secret_env", f"the environment variable {env} is unset or empty")
    else:
        secret = r.get("client_secret", str)
    raw: dict[str, Any] = {
        k: r.table[k] for k in IDP_CONFIG_FIELDS - {"client_secret", "ca_pem"} if k in r.table
    }
    raw["client_secret"] = secret
    if "ca_file" in r.table:
        _, ca = r.read("ca_file")
        raw["ca_pem"] = ca.decode("utf-8", "replace")
    try:
        c = idp_config(raw, None, "")
    except ApiError as exc:
        field, _, problem = exc.message.partition(": ")
        field = field.lstrip(".")
        raise r.error("ca_file" if field == "ca_pem" else field, problem) from None
    return identity_provider_of({"id": pid, "name": name, "type": "oidc", "config": c})


def _service_token(r: TableReader, account: str) -> ConfiguredServiceToken:
    """A ``[[service_tokens]]`` table: client id, the secret's SHA-256 and the expiry (I11)."""
    r.unknown({"id", "name", "client_id", "client_secret_sha256", "expires", "duration"})
    client_id = r.get("client_id", str, what="32 hex characters and .access")
    if not CLIENT_ID_PATTERN.fullmatch(client_id):
        raise r.error(
            "client_id", f"{client_id!r} is not 32 lowercase hex characters followed by .access"
        )
    digest = r.get("client_secret_sha256", str, what="the hex SHA-256 of the client secret")
    digest = digest.lower().replace(":", "")
    if not SECRET_SHA256_PATTERN.fullmatch(digest):
        raise r.error(
            "client_secret_sha256",
            "expected 64 hex characters: the SHA-256 of the secret, as "
            "`printf %s SECRET | sha256sum` prints it (never the secret itself)",
        )
    raw_expires = r.get("expires", (str, dt.datetime), what="a time such as 2027-01-01T00:00:00Z")
    try:
        expires = (
            raw_expires
            if isinstance(raw_expires, dt.datetime)
            else dt.datetime.fromisoformat(raw_expires.replace("Z", "+00:00"))
        )
    except ValueError:
        raise r.error("expires", f"{raw_expires!r} is not an ISO-8601 time") from None
    if expires.tzinfo is None:
        raise r.error("expires", f"{raw_expires!r} has no time zone; add Z or an offset")
    duration = r.duration("duration", format_duration(DEFAULT_DURATION))
    if duration <= dt.timedelta(0):
        raise r.error("duration", "a service token needs a duration above zero (e.g. 8760h)")
    token_id = _identifier(r, "id", client_id.removesuffix(".access"))
    return ConfiguredServiceToken(
        ServiceToken(
            id=token_id,
            name=r.get("name", str, token_id),
            client_id=client_id,
            secret_sha256=digest,
            expires_at=expires.astimezone(dt.UTC),
            account=account,
        ),
        duration,
    )


def _validation(v: TableReader) -> KeyProfile:
    """The ``[validation]`` table: the key and signature profile of client chains."""
    v.unknown({"min_rsa_bits", "ec_curves"})
    bits = v.get("min_rsa_bits", int, DEFAULT_KEY_PROFILE.min_rsa_bits)
    curves = v.get("ec_curves", list, sorted(DEFAULT_KEY_PROFILE.ec_curves))
    valid = sorted(EC_CURVE_NAMES.values())
    for curve in curves:
        if curve not in valid:
            raise v.error("ec_curves", f"{curve!r} is not one of {valid}")
    if not curves:
        raise v.error("ec_curves", f"the list is empty: give at least one of {valid}")
    try:
        return KeyProfile(min_rsa_bits=bits, ec_curves=frozenset(curves))
    except ValueError as exc:
        field, _, problem = str(exc).partition(": ")
        raise v.error(field, problem) from None


def _identifier(r: TableReader, name: str, default: str | None) -> str:
    """An account or zone id: the characters the admin API's paths accept."""
    value = r.get(name, str, ... if default is None else default, what="an id such as demo")
    if not re.fullmatch(r"[A-Za-z0-9._:-]+", value):
        raise r.error(name, f"{value!r}: use letters, digits and . _ : - only")
    return str(value)


def is_loopback(host: str) -> bool:
    """True for a loopback address or ``localhost``."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _admin_token(a: TableReader) -> str:
    """The admin bearer token: ``token``, else ``token_file``, else the ``token_env`` variable."""
    token: str
    if "token" in a.table:
        token = a.get("token", str)
    elif "token_file" in a.table:
        _, data = a.read("token_file")
        token = data.decode("utf-8", "replace").strip()
    else:
        env = a.get("token_env", str, "TESTBED_ADMIN_TOKEN")
        token = os.environ.get(str(env), "")
        if not token:
            raise a.error(
                "token", f"no token: set token, token_file, or the {env} environment variable"
            )
    if len(token) < 16:
        raise a.error("token", "the admin token must be at least 16 characters")
    return token
