"""Operators' signed commands (the MQTT contract's cmd, fleet cmd and desired topics):
how one is parsed and verified, and the reasons it is refused.

It is refused, with the reason, when it is:

    too large        more than contract.MAX_COMMAND_BYTES (not read at all)
    malformed: ...   not JSON, nested deeper than MAX_DEPTH, or not the shape of a
                     signed command
    unknown key id   no operator key of that id in [operators] keys (removed: rotated out)
    bad signature    the key's Ed25519 signature over the canonical body does not verify
    not for this gate  the target is another gate, or does not match the topic
    expired          expires_at is past
    issued in the future  issued_at is ahead of the gate's clock by more than the skew
    replayed         its seq is not above the highest applied from that key (result:
                     last_seq); the highest is kept in the journal, so restarts keep it
    unknown command  (result: known, the names this gate knows)
    bad args: ...    see daemon.sync.handlers; and each command's own refusals

The sequence number, the arguments and what a command does are the gate's business
(daemon.sync.commands); everything here is the same on every gate and in every tool.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocol.contract import (
    FLEET,
    MAX_COMMAND_BYTES,
    CommandBody,
    SignedCommand,
    cmd_topic,
    desired_topic,
    fleet_cmd_topic,
    reply_topic,
)

BODY_FIELDS = ("target", "seq", "issued_at", "expires_at", "name", "args")
TOO_LARGE = "too large"
UNKNOWN_KEY = "unknown key id"
BAD_SIGNATURE = "bad signature"
NOT_FOR_US = "not for this gate"
EXPIRED = "expired"
FUTURE = "issued in the future"
REPLAYED = "replayed"
UNKNOWN_COMMAND = "unknown command"
# Objects and lists inside one another, the envelope included: what a command needs is
# a handful; what is deeper than this is refused before anything walks it recursively.
MAX_DEPTH = 32
TOO_DEEP = f"malformed: nested deeper than {MAX_DEPTH} levels"


class Refused(Exception):
    """A command this gate will not apply; ``reason`` is what the operator is told,
    ``result`` the details (the current deny-list version, the last seq applied ...)."""

    def __init__(self, reason: str, seq: int | None = None,
                 result: Mapping[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.seq = seq
        self.result: dict[str, Any] = dict(result or {})


def bad_args(why: str) -> Refused:
    return Refused(f"bad args: {why}")


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


def depth(obj: Any) -> int:
    """How many objects and lists deep ``obj`` is (walked without recursion)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            break
        stack.extend((child, level + 1) for child in children)
    return deepest


def loads(payload: bytes) -> Any:
    """JSON text at most MAX_DEPTH deep, or :class:`Refused` (malformed)."""
    try:
        obj = json.loads(payload)
    except RecursionError:  # the parser's own limit (~1,000 levels) came first
        raise Refused(TOO_DEEP) from None
    except (ValueError, UnicodeDecodeError):
        raise Refused("malformed: not JSON") from None
    if depth(obj) > MAX_DEPTH:  # or canonical() would recurse through it when signing
        raise Refused(TOO_DEEP)
    return obj


def parse(payload: bytes) -> SignedCommand:
    """The signed command in ``payload``, or :class:`Refused` (malformed)."""
    obj = loads(payload)
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
    return SignedCommand(key_id=key_id, sig=signature, body=CommandBody(
        target=body["target"], seq=seq, issued_at=_integer(body, "issued_at"),
        expires_at=_integer(body, "expires_at"), name=body["name"], args=body["args"]))


class Verifier:
    """Everything about a command but its sequence number and its arguments."""

    def __init__(self, *, gate_id: str, keys: Mapping[str, bytes], clock_skew_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.gate_id = gate_id
        self._skew_ms = int(clock_skew_s * 1000)
        self._clock = clock
        self._keys = {key_id: Ed25519PublicKey.from_public_bytes(raw)
                      for key_id, raw in keys.items()}
        self._targets = {cmd_topic(gate_id): gate_id,
                         fleet_cmd_topic(): FLEET,
                         desired_topic(gate_id): gate_id}

    def verify(self, incoming: Incoming) -> SignedCommand:
        if len(incoming.payload) > MAX_COMMAND_BYTES:
            raise Refused(TOO_LARGE, None, {"bytes": len(incoming.payload),
                                            "max": MAX_COMMAND_BYTES})
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
        for owner in (self.gate_id, FLEET):
            prefix = reply_topic(owner) + "/"
            rest = topic.removeprefix(prefix)
            if rest != topic and rest and not any(c in rest for c in "/+#\0"):
                return reply_topic(self.gate_id) + "/" + rest
        return None
