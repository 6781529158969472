"""Configuration: merged once (CLI > environment > TOML file > defaults), validated into
frozen dataclasses before any hardware is touched.

Environment overrides are ``TAPGATE_<SECTION>__<KEY>``, e.g. ``TAPGATE_GATE__FARE=300``;
the value is parsed as a TOML value when it can be, else taken as a string.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.beacon import config as beacon_config
from daemon.beacon.config import BeaconConfig
from daemon.configsection import Section as _Section
from protocol.errors import ConfigError

CARD_TYPES = {"adult": 0x01, "concession": 0x02, "staff": 0x03}
ENV_PREFIX = "TAPGATE_"
# PURSE.md's test TAC master key: the simulator's cards use it unless told otherwise.
DEMO_TAC_KEY = bytes.fromhex("101112131415161718191A1B1C1D1E1F")
Raw = dict[str, dict[str, Any]]
DEFAULT_JOURNAL = Path("var/journal.db")


@dataclass(frozen=True, slots=True)
class GateConfig:
    terminal_id: bytes
    fares: Mapping[int, int]  # card type -> fare in minor units
    anti_passback_s: float = 300.0
    recovery_window_s: float = 86400.0
    name: str = ""  # what passengers and the back office call it: "North entrance 3"
    station: str = ""
    page_url: str = ""  # the gate's page for passengers (also its Eddystone-URL)

    def fare_for(self, card_type: int) -> int | None:
        return self.fares.get(card_type)

    @property
    def gate_id(self) -> str:
        """The gate's name on the wire (MQTT topics, client id): its terminal id in hex."""
        return self.terminal_id.hex().upper()


@dataclass(frozen=True, slots=True)
class ReaderConfig:
    backend: str = "sim"
    name: str = "*"  # exact PC/SC reader name or a glob pattern
    poll_s: float = 0.25  # how often a lost service or reader is looked for again
    sim_cards: int = 8  # the built-in simulator's demo: cards in circulation
    sim_interval_s: float = 1.0  # seconds between demo taps (0: no demo taps)
    sim_tear_rate: float = 0.1  # share of demo taps torn mid-debit
    sim_tac_key: bytes = field(default=DEMO_TAC_KEY, repr=False)


@dataclass(frozen=True, slots=True)
class SamConfig:
    backend: str = "software"
    purchase_key: bytes | None = field(default=None, repr=False)
    key_file: Path | None = None


@dataclass(frozen=True, slots=True)
class JournalConfig:
    path: Path = DEFAULT_JOURNAL
    device_key: Path | None = None  # Ed25519 key every entry is signed with (tapgate keygen)
    reserve_bytes: int = 1 << 20  # below this much free disk, no new debit starts

    @property
    def status_path(self) -> Path:
        """The daemon's status beside its journal, for `tapgate status`."""
        return self.path.with_name("status.json")


@dataclass(frozen=True, slots=True)
class GateIOConfig:
    backend: str = "sim"
    open_s: float = 5.0
    sim_hang_after: int = 0  # the sim relay driver hangs on this passage (0: never)


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: str = ""  # "127.0.0.1:9464" serves /metrics; empty: no HTTP endpoint
    textfile_dir: Path | None = None  # node-exporter textfile collector directory
    interval_s: float = 15.0  # how often the textfile is rewritten

    def address(self) -> tuple[str, int] | None:
        if not self.listen:
            return None
        host, _, port = self.listen.rpartition(":")
        return host or "127.0.0.1", int(port)


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    watchdog_staleness_s: float = 20.0  # card loop silent this long: stop WATCHDOG=1
    status_interval_s: float = 5.0  # how often status.json is rewritten


@dataclass(frozen=True, slots=True)
class MqttConfig:
    """The uplink to the head-end; no host: no uplink (the gate runs on its own)."""

    host: str = ""
    port: int = 1883
    client_id: str = ""  # empty: the gate id (the terminal id in uppercase hex)
    tls: bool = False  # TLS with the system's CAs; implied by tls_ca
    tls_ca: Path | None = None
    tls_cert: Path | None = None  # client certificate and its key, both or neither
    tls_key: Path | None = None
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 86400  # the broker keeps the session (acks owed) this long
    batch_size: int = 100  # journal entries per message on .../tx
    window: int = 4  # batches sent and not yet acknowledged by the head-end
    ack_timeout_s: float = 30.0  # no ack this long: resend from the journal
    reconnect_min_s: float = 0.5  # backoff between attempts, doubling, with jitter
    reconnect_max_s: float = 60.0
    status_interval_s: float = 60.0  # retained telemetry on .../status
    retention_days: float = 30.0  # acknowledged entries older than this are pruned
    disk_alarm_pct: float = 90.0  # the journal's disk fuller than this: alarm in the status

    @property
    def enabled(self) -> bool:
        return bool(self.host)

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.tls_ca is not None


