"""PURSE.md's test keys, the terminal, card types and fares the tests use, the TGP1
instruction bytes a test hooks, the clock a test moves by hand, and virtual TGP1 cards."""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable

from daemon.config import CARD_TYPES
from hal.card.model import VirtualPurse

# PURSE.md's test keys: for tests and demos only.
MASTER_KEY = bytes.fromhex("000102030405060708090A0B0C0D0E0F")
MASTER_TAC_KEY = bytes.fromhex("101112131415161718191A1B1C1D1E1F")
TERMINAL_ID = bytes.fromhex("000000A00001")
OTHER_TERMINAL_ID = bytes.fromhex("000000B00002")

ADULT = CARD_TYPES["adult"]
CONCESSION = CARD_TYPES["concession"]
STAFF = CARD_TYPES["staff"]
FARES = {ADULT: 250, CONCESSION: 120, STAFF: 0}

INS_SELECT = 0xA4
INS_INITIALIZE = 0x50
INS_DEBIT = 0x54
INS_PROOF = 0x5A
INS_READ_RECORD = 0xB2

# A fixed local time, so that dates and times sent to cards are the same on every run.
START = time.mktime((2026, 5, 4, 8, 0, 0, 0, 0, -1))


class Clock:
    """Time the test moves by hand: windows are tested without sleeping. Calling it
    reads the wall clock; :meth:`monotonic` the monotonic one, which :meth:`advance`
    moves with it and :meth:`set_wall` (the clock set by NTP or by hand) does not.
    The monotonic clock starts small, as on a machine just booted."""

    def __init__(self, start: float = START, *, uptime: float = 5.0) -> None:
        self.now = float(start)
        self.mono = float(uptime)

    def __call__(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        """Time passes (``seconds`` < 0 is the wall clock set back as time passes)."""
        self.now += seconds
        self.mono += max(0.0, seconds)

    def set_wall(self, seconds: float) -> None:
        """The wall clock set ``seconds`` forward (< 0: back), no time passing."""
        self.now += seconds

    def today(self) -> dt.date:
        return dt.date.fromtimestamp(self.now)


# --- cards ---------------------------------------------------------------------------------
def serial_of(n: int) -> bytes:
    return bytes.fromhex("88010000") + n.to_bytes(4, "big")


def make_card(
    serial: int | bytes,
    balance: int = 5000,
    *,
    card_type: int = ADULT,
    status: int = 0x00,
    expiry: dt.date = dt.date(2030, 12, 31),
    counter: int = 0,
    clock: Clock | None = None,
    random: Callable[[int], bytes] = os.urandom,
) -> VirtualPurse:
    """A TGP1 card with PURSE.md's test keys; ``clock`` makes its idea of today the test's."""
    card = VirtualPurse(
        serial=serial if isinstance(serial, bytes) else serial_of(serial),
        balance=balance,
        master_key=MASTER_KEY,
        master_tac_key=MASTER_TAC_KEY,
        expiry=expiry,
        card_type=card_type,
        status=status,
        counter=counter,
        random=random,
    )
    if clock is not None:
        card.today = clock.today
    return card
