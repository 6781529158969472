"""Gate configs for the tests: the validated kind, and the raw (TOML-shaped) kind a test
edits and writes to a file for the daemon or the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemon.config import Config, GateConfig, validate
from tests.cards import FARES, MASTER_KEY, TERMINAL_ID


def gate_config(**changes: Any) -> GateConfig:
    values: dict[str, Any] = {
        "terminal_id": TERMINAL_ID,
        "fares": dict(FARES),
        "anti_passback_s": 300.0,
        "recovery_window_s": 86400.0,
    }
    values.update(changes)
    return GateConfig(**values)


def raw_config(journal_path: Path | str = "var/journal.db") -> dict[str, dict[str, Any]]:
    """A valid raw (TOML-shaped) config for the sim backends."""
    return {
        "gate": {
            "terminal_id": TERMINAL_ID.hex().upper(),
            "anti_passback_s": 300,
            "recovery_window_s": 86400,
            "fares": {"adult": 250, "concession": 120, "staff": 0},
        },
        "reader": {"backend": "sim", "sim_interval_s": 0},
        "sam": {"backend": "software", "purchase_key": MASTER_KEY.hex().upper()},
        "journal": {"path": str(journal_path)},
        "log": {"level": "INFO"},
    }


def make_config(journal_path: Path | str = "var/journal.db") -> Config:
    return validate(raw_config(journal_path))


def toml_text(raw: dict[str, dict[str, Any]]) -> str:
    """Enough TOML for the config shapes tests write (tables, one level of subtables)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(item) for item in v) + "]"
        raise TypeError(v)

    lines: list[str] = []
    for name, table in raw.items():
        lines.append(f"[{name}]")
        subtables = {k: v for k, v in table.items() if isinstance(v, dict)}
        lines += [f"{k} = {value(v)}" for k, v in table.items() if k not in subtables]
        for sub, items in subtables.items():
            lines.append(f"[{name}.{sub}]")
            lines += [f"{k} = {value(v)}" for k, v in items.items()]
    return "\n".join(lines) + "\n"
