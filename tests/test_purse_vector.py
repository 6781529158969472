"""PURSE.md's test vector: through the crypto functions, and end to end through the card
model, the SAM and the tap processor."""

from __future__ import annotations

import time
from pathlib import Path

from daemon.outcome import Outcome
from hal.sam.software import SoftwareSam
from protocol.entry import COMPLETED, KIND_DEBIT
from protocol.tgp1 import apdu
from protocol.tgp1.crypto import Purchase, card_key, card_tac_key, cmac
from tests.cards import MASTER_KEY, MASTER_TAC_KEY, TERMINAL_ID, Clock, make_card
from tests.configs import gate_config
from tests.ledger import assert_ledger
from tests.rig import Rig

SERIAL = bytes.fromhex("8801000000001234")
RANDOM = bytes.fromhex("A1B2C3D4")
COUNTER = 7
SEQ = 0x2A
AMOUNT = 0xFA
DATE = bytes.fromhex("20261122")
TIME = bytes.fromhex("083015")

K_CARD = bytes.fromhex("FE2FC8D928D57AEB539C9F93B8B9567E")
K_CARD_TAC = bytes.fromhex("7A285924C76846834389C05E9A21495C")
SK = bytes.fromhex("E0F9099DCD8C55F0A845F19C629AD841")
MAC1 = bytes.fromhex("0FE90061")
MAC2 = bytes.fromhex("C2C549C7")
TAC = bytes.fromhex("4F40885B")

PURCHASE = Purchase(card_random=RANDOM, counter=COUNTER, terminal_seq=SEQ, amount=AMOUNT,
                    terminal_id=TERMINAL_ID, date=DATE, time=TIME)


def test_cmac_is_nist_sp800_38b() -> None:
    # NIST SP 800-38B, appendix D.1, AES-128, example 2 (16-byte message)
    key = bytes.fromhex("2B7E151628AED2A6ABF7158809CF4F3C")
    msg = bytes.fromhex("6BC1BEE22E409F96E93D7E117393172A")
    assert cmac(key, msg) == bytes.fromhex("070A16B46B4D4144F79BDD9DD04A287C")
    assert cmac(key, b"") == bytes.fromhex("BB1D6929E95937287FA37D129B756746")


def test_card_keys() -> None:
    assert card_key(MASTER_KEY, SERIAL) == K_CARD
    assert card_tac_key(MASTER_TAC_KEY, SERIAL) == K_CARD_TAC


def test_session_key_and_macs() -> None:
    assert PURCHASE.session_key(K_CARD) == SK
    assert PURCHASE.mac1(SK) == MAC1
    assert PURCHASE.mac2(SK) == MAC2
    assert PURCHASE.tac(K_CARD_TAC) == TAC


def test_sam_computes_mac1_and_checks_mac2() -> None:
    sam = SoftwareSam(purchase_key=MASTER_KEY)
    assert sam.mac1(SERIAL, PURCHASE) == MAC1
    assert sam.check_mac2(SERIAL, PURCHASE, MAC2)
    assert not sam.check_mac2(SERIAL, PURCHASE, bytes.fromhex("C2C549C6"))
    other = SoftwareSam(purchase_key=MASTER_TAC_KEY)
    assert other.mac1(SERIAL, PURCHASE) != MAC1


def test_card_model_end_to_end() -> None:
    card = make_card(SERIAL, 1000, counter=COUNTER, random=lambda n: RANDOM[:n])
    sam = SoftwareSam(purchase_key=MASTER_KEY)
    card.power_on()

    info = apdu.parse_select(card.process(apdu.select()))
    assert info.serial == SERIAL and info.card_type == 0x01 and not info.blocked

    answer = card.process(apdu.initialize_for_purchase(AMOUNT, TERMINAL_ID))
    assert answer == bytes.fromhex("000003E8" "0007" "000000" "01" "02" "A1B2C3D4" "9000")
    init = apdu.parse_initialize(answer)
    assert (init.balance, init.counter, init.card_random) == (1000, COUNTER, RANDOM)

    mac1 = sam.mac1(SERIAL, PURCHASE)
    assert mac1 == MAC1
    command = apdu.debit_for_purchase(SEQ, DATE, TIME, mac1)
    assert command == bytes.fromhex("805401000F" "0000002A" "20261122" "083015" "0FE90061" "08")
    answer = card.process(command)
    assert answer == TAC + MAC2 + b"\x90\x00"
    proof = apdu.parse_debit(answer)
    assert (proof.mac2, proof.tac) == (MAC2, TAC)
    assert sam.check_mac2(SERIAL, PURCHASE, proof.mac2)

    assert card.balance == 1000 - AMOUNT and card.counter == COUNTER + 1
    [rec] = card.history
    assert (rec.counter_before, rec.balance_after, rec.amount, rec.terminal_seq) == (
        COUNTER, 1000 - AMOUNT, AMOUNT, SEQ)
    assert (rec.mac2, rec.tac, rec.date, rec.time) == (MAC2, TAC, DATE, TIME)

    # the card keeps the proof and the log record of this debit
    assert card.process(apdu.get_transaction_proof(COUNTER)) == MAC2 + TAC + b"\x90\x00"
    assert card.process(apdu.get_transaction_proof(COUNTER + 1)) == bytes.fromhex("9406")
    log = apdu.parse_record(card.process(apdu.read_record(1)))
    assert log is not None
    assert (log.counter_before, log.balance_after, log.amount, log.terminal_id,
            log.terminal_seq, log.date, log.time) == (
        COUNTER, 1000 - AMOUNT, AMOUNT, TERMINAL_ID, SEQ, DATE, TIME)
    assert apdu.parse_record(card.process(apdu.read_record(2))) is None


