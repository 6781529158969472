"""Journal entries: immutable facts, appended once, hash-chained.

A tap's story is a short chain of entries linked by ``ref``:

    debit/intent ──► debit/completed                       (the usual tap)
    debit/intent ──► debit/torn ──► recovery/recovered      (the card had debited)
                                └─► recovery/unproven      (it had, per its log; no proof left)
                                └─► recovery/not_debited   (it had not; a new intent follows)
                                └─► recovery/uncertain     (the window closed first)
    refusal/refused                                         (denied, with a reason)
    pass/completed                                          (a zero fare: no debit)

The debits the journal recognises are debit/completed and recovery/recovered. A
recovery/unproven opened the gate too (the card's log shows this gate's debit, but the
card no longer holds its MAC2 and TAC): a passage, settled by the back office without a
TAC.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from json.encoder import encode_basestring_ascii as _json_str  # json.dumps's own
from typing import Any, NamedTuple, get_args, get_type_hints

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

KIND_DEBIT = "debit"
KIND_RECOVERY = "recovery"
KIND_REFUSAL = "refusal"
KIND_PASS = "pass"

INTENT = "intent"
COMPLETED = "completed"
TORN = "torn"
RECOVERED = "recovered"
NOT_DEBITED = "not_debited"
UNPROVEN = "unproven"
UNCERTAIN = "uncertain"
REFUSED = "refused"

GENESIS = bytes(32)

# An entry's sync state, shown beside its fields in an export as "sync_state" (outside
# the hash: it changes when the head-end acknowledges the entry; the entry does not).
SYNC_PENDING = "pending"
SYNC_SYNCED = "synced"


@dataclass(frozen=True, slots=True)
class Draft:
    """What the card loop knows when it writes an entry; the journal adds the rest."""

    kind: str
    state: str
    terminal_id: bytes
    amount: int = 0
    reason: str | None = None
    card_serial: bytes | None = None
    card_type: int | None = None
    balance_before: int | None = None
    balance_after: int | None = None
    card_counter: int | None = None
    card_random: bytes | None = None
    terminal_seq: int | None = None
    tx_date: str | None = None  # YYYYMMDD as sent to the card (BCD digits)
    tx_time: str | None = None  # hhmmss as sent to the card
    mac2: bytes | None = None
    tac: bytes | None = None
    ref: int | None = None  # id of the entry this one follows


@dataclass(frozen=True, slots=True)
class Entry:
    id: int
    uuid: str
    kind: str
    state: str
    terminal_id: bytes
    amount: int
    reason: str | None
    card_serial: bytes | None
    card_type: int | None
    balance_before: int | None
    balance_after: int | None
    card_counter: int | None
    card_random: bytes | None
    terminal_seq: int | None
    tx_date: str | None
    tx_time: str | None
    mac2: bytes | None
    tac: bytes | None
    ref: int | None
    created_ms: int
    prev_hash: bytes
    hash: bytes
    sig: bytes | None = None  # Ed25519(hash) by the gate's device key; outside the hash

    @property
    def is_recognised_debit(self) -> bool:
        return (self.kind, self.state) in ((KIND_DEBIT, COMPLETED), (KIND_RECOVERY, RECOVERED))

    def to_json(self) -> dict[str, Any]:
        """Binary as uppercase hex, amounts as integers, absent values as null."""
        # not dataclasses.asdict: it deep-copies every field, and the uplink calls this
        # for every entry it sends
        return wire_fields(zip(ENTRY_FIELDS, (getattr(self, n) for n in ENTRY_FIELDS),
                               strict=True))


ENTRY_FIELDS = tuple(f.name for f in fields(Entry))
DRAFT_FIELDS = tuple(f.name for f in fields(Draft))


# The wire form: an entry as JSON (Entry.to_json: what `tapgate journal export` prints,
# what a batch carries to the head-end, what the chain hash is over), defined here once
# from Entry's fields. Each field is a JSON integer, a JSON string, or bytes written as a
# string of uppercase hex; any may be null. Canonical JSON writes the keys in sorted
# order, WIRE_FORM's. What writes it elsewhere (the journal's SQL for the uplink, the
# batch around the entries) is built from this and tested against to_json.
WIRE_INT = "int"
WIRE_TEXT = "text"
WIRE_HEX = "hex"  # bytes, as uppercase hex


class WireField(NamedTuple):
    name: str
    kind: str  # WIRE_INT | WIRE_TEXT | WIRE_HEX


def _wire_kind(hint: Any) -> str:
    (python_type,) = set(get_args(hint) or (hint,)) - {type(None)}
    return {int: WIRE_INT, str: WIRE_TEXT, bytes: WIRE_HEX}[python_type]


WIRE_FORM = tuple(sorted(WireField(name, _wire_kind(hint))
                         for name, hint in get_type_hints(Entry).items()))

_UNHASHED = frozenset(("hash", "sync_state", "sig"))
_HASHED = tuple(f.name for f in WIRE_FORM if f.name not in _UNHASHED)
_HASHED_SET = frozenset(_HASHED)
# what json.dumps writes before each value: "{" or ",", the key, ":"
_KEY_PREFIXES = tuple(("{" if i == 0 else ",") + _json_str(name) + ":"
                      for i, name in enumerate(_HASHED))


def wire_value(value: Any) -> Any:
    """A field's value in the entry's JSON form: bytes as uppercase hex, the rest as is."""
    return value.hex().upper() if isinstance(value, bytes) else value


def wire_fields(items: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """An entry's fields (name, value) in their JSON form (:func:`wire_value` each)."""
    pairs = items.items() if isinstance(items, Mapping) else items
    # wire_value's rule written inline: this runs for every field of every append
    return {name: value.hex().upper() if isinstance(value, bytes) else value
            for name, value in pairs}


def canonical_json(fields_json: dict[str, Any]) -> str:
    """The hashed form: every field but ``hash``, ``sig`` and ``sync_state``, as
    ``json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)``.

    An entry's fields (exactly those keys, each a str, an int or None) are written here
    directly, byte for byte what json.dumps writes, at a third of its cost: every
    append hashes an entry while the passenger waits. Anything else goes to json.dumps.
    """
    parts: list[str] = []
    if fields_json.keys() - _UNHASHED == _HASHED_SET:
        for prefix, name in zip(_KEY_PREFIXES, _HASHED, strict=True):
            value = fields_json[name]
            kind = type(value)
            if kind is str:
                parts.append(prefix + _json_str(value))
            elif kind is int:
                parts.append(prefix + int.__repr__(value))
            elif value is None:
                parts.append(prefix + "null")
            else:  # a bool, a float, a subclass: json.dumps has rules of its own
                break
        else:
            parts.append("}")
            return "".join(parts)
    body = {k: v for k, v in fields_json.items() if k not in _UNHASHED}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def chain_hash(fields_json: dict[str, Any]) -> bytes:
    """SHA-256 over the canonical JSON of every field but ``hash`` itself.

    The back office recomputes it from the exported JSON, so it is defined on that form:
    keys sorted, no spaces, binary as uppercase hex (``prev_hash`` included).
    """
    return hashlib.sha256(canonical_json(fields_json).encode("ascii")).digest()


def sign(key: Ed25519PrivateKey, digest: bytes) -> bytes:
    """An entry's ``sig``: the device key's Ed25519 signature over its chain hash."""
    return key.sign(digest)


def signed_by(key: Ed25519PublicKey, sig: bytes, digest: bytes) -> bool:
    """Whether ``sig`` is ``key``'s signature over the chain hash ``digest``."""
    try:
        key.verify(sig, digest)
    except InvalidSignature:
        return False
    return True
