"""Beacon frames are byte-exact: pinned payloads worked out by hand from the specs, and every
frame read back to the same fields by decoders that share no code with ours (beacontools for
the frames, bluetooth-data-tools for the AD structures)."""

from __future__ import annotations

import math
import uuid
from typing import Any

import beacontools
import pytest
from bluetooth_data_tools import parse_advertisement_data_bytes
from hypothesis import given
from hypothesis import strategies as st

from protocol.beacon import frames
from protocol.beacon.frames import (
    EDDYSTONE_SERVICE_UUID,
    Advertisement,
    EidFrame,
    FrameError,
    IBeaconFrame,
    TlmFrame,
    UidFrame,
    UrlFrame,
)

AIRLOCATE = uuid.UUID("e2c56db5-dffb-48d2-b060-d0f5a71096e0")
NAMESPACE = bytes.fromhex("00010203040506070809")
INSTANCE = bytes.fromhex("0a0b0c0d0e0f")
EID = bytes.fromhex("0123456789abcdef")

# Worked out by hand: AD structure = length (type + data) | type | data; Flags 02 01 06 first.
# Eddystone adds "03 03 AA FE" (complete 16-bit UUID list, FEAA little-endian) and then
# "LL 16 AA FE <frame>" (service data, LL = 3 + frame length).
PINNED = {
    # 1A FF = 26 bytes of manufacturer data: 4C 00 (Apple, LE) 02 15 (iBeacon, 21 follow),
    # the UUID as written, major 0001, minor 0002, measured power -59 = C5
    "ibeacon": (frames.ibeacon(AIRLOCATE, 1, 2, -59),
                "020106" "1AFF4C000215" "E2C56DB5DFFB48D2B060D0F5A71096E0" "0001" "0002" "C5"),
    # UID frame 00, Tx -18 = EE, namespace, instance, RFU 00 00: 20 bytes, so 17 (23) = length
    "eddystone-uid": (frames.eddystone_uid(NAMESPACE, INSTANCE, -18),
                      "020106" "0303AAFE" "1716AAFE" "00EE" "00010203040506070809"
                      "0A0B0C0D0E0F" "0000"),
    # URL frame 10, EE, scheme 01 ("https://www."), "example" ASCII, 00 (".com/"): 11 bytes
    "eddystone-url": (frames.eddystone_url("https://www.example.com/", -18),
                      "020106" "0303AAFE" "0E16AAFE" "10EE" "01" "6578616D706C65" "00"),
    # TLM frame 20, version 00, 3000 mV = 0BB8, 25.5 C * 256 = 6528 = 1980,
    # ADV_CNT 01020304, 100.0 s = 1000 ticks of 0.1 s = 000003E8: 14 bytes, so 11 (17)
    "eddystone-tlm": (frames.eddystone_tlm(battery_mv=3000, temperature_c=25.5,
                                           adv_count=0x01020304, uptime_s=100.0),
                      "020106" "0303AAFE" "1116AAFE" "2000" "0BB8" "1980" "01020304" "000003E8"),
    # EID frame 30, EE, the 8 EID bytes: 10 bytes, so 0D (13)
    "eddystone-eid": (frames.eddystone_eid(EID, -18),
                      "020106" "0303AAFE" "0D16AAFE" "30EE" "0123456789ABCDEF"),
}


@pytest.mark.parametrize("kind", sorted(PINNED))
def test_pinned_payloads(kind: str) -> None:
    adv, expected = PINNED[kind]
    assert adv.kind == kind
    assert adv.payload().hex().upper() == expected
    assert adv.payload(flags=None).hex().upper() == expected.removeprefix("020106")
    assert adv.payload(flags=0x04).hex().upper() == "020104" + expected[6:]


def test_tlm_pinned_negative_and_missing_temperature() -> None:
    # -1.25 C * 256 = -320 = FEC0 two's complement; no sensor = 8000 per tlm-plain.md
    cold = frames.eddystone_tlm(battery_mv=0, temperature_c=-1.25, adv_count=0, uptime_s=0)
    none = frames.eddystone_tlm(battery_mv=0, temperature_c=None, adv_count=0, uptime_s=0)
    assert cold.service_data[EDDYSTONE_SERVICE_UUID].hex().upper() == "20000000FEC00000000000000000"
    assert none.service_data[EDDYSTONE_SERVICE_UUID].hex().upper() == "200000008000" + "00" * 8
    assert frames.parse_advertisement(none) == TlmFrame(0, None, 0, 0.0)


