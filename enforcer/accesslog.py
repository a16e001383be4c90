"""The access log: one JSON line per request (and per failed handshake)."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO


class AccessLog:
    """Writes JSON lines to a file or to standard output (``-``)."""

    def __init__(self, target: str | TextIO = "-") -> None:
        if isinstance(target, str):
            self._owned = target != "-"
            self._out: TextIO = (
                # Held open for the server's life and closed by close(): no context manager.
                open(target, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
                if self._owned
                else sys.stdout
            )
        else:
            self._owned = False
            self._out = target

    def write(self, record: dict[str, Any]) -> None:
        """Append one record as a JSON line."""
        self._out.write(json.dumps(record, separators=(",", ":"), default=str) + "\n")
        self._out.flush()

    def close(self) -> None:
        """Close the file when this log opened it."""
        if self._owned:
            self._out.close()
