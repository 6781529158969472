"""Operators' signed commands, on the gate: verified, applied at most once, answered.

A command comes on ``tapgate/v1/<gate>/cmd`` or ``tapgate/v1/fleet/cmd`` (the desired
state on ``.../desired``, see daemon.sync.desired) as a :class:`contract.SignedCommand`.
It is refused, with the reason, when it is:

    too large        more than contract.MAX_COMMAND_BYTES (not read at all)
    malformed: ...   not JSON, or not the shape of a signed command
    unknown key id   no operator key of that id in [operators] keys (removed: rotated out)
    bad signature    the key's Ed25519 signature over the canonical body does not verify
    not for this gate  the target is another gate, or does not match the topic
    expired          expires_at is past
    issued in the future  issued_at is ahead of the gate's clock by more than the skew
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from daemon.config import OperatorsConfig
from daemon.errors import JournalError
from daemon.journal import Journal
from daemon.sync import contract
from daemon.sync.desired import Desired
from daemon.sync.handlers import HANDLERS, GateControl, Refused

__all__ = ["Commands", "Incoming", "Refused", "Verifier", "parse"]

log = logging.getLogger("tapgate.commands")

QUEUE_MAX = 64  # commands waiting; beyond this, what comes is dropped (and logged)
BODY_FIELDS = ("target", "seq", "issued_at", "expires_at", "name", "args")
TOO_LARGE = "too large"
UNKNOWN_KEY = "unknown key id"
BAD_SIGNATURE = "bad signature"
NOT_FOR_US = "not for this gate"
EXPIRED = "expired"
FUTURE = "issued in the future"
REPLAYED = "replayed"
UNKNOWN_COMMAND = "unknown command"


@dataclass(frozen=True, slots=True)
class Incoming:
    """A message on a command topic, as the broker delivered it."""

    topic: str
    payload: bytes
    response_topic: str = ""
    correlation: bytes | None = None
    retained: bool = False


def _integer(obj: Mapping[str, Any], key: str) -> int:
    # (what the journal's 64-bit columns hold: a larger seq must be refused, not break
    # the transaction that records it)
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 63:
        raise Refused(f"malformed: body.{key} must be an integer, 0 to 2**63 - 1")
    return value


def parse(payload: bytes) -> contract.SignedCommand:
    """The signed command in ``payload``, or :class:`Refused` (malformed)."""
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise Refused("malformed: not JSON") from None
    if not isinstance(obj, dict) or set(obj) != {"key_id", "body", "sig"}:
        raise Refused("malformed: a signed command is an object of key_id, body and sig")
    body, key_id, sig = obj["body"], obj["key_id"], obj["sig"]
    if not isinstance(key_id, str) or not isinstance(sig, str):
        raise Refused("malformed: key_id and sig must be strings")
    if not isinstance(body, dict) or set(body) != set(BODY_FIELDS):
        raise Refused(f"malformed: the body must have exactly {', '.join(BODY_FIELDS)}")
    seq = _integer(body, "seq")
    if not isinstance(body["target"], str) or not isinstance(body["name"], str):
        raise Refused("malformed: body.target and body.name must be strings", seq)
    if not isinstance(body["args"], dict):
        raise Refused("malformed: body.args must be an object", seq)
    try:
        signature = bytes.fromhex(sig)
    except ValueError:
        raise Refused("malformed: sig must be hex", seq) from None
    return contract.SignedCommand(key_id=key_id, sig=signature, body=contract.CommandBody(
        target=body["target"], seq=seq, issued_at=_integer(body, "issued_at"),
        expires_at=_integer(body, "expires_at"), name=body["name"], args=body["args"]))


class Verifier:
    """Everything about a command but its sequence number and its arguments."""

    def __init__(self, *, gate_id: str, operators: OperatorsConfig,
                 clock: Callable[[], float] = time.time) -> None:
        self.gate_id = gate_id
        self._skew_ms = int(operators.clock_skew_s * 1000)
        self._clock = clock
        self._keys = {key_id: Ed25519PublicKey.from_public_bytes(raw)
                      for key_id, raw in operators.keys.items()}
        self._targets = {contract.cmd_topic(gate_id): gate_id,
                         contract.fleet_cmd_topic(): contract.FLEET,
                         contract.desired_topic(gate_id): gate_id}

    def verify(self, incoming: Incoming) -> contract.SignedCommand:
        if len(incoming.payload) > contract.MAX_COMMAND_BYTES:
            raise Refused(TOO_LARGE, None, {"bytes": len(incoming.payload),
                                            "max": contract.MAX_COMMAND_BYTES})
        cmd = parse(incoming.payload)
        body, seq = cmd.body, cmd.body.seq
        key = self._keys.get(cmd.key_id.upper())
        if key is None:
            raise Refused(UNKNOWN_KEY, seq)
        try:
            key.verify(cmd.sig, cmd.signed_bytes())
        except InvalidSignature:
            raise Refused(BAD_SIGNATURE, seq) from None
        if body.target != self._targets.get(incoming.topic):
            raise Refused(NOT_FOR_US, seq, {"target": body.target})
        now = int(self._clock() * 1000)
        if body.expires_at < now:
            raise Refused(EXPIRED, seq, {"expires_at": body.expires_at, "now": now})
        if body.issued_at > now + self._skew_ms:
            raise Refused(FUTURE, seq, {"issued_at": body.issued_at, "now": now})
        return cmd

    def answer_topic(self, topic: str) -> str | None:
        """Where the answer to a command with Response Topic ``topic`` goes: one level
        under this gate's reply topic, taken from under its own or the fleet's; None:
        nowhere."""
        if len(topic) > 256:
            return None
        for owner in (self.gate_id, contract.FLEET):
            prefix = contract.reply_topic(owner) + "/"
            rest = topic.removeprefix(prefix)
            if rest != topic and rest and not any(c in rest for c in "/+#\0"):
                return contract.reply_topic(self.gate_id) + "/" + rest
        return None


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
                 control: GateControl, publish: Publish,
                 clock: Callable[[], float] = time.time) -> None:
        self.gate_id = gate_id
        self.control = control
        self.verifier = Verifier(gate_id=gate_id, operators=operators, clock=clock)
        self._journal = journal
        self._publish = publish
        self._queue: queue.Queue[Incoming] = queue.Queue(QUEUE_MAX)
        self._desired_topic = contract.desired_topic(gate_id)
        self.desired = Desired(gate_id=gate_id, verifier=self.verifier, journal=journal,
                               control=control, publish=publish)
        self.stats = CommandStats()

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
