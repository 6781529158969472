"""The daemon: build the gate from config, run its supervised tasks until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from dataclasses import dataclass
from typing import Any

from daemon.config import Config
from daemon.journal import Journal
from daemon.loop import CardLoop
from daemon.outcome import Outcome, TapResult
from daemon.supervisor import supervise
from daemon.tap import TapProcessor
from hal.gate.base import GateIO
from hal.reader.base import Reader
from hal.registry import backend_class
from hal.sam.base import Sam

log = logging.getLogger("tapgate")
tap_log = logging.getLogger("tapgate.tap")


@dataclass
class Gate:
    """Everything one gate is made of, built from config before anything runs."""

    config: Config
    journal: Journal
    reader: Reader
    sam: Sam
    gateio: GateIO
    processor: TapProcessor
    card_loop: CardLoop

    def close(self) -> None:
        for part in (self.reader, self.gateio, self.sam, self.journal):
            try:
                part.close()
            except Exception:  # closing must go on for the other parts
                log.exception("closing %s", type(part).__name__)


def _report_tap(result: TapResult, seconds: float) -> None:
    level = logging.INFO if result.outcome is not Outcome.OUT_OF_SERVICE else logging.ERROR
    tap_log.log(level, "tap %s [%.1f ms]", result.describe(), seconds * 1000,
                extra={"card_serial": (result.serial or b"").hex().upper(),
                       "outcome": result.outcome.value, "journal_id": result.entry_id})


def build(config: Config) -> Gate:
    """Construct backends (by name, through the registry) and open the journal."""
    sam: Sam = backend_class("sam", config.sam.backend).from_config(config)
    gateio: GateIO = backend_class("gateio", config.gateio.backend).from_config(config)
    reader: Reader = backend_class("reader", config.reader.backend).from_config(config)
    journal = Journal(config.journal.path).open()
    processor = TapProcessor(gate_config=config.gate, journal=journal, sam=sam, gate=gateio)
    card_loop = CardLoop(reader=reader, processor=processor, on_tap=_report_tap)
    return Gate(config, journal, reader, sam, gateio, processor, card_loop)


async def _serve(gate: Gate) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    thread_stop = threading.Event()

    async def card_loop() -> None:
        await asyncio.to_thread(gate.card_loop.run, thread_stop)

    tasks: dict[str, Any] = {"card-loop": card_loop}
    running = [asyncio.create_task(supervise(name, body, stop), name=name)
               for name, body in tasks.items()]
    log.info("tapgate running: terminal %s, reader %s (%s), journal %s",
             gate.config.gate.terminal_id.hex().upper(), gate.reader.name,
             gate.config.reader.backend, gate.config.journal.path)
    await stop.wait()
    log.info("stopping")
    thread_stop.set()
    await asyncio.gather(*running, return_exceptions=True)


def run(config: Config) -> int:
    gate = build(config)
    try:
        asyncio.run(_serve(gate))
    finally:
        gate.close()
    log.info("stopped cleanly")
    return 0
