"""The card loop: one thread that owns the reader and is the journal's only writer.

pyscard and peewee block, so the loop runs in its own thread, never on the event loop.
Between taps it settles housekeeping from the journal (tears whose window closed).
Its heartbeat is the liveness the service watchdog reports: it only advances when the
loop really goes round.

What a tap causes besides the gate's own signals (counting it, logging it, waking the
uplink, a beacon window) is the listeners' business, handed to the loop when it is
built; so is what a change of the reader's state causes.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Sequence

from daemon.outcome import Outcome, TapResult
from daemon.tap import TapProcessor
from hal.reader.base import Reader, ReaderState

log = logging.getLogger("tapgate.loop")
tap_log = logging.getLogger("tapgate.tap")

WAIT_SLICE_S = 0.25  # how long one wait for a card may block the loop
SWEEP_EVERY_S = 5.0
CHECKPOINT_IDLE_S = 1.0  # when idle, fold the WAL back at most this often

# After each tap, in the card loop's thread, with what came of it and how long it took
# (card in the field to outcome shown). The next passenger waits for it: it must not
# block. One that raises is logged and the others still run: a listener's fault never
# stops the taps.
TapListener = Callable[[TapResult, float], None]
# When the reader's state changes, with the reader's name (a PC/SC reader's is known
# once it is found).
ReaderListener = Callable[[str, ReaderState], None]


def log_tap(result: TapResult, seconds: float) -> None:
    """A TapListener: the tap in the log, with the card, the outcome and the entry."""
    level = logging.INFO if result.outcome is not Outcome.OUT_OF_SERVICE else logging.ERROR
    tap_log.log(level, "tap %s [%.1f ms]", result.describe(), seconds * 1000,
                extra={"card_serial": (result.serial or b"").hex().upper(),
                       "outcome": result.outcome.value, "journal_id": result.entry_id})


def on_passage(action: Callable[[], object]) -> TapListener:
    """A TapListener that runs ``action`` after each tap that opened the gate."""

    def listener(result: TapResult, seconds: float) -> None:
        if result.opened:
            action()

    return listener


class CardLoop:
    def __init__(self, *, reader: Reader, processor: TapProcessor,
                 listeners: Sequence[TapListener] = (),
                 reader_listeners: Sequence[ReaderListener] = ()) -> None:
        self._reader = reader
        self._processor = processor
        self._listeners = tuple(listeners)
        self._reader_listeners = tuple(reader_listeners)
        self.heartbeat = time.monotonic()
        self.taps = 0
        self.ready = threading.Event()  # the reader is open and interrupted debits settled
        self._last_state: ReaderState | None = None

    def run(self, stop: threading.Event) -> None:
        """Take taps until ``stop`` is set. Raises only on faults the supervisor must see."""
        self._reader.open()
        self._processor.settle_interrupted()
        # What start-up loaded (modules, config, connections) lives as long as the
        # process: put it out of the collector's reach, so that a full collection walks
        # only what came since, not the whole heap (~10 ms, during which it holds every
        # thread, the card loop's included).
        gc.collect()
        gc.freeze()
        self.ready.set()
        # both due at once: from the loop's start (a monotonic reading means nothing
        # against 0; it may be small on a machine just booted)
        next_sweep = next_checkpoint = time.monotonic()
        while not stop.is_set():
            self.heartbeat = time.monotonic()
            self._note_state()
            if self.heartbeat >= next_sweep:
                self._processor.expire_recoveries()
                self._processor.checkpoint()  # bounds the WAL even when taps never stop
                next_sweep = self.heartbeat + SWEEP_EVERY_S
            link = self._reader.wait_for_card(WAIT_SLICE_S)
            if link is None:
                if self.heartbeat >= next_checkpoint:
                    self._processor.checkpoint()
                    next_checkpoint = self.heartbeat + CHECKPOINT_IDLE_S
                continue
            if stop.is_set():  # stopping: no tap may start after STOPPING=1
                link.release()
                break
            started = time.perf_counter()
            try:
                result = self._processor.handle(link)
            finally:
                link.release()
            self.taps += 1
            seconds = time.perf_counter() - started
            for listener in self._listeners:
                try:
                    listener(result, seconds)
                except Exception:
                    log.exception("tap listener %s failed", _name(listener))

    def _note_state(self) -> None:
        state = self._reader.state
        if state is not self._last_state:
            log.info("reader %s: %s", self._reader.name, state.value)
            self._last_state = state
            for reader_listener in self._reader_listeners:
                try:
                    reader_listener(self._reader.name, state)
                except Exception:
                    log.exception("reader listener %s failed", _name(reader_listener))


def _name(listener: Callable[..., object]) -> str:
    return getattr(listener, "__qualname__", None) or repr(listener)
