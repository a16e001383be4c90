"""A programmatic browser for login tests: follows redirects, keeps cookies, submits the form.

It speaks real TLS to both sides over loopback (tests/wire.py): to the enforcer with the
device's client certificate and the application's hostname as SNI and Host, and to the test
OpenID Connect provider (tests/oidc_idp.py) at its https://127.0.0.1:PORT issuer. Every
response of a navigation is kept, so tests can look at each hop.
"""

from __future__ import annotations

import dataclasses
import re
import ssl
from collections.abc import Sequence
from urllib.parse import urlencode, urljoin, urlsplit

from tests.oidc_idp import OidcIdp
from tests.wire import Connection, Response

BROWSER_ACCEPT = ("accept", "text/html,application/xhtml+xml,*/*;q=0.8")


@dataclasses.dataclass
class Hop:
    """One request of a navigation and its response."""

    url: str
    response: Response


class LoginBrowser:
    """Cookies per host, redirects followed, the provider's login form filled in."""

    def __init__(self, hostname: str, port: int, ctx: ssl.SSLContext, idp: OidcIdp) -> None:
        self.hostname = hostname
        self.port = port
        self.ctx = ctx
        self.idp = idp
        self.jar: dict[str, dict[str, str]] = {}  # host -> cookie name -> value

    @property
    def origin(self) -> str:
        """The application's origin, as the browser names it."""
        return f"https://{self.hostname}:{self.port}"

    def cookies(self, host: str | None = None) -> dict[str, str]:
        """The cookies kept for ``host`` (the application's by default)."""
        return self.jar.setdefault(host or self.hostname, {})

    async def request(
        self,
        url: str,
        method: str = "GET",
        body: bytes = b"",
        headers: Sequence[tuple[str, str]] = (BROWSER_ACCEPT,),
    ) -> Response:
        """One request on a new connection, with this browser's cookies; keeps what it sets."""
        parts = urlsplit(urljoin(self.origin + "/", url))
        host = parts.hostname or ""
        if host == self.hostname:
            port, ctx, sni = self.port, self.ctx, self.hostname
        elif parts.port == self.idp.port:
            port, ctx, sni = self.idp.port, self.idp.ssl_context(), host
        else:
            raise AssertionError(f"the test browser cannot reach {url}")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        sent = list(headers)
        jar = self.cookies(host)
        if jar:
            sent.append(("cookie", "; ".join(f"{k}={v}" for k, v in jar.items())))
        if body:
            sent.append(("content-type", "application/x-www-form-urlencoded"))
        conn = await Connection.open(port, sni, ctx)
        try:
            response = await conn.request(
                target, host=parts.netloc, headers=sent, method=method, body=body
            )
        finally:
            await conn.aclose()
        for value in response.all("set-cookie"):
            name, _, rest = value.partition("=")
            cookie_value = rest.split(";", 1)[0]
            if re.search(r";\s*max-age=0\b", value, re.I) or not cookie_value:
                jar.pop(name.strip(), None)
            else:
                jar[name.strip()] = cookie_value
        return response

    async def navigate(
        self, url: str, method: str = "GET", body: bytes = b"", limit: int = 12
    ) -> list[Hop]:
        """Request ``url`` and follow redirects; every hop, the final response last."""
        hops: list[Hop] = []
        for _ in range(limit):
            response = await self.request(url, method, body)
            hops.append(Hop(url, response))
            location = response.header("location")
            if response.status not in (301, 302, 303, 307) or location is None:
                return hops
            base = url if "://" in url else self.origin + url
            url, method, body = urljoin(base, location), "GET", b""
        raise AssertionError(f"over {limit} redirects: {[h.url for h in hops]}")

    async def login(self, url: str, email: str, password: str) -> list[Hop]:
        """Navigate to ``url``, sign in at the provider's form, follow back; every hop."""
        hops = await self.navigate(url)
        form = hops[-1].response
        match = re.search(rb'<form[^>]*action="([^"]+)"', form.body)
        assert form.status == 200 and match, f"no login form: {form.status} {form.body[:300]!r}"
        action = urljoin(hops[-1].url, match.group(1).decode())
        fields = urlencode({"username": email, "password": password}).encode()
        return hops + await self.navigate(action, "POST", fields)
