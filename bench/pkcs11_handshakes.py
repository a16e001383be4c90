"""Full mTLS handshakes per second with the device key in a SoftHSM2 token, against the software
key store, on the same enforcer in the same run.

One device identity (an EC P-256 fleet certificate) is used three ways, each request a NEW TCP
connection and a full TLS handshake (no resumption, ``Connection: close``) to the same
``testbed enforcer serve`` (one worker) on 127.0.0.1, in alternating windows:

* ``software``: the key in key.pem, TLS by pyOpenSSL (devices/openssl_tls.py), what every other
  bench uses;
* ``tlslite-memory``: TLS by tlslite-ng (devices/signer_tls.py) with the key in Python memory,
  signing through the same external-signer call: the cost of the TLS stack alone;
* ``pkcs11``: TLS by tlslite-ng, the CertificateVerify signed on the SoftHSM2 token through
  python-pkcs11 (devices/pkcs11.py): the key never leaves the token.

Printed: handshakes/s of each (median over windows), the ratios pkcs11/software and
pkcs11/tlslite-memory, the median handshake time and the token's median signing time (the
``key_store`` phase). One client task, sequential requests: a per-device cost, not a ceiling.
Compare ratios, never absolute figures: the machine is small, shared and noisy.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from harness import free_port, make_testbed, start_enforcer, start_origin, stop

from devices.client import ClientOptions, DeviceClient, Target
from devices.keystore import SoftwareKeyStore
from devices.pkcs11 import Pkcs11Config, Pkcs11KeyStore, SignCost, import_key
from testbed.demo import AUTH_HOST

MODULES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")
PIN_ENV = "BENCH_TOKEN_PIN"


class MemorySigner:
    """The software key behind the external-signer interface (tlslite-ng, no token)."""

    kind = "tlslite-memory"
    external_signer = True

    def __init__(self, cert: Path, key: Path) -> None:
        self.chain = cert.read_bytes()
        loaded = serialization.load_pem_private_key(key.read_bytes(), None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        self.key = loaded

    def tls_signer(self) -> tuple[bytes, Callable[[bytes, str, str | None], bytes], SignCost]:
        cost = SignCost()
        algo = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}

        def sign(digest: bytes, hash_name: str, padding: str | None) -> bytes:
            start = time.perf_counter()
            sig = self.key.sign(digest, ec.ECDSA(utils.Prehashed(algo[hash_name])))
            cost.seconds += time.perf_counter() - start
            return sig

        return self.chain, sign, cost


def init_token(tmp: Path) -> Path:
    """A SoftHSM2 token in ``tmp`` (SOFTHSM2_CONF set for this process); the module's path."""
    module = next((m for m in MODULES if Path(m).exists()), None)
    if module is None or shutil.which("softhsm2-util") is None:
        raise SystemExit("SoftHSM2 is missing: apt-get install softhsm2")
    (tmp / "tokens").mkdir()
    conf = tmp / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tmp / 'tokens'}\nobjectstore.backend = file\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    os.environ[PIN_ENV] = "246810"
    # softhsm2-util takes PINs as arguments: a throwaway bench token's.
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", "bench", "--pin", "246810",
         "--so-pin", "13579111"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return Path(module)


async def window(client: DeviceClient, seconds: float) -> tuple[int, list[float], list[float]]:
    """Full handshakes for ``seconds``: count, handshake times and key-store times."""
    done, handshakes, signs = 0, [], []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        attempt = await client.request("/")
        if attempt.outcome != "allowed" or attempt.resumed:
            raise SystemExit(f"{client.key_store}: {attempt.outcome} {attempt.error}")
        done += 1
        handshakes.append(attempt.timings.handshake)
        signs.append(attempt.timings.key_store)
    return done, handshakes, signs


async def measure(stores: dict[str, Any], port: int, edge_ca: Path, args: Any) -> None:
    options = ClientOptions(keep_alive=False, resume_sessions=False, reuse_cookie=False)
    target = Target("127.0.0.1", port, AUTH_HOST, edge_ca)
    clients = {name: DeviceClient(target, store, options) for name, store in stores.items()}
    for c in clients.values():  # warm: imports, sessions, the enforcer's validation cache
        await window(c, 0.5)
    rates: dict[str, list[float]] = {n: [] for n in clients}
    hs: dict[str, list[float]] = {n: [] for n in clients}
    ks: dict[str, list[float]] = {n: [] for n in clients}
    for _ in range(args.rounds):
        for name, c in clients.items():
            count, h, k = await window(c, args.window)
            rates[name].append(count / args.window)
            hs[name] += h
            ks[name] += k
    print(f"{'key store':<16} {'handshakes/s':>13} {'handshake ms':>13} {'key_store ms':>13}")
    for name in clients:
        print(
            f"{name:<16} {statistics.median(rates[name]):>13.1f} "
            f"{statistics.median(hs[name]) * 1000:>13.2f} "
            f"{statistics.median(ks[name]) * 1000:>13.3f}"
        )
    token, soft = statistics.median(rates["pkcs11"]), statistics.median(rates["software"])
    memory = statistics.median(rates["tlslite-memory"])
    print(f"ratio pkcs11 / software:        {token / soft:.3f}")
    print(f"ratio pkcs11 / tlslite-memory:  {token / memory:.3f}")
    print(
        f"token signing (median, in key_store): {statistics.median(ks['pkcs11']) * 1000:.3f} ms"
        f" of {statistics.median(hs['pkcs11']) * 1000:.2f} ms per handshake"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=float, default=4.0, help="seconds per window (default 4)")
    ap.add_argument("--rounds", type=int, default=3, help="windows per key store (default 3)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-pkcs11-") as name:
        tmp = Path(name)
        module = init_token(tmp)
        port, origin_port = free_port(), free_port()
        bed = make_testbed(tmp, 1, port, origin_port)
        cert, key = bed.devices[0]
        config = Pkcs11Config(module, token="bench", pin_env=PIN_ENV, key_label="device")
        import_key(config, key.read_bytes(), x509.load_pem_x509_certificate(cert.read_bytes()))
        origin = start_origin(origin_port)
        enforcer = start_enforcer(bed, port, 1)
        try:
            stores = {
                "software": SoftwareKeyStore(cert, key),
                "tlslite-memory": MemorySigner(cert, key),
                "pkcs11": Pkcs11KeyStore(config, cert),
            }
            trio.run(measure, stores, port, bed.layout.edge_ca, args)
        finally:
            stop(enforcer)
            origin.terminate()
            origin.join()
    print("rerun: " + shlex.join([sys.executable, "bench/pkcs11_handshakes.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
