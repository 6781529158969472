"""iBeacon and Eddystone advertising frames: built byte-exact, and parsed back strictly.

An :class:`Advertisement` holds what BlueZ's ``org.bluez.LEAdvertisement1`` takes; its
``payload()`` is what goes on air. The order there (BlueZ ``src/shared/ad.c``
``bt_ad_generate``, Linux ``net/bluetooth/eir.c`` ``eir_create_adv_data``): the kernel's
Flags, then BlueZ's service UUID lists (16-bit, then 128-bit), solicit UUIDs, manufacturer
data, service data, name, appearance, other ``Data``. BlueZ sends a UUID string of the base
form ``0000xxxx-0000-1000-8000-00805f9b34fb`` as 16 bits (``bt_string_to_uuid``), so
Eddystone goes out as ``AA FE`` as its spec needs.

The Flags byte is not ours: for a ``broadcast`` instance (what the gate registers: a
beacon takes no connections) the kernel adds 0x04 (no BR/EDR) on an LE-only adapter and
no Flags with BR/EDR on; BlueZ refuses ``Discoverable`` on a broadcast advertisement
("Broadcast cannot set flags", src/advertising.c). A ``peripheral`` on a discoverable
adapter gets 0x06 (0x02 with BR/EDR). ``flags=`` models the kernel's Flags
(first), ``flags=None`` none. Frame layouts: google/eddystone ``eddystone-*`` specs; iBeacon
``4C 00 | 02 15 | UUID | major | minor | measured power``, big-endian.
"""

from __future__ import annotations

import math
import struct
import types
from collections.abc import Mapping
from dataclasses import dataclass
from uuid import UUID

EDDYSTONE_UUID16 = 0xFEAA
EDDYSTONE_SERVICE_UUID = "0000feaa-0000-1000-8000-00805f9b34fb"
APPLE_COMPANY_ID = 0x004C
FRAME_KINDS = ("ibeacon", "eddystone-uid", "eddystone-url", "eddystone-tlm", "eddystone-eid")

AD_FLAGS = 0x01
AD_UUID16_ALL = 0x03
AD_UUID128_ALL = 0x07
AD_SERVICE_DATA16 = 0x16
AD_SERVICE_DATA128 = 0x21
AD_MANUFACTURER_DATA = 0xFF
MAX_LEGACY_ADV = 31

IBEACON_TYPE = b"\x02\x15"  # proximity beacon, 21 bytes follow
FRAME_UID, FRAME_URL, FRAME_TLM, FRAME_EID = 0x00, 0x10, 0x20, 0x30
TLM_VERSION_PLAIN = 0x00
TLM_NO_TEMPERATURE = 0x8000
URL_SCHEMES = ("http://www.", "https://www.", "http://", "https://")
URL_EXPANSIONS = (".com/", ".org/", ".edu/", ".net/", ".info/", ".biz/", ".gov/",
                  ".com", ".org", ".edu", ".net", ".info", ".biz", ".gov")
URL_MAX_BODY = 17
_SCHEMES_LONGEST_FIRST = sorted(enumerate(URL_SCHEMES), key=lambda ct: -len(ct[1]))
_EXPANSIONS_LONGEST_FIRST = sorted(enumerate(URL_EXPANSIONS), key=lambda ct: -len(ct[1]))
_BASE_SUFFIX = "-0000-1000-8000-00805f9b34fb"


class FrameError(ValueError):
    """A beacon frame cannot be built from these values, or bytes are no frame we know."""


