"""Listening instead of advertising, with bleak's BleakScanner (bleak is optional: it is
imported only when a scan runs).

:func:`scan_phones` finds phones that advertise the gate app's service UUID and estimates
how far each is with the log-distance path-loss model. :func:`self_check` lets a second
adapter listen for the gate's own beacon bytes: proof the beacon is really on air.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dbus_fast.errors import DBusFastError

from hal.ble.base import log
from hal.ble.bluez_errors import translate
from protocol.errors import HardwareUnavailable

if TYPE_CHECKING:
    from bleak.backends.device import BLEDevice
    from bleak.backends.scanner import AdvertisementData

    from protocol.beacon.frames import Advertisement

NO_RSSI = -127  # what bleak reports when BlueZ gave no RSSI


@dataclass(frozen=True, slots=True)
class PhoneSighting:
    address: str
    rssi: int  # the strongest heard during the scan, dBm
    distance_m: float  # estimated from rssi


def estimate_distance(rssi: int, *, measured_power: int, path_loss_exponent: float) -> float:
    """Metres, by the log-distance path-loss model: d = 10 ** ((P1m - RSSI) / (10 n)).

    ``measured_power`` is the RSSI heard at 1 m; ``path_loss_exponent`` n is 2 in free
    space and 2.5-4 indoors among people.
    """
    if path_loss_exponent <= 0:
        raise ValueError(f"path_loss_exponent {path_loss_exponent} must be positive")
    return float(10 ** ((measured_power - rssi) / (10 * path_loss_exponent)))


def mentions(data: AdvertisementData, service_uuid: str) -> bool:
    """Whether an advertisement names ``service_uuid`` (in its UUID list or service data)."""
    wanted = service_uuid.lower()
    return (any(uuid.lower() == wanted for uuid in data.service_uuids)
            or any(uuid.lower() == wanted for uuid in data.service_data))


def carries(data: AdvertisementData, expected: Advertisement) -> bool:
    """Whether an advertisement heard carries every byte of ``expected``."""
    service_data = {uuid.lower(): value for uuid, value in data.service_data.items()}
    uuids = {uuid.lower() for uuid in data.service_uuids}
    return (all(data.manufacturer_data.get(cid) == bytes(value)
                for cid, value in expected.manufacturer_data.items())
            and all(service_data.get(uuid.lower()) == bytes(value)
                    for uuid, value in expected.service_data.items())
            and all(uuid.lower() in uuids for uuid in expected.service_uuids))


async def scan_phones(service_uuid: str, duration_s: float, *, measured_power: int,
                      path_loss_exponent: float, adapter: str | None) -> list[PhoneSighting]:
    """Phones heard advertising ``service_uuid`` within ``duration_s``, nearest first."""
    strongest: dict[str, int] = {}

    def heard(device: BLEDevice, data: AdvertisementData) -> None:
        if data.rssi > NO_RSSI and mentions(data, service_uuid):
            strongest[device.address] = max(data.rssi, strongest.get(device.address, NO_RSSI))

    await _scan(heard, duration_s, adapter=adapter)
    sightings = [PhoneSighting(address, rssi, estimate_distance(
        rssi, measured_power=measured_power, path_loss_exponent=path_loss_exponent))
        for address, rssi in strongest.items()]
    return sorted(sightings, key=lambda s: (s.distance_m, s.address))


async def self_check(expected: Advertisement, *, adapter: str, duration_s: float) -> bool:
    """Whether ``adapter`` (not the one advertising) hears ``expected`` within ``duration_s``."""
    if not (expected.manufacturer_data or expected.service_data or expected.service_uuids):
        raise ValueError("an advertisement without data cannot be recognised on air")
    found = asyncio.Event()

    def heard(device: BLEDevice, data: AdvertisementData) -> None:
        if not found.is_set() and carries(data, expected):
            log.info("beacon self-check: %s heard from %s at %d dBm", expected.kind,
                     device.address, data.rssi)
            found.set()

    await _scan(heard, duration_s, adapter=adapter, done=found)
    if not found.is_set():
        log.warning("beacon self-check: %s not heard on %s within %.0f s", expected.kind,
                    adapter, duration_s)
    return found.is_set()


async def _scan(heard: Callable[[BLEDevice, AdvertisementData], None], duration_s: float, *,
                adapter: str | None, done: asyncio.Event | None = None) -> None:
    try:
        from bleak import BleakScanner
        from bleak.exc import BleakError
    except ImportError as err:
        raise HardwareUnavailable("ble", "scanning needs the package 'bleak': install it"
                                  ) from err
    doing = f"scanning on {adapter or 'the default adapter'}"
    try:
        scanner = BleakScanner(heard, bluez={"adapter": adapter} if adapter else {})
        await scanner.start()
        try:
            if done is None:
                await asyncio.sleep(duration_s)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), duration_s)
        finally:
            await scanner.stop()
    except (BleakError, DBusFastError, OSError, EOFError, TimeoutError) as err:
        raise translate(err, adapter=adapter or "(default)", doing=doing) from err
