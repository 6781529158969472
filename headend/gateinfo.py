"""A gate's info message (``tapgate/v1/<gate>/info``, retained), read strictly.

The gate publishes its public information there: name, station, status, fares, page, and
what its beacon puts on air. What the head-end's beacon directory indexes is checked
field by field; a message that fails says which field and why (:class:`InfoError`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

INFO_VERSION = 1
MAX_URL = 1024
MAX_FUTURE_MS = 24 * 3600 * 1000  # info dated further ahead of our clock is refused
MAX_EXPONENT = 15


class InfoError(ValueError):
    """An info payload that cannot be taken as the gate's info."""


@dataclass(frozen=True, slots=True)
class GateInfo:
    """What the directory takes out of one info message."""

    gate: str
    ts_ms: int
    name: str
    station: str | None
    status: str
    page_url: str | None
    ibeacon: tuple[str, int, int] | None  # uuid (lowercase, hyphenated), major, minor
    uid: tuple[str, str] | None  # namespace, instance: lowercase hex
    url: str | None
    eid: tuple[int, int] | None  # exponent, epoch (the key is never in the info)
    text: str  # the whole message, as received


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _field(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], *,
           null: bool = False, where: str = "") -> Any:
    value = obj.get(key)
    if value is None and null:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        what = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise InfoError(f"{where}{key} is {value!r}, expected {what}"
                        f"{' or null' if null else ''}")
    return value


def _uint(obj: Mapping[str, Any], key: str, top: int, where: str) -> int:
    value = obj.get(key)
    if not _is_int(value) or not 0 <= value <= top:
        raise InfoError(f"{where}{key} is {value!r}, expected an integer 0..{top}")
    return int(value)


def _hex_id(obj: Mapping[str, Any], key: str, size: int, where: str) -> str:
    value = obj.get(key)
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else None
    except ValueError:
        raw = None
    if raw is None or len(raw) != size:
        raise InfoError(f"{where}{key} is {value!r}, expected {2 * size} hex digits")
    return raw.hex()


def _url(value: object, what: str) -> str:
    if not isinstance(value, str) or not value.startswith(("https://", "http://")) or len(
            value) > MAX_URL:
        raise InfoError(f"{what} is {value!r}, expected an http(s) URL")
    return value


def parse_info(gate: str, payload: bytes, *, now_ms: int | None = None) -> GateInfo:
    """The info a gate published on its info topic, or :class:`InfoError` saying why not."""
    try:
        text = payload.decode("utf-8")
        obj = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise InfoError(f"not JSON: {err}") from err
    if not isinstance(obj, dict):
        raise InfoError("not a JSON object")
    if obj.get("v") != INFO_VERSION:
        raise InfoError(f"v is {obj.get('v')!r}; this head-end reads version {INFO_VERSION}")
    if obj.get("gate") != gate:
        raise InfoError(f"gate is {obj.get('gate')!r} on the info topic of {gate}")
    ts_ms = obj.get("ts_ms")
    if not _is_int(ts_ms) or ts_ms < 0:
        raise InfoError(f"ts_ms is {ts_ms!r}, expected milliseconds since 1970")
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    if ts_ms > now + MAX_FUTURE_MS:
        raise InfoError(f"ts_ms {ts_ms} is {(ts_ms - now) / 3_600_000:.1f} h ahead of the "
                        "head-end's clock")
    name = _field(obj, "name", str)
    station = _field(obj, "station", str, null=True)
    status = _field(obj, "status", str)
    fares = _field(obj, "fares", dict, null=True)
    if fares is not None and not all(_is_int(v) for v in fares.values()):
        raise InfoError(f"fares is {fares!r}, expected names -> amounts (integers)")
    page_url = obj.get("page_url")
    page_url = None if page_url is None else _url(page_url, "page_url")
    ibeacon = uid = url = eid = None
    beacon = _field(obj, "beacon", dict, null=True)
    if beacon is not None:
        frames_on_air = _field(beacon, "frames", list, where="beacon.")
        if not all(isinstance(f, str) for f in frames_on_air):
            raise InfoError(f"beacon.frames is {frames_on_air!r}, expected frame names")
        ib = _field(beacon, "ibeacon", dict, null=True, where="beacon.")
        if ib is not None:
            try:
                proximity = str(uuid.UUID(_field(ib, "uuid", str, where="beacon.ibeacon.")))
            except ValueError as err:
                raise InfoError(f"beacon.ibeacon.uuid is {ib.get('uuid')!r}: {err}") from err
            ibeacon = (proximity, _uint(ib, "major", 0xFFFF, "beacon.ibeacon."),
                       _uint(ib, "minor", 0xFFFF, "beacon.ibeacon."))
        ed = _field(beacon, "eddystone_uid", dict, null=True, where="beacon.")
        if ed is not None:
            uid = (_hex_id(ed, "namespace", 10, "beacon.eddystone_uid."),
                   _hex_id(ed, "instance", 6, "beacon.eddystone_uid."))
        if beacon.get("eddystone_url") is not None:
            url = _url(beacon["eddystone_url"], "beacon.eddystone_url")
        rotating = _field(beacon, "eid", dict, null=True, where="beacon.")
        if rotating is not None:
            epoch = rotating.get("epoch")
            if not _is_int(epoch) or epoch < 0:
                raise InfoError(f"beacon.eid.epoch is {epoch!r}, expected unix seconds")
            eid = (_uint(rotating, "exponent", MAX_EXPONENT, "beacon.eid."), int(epoch))
        for key in ("measured_power", "rssi_threshold"):
            _field(beacon, key, int, null=True, where="beacon.")
    return GateInfo(gate=gate, ts_ms=int(ts_ms), name=name, station=station, status=status,
                    page_url=page_url, ibeacon=ibeacon, uid=uid, url=url, eid=eid, text=text)
