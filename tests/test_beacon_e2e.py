"""A gate's beacon heard by a phone, and the phone's bytes resolved by the head-end, over
bumble (google/bumble): two virtual Bluetooth LE devices on one ``bumble.link.LocalLink``.

Real here: bumble's controller and host stacks on both sides (HCI commands and events
encoded and decoded as bytes; the gate's host sets up a non-connectable, legacy-PDU
advertising set with the exact advertising data protocol.beacon.frames built, the phone's
host scans passively); the LE advertising PDUs carrying those bytes from one controller
to the other over the LocalLink; the head-end's beacon directory (headend.beacons, on
SQLite) resolving what the phone heard, EID identity keys and all.

Not real: there is no radio. No channels, air, loss, collisions or distance: bumble's
emulated controller reports every PDU with a constant RSSI (-50 dBm), as connectable
whatever the advertiser set, and echoes it once more as a scan response (the phone here
ignores those), so RSSI thresholds are not exercised. The gate's BlueZ path (D-Bus
LEAdvertisement1, the kernel adding Flags) is not involved either: the built bytes go to
HCI as they are. Time is simulated: the EID rotation uses explicit instants, no waiting.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from headend.beacons import STORED, BeaconDirectory, NotAnIdentity, Resolution
from headend.sealed import Sealer
from protocol.beacon import frames
from protocol.beacon.eid import EidSchedule

pytest.importorskip("bumble", reason="the beacon end-to-end test needs bumble")

from bumble.controller import Controller
from bumble.device import Advertisement, AdvertisingType, Device
from bumble.hci import Address, HCI_LE_Set_Extended_Advertising_Parameters_Command
from bumble.host import Host
from bumble.link import LocalLink
from bumble.transport.common import AsyncPipeSink

OPERATOR = uuid.UUID("e2c56db5-dffb-48d2-b060-d0f5a71096e0")
NAMESPACE = bytes.fromhex("8b0ca750e7a74e14bd99")
EID_KEY = bytes.fromhex("6a1f7c2e9d3b48a0b5c4e7f8091a2b3c")
K = 10  # a new EID every 1024 s
NOW = 1_795_330_861.0
TX0 = frames.tx_power_at_0m(-59)
HEAR_TIMEOUT_S = 5.0
ADV_INTERVAL_MS = 20.0
PROPERTIES = HCI_LE_Set_Extended_Advertising_Parameters_Command.AdvertisingProperties
GATES = {"0000000000A7": (7, "F0:00:00:00:00:A7"), "0000000000B2": (8, "F0:00:00:00:00:B2")}


def info(gate: str) -> dict[str, Any]:
    minor, _ = GATES[gate]
    return {
        "v": 1, "gate": gate, "name": f"North entrance {minor}", "station": "Central",
        "ts_ms": int(NOW * 1000), "status": "in_service",
        "fares": {"adult": 250, "concession": 120},
        "page_url": f"https://transit.example/g/{gate}",
        "beacon": {
            "mode": "triggered", "window_s": 30,
            "frames": ["ibeacon", "eddystone-uid", "eddystone-url", "eddystone-eid"],
            "ibeacon": {"uuid": str(OPERATOR), "major": 1, "minor": minor},
            "eddystone_uid": {"namespace": NAMESPACE.hex(), "instance": gate.lower()},
            "eddystone_url": f"https://tg.example/{gate[-4:]}",
            "eid": {"exponent": K, "epoch": 0},
            "measured_power": -59, "tx_power_dbm": None, "distance_m": 2.0,
            "path_loss_exponent": 2.0, "rssi_threshold": -65}}


def built(kind: str, gate: str, now: float = NOW) -> bytes:
    """The advertising data the gate's beacon puts on air for this frame kind."""
    minor, _ = GATES[gate]
    advertisement = {
        "ibeacon": lambda: frames.ibeacon(OPERATOR, 1, minor, -59),
        "eddystone-uid": lambda: frames.eddystone_uid(NAMESPACE, bytes.fromhex(gate), TX0),
        "eddystone-url": lambda: frames.eddystone_url(f"https://tg.example/{gate[-4:]}", TX0),
        "eddystone-eid": lambda: frames.eddystone_eid(
            EidSchedule(EID_KEY if gate.endswith("A7") else EID_KEY[::-1], K, 0).eid_at(now),
            TX0),
        "eddystone-tlm": lambda: frames.eddystone_tlm(
            battery_mv=0, temperature_c=47.25, adv_count=12, uptime_s=3600.0),
    }[kind]()
    return advertisement.payload()


