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
journal's writer lock, together with whatever durable state the command changes and the
answer it gets. A command that passed every check up to the replay one uses its sequence
number up even if it is then refused (bad args, a stale deny-list version). A name this
gate does not know is refused before that, and uses nothing up.

The same command sent again with the same seq (the operator's tool had no answer and
retries) is not applied again: it is told the answer it got the first time, kept in the
journal with its seq (the newest ANSWERS_KEPT per key; the answer of a command whose
effect was still under way when the gate stopped says so). Any other seq at or below the
highest applied, or another command under a used seq, is "replayed".

The answer (:class:`contract.Reply`) goes with the Correlation Data to the MQTT v5
Response Topic when that is one level under ``tapgate/v1/<this gate>/reply/``. A fleet
command's (one level under ``tapgate/v1/fleet/reply/``) is answered under this gate's
own reply topic, with the same last level: a topic only this gate may write, so the
operator knows which gate answered (a shared fleet topic would let any gate answer in
the others' names). Any other Response Topic gets no answer; the refusal is only logged.

paho's thread checks what comes at once (:meth:`Commands.submit`: size, shape, key,
signature, target, expiry; no journal, no waiting) and queues it by what it is, so that
a flood of invalid messages never crowds out a valid command:

    new        verified, its seq above the highest applied from its key (only an
               operator's key makes these): QUEUE_MAX, taken first
    again      verified, its seq already used (a retry, or a captured command replayed):
               AGAIN_MAX per key, one copy per seq
    refused    everything else, waiting only for its answer: the newest REFUSALS_MAX,
               taken last; under a flood the oldest go unanswered (counted, logged)

:meth:`Commands.run`, a thread of its own, applies and answers, so a command that waits
(open the gate; an answer waiting for a slot on the connection) holds up neither the
sync nor paho's network loop.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
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

QUEUE_MAX = 64  # new verified commands waiting; beyond this one is dropped (and logged)
AGAIN_MAX = 8  # per key: verified commands under a used seq waiting
REFUSALS_MAX = 64  # refused messages waiting for their answer; the oldest goes first
WAIT_S = 0.25  # the thread looks at its stop event at least this often
# what a command's kept answer says until its effect is done and its own answer is kept
UNCONFIRMED = {"unconfirmed": "applied; the gate stopped before it said how it went"}


@dataclass
class CommandStats:
    applied: int = 0
    refused: int = 0
    dropped: int = 0  # valid commands dropped: the queue was full
    unanswered: int = 0  # refused messages left unanswered (a flood)
    answered_again: int = 0  # a used seq told the answer it got
    last_refusal: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"applied": self.applied, "refused": self.refused, "dropped": self.dropped,
                "unanswered": self.unanswered, "answered_again": self.answered_again,
                "last_refusal": self.last_refusal}


Publish = Callable[..., bool]  # (topic, payload, *, retain=..., correlation=...) -> sent


@dataclass(frozen=True, slots=True)
class Checked:
    """A message as :meth:`Commands.check` found it: verified, or refused."""

    incoming: Incoming
    cmd: contract.SignedCommand | None
    refusal: Refused | None = None