def test_ad_structures_in_bluez_order() -> None:
    adv = frames.eddystone_eid(EID, -18)
    assert adv.ad_structures() == [(0x01, b"\x06"), (0x03, b"\xaa\xfe"),
                                   (0x16, b"\xaa\xfe\x30\xee" + EID)]
    mixed = Advertisement(kind="ibeacon", manufacturer_data={0x0059: b"\x01"},
                          service_uuids=("0000180f-0000-1000-8000-00805f9b34fb",
                                         "6e400001-b5a3-f393-e0a9-e50e24dcca9e",
                                         EDDYSTONE_SERVICE_UUID),
                          service_data={"0000180f-0000-1000-8000-00805f9b34fb": b"\x64"})
    # the 16-bit list (in given order), then the 128-bit list (little-endian), then
    # manufacturer data, then service data, as bt_ad_generate serializes them
    assert mixed.ad_structures(flags=None) == [
        (0x03, b"\x0f\x18\xaa\xfe"),
        (0x07, uuid.UUID("6e400001-b5a3-f393-e0a9-e50e24dcca9e").bytes[::-1]),
        (0xFF, b"\x59\x00\x01"),
        (0x16, b"\x0f\x18\x64"),
    ]
    too_long_for_payload = b"".join(bytes([len(data) + 1, ad_type]) + data
                                    for ad_type, data in mixed.ad_structures(flags=None))
    gap = parse_advertisement_data_bytes(too_long_for_payload)
    sixteen_bit_first = [mixed.service_uuids[0], EDDYSTONE_SERVICE_UUID, mixed.service_uuids[1]]
    assert gap[1] == sixteen_bit_first
    assert gap[2] == dict(mixed.service_data)
    assert gap[3] == dict(mixed.manufacturer_data)


def _bluetooth_data_tools_agrees(adv: Advertisement, flags: int | None) -> None:
    _name, service_uuids, service_data, manufacturer_data, _tx = parse_advertisement_data_bytes(
        adv.payload(flags=flags))
    assert service_uuids == list(adv.service_uuids)
    assert service_data == dict(adv.service_data)
    assert manufacturer_data == dict(adv.manufacturer_data)


def _beacontools(adv: Advertisement, flags: int | None) -> Any:
    decoded = beacontools.parse_packet(adv.payload(flags=flags))
    assert decoded is not None, adv.payload(flags=flags).hex()
    return decoded


tx0s = st.integers(-100, 20)
flag_values = st.sampled_from([0x06, 0x04, 0x02, None])
url_chars = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
url_bodies = st.lists(st.one_of(url_chars, st.sampled_from(frames.URL_EXPANSIONS)),
                      max_size=17).map("".join)


@given(st.uuids(), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(-128, 127),
       flag_values)
def test_ibeacon_independently_decoded(beacon_uuid: uuid.UUID, major: int, minor: int,
                                       power: int, flags: int | None) -> None:
    adv = frames.ibeacon(beacon_uuid, major, minor, power)
    theirs = _beacontools(adv, flags)
    assert isinstance(theirs, beacontools.IBeaconAdvertisement)
    assert (uuid.UUID(theirs.uuid), theirs.major, theirs.minor, theirs.tx_power) == (
        beacon_uuid, major, minor, power)
    _bluetooth_data_tools_agrees(adv, flags)
    assert frames.parse(adv.payload(flags=flags)) == IBeaconFrame(beacon_uuid, major, minor, power)


