"""Real headless Chromium with a client certificate, driven by selenium, for trio tests.

Theory of operation. Chromium on Linux takes client certificates (and locally trusted CAs)
from the user's NSS database, ``$HOME/.pki/nssdb``. Each browser here gets its own HOME: a
fresh NSS database made with ``certutil``, the test CAs added as trusted, and the client
certificate with its key imported from PKCS#12 with ``pk12util`` (or no certificate at all).

When a server asks for a certificate Chromium shows a picker, unless the profile's
``auto_select_certificate`` content setting names a filter the certificate matches. Enterprises
set it with the ``AutoSelectCertificateForUrls`` policy (on Linux only from
``/etc/chromium/policies/managed/*.json``: system-wide, root-only). The same content setting
is also read from the profile's own preferences, so this module writes it into
``<user-data-dir>/Default/Preferences`` before the browser starts: per browser, nothing
outside the test's tmp dir is touched. (``--policy=`` on the command line is Android-only, and
the local test policy page needs a non-stable channel and a UI.) The setting is scoped to the
test's hostnames and the leaf's subject common name.

Test hostnames (``auth.example.test``) reach 127.0.0.1 through ``--host-resolver-rules``; the
ports stay in the URLs (the test IdP is addressed as https://127.0.0.1 already). Selenium is
synchronous: every call runs in a worker thread (``trio.to_thread``) so the served enforcer
and IdP keep running in the test's trio loop.
Selenium uses Debian's ``/usr/bin/chromedriver`` (never selenium-manager, which downloads).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
NSS_TOOLS = ("certutil", "pk12util")
P12_PASSWORD = b"browser-test"  # protects the PKCS#12 file in transit to NSS, nothing more

T = TypeVar("T")


def missing_tools() -> list[str]:
    """The programs a browser test needs that are not installed."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    missing += [t for t in NSS_TOOLS if shutil.which(t) is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    return missing


def require_tools() -> None:
    """Skip the calling test when a tool is missing, except on CI (CI=1), where it fails."""
    missing = missing_tools()
    if not missing:
        return
    message = f"missing {', '.join(missing)}: .ci/run installs chromium, chromium-driver, "
    message += "libnss3-tools and selenium"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@dataclasses.dataclass(frozen=True)
class ClientCertificate:
    """A client certificate for the browser: PEM chain (leaf first) and the leaf's PEM key."""

    chain: Path
    key: Path

    def leaf(self) -> x509.Certificate:
        """The leaf certificate."""
        return x509.load_pem_x509_certificates(self.chain.read_bytes())[0]

    def common_name(self) -> str:
        """The leaf's subject common name (what auto-selection matches)."""
        attrs = self.leaf().subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(attrs[0].value)


def _run(cmd: Sequence[str], home: Path) -> None:
    result = subprocess.run(
        list(cmd), capture_output=True, text=True, env={**os.environ, "HOME": str(home)}
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr}")


def make_nss_db(
    home: Path, trusted_cas: Sequence[Path], clients: Sequence[ClientCertificate]
) -> Path:
    """Make ``home/.pki/nssdb`` trusting ``trusted_cas`` and holding ``clients``; return it."""
    db = home / ".pki" / "nssdb"
    db.mkdir(parents=True, mode=0o700)
    target = f"sql:{db}"
    _run(["certutil", "-N", "-d", target, "--empty-password"], home)
    for i, ca in enumerate(trusted_cas):
        for j, cert in enumerate(x509.load_pem_x509_certificates(ca.read_bytes())):
            pem = home / f"ca-{i}-{j}.pem"
            pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            # C: a trusted CA for TLS servers (the first field is SSL; S/MIME and code unused).
            _run(["certutil", "-A", "-d", target, "-n", f"test-ca-{i}-{j}", "-t", "C,,", "-i",
                  str(pem)], home)  # fmt: skip
    for i, client in enumerate(clients):
        certs = x509.load_pem_x509_certificates(client.chain.read_bytes())
        key = serialization.load_pem_private_key(client.key.read_bytes(), password=None)
        p12 = home / f"client-{i}.p12"
        p12.write_bytes(
            pkcs12.serialize_key_and_certificates(
                f"test-client-{i}".encode(),
                key,  # type: ignore[arg-type]
                certs[0],
                certs[1:] or None,
                serialization.BestAvailableEncryption(P12_PASSWORD),
            )
        )
        p12.chmod(0o600)
        _run(["pk12util", "-i", str(p12), "-d", target, "-W", P12_PASSWORD.decode(), "-K", ""],
             home)  # fmt: skip
        p12.unlink()
    return db


def auto_select_preferences(hosts: Sequence[str], common_name: str) -> dict[str, Any]:
    """Profile preferences that auto-select the certificate named ``common_name`` on ``hosts``.

    The ``auto_select_certificate`` content setting, as the AutoSelectCertificateForUrls
    policy would set it, but per profile: pattern ``https://host:*`` (any port), secondary
    pattern any origin, value a list of filters.
    """
    setting = {"setting": {"filters": [{"SUBJECT": {"CN": common_name}}]}}
    exceptions = {f"https://{host}:*,*": setting for host in hosts}
    content_settings = {"exceptions": {"auto_select_certificate": exceptions}}
    return {"profile": {"content_settings": content_settings}}


