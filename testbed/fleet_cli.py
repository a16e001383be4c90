"""``testbed fleet provision``: a device fleet's CAs, certificates, keys and inventory on disk."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from devices.keystore import KeyStoreError
from devices.pkcs11 import TOKEN_KEY_TYPES, Pkcs11Config
from devices.pki import KEY_TYPES
from devices.provision import (
    DEFAULT_P12_PASSWORD,
    DEFECTS,
    MAX_INTERMEDIATES,
    Cohort,
    FleetError,
    check_out_dir,
    expected_outcome,
    export_p12,
    parse_cohort,
    plan_cohorts,
    provision,
)

EXIT_FAILED = 1
EXIT_USAGE = 2

_NOTES = {
    "wrong-cn": " (denied:policy_denied under a Common Name policy)",
    "missing-intermediate": " (the enforcer must know ca/known-intermediates.pem)",
    "revoked": " (once revoked by the inventory's sha256)",
}
EPILOG = f"""\
cohorts: --cohort NAME=COUNT[:DEFECT] carves COUNT devices out of --size; the rest form the
cohort 'healthy', which takes the first ids. Defects, and the outcome each device records
(under a Valid Certificate policy):
{chr(10).join(f"  {d:<21} {o}{_NOTES.get(d, '')}" for d, o in DEFECTS.items())}

example:
  testbed fleet provision --size 1000 --out fleet --cohort expired=50:expired \\
      --cohort rogue=10:wrong-cn --cohort lost=5:missing-intermediate

