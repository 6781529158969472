"""Configuration: CLI > environment > file > defaults, and every bad value refused with
the key, the value and why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from daemon.config import DEMO_TAC_KEY, load, merge, validate
from hal.sam.software import read_key_file
from protocol.errors import ConfigError
from tests.cards import ADULT, CONCESSION, MASTER_KEY, STAFF
from tests.configs import raw_config, toml_text

ROOT = Path(__file__).resolve().parent.parent


def config_file(tmp_path: Path, raw: dict[str, dict[str, Any]] | None = None) -> Path:
    path = tmp_path / "tapgate.toml"
    path.write_text(toml_text(raw if raw is not None else raw_config()), encoding="utf-8")
    return path


def minimal() -> dict[str, dict[str, Any]]:
    return {"gate": {"terminal_id": "000000A00001", "fare": 250},
            "sam": {"purchase_key": MASTER_KEY.hex()}}


# --- merging -------------------------------------------------------------------------------
def test_defaults() -> None:
    config = validate(minimal())
    assert config.gate.terminal_id == bytes.fromhex("000000A00001")
    assert dict(config.gate.fares) == {ADULT: 250, CONCESSION: 250, STAFF: 250}
    assert (config.gate.anti_passback_s, config.gate.recovery_window_s) == (300.0, 86400.0)
    assert config.reader.poll_s == 0.25
    assert (config.reader.backend, config.reader.name, config.reader.poll_s) == ("sim", "*", 0.25)
    assert config.reader.sim_tac_key == DEMO_TAC_KEY
    assert (config.sam.backend, config.sam.purchase_key, config.sam.key_file) == (
        "software", MASTER_KEY, None)
    assert config.journal.path == Path("var/journal.db")
    assert (config.gateio.backend, config.gateio.open_s) == ("sim", 5.0)
    assert config.log.level == "INFO"


def test_precedence_cli_over_env_over_file_over_defaults(tmp_path: Path) -> None:
    raw = raw_config()
    raw["gate"]["fare"] = 200
    raw["gate"]["anti_passback_s"] = 20
    path = config_file(tmp_path, raw)

    config = load(path, env={}, overrides={})
    assert config.gate.fare_for(ADULT) == 250  # the [gate.fares] table beats the flat fare
    assert config.gate.anti_passback_s == 20  # file over default
    assert config.reader.poll_s == 0.25  # default

    env = {"TAPGATE_GATE__ANTI_PASSBACK_S": "60", "TAPGATE_READER__POLL_S": "2.5"}
    config = load(path, env=env, overrides={})
    assert (config.gate.anti_passback_s, config.reader.poll_s) == (60, 2.5)

    config = load(path, env=env, overrides={"gate.anti_passback_s": 90})
    assert (config.gate.anti_passback_s, config.reader.poll_s) == (90, 2.5)
    assert config.source == path


def test_flat_fare_from_env_and_cli(tmp_path: Path) -> None:
    raw = raw_config()
    del raw["gate"]["fares"]
    raw["gate"]["fare"] = 250
    path = config_file(tmp_path, raw)
    assert load(path, env={}).gate.fare_for(STAFF) == 250
    assert load(path, env={"TAPGATE_GATE__FARE": "300"}).gate.fare_for(STAFF) == 300
    config = load(path, env={"TAPGATE_GATE__FARE": "300"}, overrides={"gate.fare": 400})
    assert dict(config.gate.fares) == {ADULT: 400, CONCESSION: 400, STAFF: 400}


def test_env_values(tmp_path: Path) -> None:
    path = config_file(tmp_path)
    env = {
        "TAPGATE_JOURNAL__PATH": "/srv/tapgate/journal.db",  # not TOML: taken as a string
        "TAPGATE_READER__NAME": '"ACS ACR122U*"',  # TOML string
        "TAPGATE_GATE__TERMINAL_ID": "000000A00009",
        "TAPGATE_LOG__LEVEL": "debug",
        "TAPGATE_NOT_AN_OVERRIDE": "x",  # no section__key: ignored
        "HOME": "/root",
    }
    config = load(path, env=env)
    assert config.journal.path == Path("/srv/tapgate/journal.db")
    assert config.reader.name == "ACS ACR122U*"
    assert config.gate.terminal_id == bytes.fromhex("000000A00009")
    assert config.log.level == "DEBUG"


def test_env_uses_the_process_environment(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = config_file(tmp_path)
    monkeypatch.setenv("TAPGATE_GATE__RECOVERY_WAIT_S", "1")
    with pytest.raises(ConfigError) as err:
        load(path)
    assert err.value.key == "gate.recovery_wait_s" and err.value.why == "unknown key"
    monkeypatch.delenv("TAPGATE_GATE__RECOVERY_WAIT_S")
    monkeypatch.setenv("TAPGATE_GATE__RECOVERY_WINDOW_S", "3600")
    assert load(path).gate.recovery_window_s == 3600


def test_merge_does_not_touch_its_inputs() -> None:
    file_raw = raw_config()
    before = repr(file_raw)
    merged = merge(file_raw, {"TAPGATE_GATE__FARE": "5"}, {"gate.anti_passback_s": 1})
    assert repr(file_raw) == before
    assert (merged["gate"]["fare"], merged["gate"]["anti_passback_s"]) == (5, 1)


def test_override_must_name_a_key() -> None:
    with pytest.raises(ConfigError) as err:
        merge(raw_config(), {}, {"gate": 5})
    assert err.value.key == "gate"


def test_shipped_configs_are_valid() -> None:
    sim = load(ROOT / "config" / "tapgate.toml", env={})
    assert dict(sim.gate.fares) == {ADULT: 250, CONCESSION: 120, STAFF: 0}
    assert sim.reader.backend == "sim"
    real = load(ROOT / "config" / "gate.example.toml", env={})
    assert real.reader.backend == "pcsc"
    assert real.sam.key_file == Path("/etc/tapgate/purchase.key")


# --- validation ----------------------------------------------------------------------------
def refused(raw: dict[str, dict[str, Any]]) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        validate(raw)
    return err.value


def changed(section: str, key: str, value: Any) -> dict[str, dict[str, Any]]:
    raw = raw_config()
    raw.setdefault(section, {})[key] = value
    return raw


@pytest.mark.parametrize("section, key, value, why", [
    ("gate", "terminal_id", "00000GA00001", "must be 12 hex digits"),
    ("gate", "terminal_id", "000000A0000", "must be 12 hex digits, not 11"),
    ("gate", "terminal_id", 10, "must be 12 hex digits"),
    ("gate", "colour", "red", "unknown key"),
    ("gate", "fare", "2.50", "must be a whole number"),
    ("gate", "fare", 2.5, "must be a whole number"),
    ("gate", "fare", True, "must be a whole number"),
    ("gate", "fare", 1 << 32, "must be between 0 and 4294967295"),
    ("gate", "anti_passback_s", "soon", "must be a number"),
    ("gate", "anti_passback_s", -1, "must be between 0 and 604800"),
    ("gate", "recovery_window_s", 0, "must be between 1 and 31622400"),
    ("reader", "backend", "nfc", "must be one of sim, pcsc"),
    ("reader", "poll_s", 0, "must be between 0.01 and 10"),
    ("reader", "sim_tear_rate", 1.5, "must be between 0 and 1"),
    ("reader", "name", "", "must be a non-empty string"),
    ("reader", "sim_tac_key", "00", "must be 32 hex digits, not 2"),
    ("sam", "backend", "hsm", "must be one of software"),
    ("gateio", "open_s", 0, "must be between 0.1 and 120"),
    ("journal", "path", 5, "must be a non-empty path"),
])
def test_bad_values(section: str, key: str, value: Any, why: str) -> None:
    err = refused(changed(section, key, value))
    assert (err.key, err.value, err.why) == (f"{section}.{key}", value, why)
    assert str(err) == f"config {section}.{key} = {value!r}: {why}"


def test_log_level() -> None:
    err = refused(changed("log", "level", "loud"))
    assert (err.key, err.value) == ("log.level", "LOUD")
    assert validate(changed("log", "level", "warning")).log.level == "WARNING"


def test_missing_terminal_id_and_fare() -> None:
    raw = raw_config()
    del raw["gate"]["terminal_id"]
    err = refused(raw)
    assert (err.key, err.why) == ("gate.terminal_id", "is required (12 hex digits)")
    raw = raw_config()
    del raw["gate"]["fares"]
    err = refused(raw)
    assert (err.key, err.value, err.why) == (
        "gate.fare", None, "set gate.fare or a [gate.fares] table")


def test_fares_table() -> None:
    raw = raw_config()
    raw["gate"]["fares"] = {"adult": 300}
    assert dict(validate(raw).gate.fares) == {ADULT: 300}  # other types: no fare, refused
    raw["gate"]["fare"] = 200
    assert dict(validate(raw).gate.fares) == {ADULT: 300, CONCESSION: 200, STAFF: 200}
    raw["gate"]["fares"] = {"pensioner": 100}
    err = refused(raw)
    assert (err.key, err.value) == ("gate.fares.pensioner", 100)
    assert err.why == "card type must be one of ['adult', 'concession', 'staff']"
    raw["gate"]["fares"] = {"adult": -1}
    assert refused(raw).key == "gate.fares.adult"
    raw["gate"]["fares"] = 250
    assert refused(raw).why == "must be a table of card type = fare"


def test_unknown_section_and_non_table() -> None:
    raw = raw_config()
    raw["uplink"] = {"host": "x"}
    err = refused(raw)
    assert (err.key, err.why) == ("uplink", "unknown section")
    raw = raw_config()
    raw["gate"] = 5  # type: ignore[assignment]
    err = refused(raw)
    assert (err.key, err.value, err.why) == ("gate", 5, "must be a table")


def test_exactly_one_purchase_key_source(tmp_path: Path) -> None:
    raw = raw_config()
    raw["sam"]["key_file"] = str(tmp_path / "k")
    err = refused(raw)
    assert err.key == "sam.purchase_key" and "exactly one" in err.why
    assert err.value == "<hidden>"  # the key is not printed
    assert MASTER_KEY.hex() not in str(err).lower()
    raw["sam"] = {"backend": "software"}
    err = refused(raw)
    assert err.key == "sam.purchase_key" and "exactly one" in err.why
    raw["sam"] = {"key_file": str(tmp_path / "k")}
    assert validate(raw).sam.key_file == tmp_path / "k"


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path / "missing.toml", env={})
    assert (err.value.key, err.value.why) == ("--config", "no such file")
    bad = tmp_path / "bad.toml"
    bad.write_text("[gate]\nfare = \n")
    with pytest.raises(ConfigError) as err:
        load(bad, env={})
    assert err.value.key == "--config" and err.value.why.startswith("is not valid TOML")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError) as err:
        load(binary, env={})
    assert err.value.why.startswith("cannot be read")


# --- the SAM key file ----------------------------------------------------------------------
def test_key_file(tmp_path: Path) -> None:
    path = tmp_path / "purchase.key"
    path.write_text(MASTER_KEY.hex().upper() + "\n")
    path.chmod(0o600)
    assert read_key_file(path) == MASTER_KEY
    path.chmod(0o400)
    assert read_key_file(path) == MASTER_KEY
    for mode in (0o604, 0o640, 0o660, 0o610):
        path.chmod(mode)
        with pytest.raises(ConfigError) as err:
            read_key_file(path)
        assert (err.value.key, err.value.value) == ("sam.key_file", str(path))
        assert err.value.why == f"is readable by others (mode {mode:04o}); chmod 600 it"