def chromium_arguments(profile: Path, hosts: Sequence[str]) -> list[str]:
    """Command-line flags for a quiet, isolated headless Chromium that runs as root."""
    rules = ", ".join(f"MAP {host} 127.0.0.1" for host in hosts)
    return [
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-proxy-server",
        "--password-store=basic",
        f"--user-data-dir={profile}",
        f"--host-resolver-rules={rules}",
        "--window-size=1024,768",
    ]


class Browser:
    """One headless Chromium (its own HOME, NSS database and profile) driven from trio."""

    def __init__(self, driver: Any, home: Path, client: ClientCertificate | None) -> None:
        self.driver = driver
        self.home = home
        self.client = client

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking selenium call in a worker thread."""
        return await trio.to_thread.run_sync(fn, *args)

    async def get(self, url: str) -> None:
        """Navigate and wait for the page to load."""
        await self.call(self.driver.get, url)

    async def url(self) -> str:
        """The current page's URL."""
        return str(await self.call(lambda: self.driver.current_url))

    async def text(self) -> str:
        """The visible text of the page's body."""
        from selenium.webdriver.common.by import By

        return str(await self.call(lambda: self.driver.find_element(By.TAG_NAME, "body").text))

    async def json(self) -> Any:
        """The JSON document the page shows (Chromium puts a JSON response in a <pre>)."""
        from selenium.webdriver.common.by import By

        text = await self.call(lambda: self.driver.find_element(By.TAG_NAME, "pre").text)
        return json.loads(text)

    async def submit_form(self, fields: dict[str, str]) -> None:
        """Type ``fields`` (element id -> text) into the page's form and submit it."""
        from selenium.webdriver.common.by import By

        def fill() -> None:
            element = None
            for element_id, value in fields.items():
                element = self.driver.find_element(By.ID, element_id)
                element.clear()
                element.send_keys(value)
            assert element is not None, "no fields to fill"
            element.submit()

        await self.call(fill)

    async def wait_for_host(self, host: str, timeout: float = 30) -> None:
        """Wait until a page from ``host`` has loaded (after redirects, a form post)."""
        from selenium.webdriver.support.ui import WebDriverWait

        def arrived(driver: Any) -> bool:
            here = urlsplit(driver.current_url).hostname == host
            return here and driver.execute_script("return document.readyState") == "complete"

        # A bound on a wait, not a timed assertion: a loaded machine only waits longer.
        await self.call(WebDriverWait(self.driver, timeout).until, arrived)

    async def cookies(self) -> list[dict[str, Any]]:
        """Cookies visible to the current page's URL (HttpOnly ones included)."""
        return list(await self.call(self.driver.get_cookies))

    async def screenshot(self, path: Path) -> Path:
        """Save a PNG screenshot of the page to ``path``."""
        ok = await self.call(self.driver.save_screenshot, str(path))
        assert ok, f"no screenshot written to {path}"
        return path

    async def console(self) -> list[dict[str, Any]]:
        """Browser console entries since the last call (errors, warnings, failed loads)."""
        return list(await self.call(self.driver.get_log, "browser"))


def start_driver(profile: Path, home: Path, hosts: Sequence[str], log: Path) -> Any:
    """Start chromedriver and Chromium (blocking); return the selenium WebDriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in chromium_arguments(profile, hosts):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.page_load_strategy = "normal"
    # HOME decides where Chromium finds its NSS database; no proxy from the environment.
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["HOME"] = str(home)
    service = Service(str(CHROMEDRIVER), log_output=str(log), env=env)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    return driver


@pytest.fixture
async def open_browser(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Return an async function that starts a headless Chromium; every one is quit at teardown.

    ``await open_browser(hosts, trusted_cas, client)``: ``hosts`` map to 127.0.0.1 and get
    ``client`` (a :class:`ClientCertificate`, or None for no certificate at all) auto-selected.
    ``also_holding``: more certificates in the NSS database, never auto-selected;
    ``auto_select=False`` leaves the picker in place: headless, nobody answers it, and a page
    that asks for a certificate never loads (the load times out).
    """
    require_tools()
    browsers: list[Browser] = []
    counter = itertools.count()

    async def start(
        hosts: Sequence[str],
        trusted_cas: Sequence[Path],
        client: ClientCertificate | None,
        *,
        also_holding: Sequence[ClientCertificate] = (),
        auto_select: bool = True,
    ) -> Browser:
        root = tmp_path / f"browser-{next(counter)}"
        home, profile = root / "home", root / "profile"
        # The others go in first: being first in the database is not what selects ``client``.
        held = [*also_holding, *([client] if client else [])]
        await trio.to_thread.run_sync(make_nss_db, home, trusted_cas, held)
        if client is not None and auto_select:
            prefs = auto_select_preferences(hosts, client.common_name())
            (profile / "Default").mkdir(parents=True)
            (profile / "Default" / "Preferences").write_text(json.dumps(prefs))
        driver = await trio.to_thread.run_sync(
            start_driver, profile, home, hosts, root / "chromedriver.log"
        )
        browser = Browser(driver, home, client)
        browsers.append(browser)
        return browser

    try:
        yield start
    finally:
        from selenium.common.exceptions import WebDriverException

        for browser in browsers:
            # One browser that died already must not keep the others (and their chromedrivers)
            # running: quit each, whatever the previous one did.
            with trio.CancelScope(shield=True), contextlib.suppress(WebDriverException):
                await trio.to_thread.run_sync(browser.driver.quit)


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG image."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
