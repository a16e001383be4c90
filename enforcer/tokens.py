"""Access tokens: JWTs (RS256 by default, ES256 or EdDSA) minted after an admission, and checks.

Signing keys live in a :class:`KeyRing`: one current key per algorithm in use (the default
algorithm's, and those some account's setting names: access-flow J7), and previous keys that
stay published in ``/cdn-cgi/access/certs`` and accepted until their grace period ends. Every
check takes ``now``; pyjwt's own clock checks are switched off so that time stays injected.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import hmac
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from enforcer.identity import Identity
from enforcer.lru import BoundedLRU
from enforcer.private_files import tighten

# The token algorithms (access-flow A7, J1): RS256 is the default, as Cloudflare Access signs.
DEFAULT_ALGORITHM = "RS256"
ALGORITHMS = ("RS256", "ES256", "EdDSA")
# Tokens signed and signatures verified in this process, by algorithm: plain counts (this
# module stays free of I/O), which enforcer/metrics.py copies into its counters.
MINTED: dict[str, int] = dict.fromkeys(ALGORITHMS, 0)
VERIFIED: dict[str, int] = dict.fromkeys(ALGORITHMS, 0)

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


class UnsupportedKeyError(ValueError):
    """A private key no token algorithm signs with (only RSA, P-256 and Ed25519 do)."""


def algorithm_of(key: PrivateKey | PublicKey) -> str:
    """The token algorithm a key signs with: RSA RS256, EC P-256 ES256, Ed25519 EdDSA."""
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return "ES256"
        raise UnsupportedKeyError(
            f"an EC key on {key.curve.name} signs no token algorithm (ES256 needs P-256)"
        )
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "EdDSA"
    raise UnsupportedKeyError(
        f"a {type(key).__name__} signs no token algorithm (RSA, EC P-256 or Ed25519 do)"
    )


def generate_key(algorithm: str) -> PrivateKey:
    """A new private key for ``algorithm`` (RSA-2048, EC P-256 or Ed25519)."""
    if algorithm == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown token algorithm {algorithm!r}: one of {list(ALGORITHMS)}")


def _public_jwk(key: PublicKey) -> dict[str, Any]:
    """The public JWK of ``key`` (kty RSA, EC with crv/x/y, or OKP with crv/x)."""
    if isinstance(key, rsa.RSAPublicKey):
        return json.loads(RSAAlgorithm.to_jwk(key))  # type: ignore[no-any-return]
    if isinstance(key, ec.EllipticCurvePublicKey):
        return json.loads(ECAlgorithm.to_jwk(key))  # type: ignore[no-any-return]
    return json.loads(OKPAlgorithm.to_jwk(key))  # type: ignore[no-any-return]


@dataclasses.dataclass(frozen=True)
class SigningKey:
    """A signing key with its key id and the self-signed certificate that publishes it."""

    kid: str
    private_key: PrivateKey = dataclasses.field(repr=False)
    public_jwk: Mapping[str, Any]
    public_cert_pem: str
    # Derived once: every token check verifies with it.
    public_key: PublicKey = dataclasses.field(init=False, repr=False, compare=False)
    # The one algorithm this key signs and verifies (J1: never the one a token header claims).
    algorithm: str = dataclasses.field(init=False, compare=False)
    # A secret derived from the private key for the enforcer's own short-lived cookies (the
    # login cookie, access-flow I2), which only the enforcer reads: an HMAC costs microseconds
    # where an RSA signature costs a millisecond, and anyone may ask for a login cookie.
    mac_key: bytes = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "public_key", self.private_key.public_key())
        object.__setattr__(self, "algorithm", algorithm_of(self.private_key))
        der = self.private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        mac = hmac.new(der, b"mtls-testbed enforcer cookie key", hashlib.sha256).digest()
        object.__setattr__(self, "mac_key", mac)

    @classmethod
    def from_private_key(cls, key: PrivateKey, created: dt.datetime) -> SigningKey:
        """Wrap a key; its kid is the SHA-256 of its public key, so it is stable across restarts."""
        algorithm = algorithm_of(key)
        public_der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        kid = hashlib.sha256(public_der).hexdigest()
        jwk = _public_jwk(key.public_key())
        jwk.update({"kid": kid, "alg": algorithm, "use": "sig"})
        name = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, f"access signing key {kid[:16]}")]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(int(kid[:30], 16))
            .not_valid_before(created - dt.timedelta(days=1))
            .not_valid_after(created + dt.timedelta(days=3650))
            # Ed25519 signs the message itself: no separate hash.
            .sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())
        )
        pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        return cls(kid=kid, private_key=key, public_jwk=jwk, public_cert_pem=pem)


@dataclasses.dataclass(frozen=True)
class RetiredKey:
    """A key that no longer signs but is accepted until ``accepted_until``."""

    key: SigningKey
    accepted_until: dt.datetime


@dataclasses.dataclass(frozen=True)
class KeyRing:
    """The current signing keys and the retired keys still inside their grace period.

    ``current`` signs for every account without a token algorithm of its own (the enforcer's
    default algorithm); ``others`` holds the current key of each other algorithm some account
    chose, and ``account_algorithms`` names those accounts' algorithms (J7). The key a token is
    signed with is thus an input of the decision, chosen by :meth:`signer`.
    """

    current: SigningKey
    retired: tuple[RetiredKey, ...] = ()
    grace_period: dt.timedelta = dt.timedelta(hours=24)
    others: tuple[SigningKey, ...] = ()
    account_algorithms: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False)
    # Account -> its signing key, derived once per snapshot: a look-up per minted token.
    _signers: Mapping[str, SigningKey] = dataclasses.field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        by_algorithm = {k.algorithm: k for k in self.others}
        by_algorithm[self.current.algorithm] = self.current
        missing = set(self.account_algorithms.values()) - set(by_algorithm)
        if missing:
            raise ValueError(f"no current signing key for {sorted(missing)}")
        signers = {a: by_algorithm[alg] for a, alg in self.account_algorithms.items()}
        object.__setattr__(self, "_signers", signers)

    def signer(self, account: str | None) -> SigningKey:
        """The key that signs ``account``'s tokens: the newest current key of its algorithm."""
        return self._signers.get(account, self.current) if account is not None else self.current

    def accepted(self, now: dt.datetime) -> list[SigningKey]:
        """Return the keys whose signatures are accepted at ``now`` (current ones first)."""
        return [
            self.current,
            *self.others,
            *(r.key for r in self.retired if now <= r.accepted_until),
        ]

    def rotated(self, new_key: SigningKey, now: dt.datetime) -> KeyRing:
        """Return a ring where ``new_key`` signs by default and the default key enters grace."""
        keep = tuple(r for r in self.retired if now <= r.accepted_until)
        return dataclasses.replace(
            self,
            current=new_key,
            retired=(RetiredKey(self.current, now + self.grace_period), *keep),
        )

    def jwks(self, now: dt.datetime) -> dict[str, Any]:
        """Return the ``/cdn-cgi/access/certs`` document: JWKs and the public certificates."""
        keys = self.accepted(now)
        return {
            "keys": [dict(k.public_jwk) for k in keys],
            "public_cert": {"kid": self.current.kid, "cert": self.current.public_cert_pem},
            "public_certs": [{"kid": k.kid, "cert": k.public_cert_pem} for k in keys],
        }


