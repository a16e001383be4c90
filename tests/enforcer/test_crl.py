"""Revocation for uploaded roots (issue 14): CRLs and revocations by serial or fingerprint.

Over real TLS to a served enforcer: a device under an uploaded root is revoked by a CRL (made
by cryptography, and by the real ``openssl ca -revoke`` / ``-gencrl``, fetched over HTTP from a
server in the test) or through the admin API, and is denied ``revoked`` on a new connection,
on a kept-alive one and on a resumed TLS session; its cookie stops admitting. A CRL that is
expired, badly signed, for another issuer, or older than the one in force is refused with a
clear error and the CRL in force stays. A CRL past its nextUpdate fails closed by default
(``revocation_unknown``) and admits with a note when the root says ``crl_fail_open``.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import functools
import http.server
import json
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from devices.pki import Issued, issue_ca, issue_leaf
from enforcer import crl
from enforcer.chain import fingerprint
from enforcer.config import ConfigError, load_config
from enforcer.controller import keep_crls_fresh, refresh_crl
from enforcer.snapshot import RootCertificate
from testbed.cli import main
from testbed.demo import AUTH_HOST, DemoLayout
from tests.conftest import Served
from tests.enforcer.test_admin_api import ok, refused
from tests.enforcer.test_sessions import claims_of, cookie_of, serve_again
from tests.wire import Connection, client_context, get

ACC = "/client/v4/accounts/demo/access"
ROOT_ID = "crl-root"
DAY = dt.timedelta(days=1)


@dataclasses.dataclass
class Pki:
    """A root, its intermediate (which issues devices) and two devices, written to files."""

    root: Issued
    inter: Issued
    devices: dict[str, Issued]
    folder: Path

    def files(self, name: str) -> tuple[Path, Path]:
        return self.folder / f"{name}.pem", self.folder / f"{name}.key"

    def serial(self, name: str) -> int:
        return self.devices[name].certificate.serial_number


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    now = dt.datetime.now(dt.UTC)
    root = issue_ca("crl test root", now)
    inter = issue_ca("crl test intermediate", now, issuer=root, path_length=0)
    devices = {
        name: issue_leaf("device-001", inter, not_before=now - DAY, not_after=now + 30 * DAY)
        for name in ("revoked", "kept")
    }
    folder = tmp_path / "pki"
    folder.mkdir()
    for name, dev in devices.items():
        (folder / f"{name}.pem").write_bytes(dev.cert_pem() + inter.cert_pem())
        (folder / f"{name}.key").write_bytes(dev.key_pem())
    return Pki(root, inter, devices, folder)


def root_of(pki: Pki, **settings: object) -> RootCertificate:
    return RootCertificate(
        ROOT_ID,
        "crl test root",
        pki.root.certificate,
        (pki.inter.certificate,),
        (AUTH_HOST,),
        **settings,  # type: ignore[arg-type]
    )


@pytest.fixture
async def served(serve_config, demo: DemoLayout, pki: Pki) -> Served:
    config = load_config(demo.config)
    config = dataclasses.replace(config, roots=(root_of(pki),))
    return await serve_config(config=config, admin=True)  # type: ignore[no-any-return]


def ctx(served: Served, pki: Pki | None = None, device: str | None = None):
    if device is None or pki is None:
        return client_context(served.layout.edge_ca)
    return client_context(served.layout.edge_ca, *pki.files(device))


def make_crl(
    issuer: Issued,
    serials: list[int],
    this_update: dt.datetime,
    next_update: dt.datetime,
    number: int = 1,
    signer: Issued | None = None,
) -> x509.CertificateRevocationList:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.certificate.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(this_update)
            .build()
        )
    return builder.sign((signer or issuer).key, hashes.SHA256())  # type: ignore[arg-type]


def pem(c: x509.CertificateRevocationList) -> str:
    return c.public_bytes(serialization.Encoding.PEM).decode()


class CrlServer:
    """A small HTTP server (a thread) serving CRL bytes by path, as a CA's CRL endpoint does."""

    def __init__(self) -> None:
        self.content: dict[str, bytes] = {}
        content = self.content

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = content.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("content-type", "application/pkix-crl")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def crl_server() -> Iterator[CrlServer]:
    server = CrlServer()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


