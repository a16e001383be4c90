"""A PIV smart-card token, modelled on a YubiKey 5, behind the :class:`~devices.keystore.KeyStore`
interface.

Theory of operation
-------------------
A real PIV token keeps private keys in slots (9a authentication, 9c digital signature, 9d key
management, 9e card authentication) and never exports them: the host asks it to sign. Python's
``ssl`` cannot hand a signature to a token; it only loads keys from files. So the simulation
splits a signature in two:

* the *authorisation* is modelled on the token, faithfully: PIN and PUK with three retries each
  and blocking; a per-slot PIN policy ("never", "once" per session, "always" before each
  signature); a per-slot touch policy ("never", "always", "cached" for 15 s) with a simulated
  finger (an async ``touch`` supplier); and the latency of each operation;
* the *arithmetic* is left to OpenSSL: once a handshake is authorised, the key is written to a
  0600 file in a fresh private temporary directory, loaded into the handshake's SSLContext, and
  deleted at once. As a Python value the key lives only in this module's ``_VAULT``, outside
  every token object; no public attribute, method or return value carries it.

Time: the token never sleeps. An authorised handshake *returns* its cost (PIN verify + on-token
signature, from :class:`Latencies`) and the client sleeps it with trio, so trio's MockClock sees
it. The only real wait is for the touch supplier, bounded by the 15 s touch timeout. The token
reads the time only through the injected ``now`` (default :func:`trio.current_time`).

Concurrency: like the card, the token does one thing at a time: a ``trio.Lock`` serialises
authorisations, so a handshake waiting for a touch holds the token. The returned sign latencies
of concurrent handshakes are not serialised, though (each pays its own, in parallel).

Not modelled: the management key (``generate``/``import_key`` need no authentication),
attestation, and PIN/PUK retry counts other than three.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import ssl
import tempfile
import weakref
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import MappingProxyType

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from devices.keystore import KeyStoreError, write_private_file
from devices.pki import PrivateKey, generate_key

__all__ = [
    "CODES",
    "DEFAULT_PIN",
    "DEFAULT_PUK",
    "MAX_RETRIES",
    "PIN_POLICIES",
    "SLOTS",
    "TOUCH_CACHE_SECONDS",
    "TOUCH_POLICIES",
    "TOUCH_TIMEOUT_SECONDS",
    "HandshakeCost",
    "Latencies",
    "PKCS11Error",
    "PivKeyStore",
    "PivToken",
    "PublicKey",
    "SlotInfo",
    "TouchSupplier",
]

logger = logging.getLogger(__name__)

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
TouchSupplier = Callable[[], Awaitable[None]]

DEFAULT_PIN = "123456"
DEFAULT_PUK = "12345678"
MAX_RETRIES = 3
TOUCH_CACHE_SECONDS = 15.0  # a "cached" touch authorises signatures for 15 s after it happens
TOUCH_TIMEOUT_SECONDS = 15.0  # a YubiKey gives up waiting for a touch after about 15 s

SLOTS = ("9a", "9c", "9d", "9e")
PIN_POLICIES = ("never", "once", "always")
TOUCH_POLICIES = ("never", "always", "cached")
# YubiKey defaults: 9c (digital signature) wants the PIN before every signature, 9e (card
# authentication, e.g. door readers) never; touch is off unless asked for.
DEFAULT_PIN_POLICY = MappingProxyType({"9a": "once", "9c": "always", "9d": "once", "9e": "never"})
DEFAULT_TOUCH_POLICY = MappingProxyType({slot: "never" for slot in SLOTS})

# YubiKey 5 figures for one signature through PKCS#11. P-384 was not measured: 0.100 s is an
# estimate between P-256 and RSA-2048. Add a key type here (e.g. "ed25519") to let tokens hold it.
DEFAULT_SIGN_LATENCY: Mapping[str, float] = MappingProxyType(
    {"ec-p256": 0.072, "ec-p384": 0.100, "rsa-2048": 0.139}
)
DEFAULT_PIN_VERIFY_LATENCY = 0.009

#: Every code a :class:`PKCS11Error` may carry, and what it means here.
CODES: Mapping[str, str] = MappingProxyType(
    {
        "CKR_PIN_INCORRECT": "wrong PIN (or PUK); retries_left says how many tries remain",
        "CKR_PIN_LOCKED": "the PIN (or PUK) is blocked: unblock the PIN with the PUK; "
        "reset() the token once both are blocked",
        "CKR_PIN_LEN_RANGE": "a new PIN or PUK is not 6 to 8 characters long",
        "CKR_USER_NOT_LOGGED_IN": "the slot's PIN policy needs a PIN verify that was not done",
        "CKR_FUNCTION_REJECTED": "the signature was refused: a touch was required and none came",
        "CKR_KEY_HANDLE_INVALID": "the slot holds no key",
        "CKR_OBJECT_HANDLE_INVALID": "the slot holds a key but no certificate",
        "CKR_ACTION_PROHIBITED": "reset() is allowed only when both PIN and PUK are blocked",
        "CKR_ARGUMENTS_BAD": "unknown slot or policy, or a certificate that does not match the key",
        "CKR_MECHANISM_INVALID": "generate() of a key type the token does not support",
        "CKR_KEY_TYPE_INCONSISTENT": "import_key() of a key type the token does not support",
        "CKR_GENERAL_ERROR": "OpenSSL refused the key or certificate chain",
    }
)


class PKCS11Error(KeyStoreError):
    """A token operation failed; ``code`` is a PKCS#11 return value name (see :data:`CODES`)."""

    def __init__(self, code: str, message: str = "", retries_left: int | None = None) -> None:
        """Build the error; ``code`` must be one of :data:`CODES`."""
        if code not in CODES:
            raise ValueError(f"unknown PKCS#11 code {code!r}; expected one of {sorted(CODES)}")
        self.code = code
        self.message = message or CODES[code]
        self.retries_left = retries_left
        text = f"{code}: {self.message}"
        if retries_left is not None:
            text += f" ({retries_left} {'retry' if retries_left == 1 else 'retries'} left)"
        super().__init__(text)


