"""Thousands of random taps of ~20 cards at one gate: tears of every kind at every
command, garbage answers, the process dying mid-debit, restarts, top-ups, anti-passback,
other cards in between. After every step the ledger holds (every debit a card made here
is recognised by the journal once, with the card's own MAC2 and TAC, or is a tear still
pending), every passage was paid once, and at the end, with every tear settled, the
card histories and the journal's recognised debits are the same set."""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path

import pytest

from daemon.outcome import Outcome
from hal.card.model import Fault, FaultKind, VirtualPurse
from tests.cards import (
    ADULT,
    CONCESSION,
    INS_DEBIT,
    INS_INITIALIZE,
    INS_PROOF,
    INS_READ_RECORD,
    INS_SELECT,
    STAFF,
)
from tests.ledger import LedgerWatch, assert_ledger, journal_problems
from tests.rig import ProcessDied, Rig, die

STEPS = int(os.environ.get("TAPGATE_RANDOM_STEPS", "1500"))
CARDS = 20
FAULT_INS = [INS_SELECT, INS_INITIALIZE, INS_DEBIT, INS_READ_RECORD, INS_PROOF]
# Malformed answers only: a card that answers a well-formed lie (6A83 "no such record"
# for a record it has, a forged proof) is a different problem from a broken exchange.
GARBAGE = [b"", b"\x6F", b"\x90", b"\x6F\x00", bytes(3) + b"\x90\x00", bytes.fromhex("6D00")]
DEBIT_GARBAGE = [
    *GARBAGE,
    bytes.fromhex("11223344" "55667788" "9000"),  # a wrong MAC2
    bytes.fromhex("9302"),
    bytes.fromhex("6985"),
]


class Run:
    def __init__(self, rig: Rig, rnd: random.Random) -> None:
        self.rig = rig
        self.rnd = rnd
        self.cards = [
            rig.card(n, rnd.randrange(0, 3000),
                     card_type=STAFF if n == 0 else CONCESSION if n % 4 == 1 else ADULT,
                     status=0x01 if n == CARDS - 1 else 0x00)
            for n in range(CARDS)
        ]
        self.loaded = {c.serial: c.balance for c in self.cards}
        self.watch = LedgerWatch(rig.journal, self.cards)
        self.outcomes: Counter[str] = Counter()
        self.opened = 0
        self.faults: Counter[str] = Counter()

    def step(self) -> None:
        rnd = self.rnd
        roll = rnd.random()
        if roll < 0.03:
            self.rig.restart()
            self.outcomes["restart"] += 1
        elif roll < 0.08:
            card = rnd.choice(self.cards)
            amount = rnd.choice([250, 500, 1000, 5000])
            card.balance += amount
            self.loaded[card.serial] += amount
        else:
            self.tap(rnd.choice(self.cards))
        self.rig.clock.advance(rnd.choice([0, 1, 5, 30, 120, 301]))

    def tap(self, card: VirtualPurse) -> None:
        rnd = self.rnd
        hooks = {}
        roll = rnd.random()
        if roll < 0.3:
            kind = rnd.choice(list(FaultKind))
            ins = rnd.choice(FAULT_INS)
            garbage = rnd.choice(DEBIT_GARBAGE if ins == INS_DEBIT else GARBAGE)
            card.inject(Fault(kind, ins=ins, garbage=garbage))
            self.faults[f"{kind.value}@{ins:02X}"] += 1
        elif roll < 0.33:
            where = rnd.choice(["before", "after"])
            hooks[where] = {INS_DEBIT: die}
            self.faults[f"die {where} DEBIT"] += 1
        try:
            result = self.rig.tap(card, **hooks)
        except ProcessDied:
            self.outcomes["died"] += 1
            self.rig.restart()  # a dead gate is restarted before it takes the next tap
            return
        self.outcomes[result.outcome.value] += 1
        self.opened += result.opened
        assert result.outcome is not Outcome.OUT_OF_SERVICE, result

    def check(self) -> None:
        problems = self.watch.check(self.rig.journal)
        assert not problems, "\n".join(problems)
        entries = self.watch.entries
        # every passage was paid once: by a recognised debit or a free pass
        assert self.rig.gate.passages == self.opened
        assert self.opened == entries["debit/completed"] + entries["recovery/recovered"] + (
            entries["pass/completed"])
        assert entries["recovery/uncertain"] == 0
        for card in self.cards:
            spent = sum(rec.amount for rec in card.history)
            assert card.balance == self.loaded[card.serial] - spent >= 0

    def settle_everything(self) -> None:
        """Every card presented until nothing is pending."""
        for card in self.cards:
            card.faults.clear()
        for _ in range(3):
            self.rig.clock.advance(301)
            for card in self.cards:
                if self.rig.journal.pending_recoveries(card.serial):
                    self.tap(card)
        assert self.rig.journal.pending_recoveries() == []
        assert self.rig.journal.dangling_intents() == []


@pytest.mark.parametrize("seed", [1, 2])
def test_random_taps_keep_the_ledger(tmp_path: Path, seed: int) -> None:
    rig = Rig(tmp_path)
    try:
        run = Run(rig, random.Random(seed))
        for n in range(STEPS):
            run.step()
            run.check()
            if n % 500 == 499:
                assert journal_problems(rig.journal, dangling_ok=False) == []
        run.settle_everything()
        run.check()
        assert_ledger(run.cards, rig.journal)
        assert journal_problems(rig.journal) == []

        # the run exercised what it is meant to
        entries = run.watch.entries
        assert run.outcomes["accepted"] > STEPS // 10
        for state in ("recovery/recovered", "recovery/not_debited", "debit/torn",
                      "refusal/refused", "pass/completed"):
            assert entries[state] > 0, state
        assert run.outcomes["died"] > 0 and run.outcomes["restart"] > 0
        assert all(len(c.history) > 0 for c in run.cards if c.card_type != STAFF
                   and c.status == 0x00)
    finally:
        rig.close()
