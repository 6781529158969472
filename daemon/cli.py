"""`tapgate`: run the daemon and look after its journal.

Exit status: 0 success; 1 a fault (a broken journal chain, a lost entry, a key that
exists, a daemon that is not running for `tapgate status`); 2 a configuration error
(the message names the key, the value and why).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from daemon import __version__, cli_journal
from daemon.config import CARD_TYPES, Config, load
from daemon.configfiles import check_files
from protocol import devicekey
from protocol.errors import ConfigError, TapgateError

EXIT_FAULT = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130
MASK = "<masked>"


def _override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected section.key=value")
    try:
        parsed: Any = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip(), parsed


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be 0 or more")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tapgate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"tapgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def overrides(p: argparse.ArgumentParser) -> None:
        p.add_argument("--set", dest="overrides", action="append", type=_override, default=[],
                       metavar="SECTION.KEY=VALUE", help="override a config value")

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", "-c", type=Path, required=True, help="TOML config file")
        overrides(p)

    run = sub.add_parser("run", help="run the gate in the foreground until SIGTERM/SIGINT")
    with_config(run)

    status = sub.add_parser(
        "status", help="the daemon, its reader, alarms, pending recoveries, last taps",
        description="Exit 0 when the daemon runs and raises no alarm, 1 otherwise.")
    with_config(status)
    status.add_argument("--json", action="store_true", help="one JSON document")
    status.add_argument("-n", "--taps", type=_count, default=10, metavar="N",
                        help="how many of the last taps to show (default 10)")

    journal = sub.add_parser("journal", help="inspect the journal")
    jsub = journal.add_subparsers(dest="journal_command", required=True)
    verify = jsub.add_parser("verify", help="check the hash chain, signatures, quick_check")
    with_config(verify)
    export = jsub.add_parser("export", help="print every entry as one JSON object per line")
    with_config(export)
    export.add_argument("--after", type=_count, default=0, metavar="ID",
                        help="only the entries after this id")
    export.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress on stderr (default: when stderr is a terminal)")
    tail = jsub.add_parser("tail", help="the last entries; --follow for new ones")
    with_config(tail)
    tail.add_argument("-n", "--lines", type=_count, default=10, metavar="N",
                      help="how many entries (default 10)")
    tail.add_argument("-f", "--follow", action="store_true",
                      help="then print new entries as they come, until Ctrl-C or SIGTERM")
    tail.add_argument("--json", action="store_true", help="entries as export prints them")
    salvage = jsub.add_parser(
        "salvage", help="copy what can be read from a damaged journal into a new file",
        description="Exit 0 when every entry was copied, 1 when some were lost (the new "
                    "journal is written all the same) or nothing could be salvaged.")
    with_config(salvage)
    salvage.add_argument("--out", type=Path, required=True, metavar="NEW.db",
                         help="the new journal (must not exist)")

    keygen = sub.add_parser("keygen", help="create the device key the journal is signed with")
    with_config(keygen)
    keygen.add_argument("--force", action="store_true", help="replace an existing key")

    beacon = sub.add_parser("beacon", help="the BLE beacon: what it puts on air, who is near")
    bsub = beacon.add_subparsers(dest="beacon_command", required=True)
    show = bsub.add_parser(
        "show", help="each enabled frame's advertising payload (AD structures as BlueZ sends "
                     "them, hex) and the current EID")
    with_config(show)
    show.add_argument("--at", type=float, default=None, metavar="UNIX",
                      help="as at this unix time (default: now)")
    show.add_argument("--json", action="store_true", help="one JSON document")
    scan = bsub.add_parser("scan", help="phones near the gate advertising the operator's "
                                        "service, with RSSI and estimated distance")
    with_config(scan)
    scan.add_argument("--seconds", type=float, default=5.0, help="how long to listen")
    scan.add_argument("--json", action="store_true", help="one JSON document")
    selfcheck = bsub.add_parser(
        "selfcheck", help="listen on a second adapter for the gate's own beacon frames",
        description="Exit 0 when every frame on air now was heard, 1 otherwise. Run it "
                    "while the beacon is on air (continuous mode, or within a window).")
    with_config(selfcheck)
    selfcheck.add_argument("--adapter", required=True, help="the listening adapter (hci1)")
    selfcheck.add_argument("--seconds", type=float, default=10.0,
                           help="how long to listen for each frame")

    config = sub.add_parser("config", help="configuration")
    csub = config.add_subparsers(dest="config_command", required=True)
    check = csub.add_parser("check", help="validate a config file and print the effective "
                                          "configuration as TOML (secrets masked)")
    check.add_argument("file", type=Path)
    check.add_argument("--no-files", action="store_true",
                       help="values only: do not look at the files it names (a config "
                            "for another machine)")
    overrides(check)
    return parser


def _setup_logging(level: str) -> None:
    from daemon import logsetup

    logsetup.setup(level)


# --- config check ------------------------------------------------------------------------------
def _toml_string(text: str) -> str:
    # JSON's escapes are TOML's; DEL is the one control character JSON leaves raw
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(name: str, value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    if isinstance(value, bytes):
        return _toml_string(MASK if name.endswith("_key") else value.hex().upper())
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(name, item) for item in value) + "]"
    return _toml_string(str(value))


def _toml_key(key: object) -> str:
    text = str(key)
    return text if text.replace("_", "").replace("-", "").isalnum() and text.isascii() \
        else _toml_string(text)


def config_toml(config: Config) -> str:
    """The effective configuration as TOML that loads back to the same values (bar the
    masked secrets); unset optional values as comments."""
    card_types = {code: name for name, code in CARD_TYPES.items()}
    lines = [f"# {config.source}: valid. Effective configuration (file, TAPGATE_* "
             "environment and --set merged); secrets masked."]
    for part in dataclasses.fields(config):
        section = getattr(config, part.name)
        if not dataclasses.is_dataclass(section):
            continue
        lines += ["", f"[{part.name}]"]
        tables: list[tuple[str, Mapping[Any, Any]]] = []
        for item in dataclasses.fields(section):
            value = getattr(section, item.name)
            if isinstance(value, Mapping):
                tables.append((item.name, value))
            elif value is None or value == "":
                lines.append(f"# {item.name}: not set")
            else:
                lines.append(f"{item.name} = {_toml_value(item.name, value)}")
        for name, table in tables:
            lines += ["", f"[{part.name}.{name}]"]
            for key, value in table.items():
                label = card_types.get(key, key) if (part.name, name) == ("gate", "fares") \
                    else key
                lines.append(f"{_toml_key(label)} = {_toml_value(str(label), value)}")
    return "\n".join(lines) + "\n"


# --- keygen ------------------------------------------------------------------------------------
def _keygen(config: Config, *, force: bool) -> int:
    path = config.journal.device_key
    if path is None:
        raise ConfigError("journal.device_key", None,
                          "is not set: set journal.device_key to the key's path (e.g. "
                          '"/var/lib/tapgate/device.key") and run tapgate keygen again')
    old = None
    if force and path.exists():
        try:
            old = devicekey.public_hex(devicekey.load(path))
        except ConfigError:
            old = "unreadable"
    try:
        key = devicekey.generate(path, force=force)
    except FileExistsError as err:
        raise TapgateError(f"{path} exists and the journal is signed with it: keeping it "
                           "(tapgate keygen --force replaces it)") from err
    except OSError as err:
        raise TapgateError(f"cannot write the device key {path}: {err.strerror}") from err
    if old is not None:
        print(f"replaced the device key {path} (old public key {old})", file=sys.stderr)
    else:
        print(f"wrote the device key {path} (mode 0600); its public key:", file=sys.stderr)
    print(devicekey.public_hex(key))
    return 0


# --- main --------------------------------------------------------------------------------------
def _dispatch(args: argparse.Namespace, config: Config) -> int:
    if args.command == "run":
        from daemon.service import run

        return run(config)
    if args.command == "status":
        from daemon.cli_status import status

        return status(config, taps=args.taps, as_json=args.json)
    if args.command == "keygen":
        return _keygen(config, force=args.force)
    if args.command == "beacon":
        from daemon import cli_beacon

        if args.beacon_command == "show":
            return cli_beacon.show(config, at=args.at, as_json=args.json)
        if args.beacon_command == "selfcheck":
            return cli_beacon.selfcheck(config, adapter=args.adapter, seconds=args.seconds)
        return cli_beacon.scan(config, seconds=args.seconds, as_json=args.json)
    command = args.journal_command
    if command == "verify":
        return cli_journal.verify(config)
    if command == "export":
        return cli_journal.export(config, after=args.after, progress=args.progress)
    if command == "tail":
        return cli_journal.tail(config, n=args.lines, follow=args.follow, as_json=args.json)
    return cli_journal.salvage(config, args.out)


def _quiet_stdout() -> None:
    """stdout's reader went away (`| head`): send what Python still flushes nowhere."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "config":
            config = load(args.file, overrides=dict(args.overrides))
            if not args.no_files:
                check_files(config)
            sys.stdout.write(config_toml(config))
            return 0
        config = load(args.config, overrides=dict(args.overrides))
    except ConfigError as err:
        print(f"tapgate: {err}", file=sys.stderr)
        return EXIT_CONFIG
    _setup_logging(config.log.level)
    try:
        return _dispatch(args, config)
    except ConfigError as err:
        print(f"tapgate: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except TapgateError as err:
        print(f"tapgate: {err}", file=sys.stderr)
        return EXIT_FAULT
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except OSError as err:
        print(f"tapgate: {err}", file=sys.stderr)
        return EXIT_FAULT
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