@dataclass(frozen=True, slots=True)
class Advertisement:
    """One advertising instance, described the way BlueZ's org.bluez.LEAdvertisement1 takes it."""

    kind: str
    manufacturer_data: Mapping[int, bytes]
    service_uuids: tuple[str, ...]
    service_data: Mapping[str, bytes]

    def __post_init__(self) -> None:
        if self.kind not in FRAME_KINDS:
            raise FrameError(f"frame kind {self.kind!r} is none of {', '.join(FRAME_KINDS)}")
        # read-only copies: a caller's dict changing later must not change what is on air
        object.__setattr__(self, "manufacturer_data",
                           types.MappingProxyType(dict(self.manufacturer_data)))
        object.__setattr__(self, "service_data", types.MappingProxyType(dict(self.service_data)))

    def ad_structures(self, *, flags: int | None = 0x06) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        if flags is not None:
            if not 0 <= flags <= 0x1F:  # bits 5-7 are reserved; BlueZ refuses them too
                raise FrameError(f"Flags 0x{flags:X} outside 0x00..0x1F")
            out.append((AD_FLAGS, bytes([flags])))
        uuids = [_uuid_le(u) for u in self.service_uuids]
        # BlueZ never makes a 32-bit UUID out of a 128-bit string, so two lists at most
        for ad_type, size in ((AD_UUID16_ALL, 2), (AD_UUID128_ALL, 16)):
            grouped = b"".join(u for u in uuids if len(u) == size)
            if grouped:
                out.append((ad_type, grouped))
        for company, data in self.manufacturer_data.items():
            if not 0 <= company <= 0xFFFF:
                raise FrameError(f"company id {company} outside 0..0xFFFF")
            out.append((AD_MANUFACTURER_DATA, company.to_bytes(2, "little") + bytes(data)))
        for key, data in self.service_data.items():
            le = _uuid_le(key)
            ad_type = AD_SERVICE_DATA16 if len(le) == 2 else AD_SERVICE_DATA128
            out.append((ad_type, le + bytes(data)))
        return out

    def payload(self, *, flags: int | None = 0x06) -> bytes:
        out = b"".join(bytes([len(data) + 1, ad_type]) + data
                       for ad_type, data in self.ad_structures(flags=flags))
        if len(out) > MAX_LEGACY_ADV:
            raise FrameError(f"advertising data is {len(out)} bytes, a legacy advertisement "
                             f"holds {MAX_LEGACY_ADV}")
        return out


def _uuid_le(text: str) -> bytes:
    """A UUID string as BlueZ puts it on air: 16-bit if of the base form, else 128-bit."""
    try:
        value = UUID(text)
    except ValueError as err:
        raise FrameError(f"{text!r} is not a UUID") from err
    if str(value).endswith(_BASE_SUFFIX) and value.int >> 112 == 0:
        return ((value.int >> 96) & 0xFFFF).to_bytes(2, "little")
    return value.bytes[::-1]


def _int8(value: int, name: str = "Tx power at 0 m", low: int = -100, high: int = 20) -> bytes:
    """A signed dBm byte; by default the Tx power at 0 m, in the range Eddystone allows."""
    if not low <= value <= high:
        raise FrameError(f"{name} {value} dBm outside {low}..{high}")
    return value.to_bytes(1, "big", signed=True)


def _exact(name: str, value: bytes, size: int) -> bytes:
    if len(value) != size:
        raise FrameError(f"{name} must be {size} bytes, not {len(value)}")
    return bytes(value)


def tx_power_at_0m(measured_power_1m: int) -> int:
    """Eddystone ranging data: the RSSI at 1 m plus the 41 dB lost over that metre."""
    _int8(measured_power_1m + 41)
    return measured_power_1m + 41


def _eddystone(kind: str, frame: bytes) -> Advertisement:
    return Advertisement(kind=kind, manufacturer_data={}, service_uuids=(EDDYSTONE_SERVICE_UUID,),
                         service_data={EDDYSTONE_SERVICE_UUID: frame})


def ibeacon(uuid: UUID, major: int, minor: int, measured_power: int) -> Advertisement:
    for name, value in (("major", major), ("minor", minor)):
        if not 0 <= value <= 0xFFFF:
            raise FrameError(f"iBeacon {name} {value} outside 0..65535")
    data = (IBEACON_TYPE + uuid.bytes + major.to_bytes(2, "big") + minor.to_bytes(2, "big")
            + _int8(measured_power, "iBeacon measured power", -128, 127))
    return Advertisement(kind="ibeacon", manufacturer_data={APPLE_COMPANY_ID: data},
                         service_uuids=(), service_data={})


