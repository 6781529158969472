"""Torn debits: a card leaving (or answering garbage) at every APDU, then presented
again. Whatever happened, the card is debited exactly once for the passage, the journal
says so, and the TAC the journal keeps is the card's."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from daemon.outcome import Outcome
from hal.card.model import Fault, FaultKind, VirtualPurse
from protocol.entry import (
    INTENT,
    KIND_DEBIT,
    KIND_RECOVERY,
    NOT_DEBITED,
    RECOVERED,
    TORN,
    UNCERTAIN,
    UNPROVEN,
)
from tests.cards import (
    INS_DEBIT,
    INS_INITIALIZE,
    INS_PROOF,
    INS_READ_RECORD,
    INS_SELECT,
    OTHER_TERMINAL_ID,
)
from tests.configs import gate_config
from tests.disk import TinyDisk
from tests.ledger import assert_ledger, journal_problems, ledger, states
from tests.rig import ProcessDied, Rig, begin_debit, die

TEARS = [FaultKind.TEAR_BEFORE, FaultKind.TEAR_AFTER]
RECOVER = [INS_SELECT, INS_READ_RECORD, INS_PROOF]  # what a recovery of a debited card sends


def debited(kind: FaultKind) -> bool:
    """Whether a fault of ``kind`` at DEBIT FOR PURCHASE leaves the card debited."""
    return kind in (FaultKind.TEAR_AFTER, FaultKind.GARBAGE_AFTER)


def tear_debit(rig: Rig, card: VirtualPurse, kind: FaultKind, garbage: bytes = b"\x6F") -> None:
    """One tap whose DEBIT FOR PURCHASE exchange fails with ``kind``."""
    before = card.balance
    card.inject(Fault(kind, ins=INS_DEBIT, garbage=garbage))
    result = rig.tap(card)
    assert result.torn and result.outcome in (Outcome.TAP_AGAIN, Outcome.REFUSED)
    assert not result.opened
    assert rig.commands == [INS_SELECT, INS_INITIALIZE, INS_DEBIT][-len(rig.commands):]
    assert card.balance == (before - 250 if debited(kind) else before)
    torn = rig.journal.get(result.entry_id or 0)
    assert torn is not None and (torn.kind, torn.state) == (KIND_DEBIT, TORN)
    assert rig.journal.pending_recoveries(card.serial)[-1] == torn


def settle(rig: Rig, card: VirtualPurse, was_debited: bool, balance: int) -> None:
    """Present the card again after a tear; it must end up debited exactly once."""
    passages = rig.gate.passages
    count = rig.journal.count()
    result = rig.tap(card)
    assert result.opened
    assert (result.amount, result.balance) == (250, balance - 250)
    assert card.balance == balance - 250
    assert rig.gate.passages == passages + 1
    new = rig.new_entries(count)
    if was_debited:
        assert result.outcome is Outcome.RECOVERED
        assert rig.commands == RECOVER
        assert states(new) == ["recovery/recovered"]
        recovered = new[0]
        assert result.entry_id == recovered.id
        assert (recovered.mac2, recovered.tac) == (card.history[-1].mac2, card.history[-1].tac)
        assert recovered.balance_after == balance - 250
    else:
        assert result.outcome is Outcome.ACCEPTED
        assert INS_DEBIT in rig.commands and INS_PROOF not in rig.commands
        assert states(new) == ["recovery/not_debited", "debit/intent", "debit/completed"]
    assert rig.journal.pending_recoveries(card.serial) == []


# --- a tear at every command of the debit flow --------------------------------------------
@pytest.mark.parametrize("kind", TEARS)
@pytest.mark.parametrize("ins", [INS_SELECT, INS_INITIALIZE])
def test_tear_before_the_intent_changes_nothing(rig: Rig, ins: int, kind: FaultKind) -> None:
    card = rig.card(1, 5000)
    card.inject(Fault(kind, ins=ins))
    result = rig.tap(card)
    assert (result.outcome, result.torn) == (Outcome.TAP_AGAIN, False)
    assert card.history == [] and rig.entries() == []
    result = rig.tap(card)
    assert result.outcome is Outcome.ACCEPTED and card.balance == 4750
    assert_ledger([card], rig.journal)
    assert journal_problems(rig.journal) == []


@pytest.mark.parametrize("kind", TEARS)
def test_tear_at_debit(rig: Rig, kind: FaultKind) -> None:
    card = rig.card(1, 5000)
    tear_debit(rig, card, kind)
    assert states(rig.entries()) == ["debit/intent", "debit/torn"]
    assert rig.gate.passages == 0
    settle(rig, card, debited(kind), 5000)
    assert len(card.history) == 1
    assert_ledger([card], rig.journal)
    assert journal_problems(rig.journal) == []


@pytest.mark.parametrize("garbage, why", [
    (b"\x6F", "one byte"),
    (b"", "nothing"),
    (bytes(8) + b"\x6F\x00", "a bad status word"),
    (bytes(9) + b"\x90\x00", "9 data bytes"),
    (bytes.fromhex("4F40885B" "00000000" "9000"), "a wrong MAC2"),
    (bytes.fromhex("9302"), "MAC1 wrong"),
    (bytes.fromhex("6985"), "no session"),
])
@pytest.mark.parametrize("kind", [FaultKind.GARBAGE_BEFORE, FaultKind.GARBAGE_AFTER])
def test_garbage_at_debit(rig: Rig, kind: FaultKind, garbage: bytes, why: str) -> None:
    card = rig.card(1, 5000)
    tear_debit(rig, card, kind, garbage)
    settle(rig, card, debited(kind), 5000)
    assert_ledger([card], rig.journal)
    assert journal_problems(rig.journal) == []


def test_wrong_mac2_is_a_tear_and_the_real_one_is_recovered(rig: Rig) -> None:
    card = rig.card(1, 5000)
    card.inject(Fault(FaultKind.GARBAGE_AFTER, ins=INS_DEBIT,
                      garbage=bytes.fromhex("11223344" "55667788" "9000")))
    result = rig.tap(card)
    assert (result.outcome, result.reason, result.torn) == (
        Outcome.TAP_AGAIN, "MAC2 failed the SAM check", True)
    [rec] = card.history
    assert rig.gate.passages == 0
    result = rig.tap(card)
    assert result.outcome is Outcome.RECOVERED
    recovered = rig.journal.get(result.entry_id or 0)
    assert recovered is not None
    assert (recovered.mac2, recovered.tac) == (rec.mac2, rec.tac)
    assert recovered.tac != bytes.fromhex("11223344")
    assert_ledger([card], rig.journal)


# --- tears during the recovery ------------------------------------------------------------
@pytest.mark.parametrize("fault", [*TEARS, FaultKind.GARBAGE_BEFORE, FaultKind.GARBAGE_AFTER])
@pytest.mark.parametrize("ins", [INS_SELECT, INS_READ_RECORD, INS_PROOF])
@pytest.mark.parametrize("first", TEARS)
def test_tear_during_recovery(rig: Rig, first: FaultKind, ins: int, fault: FaultKind) -> None:
    card = rig.card(1, 5000)
    tear_debit(rig, card, first)
    [torn] = rig.journal.pending_recoveries()
    count = rig.journal.count()

    card.inject(Fault(fault, ins=ins))
    result = rig.tap(card)
    if ins == INS_PROOF and not debited(first):
        # a card that did not debit is never asked for a proof: the fault did not fire
        assert card.faults
        card.faults.clear()
        assert result.outcome is Outcome.ACCEPTED
        assert_ledger([card], rig.journal)
        return
    assert result.outcome is Outcome.TAP_AGAIN and not result.opened
    assert rig.journal.count() == count  # nothing settled, nothing debited
    assert rig.journal.pending_recoveries() == [torn]
    assert len(card.history) == (1 if debited(first) else 0)

    settle(rig, card, debited(first), 5000)
    assert_ledger([card], rig.journal)
    assert journal_problems(rig.journal) == []


# --- pending recoveries live in the journal -----------------------------------------------
@pytest.mark.parametrize("kind", TEARS)
def test_pending_recovery_survives_other_taps_and_restarts(rig: Rig, kind: FaultKind) -> None:
    card = rig.card(1, 5000)
    others = [rig.card(n, 5000) for n in range(2, 6)]
    tear_debit(rig, card, kind)
    for other in others:
        assert rig.tap(other).outcome is Outcome.ACCEPTED
    assert rig.restart() == []
    assert len(rig.journal.pending_recoveries()) == 1
    rig.clock.advance(3600)
    for other in others:
        assert rig.tap(other).outcome is Outcome.ACCEPTED
    assert rig.restart() == []

    settle(rig, card, debited(kind), 5000)
    assert_ledger([card, *others], rig.journal)
    assert journal_problems(rig.journal) == []


def test_several_cards_pending_at_once(rig: Rig) -> None:
    kinds = [FaultKind.TEAR_BEFORE, FaultKind.TEAR_AFTER, FaultKind.GARBAGE_AFTER,
             FaultKind.GARBAGE_BEFORE, FaultKind.TEAR_AFTER, FaultKind.TEAR_BEFORE]
    cards = [rig.card(n, 1000 + n) for n in range(1, len(kinds) + 1)]
    for card, kind in zip(cards, kinds, strict=True):
        tear_debit(rig, card, kind)
    assert [t.card_serial for t in rig.journal.pending_recoveries()] == [c.serial for c in cards]
    assert rig.restart() == []
    for card, kind in reversed(list(zip(cards, kinds, strict=True))):
        settle(rig, card, debited(kind), 1000 + int.from_bytes(card.serial[-4:], "big"))
    assert rig.journal.pending_recoveries() == []
    for card in cards:  # and nothing more to settle: anti-passback holds them back
        assert rig.tap(card).reason == "already passed this gate"
    assert all(len(c.history) == 1 for c in cards)
    assert_ledger(cards, rig.journal)
    assert journal_problems(rig.journal) == []


def test_a_new_tear_after_a_not_debited_one(rig: Rig) -> None:
    card = rig.card(1, 5000)
    tear_debit(rig, card, FaultKind.TEAR_BEFORE)
    card.inject(Fault(FaultKind.TEAR_AFTER, ins=INS_DEBIT))  # the retry tears too
    result = rig.tap(card)
    assert result.torn and card.balance == 4750
    assert states(rig.entries()) == [
        "debit/intent", "debit/torn", "recovery/not_debited", "debit/intent", "debit/torn"]
    settle(rig, card, True, 5000)
    assert len(card.history) == 1
    assert_ledger([card], rig.journal)


def test_recovered_card_is_held_by_anti_passback(rig: Rig) -> None:
    card = rig.card(1, 5000)
    tear_debit(rig, card, FaultKind.TEAR_AFTER)
    settle(rig, card, True, 5000)
    assert rig.tap(card).reason == "already passed this gate"
    rig.clock.advance(300)
    assert rig.tap(card).outcome is Outcome.ACCEPTED
    assert card.balance == 4500
    assert_ledger([card], rig.journal)


def test_a_debited_card_is_let_through_even_if_blocked_since(rig: Rig) -> None:
    card = rig.card(1, 5000)
    tear_debit(rig, card, FaultKind.TEAR_AFTER)
    card.status = 0x01
    settle(rig, card, True, 5000)
    assert_ledger([card], rig.journal)


def test_a_card_that_did_not_debit_and_is_blocked_since_is_refused(rig: Rig) -> None:
    card = rig.card(1, 5000)
    tear_debit(rig, card, FaultKind.TEAR_BEFORE)
    card.status = 0x01
    result = rig.tap(card)
    assert (result.outcome, result.reason) == (Outcome.REFUSED, "card blocked")
    assert states(rig.entries()[-2:]) == ["recovery/not_debited", "refusal/refused"]
    assert card.history == [] and rig.journal.pending_recoveries() == []


# --- the card used elsewhere in between ----------------------------------------------------
def test_card_debited_at_another_gate_after_a_tear_before(tmp_path: Path) -> None:
    here, there = Rig(tmp_path / "here"), Rig(tmp_path / "there",
                                              config=gate_config(terminal_id=OTHER_TERMINAL_ID))
    try:
        card = here.card(1, 5000)
        tear_debit(here, card, FaultKind.TEAR_BEFORE)
        assert there.tap(card).outcome is Outcome.ACCEPTED  # uses the torn session's counter
        result = here.tap(card)
        assert result.outcome is Outcome.ACCEPTED
        not_debited = here.entries()[2]
        assert (not_debited.kind, not_debited.state) == (KIND_RECOVERY, NOT_DEBITED)
        assert "used by another transaction" in (not_debited.reason or "")
        assert card.balance == 4500
        assert_ledger([card], here.journal)
        assert_ledger([card], there.journal, terminal_id=OTHER_TERMINAL_ID)
    finally:
        here.close()
        there.close()


def test_card_debited_elsewhere_after_a_tear_after(tmp_path: Path) -> None:
    """The card paid this gate, then another: the proof of this gate's debit is gone
    (the card keeps only its latest), so the debit is found but unproven, the card is
    not charged again, and the passage counts for anti-passback like any other."""
    here, there = Rig(tmp_path / "here"), Rig(tmp_path / "there",
                                              config=gate_config(terminal_id=OTHER_TERMINAL_ID))
    try:
        card = here.card(1, 5000)
        tear_debit(here, card, FaultKind.TEAR_AFTER)
        assert there.tap(card).outcome is Outcome.ACCEPTED
        result = here.tap(card)
        assert (result.outcome, result.amount) == (Outcome.RECOVERED, 250)
        assert INS_DEBIT not in here.commands
        unproven = here.entries()[-1]
        assert (unproven.kind, unproven.state) == (KIND_RECOVERY, UNPROVEN)
        assert unproven.balance_after == 4750 and result.entry_id == unproven.id
        assert "proof overwritten" in (unproven.reason or "")
        assert card.balance == 4500 and len(card.history) == 2
        # the back office settles it without a TAC: the journal holds it as unproven
        report = ledger([card], here.journal)
        assert report.problems == [f"debited on the card, missing from the journal: "
                                   f"{report.card[0]}"]
        # a passage: the card handed back at once does not open the gate a second time
        again = here.tap(card)
        assert (again.outcome, again.reason) == (Outcome.REFUSED, "already passed this gate")
        assert card.balance == 4500 and here.gate.passages == 1
    finally:
        here.close()
        there.close()


# --- the card's counter wraps -------------------------------------------------------------
def elsewhere(rig: Rig, card: VirtualPurse, times: int) -> None:
    """``times`` ordinary debits at another gate, far enough apart for its anti-passback."""
    for _ in range(times):
        rig.clock.advance(600)
        assert rig.tap(card).outcome is Outcome.ACCEPTED


def test_a_debit_found_past_the_counter_wrap(tmp_path: Path) -> None:
    """The torn session ran at counter 65533 and the card debited; three debits elsewhere
    took the counter past 65535 to 1. The card's log is read on the circle: records 1-3
    (counters 0, 65535, 65534) are newer, record 4 is this gate's debit: no second
    charge."""
    here, there = Rig(tmp_path / "here"), Rig(tmp_path / "there",
                                              config=gate_config(terminal_id=OTHER_TERMINAL_ID))
    try:
        card = here.card(1, 5000, counter=65533)
        tear_debit(here, card, FaultKind.TEAR_AFTER)
        elsewhere(there, card, 3)
        assert card.counter == 1 and card.balance == 4000
        result = here.tap(card)
        assert (result.outcome, result.amount) == (Outcome.RECOVERED, 250)
        assert INS_DEBIT not in here.commands
        closing = here.entries()[-1]
        assert (closing.state, closing.reason) == (
            UNPROVEN, "debited per card log record 4; proof overwritten")
        assert card.balance == 4000 and len(card.history) == 4
    finally:
        here.close()
        there.close()


def test_no_debit_found_past_the_counter_wrap(tmp_path: Path) -> None:
    """Ten debits elsewhere took the counter from 65526 to 0; the torn session at counter
    0 never debited. Record 1 (counter 65535) is older than 0 on the circle: not
    debited, and the tap debits once, instead of walking the whole log and refusing the
    card as faulty."""
    here, there = Rig(tmp_path / "here"), Rig(tmp_path / "there",
                                              config=gate_config(terminal_id=OTHER_TERMINAL_ID))
    try:
        card = here.card(1, 5000, counter=65526)
        elsewhere(there, card, 10)
        assert card.counter == 0 and card.balance == 2500
        tear_debit(here, card, FaultKind.TEAR_BEFORE)
        result = here.tap(card)
        assert (result.outcome, result.amount) == (Outcome.ACCEPTED, 250)
        assert states(here.entries()[-3:]) == [
            "recovery/not_debited", "debit/intent", "debit/completed"]
        assert card.balance == 2250 and card.counter == 1
        assert_ledger([card], here.journal)
    finally:
        here.close()
        there.close()


# --- the completion and the gate -----------------------------------------------------------
def test_the_completion_is_committed_before_the_gate_opens(rig: Rig) -> None:
    """A process killed the moment the gate opens leaves the completion on record (in the
    WAL, read here through a connection of its own), not a dangling intent that the
    card's next presentation would recover as a tear and let through for free."""
    seen: list[list[tuple[str, str]]] = []

    def on_open() -> None:
        with sqlite3.connect(rig.journal_path) as other:
            seen.append(other.execute("SELECT kind, state FROM entry ORDER BY id").fetchall())

    opens = rig.gate.open_for_passage
    rig.gate.open_for_passage = lambda: (on_open(), opens())[1]  # type: ignore[method-assign]
    card = rig.card(1, 5000)
    assert rig.tap(card).outcome is Outcome.ACCEPTED
    assert seen == [[("debit", "intent"), ("debit", "completed")]]


