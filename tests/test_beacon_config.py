"""[beacon]: every identifier, key, exponent and distance checked before a radio is
touched; a bad one is refused with the key, the value and why."""

from __future__ import annotations

import math
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from daemon.config import Config, validate
from protocol.errors import ConfigError
from tests.cards import TERMINAL_ID
from tests.configs import raw_config

ROOT = Path(__file__).resolve().parent.parent
OPERATOR_UUID = "e2c56db5-dffb-48d2-b060-d0f5a71096e0"
NAMESPACE = "8b0ca750e7a74e14bd99"
KEY = "000102030405060708090a0b0c0d0e0f"


def with_beacon(**beacon: Any) -> Config:
    raw = raw_config()
    raw["beacon"] = beacon
    return validate(raw)


def full(**extra: Any) -> dict[str, Any]:
    return {"enabled": True, "uuid": OPERATOR_UUID, "major": 1, "minor": 7,
            "namespace": NAMESPACE, "url": "https://tg.example/a7", "eid_key": KEY, **extra}


def test_off_by_default_and_nothing_on_air() -> None:
    config = validate(raw_config())
    assert not config.beacon.enabled
    assert config.beacon.frames == ()


def test_every_identifier_read() -> None:
    b = with_beacon(**full(mode="continuous", window_s=45, measured_power=-62,
                           tx_power_dbm=4, distance_m=3.0, path_loss_exponent=2.5,
                           eid_exponent=8, eid_epoch=1_700_000_000, adapter="hci1",
                           backend="bluez", triggers=["tap", "button"])).beacon
    assert b.uuid == uuid.UUID(OPERATOR_UUID)
    assert (b.major, b.minor) == (1, 7)
    assert b.namespace == bytes.fromhex(NAMESPACE)
    assert b.instance == TERMINAL_ID  # the gate's device id, unless told otherwise
    assert b.eid_key == bytes.fromhex(KEY)
    assert (b.mode, b.window_s, b.adapter, b.backend) == ("continuous", 45, "hci1", "bluez")
    assert b.triggers == ("tap", "button")
    assert (b.eid_exponent, b.eid_epoch, b.tx_power_dbm) == (8, 1_700_000_000, 4)
    # every frame whose identifiers are set, the telemetry riding along
    assert b.frames == ("ibeacon", "eddystone-uid", "eddystone-url", "eddystone-eid",
                        "eddystone-tlm")


def test_rssi_threshold_is_the_path_loss_model() -> None:
    b = with_beacon(**full(measured_power=-59, distance_m=2.0, path_loss_exponent=2.0)).beacon
    assert b.rssi_threshold == round(-59 - 20 * math.log10(2))  # -65
    assert b.rssi_threshold == -65
    b = with_beacon(**full(measured_power=-59, distance_m=5.0, path_loss_exponent=3.0)).beacon
    assert b.rssi_threshold == round(-59 - 30 * math.log10(5))  # -80
    assert b.estimate_distance_m(-59) == pytest.approx(1.0)
    assert b.estimate_distance_m(b.rssi_threshold) == pytest.approx(5.0, rel=0.05)


def test_explicit_frames_and_page_url_fallback() -> None:
    raw = raw_config()
    raw["gate"]["page_url"] = "https://tg.example/x"
    raw["beacon"] = {"enabled": True, "frames": ["eddystone-url", "eddystone-tlm"]}
    b = validate(raw).beacon
    assert b.url == "https://tg.example/x"
    assert b.frames == ("eddystone-url", "eddystone-tlm")


def test_long_page_url_is_not_put_on_air_by_itself() -> None:
    raw = raw_config()
    raw["gate"]["page_url"] = "https://transit.example/stations/central/gates/north-3"
    raw["beacon"] = {"enabled": True, "uuid": OPERATOR_UUID}
    b = validate(raw).beacon
    assert b.url == "" and "eddystone-url" not in b.frames
    raw["beacon"]["frames"] = ["eddystone-url"]
    with pytest.raises(ConfigError, match="17 bytes") as err:
        validate(raw)
    assert err.value.key == "beacon.frames"


def test_key_file(tmp_path: Path) -> None:
    hex_file = tmp_path / "eid.key"
    hex_file.write_text(KEY.upper() + "\n")
    raw_file = tmp_path / "eid.bin"
    raw_file.write_bytes(bytes.fromhex(KEY))
    for path in (hex_file, raw_file):
        b = with_beacon(enabled=True, eid_key_file=str(path)).beacon
        assert b.eid_key == bytes.fromhex(KEY)
        assert b.frames == ("eddystone-eid", "eddystone-tlm")
    bad = tmp_path / "short.key"
    bad.write_text("0011")
    with pytest.raises(ConfigError, match="16-byte key"):
        with_beacon(enabled=True, eid_key_file=str(bad))
    with pytest.raises(ConfigError, match="cannot read"):
        with_beacon(enabled=True, eid_key_file=str(tmp_path / "missing.key"))


