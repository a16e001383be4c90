"""Key stores: PIN/PUK lockout and reset, PIN and touch policies on trio's clock, latencies, the
key staying inside the token, and real TLS handshakes with what the stores hand out."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import ssl
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from devices.keystore import KeyStore, KeyStoreError, SoftwareKeyStore, write_encrypted_key
from devices.piv import (
    DEFAULT_PIN,
    DEFAULT_PUK,
    Latencies,
    PivKeyStore,
    PivToken,
    PKCS11Error,
    PublicKey,
)
from devices.pki import Issued, PrivateKey, generate_key, issue_ca, issue_leaf, write_pem

NOW = dt.datetime.now(dt.UTC)  # real handshakes check validity against the wall clock
DAY = dt.timedelta(days=1)
SERVER_NAME = "edge.test"
P256, PIN_VERIFY = 0.072, 0.009
TLS_VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]


@dataclasses.dataclass
class Pki:
    """A device CA, a server certificate it issued, and a ready server context."""

    ca: Issued
    server_ctx: ssl.SSLContext
    dir: Path

    def leaf(self, key: PrivateKey, cn: str = "device-001") -> Issued:
        """A client certificate for ``key``."""
        return issue_leaf(cn, self.ca, key=key, not_before=NOW - DAY, not_after=NOW + DAY)

    def client_context(self, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        """A fresh client context trusting the server, as the device client makes them."""
        ctx = ssl.create_default_context(cadata=self.ca.cert_pem().decode())
        if version is not None:
            ctx.minimum_version = ctx.maximum_version = version
        return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = issue_ca("device root", NOW)
    server = issue_leaf(
        SERVER_NAME,
        ca,
        not_before=NOW - DAY,
        not_after=NOW + DAY,
        client=False,
        dns_names=[SERVER_NAME],
    )
    d = tmp_path_factory.mktemp("pki")
    write_pem(d / "server.pem", server.cert_pem())
    write_pem(d / "server-key.pem", server.key_pem(), private=True)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cadata=ca.cert_pem().decode())
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_cert_chain(d / "server.pem", d / "server-key.pem")
    return Pki(ca, server_ctx, d)


def token_with(
    pki: Pki, slot: str = "9a", key_type: str = "ec-p256", **kw: Any
) -> tuple[PivToken, PrivateKey]:
    """A token holding a fresh key (and its certificate) in ``slot``; ``kw`` go to import_key."""
    token_kw = {
        k: kw.pop(k) for k in ("latencies", "touch", "browser_pin_every_handshake") if k in kw
    }
    token = PivToken(**token_kw)
    key = generate_key(key_type)
    token.import_key(slot, key, pki.leaf(key).cert_pem(), **kw)
    return token, key


async def costs(store: KeyStore, pki: Pki, n: int) -> list[float]:
    """The charged cost of ``n`` successive handshakes."""
    return [(await store.handshake_context(pki.client_context))[1] for _ in range(n)]


async def peer_cn(pki: Pki, client_ctx: ssl.SSLContext) -> str:
    """Run a real TLS handshake in memory; return the CN of the client certificate received."""
    client_raw, server_raw = trio.testing.memory_stream_pair()
    client = trio.SSLStream(client_raw, client_ctx, server_hostname=SERVER_NAME)
    server = trio.SSLStream(server_raw, pki.server_ctx, server_side=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    peer = server.getpeercert()
    assert peer is not None
    return dict(rdn[0] for rdn in peer["subject"])["commonName"]


def pem_of(key: PrivateKey) -> bytes:
    """A private key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def with_code(code: str, match: str | None = None) -> pytest.RaisesExc[PKCS11Error]:
    """pytest.raises for a PKCS11Error with ``code``."""
    return pytest.raises(PKCS11Error, match=f"^{code}: {match or ''}")


# -- PIN, PUK, reset -----------------------------------------------------------------------------


