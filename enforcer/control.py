"""The control plane's operations: validate an admin request, say what changes, and build snapshots.

Each operation is a pure function of the current objects (see :mod:`enforcer.store`), the
request body and ``now``: it checks everything first and returns an :class:`Outcome` with the
result to send and the :class:`Change` list to commit, or raises :class:`ApiError` and changes
nothing. :func:`build_snapshot` turns the objects into the immutable :class:`Snapshot` that
requests read (SPEC A12).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import secrets
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from enforcer import managed_ca
from enforcer.application import (
    SAME_SITE_VALUES,
    Application,
    CookieSettings,
    cookie_attribute_problem,
    origin_problem,
)
from enforcer.chain import (
    DEFAULT_KEY_PROFILE,
    DEFAULT_MAX_CHAIN_DEPTH,
    AnchorError,
    KeyProfile,
    fingerprint,
    split_anchor,
)
from enforcer.durations import DurationError, format_duration, parse_duration
from enforcer.policy import Decision, PolicyError, parse_policy
from enforcer.snapshot import RootCertificate, Snapshot
from enforcer.store import Change, Objects
from enforcer.tokens import KeyRing, RetiredKey, SigningKey

Body = Mapping[str, Any]
HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)
MAX_CLIENT_VALIDITY_DAYS = managed_ca.MAX_VALIDITY_DAYS


class ApiError(Exception):
    """A refused admin request: an HTTP status and a message that says what to fix."""

    def __init__(self, status: int, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or {400: 10400, 401: 10000, 404: 10404, 405: 10405, 409: 10409}.get(
            status, 10500
        )


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What an operation returns: the result for the client and the changes to commit."""

    result: Any
    changes: tuple[Change, ...] = ()
    status: int = 200


@dataclasses.dataclass(frozen=True)
class Limits:
    """What operations must know about the server that the objects do not say."""

    served_hostnames: frozenset[str]
    issuer: str
    grace_period: dt.timedelta
    no_duration_token_lifetime: dt.timedelta
    max_chain_depth: int = DEFAULT_MAX_CHAIN_DEPTH
    key_profile: KeyProfile = DEFAULT_KEY_PROFILE


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


# ---- body checks --------------------------------------------------------------------------


def _field(
    body: Body, name: str, kind: type | tuple[type, ...], what: str, default: Any = ...
) -> Any:
    if name not in body:
        if default is ...:
            raise ApiError(400, f"{name}: required field is missing ({what})")
        return default
    value = body[name]
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise ApiError(400, f"{name}: expected {what}, got {value!r}")
    return value


def _only(body: Body, allowed: set[str]) -> None:
    if not isinstance(body, Mapping):
        raise ApiError(400, "the request body must be a JSON object")
    extra = sorted(set(body) - allowed)
    if extra:
        raise ApiError(400, f"{extra[0]}: unknown field; expected one of {sorted(allowed)}")


def _hostnames(body: Body, name: str, default: Any = ...) -> list[str]:
    raw = _field(body, name, list, "a list of hostnames", default)
    out = []
    for h in raw:
        if not isinstance(h, str) or not HOSTNAME.match(h.lower().rstrip(".")):
            raise ApiError(400, f"{name}: {h!r} is not a fully qualified hostname")
        out.append(h.lower().rstrip("."))
    return sorted(set(out))


def _duration(body: Body, name: str, default: str | None) -> str | None:
    raw = _field(body, name, str, "a Go duration such as 0s, 15m or 24h", default)
    if raw is None:
        return None
    try:
        return format_duration(parse_duration(raw))
    except DurationError as exc:
        raise ApiError(400, f"{name}: {exc}") from None


def _pem_chain(text: str) -> tuple[x509.Certificate, tuple[x509.Certificate, ...]]:
    """Split an uploaded PEM into its trust anchor (the last certificate) and intermediates."""
    try:
        certs = x509.load_pem_x509_certificates(text.encode())
    except ValueError as exc:
        raise ApiError(400, f"certificate: not PEM certificates: {exc}") from None
    try:
        return split_anchor(certs)
    except AnchorError as exc:
        raise ApiError(400, f"certificate: {exc}") from None


# ---- the account's mTLS switch ------------------------------------------------------------


