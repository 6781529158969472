"""`tapgate beacon show | scan | selfcheck`, and the daemon on the bluez backend.

`show` is read back by beacontools (an independent decoder), not by our own parser. The
daemon test runs `tapgate run` with backend = "bluez" against python-dbusmock's bluez5 on
a private D-Bus: a tap registers one advertisement per frame, and what BlueZ reads from
the daemon's objects (GetAll) is exactly what `tapgate beacon show` printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from beacontools import parse_packet  # type: ignore[import-untyped]
from dbus_fast import Variant

from protocol.beacon import frames
from tests.configs import raw_config, toml_text
from tests.daemon_process import Daemon
from tests.fixtures.bluez import BluezMock, until

ROOT = Path(__file__).resolve().parent.parent
UUID = "e2c56db5-dffb-48d2-b060-d0f5a71096e0"
APP = "7a9e0c51-3b1d-4c8e-9f2a-5d6b7c8e9f10"  # daemon.beacon.config.PHONE_SERVICE_UUID


def write_config(tmp_path: Path, **beacon: Any) -> Path:
    raw = raw_config(tmp_path / "journal.db")
    raw["beacon"] = {"enabled": True, "uuid": UUID, "major": 3, "minor": 9,
                     "namespace": "8b0ca750e7a74e14bd99", "url": "https://tg.example/a7",
                     "eid_key": "000102030405060708090a0b0c0d0e0f", "eid_exponent": 8,
                     **beacon}
    path = tmp_path / "tapgate.toml"
    path.write_text(toml_text(raw), encoding="utf-8")
    return path


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout, env=dict(os.environ))


def test_show_prints_what_an_independent_decoder_reads(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    proc = cli("beacon", "show", "--config", str(config), "--json", "--at", "1800000000")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    shown = doc["frames"]
    assert set(shown) == {"ibeacon", "eddystone-uid", "eddystone-url", "eddystone-eid",
                          "eddystone-tlm"}
    ib = parse_packet(bytes.fromhex(shown["ibeacon"]["payload"]))
    assert (str(ib.uuid), ib.major, ib.minor, ib.tx_power) == (UUID, 3, 9, -59)
    uid = parse_packet(bytes.fromhex(shown["eddystone-uid"]["payload"]))
    assert (uid.namespace, uid.instance) == ("8b0ca750e7a74e14bd99", "000000a00001")
    url = parse_packet(bytes.fromhex(shown["eddystone-url"]["payload"]))
    assert url.url == "https://tg.example/a7"
    eid = parse_packet(bytes.fromhex(shown["eddystone-eid"]["payload"]))
    assert eid.eid.hex().upper() == doc["eid"]["current"]
    assert doc["eid"]["period_s"] == 256 and doc["eid"]["next_rotation"] == 1800000000 - (
        1800000000 % 256) + 256
    # every AD structure printed is the payload, in order
    for frame in shown.values():
        ad = "".join(f"{len(a['data']) // 2 + 1:02X}{a['type'][2:]}{a['data']}"
                     for a in frame["ad"])
        assert ad == frame["payload"] and frame["length"] == len(ad) // 2 <= 31

    text = cli("beacon", "show", "--config", str(config), "--at", "1800000000")
    assert text.returncode == 0, text.stderr
    assert shown["ibeacon"]["payload"] in text.stdout
    assert f"EID now {doc['eid']['current']} (changes every 256 s" in text.stdout
    assert "RSSI >= -65 dBm" in text.stdout


def test_show_refuses_a_broken_beacon_config(tmp_path: Path) -> None:
    proc = cli("beacon", "show", "--config", str(write_config(tmp_path, eid_key="00")))
    assert proc.returncode == 2
    assert "beacon.eid_key = '<hidden>': must be 32 hex digits" in proc.stderr
    proc = cli("beacon", "show", "--config", str(write_config(tmp_path, major=-3)))
    assert proc.returncode == 2 and "beacon.major = -3" in proc.stderr


def discovering(bluez: BluezMock, adapter: str) -> Any:
    async def check() -> bool:
        body = await bluez.call("org.bluez", f"/org/bluez/{adapter}",
                                "org.freedesktop.DBus.Properties", "Get", "ss",
                                ["org.bluez.Adapter1", "Discovering"])
        return bool(body[0].value)
    return check


def test_scan_lists_phones_near_and_far(tmp_path: Path, bluez: BluezMock) -> None:
    config = write_config(tmp_path, adapter="hci0")
    proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "beacon", "scan", "--config",
                             str(config), "--seconds", "4", "--json"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        async def phones() -> None:
            await until(discovering(bluez, "hci0"), "discovery", 30)
            await bluez.add_device("hci0", "AA:BB:CC:00:00:01", RSSI=Variant("n", -60),
                                   UUIDs=Variant("as", [APP]))
            await bluez.add_device("hci0", "AA:BB:CC:00:00:02", RSSI=Variant("n", -80),
                                   UUIDs=Variant("as", [APP]))
        asyncio.run(phones())
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    doc = json.loads(out)
    assert doc["rssi_threshold"] == -65
    assert [(p["address"], p["within"]) for p in doc["phones"]] == [
        ("AA:BB:CC:00:00:01", True), ("AA:BB:CC:00:00:02", False)]


def test_selfcheck_on_a_second_adapter(tmp_path: Path, bluez: BluezMock) -> None:
    config = write_config(tmp_path, frames=["ibeacon"])
    same = cli("beacon", "selfcheck", "--config", str(config), "--adapter", "hci0")
    assert same.returncode == 2 and "is the advertising adapter" in same.stderr

    async def add_listener() -> None:
        await bluez.add_adapter("hci1", "listener")
    asyncio.run(add_listener())
    proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "beacon", "selfcheck",
                             "--config", str(config), "--adapter", "hci1", "--seconds", "20"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ibeacon = frames.ibeacon(uuid.UUID(UUID), 3, 9, -59)

        async def gate_on_air() -> None:
            await until(discovering(bluez, "hci1"), "discovery on hci1", 30)
            await bluez.add_device("hci1", "00:01:02:03:04:05", RSSI=Variant("n", -40),
                                   ManufacturerData=Variant("a{qv}", {0x004C: Variant(
                                       "ay", ibeacon.manufacturer_data[0x004C])}))
        asyncio.run(gate_on_air())
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "ibeacon        on air" in out

    quiet = cli("beacon", "selfcheck", "--config", str(config), "--adapter", "hci1",
                "--seconds", "1")
    assert quiet.returncode == 1 and "not heard on hci1" in quiet.stderr


def test_the_daemon_on_bluez_puts_exactly_the_shown_bytes_on_air(
        tmp_path: Path, bluez: BluezMock) -> None:
    raw_path = write_config(tmp_path, backend="bluez", window_s=60,
                            frames=["ibeacon", "eddystone-uid"])
    text = raw_path.read_text().replace("[reader]\n", "[reader]\nsim_interval_s = 0.3\n", 1)
    text = text.replace("sim_interval_s = 0\n", "", 1)
    raw_path.write_text(text)
    shown = json.loads(cli("beacon", "show", "--config", str(raw_path), "--json").stdout)
    daemon = Daemon(raw_path)
    try:
        daemon.wait_log("tapgate running")
        daemon.wait_log("beacon adapter hci0")
        daemon.wait_log("beacon triggered by tap")

        async def on_air() -> None:
            async def registered() -> bool:
                calls = [c for c, _ in await bluez.calls("hci0")]
                return calls.count("RegisterAdvertisement") >= 2
            await until(registered, "two advertisements registered", 30)
            manager = await bluez.manager("hci0")
            assert manager["ActiveInstances"] == 2
            regs = [args for c, args in await bluez.calls("hci0")
                    if c == "RegisterAdvertisement"]
            owner = await daemon_owner(bluez, regs[0][0])
            seen: dict[str, bytes] = {}
            for path, _options in regs:
                props = await bluez.advertisement(owner, path)
                assert props["Type"] == "broadcast"
                assert props["Timeout"] <= 60
                adv = frames.Advertisement(
                    kind="ibeacon" if "ManufacturerData" in props else "eddystone-uid",
                    manufacturer_data=props.get("ManufacturerData", {}),
                    service_uuids=tuple(props.get("ServiceUUIDs", ())),
                    service_data=props.get("ServiceData", {}))
                seen[adv.kind] = adv.payload(flags=None)
            assert {k: v.hex().upper() for k, v in seen.items()} == {
                k: shown["frames"][k]["payload"] for k in ("ibeacon", "eddystone-uid")}
        asyncio.run(on_air())
        assert daemon.stop() == 0
        daemon.wait_log("stopped cleanly")

        async def withdrawn() -> None:
            async def none_left() -> bool:
                return (await bluez.manager("hci0"))["ActiveInstances"] == 0
            await until(none_left, "the advertisements withdrawn at stop", 30)
        asyncio.run(withdrawn())
    finally:
        daemon.kill()


async def daemon_owner(bluez: BluezMock, path: str) -> str:
    """The daemon's unique bus name: the connection that answers GetAll on ``path``, as
    bluetoothd would find it (it knows the sender of RegisterAdvertisement)."""
    (names,) = await bluez.call("org.freedesktop.DBus", "/org/freedesktop/DBus",
                                "org.freedesktop.DBus", "ListNames")
    for name in names:
        if not name.startswith(":"):
            continue
        try:
            await bluez.advertisement(name, path)
        except Exception:
            continue
        return str(name)
    raise AssertionError(f"nobody on the bus exports {path}")


def test_no_bluetoothd_costs_the_beacon_not_the_taps(tmp_path: Path, bluez: BluezMock) -> None:
    asyncio.run(bluez.stop_bluetoothd())
    path = write_config(tmp_path, backend="bluez", mode="continuous", frames=["ibeacon"])
    text = path.read_text().replace("[reader]\n", "[reader]\nsim_interval_s = 0.2\n", 1)
    path.write_text(text.replace("sim_interval_s = 0\n", "", 1)
                    + '\n[service]\nstatus_interval_s = 0.5\n')
    daemon = Daemon(path)
    try:
        daemon.wait_log("tapgate running")
        daemon.wait_log("task beacon failed: ble: ")  # one clear line, no traceback
        assert daemon.count("Traceback") == 0
        taps = daemon.count("tapgate.tap: tap ")
        daemon.wait_log("tapgate.tap: tap ", taps + 3)  # the gate goes on taking taps

        def status() -> dict[str, Any]:
            proc = cli("status", "--config", str(path), "--json")
            doc: dict[str, Any] = json.loads(proc.stdout)
            return doc

        deadline = time.monotonic() + 30
        while "beacon radio unavailable" not in status()["alarms"]:
            assert time.monotonic() < deadline, status()
            time.sleep(0.2)

        asyncio.run(bluez.start_bluetoothd())
        daemon.wait_log("beacon adapter hci0")  # the task's next attempt finds it
        daemon.wait_log("beacon ibeacon on air")
        while "beacon radio unavailable" in status()["alarms"]:
            assert time.monotonic() < deadline + 60, status()
            time.sleep(0.2)
        assert daemon.stop() == 0
    finally:
        daemon.kill()