def mint(ring: KeyRing, claims: Mapping[str, Any], account: str | None = None) -> str:
    """Sign ``claims`` with the key of ``account``'s algorithm (its ``kid`` in the header)."""
    key = ring.signer(account)
    MINTED[key.algorithm] += 1
    return jwt.encode(
        dict(claims), key.private_key, algorithm=key.algorithm, headers={"kid": key.kid}
    )


def access_claims(
    *,
    aud: str,
    issuer: str,
    now: dt.datetime,
    lifetime: dt.timedelta,
    common_name: str | None,
    x5t_s256: str | None,
    serial: str | None,
    identity: Identity | None = None,
    idp_type: str = "oidc",
    service_token_id: str | None = None,
    identity_only: bool = False,
) -> dict[str, Any]:
    """Return the claims of an application token (access-flow A7, I8, I9, I11).

    ``identity`` adds a person's claims (``email``, ``sub``, ``idp``, ``identity_nonce``,
    ``groups``); ``service_token_id`` names the service token that admitted; ``identity_only``
    marks a No Duration session token that carries the identity but never admits alone (I9).
    """
    iat = int(now.timestamp())
    claims: dict[str, Any] = {
        "aud": [aud],
        "iss": issuer,
        "iat": iat,
        "nbf": iat,
        "exp": iat + max(1, int(lifetime.total_seconds())),
        "type": "app",
        "sub": "",
        "common_name": common_name or "",
    }
    if serial is not None:
        claims["serial_number"] = serial
    if x5t_s256 is not None:
        claims["cnf"] = {"x5t#S256": x5t_s256}
    if identity is not None:
        claims.update(
            email=identity.email,
            sub=identity.sub,
            idp={"id": identity.idp, "type": idp_type},
            identity_nonce=identity.identity_nonce,
            groups=list(identity.groups),
        )
        if identity.name is not None:
            claims["name"] = identity.name
    if service_token_id is not None:
        claims["service_token_id"] = service_token_id
    if identity_only:
        claims[IDENTITY_ONLY_CLAIM] = True
    return claims