def _account(objects: Objects, account: str) -> dict[str, Any]:
    return dict(objects.get("account", {}).get(account, {"id": account, "mtls_enabled": False}))


def get_mtls(objects: Objects, account: str) -> Outcome:
    """Return the account's mTLS switch."""
    acc = _account(objects, account)
    return Outcome({"account_id": account, "enabled": acc["mtls_enabled"]})


def set_mtls(objects: Objects, account: str, body: Body, now: dt.datetime) -> Outcome:
    """Enable mTLS for the account; refuse to disable it once enabled (IBM CIS)."""
    _only(body, {"enabled"})
    enabled = _field(body, "enabled", bool, "true")
    acc = _account(objects, account)
    if not enabled:
        raise ApiError(
            400,
            "enabled: mTLS cannot be disabled once it has been enabled; remove the "
            "applications' certificate policies instead",
        )
    acc.update(mtls_enabled=True, enabled_at=acc.get("enabled_at") or _iso(now))
    return Outcome({"account_id": account, "enabled": True}, (Change("account", account, acc),))


# ---- mTLS (root) certificates -----------------------------------------------------------------


def _root_view(obj: Mapping[str, Any], full: bool = False) -> dict[str, Any]:
    keys = [
        "id",
        "name",
        "fingerprint",
        "expires_on",
        "associated_hostnames",
        "created_at",
        "updated_at",
    ]
    view = {k: obj[k] for k in keys}
    if full:
        view["certificate"] = obj["certificate"]
    return view


def _owned(objects: Objects, kind: str, account: str, oid: str, what: str) -> dict[str, Any]:
    obj = objects.get(kind, {}).get(oid)
    if obj is None or obj.get("account") != account:
        raise ApiError(404, f"{what} {oid!r} not found in account {account!r}")
    return dict(obj)


def list_roots(objects: Objects, account: str) -> Outcome:
    """List the account's mTLS certificates."""
    rows = [o for o in objects.get("root", {}).values() if o["account"] == account]
    return Outcome([_root_view(o) for o in sorted(rows, key=lambda o: o["created_at"])])


def get_root(objects: Objects, account: str, oid: str) -> Outcome:
    """Return one mTLS certificate, with its PEM."""
    return Outcome(_root_view(_owned(objects, "root", account, oid, "mTLS certificate"), full=True))


def create_root(objects: Objects, account: str, body: Body, now: dt.datetime) -> Outcome:
    """Upload a root (optionally after its intermediates) with its associated hostnames."""
    _only(body, {"name", "certificate", "associated_hostnames"})
    name = _field(body, "name", str, "a name for the certificate")
    pem = _field(
        body, "certificate", str, "PEM text: intermediates (optional), then the trust anchor"
    )
    hostnames = _hostnames(body, "associated_hostnames", [])
    root, _ = _pem_chain(pem)
    if not _account(objects, account)["mtls_enabled"]:
        raise ApiError(
            409,
            f"mTLS is not enabled for account {account!r}: enable it first (PUT .../access/mtls)",
        )
    fp = fingerprint(root)
    if any(
        o["fingerprint"] == fp and o["account"] == account for o in objects.get("root", {}).values()
    ):
        raise ApiError(409, f"certificate: this root ({fp}) is already uploaded")
    oid = str(uuid.uuid4())
    obj = {
        "id": oid,
        "account": account,
        "name": name,
        "certificate": pem,
        "associated_hostnames": hostnames,
        "fingerprint": fp,
        "expires_on": _iso(root.not_valid_after_utc),
        "created_at": _iso(now),
        "updated_at": _iso(now),
    }
    return Outcome(_root_view(obj, full=True), (Change("root", oid, obj),), 201)


def update_root(objects: Objects, account: str, oid: str, body: Body, now: dt.datetime) -> Outcome:
    """Change an mTLS certificate's name or associated hostnames."""
    _only(body, {"name", "associated_hostnames"})
    obj = _owned(objects, "root", account, oid, "mTLS certificate")
    if "name" in body:
        obj["name"] = _field(body, "name", str, "a name")
    if "associated_hostnames" in body:
        obj["associated_hostnames"] = _hostnames(body, "associated_hostnames")
    obj["updated_at"] = _iso(now)
    return Outcome(_root_view(obj, full=True), (Change("root", oid, obj),))


