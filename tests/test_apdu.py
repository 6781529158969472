"""The TGP1 answer parsers take exactly what PURSE.md allows; anything else is a CardFault
(a CardStatus for the refusals PURSE.md defines), and never any other exception."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import CardFault, CardStatus, TapgateError
from protocol.tgp1 import apdu, tlv
from tests.cards import TERMINAL_ID

SERIAL = bytes.fromhex("8801000000001234")
OK = b"\x90\x00"


def tl(tag: bytes, value: bytes) -> bytes:
    return tag + bytes([len(value)]) + value


def fci(*, serial: bytes = SERIAL, expiry: bytes = bytes.fromhex("301231"),
        card_type: bytes = b"\x01", status: bytes = b"\x00", version: bytes = b"\x01",
        aid: bytes = apdu.AID, extra_prop: bytes = b"", prop: bytes | None = None,
        inner: bytes | None = None) -> bytes:
    if prop is None:
        prop = (tl(b"\x5A", serial) + tl(b"\x5F\x24", expiry) + tl(b"\xC1", card_type)
                + tl(b"\xC2", status) + tl(b"\x9F\x08", version) + extra_prop)
    if inner is None:
        inner = tl(b"\x84", aid) + tl(b"\xA5", prop)
    return tl(b"\x6F", inner)


INIT_DATA = bytes.fromhex("000003E8" "0007" "000000" "01" "02" "A1B2C3D4")
RECORD = bytes.fromhex("0007" "000002EE" "000000FA" "06" "000000A00001" "0000002A" "20261122"
                       "083015")


# --- commands ------------------------------------------------------------------------------
def test_commands_are_byte_exact() -> None:
    assert apdu.select() == bytes.fromhex("00A4040008F05441504741544500")
    assert apdu.get_balance() == bytes.fromhex("805C000204")
    assert apdu.initialize_for_purchase(250, TERMINAL_ID) == bytes.fromhex(
        "805001020B" "01" "000000FA" "000000A00001" "0F")
    assert apdu.get_transaction_proof(7) == bytes.fromhex("805A0006020007" "08")
    assert apdu.read_record(1) == bytes.fromhex("00B201C41C")
    assert apdu.read_record(10) == bytes.fromhex("00B20AC41C")
    for bad in (0, 11):
        with pytest.raises(ValueError):
            apdu.read_record(bad)


# --- SELECT --------------------------------------------------------------------------------
def test_select_accepts_the_fci() -> None:
    info = apdu.parse_select(fci() + OK)
    assert info == apdu.CardInfo(SERIAL, dt.date(2030, 12, 31), 0x01, 0x00, 0x01)
    assert not info.blocked
    blocked = apdu.parse_select(fci(status=b"\x01", card_type=b"\x03") + OK)
    assert blocked.blocked and blocked.card_type == 0x03


def test_select_6a82_is_a_status() -> None:
    with pytest.raises(CardStatus) as err:
        apdu.parse_select(bytes.fromhex("6A82"))
    assert err.value.sw == 0x6A82


@pytest.mark.parametrize("answer, why", [
    (b"", "empty"),
    (b"\x90", "shorter than a status word"),
    (OK, "9000 with no FCI"),
    (fci() + b"\x6A\x82", "6A82 with data"),
    (fci() + b"\x62\x83", "another status word"),
    (fci() + b"\x6F\x00", "6F00"),
    (fci()[:-1] + OK, "truncated TLV"),
    (fci() + b"\x00" + OK, "trailing byte"),
    (fci() + fci() + OK, "two FCI templates"),
    (tl(b"\x6E", fci()[2:]) + OK, "not a 6F template"),
    (fci(aid=bytes.fromhex("A000000003101001")) + OK, "wrong AID"),
    (fci(inner=tl(b"\xA5", b"")) + OK, "no AID"),
    (fci(inner=tl(b"\x84", apdu.AID)) + OK, "no A5 template"),
    (fci(serial=SERIAL[:7]) + OK, "serial 7 bytes"),
    (fci(serial=SERIAL + b"\x00") + OK, "serial 9 bytes"),
    (fci(expiry=bytes.fromhex("3012")) + OK, "expiry 2 bytes"),
    (fci(expiry=bytes.fromhex("30123A")) + OK, "expiry not BCD"),
    (fci(expiry=bytes.fromhex("301332")) + OK, "expiry month 13"),
    (fci(expiry=bytes.fromhex("300230")) + OK, "expiry 30 February"),
    (fci(card_type=b"") + OK, "empty card type"),
    (fci(status=b"\x00\x00") + OK, "status 2 bytes"),
    (fci(version=b"\x02") + OK, "version 2"),
    (fci(version=b"") + OK, "empty version"),
    (fci(prop=tl(b"\x5A", SERIAL) + tl(b"\x5F\x24", b"\x30\x12\x31")) + OK, "fields missing"),
    (fci(extra_prop=tl(b"\x5A", SERIAL)) + OK, "duplicate serial tag"),
    (fci(extra_prop=tl(b"\xC2", b"\x01")) + OK, "duplicate status tag"),
    (tl(b"\x6F", tl(b"\x84", apdu.AID) + tl(b"\x84", apdu.AID) + b"\xA5\x00") + OK,
     "duplicate AID tag"),
    (b"\x6F\x82\x00\x05" + OK, "length beyond the data"),
    (b"\x6F\x83\x00\x00\x00" + OK, "3-byte length field"),
    (b"\x6F\x80" + OK, "indefinite length"),
    (b"\x9F" + OK, "truncated multi-byte tag"),
])
def test_select_refuses_malformed(answer: bytes, why: str) -> None:
    with pytest.raises(CardFault) as err:
        apdu.parse_select(answer)
    assert type(err.value) is CardFault, why


# --- GET BALANCE ---------------------------------------------------------------------------
def test_balance() -> None:
    assert apdu.parse_balance(bytes.fromhex("000003E8") + OK) == 1000
    for answer in (OK, bytes.fromhex("0003E8") + OK, bytes.fromhex("00000003E8") + OK,
                   bytes.fromhex("000003E86A82"), bytes.fromhex("6D00"), b"\x90", b""):
        with pytest.raises(CardFault):
            apdu.parse_balance(answer)


# --- INITIALIZE FOR PURCHASE ---------------------------------------------------------------
def test_initialize_accepts_15_bytes() -> None:
    init = apdu.parse_initialize(INIT_DATA + OK)
    assert init == apdu.PurchaseInit(balance=1000, counter=7,
                                     card_random=bytes.fromhex("A1B2C3D4"))


@pytest.mark.parametrize("sw", [0x9401, 0x6985])
def test_initialize_defined_refusals_are_statuses(sw: int) -> None:
    with pytest.raises(CardStatus) as err:
        apdu.parse_initialize(sw.to_bytes(2, "big"))
    assert err.value.sw == sw


@pytest.mark.parametrize("answer, why", [
    (b"", "empty"),
    (b"\x94", "one byte"),
    (OK, "no data"),
    (INIT_DATA[:-1] + OK, "14 bytes"),
    (INIT_DATA + b"\x00" + OK, "16 bytes"),
    (INIT_DATA + b"\x6F\x00", "6F00 with data"),
    (INIT_DATA + b"\x94\x01", "9401 with data"),
    (bytes.fromhex("6D00"), "6D00"),
    (bytes.fromhex("6A82"), "6A82"),
    (INIT_DATA[:6] + b"\x00\x00\x01" + INIT_DATA[9:] + OK, "overdraft limit"),
    (INIT_DATA[:9] + b"\x02" + INIT_DATA[10:] + OK, "key version 2"),
    (INIT_DATA[:10] + b"\x01" + INIT_DATA[11:] + OK, "algorithm 01 (3DES)"),
])
def test_initialize_refuses_malformed(answer: bytes, why: str) -> None:
    with pytest.raises(CardFault) as err:
        apdu.parse_initialize(answer)
    assert not isinstance(err.value, CardStatus), why


@pytest.mark.parametrize("sw", [0x6A88, 0x6700])
def test_initialize_gate_side_errors_are_faults(sw: int) -> None:
    # 6A88 (key index) and 6700 (length) mean the gate sent a wrong command: a fault,
    # never mistaken for the passenger's card being refused
    with pytest.raises(CardFault):
        apdu.parse_initialize(sw.to_bytes(2, "big"))


# --- DEBIT FOR PURCHASE --------------------------------------------------------------------
def test_debit_answer_is_tac_then_mac2() -> None:
    proof = apdu.parse_debit(bytes.fromhex("4F40885B" "C2C549C7") + OK)
    assert proof == apdu.Proof(mac2=bytes.fromhex("C2C549C7"), tac=bytes.fromhex("4F40885B"))


@pytest.mark.parametrize("sw", [0x9302, 0x6985])
def test_debit_defined_refusals_are_statuses(sw: int) -> None:
    with pytest.raises(CardStatus) as err:
        apdu.parse_debit(sw.to_bytes(2, "big"))
    assert err.value.sw == sw


@pytest.mark.parametrize("answer", [
    b"", b"\x90", OK, bytes(7) + OK, bytes(9) + OK, bytes(8) + b"\x93\x02", bytes(8) + b"\x61\x08",
    bytes.fromhex("9401"), bytes.fromhex("6D00"), bytes.fromhex("6700"),
])
def test_debit_refuses_malformed(answer: bytes) -> None:
    with pytest.raises(CardFault) as err:
        apdu.parse_debit(answer)
    assert not isinstance(err.value, CardStatus)


# --- GET TRANSACTION PROOF -----------------------------------------------------------------
def test_proof_answer_is_mac2_then_tac() -> None:
    proof = apdu.parse_proof(bytes.fromhex("C2C549C7" "4F40885B") + OK)
    assert proof == apdu.Proof(mac2=bytes.fromhex("C2C549C7"), tac=bytes.fromhex("4F40885B"))
    assert apdu.parse_proof(bytes.fromhex("9406")) is None


@pytest.mark.parametrize("answer", [
    b"", b"\x94", OK, bytes(7) + OK, bytes(9) + OK, bytes(8) + b"\x94\x06",
    bytes.fromhex("6A83"), bytes.fromhex("6985"), bytes.fromhex("6D00"),
])
def test_proof_refuses_malformed(answer: bytes) -> None:
    with pytest.raises(CardFault):
        apdu.parse_proof(answer)


# --- READ RECORD ---------------------------------------------------------------------------
def test_record() -> None:
    rec = apdu.parse_record(RECORD + OK)
    assert rec == apdu.LogRecord(
        counter_before=7, balance_after=750, amount=250, tx_type=0x06,
        terminal_id=TERMINAL_ID, terminal_seq=42, date=bytes.fromhex("20261122"),
        time=bytes.fromhex("083015"))
    assert apdu.parse_record(bytes.fromhex("6A83")) is None


@pytest.mark.parametrize("answer", [
    b"", b"\x6A", OK, RECORD[:-1] + OK, RECORD + b"\x00" + OK, RECORD + b"\x6A\x83",
    RECORD[:10] + b"\x02" + RECORD[11:] + OK,  # a load, not a purchase
    bytes.fromhex("6A82"), bytes.fromhex("9406"), bytes.fromhex("6700"),
])
def test_record_refuses_malformed(answer: bytes) -> None:
    with pytest.raises(CardFault):
        apdu.parse_record(answer)


# --- TLV -----------------------------------------------------------------------------------
def test_tlv() -> None:
    assert tlv.parse(b"") == []
    assert tlv.parse(bytes.fromhex("5F2403301231" "C10101")) == [
        (0x5F24, bytes.fromhex("301231")), (0xC1, b"\x01")]
    assert tlv.parse(b"\x6F\x81\x02ab") == [(0x6F, b"ab")]
    assert tlv.parse(b"\x6F\x82\x00\x01a") == [(0x6F, b"a")]
    for bad in (b"\x5F", b"\x5F\x24", b"\xC1\x02\x01", b"\xC1\x81", b"\xC1\x80"):
        with pytest.raises(tlv.TlvError):
            tlv.parse(bad)
    with pytest.raises(tlv.TlvError):
        tlv.as_dict(b"\xC1\x01\x01\xC1\x01\x02")


# --- anything at all -----------------------------------------------------------------------
PARSERS: dict[str, Callable[[bytes], object]] = {
    "select": apdu.parse_select,
    "balance": apdu.parse_balance,
    "initialize": apdu.parse_initialize,
    "debit": apdu.parse_debit,
    "proof": apdu.parse_proof,
    "record": apdu.parse_record,
}
VALID_TYPES = {
    "select": apdu.CardInfo,
    "balance": int,
    "initialize": apdu.PurchaseInit,
    "debit": apdu.Proof,
    "proof": (apdu.Proof, type(None)),
    "record": (apdu.LogRecord, type(None)),
}


def _fault_or_valid(name: str, answer: bytes) -> None:
    try:
        result = PARSERS[name](answer)
    except TapgateError as err:
        assert isinstance(err, CardFault), f"{name}: {err!r}"
        return
    assert isinstance(result, VALID_TYPES[name])  # type: ignore[arg-type]
    assert answer[-2:] == OK or result is None


status_words = st.sampled_from([0x9000, 0x6A82, 0x6A83, 0x9401, 0x9406, 0x9302, 0x6985,
                                0x6700, 0x6D00]).map(lambda sw: sw.to_bytes(2, "big"))
answers = st.one_of(
    st.binary(max_size=64),
    st.tuples(st.binary(max_size=40), status_words).map(lambda t: t[0] + t[1]),
)


@settings(max_examples=400, deadline=None)
@given(name=st.sampled_from(sorted(PARSERS)), answer=answers)
def test_any_bytes_give_a_result_or_a_card_fault(name: str, answer: bytes) -> None:
    _fault_or_valid(name, answer)


tags = st.sampled_from([b"\x6F", b"\x84", b"\xA5", b"\x5A", b"\x5F\x24", b"\xC1", b"\xC2",
                        b"\x9F\x08", b"\x9F", b"\x1F", b"\x00", b"\xFF\xFF"])
tlv_items = st.recursive(
    st.tuples(tags, st.binary(max_size=10)).map(lambda t: tl(t[0], t[1])),
    lambda inner: st.tuples(tags, st.lists(inner, max_size=4)).map(
        lambda t: tl(t[0], b"".join(t[1])[:250])),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(body=st.one_of(
    st.lists(tlv_items, max_size=3).map(b"".join),
    st.integers(0, 80).flatmap(lambda i: st.just(fci()).map(lambda f: f[:i] + f[i + 1:])),
    st.tuples(st.integers(0, 60), st.integers(0, 255)).map(
        lambda t: fci()[:t[0]] + bytes([t[1]]) + fci()[t[0] + 1:]),
))
def test_fci_like_bytes_give_a_result_or_a_card_fault(body: bytes) -> None:
    _fault_or_valid("select", body + OK)
