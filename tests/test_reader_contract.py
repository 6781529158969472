"""The reader contract (hal/reader/base.py), run against every backend that runs here:
``sim`` in-process, and ``pcsc`` through a real pcscd with the vpcd virtual reader."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from typing import Protocol

import pytest

from hal.card.model import Fault, FaultKind, VirtualPurse
from hal.card.vpcd import VpcdCard
from hal.reader.base import CardLink, Reader, ReaderState
from hal.reader.sim import SimReader
from protocol.errors import CardGone
from protocol.tgp1 import apdu
from protocol.tgp1.crypto import Purchase, card_key
from tests.fixtures.pcsc import PURCHASE_KEY, VPCD_READER, make_purse

WAIT_S = 15.0  # for things that must happen: generous, the machine is shared
QUIET_S = 1.0  # for things that must not happen
TERMINAL_ID = bytes.fromhex("000000A00001")
DATE, TIME = bytes.fromhex("20261122"), bytes.fromhex("083015")


class Rig(Protocol):
    """A reader under test and a hand that puts cards in its field."""

    reader: Reader

    def present(self, card: VirtualPurse) -> None: ...

    def remove(self) -> None: ...


class SimRig:
    def __init__(self) -> None:
        self.sim = SimReader()
        self.reader: Reader = self.sim

    def present(self, card: VirtualPurse) -> None:
        self.sim.present(card)

    def remove(self) -> None:
        self.sim.remove()


class PcscRig:
    def __init__(self, vpcd_card: Callable[..., VpcdCard]) -> None:
        from hal.reader.pcsc import PcscReader

        self.reader: Reader = PcscReader(name=VPCD_READER, poll_s=0.1)
        self._vpcd_card = vpcd_card
        self._cards: dict[int, VpcdCard] = {}
        self._current: VpcdCard | None = None

    def present(self, card: VirtualPurse) -> None:
        self.remove()
        vpcd = self._cards.get(id(card))
        if vpcd is None:
            vpcd = self._cards[id(card)] = self._vpcd_card(card)
        vpcd.insert(timeout=WAIT_S)
        self._current = vpcd

    def remove(self) -> None:
        if self._current is not None:
            self._current.remove()
            self._current = None


@pytest.fixture(params=["sim", pytest.param("pcsc", marks=pytest.mark.pcsc)])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    made: Rig = SimRig() if request.param == "sim" else PcscRig(
        request.getfixturevalue("vpcd_card"))
    made.reader.open()
    try:
        yield made
    finally:
        made.reader.close()


def tap(rig: Rig, card: VirtualPurse) -> CardLink:
    rig.present(card)
    link = rig.reader.wait_for_card(WAIT_S)
    assert link is not None, "a presented card was not handed out"
    return link


def debit(link: CardLink, card: VirtualPurse, amount: int, seq: int) -> tuple[int, bytes]:
    """INITIALIZE + DEBIT FOR PURCHASE; returns (counter before, the DEBIT C-APDU sent)."""
    init = apdu.parse_initialize(link.transmit(apdu.initialize_for_purchase(amount, TERMINAL_ID)))
    purchase = Purchase(card_random=init.card_random, counter=init.counter, terminal_seq=seq,
                        amount=amount, terminal_id=TERMINAL_ID, date=DATE, time=TIME)
    mac1 = purchase.mac1(purchase.session_key(card_key(PURCHASE_KEY, card.serial)))
    command = apdu.debit_for_purchase(seq, DATE, TIME, mac1)
    return init.counter, command


def test_open_reader_is_ready(rig: Rig) -> None:
    assert rig.reader.state is ReaderState.READY
    assert rig.reader.name


def test_no_card_means_none_after_the_timeout(rig: Rig) -> None:
    assert rig.reader.wait_for_card(0.3) is None
    assert rig.reader.state is ReaderState.READY


def test_presented_card_is_handed_out_and_answers_select(rig: Rig) -> None:
    card = make_purse(balance=1234)
    link = tap(rig, card)
    assert link.atr == card.atr
    info = apdu.parse_select(link.transmit(apdu.select()))
    assert info.serial == card.serial
    assert info.expiry == dt.date(2030, 12, 31)
    assert apdu.parse_balance(link.transmit(apdu.get_balance())) == 1234
    link.release()


def test_card_left_in_the_field_is_not_handed_out_twice(rig: Rig) -> None:
    card = make_purse()
    link = tap(rig, card)
    link.release()
    assert rig.reader.wait_for_card(QUIET_S) is None
    assert rig.reader.wait_for_removal(QUIET_S) is False
    rig.remove()
    assert rig.reader.wait_for_removal(WAIT_S) is True
    assert rig.reader.wait_for_card(QUIET_S) is None
    again = tap(rig, card)  # a new presentation of the same card is a new tap
    assert apdu.parse_select(again.transmit(apdu.select())).serial == card.serial
    again.release()


def test_held_card_is_not_handed_out_while_its_link_is_open(rig: Rig) -> None:
    link = tap(rig, make_purse())
    assert rig.reader.wait_for_card(QUIET_S) is None
    link.release()


def test_removal_is_seen(rig: Rig) -> None:
    link = tap(rig, make_purse())
    rig.remove()
    assert rig.reader.wait_for_removal(WAIT_S) is True
    with pytest.raises(CardGone):
        link.transmit(apdu.select())
    link.release()


def test_released_link_refuses_to_transmit(rig: Rig) -> None:
    link = tap(rig, make_purse())
    link.release()
    link.release()  # twice is harmless
    with pytest.raises(CardGone):
        link.transmit(apdu.select())


@pytest.mark.parametrize("kind", [FaultKind.TEAR_BEFORE, FaultKind.TEAR_AFTER])
def test_torn_debit_raises_card_gone_and_the_card_tells_what_happened(
        rig: Rig, kind: FaultKind) -> None:
    card = make_purse(balance=1000)
    link = tap(rig, card)
    counter, command = debit(link, card, amount=250, seq=42)
    card.inject(Fault(kind, ins=0x54))
    with pytest.raises(CardGone):
        link.transmit(command)
    link.release()
    assert rig.reader.wait_for_removal(WAIT_S) is True  # a torn card has left the field

    applied = kind is FaultKind.TEAR_AFTER
    assert card.balance == (750 if applied else 1000)
    assert len(card.history) == (1 if applied else 0)

    # the next presentation tells the gate which case it was, as PURSE.md describes
    link = tap(rig, card)
    assert apdu.parse_select(link.transmit(apdu.select())).serial == card.serial
    record = apdu.parse_record(link.transmit(apdu.read_record(1)))
    proof = apdu.parse_proof(link.transmit(apdu.get_transaction_proof(counter)))
    if applied:
        assert record is not None
        assert (record.counter_before, record.balance_after, record.amount) == (counter, 750, 250)
        assert (record.terminal_id, record.terminal_seq) == (TERMINAL_ID, 42)
        assert proof is not None
        assert (proof.mac2, proof.tac) == (card.history[-1].mac2, card.history[-1].tac)
    else:
        assert record is None
        assert proof is None
    assert apdu.parse_balance(link.transmit(apdu.get_balance())) == card.balance
    link.release()


def test_tear_before_a_command_leaves_the_session_unopened(rig: Rig) -> None:
    card = make_purse(balance=1000)
    link = tap(rig, card)
    card.inject(Fault(FaultKind.TEAR_BEFORE, ins=0x50))
    with pytest.raises(CardGone):
        link.transmit(apdu.initialize_for_purchase(250, TERMINAL_ID))
    link.release()
    assert rig.reader.wait_for_removal(WAIT_S) is True
    assert (card.balance, card.counter) == (1000, 0)


@pytest.mark.parametrize("kind, garbage", [
    (FaultKind.GARBAGE_BEFORE, b"\x6F"),
    (FaultKind.GARBAGE_AFTER, b"\x90"),
    (FaultKind.GARBAGE_BEFORE, b"\x12\x34\x56\x78\x90\x00\x90\x00"),
])
def test_garbage_answers_come_through_as_bytes(
        rig: Rig, kind: FaultKind, garbage: bytes) -> None:
    card = make_purse()
    link = tap(rig, card)
    card.inject(Fault(kind, ins=0xA4, garbage=garbage))
    assert link.transmit(apdu.select()) == garbage
    # the card is still there and sane afterwards
    assert apdu.parse_select(link.transmit(apdu.select())).serial == card.serial
    link.release()


def test_many_exchanges_in_one_tap(rig: Rig) -> None:
    card = make_purse(balance=10_000)
    link = tap(rig, card)
    for seq in range(1, 6):
        _, command = debit(link, card, amount=100, seq=seq)
        apdu.parse_debit(link.transmit(command))
    assert apdu.parse_balance(link.transmit(apdu.get_balance())) == 9_500
    link.release()
