"""One tap through the tap processor on the simulator: every outcome, exact balances,
exact journal entries, the gate opened exactly when the passenger paid."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from daemon.outcome import Outcome
from daemon.tap import TapProcessor
from hal.card.model import Fault, FaultKind, VirtualPurse
from hal.gate.base import Signal
from protocol.entry import (
    COMPLETED,
    INTENT,
    KIND_DEBIT,
    KIND_PASS,
    KIND_REFUSAL,
    REFUSED,
)
from tests.cards import ADULT, CONCESSION, INS_DEBIT, INS_INITIALIZE, INS_SELECT, STAFF
from tests.configs import gate_config
from tests.disk import TinyDisk, fill_journal, unfill_journal
from tests.ledger import assert_ledger, journal_problems, states
from tests.rig import Rig

SELECT_INIT_DEBIT = [INS_SELECT, INS_INITIALIZE, INS_DEBIT]


def signals(rig: Rig) -> list[Signal | None]:
    return [e.signal for e in rig.gate.events if e.what == "show"]


def assert_nothing_debited(rig: Rig, card: VirtualPurse, balance: int) -> None:
    assert card.balance == balance
    assert card.history == []
    assert rig.gate.passages == 0
    assert INS_DEBIT not in rig.commands
    assert rig.journal.dangling_intents() == []


# --- the usual tap -------------------------------------------------------------------------
def test_normal_tap(rig: Rig) -> None:
    card = rig.card(1, 5000)
    result = rig.tap(card)

    assert result.outcome is Outcome.ACCEPTED and result.opened
    assert (result.serial, result.amount, result.balance) == (card.serial, 250, 4750)
    assert not result.torn
    assert card.balance == 4750 and card.counter == 1
    assert rig.commands == SELECT_INIT_DEBIT
    assert rig.gate.passages == 1
    assert signals(rig) == [Signal.ACCEPT]
    assert [e.text for e in rig.gate.events if e.what == "show"] == ["balance 47.50"]

    intent, done = rig.entries()
    assert (intent.kind, intent.state) == (KIND_DEBIT, INTENT)
    assert (done.kind, done.state, done.ref) == (KIND_DEBIT, COMPLETED, intent.id)
    assert result.entry_id == done.id
    assert (intent.card_serial, intent.amount, intent.balance_before, intent.card_counter) == (
        card.serial, 250, 5000, 0)
    assert intent.mac2 is None and intent.tac is None and intent.balance_after is None
    [rec] = card.history
    assert (done.balance_before, done.balance_after, done.card_counter) == (5000, 4750, 0)
    assert (done.terminal_seq, done.mac2, done.tac) == (rec.terminal_seq, rec.mac2, rec.tac)
    assert done.terminal_seq == intent.terminal_seq == 1
    assert (done.tx_date, done.tx_time) == (rec.date.hex(), rec.time.hex()) == (
        "20260504", "080000")
    assert done.is_recognised_debit and not intent.is_recognised_debit
    assert_ledger([card], rig.journal)
    assert journal_problems(rig.journal) == []


def test_taps_of_many_cards_use_increasing_terminal_seqs(rig: Rig) -> None:
    cards = [rig.card(n, 1000) for n in range(1, 6)]
    for card in cards:
        assert rig.tap(card).outcome is Outcome.ACCEPTED
    assert [c.history[0].terminal_seq for c in cards] == [1, 2, 3, 4, 5]
    assert rig.gate.passages == 5
    assert_ledger(cards, rig.journal)


def test_exact_balance_is_enough(rig: Rig) -> None:
    card = rig.card(1, 250)
    result = rig.tap(card)
    assert (result.outcome, result.balance, card.balance) == (Outcome.ACCEPTED, 0, 0)


# --- refusals ------------------------------------------------------------------------------
def test_insufficient_balance(rig: Rig) -> None:
    card = rig.card(1, 249)
    result = rig.tap(card)
    assert (result.outcome, result.reason) == (Outcome.REFUSED, "insufficient balance")
    assert (result.serial, result.amount) == (card.serial, 0)
    assert rig.commands == [INS_SELECT, INS_INITIALIZE]
    assert_nothing_debited(rig, card, 249)
    [refusal] = rig.entries()
    assert (refusal.kind, refusal.state, refusal.reason) == (
        KIND_REFUSAL, REFUSED, "insufficient balance")
    assert refusal.card_serial == card.serial and result.entry_id == refusal.id
    assert signals(rig) == [Signal.DENY]


def test_blocked(rig: Rig) -> None:
    card = rig.card(1, 5000, status=0x01)
    result = rig.tap(card)
    assert (result.outcome, result.reason) == (Outcome.REFUSED, "card blocked")
    assert rig.commands == [INS_SELECT]
    assert_nothing_debited(rig, card, 5000)
    assert states(rig.entries()) == ["refusal/refused"]


def test_expired(rig: Rig) -> None:
    today = rig.clock.today()
    card = rig.card(1, 5000, expiry=today - dt.timedelta(days=1))
    result = rig.tap(card)
    assert (result.outcome, result.reason) == (Outcome.REFUSED, "card expired")
    assert rig.commands == [INS_SELECT]
    assert_nothing_debited(rig, card, 5000)

    last_day = rig.card(2, 5000, expiry=today)  # the expiry is the last valid day
    assert rig.tap(last_day).outcome is Outcome.ACCEPTED
    assert last_day.balance == 4750


def test_card_refusing_initialize_is_refused(rig: Rig) -> None:
    # the card thinks it has expired (its clock is a day ahead) although its FCI passed
    card = rig.card(1, 5000, expiry=rig.clock.today())
    card.today = lambda: rig.clock.today() + dt.timedelta(days=1)
    result = rig.tap(card)
    assert (result.outcome, result.reason) == (Outcome.REFUSED, "card blocked or expired")
    assert rig.commands == [INS_SELECT, INS_INITIALIZE]
    assert_nothing_debited(rig, card, 5000)


def test_card_claiming_less_than_the_fare_is_refused(rig: Rig) -> None:
    card = rig.card(1, 5000)
    # a card that answers INITIALIZE 9000 with a balance below the fare (instead of 9401)
    card.inject(Fault(FaultKind.GARBAGE_BEFORE, ins=INS_INITIALIZE,
                      garbage=bytes.fromhex("00000064" "0000" "000000" "01" "02" "01020304"
                                            "9000")))
    result = rig.tap(card)
    assert (result.outcome, result.reason, result.balance) == (
        Outcome.REFUSED, "insufficient balance", 100)
    assert_nothing_debited(rig, card, 5000)


def test_not_a_tapgate_card(rig: Rig) -> None:
    card = rig.card(1, 5000)
    card.inject(Fault(FaultKind.GARBAGE_BEFORE, ins=INS_SELECT, garbage=bytes.fromhex("6A82")))
    result = rig.tap(card)
    assert (result.outcome, result.reason, result.serial) == (
        Outcome.REFUSED, "not a tapgate card", None)
    assert rig.commands == [INS_SELECT]
    assert_nothing_debited(rig, card, 5000)
    [refusal] = rig.entries()
    assert (refusal.kind, refusal.state, refusal.card_serial) == (KIND_REFUSAL, REFUSED, None)


# --- anti-passback -------------------------------------------------------------------------
def test_anti_passback(rig: Rig) -> None:
    card, other = rig.card(1, 5000), rig.card(2, 5000)
    assert rig.tap(card).outcome is Outcome.ACCEPTED

    again = rig.tap(card)
    assert (again.outcome, again.reason) == (Outcome.REFUSED, "already passed this gate")
    assert rig.commands == [INS_SELECT]
    assert rig.tap(other).outcome is Outcome.ACCEPTED  # another card is not held back

    rig.clock.advance(299.999)
    assert rig.tap(card).outcome is Outcome.REFUSED
    rig.clock.advance(0.001)
    assert rig.tap(card).outcome is Outcome.ACCEPTED
    assert card.balance == 5000 - 2 * 250 and len(card.history) == 2
    assert rig.gate.passages == 3
    assert_ledger([card, other], rig.journal)


def test_anti_passback_off(tmp_path: Path) -> None:
    rig = Rig(tmp_path, config=gate_config(anti_passback_s=0))
    try:
        card = rig.card(1, 5000)
        for _ in range(3):
            assert rig.tap(card).outcome is Outcome.ACCEPTED
        assert card.balance == 5000 - 3 * 250
        assert_ledger([card], rig.journal)
    finally:
        rig.close()


def test_free_pass_counts_for_anti_passback(rig: Rig) -> None:
    staff = rig.card(1, 0, card_type=STAFF)
    assert rig.tap(staff).outcome is Outcome.ACCEPTED
    assert rig.tap(staff).reason == "already passed this gate"
    rig.clock.advance(300)
    assert rig.tap(staff).outcome is Outcome.ACCEPTED
    assert rig.gate.passages == 2


# --- fares ---------------------------------------------------------------------------------
def test_fare_per_card_type(rig: Rig) -> None:
    adult, concession = rig.card(1, 1000, card_type=ADULT), rig.card(2, 1000, card_type=CONCESSION)
    assert rig.tap(adult).amount == 250
    assert rig.tap(concession).amount == 120
    assert (adult.balance, concession.balance) == (750, 880)
    assert [rec.amount for rec in concession.history] == [120]
    assert_ledger([adult, concession], rig.journal)


def test_free_pass(rig: Rig) -> None:
    staff = rig.card(1, 40, card_type=STAFF)
    result = rig.tap(staff)
    assert (result.outcome, result.reason, result.amount) == (Outcome.ACCEPTED, "free pass", 0)
    assert rig.commands == [INS_SELECT]  # no INITIALIZE, no DEBIT
    assert staff.balance == 40 and staff.history == [] and staff.counter == 0
    assert rig.gate.passages == 1
    [entry] = rig.entries()
    assert (entry.kind, entry.state, entry.amount, entry.card_serial) == (
        KIND_PASS, COMPLETED, 0, staff.serial)
    assert not entry.is_recognised_debit
    assert_ledger([staff], rig.journal)


def test_card_type_without_a_fare(tmp_path: Path) -> None:
    rig = Rig(tmp_path, config=gate_config(fares={ADULT: 250}))
    try:
        for n, card_type in enumerate((CONCESSION, STAFF, 0x07), start=1):
            card = rig.card(n, 5000, card_type=card_type)
            result = rig.tap(card)
            assert (result.outcome, result.reason) == (
                Outcome.REFUSED, "card type not accepted here")
            assert_nothing_debited(rig, card, 5000)
    finally:
        rig.close()


def test_new_fares_apply_from_the_next_tap(rig: Rig) -> None:
    card = rig.card(1, 1000)
    rig.set_config(gate_config(fares={ADULT: 300}, anti_passback_s=0))
    assert rig.tap(card).amount == 300
    assert card.balance == 700


# --- garbage before the debit --------------------------------------------------------------
GARBAGE = [
    b"",
    b"\x6F",
    b"\x90\x00",
    b"\x6F\x00",
    bytes(15) + b"\x90\x00",
    bytes.fromhex("6D00"),
]


@pytest.mark.parametrize("kind", [FaultKind.GARBAGE_BEFORE, FaultKind.GARBAGE_AFTER])
@pytest.mark.parametrize("ins", [INS_SELECT, INS_INITIALIZE])
@pytest.mark.parametrize("garbage", GARBAGE, ids=lambda g: g.hex() or "empty")
def test_garbage_before_debit(rig: Rig, kind: FaultKind, ins: int, garbage: bytes) -> None:
    card = rig.card(1, 5000)
    card.inject(Fault(kind, ins=ins, garbage=garbage))
    result = rig.tap(card)
    assert result.outcome is Outcome.TAP_AGAIN
    assert rig.commands == ([INS_SELECT] if ins == INS_SELECT else [INS_SELECT, INS_INITIALIZE])
    assert_nothing_debited(rig, card, 5000)
    assert rig.entries() == []  # nothing to journal: nothing can have happened
    assert signals(rig) == [Signal.TAP_AGAIN]

    again = rig.tap(card)
    assert again.outcome is Outcome.ACCEPTED
    assert card.balance == 4750 and len(card.history) == 1
    assert rig.gate.passages == 1
    assert_ledger([card], rig.journal)
    assert journal_problems(rig.journal) == []


@pytest.mark.parametrize("ins", [INS_SELECT, INS_INITIALIZE])
@pytest.mark.parametrize("kind", [FaultKind.TEAR_BEFORE, FaultKind.TEAR_AFTER])
def test_card_leaving_before_debit(rig: Rig, ins: int, kind: FaultKind) -> None:
    card = rig.card(1, 5000)
    card.inject(Fault(kind, ins=ins))
    result = rig.tap(card)
    assert (result.outcome, result.torn) == (Outcome.TAP_AGAIN, False)
    assert_nothing_debited(rig, card, 5000)
    assert rig.entries() == []
    assert rig.tap(card).outcome is Outcome.ACCEPTED
    assert card.balance == 4750
    assert_ledger([card], rig.journal)


# --- a full journal ------------------------------------------------------------------------
def test_journal_full_puts_the_gate_out_of_service(rig: Rig) -> None:
    card = rig.card(1, 5000)
    assert rig.tap(rig.card(2, 5000)).outcome is Outcome.ACCEPTED
    fill_journal(rig.journal, card.serial)
    count = rig.journal.count()

    for _ in range(2):
        result = rig.tap(card)
        assert (result.outcome, result.reason) == (Outcome.OUT_OF_SERVICE, "journal full")
        assert rig.commands == [INS_SELECT, INS_INITIALIZE]  # no DEBIT FOR PURCHASE
        assert card.balance == 5000 and card.history == []
        assert rig.journal.count() == count
        assert signals(rig)[-1] is Signal.OUT_OF_SERVICE
    assert rig.gate.passages == 1
    assert rig.journal.verify().ok

    unfill_journal(rig.journal)
    result = rig.tap(card)
    assert result.outcome is Outcome.ACCEPTED and card.balance == 4750
    assert states(rig.new_entries(count)) == ["debit/intent", "debit/completed"]
    assert journal_problems(rig.journal) == []
    assert_ledger([card], rig.journal, all_cards=False)


def test_journal_full_refusing_a_foreign_card(rig: Rig) -> None:
    card = rig.card(1, 5000)
    fill_journal(rig.journal, None)
    card.inject(Fault(FaultKind.GARBAGE_BEFORE, ins=INS_SELECT, garbage=bytes.fromhex("6A82")))
    result = rig.tap(card)  # the refusal cannot be journalled: out of service, no exception
    assert result.outcome is Outcome.OUT_OF_SERVICE


def test_disk_full_puts_the_gate_out_of_service(tmp_path: Path, disk: TinyDisk) -> None:
    rig = Rig(disk.path)
    try:
        card = rig.card(1, 5000)
        assert rig.tap(rig.card(2, 5000)).outcome is Outcome.ACCEPTED
        count = rig.journal.count()
        disk.fill()
        result = rig.tap(card)
        assert (result.outcome, result.reason) == (Outcome.OUT_OF_SERVICE, "journal full")
        assert rig.commands == [INS_SELECT, INS_INITIALIZE]
        assert card.balance == 5000 and card.history == []
        assert rig.journal.count() == count

        disk.free()
        assert rig.journal.verify().ok
        assert rig.tap(card).outcome is Outcome.ACCEPTED
        assert card.balance == 4750
        assert journal_problems(rig.journal) == []
        assert rig.restart() == []
        assert rig.journal.count() == count + 2
        assert_ledger([card], rig.journal, all_cards=False)
    finally:
        rig.close()


def test_disk_full_after_the_card_debited(tmp_path: Path, disk: TinyDisk) -> None:
    """The journal fails between the intent and the completion: the passenger went
    through; the completion must still reach the journal, and the card is not charged
    again for the same passage."""
    rig = Rig(disk.path)
    try:
        card = rig.card(1, 5000)
        result = rig.tap(card, after={INS_DEBIT: disk.fill})
        assert result.outcome is Outcome.OUT_OF_SERVICE
        assert card.balance == 4750 and rig.gate.passages == 1

        # out of service while the disk is full: no card is debited
        other = rig.card(2, 5000)
        assert rig.tap(other).outcome is Outcome.OUT_OF_SERVICE
        assert other.history == []

        disk.free()
        again = rig.tap(card)  # within the anti-passback window of the first passage
        assert (again.outcome, again.reason) == (Outcome.REFUSED, "already passed this gate")
        assert card.balance == 4750 and len(card.history) == 1
        assert_ledger([card, other], rig.journal)
        assert journal_problems(rig.journal) == []
    finally:
        rig.close()


def test_below_the_disk_reserve_no_debit_starts_and_service_resumes(
        tmp_path: Path, disk: TinyDisk) -> None:
    """With less free disk than journal.reserve_bytes the card is not even selected;
    when space comes back the gate takes debits again by itself."""
    rig = Rig(disk.path)
    try:
        rig.processor = TapProcessor(gate_config=rig.config, journal=rig.journal, sam=rig.sam,
                                     gate=rig.gate, clock=rig.clock,
                                     monotonic=rig.clock.monotonic, reserve_bytes=256 * 1024)
        card = rig.card(1, 5000)
        assert rig.tap(card).outcome is Outcome.ACCEPTED
        disk.fill()
        result = rig.tap(card)
        assert (result.outcome, result.reason) == (Outcome.OUT_OF_SERVICE, "journal disk full")
        assert rig.commands == []  # the card was not touched
        assert rig.processor.out_of_service == "journal disk full"
        assert signals(rig)[-1] is Signal.OUT_OF_SERVICE
        disk.free()
        rig.clock.advance(3600)
        result = rig.tap(card)
        assert result.outcome is Outcome.ACCEPTED and card.balance == 4500
        assert rig.processor.out_of_service == ""
        assert rig.journal.verify().ok
    finally:
        rig.close()


def test_a_demo_card_keeps_a_bounded_history_and_a_whole_log(rig: Rig) -> None:
    card = rig.card(1, 100_000)
    card.history_limit = 12
    for _ in range(15):
        assert rig.tap(card).outcome is Outcome.ACCEPTED
        rig.clock.advance(3600)
    assert len(card.history) == 12 and card.counter == 15
    assert [r.counter_before for r in card.log] == list(range(14, 4, -1))


# --- what the passenger waits for --------------------------------------------------------
def test_no_garbage_collection_starts_inside_a_tap(rig: Rig) -> None:
    """A collection is a millisecond or more: none while the passenger waits, and the
    collector is back on once the tap is over."""
    import gc

    seen: list[bool] = []
    opened = rig.gate.open_for_passage

    def open_for_passage() -> None:
        seen.append(gc.isenabled())
        opened()

    rig.gate.open_for_passage = open_for_passage  # type: ignore[method-assign]
    assert gc.isenabled()
    assert rig.tap(rig.card(1, 5000)).outcome is Outcome.ACCEPTED
    assert seen == [False] and gc.isenabled()
    gc.disable()  # a program that runs without the collector keeps it off
    try:
        assert rig.tap(rig.card(2, 5000)).outcome is Outcome.ACCEPTED
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_card_gets_the_date_and_time_as_bcd() -> None:
    import random
    import time

    from daemon.tap import bcd

    rnd = random.Random(7)
    for _ in range(2000):
        stamp = time.localtime(rnd.uniform(946684800, 4102444799))  # 2000..2099
        assert bcd(stamp.tm_year // 100, stamp.tm_year % 100, stamp.tm_mon,
                   stamp.tm_mday) == bytes.fromhex(time.strftime("%Y%m%d", stamp))
        assert bcd(stamp.tm_hour, stamp.tm_min, stamp.tm_sec) == bytes.fromhex(
            time.strftime("%H%M%S", stamp))
