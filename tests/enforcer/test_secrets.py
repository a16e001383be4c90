"""Files holding secrets are their owner's alone: modes after a real demo; old files tightened."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import trio

from enforcer.store import Store
from tests.testbed.test_cli import TESTBED, free_port, stop, wait_for_port
from tests.testbed.test_demo_folder import demo_args


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_a_served_demo_keeps_every_secret_file_0600(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    port, admin_port = free_port(), free_port()
    # umask 022, the usual default: files made without an explicit mode come out 0644.
    proc = await trio.lowlevel.open_process(
        [*TESTBED, "enforcer", "demo", *demo_args(out, port, admin_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        umask=0o022,
    )
    try:
        await wait_for_port(admin_port, proc)
        # The state database is open (WAL mode): its -wal and -shm exist while it serves.
        secret_files = [
            out / "state.sqlite",
            out / "state.sqlite-wal",
            out / "state.sqlite-shm",
            out / "signing-key.pem",
            out / "admin.token",
            out / "edge" / "key.pem",
            *sorted((out / "devices").glob("*/key.pem")),
        ]
        assert all(p.exists() for p in secret_files) and len(secret_files) == 12
        # Certificates and the configuration are public; every other file is someone's secret.
        public = {"enforcer.toml", *(str(p.relative_to(out)) for p in out.rglob("*cert.pem"))}
        public |= {str(p.relative_to(out)) for p in (out / "ca").iterdir()}
        modes = {
            str(p.relative_to(out)): oct(mode(p))
            for p in out.rglob("*")
            if p.is_file() and str(p.relative_to(out)) not in public
        }
        assert {str(p.relative_to(out)) for p in secret_files} <= set(modes)
        assert modes == {k: "0o600" for k in modes}
        assert oct(mode(out)) == "0o700"  # the demo made its folder: keys and state are inside
    finally:
        assert await stop(proc) == 0


def test_a_new_state_database_and_its_folder_are_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = tmp_path / "state-dir" / "state.sqlite"
        store = Store(path)
        try:
            store.commit([])
            files = sorted(p.name for p in path.parent.iterdir())
            assert files == ["state.sqlite", "state.sqlite-shm", "state.sqlite-wal"]
            assert {name: oct(mode(path.parent / name)) for name in files} == {
                name: "0o600" for name in files
            }
            assert oct(mode(path.parent)) == "0o700"
        finally:
            store.close()
    finally:
        os.umask(old)


def test_a_state_database_left_world_readable_is_tightened(tmp_path: Path, caplog) -> None:
    # A database written by an older release: 0644, with its WAL files beside it.
    path = tmp_path / "state.sqlite"
    store = Store(path)
    store.commit([])
    store.close()
    made = [path, path.with_name("state.sqlite-wal"), path.with_name("state.sqlite-shm")]
    for p in made:
        p.touch()
        p.chmod(0o644)
    store = Store(path)
    try:
        assert {p.name: oct(mode(p)) for p in made} == {p.name: "0o600" for p in made}
    finally:
        store.close()
    assert "readable by other users" in caplog.text and "rotate" in caplog.text


def test_a_signing_key_file_left_world_readable_is_tightened(tmp_path: Path) -> None:
    import datetime as dt

    from enforcer.tokens import load_or_create_key

    key = tmp_path / "signing-key.pem"
    now = dt.datetime.now(dt.UTC)
    load_or_create_key(str(key), now)
    assert oct(mode(key)) == "0o600"
    key.chmod(0o644)
    load_or_create_key(str(key), now)
    assert oct(mode(key)) == "0o600"
