"""Journal entries written by hand, as the tap processor would write them: a debit's intent
and a refusal, of one card at the test terminal unless told otherwise."""

from __future__ import annotations

from protocol.entry import INTENT, KIND_DEBIT, KIND_REFUSAL, REFUSED, Draft
from tests.cards import TERMINAL_ID, serial_of

SERIAL = serial_of(7)


def intent(seq: int, amount: int = 250, *, serial: bytes = SERIAL) -> Draft:
    """A debit's intent with everything the card said, ``seq`` its card counter and its
    terminal seq alike."""
    return Draft(kind=KIND_DEBIT, state=INTENT, terminal_id=TERMINAL_ID, amount=amount,
                 card_serial=serial, card_type=1, balance_before=5000, card_counter=seq,
                 card_random=bytes.fromhex("A1B2C3D4"), terminal_seq=seq, tx_date="20260504",
                 tx_time="080000")


def refusal(reason: str = "card blocked", *, serial: bytes | None = SERIAL,
            terminal_id: bytes = TERMINAL_ID) -> Draft:
    return Draft(kind=KIND_REFUSAL, state=REFUSED, terminal_id=terminal_id, reason=reason,
                 card_serial=serial)