@dataclasses.dataclass(frozen=True)
class Latencies:
    """Seconds each token operation costs; defaults are YubiKey 5 figures."""

    # Per key type, named as in devices.pki.KEY_TYPES.
    sign: Mapping[str, float] = dataclasses.field(default_factory=lambda: DEFAULT_SIGN_LATENCY)
    pin_verify: float = DEFAULT_PIN_VERIFY_LATENCY


@dataclasses.dataclass(frozen=True)
class SlotInfo:
    """What the token tells anyone about an occupied slot: never the private key."""

    slot: str
    key_type: str
    pin_policy: str
    touch_policy: str
    public_key: PublicKey
    certificate_chain_pem: bytes | None  # None until a certificate is imported


@dataclasses.dataclass(frozen=True)
class HandshakeCost:
    """Where one handshake's key-store time went, in seconds."""

    pin_verify: float = 0.0
    sign: float = 0.0
    touch_wait: float = 0.0  # already elapsed on trio's clock while awaiting the touch

    @property
    def charged(self) -> float:
        """The cost the client must still add (sleep): PIN verify plus on-token signature."""
        return self.pin_verify + self.sign


@dataclasses.dataclass
class _Secrets:
    pin: bytes
    puk: bytes
    keys: dict[str, PrivateKey]


# The private keys and PIN/PUK of every live token, keyed weakly by token so that they vanish with
# it; kept outside the token objects so that nothing reachable from a token holds a key.
_VAULT: weakref.WeakKeyDictionary[PivToken, _Secrets] = weakref.WeakKeyDictionary()


