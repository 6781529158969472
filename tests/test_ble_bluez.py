"""The BlueZ advertiser against python-dbusmock's bluez5 template on a private dbus-daemon.

The test plays the part of bluetoothd the mock does not: it reads the registered
advertisement with GetAll from the advertiser's own connection, as BlueZ does, and calls
Release on it when a window ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

import pytest
from dbus_fast import DBusError, Message, MessageType, Variant, unpack_variants
from dbus_fast.errors import AuthError

from hal.ble.base import AdapterInfo, AdvertisingRequest, BeaconError
from hal.ble.bluez import BluezAdvertiser, advertisement_path
from hal.ble.bluez_errors import translate
from protocol.beacon import frames
from protocol.errors import HardwareUnavailable
from tests.fixtures.bluez import BluezMock, Recorder, until
from tests.waiting import run

EDDYSTONE = frames.EDDYSTONE_SERVICE_UUID
IBEACON = frames.ibeacon(UUID("2f234454-cf6d-4a0f-adf2-f4911ba9ffa6"), 7, 42, -59)
IBEACON_BYTES = IBEACON.manufacturer_data[0x004C]
EID_PATH = advertisement_path("eddystone-eid")
IBEACON_PATH = advertisement_path("ibeacon")


def eid(byte: int) -> frames.Advertisement:
    return frames.eddystone_eid(bytes([byte]) * 8, -20)


@contextlib.asynccontextmanager
async def opened(recorder: Recorder | None = None, **kwargs: Any
                 ) -> AsyncIterator[BluezAdvertiser]:
    adv = BluezAdvertiser(**kwargs)
    if recorder is not None:
        adv.subscribe(recorder)
    await adv.open()
    try:
        yield adv
    finally:
        await adv.close()


def owner(adv: BluezAdvertiser) -> str:
    assert adv.unique_name is not None
    return adv.unique_name


async def active(bluez: BluezMock) -> int:
    return int((await bluez.manager())["ActiveInstances"])


async def calls_named(bluez: BluezMock, name: str) -> list[list[Any]]:
    return [args for method, args in await bluez.calls() if method == name]


def test_open_reads_the_adapter(bluez: BluezMock) -> None:
    async def main() -> None:
        async with opened() as adv:
            info = await adv.open()  # a second open() answers the same
        assert info == AdapterInfo(name="hci0", address="00:01:02:03:04:05", powered=True,
                                   can_set_tx_power=True, supported_instances=5,
                                   max_adv_len=251)
    run(main())


def test_registering_exports_exactly_the_properties_that_apply(bluez: BluezMock) -> None:
    async def main() -> None:
        events = Recorder()
        async with opened(events) as adv:
            await adv.advertise("ibeacon", AdvertisingRequest(IBEACON))
            assert await active(bluez) == 1
            assert await calls_named(bluez, "RegisterAdvertisement") == [[IBEACON_PATH, {}]]
            assert await bluez.advertisement(owner(adv), IBEACON_PATH) == {
                "Type": "broadcast", "ManufacturerData": {0x004C: IBEACON_BYTES}}

            request = AdvertisingRequest(eid(1), timeout_s=30, tx_power_dbm=-8,
                                         interval_ms=(100, 150))
            await adv.advertise("eddystone-eid", request)
            assert await active(bluez) == 2
            assert await bluez.advertisement(owner(adv), EID_PATH) == {
                "Type": "broadcast", "ServiceUUIDs": [EDDYSTONE],
                "ServiceData": {EDDYSTONE: eid(1).service_data[EDDYSTONE]},
                "Timeout": 30, "TxPower": -8, "MinInterval": 100, "MaxInterval": 150}
            assert dict(adv.on_air()) == {"ibeacon": AdvertisingRequest(IBEACON),
                                          "eddystone-eid": request}
        assert events.seen[:2] == [("ibeacon", "REGISTERED"), ("eddystone-eid", "REGISTERED")]
    run(main())


class Signals:
    """PropertiesChanged of one object, seen from a connection of the test's own."""

    def __init__(self) -> None:
        self.changes: list[tuple[dict[str, Any], list[str]]] = []

    def __call__(self, msg: Message) -> None:
        if msg.message_type is MessageType.SIGNAL and msg.member == "PropertiesChanged":
            iface, changed, gone = msg.body
            assert iface == "org.bluez.LEAdvertisement1"
            self.changes.append((dict(unpack_variants(changed)), list(gone)))

    @contextlib.asynccontextmanager
    async def watching(self, bluez: BluezMock, sender: str, path: str) -> AsyncIterator[None]:
        async with bluez.client() as bus:
            bus.add_message_handler(self)
            rule = (f"type='signal',sender='{sender}',path='{path}',"
                    "interface='org.freedesktop.DBus.Properties',member='PropertiesChanged'")
            await bus.call(Message(destination="org.freedesktop.DBus",
                                   path="/org/freedesktop/DBus",
                                   interface="org.freedesktop.DBus", member="AddMatch",
                                   signature="s", body=[rule]))
            yield


