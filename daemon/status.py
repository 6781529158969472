"""The running daemon's status, for `tapgate status`: a small JSON file beside the journal
(``journal.status_path``), rewritten every ``service.status_interval_s`` and soon after
anything on it changes.

It holds what only the running process knows: the reader's state, the alarms, the taps
since start. What the journal can tell (pending recoveries, the last taps, what is owed
to the head-end) `tapgate status` reads from the journal itself. The file is replaced
atomically (written beside, fsynced, renamed over), so a reader never sees half of it.
Times are Unix seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon import __version__
from daemon.outcome import Outcome, TapResult
from hal.reader.base import ReaderState

if TYPE_CHECKING:
    from daemon.health import Health

log = logging.getLogger("tapgate.status")

STATUS_FORMAT = 1
NOT_CONFIGURED = "not configured"
RUNNING = "running"
STOPPED = "stopped"
CHANGE_GAP_S = 0.5  # changes are written at most this often: a burst of taps is one write

# Reader states an operator must hear about; "closed" is only ever seen while stopping.
_READER_ALARMS = {
    ReaderState.NO_READER.value: "reader not connected",
    ReaderState.NO_SERVICE.value: "card reader service (pcscd) not reachable",
}
# Outcomes that prove the journal took a write again: the gate is back in service.
_JOURNALLED = (Outcome.ACCEPTED, Outcome.RECOVERED, Outcome.REFUSED)

Listener = Callable[[], None]


class StatusBoard:
    """What the daemon shows about itself; the card loop and the service set it from any
    thread, the status writer reads it."""

    def __init__(self, *, terminal_id: bytes, reader_name: str = "", pid: int | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._clock = clock
        self._pid = os.getpid() if pid is None else pid
        self._started_at = clock()
        self._terminal_id = terminal_id.hex().upper()
        self._reader_name = reader_name
        self._reader_state = "starting"
        self._broker_link = NOT_CONFIGURED
        self._beacon = NOT_CONFIGURED
        self._alarms: set[str] = set()
        self._out_of_service = ""  # why no debit can start, "" when in service
        self._taps = {outcome.value: 0 for outcome in Outcome}
        self._last_tap_at: float | None = None
        self._state = RUNNING
        self._interval_s: float | None = None
        self._listeners: list[Listener] = []

    # -- setters (any thread) -------------------------------------------------------------
    def _change(self, apply: Callable[[], bool]) -> None:
        with self._lock:
            changed = apply()
            listeners = list(self._listeners) if changed else []
        for listener in listeners:
            listener()

    def set_reader(self, name: str, state: ReaderState | str) -> None:
        value = state.value if isinstance(state, ReaderState) else state

        def apply() -> bool:
            old = (self._reader_name, self._reader_state)
            self._reader_name, self._reader_state = name, value
            return old != (name, value)

        self._change(apply)

    def set_reader_state(self, state: ReaderState | str) -> None:
        self.set_reader(self._reader_name, state)

    def note_tap(self, result: TapResult) -> None:
        """Count the tap; an out-of-service outcome puts the gate out of service (with its
        reason as an alarm), a journalled one puts it back."""

        def apply() -> bool:
            self._taps[result.outcome.value] += 1
            self._last_tap_at = self._clock()
            if result.outcome is Outcome.OUT_OF_SERVICE:
                self._out_of_service = result.reason or "out of service"
            elif result.outcome in _JOURNALLED:
                self._out_of_service = ""
            return True

        self._change(apply)

    def observe_tap(self, result: TapResult, seconds: float) -> None:
        """A TapListener (daemon.loop): :meth:`note_tap`."""
        self.note_tap(result)

    def set_out_of_service(self, reason: str) -> None:
        """Out of service for ``reason``; an empty reason puts the gate back in service."""

        def apply() -> bool:
            old, self._out_of_service = self._out_of_service, reason
            return old != reason

        self._change(apply)

    def set_alarm(self, name: str, active: bool) -> None:
        def apply() -> bool:
            if active == (name in self._alarms):
                return False
            if active:
                self._alarms.add(name)
            else:
                self._alarms.discard(name)
            return True

        self._change(apply)

    def set_broker_link(self, text: str) -> None:
        self._set_text("_broker_link", text)

    def set_beacon(self, text: str) -> None:
        self._set_text("_beacon", text)

    def set_state(self, state: str) -> None:
        """``running`` or ``stopped`` (written last, when the daemon stops cleanly)."""
        self._set_text("_state", state)

    def set_interval(self, seconds: float) -> None:
        def apply() -> bool:
            old, self._interval_s = self._interval_s, seconds
            return old != seconds

        self._change(apply)

    def _set_text(self, attribute: str, text: str) -> None:
        def apply() -> bool:
            old = getattr(self, attribute)
            setattr(self, attribute, text)
            return bool(old != text)

        self._change(apply)

    def show_health(self, health: Health) -> None:
        """What nobody reports by themselves, as a health snapshot has it (the service
        takes one before each write): the disk, service, the beacon, the broker."""
        self.set_alarm("journal disk below the reserve: no debit can start",
                       health.below_reserve)
        self.set_alarm(f"journal disk over {health.disk_alarm_pct:g}% full", health.disk_alarm)
        self.set_out_of_service(health.out_of_service)
        beacon = health.beacon
        if beacon is not None:
            self.set_beacon(
                f"{beacon['mode']}, " + (f"on air ({', '.join(beacon['on_air'])})"
                                         if beacon["on_air"] else "off air")
                + (f"; {beacon['last_error']}" if beacon["last_error"] else ""))
            self.set_alarm("beacon radio unavailable", bool(beacon["last_error"]))
        if health.broker is not None:
            self.set_broker_link(("connected to " if health.broker_connected
                                  else "not connected to ") + health.broker)

    def on_change(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` (from the setter's thread) after each change; returns the
        function that stops it."""
        with self._lock:
            self._listeners.append(listener)

        def remove() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return remove

    # -- reading --------------------------------------------------------------------------
    @property
    def alarms(self) -> list[str]:
        with self._lock:
            return self._alarm_list()

    def _alarm_list(self) -> list[str]:
        alarms = set(self._alarms)
        if self._out_of_service:
            alarms.add(f"out of service: {self._out_of_service}")
        if self._reader_state in _READER_ALARMS:
            alarms.add(_READER_ALARMS[self._reader_state])
        return sorted(alarms)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "format": STATUS_FORMAT,
                "state": self._state,
                "pid": self._pid,
                "started_at": round(self._started_at, 3),
                "updated_at": round(self._clock(), 3),
                "interval_s": self._interval_s,
                "version": __version__,
                "terminal_id": self._terminal_id,
                "reader": {"name": self._reader_name, "state": self._reader_state},
                "broker_link": self._broker_link,
                "beacon": self._beacon,
                "alarms": self._alarm_list(),
                "out_of_service": bool(self._out_of_service),
                "taps": dict(self._taps),
                "last_tap_at": (round(self._last_tap_at, 3)
                                if self._last_tap_at is not None else None),
            }

    def write(self, path: Path) -> None:
        """Replace the status file with a snapshot: written beside, fsynced, renamed."""
        text = json.dumps(self.snapshot(), indent=2) + "\n"
        with self._write_lock:
            write_atomic(path, text.encode("utf-8"))


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def read_status(path: Path) -> dict[str, Any] | None:
    """The status file as the daemon last wrote it; None if there is none (or it is not
    a status file)."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == STATUS_FORMAT else None


@dataclass(frozen=True, slots=True)
class Liveness:
    running: bool
    summary: str  # "running (pid 812, up 3m)", "not running (stopped 2h ago)", ...
    pid: int | None = None
    age_s: float | None = None  # how old the status file is


def liveness(doc: dict[str, Any] | None, now: float, interval_s: float) -> Liveness:
    """Whether the daemon that wrote ``doc`` still runs: it said it stopped, its pid is
    gone (or is another process now), or it stopped rewriting the file (hung)."""
    if doc is None:
        return Liveness(False, "not running (no status file)")
    try:
        pid = int(doc["pid"])
        started = float(doc["started_at"])
        age = now - float(doc["updated_at"])
        interval = float(doc.get("interval_s") or interval_s)
    except (KeyError, TypeError, ValueError):
        return Liveness(False, "not running (unreadable status file)")
    if doc.get("state") == STOPPED:
        return Liveness(False, f"not running (stopped {ago(age)} ago)", pid, age)
    if not _alive(pid, started):
        return Liveness(False, f"not running (status {ago(age)} old, pid {pid} gone)", pid, age)
    if age > 3 * interval + 2:
        return Liveness(False, f"not responding (pid {pid}, status {ago(age)} old)", pid, age)
    return Liveness(True, f"running (pid {pid}, up {ago(now - started)})", pid, age)


def ago(seconds: float) -> str:
    """A duration as an operator reads it: 45s, 3m, 2h 5m, 4d 3h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m" if s % 3600 >= 60 else f"{s // 3600}h"
    return f"{s // 86400}d {s % 86400 // 3600}h" if s % 86400 >= 3600 else f"{s // 86400}d"


def _alive(pid: int, started_at: float) -> bool:
    """``pid`` runs and is not a newer process that inherited the number (after a reboot
    pids are small and reused)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process (the daemon's own user): it runs
        pass
    began = _process_start(pid)
    return began is None or began <= started_at + 5


def _process_start(pid: int) -> float | None:
    """When ``pid`` started, from /proc (None where there is no /proc to ask)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


async def _wait_any(timeout: float, *events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def run_status_writer(board: StatusBoard, path: Path, interval: float,
                            stop: asyncio.Event, *, probe: Callable[[], None] | None = None,
                            min_gap_s: float = CHANGE_GAP_S) -> None:
    """Write ``board`` to ``path`` every ``interval`` seconds and within ``min_gap_s`` of a
    change, until ``stop``; then once more as ``stopped``. ``probe`` (run in a thread
    before each write) is where the service checks what nobody reports by themselves,
    e.g. the free disk under the journal. A write that fails is logged and retried at the
    next turn: the status file must never take the daemon down."""
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()

    def wake() -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closing: nothing to wake
            loop.call_soon_threadsafe(changed.set)

    failing = False

    async def write() -> None:
        nonlocal failing
        try:
            await asyncio.to_thread(board.write, path)
        except OSError as err:
            if not failing:
                log.warning("cannot write the status file %s: %s", path, err)
            failing = True
        else:
            if failing:
                log.info("status file %s written again", path)
            failing = False

    unsubscribe = board.on_change(wake)
    try:
        board.set_interval(interval)
        while not stop.is_set():
            changed.clear()
            if probe is not None:
                try:
                    await asyncio.to_thread(probe)
                except Exception:  # a probe that fails must not stop the status
                    log.exception("status probe failed")
            await write()
            await _wait_any(interval, stop, changed)
            if changed.is_set() and not stop.is_set():
                await _wait_any(min_gap_s, stop)  # let a burst of changes settle
    finally:
        unsubscribe()
    board.set_state(STOPPED)
    await write()
