"""The head-end's beacon directory (headend.beacons): the gates' retained info in, the
advertising data a phone heard resolved to its gate, for every frame kind; EID identity
keys registered out of band; the `tapgate-headend beacon` commands; and info flowing from
a real mosquitto through `tapgate-headend run` into the directory."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from headend.beacons import (
    CLEARED,
    REFUSED,
    SAME,
    STALE,
    STORED,
    BeaconDirectory,
    NotAnIdentity,
    Resolution,
)
from headend.consumer import Consumer
from headend.mqtt import Broker
from headend.sealed import Sealer
from headend.store import Store
from headend.verify import Verifier
from protocol import contract
from protocol.beacon import frames
from protocol.beacon.eid import EidSchedule
from tests.fixtures.mosquitto import Mosquitto

ROOT = Path(__file__).resolve().parent.parent
HEADEND = [sys.executable, "-m", "headend.cli"]
OPERATOR = uuid.UUID("e2c56db5-dffb-48d2-b060-d0f5a71096e0")
NAMESPACE = bytes.fromhex("8b0ca750e7a74e14bd99")
KEY_A7 = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
KEY_B2 = bytes.fromhex("f0e1d2c3b4a5968778695a4b3c2d1e0f")
K = 10  # EIDs of 1024 s
NOW = 1_795_330_861.0
TX0 = frames.tx_power_at_0m(-59)


SEALER = Sealer(bytes(range(32)))  # the database key: the EID keys are kept sealed


def info(gate: str = "0000000000A7", *, minor: int = 7, ts_ms: int | None = None,
         **changes: Any) -> dict[str, Any]:
    """A gate's info message, as the gate publishes it on its info topic. Its beacon's
    URL is a short one: an Eddystone-URL holds 17 bytes after the scheme, too few for the
    page's own URL."""
    page = f"https://transit.example/g/{gate}"
    body: dict[str, Any] = {
        "v": 1, "gate": gate, "name": f"North entrance {minor}", "station": "Central",
        "ts_ms": ts_ms if ts_ms is not None else int(NOW * 1000), "status": "in_service",
        "fares": {"adult": 250, "concession": 120}, "page_url": page,
        "beacon": {
            "mode": "triggered", "window_s": 30,
            "frames": ["ibeacon", "eddystone-uid", "eddystone-url", "eddystone-eid"],
            "ibeacon": {"uuid": str(OPERATOR), "major": 1, "minor": minor},
            "eddystone_uid": {"namespace": NAMESPACE.hex(), "instance": gate.lower()},
            "eddystone_url": short_url(gate), "eid": {"exponent": K, "epoch": 0},
            "measured_power": -59, "tx_power_dbm": None, "distance_m": 2.0,
            "path_loss_exponent": 2.0, "rssi_threshold": -65}}
    body.update(changes)
    return body


def short_url(gate: str) -> str:
    return f"https://tg.example/{gate[-4:]}"


def encode(obj: Any) -> bytes:
    return json.dumps(obj).encode()


@pytest.fixture
def directory(tmp_path: Path) -> Iterator[BeaconDirectory]:
    with BeaconDirectory(f"sqlite:///{tmp_path / 'headend.db'}", sealer=SEALER) as d:
        yield d


@pytest.fixture
def fleet(directory: BeaconDirectory) -> BeaconDirectory:
    """Two gates of one station, both with an EID identity registered."""
    now_ms = int(NOW * 1000)
    assert directory.ingest("0000000000A7", encode(info()), now_ms=now_ms) == STORED
    assert directory.ingest("0000000000B2", encode(info("0000000000B2", minor=8)),
                            now_ms=now_ms) == STORED
    directory.register_eid("0000000000A7", KEY_A7, K, 0)
    directory.register_eid("0000000000B2", KEY_B2, K, 0)
    return directory


def ad(advertisement: frames.Advertisement) -> bytes:
    return advertisement.payload()


def gate_of(directory: BeaconDirectory, payload: bytes, now: float = NOW) -> str | None:
    found = directory.resolve(payload, now)
    return None if found is None else found.gate


