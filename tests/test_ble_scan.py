"""Scanning: the distance model and the filters, then bleak's BlueZ backend against the
bluez5 mock, where the test makes phones (and the gate's own beacon) appear as devices
with their RSSI and advertising data, the way bluetoothd reports what it hears."""

from __future__ import annotations

import asyncio
import math
from uuid import UUID

import pytest
from bleak.backends.scanner import AdvertisementData
from dbus_fast import Variant

from hal.ble.scan import (
    carries,
    estimate_distance,
    mentions,
    scan_phones,
    self_check,
)
from protocol.beacon import frames
from protocol.errors import HardwareUnavailable
from tests.fixtures.bluez import BluezMock, until
from tests.waiting import run

APP_UUID = "6e400001-b5a3-f393-e0a9-e50e24dcca9e"
OTHER_UUID = "0000180d-0000-1000-8000-00805f9b34fb"
EDDYSTONE = frames.EDDYSTONE_SERVICE_UUID
IBEACON = frames.ibeacon(UUID("2f234454-cf6d-4a0f-adf2-f4911ba9ffa6"), 7, 42, -59)
EID = frames.eddystone_eid(bytes(range(8)), -20)
DEVICE_IFACE = "org.bluez.Device1"


def heard(*, uuids: tuple[str, ...] = (), service_data: dict[str, bytes] | None = None,
          manufacturer_data: dict[int, bytes] | None = None, rssi: int = -60
          ) -> AdvertisementData:
    return AdvertisementData(local_name=None, manufacturer_data=manufacturer_data or {},
                             service_data=service_data or {}, service_uuids=list(uuids),
                             tx_power=None, rssi=rssi, platform_data=())


@pytest.mark.parametrize(("rssi", "n", "metres"), [
    (-59, 2.0, 1.0),  # measured power is the RSSI at 1 m
    (-69, 2.0, math.sqrt(10)),  # 10 dB weaker in free space: 10 ** 0.5
    (-79, 2.0, 10.0),
    (-79, 4.0, math.sqrt(10)),  # a steeper loss indoors: the same RSSI is nearer
    (-49, 2.0, 1 / math.sqrt(10)),  # stronger than at 1 m: closer than 1 m
])
def test_the_log_distance_path_loss_model(rssi: int, n: float, metres: float) -> None:
    assert estimate_distance(rssi, measured_power=-59, path_loss_exponent=n) == \
        pytest.approx(metres)


def test_a_path_loss_exponent_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        estimate_distance(-60, measured_power=-59, path_loss_exponent=0)


def test_a_phone_is_one_that_names_the_service_uuid() -> None:
    assert mentions(heard(uuids=(APP_UUID.upper(),)), APP_UUID)
    assert mentions(heard(service_data={APP_UUID: b"\x01"}), APP_UUID)
    assert not mentions(heard(uuids=(OTHER_UUID,)), APP_UUID)
    assert not mentions(heard(), APP_UUID)


def test_the_own_beacon_is_recognised_by_all_its_bytes() -> None:
    ibeacon_bytes = IBEACON.manufacturer_data[0x004C]
    assert carries(heard(manufacturer_data={0x004C: ibeacon_bytes, 0x0059: b"x"}), IBEACON)
    assert not carries(heard(manufacturer_data={0x004C: ibeacon_bytes[:-1] + b"\0"}), IBEACON)
    eid_frame = EID.service_data[EDDYSTONE]
    assert carries(heard(uuids=(EDDYSTONE,), service_data={EDDYSTONE: eid_frame}), EID)
    assert not carries(heard(service_data={EDDYSTONE: eid_frame}), EID)  # no UUID list
    assert not carries(heard(uuids=(EDDYSTONE,), service_data={EDDYSTONE: bytes(10)}), EID)


async def discovering(bluez: BluezMock, adapter: str) -> bool:
    body = await bluez.call("org.bluez", f"/org/bluez/{adapter}",
                            "org.freedesktop.DBus.Properties", "Get", "ss",
                            ["org.bluez.Adapter1", "Discovering"])
    return bool(body[0].value)


def test_scan_phones_finds_the_app_and_estimates_distance(bluez: BluezMock) -> None:
    async def main() -> None:
        scan = asyncio.create_task(scan_phones(APP_UUID, 3.0, measured_power=-59,
                                               path_loss_exponent=2.0, adapter="hci0"))
        await until(lambda: discovering(bluez, "hci0"), "discovery on hci0")
        near = await bluez.add_device("hci0", "AA:BB:CC:00:00:01", RSSI=Variant("n", -75),
                                      UUIDs=Variant("as", [APP_UUID]))
        await bluez.update(near, DEVICE_IFACE, {"RSSI": Variant("n", -69)})  # came closer
        await bluez.update(near, DEVICE_IFACE, {"RSSI": Variant("n", -72)})  # the strongest counts
        await bluez.add_device("hci0", "AA:BB:CC:00:00:02", RSSI=Variant("n", -50),
                               UUIDs=Variant("as", [OTHER_UUID]))  # another service
        await bluez.add_device("hci0", "AA:BB:CC:00:00:03", RSSI=Variant("n", -59),  # Android:
                               ServiceData=Variant("a{sv}", {APP_UUID: Variant("ay", b"\x01")}))
        await bluez.add_device("hci0", "AA:BB:CC:00:00:04", UUIDs=Variant("as", [APP_UUID]))
        sightings = await scan  # (the last one has no RSSI: not a sighting)
        assert [(s.address, s.rssi) for s in sightings] == [("AA:BB:CC:00:00:03", -59),
                                                            ("AA:BB:CC:00:00:01", -69)]
        assert [s.distance_m for s in sightings] == pytest.approx([1.0, math.sqrt(10)])
        assert not await discovering(bluez, "hci0")  # the scan stopped discovery
    run(main())


def test_self_check_hears_the_gate_on_a_second_adapter(bluez: BluezMock) -> None:
    async def main() -> None:
        await bluez.add_adapter("hci1", "listener")
        check = asyncio.create_task(self_check(IBEACON, adapter="hci1", duration_s=20))
        await until(lambda: discovering(bluez, "hci1"), "discovery on hci1")
        await bluez.add_device("hci1", "00:01:02:03:04:05", RSSI=Variant("n", -40),
                               ManufacturerData=Variant("a{qv}", {0x004C: Variant(
                                   "ay", IBEACON.manufacturer_data[0x004C])}))
        assert await check  # as soon as it is heard, long before the 20 s
        assert not await discovering(bluez, "hci1")
    run(main())


def test_self_check_fails_when_other_bytes_are_on_air(bluez: BluezMock) -> None:
    async def main() -> None:
        await bluez.add_adapter("hci1", "listener")
        check = asyncio.create_task(self_check(IBEACON, adapter="hci1", duration_s=2))
        await until(lambda: discovering(bluez, "hci1"), "discovery on hci1")
        gate = await bluez.add_device("hci1", "00:01:02:03:04:05", RSSI=Variant("n", -40),
                                      ManufacturerData=Variant("a{qv}", {0x004C: Variant(
                                          "ay", bytes(23))}))
        await bluez.update(gate, DEVICE_IFACE, {"RSSI": Variant("n", -41)})
        assert not await check
    run(main())


def test_scanning_on_a_missing_adapter_is_hardware_unavailable(bluez: BluezMock) -> None:
    async def main() -> None:
        with pytest.raises(HardwareUnavailable, match="scanning on hci7"):
            await self_check(IBEACON, adapter="hci7", duration_s=1)
    run(main())
