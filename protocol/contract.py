"""The MQTT contract between a gate and the head-end, in one place both sides import.

docs/asyncapi.yaml describes the same contract for people and other tools; a test keeps
the two in step.

Topics (``<gate>`` is the gate id, by default its terminal id in uppercase hex):

    tapgate/v1/<gate>/status    gate → all, retained   online/offline (Last Will) + telemetry
    tapgate/v1/<gate>/tx        gate → head-end, QoS 1 a batch of journal entries
    tapgate/v1/<gate>/ack       head-end → gate, QoS 1 the entries stored (application ack)
    tapgate/v1/<gate>/cmd       operator → gate, QoS 1 a signed command
    tapgate/v1/fleet/cmd        operator → all gates    a signed command for the fleet
    tapgate/v1/<target>/reply/<nonce>  gate → operator  answers (a command's response topic)
    tapgate/v1/<gate>/desired   operator → gate, retained  signed desired config (shadow)
    tapgate/v1/<gate>/reported  gate → all, retained   the desired version the gate runs
    tapgate/v1/<gate>/info      gate → all, retained   the gate's public info (beacons)

A batch carries MQTT v5 Response Topic = the gate's ack topic and Correlation Data = the
batch id; the head-end answers there, after storing, naming every entry it stored. Only
that ack makes an entry synced: a PUBACK only says the broker has it.

Commands and desired state are signed end to end with an operator's Ed25519 key: the
signature covers the canonical JSON of the body (target, seq, issued_at, expires_at,
name, args), so the broker can neither forge nor alter them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

PREFIX = "tapgate/v1"
FLEET = "fleet"
MAX_COMMAND_BYTES = 16 * 1024  # larger command payloads are refused unread


def topic(gate: str, leaf: str) -> str:
    return f"{PREFIX}/{gate}/{leaf}"


def status_topic(gate: str) -> str:
    return topic(gate, "status")


def tx_topic(gate: str) -> str:
    return topic(gate, "tx")


def ack_topic(gate: str) -> str:
    return topic(gate, "ack")


def cmd_topic(gate: str) -> str:
    return topic(gate, "cmd")


def fleet_cmd_topic() -> str:
    return topic(FLEET, "cmd")


def reply_topic(gate: str) -> str:
    return topic(gate, "reply")


def desired_topic(gate: str) -> str:
    return topic(gate, "desired")


def reported_topic(gate: str) -> str:
    return topic(gate, "reported")


def info_topic(gate: str) -> str:
    return topic(gate, "info")


HEADEND_SHARE = "$share/headend/" + PREFIX + "/+/tx"


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def canonical(obj: Any) -> bytes:
    """The bytes that are hashed or signed: sorted keys, no spaces, ASCII."""
    return canonical_text(obj).encode("ascii")


def canonical_text(obj: Any) -> str:
    """:func:`canonical` as text (one encoder for every call: json.dumps with options
    builds a new one each time)."""
    return _CANONICAL.encode(obj)


_NO_ENTRIES = b'"entries":[]'


@dataclass(frozen=True, slots=True)
class Batch:
    """gate → head-end on .../tx: entries exactly as `tapgate journal export` prints them."""

    gate: str
    batch_id: str
    entries: list[dict[str, Any]]

    def encode(self) -> bytes:
        return canonical({"gate": self.gate, "batch": self.batch_id, "entries": self.entries})

    @staticmethod
    def wrap(gate: str, batch_id: str, entries_json: str) -> bytes:
        """:meth:`encode`, byte for byte, of entries already in canonical JSON and
        comma-separated (the journal's ``unacked_wire``): the envelope is encode's own,
        of no entries, and they go into its empty list."""
        # No other '"entries":[]' can be in it: a quote inside a JSON string is escaped.
        head, _, tail = Batch(gate, batch_id, []).encode().partition(_NO_ENTRIES)
        return b"".join((head, _NO_ENTRIES[:-1], entries_json.encode("ascii"), b"]", tail))

    @classmethod
    def decode(cls, payload: bytes) -> Batch:
        obj = json.loads(payload)
        if not isinstance(obj, dict) or not isinstance(obj.get("entries"), list):
            raise ValueError("a batch is an object with an entries list")
        return cls(gate=str(obj["gate"]), batch_id=str(obj["batch"]), entries=obj["entries"])


@dataclass(frozen=True, slots=True)
class Ack:
    """head-end → gate on .../ack: the uuids it has stored (or had stored before)."""

    batch_id: str
    stored: list[str]
    problems: dict[str, str] = field(default_factory=dict)  # uuid -> why it is suspect

    def encode(self) -> bytes:
        return canonical({"batch": self.batch_id, "stored": self.stored,
                          "problems": self.problems})

    @classmethod
    def decode(cls, payload: bytes) -> Ack:
        obj = json.loads(payload)
        if not isinstance(obj, dict) or not isinstance(obj.get("stored"), list):
            raise ValueError("an ack is an object with a stored list")
        return cls(batch_id=str(obj.get("batch", "")), stored=[str(u) for u in obj["stored"]],
                   problems={str(k): str(v) for k, v in dict(obj.get("problems", {})).items()})


@dataclass(frozen=True, slots=True)
class CommandBody:
    """What an operator signs. ``target`` is a gate id or "fleet"."""

    target: str
    seq: int
    issued_at: int  # unix ms
    expires_at: int  # unix ms
    name: str
    args: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "seq": self.seq, "issued_at": self.issued_at,
                "expires_at": self.expires_at, "name": self.name, "args": self.args}


@dataclass(frozen=True, slots=True)
class SignedCommand:
    """The envelope on .../cmd and .../desired: the body, the key id, the signature."""

    key_id: str
    body: CommandBody
    sig: bytes

    def signed_bytes(self) -> bytes:
        return canonical(self.body.to_json())

    def encode(self) -> bytes:
        return canonical({"key_id": self.key_id, "body": self.body.to_json(),
                          "sig": self.sig.hex()})


@dataclass(frozen=True, slots=True)
class Reply:
    """gate → operator on the command's response topic, with its correlation data."""

    gate: str
    seq: int | None
    ok: bool
    reason: str = ""
    result: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        return canonical({"gate": self.gate, "seq": self.seq, "ok": self.ok,
                          "reason": self.reason, "result": self.result})


ONLINE = "online"
OFFLINE = "offline"


@dataclass(frozen=True, slots=True)
class Status:
    """gate → all on .../status, retained: ``online`` with telemetry, refreshed while the
    gate is connected; ``offline`` when it stops, or as its Last Will (then ``ts`` is when
    the lost connection was opened)."""

    gate: str
    state: str  # ONLINE | OFFLINE
    ts: int  # unix ms
    telemetry: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        return canonical({"gate": self.gate, "state": self.state, "ts": self.ts,
                          "telemetry": self.telemetry})

    @classmethod
    def decode(cls, payload: bytes) -> Status:
        obj = json.loads(payload)
        if not isinstance(obj, dict) or obj.get("state") not in (ONLINE, OFFLINE):
            raise ValueError("a status is an object with state online or offline")
        return cls(gate=str(obj.get("gate", "")), state=str(obj["state"]),
                   ts=int(obj.get("ts", 0)), telemetry=dict(obj.get("telemetry") or {}))