class OpensslCa:
    """A minimal ``openssl ca`` directory around an existing CA certificate and key."""

    def __init__(self, folder: Path, ca: Issued) -> None:
        self.folder = folder
        folder.mkdir()
        (folder / "newcerts").mkdir()
        (folder / "ca.pem").write_bytes(ca.cert_pem())
        (folder / "ca.key").write_bytes(ca.key_pem())
        (folder / "index.txt").write_text("")
        (folder / "serial").write_text("1000\n")
        (folder / "crlnumber").write_text("1000\n")
        (folder / "openssl.cnf").write_text(
            f"""[ ca ]
default_ca = CA_default
[ CA_default ]
dir = {folder}
database = $dir/index.txt
serial = $dir/serial
crlnumber = $dir/crlnumber
new_certs_dir = $dir/newcerts
certificate = $dir/ca.pem
private_key = $dir/ca.key
default_md = sha256
default_crl_days = 7
unique_subject = no
policy = policy_any
[ policy_any ]
commonName = supplied
"""
        )

    def _run(self, *args: str) -> bytes:
        done = subprocess.run(
            ["openssl", "ca", "-config", str(self.folder / "openssl.cnf"), "-batch", *args],
            capture_output=True,
            check=False,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr.decode()
        return done.stdout

    def revoke(self, cert: Issued) -> None:
        path = self.folder / f"revoke-{cert.certificate.serial_number:x}.pem"
        path.write_bytes(cert.cert_pem())
        self._run("-revoke", str(path), "-crl_reason", "keyCompromise")

    def gencrl(self) -> bytes:
        out = self.folder / "crl.pem"
        self._run("-gencrl", "-out", str(out))
        return out.read_bytes()


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


# ---- a CRL from the real `openssl ca`, fetched over HTTP -----------------------------------------


@needs_openssl
async def test_a_device_revoked_by_an_openssl_crl_is_denied_on_every_connection_kind(
    served: Served, pki: Pki, crl_server: CrlServer, tmp_path: Path
) -> None:
    ca = OpensslCa(tmp_path / "openssl-ca", pki.inter)
    crl_server.content["/inter.crl"] = ca.gencrl()  # nothing revoked yet
    settings = {"crl_url": crl_server.url("/inter.crl"), "crl_refresh": "10m"}
    updated = await ok(served, "PUT", f"{ACC}/certificates/{ROOT_ID}", settings)
    assert updated["crl_url"] == settings["crl_url"] and updated["crl_fail_open"] is False
    assert await refresh_crl(served.controller, ROOT_ID) is None
    shown = await ok(served, "GET", f"{ACC}/certificates/{ROOT_ID}/crl")
    assert shown["revoked_count"] == 0 and "crl test intermediate" in shown["issuer"]
    assert shown["source"] == settings["crl_url"]

    # Admitted; the connection stays open and its TLS session is kept for resumption.
    device = ctx(served, pki, "revoked")  # one context: its sessions resume only with it
    kept = await Connection.open(served.port, AUTH_HOST, device)
    first = await kept.request()
    assert first.status == 200
    cookie = cookie_of(first)
    assert claims_of(cookie)["serial_number"] == format(pki.serial("revoked"), "x")
    session = kept.ssl_object.session

    ca.revoke(pki.devices["revoked"])
    crl_server.content["/inter.crl"] = ca.gencrl()
    assert await refresh_crl(served.controller, ROOT_ID) is None
    assert (await ok(served, "GET", f"{ACC}/certificates/{ROOT_ID}/crl"))["revoked_count"] == 1

    # The kept-alive connection: its next request is denied.
    again = await kept.request()
    assert (again.status, again.reason) == (403, "revoked")
    assert "listed in the CRL" in str(served.last()["detail"])
    await kept.aclose()
    # A new connection.
    fresh = await get(served.port, AUTH_HOST, ctx(served, pki, "revoked"))
    assert (fresh.status, fresh.reason) == (403, "revoked")
    # A resumed TLS session (the leaf alone, intermediates from the memo).
    resumed = await Connection.open(served.port, AUTH_HOST, device, session=session)
    try:
        assert resumed.ssl_object.session_reused
        answer = await resumed.request()
        assert (answer.status, answer.reason) == (403, "revoked")
        assert served.last()["tls"]["resumed"] is True  # type: ignore[index]
    finally:
        await resumed.aclose()
    # Its cookie alone stops admitting (the demo's auth application admits cookies alone).
    alone = await get(served.port, AUTH_HOST, ctx(served), headers=[cookie])
    assert (alone.status, alone.reason) == (403, "no_certificate")
    assert served.last()["notes"] == ["token_invalid"]
    assert "revoked" in str(served.last()["detail"])
    # The other device of the same CA is untouched.
    assert (await get(served.port, AUTH_HOST, ctx(served, pki, "kept"))).status == 200


# ---- uploads: PEM and DER, refusals --------------------------------------------------------------


async def test_crls_made_by_cryptography_uploaded_as_der_and_pem(served: Served, pki: Pki) -> None:
    now = served.clock.now()
    revoking = make_crl(pki.inter, [pki.serial("revoked")], now - DAY, now + DAY, number=1)
    der = revoking.public_bytes(serialization.Encoding.DER)
    result = await ok(
        served,
        "PUT",
        f"{ACC}/certificates/{ROOT_ID}/crl",
        {"crl_der_base64": base64.b64encode(der).decode()},
    )
    assert result["revoked_count"] == 1 and result["crl_number"] == 1
    denied = await get(served.port, AUTH_HOST, ctx(served, pki, "revoked"))
    assert (denied.status, denied.reason) == (403, "revoked")
    shown = await ok(served, "GET", f"{ACC}/certificates/{ROOT_ID}/crl")
    assert (
        x509.load_pem_x509_crl(shown["crl"].encode()).public_bytes(serialization.Encoding.DER)
        == der
    )

    # A later CRL that no longer lists it: the device is admitted again.
    later = make_crl(pki.inter, [], now - DAY + dt.timedelta(hours=1), now + DAY, number=2)
    await ok(served, "PUT", f"{ACC}/certificates/{ROOT_ID}/crl", {"crl": pem(later)})
    assert (await get(served.port, AUTH_HOST, ctx(served, pki, "revoked"))).status == 200


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("expired", "the CRL expired"),
        ("badly signed", "signature does not verify"),
        ("other issuer", "is not this root or one of its uploaded intermediates"),
        ("older", "older than the CRL in force"),
        ("garbage", "not a PEM or DER X.509 CRL"),
    ],
)
async def test_an_unusable_crl_is_refused_and_the_good_one_stays(
    served: Served, pki: Pki, crl_server: CrlServer, problem: str, message: str
) -> None:
    now = served.clock.now()
    good = make_crl(pki.inter, [pki.serial("revoked")], now - DAY, now + DAY, number=5)
    await ok(served, "PUT", f"{ACC}/certificates/{ROOT_ID}/crl", {"crl": pem(good)})
    stranger = issue_ca("crl test intermediate", now)  # same name, another key
    other = issue_ca("some other CA", now)
    bad = {
        "expired": lambda: pem(make_crl(pki.inter, [], now - 3 * DAY, now - DAY, number=6)),
        "badly signed": lambda: pem(make_crl(pki.inter, [], now, now + DAY, 6, signer=stranger)),
        "other issuer": lambda: pem(make_crl(other, [], now, now + DAY, number=6)),
        "older": lambda: pem(make_crl(pki.inter, [], now - 2 * DAY, now + DAY, number=4)),
        "garbage": lambda: "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
    }[problem]()

    # Through the admin API: 400 naming the problem, nothing changes.
    error = await refused(served, "PUT", f"{ACC}/certificates/{ROOT_ID}/crl", {"crl": bad})
    assert message in error and "stays" in error
    # Through a fetch: the problem is recorded, the CRL in force stays.
    crl_server.content["/bad.crl"] = bad.encode()
    await ok(
        served, "PUT", f"{ACC}/certificates/{ROOT_ID}", {"crl_url": crl_server.url("/bad.crl")}
    )
    fetched = await refresh_crl(served.controller, ROOT_ID)
    assert fetched is not None and message in fetched
    shown = await ok(served, "GET", f"{ACC}/certificates/{ROOT_ID}/crl")
    assert shown["crl_number"] == 5 and message in shown["last_fetch_error"]
    denied = await get(served.port, AUTH_HOST, ctx(served, pki, "revoked"))
    assert (denied.status, denied.reason) == (403, "revoked")


