"""The control plane's operations: validate an admin request, say what changes, and build snapshots.

Each operation is a pure function of the current objects (see :mod:`enforcer.store`), the
request body and ``now``: it checks everything first and returns an :class:`Outcome` with the
result to send and the :class:`Change` list to commit, or raises :class:`ApiError` and changes
nothing. :func:`build_snapshot` turns the objects into the immutable :class:`Snapshot` that
requests read (access-flow A12).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import hashlib
import re
import secrets
import ssl
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from enforcer import crl, managed_ca, service_tokens, tokens
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
    AnchorError,
    KeyProfile,
    fingerprint,
    split_anchor,
)
from enforcer.durations import DurationError, format_duration, parse_duration
from enforcer.identity import IdentityProvider
from enforcer.policy import Decision, PolicyError, parse_policy
from enforcer.service_tokens import ServiceToken
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
    view.update(_crl_settings(obj))
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
    """Change an mTLS certificate's name, associated hostnames or CRL settings."""
    _only(body, {"name", "associated_hostnames", *CRL_SETTINGS})
    obj = _owned(objects, "root", account, oid, "mTLS certificate")
    obj.update(_crl_settings_of(body))
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
    # Its CRL and its revocations by serial go with it: nothing else can refer to them.
    changes = [Change("root", oid, None)]
    if oid in objects.get(CRL_KIND, {}):
        changes.append(Change(CRL_KIND, oid, None))
    changes += [
        Change(REVOCATION_KIND, rid, None)
        for rid, r in objects.get(REVOCATION_KIND, {}).items()
        if r.get("certificate_id") == oid
    ]
    return Outcome({"id": oid}, tuple(changes))


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
    "alpn",
    "origin_ca",
    "allowed_idps",
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
    if "origin_ca" in body:
        # PEM text (the config file's origin_ca names a file; the API carries its contents).
        ca = _field(body, "origin_ca", (str, type(None)), "PEM CA certificates or null")
        if ca is not None and (problem := origin_ca_problem(obj["origin"], ca)):
            raise ApiError(400, f"origin_ca: {problem}")
        obj["origin_ca"] = ca
    for flag, default in (
        ("forward_client_certificate", False),
        ("bind_token_to_certificate", True),  # access-flow A10, on unless the operator opts out
        ("underscores_in_headers", False),
    ):
        if flag in body or creating:
            obj[flag] = _field(body, flag, bool, "true or false", default)
    if "alpn" in body or creating:
        alpn = _field(body, "alpn", list, 'a list such as ["h2", "http/1.1"]', list(ALPN_PROTOCOLS))
        if problem := alpn_problem(alpn):
            raise ApiError(400, f"alpn: {problem}")
        obj["alpn"] = list(alpn_tuple(alpn))
    if "allowed_idps" in body or creating:
        allowed = _field(body, "allowed_idps", list, "a list of identity provider ids", [])
        account = obj.get("account")
        known = {i for i, p in objects.get(IDP_KIND, {}).items() if p.get("account") == account}
        for idp in allowed:
            if not isinstance(idp, str) or idp not in known:
                raise ApiError(
                    400,
                    f"allowed_idps: {idp!r} is not an identity provider of account {account!r}; "
                    f"known: {sorted(known)}",
                )
        obj["allowed_idps"] = list(dict.fromkeys(allowed))
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


# A person's session ended by a logout (access-flow I10): tokens carrying this
# ``identity_nonce`` no longer admit. Kept until the session's token would have expired anyway.
ENDED_SESSION_KIND = "ended_session"


def end_identity_session(
    objects: Objects, identity_nonce: str, expires: dt.datetime, now: dt.datetime
) -> Outcome:
    """End the session whose token carries ``identity_nonce``; drop records already moot."""
    ended = objects.get(ENDED_SESSION_KIND, {})
    changes = [
        Change(ENDED_SESSION_KIND, nonce, None)
        for nonce, obj in ended.items()
        if _parse_iso(obj["expires"]) <= now
    ]
    if identity_nonce not in ended:
        obj = {"identity_nonce": identity_nonce, "expires": _iso(expires), "ended_at": _iso(now)}
        changes.append(Change(ENDED_SESSION_KIND, identity_nonce, obj))
    return Outcome({"identity_nonce": identity_nonce}, tuple(changes))


def _ended_identity_nonces(objects: Objects, now: dt.datetime) -> frozenset[str]:
    return frozenset(
        nonce
        for nonce, obj in objects.get(ENDED_SESSION_KIND, {}).items()
        if _parse_iso(obj["expires"]) > now
    )


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


def new_signing_key_object(key: tokens.PrivateKey, now: dt.datetime) -> dict[str, Any]:
    """Describe a signing key as a stored object (it becomes the current key)."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    kid = SigningKey.from_private_key(key, now).kid
    return {"kid": kid, "private_key": pem, "created_at": _iso(now), "accepted_until": None}


def _key_algorithm(obj: Mapping[str, Any]) -> str:
    """The token algorithm of a stored signing key (from its private key)."""
    return _signing_key(obj, _parse_iso(obj["created_at"])).algorithm


# The enforcer's default token algorithm (J7): what accounts without a setting of their own sign
# with. One object; a state made before it existed has none, and then the newest current key's
# algorithm is the default, as it was.
SIGNING_KIND = "signing"
SIGNING_DEFAULT = "default"


def _current_keys(objects: Objects) -> dict[str, dict[str, Any]]:
    """Algorithm -> its current key (the newest key without ``accepted_until``)."""
    keys = sorted(objects.get("signing_key", {}).values(), key=lambda k: k["created_at"])
    return {_key_algorithm(k): k for k in keys if k["accepted_until"] is None}


def default_algorithm(objects: Objects) -> str:
    """The token algorithm of accounts without one of their own (access-flow J7)."""
    stored = objects.get(SIGNING_KIND, {}).get(SIGNING_DEFAULT)
    if stored is not None:
        return str(stored["algorithm"])
    keys = sorted(objects.get("signing_key", {}).values(), key=lambda k: k["created_at"])
    current = [k for k in keys if k["accepted_until"] is None]
    return _key_algorithm(current[-1]) if current else tokens.DEFAULT_ALGORITHM


def _account_algorithm(objects: Objects, account: str) -> str | None:
    """The account's own token algorithm, or None when it follows the default."""
    value = objects.get("account", {}).get(account, {}).get("token_algorithm")
    return str(value) if value is not None else None


