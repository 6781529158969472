"""A TGP1 stored-value card that follows ../shared/PURSE.md to the byte.

It is the card side of the protocol, used by the ``sim`` reader in-process and by the
vpcd transport through the real pcscd. It can be told to leave the field before or after
applying a command, or to answer garbage, so that every tear the gate must survive can
be produced on demand.
"""

from __future__ import annotations

import datetime as dt
import enum
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.tgp1.apdu import AID, LOG_RECORDS
from protocol.tgp1.crypto import TX_TYPE_PURCHASE, Purchase, card_key, card_tac_key

SW_OK = b"\x90\x00"


class FaultKind(enum.Enum):
    TEAR_BEFORE = "tear_before"  # leaves the field before acting on the command
    TEAR_AFTER = "tear_after"  # acts on the command, then leaves before answering
    GARBAGE_BEFORE = "garbage_before"  # answers garbage without acting
    GARBAGE_AFTER = "garbage_after"  # acts, then answers garbage


@dataclass(slots=True)
class Fault:
    kind: FaultKind
    ins: int | None = None  # the INS it fires on; None fires on the next command
    garbage: bytes = b"\x6F"  # the answer for the GARBAGE kinds

    def matches(self, apdu: bytes) -> bool:
        return self.ins is None or (len(apdu) >= 2 and apdu[1] == self.ins)


class CardTorn(Exception):
    """The card left the field; ``applied`` tells whether the command took effect."""

    def __init__(self, applied: bool) -> None:
        self.applied = applied
        super().__init__("card left the field " + ("after" if applied else "before") + " acting")


@dataclass(frozen=True, slots=True)
class DebitRecord:
    """One completed debit, as the card's log holds it (and as ground truth for tests)."""

    counter_before: int
    balance_after: int
    amount: int
    terminal_id: bytes
    terminal_seq: int
    date: bytes
    time: bytes
    mac2: bytes
    tac: bytes

    def encode(self) -> bytes:
        return (
            self.counter_before.to_bytes(2, "big")
            + self.balance_after.to_bytes(4, "big")
            + self.amount.to_bytes(4, "big")
            + bytes([TX_TYPE_PURCHASE])
            + self.terminal_id
            + self.terminal_seq.to_bytes(4, "big")
            + self.date
            + self.time
        )


@dataclass(slots=True)
class _Session:
    amount: int
    terminal_id: bytes
    card_random: bytes
    counter: int


def _sw(code: int) -> bytes:
    return code.to_bytes(2, "big")


def _bcd_date(day: dt.date) -> bytes:
    return bytes.fromhex(day.strftime("%y%m%d"))