def test_an_update_is_signalled_in_place_without_registering_again(bluez: BluezMock) -> None:
    async def main() -> None:
        events, signals = Recorder(), Signals()
        async with opened(events) as adv:
            await adv.advertise("eddystone-eid",
                                AdvertisingRequest(eid(1), timeout_s=30, tx_power_dbm=-8))
            async with signals.watching(bluez, owner(adv), EID_PATH):
                # the EID rotates and a new trigger restarts the same 30 s window
                await adv.advertise("eddystone-eid",
                                    AdvertisingRequest(eid(2), timeout_s=30, tx_power_dbm=-8))
                await until(lambda: signals.changes, "PropertiesChanged")
                # no TX power any more: BlueZ is told the property is gone
                await adv.advertise("eddystone-eid", AdvertisingRequest(eid(2), timeout_s=30))
                await until(lambda: len(signals.changes) == 2, "a second PropertiesChanged")
            new_frame = eid(2).service_data[EDDYSTONE]
            assert signals.changes == [
                ({"ServiceData": {EDDYSTONE: new_frame}, "Timeout": 30}, []),
                ({"Timeout": 30}, ["TxPower"])]
            assert await bluez.advertisement(owner(adv), EID_PATH) == {
                "Type": "broadcast", "ServiceUUIDs": [EDDYSTONE],
                "ServiceData": {EDDYSTONE: new_frame}, "Timeout": 30}
            assert len(await calls_named(bluez, "RegisterAdvertisement")) == 1
            assert await active(bluez) == 1
        assert events.seen[:3] == [("eddystone-eid", "REGISTERED"),
                                   ("eddystone-eid", "UPDATED"), ("eddystone-eid", "UPDATED")]
    run(main())


def test_release_by_bluez_at_the_end_of_the_window_is_expired(bluez: BluezMock) -> None:
    async def main() -> None:
        events = Recorder()
        async with opened(events, release_margin_s=60) as adv:
            await adv.advertise("eddystone-eid", AdvertisingRequest(eid(1), timeout_s=2))
            await asyncio.sleep(0.6)  # BlueZ counts whole seconds: within 1.5 s of the end
            await bluez.release(owner(adv), EID_PATH)  # what BlueZ does when Timeout is over
            await until(lambda: events.count("eddystone-eid", "EXPIRED"), "EXPIRED")
            assert dict(adv.on_air()) == {}
            with pytest.raises(DBusError) as err:  # unexported
                await bluez.advertisement(owner(adv), EID_PATH)
            assert err.value.type == "org.freedesktop.DBus.Error.UnknownObject"
            # BlueZ dropped it itself: it is not unregistered a second time
            assert await calls_named(bluez, "UnregisterAdvertisement") == []
        assert "LOST" not in {name for _, name in events.seen}
    run(main())


def test_release_before_the_window_ends_is_bluetoothd_stopping(bluez: BluezMock) -> None:
    async def main() -> None:
        events = Recorder()
        async with opened(events) as adv:
            await adv.advertise("ibeacon", AdvertisingRequest(IBEACON))
            await adv.advertise("eddystone-eid", AdvertisingRequest(eid(1), timeout_s=600))
            # a clean `systemctl stop bluetooth`: Release on every advertisement, then exit
            await bluez.release(owner(adv), IBEACON_PATH)
            with contextlib.suppress(DBusError):  # gone already; bluetoothd ignores the answer
                await bluez.release(owner(adv), EID_PATH)
            await bluez.stop_bluetoothd()
            await until(lambda: events.count("ibeacon", "LOST")
                        and events.count("eddystone-eid", "LOST"), "LOST")
            assert set(adv.on_air()) == {"ibeacon", "eddystone-eid"}
            await bluez.restart_bluetoothd()
            await until(lambda: events.count("ibeacon", "RESTORED")
                        and events.count("eddystone-eid", "RESTORED"), "RESTORED")
            assert await active(bluez) == 2
        assert events.count("ibeacon", "LOST") == events.count("eddystone-eid", "LOST") == 1
        assert "EXPIRED" not in {name for _, name in events.seen}
    run(main())


