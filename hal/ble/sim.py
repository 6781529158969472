"""An advertiser without a radio: it logs what would be on air and behaves like BlueZ.

Windows end on a real asyncio timer (EXPIRED), a full adapter refuses another slot, and
tests (or the daemon's own tests) inject what the hardware does wrong: :meth:`fail_next`
makes the next :meth:`advertise` raise, :meth:`lose_radio` / :meth:`restore_radio` play
bluetoothd going away and coming back (LOST, then RESTORED with what is still wanted).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Mapping

from hal.ble.base import (
    KIND,
    AdapterInfo,
    AdvertisingRequest,
    BeaconEvent,
    Listener,
    Listeners,
    log,
)
from protocol.errors import HardwareUnavailable


def describe(request: AdvertisingRequest) -> str:
    """One log line's worth of what a request puts on air."""
    adv = request.advertisement
    parts = [adv.kind]
    parts += [f"mfr {cid:04X}={data.hex()}" for cid, data in adv.manufacturer_data.items()]
    parts += [f"svc {uuid[4:8] if uuid.endswith('-0000-1000-8000-00805f9b34fb') else uuid}"
              f"={data.hex()}" for uuid, data in adv.service_data.items()]
    if request.timeout_s is not None:
        parts.append(f"for {request.timeout_s} s")
    if request.tx_power_dbm is not None:
        parts.append(f"{request.tx_power_dbm} dBm")
    return " ".join(parts)


class SimAdvertiser:
    def __init__(self, *, address: str = "00:00:00:00:00:00", supported_instances: int = 5,
                 can_set_tx_power: bool = True, max_adv_len: int = 31,
                 ends_windows: bool = True) -> None:
        """``ends_windows=False`` plays a bluetoothd that never ends a window (no Release)."""
        self._info = AdapterInfo(name="sim", address=address, powered=True,
                                 can_set_tx_power=can_set_tx_power,
                                 supported_instances=supported_instances,
                                 max_adv_len=max_adv_len)
        self._ends_windows = ends_windows
        self._state = "new"  # "open", "closed"
        self._radio_up = True
        self._slots: dict[str, AdvertisingRequest] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._announced: set[str] = set()  # slots that went on air (REGISTERED) at least once
        self._faults: collections.deque[BaseException] = collections.deque()
        self._listeners = Listeners()
        self.updates: collections.Counter[str] = collections.Counter()  # UPDATED per slot
        self.requests: list[tuple[str, AdvertisingRequest]] = []  # every advertise() taken

    # -- the Advertiser contract ----------------------------------------------------------
    async def open(self) -> AdapterInfo:
        """Start (or, after close(), start again)."""
        self._state = "open"
        log.info("beacon (sim): no radio, advertisements are only logged")
        return self._info

    async def advertise(self, slot: str, request: AdvertisingRequest) -> None:
        if self._state != "open":
            raise HardwareUnavailable(KIND, "the simulated advertiser is not open")
        known = slot in self._slots
        if self._faults:
            if not known:
                self._listeners.emit(slot, BeaconEvent.FAILED)
            raise self._faults.popleft()
        if not known and len(self._slots) >= self._info.supported_instances:
            self._listeners.emit(slot, BeaconEvent.FAILED)
            raise HardwareUnavailable(
                KIND, f"the simulated adapter has no free advertising instance "
                      f"({self._info.supported_instances} in use): withdraw one first")
        self._slots[slot] = request
        self.requests.append((slot, request))
        self._arm(slot, request)
        if not self._radio_up:
            log.info("beacon (sim) %s: radio lost, kept for later: %s", slot, describe(request))
        elif known:
            self.updates[slot] += 1
            log.debug("beacon (sim) %s updated: %s", slot, describe(request))
            self._listeners.emit(slot, BeaconEvent.UPDATED)
        else:
            self._announced.add(slot)
            log.info("beacon (sim) %s on air: %s", slot, describe(request))
            self._listeners.emit(slot, BeaconEvent.REGISTERED)

    async def withdraw(self, slot: str) -> None:
        if self._slots.pop(slot, None) is None:
            return
        self._disarm(slot)
        log.info("beacon (sim) %s withdrawn", slot)
        self._listeners.emit(slot, BeaconEvent.WITHDRAWN)

    def on_air(self) -> Mapping[str, AdvertisingRequest]:
        return dict(self._slots)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.add(listener)

    async def close(self) -> None:
        for slot in list(self._slots):
            await self.withdraw(slot)
        self._state = "closed"

    # -- driving it (tests) ---------------------------------------------------------------
    @property
    def radio_up(self) -> bool:
        return self._radio_up

    def fail_next(self, exc: BaseException) -> None:
        """The next advertise() raises ``exc`` (a new slot stays off air: FAILED)."""
        self._faults.append(exc)

    def lose_radio(self) -> None:
        """bluetoothd went away: every slot is off air (LOST) but remembered."""
        if self._radio_up:
            self._radio_up = False
            for slot in list(self._slots):
                self._listeners.emit(slot, BeaconEvent.LOST)

    def restore_radio(self) -> None:
        """bluetoothd is back: what is still wanted goes on air again (RESTORED)."""
        if self._radio_up:
            return
        self._radio_up = True
        for slot in list(self._slots):
            if slot in self._announced:
                self._listeners.emit(slot, BeaconEvent.RESTORED)
            else:
                self._announced.add(slot)
                self._listeners.emit(slot, BeaconEvent.REGISTERED)

    # -- windows --------------------------------------------------------------------------
    def _arm(self, slot: str, request: AdvertisingRequest) -> None:
        self._disarm(slot)
        if request.timeout_s is not None and self._ends_windows:
            loop = asyncio.get_running_loop()
            self._timers[slot] = loop.call_later(request.timeout_s, self._expire, slot)

    def _disarm(self, slot: str) -> None:
        timer = self._timers.pop(slot, None)
        if timer is not None:
            timer.cancel()

    def _expire(self, slot: str) -> None:
        self._timers.pop(slot, None)
        if self._slots.pop(slot, None) is not None:
            log.info("beacon (sim) %s: window over, off air", slot)
            self._listeners.emit(slot, BeaconEvent.EXPIRED)
