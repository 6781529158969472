"""`tapgate`: run the daemon and look after its journal."""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daemon import __version__
from daemon.config import Config, load
from daemon.errors import ConfigError, JournalError, TapgateError
from daemon.journal import Journal

EXIT_FAULT = 1
EXIT_CONFIG = 2


def _override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected section.key=value")
    try:
        parsed: Any = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip(), parsed


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tapgate", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tapgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", "-c", type=Path, required=True, help="TOML config file")
        p.add_argument("--set", dest="overrides", action="append", type=_override, default=[],
                       metavar="SECTION.KEY=VALUE", help="override a config value")

    run = sub.add_parser("run", help="run the gate in the foreground until SIGTERM/SIGINT")
    with_config(run)

    journal = sub.add_parser("journal", help="inspect the journal")
    jsub = journal.add_subparsers(dest="journal_command", required=True)
    verify = jsub.add_parser("verify", help="check the hash chain and SQLite's quick_check")
    with_config(verify)
    export = jsub.add_parser("export", help="print every entry as one JSON object per line")
    with_config(export)

    config = sub.add_parser("config", help="configuration")
    csub = config.add_subparsers(dest="config_command", required=True)
    check = csub.add_parser("check", help="validate a config file and print the result")
    check.add_argument("file", type=Path)
    return parser


def _setup_logging(level: str) -> None:
    from daemon import logsetup

    logsetup.setup(level)


def _existing_journal(config: Config) -> Journal:
    """The configured journal, which must exist: opening a wrong path would create an
    empty journal there, and verify would report its chain intact."""
    if not config.journal.path.is_file():
        raise JournalError(f"no journal at {config.journal.path}")
    return Journal(config.journal.path)


def _journal_verify(config: Config) -> int:
    with _existing_journal(config) as journal:
        report = journal.verify()
    for problem in report.problems:
        print(f"FAULT {problem}")
    print(f"{report.entries} entries, {'chain intact' if report.ok else 'FAULTS FOUND'}")
    return 0 if report.ok else EXIT_FAULT


def _journal_export(config: Config) -> int:
    out = sys.stdout
    with _existing_journal(config) as journal:
        for entry in journal.entries():
            out.write(json.dumps(entry.to_json(), separators=(",", ":")) + "\n")
    return 0


def _config_check(config: Config) -> int:
    print(f"{config.source}: valid")
    for section in ("gate", "reader", "sam", "journal", "gateio", "log"):
        print(f"[{section}]")
        for key, value in vars_of(getattr(config, section)).items():
            print(f"  {key} = {value}")
    return 0


def vars_of(section: object) -> dict[str, str]:
    out = {}
    for name in section.__slots__:  # type: ignore[attr-defined]
        value = getattr(section, name)
        if name in ("purchase_key",) and value is not None:
            value = "<set>"
        elif isinstance(value, bytes):
            value = value.hex().upper()
        out[name] = str(value)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "config":
            config = load(args.file, overrides={})
            return _config_check(config)
        config = load(args.config, overrides=dict(args.overrides))
    except ConfigError as err:
        print(f"tapgate: {err}", file=sys.stderr)
        return EXIT_CONFIG
    _setup_logging(config.log.level)
    try:
        if args.command == "run":
            from daemon.service import run

            return run(config)
        if args.journal_command == "verify":
            return _journal_verify(config)
        return _journal_export(config)
    except ConfigError as err:
        print(f"tapgate: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except TapgateError as err:
        print(f"tapgate: {err}", file=sys.stderr)
        return EXIT_FAULT
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
