"""TGP1 commands (terminal → card) and strict parsers of their answers.

Every parser takes the whole R-APDU (data || SW1 SW2). Anything PURSE.md does not allow
(a short or long answer, an unknown status word, broken TLV) raises :class:`CardFault`;
refusals the protocol defines raise :class:`CardStatus` with the status word.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from protocol.errors import CardFault, CardStatus
from protocol.tgp1 import tlv
from protocol.tgp1.crypto import TX_TYPE_PURCHASE

AID = bytes.fromhex("F054415047415445")
KEY_INDEX = 0x01
ALGORITHM_AES_CMAC = 0x02
LOG_RECORDS = 10

SW_OK = 0x9000
SW_INSUFFICIENT = 0x9401
SW_NO_PROOF = 0x9406
SW_MAC1_WRONG = 0x9302
SW_BLOCKED_OR_EXPIRED = 0x6985
SW_NOT_FOUND = 0x6A82
SW_NO_RECORD = 0x6A83
SW_UNKNOWN_KEY = 0x6A88
SW_WRONG_LENGTH = 0x6700


def select() -> bytes:
    return bytes([0x00, 0xA4, 0x04, 0x00, len(AID)]) + AID + b"\x00"


def get_balance() -> bytes:
    return bytes.fromhex("805C000204")


def initialize_for_purchase(amount: int, terminal_id: bytes) -> bytes:
    return (
        bytes.fromhex("805001020B")
        + bytes([KEY_INDEX])
        + amount.to_bytes(4, "big")
        + terminal_id
        + b"\x0F"
    )


def debit_for_purchase(terminal_seq: int, date: bytes, time: bytes, mac1: bytes) -> bytes:
    return (
        bytes.fromhex("805401000F")
        + terminal_seq.to_bytes(4, "big")
        + date
        + time
        + mac1
        + b"\x08"
    )


def get_transaction_proof(counter: int) -> bytes:
    return bytes.fromhex("805A000602") + counter.to_bytes(2, "big") + b"\x08"


def read_record(number: int) -> bytes:
    if not 1 <= number <= LOG_RECORDS:
        raise ValueError(f"record number {number} outside 1..{LOG_RECORDS}")
    return bytes([0x00, 0xB2, number, 0xC4, 0x1C])


def split(command: str, response: bytes) -> tuple[bytes, int]:
    if len(response) < 2:
        raise CardFault(command, "answer shorter than a status word", response)
    return response[:-2], int.from_bytes(response[-2:], "big")


def _expect(command: str, response: bytes, length: int, allowed: tuple[int, ...] = ()) -> bytes:
    """The data of a 9000 answer of exactly ``length`` bytes, else a fault or refusal."""
    data, sw = split(command, response)
    if sw == SW_OK:
        if len(data) != length:
            raise CardFault(command, f"expected {length} data bytes, got {len(data)}", response)
        return data
    if sw in allowed and not data:
        raise CardStatus(command, sw, response)
    raise CardFault(command, f"status word {sw:04X} not allowed here", response)


def bcd_digits(data: bytes) -> str:
    text = data.hex()
    if not text.isdigit():
        raise ValueError(f"not BCD: {text.upper()}")
    return text


@dataclass(frozen=True, slots=True)
class CardInfo:
    serial: bytes
    expiry: dt.date
    card_type: int
    status: int
    version: int

    @property
    def blocked(self) -> bool:
        return self.status != 0x00


def parse_select(response: bytes) -> CardInfo:
    command = "SELECT"
    data, sw = split(command, response)
    if sw == SW_NOT_FOUND and not data:
        raise CardStatus(command, sw, response)
    if sw != SW_OK:
        raise CardFault(command, f"status word {sw:04X} not allowed here", response)
    try:
        outer = tlv.as_dict(data)
        if set(outer) != {0x6F}:
            raise tlv.TlvError("FCI is not one 6F template")
        fci = tlv.as_dict(outer[0x6F])
        if fci.get(0x84) != AID or 0xA5 not in fci:
            raise tlv.TlvError("FCI lacks the TGP1 AID or the A5 proprietary template")
        prop = tlv.as_dict(fci[0xA5])
        serial = prop[0x5A]
        expiry_raw = prop[0x5F24]
        card_type = prop[0xC1]
        status = prop[0xC2]
        version = prop[0x9F08]
        if len(serial) != 8 or len(expiry_raw) != 3 or len(card_type) != 1:
            raise tlv.TlvError("a field has the wrong length")
        if len(status) != 1 or len(version) != 1:
            raise tlv.TlvError("a field has the wrong length")
        digits = bcd_digits(expiry_raw)
        expiry = dt.date(2000 + int(digits[0:2]), int(digits[2:4]), int(digits[4:6]))
    except KeyError as err:
        raise CardFault(command, f"FCI lacks tag {err.args[0]:X}", response) from err
    except ValueError as err:  # TlvError, BCD and calendar errors
        raise CardFault(command, f"malformed FCI: {err}", response) from err
    if version[0] != 0x01:
        raise CardFault(command, f"unsupported TGP version {version[0]}", response)
    return CardInfo(serial, expiry, card_type[0], status[0], version[0])


def parse_balance(response: bytes) -> int:
    return int.from_bytes(_expect("GET BALANCE", response, 4), "big")


@dataclass(frozen=True, slots=True)
class PurchaseInit:
    balance: int
    counter: int
    card_random: bytes


def parse_initialize(response: bytes) -> PurchaseInit:
    command = "INITIALIZE FOR PURCHASE"
    data = _expect(command, response, 15,
                   (SW_INSUFFICIENT, SW_BLOCKED_OR_EXPIRED, SW_UNKNOWN_KEY, SW_WRONG_LENGTH))
    overdraft, key_version, algorithm = data[6:9], data[9], data[10]
    if overdraft != b"\x00\x00\x00" or key_version != 0x01 or algorithm != ALGORITHM_AES_CMAC:
        raise CardFault(command, "unsupported overdraft, key version or algorithm", response)
    return PurchaseInit(
        balance=int.from_bytes(data[0:4], "big"),
        counter=int.from_bytes(data[4:6], "big"),
        card_random=data[11:15],
    )


@dataclass(frozen=True, slots=True)
class Proof:
    mac2: bytes
    tac: bytes


def parse_debit(response: bytes) -> Proof:
    data = _expect("DEBIT FOR PURCHASE", response, 8, (SW_MAC1_WRONG, SW_BLOCKED_OR_EXPIRED))
    return Proof(tac=data[0:4], mac2=data[4:8])


def parse_proof(response: bytes) -> Proof | None:
    """MAC2 and TAC of the card's latest debit, or None (9406) if it ran with another counter."""
    command = "GET TRANSACTION PROOF"
    data, sw = split(command, response)
    if sw == SW_NO_PROOF and not data:
        return None
    data = _expect(command, response, 8)
    return Proof(mac2=data[0:4], tac=data[4:8])


@dataclass(frozen=True, slots=True)
class LogRecord:
    counter_before: int
    balance_after: int
    amount: int
    tx_type: int
    terminal_id: bytes
    terminal_seq: int
    date: bytes
    time: bytes


def parse_record(response: bytes) -> LogRecord | None:
    """One transaction-log record, or None (6A83) past the end of the log."""
    command = "READ RECORD"
    data, sw = split(command, response)
    if sw == SW_NO_RECORD and not data:
        return None
    data = _expect(command, response, 28)
    if data[10] != TX_TYPE_PURCHASE:
        raise CardFault(command, f"unknown transaction type {data[10]:02X}", response)
    return LogRecord(
        counter_before=int.from_bytes(data[0:2], "big"),
        balance_after=int.from_bytes(data[2:6], "big"),
        amount=int.from_bytes(data[6:10], "big"),
        tx_type=data[10],
        terminal_id=data[11:17],
        terminal_seq=int.from_bytes(data[17:21], "big"),
        date=data[21:25],
        time=data[25:28],
    )
