"""Device certificates per second: ``devices.provision`` against a plain cryptography loop.

Each run provisions an all-healthy fleet of ``--size`` EC P-256 devices (one intermediate)
into a fresh folder under ``--tmp``, three ways: without PKCS#12, with PKCS#12 at
``--kdf-rounds`` PBKDF2 rounds, and with PKCS#12 the default way (``BestAvailableEncryption``,
20,000 rounds). Every figure is wall time of the whole ``provision()`` call: CAs, pool start,
key generation, signing, cert.pem/key.pem(/device.p12) per device, the inventory and the final
rename. It uses ``--workers`` processes (default: one per CPU).

The baseline, measured in the same run, is the plainest loop the cryptography library allows
for the same certificate: generate a key, build the certificate with ``CertificateBuilder``'s
chained calls (same name and extensions), sign; in ONE process, for ``--plain-seconds``,
writing nothing. The ratio ours/plain therefore mixes two opposite effects: we use W processes
(up to W times faster) and we write files and an inventory (slower). On a small VM the files
dominate, so pass ``--tmp /dev/shm`` to see the cost without the disk.

The machine is small, shared and noisy, and file-system speed varies between runs (a large
delete just before slows the next run), so compare figures from one run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cryptography
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from rich.console import Console
from rich.table import Table

from devices.pki import issue_ca
from devices.provision import Cohort, provision

TARGET = 100_000


def plain_loop(seconds: float, now: dt.datetime) -> tuple[int, float]:
    """Issue device certificates the plain way for ``seconds``; return (count, elapsed)."""
    root = issue_ca("bench root", now)
    inter = issue_ca("bench intermediate", now, issuer=root, path_length=0)
    usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    count, began = 0, time.perf_counter()
    deadline = began + seconds
    while time.perf_counter() < deadline:
        key = ec.generate_private_key(ec.SECP256R1())
        cn = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"device-{count:06d}")])
        (
            x509.CertificateBuilder()
            .subject_name(cn)
            .issuer_name(inter.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(inter.key.public_key()),
                critical=False,
            )
            .sign(inter.key, hashes.SHA256())
        )
        count += 1
    return count, time.perf_counter() - began


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its table, ratios, JSON line and rerun command."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20_000, help="devices per fleet (20,000)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    parser.add_argument("--plain-seconds", type=float, default=3.0, help="plain loop's time (3)")
    parser.add_argument(
        "--kdf-rounds",
        type=int,
        default=2048,
        help="PBKDF2 rounds of the fast P12 run (2048, OpenSSL's default)",
    )
    parser.add_argument(
        "--tmp", default=tempfile.gettempdir(), help="where the fleets go (e.g. /dev/shm)"
    )
    args = parser.parse_args(argv)
    now = dt.datetime.now(dt.UTC)
    console = Console(width=max(100, Console().width))

    console.print(f"plain loop: 1 process, {args.plain_seconds:g} s ...", highlight=False)
    plain_count, plain_s = plain_loop(args.plain_seconds, now)
    plain_rate = plain_count / plain_s

    runs = [
        ("fleet, no P12", {"p12": False}),
        (f"fleet, P12 {args.kdf_rounds} rounds", {"p12_kdf_rounds": args.kdf_rounds}),
        ("fleet, P12 default", {}),
    ]
    base = Path(tempfile.mkdtemp(prefix="bench-provision-", dir=args.tmp))
    rates: dict[str, float] = {}
    try:
        for i, (label, options) in enumerate(runs):
            console.print(f"{label}: {args.size} devices, {args.workers} workers ...")
            fleet = provision(
                base / f"fleet-{i}",
                [Cohort("healthy", args.size)],
                now,
                workers=args.workers,
                **options,
            )
            rates[label] = args.size / fleet.elapsed
    finally:
        # Deleted only at the end: a large delete slows the file system for the next run.
        shutil.rmtree(base, ignore_errors=True)

    table = Table(title=f"device certificates per second ({args.size} devices, {args.tmp})")
    for column in ("run", "processes", "devices/s", "ratio to plain", f"{TARGET:,} devices"):
        table.add_column(column, justify="left" if column == "run" else "right")
    table.add_row(
        "plain loop, no files",
        "1",
        f"{plain_rate:.0f}",
        "1.00",
        f"{TARGET / plain_rate:.0f} s",
    )
    for label, rate in rates.items():
        table.add_row(
            label,
            str(args.workers),
            f"{rate:.0f}",
            f"{rate / plain_rate:.2f}",
            f"{TARGET / rate:.0f} s",
        )
    console.print(table)
    no_p12, fast, best = rates.values()
    console.print(
        f"Ratio ours/plain: {no_p12 / plain_rate:.2f} without P12, {best / plain_rate:.2f} with "
        f"default P12 (ours: {args.workers} processes writing files; plain: 1 process, no files). "
        f"{TARGET:,} devices extrapolated: {TARGET / no_p12:.0f} s without P12, "
        f"{TARGET / fast:.0f} s with {args.kdf_rounds}-round P12, {TARGET / best:.0f} s with "
        "default P12.",
        highlight=False,
    )
    record = {
        "bench": "provision",
        "size": args.size,
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "tmp": args.tmp,
        "plain_per_s": round(plain_rate, 1),
        "no_p12_per_s": round(no_p12, 1),
        "p12_fast_per_s": round(fast, 1),
        "p12_fast_kdf_rounds": args.kdf_rounds,
        "p12_per_s": round(best, 1),
        "ratio_no_p12": round(no_p12 / plain_rate, 3),
        "ratio_p12": round(best / plain_rate, 3),
        "extrapolated_100k_s": {
            "no_p12": round(TARGET / no_p12, 1),
            "p12_fast": round(TARGET / fast, 1),
            "p12": round(TARGET / best, 1),
        },
        "python": platform.python_version(),
        "cryptography": cryptography.__version__,
    }
    print(json.dumps(record))
    rerun = [".venv/bin/python", "bench/provision.py", *(sys.argv[1:] if argv is None else argv)]
    print("rerun:", shlex.join(rerun))
    return 0


if __name__ == "__main__":
    sys.exit(main())
