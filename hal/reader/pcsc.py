"""A PC/SC reader through pcscd, with pyscard's low-level ``smartcard.scard`` API.

pyscard's CardMonitor is not used: its thread dies silently on SCARD_E_NO_SERVICE.
Instead the card loop's own thread polls with bounded ``SCardGetStatusChange`` calls
and repairs what it finds broken:

- the service died or restarted (the context is dead): release it and establish a new
  one every ``poll_s`` (``reader.poll_s``) until pcscd answers again (state NO_SERVICE);
- the reader is gone (unplugged, or pcscd came back without it): look for a reader that
  matches ``name`` (``reader.name``) again, waking on the ``\\\\?PnP?\\Notification``
  pseudo-reader where pcscd offers it, and every ``poll_s`` anyway (state NO_READER).

A card is handed out once per presentation: after the card loop got it, it is not handed
out again until it has been seen leaving the field. pcsc-lite counts card insertions and
removals in the high word of the reader's event state, so a card taken away and put back
between two looks is still seen as a new presentation.

The card is connected exclusively: a debit is a sequence (INITIALIZE, DEBIT) that another
process must not interleave with (any other command ends the card's purchase session),
and a gate's reader belongs to the gate. A connection refused because another process
holds the card is retried.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import threading
import time
from dataclasses import dataclass

from smartcard import scard

from hal.reader.base import CardLink, ReaderState
from protocol.errors import CardGone, HardwareUnavailable

log = logging.getLogger("tapgate.reader")

PNP_NOTIFICATION = "\\\\?PnP?\\Notification"

_OK = scard.SCARD_S_SUCCESS
# The context is dead: pcscd stopped, restarted or dropped us. Re-establish.
_SERVICE_LOST = frozenset({
    scard.SCARD_E_NO_SERVICE,
    scard.SCARD_E_SERVICE_STOPPED,
    scard.SCARD_F_COMM_ERROR,  # what a call in progress gets when pcscd dies
    scard.SCARD_E_INVALID_HANDLE,
    scard.SCARD_E_SYSTEM_CANCELLED,
    scard.SCARD_F_INTERNAL_ERROR,
    scard.SCARD_F_UNKNOWN_ERROR,
    scard.SCARD_E_UNEXPECTED,
    scard.SCARD_E_NO_MEMORY,
    scard.SCARD_E_SERVER_TOO_BUSY,
})
# The reader went away while the service stayed.
_READER_LOST = frozenset({
    scard.SCARD_E_UNKNOWN_READER,
    scard.SCARD_E_READER_UNAVAILABLE,
    scard.SCARD_E_NO_READERS_AVAILABLE,
})
# No card to connect to, or none worth trying again before it changes.
_NO_CARD = frozenset({
    scard.SCARD_W_REMOVED_CARD,
    scard.SCARD_E_NO_SMARTCARD,
    scard.SCARD_W_UNRESPONSIVE_CARD,
    scard.SCARD_W_UNPOWERED_CARD,
    scard.SCARD_W_UNSUPPORTED_CARD,
    scard.SCARD_E_PROTO_MISMATCH,
    scard.SCARD_E_NOT_READY,
    scard.SCARD_E_SHARING_VIOLATION,
    scard.SCARD_E_TIMEOUT,
})

_PYSCARD_ERRORS = (scard.error, SystemError)
_STATE_GONE = scard.SCARD_STATE_UNKNOWN | scard.SCARD_STATE_IGNORE | scard.SCARD_STATE_UNAVAILABLE
_MAX_WAIT_S = 1.0  # longest single wait on pcscd: a missed notification costs at most this
_PNP_MIN_S = 0.05  # rescans woken by PnP notifications come no faster than this


def _code(hresult: int) -> int:
    return hresult & 0xFFFFFFFF


def _describe(hresult: int) -> str:
    text = str(scard.SCardGetErrorMessage(hresult)).rstrip(". ")
    return f"{text} (0x{_code(hresult):08X})"


def _ms(seconds: float) -> int:
    return max(0, int(seconds * 1000))


@dataclass(slots=True)
class _Field:
    """What the reader last saw, in pcscd's words."""

    event_state: int = scard.SCARD_STATE_UNAWARE
    atr: bytes = b""

    @property
    def in_field(self) -> bool:
        return bool(self.event_state & scard.SCARD_STATE_PRESENT)

    @property
    def usable(self) -> bool:
        """A card is there and answered its reset (a mute card is in the field too)."""
        return self.in_field and not self.event_state & scard.SCARD_STATE_MUTE

    @property
    def events(self) -> int:
        """pcsc-lite's count of insertions and removals (0 where the service has none)."""
        return (self.event_state >> 16) & 0xFFFF


