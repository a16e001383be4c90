"""Point a people scenario at the tests' real OpenID Connect provider, and run it.

A scenario with people names the provider they log in at (``[identity_provider]``); the
shipped ``scenarios/people-and-devices.toml`` names one the user runs. :func:`point_at`
writes a copy of such a scenario whose table names a running :class:`tests.oidc_idp.OidcIdp`
(issuer, a client registered for the scenario's hostnames, its CA), and returns the copy and
the environment that holds the client secret. The tests run the copy; so can a person:

    .venv/bin/python -m tests.people_idp scenarios/people-and-devices.toml [testbed run options]

starts the provider (node, tests/idp), runs ``testbed run`` on the copy, and stops it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from tests.oidc_idp import OidcIdp, callback_uris, start_idp, stop_idp

ENV = "IDP_CLIENT_SECRET"


def scenario_hostnames(text: str) -> list[str]:
    """The hostnames of a scenario's applications (the enforcer's callback hosts)."""
    target = tomllib.loads(text).get("target", {})
    apps = target.get("applications") or [{"hostname": target.get("hostname", "auth.example.test")}]
    return [a["hostname"] for a in apps]


def point_at(idp: OidcIdp, source: Path, out_dir: Path) -> tuple[Path, dict[str, str]]:
    """Write ``source`` with its ``[identity_provider]`` naming ``idp``; the copy and its env."""
    text = source.read_text()
    # The simulated people send Host without a port, so the enforcer's redirect URI has none.
    client = idp.register_client(callback_uris(scenario_hostnames(text), 443))
    out_dir.mkdir(parents=True, exist_ok=True)
    ca = out_dir / "idp-ca.pem"
    ca.write_text(idp.ca_pem)
    table = (
        "[identity_provider]\n"
        'name = "oidc-provider (tests/idp)"\n'
        f'issuer_url = "{idp.issuer}"\n'
        f'client_id = "{client.client_id}"\n'
        f'client_secret_env = "{ENV}"\n'
        f'ca_file = "{ca}"\n'
    )
    pattern = re.compile(r"(?ms)^\[identity_provider\]\n.*?(?=^\[)")
    if pattern.search(text) is None:
        raise ValueError(f"{source}: no [identity_provider] table to point at the provider")
    copy = out_dir / source.name
    copy.write_text(pattern.sub(table + "\n", text, count=1))
    return copy, {**os.environ, ENV: client.client_secret}


def main(argv: list[str]) -> int:
    """Start the tests' provider, run ``testbed run`` on a copy of a scenario naming it."""
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    source, extra = Path(argv[0]), argv[1:]
    with tempfile.TemporaryDirectory(prefix="people-idp-") as tmp:
        process, idp = start_idp(Path(tmp))
        try:
            copy, env = point_at(idp, source, Path(tmp))
            print(f"provider {idp.issuer} for {copy}", file=sys.stderr)
            return subprocess.call(
                [sys.executable, "-m", "testbed.cli", "run", str(copy), *extra], env=env
            )
        finally:
            stop_idp(process)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
