"""What the head-end checks in each entry, on the JSON form the gate exported.

* the hash: :func:`protocol.entry.chain_hash` recomputed from the fields;
* the signature: Ed25519 over the hash, by the gate's device key, when the key is known;
* the TAC of each recognised debit (debit/completed, recovery/recovered): recomputed
  with the back office's K_master_tac, it proves the card itself made the debit;
* the chain (prev_hash = the hash of the gate's previous entry) needs the other entries,
  so it is checked in :mod:`headend.store`; the words for its verdict live here.

Nothing here rejects an entry: every check gives a verdict and, when it fails, a reason
the store keeps beside the entry. An entry stored before its hash, signature and TAC
were checked (:mod:`headend.verdicts` checks them after the ack) has the verdict
``pending`` on all three until then.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from protocol.contract import canonical_text
from protocol.entry import (
    COMPLETED,
    GENESIS,
    KIND_DEBIT,
    KIND_RECOVERY,
    RECOVERED,
    chain_hash,
    signed_by,
)
from protocol.tgp1.crypto import Purchase, card_tac_key

MAX_UUID = 64
MAX_WORD = 32  # the kind and state columns; a longer one stays in the entry's JSON only
CARD_KEY_CACHE = 100_000  # derived K_card_tac kept, so a card's next debit costs one CMAC

HASH_OK, HASH_MISMATCH, HASH_MALFORMED = "ok", "mismatch", "malformed"
SIG_OK, SIG_BAD, SIG_UNSIGNED, SIG_NO_KEY = "ok", "bad", "unsigned", "no key"
TAC_OK, TAC_BAD, TAC_INCOMPLETE, TAC_UNCHECKED, TAC_NOT_A_DEBIT = (
    "ok", "bad", "incomplete", "unchecked", "not a debit")
CHAIN_LINKED, CHAIN_BROKEN, CHAIN_PENDING, CHAIN_UNPLACED = (
    "linked", "broken", "pending", "unplaced")
NOT_YET = "pending"  # hash, signature and TAC not checked yet: no verdict, no problem

GENESIS_HEX = GENESIS.hex().upper()

_PROBLEMS = {
    ("hash", HASH_MISMATCH): "hash does not match the entry's content",
    ("hash", HASH_MALFORMED): "hash is missing or not 32 bytes of hex",
    ("sig", SIG_BAD): "signature is not the gate's device key's",
    ("sig", SIG_UNSIGNED): "unsigned, though the gate's device key is known",
    ("tac", TAC_BAD): "TAC is not the card's: the card did not make this debit",
    ("chain", CHAIN_BROKEN): "prev_hash is not the hash of the gate's previous entry",
    ("chain", CHAIN_UNPLACED): "no valid id or prev_hash: cannot be placed in the chain",
}


class _Bad(ValueError):
    pass


def _hex(fields: Mapping[str, Any], name: str, size: int) -> bytes:
    value = fields.get(name)
    if not isinstance(value, str):
        raise _Bad(f"{name} missing")
    try:
        raw = bytes.fromhex(value)
    except ValueError as err:
        raise _Bad(f"{name} is not hex") from err
    if len(raw) != size:
        raise _Bad(f"{name} is {len(raw)} bytes, not {size}")
    return raw


def _uint(fields: Mapping[str, Any], name: str, bits: int) -> int:
    value = fields.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << bits:
        raise _Bad(f"{name} missing or out of range")
    return value


def _hash_hex(fields: Mapping[str, Any], name: str) -> str | None:
    try:
        return _hex(fields, name, 32).hex().upper()
    except _Bad:
        return None


@dataclass(frozen=True, slots=True)
class Parsed:
    """One entry of a batch, with what the store indexes pulled out of it."""

    uuid: str
    fields: dict[str, Any]  # exactly as the gate exported them
    text: str  # the fields as canonical JSON: what the store keeps and export prints
    entry_id: int | None  # the gate's journal id: the entry's place in the chain
    prev_hash: str | None  # uppercase hex, None when malformed
    hash: str | None
    kind: str | None
    state: str | None
    created_ms: int | None


def storable(text: str) -> bool:
    """Whether a database can hold ``text`` as it is: UTF-8 has no lone surrogates (JSON's
    "\\ud800" decodes to one) and PostgreSQL's text no NUL."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str) -> str:
    """``text`` with what a database cannot hold escaped (a reason that quotes a field)."""
    if storable(text):
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def parse_entry(obj: object) -> Parsed | str:
    """The entry, or why it cannot be stored as one (no uuid: it could not be deduped,
    nor named in an ack). Its JSON is ASCII (escaped), whatever its strings hold; the
    columns pulled out of it hold only text a database can store."""
    if not isinstance(obj, dict):
        return "an entry is not a JSON object"
    # sync_state is the gate's own bookkeeping at export time, not part of the entry
    fields: dict[str, Any] = obj
    if "sync_state" in obj or not all(type(k) is str for k in obj):
        fields = {str(k): v for k, v in obj.items() if k != "sync_state"}
    uuid = fields.get("uuid")
    if not isinstance(uuid, str) or not 0 < len(uuid) <= MAX_UUID:
        return "an entry without a valid uuid"
    if not storable(uuid):
        return "an entry whose uuid is not text (a lone surrogate or NUL)"
    kind, state = _word(fields.get("kind")), _word(fields.get("state"))
    return Parsed(
        uuid=uuid, fields=fields, text=canonical_text(fields),
        entry_id=_column_int(fields.get("id"), low=1),
        prev_hash=_hash_hex(fields, "prev_hash"), hash=_hash_hex(fields, "hash"),
        kind=kind, state=state, created_ms=_column_int(fields.get("created_ms"), low=0))


