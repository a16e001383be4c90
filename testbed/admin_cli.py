"""``testbed enforcer admin``: the admin API from the command line, as tables or JSON."""

from __future__ import annotations

import argparse
import base64
import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from enforcer.policy import RULE_KINDS, PolicyError, rule_from_text

EXIT_API_ERROR = 1
EXIT_USAGE = 2


class AdminError(Exception):
    """The admin API refused a call or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AdminClient:
    """A small client of the admin API (stdlib HTTP, Cloudflare v4 envelopes)."""

    def __init__(self, url: str, token: str, account: str, zone: str, timeout: float = 30) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.account = account
        self.zone = zone
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None, *, raw: bool = False) -> Any:
        """Call the API; return the envelope's result (or the raw bytes)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            payload = exc.read()
            try:
                errors = json.loads(payload)["errors"]
                message = "; ".join(e["message"] for e in errors)
            except (ValueError, KeyError, TypeError):
                message = payload.decode("utf-8", "replace")[:200]
            raise AdminError(f"HTTP {exc.code}: {message}", exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminError(f"cannot reach the admin API at {self.url}: {reason}") from None
        if raw:
            return payload
        return json.loads(payload)["result"]

    def account_path(self, rest: str) -> str:
        return f"/client/v4/accounts/{self.account}/access{rest}"

    def zone_path(self, rest: str) -> str:
        return f"/client/v4/zones/{self.zone}{rest}"


def _env(name: str) -> str | None:
    return os.environ.get(f"TESTBED_{name}")


def add_admin_parser(enforcer_sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``admin`` and its subcommands to the ``testbed enforcer`` parser."""
    admin = enforcer_sub.add_parser("admin", help="manage a running enforcer through its admin API")
    admin.add_argument(
        "--url",
        default=_env("ADMIN_URL") or "http://127.0.0.1:8444",
        help="admin API URL (env TESTBED_ADMIN_URL; default http://127.0.0.1:8444)",
    )
    admin.add_argument(
        "--token", default=_env("ADMIN_TOKEN"), help="bearer token (env TESTBED_ADMIN_TOKEN)"
    )
    admin.add_argument(
        "--token-file",
        default=_env("ADMIN_TOKEN_FILE"),
        help="file holding the bearer token (env TESTBED_ADMIN_TOKEN_FILE)",
    )
    admin.add_argument(
        "--account",
        default=_env("ACCOUNT") or "demo",
        help="account id (env TESTBED_ACCOUNT; default demo, as in the config)",
    )
    admin.add_argument(
        "--zone", default=_env("ZONE") or "demo", help="zone id (env TESTBED_ZONE; default demo)"
    )
    admin.add_argument(
        "--json", action="store_true", help="print the API's JSON result instead of tables"
    )
    sub = admin.add_subparsers(dest="admin_command", required=True)

    sub.add_parser("show", help="everything: mTLS switch, roots, applications, policies, CA, keys")

    mtls = sub.add_parser("mtls", help="the account's mTLS switch").add_subparsers(
        dest="op", required=True
    )
    mtls.add_parser("show")
    mtls.add_parser("enable", help="enable mTLS (it cannot be disabled afterwards)")

    roots = sub.add_parser("roots", help="mTLS root certificates").add_subparsers(
        dest="op", required=True
    )
    roots.add_parser("list")
    up = roots.add_parser(
        "upload", help="upload a root (PEM: optional intermediates, then the root)"
    )
    up.add_argument("--name", required=True)
    up.add_argument("--cert", required=True, type=Path, help="PEM file")
    up.add_argument(
        "--hostname", action="append", default=[], help="an associated hostname (repeat)"
    )
    for name in ("show", "delete"):
        roots.add_parser(name).add_argument("id")
    upd = roots.add_parser("update", help="replace the associated hostnames")
    upd.add_argument("id")
    upd.add_argument(
        "--hostname",
        action="append",
        default=[],
        help="an associated hostname (repeat; none clears)",
    )

    rc = roots.add_parser(
        "crl",
        help="a root's CRL: upload one (--file), show it (--show), or set how it is fetched",
        description="Upload a CRL (PEM or DER) issued by the root or one of its uploaded "
        "intermediates, show the CRL in force, or set the root's CRL URL, refresh period and "
        "fail-open choice. A CRL past its nextUpdate denies (revocation_unknown) unless the "
        "root fails open.",
    )
    rc.add_argument("id")
    what = rc.add_mutually_exclusive_group()
    what.add_argument("--file", type=Path, help="a CRL file, PEM or DER")
    what.add_argument("--show", action="store_true", help="show the CRL in force (default)")
    # dest names of their own: the admin parser's --url (the API's) must not be overwritten.
    rc.add_argument(
        "--url", dest="crl_url", help="fetch the CRL from this http:// URL ('' stops fetching)"
    )
    rc.add_argument(
        "--refresh", dest="crl_refresh", help="how often to fetch it (a duration such as 1h)"
    )
    fail = rc.add_mutually_exclusive_group()
    fail.add_argument(
        "--fail-open",
        dest="fail_open",
        action="store_const",
        const=True,
        help="admit (with a note) when the CRL is past its nextUpdate",
    )
    fail.add_argument(
        "--fail-closed",
        dest="fail_open",
        action="store_const",
        const=False,
        help="deny revocation_unknown when the CRL is past its nextUpdate (the default)",
    )

    revs = sub.add_parser(
        "revocations", help="revoke certificates by serial (under a root) or SHA-256"
    ).add_subparsers(dest="op", required=True)
    revs.add_parser("list")
    radd = revs.add_parser(
        "add",
        help="revoke: --root ID --serial HEX, or --sha256 HEX",
        description="Revoke a certificate issued under an uploaded root by its serial number "
        "(--root and --serial), or any certificate by its SHA-256 fingerprint (--sha256). "
        "It is denied 'revoked' at once, and its tokens stop admitting.",
    )
    radd.add_argument("--root", help="the uploaded root's id (see `roots list`)")
    radd.add_argument("--serial", help="the certificate's serial number, hex")
    radd.add_argument("--sha256", help="the certificate's SHA-256 fingerprint, hex")
    revs.add_parser("delete", help="lift a revocation").add_argument("id")

    apps = sub.add_parser("apps", help="applications").add_subparsers(dest="op", required=True)
    apps.add_parser("list")
    create = apps.add_parser("create")
    create.add_argument("--name")
    create.add_argument("--hostname", required=True)
    create.add_argument("--origin", required=True, help="http:// URL requests are forwarded to")
    for p in (create,):
        p.add_argument("--session-duration", default="24h", help="Go duration; 0s = No Duration")
    create.add_argument("--forward-client-cert", action="store_true")
    create.add_argument(
        "--bind-token-to-cert",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a token admits only beside its certificate (the API's default: on); "
        "--no-bind-token-to-cert lets a cookie admit alone",
    )
    for name in ("show", "delete"):
        apps.add_parser(name).add_argument("id")
    aupd = apps.add_parser("update")
    aupd.add_argument("id")
    aupd.add_argument("--session-duration")
    aupd.add_argument("--origin")
    aupd.add_argument("--name")

    pol = sub.add_parser("policies", help="an application's policies").add_subparsers(
        dest="op", required=True
    )
    pol.add_parser("list").add_argument("app")
    pc = pol.add_parser(
        "create", help=f"rules are KIND or KIND=VALUE, KIND one of {', '.join(RULE_KINDS)}"
    )
    pc.add_argument("app")
    pc.add_argument("--name", required=True)
    pc.add_argument(
        "--decision", default="non_identity", choices=["non_identity", "allow", "deny", "bypass"]
    )
    pc.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="RULE",
        help="e.g. certificate, common_name=device-001",
    )
    pc.add_argument("--require", action="append", default=[], metavar="RULE")
    pc.add_argument("--exclude", action="append", default=[], metavar="RULE")
    pc.add_argument("--session-duration")
    pd = pol.add_parser("delete")
    pd.add_argument("app")
    pd.add_argument("id")

    certs = sub.add_parser(
        "certs", help="the zone's managed CA and its client certificates"
    ).add_subparsers(dest="op", required=True)
    cl = certs.add_parser("list")
    cl.add_argument("--status", choices=["active", "revoked"])
    issue = certs.add_parser("issue", help="issue a client certificate from a CSR")
    issue.add_argument("--csr", required=True, type=Path)
    issue.add_argument("--validity-days", type=int, default=365)
    issue.add_argument("--out", type=Path, help="write the certificate PEM here")
    for name in ("show", "revoke", "reactivate"):
        certs.add_parser(name).add_argument("id")
    for name in ("ca", "crl"):
        certs.add_parser(name).add_argument("--out", type=Path)
    hn = certs.add_parser("hostnames", help="set the hostnames that trust the zone's managed CA")
    hn.add_argument("--hostname", action="append", default=[])

    ends = sub.add_parser(
        "revoke-sessions",
        help="end sessions: tokens (cookies) minted before a time stop admitting",
        description="End sessions: every token of one application minted before now "
        "(--app), or of every application of the account minted before --before "
        "(ISO-8601 with a zone; default now). Devices with a valid certificate are admitted "
        "again by it and get a new cookie.",
    )
    scope = ends.add_mutually_exclusive_group()
    scope.add_argument("--app", help="the application's id (see `apps list`)")
    scope.add_argument(
        "--before", help="account-wide: end tokens minted before this time (default now)"
    )

    idps = sub.add_parser(
        "idps", help="identity providers (OpenID Connect) that log people in"
    ).add_subparsers(dest="op", required=True)
    idps.add_parser("list")
    iadd = idps.add_parser("add", help="add an OpenID Connect provider to the account")
    iadd.add_argument("--name", required=True)
    iadd.add_argument("--issuer-url", required=True, help="https:// issuer (discovery base)")
    iadd.add_argument("--client-id", required=True)
    secret = iadd.add_mutually_exclusive_group(required=True)
    # Never on the command line itself: other users can read a process's arguments.
    secret.add_argument("--client-secret-file", type=Path, help="file holding the client secret")
    secret.add_argument("--client-secret-env", help="environment variable holding it")
    iadd.add_argument("--scope", action="append", help="repeat; default openid email profile")
    iadd.add_argument("--email-claim", help="the ID token claim holding the email (email)")
    iadd.add_argument("--groups-claim", help="the ID token claim holding the groups (groups)")
    for url in ("auth", "token", "certs"):
        iadd.add_argument(f"--{url}-url", help=f"override discovery's {url} endpoint")
    iadd.add_argument("--no-pkce", action="store_true", help="do not send a PKCE challenge")
    iadd.add_argument("--algorithm", action="append", help="allowed ID token algorithm; repeat")
    iadd.add_argument("--ca-file", type=Path, help="PEM CA that verifies the provider's https")
    for name in ("show", "delete"):
        idps.add_parser(name).add_argument("id")

    tokens = sub.add_parser(
        "service-tokens", help="service tokens (CF-Access-Client-Id/-Secret) for machines"
    ).add_subparsers(dest="op", required=True)
    tokens.add_parser("list")
    tc = tokens.add_parser("create", help="create a token; its secret is printed this once")
    tc.add_argument("--name", required=True)
    tc.add_argument("--duration", help="Go duration until it expires (default 8760h)")
    for name, what in (
        ("show", "show a token (never its secret)"),
        ("revoke", "delete the token: it stops admitting at once"),
        ("refresh", "extend the token: it expires one duration from now"),
        ("rotate", "a new secret, printed this once; the old one stops at once"),
    ):
        tokens.add_parser(name, help=what).add_argument("id")

    keys = sub.add_parser("keys", help="token signing keys").add_subparsers(
        dest="op", required=True
    )
    keys.add_parser("show")
    keys.add_parser(
        "rotate", help="new signing keys; the replaced ones stay accepted for the grace period"
    ).add_argument(
        "--algorithm",
        choices=("RS256", "ES256", "EdDSA"),
        help="replace only this algorithm's key (one nobody uses becomes the default; "
        "default: replace every current key)",
    )

    signing = sub.add_parser(
        "signing", help="the account's token algorithm (access-flow J7)"
    ).add_subparsers(dest="op", required=True)
    signing.add_parser("show")
    signing.add_parser("set", help="sign the account's tokens with ALGORITHM").add_argument(
        "algorithm", choices=("RS256", "ES256", "EdDSA")
    )
    signing.add_parser("default", help="follow the enforcer's default algorithm again")


def _table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> Table:
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(row.get(col)) for col in columns))
    return table


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _rules(texts: Sequence[str]) -> list[dict[str, Any]]:
    return [rule_from_text(t) for t in texts]


def _policy_rows(policies: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            **p,
            "rules": "; ".join(
                f"{k}: {_cell(p[k])}" for k in ("include", "require", "exclude") if p.get(k)
            ),
        }
        for p in policies
    ]


def run_admin(args: argparse.Namespace, console: Console | None = None) -> int:
    """Run one admin subcommand; return the exit code."""
    console = console or Console(soft_wrap=True)
    problem = _not_text(args)
    if problem:
        Console(stderr=True, soft_wrap=True).print(f"error: {problem}", highlight=False)
        return EXIT_USAGE
    token = args.token
    if not token and args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            console.print(f"error: --token-file {args.token_file}: {exc.strerror}", highlight=False)
            return EXIT_USAGE
    if not token:
        console.print(
            "error: no admin token: use --token, --token-file or TESTBED_ADMIN_TOKEN",
            highlight=False,
        )
        return EXIT_USAGE
    client = AdminClient(args.url, token, args.account, args.zone)
    try:
        result, render = _dispatch(args, client)
    except AdminError as exc:
        Console(stderr=True, soft_wrap=True).print(f"error: {exc}", highlight=False)
        return EXIT_API_ERROR
    except (PolicyError, OSError) as exc:
        Console(stderr=True, soft_wrap=True).print(f"error: {exc}", highlight=False)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        render(console)
    return 0


def _not_text(args: argparse.Namespace) -> str | None:
    """Name the first argument that is not valid text (a lone surrogate), or return None."""
    # Python turns command-line bytes that are not UTF-8 into lone surrogates ('\udc80'), which
    # no URL, JSON consumer or terminal can carry: refuse them here, naming the option.
    for name, value in vars(args).items():
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, str):
                continue
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return (
                    f"{name.replace('_', '-')}: {item!a} is not valid UTF-8 text; check the "
                    "terminal's encoding or the script that built the command"
                )
    return None


def _dispatch(args: argparse.Namespace, c: AdminClient) -> tuple[Any, Callable[[Console], None]]:
    cmd, op = args.admin_command, getattr(args, "op", None)
    A, Z = c.account_path, c.zone_path
    root_cols = ["id", "name", "associated_hostnames", "fingerprint", "expires_on"]
    app_cols = ["id", "name", "hostname", "session_duration", "origin"]
    cert_cols = ["id", "common_name", "status", "serial_number", "expires_on"]

    def show_one(obj: dict[str, Any], title: str) -> Callable[[Console], None]:
        return lambda con: con.print(
            _table(
                title, [{"field": k, "value": _cell(v)} for k, v in obj.items()], ["field", "value"]
            )
        )

    if cmd == "show":
        everything = {
            "mtls": c.call("GET", A("/mtls")),
            "roots": c.call("GET", A("/certificates")),
            "apps": c.call("GET", A("/apps")),
            "keys": c.call("GET", A("/keys")),
            "identity_providers": c.call("GET", A("/identity_providers")),
            "service_tokens": c.call("GET", A("/service_tokens")),
        }
        try:
            everything["managed_ca"] = c.call("GET", Z("/client_certificates/ca"))
            everything["client_certificates"] = c.call("GET", Z("/client_certificates"))
        except AdminError as exc:
            if exc.status != 404:
                raise
            everything["managed_ca"] = None
            everything["client_certificates"] = []

        def render(con: Console) -> None:
            enabled = everything["mtls"]["enabled"]
            con.print(f"account {c.account}: mTLS {'enabled' if enabled else 'not enabled'}")
            con.print(_table("mTLS certificates", everything["roots"], root_cols))
            con.print(_table("applications", everything["apps"], app_cols))
            for app in everything["apps"]:
                con.print(
                    _table(
                        f"policies of {app['hostname']}",
                        _policy_rows(app["policies"]),
                        ["id", "name", "decision", "rules"],
                    )
                )
            ca = everything["managed_ca"]
            con.print(
                f"zone {c.zone} managed CA: "
                + (f"trusted on {_cell(ca['hostnames']) or 'no hostname'}" if ca else "none yet")
            )
            con.print(_table("client certificates", everything["client_certificates"], cert_cols))
            idp_rows = [
                {"id": i["id"], "name": i["name"], "issuer_url": i["config"]["issuer_url"]}
                for i in everything["identity_providers"]
            ]
            con.print(_table("identity providers", idp_rows, ["id", "name", "issuer_url"]))
            con.print(
                _table(
                    "service tokens",
                    everything["service_tokens"],
                    ["id", "name", "client_id", "expires_at"],
                )
            )
            con.print(
                _table(
                    "signing keys",
                    everything["keys"]["keys"],
                    ["kid", "created_at", "accepted_until"],
                )
            )

        return everything, render
    if cmd == "mtls":
        result = (
            c.call("PUT", A("/mtls"), {"enabled": True})
            if op == "enable"
            else c.call("GET", A("/mtls"))
        )
        return result, lambda con: con.print(
            f"account {c.account}: mTLS {'enabled' if result['enabled'] else 'not enabled'}"
        )
    if cmd == "roots" and op != "crl":
        if op == "list":
            rows = c.call("GET", A("/certificates"))
            return rows, lambda con: con.print(_table("mTLS certificates", rows, root_cols))
        if op == "upload":
            body = {
                "name": args.name,
                "certificate": args.cert.read_text(),
                "associated_hostnames": args.hostname,
            }
            obj = c.call("POST", A("/certificates"), body)
        elif op == "update":
            obj = c.call(
                "PUT", A(f"/certificates/{args.id}"), {"associated_hostnames": args.hostname}
            )
        elif op == "delete":
            obj = c.call("DELETE", A(f"/certificates/{args.id}"))
        else:
            obj = c.call("GET", A(f"/certificates/{args.id}"))
        return obj, show_one(
            {k: v for k, v in obj.items() if k != "certificate"}, "mTLS certificate"
        )
    if cmd == "roots" and op == "crl":
        return _root_crl(args, c)
    if cmd == "revocations":
        return _revocations(args, c)
    if cmd == "apps":
        if op == "list":
            rows = c.call("GET", A("/apps"))
            return rows, lambda con: con.print(_table("applications", rows, app_cols))
        if op == "create":
            body = {
                "name": args.name or args.hostname,
                "domain": args.hostname,
                "origin": args.origin,
                "session_duration": args.session_duration,
                "forward_client_certificate": args.forward_client_cert,
            }
            if args.bind_token_to_cert is not None:  # else the API's default (bound)
                body["bind_token_to_certificate"] = args.bind_token_to_cert
            obj = c.call("POST", A("/apps"), body)
        elif op == "update":
            body = {
                k: v
                for k, v in {
                    "session_duration": args.session_duration,
                    "origin": args.origin,
                    "name": args.name,
                }.items()
                if v is not None
            }
            obj = c.call("PUT", A(f"/apps/{args.id}"), body)
        elif op == "delete":
            obj = c.call("DELETE", A(f"/apps/{args.id}"))
        else:
            obj = c.call("GET", A(f"/apps/{args.id}"))
        return obj, show_one(obj, "application")
    if cmd == "policies":
        if op == "list":
            rows = c.call("GET", A(f"/apps/{args.app}/policies"))
            return rows, lambda con: con.print(
                _table("policies", _policy_rows(rows), ["id", "name", "decision", "rules"])
            )
        if op == "create":
            body: dict[str, Any] = {
                "name": args.name,
                "decision": args.decision,
                "include": _rules(args.include),
                "require": _rules(args.require),
                "exclude": _rules(args.exclude),
            }
            if args.session_duration:
                body["session_duration"] = args.session_duration
            obj = c.call("POST", A(f"/apps/{args.app}/policies"), body)
        else:
            obj = c.call("DELETE", A(f"/apps/{args.app}/policies/{args.id}"))
        return obj, show_one(obj, "policy")
    if cmd == "certs":
        if op == "list":
            query = f"?status={args.status}" if args.status else ""
            rows = c.call("GET", Z(f"/client_certificates{query}"))
            return rows, lambda con: con.print(_table("client certificates", rows, cert_cols))
        if op in ("ca", "crl"):
            pem = (
                c.call("GET", Z("/client_certificates/ca"))["certificate"]
                if op == "ca"
                else c.call("GET", Z("/client_certificates/crl"), raw=True).decode()
            )
            if args.out:
                args.out.write_text(pem)
            return {"pem": pem}, lambda con: con.print(
                f"wrote {args.out}" if args.out else pem, highlight=False
            )
        if op == "hostnames":
            obj = c.call(
                "PUT",
                Z("/certificate_authorities/hostname_associations"),
                {"hostnames": args.hostname},
            )
            return obj, show_one(obj, f"zone {c.zone} managed CA")
        if op == "issue":
            obj = c.call(
                "POST",
                Z("/client_certificates"),
                {"csr": args.csr.read_text(), "validity_days": args.validity_days},
            )
            if args.out:
                args.out.write_text(obj["certificate"])
        elif op == "revoke":
            obj = c.call("DELETE", Z(f"/client_certificates/{args.id}"))
        elif op == "reactivate":
            obj = c.call("PATCH", Z(f"/client_certificates/{args.id}"), {"reactivate": True})
        else:
            obj = c.call("GET", Z(f"/client_certificates/{args.id}"))
        view = {k: v for k, v in obj.items() if k not in ("certificate", "csr")}
        return obj, show_one(view, "client certificate")
    if cmd == "revoke-sessions":
        if args.app:
            obj = c.call("POST", A(f"/apps/{args.app}/revoke_tokens"))
            title = f"sessions of application {args.app} ended"
        else:
            obj = c.call(
                "POST", A("/revoke_tokens"), {"before": args.before} if args.before else {}
            )
            title = f"sessions of account {c.account} ended"
        return obj, show_one(obj, title)
    if cmd == "idps":
        return _idps(args, c)
    if cmd == "service-tokens":
        return _service_tokens(args, c)
    if cmd == "signing":
        if op == "show":
            result = c.call("GET", A("/signing"))
        else:
            chosen = args.algorithm if op == "set" else None
            result = c.call("PUT", A("/signing"), {"algorithm": chosen})
        own = "its own setting" if result["setting"] else "the enforcer's default"
        return result, lambda con: con.print(
            f"account {c.account}: tokens {result['algorithm']} ({own}), key {result['kid']}"
        )
    if cmd == "keys":
        if op == "rotate":
            body = {"algorithm": args.algorithm} if args.algorithm else None
            obj = c.call("POST", A("/keys/rotate"), body)
        else:
            obj = c.call("GET", A("/keys"))
        if op == "rotate":
            return obj, show_one(obj, "new signing key")
        return obj, lambda con: con.print(
            _table(
                "signing keys", obj["keys"], ["kid", "algorithm", "created_at", "accepted_until"]
            )
        )
    raise AdminError(f"unknown admin command {cmd}")


def _root_crl(args: argparse.Namespace, c: AdminClient) -> tuple[Any, Callable[[Console], None]]:
    """``roots crl``: set the fetch settings, upload a CRL, then show the CRL in force."""
    path = c.account_path(f"/certificates/{args.id}")
    settings: dict[str, Any] = {}
    if args.crl_url is not None:
        settings["crl_url"] = args.crl_url or None
    if args.crl_refresh is not None:
        settings["crl_refresh"] = args.crl_refresh
    if args.fail_open is not None:
        settings["crl_fail_open"] = args.fail_open
    if settings:
        c.call("PUT", path, settings)
    if args.file is not None:
        data = args.file.read_bytes()
        body = (
            {"crl": data.decode("ascii", "replace")}
            if data.lstrip().startswith(b"-----BEGIN")
            else {"crl_der_base64": base64.b64encode(data).decode()}
        )
        obj = c.call("PUT", path + "/crl", body)
    elif settings and not args.show:
        obj = {k: v for k, v in c.call("GET", path).items() if k.startswith("crl_")}
        return obj, _fields(obj, f"CRL settings of {args.id}")
    else:
        obj = c.call("GET", path + "/crl")
    return obj, _fields({k: v for k, v in obj.items() if k != "crl"}, f"CRL of {args.id}")


def _revocations(args: argparse.Namespace, c: AdminClient) -> tuple[Any, Callable[[Console], None]]:
    """``revocations list | add | delete``."""
    path = c.account_path("/revocations")
    cols = ["id", "type", "certificate_id", "serial_number", "fingerprint_sha256", "created_at"]
    if args.op == "list":
        rows = c.call("GET", path)
        return rows, lambda con: con.print(_table("revocations", rows, cols))
    if args.op == "delete":
        obj = c.call("DELETE", f"{path}/{args.id}")
        return obj, _fields(obj, "revocation lifted")
    if args.sha256 and not (args.root or args.serial):
        body: dict[str, Any] = {"fingerprint_sha256": args.sha256}
    elif args.root and args.serial and not args.sha256:
        body = {"certificate_id": args.root, "serial_number": args.serial}
    else:
        raise AdminError("revocations add: give --root ID --serial HEX, or --sha256 HEX")
    obj = c.call("POST", path, body)
    return obj, _fields(obj, "revoked")


def _idps(args: argparse.Namespace, c: AdminClient) -> tuple[Any, Callable[[Console], None]]:
    """``idps list | add | show | delete``."""
    path = c.account_path("/identity_providers")
    if args.op == "list":
        rows = [
            {**{k: r[k] for k in ("id", "name", "type")}, "issuer_url": r["config"]["issuer_url"]}
            for r in c.call("GET", path)
        ]
        return rows, lambda con: con.print(
            _table("identity providers", rows, ["id", "name", "type", "issuer_url"])
        )
    if args.op == "add":
        if args.client_secret_file is not None:
            secret = args.client_secret_file.read_text().strip()
        else:
            secret = os.environ.get(args.client_secret_env, "")
            if not secret:
                raise AdminError(f"--client-secret-env: {args.client_secret_env} is unset or empty")
        config: dict[str, Any] = {
            "issuer_url": args.issuer_url,
            "client_id": args.client_id,
            "client_secret": secret,
        }
        optional = {
            "scopes": args.scope,
            "email_claim_name": args.email_claim,
            "groups_claim": args.groups_claim,
            "auth_url": args.auth_url,
            "token_url": args.token_url,
            "certs_url": args.certs_url,
            "allowed_algorithms": args.algorithm,
            "ca_pem": args.ca_file.read_text() if args.ca_file else None,
        }
        config.update({k: v for k, v in optional.items() if v is not None})
        if args.no_pkce:
            config["pkce_enabled"] = False
        obj = c.call("POST", path, {"name": args.name, "type": "oidc", "config": config})
    elif args.op == "delete":
        obj = c.call("DELETE", f"{path}/{args.id}")
        return obj, _fields(obj, "identity provider deleted")
    else:
        obj = c.call("GET", f"{path}/{args.id}")
    flat = {k: v for k, v in obj.items() if k != "config"}
    flat.update({k: v for k, v in obj["config"].items() if k != "ca_pem"})
    return obj, _fields(flat, "identity provider")


def _service_tokens(
    args: argparse.Namespace, c: AdminClient
) -> tuple[Any, Callable[[Console], None]]:
    """``service-tokens list | create | show | revoke | refresh | rotate``."""
    path = c.account_path("/service_tokens")
    cols = ["id", "name", "client_id", "duration", "expires_at"]
    if args.op == "list":
        rows = c.call("GET", path)
        return rows, lambda con: con.print(_table("service tokens", rows, cols))
    if args.op == "create":
        body = {"name": args.name}
        if args.duration is not None:
            body["duration"] = args.duration
        obj = c.call("POST", path, body)
    elif args.op == "revoke":
        obj = c.call("DELETE", f"{path}/{args.id}")
        return obj, _fields(obj, "service token revoked")
    elif args.op in ("refresh", "rotate"):
        obj = c.call("POST", f"{path}/{args.id}/{args.op}")
    else:
        obj = c.call("GET", f"{path}/{args.id}")
    shown = _fields({k: v for k, v in obj.items() if k != "client_secret"}, "service token")
    if "client_secret" not in obj:
        return obj, shown

    def render(con: Console) -> None:
        shown(con)
        # On lines of their own, never folded by a table: they are copied as they are.
        con.print(f"client_id: {obj['client_id']}", highlight=False, soft_wrap=True)
        con.print(f"client_secret: {obj['client_secret']}", highlight=False, soft_wrap=True)
        con.print(
            "[bold]Copy the client secret now: it is never shown again.[/] Clients send "
            "CF-Access-Client-Id and CF-Access-Client-Secret headers.",
            highlight=False,
        )

    return obj, render


def _fields(obj: dict[str, Any], title: str) -> Callable[[Console], None]:
    rows = [{"field": k, "value": _cell(v)} for k, v in obj.items()]
    return lambda con: con.print(_table(title, rows, ["field", "value"]))