def _algorithms_in_use(objects: Objects) -> set[str]:
    """The default algorithm and every account's own: each needs a current key."""
    used = {default_algorithm(objects)}
    used |= {
        str(a["token_algorithm"])
        for a in objects.get("account", {}).values()
        if a.get("token_algorithm") is not None
    }
    return used


def settle_keys(
    objects: Objects, limits: Limits, now: dt.datetime, rotate: Iterable[str] = ()
) -> list[Change]:
    """Changes giving each algorithm in use one current key (a new one for ``rotate``'s).

    A replaced key, or the key of an algorithm nobody uses any more, enters its grace period
    (accepted until ``now`` plus the grace period, J7, A11); keys past their grace are dropped.
    """
    rotating = set(rotate)
    in_use = _algorithms_in_use(objects)
    current = _current_keys(objects)
    changes: list[Change] = []
    for k in objects.get("signing_key", {}).values():
        if k["accepted_until"] is None:
            algorithm = _key_algorithm(k)
            keep = current.get(algorithm) is k and algorithm in in_use
            if not keep or algorithm in rotating:
                retired = {**k, "accepted_until": _iso(now + limits.grace_period)}
                changes.append(Change("signing_key", k["kid"], retired))
        elif _parse_iso(k["accepted_until"]) < now:
            changes.append(Change("signing_key", k["kid"], None))  # past its grace period
    for algorithm in sorted(in_use):
        if algorithm in rotating or algorithm not in current:
            new = new_signing_key_object(tokens.generate_key(algorithm), now)
            changes.append(Change("signing_key", new["kid"], new))
    return changes


def get_keys(objects: Objects, limits: Limits, now: dt.datetime) -> Outcome:
    """Describe the signing keys: the current ones and those in their grace period."""
    keys = sorted(objects.get("signing_key", {}).values(), key=lambda k: k["created_at"])
    current = _current_keys(objects)
    default = default_algorithm(objects)
    signs = current.get(default)
    return Outcome(
        {
            "current_kid": signs["kid"] if signs else None,
            "last_key_rotation_at": signs["created_at"] if signs else None,
            "algorithm": default,
            "current_keys": {a: k["kid"] for a, k in sorted(current.items())},
            "account_algorithms": {
                aid: a["token_algorithm"]
                for aid, a in sorted(objects.get("account", {}).items())
                if a.get("token_algorithm") is not None
            },
            "grace_period": format_duration(limits.grace_period),
            "keys": [
                {
                    "kid": k["kid"],
                    "algorithm": _key_algorithm(k),
                    "created_at": k["created_at"],
                    "accepted_until": k["accepted_until"],
                }
                for k in keys
                if k["accepted_until"] is None or _parse_iso(k["accepted_until"]) >= now
            ],
        }
    )


def _algorithm_field(body: Body, default: Any = ...) -> str | None:
    """The body's ``algorithm``: one of the token algorithms (or null where allowed)."""
    allowed = f"one of {list(tokens.ALGORITHMS)}"
    if default is None:
        value = _field(body, "algorithm", (str, type(None)), f"{allowed}, or null", ...)
    else:
        value = _field(body, "algorithm", str, allowed, default)
    if value is not None and value not in tokens.ALGORITHMS:
        raise ApiError(400, f"algorithm: {value!r} is not one of {list(tokens.ALGORITHMS)}")
    return value  # type: ignore[no-any-return]


def rotate_keys(
    objects: Objects, limits: Limits, now: dt.datetime, body: Body | None = None
) -> Outcome:
    """Make new current signing keys; the replaced ones stay accepted for the grace period.

    Without a body every current key is replaced by a new key of its algorithm. ``algorithm``
    (RS256, ES256 or EdDSA) replaces only that algorithm's key; an algorithm nobody uses yet
    becomes the enforcer's default (J7: what a one-account enforcer did before per-account
    settings, switching its algorithm at a rotation).
    """
    body = {} if body is None else body
    _only(body, {"algorithm"})
    changes: list[Change] = []
    after = objects
    if "algorithm" in body:
        algorithm = _algorithm_field(body, tokens.DEFAULT_ALGORITHM)
        assert algorithm is not None
        if algorithm not in _algorithms_in_use(objects):
            setting = Change(SIGNING_KIND, SIGNING_DEFAULT, {"algorithm": algorithm})
            changes.append(setting)
            after = apply_changes(objects, [setting])
        rotate = {algorithm}
    else:
        algorithm = default_algorithm(objects)
        rotate = _algorithms_in_use(objects)
    changes += settle_keys(after, limits, now, rotate)
    new = {c.id: c.body for c in changes if c.kind == "signing_key" and c.body is not None}
    made = sorted(
        ((_key_algorithm(v), v) for v in new.values() if v["accepted_until"] is None),
        key=lambda m: m[0],
    )
    (signs,) = [v for a, v in made if a == algorithm]
    return Outcome(
        {
            "kid": signs["kid"],
            "algorithm": algorithm,
            "created_at": signs["created_at"],
            "default_algorithm": default_algorithm(after),
            "rotated": {a: v["kid"] for a, v in made},
        },
        tuple(changes),
    )