@dataclass(frozen=True, slots=True)
class OperatorsConfig:
    """The operators whose signed commands this gate obeys: key id -> Ed25519 public key.

    Several keys at once is how a key is rotated: add the new one, move the operators
    over, remove the old one (a command signed with a removed key is refused)."""

    keys: Mapping[str, bytes] = field(default_factory=dict)  # KEY ID (16 hex) -> 32 bytes
    clock_skew_s: float = 30.0  # a command issued further ahead than this is refused


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "INFO"


@dataclass(frozen=True, slots=True)
class Config:
    gate: GateConfig
    reader: ReaderConfig
    sam: SamConfig
    journal: JournalConfig
    gateio: GateIOConfig
    log: LogConfig
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    operators: OperatorsConfig = field(default_factory=OperatorsConfig)
    beacon: BeaconConfig = field(default_factory=BeaconConfig)
    source: Path | None = None


# What a remote command may change (set_config, desired state), under the same rules as
# the file: gate.fares.<card type>, gate.anti_passback_s, gate.recovery_window_s.
ANTI_PASSBACK_RANGE = (0.0, 86400.0 * 7)
RECOVERY_WINDOW_RANGE = (1.0, 86400.0 * 366)
REMOTE_GATE_KEYS = ("gate.anti_passback_s", "gate.recovery_window_s",
                    *(f"gate.fares.{name}" for name in CARD_TYPES))


def _fare(name: str, fare: Any) -> int:
    if name not in CARD_TYPES:
        raise ConfigError(f"gate.fares.{name}", fare,
                          f"card type must be one of {sorted(CARD_TYPES)}")
    if isinstance(fare, bool) or not isinstance(fare, int) or not 0 <= fare <= 0xFFFFFFFF:
        raise ConfigError(f"gate.fares.{name}", fare, "must be a whole number of minor units")
    return fare


def gate_with(gate: GateConfig, changes: Mapping[str, Any]) -> GateConfig:
    """``gate`` with remote changes (dotted keys of :data:`REMOTE_GATE_KEYS`) applied,
    each validated as the config file's value would be; a bad one is a ConfigError."""
    fares = dict(gate.fares)
    section = _Section("gate", {})
    windows = {"anti_passback_s": gate.anti_passback_s,
               "recovery_window_s": gate.recovery_window_s}
    ranges = {"anti_passback_s": ANTI_PASSBACK_RANGE,
              "recovery_window_s": RECOVERY_WINDOW_RANGE}
    for dotted, value in changes.items():
        if dotted not in REMOTE_GATE_KEYS:
            raise ConfigError(dotted, value,
                              f"cannot be set remotely; one of {', '.join(REMOTE_GATE_KEYS)}")
        if dotted.startswith("gate.fares."):
            name = dotted.removeprefix("gate.fares.")
            fares[CARD_TYPES[name]] = _fare(name, value)
            continue
        key = dotted.removeprefix("gate.")
        low, high = ranges[key]
        section.table[key] = value
        windows[key] = section.number(key, windows[key], low=low, high=high)
    return dataclasses.replace(gate, fares=fares, anti_passback_s=windows["anti_passback_s"],
                               recovery_window_s=windows["recovery_window_s"])


def _fares(section: _Section) -> dict[int, int]:
    flat = section.integer("fare", -1, low=0, high=0xFFFFFFFF)
    table = section._get("fares")
    if table is None:
        if flat < 0:
            raise ConfigError(section.key("fare"), None, "set gate.fare or a [gate.fares] table")
        return {code: flat for code in CARD_TYPES.values()}
    if not isinstance(table, dict):
        raise ConfigError(section.key("fares"), table, "must be a table of card type = fare")
    fares = {code: flat for code in CARD_TYPES.values()} if flat >= 0 else {}
    for name, fare in table.items():
        fares[CARD_TYPES[name]] = _fare(name, fare)
    return fares


def _backend(section: _Section, default: str, allowed: tuple[str, ...]) -> str:
    value = section.string("backend", default)
    if value not in allowed:
        raise ConfigError(section.key("backend"), value, f"must be one of {', '.join(allowed)}")
    return value


