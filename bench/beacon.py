"""The beacon: trigger → advertisements registered, against BlueZ on D-Bus; and the CPU
cost of an EID rotation. Each beside a baseline measured in the same run.

bluetoothd is python-dbusmock's bluez5 template on a private dbus-daemon (as in the
tests; ``make test`` installs it). There is no radio: what is timed is tapgate's side
and the D-Bus round trips a real bluetoothd would answer as quickly or slower.

  a) trigger → registered: BeaconController.trigger() from another thread (as the card
     loop calls it) until every frame's RegisterAdvertisement has been answered, through
     the bluez backend; then the frames are withdrawn for the next trial.
  b) baseline: the same number of bare RegisterAdvertisement calls with dbus-fast, of
     objects exported beforehand (no frames to build, no controller, no thread hop).
  c) EID rotation CPU (process time): the whole in-place update the beacon task does at a
     period boundary (new EID, new frame, PropertiesChanged to BlueZ), per rotation,
     beside one AES-128 block encryption and the two-block EID computation alone.

    python -m bench.beacon [--trials 200] [--rotations 2000]
"""

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_property

from bench.common import pct, summary
from daemon.beacon import frameset
from daemon.beacon.controller import BeaconController
from daemon.config import validate
from hal.ble.base import AdvertisingRequest
from hal.ble.bluez import BluezAdvertiser
from protocol.beacon.eid import compute_eid
from tests.configs import raw_config
from tests.fixtures.bluez import BluezMock, check_prerequisites

FRAMES = ["ibeacon", "eddystone-uid", "eddystone-url", "eddystone-tlm", "eddystone-eid"]
KEY = bytes.fromhex("000102030405060708090a0b0c0d0e0f")


def beacon_config() -> Any:
    raw = raw_config()
    raw["beacon"] = {"enabled": True, "backend": "bluez", "window_s": 600, "frames": FRAMES,
                     "uuid": "e2c56db5-dffb-48d2-b060-d0f5a71096e0", "major": 1, "minor": 7,
                     "namespace": "8b0ca750e7a74e14bd99", "url": "https://tg.example/a7",
                     "eid_key": KEY.hex(), "eid_exponent": 10}
    return validate(raw).beacon


class Bare(ServiceInterface):
    """The least an advertisement object can be: Type and one byte array."""

    def __init__(self) -> None:
        super().__init__("org.bluez.LEAdvertisement1")

    @dbus_property(access=PropertyAccess.READ)
    def Type(self) -> "s":  # type: ignore[name-defined]  # noqa: F821
        return "broadcast"


async def call(bus: MessageBus, member: str, signature: str, body: list[Any]) -> None:
    reply = await bus.call(Message(destination="org.bluez", path="/org/bluez/hci0",
                                   interface="org.bluez.LEAdvertisingManager1", member=member,
                                   signature=signature, body=body))
    assert reply is not None and reply.message_type is MessageType.METHOD_RETURN, reply


async def bare_registrations(address: str, trials: int) -> list[float]:
    bus = await MessageBus(bus_address=address).connect()
    paths = [f"/bench/bare/{i}" for i in range(len(FRAMES))]
    for path in paths:
        bus.export(path, Bare())
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for path in paths:
            await call(bus, "RegisterAdvertisement", "oa{sv}", [path, {}])
        times.append(time.perf_counter() - t0)
        for path in paths:
            await call(bus, "UnregisterAdvertisement", "o", [path])
    bus.disconnect()
    return times


async def triggered(address: str, trials: int, rotations: int) -> tuple[list[float], list[float]]:
    """(trigger → registered, CPU per EID rotation update) through the real task."""
    config = beacon_config()
    advertiser = BluezAdvertiser(adapter="hci0", bus_address=address)
    controller = BeaconController(config=config, advertiser=advertiser)
    done: asyncio.Queue[float] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    controller.on_registered = lambda trig, at: done.put_nowait(at - trig.at)
    stop = asyncio.Event()
    task = asyncio.create_task(controller.run(stop))
    times = []
    try:
        for _ in range(trials):
            await loop.run_in_executor(None, controller.trigger, "command")  # another thread
            times.append(await asyncio.wait_for(done.get(), 30))
            for slot in list(advertiser.on_air()):
                await advertiser.withdraw(slot)
        # rotations: the update the task sends at a period boundary, timed in CPU
        controller.trigger("command")
        await asyncio.wait_for(done.get(), 30)
        cpu = []
        t = time.time()
        for i in range(1, rotations + 1):
            c0 = time.process_time()
            request = AdvertisingRequest(advertisement=frameset.build(
                config, t + i * 1024.0)["eddystone-eid"], timeout_s=600,
                interval_ms=(100, 100))
            await advertiser.advertise("eddystone-eid", request)
            cpu.append(time.process_time() - c0)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    return times, cpu


def aes_block_cpu(n: int) -> list[float]:
    enc = Cipher(algorithms.AES(KEY), modes.ECB()).encryptor()
    block = bytes(16)
    out = []
    for _ in range(n):
        c0 = time.process_time_ns()
        enc.update(block)
        out.append((time.process_time_ns() - c0) / 1e9)
    return out


def eid_cpu(n: int) -> list[float]:
    out = []
    for i in range(n):
        c0 = time.process_time_ns()
        compute_eid(KEY, 10, i * 1024)
        out.append((time.process_time_ns() - c0) / 1e9)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.beacon")
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--rotations", type=int, default=2000)
    args = parser.parse_args(argv)
    check_prerequisites()
    work = Path(tempfile.mkdtemp(prefix="tapgate-bench-beacon-"))
    mock = BluezMock(work)
    mock.start()
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = mock.bus_address
    try:
        bare = asyncio.run(bare_registrations(mock.bus_address, args.trials))
        trig, rotation_cpu = asyncio.run(triggered(mock.bus_address, args.trials, 200))
        bare_after = asyncio.run(bare_registrations(mock.bus_address, args.trials))
    finally:
        mock.stop()
        with contextlib.suppress(OSError):
            for path in sorted(work.rglob("*"), reverse=True):
                path.unlink() if path.is_file() or path.is_socket() else path.rmdir()
            work.rmdir()
    best = bare if pct(bare, 50) <= pct(bare_after, 50) else bare_after
    n = len(FRAMES)
    print(f"trigger -> {n} advertisements registered (BlueZ mock on a private D-Bus), "
          f"{args.trials} trials")
    print(summary("a) tapgate trigger -> registered", trig))
    print(summary(f"b) bare {n} x RegisterAdvertisement", best))
    print(f"   overhead p50 {1000 * (pct(trig, 50) - pct(best, 50)):.3f} ms, "
          f"p99 {1000 * (pct(trig, 99) - pct(best, 99)):.3f} ms above the bare calls")
    aes = aes_block_cpu(args.rotations)
    eid = eid_cpu(args.rotations)
    print("EID rotation, CPU (process time) per rotation:")
    print(summary("c) rotation on air (EID+frame+D-Bus)", rotation_cpu))
    print(summary("   EID computation alone (2 AES)", eid))
    print(summary("   one AES-128 block (baseline)", aes))
    per_hour = 3600 / 1024 * pct(rotation_cpu, 50)
    print(f"   at eid_exponent 10 (every 1024 s): {per_hour * 1000:.3f} ms of CPU per hour")


if __name__ == "__main__":
    main()