def delete_root(objects: Objects, account: str, oid: str) -> Outcome:
    """Delete an mTLS certificate; refused while hostnames are associated with it."""
    obj = _owned(objects, "root", account, oid, "mTLS certificate")
    if obj["associated_hostnames"]:
        raise ApiError(
            409,
            f"mTLS certificate {oid} still has associated hostnames "
            f"{obj['associated_hostnames']}: remove them first (update associated_hostnames to [])",
        )
    return Outcome({"id": oid}, (Change("root", oid, None),))


# ---- applications and policies --------------------------------------------------------------


_POLICY_FIELDS = {
    "name",
    "decision",
    "include",
    "require",
    "exclude",
    "session_duration",
    "precedence",
}


def _policy(body: Body, where: str, oid: str, precedence: int) -> dict[str, Any]:
    _only(body, _POLICY_FIELDS | {"id"})
    core = {k: v for k, v in body.items() if k in _POLICY_FIELDS - {"precedence"}}
    core.setdefault("decision", Decision.NON_IDENTITY.value)
    try:
        parse_policy(core, where)
    except PolicyError as exc:
        raise ApiError(400, str(exc)) from None
    prec = _field(body, "precedence", int, "an integer", precedence)
    return {"id": oid, "precedence": prec, "include": [], "require": [], "exclude": [], **core}


_APP_FIELDS = {
    "name",
    "domain",
    "hostname",
    "session_duration",
    "origin",
    "aud",
    "forward_client_certificate",
    "bind_token_to_certificate",
    "underscores_in_headers",
    "cookie",
    "policies",
    "type",
}


def _app_fields(
    body: Body, obj: dict[str, Any], limits: Limits, objects: Objects, creating: bool
) -> None:
    _only(body, _APP_FIELDS)
    if "domain" in body or "hostname" in body or creating:
        key = "domain" if "domain" in body else "hostname"
        host = _field(body, key, str, "the application's hostname").lower().rstrip(".")
        if not HOSTNAME.match(host):
            raise ApiError(400, f"{key}: {host!r} is not a fully qualified hostname")
        if host not in limits.served_hostnames:
            raise ApiError(
                400,
                f"{key}: no edge certificate serves {host}; the enforcer serves "
                f"{sorted(limits.served_hostnames)} (edge certificates come from the config file)",
            )
        clash = [
            a
            for a in objects.get("app", {}).values()
            if a["domain"] == host and a["id"] != obj.get("id")
        ]
        if clash:
            raise ApiError(409, f"{key}: application {clash[0]['id']} already protects {host}")
        obj["domain"] = host
    if "name" in body or creating:
        obj["name"] = _field(body, "name", str, "a name", obj.get("domain"))
    if "session_duration" in body or creating:
        obj["session_duration"] = _duration(body, "session_duration", "24h")
    if "origin" in body or creating:
        origin = _field(body, "origin", str, "the origin URL, such as http://127.0.0.1:9000")
        problem = origin_problem(origin)
        if problem:
            raise ApiError(400, f"origin: {problem}")
        obj["origin"] = origin.rstrip("/")
    for flag, default in (
        ("forward_client_certificate", False),
        ("bind_token_to_certificate", True),  # SPEC A10, on unless the operator opts out
        ("underscores_in_headers", False),
    ):
        if flag in body or creating:
            obj[flag] = _field(body, flag, bool, "true or false", default)
    if "cookie" in body or creating:
        cookie = _field(body, "cookie", dict, "a cookie settings object", {})
        _only(cookie, {"path", "domain", "secure", "http_only", "same_site"})
        same_site = _field(cookie, "same_site", str, "None, Lax or Strict", "None")
        if same_site not in SAME_SITE_VALUES:
            raise ApiError(
                400, f"cookie.same_site: {same_site!r} is not one of {list(SAME_SITE_VALUES)}"
            )
        attributes = {
            "path": _field(cookie, "path", str, "a path", "/"),
            "domain": _field(cookie, "domain", str, "a domain", None),
        }
        for name, value in attributes.items():
            if value is not None and (problem := cookie_attribute_problem(value)):
                raise ApiError(400, f"cookie.{name}: {problem}")
        obj["cookie"] = {
            **attributes,
            "secure": _field(cookie, "secure", bool, "true or false", True),
            "http_only": _field(cookie, "http_only", bool, "true or false", True),
            "same_site": same_site,
        }


