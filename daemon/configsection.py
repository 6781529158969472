"""One TOML table read into typed values, refusing keys nobody asked for: the parsing
helpers every config section (the daemon's, the beacon's) is read with."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from protocol.errors import ConfigError


class Section:
    """Reads typed keys from one TOML table and refuses keys nobody asked for."""

    def __init__(self, name: str, table: Mapping[str, Any]) -> None:
        self.name = name
        self.table = dict(table)
        self.seen: set[str] = set()

    def _get(self, key: str) -> Any:
        self.seen.add(key)
        return self.table.get(key)

    def key(self, key: str) -> str:
        return f"{self.name}.{key}"

    def string(self, key: str, default: str) -> str:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, str) or not value:
            raise ConfigError(self.key(key), value, "must be a non-empty string")
        return value

    def number(self, key: str, default: float, *, low: float, high: float) -> float:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(self.key(key), value, "must be a number")
        if not low <= value <= high:
            raise ConfigError(self.key(key), value, f"must be between {low:.12g} and {high:.12g}")
        return float(value)

    def integer(self, key: str, default: int, *, low: int, high: int) -> int:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.key(key), value, "must be a whole number")
        if not low <= value <= high:
            raise ConfigError(self.key(key), value, f"must be between {low} and {high}")
        return value

    def optional_string(self, key: str) -> str:
        """A string that may be left out or empty (meaning: not set)."""
        value = self._get(key)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ConfigError(self.key(key), value, "must be a string")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(self.key(key), value, "must be true or false")
        return value

    def path(self, key: str, default: Path | None = None) -> Path | None:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, str) or not value:
            raise ConfigError(self.key(key), value, "must be a non-empty path")
        if "\0" in value:  # no file has such a name: open() raises ValueError on it
            raise ConfigError(self.key(key), value, "must not hold a NUL character")
        return Path(value)

    def hexbytes(self, key: str, size: int, default: bytes | None) -> bytes | None:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, str) or not re.fullmatch(r"[0-9A-Fa-f]*", value):
            raise ConfigError(self.key(key), value, f"must be {size * 2} hex digits")
        if len(value) != size * 2:
            raise ConfigError(self.key(key), value,
                              f"must be {size * 2} hex digits, not {len(value)}")
        return bytes.fromhex(value)

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.seen)
        if unknown:
            key = unknown[0]
            raise ConfigError(self.key(key), self.table[key], "unknown key")