def test_killed_as_the_gate_opens_the_card_is_not_let_through_again(rig: Rig) -> None:
    card = rig.card(1, 5000)

    def killed() -> None:
        raise ProcessDied("killed as the gate opened")

    opens = rig.gate.open_for_passage
    rig.gate.open_for_passage = killed  # type: ignore[method-assign]
    with pytest.raises(ProcessDied):
        rig.tap(card)
    rig.gate.open_for_passage = opens  # type: ignore[method-assign]
    assert rig.restart() == []  # nothing dangling: the completion was written
    rig.clock.advance(3 * 3600)  # a return trip: within the recovery window of a tear
    result = rig.tap(card)
    assert (result.outcome, result.amount) == (Outcome.ACCEPTED, 250)
    assert card.balance == 4500 and len(card.history) == 2
    assert_ledger([card], rig.journal)


# --- the process dies mid-debit ------------------------------------------------------------
@pytest.mark.parametrize("send_debit", [False, True])
def test_dangling_intent_becomes_a_tear(rig: Rig, send_debit: bool) -> None:
    card, other = rig.card(1, 5000), rig.card(2, 5000)
    assert rig.tap(other).outcome is Outcome.ACCEPTED
    intent = begin_debit(rig, card, send_debit=send_debit)
    assert (intent.kind, intent.state) == (KIND_DEBIT, INTENT)
    assert card.balance == (4750 if send_debit else 5000)

    [torn] = rig.restart()
    assert (torn.kind, torn.state, torn.ref) == (KIND_DEBIT, TORN, intent.id)
    assert torn.reason == "interrupted: no outcome recorded"
    assert (torn.card_counter, torn.terminal_seq, torn.card_random) == (
        intent.card_counter, intent.terminal_seq, intent.card_random)
    assert rig.journal.dangling_intents() == []
    assert rig.restart() == []  # settled once only

    settle(rig, card, send_debit, 5000)
    assert len(card.history) == 1
    assert_ledger([card, other], rig.journal)
    assert journal_problems(rig.journal) == []