def _app_view(obj: Mapping[str, Any]) -> dict[str, Any]:
    view = dict(obj)
    view.pop("account", None)
    view["hostname"] = obj["domain"]
    view["type"] = "self_hosted"
    view["policies"] = sorted(obj["policies"], key=lambda p: p["precedence"])
    return view


def list_apps(objects: Objects, account: str) -> Outcome:
    """List the account's applications."""
    rows = [o for o in objects.get("app", {}).values() if o["account"] == account]
    return Outcome([_app_view(o) for o in sorted(rows, key=lambda o: o["created_at"])])


def get_app(objects: Objects, account: str, oid: str) -> Outcome:
    """Return one application with its policies."""
    return Outcome(_app_view(_owned(objects, "app", account, oid, "application")))


def create_app(
    objects: Objects, account: str, body: Body, limits: Limits, now: dt.datetime
) -> Outcome:
    """Create an application (and, optionally, its policies)."""
    oid = str(uuid.uuid4())
    obj: dict[str, Any] = {"id": oid, "account": account, "created_at": _iso(now)}
    _app_fields(body, obj, limits, objects, creating=True)
    aud = _field(body, "aud", str, "64 hex characters", secrets.token_hex(32))
    if not re.fullmatch(r"[0-9a-f]{64}", aud):
        raise ApiError(400, f"aud: expected 64 lowercase hex characters, got {aud!r}")
    obj["aud"] = aud
    raw_policies = _field(body, "policies", list, "a list of policies", [])
    obj["policies"] = [
        _policy(p, f"policies[{i}]", str(uuid.uuid4()), i + 1) for i, p in enumerate(raw_policies)
    ]
    obj["updated_at"] = _iso(now)
    return Outcome(_app_view(obj), (Change("app", oid, obj),), 201)


def update_app(
    objects: Objects, account: str, oid: str, body: Body, limits: Limits, now: dt.datetime
) -> Outcome:
    """Change an application's settings (its aud never changes)."""
    _only(body, _APP_FIELDS)
    obj = _owned(objects, "app", account, oid, "application")
    if "aud" in body and body["aud"] != obj["aud"]:
        raise ApiError(400, "aud: an application's aud is fixed for its life")
    _app_fields({k: v for k, v in body.items() if k != "aud"}, obj, limits, objects, creating=False)
    if "policies" in body:
        raw = _field(body, "policies", list, "a list of policies")
        for i, p in enumerate(raw):
            if not isinstance(p, Mapping):
                raise ApiError(400, f"policies[{i}]: expected a policy object, got {p!r}")
        obj["policies"] = [
            _policy(p, f"policies[{i}]", str(p.get("id") or uuid.uuid4()), i + 1)
            for i, p in enumerate(raw)
        ]
    obj["updated_at"] = _iso(now)
    return Outcome(_app_view(obj), (Change("app", oid, obj),))


def delete_app(objects: Objects, account: str, oid: str) -> Outcome:
    """Delete an application (and the record of its ended sessions)."""
    _owned(objects, "app", account, oid, "application")
    changes = [Change("app", oid, None)]
    if f"app:{oid}" in objects.get(SESSION_REVOCATION, {}):
        changes.append(Change(SESSION_REVOCATION, f"app:{oid}", None))
    return Outcome({"id": oid}, tuple(changes))


# ---- ending sessions --------------------------------------------------------------------------

# Stored objects of this kind say "tokens minted before ``before`` no longer admit", one per
# application (id ``app:<app id>``) and one per account (id ``account:<account>``).
SESSION_REVOCATION = "session_revocation"


def _iso_precise(t: dt.datetime) -> str:
    # Microseconds kept: truncating to the second would let a token minted in the same second,
    # before the revocation, through (see snapshot.session_cutoff).
    return t.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _revoke_before(
    objects: Objects, key: str, scope: dict[str, Any], before: dt.datetime, now: dt.datetime
) -> tuple[dict[str, Any], tuple[Change, ...]]:
    old = objects.get(SESSION_REVOCATION, {}).get(key)
    if old is not None and _parse_iso(old["before"]) >= before:
        return dict(old), ()  # an earlier revocation already covers these tokens: only forward
    obj = {"id": key, **scope, "before": _iso_precise(before), "revoked_at": _iso_precise(now)}
    return obj, (Change(SESSION_REVOCATION, key, obj),)