def test_our_timer_ends_the_window_when_bluez_never_releases(bluez: BluezMock) -> None:
    async def main() -> None:
        events = Recorder()
        async with opened(events, release_margin_s=0.2) as adv:
            await adv.advertise("eddystone-eid", AdvertisingRequest(eid(1), timeout_s=1))
            await until(lambda: events.count("eddystone-eid", "EXPIRED"), "EXPIRED")
            assert dict(adv.on_air()) == {}
            assert await calls_named(bluez, "UnregisterAdvertisement") == [[EID_PATH]]
            assert await active(bluez) == 0
    run(main())


def test_withdraw_unregisters_and_unexports(bluez: BluezMock) -> None:
    async def main() -> None:
        events = Recorder()
        async with opened(events) as adv:
            await adv.advertise("ibeacon", AdvertisingRequest(IBEACON))
            await adv.withdraw("ibeacon")
            await adv.withdraw("ibeacon")  # not on air: nothing to do, no error
            await adv.withdraw("never-advertised")
            assert await calls_named(bluez, "UnregisterAdvertisement") == [[IBEACON_PATH]]
            assert await active(bluez) == 0
            with pytest.raises(DBusError):
                await bluez.advertisement(owner(adv), IBEACON_PATH)
        assert events.seen == [("ibeacon", "REGISTERED"), ("ibeacon", "WITHDRAWN")]
    run(main())


def test_close_withdraws_everything(bluez: BluezMock) -> None:
    async def main() -> None:
        events = Recorder()
        async with opened(events) as adv:
            await adv.advertise("ibeacon", AdvertisingRequest(IBEACON))
            await adv.advertise("eddystone-eid", AdvertisingRequest(eid(1), timeout_s=30))
        assert await active(bluez) == 0
        assert events.count("ibeacon", "WITHDRAWN") == events.count("eddystone-eid",
                                                                    "WITHDRAWN") == 1
        with pytest.raises(HardwareUnavailable, match="not open"):
            await adv.advertise("ibeacon", AdvertisingRequest(IBEACON))
    run(main())


def test_bluetoothd_going_away_and_back_restores_what_is_still_wanted(bluez: BluezMock) -> None:
    async def main() -> None:
        events = Recorder()
        async with opened(events, release_margin_s=0.2) as adv:
            await adv.advertise("ibeacon", AdvertisingRequest(IBEACON))
            await adv.advertise("eddystone-eid", AdvertisingRequest(eid(1), timeout_s=600))
            await adv.advertise("eddystone-url", AdvertisingRequest(
                frames.eddystone_url("https://example.com", -20), timeout_s=1))
            await bluez.stop_bluetoothd()
            await until(lambda: all(events.count(slot, "LOST") == 1 for slot in adv.on_air()),
                        "LOST for every slot")
            assert set(adv.on_air()) == {"ibeacon", "eddystone-eid", "eddystone-url"}
            # a window that ends while bluetoothd is away ends all the same
            await until(lambda: events.count("eddystone-url", "EXPIRED"), "EXPIRED")
            # a slot asked for while bluetoothd is away goes on air when it is back
            await adv.advertise("eddystone-uid", AdvertisingRequest(
                frames.eddystone_uid(bytes(10), bytes(6), -20)))

            await bluez.restart_bluetoothd()
            await until(lambda: events.count("eddystone-eid", "RESTORED")
                        and events.count("ibeacon", "RESTORED"), "RESTORED")
            assert events.count("eddystone-uid", "REGISTERED") == 1
            assert await active(bluez) == 3
            assert sorted(args[0] for args in await calls_named(bluez, "RegisterAdvertisement")
                          ) == sorted(advertisement_path(s) for s in adv.on_air())
            restored = await bluez.advertisement(owner(adv), EID_PATH)
            assert 590 <= restored["Timeout"] <= 600  # what is left of its window
            assert "Timeout" not in await bluez.advertisement(owner(adv), IBEACON_PATH)
            assert set(adv.on_air()) == {"ibeacon", "eddystone-eid", "eddystone-uid"}
    run(main())


