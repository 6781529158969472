"""Operators' signed commands, on the gate: verified, applied at most once, answered.

A command comes on ``tapgate/v1/<gate>/cmd`` or ``tapgate/v1/fleet/cmd`` (the desired
state on ``.../desired``, see daemon.sync.desired) as a :class:`contract.SignedCommand`.
It is verified by :class:`protocol.command.Verifier` (size, shape, key, signature,
target, expiry: the refusal reasons are listed there); here it is then refused when it
is:

    replayed         its seq is not above the highest applied from that key (result:
                     last_seq); the highest is kept in the journal, so restarts keep it
    unknown command  (result: known, the names this gate knows)
    bad args: ...    see daemon.sync.handlers; and each command's own refusals

The check of the sequence number and its record are one transaction under the
journal's writer lock, together with whatever durable state the command changes. A
command that passed every check up to the replay one uses its sequence number up even
if it is then refused (bad args, a stale deny-list version): sent again later, when
the state may have changed, it is a replay. A name this gate does not know is refused
before that, and uses nothing up.

The answer (:class:`contract.Reply`) goes with the Correlation Data to the MQTT v5
Response Topic when that is one level under ``tapgate/v1/<this gate>/reply/``. A fleet
command's (one level under ``tapgate/v1/fleet/reply/``) is answered under this gate's
own reply topic, with the same last level: a topic only this gate may write, so the
operator knows which gate answered (a shared fleet topic would let any gate answer in
the others' names). Any other Response Topic gets no answer; the refusal is only logged.

paho's thread only queues what comes (:meth:`Commands.submit`); :meth:`Commands.run`,
a thread of its own, verifies and applies, so a command that waits (open the gate)
holds up neither the sync nor paho's network loop.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from daemon.config import OperatorsConfig
from daemon.journal import Journal
from daemon.sync.desired import Desired
from daemon.sync.handlers import HANDLERS, GateControl
from protocol import contract
from protocol.command import REPLAYED, UNKNOWN_COMMAND, Incoming, Refused, Verifier
from protocol.errors import JournalError

__all__ = ["Commands"]

log = logging.getLogger("tapgate.commands")

QUEUE_MAX = 64  # commands waiting; beyond this, what comes is dropped (and logged)


@dataclass
class CommandStats:
    applied: int = 0
    refused: int = 0
    dropped: int = 0  # the queue was full
    last_refusal: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"applied": self.applied, "refused": self.refused, "dropped": self.dropped,
                "last_refusal": self.last_refusal}


Publish = Callable[..., bool]  # (topic, payload, *, retain=..., correlation=...) -> sent


class Commands:
    """Verifies, applies and answers what operators send; one thread (:meth:`run`)."""

    def __init__(self, *, gate_id: str, operators: OperatorsConfig, journal: Journal,
                 control: GateControl, publish: Publish, stats: CommandStats | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.gate_id = gate_id
        self.control = control
        self.verifier = Verifier(gate_id=gate_id, keys=operators.keys,
                                 clock_skew_s=operators.clock_skew_s, clock=clock)
        self._journal = journal
        self._publish = publish
        self._queue: queue.Queue[Incoming] = queue.Queue(QUEUE_MAX)
        self._desired_topic = contract.desired_topic(gate_id)
        self.desired = Desired(gate_id=gate_id, verifier=self.verifier, journal=journal,
                               control=control, publish=publish)
        self.stats = stats if stats is not None else CommandStats()  # the health reads it

    def submit(self, incoming: Incoming) -> None:
        """From paho's thread: queue, never wait."""
        try:
            self._queue.put_nowait(incoming)
        except queue.Full:
            self.stats.dropped += 1
            log.warning("command queue full: a message on %s was dropped", incoming.topic)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                incoming = self._queue.get(timeout=0.25)
            except queue.Empty:
                continue
            try:
                self.handle(incoming)
            except Exception:  # one bad command must not end the thread
                log.exception("handling a command from %s", incoming.topic)

    def handle(self, incoming: Incoming) -> contract.Reply | None:
        """Verify, apply and answer one message; returns the answer (None: desired)."""
        if incoming.topic == self._desired_topic:
            self.desired.handle(incoming)
            return None
        name = "?"
        try:
            cmd = self.verifier.verify(incoming)
            name = cmd.body.name
            result = self._apply(cmd)
            reply = contract.Reply(self.gate_id, cmd.body.seq, True, "", result)
            self.stats.applied += 1
            log.info("command %s seq %d (key %s): done", name, cmd.body.seq, cmd.key_id)
        except Refused as refusal:
            reply = contract.Reply(self.gate_id, refusal.seq, False, refusal.reason,
                                   refusal.result)
            self.stats.refused += 1
            self.stats.last_refusal = refusal.reason
            log.warning("command %s on %s refused: %s %s", name, incoming.topic,
                        refusal.reason, json.dumps(refusal.result, sort_keys=True))
        self._answer(incoming, reply)
        return reply

    def _apply(self, cmd: contract.SignedCommand) -> dict[str, Any]:
        body = cmd.body
        refusal: Refused | None = None
        handler = self.control.handlers.get(body.name) or HANDLERS.get(body.name)
        if handler is None:  # refused before its seq is claimed: nothing of it was applied
            known = sorted({*HANDLERS, *self.control.handlers})
            raise Refused(UNKNOWN_COMMAND, body.seq, {"known": known})
        try:
            with self._journal.control() as state:
                last = state.claim_seq(cmd.key_id.upper(), body.seq)
                if last is not None:
                    raise Refused(REPLAYED, body.seq, {"last_seq": last})
                try:
                    with state.savepoint():  # what a refused handler wrote is undone
                        after = handler(self.control, body.args, state)
                except Refused as err:  # the seq stays used: see the module's docstring
                    err.seq = body.seq
                    refusal = err
        except JournalError as err:
            raise Refused(f"journal error: {err}", body.seq) from err
        if refusal is not None:
            raise refusal
        try:
            return after()
        except Exception as err:  # recorded and committed, but it did not work out
            log.exception("command %s seq %d failed", body.name, body.seq)
            raise Refused(f"failed: {err}", body.seq) from err

    def _answer(self, incoming: Incoming, reply: contract.Reply) -> None:
        topic = incoming.response_topic
        if not topic:
            return
        answer = self.verifier.answer_topic(topic)
        if answer is None:
            log.warning("no answer sent to %r: not under this gate's or the fleet's reply "
                        "topic", topic[:200])
            return
        if not self._publish(answer, reply.encode(), correlation=incoming.correlation):
            log.warning("answer to seq %s not sent: no connection to the broker", reply.seq)