# --- resolving every frame kind ------------------------------------------------------------
def test_each_frame_kind_resolves_to_its_gate(fleet: BeaconDirectory) -> None:
    seen = {
        "ibeacon": frames.ibeacon(OPERATOR, 1, 8, -59),
        "eddystone-uid": frames.eddystone_uid(NAMESPACE, bytes.fromhex("0000000000B2"), TX0),
        "eddystone-url": frames.eddystone_url(short_url("0000000000B2"), TX0),
        "eddystone-eid": frames.eddystone_eid(EidSchedule(KEY_B2, K, 0).eid_at(NOW), TX0),
    }
    for kind, advertisement in seen.items():
        found = fleet.resolve(ad(advertisement), NOW)
        assert found == Resolution(
            gate="0000000000B2", frame=kind, name="North entrance 8", station="Central",
            page_url="https://transit.example/g/0000000000B2", status="in_service",
            fares={"adult": 250, "concession": 120}, ts_ms=int(NOW * 1000)), kind
    # the other gate's identifiers are its own
    assert gate_of(fleet, ad(frames.ibeacon(OPERATOR, 1, 7, -59))) == "0000000000A7"
    # without Flags (a BlueZ broadcast on a BR/EDR adapter) the same
    found = fleet.resolve(frames.ibeacon(OPERATOR, 1, 7, -59).payload(flags=None), NOW)
    assert found is not None and found.gate == "0000000000A7"


def test_unknown_identifiers_resolve_to_nothing(fleet: BeaconDirectory) -> None:
    other = uuid.UUID("11111111-2222-3333-4444-555555555555")
    for advertisement in (
            frames.ibeacon(other, 1, 7, -59), frames.ibeacon(OPERATOR, 1, 9, -59),
            frames.ibeacon(OPERATOR, 2, 7, -59),
            frames.eddystone_uid(NAMESPACE, bytes.fromhex("0000000000C3"), TX0),
            frames.eddystone_uid(bytes(10), bytes.fromhex("0000000000A7"), TX0),
            frames.eddystone_url(short_url("0000000000C3"), TX0),
            frames.eddystone_eid(bytes(8), TX0),
            frames.eddystone_eid(EidSchedule(bytes(16), K, 0).eid_at(NOW), TX0)):
        assert fleet.resolve(ad(advertisement), NOW) is None, advertisement


def test_telemetry_and_garbage_are_not_identities(fleet: BeaconDirectory) -> None:
    tlm = frames.eddystone_tlm(battery_mv=0, temperature_c=41.5, adv_count=9, uptime_s=60)
    with pytest.raises(NotAnIdentity, match="names no gate"):
        fleet.resolve(ad(tlm), NOW)
    for garbage in (b"", b"\x02\x01\x06", b"\x05\xff\x4c\x00\x02", bytes.fromhex("03")):
        with pytest.raises(NotAnIdentity, match="not a beacon frame"):
            fleet.resolve(garbage, NOW)


def test_a_url_frame_resolves_by_the_beacon_url_or_else_the_page(
        directory: BeaconDirectory, caplog: pytest.LogCaptureFixture) -> None:
    t = int(NOW * 1000)
    directory.ingest("0000000000A7", encode(info()), now_ms=t)
    short_page = info("0000000000B2", minor=8, page_url="https://t.example/b2")
    short_page["beacon"]["eddystone_url"] = None
    directory.ingest("0000000000B2", encode(short_page), now_ms=t)
    for url, gate in ((short_url("0000000000A7"), "0000000000A7"),
                      ("https://t.example/b2", "0000000000B2")):
        found = directory.resolve(ad(frames.eddystone_url(url, TX0)), NOW)
        assert found is not None and (found.gate, found.frame) == (gate, "eddystone-url")

    # the example's page URL is too long for the frame: no beacon can send it, and the
    # directory says so
    with pytest.raises(frames.FrameError, match="holds 17"):
        frames.eddystone_url("https://transit.example/g/0000000000A7", TX0)
    long_url = info("0000000000C3", minor=9)
    long_url["beacon"]["eddystone_url"] = long_url["page_url"]
    with caplog.at_level(logging.WARNING, logger="tapgate.headend.beacons"):
        assert directory.ingest("0000000000C3", encode(long_url), now_ms=t) == STORED
    assert "beacon.eddystone_url of 0000000000C3 cannot go on air" in caplog.text