async def test_bad_crl_bodies_and_unknown_roots(served: Served) -> None:
    path = f"{ACC}/certificates/{ROOT_ID}/crl"
    assert "exactly one" in await refused(served, "PUT", path, {})
    assert "base64" in await refused(served, "PUT", path, {"crl_der_base64": "%%%"})
    assert "unknown field" in await refused(served, "PUT", path, {"pem": "x"})
    await refused(served, "PUT", f"{ACC}/certificates/nope/crl", {"crl": "x"}, status=404)
    await refused(served, "GET", path, status=404)
    assert "http://" in await refused(
        served, "PUT", f"{ACC}/certificates/{ROOT_ID}", {"crl_url": "file:///etc/passwd"}
    )


# ---- nextUpdate: fail closed (default) or open ---------------------------------------------------


async def test_a_crl_past_its_next_update_fails_closed_by_default_and_open_when_told(
    served: Served, pki: Pki
) -> None:
    now = served.clock.now()
    fresh = make_crl(pki.inter, [], now - dt.timedelta(hours=1), now + dt.timedelta(hours=1))
    await ok(served, "PUT", f"{ACC}/certificates/{ROOT_ID}/crl", {"crl": pem(fresh)})
    kept = await Connection.open(served.port, AUTH_HOST, ctx(served, pki, "kept"))
    try:
        first = await kept.request()
        assert first.status == 200 and served.last()["notes"] == []
        cookie = cookie_of(first)
        served.clock.advance(dt.timedelta(hours=2))  # past nextUpdate, same snapshot
        # The kept-alive connection's memoised validation is re-checked: denied.
        later = await kept.request()
        assert (later.status, later.reason) == (403, "revocation_unknown")
        assert "fails closed" in str(served.last()["detail"])
    finally:
        await kept.aclose()
    fresh_conn = await get(served.port, AUTH_HOST, ctx(served, pki, "kept"))
    assert (fresh_conn.status, fresh_conn.reason) == (403, "revocation_unknown")
    # Tokens cannot be tied to one issuer: while a fail-closed CRL of the hostname is out of
    # date, a cookie alone does not admit either.
    alone = await get(served.port, AUTH_HOST, ctx(served), headers=[cookie])
    assert (alone.status, alone.reason) == (403, "no_certificate")

    await ok(served, "PUT", f"{ACC}/certificates/{ROOT_ID}", {"crl_fail_open": True})
    opened = await get(served.port, AUTH_HOST, ctx(served, pki, "kept"))
    assert opened.status == 200
    record = served.last()
    assert record["notes"] == ["revocation_unknown"]
    assert "crl_fail_open = true" in str(record["detail"])
    assert (await get(served.port, AUTH_HOST, ctx(served), headers=[cookie])).status == 200