Upload DIR/ca/upload.pem to the enforcer. Each DIR/devices/<id>/ holds cert.pem and key.pem;
device.p12 (password '{DEFAULT_P12_PASSWORD}' unless --p12-password) is made on demand by
`testbed fleet export-p12 --fleet DIR [--id ID ...]`, or up front with --p12 (slow: ~10 ms a
device). DIR/inventory.sqlite lists every device with its expected outcome.
"""


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"TESTBED_{name}", default)


def add_fleet_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``fleet`` and its subcommands to the top-level ``testbed`` parser."""
    fleet = sub.add_parser("fleet", help="provision device fleets")
    actions = fleet.add_subparsers(dest="action", required=True)
    p = actions.add_parser(
        "provision",
        help="issue a fleet's CAs and device certificates into a folder",
        description="Issue a CA hierarchy and a fleet of device certificates, with deliberate "
        "defects per cohort, into a folder, plus an inventory of expected outcomes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--size",
        metavar="N",
        type=int,
        default=_env("FLEET_SIZE"),
        required=_env("FLEET_SIZE") is None,
        help="devices in the fleet, all cohorts included (env TESTBED_FLEET_SIZE)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        default=_env("FLEET_OUT"),
        required=_env("FLEET_OUT") is None,
        help="folder to write; must be missing or empty (env TESTBED_FLEET_OUT)",
    )
    p.add_argument(
        "--cohort",
        action="append",
        default=None,
        metavar="NAME=COUNT[:DEFECT]",
        help="a cohort of COUNT devices, with a defect if given; repeatable "
        "(env TESTBED_FLEET_COHORTS, whitespace-separated)",
    )
    p.add_argument(
        "--key-type",
        choices=KEY_TYPES,
        default=_env("FLEET_KEY_TYPE", "ec-p256"),
        help="device key type (default ec-p256; rsa-2048 keys take ~70 ms each to generate; "
        "env TESTBED_FLEET_KEY_TYPE)",
    )
    p.add_argument(
        "--intermediates",
        metavar="N",
        type=int,
        default=_env("FLEET_INTERMEDIATES", "1"),
        help=f"intermediate CAs below the root, 0 to {MAX_INTERMEDIATES} (default 1; "
        "env TESTBED_FLEET_INTERMEDIATES)",
    )
    p.add_argument(
        "--p12-password",
        metavar="P",
        default=_env("P12_PASSWORD", DEFAULT_P12_PASSWORD),
        help=f"password of every device.p12 (default {DEFAULT_P12_PASSWORD!r}; "
        "env TESTBED_P12_PASSWORD)",
    )
    p.add_argument(
        "--p12-kdf-rounds",
        metavar="N",
        type=int,
        default=_env("P12_KDF_ROUNDS"),
        help="PBKDF2 rounds of device.p12 (default 2048, what `openssl pkcs12 -export` uses: "
        "PBES2 AES-256-CBC, HMAC-SHA256 MAC; key.pem beside it is unencrypted anyway; "
        "env TESTBED_P12_KDF_ROUNDS)",
    )
    p.add_argument(
        "--p12",
        action="store_true",
        help="also make every device.p12 now (its encryption is ~80x a device's other cost; "
        "by default they are made on demand by 'testbed fleet export-p12')",
    )
    p.add_argument(
        "--no-p12",
        action="store_true",
        help="record no PKCS#12 password either (export-p12 then needs --password)",
    )
    p.add_argument(
        "--workers",
        metavar="W",
        type=int,
        default=_env("FLEET_WORKERS"),
        help="issuing processes (default: one per CPU for 200 devices or more; "
        "env TESTBED_FLEET_WORKERS)",
    )
    p.add_argument(
        "--cn-prefix",
        metavar="PREFIX",
        default=_env("FLEET_CN_PREFIX", "device-"),
        help="device id and CN prefix (default 'device-'; env TESTBED_FLEET_CN_PREFIX)",
    )
    p.add_argument(
        "--now",
        metavar="TIME",
        default=_env("FLEET_NOW"),
        help="ISO 8601 time the validity windows are relative to (default: the current time; "
        "env TESTBED_FLEET_NOW)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a fleet already in --out (never a folder holding anything else)",
    )
    p.add_argument(
        "--key-store",
        choices=("software", "pkcs11"),
        default=_env("FLEET_KEY_STORE", "software"),
        help="where device keys are made: key.pem files (software, default) or a PKCS#11 "
        "token (pkcs11: generated there, never extractable; the CSR is signed there and the "
        "certificate stored beside the key; env TESTBED_FLEET_KEY_STORE)",
    )
    p.add_argument(
        "--module",
        metavar="PATH",
        default=_env("PKCS11_MODULE"),
        help="PKCS#11 module of --key-store pkcs11, e.g. /usr/lib/softhsm/libsofthsm2.so or "
        "Yubico's libykcs11.so (env TESTBED_PKCS11_MODULE)",
    )
    p.add_argument(
        "--token",
        metavar="LABEL",
        default=_env("PKCS11_TOKEN"),
        help="label of the token (env TESTBED_PKCS11_TOKEN)",
    )
    p.add_argument(
        "--slot",
        metavar="ID",
        type=int,
        default=_env("PKCS11_SLOT"),
        help="slot id of the token, instead of or besides its label (env TESTBED_PKCS11_SLOT)",
    )
    pin = p.add_mutually_exclusive_group()
    pin.add_argument(
        "--pin-env",
        metavar="VAR",
        help="environment variable holding the token's user PIN (default TESTBED_PKCS11_PIN "
        "unless --pin-file; never give a PIN on the command line)",
    )
    pin.add_argument(
        "--pin-file", metavar="FILE", help="file whose first line is the token's user PIN"
    )
    e = actions.add_parser(
        "export-p12",
        help="write device.p12 files for a provisioned fleet's devices",
        description="Write DIR/devices/<id>/device.p12 (mode 0600, password protected) for the "
        "given devices, or all of them, and record them in the inventory.",
    )
    e.add_argument("--fleet", metavar="DIR", required=True, help="the provisioned fleet folder")
    e.add_argument(
        "--id",
        action="append",
        default=None,
        metavar="ID",
        help="a device id; repeatable (default: every device)",
    )
    e.add_argument(
        "--password",
        metavar="P",
        default=_env("P12_PASSWORD"),
        help="PKCS#12 password (default: the one recorded at provisioning, normally "
        f"{DEFAULT_P12_PASSWORD!r}; env TESTBED_P12_PASSWORD)",
    )
    e.add_argument(
        "--kdf-rounds",
        metavar="N",
        type=int,
        default=_env("P12_KDF_ROUNDS"),
        help="PBKDF2 rounds (default 2048, what `openssl pkcs12 -export` uses; "
        "env TESTBED_P12_KDF_ROUNDS)",
    )


class UsageError(Exception):
    """A bad option value: the message names the option."""