# --- EIDs ----------------------------------------------------------------------------------
def test_eid_resolves_within_the_slack_and_not_beyond(fleet: BeaconDirectory) -> None:
    schedule = EidSchedule(KEY_A7, K, 0)
    period = 2 ** K
    start = NOW - NOW % period  # the start of the current period
    here = frames.eddystone_eid(schedule.eid_at(start + 5), TX0).payload()
    # heard now, or one period off either way (the gate's or the phone's clock drifting)
    for when in (start + 5, start + period - 1, start + period + 5, start - period + 5):
        found = fleet.resolve(here, when)
        assert found is not None and (found.gate, found.frame) == ("0000000000A7",
                                                                   "eddystone-eid"), when
    # two periods off: a replayed or recorded EID, no longer the gate's
    for when in (start + 2 * period + 5, start - 2 * period + 5):
        assert fleet.resolve(here, when) is None, when
    # the next period's EID is another one, and resolves in its own period
    later = schedule.eid_at(start + 3 * period + 5)
    assert later != schedule.eid_at(start + 5)
    found = fleet.resolve(frames.eddystone_eid(later, TX0).payload(), start + 3 * period + 5)
    assert found is not None and found.gate == "0000000000A7"


def test_a_wider_slack_is_a_choice(tmp_path: Path) -> None:
    with BeaconDirectory(f"sqlite:///{tmp_path / 'h.db'}", slack_periods=3,
                         sealer=SEALER) as d:
        d.register_eid("0000000000A7", KEY_A7, 4, 100)
        heard = frames.eddystone_eid(EidSchedule(KEY_A7, 4, 100).eid_at(1000), TX0).payload()
        assert d.resolve(heard, 1000 + 3 * 16) is not None
        assert d.resolve(heard, 1000 + 5 * 16) is None


def test_a_registered_gate_without_info_still_resolves_by_eid(
        directory: BeaconDirectory) -> None:
    directory.register_eid("0000000000C3", KEY_B2, K, 0)
    heard = frames.eddystone_eid(EidSchedule(KEY_B2, K, 0).eid_at(NOW), TX0).payload()
    assert directory.resolve(heard, NOW) == Resolution(
        gate="0000000000C3", frame="eddystone-eid", name=None, station=None, page_url=None,
        status=None, fares={}, ts_ms=None)


def test_registering_again_replaces_the_key(fleet: BeaconDirectory) -> None:
    old = frames.eddystone_eid(EidSchedule(KEY_A7, K, 0).eid_at(NOW), TX0).payload()
    fleet.register_eid("0000000000A7", bytes(range(16, 32)), 8, 1000)
    assert fleet.resolve(old, NOW) is None
    new = frames.eddystone_eid(EidSchedule(bytes(range(16, 32)), 8, 1000).eid_at(NOW), TX0)
    assert gate_of(fleet, new.payload()) == "0000000000A7"


@pytest.mark.parametrize(("key", "exponent", "epoch", "why"), [
    (bytes(15), K, 0, "16 bytes"), (bytes(17), K, 0, "16 bytes"),
    (KEY_A7, 16, 0, "exponent"), (KEY_A7, -1, 0, "exponent"), (KEY_A7, K, -5, "epoch")])