def test_three_wrong_pins_block_the_pin() -> None:
    token = PivToken()
    for left in (2, 1, 0):
        with with_code("CKR_PIN_INCORRECT") as e:
            token.verify_pin("000000")
        assert e.value.retries_left == left
        assert token.pin_retries == left
    assert token.pin_blocked
    with with_code("CKR_PIN_LOCKED", "the PIN is blocked; unblock"):
        token.verify_pin(DEFAULT_PIN)  # even the right PIN
    assert not token.logged_in


def test_a_right_pin_restores_the_retries() -> None:
    token = PivToken()
    with with_code("CKR_PIN_INCORRECT"):
        token.verify_pin("000000")
    assert token.verify_pin(DEFAULT_PIN) == PIN_VERIFY
    assert token.pin_retries == 3
    assert token.logged_in


def test_a_wrong_pin_logs_out() -> None:
    token = PivToken()
    token.verify_pin(DEFAULT_PIN)
    with with_code("CKR_PIN_INCORRECT"):
        token.verify_pin("000000")
    assert not token.logged_in


def test_the_puk_unblocks_the_pin_with_a_new_one() -> None:
    token = PivToken()
    for _ in range(3):
        with with_code("CKR_PIN_INCORRECT"):
            token.verify_pin("000000")
    token.unblock(DEFAULT_PUK, "24682468")
    assert token.pin_retries == 3 and not token.pin_blocked
    with with_code("CKR_PIN_INCORRECT"):
        token.verify_pin(DEFAULT_PIN)  # the old PIN is gone
    token.verify_pin("24682468")


def test_three_wrong_puks_block_the_puk() -> None:
    token = PivToken()
    for left in (2, 1, 0):
        with with_code("CKR_PIN_INCORRECT", "wrong PUK") as e:
            token.unblock("00000000", "24682468")
        assert e.value.retries_left == left
    assert token.puk_blocked
    with with_code("CKR_PIN_LOCKED", "the PUK is blocked"):
        token.unblock(DEFAULT_PUK, "24682468")
    token.verify_pin(DEFAULT_PIN)  # the PIN itself still works


def test_new_pins_must_be_6_to_8_characters() -> None:
    token = PivToken()
    with with_code("CKR_PIN_LEN_RANGE"):
        token.change_pin(DEFAULT_PIN, "12345")
    with with_code("CKR_PIN_LEN_RANGE"):
        PivToken(puk="123456789")
    token.change_pin(DEFAULT_PIN, "87654321")
    assert not token.logged_in  # changing the PIN is not a login
    token.verify_pin("87654321")


async def test_reset_only_when_pin_and_puk_are_blocked_and_it_wipes_the_keys(pki: Pki) -> None:
    token, _ = token_with(pki, "9a")
    token.change_pin(DEFAULT_PIN, "24682468")
    with with_code("CKR_ACTION_PROHIBITED", "reset\\(\\) needs both PIN and PUK blocked"):
        token.reset()
    for _ in range(3):
        with with_code("CKR_PIN_INCORRECT"):
            token.verify_pin("000000")
    with with_code("CKR_ACTION_PROHIBITED"):
        token.reset()  # the PIN alone is not enough
    for _ in range(3):
        with with_code("CKR_PIN_INCORRECT"):
            token.unblock("00000000", "11112222")
    token.reset()
    assert token.occupied_slots() == []
    assert (token.pin_retries, token.puk_retries) == (3, 3)
    with with_code("CKR_KEY_HANDLE_INVALID", "slot 9a holds no key"):
        await PivKeyStore(token, "9a", DEFAULT_PIN).handshake_context(pki.client_context)
    token.verify_pin(DEFAULT_PIN)  # defaults restored
    token.unblock(DEFAULT_PUK, "24682468")


