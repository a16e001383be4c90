"""Configuration errors name the file, the field and the problem."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from enforcer.config import ConfigError, load_config
from testbed.demo import DemoLayout, write_demo

ROOT = Path(__file__).resolve().parents[2]


def variant(demo: DemoLayout, tmp_path: Path, old: str, new: str) -> Path:
    text = demo.config.read_text()
    assert old in text
    text = text.replace(old, new, 1)
    # Keep the other relative paths working: point them at the demo folder.
    text = text.replace('"ca/', f'"{demo.root}/ca/').replace('"edge/', f'"{demo.root}/edge/')
    text = text.replace('"signing-key.pem"', f'"{demo.root}/signing-key.pem"')
    out = tmp_path / "enforcer.toml"
    out.write_text(text)
    return out


def test_the_demo_config_loads(demo: DemoLayout) -> None:
    config = load_config(demo.config)
    assert {a.hostname for a in config.applications} == {"auth.example.test", "iot.example.test"}
    assert len(config.roots[0].intermediates) == 1


def test_the_example_config_loads_as_shipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # scenarios/enforcer.example.toml documents every field: it must load as the README says,
    # beside a demo written to ../demo, with the admin token in the environment.
    write_demo(tmp_path / "demo", 0, "http://127.0.0.1:9000")
    (tmp_path / "scenarios").mkdir()
    example = tmp_path / "scenarios" / "enforcer.example.toml"
    example.write_text((ROOT / "scenarios" / "enforcer.example.toml").read_text())
    monkeypatch.setenv("TESTBED_ADMIN_TOKEN", "0123456789abcdef0123")
    config = load_config(example)
    assert [p.id for p in config.identity_providers] == ["corp"]
    assert [t.token.id for t in config.service_tokens] == ["ci"]
    assert config.allowed_idps["auth.example.test"] == ("corp",)
    auth = next(a for a in config.applications if a.hostname == "auth.example.test")
    assert [p.name for p in auth.policies][-2:] == ["CI jobs", "staff on managed laptops"]


@pytest.mark.parametrize(
    ("old", "new", "field", "problem"),
    [
        (
            'hostname = "auth.example.test"\n',
            "",
            "applications[0].hostname",
            "required field is missing",
        ),
        (
            'session_duration = "24h"',
            'session_duration = "a day"',
            "applications[0].session_duration",
            "not a Go duration",
        ),
        (
            'session_duration = "24h"',
            "session_duration = 24",
            "applications[0].session_duration",
            "expected a Go duration",
        ),
        ("port = 0", "port = 70000", "server.port", "not a TCP port"),
        (
            'decision = "non_identity"',
            'decision = "maybe"',
            "applications[0].policies[0].decision",
            "not one of",
        ),
        (
            "include = [{ certificate = {} }]",
            "include = [{ certificat = {} }]",
            "applications[0].policies[0].include[0]",
            "unknown rule 'certificat'",
        ),
        (
            'origin = "http',
            'origin = "ftp',
            "applications[0].origin",
            "expected a URL starting with one of http://, h2c://, grpc://, https://",
        ),
        (
            'origin = "http',
            'origin_ca = "ca/root.pem"\norigin = "http',
            "applications[0].origin_ca",
            "only an https:// or grpcs:// origin has a certificate to verify",
        ),
        (
            'origin = "http://',
            'origin_ca = "nope.pem"\norigin = "https://',
            "applications[0].origin_ca",
            "cannot read",
        ),
        (
            'origin = "http://',
            'origin_ca = "enforcer.toml"\norigin = "https://',
            "applications[0].origin_ca",
            "not PEM CA certificates",
        ),
        ("[server]", "[server]\nlisten = 1", "server.listen", "unknown field"),
    ],
)
def test_errors_name_file_field_and_problem(
    demo: DemoLayout, tmp_path: Path, old: str, new: str, field: str, problem: str
) -> None:
    path = variant(demo, tmp_path, old, new)
    with pytest.raises(ConfigError, match=re.escape(str(path))) as info:
        load_config(path)
    assert info.value.field == field or field in str(info.value)
    assert problem in str(info.value)


def test_malformed_pem_is_named(demo: DemoLayout, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    path = variant(demo, tmp_path, '"ca/uploaded-chain.pem"', f'"{bad}"')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.field == "roots[0].certificate"
    assert str(bad) in info.value.problem


def test_missing_file_is_named(demo: DemoLayout, tmp_path: Path) -> None:
    path = variant(demo, tmp_path, '"edge/key.pem"', '"edge/nope.pem"')
    with pytest.raises(ConfigError, match=r"edge_certificates\[0\]\.private_key: cannot read"):
        load_config(path)


def test_not_toml(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text("[server\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_a_root_bundle_must_end_with_its_anchor(demo: DemoLayout, tmp_path: Path) -> None:
    # The root before its intermediate would silently make the intermediate the anchor.
    swapped = tmp_path / "swapped.pem"
    swapped.write_bytes(
        (demo.root / "ca" / "root.pem").read_bytes()
        + (demo.root / "ca" / "intermediate.pem").read_bytes()
    )
    path = variant(demo, tmp_path, '"ca/uploaded-chain.pem"', f'"{swapped}"')
    with pytest.raises(ConfigError, match=r"roots\[0\]\.certificate: certificate 1 of 2 is "):
        load_config(path)


def test_an_intermediate_alone_is_a_trust_anchor(demo: DemoLayout, tmp_path: Path) -> None:
    path = variant(demo, tmp_path, '"ca/uploaded-chain.pem"', '"ca/intermediate.pem"')
    text = path.read_text().replace('"admin.token"', f'"{demo.root}/admin.token"')
    path.write_text(text)
    (root,) = load_config(path).roots
    assert root.root.subject != root.root.issuer and root.intermediates == ()