def eddystone_uid(namespace: bytes, instance: bytes, tx_power_0m: int) -> Advertisement:
    frame = (bytes([FRAME_UID]) + _int8(tx_power_0m) + _exact("namespace", namespace, 10)
             + _exact("instance", instance, 6) + b"\0\0")
    return _eddystone("eddystone-uid", frame)


def eddystone_url(url: str, tx_power_0m: int) -> Advertisement:
    return _eddystone("eddystone-url", bytes([FRAME_URL]) + _int8(tx_power_0m) + encode_url(url))


def eddystone_tlm(*, battery_mv: int, temperature_c: float | None, adv_count: int,
                  uptime_s: float) -> Advertisement:
    if not 0 <= battery_mv <= 0xFFFF:
        raise FrameError(f"battery {battery_mv} mV outside 0..65535 (0 = mains powered)")
    if temperature_c is None:
        temp = TLM_NO_TEMPERATURE
    else:
        fixed = round(temperature_c * 256) if math.isfinite(temperature_c) else 1 << 16
        if not -0x7FFF <= fixed <= 0x7FFF:  # -0x8000 would read back as "no sensor"
            raise FrameError(f"temperature {temperature_c} °C outside what 8.8 fixed point holds")
        temp = fixed & 0xFFFF
    if adv_count < 0:
        raise FrameError(f"advertising count {adv_count} is negative")
    if not (math.isfinite(uptime_s) and uptime_s >= 0):
        raise FrameError(f"uptime {uptime_s} s is not a non-negative number")
    ticks = math.floor(uptime_s * 10)  # SEC_CNT counts whole 0.1 s ticks since boot
    frame = (bytes([FRAME_TLM, TLM_VERSION_PLAIN]) + battery_mv.to_bytes(2, "big")
             + temp.to_bytes(2, "big") + (adv_count % 2**32).to_bytes(4, "big")
             + (ticks % 2**32).to_bytes(4, "big"))
    return _eddystone("eddystone-tlm", frame)


def eddystone_eid(eid: bytes, tx_power_0m: int) -> Advertisement:
    frame = bytes([FRAME_EID]) + _int8(tx_power_0m) + _exact("EID", eid, 8)
    return _eddystone("eddystone-eid", frame)


def encode_url(url: str) -> bytes:
    """Scheme prefix byte + body, each longest-matching expansion text replaced by its code."""
    code = next((c for c, text in _SCHEMES_LONGEST_FIRST if url.startswith(text)), None)
    if code is None:
        raise FrameError(f"URL {url!r} does not start with one of {', '.join(URL_SCHEMES)}")
    rest, body = url[len(URL_SCHEMES[code]):], bytearray([code])
    while rest:
        code = next((c for c, text in _EXPANSIONS_LONGEST_FIRST if rest.startswith(text)), None)
        if code is None and not "\x21" <= rest[0] <= "\x7e":  # the rest are expansion codes
            raise FrameError(f"URL {url!r} has {rest[0]!r}: only printable ASCII is allowed")
        body.append(ord(rest[0]) if code is None else code)
        rest = rest[1 if code is None else len(URL_EXPANSIONS[code]):]
    if len(body) - 1 > URL_MAX_BODY:
        raise FrameError(f"URL {url!r} encodes to {len(body) - 1} bytes after the scheme, "
                         f"Eddystone-URL holds {URL_MAX_BODY}")
    return bytes(body)


def decode_url(data: bytes) -> str:
    if not data or data[0] >= len(URL_SCHEMES):
        raise FrameError(f"Eddystone-URL scheme byte missing or unknown in {data.hex()}")
    if len(data) - 1 > URL_MAX_BODY:
        raise FrameError(f"Eddystone-URL body is {len(data) - 1} bytes, at most {URL_MAX_BODY}")
    parts = [URL_SCHEMES[data[0]]]
    for byte in data[1:]:
        if byte < len(URL_EXPANSIONS):
            parts.append(URL_EXPANSIONS[byte])
        elif 0x21 <= byte <= 0x7E:
            parts.append(chr(byte))
        else:
            raise FrameError(f"Eddystone-URL byte 0x{byte:02X} is reserved")
    return "".join(parts)