@given(st.binary(min_size=10, max_size=10), st.binary(min_size=6, max_size=6), tx0s, flag_values)
def test_uid_independently_decoded(namespace: bytes, instance: bytes, tx0: int,
                                   flags: int | None) -> None:
    adv = frames.eddystone_uid(namespace, instance, tx0)
    theirs = _beacontools(adv, flags)
    assert isinstance(theirs, beacontools.EddystoneUIDFrame)
    assert (theirs.tx_power, theirs.namespace, theirs.instance) == (
        tx0, namespace.hex(), instance.hex())
    _bluetooth_data_tools_agrees(adv, flags)
    assert frames.parse(adv.payload(flags=flags)) == UidFrame(tx0, namespace, instance)


@given(st.sampled_from(frames.URL_SCHEMES), url_bodies, tx0s, flag_values)
def test_url_independently_decoded(scheme: str, body: str, tx0: int, flags: int | None) -> None:
    url = scheme + body
    try:
        adv = frames.eddystone_url(url, tx0)
    except FrameError as err:  # letters can merge into codes, never the other way round
        assert "17" in str(err)
        return
    theirs = _beacontools(adv, flags)
    assert isinstance(theirs, beacontools.EddystoneURLFrame)
    assert (theirs.tx_power, theirs.url) == (tx0, url)
    _bluetooth_data_tools_agrees(adv, flags)
    assert frames.parse(adv.payload(flags=flags)) == UrlFrame(tx0, url)


@given(st.integers(0, 0xFFFF), st.one_of(st.none(), st.integers(-0x7FFF, 0x7FFF)),
       st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), flag_values)
def test_tlm_independently_decoded(battery: int, temp_fixed: int | None, adv_count: int,
                                   ticks: int, flags: int | None) -> None:
    temperature = None if temp_fixed is None else temp_fixed / 256
    adv = frames.eddystone_tlm(battery_mv=battery, temperature_c=temperature,
                               adv_count=adv_count, uptime_s=ticks / 10)
    theirs = _beacontools(adv, flags)
    assert isinstance(theirs, beacontools.EddystoneTLMFrame)
    # beacontools reads TEMP unsigned and calls SEC_CNT (0.1 s ticks) seconds
    signed = theirs.temperature - 256 if theirs.temperature >= 128 else theirs.temperature
    assert signed == (-128.0 if temperature is None else temperature)
    assert (theirs.voltage, theirs.advertising_count, theirs.seconds_since_boot) == (
        battery, adv_count, ticks)
    _bluetooth_data_tools_agrees(adv, flags)
    assert frames.parse(adv.payload(flags=flags)) == TlmFrame(battery, temperature, adv_count,
                                                              ticks / 10)


@given(st.binary(min_size=8, max_size=8), tx0s, flag_values)
def test_eid_independently_decoded(eid: bytes, tx0: int, flags: int | None) -> None:
    adv = frames.eddystone_eid(eid, tx0)
    theirs = _beacontools(adv, flags)
    assert isinstance(theirs, beacontools.EddystoneEIDFrame)
    assert (theirs.tx_power, theirs.eid) == (tx0, eid)
    _bluetooth_data_tools_agrees(adv, flags)
    assert frames.parse_advertisement(adv) == EidFrame(tx0, eid)


def test_tlm_counters_wrap_and_uptime_floors_to_ticks() -> None:
    adv = frames.eddystone_tlm(battery_mv=1, temperature_c=None, adv_count=2**32 + 5,
                               uptime_s=(2**32 + 7) / 10 + 0.05)
    assert frames.parse_advertisement(adv) == TlmFrame(1, None, 5, 0.7)
    assert frames.parse_advertisement(frames.eddystone_tlm(
        battery_mv=0, temperature_c=21.0, adv_count=0, uptime_s=12.34)).uptime_s == 12.3


@pytest.mark.parametrize("temperature", [128.0, -128.0, -127.999, 1000.0, math.nan, math.inf])
def test_tlm_temperature_out_of_8_8(temperature: float) -> None:
    with pytest.raises(FrameError, match="temperature"):
        frames.eddystone_tlm(battery_mv=0, temperature_c=temperature, adv_count=0, uptime_s=0)


