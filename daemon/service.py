"""The daemon: build the gate from config, run its supervised tasks until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from daemon import backends
from daemon.config import Config, GateConfig
from daemon.configfiles import check_files
from daemon.health import HealthProbe
from daemon.journal import Journal
from daemon.loop import CardLoop, ReaderListener, TapListener, log_tap, on_passage
from daemon.metrics import Metrics, serve_http, write_textfile
from daemon.notify import Notifier, run_watchdog
from daemon.status import StatusBoard, run_status_writer
from daemon.supervisor import supervise
from daemon.sync.handlers import GateControl, effective_config
from daemon.sync.info import PublicInfo
from daemon.sync.retention import run_retention
from daemon.tap import TapProcessor
from hal.gate.base import GateIO
from hal.gate.shared import SharedGateIO
from hal.reader.base import Reader
from hal.sam.base import Sam
from protocol import devicekey
from protocol.errors import TapgateError

if TYPE_CHECKING:
    from daemon.beacon.controller import BeaconController
    from daemon.sync.commands import Commands, CommandStats
    from daemon.sync.link import BrokerLink
    from daemon.sync.uplink import Uplink

log = logging.getLogger("tapgate")
STOP_GRACE_S = 10.0  # under the unit's TimeoutStopSec=20
EXIT_HUNG = 70  # EX_SOFTWARE


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
    health: HealthProbe
    info: PublicInfo  # the gate's public info, retained on tapgate/v1/<gate>/info
    uplink: Uplink | None = None  # only with [mqtt] host set
    commands: Commands | None = None  # operators' commands: with the uplink
    beacon: BeaconController | None = None  # with [beacon] enabled

    def render_metrics(self) -> str:
        health = self.health.snapshot()
        return self.metrics.render(health.journal, health.recoveries, beacon=health.beacon)

    def close(self) -> None:
        for part in (self.reader, self.gateio, self.sam, self.journal):
            try:
                part.close()
            except Exception:  # closing must go on for the other parts
                log.exception("closing %s", type(part).__name__)


def build(config: Config, notifier: Notifier | None = None) -> Gate:
    """Construct backends (by name, through the registry), open the journal, and wire
    the parts: each is handed, when it is built, what it calls."""
    sam = backends.sam(config.sam)
    beacon = _beacon(config)
    gateio = backends.gateio(config.gateio, on_button=_button(beacon))
    reader = backends.reader(config.reader)
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
    info = PublicInfo(processor=processor, beacon_config=config.beacon, beacon=beacon)
    link: BrokerLink | None = None
    command_stats: CommandStats | None = None
    if config.mqtt.enabled:
        from daemon.sync.commands import CommandStats
        from daemon.sync.link import BrokerLink  # paho only when there is a broker

        link = BrokerLink(config=config.mqtt, gate_id=config.gate.gate_id)
        command_stats = CommandStats()
    health = HealthProbe(journal=journal, metrics=metrics, processor=processor, reader=reader,
                         disk_alarm_pct=config.mqtt.disk_alarm_pct,
                         reserve_bytes=config.journal.reserve_bytes,
                         beacon=beacon.state if beacon is not None else None, broker=link,
                         commands=command_stats.to_json if command_stats is not None else None)
    uplink: Uplink | None = None
    commands: Commands | None = None
    if link is not None and command_stats is not None:
        uplink, commands = _remote(config, journal=journal, gate_config=gate_config,
                                   processor=processor, health=health, link=link,
                                   command_stats=command_stats,
                                   open_gate=shared_io.open_for_passage, beacon=beacon,
                                   info=info)

    listeners: list[TapListener] = [metrics.observe_tap, board.observe_tap, log_tap]
    if beacon is not None:
        # a phone can learn which gate it passed
        listeners.append(on_passage(functools.partial(beacon.trigger, "tap")))
    if uplink is not None:
        listeners.append(uplink.observe_tap)
    reader_listeners: list[ReaderListener] = [metrics.observe_reader, board.set_reader]
    if notifier is not None:
        reader_listeners.append(notifier.observe_reader)
    card_loop = CardLoop(reader=reader, processor=processor, listeners=listeners,
                         reader_listeners=reader_listeners)
    if config.reader.backend == "sim":  # `make run`'s passengers, when [reader] asks
        from daemon import demo  # the simulator's cards: not on a gate with a real reader

        demo.start(reader, config)
    return Gate(config, journal, reader, sam, gateio, processor, card_loop, metrics, board,
                health, info, uplink, commands, beacon)


def _remote(config: Config, *, journal: Journal, gate_config: GateConfig,
            processor: TapProcessor, health: HealthProbe, link: BrokerLink,
            command_stats: CommandStats, open_gate: Callable[[], None],
            beacon: BeaconController | None, info: PublicInfo) -> tuple[Uplink, Commands]:
    """The uplink and the operators' commands, on the broker ``link``."""
    from daemon.sync.commands import Commands
    from daemon.sync.uplink import SyncNow, Uplink

    control = GateControl(processor=processor, config=gate_config, telemetry=health.telemetry,
                          sync_now=SyncNow(journal, link), open_gate=open_gate,
                          beacon=_command_trigger(beacon))
    commands = Commands(gate_id=config.gate.gate_id, operators=config.operators,
                        journal=journal, control=control, publish=link.publish,
                        stats=command_stats)
    uplink = Uplink(config=config.mqtt, gate_id=config.gate.gate_id, journal=journal,
                    link=link, telemetry=control.status, info=info,
                    on_command=commands.submit)
    if not config.operators.keys:
        log.warning("no [operators] keys: every operator command will be refused")
    return uplink, commands


def _beacon(config: Config) -> BeaconController | None:
    if not config.beacon.enabled:
        return None
    from daemon.beacon.controller import BeaconController

    return BeaconController(config=config.beacon, advertiser=backends.advertiser(config.beacon))


def _button(beacon: BeaconController | None) -> Callable[[], object] | None:
    """What the gate's service button does: the beacon on air (a phone nearby learns
    which gate this is)."""
    if beacon is None:
        return None
    return functools.partial(beacon.trigger, "button")


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
        gate.board.show_health(gate.health.snapshot(journal=False))

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
        check_files(config)  # what `tapgate config check` looks at: the two agree
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
