"""The beacon task: puts the gate's frames on air continuously or for a window after a
trigger (a tap, an operator's command, the gate's button), rotates the EID at its period
boundary and refreshes the telemetry frame, all without re-registering.

Triggers come from other threads (the card loop, the commands thread, the gate I/O
driver); :meth:`BeaconController.trigger` only queues them and wakes the task. The task
runs on the event loop: the advertiser's D-Bus calls are async.

BlueZ ends a triggered window itself (the advertisement's Timeout); the task keeps its own
deadline too and withdraws what is still on air then, so a bluetoothd that never calls
Release cannot keep the gate on air. A new trigger inside the window restarts it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from daemon.beacon import frameset
from daemon.beacon.config import BeaconConfig
from daemon.beacon.frameset import Health
from hal.ble.base import AdapterInfo, Advertiser, AdvertisingRequest, BeaconEvent
from protocol.beacon.frames import Advertisement
from protocol.errors import HardwareUnavailable

log = logging.getLogger("tapgate.beacon")

FOREVER = math.inf
# BlueZ ends a window itself (Timeout, then Release); this task's own deadline is the
# fallback for a bluetoothd that does not, so it comes a little later
WINDOW_GRACE_S = 1.0


@dataclass
class BeaconStats:
    triggers: dict[str, int] = field(default_factory=collections.Counter)
    ignored: int = 0  # triggers from a source the config does not listen to
    registrations: int = 0  # windows opened (or continuous advertising started)
    rotations: int = 0  # EID changes put on air
    updates: int = 0  # every content change on air (EID, TLM, window extended)
    expired: int = 0
    lost: int = 0  # bluetoothd went away under us
    last_error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"triggers": dict(self.triggers), "ignored": self.ignored,
                "registrations": self.registrations, "rotations": self.rotations,
                "updates": self.updates, "expired": self.expired, "lost": self.lost,
                "last_error": self.last_error}


@dataclass(frozen=True, slots=True)
class Trigger:
    source: str
    window_s: int
    at: float  # monotonic, when it was asked for


class BeaconController:
    def __init__(self, *, config: BeaconConfig, advertiser: Advertiser,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 temperature: Callable[[], float | None] = frameset.soc_temperature) -> None:
        self._cfg = config
        self._adv = advertiser
        self._clock = clock
        self._mono = monotonic
        self._temperature = temperature
        self._started = monotonic()
        self._queue: collections.deque[Trigger] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._lock = threading.Lock()  # state() is read from other threads
        self._window_end: float | None = None  # monotonic; None: off air; FOREVER
        self._on_air_since: float | None = None
        self._air_time_s = 0.0  # summed over windows: the TLM frame's advertising count
        self._next_eid = FOREVER
        self._next_tlm = FOREVER
        self.adapter: AdapterInfo | None = None
        self._radio_lost = False
        self.stats = BeaconStats()
        self.on_registered: Callable[[Trigger, float], None] | None = None  # the benchmark's

    # -- from any thread ---------------------------------------------------------------
    def trigger(self, source: str, window_s: int | None = None) -> dict[str, Any]:
        """Ask for the beacon to go on air (or stay on air for a new window)."""
        if source not in self._cfg.triggers:
            self.stats.ignored += 1
            return {"accepted": False,
                    "reason": f"beacon.triggers does not include {source!r}"}
        window = window_s if window_s is not None else self._cfg.window_s
        self._queue.append(Trigger(source, window, self._mono()))
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closing: nothing to wake
                loop.call_soon_threadsafe(wake.set)
        return {"accepted": True, "mode": self._cfg.mode,
                "window_s": None if self._cfg.mode == "continuous" else window,
                "frames": list(self._cfg.frames)}

    def state(self) -> dict[str, Any]:
        with self._lock:
            end = self._window_end
        now = self._mono()
        on_air = dict(self._adv.on_air())
        state: dict[str, Any] = {
            "mode": self._cfg.mode, "backend": self._cfg.backend,
            "adapter": self._cfg.adapter, "on_air": sorted(on_air),
            "window_left_s": (None if end is None or end == FOREVER
                              else round(max(0.0, end - now), 1)),
            **self.stats.to_json(),
        }
        if self.adapter is not None:
            state["tx_power_settable"] = self.adapter.can_set_tx_power
        return state

    # -- the task ------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        if self._queue:
            self._wake.set()
        self._adv.subscribe(self._on_event)
        try:
            self.adapter = await self._adv.open()
            self._note_adapter(self.adapter)
            if self._cfg.mode == "continuous":
                await self._go_on_air(None, Trigger("start", 0, self._mono()))
            while not stop.is_set():
                try:
                    await self._take_triggers()
                    await self._refresh()
                except HardwareUnavailable as err:
                    # one refused advertisement (or a radio gone mid-call) loses this
                    # trigger, not the task: the next trigger tries again
                    self.stats.last_error = str(err)
                    log.error("beacon: %s", err)
                await self._sleep(stop)
        except Exception as err:
            self.stats.last_error = str(err)
            raise
        finally:
            self._off_air()
            with contextlib.suppress(Exception):
                await self._adv.close()

    def _note_adapter(self, info: AdapterInfo) -> None:
        log.info("beacon adapter %s (%s): %d advertising instances free, TX power %s",
                 info.name, info.address, info.supported_instances,
                 "settable" if info.can_set_tx_power else "fixed by the controller")
        if self._cfg.tx_power_dbm is not None and not info.can_set_tx_power:
            log.warning("beacon.tx_power_dbm = %d is not applied: adapter %s cannot set its "
                        "TX power; the range comes from beacon.measured_power alone",
                        self._cfg.tx_power_dbm, info.name)

    async def _sleep(self, stop: asyncio.Event) -> None:
        assert self._wake is not None
        end = self._window_end
        deadline = min(self._next_eid, self._next_tlm,
                       end + WINDOW_GRACE_S if end is not None else FOREVER)
        timeout = None if deadline == FOREVER else max(0.0, deadline - self._mono())
        waiters = [asyncio.ensure_future(self._wake.wait()),
                   asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        self._wake.clear()

    async def _take_triggers(self) -> None:
        latest: Trigger | None = None
        while self._queue:
            trig = self._queue.popleft()
            self.stats.triggers[trig.source] += 1
            log.info("beacon triggered by %s", trig.source)
            if latest is None or trig.window_s > latest.window_s:
                latest = trig
        if latest is None or self._cfg.mode == "continuous":
            return  # continuous: already on air; the trigger is only counted
        await self._go_on_air(self._mono() + latest.window_s, latest)

    async def _go_on_air(self, until: float | None, trig: Trigger) -> None:
        """Register every frame (or re-send it with the new window) until ``until``."""
        first = self._window_end is None
        now = self._mono()
        if first:
            self._on_air_since = now
        with self._lock:
            self._window_end = FOREVER if until is None else until
        timeout = None if until is None else max(1, math.ceil(until - now))
        built = frameset.build(self._cfg, self._clock(), self._health())
        # one D-Bus round trip for all frames, not one after the other
        results = await asyncio.gather(
            *(self._adv.advertise(kind, self._request(adv, timeout))
              for kind, adv in built.items()), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise failed[0]
        if first:
            self.stats.registrations += 1
        else:
            self.stats.updates += 1
        if not self._radio_lost:
            self.stats.last_error = ""
        self._schedule(now)
        if self.on_registered is not None:
            self.on_registered(trig, self._mono())

    def _request(self, adv: Advertisement, timeout: int | None) -> AdvertisingRequest:
        settable = self.adapter is not None and self.adapter.can_set_tx_power
        return AdvertisingRequest(
            advertisement=adv, timeout_s=timeout,
            tx_power_dbm=self._cfg.tx_power_dbm if settable else None,
            interval_ms=(self._cfg.interval_ms, self._cfg.interval_ms))

    def _schedule(self, now: float) -> None:
        schedule = frameset.eid_schedule(self._cfg)
        if schedule is not None and "eddystone-eid" in self._cfg.frames:
            wall = self._clock()
            # just past the boundary: a timer that fires a hair early must not rebuild the
            # EID that is already on air
            self._next_eid = now + max(0.0, schedule.next_rotation(wall) - wall) + 0.01
        if "eddystone-tlm" in self._cfg.frames:
            self._next_tlm = now + self._cfg.tlm_interval_s

    async def _refresh(self) -> None:
        now = self._mono()
        end = self._window_end
        if end is None:
            return
        if now >= end + WINDOW_GRACE_S:
            if self._adv.on_air():
                log.warning("beacon window over and the radio did not end it: withdrawing")
            for slot in list(self._adv.on_air()):
                await self._adv.withdraw(slot)
            self._off_air()
            return
        if now >= end:
            return  # the window is closing: no refresh may re-arm it
        on_air = self._adv.on_air()
        remaining = None if end == FOREVER else max(1, math.ceil(end - now))
        due = []
        if now >= self._next_eid:
            due.append("eddystone-eid")
        if now >= self._next_tlm:
            due.append("eddystone-tlm")
        if not due:
            return
        built = frameset.build(self._cfg, self._clock(), self._health())
        for kind in due:
            request = on_air.get(kind)
            if request is not None and request.advertisement != built[kind]:
                timeout = None if request.timeout_s is None else remaining
                await self._adv.advertise(kind, self._request(built[kind], timeout))
                self.stats.updates += 1
                if kind == "eddystone-eid":
                    self.stats.rotations += 1
        self._schedule(now)

    def _off_air(self) -> None:
        with self._lock:
            if self._on_air_since is not None:
                self._air_time_s += self._mono() - self._on_air_since
            self._on_air_since = None
            self._window_end = None
        self._next_eid = self._next_tlm = FOREVER

    def _health(self) -> Health:
        now = self._mono()
        air = self._air_time_s + (now - self._on_air_since if self._on_air_since else 0.0)
        return Health(uptime_s=now - self._started,
                      adv_count=int(air * 1000 / self._cfg.interval_ms),
                      temperature_c=self._temperature())

    def _on_event(self, slot: str, event: BeaconEvent) -> None:
        if event is BeaconEvent.EXPIRED:
            self.stats.expired += 1
            if not self._adv.on_air() and self._window_end not in (None, FOREVER):
                self._off_air()
        elif event is BeaconEvent.LOST:
            if not self._radio_lost:
                self.stats.lost += 1
                log.warning("beacon off air: bluetoothd or adapter %s went away",
                            self._cfg.adapter)
            self._radio_lost = True
            self.stats.last_error = "bluetoothd or the adapter went away"
        elif event is BeaconEvent.RESTORED:
            if self._radio_lost:
                log.info("beacon back on air")
            self._radio_lost = False
            self.stats.last_error = ""
        log.debug("beacon %s: %s", slot, event.name.lower())


def info(config: BeaconConfig, state: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The beacon part of the gate's retained info: its public IDs, never the EID key."""
    out: dict[str, Any] = {
        "mode": config.mode, "window_s": config.window_s, "frames": list(config.frames),
        "measured_power": config.measured_power, "tx_power_dbm": config.tx_power_dbm,
        "distance_m": config.distance_m, "path_loss_exponent": config.path_loss_exponent,
        "rssi_threshold": config.rssi_threshold,
    }
    if config.uuid is not None:
        out["ibeacon"] = {"uuid": str(config.uuid), "major": config.major,
                          "minor": config.minor}
    if config.namespace is not None and config.instance is not None:
        out["eddystone_uid"] = {"namespace": config.namespace.hex(),
                                "instance": config.instance.hex()}
    if config.url:
        out["eddystone_url"] = config.url
    if config.eid_key is not None:
        out["eid"] = {"exponent": config.eid_exponent, "epoch": config.eid_epoch}
    if state is not None and state.get("tx_power_settable") is False:
        out["tx_power_dbm"] = None  # configured, but this controller cannot apply it
    return out