def _cohorts(args: argparse.Namespace) -> list[Cohort]:
    specs = args.cohort if args.cohort is not None else (_env("FLEET_COHORTS") or "").split()
    if args.size < 1:
        raise UsageError(f"--size: expected 1 or more, got {args.size}")
    cohorts = []
    for spec in specs:
        try:
            cohorts.append(parse_cohort(spec))
        except ValueError as exc:
            raise UsageError(f"--cohort: {exc}") from None
    try:
        return plan_cohorts(args.size, cohorts)
    except ValueError as exc:
        raise UsageError(f"--cohort: {exc} (--size {args.size})") from None


def _now(text: str | None) -> dt.datetime:
    if text is None:
        return dt.datetime.now(dt.UTC)
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--now: {text!r} is not an ISO 8601 time") from None
    if when.tzinfo is None:
        raise UsageError(f"--now: {text!r} has no time zone; add Z or +00:00")
    return when.astimezone(dt.UTC)


def _check(args: argparse.Namespace) -> None:
    if not 0 <= args.intermediates <= MAX_INTERMEDIATES:
        raise UsageError(
            f"--intermediates: expected 0 to {MAX_INTERMEDIATES}, got {args.intermediates}"
        )
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers: expected 1 or more, got {args.workers}")
    if args.p12 and args.no_p12:
        raise UsageError("--p12: cannot be combined with --no-p12")
    if not args.no_p12 and not args.p12_password:
        raise UsageError("--p12-password: must not be empty (--no-p12 records none)")
    if args.p12_kdf_rounds is not None and args.p12_kdf_rounds < 1:
        raise UsageError(f"--p12-kdf-rounds: expected 1 or more, got {args.p12_kdf_rounds}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]*", args.cn_prefix):
        raise UsageError(
            f"--cn-prefix: {args.cn_prefix!r}: expected letters, digits, '.', '_' or '-'"
        )
    if args.key_store == "pkcs11":
        if not args.module:
            raise UsageError("--module: required with --key-store pkcs11")
        if not Path(args.module).is_file():
            raise UsageError(f"--module: {args.module}: no such file")
        if args.token is None and args.slot is None:
            raise UsageError("--token: name the token (or --slot) with --key-store pkcs11")
        if args.p12:
            raise UsageError("--p12: a key on a token cannot be exported into a device.p12")
        if args.key_type not in TOKEN_KEY_TYPES:
            raise UsageError(
                f"--key-type: {args.key_type} cannot be generated on a token here; "
                f"expected one of {', '.join(TOKEN_KEY_TYPES)}"
            )
        if args.pin_file is not None and not Path(args.pin_file).is_file():
            raise UsageError(f"--pin-file: {args.pin_file}: no such file")
        if args.pin_file is None and not os.environ.get(args.pin_env or "TESTBED_PKCS11_PIN"):
            raise UsageError(
                f"--pin-env: the environment variable {args.pin_env or 'TESTBED_PKCS11_PIN'} "
                "(the token's user PIN) is not set"
            )
    elif args.module or args.token or args.slot is not None or args.pin_env or args.pin_file:
        raise UsageError("--module/--token/--slot/--pin-*: only with --key-store pkcs11")
    try:
        check_out_dir(Path(args.out), force=args.force)
    except ValueError as exc:
        raise UsageError(f"--out: {exc}") from None


def summary(cohorts: list[Cohort]) -> Table:
    """The cohorts as a table: name, devices, defect and expected outcome."""
    table = Table(title="fleet", caption="expected outcomes under a Valid Certificate policy")
    table.add_column("cohort")
    table.add_column("devices", justify="right")
    table.add_column("defect")
    table.add_column("expected outcome")
    for c in cohorts:
        table.add_row(c.name, str(c.size), c.defect or "-", c.expected)
    return table


def _notes(out: Path, cohorts: list[Cohort], args: argparse.Namespace) -> list[str]:
    defects = {c.defect for c in cohorts}
    notes = [f"Upload {out}/ca/upload.pem (intermediates, then the root) to the enforcer."]
    if "missing-intermediate" in defects:
        notes.append(
            f"missing-intermediate: {out}/ca/known-intermediates.pem must be known to the "
            "enforcer but not uploaded with the fleet's root (else untrusted_issuer)."
        )
    if "revoked" in defects:
        notes.append("revoked: revoke the inventory's defect='revoked' rows by their sha256.")
    if "wrong-cn" in defects:
        outcome = expected_outcome("wrong-cn", "common_name")
        notes.append(f"wrong-cn: under a Common Name policy these are {outcome}.")
    if args.key_store == "pkcs11":
        notes.append(
            f"Keys live on token {args.token or args.slot} ({args.module}), labelled by device "
            "id; the inventory's key_path is each key's pkcs11: URI."
        )
    elif args.p12:
        notes.append(f"device.p12 password: {args.p12_password!r}")
    elif not args.no_p12:
        notes.append(
            f"device.p12 files: 'testbed fleet export-p12 --fleet {out}' makes them "
            f"(password {args.p12_password!r})."
        )
    return notes


