"""The desired state, in the style of the AWS IoT shadow.

An operator publishes, retained, on ``tapgate/v1/<gate>/desired`` a signed command named
``desired`` whose args are ``{"version": N, "config": {<what set_config takes>}}``. The
gate checks it as it checks a command (key, signature, target = this gate, expiry) but
for the replay rule: instead, N must be above the version it runs. It applies the config
values (kept in the journal with the version, in one transaction) and publishes,
retained, on ``tapgate/v1/<gate>/reported``:

    {"version": N}                                        what the gate runs
    {"version": N, "refused": {"version": M, "reason": ...}}   a desired state it refused

The broker hands the retained desired state over at every (re)connection: the version
the gate already runs is simply reported again. Its content is known by a digest of its
args, kept in the journal with the version: a desired state that gives the running
version other content is refused (a change needs a new version), never taken as applied.
A journal from before digests were kept takes the first one it is handed for its version.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any

from daemon.journal import Journal
from daemon.sync.handlers import GateControl, config_changes
from protocol import contract
from protocol.command import Incoming, Refused, Verifier, bad_args
from protocol.errors import JournalError

log = logging.getLogger("tapgate.commands")

NAME = "desired"


class Desired:
    def __init__(self, *, gate_id: str, verifier: Verifier, journal: Journal,
                 control: GateControl, publish: Callable[..., bool]) -> None:
        self.gate_id = gate_id
        self._verifier = verifier
        self._journal = journal
        self._control = control
        self._publish = publish
        self._topic = contract.reported_topic(gate_id)
        control.desired_version = journal.desired_version()

    def handle(self, incoming: Incoming) -> dict[str, Any]:
        """Apply (or refuse) one desired state; returns what was reported."""
        if not incoming.payload:  # the retained desired state was cleared
            return self.report()
        wanted: int | None = None
        try:
            cmd = self._verifier.verify(incoming)
            if cmd.body.name != NAME:
                raise Refused(f"a desired state is named {NAME!r}, not {cmd.body.name!r}")
            args = cmd.body.args
            version = args.get("version")
            if isinstance(version, bool) or not isinstance(version, int) or version < 1:
                raise bad_args("version must be a whole number >= 1")
            wanted = version
            config = args.get("config", {})
            if not isinstance(config, dict) or set(args) - {"version", "config"}:
                raise bad_args("args are {version, config: {...}}")
            self._apply(version, config, hashlib.sha256(contract.canonical(args)).hexdigest())
        except Refused as refusal:
            log.warning("desired state %s refused: %s", wanted, refusal.reason)
            return self.report({"version": wanted, "reason": refusal.reason})
        return self.report()

    def _apply(self, version: int, config: dict[str, Any], digest: str) -> None:
        try:
            with self._journal.control() as state:
                running = state.desired_version()
                if version == running:
                    applied = state.desired_digest()
                    if applied is None:
                        state.set_desired_digest(digest)
                    elif applied != digest:
                        raise Refused(f"version {version} is running with other content; "
                                      "a change needs a new version")
                    return  # handed over again on a reconnection
                if version < running:
                    raise Refused(f"version {version} is older than the version running "
                                  f"({running})")
                new = config_changes(config, self._control.config) if config else None
                if new is not None:
                    state.set_remote_config(config)
                state.set_desired_version(version)
                state.set_desired_digest(digest)
        except JournalError as err:
            raise Refused(f"journal error: {err}") from err
        if new is not None:
            self._control.apply_config(new)
        self._control.desired_version = version
        log.info("desired state %d applied: %s", version, config)

    def report(self, refused: dict[str, Any] | None = None) -> dict[str, Any]:
        reported: dict[str, Any] = {"version": self._control.desired_version}
        if refused is not None:
            reported["refused"] = refused
        if not self._publish(self._topic, contract.canonical(reported), retain=True):
            log.warning("reported state not sent: no connection to the broker")
        return reported