def test_a_bad_registration_is_refused(directory: BeaconDirectory, key: bytes, exponent: int,
                                       epoch: int, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        directory.register_eid("0000000000A7", key, exponent, epoch)
    assert list(directory.gates()) == []


# --- the gates' info -----------------------------------------------------------------------
def test_older_info_is_ignored_and_newer_replaces_it(directory: BeaconDirectory) -> None:
    gate, t = "0000000000A7", int(NOW * 1000)
    assert directory.ingest(gate, encode(info(ts_ms=t, minor=7)), now_ms=t) == STORED
    assert directory.ingest(gate, encode(info(ts_ms=t, minor=7)), now_ms=t) == SAME
    # an older message (a retained one delivered late, a gate's earlier publish) loses
    older = info(ts_ms=t - 1, minor=9, status="out_of_service")
    assert directory.ingest(gate, encode(older), now_ms=t) == STALE
    assert directory.info(gate) == info(ts_ms=t, minor=7)
    assert directory.resolve(ad(frames.ibeacon(OPERATOR, 1, 9, -59)), NOW) is None
    # a newer one wins, and the identifiers move with it
    newer = info(ts_ms=t + 1, minor=9, status="out_of_service")
    assert directory.ingest(gate, encode(newer), now_ms=t) == STORED
    assert directory.resolve(ad(frames.ibeacon(OPERATOR, 1, 7, -59)), NOW) is None
    found = directory.resolve(ad(frames.ibeacon(OPERATOR, 1, 9, -59)), NOW)
    assert found is not None and (found.status, found.ts_ms) == ("out_of_service", t + 1)


def test_a_gate_without_a_beacon_resolves_by_nothing(
        directory: BeaconDirectory) -> None:
    gate, t = "0000000000A7", int(NOW * 1000)
    directory.ingest(gate, encode(info(ts_ms=t)), now_ms=t)
    assert directory.ingest(gate, encode(info(ts_ms=t + 1, beacon=None)), now_ms=t) == STORED
    assert directory.resolve(ad(frames.ibeacon(OPERATOR, 1, 7, -59)), NOW) is None
    uid = frames.eddystone_uid(NAMESPACE, bytes.fromhex(gate), TX0)
    assert directory.resolve(ad(uid), NOW) is None
    # its page is still its page
    assert (directory.info(gate) or {}).get("beacon", "missing") is None


def test_an_empty_retained_message_clears_the_gate(directory: BeaconDirectory) -> None:
    gate = "0000000000A7"
    directory.ingest(gate, encode(info()), now_ms=int(NOW * 1000))
    assert directory.ingest(gate, b"") == CLEARED
    assert directory.info(gate) is None
    assert directory.resolve(ad(frames.ibeacon(OPERATOR, 1, 7, -59)), NOW) is None


def _broken() -> list[tuple[str, bytes, str]]:
    def with_beacon(**changes: Any) -> bytes:
        body = info()
        body["beacon"].update(changes)
        return encode(body)

    return [
        ("not json", b"{not json", "not JSON"),
        ("not utf-8", b"\xff\xfe", "not JSON"),
        ("deep", b"[" * 100_000 + b"]" * 100_000, "not JSON"),
        ("a list", b"[1, 2]", "not a JSON object"),
        ("version", encode(info(v=2)), "v is 2"),
        ("another gate", encode(info(gate="0000000000B2")), "on the info topic of"),
        ("no ts", encode(info(ts_ms=None) | {"ts_ms": None}), "ts_ms"),
        ("ts a string", encode(info() | {"ts_ms": "1795330861871"}), "ts_ms"),
        ("future", encode(info(ts_ms=int(NOW * 1000) + 3 * 86_400_000)), "ahead"),
        ("no name", encode(info(name=None)), "name"),
        ("status", encode(info(status=3)), "status"),
        ("fares", encode(info(fares={"adult": "2.50"})), "fares"),
        ("page", encode(info(page_url="javascript:alert(1)")), "page_url"),
        ("beacon", encode(info(beacon=[])), "beacon"),
        ("frames", with_beacon(frames="ibeacon"), "beacon.frames"),
        ("uuid", with_beacon(ibeacon={"uuid": "nope", "major": 1, "minor": 7}),
         "beacon.ibeacon.uuid"),
        ("major", with_beacon(ibeacon={"uuid": str(OPERATOR), "major": 70000, "minor": 7}),
         "beacon.ibeacon.major"),
        ("minor bool", with_beacon(ibeacon={"uuid": str(OPERATOR), "major": 1,
                                            "minor": True}), "beacon.ibeacon.minor"),
        ("namespace", with_beacon(eddystone_uid={"namespace": "00", "instance": "00" * 6}),
         "beacon.eddystone_uid.namespace"),
        ("instance", with_beacon(eddystone_uid={"namespace": "00" * 10, "instance": "zz" * 6}),
         "beacon.eddystone_uid.instance"),
        ("url", with_beacon(eddystone_url=42), "beacon.eddystone_url"),
        ("eid", with_beacon(eid={"exponent": 20, "epoch": 0}), "beacon.eid.exponent"),
        ("epoch", with_beacon(eid={"exponent": 10, "epoch": -1}), "beacon.eid.epoch"),
        ("power", with_beacon(measured_power="loud"), "beacon.measured_power"),
    ]


@pytest.mark.parametrize(("payload", "why"), [(p, w) for _, p, w in _broken()],
                         ids=[name for name, _, _ in _broken()])
def test_malformed_info_is_refused_with_its_reason(
        directory: BeaconDirectory, caplog: pytest.LogCaptureFixture, payload: bytes,
        why: str) -> None:
    gate, t = "0000000000A7", int(NOW * 1000)
    directory.ingest(gate, encode(info(ts_ms=t - 10)), now_ms=t)
    with caplog.at_level(logging.WARNING, logger="tapgate.headend.beacons"):
        assert directory.ingest(gate, payload, now_ms=t) == REFUSED
    assert f"info of {gate} refused" in caplog.text and why in caplog.text, caplog.text
    # what the directory held before stands
    assert directory.info(gate) == info(ts_ms=t - 10)
    assert directory.resolve(ad(frames.ibeacon(OPERATOR, 1, 7, -59)), NOW) is not None


def test_two_gates_claiming_one_identifier_resolve_to_neither(
        directory: BeaconDirectory, caplog: pytest.LogCaptureFixture) -> None:
    t = int(NOW * 1000)
    directory.ingest("0000000000A7", encode(info(minor=7)), now_ms=t)
    with caplog.at_level(logging.WARNING, logger="tapgate.headend.beacons"):
        directory.ingest("0000000000B2", encode(info("0000000000B2", minor=7)), now_ms=t)
        assert directory.resolve(ad(frames.ibeacon(OPERATOR, 1, 7, -59)), NOW) is None
    assert "ibeacon of 0000000000B2 is also 0000000000A7's" in caplog.text
    assert "names more than one gate" in caplog.text
    # their other identifiers are still their own
    uid = frames.eddystone_uid(NAMESPACE, bytes.fromhex("0000000000B2"), TX0)
    assert gate_of(directory, ad(uid)) == "0000000000B2"


def test_the_listing_never_shows_a_key(fleet: BeaconDirectory) -> None:
    listed = list(fleet.gates())
    assert [g["gate"] for g in listed] == ["0000000000A7", "0000000000B2"]
    assert listed[0]["ibeacon"] == {"uuid": str(OPERATOR), "major": 1, "minor": 7}
    assert listed[0]["eid"]["exponent"] == K
    text = json.dumps(listed)
    assert KEY_A7.hex() not in text and KEY_B2.hex() not in text


def test_a_directory_fault_neither_stops_nor_blocks_the_consumer(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class Broken(BeaconDirectory):
        def ingest(self, gate: str, payload: bytes, *, now_ms: int | None = None) -> str:
            raise RuntimeError("a bug the payload found")

    class Client:
        def __init__(self) -> None:
            self.acked: list[int] = []

        def ack(self, mid: int, qos: int) -> None:
            self.acked.append(mid)

    with Store(f"sqlite:///{tmp_path / 'h.db'}") as store:
        consumer = Consumer(store=store, verifier=Verifier(), broker=Broker("127.0.0.1", 1),
                            client_id="t", directory=Broken(store.db))
        msg = mqtt.MQTTMessage(mid=5, topic=contract.info_topic("0000000000A7").encode())
        msg.payload, msg.qos = encode(info()), 1
        client = Client()
        with caplog.at_level(logging.ERROR, logger="tapgate.headend"):
            consumer.handle(client, msg)  # type: ignore[arg-type]
    assert client.acked == [5]  # taken off the broker all the same
    assert "info of 0000000000A7 refused: it broke the directory" in caplog.text


# --- the commands --------------------------------------------------------------------------
def headend(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HEADEND, *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, check=False)


def test_beacon_commands(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'headend.db'}"
    with BeaconDirectory(db) as d:
        d.ingest("0000000000A7", encode(info()), now_ms=int(NOW * 1000))
    key_file = tmp_path / "a7.eid"
    key_file.write_text(KEY_A7.hex().upper() + "\n")
    key_file.chmod(0o600)
    # the EID keys are kept sealed with the database key: none given, none registered
    done = headend("beacon", "register", "--db", db, "--gate", "0000000000A7", "--key-file",
                   str(key_file), "--exponent", str(K), "--epoch", "0")
    assert done.returncode == 2 and "--db-key-file" in done.stderr, done.stderr
    db_key = tmp_path / "db.key"
    assert headend("db-keygen", "--out", str(db_key)).returncode == 0
    sealing = ("--db-key-file", str(db_key))
    key_file.chmod(0o644)
    done = headend("beacon", "register", "--db", db, *sealing, "--gate", "0000000000A7",
                   "--key-file", str(key_file), "--exponent", str(K), "--epoch", "0")
    assert done.returncode == 2 and "chmod 600" in done.stderr, done.stderr
    key_file.chmod(0o600)
    done = headend("beacon", "register", "--db", db, *sealing, "--gate", "0000000000A7",
                   "--key-file", str(key_file), "--exponent", str(K), "--epoch", "0")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"gate": "0000000000A7", "exponent": K, "epoch": 0,
                                       "registered": True}
    done = headend("beacon", "register", "--db", db, *sealing, "--gate", "0000000000B2", "--key",
                   KEY_B2.hex(), "--exponent", "8", "--epoch", "1000")
    assert done.returncode == 0, done.stderr
    for bad in (["--key", "00" * 15], ["--key", "xyz"]):
        done = headend("beacon", "register", "--db", db, *sealing, "--gate", "0000000000C3", *bad,
                       "--exponent", "8", "--epoch", "0")
        assert done.returncode == 2, done.stderr
    done = headend("beacon", "register", "--db", db, *sealing, "--gate", "A/+", "--key",
                   KEY_B2.hex(), "--exponent", "8", "--epoch", "0")
    assert done.returncode == 2, done.stderr

    heard = frames.eddystone_eid(EidSchedule(KEY_A7, K, 0).eid_at(NOW), TX0).payload()
    done = headend("beacon", "resolve", heard.hex(), "--db", db, *sealing, "--at", str(NOW))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "gate": "0000000000A7", "frame": "eddystone-eid", "name": "North entrance 7",
        "station": "Central", "page_url": "https://transit.example/g/0000000000A7",
        "status": "in_service", "fares": {"adult": 250, "concession": 120},
        "ts_ms": int(NOW * 1000)}
    # the same EID a day later is no one's
    done = headend("beacon", "resolve", heard.hex(), "--db", db, *sealing, "--at", str(NOW + 86400))
    assert done.returncode == 1 and done.stdout == "", done.stderr
    # separators as a scanner prints them are fine
    spaced = " ".join(f"{b:02X}" for b in ad(frames.ibeacon(OPERATOR, 1, 7, -59)))
    done = headend("beacon", "resolve", spaced, "--db", db)
    assert done.returncode == 0 and json.loads(done.stdout)["frame"] == "ibeacon", done.stderr
    tlm = frames.eddystone_tlm(battery_mv=0, temperature_c=None, adv_count=1, uptime_s=1)
    for data, why in ((ad(tlm).hex(), "names no gate"), ("zz", "not hex"),
                      ("020106", "not a beacon frame")):
        done = headend("beacon", "resolve", data, "--db", db)
        assert done.returncode == 2 and why in done.stderr, done.stderr

    done = headend("beacon", "list", "--db", db)
    assert done.returncode == 0, done.stderr
    listed = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(g["gate"], g["name"], g["eid"]["exponent"]) for g in listed] == [
        ("0000000000A7", "North entrance 7", K), ("0000000000B2", None, 8)]
    assert KEY_A7.hex() not in done.stdout.lower() and KEY_B2.hex() not in done.stdout.lower()


