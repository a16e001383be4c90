"""`testbed enforcer admin idps ...` and `service-tokens ...` against a real enforcer process,
and the real curl presenting the token the CLI printed (access-flow I1, I11)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import trio

from enforcer.origin import serve_echo_origin
from testbed.demo import AUTH_HOST, DemoLayout
from tests.testbed.test_admin_cli import admin, admin_json, empty_config, start
from tests.testbed.test_cli import free_port, stop
from tests.wire import run

pytestmark = pytest.mark.skipif(
    (shutil.which("curl") is None or shutil.which("openssl") is None) and not os.environ.get("CI"),
    reason="curl and openssl are installed by .ci/run (on CI their absence fails)",
)


async def curl_token(demo: DemoLayout, port: int, client_id: str, secret: str) -> tuple[str, str]:
    layout = DemoLayout(demo.root, port)
    cmd = [*layout.curl(AUTH_HOST), "-o", "/dev/null", "-w", "%{http_code}"]
    cmd += ["-H", f"CF-Access-Client-Id: {client_id}", "-H", f"CF-Access-Client-Secret: {secret}"]
    result = await run(cmd)
    reason = next(
        (
            line.split(":", 1)[1].strip()
            for line in result.stderr.decode("latin-1").splitlines()
            if line.lower().startswith("< x-access-denied-reason:")
        ),
        "",
    )
    return result.stdout.decode(), reason


async def test_service_tokens_and_identity_providers_from_the_cli(
    demo: DemoLayout, tmp_path: Path, nursery: trio.Nursery
) -> None:
    port, admin_port = free_port(), free_port()
    origin_port = await nursery.start(serve_echo_origin, "127.0.0.1", 0)
    proc = await start(empty_config(demo, tmp_path, port, admin_port), port)
    try:
        made = await admin_json(admin_port, "service-tokens", "create", "--name", "ci")
        secret = made["client_secret"]
        assert len(secret) == 64 and made["client_id"].endswith(".access")
        app = await admin_json(
            admin_port,
            "apps",
            "create",
            "--hostname",
            AUTH_HOST,
            "--origin",
            f"http://127.0.0.1:{origin_port}",
        )
        await admin(
            admin_port,
            "policies",
            "create",
            app["id"],
            "--name",
            "machines",
            "--include",
            f"service_token={made['id']}",
        )
        assert await curl_token(demo, port, made["client_id"], secret) == ("200", "")

        listed = await admin(admin_port, "--json", "service-tokens", "list")
        assert [t["client_id"] for t in json.loads(listed.stdout)] == [made["client_id"]]
        assert secret.encode() not in listed.stdout
        shown = await admin_json(admin_port, "service-tokens", "show", made["id"])
        assert "client_secret" not in shown

        rotated = await admin(admin_port, "service-tokens", "rotate", made["id"])
        text = rotated.stdout.decode()
        assert "never shown again" in text and secret not in text
        new_secret = text.split("client_secret: ", 1)[1].split()[0]
        assert len(new_secret) == 64 and new_secret != secret
        assert await curl_token(demo, port, made["client_id"], secret) == (
            "403",
            "service_token_invalid",
        )
        assert (await curl_token(demo, port, made["client_id"], new_secret))[0] == "200"
        refreshed = await admin_json(admin_port, "service-tokens", "refresh", made["id"])
        assert refreshed["expires_at"] >= made["expires_at"]
        await admin(admin_port, "service-tokens", "revoke", made["id"])
        assert (await curl_token(demo, port, made["client_id"], new_secret))[1] == (
            "service_token_invalid"
        )
        bad = await admin(
            admin_port, "service-tokens", "create", "--name", "x", "--duration", "0s", check=False
        )
        assert bad.returncode == 1 and b"duration" in bad.stderr

        secret_file = tmp_path / "idp-secret"
        secret_file.write_text("idp-client-secret\n")
        idp = await admin_json(
            admin_port,
            "idps",
            "add",
            "--name",
            "corp",
            "--issuer-url",
            "https://idp.example.test",
            "--client-id",
            "enforcer",
            "--client-secret-file",
            str(secret_file),
            "--scope",
            "openid",
            "--scope",
            "email",
        )
        assert idp["config"]["client_secret"] == "********"
        assert idp["config"]["scopes"] == ["openid", "email"]
        listed = await admin(admin_port, "--json", "idps", "list")
        assert [i["id"] for i in json.loads(listed.stdout)] == [idp["id"]]
        assert b"idp-client-secret" not in listed.stdout
        shown = await admin(admin_port, "idps", "show", idp["id"])
        assert b"idp-client-secret" not in shown.stdout and b"********" in shown.stdout
        refused = await admin(
            admin_port,
            "idps",
            "add",
            "--name",
            "bad",
            "--issuer-url",
            "http://idp.example.test",
            "--client-id",
            "x",
            "--client-secret-env",
            "NO_SUCH_VARIABLE_FOR_THIS_TEST",
            check=False,
        )
        assert refused.returncode == 1 and b"NO_SUCH_VARIABLE_FOR_THIS_TEST" in refused.stderr
        await admin(admin_port, "idps", "delete", idp["id"])
        assert json.loads((await admin(admin_port, "--json", "idps", "list")).stdout) == []
    finally:
        await stop(proc)
