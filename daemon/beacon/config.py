"""The [beacon] section: what the gate puts on air, when, and how far it should carry.

    [beacon]
    enabled = true
    backend = "bluez"            # or "sim": logs what would be on air
    adapter = "hci0"
    mode = "triggered"           # or "continuous"
    window_s = 30                # triggered: how long one trigger keeps the beacon on air
    triggers = ["tap", "command", "button"]
    frames = ["ibeacon", "eddystone-uid", "eddystone-url", "eddystone-tlm", "eddystone-eid"]
    uuid = "<operator UUID>"     # iBeacon proximity UUID
    major = 1                    # iBeacon major: the station
    minor = 7                    # iBeacon minor: the gate
    namespace = "<20 hex>"       # Eddystone-UID namespace: the operator
    instance = "<12 hex>"        # Eddystone-UID instance: the gate (default: its terminal id)
    url = "https://tg.to/a7"     # Eddystone-URL, a short link to the gate's page: at most
                                 # 17 bytes encoded (default: gate.page_url if that short)
    measured_power = -59         # RSSI a phone sees at 1 m, measured on site
    tx_power_dbm = 0             # set only where the controller can (CanSetTxPower)
    distance_m = 2.0             # how near a phone should be for the gate to count it
    path_loss_exponent = 2.0     # 2 in free space, 2.7-3.5 in a concourse
    eid_key = "<32 hex>"         # or eid_key_file: the gate's Eddystone-EID identity key
    eid_exponent = 10            # the EID changes every 2**K seconds
    eid_epoch = 0                # unix time the EID counter starts from
    interval_ms = 100            # advertising interval
    tlm_interval_s = 10          # how often the telemetry frame is refreshed

Without ``frames`` the gate advertises every frame whose identifiers are set.
"""

from __future__ import annotations

import dataclasses
import math
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from daemon.configsection import Section
from protocol.errors import ConfigError

FRAME_KINDS = ("ibeacon", "eddystone-uid", "eddystone-url", "eddystone-tlm", "eddystone-eid")
MODES = ("triggered", "continuous")
TRIGGERS = ("tap", "command", "button")
# Phones running the operator's app advertise this service while it is open, so a gate
# can see who is near (``tapgate beacon scan``).
PHONE_SERVICE_UUID = "7a9e0c51-3b1d-4c8e-9f2a-5d6b7c8e9f10"


@dataclass(frozen=True, slots=True)
class BeaconConfig:
    enabled: bool = False
    backend: str = "sim"
    adapter: str = "hci0"
    mode: str = "triggered"
    window_s: int = 30
    triggers: tuple[str, ...] = TRIGGERS
    frames: tuple[str, ...] = ()
    uuid: uuid.UUID | None = None
    major: int = 0
    minor: int = 0
    namespace: bytes | None = None
    instance: bytes | None = None
    url: str = ""
    measured_power: int = -59
    tx_power_dbm: int | None = None
    distance_m: float = 2.0
    path_loss_exponent: float = 2.0
    eid_key: bytes | None = field(default=None, repr=False)
    eid_exponent: int = 10
    eid_epoch: int = 0
    interval_ms: int = 100
    tlm_interval_s: float = 10.0

    @property
    def rssi_threshold(self) -> int:
        """The RSSI a phone should require to be within ``distance_m`` of the gate: the
        log-distance path-loss model, RSSI(d) = RSSI(1 m) - 10 n log10(d)."""
        return round(self.measured_power
                     - 10 * self.path_loss_exponent * math.log10(self.distance_m))

    def estimate_distance_m(self, rssi: int) -> float:
        """The model turned round: how far away a sender heard at ``rssi`` probably is."""
        return float(10 ** ((self.measured_power - rssi) / (10 * self.path_loss_exponent)))


