"""A device key that lives in a PKCS#11 token (SoftHSM2, a YubiKey through ``ykcs11``, a TPM
through ``tpm2-pkcs11``, an HSM) behind the :class:`~devices.keystore.KeyStore` interface.

The private key never leaves the token: the TLS handshake's CertificateVerify is a call into the
token (:meth:`Pkcs11KeyStore.signing_key`, used by :mod:`devices.signer_tls`), as is the CSR
signature when the fleet provisions a key into a token (:func:`generate_on_token`).

PKCS#11 goes through python-pkcs11 (not PyKCS11): typed Python objects for sessions and keys,
key generation with templates, and one exception class per ``CKR_*`` return value, which
:func:`ckr_name` turns back into the standard name (``CKR_PIN_INCORRECT``...) that results and
reports show, as they show the PIV model's (:mod:`devices.piv`).

Sessions: one per token, opened (and logged in) on first use and reused by every key store on
that token, guarded by a lock because handshakes sign from worker threads. A PKCS#11 module is
loaded once per process (``C_Initialize`` may be called only once); :func:`reinitialize` runs
``C_Finalize`` + ``C_Initialize`` (after a token is re-plugged, or in tests after pointing
``SOFTHSM2_CONF`` elsewhere) and makes every session of that module reopen.

The user PIN comes from an environment variable or a file (read when a session logs in, so a
changed PIN is picked up at the next login), never from a command line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pkcs11
import pkcs11.exceptions as p11e
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_ecdsa_signature, encode_named_curve_parameters

from devices.keystore import KeyStoreError

__all__ = [
    "TOKEN_KEY_TYPES",
    "Pkcs11Config",
    "Pkcs11KeyStore",
    "TokenError",
    "TokenKey",
    "ckr_name",
    "generate_on_token",
    "reinitialize",
    "store_certificate",
    "token_session",
    "token_uri",
]

# python-pkcs11 names its exceptions after the CKR_* values in CamelCase; these few are spelt
# differently from the standard or are the library's own (no CKR_ value behind them).
_NAMES = {
    "FunctionCancelled": "CKR_FUNCTION_CANCELED",
    "TokenNotRecognised": "CKR_TOKEN_NOT_RECOGNIZED",
    "AnotherUserAlreadyLoggedIn": "CKR_USER_ANOTHER_ALREADY_LOGGED_IN",
    "NoSuchToken": "NO_SUCH_TOKEN",  # python-pkcs11: no token with that label or slot
    "NoSuchKey": "NO_SUCH_KEY",  # python-pkcs11: no object matching the label or id
    "MultipleObjectsReturned": "MULTIPLE_OBJECTS",
    "MultipleTokensReturned": "MULTIPLE_TOKENS",
}

# Returned by a token that is gone; the session is dropped and reopened on the next handshake.
_GONE = {
    "CKR_DEVICE_REMOVED",
    "CKR_TOKEN_NOT_PRESENT",
    "CKR_SESSION_HANDLE_INVALID",
    "CKR_SESSION_CLOSED",
    "CKR_OBJECT_HANDLE_INVALID",
    "CKR_KEY_HANDLE_INVALID",
    "CKR_DEVICE_ERROR",
    "CKR_GENERAL_ERROR",
}


def ckr_name(exc: BaseException) -> str:
    """The PKCS#11 return value name (``CKR_PIN_INCORRECT``...) of a python-pkcs11 error."""
    name = type(exc).__name__
    if name in _NAMES:
        return _NAMES[name]
    if name == "PKCS11Error":
        text = str(exc).lower()
        if "not initialized" in text:
            return "CKR_CRYPTOKI_NOT_INITIALIZED"
        return "CKR_GENERAL_ERROR"
    return "CKR_" + re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


class TokenError(KeyStoreError):
    """A token operation failed; ``code`` is the PKCS#11 return value name."""

    def __init__(self, code: str, where: str, detail: str = "") -> None:
        """Build the error for ``code`` (a ``CKR_*`` name) that happened at ``where``."""
        self.code = code
        super().__init__(f"{code}: {where}{f' ({detail})' if detail else ''}")


