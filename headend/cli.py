"""`tapgate-headend`: the reference back office of a tapgate fleet.

    run       store every gate's journal entries once, check them, acknowledge them;
              keep every gate's info for the beacon directory
    command   sign a command for a gate (or the fleet), send it, print the answer
    keygen    a new operator key for commands
    db-keygen a new database key (it seals the EID identity keys kept in the database)
    export    the stored entries as JSON lines, in (gate, id) order
    gates     each gate's chain state as JSON lines
    beacon    the beacon directory: register a gate's EID key, resolve what a phone
              heard (advertising data, hex) to its gate, list the gates

Exit status: 0 done, 1 a fault (no answer, database or broker trouble; for `beacon
resolve`, no gate has that identifier), 2 a bad argument or key file, 3 the gate refused
the command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from headend import __version__, command, keys, sealed
from headend.mqtt import Broker, check_topic_level, parse_broker
from protocol import contract
from protocol.errors import ConfigError, TapgateError

log = logging.getLogger("tapgate.headend")

EXIT_FAULT = 1
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tapgate-headend", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"tapgate-headend {__version__}")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    def with_broker(p: argparse.ArgumentParser) -> None:
        p.add_argument("--broker", required=True, metavar="HOST:PORT")
        p.add_argument("--tls-ca", type=Path, help="CA certificate(s) to check the broker with")
        p.add_argument("--tls-cert", type=Path, help="client certificate (PEM)")
        p.add_argument("--tls-key", type=Path, help="client certificate's key (PEM)")

    def with_db_key(p: argparse.ArgumentParser) -> None:
        p.add_argument("--db-key-file", type=Path, metavar="FILE",
                       help="the database key (64 hex digits, mode 0600; db-keygen makes "
                            f"one) that seals the EID identity keys; default: ${sealed.ENV}")

    run = sub.add_parser("run", help="consume the gates' batches until SIGTERM/SIGINT")
    with_broker(run)
    run.add_argument("--db", required=True, metavar="URL",
                     help="sqlite:///path (default engine) or postgresql://user@host/db")
    run.add_argument("--tac-key-file", type=Path,
                     help="the back office's K_master_tac (32 hex digits, mode 0600); "
                          "without it TACs are not checked")
    run.add_argument("--gate-keys", type=Path,
                     help="gate id -> device public key (hex), TOML or JSON; without a "
                          "gate's key its signatures are not checked")
    run.add_argument("--client-id", help="MQTT client id (default: tapgate-headend-HOST-PID)")
    with_db_key(run)
    # TEST HOOK ONLY: SIGKILL the process after committing its N-th batch, before acking it.
    run.add_argument("--test-crash-after-store", type=int, metavar="N", help=argparse.SUPPRESS)

    cmd = sub.add_parser("command", help="sign and send a command, print the answer")
    cmd.add_argument("target", metavar="GATE|fleet")
    cmd.add_argument("name")
    cmd.add_argument("args", nargs="*", metavar="KEY=VALUE",
                     help="arguments; a value that parses as JSON is JSON, else a string")
    with_broker(cmd)
    cmd.add_argument("--key-file", type=Path, required=True,
                     help="the operator's Ed25519 private key (PEM, mode 0600)")
    cmd.add_argument("--key-id", help="the key id the gates know (default: derived from "
                                      "the key, as keygen prints it)")
    cmd.add_argument("--ttl", type=int, default=60, help="seconds until the command expires")
    cmd.add_argument("--seq", type=int, help="sequence number (default: the last one + 1)")
    cmd.add_argument("--timeout", type=float, default=10.0,
                     help="seconds to wait for the answer (all answers, for the fleet)")
    cmd.add_argument("--retries", type=int, default=2,
                     help="times a gate's command is sent again, same seq, when no answer "
                          "came (the gate applies it once and answers again)")

    keygen = sub.add_parser("keygen", help="write a new operator key, print its id")
    keygen.add_argument("--out", type=Path, required=True)
    keygen.add_argument("--force", action="store_true", help="replace an existing file")

    db_keygen = sub.add_parser("db-keygen", help="write a new database key (mode 0600)")
    db_keygen.add_argument("--out", type=Path, required=True)
    db_keygen.add_argument("--force", action="store_true", help="replace an existing file")

    export = sub.add_parser("export", help="the stored entries as JSON lines")
    export.add_argument("--db", required=True, metavar="URL")
    export.add_argument("--gate", help="only this gate's entries")
    export.add_argument("--rejected", action="store_true",
                        help="the messages and entries kept aside instead")

    gates = sub.add_parser("gates", help="each gate's chain state as JSON lines")
    gates.add_argument("--db", required=True, metavar="URL")

    beacon = sub.add_parser("beacon", help="the beacon directory (EID keys, resolving)")
    bsub = beacon.add_subparsers(dest="beacon_command", required=True)
    register = bsub.add_parser("register", help="register (or replace) a gate's EID "
                                                "identity key")
    register.add_argument("--db", required=True, metavar="URL")
    with_db_key(register)
    register.add_argument("--gate", required=True)
    key = register.add_mutually_exclusive_group(required=True)
    key.add_argument("--key", metavar="HEX", help="the identity key, 32 hex digits (a "
                                                  "command line is visible: prefer --key-file)")
    key.add_argument("--key-file", type=Path, help="the key as 32 hex digits, mode 0600")
    register.add_argument("--exponent", type=int, required=True, metavar="K",
                          help="the EID changes every 2**K seconds (0..15), as on the gate")
    register.add_argument("--epoch", type=int, required=True, metavar="UNIX",
                          help="unix time the gate's EID counter starts from")
    resolve = bsub.add_parser("resolve", help="the gate whose beacon sent these advertising "
                                              "data; exit 1 if none")
    resolve.add_argument("data", metavar="HEX", help="the advertising data a phone saw")
    resolve.add_argument("--db", required=True, metavar="URL")
    with_db_key(resolve)
    resolve.add_argument("--at", type=float, metavar="UNIX",
                         help="when the phone saw it (default: now); matters for EIDs")
    listing = bsub.add_parser("list", help="the gates of the directory as JSON lines")
    listing.add_argument("--db", required=True, metavar="URL")
    with_db_key(listing)
    return parser


def _broker(args: argparse.Namespace) -> Broker:
    return parse_broker(args.broker, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                        tls_key=args.tls_key)


def _run(args: argparse.Namespace) -> int:
    from headend.beacons import BeaconDirectory
    from headend.consumer import Consumer
    from headend.store import Store
    from headend.verify import Verifier

    broker = _broker(args)
    # Keys first: a head-end that cannot check what it stores must not start storing.
    tac_key = keys.load_tac_master_key(args.tac_key_file) if args.tac_key_file else None
    gate_keys = keys.load_gate_keys(args.gate_keys) if args.gate_keys else {}
    sealer = sealed.from_option(args.db_key_file)
    if not gate_keys:
        log.warning("no --gate-keys: the gates' entries cannot be told from copies others "
                    "publish on their topics (the first copy of each is taken)")
    if tac_key is None:
        log.warning("no --tac-key-file: TACs are stored unchecked")
    client_id = args.client_id or f"tapgate-headend-{socket.gethostname()}-{os.getpid()}"
    if args.test_crash_after_store is not None:
        log.warning("TEST HOOK: this head-end SIGKILLs itself after storing batch %d",
                    args.test_crash_after_store)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with Store(args.db) as store:
        consumer = Consumer(store=store, verifier=Verifier(tac_master_key=tac_key,
                                                           gate_keys=gate_keys),
                            broker=broker, client_id=client_id,
                            directory=BeaconDirectory(store.db, sealer=sealer),
                            crash_after_store=args.test_crash_after_store)
        log.info("head-end %s: %s, %d gate keys, storing into %s", client_id, broker,
                 len(gate_keys), args.db)
        consumer.run(stop)
    return 0


def _command(args: argparse.Namespace) -> int:
    target = args.target if args.target == contract.FLEET else check_topic_level(
        "gate", args.target)
    if args.ttl <= 0 or args.timeout <= 0:
        raise ConfigError("--ttl/--timeout", f"{args.ttl}/{args.timeout}", "must be positive")
    if args.retries < 0:
        raise ConfigError("--retries", str(args.retries), "must be 0 or more")
    broker = _broker(args)
    key = keys.load_operator_key(args.key_file)
    request = command.Request(target=target, name=args.name,
                              args=command.parse_args(args.args),
                              seq=command.next_seq(command.state_dir(), args.seq),
                              ttl_s=args.ttl, timeout_s=args.timeout, retries=args.retries)
    return command.send(broker, key, args.key_id or keys.key_id(key), request, sys.stdout)


def _keygen(args: argparse.Namespace) -> int:
    key = keys.generate_operator_key(args.out, force=args.force)
    print(json.dumps({"key_id": keys.key_id(key),
                      "public_key": keys.public_raw(key).hex().upper(),
                      "file": str(args.out)}))
    return 0


def _db_keygen(args: argparse.Namespace) -> int:
    sealed.generate(args.out, force=args.force)
    print(json.dumps({"file": str(args.out)}))
    return 0


def _export(args: argparse.Namespace) -> int:
    from headend.store import Store

    out = sys.stdout
    with Store(args.db) as store:
        rows = store.export_rejected() if args.rejected else store.export(args.gate)
        for row in rows:
            out.write(json.dumps(row, separators=(",", ":")) + "\n")
    return 0


def _gates(args: argparse.Namespace) -> int:
    from headend.store import Store

    with Store(args.db) as store:
        for row in store.gates():
            print(json.dumps(row, separators=(",", ":")))
    return 0


def _beacon(args: argparse.Namespace) -> int:
    from headend.beacons import BeaconDirectory, NotAnIdentity

    with BeaconDirectory(args.db, sealer=sealed.from_option(args.db_key_file)) as directory:
        if args.beacon_command == "register":
            gate = check_topic_level("--gate", args.gate)
            if args.key_file is not None:
                option, text = "--key-file", keys.read_secret("--key-file", args.key_file)
            else:
                option, text = "--key", args.key.encode()
            try:
                key = bytes.fromhex(text.decode("ascii").strip())
                directory.register_eid(gate, key, args.exponent, args.epoch)
            except (UnicodeDecodeError, ValueError) as err:
                raise ConfigError(option, str(args.key_file or "(key)"), str(err)) from err
            print(json.dumps({"gate": gate, "exponent": args.exponent, "epoch": args.epoch,
                              "registered": True}))
            return 0
        if args.beacon_command == "resolve":
            try:
                data = bytes.fromhex("".join(c for c in args.data if c not in ": -_"))
                found = directory.resolve(data, args.at)
            except NotAnIdentity as err:
                raise ConfigError("advertising data", args.data, str(err)) from err
            except ValueError as err:
                raise ConfigError("advertising data", args.data, "is not hex") from err
            if found is None:
                print("tapgate-headend: no gate has that identifier", file=sys.stderr)
                return EXIT_FAULT
            print(json.dumps(found.to_json(), sort_keys=True))
            return 0
        for row in directory.gates():
            print(json.dumps(row, separators=(",", ":")))
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    handlers = {"run": _run, "command": _command, "keygen": _keygen, "db-keygen": _db_keygen,
                "export": _export, "gates": _gates, "beacon": _beacon}
    try:
        return handlers[args.command](args)
    except ConfigError as err:
        print(f"tapgate-headend: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except TapgateError as err:
        print(f"tapgate-headend: {err}", file=sys.stderr)
        return EXIT_FAULT
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
