"""The wall clock set back or forward (NTP after boot, an operator, a bad RTC): every
window the gate keeps runs on the monotonic clock within a run, so a jump neither
stretches nor cuts it. Wall time is only what is recorded (created_ms, card dates).

The rig's clock moves by hand: ``advance`` is time passing (both clocks), ``set_wall``
is the wall clock being set (the monotonic one stays).
"""

from __future__ import annotations

import pytest

from daemon.outcome import Outcome
from hal.card.model import Fault, FaultKind, VirtualPurse
from protocol.entry import KIND_RECOVERY, RECOVERED, UNCERTAIN
from tests.cards import INS_DEBIT
from tests.ledger import assert_ledger
from tests.rig import Rig

WINDOW_S = 300.0  # the rig's anti-passback window (tests.configs.gate_config)
RECOVERY_S = 86400.0
HOUR = 3600.0


def passes(rig: Rig, card: VirtualPurse) -> bool:
    result = rig.tap(card)
    assert result.outcome in (Outcome.ACCEPTED, Outcome.REFUSED), result
    return result.outcome is Outcome.ACCEPTED


@pytest.mark.parametrize("jump_s", [-10.0, -HOUR, -30 * 86400.0])
def test_a_clock_set_back_holds_a_card_no_longer_than_the_window(rig: Rig, jump_s: float) -> None:
    card = rig.card(1)
    assert rig.tap(card).outcome is Outcome.ACCEPTED
    rig.clock.set_wall(jump_s)
    assert rig.tap(card).reason == "already passed this gate"  # still within the window
    rig.clock.advance(WINDOW_S + 1)
    assert rig.tap(card).outcome is Outcome.ACCEPTED
    # and every other card goes through meanwhile, as before the jump
    others = [rig.card(n) for n in range(2, 12)]
    assert all(passes(rig, other) for other in others)
    assert_ledger([card, *others], rig.entries())


@pytest.mark.parametrize("jump_s", [10.0, HOUR, 30 * 86400.0])
def test_a_clock_set_forward_still_holds_a_card_for_the_window(rig: Rig, jump_s: float) -> None:
    """A card let through again seconds later because the wall clock moved would be a
    second passage on one fare."""
    card = rig.card(1)
    assert rig.tap(card).outcome is Outcome.ACCEPTED
    rig.clock.advance(5)
    rig.clock.set_wall(jump_s)
    assert rig.tap(card).reason == "already passed this gate"
    rig.clock.advance(WINDOW_S)
    assert rig.tap(card).outcome is Outcome.ACCEPTED


def test_a_passage_from_before_the_run_counts_by_the_wall_clock(rig: Rig) -> None:
    card = rig.card(1)
    assert rig.tap(card).outcome is Outcome.ACCEPTED
    rig.clock.advance(10)
    rig.restart()
    assert rig.tap(card).reason == "already passed this gate"
    rig.clock.advance(WINDOW_S - 10 + 1)
    assert rig.tap(card).outcome is Outcome.ACCEPTED


@pytest.mark.parametrize("jump_s", [-10.0, -HOUR, -365 * 86400.0])
def test_a_passage_recorded_in_the_future_holds_a_card_at_most_the_window_from_start(
        rig: Rig, jump_s: float) -> None:
    """The gate restarts with its clock behind the journal (a Pi without an RTC, NTP not
    there yet): a passage that looks to be in the future blocks no longer than the
    window, counted from the start of the run."""
    card = rig.card(1)
    assert rig.tap(card).outcome is Outcome.ACCEPTED
    rig.clock.set_wall(jump_s)
    rig.restart()
    rig.clock.advance(WINDOW_S - 1)
    assert rig.tap(card).reason == "already passed this gate"
    rig.clock.advance(2)
    assert rig.tap(card).outcome is Outcome.ACCEPTED
    assert all(passes(rig, rig.card(n)) for n in range(2, 6))


def tear(rig: Rig, serial: int) -> tuple[int, VirtualPurse]:
    card = rig.card(serial)
    card.inject(Fault(FaultKind.TEAR_AFTER, ins=INS_DEBIT))
    result = rig.tap(card)
    assert result.torn and result.entry_id is not None
    return result.entry_id, card


def test_a_clock_set_forward_does_not_expire_a_tear_early(rig: Rig) -> None:
    """NTP setting a clock that was days behind must not close tears as uncertain that
    the card's next tap would recover."""
    torn_id, card = tear(rig, 1)
    rig.clock.set_wall(2 * RECOVERY_S)
    assert rig.processor.expire_recoveries() == []
    rig.clock.advance(WINDOW_S + 1)
    result = rig.tap(card)
    assert result.outcome is Outcome.RECOVERED
    closing = rig.new_entries(torn_id)
    assert [(e.kind, e.state) for e in closing][:1] == [(KIND_RECOVERY, RECOVERED)]


def test_a_clock_set_back_does_not_keep_a_tear_past_its_window(rig: Rig) -> None:
    torn_id, _ = tear(rig, 1)
    rig.clock.set_wall(-2 * RECOVERY_S)
    rig.clock.advance(RECOVERY_S - 1)
    assert rig.processor.expire_recoveries() == []
    rig.clock.advance(2)
    expired = rig.processor.expire_recoveries()
    assert [(e.ref, e.state) for e in expired] == [(torn_id, UNCERTAIN)]


@pytest.mark.parametrize("jump_s", [-HOUR, -365 * 86400.0])
def test_a_tear_from_before_the_run_recorded_in_the_future_expires_within_the_window(
        rig: Rig, jump_s: float) -> None:
    torn_id, _ = tear(rig, 1)
    rig.clock.set_wall(jump_s)
    rig.restart()
    rig.clock.advance(RECOVERY_S - 1)
    assert rig.processor.expire_recoveries() == []
    rig.clock.advance(2)
    assert [e.ref for e in rig.processor.expire_recoveries()] == [torn_id]


def test_a_tear_from_before_the_run_expires_by_the_wall_clock(rig: Rig) -> None:
    torn_id, _ = tear(rig, 1)
    rig.clock.advance(HOUR)
    rig.restart()
    rig.clock.advance(RECOVERY_S - HOUR - 1)
    assert rig.processor.expire_recoveries() == []
    rig.clock.advance(2)
    assert [e.ref for e in rig.processor.expire_recoveries()] == [torn_id]