def digest(body: contract.CommandBody) -> bytes:
    """What makes a command the same command under its seq (its times aside: a tool may
    sign a retry anew)."""
    return hashlib.sha256(contract.canonical(
        {"target": body.target, "name": body.name, "args": body.args})).digest()


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
        self._desired_topic = contract.desired_topic(gate_id)
        self.desired = Desired(gate_id=gate_id, verifier=self.verifier, journal=journal,
                               control=control, publish=publish)
        self.stats = stats if stats is not None else CommandStats()  # the health reads it
        self._ready = threading.Condition()
        self._new: collections.deque[Checked] = collections.deque()
        self._again: dict[str, collections.deque[Checked]] = {}
        self._refused: collections.deque[Checked] = collections.deque()
        self._waiting: set[tuple[str, int]] = set()  # (key, seq) of what is queued
        # the highest seq applied per key, as the journal has it: new or again, at once
        self._last = {key: journal.last_command_seq(key) for key in operators.keys}

    # -- paho's thread ---------------------------------------------------------------------
    def check(self, incoming: Incoming) -> Checked:
        """Everything but the journal: cheap enough for every message that comes."""
        try:
            return Checked(incoming, self.verifier.verify(incoming))
        except Refused as refusal:
            return Checked(incoming, None, refusal)

    def submit(self, incoming: Incoming) -> None:
        """From paho's thread: check and queue, never wait."""
        self.queue(self.check(incoming))

    def queue(self, checked: Checked) -> None:
        with self._ready:
            cmd = checked.cmd
            if cmd is None:
                if len(self._refused) >= REFUSALS_MAX:
                    self._refused.popleft()
                    self._unanswered()
                self._refused.append(checked)
            else:
                key = cmd.key_id.upper()
                waiting = (key, cmd.body.seq)
                last = self._last.get(key)
                if checked.incoming.topic == self._desired_topic or last is None or (
                        cmd.body.seq > last):
                    lane, most = self._new, QUEUE_MAX
                else:
                    lane, most = self._again.setdefault(key, collections.deque()), AGAIN_MAX
                if waiting in self._waiting or len(lane) >= most:
                    self._drop(checked, lane is self._new)
                    return
                self._waiting.add(waiting)
                lane.append(checked)
            self._ready.notify()

    def _drop(self, checked: Checked, new: bool) -> None:
        assert checked.cmd is not None
        if new:
            self.stats.dropped += 1
            log.warning("command queue full: %s seq %d on %s was dropped",
                        checked.cmd.body.name, checked.cmd.body.seq, checked.incoming.topic)
        else:  # a copy of it is waiting already, or a flood of used seqs from one key
            self._unanswered()

    def _unanswered(self) -> None:
        self.stats.unanswered += 1
        if self.stats.unanswered in (1, 10) or self.stats.unanswered % 1000 == 0:
            log.warning("%d messages on the command topics left unanswered: more came "
                        "than the gate answers (invalid ones, or seqs used already)",
                        self.stats.unanswered)

    def _take(self) -> Checked | None:
        """The next to handle, valid new commands first (under the lock)."""
        lanes = [self._new, *self._again.values(), self._refused]
        for lane in lanes:
            if lane:
                checked = lane.popleft()
                if checked.cmd is not None:
                    self._waiting.discard((checked.cmd.key_id.upper(), checked.cmd.body.seq))
                return checked
        return None

    # -- the commands' thread --------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            with self._ready:
                checked = self._take()
                if checked is None:
                    self._ready.wait(WAIT_S)
                    continue
            try:
                self.process(checked)
            except Exception:  # one bad command must not end the thread
                log.exception("handling a command from %s", checked.incoming.topic)

    def handle(self, incoming: Incoming) -> contract.Reply | None:
        """Verify, apply and answer one message; returns the answer (None: desired)."""
        return self.process(self.check(incoming))

    def process(self, checked: Checked) -> contract.Reply | None:
        """Apply (or refuse) and answer one checked message."""
        incoming = checked.incoming
        if incoming.topic == self._desired_topic:  # it verifies and reports on its own
            self.desired.handle(incoming)
            return None
        name = checked.cmd.body.name if checked.cmd is not None else "?"
        try:
            if checked.cmd is None:
                assert checked.refusal is not None
                raise checked.refusal
            reply = self._apply(checked.cmd)
        except Refused as refusal:
            reply = self._refusal(refusal)
            self.stats.refused += 1
            self.stats.last_refusal = refusal.reason
            log.warning("command %s on %s refused: %s %s", name, incoming.topic,
                        refusal.reason, json.dumps(refusal.result, sort_keys=True))
        self._answer(incoming, reply)
        return reply

    def _refusal(self, refusal: Refused) -> contract.Reply:
        return contract.Reply(self.gate_id, refusal.seq, False, refusal.reason,
                              refusal.result)

    def _apply(self, cmd: contract.SignedCommand) -> contract.Reply:
        body, key = cmd.body, cmd.key_id.upper()
        handler = self.control.handlers.get(body.name) or HANDLERS.get(body.name)
        if handler is None:  # refused before its seq is claimed: nothing of it was applied
            known = sorted({*HANDLERS, *self.control.handlers})
            raise Refused(UNKNOWN_COMMAND, body.seq, {"known": known})
        same = digest(body)
        refusal: Refused | None = None
        try:
            with self._journal.control() as state:
                used = state.claim_seq(key, body.seq, same)
                if used is None:
                    try:
                        with state.savepoint():  # what a refused handler wrote is undone
                            after = handler(self.control, body.args, state)
                    except Refused as err:  # the seq stays used: see the module's docstring
                        err.seq = body.seq
                        refusal = err
                    first = (self._refusal(refusal) if refusal is not None else
                             contract.Reply(self.gate_id, body.seq, True, "", UNCONFIRMED))
                    state.keep_answer(key, body.seq, same, first.encode())
        except JournalError as err:
            raise Refused(f"journal error: {err}", body.seq) from err
        if used is not None:
            return self._answer_again(cmd, used.answer, used.last)
        with self._ready:
            self._last[key] = max(body.seq, self._last.get(key) or 0)
        if refusal is not None:
            raise refusal
        try:
            reply = contract.Reply(self.gate_id, body.seq, True, "", after())
        except Exception as err:  # recorded and committed, but it did not work out
            log.exception("command %s seq %d failed", body.name, body.seq)
            failed = Refused(f"failed: {err}", body.seq)
            self._keep(key, body.seq, same, self._refusal(failed))
            raise failed from err
        self._keep(key, body.seq, same, reply)
        self.stats.applied += 1
        log.info("command %s seq %d (key %s): done", body.name, body.seq, cmd.key_id)
        return reply

    def _answer_again(self, cmd: contract.SignedCommand, kept: str | None,
                      last: int) -> contract.Reply:
        """A used seq: the answer the same command got, or "replayed"."""
        if kept is not None:
            try:
                obj = json.loads(kept)
                reply = contract.Reply(str(obj["gate"]), obj["seq"], bool(obj["ok"]),
                                       str(obj["reason"]), dict(obj["result"]))
            except (ValueError, KeyError, TypeError) as err:
                log.error("the kept answer to seq %d is unreadable (%s): said replayed",
                          cmd.body.seq, err)
            else:
                self.stats.answered_again += 1
                log.info("command %s seq %d (key %s) came again: told its answer again",
                         cmd.body.name, cmd.body.seq, cmd.key_id)
                return reply
        raise Refused(REPLAYED, cmd.body.seq, {"last_seq": last})

    def _keep(self, key: str, seq: int, same: bytes, reply: contract.Reply) -> None:
        """The answer a command got, once its effect is done (a second commit)."""
        try:
            with self._journal.control() as state:
                state.keep_answer(key, seq, same, reply.encode())
        except JournalError as err:  # its retry is told it was applied, unconfirmed
            log.error("the answer to seq %d was not kept: %s", seq, err)

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