def test_an_adapter_that_comes_back_later_is_waited_for(bluez: BluezMock) -> None:
    async def main() -> None:
        events = Recorder()
        async with opened(events) as adv:
            await adv.advertise("ibeacon", AdvertisingRequest(IBEACON))
            await bluez.restart_bluetoothd(adapters=())  # bluetoothd up, no adapter yet
            await until(lambda: events.count("ibeacon", "LOST"), "LOST")
            assert events.count("ibeacon", "RESTORED") == 0
            await bluez.add_adapter("hci0")  # InterfacesAdded on /
            await until(lambda: events.count("ibeacon", "RESTORED"), "RESTORED")
            assert await active(bluez) == 1

            await bluez.remove_adapter("hci0")  # unplugged, bluetoothd stays
            await until(lambda: events.count("ibeacon", "LOST") == 2, "LOST again")
            await bluez.add_adapter("hci0")
            await until(lambda: events.count("ibeacon", "RESTORED") == 2, "RESTORED again")
            assert await active(bluez) == 1
    run(main())


def test_the_system_bus_going_away_is_lost_until_reopened(bluez: BluezMock) -> None:
    async def main() -> None:
        events = Recorder()
        adv = BluezAdvertiser()
        adv.subscribe(events)
        await adv.open()
        await adv.advertise("ibeacon", AdvertisingRequest(IBEACON))
        bluez.kill_bus()
        await until(lambda: events.count("ibeacon", "LOST"), "LOST")
        with pytest.raises(HardwareUnavailable, match="must be reopened"):
            await adv.advertise("ibeacon", AdvertisingRequest(IBEACON))
        with pytest.raises(HardwareUnavailable, match="no D-Bus system bus"):
            await adv.open()  # starts afresh: closes, then cannot connect
        assert dict(adv.on_air()) == {}
        await adv.close()
    run(main())


def test_a_missing_adapter_names_the_ones_there_are(bluez: BluezMock) -> None:
    async def main() -> None:
        with pytest.raises(HardwareUnavailable) as err:
            await BluezAdvertiser(adapter="hci1").open()
        assert str(err.value) == ("ble: adapter hci1 not found; adapters: hci0 "
                                  "(set beacon.adapter, or plug the adapter in)")
    run(main())


def test_no_bluetoothd_says_to_check_it(bluez: BluezMock) -> None:
    async def main() -> None:
        await bluez.stop_bluetoothd()
        with pytest.raises(HardwareUnavailable) as err:
            await BluezAdvertiser().open()
        assert "bluetoothd is not on the system bus" in str(err.value)
        assert "systemctl status bluetooth" in str(err.value)
    run(main())