@dataclasses.dataclass(frozen=True)
class Pkcs11Config:
    """Where a device's key is: module, token (label or slot), PIN source, key label or id."""

    module: Path
    token: str | None = None  # token label
    slot: int | None = None  # slot id, when the label is not unique or not known
    pin_env: str | None = None  # name of the environment variable holding the user PIN
    pin_file: Path | None = None  # or a file holding it (first line)
    key_label: str | None = None
    key_id: bytes | None = None

    def __post_init__(self) -> None:
        if self.token is None and self.slot is None:
            raise KeyStoreError(f"{self.module}: name the token (label) or its slot")
        if self.key_label is None and self.key_id is None:
            raise KeyStoreError(f"{self.where}: name the key (label or id)")
        if (self.pin_env is None) == (self.pin_file is None):
            raise KeyStoreError(
                f"{self.where}: give the user PIN as exactly one of an environment variable "
                "(pin_env) or a file (pin_file)"
            )

    @property
    def where(self) -> str:
        """The token, as error messages name it."""
        token = f"token {self.token!r}" if self.token is not None else f"slot {self.slot}"
        return f"{token} in {self.module}"

    def pin(self) -> str:
        """Read the user PIN from its environment variable or file."""
        if self.pin_env is not None:
            value = os.environ.get(self.pin_env)
            if not value:
                raise KeyStoreError(
                    f"{self.where}: the environment variable {self.pin_env} (user PIN) is not set"
                )
            return value
        assert self.pin_file is not None
        try:
            text = self.pin_file.read_text()
        except OSError as e:
            raise KeyStoreError(
                f"{self.pin_file}: cannot read the user PIN file: {e.strerror or e}"
            ) from e
        value = text.splitlines()[0].strip() if text.strip() else ""
        if not value:
            raise KeyStoreError(f"{self.pin_file}: the user PIN file is empty")
        return value


class _Module:
    """One loaded PKCS#11 library; ``generation`` counts its re-initialisations."""

    def __init__(self, path: Path) -> None:
        try:
            self.lib = pkcs11.lib(str(path))
        except p11e.PKCS11Error as e:
            raise TokenError(ckr_name(e), f"cannot load the PKCS#11 module {path}", str(e)) from e
        self.generation = 0


#: Wrong-PIN refusals in a row after which a device stops presenting that PIN.
MAX_PIN_FAILURES = 3

_MODULES: dict[Path, _Module] = {}
_SESSIONS: dict[tuple[Path, str | None, int | None], TokenSession] = {}
_REGISTRY_LOCK = threading.Lock()


def _module(path: Path) -> _Module:
    with _REGISTRY_LOCK:
        module = _MODULES.get(path)
        if module is None:
            module = _MODULES[path] = _Module(path)
        return module


def reinitialize(module: Path) -> None:
    """``C_Finalize`` then ``C_Initialize`` a loaded module: every session of it reopens on its
    next use (tokens re-plugged; a test's new ``SOFTHSM2_CONF``)."""
    module = Path(module)
    with _REGISTRY_LOCK:
        loaded = _MODULES.get(module)
        sessions = [s for key, s in _SESSIONS.items() if key[0] == module]
    for s in sessions:
        s.close()
    if loaded is not None:
        loaded.lib.reinitialize()
        loaded.generation += 1