def split_ad(payload: bytes) -> list[tuple[int, bytes]]:
    """(AD type, data) of each structure. A zero length octet is allowed only as the start
    of trailing zero padding (the Core spec's early termination); anywhere else it, and a
    structure running past the end, is a FrameError."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(payload):
        length = payload[pos]
        if length == 0:
            if any(payload[pos:]):
                raise FrameError(f"zero-length AD structure at offset {pos} of {payload.hex()}")
            break
        if pos + 1 + length > len(payload):
            raise FrameError(f"AD structure at offset {pos} claims {length} bytes, "
                             f"{len(payload) - pos - 1} left in {payload.hex()}")
        out.append((payload[pos + 1], bytes(payload[pos + 2:pos + 1 + length])))
        pos += 1 + length
    return out


@dataclass(frozen=True, slots=True)
class IBeaconFrame:
    uuid: UUID
    major: int
    minor: int
    measured_power: int


@dataclass(frozen=True, slots=True)
class UidFrame:
    tx_power_0m: int
    namespace: bytes
    instance: bytes


@dataclass(frozen=True, slots=True)
class UrlFrame:
    tx_power_0m: int
    url: str


@dataclass(frozen=True, slots=True)
class TlmFrame:
    battery_mv: int
    temperature_c: float | None
    adv_count: int
    uptime_s: float


@dataclass(frozen=True, slots=True)
class EidFrame:
    tx_power_0m: int
    eid: bytes


Frame = IBeaconFrame | UidFrame | UrlFrame | TlmFrame | EidFrame


def _parse_ibeacon(data: bytes) -> IBeaconFrame | None:
    if len(data) != 23 or data[:2] != IBEACON_TYPE:
        return None
    major, minor, power = struct.unpack(">HHb", data[18:])
    return IBeaconFrame(uuid=UUID(bytes=data[2:18]), major=major, minor=minor,
                        measured_power=power)


def _parse_eddystone(frame: bytes) -> Frame:
    kind = frame[0] if frame else None
    tx0 = int.from_bytes(frame[1:2], "big", signed=True)
    if kind == FRAME_UID and len(frame) in (18, 20):  # some beacons leave out the 2 RFU bytes
        return UidFrame(tx_power_0m=tx0, namespace=frame[2:12], instance=frame[12:18])
    if kind == FRAME_URL and 3 <= len(frame) <= 3 + URL_MAX_BODY:
        return UrlFrame(tx_power_0m=tx0, url=decode_url(frame[2:]))
    if kind == FRAME_TLM and len(frame) == 14 and frame[1] == TLM_VERSION_PLAIN:
        battery, temp, adv_count, ticks = struct.unpack(">HhII", frame[2:])
        no_sensor = temp == TLM_NO_TEMPERATURE - 0x10000  # read as a signed 8.8 value
        return TlmFrame(battery_mv=battery, adv_count=adv_count, uptime_s=ticks / 10,
                        temperature_c=None if no_sensor else temp / 256)
    if kind == FRAME_EID and len(frame) == 10:
        return EidFrame(tx_power_0m=tx0, eid=frame[2:10])
    raise FrameError(f"Eddystone service data {frame.hex()} is no UID, URL, plain TLM or "
                     f"EID frame of the right length")


def parse(payload: bytes) -> Frame:
    """The first iBeacon or Eddystone frame in advertising data (Flags or not)."""
    for ad_type, data in split_ad(payload):
        if (ad_type == AD_MANUFACTURER_DATA and len(data) >= 2
                and int.from_bytes(data[:2], "little") == APPLE_COMPANY_ID):
            found = _parse_ibeacon(data[2:])
            if found is not None:
                return found
        if (ad_type == AD_SERVICE_DATA16 and len(data) >= 2
                and int.from_bytes(data[:2], "little") == EDDYSTONE_UUID16):
            return _parse_eddystone(data[2:])
    raise FrameError(f"advertising data {payload.hex()} holds no iBeacon or Eddystone frame")


def parse_advertisement(adv: Advertisement) -> Frame:
    return parse(adv.payload(flags=None))
