"""From an empty configuration to the seeds' curl test, only through `testbed enforcer admin`;
and the state survives restarts, kill -9 included."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import trio

from enforcer.origin import serve_echo_origin
from testbed.demo import AUTH_HOST, DemoLayout
from tests.testbed.test_cli import TESTBED, free_port, stop, wait_for_port
from tests.wire import run

TOKEN = "cli-admin-token-0123456789abcdef"

pytestmark = pytest.mark.skipif(
    shutil.which("curl") is None or shutil.which("openssl") is None,
    reason="curl and openssl are installed by .ci/run",
)


def empty_config(demo: DemoLayout, folder: Path, port: int, admin_port: int) -> Path:
    """A config with edge certificates, the admin API and a state file, and nothing else."""
    config = folder / "enforcer.toml"
    config.write_text(
        f"""
[server]
port = {port}
access_log = "{folder / "access.log"}"

[state]
path = "{folder / "state.sqlite"}"

[admin]
port = {admin_port}
token = "{TOKEN}"
account_id = "acme"

[[edge_certificates]]
hostnames = ["{AUTH_HOST}"]
certificate = "{demo.root / "edge" / "cert.pem"}"
private_key = "{demo.root / "edge" / "key.pem"}"
"""
    )
    return config


async def start(config: Path, port: int) -> trio.Process:
    proc = await trio.lowlevel.open_process(
        [*TESTBED, "enforcer", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    await wait_for_port(port, proc)
    return proc


async def admin(admin_port: int, *args: str, check: bool = True) -> trio.CompletedProcess[bytes]:
    cmd = [
        *TESTBED,
        "enforcer",
        "admin",
        "--url",
        f"http://127.0.0.1:{admin_port}",
        "--token",
        TOKEN,
        "--account",
        "acme",
        "--zone",
        "acme",
        *args,
    ]
    result = await run(cmd)
    if check:
        assert result.returncode == 0, (args, result.stdout.decode(), result.stderr.decode())
    return result


async def admin_json(admin_port: int, *args: str) -> dict:
    """An admin command with --json; its parsed result."""
    result = await admin(admin_port, "--json", *args)
    return dict(json.loads(result.stdout))


async def curl(demo: DemoLayout, port: int, device: str | None) -> tuple[str, str]:
    layout = DemoLayout(demo.root, port)
    result = await run([*layout.curl(AUTH_HOST, device), "-o", "/dev/null", "-w", "%{http_code}"])
    return result.stdout.decode(), result.stderr.decode("latin-1")


async def protect(demo: DemoLayout, admin_port: int, origin: str) -> dict:
    """Enable mTLS, upload the demo root, and protect AUTH_HOST with a Valid Certificate policy."""
    upload = str(demo.root / "ca" / "uploaded-chain.pem")
    await admin(admin_port, "mtls", "enable")
    await admin(
        admin_port, "roots", "upload", "--name", "r", "--cert", upload, "--hostname", AUTH_HOST
    )
    app = await admin_json(
        admin_port, "apps", "create", "--hostname", AUTH_HOST, "--origin", origin
    )
    await admin(
        admin_port, "policies", "create", app["id"], "--name", "any", "--include", "certificate"
    )
    return app


async def test_empty_config_to_the_seeds_curl_test_with_admin_commands(
    demo: DemoLayout, tmp_path: Path, nursery
) -> None:
    port, admin_port = free_port(), free_port()
    config = empty_config(demo, tmp_path, port, admin_port)
    origin = await nursery.start(serve_echo_origin, "127.0.0.1", 0)
    proc = await start(config, port)
    try:
        # Nothing is protected yet: no application for the hostname.
        assert (await curl(demo, port, None))[0] == "404"
        refused = await admin(
            admin_port,
            "roots",
            "upload",
            "--name",
            "fleet root",
            "--cert",
            str(demo.root / "ca" / "uploaded-chain.pem"),
            "--hostname",
            AUTH_HOST,
            check=False,
        )
        assert refused.returncode == 1 and b"not enabled" in refused.stderr

        await admin(admin_port, "mtls", "enable")
        await admin(
            admin_port,
            "roots",
            "upload",
            "--name",
            "fleet root",
            "--cert",
            str(demo.root / "ca" / "uploaded-chain.pem"),
            "--hostname",
            AUTH_HOST,
        )
        app = await admin_json(
            admin_port,
            "apps",
            "create",
            "--hostname",
            AUTH_HOST,
            "--origin",
            f"http://127.0.0.1:{origin}",
            "--session-duration",
            "24h",
        )
        await admin(
            admin_port,
            "policies",
            "create",
            app["id"],
            "--name",
            "valid certificate",
            "--include",
            "certificate",
        )

        status, err = await curl(demo, port, None)
        assert status == "403" and "x-access-denied-reason: no_certificate" in err
        status, err = await curl(demo, port, "valid")
        assert status == "200" and "set-cookie: CF_Authorization=" in err

        shown = await admin(admin_port, "show")
        assert b"fleet root" in shown.stdout and AUTH_HOST.encode() in shown.stdout
        assert (await admin_json(admin_port, "mtls", "show"))["enabled"] is True
        bad = await admin(
            admin_port,
            "apps",
            "create",
            "--hostname",
            AUTH_HOST,
            "--origin",
            "http://o",
            check=False,
        )
        assert bad.returncode == 1 and b"already protects" in bad.stderr
        unauthorised = await run(
            [
                *TESTBED,
                "enforcer",
                "admin",
                "--url",
                f"http://127.0.0.1:{admin_port}",
                "--token",
                "nope-nope-nope-nope",
                "show",
            ]
        )
        assert unauthorised.returncode == 1 and b"401" in unauthorised.stderr
    finally:
        assert await stop(proc) == 0


async def test_issue_revoke_and_keys_through_the_cli(
    demo: DemoLayout, tmp_path: Path, nursery
) -> None:
    port, admin_port = free_port(), free_port()
    config = empty_config(demo, tmp_path, port, admin_port)
    origin = await nursery.start(serve_echo_origin, "127.0.0.1", 0)
    proc = await start(config, port)
    try:
        key, csr, cert = tmp_path / "k.pem", tmp_path / "csr.pem", tmp_path / "c.pem"
        made = await run(
            [
                "openssl",
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                str(key),
                "-subj",
                "/CN=sensor-7",
                "-out",
                str(csr),
            ]
        )
        assert made.returncode == 0
        await admin(admin_port, "certs", "hostnames", "--hostname", AUTH_HOST)
        issued = await admin_json(
            admin_port,
            "certs",
            "issue",
            "--csr",
            str(csr),
            "--validity-days",
            "7",
            "--out",
            str(cert),
        )
        app = await admin_json(
            admin_port,
            "apps",
            "create",
            "--hostname",
            AUTH_HOST,
            "--origin",
            f"http://127.0.0.1:{origin}",
        )
        await admin(
            admin_port,
            "policies",
            "create",
            app["id"],
            "--name",
            "sensors",
            "--include",
            "common_name=sensor-7",
        )
        layout = DemoLayout(demo.root, port)
        base = [c for c in layout.curl(AUTH_HOST) if c != "-sv"] + [
            "--cert",
            str(cert),
            "--key",
            str(key),
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ]
        assert (await run(base)).stdout == b"200"
        await admin(admin_port, "certs", "revoke", issued["id"])
        assert (await run(base)).stdout == b"403"
        crl = await admin(admin_port, "certs", "crl", "--out", str(tmp_path / "crl.pem"))
        text = await run(["openssl", "crl", "-in", str(tmp_path / "crl.pem"), "-noout", "-text"])
        assert issued["serial_number"].upper() in text.stdout.decode().replace(":", "")
        assert crl.returncode == 0
        await admin(admin_port, "certs", "reactivate", issued["id"])
        assert (await run(base)).stdout == b"200"
        before = await admin_json(admin_port, "keys", "show")
        await admin(admin_port, "keys", "rotate")
        after = await admin_json(admin_port, "keys", "show")
        assert len(after["keys"]) == 2 and after["current_kid"] != before["current_kid"]
        assert before["algorithm"] == after["algorithm"] == "RS256"
        # The token algorithm changes at a rotation naming it (access-flow J7); the RS256 keys
        # stay published through their grace period.
        ed = await admin_json(admin_port, "keys", "rotate", "--algorithm", "EdDSA")
        assert ed["algorithm"] == "EdDSA"
        shown = await admin_json(admin_port, "keys", "show")
        assert shown["algorithm"] == "EdDSA" and shown["current_kid"] == ed["kid"]
        assert sorted(k["algorithm"] for k in shown["keys"]) == ["EdDSA", "RS256", "RS256"]
        assert (await run(base)).stdout == b"200"
        # The account's own token algorithm (J7): set, shown, and back to the default.
        es = await admin_json(admin_port, "signing", "set", "ES256")
        assert es["algorithm"] == es["setting"] == "ES256"
        shown = await admin_json(admin_port, "keys", "show")
        assert shown["current_keys"]["ES256"] == es["kid"] and shown["algorithm"] == "EdDSA"
        assert list(shown["account_algorithms"].values()) == ["ES256"]
        assert (await run(base)).stdout == b"200"
        printed = (await admin(admin_port, "signing", "show")).stdout.decode()
        assert "tokens ES256 (its own setting)" in printed
        back = await admin_json(admin_port, "signing", "default")
        assert back["algorithm"] == "EdDSA" and back["setting"] is None
    finally:
        assert await stop(proc) == 0


async def test_state_survives_restarts_and_kill_9(demo: DemoLayout, tmp_path: Path) -> None:
    port, admin_port = free_port(), free_port()
    config = empty_config(demo, tmp_path, port, admin_port)
    proc = await start(config, port)
    await admin(admin_port, "mtls", "enable")
    await admin(
        admin_port,
        "roots",
        "upload",
        "--name",
        "r1",
        "--cert",
        str(demo.root / "ca" / "uploaded-chain.pem"),
        "--hostname",
        AUTH_HOST,
    )
    apps = []
    for i in range(5):
        made = await admin(
            admin_port,
            "--json",
            "apps",
            "create",
            "--hostname",
            AUTH_HOST,
            "--origin",
            "http://127.0.0.1:9",
            "--session-duration",
            f"{i + 1}h",
            check=False,
        )
        if made.returncode == 0:
            apps.append(json.loads(made.stdout)["id"])
            await admin(admin_port, "apps", "delete", apps[-1])
    final = await admin_json(
        admin_port,
        "apps",
        "create",
        "--hostname",
        AUTH_HOST,
        "--origin",
        "http://127.0.0.1:9",
        "--session-duration",
        "42m",
    )
    keys = await admin_json(admin_port, "keys", "rotate")
    os.kill(proc.pid, signal.SIGKILL)  # no chance to flush anything it had not committed
    with trio.fail_after(10):
        await proc.wait()

    proc = await start(config, port)
    try:
        shown = await admin_json(admin_port, "show")
        assert shown["mtls"]["enabled"] is True
        assert [r["name"] for r in shown["roots"]] == ["r1"]
        assert [(a["id"], a["session_duration"]) for a in shown["apps"]] == [(final["id"], "42m")]
        assert shown["keys"]["current_kid"] == keys["kid"]
    finally:
        assert await stop(proc) == 0
    proc = await start(config, port)  # and once more after a clean stop
    try:
        shown = await admin_json(admin_port, "show")
        assert [a["id"] for a in shown["apps"]] == [final["id"]]
    finally:
        assert await stop(proc) == 0


async def test_workers_follow_admin_changes_at_once(
    demo: DemoLayout, tmp_path: Path, nursery
) -> None:
    port, admin_port = free_port(), free_port()
    config = empty_config(demo, tmp_path, port, admin_port)
    origin = await nursery.start(serve_echo_origin, "127.0.0.1", 0)
    proc = await trio.lowlevel.open_process(
        [*TESTBED, "enforcer", "serve", "--config", str(config), "--workers", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_for_port(port, proc)
        await wait_for_port(admin_port, proc)
        app = await protect(demo, admin_port, f"http://127.0.0.1:{origin}")
        # New connections land on either worker: every one must see each change at once.
        for _ in range(6):
            assert (await curl(demo, port, "valid"))[0] == "200"
        await admin(admin_port, "apps", "update", app["id"], "--session-duration", "0s")
        for _ in range(6):
            status, err = await curl(demo, port, "valid")
            assert status == "200" and "set-cookie" not in err.lower()
        await admin(admin_port, "apps", "delete", app["id"])
        for _ in range(6):
            assert (await curl(demo, port, "valid"))[0] == "404"
    finally:
        assert await stop(proc) == 0