def _read_key_file(key: str, path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(key, str(path), f"cannot read the EID identity key: {err.strerror}"
                          ) from err
    text = raw.strip()
    if re.fullmatch(rb"[0-9A-Fa-f]{32}", text):
        return bytes.fromhex(text.decode())
    if len(raw) == 16:
        return raw
    raise ConfigError(key, str(path), "must hold a 16-byte key: 32 hex digits or 16 raw bytes")


def _fits_eddystone(url: str) -> bool:
    from protocol.beacon.frames import FrameError, encode_url

    try:
        encode_url(url)
    except FrameError:
        return False
    return True


def _choice_list(b: Section, key: str, default: tuple[str, ...],
                 allowed: tuple[str, ...]) -> tuple[str, ...]:
    value = b._get(key)
    if value is None:
        return default
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(b.key(key), value, f"must be a list of {', '.join(allowed)}")
    for item in value:
        if item not in allowed:
            raise ConfigError(b.key(key), value,
                              f"{item!r} is not one of {', '.join(allowed)}")
    if len(set(value)) != len(value):
        raise ConfigError(b.key(key), value, "lists an entry twice")
    return tuple(value)


def parse(b: Section, *, terminal_id: bytes, page_url: str) -> BeaconConfig:
    """Read [beacon]; a frame whose identifiers are missing or malformed is refused here,
    with the key, the value and why, before any radio is touched."""
    enabled = b.boolean("enabled", False)
    backend = b.string("backend", "sim")
    if backend not in ("sim", "bluez"):
        raise ConfigError(b.key("backend"), backend, "must be one of: bluez, sim")
    adapter = b.string("adapter", "hci0")
    if not re.fullmatch(r"hci\d{1,3}", adapter):
        raise ConfigError(b.key("adapter"), adapter, "must be a BlueZ adapter name like hci0")
    mode = b.string("mode", "triggered")
    if mode not in MODES:
        raise ConfigError(b.key("mode"), mode, f"must be one of {', '.join(MODES)}")

    raw_uuid = b.optional_string("uuid")
    beacon_uuid: uuid.UUID | None = None
    if raw_uuid:
        try:
            beacon_uuid = uuid.UUID(raw_uuid)
        except ValueError as err:
            raise ConfigError(b.key("uuid"), raw_uuid,
                              "must be a UUID like e2c56db5-dffb-48d2-b060-d0f5a71096e0"
                              ) from err
        if beacon_uuid.int == 0:
            raise ConfigError(b.key("uuid"), raw_uuid, "must not be the nil UUID")

    url = b.optional_string("url")
    if url:
        from protocol.beacon.frames import FrameError, encode_url

        try:
            encode_url(url)
        except FrameError as err:
            raise ConfigError(b.key("url"), url, str(err)) from err
    elif page_url and _fits_eddystone(page_url):
        url = page_url  # short enough to go on air as it is
    key_text = b.optional_string("eid_key")
    key_file = b.path("eid_key_file")
    if key_text and key_file is not None:
        raise ConfigError(b.key("eid_key"), "<hidden>", "set eid_key or eid_key_file, not both")
    eid_key: bytes | None = None
    if key_text:
        if not re.fullmatch(r"[0-9A-Fa-f]{32}", key_text):
            raise ConfigError(b.key("eid_key"), "<hidden>",
                              f"must be 32 hex digits (a 16-byte AES key), not {len(key_text)}"
                              " characters")
        eid_key = bytes.fromhex(key_text)
    elif key_file is not None:
        eid_key = _read_key_file(b.key("eid_key_file"), key_file)

    tx_power = b._get("tx_power_dbm")
    config = BeaconConfig(
        enabled=enabled,
        backend=backend,
        adapter=adapter,
        mode=mode,
        window_s=b.integer("window_s", 30, low=1, high=3600),
        triggers=_choice_list(b, "triggers", TRIGGERS, TRIGGERS),
        frames=(),
        uuid=beacon_uuid,
        major=b.integer("major", 0, low=0, high=0xFFFF),
        minor=b.integer("minor", 0, low=0, high=0xFFFF),
        namespace=b.hexbytes("namespace", 10, None),
        instance=b.hexbytes("instance", 6, terminal_id),
        url=url,
        measured_power=b.integer("measured_power", -59, low=-100, high=0),
        tx_power_dbm=(None if tx_power is None
                      else b.integer("tx_power_dbm", 0, low=-127, high=20)),
        distance_m=b.number("distance_m", 2.0, low=0.1, high=100.0),
        path_loss_exponent=b.number("path_loss_exponent", 2.0, low=1.0, high=6.0),
        eid_key=eid_key,
        eid_exponent=b.integer("eid_exponent", 10, low=0, high=15),
        eid_epoch=b.integer("eid_epoch", 0, low=0, high=0xFFFFFFFF),
        interval_ms=b.integer("interval_ms", 100, low=20, high=10240),
        tlm_interval_s=b.number("tlm_interval_s", 10.0, low=1.0, high=3600.0),
    )
    available = {
        "ibeacon": config.uuid is not None,
        "eddystone-uid": config.namespace is not None,
        "eddystone-url": bool(config.url),
        "eddystone-tlm": True,
        "eddystone-eid": config.eid_key is not None,
    }
    needs = {"ibeacon": "beacon.uuid", "eddystone-uid": "beacon.namespace",
             "eddystone-url": "beacon.url: a link of at most 17 bytes once encoded (gate.page_url "
                         "is used when it is that short)",
             "eddystone-eid": "beacon.eid_key (or eid_key_file)"}
    frames = _choice_list(b, "frames", (), FRAME_KINDS)
    for kind in frames:
        if not available[kind]:
            raise ConfigError(b.key("frames"), kind, f"needs {needs[kind]}")
    if not frames:
        frames = tuple(k for k in FRAME_KINDS if available[k] and k != "eddystone-tlm")
        if frames:  # health rides along with an identity, never alone
            frames = (*frames, "eddystone-tlm")
    if enabled and not frames:
        raise ConfigError(b.key("enabled"), True,
                          "no frame to advertise: set beacon.uuid, beacon.namespace, beacon.url "
                          "or beacon.eid_key")
    return dataclasses.replace(config, frames=frames)