def _mqtt(m: _Section) -> MqttConfig:
    host = m.optional_string("host")  # "" (or no key): no uplink
    if host and not re.fullmatch(r"[\w.\-:\[\]]+", host):
        raise ConfigError("mqtt.host", host, "must be a host name or an IP address")
    client_id = m.optional_string("client_id")
    if client_id and not re.fullmatch(r"[\w.\-:]{1,64}", client_id):
        raise ConfigError("mqtt.client_id", client_id,
                          "must be 1 to 64 letters, digits, '_', '-', '.' or ':'")
    cert, key = m.path("tls_cert"), m.path("tls_key")
    if (cert is None) != (key is None):
        raise ConfigError("mqtt.tls_cert" if key is None else "mqtt.tls_key",
                          str(cert or key), "set both mqtt.tls_cert and mqtt.tls_key, or neither")
    reconnect_min = m.number("reconnect_min_s", 0.5, low=0.01, high=3600)
    reconnect_max = m.number("reconnect_max_s", 60.0, low=0.01, high=86400)
    if reconnect_max < reconnect_min:
        raise ConfigError("mqtt.reconnect_max_s", reconnect_max,
                          f"must not be below mqtt.reconnect_min_s ({reconnect_min:g})")
    return MqttConfig(
        host=host,
        port=m.integer("port", 1883, low=1, high=65535),
        client_id=client_id,
        tls=m.boolean("tls", False),
        tls_ca=m.path("tls_ca"),
        tls_cert=cert,
        tls_key=key,
        keepalive_s=m.integer("keepalive_s", 30, low=5, high=65535),
        session_expiry_s=m.integer("session_expiry_s", 7 * 86400, low=0, high=0xFFFFFFFF),
        batch_size=m.integer("batch_size", 100, low=1, high=10_000),
        window=m.integer("window", 4, low=1, high=64),
        ack_timeout_s=m.number("ack_timeout_s", 30.0, low=0.1, high=3600),
        reconnect_min_s=reconnect_min,
        reconnect_max_s=reconnect_max,
        status_interval_s=m.number("status_interval_s", 60.0, low=0.1, high=86400),
        retention_days=m.number("retention_days", 30.0, low=0.001, high=3660),
        disk_alarm_pct=m.number("disk_alarm_pct", 90.0, low=1, high=100),
    )


def _operators(o: _Section) -> OperatorsConfig:
    table = o._get("keys")
    if table is None:
        table = {}
    if not isinstance(table, dict):
        raise ConfigError("operators.keys", table, 'must be a table of "<key id>" = '
                          '"<Ed25519 public key hex>"')
    keys: dict[str, bytes] = {}
    for key_id, public in table.items():
        where = f"operators.keys.{key_id}"
        if not re.fullmatch(r"[0-9A-Fa-f]{16}", key_id):
            raise ConfigError(where, public, "the key id must be 16 hex digits (the first "
                              "8 bytes of the public key, as tapgate-headend keygen prints)")
        if not isinstance(public, str) or not re.fullmatch(r"[0-9A-Fa-f]{64}", public):
            raise ConfigError(where, public, "must be an Ed25519 public key: 64 hex digits")
        # Replays are refused per key id: an id that is not its key's own, or one key
        # under two ids, would let a command already applied run again under the other.
        if key_id.upper() != public[:16].upper():
            raise ConfigError(where, public, f"the key id must be the first 8 bytes of the "
                              f"public key: {public[:16].upper()}")
        keys[key_id.upper()] = bytes.fromhex(public)
    return OperatorsConfig(keys=keys,
                           clock_skew_s=o.number("clock_skew_s", 30.0, low=0, high=3600))