class TokenSession:
    """The one session this process keeps on a token, logged in as the user."""

    def __init__(self, config: Pkcs11Config) -> None:
        self.config = config
        self.lock = threading.RLock()
        self._session: Any = None
        self._generation = -1
        self.removed = False  # set by a scenario's "token removed" event
        self.logins = 0  # sessions opened and logged in (one per insertion)
        self.pin: str | None = None  # the PIN the open session logged in with

    def session(self, pin: str | None = None) -> Any:
        """The open, logged-in session (opened now if needed, logging in with ``pin``, by
        default the configured PIN source's); raises :class:`TokenError`."""
        with self.lock:
            if self.removed:
                raise TokenError(
                    "CKR_DEVICE_REMOVED", f"{self.config.where}: the token was removed"
                )
            module = _module(self.config.module)
            if self._session is not None and self._generation == module.generation:
                return self._session
            self._session = None
            pin = self.config.pin() if pin is None else pin
            try:
                if self.config.slot is not None:
                    slots = [
                        s
                        for s in module.lib.get_slots(token_present=True)
                        if s.slot_id == self.config.slot
                    ]
                    if not slots:
                        raise TokenError(
                            "CKR_SLOT_ID_INVALID", f"{self.config.where}: no token in that slot"
                        )
                    token = slots[0].get_token()
                    if self.config.token is not None and token.label != self.config.token:
                        raise TokenError(
                            "CKR_TOKEN_NOT_RECOGNIZED",
                            f"{self.config.where}: slot holds token {token.label!r}",
                        )
                else:
                    token = module.lib.get_token(token_label=self.config.token)
                self._session = token.open(user_pin=pin, rw=True)
            except p11e.PKCS11Error as e:
                raise TokenError(ckr_name(e), f"{self.config.where}: opening a session") from e
            self.pin = pin
            self._generation = module.generation
            self.logins += 1
            return self._session

    @property
    def closed(self) -> bool:
        """True when no session is open (the next use opens one and logs in)."""
        return self._session is None

    def change_pin(self, new_pin: str) -> None:
        """Set the token's user PIN (C_SetPIN from the PIN this session logged in with), then
        close the session: every device logs in again, with whatever PIN it knows."""
        with self.lock:
            session = self.session()
            try:
                session.set_pin(self.pin, new_pin)
            except p11e.PKCS11Error as e:
                raise TokenError(ckr_name(e), f"{self.config.where}: changing the PIN") from e
            self.close()

    def close(self) -> None:
        """Close the session (a later :meth:`session` opens a new one)."""
        with self.lock:
            session, self._session = self._session, None
            if session is not None:
                # A removed token's session is already gone.
                with contextlib.suppress(p11e.PKCS11Error):
                    session.close()

    def call(self, what: str, operation: Callable[[Any], Any]) -> Any:
        """Run ``operation(session)`` under the lock, naming a failure by its CKR_ code; a
        gone token's session is dropped so that the next call reopens it."""
        with self.lock:
            session = self.session()
            try:
                return operation(session)
            except p11e.PKCS11Error as e:
                code = ckr_name(e)
                if code in _GONE:
                    self.close()  # and log out: the next call opens and logs in afresh
                raise TokenError(code, f"{self.config.where}: {what}") from e


def token_session(config: Pkcs11Config) -> TokenSession:
    """The shared session of the token ``config`` names (one per module, label and slot; one
    login per token, as PKCS#11 has it: the PIN source of the configuration that opened it)."""
    key = (Path(config.module), config.token, config.slot)
    with _REGISTRY_LOCK:
        found = _SESSIONS.get(key)
        if found is None:
            found = _SESSIONS[key] = TokenSession(config)
        elif found.closed:
            # Not logged in: the next login uses this configuration's PIN source.
            found.config = config
        return found


def _key_attrs(config: Pkcs11Config) -> dict[Attribute, Any]:
    attrs: dict[Attribute, Any] = {}
    if config.key_label is not None:
        attrs[Attribute.LABEL] = config.key_label
    if config.key_id is not None:
        attrs[Attribute.ID] = config.key_id
    return attrs


_DIGEST_INFO = {  # DER DigestInfo prefixes (RFC 8017 9.2) for RSA PKCS#1 v1.5 over a digest
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
_HASH_MECH = {
    "sha256": (Mechanism.SHA256, pkcs11.MGF.SHA256),
    "sha384": (Mechanism.SHA384, pkcs11.MGF.SHA384),
    "sha512": (Mechanism.SHA512, pkcs11.MGF.SHA512),
}


class TokenKey:
    """A private key on a token, signing digests there (EC P-256/P-384, RSA)."""

    def __init__(self, config: Pkcs11Config) -> None:
        self.config = config
        self.session = token_session(config)
        self._found: tuple[Any, Any] | None = None  # (session, key handle): found once per session

    def _find(self, session: Any) -> Any:
        if self._found is not None and self._found[0] is session:
            return self._found[1]
        key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, **_key_kwargs(self.config))
        self._found = (session, key)
        return key

    def sign_digest(self, digest: bytes, hash_name: str, padding: str | None = None) -> bytes:
        """Sign ``digest`` on the token: DER ECDSA for an EC key; RSA with ``padding`` "pss"
        (salt = digest length) or "pkcs1". Returns the signature and takes the token's time."""

        def sign(session: Any) -> bytes:
            key = self._find(session)
            if key.key_type == KeyType.EC:
                return encode_ecdsa_signature(key.sign(digest, mechanism=Mechanism.ECDSA))
            if padding == "pss":
                hash_mech, mgf = _HASH_MECH[hash_name]
                return bytes(
                    key.sign(
                        digest,
                        mechanism=Mechanism.RSA_PKCS_PSS,
                        mechanism_param=(hash_mech, mgf, len(digest)),
                    )
                )
            return bytes(key.sign(_DIGEST_INFO[hash_name] + digest, mechanism=Mechanism.RSA_PKCS))

        return bytes(self.session.call("signing", sign))

    def certificate_der(self) -> bytes | None:
        """The certificate stored on the token beside the key (same label/id), if any."""

        def find(session: Any) -> bytes | None:
            for obj in session.get_objects(
                {Attribute.CLASS: ObjectClass.CERTIFICATE, **_key_attrs(self.config)}
            ):
                return bytes(obj[Attribute.VALUE])
            return None

        result = self.session.call("reading the certificate", find)
        return result if isinstance(result, bytes) else None


