"""Real headless Chromium (tests/browser.py) with a client certificate in its NSS database,
against a served enforcer whose application admits on a certificate alone (the demo's
``auth`` application): what a person's browser does before any login exists."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from testbed.demo import AUTH_HOST, IOT_HOST
from tests.browser import ClientCertificate, png_size
from tests.conftest import Served

HOSTS = [AUTH_HOST, IOT_HOST]


def requests_for(served: Served, path: str) -> list[dict[str, Any]]:
    """The access log's request records for ``path``."""
    return [r for r in served.log() if "event" not in r and r["path"] == path]


async def test_chromium_selects_its_certificate_and_reaches_the_origin(
    served: Served, open_browser: Callable[..., Any], tmp_path: Path
) -> None:
    cert, key = served.layout.device("valid")
    client = ClientCertificate(cert, key)
    browser = await open_browser(HOSTS, [served.layout.edge_ca], client)
    await browser.get(f"https://{AUTH_HOST}:{served.port}/hello")

    echo = await browser.json()  # the echo origin's JSON, as Chromium shows it
    assert echo["origin"] == "echo" and echo["path"] == "/hello"
    sha256 = requests_for(served, "/hello")[0]["certificate"]["sha256"]
    assert echo["headers"]["cf-client-cert-sha256"] == sha256
    (record,) = requests_for(served, "/hello")
    assert record["status"] == 200 and record["admitted_by"] == "certificate"
    assert record["certificate"]["common_name"] == client.common_name() == "device-001"
    cookies = {c["name"]: c for c in await browser.cookies()}
    assert cookies["CF_Authorization"]["httpOnly"] and cookies["CF_Authorization"]["secure"]

    shot = await browser.screenshot(tmp_path / "origin.png")
    width, height = png_size(shot.read_bytes())
    assert width > 0 and height > 0
    errors = [e for e in await browser.console() if e["level"] == "SEVERE"]
    assert errors == []


async def test_chromium_without_a_certificate_gets_the_no_certificate_page(
    served: Served, open_browser: Callable[..., Any], tmp_path: Path
) -> None:
    browser = await open_browser(HOSTS, [served.layout.edge_ca], None)
    await browser.get(f"https://{AUTH_HOST}:{served.port}/hello")

    assert await browser.text() == "A valid client certificate is required."
    (record,) = requests_for(served, "/hello")
    assert (record["status"], record["reason"], record["certificate"]) == (
        403,
        "no_certificate",
        None,
    )
    assert await browser.cookies() == []
    await browser.screenshot(tmp_path / "refused.png")
    # The console errors are the refused loads themselves (the page, maybe its favicon).
    errors = [e["message"] for e in await browser.console() if e["level"] == "SEVERE"]
    page = f"https://{AUTH_HOST}:{served.port}/hello"
    assert any(e.startswith(f"{page} - ") for e in errors), errors
    assert all("status of 403" in e for e in errors), errors


async def test_chromium_sends_the_certificate_the_filter_names_among_several(
    served: Served, open_browser: Callable[..., Any]
) -> None:
    # iot admits device-001 only: which of the two held certificates arrives decides the answer.
    valid = ClientCertificate(*served.layout.device("valid"))
    wrong_cn = ClientCertificate(*served.layout.device("wrong-cn"))
    for selected, other, status, reason in (
        (valid, wrong_cn, 200, None),
        (wrong_cn, valid, 403, "policy_denied"),
    ):
        browser = await open_browser(HOSTS, [served.layout.edge_ca], selected, also_holding=[other])
        await browser.get(f"https://{IOT_HOST}:{served.port}/which")
        record = requests_for(served, "/which")[-1]
        assert (record["status"], record["reason"]) == (status, reason)
        assert record["certificate"]["common_name"] == selected.common_name()
