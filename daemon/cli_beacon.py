"""`tapgate beacon show` and `tapgate beacon scan`."""

from __future__ import annotations

import asyncio
import datetime
import json
import sys
import time
from typing import Any

from daemon.beacon import frameset
from daemon.beacon.config import PHONE_SERVICE_UUID
from daemon.config import Config
from protocol.errors import ConfigError

AD_NAMES = {0x01: "Flags", 0x03: "Complete List of 16-bit Service UUIDs",
            0x16: "Service Data - 16-bit UUID", 0xFF: "Manufacturer Specific Data"}


def show(config: Config, *, at: float | None, as_json: bool) -> int:
    beacon = config.beacon
    if not beacon.frames:
        raise ConfigError("beacon.frames", [], "no frame is configured: set beacon.uuid, "
                          "beacon.namespace, beacon.url or beacon.eid_key")
    now = time.time() if at is None else at
    doc = frameset.describe(beacon, now)
    if as_json:
        json.dump(doc, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    out = sys.stdout
    state = "enabled" if beacon.enabled else "disabled (beacon.enabled = false)"
    out.write(f"beacon {state}: backend {beacon.backend}, adapter {beacon.adapter}, "
              f"mode {beacon.mode}")
    out.write(f", window {beacon.window_s} s\n" if beacon.mode == "triggered" else "\n")
    out.write(f"a phone within {beacon.distance_m:g} m should hear it at RSSI >= "
              f"{beacon.rssi_threshold} dBm (measured power {beacon.measured_power} dBm at "
              f"1 m, path-loss exponent {beacon.path_loss_exponent:g})\n")
    out.write("AD structures in BlueZ's order. A broadcast advertisement carries no Flags "
              "while BR/EDR is on;\non an LE-only adapter (ControllerMode = le) the kernel "
              "puts 02 01 04 first.\n")
    for kind, frame in doc["frames"].items():
        out.write(f"\n{kind} ({frame['length']} bytes on air)\n")
        for ad in frame["ad"]:
            name = AD_NAMES.get(int(ad["type"], 16), "")
            out.write(f"  {ad['type']} {name:<40} {ad['data']}\n")
        out.write(f"  payload {frame['payload']}\n")
        fields = ", ".join(f"{k}={v}" for k, v in frame["decoded"].items())
        out.write(f"  reads   {fields}\n")
    eid = doc.get("eid")
    if eid is not None:
        nxt = datetime.datetime.fromtimestamp(eid["next_rotation"], datetime.UTC)
        out.write(f"\nEID now {eid['current']} (changes every {eid['period_s']} s, next at "
                  f"{nxt:%Y-%m-%d %H:%M:%S} UTC)\n")
    return 0


def scan(config: Config, *, seconds: float, as_json: bool) -> int:
    from hal.ble.scan import scan_phones

    beacon = config.beacon
    sightings = asyncio.run(scan_phones(
        PHONE_SERVICE_UUID, seconds, measured_power=beacon.measured_power,
        path_loss_exponent=beacon.path_loss_exponent, adapter=beacon.adapter))
    rows: list[dict[str, Any]] = [
        {"address": s.address, "rssi": s.rssi, "distance_m": round(s.distance_m, 2),
         "within": s.rssi >= beacon.rssi_threshold} for s in sightings]
    if as_json:
        json.dump({"phones": rows, "rssi_threshold": beacon.rssi_threshold}, sys.stdout,
                  indent=2)
        sys.stdout.write("\n")
        return 0
    if not rows:
        print(f"no phone advertising {PHONE_SERVICE_UUID} heard in {seconds:g} s")
    for row in rows:
        near = "near" if row["within"] else "farther"
        print(f"{row['address']}  RSSI {row['rssi']:>4} dBm  ~{row['distance_m']:.1f} m  {near}")
    return 0


def selfcheck(config: Config, *, adapter: str, seconds: float) -> int:
    from hal.ble.scan import self_check

    beacon = config.beacon
    if adapter == beacon.adapter:
        raise ConfigError("--adapter", adapter, "is the advertising adapter "
                          "(beacon.adapter); listen on a second one")
    frames = frameset.build(beacon, time.time())
    missing = []
    for kind, adv in frames.items():
        heard = asyncio.run(self_check(adv, adapter=adapter, duration_s=seconds))
        print(f"{kind:<14} {'on air' if heard else 'NOT HEARD'}")
        if not heard:
            missing.append(kind)
    if missing:
        print(f"not heard on {adapter} within {seconds:g} s: {', '.join(missing)}",
              file=sys.stderr)
        return 1
    return 0