@pytest.mark.parametrize("kwargs", [
    {"battery_mv": -1}, {"battery_mv": 65536}, {"adv_count": -1}, {"uptime_s": -0.1},
    {"uptime_s": math.nan}, {"uptime_s": math.inf},
])
def test_tlm_bad_values(kwargs: dict[str, Any]) -> None:
    values: dict[str, Any] = {"battery_mv": 0, "temperature_c": None, "adv_count": 0,
                              "uptime_s": 0.0}
    with pytest.raises(FrameError):
        frames.eddystone_tlm(**(values | kwargs))


@pytest.mark.parametrize("code,text", list(enumerate(frames.URL_EXPANSIONS)))
def test_every_url_expansion_code(code: int, text: str) -> None:
    # "x" after a code without "/" keeps ".com" from being read as ".com/" + ...
    url = "http://a" + text + ("" if text.endswith("/") else "x")
    expected = b"\x02a" + bytes([code]) + (b"" if text.endswith("/") else b"x")
    assert frames.encode_url(url) == expected
    assert frames.decode_url(expected) == url
    theirs = beacontools.parse_packet(frames.eddystone_url(url, 0).payload())
    assert theirs.url == url


@pytest.mark.parametrize("url,expected", [
    ("http://www.a", "0061"), ("https://www.a", "0161"), ("http://a", "0261"),
    ("https://a", "0361"), ("https://", "03"), ("https://www.", "01"),
    ("https://x.info/y.info", "037804790B"), ("https://x.COM", "03782E434F4D"),
])
def test_url_schemes_take_the_longest_prefix(url: str, expected: str) -> None:
    assert frames.encode_url(url).hex().upper() == expected
    assert frames.decode_url(bytes.fromhex(expected)) == url


def test_url_17_byte_limit() -> None:
    assert len(frames.encode_url("https://" + "a" * 17)) == 18
    assert len(frames.encode_url("https://" + "a" * 16 + ".com/")) == 18
    # the longest frame still fits beside Flags and the UUID list: 3 + 4 + 24 = 31
    assert len(frames.eddystone_url("https://" + "a" * 17, 0).payload()) == 31
    for url in ("https://" + "a" * 18, "https://" + "a" * 17 + ".com"):
        with pytest.raises(FrameError, match="17"):
            frames.encode_url(url)
    with pytest.raises(FrameError):
        frames.decode_url(b"\x03" + b"a" * 18)


@pytest.mark.parametrize("url", [
    "ftp://a.com", "HTTPS://a.com", "www.a.com", "", "https://a b", "https://a\x7f",
    "https://caf\u00e9.fr", "https://a\n", "https://a\x00",
])
def test_url_refused(url: str) -> None:
    with pytest.raises(FrameError):
        frames.encode_url(url)


@pytest.mark.parametrize("data", ["", "04", "FF61", "030E", "0320", "037F", "03FF"])
def test_url_decode_refuses_reserved(data: str) -> None:
    with pytest.raises(FrameError):
        frames.decode_url(bytes.fromhex(data))


def test_tx_power_ranges() -> None:
    assert frames.tx_power_at_0m(-59) == -18
    assert frames.tx_power_at_0m(-141) == -100
    assert frames.tx_power_at_0m(-21) == 20
    for bad in (-142, -20, 0):
        with pytest.raises(FrameError, match="Tx power"):
            frames.tx_power_at_0m(bad)
    for tx0 in (-101, 21):
        with pytest.raises(FrameError):
            frames.eddystone_uid(NAMESPACE, INSTANCE, tx0)
        with pytest.raises(FrameError):
            frames.eddystone_url("https://a", tx0)
        with pytest.raises(FrameError):
            frames.eddystone_eid(EID, tx0)
    for power in (-129, 128):
        with pytest.raises(FrameError):
            frames.ibeacon(AIRLOCATE, 0, 0, power)


@pytest.mark.parametrize("build", [
    lambda: frames.ibeacon(AIRLOCATE, -1, 0, -59),
    lambda: frames.ibeacon(AIRLOCATE, 0, 65536, -59),
    lambda: frames.eddystone_uid(NAMESPACE[:9], INSTANCE, 0),
    lambda: frames.eddystone_uid(NAMESPACE, INSTANCE + b"\0", 0),
    lambda: frames.eddystone_eid(EID[:7], 0),
    lambda: Advertisement(kind="altbeacon", manufacturer_data={}, service_uuids=(),
                          service_data={}),
])
def test_bad_identifiers(build: Any) -> None:
    with pytest.raises(FrameError):
        build()