# A token with this claim set carries a person's identity for No Duration (I9): never admits.
IDENTITY_ONLY_CLAIM = "identity_only"


def identity_of(claims: Mapping[str, Any]) -> Identity | None:
    """The person a token's claims name (access-flow I8), or None when it names nobody."""
    email = claims.get("email")
    idp = claims.get("idp")
    idp_id = idp.get("id") if isinstance(idp, Mapping) else None
    if not isinstance(email, str) or not email or not isinstance(idp_id, str):
        return None
    groups = claims.get("groups")
    sub, nonce, name = claims.get("sub"), claims.get("identity_nonce"), claims.get("name")
    return Identity(
        email=email,
        sub=sub if isinstance(sub, str) else "",
        idp=idp_id,
        groups=tuple(g for g in groups if isinstance(g, str)) if isinstance(groups, list) else (),
        name=name if isinstance(name, str) else None,
        identity_nonce=nonce if isinstance(nonce, str) else "",
    )


class TokenStatus(enum.Enum):
    """The outcome of checking a presented token."""

    VALID = "valid"
    INVALID = "invalid"
    EXPIRED = "expired"


@dataclasses.dataclass(frozen=True)
class TokenCheck:
    """A checked token: its status, the claims when valid, and why when not."""

    status: TokenStatus
    claims: Mapping[str, Any] | None = None
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class _Verified:
    """A token whose signature verified under the key ``kid`` with public JWK ``jwk``."""

    kid: str
    jwk: Mapping[str, Any]
    claims: Mapping[str, Any]


class TokenMemo:
    """Tokens whose signature already verified, by token string (bounded, least recently used).

    pyjwt spends about half a millisecond per token, most of it in Python (base64 alphabet
    checks, JSON) around one RSA verification. A cookie comes back on every request of a
    session, so :func:`check` remembers what verified. Only the signature and the claims'
    decoding are memoised, which are pure functions of the token and the key: every hit is
    checked again for what depends on ``now`` and on the request (the key still accepted by the
    ring at ``now``, audience, issuer, type, ``exp`` and ``nbf``).
    """

    def __init__(self, size: int = 20_000) -> None:
        self._entries: BoundedLRU[str, _Verified] = BoundedLRU(size)

    @property
    def hits(self) -> int:
        """Checks answered without verifying a signature."""
        return self._entries.hits

    def get(self, token: str) -> _Verified | None:
        """Return what is known about ``token``'s signature, or None."""
        return self._entries.get(token)

    def put(self, token: str, verified: _Verified) -> None:
        """Remember that ``token`` verified."""
        self._entries.put(token, verified)

    def __len__(self) -> int:
        return len(self._entries)


