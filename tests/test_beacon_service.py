"""The beacon inside the daemon: taps, an operator's signed command and the gate's button
trigger it; the gate's info (name, station, fares, status, page URL, beacon IDs, RSSI
threshold) is retained on tapgate/v1/<gate>/info; the status carries the beacon's state.

The daemon runs for real (`python -m daemon.cli run`) against a real mosquitto, on the
sim reader and the sim advertiser (there is no radio here; hal/ble's own tests cover
BlueZ). The button is pressed in-process on the sim gate I/O of a built gate.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from daemon import service
from daemon.config import validate
from hal.ble.sim import SimAdvertiser
from hal.gate.sim import SimGateIO
from protocol import contract
from tests.configs import raw_config, toml_text
from tests.daemon_process import Daemon
from tests.fixtures.mosquitto import Mosquitto
from tests.test_commands import Console, Operator, new_gate_id
from tests.waiting import wait_until

TIMEOUT_S = 30.0
UUID = "e2c56db5-dffb-48d2-b060-d0f5a71096e0"


def beacon_raw(tmp_path: Path, gid: str, **beacon: Any) -> dict[str, dict[str, Any]]:
    raw = raw_config(tmp_path / "journal.db")
    raw["gate"].update(terminal_id=gid, anti_passback_s=0, name="North entrance 3",
                       station="Central", page_url=f"https://transit.example/g/{gid}")
    raw["beacon"] = {"enabled": True, "backend": "sim", "uuid": UUID, "major": 1,
                     "minor": 7, "namespace": "8b0ca750e7a74e14bd99",
                     "url": "https://tg.example/a7",
                     "eid_key": "000102030405060708090a0b0c0d0e0f", "window_s": 2, **beacon}
    return raw


def retained(broker: Mosquitto, topic: str) -> dict[str, Any]:
    """The retained message on ``topic``, as a new subscriber gets it."""
    got: list[bytes] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message = lambda c, u, msg: got.append(msg.payload) if msg.retain else None
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.subscribe(topic, qos=1)
        wait_until(lambda: bool(got), f"a retained message on {topic}", TIMEOUT_S)
    finally:
        client.disconnect()
        client.loop_stop()
    doc: dict[str, Any] = json.loads(got[-1])
    return doc


def test_taps_and_commands_trigger_the_beacon_and_the_info_is_retained(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    op = Operator()
    gid = new_gate_id()
    raw = beacon_raw(tmp_path, gid)
    raw["reader"] = {"backend": "sim", "sim_interval_s": 0.3, "sim_cards": 3,
                     "sim_tear_rate": 0}
    raw["mqtt"] = {"host": mosquitto.host, "port": mosquitto.port, "reconnect_min_s": 0.05,
                   "reconnect_max_s": 0.5, "status_interval_s": 0.5}
    raw["operators"] = {"keys": {op.key_id: op.public_hex}}
    config = tmp_path / "tapgate.toml"
    config.write_text(toml_text(raw), encoding="utf-8")
    console = Console(mosquitto)
    daemon = Daemon(config)
    try:
        daemon.wait_log("tapgate running")
        daemon.wait_log("connected to the broker")
        # a tap that opens the gate puts the beacon on air for its window
        daemon.wait_log("beacon triggered by tap")
        daemon.wait_log("beacon (sim) ibeacon on air")
        daemon.wait_log("beacon (sim) eddystone-eid on air")

        doc = retained(mosquitto, contract.info_topic(gid))
        assert (doc["v"], doc["gate"], doc["name"], doc["station"]) == (
            1, gid, "North entrance 3", "Central")
        assert doc["page_url"] == f"https://transit.example/g/{gid}"
        assert doc["status"] == "in_service"
        assert doc["fares"] == {"adult": 250, "concession": 120, "staff": 0}
        b = doc["beacon"]
        assert b["ibeacon"] == {"uuid": UUID, "major": 1, "minor": 7}
        assert b["eddystone_uid"] == {"namespace": "8b0ca750e7a74e14bd99",
                                      "instance": gid.lower()}
        assert b["eddystone_url"] == "https://tg.example/a7"
        assert b["eid"] == {"exponent": 10, "epoch": 0}
        assert (b["measured_power"], b["distance_m"], b["rssi_threshold"]) == (-59, 2.0, -65)
        assert "000102030405060708090a0b0c0d0e0f" not in json.dumps(doc).lower()

        time.sleep(0.3)
        reply = console.ask(gid, op.payload(gid, "trigger_beacon", {"window_s": 5}))
        assert reply["ok"], reply
        assert reply["result"]["accepted"] is True and reply["result"]["window_s"] == 5
        daemon.wait_log("beacon triggered by command")
        bad = console.ask(gid, op.payload(gid, "trigger_beacon", {"window_s": 0}))
        assert (bad["ok"], bad["reason"]) == (
            False, "bad args: window_s must be a whole number of seconds, 1..3600")
        odd = console.ask(gid, op.payload(gid, "trigger_beacon", {"colour": "red"}))
        assert not odd["ok"] and "unknown argument 'colour'" in odd["reason"]

        status = console.ask(gid, op.payload(gid, "report_status", {}))["result"]
        assert status["beacon"]["triggers"]["command"] == 1
        assert status["beacon"]["triggers"]["tap"] >= 1
        assert status["beacon"]["mode"] == "triggered"
        assert status["beacon"]["last_error"] == ""
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        console.close()


def test_a_gate_without_the_command_trigger_refuses_it(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    op = Operator()
    gid = new_gate_id()
    raw = beacon_raw(tmp_path, gid)
    raw["mqtt"] = {"host": mosquitto.host, "port": mosquitto.port, "reconnect_min_s": 0.05}
    raw["operators"] = {"keys": {op.key_id: op.public_hex}}
    text = toml_text(raw) + ""
    text = text.replace("[beacon]\n", '[beacon]\ntriggers = ["tap", "button"]\n')
    config = tmp_path / "tapgate.toml"
    config.write_text(text, encoding="utf-8")
    console = Console(mosquitto)
    daemon = Daemon(config)
    try:
        daemon.wait_log("connected to the broker")
        time.sleep(0.3)
        reply = console.ask(gid, op.payload(gid, "trigger_beacon", {}))
        assert (reply["ok"], reply["reason"]) == (
            False, "failed: beacon.triggers does not include 'command'")
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        console.close()


def test_the_button_triggers_the_beacon(tmp_path: Path) -> None:
    gate = service.build(validate(beacon_raw(tmp_path, "000000B00001", window_s=30)))
    try:
        beacon = gate.beacon
        assert beacon is not None and isinstance(gate.gateio, SimGateIO)
        sim = beacon._adv
        assert isinstance(sim, SimAdvertiser)

        async def main() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(beacon.run(stop))
            assert isinstance(gate.gateio, SimGateIO)
            press = threading.Thread(target=gate.gateio.press_button)  # the driver's thread
            press.start()
            press.join()
            deadline = time.monotonic() + TIMEOUT_S
            while "ibeacon" not in sim.on_air():
                assert time.monotonic() < deadline, "the button did not trigger the beacon"
                await asyncio.sleep(0.02)
            assert {r.timeout_s for r in sim.on_air().values()} == {30}
            stop.set()
            await task

        asyncio.run(main())
        assert beacon.stats.triggers == {"button": 1}
        info = gate.info()
        assert info["beacon"]["ibeacon"]["minor"] == 7 and info["status"] == "in_service"
    finally:
        gate.close()


def test_the_beacon_in_the_metrics(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    gate = service.build(validate(beacon_raw(tmp_path, "000000B00002", window_s=30)))
    try:
        beacon = gate.beacon
        assert beacon is not None

        async def main() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(beacon.run(stop))
            beacon.trigger("tap")
            beacon.trigger("command")
            deadline = time.monotonic() + TIMEOUT_S
            while len(beacon.state()["on_air"]) < 5:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            values = {(s.name, tuple(sorted(s.labels.items()))): s.value
                      for f in text_string_to_metric_families(gate.render_metrics())
                      for s in f.samples}
            assert values[("tapgate_beacon_on_air", ())] == 5  # four IDs and the TLM
            assert values[("tapgate_beacon_triggers_total", (("source", "tap"),))] == 1
            assert values[("tapgate_beacon_triggers_total", (("source", "command"),))] == 1
            assert values[("tapgate_beacon_triggers_total", (("source", "button"),))] == 0
            assert values[("tapgate_beacon_radio_up", ())] == 1
            assert ("tapgate_taps_total", (("outcome", "accepted"),)) in values
            stop.set()
            await task

        asyncio.run(main())
    finally:
        gate.close()
