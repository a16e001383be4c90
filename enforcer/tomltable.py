"""Typed reading of TOML tables, with errors that name the file, the field and the problem.

The enforcer's configuration and the testbed's scenario files both read TOML this way; each
passes its own error class, built as ``error(path, field, problem)``.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from enforcer.durations import DurationError, parse_duration

ErrorFactory = Callable[[Path, str, str], Exception]

_KIND_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "a list",
    dict: "a table",
}


def kind_name(kind: type | tuple[type, ...]) -> str:
    """Say what a type (or types) means in a message: ``an integer or a number``."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)


def read_toml(path: Path, error: ErrorFactory) -> TableReader:
    """Read a TOML file; an unreadable or malformed file raises ``error`` naming it."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise error(path, "", f"cannot read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise error(path, "", f"not valid TOML: {exc}") from None
    return TableReader(path, data, "", error)


class TableReader:
    """Typed access to one TOML table; ``where`` is its dotted path in the file."""

    def __init__(
        self, path: Path, table: Mapping[str, Any], where: str, error: ErrorFactory
    ) -> None:
        self.path, self.table, self.where, self._error = path, table, where, error

    def field(self, name: str) -> str:
        """The dotted path of a field of this table."""
        return f"{self.where}.{name}" if self.where else name

    def error(self, name: str, problem: str) -> Exception:
        """An error about one field."""
        return self._error(self.path, self.field(name), problem)

    def get(
        self, name: str, kind: type | tuple[type, ...], default: Any = ..., what: str = ""
    ) -> Any:
        """A field of the given type; ``default`` when absent (``...``: required)."""
        if name not in self.table:
            if default is ...:
                raise self.error(name, f"required field is missing ({what or kind_name(kind)})")
            return default
        value = self.table[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # TOML booleans are Python ints: refuse true where a number is meant.
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise self.error(name, f"expected {what or kind_name(kind)}, got {value!r}")
        return value

    def number(self, name: str, default: float | None = None, *, minimum: float = 0.0) -> float:
        """A number at least ``minimum``."""
        value = self.get(name, (int, float), ... if default is None else default, "a number")
        if value < minimum:
            raise self.error(name, f"{value} is below {minimum}")
        return float(value)

    def choice(self, name: str, choices: tuple[str, ...], default: str | None = None) -> str:
        """A string among ``choices``."""
        value = self.get(name, str, ... if default is None else default, f"one of {list(choices)}")
        if value not in choices:
            raise self.error(name, f"{value!r} is not one of {list(choices)}")
        return str(value)

    def duration(self, name: str, default: str | None = None) -> Any:
        """A Go-style duration string, as a timedelta."""
        raw = self.get(name, str, default, "a Go duration such as 0s, 15m or 24h")
        try:
            return parse_duration(raw)
        except DurationError as exc:
            raise self.error(name, str(exc)) from None

    def seconds(self, name: str, default: str | None = None) -> float:
        """A duration given as a Go-style string or as a number of seconds."""
        raw = self.get(name, (str, int, float), default, "a duration such as 30s or 2h, or seconds")
        if isinstance(raw, int | float):
            if raw < 0:
                raise self.error(name, f"{raw} is negative")
            return float(raw)
        try:
            return parse_duration(raw).total_seconds()
        except DurationError as exc:
            raise self.error(name, str(exc)) from None

    def file(self, name: str) -> Path:
        """A file path, relative to the file's folder unless absolute."""
        p = Path(self.get(name, str, what="a file path"))
        return p if p.is_absolute() else self.path.parent / p

    def read(self, name: str) -> tuple[Path, bytes]:
        """A file's path and bytes."""
        p = self.file(name)
        try:
            return p, p.read_bytes()
        except OSError as exc:
            raise self.error(name, f"cannot read {p}: {exc.strerror}") from None

    def hostnames(self, name: str) -> tuple[str, ...]:
        """A non-empty list of hostnames, lower-cased."""
        raw = self.get(name, list, what="a list of hostnames")
        if not raw or not all(isinstance(h, str) and h for h in raw):
            raise self.error(name, f"expected a non-empty list of hostnames, got {raw!r}")
        return tuple(h.lower().rstrip(".") for h in raw)

    def unknown(self, allowed: set[str]) -> None:
        """Refuse fields outside ``allowed``."""
        extra = sorted(set(self.table) - allowed)
        if extra:
            raise self.error(extra[0], f"unknown field; expected one of {sorted(allowed)}")

    def sub(self, name: str) -> TableReader:
        """A sub-table (empty when absent)."""
        raw = self.table.get(name, {})
        if not isinstance(raw, dict):
            raise self.error(name, "expected a table")
        return TableReader(self.path, raw, self.field(name), self._error)

    def tables(self, name: str) -> list[TableReader]:
        """An array of tables (``[[name]]``; empty when absent)."""
        raw = self.table.get(name, [])
        if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
            raise self.error(name, f"expected an array of tables ([[{name}]])")
        return [
            TableReader(self.path, t, f"{self.field(name)}[{i}]", self._error)
            for i, t in enumerate(raw)
        ]
