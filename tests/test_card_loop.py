"""The card loop and its listeners: what a tap causes is handed to the loop as a list,
run in order after each tap; one that raises is logged, the others still run, and the
loop goes on taking taps (a listener's fault never stops the gate)."""

from __future__ import annotations

import logging
import threading

import pytest

from daemon.loop import CardLoop
from daemon.outcome import Outcome, TapResult
from hal.reader.base import ReaderState
from tests.rig import Rig
from tests.waiting import wait_until


def test_a_failing_listener_neither_stops_the_taps_nor_the_listeners_after_it(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[Outcome] = []
    states: list[ReaderState] = []

    def broken(result: TapResult, seconds: float) -> None:
        raise RuntimeError("a listener's own bug")

    def broken_reader(name: str, state: ReaderState) -> None:
        raise RuntimeError("a reader listener's own bug")

    loop = CardLoop(reader=rig.reader, processor=rig.processor,
                    listeners=[broken, lambda result, seconds: seen.append(result.outcome)],
                    reader_listeners=[broken_reader,
                                      lambda name, state: states.append(state)])
    stop = threading.Event()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            loop.run(stop)
        except BaseException as err:  # what would end the card loop's task
            failed.append(err)

    thread = threading.Thread(target=run, name="card-loop")
    with caplog.at_level(logging.ERROR, logger="tapgate.loop"):
        thread.start()
        try:
            for serial in (1, 2):
                rig.reader.present(rig.card(serial))
                wait_until(lambda n=serial: len(seen) == n or bool(failed),
                           f"tap {serial} to reach the listener after the broken one")
                rig.reader.remove()
        finally:
            stop.set()
            thread.join(10)
    assert not failed and not thread.is_alive()
    assert seen == [Outcome.ACCEPTED, Outcome.ACCEPTED]
    assert rig.gate.passages == 2
    assert states == [ReaderState.READY]
    failures = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert sum("tap listener" in m and "broken" in m for m in failures) == 2
    assert sum("reader listener" in m and "broken_reader" in m for m in failures) == 1