def _fail(err: Console, message: str) -> int:
    # Escaped: messages quote user input, which may hold [brackets] rich would eat as markup.
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return EXIT_USAGE


def run_fleet(args: argparse.Namespace) -> int:
    """Run ``testbed fleet ...``."""
    err = Console(stderr=True, soft_wrap=True)
    if args.action == "export-p12":
        return _run_export(args, err)
    try:
        cohorts = _cohorts(args)
        now = _now(args.now)
        _check(args)
    except UsageError as exc:
        return _fail(err, str(exc))
    out = Path(args.out)
    total = sum(c.size for c in cohorts)
    token = None
    if args.key_store == "pkcs11":
        token = Pkcs11Config(
            Path(args.module),
            token=args.token,
            slot=args.slot,
            pin_env=None if args.pin_file else (args.pin_env or "TESTBED_PKCS11_PIN"),
            pin_file=Path(args.pin_file) if args.pin_file else None,
            key_label="(per device)",
        )
    # No auto-refresh: a refresh thread would keep provision() from forking its workers.
    progress = Progress(
        TextColumn("issuing"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        auto_refresh=False,
        transient=False,
    )
    task = progress.add_task("devices", total=total)

    def advance(done: int) -> None:
        progress.update(task, advance=done)
        progress.refresh()

    try:
        with progress:
            fleet = provision(
                out,
                cohorts,
                now,
                key_type=args.key_type,
                intermediates=args.intermediates,
                p12=args.p12,
                p12_password="" if args.no_p12 else args.p12_password,
                p12_kdf_rounds=args.p12_kdf_rounds,
                workers=args.workers,
                cn_prefix=args.cn_prefix,
                force=args.force,
                on_progress=advance,
                token=token,
            )
    except KeyboardInterrupt:
        err.print(f"fleet: interrupted; nothing was written to {out}", markup=False)
        return 130
    except ValueError as exc:  # what the checks above did not foresee, e.g. a racing writer
        return _fail(err, str(exc))
    except KeyStoreError as exc:  # the token: wrong PIN, no such token, full...
        _fail(err, f"--key-store pkcs11: {exc}; nothing written to {out}")
        return EXIT_FAILED
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        _fail(
            err, f"cannot write the fleet to {out}: {exc.strerror or exc}{where}; nothing written"
        )
        return EXIT_FAILED
    console = Console(soft_wrap=True)
    console.print(summary(cohorts))
    console.print(
        f"Provisioned {total} devices into {fleet.root} in {fleet.elapsed:.1f} s "
        f"({total / fleet.elapsed:.0f} devices/s).",
        markup=False,
        highlight=False,
    )
    for note in _notes(out, cohorts, args):
        console.print(note, markup=False, highlight=False)
    return 0


def _run_export(args: argparse.Namespace, err: Console) -> int:
    """Run ``testbed fleet export-p12``."""
    if args.kdf_rounds is not None and args.kdf_rounds < 1:
        return _fail(err, f"--kdf-rounds: expected 1 or more, got {args.kdf_rounds}")
    if args.password is not None and not args.password:
        return _fail(err, "--password: must not be empty")
    root = Path(args.fleet)
    if not (root / "inventory.sqlite").is_file():
        return _fail(err, f"--fleet: {root / 'inventory.sqlite'} is missing; not a fleet folder")
    try:
        done = export_p12(root, args.id, password=args.password, kdf_rounds=args.kdf_rounds)
    except FleetError as exc:
        return _fail(err, str(exc))
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        _fail(err, f"cannot write to {root}: {exc.strerror or exc}{where}")
        return EXIT_FAILED
    print(f"Wrote {len(done)} device.p12 files under {root / 'devices'} (mode 0600).")
    return 0
