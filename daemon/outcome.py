"""What a tap came to, as the passenger and the operator see it."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Outcome(enum.Enum):
    ACCEPTED = "accepted"  # debited (or a free pass) and the gate opened
    RECOVERED = "recovered"  # a torn debit was found on the card; opened with no new debit
    REFUSED = "refused"  # denied with a reason; nothing debited
    TAP_AGAIN = "tap_again"  # the exchange broke; the passenger is asked to tap again
    OUT_OF_SERVICE = "out_of_service"  # the gate cannot take debits (journal unwritable)


@dataclass(frozen=True, slots=True)
class TapResult:
    outcome: Outcome
    reason: str = ""
    serial: bytes | None = None
    amount: int = 0
    balance: int | None = None
    entry_id: int | None = None
    torn: bool = False  # a tear was journalled by this tap

    @property
    def opened(self) -> bool:
        return self.outcome in (Outcome.ACCEPTED, Outcome.RECOVERED)

    def describe(self) -> str:
        card = self.serial.hex().upper() if self.serial else "unknown card"
        text = f"{card}: {self.outcome.value}"
        if self.opened and self.amount:
            text += f", {self.amount / 100:.2f} debited"
        if self.balance is not None:
            text += f", balance {self.balance / 100:.2f}"
        if self.reason:
            text += f" ({self.reason})"
        return text