def revoke_app_sessions(objects: Objects, account: str, app_id: str, now: dt.datetime) -> Outcome:
    """End every session of an application: tokens minted before ``now`` stop admitting."""
    _owned(objects, "app", account, app_id, "application")
    obj, changes = _revoke_before(
        objects, f"app:{app_id}", {"account": account, "app_id": app_id}, now, now
    )
    return Outcome({"app_id": app_id, "before": obj["before"]}, changes)


def revoke_account_sessions(
    objects: Objects, account: str, body: Body, now: dt.datetime
) -> Outcome:
    """End every session of the account's applications minted before ``before`` (default now)."""
    _only(body, {"before"})
    raw = _field(
        body, "before", str, "an ISO-8601 time with a zone, such as 2026-06-01T12:00:00Z", None
    )
    before = now
    if raw is not None:
        try:
            before = _parse_iso(raw)
        except ValueError:
            raise ApiError(
                400, f"before: {raw!r} is not an ISO-8601 time (such as 2026-06-01T12:00:00Z)"
            ) from None
        if before.tzinfo is None:
            raise ApiError(
                400, f"before: {raw!r} has no time zone; add Z or an offset such as +02:00"
            )
        if before > now:
            raise ApiError(
                400,
                f"before: {raw!r} is in the future (now is {_iso(now)}); it would refuse the "
                "tokens minted until then too: send a time up to now, or omit it for now",
            )
    obj, changes = _revoke_before(objects, f"account:{account}", {"account": account}, before, now)
    return Outcome({"account_id": account, "before": obj["before"]}, changes)


def _sessions_revoked_before(objects: Objects) -> dict[str, dt.datetime]:
    """Each application's hostname -> the latest of its own and its account's revocations."""
    revocations = objects.get(SESSION_REVOCATION, {})
    out = {}
    for app in objects.get("app", {}).values():
        times = [
            _parse_iso(r["before"])
            for r in (
                revocations.get(f"app:{app['id']}"),
                revocations.get(f"account:{app['account']}"),
            )
            if r is not None
        ]
        if times:
            out[app["domain"]] = max(times)
    return out


def _find_policy(app: Mapping[str, Any], pid: str) -> dict[str, Any]:
    for p in app["policies"]:
        if p["id"] == pid:
            return dict(p)
    raise ApiError(404, f"policy {pid!r} not found in application {app['id']}")


def list_policies(objects: Objects, account: str, app_id: str) -> Outcome:
    """List an application's policies in precedence order."""
    return Outcome(_app_view(_owned(objects, "app", account, app_id, "application"))["policies"])


def get_policy(objects: Objects, account: str, app_id: str, pid: str) -> Outcome:
    """Return one policy."""
    return Outcome(_find_policy(_owned(objects, "app", account, app_id, "application"), pid))


def create_policy(
    objects: Objects, account: str, app_id: str, body: Body, now: dt.datetime
) -> Outcome:
    """Add a policy to an application (last, unless ``precedence`` says otherwise)."""
    app = _owned(objects, "app", account, app_id, "application")
    last = max((p["precedence"] for p in app["policies"]), default=0)
    policy = _policy(body, "policy", str(uuid.uuid4()), last + 1)
    app["policies"] = [*app["policies"], policy]
    app["updated_at"] = _iso(now)
    return Outcome(policy, (Change("app", app_id, app),), 201)


def update_policy(
    objects: Objects, account: str, app_id: str, pid: str, body: Body, now: dt.datetime
) -> Outcome:
    """Replace a policy's fields."""
    app = _owned(objects, "app", account, app_id, "application")
    old = _find_policy(app, pid)
    _only(body, _POLICY_FIELDS | {"id"})
    merged = {k: v for k, v in {**old, **body}.items() if k in _POLICY_FIELDS}
    policy = _policy(merged, "policy", pid, old["precedence"])
    app["policies"] = [policy if p["id"] == pid else p for p in app["policies"]]
    app["updated_at"] = _iso(now)
    return Outcome(policy, (Change("app", app_id, app),))


