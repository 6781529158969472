"""The gate I/O contract: open for one passage, show a signal, beep.

A backend takes ``on_button`` (called from the driver's own thread whenever the gate's
service button is pressed: it triggers the beacon) as a keyword argument when it is
built."""

from __future__ import annotations

import enum
from typing import Protocol


class Signal(enum.Enum):
    ACCEPT = "accept"
    DENY = "deny"
    TAP_AGAIN = "tap_again"
    OUT_OF_SERVICE = "out_of_service"


class GateIO(Protocol):
    def open_for_passage(self) -> None:
        """Release the flap for exactly one passenger."""
        ...

    def show(self, signal: Signal, text: str) -> None:
        """Light the indicator for ``signal`` with a short passenger-facing text."""
        ...

    def beep(self, signal: Signal) -> None: ...

    def close(self) -> None: ...