def _key_kwargs(config: Pkcs11Config) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if config.key_label is not None:
        kwargs["label"] = config.key_label
    if config.key_id is not None:
        kwargs["id"] = config.key_id
    return kwargs


@dataclasses.dataclass
class SignCost:
    """The token's real signing time during one handshake, in seconds."""

    seconds: float = 0.0
    signatures: int = 0


class Pkcs11KeyStore:
    """A device's key on a PKCS#11 token and its certificate chain (a PEM file, or the token's
    certificate object): TLS signs on the token through :mod:`devices.signer_tls`."""

    kind: str = "pkcs11"
    external_signer: bool = True  # devices.client: TLS through devices.signer_tls

    def __init__(self, config: Pkcs11Config, cert_path: Path | None = None) -> None:
        """Use the key ``config`` names; the chain from ``cert_path`` (None: from the token)."""
        self.config = config
        self.cert_path = Path(cert_path) if cert_path is not None else None
        self.key = TokenKey(config)
        self._chain_pem: bytes | None = None
        # The PIN the token refused, and how often in a row: this device stops presenting it
        # after MAX_PIN_FAILURES, as a YubiKey blocks after three (SoftHSM2 never blocks).
        self._refused: tuple[str, int] | None = None

    def __repr__(self) -> str:
        return f"Pkcs11KeyStore({self.config.where}, key={self.config.key_label!r})"

    async def handshake_context(self, make_context: Callable[[], Any]) -> tuple[Any, float]:
        """Refuse: the standard library's ``ssl`` cannot sign on a token."""
        raise KeyStoreError(
            f"{self.config.where}: a PKCS#11 key signs on the token; this client's TLS (the "
            "standard library's ssl) cannot use it (devices.client uses devices.signer_tls)"
        )

    def chain_pem(self) -> bytes:
        """The certificate chain (leaf first) as PEM, read once."""
        if self._chain_pem is None:
            if self.cert_path is not None:
                try:
                    self._chain_pem = self.cert_path.read_bytes()
                except OSError as e:
                    raise KeyStoreError(
                        f"{self.cert_path}: cannot read the certificate file: {e.strerror or e}"
                    ) from e
            else:
                der = self.key.certificate_der()
                if der is None:
                    raise TokenError(
                        "CKR_OBJECT_HANDLE_INVALID",
                        f"{self.config.where}: no certificate object beside key "
                        f"{self.config.key_label or self.config.key_id!r}",
                    )
                cert = x509.load_der_x509_certificate(der)
                self._chain_pem = cert.public_bytes(serialization.Encoding.PEM)
        return self._chain_pem

    def tls_signer(self) -> tuple[bytes, Callable[[bytes, str, str | None], bytes], SignCost]:
        """For one handshake: the chain (PEM), a signer that signs on the token, and the cost
        record that signer fills (the token's real signing time). Opens the session now."""
        chain = self.chain_pem()
        self._log_in()
        cost = SignCost()

        def signer(digest: bytes, hash_name: str, padding: str | None) -> bytes:
            return self.sign(cost, digest, hash_name, padding)

        return chain, signer, cost

    def _log_in(self) -> None:
        """Make sure the token's session is open, presenting this device's PIN if it is not."""
        pin = self.config.pin()
        if self._refused == (pin, MAX_PIN_FAILURES):
            raise TokenError(
                "CKR_PIN_LOCKED",
                f"{self.config.where}: the token refused this PIN {MAX_PIN_FAILURES} times; "
                "the device no longer presents it (a YubiKey would now be blocked; change the "
                "PIN source to try another)",
            )
        try:
            self.key.session.session(pin)
        except TokenError as e:
            if e.code == "CKR_PIN_INCORRECT":
                count = self._refused[1] if self._refused and self._refused[0] == pin else 0
                self._refused = (pin, count + 1)
            raise
        self._refused = None

    def sign(self, cost: SignCost, digest: bytes, hash_name: str, padding: str | None) -> bytes:
        """Sign ``digest`` on the token, adding the token's time to ``cost``."""
        start = time.perf_counter()
        try:
            return self.key.sign_digest(digest, hash_name, padding)
        finally:
            cost.seconds += time.perf_counter() - start
            cost.signatures += 1

    def remove(self) -> None:
        """The token is pulled out: close its session; signing fails with CKR_DEVICE_REMOVED."""
        self.key.session.close()
        self.key.session.removed = True

    def reinsert(self) -> None:
        """The token is back: the next handshake opens (and logs in) a new session."""
        self.key.session.removed = False


