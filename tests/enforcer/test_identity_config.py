"""[[identity_providers]] and [[service_tokens]] in the configuration file (access-flow I1, I11).

Errors name the file, the field and the problem; good tables seed the state once, and a
seeded service token admits the real curl over TLS.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import shutil
import stat
from pathlib import Path

import pytest

from enforcer.config import ConfigError, load_config
from testbed.demo import AUTH_HOST, DemoLayout
from tests.enforcer.test_config import variant
from tests.enforcer.test_service_tokens import curl, needs_curl

SECRET = "a" * 64
CLIENT_ID = "0123456789abcdef0123456789abcdef.access"
IDP = """
[[identity_providers]]
id = "corp"
name = "Corp IdP"
issuer_url = "https://idp.example.test"
client_id = "enforcer"
client_secret_file = "{secret_file}"
scopes = ["openid", "email", "profile"]
groups_claim = "groups"
"""
TOKEN = f"""
[[service_tokens]]
id = "ci"
client_id = "{CLIENT_ID}"
client_secret_sha256 = "{hashlib.sha256(SECRET.encode()).hexdigest()}"
expires = "2999-01-01T00:00:00Z"
"""


def config_with(demo: DemoLayout, tmp_path: Path, extra: str, app_extra: str = "") -> Path:
    secret_file = tmp_path / "idp.secret"
    if not secret_file.exists():
        secret_file.write_text("from-a-file\n")
    path = variant(
        demo,
        tmp_path,
        'name = "auth"\n',
        f'name = "auth"\n{app_extra}',
    )
    text = path.read_text().replace('"admin.token"', f'"{demo.root}/admin.token"')
    path.write_text(text + extra.replace("{secret_file}", str(secret_file)))
    return path


def test_providers_tokens_and_allowed_idps_load(demo: DemoLayout, tmp_path: Path) -> None:
    path = config_with(demo, tmp_path, IDP + TOKEN, 'allowed_idps = ["corp"]\n')
    config = load_config(path)
    (idp,) = config.identity_providers
    assert (idp.id, idp.client_secret, idp.issuer_url) == (
        "corp",
        "from-a-file",
        "https://idp.example.test",
    )
    assert stat.S_IMODE((tmp_path / "idp.secret").stat().st_mode) == 0o600  # secrets are 0600
    (token,) = config.service_tokens
    assert token.token.client_id == CLIENT_ID
    assert token.token.expires_at == dt.datetime(2999, 1, 1, tzinfo=dt.UTC)
    assert config.allowed_idps == {AUTH_HOST: ("corp",)}


def test_the_secret_from_the_environment(
    demo: DemoLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = IDP.replace('client_secret_file = "{secret_file}"', 'client_secret_env = "IDP_SECRET"')
    path = config_with(demo, tmp_path, text)
    with pytest.raises(ConfigError, match=r"identity_providers\[0\]\.client_secret_env: "):
        load_config(path)
    monkeypatch.setenv("IDP_SECRET", "from-env")
    assert load_config(path).identity_providers[0].client_secret == "from-env"


@pytest.mark.parametrize(
    ("old", "new", "field", "problem"),
    [
        (
            'issuer_url = "https://',
            'issuer_url = "http://',
            "identity_providers[0].issuer_url",
            "https://",
        ),
        ('client_id = "enforcer"\n', "", "identity_providers[0].client_id", "required"),
        ('id = "corp"\n', "", "identity_providers[0].id", "required"),
        (
            'client_secret_file = "',
            'client_secret = "x"\nclient_secret_file = "',
            "identity_providers[0].client_secret",
            "exactly one of",
        ),
        ('scopes = ["openid", ', "scopes = [", "identity_providers[0].scopes", "openid"),
        (
            'groups_claim = "groups"',
            'allowed_algorithms = ["HS256"]',
            "identity_providers[0].allowed_algorithms",
            "HS256",
        ),
        (
            'groups_claim = "groups"',
            'ca_file = "nope.pem"',
            "identity_providers[0].ca_file",
            "cannot read",
        ),
        (
            'groups_claim = "groups"',
            'tenant = "x"',
            "identity_providers[0].tenant",
            "unknown field",
        ),
        ('type = "oidc"', 'type = "saml"', "identity_providers[0].type", "only"),
        (
            f'client_id = "{CLIENT_ID}"',
            'client_id = "abc"',
            "service_tokens[0].client_id",
            ".access",
        ),
        (
            f'client_secret_sha256 = "{hashlib.sha256(SECRET.encode()).hexdigest()}"',
            'client_secret_sha256 = "secret"',
            "service_tokens[0].client_secret_sha256",
            "64 hex",
        ),
        (
            'expires = "2999-01-01T00:00:00Z"',
            'expires = "soon"',
            "service_tokens[0].expires",
            "ISO-8601",
        ),
        (
            'expires = "2999-01-01T00:00:00Z"',
            'expires = "2999-01-01T00:00:00"',
            "service_tokens[0].expires",
            "time zone",
        ),
        ('expires = "2999-01-01T00:00:00Z"', "", "service_tokens[0].expires", "required"),
    ],
)
def test_errors_name_file_field_and_problem(
    demo: DemoLayout, tmp_path: Path, old: str, new: str, field: str, problem: str
) -> None:
    text = (IDP + TOKEN).replace('name = "Corp IdP"', 'name = "Corp IdP"\ntype = "oidc"')
    assert old in text
    path = config_with(demo, tmp_path, text.replace(old, new, 1))
    with pytest.raises(ConfigError, match=re.escape(str(path))) as info:
        load_config(path)
    assert info.value.field == field, str(info.value)
    assert problem in info.value.problem


def test_allowed_idps_must_name_a_provider(demo: DemoLayout, tmp_path: Path) -> None:
    path = config_with(demo, tmp_path, IDP, 'allowed_idps = ["other"]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.field == "applications[0].allowed_idps" and "'other'" in info.value.problem


def test_a_bad_file_exits_2_from_the_command_line(demo: DemoLayout, tmp_path: Path) -> None:
    import subprocess

    from tests.testbed.test_cli import TESTBED

    path = config_with(demo, tmp_path, TOKEN.replace(CLIENT_ID, "nope"))
    done = subprocess.run(
        [*TESTBED, "enforcer", "serve", "--config", str(path), "--port", "0"],
        capture_output=True,
        check=False,
        env={**os.environ, "TESTBED_STATE_DIR": str(tmp_path)},
    )
    assert done.returncode == 2, done.stderr.decode()
    assert b"service_tokens[0].client_id" in done.stderr


@needs_curl
async def test_a_seeded_service_token_admits_curl(
    serve_config, demo: DemoLayout, tmp_path: Path
) -> None:
    policy = (
        "\n[[applications.policies]]\n"
        'name = "ci"\n'
        'include = [{ service_token = { token_id = "ci" } }]\n'
    )
    path = config_with(demo, tmp_path, IDP + TOKEN)
    # The ci policy goes on the auth application, after its certificate policy.
    text = path.read_text().replace(
        "include = [{ certificate = {} }]\n", "include = [{ certificate = {} }]\n" + policy, 1
    )
    path.write_text(text)
    served = await serve_config(config=load_config(path))
    snapshot = served.enforcer.snapshot
    assert snapshot.applications[AUTH_HOST].identity_providers == ("corp",)
    assert snapshot.identity_providers["corp"].client_secret == "from-a-file"
    assert (await curl(served, CLIENT_ID, SECRET))[0] == 200
    status, headers, _ = await curl(served, CLIENT_ID, "b" * 64)
    assert (status, headers["x-access-denied-reason"]) == (403, "service_token_invalid")
    assert shutil.which("curl")