class PcscCardLink:
    def __init__(self, reader: PcscReader, *, card: int, protocol: int, atr: bytes) -> None:
        self._reader = reader
        self._card = card
        self._protocol = protocol
        self._atr = atr
        self._released = False

    @property
    def atr(self) -> bytes:
        return self._atr

    def transmit(self, apdu: bytes) -> bytes:
        """Every failed exchange is :class:`CardGone`: the card left (removed, reset, mute,
        torn), or the reader or pcscd went away; in each case what the card did is unknown.
        """
        if self._released:
            raise CardGone("the connection to the card is closed")
        try:
            hresult, response = scard.SCardTransmit(self._card, self._protocol, list(apdu))
        except _PYSCARD_ERRORS as err:
            raise CardGone(f"{self._reader.name}: {err}") from err
        if _code(hresult) != _OK:
            # Whatever the cause, the outcome on the card is unknown: that is a tear. A
            # lost service or reader is repaired by the reader's next look.
            raise CardGone(f"{self._reader.name}: {_describe(hresult)}")
        if not response:
            # vpcd (and some drivers) report a card that left mid-exchange as an empty
            # success; a card always answers at least a status word.
            raise CardGone(f"{self._reader.name}: the card answered nothing")
        return bytes(response)

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        try:
            hresult = scard.SCardDisconnect(self._card, scard.SCARD_LEAVE_CARD)
        except _PYSCARD_ERRORS as err:
            log.debug("disconnect from %s: %r", self._reader.name, err)
            return
        if _code(hresult) != _OK:
            log.debug("disconnect from %s: %s", self._reader.name, _describe(hresult))