def _word(value: object) -> str | None:
    """A kind or state for its column, else None (kept in the entry's JSON, unindexed)."""
    if not isinstance(value, str) or len(value) > MAX_WORD or not storable(value):
        return None
    return value


def _column_int(value: object, *, low: int) -> int | None:
    """An integer the store can index (a signed 64-bit column), else None: a gate's
    2**70 is kept in the entry's JSON and flagged by the checks, never an overflow in
    the database driver."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value < 1 << 63:
        return None
    return value


@dataclass(frozen=True, slots=True)
class Verdict:
    """The checks that need only the entry itself."""

    hash: str
    sig: str
    tac: str
    notes: tuple[str, ...] = ()


def proven(v: Verdict) -> bool:
    """The entry is the gate's own: its content hashes to its hash, which the gate's
    device key signed."""
    return v.hash == HASH_OK and v.sig == SIG_OK


def disproof(v: Verdict) -> str | None:
    """Why an entry checked against its gate's key is not the gate's (a forged or altered
    copy): such an entry takes no uuid and is never acknowledged. None when it is the
    gate's, or when there is no key to tell (the verdicts are then only flags)."""
    if v.sig in (SIG_NO_KEY, NOT_YET) or proven(v):
        return None
    found = [_PROBLEMS[(what, state)] for what, state in (("hash", v.hash), ("sig", v.sig))
             if (what, state) in _PROBLEMS]
    return "not the gate's: " + "; ".join(found)


def problems(hash_state: str, sig: str, tac: str, chain: str, notes: Sequence[str]) -> list[str]:
    """Every reason to suspect an entry, in words, from its verdicts."""
    found = [_PROBLEMS[(what, state)] for what, state in
             (("hash", hash_state), ("sig", sig), ("tac", tac), ("chain", chain))
             if (what, state) in _PROBLEMS]
    return found + list(notes)


PENDING_VERDICT = Verdict(hash=NOT_YET, sig=NOT_YET, tac=NOT_YET)


