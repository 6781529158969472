"""A gate I/O driver shared by the card loop and the operators' commands."""

from __future__ import annotations

import threading

from hal.gate.base import GateIO, Signal


class SharedGateIO:
    """The gate I/O of the card loop, shared with an operator's open_gate (the commands'
    thread): one call into the driver at a time."""

    def __init__(self, inner: GateIO) -> None:
        self._inner = inner
        self._lock = threading.Lock()

    def open_for_passage(self) -> None:
        with self._lock:
            self._inner.open_for_passage()

    def show(self, signal: Signal, text: str) -> None:
        with self._lock:
            self._inner.show(signal, text)

    def beep(self, signal: Signal) -> None:
        with self._lock:
            self._inner.beep(signal)

    def close(self) -> None:
        self._inner.close()