def test_no_system_bus_says_to_check_dbus(tmp_path: Any, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    address = f"unix:path={tmp_path}/no-such-bus"
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", address)

    async def main() -> None:
        for adv in (BluezAdvertiser(), BluezAdvertiser(bus_address=address)):
            with pytest.raises(HardwareUnavailable) as err:
                await adv.open()
            assert str(err.value) == (f"ble: no D-Bus system bus at {address} (No such file "
                                      "or directory): is dbus running? systemctl status dbus")
    run(main())


def test_an_adapter_without_le_advertising_cannot_be_used(bluez: BluezMock) -> None:
    async def main() -> None:
        await bluez.restart_bluetoothd(parameters={"enable_advertise_api": False})
        with pytest.raises(HardwareUnavailable, match="adapter hci0 cannot advertise"):
            await BluezAdvertiser().open()
    run(main())


def test_all_instances_in_use_is_hardware_unavailable(bluez: BluezMock) -> None:
    async def main() -> None:
        events = Recorder()
        async with opened(events) as adv:
            for n in range(5):
                await adv.advertise(f"slot{n}", AdvertisingRequest(IBEACON))
            with pytest.raises(HardwareUnavailable) as err:
                await adv.advertise("slot5", AdvertisingRequest(IBEACON))
            assert not isinstance(err.value, BeaconError)
            assert "adapter hci0 has no free advertising instance" in str(err.value)
            assert events.seen[-1] == ("slot5", "FAILED")
            assert len(adv.on_air()) == 5
            with pytest.raises(DBusError):  # not left exported
                await bluez.advertisement(owner(adv), advertisement_path("slot5"))
    run(main())


def test_a_refused_advertisement_is_a_beacon_error(bluez: BluezMock) -> None:
    async def main() -> None:
        # someone holds our path already: the mock answers AlreadyExists
        await bluez.call("org.bluez", "/org/bluez/hci0", "org.bluez.LEAdvertisingManager1",
                         "RegisterAdvertisement", "oa{sv}", [IBEACON_PATH, {}])
        async with opened() as adv:
            with pytest.raises(BeaconError) as err:
                await adv.advertise("ibeacon", AdvertisingRequest(IBEACON))
            assert err.value.slot == "ibeacon"
            assert "BlueZ refused it while registering 'ibeacon' on hci0" in str(err.value)
            assert dict(adv.on_air()) == {}
    run(main())


def test_a_powered_off_adapter_is_powered_on(bluez: BluezMock) -> None:
    async def main() -> None:
        await bluez.update("/org/bluez/hci0", "org.bluez.Adapter1",
                           {"Powered": Variant("b", False)})
        async with opened() as adv:
            assert (await adv.open()).powered
        props = await bluez.call("org.bluez", "/org/bluez/hci0",
                                 "org.freedesktop.DBus.Properties", "Get", "ss",
                                 ["org.bluez.Adapter1", "Powered"])
        assert props[0].value is True
    run(main())


def test_tx_power_is_left_out_when_the_adapter_cannot_set_it(bluez: BluezMock) -> None:
    async def main() -> None:
        await bluez.update("/org/bluez/hci0", "org.bluez.LEAdvertisingManager1",
                           {"SupportedFeatures": Variant("as", ["HardwareOffload"])})
        async with opened() as adv:
            assert not (await adv.open()).can_set_tx_power
            await adv.advertise("ibeacon", AdvertisingRequest(IBEACON, tx_power_dbm=-8))
            assert await bluez.advertisement(owner(adv), IBEACON_PATH) == {
                "Type": "broadcast", "ManufacturerData": {0x004C: IBEACON_BYTES}}
    run(main())


@pytest.mark.parametrize(("err", "slot", "says"), [
    (DBusError("org.freedesktop.DBus.Error.NoReply", "no reply"), None,
     "bluetoothd did not answer while doing it: is it hung? systemctl restart bluetooth"),
    (TimeoutError(), None, "bluetoothd did not answer while doing it"),
    (DBusError("org.freedesktop.DBus.Error.AccessDenied", "denied"), None,
     "install systemd/tapgate-bluez.conf"),
    (DBusError("org.freedesktop.DBus.Error.UnknownObject", "no /org/bluez/hci0"), None,
     "adapter hci0 is gone while doing it"),
    (DBusError("org.bluez.Error.Failed", "Failed to parse advertisement."), "ibeacon",
     "advertisement 'ibeacon': BlueZ refused it while doing it: Failed to parse"),
    (DBusError("org.bluez.Error.InvalidArguments", "Invalid arguments"), "ibeacon",
     "advertisement 'ibeacon': BlueZ refused it"),
    (DBusError("org.bluez.Error.NotReady", "Resource Not Ready"), None,
     "adapter hci0 is powered off"),
    (AuthError("rejected"), None, "refused tapgate's login"),
    (PermissionError(13, "Permission denied"), None, "no permission to connect"),
    (ConnectionRefusedError(111, "Connection refused"), None, "is dbus running?"),
    (EOFError(), None, "the D-Bus connection broke while doing it"),
])
def test_every_dbus_failure_has_its_typed_error(err: BaseException, slot: str | None,
                                                 says: str) -> None:
    typed = translate(err, adapter="hci0", doing="doing it", slot=slot, bus="unix:path=/x")
    assert isinstance(typed, HardwareUnavailable)
    assert isinstance(typed, BeaconError) == (slot is not None)
    assert says in str(typed)
