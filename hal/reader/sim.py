"""An in-process reader whose cards are :class:`hal.card.model.VirtualPurse` objects.

Tests (or the daemon's demo passengers of ``make run``) put cards in the field with
:meth:`present` and take them out with :meth:`remove`; the card loop sees them exactly as
it would see cards on a PC/SC reader, tears included.
"""

from __future__ import annotations

import threading

from hal.card.model import CardTorn, VirtualPurse
from hal.reader.base import CardLink, ReaderState
from protocol.errors import CardGone, HardwareUnavailable


class SimCardLink:
    def __init__(self, reader: SimReader, card: VirtualPurse, presentation: int) -> None:
        self._reader = reader
        self._card = card
        self._presentation = presentation
        self._released = False

    @property
    def atr(self) -> bytes:
        return self._card.atr

    def transmit(self, apdu: bytes) -> bytes:
        if self._released:
            raise CardGone("the connection to the card is closed")
        if not self._reader._in_field(self._presentation):
            raise CardGone("the card left the field")
        try:
            return self._card.process(apdu)
        except CardTorn as err:
            self._reader._torn(self._presentation)
            raise CardGone(str(err)) from err

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._reader._released(self._presentation)


class SimReader:
    def __init__(self, *, name: str = "sim") -> None:
        self._name = name
        self._cond = threading.Condition()
        self._card: VirtualPurse | None = None
        self._presentation = 0  # increments on every entry into the field
        self._handed = 0  # the last presentation given to the card loop
        self._done = 0  # the last presentation the card loop released
        self._state = ReaderState.CLOSED

    # -- the Reader contract -----------------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    @property
    def state(self) -> ReaderState:
        return self._state

    def open(self) -> None:
        with self._cond:
            if self._state is ReaderState.CLOSED:
                self._state = ReaderState.READY
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._state = ReaderState.CLOSED
            self._cond.notify_all()

    def wait_for_card(self, timeout: float) -> CardLink | None:
        with self._cond:
            ready = self._cond.wait_for(
                lambda: self._state is ReaderState.CLOSED
                or (self._state is ReaderState.READY and self._card is not None
                    and self._handed < self._presentation),
                timeout,
            )
            if not ready or self._card is None or self._state is not ReaderState.READY:
                if self._state is ReaderState.CLOSED:
                    raise HardwareUnavailable("reader", "the simulated reader is closed")
                return None
            self._handed = self._presentation
            return SimCardLink(self, self._card, self._presentation)

    def wait_for_removal(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._card is None, timeout)

    # -- driving it (tests, the demo) --------------------------------------------------
    def wait_until_open(self, timeout: float) -> bool:
        """Block until the reader is open (the card loop opened it), up to ``timeout``."""
        with self._cond:
            return self._cond.wait_for(lambda: self._state is not ReaderState.CLOSED, timeout)

    def wait_until_closed(self, timeout: float) -> bool:
        """Block until the reader is closed, up to ``timeout``."""
        with self._cond:
            return self._cond.wait_for(lambda: self._state is ReaderState.CLOSED, timeout)

    def present(self, card: VirtualPurse) -> None:
        """Put ``card`` in the field (removing any card already there)."""
        card.power_on()
        with self._cond:
            self._card = card
            self._presentation += 1
            self._cond.notify_all()

    def remove(self) -> None:
        with self._cond:
            self._card = None
            self._cond.notify_all()

    def set_state(self, state: ReaderState) -> None:
        """Pretend the reader or its service went away (or came back)."""
        with self._cond:
            self._state = state
            self._cond.notify_all()

    def wait_until_handled(self, timeout: float) -> bool:
        """Block until the card loop has released the current presentation."""
        with self._cond:
            return self._cond.wait_for(lambda: self._done >= self._presentation, timeout)

    # -- called by links ---------------------------------------------------------------
    def _in_field(self, presentation: int) -> bool:
        with self._cond:
            return self._card is not None and self._presentation == presentation

    def _torn(self, presentation: int) -> None:
        with self._cond:
            if self._presentation == presentation:
                self._card = None
                self._cond.notify_all()

    def _released(self, presentation: int) -> None:
        with self._cond:
            self._done = max(self._done, presentation)
            self._cond.notify_all()