@pytest.fixture
def directory(tmp_path: Path) -> Iterator[BeaconDirectory]:
    """The head-end's directory: both gates' info in, their EID keys registered."""
    with BeaconDirectory(f"sqlite:///{tmp_path / 'headend.db'}",
                         sealer=Sealer(bytes(range(32)))) as d:
        for gate in GATES:
            assert d.ingest(gate, json.dumps(info(gate)).encode(),
                            now_ms=int(NOW * 1000)) == STORED
        d.register_eid("0000000000A7", EID_KEY, K, 0)
        d.register_eid("0000000000B2", EID_KEY[::-1], K, 0)
        yield d


@dataclass(frozen=True, slots=True)
class Heard:
    address: str
    data: bytes
    rssi: int


def host_device(link: LocalLink, name: str, address: str) -> Device:
    """A bumble Device: its host stack talking HCI to its own emulated controller."""
    controller = Controller(name, link=link)
    return Device(name=name, address=Address(address),
                  host=Host(controller, AsyncPipeSink(controller)))


class Phone:
    """A phone scanning passively, keeping what it hears (no scan responses)."""

    def __init__(self, link: LocalLink) -> None:
        self.device = host_device(link, "phone", "C0:00:00:00:00:01")
        self.heard: list[Heard] = []
        self._news = asyncio.Condition()

    async def start(self) -> None:
        await self.device.power_on()
        self.device.on("advertisement", self._on_advertisement)
        await self.device.start_scanning(active=False)

    def _on_advertisement(self, adv: Advertisement) -> None:
        if adv.is_scan_response:  # bumble's controller echoes each PDU as one
            return
        self.heard.append(Heard(str(adv.address), bytes(adv.data_bytes), adv.rssi))
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._news:
            self._news.notify_all()

    async def hear(self, address: str, match: Callable[[bytes], bool]) -> Heard:
        """The first advertisement from ``address`` whose data ``match``es."""
        def found() -> Heard | None:
            return next((h for h in self.heard if h.address == address and match(h.data)),
                        None)

        async def wait() -> Heard:
            async with self._news:
                await self._news.wait_for(lambda: found() is not None)
            heard = found()
            assert heard is not None
            return heard

        return await asyncio.wait_for(wait(), HEAR_TIMEOUT_S)


class Gate:
    """A gate's beacon: a bumble device advertising what protocol.beacon.frames built."""

    def __init__(self, link: LocalLink, gate: str) -> None:
        self.address = GATES[gate][1]
        self.device = host_device(link, gate, self.address)

    async def start(self) -> None:
        await self.device.power_on()

    async def advertise(self, data: bytes) -> None:
        if self.device.legacy_advertising_set is not None:
            # the gate's rotation: new data on the running advertising set
            await self.device.legacy_advertising_set.set_advertising_data(data)
            return
        await self.device.start_advertising(
            advertising_type=AdvertisingType.UNDIRECTED,  # non-connectable, non-scannable
            advertising_data=data, advertising_interval_min=ADV_INTERVAL_MS,
            advertising_interval_max=ADV_INTERVAL_MS)

    def properties_set(self) -> int:
        """The advertising event properties the gate's host gave its controller."""
        (adv_set,) = self.device.extended_advertising_sets.values()
        return int(adv_set.advertising_parameters.advertising_event_properties)


async def on_air(*gates: str) -> tuple[Phone, list[Gate]]:
    link = LocalLink()  # type: ignore[no-untyped-call]
    phone = Phone(link)
    beacons = [Gate(link, g) for g in gates]
    await phone.start()
    for beacon in beacons:
        await beacon.start()
    return phone, beacons


def resolution(gate: str, kind: str) -> Resolution:
    return Resolution(gate=gate, frame=kind, name=f"North entrance {GATES[gate][0]}",
                      station="Central", page_url=f"https://transit.example/g/{gate}",
                      status="in_service", fares={"adult": 250, "concession": 120},
                      ts_ms=int(NOW * 1000))


