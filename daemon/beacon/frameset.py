"""The frames a gate's beacon config puts on air at a given moment, and how
``tapgate beacon show`` prints them. Pure: no radio, no clock of its own."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from daemon.beacon.config import BeaconConfig
from protocol.beacon import frames
from protocol.beacon.eid import EidSchedule
from protocol.beacon.frames import Advertisement

T = TypeVar("T")
THERMAL_ZONE = Path("/sys/class/thermal/thermal_zone0/temp")  # the Pi's SoC sensor


@dataclass(frozen=True, slots=True)
class Health:
    """What the Eddystone-TLM frame reports."""

    uptime_s: float = 0.0
    adv_count: int = 0
    temperature_c: float | None = None
    battery_mv: int = 0  # a gate is mains powered


def soc_temperature(path: Path = THERMAL_ZONE) -> float | None:
    """The SoC temperature in °C, or None where the kernel has no thermal zone."""
    try:
        return int(path.read_text().strip()) / 1000.0
    except (OSError, ValueError):
        return None


def eid_schedule(config: BeaconConfig) -> EidSchedule | None:
    if config.eid_key is None:
        return None
    return EidSchedule(identity_key=config.eid_key, exponent=config.eid_exponent,
                       epoch=config.eid_epoch)


def build(config: BeaconConfig, now: float, health: Health | None = None
          ) -> dict[str, Advertisement]:
    """Every enabled frame as it is at ``now`` (unix seconds), by kind."""
    tx0 = frames.tx_power_at_0m(config.measured_power)
    out: dict[str, Advertisement] = {}
    builders: dict[str, Callable[[], Advertisement]] = {
        "ibeacon": lambda: frames.ibeacon(_need(config.uuid), config.major, config.minor,
                                          config.measured_power),
        "eddystone-uid": lambda: frames.eddystone_uid(_need(config.namespace),
                                                      _need(config.instance), tx0),
        "eddystone-url": lambda: frames.eddystone_url(config.url, tx0),
        "eddystone-tlm": lambda: _tlm(health or Health()),
        "eddystone-eid": lambda: frames.eddystone_eid(
            _need(eid_schedule(config)).eid_at(now), tx0),
    }
    for kind in config.frames:
        out[kind] = builders[kind]()
    return out


def _tlm(health: Health) -> Advertisement:
    return frames.eddystone_tlm(battery_mv=health.battery_mv,
                                temperature_c=health.temperature_c,
                                adv_count=health.adv_count, uptime_s=health.uptime_s)


def _need(value: T | None) -> T:
    if value is None:  # config.parse lets no enabled frame through without its identifiers
        raise AssertionError("a beacon frame without its identifier")
    return value


def describe(config: BeaconConfig, now: float, *, flags: int | None = None
             ) -> dict[str, Any]:
    """What ``tapgate beacon show`` prints: per frame, the AD structures in the order
    BlueZ sends them, the whole advertising payload, and what it parses back to.

    A ``broadcast`` advertisement cannot ask BlueZ for Flags: with BR/EDR on (the Pi's
    default) none go on air; on an LE-only adapter the kernel puts Flags 0x04 first
    (``flags=0x04`` shows that)."""
    shown: dict[str, Any] = {}
    for kind, adv in build(config, now).items():
        structures = adv.ad_structures(flags=flags)
        payload = adv.payload(flags=flags)
        shown[kind] = {
            "ad": [{"type": f"0x{t:02X}", "data": data.hex().upper()} for t, data in structures],
            "payload": payload.hex().upper(),
            "length": len(payload),
            "decoded": _plain(frames.parse(payload)),
        }
    result: dict[str, Any] = {
        "mode": config.mode, "window_s": config.window_s, "triggers": list(config.triggers),
        "adapter": config.adapter, "backend": config.backend, "enabled": config.enabled,
        "rssi_threshold": config.rssi_threshold, "distance_m": config.distance_m,
        "frames": shown,
    }
    schedule = eid_schedule(config)
    if schedule is not None:
        result["eid"] = {"current": schedule.eid_at(now).hex().upper(),
                         "exponent": config.eid_exponent,
                         "period_s": 1 << config.eid_exponent,
                         "next_rotation": schedule.next_rotation(now)}
    return result


def _plain(frame: object) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in getattr(frame, "__dataclass_fields__", {}):
        value = getattr(frame, name)
        out[name] = value.hex().upper() if isinstance(value, bytes) else (
            str(value) if not isinstance(value, (int, float, str, type(None))) else value)
    return out