async def test_a_root_with_a_crl_url_and_no_crl_yet_fails_closed(served: Served, pki: Pki) -> None:
    # Nothing listens there: the fetch fails and the status stays unknown.
    await ok(served, "PUT", f"{ACC}/certificates/{ROOT_ID}", {"crl_url": "http://127.0.0.1:9/x"})
    assert await refresh_crl(served.controller, ROOT_ID) is not None
    denied = await get(served.port, AUTH_HOST, ctx(served, pki, "kept"))
    assert (denied.status, denied.reason) == (403, "revocation_unknown")
    assert "no CRL fetched yet" in str(served.last()["detail"])


# ---- revocations through the admin API -----------------------------------------------------------


async def test_revoking_by_serial_and_by_fingerprint_through_the_admin_api(
    served: Served, pki: Pki
) -> None:
    kept = await Connection.open(served.port, AUTH_HOST, ctx(served, pki, "revoked"))
    try:
        first = await kept.request()
        assert first.status == 200
        cookie = cookie_of(first)
        serial = f"{pki.serial('revoked'):X}"
        made = await ok(
            served,
            "POST",
            f"{ACC}/revocations",
            {"certificate_id": ROOT_ID, "serial_number": serial},
            status=201,
        )
        assert made["type"] == "serial" and made["serial_number"] == serial.lower()
        # Revoking again is idempotent.
        same = await ok(
            served,
            "POST",
            f"{ACC}/revocations",
            {"certificate_id": ROOT_ID, "serial_number": serial.lower()},
        )
        assert same["id"] == made["id"]
        later = await kept.request()
        assert (later.status, later.reason) == (403, "revoked")
        assert "admin API" in str(served.last()["detail"])
    finally:
        await kept.aclose()
    denied = await get(served.port, AUTH_HOST, ctx(served, pki, "revoked"))
    assert (denied.status, denied.reason) == (403, "revoked")
    alone = await get(served.port, AUTH_HOST, ctx(served), headers=[cookie])
    assert (alone.status, alone.reason) == (403, "no_certificate")

    fp = fingerprint(pki.devices["kept"].certificate)
    by_fp = await ok(
        served, "POST", f"{ACC}/revocations", {"fingerprint_sha256": fp.upper()}, status=201
    )
    assert by_fp == {"id": fp, "type": "fingerprint", "fingerprint_sha256": fp} | {
        "created_at": by_fp["created_at"]
    }
    other = await get(served.port, AUTH_HOST, ctx(served, pki, "kept"))
    assert (other.status, other.reason) == (403, "revoked")
    listed = await ok(served, "GET", f"{ACC}/revocations")
    assert {r["id"] for r in listed} == {made["id"], fp}

    # Lifted: both admit again.
    await ok(served, "DELETE", f"{ACC}/revocations/{made['id']}")
    await ok(served, "DELETE", f"{ACC}/revocations/{fp}")
    assert await ok(served, "GET", f"{ACC}/revocations") == []
    for device in ("revoked", "kept"):
        assert (await get(served.port, AUTH_HOST, ctx(served, pki, device))).status == 200
    await refused(served, "DELETE", f"{ACC}/revocations/{fp}", status=404)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({}, 400, "send certificate_id"),
        ({"serial_number": "01"}, 400, "send certificate_id"),
        ({"certificate_id": ROOT_ID, "serial_number": "xyz"}, 400, "not a hexadecimal"),
        ({"certificate_id": "nope", "serial_number": "01"}, 404, "not found"),
        ({"fingerprint_sha256": "ab"}, 400, "not a SHA-256 fingerprint"),
        ({"fingerprint_sha256": "ab" * 32, "serial_number": "01"}, 400, "either"),
    ],
)
async def test_bad_revocation_bodies(served: Served, body: dict, status: int, message: str) -> None:
    assert message in await refused(served, "POST", f"{ACC}/revocations", body, status=status)


