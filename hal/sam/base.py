"""The SAM contract.

The interface is stateless, keyed on the whole purchase, so that a hardware PSAM on a
second PC/SC slot (which derives the session key inside itself from the same inputs)
fits behind it without the tap loop changing.
"""

from __future__ import annotations

from typing import Protocol

from protocol.tgp1.crypto import Purchase


class Sam(Protocol):
    def mac1(self, serial: bytes, purchase: Purchase) -> bytes:
        """MAC1 the card will check before it debits."""
        ...

    def check_mac2(self, serial: bytes, purchase: Purchase, mac2: bytes) -> bool:
        """Whether ``mac2`` is the card's genuine answer for this purchase."""
        ...

    def close(self) -> None: ...