@pytest.mark.parametrize(("key", "value", "why"), [
    ("uuid", "not-a-uuid", "must be a UUID"),
    ("uuid", "00000000-0000-0000-0000-000000000000", "nil UUID"),
    ("major", 70000, "between 0 and 65535"),
    ("minor", -1, "between 0 and 65535"),
    ("namespace", "8b0ca750e7", "20 hex digits"),
    ("namespace", "zz0ca750e7a74e14bd99", "20 hex digits"),
    ("instance", "0102030405", "12 hex digits"),
    ("url", "ftp://tg.example/a", "does not start with one of"),
    ("url", "https://transit.example/a/very/long/path", "17"),
    ("eid_key", "0011", "32 hex digits"),
    ("eid_key", "g" * 32, "32 hex digits"),
    ("eid_exponent", 16, "between 0 and 15"),
    ("eid_exponent", -1, "between 0 and 15"),
    ("measured_power", 5, "between -100 and 0"),
    ("measured_power", "loud", "whole number"),
    ("tx_power_dbm", 30, "between -127 and 20"),
    ("distance_m", 0, "between 0.1 and 100"),
    ("distance_m", 500, "between 0.1 and 100"),
    ("path_loss_exponent", 0.5, "between 1 and 6"),
    ("path_loss_exponent", "free space", "must be a number"),
    ("window_s", 0, "between 1 and 3600"),
    ("window_s", 7200, "between 1 and 3600"),
    ("mode", "sometimes", "triggered, continuous"),
    ("backend", "hcitool", "bluez, sim"),
    ("adapter", "wlan0", "adapter name like hci0"),
    ("triggers", ["tap", "doorbell"], "'doorbell' is not one of tap, command, button"),
    ("triggers", ["tap", "tap"], "twice"),
    ("triggers", "tap", "must be a list"),
    ("frames", ["altbeacon"], "'altbeacon' is not one of ibeacon, eddystone-uid"),
    ("colour", "blue", "unknown key"),
])
def test_bad_values_refused_with_key_value_and_why(key: str, value: Any, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as err:
        with_beacon(**full(**{key: value}))
    assert err.value.key == f"beacon.{key}"
    if key != "eid_key":
        assert err.value.value == value
    else:
        assert err.value.value == "<hidden>"  # a key never lands in a log


def test_a_frame_without_its_identifier_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"needs beacon\.uuid"):
        with_beacon(enabled=True, namespace=NAMESPACE, frames=["ibeacon"])
    with pytest.raises(ConfigError, match=r"needs beacon\.eid_key"):
        with_beacon(enabled=True, uuid=OPERATOR_UUID, frames=["eddystone-eid"])
    with pytest.raises(ConfigError, match="no frame to advertise"):
        with_beacon(enabled=True)
    with pytest.raises(ConfigError, match="not both"):
        with_beacon(**full(eid_key_file="/etc/tapgate/eid.key"))


def test_config_check_refuses_a_bad_beacon_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "gate.toml"
    text = (ROOT / "config" / "tapgate.toml").read_text()
    path.write_text(text.replace("eid_exponent = 4", "eid_exponent = 40"))
    proc = subprocess.run([sys.executable, "-m", "daemon.cli", "config", "check", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    assert "beacon.eid_exponent = 40: must be between 0 and 15" in proc.stderr


def test_shipped_configs_are_valid_and_round_trip(tmp_path: Path) -> None:
    for name in ("tapgate.toml", "gate.example.toml"):
        # the example names a real gate's files (/etc/tapgate/...): its values only
        files = ["--no-files"] if name == "gate.example.toml" else []
        proc = subprocess.run(
            [sys.executable, "-m", "daemon.cli", "config", "check", *files,
             str(ROOT / "config" / name)],
            capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert 'triggers = ["tap", "command", "button"]' in proc.stdout
        if name == "tapgate.toml":
            assert 'eid_key = "<masked>"' in proc.stdout  # a key never printed
        again = tmp_path / "again.toml"
        again.write_text(proc.stdout.replace('"<masked>"', '"000102030405060708090A0B0C0D0E0F"'))
        proc2 = subprocess.run(
            [sys.executable, "-m", "daemon.cli", "config", "check", *files, str(again)],
            capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert proc2.returncode == 0, proc2.stderr
