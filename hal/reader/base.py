"""The reader contract every backend (``sim``, ``pcsc``) fulfils.

A reader is used from one thread, the card loop's. It never raises on a missing reader
or a dead PC/SC service while waiting: it reports that in :attr:`Reader.state` and keeps
trying, so taps resume by themselves when the hardware comes back.
"""

from __future__ import annotations

import enum
from typing import Protocol


class ReaderState(enum.Enum):
    READY = "ready"  # the reader is there and waiting for cards
    NO_READER = "no_reader"  # the service runs but the configured reader is absent
    NO_SERVICE = "no_service"  # the PC/SC service (or the simulator) is not reachable
    CLOSED = "closed"


class CardLink(Protocol):
    """A card in the field with a connection open to it."""

    @property
    def atr(self) -> bytes: ...

    def transmit(self, apdu: bytes) -> bytes:
        """Send one C-APDU and return the R-APDU (data and status word).

        Raises :class:`protocol.errors.CardGone` when the card left the field or the
        reader lost it mid-exchange.
        """
        ...

    def release(self) -> None:
        """Close the connection; the card may still be in the field."""
        ...


class Reader(Protocol):
    @property
    def name(self) -> str:
        """The reader actually in use (e.g. the PC/SC reader name), or the configured one."""
        ...

    @property
    def state(self) -> ReaderState: ...

    def open(self) -> None:
        """Start using the reader; raises HardwareUnavailable only if it can never work."""
        ...

    def wait_for_card(self, timeout: float) -> CardLink | None:
        """Block up to ``timeout`` seconds for a card; return it connected, or None."""
        ...

    def wait_for_removal(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds until the card in the field leaves; True if gone."""
        ...

    def close(self) -> None: ...