@pytest.mark.parametrize("where", ["before", "after"])
def test_process_dies_at_debit(rig: Rig, where: str) -> None:
    card = rig.card(1, 5000)
    with pytest.raises(ProcessDied):
        rig.tap(card, **{where: {INS_DEBIT: die}})
    assert states(rig.entries()) == ["debit/intent"]
    assert len(rig.restart()) == 1
    settle(rig, card, where == "after", 5000)
    assert_ledger([card], rig.journal)
    assert journal_problems(rig.journal) == []


# --- the journal fails after the card debited ----------------------------------------------
def test_disk_full_when_the_tear_is_journalled(tmp_path: Path, disk: TinyDisk) -> None:
    rig = Rig(disk.path)
    try:
        card = rig.card(1, 5000)
        card.inject(Fault(FaultKind.TEAR_AFTER, ins=INS_DEBIT))
        result = rig.tap(card, after={INS_DEBIT: disk.fill})
        assert result.outcome is Outcome.OUT_OF_SERVICE
        assert card.balance == 4750 and rig.gate.passages == 0
        assert states(rig.entries()) == ["debit/intent"]
        disk.free()
        result = rig.tap(card)  # the tear is journalled first, then recovered
        assert (result.outcome, result.amount, result.balance) == (Outcome.RECOVERED, 250, 4750)
        assert states(rig.entries()) == ["debit/intent", "debit/torn", "recovery/recovered"]
        assert rig.commands == RECOVER and rig.gate.passages == 1
        assert len(card.history) == 1
        assert_ledger([card], rig.journal)
        assert journal_problems(rig.journal) == []
    finally:
        rig.close()