# ---- durability, configuration, fetching ---------------------------------------------------------


async def test_the_crl_in_force_survives_a_restart(
    served: Served, pki: Pki, crl_server: CrlServer, nursery: trio.Nursery
) -> None:
    now = served.clock.now()
    crl_server.content["/c"] = pem(
        make_crl(pki.inter, [pki.serial("revoked")], now, now + DAY)
    ).encode()
    await ok(served, "PUT", f"{ACC}/certificates/{ROOT_ID}", {"crl_url": crl_server.url("/c")})
    assert await refresh_crl(served.controller, ROOT_ID) is None
    crl_server.content.clear()  # the CRL server goes away
    again = await serve_again(nursery, served)
    denied = await get(again.port, AUTH_HOST, ctx(again, pki, "revoked"))
    assert (denied.status, denied.reason) == (403, "revoked")
    assert (await get(again.port, AUTH_HOST, ctx(again, pki, "kept"))).status == 200


def _config_with_crl(demo: DemoLayout, pki: Pki, crl_text: bytes, extra: str = "") -> Path:
    chain = pki.folder / "uploaded.pem"
    chain.write_bytes(pki.inter.cert_pem() + pki.root.cert_pem())
    crl_path = pki.folder / "root.crl"
    crl_path.write_bytes(crl_text)
    text = demo.config.read_text().replace(
        'certificate = "ca/uploaded-chain.pem"',
        f'certificate = "{chain}"\ncrl = "{crl_path}"\n{extra}',
    )
    path = demo.root / f"crl-{uuid.uuid4().hex}.toml"
    path.write_text(text)
    return path


async def test_a_crl_file_in_the_config_is_in_force_from_the_start(
    serve_config, demo: DemoLayout, pki: Pki
) -> None:
    now = dt.datetime.now(dt.UTC)
    der = make_crl(pki.inter, [pki.serial("revoked")], now - DAY, now + DAY).public_bytes(
        serialization.Encoding.DER
    )
    path = _config_with_crl(demo, pki, der, 'crl_refresh = "5m"\ncrl_fail_open = true')
    try:
        config = load_config(path)
        assert config.roots[0].crl_fail_open is True and config.roots[0].crl_refresh == "5m"
        served = await serve_config(config=config)
        denied = await get(served.port, AUTH_HOST, ctx(served, pki, "revoked"))
        assert (denied.status, denied.reason) == (403, "revoked")
        assert (await get(served.port, AUTH_HOST, ctx(served, pki, "kept"))).status == 200
        # A CRL of another CA is a configuration error naming the file.
        foreign = issue_ca("foreign", now)
        bad = _config_with_crl(demo, pki, pem(make_crl(foreign, [], now, now + DAY)).encode())
        try:
            with pytest.raises(ConfigError, match=r"crl: .*root\.crl: the CRL's issuer"):
                load_config(bad)
        finally:
            bad.unlink()
    finally:
        path.unlink()