def test_card_refuses_a_wrong_mac1_and_changes_nothing() -> None:
    card = make_card(SERIAL, 1000, counter=COUNTER, random=lambda n: RANDOM[:n])
    card.process(apdu.select())
    card.process(apdu.initialize_for_purchase(AMOUNT, TERMINAL_ID))
    answer = card.process(apdu.debit_for_purchase(SEQ, DATE, TIME, bytes.fromhex("0FE90060")))
    assert answer == bytes.fromhex("9302")
    assert card.balance == 1000 and card.counter == COUNTER and card.history == []
    # the session is gone: even the right MAC1 is now refused for want of a session
    answer = card.process(apdu.debit_for_purchase(SEQ, DATE, TIME, MAC1))
    assert answer == bytes.fromhex("6985")
    assert card.history == []


def test_tap_processor_reproduces_the_vector(tmp_path: Path) -> None:
    """The gate, at 2026-11-22 08:30:15 local time with terminal seq 0x2A next, debits
    the vector's card and journals the vector's MAC2 and TAC."""
    clock = Clock(time.mktime((2026, 11, 22, 8, 30, 15, 0, 0, -1)))
    rig = Rig(tmp_path, config=gate_config(anti_passback_s=0, fares={1: AMOUNT}), clock=clock)
    try:
        filler = rig.card(1, 100_000)
        for _ in range(SEQ - 1):  # terminal seqs 1..41 go to another card
            assert rig.tap(filler).outcome is Outcome.ACCEPTED
        assert rig.journal.next_terminal_seq() == SEQ

        card = make_card(SERIAL, 1000, counter=COUNTER, random=lambda n: RANDOM[:n], clock=clock)
        result = rig.tap(card)
        assert result.outcome is Outcome.ACCEPTED
        assert (result.amount, result.balance) == (AMOUNT, 1000 - AMOUNT)
        [rec] = card.history
        assert (rec.mac2, rec.tac, rec.terminal_seq, rec.date, rec.time) == (
            MAC2, TAC, SEQ, DATE, TIME)
        assert rig.sent[-1] == apdu.debit_for_purchase(SEQ, DATE, TIME, MAC1)
        done = rig.journal.get(result.entry_id or 0)
        assert done is not None and (done.kind, done.state) == (KIND_DEBIT, COMPLETED)
        assert (done.mac2, done.tac, done.tx_date, done.tx_time) == (
            MAC2, TAC, "20261122", "083015")
        assert_ledger([filler, card], rig.journal)
    finally:
        rig.close()


def test_sam_checks_each_mac2_against_its_own_purchase() -> None:
    """The SAM keeps the session key of the purchase it made MAC1 for; a MAC2 of any
    other purchase or card (a recovery's) is still checked against that one's key."""
    sam = SoftwareSam(purchase_key=MASTER_KEY)
    other_serial = bytes.fromhex("8801000000009999")
    other = Purchase(card_random=RANDOM, counter=COUNTER + 1, terminal_seq=SEQ, amount=AMOUNT,
                     terminal_id=TERMINAL_ID, date=DATE, time=TIME)
    other_mac2 = other.mac2(other.session_key(card_key(MASTER_KEY, SERIAL)))
    assert sam.mac1(SERIAL, PURCHASE) == MAC1
    assert sam.check_mac2(SERIAL, other, other_mac2)
    assert not sam.check_mac2(SERIAL, other, MAC2)
    assert not sam.check_mac2(other_serial, PURCHASE, MAC2)
    assert sam.check_mac2(SERIAL, PURCHASE, MAC2)
    sam.close()
    assert sam.check_mac2(SERIAL, PURCHASE, MAC2) and sam.mac1(SERIAL, PURCHASE) == MAC1