def delete_policy(
    objects: Objects, account: str, app_id: str, pid: str, now: dt.datetime
) -> Outcome:
    """Remove a policy from an application."""
    app = _owned(objects, "app", account, app_id, "application")
    _find_policy(app, pid)
    app["policies"] = [p for p in app["policies"] if p["id"] != pid]
    app["updated_at"] = _iso(now)
    return Outcome({"id": pid}, (Change("app", app_id, app),))


# ---- the managed CA per zone ------------------------------------------------------------------


def _zone_ca(objects: Objects, zone: str, now: dt.datetime) -> tuple[dict[str, Any], list[Change]]:
    ca = objects.get("zone_ca", {}).get(zone)
    if ca is not None:
        return dict(ca), []
    cert_pem, key_pem = managed_ca.create_ca(zone, now)
    ca = {
        "zone": zone,
        "certificate": cert_pem,
        "private_key": key_pem,
        "hostnames": [],
        "created_at": _iso(now),
    }
    return ca, [Change("zone_ca", zone, ca)]


def get_ca(objects: Objects, zone: str) -> Outcome:
    """Return the zone's managed CA certificate (PEM) and its hostnames."""
    ca = objects.get("zone_ca", {}).get(zone)
    if ca is None:
        raise ApiError(
            404, f"zone {zone!r} has no managed CA yet: issue a certificate or set its hostnames"
        )
    return Outcome({"certificate": ca["certificate"], "hostnames": ca["hostnames"], "id": zone})


def set_ca_hostnames(objects: Objects, zone: str, body: Body, now: dt.datetime) -> Outcome:
    """Set the hostnames on which the zone's managed CA is trusted (creating the CA if needed)."""
    _only(body, {"hostnames"})
    hostnames = _hostnames(body, "hostnames")
    ca, _ = _zone_ca(objects, zone, now)
    ca["hostnames"] = hostnames
    return Outcome({"hostnames": hostnames}, (Change("zone_ca", zone, ca),))


def _cert_view(obj: Mapping[str, Any]) -> dict[str, Any]:
    view = dict(obj)
    view.pop("zone", None)
    return view


def list_client_certs(objects: Objects, zone: str, status: str | None = None) -> Outcome:
    """List the zone's client certificates, optionally only those with ``status``."""
    rows = [o for o in objects.get("client_cert", {}).values() if o["zone"] == zone]
    if status:
        rows = [o for o in rows if o["status"] == status]
    return Outcome([_cert_view(o) for o in sorted(rows, key=lambda o: o["issued_on"])])


def _client_cert(objects: Objects, zone: str, oid: str) -> dict[str, Any]:
    obj = objects.get("client_cert", {}).get(oid)
    if obj is None or obj["zone"] != zone:
        raise ApiError(404, f"client certificate {oid!r} not found in zone {zone!r}")
    return dict(obj)


def get_client_cert(objects: Objects, zone: str, oid: str) -> Outcome:
    """Return one client certificate."""
    return Outcome(_cert_view(_client_cert(objects, zone, oid)))


def create_client_cert(objects: Objects, zone: str, body: Body, now: dt.datetime) -> Outcome:
    """Issue a client certificate from a CSR with the zone's managed CA."""
    _only(body, {"csr", "validity_days"})
    csr_pem = _field(body, "csr", str, "a PEM certificate signing request")
    days = _field(
        body,
        "validity_days",
        int,
        f"days, 1 to {MAX_CLIENT_VALIDITY_DAYS}",
        MAX_CLIENT_VALIDITY_DAYS,
    )
    if not 1 <= days <= MAX_CLIENT_VALIDITY_DAYS:
        raise ApiError(
            400, f"validity_days: {days} is not between 1 and {MAX_CLIENT_VALIDITY_DAYS}"
        )
    try:
        csr = managed_ca.parse_csr(csr_pem)
    except managed_ca.CSRError as exc:
        raise ApiError(400, f"csr: {exc}") from None
    ca, changes = _zone_ca(objects, zone, now)
    cert = managed_ca.issue(ca["certificate"], ca["private_key"], csr, days, now)
    oid = str(uuid.uuid4())
    cn = csr.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
    obj = {
        "id": oid,
        "zone": zone,
        "certificate": cert.public_bytes(serialization.Encoding.PEM).decode(),
        "csr": csr_pem,
        "common_name": cn if isinstance(cn, str) else cn.decode(),
        "serial_number": format(cert.serial_number, "x"),
        "fingerprint_sha256": fingerprint(cert),
        "status": "active",
        "validity_days": days,
        "issued_on": _iso(cert.not_valid_before_utc),
        "expires_on": _iso(cert.not_valid_after_utc),
        "revoked_at": None,
        "certificate_authority": {"id": zone, "name": f"Managed CA for zone {zone}"},
    }
    return Outcome(_cert_view(obj), (*changes, Change("client_cert", oid, obj)), 201)