async def test_fetching_is_bounded_and_plain_http_only(crl_server: CrlServer) -> None:
    crl_server.content["/big"] = b"x" * 5000
    with trio.fail_after(30):
        with pytest.raises(crl.FetchError, match="over 1000 bytes"):
            await crl.fetch_crl(crl_server.url("/big"), max_bytes=1000)
        with pytest.raises(crl.FetchError, match="HTTP 404"):
            await crl.fetch_crl(crl_server.url("/missing"))
        with pytest.raises(crl.FetchError, match="expected an http:// URL"):
            await crl.fetch_crl("file:///etc/passwd")
        assert await crl.fetch_crl(crl_server.url("/big")) == b"x" * 5000


# ---- the command line ----------------------------------------------------------------------------


async def test_the_command_line_uploads_crls_and_manages_revocations(
    served: Served, pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.conftest import ADMIN_TOKEN

    async def cli(*args: str) -> object:
        argv = [
            "enforcer",
            "admin",
            "--url",
            f"http://127.0.0.1:{served.admin_port}",
            "--token",
            ADMIN_TOKEN,
            "--account",
            "demo",
            "--json",
            *args,
        ]
        code = await trio.to_thread.run_sync(main, argv)
        out = capsys.readouterr().out
        assert code == 0, out
        return json.loads(out)

    now = served.clock.now()
    der_file = tmp_path / "inter.crl"
    der_file.write_bytes(
        make_crl(pki.inter, [pki.serial("revoked")], now - DAY, now + DAY).public_bytes(
            serialization.Encoding.DER
        )
    )
    uploaded = await cli("roots", "crl", ROOT_ID, "--file", str(der_file), "--fail-open")
    assert uploaded["revoked_count"] == 1  # type: ignore[index]
    assert (await cli("roots", "crl", ROOT_ID, "--show"))["crl"].startswith(  # type: ignore[index]
        "-----BEGIN X509 CRL-----"
    )
    root = await ok(served, "GET", f"{ACC}/certificates/{ROOT_ID}")
    assert root["crl_fail_open"] is True
    settings = await cli(
        "roots", "crl", ROOT_ID, "--url", "http://crl.test/i.crl", "--refresh", "5m"
    )
    assert settings == {
        "crl_url": "http://crl.test/i.crl",
        "crl_refresh": "5m",
        "crl_fail_open": True,
    }
    denied = await get(served.port, AUTH_HOST, ctx(served, pki, "revoked"))
    assert (denied.status, denied.reason) == (403, "revoked")

    serial = f"{pki.serial('kept'):x}"
    made = await cli("revocations", "add", "--root", ROOT_ID, "--serial", serial)
    assert (await get(served.port, AUTH_HOST, ctx(served, pki, "kept"))).status == 403
    listed = await cli("revocations", "list")
    assert [r["id"] for r in listed] == [made["id"]]  # type: ignore[index,union-attr]
    await cli("revocations", "delete", made["id"])  # type: ignore[index]
    assert (await get(served.port, AUTH_HOST, ctx(served, pki, "kept"))).status == 200


async def test_the_refresh_task_fetches_on_schedule(
    served: Served, pki: Pki, crl_server: CrlServer, nursery: trio.Nursery
) -> None:
    now = served.clock.now()
    crl_server.content["/r.crl"] = pem(make_crl(pki.inter, [], now - DAY, now + DAY, 1)).encode()
    settings = {"crl_url": crl_server.url("/r.crl"), "crl_refresh": "1s"}
    await ok(served, "PUT", f"{ACC}/certificates/{ROOT_ID}", settings)
    nursery.start_soon(functools.partial(keep_crls_fresh, served.controller, tick=0.05))
    path = f"{ACC}/certificates/{ROOT_ID}/crl"
    with trio.fail_after(20):
        while served.controller.objects.get("crl", {}).get(ROOT_ID) is None:
            await trio.sleep(0.05)
        assert (await ok(served, "GET", path))["revoked_count"] == 0
        later = make_crl(pki.inter, [pki.serial("revoked")], now - DAY / 2, now + DAY, 2)
        crl_server.content["/r.crl"] = pem(later).encode()
        while (await ok(served, "GET", path))["revoked_count"] != 1:
            await trio.sleep(0.05)
    denied = await get(served.port, AUTH_HOST, ctx(served, pki, "revoked"))
    assert (denied.status, denied.reason) == (403, "revoked")
