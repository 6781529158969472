"""The ledger checker any backend can reuse: the debits the cards made against the debits
the journal recognises, whole (:func:`ledger`) or incrementally over thousands of taps
(:class:`LedgerWatch`), and the journal's own consistency (:func:`journal_problems`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from daemon.journal import Journal
from hal.card.model import DebitRecord
from protocol.entry import (
    COMPLETED,
    INTENT,
    KIND_DEBIT,
    KIND_PASS,
    KIND_RECOVERY,
    KIND_REFUSAL,
    NOT_DEBITED,
    RECOVERED,
    REFUSED,
    TORN,
    UNCERTAIN,
    Entry,
)
from tests.cards import TERMINAL_ID


class Card(Protocol):
    """What the checker needs of a card: any object with the card's ground truth."""

    @property
    def serial(self) -> bytes: ...

    @property
    def history(self) -> list[DebitRecord]: ...


@dataclass(frozen=True)
class Debit:
    """One debit as the card made it or as the journal recognises it."""

    serial: bytes
    counter_before: int
    terminal_seq: int
    amount: int
    mac2: bytes
    tac: bytes

    @property
    def key(self) -> tuple[bytes, int, int]:
        return (self.serial, self.counter_before, self.terminal_seq)

    def __str__(self) -> str:
        return (f"card {self.serial.hex().upper()} counter {self.counter_before} "
                f"seq {self.terminal_seq} amount {self.amount} "
                f"MAC2 {self.mac2.hex().upper()} TAC {self.tac.hex().upper()}")


@dataclass
class Ledger:
    card: list[Debit] = field(default_factory=list)
    journal: list[Debit] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def card_debits(cards: Iterable[Card], terminal_id: bytes = TERMINAL_ID) -> list[Debit]:
    """Every debit the cards made at this terminal, from their ground-truth history."""
    return [
        Debit(card.serial, rec.counter_before, rec.terminal_seq, rec.amount, rec.mac2, rec.tac)
        for card in cards
        for rec in card.history
        if rec.terminal_id == terminal_id
    ]


def journal_debits(entries: Iterable[Entry], problems: list[str] | None = None) -> list[Debit]:
    """Every debit the journal recognises (debit/completed, recovery/recovered)."""
    found = []
    for e in entries:
        if not e.is_recognised_debit:
            continue
        if (e.card_serial is None or e.card_counter is None or e.terminal_seq is None
                or e.mac2 is None or e.tac is None):
            if problems is not None:
                problems.append(f"entry {e.id} ({e.kind}/{e.state}) lacks a card field")
            continue
        found.append(Debit(e.card_serial, e.card_counter, e.terminal_seq, e.amount, e.mac2, e.tac))
    return found


def ledger(cards: Iterable[Card], journal: Journal | Iterable[Entry], *,
           terminal_id: bytes = TERMINAL_ID, all_cards: bool = True) -> Ledger:
    """Compare the cards' own debits at this terminal with the journal's recognised ones.

    For every card, the debits it made here and the debits the journal recognises must be
    the same set: (counter before, terminal seq, amount, MAC2, TAC) each, none twice,
    none missing, the journal's TAC the card's. ``all_cards``: the journal may recognise
    debits only of the cards given.
    """
    cards = list(cards)
    entries = list(journal.entries() if isinstance(journal, Journal) else journal)
    result = Ledger(card=card_debits(cards, terminal_id))
    result.journal = journal_debits(entries, result.problems)
    serials = {c.serial for c in cards}
    problems = result.problems

    for debit, n in Counter(result.journal).items():
        if n > 1:
            problems.append(f"journal records one debit {n} times: {debit}")
    for seq, n in Counter(d.terminal_seq for d in result.journal).items():
        if n > 1:
            problems.append(f"terminal seq {seq} is on {n} recognised debits")
    for debit, n in Counter(result.card).items():
        if n > 1:
            problems.append(f"the card made one debit {n} times: {debit}")

    on_card = {d.key: d for d in result.card}
    in_journal: dict[tuple[bytes, int, int], Debit] = {}
    for d in result.journal:
        if d.serial not in serials:
            if all_cards:
                problems.append(f"journal recognises a debit of an unknown card: {d}")
            continue
        in_journal.setdefault(d.key, d)
    for key, d in on_card.items():
        mine = in_journal.get(key)
        if mine is None:
            problems.append(f"debited on the card, missing from the journal: {d}")
        elif mine != d:
            problems.append(f"journal disagrees with the card: journal {mine}; card {d}")
    for key, d in in_journal.items():
        if key not in on_card:
            problems.append(f"journal recognises a debit the card never made: {d}")
    return result


def assert_ledger(cards: Iterable[Card], journal: Journal | Iterable[Entry], *,
                  terminal_id: bytes = TERMINAL_ID, all_cards: bool = True) -> Ledger:
    """:func:`ledger`, failing the test on any problem."""
    result = ledger(cards, journal, terminal_id=terminal_id, all_cards=all_cards)
    assert not result.problems, "ledger broken:\n  " + "\n  ".join(result.problems)
    return result


_FOLLOWS = {
    (KIND_DEBIT, COMPLETED): (KIND_DEBIT, INTENT),
    (KIND_DEBIT, TORN): (KIND_DEBIT, INTENT),
    (KIND_RECOVERY, RECOVERED): (KIND_DEBIT, TORN),
    (KIND_RECOVERY, NOT_DEBITED): (KIND_DEBIT, TORN),
    (KIND_RECOVERY, UNCERTAIN): (KIND_DEBIT, TORN),
}
_STANDALONE = {(KIND_DEBIT, INTENT), (KIND_REFUSAL, REFUSED), (KIND_PASS, COMPLETED)}


