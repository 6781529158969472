"""The advertiser contract, run against every backend that can run here: the simulator,
and BlueZ (python-dbusmock's bluez5 on a private dbus-daemon; skipped without it unless
TAPGATE_REQUIRE_BLUEZ=1).

No backend gets help from the test: windows end by themselves (on the bluez mock, which
never calls Release, by the advertiser's own timer a margin after BlueZ's Timeout).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from uuid import UUID

import pytest

from hal import registry
from hal.ble.base import Advertiser, AdvertisingRequest
from hal.ble.bluez import BluezAdvertiser
from hal.ble.sim import SimAdvertiser
from protocol.beacon import frames
from protocol.errors import HardwareUnavailable
from tests.fixtures.bluez import BluezMock, Recorder, until
from tests.waiting import run

IBEACON = frames.ibeacon(UUID("2f234454-cf6d-4a0f-adf2-f4911ba9ffa6"), 7, 42, -59)
MARGIN_S = 0.2  # the BlueZ advertiser's fallback after BlueZ's Timeout


def eid(byte: int) -> frames.Advertisement:
    return frames.eddystone_eid(bytes([byte]) * 8, -20)


@dataclass
class Backend:
    """Makes an advertiser (inside the test's event loop) and breaks its radio."""

    make: Callable[[], Advertiser]
    lose: Callable[[Advertiser], Awaitable[None]]  # bluetoothd goes away
    restore: Callable[[Advertiser], Awaitable[None]]  # and comes back


def _sim(method: str) -> Callable[[Advertiser], Awaitable[None]]:
    async def call(adv: Advertiser) -> None:
        assert isinstance(adv, SimAdvertiser)
        getattr(adv, method)()
    return call


@pytest.fixture(params=["sim", "bluez"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "bluez":
        bluez: BluezMock = request.getfixturevalue("bluez")
        return Backend(make=lambda: BluezAdvertiser(release_margin_s=MARGIN_S),
                       lose=lambda adv: bluez.stop_bluetoothd(),
                       restore=lambda adv: bluez.start_bluetoothd())
    return Backend(make=SimAdvertiser, lose=_sim("lose_radio"), restore=_sim("restore_radio"))


def test_the_registry_names_both_backends() -> None:
    assert registry.advertiser("sim") is SimAdvertiser
    assert registry.advertiser("bluez") is BluezAdvertiser


def test_on_air_changed_in_place_and_withdrawn(backend: Backend) -> None:
    async def main() -> None:
        adv, events = backend.make(), Recorder()
        adv.subscribe(events)
        with pytest.raises(HardwareUnavailable):
            await adv.advertise("ibeacon", AdvertisingRequest(IBEACON))  # not open yet
        info = await adv.open()
        assert info.powered and info.supported_instances >= 2
        first, second = AdvertisingRequest(eid(1)), AdvertisingRequest(eid(2), tx_power_dbm=-8)
        await adv.advertise("eddystone-eid", first)
        assert dict(adv.on_air()) == {"eddystone-eid": first}
        await adv.advertise("eddystone-eid", second)
        await adv.advertise("ibeacon", AdvertisingRequest(IBEACON))
        assert dict(adv.on_air()) == {"eddystone-eid": second,
                                      "ibeacon": AdvertisingRequest(IBEACON)}
        await adv.withdraw("eddystone-eid")
        await adv.withdraw("eddystone-eid")
        assert list(adv.on_air()) == ["ibeacon"]
        await adv.close()
        assert dict(adv.on_air()) == {}
        with pytest.raises(HardwareUnavailable):
            await adv.advertise("ibeacon", AdvertisingRequest(IBEACON))  # closed
        await adv.open()  # a restarted beacon task opens the same advertiser again
        await adv.advertise("ibeacon", AdvertisingRequest(IBEACON))
        await adv.close()
        assert events.seen == [("eddystone-eid", "REGISTERED"), ("eddystone-eid", "UPDATED"),
                               ("ibeacon", "REGISTERED"), ("eddystone-eid", "WITHDRAWN"),
                               ("ibeacon", "WITHDRAWN"), ("ibeacon", "REGISTERED"),
                               ("ibeacon", "WITHDRAWN")]
    run(main())


def test_a_window_ends_by_itself_and_a_new_one_extends_it(backend: Backend) -> None:
    async def main() -> None:
        adv, events = backend.make(), Recorder()
        adv.subscribe(events)
        await adv.open()
        loop = asyncio.get_running_loop()
        await adv.advertise("ibeacon", AdvertisingRequest(IBEACON, timeout_s=1))
        await asyncio.sleep(0.5)
        extended_at = loop.time()
        await adv.advertise("ibeacon", AdvertisingRequest(IBEACON, timeout_s=1))
        await until(lambda: events.count("ibeacon", "EXPIRED"), "EXPIRED")
        # never before the second window's end: the first one was replaced, not kept
        assert loop.time() - extended_at >= 1.0
        assert dict(adv.on_air()) == {}
        assert events.seen == [("ibeacon", "REGISTERED"), ("ibeacon", "UPDATED"),
                               ("ibeacon", "EXPIRED")]
        await adv.close()
    run(main())


def test_a_full_adapter_refuses_another_slot(backend: Backend) -> None:
    async def main() -> None:
        adv, events = backend.make(), Recorder()
        adv.subscribe(events)
        info = await adv.open()
        for n in range(info.supported_instances):
            await adv.advertise(f"slot{n}", AdvertisingRequest(IBEACON))
        with pytest.raises(HardwareUnavailable, match="no free advertising instance"):
            await adv.advertise("one-more", AdvertisingRequest(IBEACON))
        assert events.seen[-1] == ("one-more", "FAILED")
        assert len(adv.on_air()) == info.supported_instances
        await adv.withdraw("slot0")
        await adv.advertise("one-more", AdvertisingRequest(IBEACON))
        await adv.close()
    run(main())


def test_a_lost_radio_keeps_what_is_wanted_and_restores_it(backend: Backend) -> None:
    async def main() -> None:
        adv, events = backend.make(), Recorder()
        adv.subscribe(events)
        await adv.open()
        await adv.advertise("ibeacon", AdvertisingRequest(IBEACON))
        await adv.advertise("eddystone-eid", AdvertisingRequest(eid(1), timeout_s=1))
        await backend.lose(adv)
        await until(lambda: events.count("ibeacon", "LOST")
                    and events.count("eddystone-eid", "LOST"), "LOST")
        assert set(adv.on_air()) == {"ibeacon", "eddystone-eid"}
        await until(lambda: events.count("eddystone-eid", "EXPIRED"), "the window to end")
        uid = AdvertisingRequest(frames.eddystone_uid(bytes(10), bytes(6), -20))
        await adv.advertise("eddystone-uid", uid)  # asked for while the radio is away
        await backend.restore(adv)
        await until(lambda: events.count("ibeacon", "RESTORED"), "RESTORED")
        await until(lambda: events.count("eddystone-uid", "REGISTERED"), "REGISTERED")
        assert dict(adv.on_air()) == {"ibeacon": AdvertisingRequest(IBEACON),
                                      "eddystone-uid": uid}
        assert events.seen == [
            ("ibeacon", "REGISTERED"), ("eddystone-eid", "REGISTERED"),
            ("ibeacon", "LOST"), ("eddystone-eid", "LOST"), ("eddystone-eid", "EXPIRED"),
            ("ibeacon", "RESTORED"), ("eddystone-uid", "REGISTERED")]
        await adv.close()
    run(main())


def test_the_simulator_fails_when_told_and_logs_what_is_on_air(
        caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        adv, events = SimAdvertiser(), Recorder()
        adv.subscribe(events)
        await adv.open()
        adv.fail_next(HardwareUnavailable("ble", "radio jammed"))
        with pytest.raises(HardwareUnavailable, match="radio jammed"):
            await adv.advertise("ibeacon", AdvertisingRequest(IBEACON))
        assert dict(adv.on_air()) == {} and events.seen == [("ibeacon", "FAILED")]
        await adv.advertise("ibeacon", AdvertisingRequest(IBEACON, timeout_s=30))
        await adv.advertise("ibeacon", AdvertisingRequest(IBEACON, timeout_s=30))
        assert adv.updates["ibeacon"] == 1 and len(adv.requests) == 2
        await adv.close()

    with caplog.at_level("INFO", logger="tapgate.beacon"):
        run(main())
    ibeacon_hex = IBEACON.manufacturer_data[0x004C].hex()
    assert f"beacon (sim) ibeacon on air: ibeacon mfr 004C={ibeacon_hex} for 30 s" in \
        caplog.messages