def test_payload_length_limit() -> None:
    def adv(size: int) -> Advertisement:
        return Advertisement(kind="ibeacon", manufacturer_data={0xFFFF: bytes(size)},
                             service_uuids=(), service_data={})

    assert len(adv(24).payload()) == 31
    assert len(adv(27).payload(flags=None)) == 31
    with pytest.raises(FrameError, match="31"):
        adv(25).payload()
    with pytest.raises(FrameError, match="31"):
        adv(28).payload(flags=None)
    with pytest.raises(FrameError, match="Flags"):
        adv(0).payload(flags=0x20)


def test_advertisement_is_a_snapshot() -> None:
    source = {EDDYSTONE_SERVICE_UUID: b"\x30\x00" + EID}
    adv = Advertisement(kind="eddystone-eid", manufacturer_data={},
                        service_uuids=(EDDYSTONE_SERVICE_UUID,), service_data=source)
    source[EDDYSTONE_SERVICE_UUID] = b"changed"
    assert adv == frames.eddystone_eid(EID, 0)
    with pytest.raises(TypeError):
        adv.service_data[EDDYSTONE_SERVICE_UUID] = b""  # type: ignore[index]


@pytest.mark.parametrize("payload", [
    "1AFF4C00",        # manufacturer data cut short
    "020106" "05",     # a length with nothing after it
    "0301" "06",       # Flags claiming 2 data bytes, holding 1
    "00" "020106",     # zero length before real data
    "020106" "00" "01",
])
def test_split_ad_refuses_malformed(payload: str) -> None:
    with pytest.raises(FrameError):
        frames.split_ad(bytes.fromhex(payload))
    with pytest.raises(FrameError):
        frames.parse(bytes.fromhex(payload))


def test_split_ad_accepts_trailing_zero_padding() -> None:
    # Core spec Vol 3 Part C 11: a zero length octet ends the significant part early
    padded = bytes.fromhex(PINNED["eddystone-eid"][1]) + bytes(31 - 24)
    assert frames.split_ad(padded) == frames.eddystone_eid(EID, -18).ad_structures()
    assert frames.parse(padded) == EidFrame(-18, EID)
    assert frames.split_ad(b"\x01\x01") == [(0x01, b"")]


@pytest.mark.parametrize("payload", [
    "",
    "020106",                                        # Flags alone
    "020106" "0303AAFE",                             # UUID list, no frame
    "020106" "0303AAFE" "0416AAFE40",                # frame type 0x40 does not exist
    "0416AAFE30",                                    # EID frame with no EID
    "020106" "0E16AAFE" "30EE" "0123456789ABCDEF00",  # EID frame one byte too long
    "1316AAFE" "2001" "000000000000000000000000" "0000",  # encrypted TLM (version 01)
    "1016AAFE" "2000" "0BB8198001020304000003",      # plain TLM one byte short
    "1AFF4C000216" + "00" * 21,                      # Apple data that is not an iBeacon
    "1AFF4D000215" + "00" * 21,                      # iBeacon layout, another company
    "0516AAFF0000",                                  # service data of another UUID
    "0416AAFE1000",                                  # URL frame without its scheme byte
    "0616AAFE100004",                                # URL scheme 04 does not exist
])
def test_parse_refuses_what_is_no_frame(payload: str) -> None:
    with pytest.raises(FrameError):
        frames.parse(bytes.fromhex(payload))


def test_url_frame_with_empty_body() -> None:
    # the URL spec allows 0-17 encoded bytes after the scheme
    assert frames.parse(bytes.fromhex("0616AAFE10EC03")) == UrlFrame(-20, "https://")


def test_uid_without_rfu_bytes_still_parses() -> None:
    # some beacons send the 18-byte UID frame (beacontools issue 39); we accept it
    short = "0303AAFE" "1516AAFE" "00EE" "00010203040506070809" "0A0B0C0D0E0F"
    assert frames.parse(bytes.fromhex(short)) == UidFrame(-18, NAMESPACE, INSTANCE)
