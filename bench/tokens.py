"""What a token costs per request for each algorithm: the enforcer's mint + verify beside a
plain ``cryptography`` sign + verify loop, same key type, same run (access-flow A7, J1, J7).

For each of RS256 (RSA-2048), ES256 (EC P-256) and EdDSA (Ed25519):

* ``enforcer``: ``enforcer.tokens.mint`` of the claims an admitted device gets (access-flow A7)
  and ``enforcer.tokens.check`` of that token without the memo (pyjwt: header, signature, aud,
  iss, then the times at the injected ``now``), which is what a request with a new token costs;
* ``cryptography``: one signature and one verification of the same signing input with the same
  key (PKCS#1 v1.5 SHA-256, ECDSA SHA-256, Ed25519), the floor any Python JWT library pays.

The ratio enforcer / cryptography is pyjwt's and the enforcer's own overhead (JSON, base64,
claim checks). Windows alternate between the algorithms and the two loops, so noise from
neighbours hits all alike; CPU time of this process (``time.process_time``) is measured.
Compare ratios, never absolute figures: the machine is small, shared and noisy.

Rerun: ``.venv/bin/python bench/tokens.py`` (``--rounds 5 --per-window 300`` by default).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from enforcer import tokens
from enforcer.tokens import KeyRing, SigningKey

NOW = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
AUD, ISS = "a" * 64, "https://access.testbed.local"


def enforcer_loop(ring: KeyRing) -> Callable[[], None]:
    """One request's token work in the enforcer: mint, then a full check (no memo)."""
    claims = tokens.access_claims(
        aud=AUD,
        issuer=ISS,
        now=NOW,
        lifetime=dt.timedelta(hours=24),
        common_name="device-001",
        x5t_s256="x" * 43,
        serial="0123456789abcdef",
    )

    def once() -> None:
        token = tokens.mint(ring, claims)
        outcome = tokens.check(token, ring, aud=AUD, issuer=ISS, now=NOW)
        assert outcome.status is tokens.TokenStatus.VALID

    return once


def crypto_loop(key: SigningKey) -> Callable[[], None]:
    """One signature and one verification of a token-sized input with ``cryptography``."""
    message = b"m" * 600
    private, public = key.private_key, key.public_key
    if isinstance(private, rsa.RSAPrivateKey):
        assert isinstance(public, rsa.RSAPublicKey)

        def once() -> None:
            sig = private.sign(message, padding.PKCS1v15(), hashes.SHA256())
            public.verify(sig, message, padding.PKCS1v15(), hashes.SHA256())

    elif isinstance(private, ec.EllipticCurvePrivateKey):
        assert isinstance(public, ec.EllipticCurvePublicKey)

        def once() -> None:
            sig = private.sign(message, ec.ECDSA(hashes.SHA256()))
            public.verify(sig, message, ec.ECDSA(hashes.SHA256()))

    else:
        assert isinstance(private, ed25519.Ed25519PrivateKey)
        assert isinstance(public, ed25519.Ed25519PublicKey)

        def once() -> None:
            public.verify(private.sign(message), message)

    return once


def window(fn: Callable[[], None], n: int) -> float:
    """CPU milliseconds per call over ``n`` calls."""
    start = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - start) * 1000 / n


def main(argv: list[str] | None = None) -> int:
    """Measure and print the table, the JSON line and the rerun command."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-window", type=int, default=300)
    args = parser.parse_args(argv)
    loops = {}
    for alg in tokens.ALGORITHMS:
        key = SigningKey.from_private_key(tokens.generate_key(alg), NOW)
        loops[alg] = {"enforcer": enforcer_loop(KeyRing(key)), "cryptography": crypto_loop(key)}
        for fn in loops[alg].values():
            window(fn, 20)  # warm-up
    samples: dict[str, dict[str, list[float]]] = {
        alg: {"enforcer": [], "cryptography": []} for alg in loops
    }
    for r in range(args.rounds):
        order = list(loops) if r % 2 == 0 else list(reversed(loops))
        for alg in order:
            kinds = ["enforcer", "cryptography"] if r % 2 == 0 else ["cryptography", "enforcer"]
            for kind in kinds:
                samples[alg][kind].append(window(loops[alg][kind], args.per_window))
    result = {}
    print(
        f"{'algorithm':<10}{'enforcer ms':>14}{'cryptography ms':>18}{'ratio':>8}{'vs RS256':>10}"
    )
    rs = statistics.median(samples["RS256"]["enforcer"])
    for alg, by in samples.items():
        e, c = statistics.median(by["enforcer"]), statistics.median(by["cryptography"])
        result[alg] = {"enforcer_ms": round(e, 4), "cryptography_ms": round(c, 4)}
        print(f"{alg:<10}{e:>14.3f}{c:>18.3f}{e / c:>8.2f}{e / rs:>10.2f}")
    print("(CPU ms per request: mint + full verify; cryptography: sign + verify; medians)")
    print(json.dumps({"bench": "tokens", "rounds": args.rounds, **result}))
    print(
        f"rerun: .venv/bin/python bench/tokens.py --rounds {args.rounds} "
        f"--per-window {args.per_window}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