class PcscReader:
    def __init__(self, *, name: str = "*", poll_s: float = 0.25) -> None:
        self._pattern = name
        self._poll_s = poll_s
        self._state = ReaderState.CLOSED
        self._closing = threading.Event()
        self._busy = threading.Lock()  # held by the card loop while it talks to pcscd
        self._context: int | None = None
        self._reader: str | None = None  # the PC/SC name of the reader in use
        self._field = _Field()
        self._held = False  # the card now in the field was handed out: not again
        self._held_events: int | None = None  # its insertion count, in this context
        self._warned: set[int] = set()

    # -- the Reader contract -----------------------------------------------------------
    @property
    def name(self) -> str:
        return self._reader or self._pattern

    @property
    def state(self) -> ReaderState:
        return self._state

    def open(self) -> None:
        if self._closing.is_set():
            raise HardwareUnavailable("reader", "the PC/SC reader is closed")
        with self._busy:
            if self._state is ReaderState.CLOSED:
                try:
                    self._look(0.0)
                except _PYSCARD_ERRORS as err:
                    self._broken(err)
                if self._state is ReaderState.CLOSED:  # only a concurrent close() does this
                    self._state = ReaderState.NO_SERVICE

    def close(self) -> None:
        self._closing.set()
        context = self._context
        if context is not None:
            # wakes a wait in progress on the card loop's thread (SCardCancel is the one
            # call PC/SC allows on a context another thread is using)
            with contextlib.suppress(*_PYSCARD_ERRORS):
                scard.SCardCancel(context)
        if self._busy.acquire(timeout=5.0):
            try:
                self._drop_context()
            finally:
                self._busy.release()
        self._state = ReaderState.CLOSED

    def wait_for_card(self, timeout: float) -> CardLink | None:
        deadline = time.monotonic() + max(0.0, timeout)
        with self._busy:
            while True:
                self._check_open()
                try:
                    if self._look(deadline - time.monotonic()) and self._new_card():
                        link = self._connect()
                        if link is not None:
                            return link
                except _PYSCARD_ERRORS as err:
                    self._broken(err)
                if time.monotonic() >= deadline:
                    return None

    def wait_for_removal(self, timeout: float) -> bool:
        deadline = time.monotonic() + max(0.0, timeout)
        with self._busy:
            while True:
                self._check_open()
                try:
                    if self._look(deadline - time.monotonic()) and not self._field.in_field:
                        return True
                except _PYSCARD_ERRORS as err:
                    self._broken(err)
                if self._state is ReaderState.NO_READER:
                    return True  # no card is in the field of a reader that is not there
                if time.monotonic() >= deadline:
                    return False

    # -- looking at the reader ---------------------------------------------------------
    def _check_open(self) -> None:
        if self._closing.is_set() or self._state is ReaderState.CLOSED:
            raise HardwareUnavailable("reader", "the PC/SC reader is closed")

    def _look(self, wait_s: float) -> bool:
        """Wait up to ``wait_s`` for the field to change; True if :attr:`_field` is current.

        Never raises for a missing service or reader: it notes the state, waits a poll
        interval and returns False.
        """
        wait_s = max(0.0, wait_s)
        if self._context is None and not self._establish():
            self._pause(min(wait_s, self._poll_s))
            return False
        context = self._context
        assert context is not None
        if self._reader is None and not self._find_reader(context, min(wait_s, self._poll_s)):
            return False
        reader = self._reader
        assert reader is not None
        hresult, states = scard.SCardGetStatusChange(
            context, _ms(min(wait_s, _MAX_WAIT_S)), [(reader, self._field.event_state)])
        code = _code(hresult)
        if code == scard.SCARD_E_TIMEOUT:
            self._set_state(ReaderState.READY)
            return True
        if code == _OK:
            _, event_state, atr = states[0]
            if event_state & _STATE_GONE:
                self._lose_reader("it left the reader list")
                self._pause(min(wait_s, self._poll_s))
                return False
            self._see(_Field(event_state & ~scard.SCARD_STATE_CHANGED, bytes(atr)))
            self._set_state(ReaderState.READY)
            return True
        self._failed(hresult, "waiting for a card")
        self._pause(min(wait_s, self._poll_s))
        return False

    def _see(self, field: _Field) -> None:
        if self._held:
            if not field.in_field:
                self._held = False  # the handled card left
            elif self._held_events is not None and field.events != self._held_events:
                self._held = False  # it left and a card came back between two looks
        self._field = field

    def _new_card(self) -> bool:
        return self._field.usable and not self._held

    def _connect(self) -> PcscCardLink | None:
        context, reader = self._context, self._reader
        assert context is not None and reader is not None
        hresult, card, protocol = scard.SCardConnect(
            context, reader, scard.SCARD_SHARE_EXCLUSIVE,
            scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1)
        if _code(hresult) != _OK:
            if _code(hresult) in _NO_CARD:
                log.debug("no usable card on %s: %s", reader, _describe(hresult))
            else:
                self._failed(hresult, "connecting to the card")
            return None
        self._held = True
        self._held_events = self._field.events
        return PcscCardLink(self, card=card, protocol=protocol, atr=self._field.atr)

    # -- repairing what broke ----------------------------------------------------------
    def _establish(self) -> bool:
        hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        if _code(hresult) != _OK:
            self._set_state(ReaderState.NO_SERVICE, _describe(hresult))
            return False
        self._context = context
        self._held_events = None  # pcscd's event counts start again with each context
        self._field = _Field()
        return True

    def _find_reader(self, context: int, wait_s: float) -> bool:
        hresult, names = scard.SCardListReaders(context, [])
        code = _code(hresult)
        if code not in (_OK, scard.SCARD_E_NO_READERS_AVAILABLE):
            self._failed(hresult, "listing readers")
            self._pause(wait_s)
            return False
        names = list(names) if code == _OK else []
        chosen = self._match(names)
        if chosen is None:
            self._held = False  # no card can stay in the field of an absent reader
            self._set_state(ReaderState.NO_READER, f"none of {names} matches {self._pattern!r}")
            self._wait_for_readers(context, len(names), wait_s)
            return False
        self._reader = chosen
        self._field = _Field()
        return True

    def _match(self, names: list[str]) -> str | None:
        if self._pattern in names:
            return self._pattern
        return next((n for n in names if fnmatch.fnmatchcase(n, self._pattern)), None)

    def _wait_for_readers(self, context: int, count: int, wait_s: float) -> None:
        """Sleep until the reader list may have changed: pcscd's PnP notification where
        it has one, never longer than ``wait_s``."""
        started = time.monotonic()
        hresult, _ = scard.SCardGetStatusChange(context, _ms(wait_s),
                                                [(PNP_NOTIFICATION, count << 16)])
        code = _code(hresult)
        if code in _SERVICE_LOST:
            self._failed(hresult, "waiting for readers")
        # no PnP support, or a service that keeps saying "changed": do not spin
        floor = wait_s if code not in (_OK, scard.SCARD_E_TIMEOUT) else min(wait_s, _PNP_MIN_S)
        self._pause(floor - (time.monotonic() - started))

    def _failed(self, hresult: int, doing: str) -> None:
        code = _code(hresult)
        if code in _READER_LOST:
            self._lose_reader(_describe(hresult))
        elif code == scard.SCARD_E_CANCELLED:
            pass  # close() woke us
        else:
            if code not in _SERVICE_LOST and code not in self._warned:
                self._warned.add(code)  # once per kind until the reader works again
                log.warning("PC/SC error %s: %s; starting over", doing, _describe(hresult))
            self._drop_context()
            self._set_state(ReaderState.NO_SERVICE, _describe(hresult))

    def _broken(self, err: Exception) -> None:
        # pyscard raises instead of returning a code in a few corners (e.g. a call on a
        # context pcscd never granted); starting over with a new context is the cure.
        log.warning("pyscard failed: %r; starting over", err)
        self._drop_context()
        self._set_state(ReaderState.NO_SERVICE, str(err))
        self._pause(self._poll_s)

    def _lose_reader(self, why: str) -> None:
        self._reader = None
        self._field = _Field()
        self._held = False  # no card can stay in the field of an absent reader
        self._set_state(ReaderState.NO_READER, why)

    def _drop_context(self) -> None:
        context, self._context = self._context, None
        self._reader = None
        self._field = _Field()
        self._held_events = None
        if context is not None:
            with contextlib.suppress(*_PYSCARD_ERRORS):
                scard.SCardReleaseContext(context)

    def _pause(self, seconds: float) -> None:
        if seconds > 0:
            self._closing.wait(seconds)

    def _set_state(self, state: ReaderState, why: str = "") -> None:
        if self._closing.is_set() or state is self._state:
            return
        before, self._state = self._state, state
        again = "" if before is ReaderState.CLOSED else f" (was {before.value})"
        if state is ReaderState.READY:
            self._warned.clear()
            log.info("reader %s ready%s", self._reader, again)
        elif state is ReaderState.NO_READER:
            log.info("no reader matches %r%s: %s", self._pattern, again, why)
        else:
            log.info("PC/SC service unavailable%s: %s", again, why)
