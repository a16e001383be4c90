"""The seeds' curl test and openssl s_client, the real programs, against a served enforcer."""

from __future__ import annotations

import shutil

import pytest

from testbed.demo import AUTH_HOST, IOT_HOST
from tests.conftest import Served
from tests.wire import run

pytestmark = pytest.mark.skipif(
    shutil.which("curl") is None or shutil.which("openssl") is None,
    reason="curl and openssl are installed by .ci/run",
)


def headers_of(stderr: bytes) -> dict[str, str]:
    """Response headers from curl -sv output (lines starting with '< ')."""
    out: dict[str, str] = {}
    for line in stderr.decode("latin-1").splitlines():
        if line.startswith("< ") and ":" in line:
            k, _, v = line[2:].partition(":")
            out.setdefault(k.strip().lower(), v.strip())
    return out


async def test_seeds_curl_test(served: Served) -> None:
    no_cert = await run([*served.layout.curl(AUTH_HOST), "-o", "/dev/null", "-w", "%{http_code}"])
    assert no_cert.stdout == b"403", no_cert.stderr.decode()
    assert headers_of(no_cert.stderr)["x-access-denied-reason"] == "no_certificate"

    with_cert = await run(
        [*served.layout.curl(AUTH_HOST, "valid"), "-o", "/dev/null", "-w", "%{http_code}"]
    )
    assert with_cert.stdout == b"200", with_cert.stderr.decode()
    assert headers_of(with_cert.stderr)["set-cookie"].startswith("CF_Authorization=")


@pytest.mark.parametrize(
    ("device", "host", "status", "reason"),
    [
        ("expired", AUTH_HOST, b"403", "certificate_expired"),
        ("not-yet-valid", AUTH_HOST, b"403", "certificate_not_yet_valid"),
        ("foreign-ca", AUTH_HOST, b"403", "untrusted_issuer"),
        ("leaf-only", AUTH_HOST, b"200", None),
        ("wrong-cn", IOT_HOST, b"403", "policy_denied"),
        ("valid", IOT_HOST, b"200", None),
    ],
)
@pytest.mark.parametrize(("option", "protocol"), [("--http1.1", "HTTP/1.1"), ("--http2", "HTTP/2")])
async def test_curl_with_each_device(
    served: Served,
    device: str,
    host: str,
    status: bytes,
    reason: str | None,
    option: str,
    protocol: str,
) -> None:
    cmd = [*served.layout.curl(host, device), option, "-o", "/dev/null", "-w", "%{http_code}"]
    result = await run(cmd)
    assert result.stdout == status, result.stderr.decode()
    headers = headers_of(result.stderr)
    assert headers.get("x-access-denied-reason") == reason
    assert served.last()["http"] == protocol
    if host == IOT_HOST:
        assert "set-cookie" not in headers
        if protocol == "HTTP/1.1":
            assert headers["connection"] == "close"  # on HTTP/2 a GOAWAY (test_http2.py)


async def test_openssl_s_client_sees_a_certificate_request_and_a_403(served: Served) -> None:
    request = f"GET / HTTP/1.1\r\nHost: {AUTH_HOST}\r\nConnection: close\r\n\r\n".encode()
    cert, key = served.layout.device("expired")
    result = await run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{served.port}",
            "-servername",
            AUTH_HOST,
            "-CAfile",
            str(served.layout.edge_ca),
            "-cert",
            str(cert),
            "-key",
            str(key),
            "-quiet",
            "-verify_return_error",
        ],
        stdin=request,
    )
    out = result.stdout.decode("latin-1")
    assert "HTTP/1.1 403" in out, result.stderr.decode()
    assert "x-access-denied-reason: certificate_expired" in out


async def test_openssl_s_client_no_duration_session_is_not_resumed(
    served: Served, tmp_path
) -> None:
    cert, key = served.layout.device("valid")
    sess = tmp_path / "iot.sess"
    base = [
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{served.port}",
        "-servername",
        IOT_HOST,
        "-CAfile",
        str(served.layout.edge_ca),
        "-cert",
        str(cert),
        "-key",
        str(key),
        "-ign_eof",
    ]
    request = f"GET / HTTP/1.1\r\nHost: {IOT_HOST}\r\nConnection: close\r\n\r\n".encode()
    first = await run([*base, "-sess_out", str(sess)], stdin=request)
    assert b"HTTP/1.1 200" in first.stdout
    assert sess.exists() and sess.stat().st_size > 0
    second = await run([*base, "-sess_in", str(sess)], stdin=request)
    assert b"Reused," not in second.stdout
    assert b"New," in second.stdout
    assert b"HTTP/1.1 200" in second.stdout
    # The control: the same steps on a hostname with sessions do resume.
    control = [a.replace(IOT_HOST, AUTH_HOST) for a in base]
    auth_request = request.replace(IOT_HOST.encode(), AUTH_HOST.encode())
    await run([*control, "-sess_out", str(sess)], stdin=auth_request)
    resumed = await run([*control, "-sess_in", str(sess)], stdin=auth_request)
    assert b"Reused," in resumed.stdout