def journal_problems(journal: Journal, *, dangling_ok: bool = False) -> list[str]:
    """The journal's own consistency: chain intact, every story well formed (each intent
    has at most one outcome, each tear at most one resolution, outcomes carry what their
    intent said), and no intent left without an outcome unless ``dangling_ok``."""
    problems = list(journal.verify().problems)
    by_id: dict[int, Entry] = {}
    followers: Counter[int] = Counter()
    for e in journal.entries():
        by_id[e.id] = e
        what = (e.kind, e.state)
        if what in _STANDALONE:
            if e.ref is not None:
                problems.append(f"entry {e.id} {what} has a ref")
            continue
        if what not in _FOLLOWS:
            problems.append(f"entry {e.id}: unknown kind/state {what}")
            continue
        head = by_id.get(e.ref) if e.ref is not None else None
        if head is None or (head.kind, head.state) != _FOLLOWS[what]:
            problems.append(f"entry {e.id} {what} does not follow a {_FOLLOWS[what]}")
            continue
        followers[head.id] += 1
        for name in ("card_serial", "amount", "card_counter", "card_random", "terminal_seq",
                     "tx_date", "tx_time", "balance_before"):
            if getattr(e, name) != getattr(head, name):
                problems.append(f"entry {e.id}: {name} differs from entry {head.id}")
        if e.is_recognised_debit:
            assert e.balance_before is not None
            if e.balance_after != e.balance_before - e.amount:
                problems.append(f"entry {e.id}: balance after {e.balance_after} is not "
                                f"{e.balance_before} - {e.amount}")
    for head_id, n in followers.items():
        if n > 1:
            problems.append(f"entry {head_id} has {n} outcomes")
    if not dangling_ok:
        problems.extend(f"intent {e.id} has no outcome" for e in journal.dangling_intents())
    return problems


def states(entries: Iterable[Entry]) -> list[str]:
    """``kind/state`` of each entry, for compact assertions."""
    return [f"{e.kind}/{e.state}" for e in entries]


class LedgerWatch:
    """The ledger check made incremental, for runs of thousands of taps: reads only the
    entries and card debits that are new since the last :meth:`check`.

    Between taps a card may hold a debit the journal does not recognise yet: one whose
    tear (or dangling intent) is still pending. Anything else is a problem: a debit the
    card made and the journal lost, a recognised debit the card never made, one recorded
    twice, or a journal TAC, MAC2 or amount that is not the card's.
    """

    def __init__(self, journal: Journal, cards: Iterable[Card], *,
                 terminal_id: bytes = TERMINAL_ID) -> None:
        self.journal = journal
        self.cards = {c.serial: c for c in cards}
        self.terminal_id = terminal_id
        self._after = 0
        self._seen = dict.fromkeys(self.cards, 0)
        self._recognised: dict[tuple[bytes, int, int], Debit] = {}
        self._matched: set[tuple[bytes, int, int]] = set()
        self._unmatched_card: dict[tuple[bytes, int, int], Debit] = {}
        self._in_flight: dict[int, tuple[bytes, int, int]] = {}  # torn / intent id -> key
        self.entries: Counter[str] = Counter()

    def check(self, journal: Journal | None = None) -> list[str]:
        """Take in what is new and return the problems (empty when the ledger holds)."""
        if journal is not None:
            self.journal = journal
        problems: list[str] = []
        new = list(self.journal.entries(after_id=self._after))
        for e in new:
            self._after = e.id
            self.entries[f"{e.kind}/{e.state}"] += 1
            if (e.kind, e.state) in ((KIND_DEBIT, INTENT), (KIND_DEBIT, TORN)):
                assert e.card_serial is not None and e.card_counter is not None
                assert e.terminal_seq is not None
                self._in_flight[e.id] = (e.card_serial, e.card_counter, e.terminal_seq)
            if e.ref is not None and (e.kind, e.state) in _FOLLOWS:
                self._in_flight.pop(e.ref, None)
        for d in journal_debits(new, problems):
            if d.key in self._recognised or d.key in self._matched:
                problems.append(f"journal records one debit twice: {d}")
                continue
            self._recognised[d.key] = d
            if d.serial not in self.cards:
                problems.append(f"journal recognises a debit of an unknown card: {d}")
        for serial, card in self.cards.items():
            fresh = card.history[self._seen[serial]:]
            self._seen[serial] = len(card.history)
            for d in card_debits([_Shown(serial, fresh)], self.terminal_id):
                if d.key in self._unmatched_card or d.key in self._matched:
                    problems.append(f"the card made one debit twice: {d}")
                self._unmatched_card[d.key] = d
        for key, d in list(self._recognised.items()):  # recognised, not yet seen on a card
            on_card = self._unmatched_card.pop(key, None)
            if on_card is None:
                problems.append(f"journal recognises a debit the card never made: {d}")
                continue
            if on_card != d:
                problems.append(f"journal disagrees with the card: journal {d}; card {on_card}")
            del self._recognised[key]
            self._matched.add(key)
        flying = set(self._in_flight.values())
        problems.extend(f"debited on the card, missing from the journal: {d}"
                        for key, d in self._unmatched_card.items() if key not in flying)
        return problems

    @property
    def debits(self) -> int:
        return len(self._matched)


@dataclass
class _Shown:
    serial: bytes
    history: list[DebitRecord]