#: Key types :func:`generate_on_token` makes (named as in :data:`devices.pki.KEY_TYPES`).
TOKEN_KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048")


def token_uri(config: Pkcs11Config) -> str:
    """The RFC 7512 ``pkcs11:`` URI of the private key ``config`` names (for inventories)."""
    parts = []
    if config.token is not None:
        parts.append(f"token={urllib.parse.quote(config.token, safe='')}")
    if config.slot is not None:
        parts.append(f"slot-id={config.slot}")
    if config.key_label is not None:
        parts.append(f"object={urllib.parse.quote(config.key_label, safe='')}")
    if config.key_id is not None:
        parts.append("id=" + "".join(f"%{b:02x}" for b in config.key_id))
    parts.append("type=private")
    return "pkcs11:" + ";".join(parts)


def generate_on_token(
    config: Pkcs11Config, key_type: str, common_name: str, org: str | None = None
) -> x509.CertificateSigningRequest:
    """Generate a key pair on the token (sensitive, never extractable) labelled as ``config``
    says, and return a CSR for ``common_name`` signed on the token."""
    session = token_session(config)
    attrs = _key_attrs(config)
    private_template = {
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.SIGN: True,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        **attrs,
    }
    public_template = {Attribute.VERIFY: True, Attribute.TOKEN: True, **attrs}

    def generate(s: Any) -> Any:
        if key_type in TOKEN_KEY_TYPES[:2]:
            curve = "secp256r1" if key_type == "ec-p256" else "secp384r1"
            params = s.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(curve)}, local=True
            )
            pub, _ = params.generate_keypair(
                store=True, public_template=public_template, private_template=private_template
            )
            point = bytes(pub[Attribute.EC_POINT])
            curve_obj: ec.EllipticCurve = ec.SECP256R1() if curve == "secp256r1" else ec.SECP384R1()
            # EC_POINT is a DER OCTET STRING around the uncompressed point.
            return ec.EllipticCurvePublicKey.from_encoded_point(curve_obj, _octet_string(point))
        if key_type == "rsa-2048":
            pub, _ = s.generate_keypair(
                KeyType.RSA,
                2048,
                store=True,
                public_template=public_template,
                private_template=private_template,
            )
            n = int.from_bytes(bytes(pub[Attribute.MODULUS]), "big")
            e = int.from_bytes(bytes(pub[Attribute.PUBLIC_EXPONENT]), "big")
            return rsa.RSAPublicNumbers(e, n).public_key()
        raise TokenError(
            "CKR_MECHANISM_INVALID",
            f"{config.where}: key type {key_type!r} cannot be generated here "
            "(ec-p256, ec-p384 or rsa-2048)",
        )

    public_key = session.call("generating a key pair", generate)
    return _token_csr(config, public_key, common_name, org)


def _octet_string(der: bytes) -> bytes:
    if der and der[0] == 0x04 and len(der) > 2 and der[1] + 2 == len(der):
        return der[2:]
    if der and der[0] == 0x04 and len(der) > 3 and der[1] == 0x81:
        return der[3:]
    return der