# -- PIN policy ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("once", [PIN_VERIFY + P256, P256, P256]),
        ("always", [PIN_VERIFY + P256] * 3),
        ("never", [P256] * 3),
    ],
)
async def test_pin_policy_sets_when_a_handshake_pays_a_verify(
    pki: Pki, policy: str, expected: list[float]
) -> None:
    token, _ = token_with(pki, "9a", pin_policy=policy)
    store = PivKeyStore(token, "9a", DEFAULT_PIN)
    assert await costs(store, pki, 3) == pytest.approx(expected)
    assert store.last_cost is not None and store.last_cost.sign == P256


async def test_default_pin_policies_follow_the_yubikey(pki: Pki) -> None:
    expected = {"9a": "once", "9c": "always", "9d": "once", "9e": "never"}
    for slot, policy in expected.items():
        token, _ = token_with(pki, slot)
        assert token.info(slot).pin_policy == policy
        assert token.info(slot).touch_policy == "never"


async def test_always_needs_a_verify_even_when_logged_in(pki: Pki) -> None:
    token, _ = token_with(pki, "9c")
    token.verify_pin(DEFAULT_PIN)
    store = PivKeyStore(token, "9c", DEFAULT_PIN)
    # The app's own verify counts for the next signature only.
    assert await costs(store, pki, 2) == pytest.approx([P256, PIN_VERIFY + P256])


async def test_browser_asks_for_the_pin_on_every_handshake(pki: Pki) -> None:
    token, _ = token_with(pki, "9a", browser_pin_every_handshake=True)
    store = PivKeyStore(token, "9a", DEFAULT_PIN)
    assert await costs(store, pki, 3) == pytest.approx([PIN_VERIFY + P256] * 3)
    assert not token.logged_in


@pytest.mark.parametrize("slot", ["9a", "9c"])
async def test_no_configured_pin_means_not_logged_in(pki: Pki, slot: str) -> None:
    token, _ = token_with(pki, slot)
    with with_code("CKR_USER_NOT_LOGGED_IN", f"slot {slot} has PIN policy"):
        await PivKeyStore(token, slot, None).handshake_context(pki.client_context)


async def test_pin_policy_never_needs_no_pin(pki: Pki) -> None:
    token, _ = token_with(pki, "9e")
    assert await costs(PivKeyStore(token, "9e", None), pki, 1) == [P256]


async def test_a_wrong_configured_pin_surfaces_and_counts(pki: Pki) -> None:
    token, _ = token_with(pki, "9a")
    store = PivKeyStore(token, "9a", "999999")
    with with_code("CKR_PIN_INCORRECT") as e:
        await store.handshake_context(pki.client_context)
    assert e.value.retries_left == 2 and token.pin_retries == 2
    assert isinstance(e.value, KeyStoreError)  # what the device client catches


# -- touch, on trio's clock ----------------------------------------------------------------------


def presser(delay: float, presses: list[float]) -> Callable[[], Any]:
    """A touch supplier: a finger that presses ``delay`` seconds after being asked."""

    async def touch() -> None:
        await trio.sleep(delay)
        presses.append(trio.current_time())

    return touch