@pytest.mark.parametrize("kind", ["ibeacon", "eddystone-uid", "eddystone-url"])
def test_the_phone_hears_the_built_bytes_and_the_headend_names_the_gate(
        directory: BeaconDirectory, kind: str) -> None:
    data = built(kind, "0000000000A7")

    async def scenario() -> tuple[Heard, int]:
        phone, (gate,) = await on_air("0000000000A7")
        await gate.advertise(data)
        return await phone.hear(gate.address, lambda d: d == data), gate.properties_set()

    heard, properties = asyncio.run(scenario())
    assert heard.data == data  # byte for byte what frames built, Flags and all
    assert heard.rssi == -50  # bumble's constant: no radio, no distance
    assert frames.parse(heard.data) == frames.parse(data)
    assert properties & PROPERTIES.USE_LEGACY_ADVERTISING_PDUS
    assert not properties & (PROPERTIES.CONNECTABLE_ADVERTISING
                             | PROPERTIES.SCANNABLE_ADVERTISING)
    assert directory.resolve(heard.data, NOW) == resolution("0000000000A7", kind)


def test_two_gates_on_air_each_resolves_to_itself(directory: BeaconDirectory) -> None:
    sent = {"0000000000A7": built("ibeacon", "0000000000A7"),
            "0000000000B2": built("ibeacon", "0000000000B2")}

    async def scenario() -> dict[str, Heard]:
        phone, beacons = await on_air(*sent)
        for gate, beacon in zip(sent, beacons, strict=True):
            await beacon.advertise(sent[gate])
        return {gate: await phone.hear(beacon.address, lambda d: True)
                for gate, beacon in zip(sent, beacons, strict=True)}

    heard = asyncio.run(scenario())
    for gate, h in heard.items():
        assert h.data == sent[gate]
        assert directory.resolve(h.data, NOW) == resolution(gate, "ibeacon")


def test_a_rotating_eid_resolves_in_its_period_and_not_once_stale(
        directory: BeaconDirectory) -> None:
    schedule = EidSchedule(EID_KEY, K, 0)
    first_at = NOW
    then_at = schedule.next_rotation(NOW) + 1  # the gate's next period
    first, then = built("eddystone-eid", "0000000000A7", first_at), built(
        "eddystone-eid", "0000000000A7", then_at)
    assert first != then

    async def scenario() -> tuple[Heard, Heard]:
        phone, (gate,) = await on_air("0000000000A7")
        await gate.advertise(first)
        heard_first = await phone.hear(gate.address, lambda d: d == first)
        await gate.advertise(then)  # the rotation, on the running advertising set
        heard_then = await phone.hear(gate.address, lambda d: d == then)
        return heard_first, heard_then

    heard_first, heard_then = asyncio.run(scenario())
    assert (heard_first.data, heard_then.data) == (first, then)
    want = resolution("0000000000A7", "eddystone-eid")
    assert directory.resolve(heard_first.data, first_at) == want
    assert directory.resolve(heard_then.data, then_at) == want
    # the old EID a period later is within the slack (clocks drift); two periods later,
    # a recording replayed, it is no one's
    assert directory.resolve(heard_first.data, then_at) == want
    stale_at = then_at + 2 ** K
    assert directory.resolve(heard_first.data, stale_at) is None
    assert directory.resolve(heard_then.data, stale_at) == want
    # the other gate's key never names this gate's EID
    assert directory.resolve(built("eddystone-eid", "0000000000B2", first_at),
                             first_at) == resolution("0000000000B2", "eddystone-eid")


def test_telemetry_heard_is_not_an_identity(directory: BeaconDirectory) -> None:
    data = built("eddystone-tlm", "0000000000A7")

    async def scenario() -> Heard:
        phone, (gate,) = await on_air("0000000000A7")
        await gate.advertise(data)
        return await phone.hear(gate.address, lambda d: d == data)

    heard = asyncio.run(scenario())
    assert heard.data == data
    with pytest.raises(NotAnIdentity):
        directory.resolve(heard.data, NOW)