def _verify_signature(
    token: str, ring: KeyRing, aud: str, issuer: str, now: dt.datetime
) -> _Verified | TokenCheck:
    """Verify a token's header, signature, audience and issuer with pyjwt."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        return TokenCheck(TokenStatus.INVALID, detail=f"malformed: {exc}")
    key = next((k for k in ring.accepted(now) if k.kid == header.get("kid")), None)
    if key is None:
        return TokenCheck(TokenStatus.INVALID, detail=f"unknown kid {header.get('kid')!r}")
    # The key the kid names decides the algorithm; a header claiming another one is refused.
    if header.get("alg") != key.algorithm:
        return TokenCheck(TokenStatus.INVALID, detail=f"algorithm {header.get('alg')!r} refused")
    try:
        claims = jwt.decode(
            token,
            key.public_key,
            algorithms=[key.algorithm],
            audience=aud,
            issuer=issuer,
            options={
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "require": ["exp", "nbf", "iat", "aud", "iss"],
            },
        )
    except jwt.PyJWTError as exc:
        return TokenCheck(TokenStatus.INVALID, detail=str(exc))
    VERIFIED[key.algorithm] += 1
    return _Verified(key.kid, key.public_jwk, claims)


def _recheck_memoised(
    verified: _Verified, ring: KeyRing, aud: str, issuer: str, now: dt.datetime
) -> TokenCheck | None:
    """Re-run, for a memoised token, the checks pyjwt made that depend on the request or ring."""
    key = next((k for k in ring.accepted(now) if k.kid == verified.kid), None)
    if key is None or key.public_jwk != verified.jwk:
        # Rotated out (grace period over) or replaced: its signatures no longer count.
        return TokenCheck(TokenStatus.INVALID, detail=f"unknown kid {verified.kid!r}")
    audiences = verified.claims.get("aud")
    if isinstance(audiences, str):
        audiences = [audiences]
    if not isinstance(audiences, list) or aud not in audiences:
        return TokenCheck(TokenStatus.INVALID, detail="Audience doesn't match")
    if verified.claims.get("iss") != issuer:
        return TokenCheck(TokenStatus.INVALID, detail="Invalid issuer")
    return None


def check(
    token: str,
    ring: KeyRing,
    *,
    aud: str,
    issuer: str,
    now: dt.datetime,
    memo: TokenMemo | None = None,
) -> TokenCheck:
    """Check a token's signature (by an accepted key), algorithm, audience, issuer and times.

    With ``memo``, a token whose signature verified before skips pyjwt; everything else is
    checked again at ``now`` (see :class:`TokenMemo`).
    """
    verified = memo.get(token) if memo is not None else None
    if verified is not None:
        refused = _recheck_memoised(verified, ring, aud, issuer, now)
        if refused is not None:
            return refused
    else:
        outcome = _verify_signature(token, ring, aud, issuer, now)
        if isinstance(outcome, TokenCheck):
            return outcome
        verified = outcome
        if memo is not None:
            memo.put(token, verified)
    claims = verified.claims
    ts = now.timestamp()
    try:
        exp, nbf = float(claims["exp"]), float(claims["nbf"])
    except (TypeError, ValueError):
        return TokenCheck(TokenStatus.INVALID, detail="exp or nbf is not a number")
    if claims.get("type") != "app":
        return TokenCheck(TokenStatus.INVALID, detail="not an application token")
    if ts >= exp:
        return TokenCheck(TokenStatus.EXPIRED, detail="token expired")
    if ts < nbf:
        return TokenCheck(TokenStatus.INVALID, detail="token not valid yet")
    return TokenCheck(TokenStatus.VALID, claims=dict(claims))


def load_or_create_key(
    path: str | None, now: dt.datetime, algorithm: str = DEFAULT_ALGORITHM
) -> SigningKey:
    """Load a private key PEM for ``algorithm`` from ``path``, creating it (0600) when missing."""
    if path is not None and os.path.exists(path):
        tighten(Path(path), "signing key")
        with open(path, "rb") as f:
            loaded = serialization.load_pem_private_key(f.read(), password=None)
        if not isinstance(
            loaded, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
        ):
            raise UnsupportedKeyError(
                f"{path}: the signing key must be an RSA, EC P-256 or Ed25519 private key"
            )
        found = algorithm_of(loaded)
        if found != algorithm:
            raise UnsupportedKeyError(
                f"{path}: the key signs {found}, not the configured {algorithm}: point key_file "
                f"at a {algorithm} key (or a missing file, created) or set algorithm = {found!r}"
            )
        return SigningKey.from_private_key(loaded, now)
    key = generate_key(algorithm)
    if path is not None:
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
    return SigningKey.from_private_key(key, now)


def parse_cookie_header(values: Sequence[str], name: str) -> str | None:
    """Return the value of cookie ``name`` from Cookie header values, or None."""
    for value in values:
        for part in value.split(";"):
            k, sep, v = part.strip().partition("=")
            if sep and k == name:
                return v.strip().strip('"')
    return None