def revoke_client_cert(objects: Objects, zone: str, oid: str, now: dt.datetime) -> Outcome:
    """Revoke a client certificate: it stops admitting requests at once."""
    obj = _client_cert(objects, zone, oid)
    if obj["status"] != "revoked":
        obj.update(status="revoked", revoked_at=_iso(now))
    return Outcome(_cert_view(obj), (Change("client_cert", oid, obj),))


def reactivate_client_cert(objects: Objects, zone: str, oid: str, body: Body) -> Outcome:
    """Reactivate a revoked client certificate."""
    _only(body, {"reactivate"})
    if body.get("reactivate", True) is not True:
        raise ApiError(400, "reactivate: send true (or no body) to reactivate the certificate")
    obj = _client_cert(objects, zone, oid)
    obj.update(status="active", revoked_at=None)
    return Outcome(_cert_view(obj), (Change("client_cert", oid, obj),))


def zone_crl(objects: Objects, zone: str, now: dt.datetime) -> bytes:
    """Return the zone's CRL as PEM."""
    ca = objects.get("zone_ca", {}).get(zone)
    if ca is None:
        raise ApiError(404, f"zone {zone!r} has no managed CA yet")
    revoked = [
        (int(o["serial_number"], 16), _parse_iso(o["revoked_at"]))
        for o in objects.get("client_cert", {}).values()
        if o["zone"] == zone and o["status"] == "revoked"
    ]
    crl = managed_ca.crl(ca["certificate"], ca["private_key"], revoked, now)
    return crl.public_bytes(serialization.Encoding.PEM)


# ---- signing keys -----------------------------------------------------------------------------


