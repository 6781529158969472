"""What each operator command does on the gate: the dispatch table.

A handler runs inside the command's journal transaction (the one that recorded its
sequence number), checks its arguments, writes the durable state it changes through the
:class:`Control` it is given, and returns what to do once that is committed (change the
in-memory state the card loop reads, open the gate, collect the status): a function
that returns the answer's ``result``. Raising :class:`Refused` undoes what it wrote.

    set_config      {"gate.fares.<type>": n, "gate.anti_passback_s": s,
                     "gate.recovery_window_s": s}: validated as the config file is,
                     kept in the journal, re-applied at every start, from the next tap on
    denylist        {from_version, to_version, add: [serial hex], remove: [...]}: applied
                     all at once, only onto from_version (else refused with the version)
    sync_now        look at the journal for entries to send now
    report_status   the status telemetry, now
    open_gate       open for one passage
    trigger_beacon  {window_s?}: the BLE beacon on air for a window (GateControl.beacon)

Another issue adds a command by adding to :data:`HANDLERS`, or a gate adds one of its own
through ``GateControl.handlers``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from daemon.config import GateConfig, gate_with
from daemon.journal import Journal
from daemon.journal.store import Control
from daemon.tap import TapProcessor
from protocol.command import Refused, bad_args
from protocol.errors import ConfigError

log = logging.getLogger("tapgate.commands")

SERIAL_RE = re.compile(r"[0-9A-Fa-f]{16}")  # a TGP1 card serial: 8 bytes


Result = dict[str, Any]
Handler = Callable[["GateControl", Mapping[str, Any], Control], Callable[[], Result]]


@dataclass
class GateControl:
    """What commands may touch on a gate, and nothing else."""

    processor: TapProcessor
    config: GateConfig  # in force now: the file's, with what operators changed
    telemetry: Callable[[], Result]
    sync_now: Callable[[], Result] | None = None  # None: no uplink
    open_gate: Callable[[], None] | None = None
    beacon: Callable[[Mapping[str, Any]], Result] | None = None  # the BLE issue's hook
    handlers: dict[str, Handler] = field(default_factory=dict)  # a gate's own commands
    desired_version: int = 0

    def apply_config(self, config: GateConfig) -> None:
        """From the next tap on (after the journal has it)."""
        self.config = config
        self.processor.set_config(config)

    def status(self) -> Result:
        """The status telemetry with what operators changed: the status command's
        answer, and the retained status's telemetry (the uplink adds its own)."""
        return {**self.telemetry(), "remote": self.state()}

    def state(self) -> Result:
        """What operators changed, as the status reports it."""
        fares = {str(k): v for k, v in sorted(self.config.fares.items())}
        return {"deny_list": {"version": self.processor.deny_list.version,
                              "size": len(self.processor.deny_list)},
                "desired_version": self.desired_version,
                "config": {"fares": fares, "anti_passback_s": self.config.anti_passback_s,
                           "recovery_window_s": self.config.recovery_window_s}}


def effective_config(base: GateConfig, journal: Journal) -> GateConfig:
    """The file's gate config with the values operators set (kept in the journal); a
    value today's rules refuse is left out, loudly, rather than stop the gate."""
    config = base
    for key, value in journal.remote_config().items():
        try:
            config = gate_with(config, {key: value})
        except ConfigError as err:
            log.error("a remotely set value is not applied: %s", err)
    return config


def config_changes(args: Mapping[str, Any], current: GateConfig) -> GateConfig:
    if not args:
        raise bad_args("no values to set")
    try:
        return gate_with(current, args)
    except ConfigError as err:
        raise bad_args(f"{err.key} = {err.value!r}: {err.why}") from err


def set_config(gate: GateControl, args: Mapping[str, Any], state: Control
               ) -> Callable[[], Result]:
    new = config_changes(args, gate.config)
    state.set_remote_config(dict(args))

    def apply() -> Result:
        gate.apply_config(new)
        log.info("config set remotely: %s", ", ".join(f"{k} = {v}" for k, v in args.items()))
        return {"set": dict(args)}

    return apply


def _serials(args: Mapping[str, Any], key: str) -> list[bytes]:
    value = args.get(key, [])
    if not isinstance(value, list) or not all(
            isinstance(s, str) and SERIAL_RE.fullmatch(s) for s in value):
        raise bad_args(f"{key} must be a list of card serials (16 hex digits each)")
    return [bytes.fromhex(s) for s in value]


def _version(args: Mapping[str, Any], key: str) -> int:
    value = args.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise bad_args(f"{key} must be a whole number >= 0")
    return value


def denylist(gate: GateControl, args: Mapping[str, Any], state: Control
             ) -> Callable[[], Result]:
    unknown = sorted(set(args) - {"from_version", "to_version", "add", "remove"})
    if unknown:
        raise bad_args(f"unknown argument {unknown[0]}")
    start, end = _version(args, "from_version"), _version(args, "to_version")
    add, remove = _serials(args, "add"), _serials(args, "remove")
    if end <= start:
        raise bad_args("to_version must be above from_version")
    if set(add) & set(remove):
        raise bad_args("a serial is both added and removed")
    current = state.deny_version()
    if start != current:
        raise Refused("deny list version mismatch", result={"version": current})
    state.change_deny_list(end, add, remove)
    deny = gate.processor.deny_list

    def apply() -> Result:
        # what the journal now holds; the set is swapped whole, under the list's lock
        serials = (deny.serials | set(add)) - set(remove)
        deny.replace(end, serials)
        log.info("deny list %d -> %d: %d added, %d removed, %d cards", start, end, len(add),
                 len(remove), len(serials))
        return {"version": end, "size": len(serials)}

    return apply


def sync_now(gate: GateControl, args: Mapping[str, Any], state: Control
             ) -> Callable[[], Result]:
    if gate.sync_now is None:
        raise Refused("no uplink")
    wake = gate.sync_now
    return lambda: wake()


def report_status(gate: GateControl, args: Mapping[str, Any], state: Control
                  ) -> Callable[[], Result]:
    return gate.status


def open_gate(gate: GateControl, args: Mapping[str, Any], state: Control
              ) -> Callable[[], Result]:
    if gate.open_gate is None:
        raise Refused("no gate I/O")
    opener = gate.open_gate

    def apply() -> Result:
        opener()
        log.info("gate opened for one passage by an operator")
        return {"opened": True}

    return apply


def trigger_beacon(gate: GateControl, args: Mapping[str, Any], state: Control
                   ) -> Callable[[], Result]:
    if gate.beacon is None:
        raise Refused("no beacon configured")
    unknown = sorted(set(args) - {"window_s"})
    if unknown:
        raise bad_args(f"unknown argument {unknown[0]!r}; trigger_beacon takes window_s")
    window = args.get("window_s")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or not 1 <= window <= 3600):
        raise bad_args("window_s must be a whole number of seconds, 1..3600")
    beacon = gate.beacon

    def apply() -> Result:
        result = beacon(args)
        if not result.get("accepted", True):
            raise Refused(str(result.get("reason", "the beacon refused the trigger")))
        return result

    return apply


HANDLERS: dict[str, Handler] = {
    "set_config": set_config,
    "denylist": denylist,
    "sync_now": sync_now,
    "report_status": report_status,
    "open_gate": open_gate,
    "trigger_beacon": trigger_beacon,
}
