"""The daemon: build the gate from config, run its supervised tasks until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from daemon import __version__, backends, demo
from daemon.config import Config
from daemon.journal import Journal
from daemon.loop import CardLoop
from daemon.metrics import (
    Metrics,
    beacon_lines,
    journal_gauges,
    serve_http,
    write_textfile,
)
from daemon.notify import Notifier, run_watchdog
from daemon.outcome import Outcome, TapResult
from daemon.status import StatusBoard, run_status_writer
from daemon.supervisor import supervise
from daemon.sync.handlers import GateControl, effective_config
from daemon.sync.retention import run_retention
from daemon.tap import TapProcessor
from hal.gate.base import GateIO
from hal.gate.shared import SharedGateIO
from hal.reader.base import Reader, ReaderState
from hal.sam.base import Sam
from protocol import devicekey
from protocol.errors import TapgateError

if TYPE_CHECKING:
    from daemon.beacon.controller import BeaconController
    from daemon.sync.commands import Commands
    from daemon.sync.uplink import Uplink

log = logging.getLogger("tapgate")
STOP_GRACE_S = 10.0  # under the unit's TimeoutStopSec=20
EXIT_HUNG = 70  # EX_SOFTWARE
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
    metrics: Metrics
    board: StatusBoard
    uplink: Uplink | None = None  # only with [mqtt] host set
    commands: Commands | None = None  # operators' commands: with the uplink
    beacon: BeaconController | None = None  # with [beacon] enabled
    started: float = field(default_factory=time.monotonic)

    def render_metrics(self) -> str:
        journal = journal_gauges(self.journal, time.time())
        text = self.metrics.render(journal, self.journal.recovery_counts())
        if self.beacon is not None:
            text += "\n".join(beacon_lines(self.beacon.state())) + "\n"
        return text

    def telemetry(self) -> dict[str, Any]:
        """What the retained status carries (read in the uplink's thread)."""
        gauges = journal_gauges(self.journal, time.time())
        disk = self.journal.disk_used_pct()
        alarms: dict[str, str] = {}
        if disk >= self.config.mqtt.disk_alarm_pct:
            alarms["disk"] = (f"journal disk {disk:.1f}% full "
                              f"(alarm at {self.config.mqtt.disk_alarm_pct:g}%)")
        if self.processor.out_of_service:
            alarms["out_of_service"] = self.processor.out_of_service
        return {
            "version": __version__,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "taps": self.metrics.taps(),
            "tears": self.metrics.tears,
            "recoveries": self.journal.recovery_counts(),
            "pending_sync": gauges.pending_sync,
            "sync_lag_s": round(gauges.sync_lag_s, 3),
            "pending_recoveries": gauges.pending_recoveries,
            "reader": self.reader.state.value,
            "journal": {"entries": gauges.entries, "bytes": gauges.bytes,
                        "disk_used_pct": round(disk, 1)},
            "alarms": alarms,
            **({"beacon": self.beacon.state()} if self.beacon else {}),
            **({"remote": self.commands.control.state(),
                "commands": self.commands.stats.to_json()} if self.commands else {}),
        }

    def info(self) -> dict[str, Any]:
        """The gate's public info, retained on tapgate/v1/<gate>/info: what the back office
        shows a passenger whose phone heard this gate's beacon."""
        from daemon.beacon.controller import info as beacon_info
        from daemon.config import CARD_TYPES

        gate = self.processor.gate_config
        names = {code: name for name, code in CARD_TYPES.items()}
        beacon = self.config.beacon
        return {
            "v": 1, "gate": gate.gate_id, "name": gate.name, "station": gate.station,
            "ts_ms": int(time.time() * 1000),
            "status": "out_of_service" if self.processor.out_of_service else "in_service",
            "fares": {names.get(code, str(code)): fare for code, fare in gate.fares.items()},
            "page_url": gate.page_url or beacon.url,
            "beacon": (beacon_info(beacon, self.beacon.state() if self.beacon else None)
                       if beacon.enabled else None),
        }

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


def build(config: Config, notifier: Notifier | None = None) -> Gate:
    """Construct backends (by name, through the registry) and open the journal."""
    sam = backends.sam(config.sam)
    gateio = backends.gateio(config.gateio)
    reader = backends.reader(config.reader)
    demo.start(reader, config)  # `make run`'s passengers, when [reader] asks for them
    signer = devicekey.load(config.journal.device_key) if config.journal.device_key else None
    journal = Journal(config.journal.path, signer=signer).open()
    gate_config = effective_config(config.gate, journal)  # with what operators set
    if gate_config != config.gate:
        log.info("gate config as operators set it: fares %s, anti-passback %g s, recovery "
                 "window %g s", dict(gate_config.fares), gate_config.anti_passback_s,
                 gate_config.recovery_window_s)
    shared_io = SharedGateIO(gateio)
    processor = TapProcessor(gate_config=gate_config, journal=journal, sam=sam, gate=shared_io,
                             reserve_bytes=config.journal.reserve_bytes)
    metrics = Metrics()
    board = StatusBoard(terminal_id=config.gate.terminal_id, reader_name=reader.name)
    uplink: Uplink | None = None
    if config.mqtt.enabled:
        from daemon.sync.uplink import Uplink  # paho only when there is a broker

        uplink = Uplink(config=config.mqtt, gate_id=config.gate.gate_id, journal=journal)

    beacon = _beacon(config, gateio)

    def on_tap(result: TapResult, seconds: float) -> None:
        metrics.observe_tap(result, seconds)
        board.note_tap(result)
        _report_tap(result, seconds)
        if beacon is not None and result.opened:
            beacon.trigger("tap")  # a phone can learn which gate it passed
        if uplink is not None:
            uplink.notify()  # never waits: the uplink's own thread reads the journal

    def on_state(state: ReaderState) -> None:
        metrics.reader_up = int(state is ReaderState.READY)
        board.set_reader(reader.name, state)  # a PC/SC reader's name is known once found
        if notifier is not None:
            notifier.status(f"reader {reader.name}: {state.value}")

    card_loop = CardLoop(reader=reader, processor=processor, on_tap=on_tap, on_state=on_state)
    gate = Gate(config, journal, reader, sam, gateio, processor, card_loop, metrics, board,
                uplink, beacon=beacon)
    if uplink is not None:
        from daemon.sync.commands import Commands

        uplink.telemetry = gate.telemetry
        uplink.info = gate.info
        link = uplink

        def sync_now() -> dict[str, Any]:
            link.sync_now()
            return {"pending_sync": journal.pending_sync_count(), "connected": link.connected}

        control = GateControl(processor=processor, config=gate_config,
                              telemetry=gate.telemetry, sync_now=sync_now,
                              open_gate=shared_io.open_for_passage,
                              beacon=_command_trigger(beacon))
        gate.commands = Commands(gate_id=config.gate.gate_id, operators=config.operators,
                                 journal=journal, control=control, publish=uplink.publish)
        uplink.on_command = gate.commands.submit
        if not config.operators.keys:
            log.warning("no [operators] keys: every operator command will be refused")
    return gate


def _beacon(config: Config, gateio: GateIO) -> BeaconController | None:
    if not config.beacon.enabled:
        return None
    from daemon.beacon.controller import BeaconController

    advertiser = backends.advertiser(config.beacon)
    beacon = BeaconController(config=config.beacon, advertiser=advertiser)
    def pressed() -> None:
        beacon.trigger("button")

    gateio.on_button(pressed)
    return beacon


def _command_trigger(beacon: BeaconController | None
                     ) -> Callable[[Mapping[str, Any]], dict[str, Any]] | None:
    if beacon is None:
        return None

    def trigger(args: Mapping[str, Any]) -> dict[str, Any]:
        return beacon.trigger("command", args.get("window_s"))

    return trigger


async def _until_ready(gate: Gate, stop: asyncio.Event) -> bool:
    """Wait for the card loop to have the reader open and the journal settled."""
    while not stop.is_set():
        if await asyncio.to_thread(gate.card_loop.ready.wait, 0.2):
            return True
    return False


async def _serve(gate: Gate, notifier: Notifier) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    thread_stop = threading.Event()

    async def card_loop() -> None:
        await asyncio.to_thread(gate.card_loop.run, thread_stop)

    async def watchdog() -> None:
        # WATCHDOG=1 follows the card loop's own heartbeat: a hung loop stops the pings.
        await run_watchdog(notifier, lambda: gate.card_loop.heartbeat, stop,
                           max_staleness_s=gate.config.service.watchdog_staleness_s)

    tasks: dict[str, Any] = {"card-loop": card_loop, "watchdog": watchdog}
    address = gate.config.metrics.address()
    if address is not None:
        async def metrics_http() -> None:
            await serve_http(address[0], address[1], gate.render_metrics, stop)

        tasks["metrics-http"] = metrics_http
    textfile_dir = gate.config.metrics.textfile_dir
    if textfile_dir is not None:
        async def metrics_textfile() -> None:
            while not stop.is_set():
                text = await asyncio.to_thread(gate.render_metrics)
                await asyncio.to_thread(write_textfile, textfile_dir, text)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), gate.config.metrics.interval_s)

        tasks["metrics-textfile"] = metrics_textfile
    uplink = gate.uplink
    if uplink is not None:
        async def sync() -> None:
            await asyncio.to_thread(uplink.run, thread_stop)

        async def retention() -> None:
            await run_retention(gate.journal, gate.config.mqtt.retention_days, stop)

        tasks["sync"] = sync
        tasks["retention"] = retention
    beacon = gate.beacon
    if beacon is not None:
        async def beacon_task() -> None:
            await beacon.run(stop)

        tasks["beacon"] = beacon_task
    commands = gate.commands
    if commands is not None:
        async def remote_commands() -> None:
            await asyncio.to_thread(commands.run, thread_stop)

        tasks["commands"] = remote_commands
    def probe() -> None:
        """Before each status write: what nobody reports by themselves."""
        journal, config, board = gate.journal, gate.config, gate.board
        board.set_alarm("journal disk below the reserve: no debit can start",
                        journal.free_bytes() < config.journal.reserve_bytes)
        board.set_alarm(f"journal disk over {config.mqtt.disk_alarm_pct:g}% full",
                        journal.disk_used_pct() >= config.mqtt.disk_alarm_pct)
        board.set_out_of_service(gate.processor.out_of_service)
        if gate.beacon is not None:
            b = gate.beacon.state()
            board.set_beacon(
                f"{b['mode']}, " + (f"on air ({', '.join(b['on_air'])})" if b["on_air"]
                                    else "off air")
                + (f"; {b['last_error']}" if b["last_error"] else ""))
            board.set_alarm("beacon radio unavailable", bool(b["last_error"]))
        if gate.uplink is not None:
            broker = f"{config.mqtt.host}:{config.mqtt.port}"
            board.set_broker_link(("connected to " if gate.uplink.connected
                                   else "not connected to ") + broker)

    async def status() -> None:
        await run_status_writer(gate.board, gate.config.journal.status_path,
                                gate.config.service.status_interval_s, stop, probe=probe)

    tasks["status"] = status
    running = [asyncio.create_task(supervise(name, body, stop), name=name)
               for name, body in tasks.items()]
    try:
        if await _until_ready(gate, stop):
            log.info("tapgate running: terminal %s, reader %s (%s), journal %s",
                     gate.config.gate.terminal_id.hex().upper(), gate.reader.name,
                     gate.config.reader.backend, gate.config.journal.path)
            notifier.ready(f"taking taps: terminal {gate.config.gate.terminal_id.hex().upper()},"
                           f" reader {gate.reader.name} ({gate.reader.state.value})")
        await stop.wait()
        notifier.stopping()
        log.info("stopping")
        thread_stop.set()
        if uplink is not None:
            uplink.notify()
        try:
            await asyncio.wait_for(asyncio.gather(*running, return_exceptions=True),
                                   STOP_GRACE_S)
        except TimeoutError:
            # a task that does not stop is hung (a wedged relay driver, a stuck PC/SC call):
            # leave as a crash would. The journal is built for exactly that.
            log.critical("a task did not stop within %.0f s: exiting without it", STOP_GRACE_S)
            notifier.status("stop timed out: a task is hung")
            notifier.close()
            logging.shutdown()
            os._exit(EXIT_HUNG)
    finally:
        notifier.close()


def run(config: Config) -> int:
    notifier = Notifier.from_env()
    notifier.status("opening the journal and the reader")
    try:
        gate = build(config, notifier)
    except TapgateError as err:
        notifier.status(f"failed to start: {err}")  # shown by systemctl status
        raise
    try:
        asyncio.run(_serve(gate, notifier))
    finally:
        gate.close()
    log.info("stopped cleanly")
    return 0
