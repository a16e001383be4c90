"""The crypto ceiling of full mTLS handshakes on this machine, beside what is measured.

What one full TLS 1.3 mTLS handshake costs the SERVER in public-key operations, as the
benchmark's handshakes run (EC P-256 edge certificate, X25519 key exchange, EC P-256 device
certificate with one intermediate, client certificate requested):

* X25519: one key generation and one shared-secret derivation (``openssl speed`` measures the
  derivation; a key generation is one scalar multiplication too, so it is counted as one more
  derivation);
* ECDSA P-256: one signature (the server's CertificateVerify with the edge key);
* ECDSA P-256 verifications: the client's CertificateVerify (proof of possession), then the
  chain: nginx verifies leaf-by-intermediate and intermediate-by-root (2). The enforcer's
  OpenSSL has no trust store (the access decision judges the chain), so in the handshake it
  can only check the leaf against the intermediate the client sent (1); then on a validation
  cache MISS cryptography's verifier checks the two chain signatures again (2), on a HIT none;
* RSA-2048 (enforcer only): one PKCS#1 v1.5 signature, the RS256 token minted per admitted
  request (access-flow A7).

Symmetric crypto, hashing, certificate parsing, the kernel's TCP work and everything else is
left out, so the ceiling is an upper bound no server reaches.

Then the enforcer's measured CPU per handshake is split, with two loops run in the same process
on this machine: OpenSSL's server side of the same full handshake (pyOpenSSL over memory BIOs,
the enforcer's own ``build_context``, a stdlib ``ssl`` client like the bench's; only the
server's calls are timed) and one RS256 token signature (``cryptography``, RSA-2048 PKCS#1
v1.5, as ``pyjwt`` signs). What is left is Python (trio, h11 on both sides, the origin hop, the
access log) and the kernel. Last, the **attainable ratio**: a server that did everything nginx
does at nginx's own cost and then signed the RS256 token access-flow A7 requires per admitted
request would reach ``nginx / (nginx + RS256)`` of nginx per CPU-second, and no more. The
split and the bound are printed per token algorithm the handshakes bench measured (RS256 and
ES256: one more ECDSA P-256 signature instead of the RSA one), against nginx and nginx-proxy.

The ceiling is computed per core from ``openssl speed`` (the system OpenSSL, which nginx and
the client use) and, as a cross-check, from the same operations timed through
``cryptography`` (the OpenSSL bundled with it, which the enforcer uses). The measured figures
are handshakes per server CPU-second (per core), from ``bench/handshakes.py``'s 1-worker run
(which this script runs and prints first, unless ``--from-json`` names a file holding it).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shlex
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, x25519
from rich.console import Console
from rich.table import Table

# Operations per handshake, by kind: x25519 (keygen + derive), ecdsa_sign, ecdsa_verify, rsa_sign.
PROFILES: dict[str, dict[str, int]] = {
    "nginx": {"x25519": 2, "ecdsa_sign": 1, "ecdsa_verify": 3, "rsa_sign": 0},
    "enforcer, validation cache hit": {
        "x25519": 2, "ecdsa_sign": 1, "ecdsa_verify": 2, "rsa_sign": 1,
    },
    "enforcer, validation cache miss": {
        "x25519": 2, "ecdsa_sign": 1, "ecdsa_verify": 4, "rsa_sign": 1,
    },
    "enforcer-ES256, validation cache hit": {  # the token is one more ECDSA P-256 signature
        "x25519": 2, "ecdsa_sign": 2, "ecdsa_verify": 2, "rsa_sign": 0,
    },
}  # fmt: skip
# The handshakes bench's target each profile's measured figure comes from (None: not measured).
MEASURED_AS = {
    "nginx": "nginx",
    "enforcer, validation cache hit": "enforcer",
    "enforcer, validation cache miss": None,  # the bench's fleet returns: it measures hits
    "enforcer-ES256, validation cache hit": "enforcer-ES256",
}
# The signature each token algorithm costs per admitted request, as cryptography_speed names it.
TOKEN_OPS = {"RS256": ("enforcer", "rsa_sign"), "ES256": ("enforcer-ES256", "ecdsa_sign")}


def openssl_speed(seconds: int) -> dict[str, float]:
    """Operations per second from ``openssl speed -mr`` (one process, one core)."""
    cmd = [
        "openssl",
        "speed",
        "-mr",
        "-seconds",
        str(seconds),
        "ecdsap256",
        "ecdhx25519",
        "rsa2048",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout
    rates: dict[str, float] = {}
    for line in out.splitlines():
        f = line.split(":")
        if f[0] == "+F2" and f[2] == "2048":  # RSA: bits, sign/s, verify/s
            rates["rsa_sign"] = float(f[3])
        elif f[0] == "+F4" and f[2] == "256":  # ECDSA: bits, sign/s, verify/s
            rates["ecdsa_sign"], rates["ecdsa_verify"] = float(f[3]), float(f[4])
        elif f[0] == "+F5" and f[2] == "253":  # ECDH X25519: bits, op/s
            rates["x25519"] = float(f[3])
    missing = {"rsa_sign", "ecdsa_sign", "ecdsa_verify", "x25519"} - rates.keys()
    if missing:
        raise SystemExit(f"openssl speed gave no figure for {sorted(missing)}:\n{out}")
    return rates


def _rate(op: Callable[[], object], seconds: float) -> float:
    # Per CPU-second of this process (as ``openssl speed`` counts user time): on a busy machine
    # wall time would charge the loop for the neighbours' use of the cores.
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        for _ in range(20):
            op()
        n += 20
    return n / max(time.process_time() - cpu, 1e-9)


def cryptography_speed(seconds: float) -> dict[str, float]:
    """The same operations through ``cryptography`` (the enforcer's OpenSSL)."""
    ec_key = ec.generate_private_key(ec.SECP256R1())
    sig = ec_key.sign(b"x" * 32, ec.ECDSA(hashes.SHA256()))
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    peer = x25519.X25519PrivateKey.generate().public_key()
    mine = x25519.X25519PrivateKey.generate()

    def verify() -> None:
        ec_key.public_key().verify(sig, b"x" * 32, ec.ECDSA(hashes.SHA256()))

    keygen_and_derive = _rate(lambda: x25519.X25519PrivateKey.generate().exchange(peer), seconds)
    return {
        "x25519": 2 * keygen_and_derive,  # per operation, to compare with openssl speed
        "x25519_derive_only": _rate(lambda: mine.exchange(peer), seconds),
        "ecdsa_sign": _rate(lambda: ec_key.sign(b"x" * 32, ec.ECDSA(hashes.SHA256())), seconds),
        "ecdsa_verify": _rate(verify, seconds),
        "rsa_sign": _rate(
            lambda: rsa_key.sign(b"x" * 32, padding.PKCS1v15(), hashes.SHA256()), seconds
        ),
    }


def server_handshake_ms(seconds: float) -> float:
    """CPU ms of OpenSSL's server side of one full mTLS handshake, as the enforcer runs it."""
    from harness import free_port, make_testbed  # bench/harness.py, beside this script
    from OpenSSL import SSL

    from enforcer.tls import HostTLS, build_context
    from testbed.demo import AUTH_HOST

    with tempfile.TemporaryDirectory() as tmp:
        bed = make_testbed(Path(tmp), 1, free_port(), free_port())
        edge = bed.layout.root / "edge"
        host = HostTLS(
            AUTH_HOST,
            (edge / "cert.pem").read_bytes(),
            (edge / "key.pem").read_bytes(),
            request_client_certificate=True,
            allow_resumption=True,  # as the bench's application: tickets are issued
        )
        server_ctx = build_context(host)
        client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_ctx.load_cert_chain(*bed.devices[0])
        client_ctx.load_verify_locations(bed.edge_ca)

    spent, n, start = 0.0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        server = SSL.Connection(server_ctx, None)
        server.set_accept_state()
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = client_ctx.wrap_bio(incoming, outgoing, server_hostname=AUTH_HOST)
        client_done = False
        while True:
            if not client_done:
                try:
                    client.do_handshake()
                    client_done = True
                except ssl.SSLWantReadError:
                    pass
            server.bio_write(outgoing.read())
            t = time.process_time()
            try:
                server.do_handshake()
                done = True
            except SSL.WantReadError:
                done = False
            spent += time.process_time() - t
            with contextlib.suppress(SSL.WantReadError):
                incoming.write(server.bio_read(65536))
            if done and client_done:
                break
        n += 1
    return spent / n * 1000


def ceiling(rates: dict[str, float], profile: dict[str, int]) -> float:
    """Handshakes per core-second if the listed public-key operations were the only cost."""
    return 1.0 / sum(count / rates[op] for op, count in profile.items() if count)


def attribution(
    enf: dict[str, Any],
    ngx: dict[str, Any],
    proxy: dict[str, Any],
    handshake_ms: float,
    token_ms: float,
) -> dict[str, Any] | None:
    """The enforcer's CPU per handshake split into OpenSSL, the token and the rest; the bound."""
    if not enf.get("per_server_cpu_s") or not ngx.get("per_server_cpu_s"):
        return None
    total, nginx = 1000 / enf["per_server_cpu_s"], 1000 / ngx["per_server_cpu_s"]
    out = {
        "enforcer_ms": round(total, 3),
        "openssl_handshake_ms": round(handshake_ms, 3),
        "token_ms": round(token_ms, 3),
        "rest_ms": round(total - handshake_ms - token_ms, 3),
        "nginx_ms": round(nginx, 3),
        "measured_ratio": round(nginx / total, 3),
        "attainable_ratio": round(nginx / (nginx + token_ms), 3),
    }
    if proxy.get("per_server_cpu_s"):
        # nginx-proxy's figure leaves out the echo origin's CPU, as the enforcer's does.
        nginx_proxy = 1000 / proxy["per_server_cpu_s"]
        out |= {
            "nginx_proxy_ms": round(nginx_proxy, 3),
            "measured_ratio_to_nginx_proxy": round(nginx_proxy / total, 3),
            "attainable_ratio_to_nginx_proxy": round(nginx_proxy / (nginx_proxy + token_ms), 3),
        }
    return out


def split_table(split: dict[str, Any], algorithm: str) -> Table:
    """CPU per full handshake, where it goes (1 worker)."""
    table = Table(title=f"CPU per full mTLS handshake, 1 worker, {algorithm} tokens (ms)")
    table.add_column("part")
    table.add_column("ms", justify="right")
    table.add_column("share of the enforcer's", justify="right")
    total = split["enforcer_ms"]
    for label, key in (
        ("enforcer, measured (1 / handshakes per server CPU-s)", "enforcer_ms"),
        ("  OpenSSL server handshake (pyOpenSSL loop, same context)", "openssl_handshake_ms"),
        (f"  {algorithm} token signature (cryptography loop; access-flow A7)", "token_ms"),
        ("  the rest: Python (trio, h11 twice, origin hop, access log) and the kernel", "rest_ms"),
        ("nginx, measured (its whole handshake and request)", "nginx_ms"),
        ("nginx-proxy, measured (the same, forwarded to the echo origin)", "nginx_proxy_ms"),
    ):
        if key not in split:
            continue
        share = f"{split[key] / total:.0%}" if not key.startswith("nginx") else "-"
        table.add_row(label, f"{split[key]:.2f}", share)
    return table


def measured(args: argparse.Namespace) -> dict[str, Any]:
    """The handshakes bench's JSON record: read from ``--from-json`` or run it now."""
    if args.from_json:
        lines = Path(args.from_json).read_text(encoding="utf-8").splitlines()
    else:
        bench = Path(__file__).with_name("handshakes.py")
        cmd = [sys.executable, str(bench), *shlex.split(args.handshakes_args)]
        print(f"running {shlex.join(cmd)} ...", flush=True)
        run = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
        print(run.stdout, end="", flush=True)  # its table, JSON line and rerun command
        lines = run.stdout.splitlines()
    for line in lines:
        if line.startswith('{"bench":"handshakes"'):
            return dict(json.loads(line))
    raise SystemExit("no handshakes JSON line found")


def main() -> int:
    """Print the ceiling beside the measured figures, one JSON line and the rerun command."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--seconds", type=int, default=2, help="openssl speed s per test (2)")
    ap.add_argument("--from-json", help="a file holding bench/handshakes.py's output")
    ap.add_argument("--handshakes-args", default="", help="extra arguments for bench/handshakes.py")
    args = ap.parse_args()
    console = Console(soft_wrap=True, highlight=False, width=170)
    speed = openssl_speed(args.seconds)
    lib = cryptography_speed(min(1.0, args.seconds / 2))
    bench = measured(args)
    one = bench["workers"].get("1", {})

    ops = Table(title="Public-key operations per second, one core")
    for col in ("operation", "openssl speed (system OpenSSL)", "cryptography (enforcer's)"):
        ops.add_column(col, justify="left" if col == "operation" else "right")
    for op in ("x25519", "ecdsa_sign", "ecdsa_verify", "rsa_sign"):
        ops.add_row(op, f"{speed[op]:.0f}", f"{lib[op]:.0f}")
    console.print(ops)

    table = Table(title="Full mTLS handshakes per core-second: crypto ceiling vs measured")
    cols = ("server", "ops per handshake", "ceiling (openssl speed)", "ceiling (cryptography)",
            "measured per server CPU-s", "share of ceiling")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="left" if col == "server" else "right")
    rows: dict[str, Any] = {}
    for name, profile in PROFILES.items():
        target = MEASURED_AS[name]
        show = one.get(target, {}).get("per_server_cpu_s") if target else None
        top = ceiling(speed, profile)
        rows[name] = {"ops": profile, "ceiling_openssl_speed": round(top),
                      "ceiling_cryptography": round(ceiling(lib, profile)),
                      "measured_per_server_cpu_s": show,
                      "share": round(show / top, 3) if show else None}  # fmt: skip
        table.add_row(
            name,
            ", ".join(f"{v} {k}" for k, v in profile.items() if v),
            str(rows[name]["ceiling_openssl_speed"]),
            str(rows[name]["ceiling_cryptography"]),
            str(show) if show else "-",
            f"{rows[name]['share']:.1%}" if show else "-",
        )
    console.print(table)
    enf, ngx = one.get("enforcer", {}), one.get("nginx", {})
    console.print(
        f"measured (1 worker): enforcer {enf.get('per_s')} handshakes/s, nginx {ngx.get('per_s')}"
        f" handshakes/s, ratio {one.get('ratio')}; enforcer returning share "
        f"{enf.get('returning_share')}",
        markup=False,
    )
    handshake_ms = server_handshake_ms(min(3.0, args.seconds * 1.5))
    splits: dict[str, Any] = {}
    for alg, (target, op) in TOKEN_OPS.items():
        split = attribution(
            one.get(target, {}), ngx, one.get("nginx-proxy", {}), handshake_ms, 1000 / lib[op]
        )
        if not split:
            continue
        splits[alg] = split
        console.print(split_table(split, alg))
        line = (
            f"{alg}: attainable ratio with the token per admitted request (access-flow A7): nginx "
            f"{split['nginx_ms']:.2f} ms / (nginx + {alg} {split['token_ms']:.2f} ms) = "
            f"[bold]{split['attainable_ratio']:.2f}[/] per CPU-second; measured "
            f"{split['measured_ratio']:.2f}"
        )
        if "nginx_proxy_ms" in split:
            line += (
                f"; to nginx-proxy attainable {split['attainable_ratio_to_nginx_proxy']:.2f}, "
                f"measured [bold]{split['measured_ratio_to_nginx_proxy']:.2f}[/]"
            )
        console.print(line)
    record = {
        "bench": "ceiling", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(), "openssl_speed": {k: round(v) for k, v in speed.items()},
        "cryptography": {k: round(v) for k, v in lib.items()}, "profiles": rows,
        "handshakes": {"enforcer": enf, "nginx": ngx, "ratio": one.get("ratio")},
        "split": splits.get("RS256"), "splits": splits, "goals": bench.get("goals", []),
    }  # fmt: skip
    print(json.dumps(record, separators=(",", ":")), flush=True)
    print(f"rerun: cd {shlex.quote(os.getcwd())} && {shlex.join(sys.orig_argv)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