async def test_touch_always_waits_for_a_press_every_handshake(
    pki: Pki, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.autojump_threshold = 0
    presses: list[float] = []
    token, _ = token_with(pki, "9e", touch=presser(0.5, presses), touch_policy="always")
    store = PivKeyStore(token, "9e", None)
    # The touch wait has passed on trio's clock; the charged cost is the signature alone.
    assert await costs(store, pki, 3) == pytest.approx([P256] * 3)
    assert presses == [0.5, 1.0, 1.5]
    assert store.last_cost is not None and store.last_cost.touch_wait == 0.5


async def test_a_cached_touch_lasts_15_seconds_from_the_press(
    pki: Pki, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.autojump_threshold = 0
    presses: list[float] = []
    token, _ = token_with(pki, "9e", touch=presser(0.5, presses), touch_policy="cached")
    store = PivKeyStore(token, "9e", None)
    await costs(store, pki, 2)
    assert presses == [0.5]
    mock_clock.jump(14.0)  # 14 s after the press: still cached
    await costs(store, pki, 1)
    assert presses == [0.5]
    mock_clock.jump(1.0)  # 15 s after the press (using it did not extend it): expired
    await costs(store, pki, 1)
    assert presses == [0.5, 16.0]


async def test_touch_policy_from_the_store_overrides_the_token(
    pki: Pki, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.autojump_threshold = 0
    presses: list[float] = []
    token, _ = token_with(pki, "9a", touch_policy="always")
    await costs(PivKeyStore(token, "9a", DEFAULT_PIN, touch=presser(2.0, presses)), pki, 1)
    assert presses == [2.0]


async def test_touch_required_without_a_finger_is_rejected(pki: Pki) -> None:
    token, _ = token_with(pki, "9a", touch_policy="cached")
    with with_code("CKR_FUNCTION_REJECTED", "touch required: slot 9a has touch policy 'cached'"):
        await PivKeyStore(token, "9a", DEFAULT_PIN).handshake_context(pki.client_context)


async def test_no_touch_within_15_seconds_is_rejected(
    pki: Pki, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.autojump_threshold = 0
    token, _ = token_with(pki, "9a", touch=trio.sleep_forever, touch_policy="always")
    with with_code("CKR_FUNCTION_REJECTED", "touch required: slot 9a got no touch within 15 s"):
        await PivKeyStore(token, "9a", DEFAULT_PIN).handshake_context(pki.client_context)
    assert trio.current_time() == 15.0


# -- latencies -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key_type", "sign"), [("ec-p256", 0.072), ("ec-p384", 0.100), ("rsa-2048", 0.139)]
)
async def test_latencies_add_up_per_key_type(
    pki: Pki, key_type: str, sign: float, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.autojump_threshold = 0
    token, _ = token_with(pki, "9a", key_type)
    store = PivKeyStore(token, "9a", DEFAULT_PIN)
    start = trio.current_time()
    for _ in range(3):
        _, cost = await store.handshake_context(pki.client_context)
        await trio.sleep(cost)  # what the device client does
    assert trio.current_time() - start == pytest.approx(PIN_VERIFY + 3 * sign)


async def test_latencies_are_configurable_and_limit_the_key_types(pki: Pki) -> None:
    with with_code("CKR_MECHANISM_INVALID", "this token cannot generate 'ed25519' keys"):
        PivToken().generate("9a", "ed25519")
    with with_code("CKR_KEY_TYPE_INCONSISTENT"):
        PivToken().import_key("9a", ed25519.Ed25519PrivateKey.generate(), b"")
    latencies = Latencies(sign={"ed25519": 0.05}, pin_verify=0.5)
    token, _ = token_with(pki, "9a", "ed25519", latencies=latencies)
    store = PivKeyStore(token, "9a", DEFAULT_PIN)
    assert await costs(store, pki, 2) == pytest.approx([0.55, 0.05])
    assert await peer_cn(pki, (await store.handshake_context(pki.client_context))[0])


# -- keys, certificates, slots ---------------------------------------------------------------------


def certificate_for(pki: Pki, public_key: PublicKey, cn: str = "device-gen") -> bytes:
    """A client certificate for a public key (the key itself stays on the token)."""
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)]))
        .issuer_name(pki.ca.certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY)
        .sign(pki.ca.key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


async def test_generated_key_needs_its_certificate(pki: Pki) -> None:
    token = PivToken()
    public = token.generate("9d", "rsa-2048")
    assert isinstance(public, rsa.RSAPublicKey)
    store = PivKeyStore(token, "9d", DEFAULT_PIN)
    with with_code("CKR_OBJECT_HANDLE_INVALID", "slot 9d holds a key but no certificate"):
        await store.handshake_context(pki.client_context)
    with with_code("CKR_ARGUMENTS_BAD", "slot 9d: the first certificate"):
        token.import_certificate("9d", certificate_for(pki, generate_key().public_key()))
    token.import_certificate("9d", certificate_for(pki, public))
    ctx, _ = await store.handshake_context(pki.client_context)
    assert await peer_cn(pki, ctx) == "device-gen"


async def test_unknown_slot_or_policy_names_the_valid_ones(pki: Pki) -> None:
    with with_code("CKR_ARGUMENTS_BAD", "unknown slot '9b'; expected one of 9a, 9c, 9d, 9e"):
        PivToken().generate("9b")
    with with_code("CKR_ARGUMENTS_BAD", "unknown touch policy 'sometimes'"):
        PivToken().generate("9a", touch_policy="sometimes")
    with pytest.raises(ValueError, match="unknown PKCS#11 code 'CKR_OOPS'"):
        PKCS11Error("CKR_OOPS")


async def test_a_replaced_key_is_not_served_from_a_cached_context(pki: Pki) -> None:
    token, _ = token_with(pki, "9a")
    store = PivKeyStore(token, "9a", DEFAULT_PIN)
    first, _ = await store.handshake_context(pki.client_context)
    assert (await store.handshake_context(pki.client_context))[0] is first
    key = generate_key()
    token.import_key("9a", key, pki.leaf(key, "device-002").cert_pem())
    second, _ = await store.handshake_context(pki.client_context)
    assert second is not first
    assert await peer_cn(pki, second) == "device-002"


# -- the key stays inside the token ----------------------------------------------------------------


def reachable(root: object) -> Iterator[object]:
    """Every object reachable from ``root`` through attributes of our own objects and containers."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        yield obj
        if isinstance(obj, dict | MappingProxyType):
            stack += [*obj.keys(), *obj.values()]
        elif isinstance(obj, list | tuple | set | frozenset):
            stack += list(obj)
        elif type(obj).__module__.startswith("devices."):
            stack += list(getattr(obj, "__dict__", {}).values())
            # Public properties too (what dir() offers), not just stored attributes.
            for name in dir(obj):
                if not name.startswith("_"):
                    value = getattr(obj, name)
                    if not callable(value):
                        stack.append(value)


@pytest.mark.parametrize("key_type", ["ec-p256", "rsa-2048"])
async def test_the_private_key_is_unreachable_from_token_and_store(pki: Pki, key_type: str) -> None:
    token, key = token_with(pki, "9a", key_type)
    store = PivKeyStore(token, "9a", DEFAULT_PIN)
    await store.handshake_context(pki.client_context)
    secrets = [
        key.private_bytes(serialization.Encoding.DER, fmt, serialization.NoEncryption())
        for fmt in (
            serialization.PrivateFormat.PKCS8,
            serialization.PrivateFormat.TraditionalOpenSSL,
        )
    ]
    found = [*reachable(store), token.info("9a")]
    for obj in found:
        assert not isinstance(
            obj, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
        )
        if isinstance(obj, bytes | str):
            data = obj.encode() if isinstance(obj, str) else obj
            assert b"PRIVATE KEY" not in data
            assert not any(s in data for s in secrets)
    assert token in found  # the walk did go through the token
    public_names = [n for n in dir(token) if not n.startswith("_")]
    assert not [n for n in public_names if "private" in n or "export" in n]


async def test_the_key_file_is_0600_and_gone_after_loading(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    modes: list[int] = []

    class Spy(ssl.SSLContext):
        def load_cert_chain(self, certfile: Any, keyfile: Any = None, password: Any = None) -> None:
            modes.append(stat.S_IMODE(Path(keyfile).stat().st_mode))
            modes.append(stat.S_IMODE(Path(keyfile).parent.stat().st_mode))
            super().load_cert_chain(certfile, keyfile, password)

    def make_context() -> ssl.SSLContext:
        ctx = Spy(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cadata=pki.ca.cert_pem().decode())
        return ctx

    token, _ = token_with(pki, "9a")
    ctx, _ = await PivKeyStore(token, "9a", DEFAULT_PIN).handshake_context(make_context)
    assert modes == [0o600, 0o700]
    assert list(tmp_path.iterdir()) == []
    assert await peer_cn(pki, ctx) == "device-001"


# -- real handshakes -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", TLS_VERSIONS, ids=["tls1.2", "tls1.3"])
@pytest.mark.parametrize("key_type", ["ec-p256", "ec-p384", "rsa-2048"])
async def test_a_piv_context_completes_a_mutual_tls_handshake(
    pki: Pki, version: ssl.TLSVersion, key_type: str
) -> None:
    token, _ = token_with(pki, "9a", key_type)
    store = PivKeyStore(token, "9a", DEFAULT_PIN)
    assert isinstance(store, KeyStore) and store.kind == "piv"
    ctx, _ = await store.handshake_context(lambda: pki.client_context(version))
    assert await peer_cn(pki, ctx) == "device-001"


# -- software key store ----------------------------------------------------------------------------


@pytest.fixture
def software_files(pki: Pki, tmp_path: Path) -> tuple[Path, Path]:
    """A device certificate and its key encrypted with b"s3cret"."""
    key = generate_key()
    write_pem(tmp_path / "cert.pem", pki.leaf(key, "device-sw").cert_pem())
    write_encrypted_key(key, tmp_path / "key.pem", b"s3cret")
    return tmp_path / "cert.pem", tmp_path / "key.pem"


@pytest.mark.parametrize("version", TLS_VERSIONS, ids=["tls1.2", "tls1.3"])
async def test_software_store_with_an_encrypted_key_handshakes(
    pki: Pki, software_files: tuple[Path, Path], version: ssl.TLSVersion
) -> None:
    cert, key = software_files
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"ENCRYPTED PRIVATE KEY" in key.read_bytes()
    made: list[ssl.SSLContext] = []

    def make_context() -> ssl.SSLContext:
        made.append(pki.client_context(version))
        return made[-1]

    store = SoftwareKeyStore(cert, key, password=b"s3cret")
    assert isinstance(store, KeyStore) and store.kind == "software"
    ctx, cost = await store.handshake_context(make_context)
    assert cost == 0.0
    assert await store.handshake_context(make_context) == (ctx, 0.0)
    assert made == [ctx]  # built once, then cached
    assert await peer_cn(pki, ctx) == "device-sw"


@pytest.mark.parametrize(
    ("password", "problem"),
    [
        (b"wrong", "wrong password: the private key could not be decrypted"),
        (None, "the private key is encrypted; configure its password"),
    ],
)
async def test_software_store_names_the_file_and_the_problem(
    pki: Pki, software_files: tuple[Path, Path], password: bytes | None, problem: str
) -> None:
    cert, key = software_files
    store = SoftwareKeyStore(cert, key, password=password)
    with pytest.raises(KeyStoreError, match=f"^{re.escape(str(key))}: {problem}$"):
        await store.handshake_context(pki.client_context)


async def test_software_store_reports_unreadable_and_mismatched_files(
    pki: Pki, software_files: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, key = software_files
    missing = tmp_path / "nope.pem"
    with pytest.raises(
        KeyStoreError,
        match=f"^{re.escape(str(missing))}: cannot read the private key file: No such",
    ):
        await SoftwareKeyStore(cert, missing, b"s3cret").handshake_context(pki.client_context)
    with pytest.raises(
        KeyStoreError, match=f"^{re.escape(str(missing))}: cannot read the certificate file"
    ):
        await SoftwareKeyStore(missing, key, b"s3cret").handshake_context(pki.client_context)
    other = tmp_path / "other.pem"
    write_pem(other, pem_of(generate_key()), private=True)
    with pytest.raises(
        KeyStoreError, match=f"^{re.escape(str(other))}: the private key does not match"
    ):
        await SoftwareKeyStore(cert, other).handshake_context(pki.client_context)
    with pytest.raises(KeyStoreError, match="a password was configured but the private key is not"):
        await SoftwareKeyStore(cert, other, b"s3cret").handshake_context(pki.client_context)