def _token_csr(
    config: Pkcs11Config,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    common_name: str,
    org: str | None,
) -> x509.CertificateSigningRequest:
    """A PKCS#10 request for ``public_key`` whose signature is made on the token."""
    from asn1crypto import csr as acsr
    from asn1crypto import keys as akeys

    names = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if org:
        names.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    subject = x509.Name(names)
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    info = acsr.CertificationRequestInfo(
        {
            "version": "v1",
            "subject": acsr.Name.load(subject.public_bytes()),
            "subject_pk_info": akeys.PublicKeyInfo.load(spki),
            "attributes": [],
        }
    )
    hash_name = (
        "sha384"
        if isinstance(public_key, ec.EllipticCurvePublicKey)
        and (public_key.curve.name == "secp384r1")
        else "sha256"
    )
    algo = {
        (True, "sha256"): "sha256_ecdsa",
        (True, "sha384"): "sha384_ecdsa",
        (False, "sha256"): "sha256_rsa",
    }[(isinstance(public_key, ec.EllipticCurvePublicKey), hash_name)]
    digest = hashes.Hash(hashes.SHA256() if hash_name == "sha256" else hashes.SHA384())
    digest.update(info.dump())
    signature = TokenKey(config).sign_digest(digest.finalize(), hash_name, "pkcs1")
    request = acsr.CertificationRequest(
        {
            "certification_request_info": info,
            "signature_algorithm": {"algorithm": algo},
            "signature": signature,
        }
    )
    csr = x509.load_der_x509_csr(request.dump())
    if not csr.is_signature_valid:
        raise TokenError("CKR_SIGNATURE_INVALID", f"{config.where}: the token's CSR signature")
    return csr


def store_certificate(config: Pkcs11Config, cert: x509.Certificate) -> None:
    """Store ``cert`` on the token beside its key (same label and id)."""
    der = cert.public_bytes(serialization.Encoding.DER)

    def put(session: Any) -> None:
        session.create_object(
            {
                Attribute.CLASS: ObjectClass.CERTIFICATE,
                Attribute.CERTIFICATE_TYPE: pkcs11.CertificateType.X_509,
                Attribute.TOKEN: True,
                Attribute.VALUE: der,
                Attribute.SUBJECT: cert.subject.public_bytes(),
                **_key_attrs(config),
            }
        )

    token_session(config).call("storing the certificate", put)


#: CKA_ID prefix of keys the testbed imported itself (a run may replace those, never others).
IMPORTED_ID_PREFIX = b"mtls-testbed:"


def import_key(config: Pkcs11Config, key_pem: bytes, cert: x509.Certificate) -> bool:
    """Put a device's software key (PEM) on the token under ``config.key_label`` (sensitive,
    not extractable from then on), unless the token already holds the key of ``cert`` there.

    A key under that label that belongs to another certificate is replaced only if the testbed
    imported it (its CKA_ID starts with :data:`IMPORTED_ID_PREFIX`); otherwise this refuses.
    Returns True when a key was imported.
    """
    from pkcs11.util.ec import decode_ec_private_key
    from pkcs11.util.rsa import decode_rsa_private_key

    key = serialization.load_pem_private_key(key_pem, None)
    wanted = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if (
        key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        != wanted
    ):
        raise KeyStoreError(f"{config.where}: the key to import does not match its certificate")
    label = config.key_label
    if label is None:
        raise KeyStoreError(f"{config.where}: importing a key needs a key label")
    if isinstance(key, ec.EllipticCurvePrivateKey):
        attrs = decode_ec_private_key(
            key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
    elif isinstance(key, rsa.RSAPrivateKey):
        attrs = decode_rsa_private_key(
            key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
    else:
        raise TokenError("CKR_KEY_TYPE_INCONSISTENT", f"{config.where}: EC or RSA keys only")

    def put(session: Any) -> bool:
        found = list(session.get_objects({Attribute.LABEL: label}))
        for obj in found:
            if obj[Attribute.CLASS] == ObjectClass.CERTIFICATE and bytes(
                obj[Attribute.VALUE]
            ) == cert.public_bytes(serialization.Encoding.DER):
                return False  # already there, with this certificate
        for obj in found:
            ident = bytes(obj[Attribute.ID]) if obj[Attribute.CLASS] != ObjectClass.DATA else b""
            if not ident.startswith(IMPORTED_ID_PREFIX):
                raise KeyStoreError(
                    f"{config.where}: the token holds another key or certificate labelled "
                    f"{label!r}, not imported by the testbed; use another key_label"
                )
        for obj in found:
            obj.destroy()
        ident = IMPORTED_ID_PREFIX + label.encode()
        common = {Attribute.TOKEN: True, Attribute.LABEL: label, Attribute.ID: ident}
        session.create_object(
            {
                **attrs,
                **common,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.SIGN: True,
            }
        )
        session.create_object(
            {
                Attribute.CLASS: ObjectClass.CERTIFICATE,
                Attribute.CERTIFICATE_TYPE: pkcs11.CertificateType.X_509,
                Attribute.VALUE: cert.public_bytes(serialization.Encoding.DER),
                Attribute.SUBJECT: cert.subject.public_bytes(),
                **common,
            }
        )
        return True

    return bool(token_session(config).call("importing a key", put))