@dataclass
class VirtualPurse:
    serial: bytes
    balance: int
    master_key: bytes = field(repr=False)
    master_tac_key: bytes = field(repr=False)
    expiry: dt.date = dt.date(2030, 12, 31)
    card_type: int = 0x01
    status: int = 0x00
    counter: int = 0
    random: Callable[[int], bytes] = field(default=os.urandom, repr=False)
    today: Callable[[], dt.date] = field(default=dt.date.today, repr=False)
    history: list[DebitRecord] = field(default_factory=list, repr=False)
    history_limit: int = 0  # keep only this many debits in memory (0: all; tests need all)
    faults: deque[Fault] = field(default_factory=deque, repr=False)

    def __post_init__(self) -> None:
        if len(self.serial) != 8:
            raise ValueError("serial must be 8 bytes")
        self._k_card = card_key(self.master_key, self.serial)
        self._k_tac = card_tac_key(self.master_tac_key, self.serial)
        self._session: _Session | None = None
        self._lock = threading.Lock()

    # -- field events -------------------------------------------------------------
    def power_on(self) -> None:
        """Entering the field resets volatile state: an open purchase session is gone."""
        with self._lock:
            self._session = None

    def inject(self, *faults: Fault) -> None:
        """Queue faults; each fires once, on the first command it matches."""
        with self._lock:
            self.faults.extend(faults)

    @property
    def atr(self) -> bytes:
        # T=1 ATR with historical bytes "TGP1"
        return bytes.fromhex("3B8480015447503109")

    @property
    def log(self) -> list[DebitRecord]:
        """The cyclic log: at most 10 records, newest first."""
        return list(reversed(self.history[-LOG_RECORDS:]))

    # -- the protocol ---------------------------------------------------------------
    def process(self, apdu: bytes) -> bytes:
        """Answer one C-APDU; raises :class:`CardTorn` when a fault makes it leave."""
        with self._lock:
            fault = self._take_fault(apdu)
            if fault is not None and fault.kind is FaultKind.TEAR_BEFORE:
                self._session = None
                raise CardTorn(applied=False)
            if fault is not None and fault.kind is FaultKind.GARBAGE_BEFORE:
                return fault.garbage
            response = self._handle(apdu)
            if fault is not None and fault.kind is FaultKind.TEAR_AFTER:
                self._session = None
                raise CardTorn(applied=True)
            if fault is not None and fault.kind is FaultKind.GARBAGE_AFTER:
                return fault.garbage
            return response

    def _take_fault(self, apdu: bytes) -> Fault | None:
        for fault in self.faults:
            if fault.matches(apdu):
                self.faults.remove(fault)
                return fault
        return None

    def _handle(self, apdu: bytes) -> bytes:
        if len(apdu) < 4:
            self._session = None
            return _sw(0x6700)
        cla, ins = apdu[0], apdu[1]
        session, self._session = self._session, None  # any command but DEBIT ends it
        if cla == 0x00 and ins == 0xA4:
            return self._select(apdu)
        if cla == 0x00 and ins == 0xB2:
            return self._read_record(apdu)
        if cla == 0x80 and ins == 0x5C:
            return self._get_balance(apdu)
        if cla == 0x80 and ins == 0x50:
            return self._initialize(apdu)
        if cla == 0x80 and ins == 0x54:
            return self._debit(apdu, session)
        if cla == 0x80 and ins == 0x5A:
            return self._proof(apdu)
        if cla in (0x00, 0x80):
            return _sw(0x6D00)
        return _sw(0x6E00)

    def _select(self, apdu: bytes) -> bytes:
        if apdu[2:4] != b"\x04\x00" or len(apdu) < 5 or len(apdu) < 5 + apdu[4]:
            return _sw(0x6A82)
        if apdu[5 : 5 + apdu[4]] != AID:
            return _sw(0x6A82)
        prop = (
            b"\x5A\x08" + self.serial
            + b"\x5F\x24\x03" + _bcd_date(self.expiry)
            + b"\xC1\x01" + bytes([self.card_type])
            + b"\xC2\x01" + bytes([self.status])
            + b"\x9F\x08\x01\x01"
        )
        fci = b"\x84\x08" + AID + b"\xA5" + bytes([len(prop)]) + prop
        return b"\x6F" + bytes([len(fci)]) + fci + SW_OK

    def _get_balance(self, apdu: bytes) -> bytes:
        if apdu != bytes.fromhex("805C000204"):
            return _sw(0x6700)
        return self.balance.to_bytes(4, "big") + SW_OK

    def _initialize(self, apdu: bytes) -> bytes:
        if apdu[2:4] != b"\x01\x02" or len(apdu) != 17 or apdu[4] != 0x0B or apdu[16] != 0x0F:
            return _sw(0x6700)
        if apdu[5] != 0x01:
            return _sw(0x6A88)
        if self.status != 0x00 or self.expiry < self.today():
            return _sw(0x6985)
        amount = int.from_bytes(apdu[6:10], "big")
        if amount > self.balance:
            return _sw(0x9401)
        random = self.random(4)
        self._session = _Session(amount, apdu[10:16], random, self.counter)
        return (
            self.balance.to_bytes(4, "big")
            + self.counter.to_bytes(2, "big")
            + b"\x00\x00\x00\x01\x02"
            + random
            + SW_OK
        )

    def _debit(self, apdu: bytes, session: _Session | None) -> bytes:
        if apdu[2:4] != b"\x01\x00" or len(apdu) != 21 or apdu[4] != 0x0F or apdu[20] != 0x08:
            return _sw(0x6700)
        if session is None:
            return _sw(0x6985)
        seq = int.from_bytes(apdu[5:9], "big")
        date, time, mac1 = apdu[9:13], apdu[13:16], apdu[16:20]
        purchase = Purchase(
            card_random=session.card_random,
            counter=session.counter,
            terminal_seq=seq,
            amount=session.amount,
            terminal_id=session.terminal_id,
            date=date,
            time=time,
        )
        sk = purchase.session_key(self._k_card)
        if purchase.mac1(sk) != mac1:
            return _sw(0x9302)
        mac2, tac = purchase.mac2(sk), purchase.tac(self._k_tac)
        self.balance -= session.amount
        self.history.append(
            DebitRecord(session.counter, self.balance, session.amount, session.terminal_id,
                        seq, date, time, mac2, tac)
        )
        self.counter = (self.counter + 1) & 0xFFFF
        if self.history_limit and len(self.history) > self.history_limit:
            del self.history[: len(self.history) - self.history_limit]
        return tac + mac2 + SW_OK

    def _proof(self, apdu: bytes) -> bytes:
        if apdu[2:4] != b"\x00\x06" or len(apdu) != 8 or apdu[4] != 0x02 or apdu[7] != 0x08:
            return _sw(0x6700)
        counter = int.from_bytes(apdu[5:7], "big")
        if not self.history or self.history[-1].counter_before != counter:
            return _sw(0x9406)
        last = self.history[-1]
        return last.mac2 + last.tac + SW_OK

    def _read_record(self, apdu: bytes) -> bytes:
        if apdu[3] != 0xC4 or len(apdu) != 5 or apdu[4] != 0x1C:
            return _sw(0x6700)
        number = apdu[2]
        log = self.log
        if not 1 <= number <= len(log):
            return _sw(0x6A83)
        return log[number - 1].encode() + SW_OK