def get_signing(objects: Objects, account: str) -> Outcome:
    """The account's token algorithm: its own setting, or the enforcer's default."""
    own = _account_algorithm(objects, account)
    algorithm = own or default_algorithm(objects)
    key = _current_keys(objects).get(algorithm)
    return Outcome(
        {
            "account_id": account,
            "algorithm": algorithm,
            "setting": own,
            "kid": key["kid"] if key else None,
        }
    )


def set_signing(
    objects: Objects, account: str, body: Body, limits: Limits, now: dt.datetime
) -> Outcome:
    """Set the account's token algorithm (null: follow the enforcer's default), access-flow J7.

    Its tokens are signed from now on with the current key of that algorithm (made when no
    account used it yet). Tokens already minted keep verifying while their key is accepted: a
    key no account uses any more enters its grace period, like a rotated one.
    """
    _only(body, {"algorithm"})
    own = _algorithm_field(body, None)
    acc = _account(objects, account)
    if own is None:
        acc.pop("token_algorithm", None)
    else:
        acc["token_algorithm"] = own
    setting = Change("account", account, acc)
    after = apply_changes(objects, [setting])
    changes = (setting, *settle_keys(after, limits, now))
    outcome = get_signing(apply_changes(after, changes[1:]), account)
    return Outcome(outcome.result, changes)


# ---- revocation: a CRL per uploaded root, revocations by serial or fingerprint -------------

# Stored kinds. A CRL object's id is its root's id (one CRL per root); a revocation by
# fingerprint has the fingerprint as its id (as the config and the testbed write them), one by
# serial a generated id.
CRL_KIND = "crl"
CRL_FETCH_KIND = "crl_fetch"
REVOCATION_KIND = "revocation"
CRL_SETTINGS = ("crl_url", "crl_refresh", "crl_fail_open")
DEFAULT_CRL_REFRESH = "1h"
MIN_CRL_REFRESH = dt.timedelta(seconds=1)