# --- through a real broker -----------------------------------------------------------------
def publish(broker: Mosquitto, messages: list[tuple[str, bytes]]) -> None:
    """Publish retained, QoS 1, as a gate does; return when the broker has them all."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"gate-{time.monotonic_ns()}",
                         protocol=mqtt.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        for topic, payload in messages:
            client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def wait_for(check: Callable[[], bool], what: str, log: Callable[[], str],
             timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    pytest.fail(f"{what} did not happen: {log()}", pytrace=False)


def test_info_flows_through_mosquitto_into_the_directory(
        tmp_path: Path, make_broker: Callable[..., Mosquitto]) -> None:
    broker = make_broker()
    db = tmp_path / "headend.db"
    url = f"sqlite:///{db}"
    now_ms = int(time.time() * 1000)
    # retained before the head-end starts: it gets them when it subscribes
    publish(broker, [(contract.info_topic("0000000000A7"), encode(info(ts_ms=now_ms))),
                     (contract.info_topic("0000000000B2"),
                      encode(info("0000000000B2", minor=8, ts_ms=now_ms)))])
    log_path = tmp_path / "headend.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen([*HEADEND, "run", "--broker", f"{broker.host}:{broker.port}",
                                 "--db", url, "--client-id", "beacons-h1"], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        def log() -> str:
            return log_path.read_text(errors="replace")

        def resolves(minor: int, gate: str | None, status: str = "in_service") -> bool:
            with BeaconDirectory(url) as d:
                found = d.resolve(ad(frames.ibeacon(OPERATOR, 1, minor, -59)))
            if gate is None:
                return found is None
            return found is not None and (found.gate, found.status) == (gate, status)

        wait_for(lambda: "ready: subscribed" in log(), "the head-end subscribing", log)
        assert contract.info_topic("+") in log()
        wait_for(lambda: resolves(7, "0000000000A7") and resolves(8, "0000000000B2"),
                 "the retained info reaching the directory", log)
        # malformed, another gate's, stale: refused or ignored; then a newer one still lands
        publish(broker, [
            (contract.info_topic("0000000000A7"), b"{broken"),
            (contract.info_topic("0000000000A7"), encode(info("0000000000B2"))),
            (contract.info_topic("0000000000B2"),
             encode(info("0000000000B2", minor=8, ts_ms=now_ms - 5000, status="closed"))),
            (contract.info_topic("0000000000A7"),
             encode(info(minor=17, ts_ms=now_ms + 1, status="out_of_service")))])
        wait_for(lambda: resolves(17, "0000000000A7", "out_of_service"),
                 "the newer info reaching the directory", log)
        assert resolves(7, None) and resolves(8, "0000000000B2")
        assert "info of 0000000000A7 refused: not JSON" in log()
        assert "info of 0000000000A7 refused: gate is '0000000000B2'" in log()
        assert "info of 0000000000B2 from ts_ms" in log()
        assert proc.poll() is None, log()
        # the directory's gates, as the operator lists them
        done = headend("beacon", "list", "--db", url)
        assert [json.loads(line)["gate"] for line in done.stdout.splitlines()] == [
            "0000000000A7", "0000000000B2"]
    finally:
        proc.terminate()
        code = proc.wait(20)
    assert code == 0, log_path.read_text(errors="replace")
    assert "gate infos" in log_path.read_text()
