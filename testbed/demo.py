"""The enforcer demo: a PKI, demo devices and a configuration, written to a folder and served.

Layout (users and tests rely on it)::

    DIR/ca/edge-ca.pem          trust for the server certificates (curl --cacert)
    DIR/ca/root.pem             the device root
    DIR/ca/intermediate.pem     the device intermediate
    DIR/ca/uploaded-chain.pem   intermediate + root, as uploaded to the enforcer
    DIR/ca/foreign-root.pem     a root the enforcer does not trust
    DIR/edge/cert.pem, key.pem  the server certificate for both demo hostnames
    DIR/enforcer.toml           the enforcer configuration
    DIR/admin.token             the admin API's bearer token
    DIR/state.sqlite            the enforcer's state (made on first start; a new demo starts afresh)
    DIR/devices/<name>/cert.pem + key.pem
    DIR/.demo.lock              held (flock) by the demo serving DIR: a second one is refused
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fcntl
import os
import secrets
import socket
from collections.abc import Sequence
from pathlib import Path

from devices.pki import Issued, issue_ca, issue_leaf, write_pem
from enforcer.private_files import private_dir, write_private

AUTH_HOST = "auth.example.test"
IOT_HOST = "iot.example.test"
DEVICES = ("valid", "leaf-only", "expired", "not-yet-valid", "foreign-ca", "wrong-cn")


LOCK_FILE = ".demo.lock"


class DemoError(Exception):
    """The demo cannot start in this folder or on these ports; nothing in the folder changed."""


def check_ports_free(host: str, ports: Sequence[int]) -> None:
    """Raise :class:`DemoError` when one of ``ports`` cannot be bound (port 0 is always free)."""
    # Checked before anything is written: a demo that would fail with "address in use" must not
    # first rewrite the PKI and token of a folder another demo serves.
    for port in ports:
        if port == 0:
            continue
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the enforcer binds
            try:
                sock.bind((host, port))
            except (OSError, OverflowError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise DemoError(
                    f"cannot listen on {host}:{port}: {reason}; choose free ports "
                    "(--port, --admin-port); nothing was written"
                ) from None


def lock_demo_dir(out: Path) -> int:
    """Take an exclusive lock on demo folder ``out`` for this process's life; return its fd."""
    private_dir(out)
    lock_path = out / LOCK_FILE
    # No O_TRUNC: the holder's pid in the file must survive a refused second demo.
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise DemoError(
            f"{out} is in use by a running demo (pid {holder}): stop it, or choose another "
            "folder with --out; nothing was written"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


@dataclasses.dataclass(frozen=True)
class DemoLayout:
    """Paths of a written demo."""

    root: Path
    port: int
    admin_port: int = 0

    @property
    def config(self) -> Path:
        return self.root / "enforcer.toml"

    @property
    def edge_ca(self) -> Path:
        return self.root / "ca" / "edge-ca.pem"

    def device(self, name: str) -> tuple[Path, Path]:
        """Return (cert.pem, key.pem) of a demo device."""
        d = self.root / "devices" / name
        return d / "cert.pem", d / "key.pem"

    def curl(self, host: str, device: str | None = None, path: str = "/") -> list[str]:
        """Return the curl command that reaches ``host`` as ``device`` (no certificate if None)."""
        cmd = [
            "curl",
            "-sv",
            "--resolve",
            f"{host}:{self.port}:127.0.0.1",
            "--cacert",
            str(self.edge_ca),
            f"https://{host}:{self.port}{path}",
        ]
        if device:
            cert, key = self.device(device)
            cmd += ["--cert", str(cert), "--key", str(key)]
        return cmd


def write_demo(
    out: Path, port: int, origin: str, now: dt.datetime | None = None, *, admin_port: int = 0
) -> DemoLayout:
    """Write the demo PKI, devices and configuration into ``out``."""
    now = now or dt.datetime.now(dt.UTC)
    private_dir(out)  # it holds the demo's keys, token and state: 0700 when made here
    day = dt.timedelta(days=1)
    edge_ca = issue_ca("mtls-testbed demo edge CA", now)
    edge = issue_leaf(
        AUTH_HOST,
        edge_ca,
        not_before=now - day,
        not_after=now + 365 * day,
        client=False,
        dns_names=[AUTH_HOST, IOT_HOST],
    )
    root = issue_ca("mtls-testbed demo device root", now)
    inter = issue_ca(
        "mtls-testbed demo device intermediate", now, issuer=root, days=1825, path_length=0
    )
    foreign_root = issue_ca("mtls-testbed foreign root", now)
    foreign_inter = issue_ca(
        "mtls-testbed foreign intermediate", now, issuer=foreign_root, path_length=0
    )

    def leaf(cn: str, issuer: Issued, start: dt.datetime, end: dt.datetime) -> Issued:
        return issue_leaf(cn, issuer, not_before=start, not_after=end)

    devices = {
        "valid": (leaf("device-001", inter, now - day, now + 365 * day), [inter]),
        "leaf-only": (leaf("device-002", inter, now - day, now + 365 * day), []),
        "expired": (leaf("device-003", inter, now - 30 * day, now - day), [inter]),
        "not-yet-valid": (leaf("device-004", inter, now + day, now + 30 * day), [inter]),
        "foreign-ca": (
            leaf("device-005", foreign_inter, now - day, now + 365 * day),
            [foreign_inter],
        ),
        "wrong-cn": (leaf("device-999", inter, now - day, now + 365 * day), [inter]),
    }
    write_pem(out / "ca" / "edge-ca.pem", edge_ca.cert_pem())
    write_pem(out / "ca" / "root.pem", root.cert_pem())
    write_pem(out / "ca" / "intermediate.pem", inter.cert_pem())
    write_pem(out / "ca" / "uploaded-chain.pem", inter.cert_pem(), root.cert_pem())
    write_pem(out / "ca" / "foreign-root.pem", foreign_root.cert_pem())
    write_pem(out / "edge" / "cert.pem", edge.cert_pem(), edge_ca.cert_pem())
    write_pem(out / "edge" / "key.pem", edge.key_pem(), private=True)
    for name, (issued, chain) in devices.items():
        write_pem(
            out / "devices" / name / "cert.pem", issued.cert_pem(), *(c.cert_pem() for c in chain)
        )
        write_pem(out / "devices" / name / "key.pem", issued.key_pem(), private=True)
    # A new demo starts afresh: new signing key, new state, new admin token.
    for stale in ("signing-key.pem", "state.sqlite", "state.sqlite-wal", "state.sqlite-shm"):
        (out / stale).unlink(missing_ok=True)
    write_private(out / "admin.token", (secrets.token_urlsafe(32) + "\n").encode())
    (out / "enforcer.toml").write_text(
        DEMO_CONFIG.format(
            port=port,
            admin_port=admin_port,
            origin=origin,
            auth=AUTH_HOST,
            iot=IOT_HOST,
            auth_aud=secrets.token_hex(32),
            iot_aud=secrets.token_hex(32),
        ),
        encoding="utf-8",
    )
    return DemoLayout(out, port, admin_port)


DEMO_CONFIG = """\
# The enforcer demo, written by `testbed enforcer demo`. Paths are relative to this file.

[server]
host = "127.0.0.1"
port = {port}
access_log = "-"

[state]
path = "state.sqlite"            # admin changes live here; this file seeds it on first start

[admin]
host = "127.0.0.1"
port = {admin_port}
token_file = "admin.token"
account_id = "demo"

[[managed_ca]]                   # zone demo's managed CA, trusted on both demo hostnames
zone = "demo"
hostnames = ["{auth}", "{iot}"]

[signing]
key_file = "signing-key.pem"     # RSA key for RS256 tokens; created when missing
issuer = "https://access.testbed.local"
grace_period = "24h"

[[edge_certificates]]
hostnames = ["{auth}", "{iot}"]
certificate = "edge/cert.pem"
private_key = "edge/key.pem"

[[roots]]
name = "demo device root"
certificate = "ca/uploaded-chain.pem"   # the intermediate, then the root
associated_hostnames = ["{auth}", "{iot}"]

[[applications]]
name = "auth"
hostname = "{auth}"
aud = "{auth_aud}"
session_duration = "24h"
origin = "{origin}"
forward_client_certificate = true
bind_token_to_certificate = false        # the demo shows a cookie admitting alone (default: true)

[[applications.policies]]
name = "valid certificate"
decision = "non_identity"
include = [{{ certificate = {{}} }}]

[[applications]]
name = "iot"
hostname = "{iot}"
aud = "{iot_aud}"
session_duration = "0s"                  # No Duration: a full handshake for every request
origin = "{origin}"

[[applications.policies]]
name = "device-001 only"
decision = "non_identity"
include = [{{ common_name = {{ common_name = "device-001" }} }}]
"""