def _crl_settings(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A root's CRL settings, with their defaults."""
    return {
        "crl_url": obj.get("crl_url"),
        "crl_refresh": obj.get("crl_refresh") or DEFAULT_CRL_REFRESH,
        "crl_fail_open": bool(obj.get("crl_fail_open", False)),
    }


def _crl_settings_of(body: Body) -> dict[str, Any]:
    """Check the CRL settings present in ``body``; return only those."""
    out: dict[str, Any] = {}
    if "crl_url" in body:
        url = _field(body, "crl_url", (str, type(None)), "an http:// URL, or null for none")
        if url is not None and (problem := crl.check_url(url)):
            raise ApiError(400, f"crl_url: {problem}")
        out["crl_url"] = url
    if "crl_refresh" in body:
        refresh = _duration(body, "crl_refresh", DEFAULT_CRL_REFRESH)
        assert refresh is not None
        if parse_duration(refresh) < MIN_CRL_REFRESH:
            raise ApiError(400, f"crl_refresh: {refresh} is too short; use 1s or more (e.g. 1h)")
        out["crl_refresh"] = refresh
    if "crl_fail_open" in body:
        out["crl_fail_open"] = _field(body, "crl_fail_open", bool, "true or false")
    return out


def _root_certificates(obj: Mapping[str, Any]) -> list[x509.Certificate]:
    # A key of its own: the same PEM is cached as _pem_chain's (root, intermediates) too.
    return list(_parse_cached("all-certificates:" + obj["certificate"], _all_certificates))


def _all_certificates(key: str) -> tuple[x509.Certificate, ...]:
    pem = key.removeprefix("all-certificates:")
    return tuple(x509.load_pem_x509_certificates(pem.encode()))


def _crl_view(obj: Mapping[str, Any], full: bool = False) -> dict[str, Any]:
    keys = [
        "root_id",
        "issuer",
        "this_update",
        "next_update",
        "revoked_count",
        "crl_number",
        "source",
        "updated_at",
    ]
    view = {k: obj.get(k) for k in keys}
    if full:
        der = base64.b64decode(obj["der_base64"])
        view["crl"] = crl.load_crl(der).public_bytes(serialization.Encoding.PEM).decode()
    return view


def store_crl(
    objects: Objects, account: str, root_id: str, data: bytes, now: dt.datetime, source: str
) -> Outcome:
    """Make ``data`` (PEM or DER) the root's CRL once it verifies; else 400 and no change."""
    root = _owned(objects, "root", account, root_id, "mTLS certificate")
    try:
        der_b64 = base64.b64encode(
            crl.load_crl(data).public_bytes(serialization.Encoding.DER)
        ).decode()
        verified = crl.check_dates(_verified_der(der_b64, root["certificate"])[0], now)
    except crl.CrlError as exc:
        raise ApiError(400, f"crl: {exc}; the CRL in force (if any) stays") from None
    old = objects.get(CRL_KIND, {}).get(root_id)
    if old is not None and old["der_base64"] == der_b64:
        return Outcome(_crl_view(old))  # the same CRL again: nothing changes
    # A CRL older than the one in force would un-revoke certificates (a replayed CRL).
    if (
        old is not None
        and old.get("issuer_key") == verified.issuer_key
        and (
            _parse_iso(old["this_update"]) > verified.this_update
            or (
                old.get("crl_number") is not None
                and verified.crl_number is not None
                and int(old["crl_number"]) > verified.crl_number
            )
        )
    ):
        raise ApiError(
            400,
            f"crl: older than the CRL in force (thisUpdate {_iso(verified.this_update)} < "
            f"{old['this_update']}, or a lower CRL number); the CRL in force stays",
        )
    obj = {
        "root_id": root_id,
        "account": account,
        "der_base64": der_b64,
        "issuer": verified.issuer,
        "issuer_key": verified.issuer_key,
        "this_update": _iso(verified.this_update),
        "next_update": _iso(verified.next_update) if verified.next_update else None,
        "revoked_count": len(verified.serials),
        "crl_number": verified.crl_number,
        "source": source,
        "updated_at": _iso(now),
    }
    return Outcome(_crl_view(obj), (Change(CRL_KIND, root_id, obj),))


def put_crl(objects: Objects, account: str, root_id: str, body: Body, now: dt.datetime) -> Outcome:
    """Upload a root's CRL: ``{"crl": PEM}`` or ``{"crl_der_base64": ...}``."""
    return store_crl(objects, account, root_id, _crl_body(body), now, "upload")


def _crl_body(body: Body) -> bytes:
    _only(body, {"crl", "crl_der_base64"})
    if ("crl" in body) == ("crl_der_base64" in body):
        raise ApiError(400, "send exactly one of crl (PEM text) and crl_der_base64 (base64 DER)")
    if "crl" in body:
        return str(_field(body, "crl", str, "PEM text of an X.509 CRL")).encode()
    raw = _field(body, "crl_der_base64", str, "base64 of a DER X.509 CRL")
    try:
        return base64.b64decode(raw, validate=True)
    except (ValueError, binascii.Error):
        raise ApiError(400, "crl_der_base64: not valid base64") from None


def warm_crl(objects: Objects, account: str, root_id: str, data: bytes | Body) -> ApiError | None:
    """Parse and verify a CRL ahead of :func:`store_crl`, in a worker thread; return the error.

    Checking a CRL of 100,000 entries costs about 0.4 s: done here, off the trio loop, the
    write that follows finds it cached instead of stalling every connection meanwhile; and a
    CRL that fails here never reaches the loop (a refused CRL is not cached).
    """
    root = objects.get("root", {}).get(root_id)
    if root is None or root.get("account") != account:
        return None  # the write says 404
    try:
        raw = data if isinstance(data, bytes) else _crl_body(data)
        if root is not None:
            der = crl.load_crl(raw).public_bytes(serialization.Encoding.DER)
            _verified_der(base64.b64encode(der).decode(), root["certificate"])
    except ApiError as exc:
        return exc
    except crl.CrlError as exc:
        return ApiError(400, f"crl: {exc}; the CRL in force (if any) stays")
    return None


def get_crl(objects: Objects, account: str, root_id: str) -> Outcome:
    """Return a root's CRL in force (with its PEM) and the last fetch error, if any."""
    _owned(objects, "root", account, root_id, "mTLS certificate")
    obj = objects.get(CRL_KIND, {}).get(root_id)
    if obj is None:
        fetch = objects.get(CRL_FETCH_KIND, {}).get(root_id)
        extra = f" (last fetch: {fetch['error']})" if fetch and fetch.get("error") else ""
        raise ApiError(404, f"mTLS certificate {root_id} has no CRL{extra}")
    view = _crl_view(obj, full=True)
    fetch = objects.get(CRL_FETCH_KIND, {}).get(root_id)
    view["last_fetch_error"] = fetch.get("error") if fetch else None
    return Outcome(view)


def record_fetch_error(
    objects: Objects, root_id: str, error: str | None, now: dt.datetime
) -> Outcome:
    """Remember the last CRL fetch problem of a root (None clears it); unchanged: no commit."""
    old = objects.get(CRL_FETCH_KIND, {}).get(root_id)
    if (old.get("error") if old else None) == error:
        return Outcome(None)
    if error is None:
        return Outcome(None, (Change(CRL_FETCH_KIND, root_id, None),))
    return Outcome(None, (Change(CRL_FETCH_KIND, root_id, {"error": error, "at": _iso(now)}),))


def _hex_serial(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{name}: expected a hexadecimal serial number such as 1a2b3c")
    text = value.lower().replace(":", "").removeprefix("0x")
    try:
        number = int(text, 16)
    except ValueError:
        raise ApiError(400, f"{name}: {value!r} is not a hexadecimal serial number") from None
    if len(text) > 64:
        raise ApiError(400, f"{name}: {value!r} is longer than a serial number may be")
    return format(number, "x")


def _revocation_view(rid: str, obj: Mapping[str, Any]) -> dict[str, Any]:
    if "serial_number" in obj:
        return {
            "id": rid,
            "type": "serial",
            "certificate_id": obj["certificate_id"],
            "serial_number": obj["serial_number"],
            "created_at": obj.get("created_at"),
        }
    return {
        "id": rid,
        "type": "fingerprint",
        "fingerprint_sha256": obj.get("fingerprint", rid),
        "created_at": obj.get("created_at"),
    }


def _visible(obj: Mapping[str, Any], account: str) -> bool:
    # Revocations from the config file or older releases carry no account: every account's.
    return obj.get("account") in (None, account)


def add_revocation(objects: Objects, account: str, body: Body, now: dt.datetime) -> Outcome:
    """Revoke a certificate: by serial under an uploaded root, or by SHA-256 fingerprint."""
    _only(body, {"certificate_id", "serial_number", "fingerprint_sha256"})
    existing = objects.get(REVOCATION_KIND, {})
    if "fingerprint_sha256" in body:
        if "certificate_id" in body or "serial_number" in body:
            raise ApiError(
                400, "send either fingerprint_sha256, or certificate_id with serial_number"
            )
        raw = _field(body, "fingerprint_sha256", str, "64 hex characters")
        fp = raw.lower().replace(":", "")
        if not re.fullmatch(r"[0-9a-f]{64}", fp):
            raise ApiError(400, f"fingerprint_sha256: {raw!r} is not a SHA-256 fingerprint")
        if fp in existing:
            return Outcome(_revocation_view(fp, existing[fp]))
        obj = {"fingerprint": fp, "account": account, "created_at": _iso(now)}
        return Outcome(_revocation_view(fp, obj), (Change(REVOCATION_KIND, fp, obj),), 201)
    if "serial_number" not in body or "certificate_id" not in body:
        raise ApiError(
            400,
            "send certificate_id (an uploaded root's id) with serial_number (hex), "
            "or fingerprint_sha256",
        )
    root_id = _field(body, "certificate_id", str, "an uploaded root's id")
    _owned(objects, "root", account, root_id, "mTLS certificate")
    serial = _hex_serial(body["serial_number"], "serial_number")
    for rid, r in existing.items():
        if r.get("certificate_id") == root_id and r.get("serial_number") == serial:
            return Outcome(_revocation_view(rid, r))
    rid = str(uuid.uuid4())
    obj = {
        "certificate_id": root_id,
        "serial_number": serial,
        "account": account,
        "created_at": _iso(now),
    }
    return Outcome(_revocation_view(rid, obj), (Change(REVOCATION_KIND, rid, obj),), 201)


def list_revocations(objects: Objects, account: str) -> Outcome:
    """List the revocations by serial and by fingerprint."""
    rows = [
        _revocation_view(rid, r)
        for rid, r in objects.get(REVOCATION_KIND, {}).items()
        if _visible(r, account)
    ]
    return Outcome(sorted(rows, key=lambda r: (r["created_at"] or "", r["id"])))


def delete_revocation(objects: Objects, account: str, rid: str) -> Outcome:
    """Lift a revocation: the certificate admits again (unless a CRL lists it)."""
    obj = objects.get(REVOCATION_KIND, {}).get(rid)
    if obj is None or not _visible(obj, account):
        raise ApiError(404, f"revocation {rid!r} not found in account {account!r}")
    return Outcome({"id": rid}, (Change(REVOCATION_KIND, rid, None),))


def _verified_der(der_b64: str, root_pem: str) -> tuple[crl.VerifiedCrl, frozenset[str]]:
    """A stored-form CRL verified against a root's certificates, and its serials as hex."""

    def parse(_: str) -> tuple[crl.VerifiedCrl, frozenset[str]]:
        certs = _all_certificates("all-certificates:" + root_pem)
        verified = crl.parse_verified(crl.load_crl(base64.b64decode(der_b64)), certs)
        return verified, frozenset(format(s, "x") for s in verified.serials)

    # Keyed by the CRL and the root's certificates: uploads, refreshes and snapshot rebuilds
    # verify a CRL once.
    digest = hashlib.sha256(der_b64.encode() + b"|" + root_pem.encode()).hexdigest()
    return _parse_cached("crl:" + digest, parse)  # type: ignore[no-any-return]


_LONG_AGO = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _revocation_index(objects: Objects, roots: Sequence[RootCertificate]) -> crl.RevocationIndex:
    """Index the CRLs in force and the revocations by serial for request-time lookups."""
    by_id = {r.id: r for r in roots}
    root_objs = objects.get("root", {})
    by_issuer: dict[str, crl.CrlEntry] = {}
    missing: dict[str, crl.MissingCrl] = {}
    by_root: dict[str, set[str]] = {}
    host_sets: dict[str, list[frozenset[str]]] = {}
    unknown_after: dict[str, dt.datetime] = {}

    def fail_closed_from(root: RootCertificate, when: dt.datetime) -> None:
        for host in root.associated_hostnames:
            unknown_after[host] = min(unknown_after.get(host, when), when)

    crls = objects.get(CRL_KIND, {})
    for rid, c in crls.items():
        root, obj = by_id.get(rid), root_objs.get(rid)
        if root is None or obj is None:
            continue
        try:
            verified, hex_serials = _verified_der(c["der_base64"], obj["certificate"])
        except crl.CrlError:
            continue  # checked on upload: only a changed root certificate gets here
        fail_open = _crl_settings(obj)["crl_fail_open"]
        entry = crl.CrlEntry(
            rid, root.name, verified.issuer, verified.serials, verified.next_update, fail_open
        )
        same = by_issuer.get(verified.issuer_key)
        if same is not None:  # two roots hold a CRL of one CA: both count, the stricter wins
            nexts = [t for t in (same.next_update, entry.next_update) if t is not None]
            entry = dataclasses.replace(
                entry,
                serials=same.serials | entry.serials,
                next_update=min(nexts) if nexts else None,
                fail_open=same.fail_open and fail_open,
            )
        by_issuer[verified.issuer_key] = entry
        for host in root.associated_hostnames:
            host_sets.setdefault(host, []).append(hex_serials)
        if not fail_open and verified.next_update is not None:
            fail_closed_from(root, verified.next_update)
    for rid, obj in root_objs.items():
        root = by_id.get(rid)
        settings = _crl_settings(obj)
        if root is None or not settings["crl_url"] or rid in crls:
            continue
        missing[root.fingerprint] = crl.MissingCrl(rid, root.name, settings["crl_fail_open"])
        if not settings["crl_fail_open"]:
            fail_closed_from(root, _LONG_AGO)
    for r in objects.get(REVOCATION_KIND, {}).values():
        root = by_id.get(r.get("certificate_id", ""))
        if root is None or "serial_number" not in r:
            continue
        by_root.setdefault(root.fingerprint, set()).add(r["serial_number"])
        for host in root.associated_hostnames:
            host_sets.setdefault(host, []).append(frozenset([r["serial_number"]]))
    return crl.RevocationIndex(
        by_issuer=by_issuer,
        missing=missing,
        serials_by_root={fp: frozenset(s) for fp, s in by_root.items()},
        serials_by_host={
            h: sets[0] if len(sets) == 1 else frozenset().union(*sets)
            for h, sets in host_sets.items()
        },
        unknown_after_by_host=unknown_after,
    )


# ---- identity providers and service tokens (access-flow I1, I11) ---------------------------

IDP_KIND = "identity_provider"
SERVICE_TOKEN_KIND = "service_token"
SECRET_MASK = "********"
# Algorithms an ID token may be signed with; ``none`` and HMAC (HS*) never (access-flow I1).
IDP_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)
# The fields of an identity provider's ``config`` (the config file reads the same ones).
IDP_CONFIG_FIELDS = frozenset(
    {
        "client_id",
        "client_secret",
        "issuer_url",
        "auth_url",
        "token_url",
        "certs_url",
        "scopes",
        "email_claim_name",
        "groups_claim",
        "pkce_enabled",
        "allowed_algorithms",
        "ca_pem",
    }
)


def https_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be an identity provider endpoint, or None when it can."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        return f"expected an https:// URL with a host, got {url!r}"
    if parts.fragment or parts.username or parts.password:
        return f"{url!r}: no fragment or user info"
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        return f"{url!r}: the port must be a number from 1 to 65535"
    return None


def idp_config(raw: Any, old: Mapping[str, Any] | None, where: str = "config") -> dict[str, Any]:
    """Check an OIDC provider's ``config`` (access-flow I1); ``old``: the stored one on update.

    A ``client_secret`` left out, or sent back masked, keeps the stored one.
    """
    if not isinstance(raw, Mapping):
        raise ApiError(400, f"{where}: expected an object with client_id, issuer_url, ...")
    extra = sorted(set(raw) - IDP_CONFIG_FIELDS)
    if extra:
        raise ApiError(
            400, f"{where}.{extra[0]}: unknown field; expected one of {sorted(IDP_CONFIG_FIELDS)}"
        )
    base = dict(old or {})

    def text(name: str, what: str, default: Any = ...) -> Any:
        if name not in raw and name in base:
            return base[name]
        value = raw.get(name, default)
        if value is ...:
            raise ApiError(400, f"{where}.{name}: required field is missing ({what})")
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ApiError(400, f"{where}.{name}: expected {what}, got {value!r}")
        return value

    out: dict[str, Any] = {}
    out["client_id"] = text("client_id", "the client id registered at the provider")
    secret = raw.get("client_secret")
    if (secret is None or secret == SECRET_MASK) and "client_secret" in base:
        out["client_secret"] = base["client_secret"]
    else:
        out["client_secret"] = text("client_secret", "the client secret")
    for name, required in (
        ("issuer_url", True),
        ("auth_url", False),
        ("token_url", False),
        ("certs_url", False),
    ):
        url = text(name, "an https:// URL", ... if required else None)
        if url is not None:
            url = url.strip()
            if problem := https_url_problem(url):
                raise ApiError(400, f"{where}.{name}: {problem}")
            if name == "issuer_url":
                url = url.rstrip("/")
        out[name] = url
    scopes = raw.get("scopes", base.get("scopes", ["openid", "email", "profile"]))
    if (
        not isinstance(scopes, list)
        or not all(isinstance(x, str) and x and " " not in x for x in scopes)
        or "openid" not in scopes
    ):
        raise ApiError(
            400, f'{where}.scopes: expected a list of scope names holding "openid", got {scopes!r}'
        )
    out["scopes"] = list(dict.fromkeys(scopes))
    out["email_claim_name"] = text("email_claim_name", "a claim name", "email")
    out["groups_claim"] = text("groups_claim", "a claim name", "groups")
    pkce = raw.get("pkce_enabled", base.get("pkce_enabled", True))
    if not isinstance(pkce, bool):
        raise ApiError(400, f"{where}.pkce_enabled: expected true or false, got {pkce!r}")
    out["pkce_enabled"] = pkce
    algs = raw.get(
        "allowed_algorithms", base.get("allowed_algorithms", ["RS256", "ES256", "PS256", "EdDSA"])
    )
    if not isinstance(algs, list) or not algs:
        raise ApiError(
            400,
            f"{where}.allowed_algorithms: expected a non-empty list drawn from "
            f"{list(IDP_ALGORITHMS)}",
        )
    for alg in algs:
        if alg not in IDP_ALGORITHMS:
            raise ApiError(
                400,
                f"{where}.allowed_algorithms: {alg!r} is not allowed; use some of "
                f"{list(IDP_ALGORITHMS)} (none and HS* never are)",
            )
    out["allowed_algorithms"] = list(dict.fromkeys(algs))
    ca = raw.get("ca_pem", base.get("ca_pem"))
    if ca is not None:
        if not isinstance(ca, str):
            raise ApiError(400, f"{where}.ca_pem: expected PEM CA certificates or null")
        try:
            ssl.create_default_context(cadata=ca)
        except (ssl.SSLError, ValueError) as exc:
            raise ApiError(400, f"{where}.ca_pem: not PEM CA certificates: {exc}") from None
    out["ca_pem"] = ca
    return out


def _idp_view(obj: Mapping[str, Any]) -> dict[str, Any]:
    config = dict(obj["config"])
    config["client_secret"] = SECRET_MASK  # never shown again
    return {
        "id": obj["id"],
        "name": obj["name"],
        "type": obj["type"],
        "config": config,
        "created_at": obj["created_at"],
        "updated_at": obj["updated_at"],
    }


def _idp_fields(body: Body, obj: dict[str, Any], creating: bool) -> None:
    _only(body, {"name", "type", "config", "id"})
    if "name" in body or creating:
        name = _field(body, "name", str, "a name for the identity provider")
        if not name.strip():
            raise ApiError(400, "name: must not be empty")
        obj["name"] = name
    kind = _field(body, "type", str, '"oidc"', obj.get("type", "oidc"))
    if kind != "oidc":
        raise ApiError(400, f'type: {kind!r} is not supported; only "oidc" is')
    obj["type"] = kind
    if "config" in body or creating:
        obj["config"] = idp_config(_field(body, "config", dict, "an object"), obj.get("config"))


def list_idps(objects: Objects, account: str) -> Outcome:
    """List the account's identity providers (client secrets masked)."""
    rows = [o for o in objects.get(IDP_KIND, {}).values() if o["account"] == account]
    return Outcome([_idp_view(o) for o in sorted(rows, key=lambda o: (o["created_at"], o["id"]))])


def get_idp(objects: Objects, account: str, oid: str) -> Outcome:
    """Return one identity provider (client secret masked)."""
    return Outcome(_idp_view(_owned(objects, IDP_KIND, account, oid, "identity provider")))


def create_idp(objects: Objects, account: str, body: Body, now: dt.datetime) -> Outcome:
    """Add an OpenID Connect provider to the account."""
    _only(body, {"name", "type", "config"})
    oid = str(uuid.uuid4())
    obj: dict[str, Any] = {"id": oid, "account": account, "created_at": _iso(now)}
    _idp_fields(body, obj, creating=True)
    obj["updated_at"] = _iso(now)
    return Outcome(_idp_view(obj), (Change(IDP_KIND, oid, obj),), 201)


def update_idp(objects: Objects, account: str, oid: str, body: Body, now: dt.datetime) -> Outcome:
    """Change an identity provider's name or config (a masked secret keeps the stored one)."""
    obj = _owned(objects, IDP_KIND, account, oid, "identity provider")
    if "id" in body and body["id"] != oid:
        raise ApiError(400, "id: an identity provider's id never changes")
    _idp_fields(body, obj, creating=False)
    obj["updated_at"] = _iso(now)
    return Outcome(_idp_view(obj), (Change(IDP_KIND, oid, obj),))


def delete_idp(objects: Objects, account: str, oid: str) -> Outcome:
    """Delete an identity provider; refused while an application names it in allowed_idps."""
    _owned(objects, IDP_KIND, account, oid, "identity provider")
    users = sorted(
        a["id"] for a in objects.get("app", {}).values() if oid in (a.get("allowed_idps") or [])
    )
    if users:
        raise ApiError(
            409,
            f"identity provider {oid} is in the allowed_idps of application(s) {users}: "
            "remove it there first",
        )
    return Outcome({"id": oid}, (Change(IDP_KIND, oid, None),))


def idp_object(idp: IdentityProvider, account: str, now: dt.datetime) -> dict[str, Any]:
    """The stored form of an identity provider (the config file's seeds)."""
    config = {k: getattr(idp, k) for k in IDP_CONFIG_FIELDS}
    config["scopes"] = list(idp.scopes)
    config["allowed_algorithms"] = list(idp.allowed_algorithms)
    return {
        "id": idp.id,
        "account": account,
        "name": idp.name,
        "type": idp.type,
        "config": config,
        "created_at": _iso(now),
        "updated_at": _iso(now),
    }


def identity_provider_of(obj: Mapping[str, Any]) -> IdentityProvider:
    """The request-time form of a stored identity provider."""
    c = obj["config"]
    return IdentityProvider(
        id=obj["id"],
        name=obj["name"],
        issuer_url=c["issuer_url"],
        client_id=c["client_id"],
        client_secret=c["client_secret"],
        scopes=tuple(c["scopes"]),
        email_claim_name=c["email_claim_name"],
        groups_claim=c["groups_claim"],
        auth_url=c.get("auth_url"),
        token_url=c.get("token_url"),
        certs_url=c.get("certs_url"),
        pkce_enabled=c["pkce_enabled"],
        allowed_algorithms=tuple(c["allowed_algorithms"]),
        ca_pem=c.get("ca_pem"),
        type=obj["type"],
    )


def _allowed_idps(
    app: Mapping[str, Any], providers: Sequence[Mapping[str, Any]]
) -> tuple[str, ...]:
    """The ids of the providers that may log an application's users in (access-flow I1)."""
    mine = [p["id"] for p in providers if p["account"] == app["account"]]
    allowed = app.get("allowed_idps")
    if not allowed:
        return tuple(mine)
    return tuple(i for i in allowed if i in mine)


def _service_token_view(obj: Mapping[str, Any]) -> dict[str, Any]:
    keys = ["id", "name", "client_id", "duration", "expires_at", "created_at", "updated_at"]
    return {k: obj[k] for k in keys}


def _token_duration(body: Body, default: str | None) -> dt.timedelta | None:
    text = _duration(body, "duration", default)
    if text is None:
        return None
    duration = parse_duration(text)
    if duration <= dt.timedelta(0):
        raise ApiError(400, "duration: a service token needs a duration above zero (e.g. 8760h)")
    return duration


def list_service_tokens(objects: Objects, account: str) -> Outcome:
    """List the account's service tokens (never their secrets)."""
    rows = [o for o in objects.get(SERVICE_TOKEN_KIND, {}).values() if o["account"] == account]
    return Outcome(
        [_service_token_view(o) for o in sorted(rows, key=lambda o: (o["created_at"], o["id"]))]
    )


def get_service_token(objects: Objects, account: str, oid: str) -> Outcome:
    """Return one service token (never its secret)."""
    return Outcome(
        _service_token_view(_owned(objects, SERVICE_TOKEN_KIND, account, oid, "service token"))
    )


def create_service_token(objects: Objects, account: str, body: Body, now: dt.datetime) -> Outcome:
    """Create a service token; the answer carries its ``client_secret``, this once only."""
    _only(body, {"name", "duration"})
    name = _field(body, "name", str, "a name for the service token")
    if not name.strip():
        raise ApiError(400, "name: must not be empty")
    duration = _token_duration(body, format_duration(service_tokens.DEFAULT_DURATION))
    assert duration is not None
    secret = service_tokens.new_secret()
    oid = service_tokens.new_id()
    obj = {
        "id": oid,
        "account": account,
        "name": name,
        "client_id": service_tokens.new_client_id(),
        "client_secret_sha256": service_tokens.secret_sha256(secret),
        "duration": format_duration(duration),
        "expires_at": _iso(now + duration),
        "created_at": _iso(now),
        "updated_at": _iso(now),
    }
    return Outcome(
        {**_service_token_view(obj), "client_secret": secret},
        (Change(SERVICE_TOKEN_KIND, oid, obj),),
        201,
    )


def update_service_token(
    objects: Objects, account: str, oid: str, body: Body, now: dt.datetime
) -> Outcome:
    """Rename a service token or change its duration (applied at the next refresh)."""
    _only(body, {"name", "duration"})
    obj = _owned(objects, SERVICE_TOKEN_KIND, account, oid, "service token")
    if "name" in body:
        name = _field(body, "name", str, "a name")
        if not name.strip():
            raise ApiError(400, "name: must not be empty")
        obj["name"] = name
    if "duration" in body:
        duration = _token_duration(body, None)
        assert duration is not None
        obj["duration"] = format_duration(duration)
    obj["updated_at"] = _iso(now)
    return Outcome(_service_token_view(obj), (Change(SERVICE_TOKEN_KIND, oid, obj),))


def refresh_service_token(objects: Objects, account: str, oid: str, now: dt.datetime) -> Outcome:
    """Extend a service token: it expires one duration from now."""
    obj = _owned(objects, SERVICE_TOKEN_KIND, account, oid, "service token")
    obj["expires_at"] = _iso(now + parse_duration(obj["duration"]))
    obj["updated_at"] = _iso(now)
    return Outcome(_service_token_view(obj), (Change(SERVICE_TOKEN_KIND, oid, obj),))


def rotate_service_token(objects: Objects, account: str, oid: str, now: dt.datetime) -> Outcome:
    """Give a service token a new secret (answered this once); the old one stops at once."""
    obj = _owned(objects, SERVICE_TOKEN_KIND, account, oid, "service token")
    secret = service_tokens.new_secret()
    obj["client_secret_sha256"] = service_tokens.secret_sha256(secret)
    obj["updated_at"] = _iso(now)
    return Outcome(
        {**_service_token_view(obj), "client_secret": secret},
        (Change(SERVICE_TOKEN_KIND, oid, obj),),
    )


def delete_service_token(objects: Objects, account: str, oid: str) -> Outcome:
    """Revoke a service token: it stops admitting from the next request on."""
    obj = _owned(objects, SERVICE_TOKEN_KIND, account, oid, "service token")
    return Outcome(_service_token_view(obj), (Change(SERVICE_TOKEN_KIND, oid, None),))


def service_token_of(obj: Mapping[str, Any]) -> ServiceToken:
    """The request-time form of a stored service token."""
    return ServiceToken(
        id=obj["id"],
        name=obj["name"],
        client_id=obj["client_id"],
        secret_sha256=obj["client_secret_sha256"],
        expires_at=_parse_iso(obj["expires_at"]),
        account=obj["account"],
    )


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
        assert isinstance(
            key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
        )
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
    providers = sorted(objects.get(IDP_KIND, {}).values(), key=lambda o: (o["created_at"], o["id"]))
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
                origin_ca=obj.get("origin_ca"),
                cookie=CookieSettings(**cookie),
                alpn=tuple(obj.get("alpn", ALPN_PROTOCOLS)),
                account=obj["account"],
                identity_providers=_allowed_idps(obj, providers),
            )
        )
    keys = sorted(objects.get("signing_key", {}).values(), key=lambda k: k["created_at"])
    current = {a: _signing_key(k, now) for a, k in _current_keys(objects).items()}
    if not current:
        raise ValueError("the state has no current signing key")
    default = default_algorithm(objects)
    # The default's key signs for accounts without a setting; a state that somehow lacks it
    # (never made by these operations) falls back to the newest current key.
    newest = [k for k in keys if k["accepted_until"] is None][-1]
    signs = current.get(default) or _signing_key(newest, now)
    ring = KeyRing(
        signs,
        tuple(
            RetiredKey(_signing_key(k, now), _parse_iso(k["accepted_until"]))
            for k in reversed(keys)
            if k["accepted_until"] is not None
        ),
        limits.grace_period,
        others=tuple(k for k in current.values() if k is not signs),
        account_algorithms={
            aid: a["token_algorithm"]
            for aid, a in objects.get("account", {}).items()
            if a.get("token_algorithm") in current
        },
    )
    revoked = {
        o["fingerprint_sha256"]
        for o in objects.get("client_cert", {}).values()
        if o["status"] == "revoked"
    }
    revoked |= {
        r.get("fingerprint", rid)
        for rid, r in objects.get(REVOCATION_KIND, {}).items()
        if "serial_number" not in r
    }
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
        revocation=_revocation_index(objects, roots),
        identity_providers=[identity_provider_of(o) for o in providers],
        service_tokens=[service_token_of(o) for o in objects.get(SERVICE_TOKEN_KIND, {}).values()],
        ended_identity_nonces=_ended_identity_nonces(objects, now),
    )