def validate(raw: Raw, source: Path | None = None) -> Config:
    known = {"gate", "reader", "sam", "journal", "gateio", "log", "metrics", "service", "mqtt",
             "operators", "beacon"}
    for name, table in raw.items():
        if name not in known:  # (TOML allows [""]: named so the message shows it)
            raise ConfigError(name or '""', "...", "unknown section")
        if not isinstance(table, dict):
            raise ConfigError(name, table, "must be a table")
    sec = {name: _Section(name, raw.get(name, {})) for name in known}

    g = sec["gate"]
    terminal_id = g.hexbytes("terminal_id", 6, None)
    if terminal_id is None:
        raise ConfigError("gate.terminal_id", None, "is required (12 hex digits)")
    gate = GateConfig(
        terminal_id=terminal_id,
        fares=_fares(g),
        anti_passback_s=g.number("anti_passback_s", 300.0, low=ANTI_PASSBACK_RANGE[0],
                                 high=ANTI_PASSBACK_RANGE[1]),
        recovery_window_s=g.number("recovery_window_s", 86400.0, low=RECOVERY_WINDOW_RANGE[0],
                                   high=RECOVERY_WINDOW_RANGE[1]),
        name=g.optional_string("name"),
        station=g.optional_string("station"),
        page_url=g.optional_string("page_url"),
    )
    if gate.page_url and not re.fullmatch(r"https?://[^\s]+", gate.page_url):
        raise ConfigError("gate.page_url", gate.page_url, "must be an http:// or https:// URL")

    r = sec["reader"]
    reader = ReaderConfig(
        backend=_backend(r, "sim", ("sim", "pcsc")),
        name=r.string("name", "*"),
        poll_s=r.number("poll_s", 0.25, low=0.01, high=10),
        sim_cards=r.integer("sim_cards", 8, low=1, high=100000),
        sim_interval_s=r.number("sim_interval_s", 1.0, low=0, high=3600),
        sim_tear_rate=r.number("sim_tear_rate", 0.1, low=0, high=1),
        sim_tac_key=r.hexbytes("sim_tac_key", 16, DEMO_TAC_KEY) or DEMO_TAC_KEY,
    )

    s = sec["sam"]
    backend = _backend(s, "software", ("software",))
    purchase_key = s.hexbytes("purchase_key", 16, None)
    key_file = s.path("key_file")
    if (purchase_key is None) == (key_file is None):
        raise ConfigError("sam.purchase_key", "<hidden>" if purchase_key else None,
                          "set exactly one of sam.purchase_key and sam.key_file")
    sam = SamConfig(backend=backend, purchase_key=purchase_key, key_file=key_file)

    j = sec["journal"]
    journal = JournalConfig(
        path=j.path("path", DEFAULT_JOURNAL) or DEFAULT_JOURNAL,
        device_key=j.path("device_key"),
        reserve_bytes=j.integer("reserve_bytes", 1 << 20, low=0, high=1 << 40),
    )

    io = sec["gateio"]
    gateio = GateIOConfig(backend=_backend(io, "sim", ("sim",)),
                          open_s=io.number("open_s", 5.0, low=0.1, high=120),
                          sim_hang_after=io.integer("sim_hang_after", 0, low=0, high=1 << 31))

    m = sec["metrics"]
    listen = m.string("listen", "") if m.table.get("listen") is not None else ""
    if listen and not re.fullmatch(r"[\w.\-\[\]:]*:\d{1,5}", listen):
        raise ConfigError("metrics.listen", listen, "must be HOST:PORT, e.g. 127.0.0.1:9464")
    if listen and not 0 < int(listen.rpartition(":")[2]) < 65536:
        raise ConfigError("metrics.listen", listen, "port must be 1..65535")
    metrics = MetricsConfig(listen=listen, textfile_dir=m.path("textfile_dir"),
                            interval_s=m.number("interval_s", 15.0, low=1, high=3600))

    sv = sec["service"]
    service = ServiceConfig(
        watchdog_staleness_s=sv.number("watchdog_staleness_s", 20.0, low=0.5, high=3600),
        status_interval_s=sv.number("status_interval_s", 5.0, low=0.5, high=3600))

    mqtt = _mqtt(sec["mqtt"])
    operators = _operators(sec["operators"])
    beacon = beacon_config.parse(sec["beacon"], terminal_id=gate.terminal_id,
                                 page_url=gate.page_url)

    lg = sec["log"]
    level = lg.string("level", "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError("log.level", level, "must be DEBUG, INFO, WARNING or ERROR")

    for section in sec.values():
        section.finish()
    return Config(gate, reader, sam, journal, gateio, LogConfig(level), metrics, service, mqtt,
                  operators, beacon, source)


def _parse_env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def merge(file_raw: Raw, env: Mapping[str, str], overrides: Mapping[str, Any]) -> Raw:
    merged: Raw = {name: dict(table) if isinstance(table, dict) else table
                   for name, table in file_raw.items()}
    layers: list[dict[str, Any]] = [
        {k[len(ENV_PREFIX):].lower().replace("__", ".", 1): _parse_env_value(v)
         for k, v in env.items() if k.startswith(ENV_PREFIX) and "__" in k},
        dict(overrides),
    ]
    for layer in layers:
        for dotted, value in layer.items():
            section, _, key = dotted.partition(".")
            if not key:
                raise ConfigError(dotted, value, "override must name section.key")
            table = merged.setdefault(section, {})
            if not isinstance(table, dict):
                raise ConfigError(section, table, "must be a table")
            table[key] = value
    return merged


def load(path: Path | None, *, env: Mapping[str, str] | None = None,
         overrides: Mapping[str, Any] | None = None) -> Config:
    """Read, merge and validate; every problem is a :class:`ConfigError`."""
    file_raw: Raw = {}
    if path is not None:
        try:
            file_raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise ConfigError("--config", str(path), "no such file") from err
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError("--config", str(path), f"cannot be read: {err}") from err
        except tomllib.TOMLDecodeError as err:
            raise ConfigError("--config", str(path), f"is not valid TOML: {err}") from err
    raw = merge(file_raw, os.environ if env is None else env, overrides or {})
    return validate(raw, path)
