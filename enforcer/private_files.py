"""Files and folders that hold secrets: readable by their owner only, from the first byte.

The state database holds the token-signing and managed-CA private keys, so a copy readable by
another local user lets that user mint accepted tokens or certificates. The mode is therefore
set when a file is created (``os.open(..., 0o600)``), never by a ``chmod`` after the secret is
already on disk, and folders made for state are 0700.

An existing file that other users can read (a state database written by an older release) is
tightened to 0600 with a warning rather than refused: refusing would stop every upgraded
installation, while tightening closes the hole at once; the warning tells the operator to
rotate what may already have been read.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def private_dir(path: Path) -> None:
    """Create folder ``path`` (mode 0700) when missing; an existing folder is left as it is."""
    # Only the folder made here is 0700: parents are the operator's (home, /var/lib, ...).
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=PRIVATE_DIR_MODE)
    except FileExistsError:
        return
    # mkdir's mode passes through the umask, which can only remove bits: 0700 or stricter.


def tighten(path: Path, what: str) -> None:
    """Make an existing ``path`` mode 0600 if other users could read it, and warn."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return
    if mode & 0o077:
        os.chmod(path, PRIVATE_FILE_MODE)
        log.warning(
            "%s: the %s was readable by other users (mode %o); made it %o. Secrets in it may "
            "have been read: rotate them (signing keys: `testbed enforcer admin keys rotate`).",
            path,
            what,
            mode,
            PRIVATE_FILE_MODE,
        )


def create_private(path: Path, what: str = "file") -> None:
    """Make sure ``path`` exists with mode 0600 before anything secret is written to it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    except FileExistsError:
        tighten(path, what)
        return
    os.close(fd)


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (created or replaced) with mode 0600 set before the first byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        # An existing file keeps its old mode through O_CREAT: set 0600 before writing into it.
        os.fchmod(fd, PRIVATE_FILE_MODE)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