def _check_choice(what: str, value: str, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise PKCS11Error(
            "CKR_ARGUMENTS_BAD", f"unknown {what} {value!r}; expected one of {', '.join(valid)}"
        )
    return value


def _check_secret_length(what: str, value: str) -> bytes:
    if not 6 <= len(value) <= 8:
        raise PKCS11Error("CKR_PIN_LEN_RANGE", f"a {what} must be 6 to 8 characters long")
    return value.encode()


def _key_type_of(key: PrivateKey) -> str | None:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(key.curve.name)
    if isinstance(key, rsa.RSAPrivateKey):
        return f"rsa-{key.key_size}"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    return None


def _spki(key: PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class PivToken:
    """A simulated PIV token (YubiKey 5 style): four key slots, PIN/PUK, PIN and touch policies."""

    def __init__(
        self,
        *,
        pin: str = DEFAULT_PIN,
        puk: str = DEFAULT_PUK,
        latencies: Latencies | None = None,
        touch: TouchSupplier | None = None,
        now: Callable[[], float] = trio.current_time,
        browser_pin_every_handshake: bool = False,
    ) -> None:
        """Make an empty token; ``touch`` presses its button, ``now`` is its only clock."""
        self.latencies = latencies or Latencies()
        self.touch = touch
        self.now = now
        # Browsers' PKCS#11 modules log in for each handshake and log out after it, so every
        # handshake pays a PIN verify whatever the slot's PIN policy.
        self.browser_pin_every_handshake = browser_pin_every_handshake
        _VAULT[self] = _Secrets(
            _check_secret_length("PIN", pin), _check_secret_length("PUK", puk), {}
        )
        self._slots: dict[str, SlotInfo] = {}
        self._pin_retries = MAX_RETRIES
        self._puk_retries = MAX_RETRIES
        self._logged_in = False
        # Set by a PIN verify, used up by the next signature: what PIN policy "always" requires.
        self._verified_for_next_signature = False
        self._last_touch: float | None = None
        self._lock = trio.Lock()

    def __repr__(self) -> str:
        return f"<PivToken slots={sorted(self._slots)} pin_retries={self._pin_retries}>"

    # -- status ---------------------------------------------------------------------------------

    @property
    def pin_retries(self) -> int:
        """Wrong PINs still allowed before the PIN is blocked."""
        return self._pin_retries

    @property
    def puk_retries(self) -> int:
        """Wrong PUKs still allowed before the PUK is blocked."""
        return self._puk_retries

    @property
    def pin_blocked(self) -> bool:
        """Whether the PIN is blocked (unblock it with the PUK)."""
        return self._pin_retries == 0

    @property
    def puk_blocked(self) -> bool:
        """Whether the PUK is blocked (then only reset() helps, once the PIN is blocked too)."""
        return self._puk_retries == 0

    @property
    def logged_in(self) -> bool:
        """Whether a PIN verify holds for this session (PIN policy "once")."""
        return self._logged_in

    def info(self, slot: str) -> SlotInfo:
        """Describe an occupied slot; CKR_KEY_HANDLE_INVALID when it is empty."""
        _check_choice("slot", slot, SLOTS)
        try:
            return self._slots[slot]
        except KeyError:
            raise PKCS11Error(
                "CKR_KEY_HANDLE_INVALID",
                f"slot {slot} holds no key; generate() or import_key() one first",
            ) from None

    def occupied_slots(self) -> list[str]:
        """The slots holding a key."""
        return sorted(self._slots)

    # -- keys -----------------------------------------------------------------------------------

    def generate(
        self,
        slot: str,
        key_type: str = "ec-p256",
        *,
        pin_policy: str | None = None,
        touch_policy: str | None = None,
    ) -> PublicKey:
        """Generate a key in ``slot`` (replacing any there) and return its public key."""
        _check_choice("slot", slot, SLOTS)
        if key_type not in self.latencies.sign:
            raise PKCS11Error(
                "CKR_MECHANISM_INVALID",
                f"this token cannot generate {key_type!r} keys; "
                f"it supports {', '.join(self.latencies.sign)}",
            )
        try:
            key = generate_key(key_type)
        except ValueError as e:
            raise PKCS11Error("CKR_MECHANISM_INVALID", str(e)) from e
        self._store(slot, key, key_type, None, pin_policy, touch_policy)
        return key.public_key()

    def import_key(
        self,
        slot: str,
        private_key: PrivateKey,
        certificate_chain_pem: bytes,
        *,
        pin_policy: str | None = None,
        touch_policy: str | None = None,
    ) -> None:
        """Put an existing key and its certificate chain (leaf first) into ``slot``."""
        _check_choice("slot", slot, SLOTS)
        key_type = _key_type_of(private_key)
        if key_type is None or key_type not in self.latencies.sign:
            raise PKCS11Error(
                "CKR_KEY_TYPE_INCONSISTENT",
                f"this token cannot hold {key_type or type(private_key).__name__!r} keys; "
                f"it supports {', '.join(self.latencies.sign)}",
            )
        chain = self._check_chain(slot, private_key.public_key(), certificate_chain_pem)
        self._store(slot, private_key, key_type, chain, pin_policy, touch_policy)

    def import_certificate(self, slot: str, certificate_chain_pem: bytes) -> None:
        """Store the certificate chain (leaf first) for the key generated in ``slot``."""
        info = self.info(slot)
        chain = self._check_chain(slot, info.public_key, certificate_chain_pem)
        self._slots[slot] = dataclasses.replace(info, certificate_chain_pem=chain)

    @staticmethod
    def _check_chain(slot: str, public_key: PublicKey, chain_pem: bytes) -> bytes:
        try:
            certs = x509.load_pem_x509_certificates(chain_pem)
        except ValueError as e:
            raise PKCS11Error(
                "CKR_ARGUMENTS_BAD", f"slot {slot}: not a PEM certificate chain ({e})"
            ) from e
        leaf_key = certs[0].public_key()
        if not isinstance(leaf_key, PublicKey) or _spki(leaf_key) != _spki(public_key):
            raise PKCS11Error(
                "CKR_ARGUMENTS_BAD",
                f"slot {slot}: the first certificate of the chain is not for the slot's key",
            )
        return chain_pem

    def _store(
        self,
        slot: str,
        key: PrivateKey,
        key_type: str,
        chain: bytes | None,
        pin_policy: str | None,
        touch_policy: str | None,
    ) -> None:
        info = SlotInfo(
            slot=slot,
            key_type=key_type,
            pin_policy=_check_choice(
                "PIN policy", pin_policy or DEFAULT_PIN_POLICY[slot], PIN_POLICIES
            ),
            touch_policy=_check_choice(
                "touch policy", touch_policy or DEFAULT_TOUCH_POLICY[slot], TOUCH_POLICIES
            ),
            public_key=key.public_key(),
            certificate_chain_pem=chain,
        )
        _VAULT[self].keys[slot] = key
        self._slots[slot] = info

    # -- PIN and PUK ----------------------------------------------------------------------------

    def verify_pin(self, pin: str) -> float:
        """Log in with ``pin``; return the seconds the verify costs (the caller sleeps them)."""
        self._check_pin(pin)
        self._logged_in = True
        self._verified_for_next_signature = True
        return self.latencies.pin_verify

    def _check_pin(self, pin: str) -> None:
        if self.pin_blocked:
            raise PKCS11Error(
                "CKR_PIN_LOCKED",
                "the PIN is blocked; unblock it with the PUK: unblock(puk, new_pin)",
            )
        if not hmac.compare_digest(pin.encode(), _VAULT[self].pin):
            self._pin_retries -= 1
            # A failed VERIFY clears the card's security status.
            self.logout()
            logger.info("wrong PIN, %d retries left", self._pin_retries)
            raise PKCS11Error("CKR_PIN_INCORRECT", "wrong PIN", retries_left=self._pin_retries)
        self._pin_retries = MAX_RETRIES

    def logout(self) -> None:
        """End the login: the next signature needing the PIN needs a new verify."""
        self._logged_in = False
        self._verified_for_next_signature = False

    def _check_puk(self, puk: str) -> None:
        if self.puk_blocked:
            raise PKCS11Error(
                "CKR_PIN_LOCKED",
                "the PUK is blocked; reset() the token once the PIN is blocked too",
            )
        if not hmac.compare_digest(puk.encode(), _VAULT[self].puk):
            self._puk_retries -= 1
            logger.info("wrong PUK, %d retries left", self._puk_retries)
            raise PKCS11Error("CKR_PIN_INCORRECT", "wrong PUK", retries_left=self._puk_retries)
        self._puk_retries = MAX_RETRIES

    def change_pin(self, old_pin: str, new_pin: str) -> None:
        """Replace the PIN; a wrong ``old_pin`` counts as a wrong PIN."""
        new = _check_secret_length("PIN", new_pin)
        self._check_pin(old_pin)  # like CHANGE REFERENCE DATA: checks, but does not log in
        _VAULT[self].pin = new

    def change_puk(self, old_puk: str, new_puk: str) -> None:
        """Replace the PUK; a wrong ``old_puk`` counts as a wrong PUK."""
        new = _check_secret_length("PUK", new_puk)
        self._check_puk(old_puk)
        _VAULT[self].puk = new

    def unblock(self, puk: str, new_pin: str) -> None:
        """Set a new PIN and give it back its retries, authorised by the PUK."""
        new = _check_secret_length("PIN", new_pin)
        self._check_puk(puk)
        _VAULT[self].pin = new
        self._pin_retries = MAX_RETRIES
        self.logout()

    def reset(self) -> None:
        """Wipe every key and restore the default PIN and PUK; only once both are blocked."""
        # Like ykman's "piv reset": a factory reset must not be a way around the PIN.
        if not (self.pin_blocked and self.puk_blocked):
            raise PKCS11Error(
                "CKR_ACTION_PROHIBITED",
                "reset() needs both PIN and PUK blocked "
                f"(PIN retries left: {self._pin_retries}, PUK retries left: {self._puk_retries})",
            )
        _VAULT[self] = _Secrets(DEFAULT_PIN.encode(), DEFAULT_PUK.encode(), {})
        self._slots.clear()
        self._pin_retries = self._puk_retries = MAX_RETRIES
        self.logout()
        self._last_touch = None
        logger.info("token reset: keys wiped, default PIN and PUK restored")

    # -- one handshake's signature ------------------------------------------------------------

    async def _authorize(
        self, slot: str, pin: str | None, touch: TouchSupplier | None
    ) -> tuple[SlotInfo, HandshakeCost]:
        """Clear one signature with ``slot``'s key: PIN as its policy needs, then touch."""
        async with self._lock:
            info = self.info(slot)
            if info.certificate_chain_pem is None:
                raise PKCS11Error(
                    "CKR_OBJECT_HANDLE_INVALID",
                    f"slot {slot} holds a key but no certificate; import_certificate() first",
                )
            try:
                pin_cost = self._login_for(info, pin)
                touch_wait = await self._touch_for(info, touch)
            finally:
                # The attempt uses up a verify made for it, whatever its outcome.
                self._verified_for_next_signature = False
                if self.browser_pin_every_handshake:
                    self.logout()
            return info, HandshakeCost(
                pin_verify=pin_cost, sign=self.latencies.sign[info.key_type], touch_wait=touch_wait
            )

    def _login_for(self, info: SlotInfo, pin: str | None) -> float:
        if self.browser_pin_every_handshake:
            needed = "the browser asks for the PIN on every handshake"
        elif info.pin_policy == "always" and not self._verified_for_next_signature:
            needed = f"slot {info.slot} has PIN policy 'always'"
        elif info.pin_policy == "once" and not self._logged_in:
            needed = f"slot {info.slot} has PIN policy 'once' and the session is not logged in"
        else:
            return 0.0
        if pin is None:
            raise PKCS11Error(
                "CKR_USER_NOT_LOGGED_IN", f"{needed}, but no PIN is configured for this device"
            )
        return self.verify_pin(pin)

    async def _touch_for(self, info: SlotInfo, touch: TouchSupplier | None) -> float:
        if info.touch_policy == "never":
            return 0.0
        start = self.now()
        if (
            info.touch_policy == "cached"
            and self._last_touch is not None
            and start - self._last_touch < TOUCH_CACHE_SECONDS
        ):
            return 0.0
        supplier = touch or self.touch
        if supplier is None:
            raise PKCS11Error(
                "CKR_FUNCTION_REJECTED",
                f"touch required: slot {info.slot} has touch policy {info.touch_policy!r} and "
                "no touch supplier was given",
            )
        with trio.move_on_after(TOUCH_TIMEOUT_SECONDS) as scope:
            await supplier()
        if scope.cancelled_caught:
            raise PKCS11Error(
                "CKR_FUNCTION_REJECTED",
                f"touch required: slot {info.slot} got no touch within {TOUCH_TIMEOUT_SECONDS:g} s",
            )
        self._last_touch = self.now()
        return self._last_touch - start

    def _load_into(self, ctx: ssl.SSLContext, info: SlotInfo) -> None:
        """Load ``info``'s chain and key into ``ctx`` through a 0600 file deleted at once."""
        assert info.certificate_chain_pem is not None  # checked by _authorize
        with tempfile.TemporaryDirectory(prefix="piv-") as tmp:
            cert_path, key_path = Path(tmp) / "chain.pem", Path(tmp) / "key.pem"
            cert_path.write_bytes(info.certificate_chain_pem)
            write_private_file(
                key_path,
                _VAULT[self]
                .keys[info.slot]
                .private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
            )
            try:
                ctx.load_cert_chain(cert_path, key_path)
            except ssl.SSLError as e:
                raise PKCS11Error(
                    "CKR_GENERAL_ERROR", f"slot {info.slot}: OpenSSL refused the key ({e})"
                ) from e
            finally:
                key_path.unlink()


class PivKeyStore:
    """A device's handle on one slot of a :class:`PivToken`: the PIV :class:`KeyStore`."""

    kind: str = "piv"

    def __init__(
        self, token: PivToken, slot: str, pin: str | None, touch: TouchSupplier | None = None
    ) -> None:
        """Use ``slot`` of ``token`` with the device's configured ``pin`` (None: no PIN)."""
        self.token = token
        self.slot = _check_choice("slot", slot, SLOTS)
        self._pin = pin
        self.touch = touch  # overrides the token's own supplier when given
        self.last_cost: HandshakeCost | None = None  # of the latest authorised handshake
        self._cached: tuple[SlotInfo, ssl.SSLContext] | None = None

    def __repr__(self) -> str:
        return f"PivKeyStore(slot={self.slot!r}, token={self.token!r})"

    async def handshake_context(
        self, make_context: Callable[[], ssl.SSLContext]
    ) -> tuple[ssl.SSLContext, float]:
        """Authorise one signature on the token and return the context and its charged cost."""
        info, cost = await self.token._authorize(self.slot, self._pin, self.touch)
        # The context is rebuilt only when the slot's contents changed: a wiped or replaced key
        # must not live on in a cached context, but the policy checks above run every time.
        if self._cached is None or self._cached[0] is not info:
            ctx = make_context()
            self.token._load_into(ctx, info)
            self._cached = (info, ctx)
        self.last_cost = cost
        return self._cached[1], cost.charged