class Verifier:
    """The back office's keys, applied to one entry at a time. It can be pickled, keys
    and all, for the verifying processes of :mod:`headend.verdicts`."""

    def __init__(self, *, tac_master_key: bytes | None = None,
                 gate_keys: Mapping[str, Sequence[Ed25519PublicKey]] | None = None) -> None:
        self._tac_master_key = tac_master_key
        self._gate_keys = dict(gate_keys or {})
        self._card_keys: dict[bytes, bytes] = {}  # serial -> K_card_tac, derived once

    def __reduce__(self) -> tuple[Any, ...]:
        raw = {gate: [k.public_bytes(Encoding.Raw, PublicFormat.Raw) for k in keys]
               for gate, keys in self._gate_keys.items()}
        return _verifier_from_raw, (self._tac_master_key, raw)

    def has_key(self, gate: str) -> bool:
        """Whether this gate's device key is known: its entries can be proven its own."""
        return bool(self._gate_keys.get(gate))

    def verify(self, gate: str, entry: Parsed) -> Verdict:
        return self.verify_fields(gate, entry.fields)

    def verify_fields(self, gate: str, fields: Mapping[str, Any]) -> Verdict:
        """The verdicts on one entry's fields, as the gate exported them."""
        notes: list[str] = []
        hash_state = self._hash(fields)
        sig = self._sig(gate, fields)
        tac, why = self._tac(fields)
        if why:
            notes.append(why)
        terminal = fields.get("terminal_id")
        if isinstance(terminal, str) and terminal.upper() != gate.upper():
            # a gate's id is its terminal id: another's debit filed under this gate
            # (signed by this gate's key, its TAC still good) would be settled twice
            notes.append(f"terminal id {printable(terminal)} is not this gate's")
        return Verdict(hash=hash_state, sig=sig, tac=tac, notes=tuple(notes))

    @staticmethod
    def _hash(fields: Mapping[str, Any]) -> str:
        try:
            claimed = _hex(fields, "hash", 32)
        except _Bad:
            return HASH_MALFORMED
        return HASH_OK if chain_hash(dict(fields)) == claimed else HASH_MISMATCH

    def _sig(self, gate: str, fields: Mapping[str, Any]) -> str:
        keys = self._gate_keys.get(gate)
        if not keys:
            return SIG_NO_KEY
        if fields.get("sig") is None:
            return SIG_UNSIGNED
        try:
            sig, digest = _hex(fields, "sig", 64), _hex(fields, "hash", 32)
        except _Bad:
            return SIG_BAD
        # several keys during a rotation
        return SIG_OK if any(signed_by(key, sig, digest) for key in keys) else SIG_BAD

    def _tac(self, fields: Mapping[str, Any]) -> tuple[str, str]:
        if (fields.get("kind"), fields.get("state")) not in (
                (KIND_DEBIT, COMPLETED), (KIND_RECOVERY, RECOVERED)):
            return TAC_NOT_A_DEBIT, ""
        if self._tac_master_key is None:
            return TAC_UNCHECKED, ""
        try:
            serial = _hex(fields, "card_serial", 8)
            purchase = Purchase(
                card_random=_hex(fields, "card_random", 4),
                counter=_uint(fields, "card_counter", 16),
                terminal_seq=_uint(fields, "terminal_seq", 32),
                amount=_uint(fields, "amount", 32),
                terminal_id=_hex(fields, "terminal_id", 6),
                date=_hex(fields, "tx_date", 4),
                time=_hex(fields, "tx_time", 3))
            tac = _hex(fields, "tac", 4)
        except _Bad as err:
            return TAC_INCOMPLETE, f"a recognised debit whose TAC cannot be checked: {err}"
        key = self._card_keys.get(serial)
        if key is None:
            if len(self._card_keys) >= CARD_KEY_CACHE:
                self._card_keys.clear()
            key = self._card_keys[serial] = card_tac_key(self._tac_master_key, serial)
        return (TAC_OK if purchase.tac(key) == tac else TAC_BAD), ""


def _verifier_from_raw(tac_master_key: bytes | None,
                       gate_keys: Mapping[str, Sequence[bytes]]) -> Verifier:
    return Verifier(tac_master_key=tac_master_key, gate_keys={
        gate: [Ed25519PublicKey.from_public_bytes(k) for k in keys]
        for gate, keys in gate_keys.items()})