def test_restart_before_the_completion_could_be_journalled(tmp_path: Path,
                                                            disk: TinyDisk) -> None:
    rig = Rig(disk.path)
    try:
        card = rig.card(1, 5000)
        result = rig.tap(card, after={INS_DEBIT: disk.fill})
        assert result.outcome is Outcome.OUT_OF_SERVICE and rig.gate.passages == 1
        disk.free()
        [torn] = rig.restart()  # the completion held in memory is lost
        assert torn.reason == "interrupted: no outcome recorded"
        rig.clock.advance(300)
        settle(rig, card, True, 5000)
        assert len(card.history) == 1
        assert_ledger([card], rig.journal)
        assert journal_problems(rig.journal) == []
    finally:
        rig.close()


# --- the recovery window -------------------------------------------------------------------
@pytest.mark.parametrize("kind", TEARS)
def test_recovery_window_expiry(rig: Rig, kind: FaultKind) -> None:
    card = rig.card(1, 5000)
    tear_debit(rig, card, kind)
    [torn] = rig.journal.pending_recoveries()

    rig.clock.advance(86400 - 0.001)
    assert rig.processor.expire_recoveries() == []
    rig.clock.advance(0.001)
    [uncertain] = rig.processor.expire_recoveries()
    assert (uncertain.kind, uncertain.state, uncertain.ref) == (KIND_RECOVERY, UNCERTAIN, torn.id)
    assert uncertain.reason == "not recovered within 86400 s"
    assert rig.processor.expire_recoveries() == []
    assert rig.journal.pending_recoveries() == []

    # an uncertain tear is not recovered later: the next tap is a new, ordinary debit
    result = rig.tap(card)
    assert result.outcome is Outcome.ACCEPTED
    assert rig.commands == [INS_SELECT, INS_INITIALIZE, INS_DEBIT]
    assert not any(e.state == RECOVERED for e in rig.entries())
    report = ledger([card], rig.journal)
    if debited(kind):  # the tear's debit is left to the back office, as uncertain
        assert card.balance == 4500
        assert report.problems == [f"debited on the card, missing from the journal: "
                                   f"{report.card[0]}"]
        assert (report.card[0].counter_before, report.card[0].terminal_seq) == (
            uncertain.card_counter, uncertain.terminal_seq)
    else:
        assert card.balance == 4750 and report.problems == []
    assert journal_problems(rig.journal) == []


def test_expiry_leaves_young_tears_alone(rig: Rig) -> None:
    old, young = rig.card(1, 5000), rig.card(2, 5000)
    tear_debit(rig, old, FaultKind.TEAR_AFTER)
    rig.clock.advance(50000)
    tear_debit(rig, young, FaultKind.TEAR_AFTER)
    rig.clock.advance(40000)
    [expired] = rig.processor.expire_recoveries()
    assert expired.card_serial == old.serial
    assert [t.card_serial for t in rig.journal.pending_recoveries()] == [young.serial]
    settle(rig, young, True, 5000)