def new_signing_key_object(key: rsa.RSAPrivateKey, now: dt.datetime) -> dict[str, Any]:
    """Describe a signing key as a stored object (it becomes the current key)."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    kid = SigningKey.from_private_key(key, now).kid
    return {"kid": kid, "private_key": pem, "created_at": _iso(now), "accepted_until": None}


def get_keys(objects: Objects, limits: Limits, now: dt.datetime) -> Outcome:
    """Describe the signing keys: the current one and those in their grace period."""
    keys = sorted(objects.get("signing_key", {}).values(), key=lambda k: k["created_at"])
    current = [k for k in keys if k["accepted_until"] is None]
    return Outcome(
        {
            "current_kid": current[-1]["kid"] if current else None,
            "last_key_rotation_at": current[-1]["created_at"] if current else None,
            "grace_period": format_duration(limits.grace_period),
            "keys": [
                {
                    "kid": k["kid"],
                    "created_at": k["created_at"],
                    "accepted_until": k["accepted_until"],
                }
                for k in keys
                if k["accepted_until"] is None or _parse_iso(k["accepted_until"]) >= now
            ],
        }
    )


def rotate_keys(objects: Objects, limits: Limits, now: dt.datetime) -> Outcome:
    """Make a new current signing key; the previous one stays accepted for the grace period."""
    changes = []
    for k in objects.get("signing_key", {}).values():
        if k["accepted_until"] is None:
            changes.append(
                Change(
                    "signing_key",
                    k["kid"],
                    {**k, "accepted_until": _iso(now + limits.grace_period)},
                )
            )
        elif _parse_iso(k["accepted_until"]) < now:
            changes.append(Change("signing_key", k["kid"], None))  # past its grace period
    new = new_signing_key_object(
        rsa.generate_private_key(public_exponent=65537, key_size=2048), now
    )
    changes.append(Change("signing_key", new["kid"], new))
    return Outcome({"kid": new["kid"], "created_at": new["created_at"]}, tuple(changes))


# ---- snapshots --------------------------------------------------------------------------------


def apply_changes(objects: Objects, changes: Sequence[Change]) -> Objects:
    """Return new objects with ``changes`` applied (the input is not modified)."""
    out = dict(objects)
    for change in changes:
        kind = dict(out.get(change.kind, {}))
        if change.body is None:
            kind.pop(change.id, None)
        else:
            kind[change.id] = dict(change.body)
        out[change.kind] = kind
    return out


_PARSED: dict[str, Any] = {}


def _parse_cached(pem: str, parse: Callable[[str], Any]) -> Any:
    # Snapshots are rebuilt on every change; parsing the same PEM again each time is waste.
    if pem not in _PARSED:
        if len(_PARSED) > 10000:
            _PARSED.clear()
        _PARSED[pem] = parse(pem)
    return _PARSED[pem]


def _signing_key(obj: Mapping[str, Any], now: dt.datetime) -> SigningKey:
    def load(pem: str) -> SigningKey:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        return SigningKey.from_private_key(key, _parse_iso(obj["created_at"]))

    return _parse_cached(obj["private_key"], load)  # type: ignore[no-any-return]


def build_snapshot(objects: Objects, generation: int, limits: Limits, now: dt.datetime) -> Snapshot:
    """Build the request-time snapshot from the stored objects."""
    roots = []
    for obj in objects.get("root", {}).values():
        root, inters = _parse_cached(obj["certificate"], lambda pem: _pem_chain(pem))
        roots.append(
            RootCertificate(
                obj["id"], obj["name"], root, tuple(inters), tuple(obj["associated_hostnames"])
            )
        )
    for zone, ca in objects.get("zone_ca", {}).items():
        cert = _parse_cached(
            ca["certificate"], lambda pem: x509.load_pem_x509_certificate(pem.encode())
        )
        roots.append(
            RootCertificate(
                f"managed-ca:{zone}",
                f"Managed CA for zone {zone}",
                cert,
                (),
                tuple(ca["hostnames"]),
            )
        )
    apps = []
    for obj in objects.get("app", {}).values():
        policies = tuple(
            parse_policy(
                {k: v for k, v in p.items() if k in _POLICY_FIELDS - {"precedence"}},
                f"app {obj['id']}",
            )
            for p in sorted(obj["policies"], key=lambda p: p["precedence"])
        )
        cookie = obj.get("cookie") or {}
        apps.append(
            Application(
                name=obj["name"],
                hostname=obj["domain"],
                aud=obj["aud"],
                session_duration=parse_duration(obj["session_duration"]),
                policies=policies,
                origin=obj["origin"],
                forward_client_certificate=obj.get("forward_client_certificate", False),
                bind_token_to_certificate=obj.get("bind_token_to_certificate", True),
                underscores_in_headers=obj.get("underscores_in_headers", False),
                cookie=CookieSettings(**cookie),
            )
        )
    keys = sorted(objects.get("signing_key", {}).values(), key=lambda k: k["created_at"])
    current = [k for k in keys if k["accepted_until"] is None]
    if not current:
        raise ValueError("the state has no current signing key")
    ring = KeyRing(
        _signing_key(current[-1], now),
        tuple(
            RetiredKey(_signing_key(k, now), _parse_iso(k["accepted_until"]))
            for k in reversed(keys)
            if k["accepted_until"] is not None
        ),
        limits.grace_period,
    )
    revoked = {
        o["fingerprint_sha256"]
        for o in objects.get("client_cert", {}).values()
        if o["status"] == "revoked"
    }
    revoked |= set(objects.get("revocation", {}))
    return Snapshot.build(
        generation=generation,
        applications=apps,
        roots=roots,
        keyring=ring,
        issuer=limits.issuer,
        no_duration_token_lifetime=limits.no_duration_token_lifetime,
        revoked=frozenset(revoked),
        max_chain_depth=limits.max_chain_depth,
        key_profile=limits.key_profile,
        sessions_revoked_before=_sessions_revoked_before(objects),
    )
