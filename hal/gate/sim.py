"""A gate with no hardware: it logs what a real gate would do and remembers it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from hal.gate.base import Signal

log = logging.getLogger("tapgate.gate")


@dataclass(frozen=True, slots=True)
class GateEvent:
    what: str  # "open", "show", "beep" or "button"
    signal: Signal | None = None
    text: str = ""


class SimGateIO:
    def __init__(self, *, history: int = 1000, hang_after: int = 0,
                 on_button: Callable[[], object] | None = None) -> None:
        self._lock = threading.Lock()
        self._hang_after = hang_after
        self._hung = threading.Event()
        self._history = history
        self.events: list[GateEvent] = []
        self.passages = 0
        self._on_button = on_button

    def _record(self, event: GateEvent) -> None:
        with self._lock:
            self.events.append(event)
            if len(self.events) > self._history:
                del self.events[: len(self.events) - self._history]

    def open_for_passage(self) -> None:
        with self._lock:
            self.passages += 1
            hang = self.passages == self._hang_after
        if hang:  # a relay driver that never returns, as a wedged GPIO expander does
            log.error("sim: the relay driver hangs (gateio.sim_hang_after = %d)", self._hang_after)
            self._hung.wait()
        self._record(GateEvent("open"))
        log.debug("flap opened for one passage")

    def show(self, signal: Signal, text: str) -> None:
        self._record(GateEvent("show", signal, text))
        log.debug("indicator %s: %s", signal.value, text)

    def beep(self, signal: Signal) -> None:
        self._record(GateEvent("beep", signal))

    def press_button(self) -> None:
        """The service button, pressed (a test, or the simulator's operator)."""
        self._record(GateEvent("button"))
        if self._on_button is not None:
            self._on_button()

    def close(self) -> None:
        self._hung.set()
