"""Builders shared by the fast (sim) tests, and the ledger checker any backend can reuse.

Everything here drives the real components: the sim reader with virtual TGP1 cards, the
software SAM with PURSE.md's test keys, the sim gate and a real SQLite journal. The only
things faked are time (a :class:`Clock` the test moves by hand) and, where a test asks
for it, the death of the process (:class:`ProcessDied`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import os
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from daemon.config import CARD_TYPES, Config, GateConfig, validate
from daemon.journal import Journal
from daemon.outcome import TapResult
from daemon.tap import TapProcessor
from hal.card.model import DebitRecord, VirtualPurse
from hal.gate.sim import SimGateIO
from hal.reader.base import CardLink
from hal.reader.sim import SimReader
from hal.sam.software import SoftwareSam
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
    Draft,
    Entry,
)
from protocol.errors import JournalFull
from protocol.tgp1 import apdu
from protocol.tgp1.crypto import Purchase

# PURSE.md's test keys: for tests and demos only.
MASTER_KEY = bytes.fromhex("000102030405060708090A0B0C0D0E0F")
MASTER_TAC_KEY = bytes.fromhex("101112131415161718191A1B1C1D1E1F")
TERMINAL_ID = bytes.fromhex("000000A00001")
OTHER_TERMINAL_ID = bytes.fromhex("000000B00002")

ADULT = CARD_TYPES["adult"]
CONCESSION = CARD_TYPES["concession"]
STAFF = CARD_TYPES["staff"]
FARES = {ADULT: 250, CONCESSION: 120, STAFF: 0}

INS_SELECT = 0xA4
INS_INITIALIZE = 0x50
INS_DEBIT = 0x54
INS_PROOF = 0x5A
INS_READ_RECORD = 0xB2

# A fixed local time, so that dates and times sent to cards are the same on every run.
START = time.mktime((2026, 5, 4, 8, 0, 0, 0, 0, -1))


class Clock:
    """Wall-clock time the test moves by hand: windows are tested without sleeping."""

    def __init__(self, start: float = START) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def today(self) -> dt.date:
        return dt.date.fromtimestamp(self.now)


# --- config --------------------------------------------------------------------------------
def gate_config(**changes: Any) -> GateConfig:
    values: dict[str, Any] = {
        "terminal_id": TERMINAL_ID,
        "fares": dict(FARES),
        "anti_passback_s": 300.0,
        "recovery_window_s": 86400.0,
    }
    values.update(changes)
    return GateConfig(**values)


def raw_config(journal_path: Path | str = "var/journal.db") -> dict[str, dict[str, Any]]:
    """A valid raw (TOML-shaped) config for the sim backends."""
    return {
        "gate": {
            "terminal_id": TERMINAL_ID.hex().upper(),
            "anti_passback_s": 300,
            "recovery_window_s": 86400,
            "fares": {"adult": 250, "concession": 120, "staff": 0},
        },
        "reader": {"backend": "sim", "sim_interval_s": 0},
        "sam": {"backend": "software", "purchase_key": MASTER_KEY.hex().upper()},
        "journal": {"path": str(journal_path)},
        "log": {"level": "INFO"},
    }


def make_config(journal_path: Path | str = "var/journal.db") -> Config:
    return validate(raw_config(journal_path))


def toml_text(raw: dict[str, dict[str, Any]]) -> str:
    """Enough TOML for the config shapes tests write (tables, one level of subtables)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(item) for item in v) + "]"
        raise TypeError(v)

    lines: list[str] = []
    for name, table in raw.items():
        lines.append(f"[{name}]")
        subtables = {k: v for k, v in table.items() if isinstance(v, dict)}
        lines += [f"{k} = {value(v)}" for k, v in table.items() if k not in subtables]
        for sub, items in subtables.items():
            lines.append(f"[{name}.{sub}]")
            lines += [f"{k} = {value(v)}" for k, v in items.items()]
    return "\n".join(lines) + "\n"


# --- cards ---------------------------------------------------------------------------------
def serial_of(n: int) -> bytes:
    return bytes.fromhex("88010000") + n.to_bytes(4, "big")


def make_card(
    serial: int | bytes,
    balance: int = 5000,
    *,
    card_type: int = ADULT,
    status: int = 0x00,
    expiry: dt.date = dt.date(2030, 12, 31),
    counter: int = 0,
    clock: Clock | None = None,
    random: Callable[[int], bytes] = os.urandom,
) -> VirtualPurse:
    """A TGP1 card with PURSE.md's test keys; ``clock`` makes its idea of today the test's."""
    card = VirtualPurse(
        serial=serial if isinstance(serial, bytes) else serial_of(serial),
        balance=balance,
        master_key=MASTER_KEY,
        master_tac_key=MASTER_TAC_KEY,
        expiry=expiry,
        card_type=card_type,
        status=status,
        counter=counter,
        random=random,
    )
    if clock is not None:
        card.today = clock.today
    return card


# --- the rig -------------------------------------------------------------------------------
class ProcessDied(BaseException):
    """The gate's process stopped dead here: a BaseException, so that no except clause
    of the gate catches it and nothing after it runs."""


Hook = Callable[[], None]


def die() -> None:
    raise ProcessDied("the gate's process died here")


class TracingLink:
    """The sim reader's link, recording every command sent and running the test's hooks
    around the commands it names by INS (an after-hook runs even if the card tore)."""

    def __init__(self, link: CardLink, sent: list[bytes], before: Mapping[int, Hook],
                 after: Mapping[int, Hook]) -> None:
        self._link = link
        self._sent = sent
        self._before = before
        self._after = after

    @property
    def atr(self) -> bytes:
        return self._link.atr

    def transmit(self, command: bytes) -> bytes:
        self._sent.append(command)
        ins = command[1] if len(command) > 1 else -1
        if ins in self._before:
            self._before[ins]()
        try:
            return self._link.transmit(command)
        finally:
            if ins in self._after:
                self._after[ins]()

    def release(self) -> None:
        self._link.release()


class Rig:
    """One gate on the simulator: sim reader, journal in ``directory``, software SAM,
    sim gate I/O and the tap processor, all sharing one hand-moved clock."""

    def __init__(self, directory: Path, *, config: GateConfig | None = None,
                 clock: Clock | None = None) -> None:
        self.directory = Path(directory)
        self.clock = clock or Clock()
        self.config = config or gate_config()
        self.reader = SimReader()
        self.reader.open()
        self.sam = SoftwareSam(purchase_key=MASTER_KEY)
        self.gate = SimGateIO()
        self.journal_path = self.directory / "journal.db"
        self.journal = Journal(self.journal_path, clock=self.clock).open()
        self.processor = self._new_processor()
        self.sent: list[bytes] = []  # the commands of the latest tap

    def _new_processor(self) -> TapProcessor:
        return TapProcessor(gate_config=self.config, journal=self.journal, sam=self.sam,
                            gate=self.gate, clock=self.clock)

    def card(self, serial: int | bytes, balance: int = 5000, **kw: Any) -> VirtualPurse:
        return make_card(serial, balance, clock=self.clock, **kw)

    def tap(self, card: VirtualPurse, *, before: Mapping[int, Hook] | None = None,
            after: Mapping[int, Hook] | None = None) -> TapResult:
        """Present ``card``, let the processor handle it, take the card away.

        ``before``/``after``: INS -> a function run just before that command goes to the
        card, or just after its exchange (e.g. :func:`die`, or filling the disk).
        """
        self.reader.present(card)
        link = self.reader.wait_for_card(0)
        assert link is not None, "the sim reader did not hand out the presented card"
        self.sent = []
        try:
            return self.processor.handle(
                TracingLink(link, self.sent, before or {}, after or {}))
        finally:
            link.release()
            self.reader.remove()

    @property
    def commands(self) -> list[int]:
        """The INS bytes of the latest tap's commands, in order."""
        return [c[1] for c in self.sent]

    def restart(self) -> list[Entry]:
        """What a restart does: the journal file closed and opened anew, a new processor,
        interrupted debits settled."""
        self.journal.close()
        self.journal = Journal(self.journal_path, clock=self.clock).open()
        self.processor = self._new_processor()
        return self.processor.settle_interrupted()

    def set_config(self, config: GateConfig) -> None:
        self.config = config
        self.processor.set_config(config)

    def entries(self) -> list[Entry]:
        return list(self.journal.entries())

    def new_entries(self, after: int) -> list[Entry]:
        return list(self.journal.entries(after_id=after))

    def close(self) -> None:
        self.journal.close()
        self.reader.close()


def begin_debit(rig: Rig, card: VirtualPurse, *, send_debit: bool) -> Entry:
    """Run a debit by hand up to the journalled intent, as the tap processor does, then stop
    as a process would that dies there; ``send_debit`` decides whether the card got DEBIT
    FOR PURCHASE first. Returns the dangling intent."""
    fare = rig.config.fare_for(card.card_type)
    assert fare
    rig.reader.present(card)
    link = rig.reader.wait_for_card(0)
    assert link is not None
    try:
        info = apdu.parse_select(link.transmit(apdu.select()))
        init = apdu.parse_initialize(
            link.transmit(apdu.initialize_for_purchase(fare, rig.config.terminal_id)))
        stamp = time.localtime(rig.clock())
        purchase = Purchase(
            card_random=init.card_random, counter=init.counter,
            terminal_seq=rig.journal.next_terminal_seq(), amount=fare,
            terminal_id=rig.config.terminal_id,
            date=bytes.fromhex(time.strftime("%Y%m%d", stamp)),
            time=bytes.fromhex(time.strftime("%H%M%S", stamp)))
        mac1 = rig.sam.mac1(info.serial, purchase)
        intent = rig.journal.append(Draft(
            kind=KIND_DEBIT, state=INTENT, terminal_id=rig.config.terminal_id, amount=fare,
            card_serial=info.serial, card_type=info.card_type, balance_before=init.balance,
            card_counter=init.counter, card_random=init.card_random,
            terminal_seq=purchase.terminal_seq, tx_date=purchase.date.hex(),
            tx_time=purchase.time.hex()))
        if send_debit:
            proof = apdu.parse_debit(link.transmit(apdu.debit_for_purchase(
                purchase.terminal_seq, purchase.date, purchase.time, mac1)))
            assert rig.sam.check_mac2(info.serial, purchase, proof.mac2)
    finally:
        link.release()
        rig.reader.remove()
    return intent


# --- the ledger ----------------------------------------------------------------------------
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


# --- a disk that fills up ------------------------------------------------------------------
class TinyDisk:
    """A small tmpfs (needs root) that a test fills to the last byte and frees again."""

    def __init__(self, path: Path, size_kib: int = 1024) -> None:
        self.path = Path(path)
        self.size_kib = size_kib
        self._filler = self.path / "filler"

    def fill(self) -> None:
        with self._filler.open("ab", buffering=0) as fh:
            for chunk in (65536, 4096, 1):
                while True:
                    try:
                        fh.write(bytes(chunk))
                    except OSError as err:
                        if err.errno != errno.ENOSPC:
                            raise
                        break

    def free(self) -> None:
        self._filler.unlink(missing_ok=True)


@contextlib.contextmanager
def tiny_disk(path: Path, size_kib: int = 1024) -> Iterator[TinyDisk | None]:
    """Mount a :class:`TinyDisk` at ``path``; None where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        yield None
        return
    try:
        yield TinyDisk(path, size_kib)
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill_journal(journal: Journal, serial: bytes | None) -> int:
    """Make the journal's database full with SQLite's max_page_count: cap it at its size,
    then append small refusals of card ``serial`` until no more fit (they land in the same
    table and index pages as the next entry of that card would). Returns how many went in."""
    db: Any = journal._db  # the cap is per connection: it must be the journal's own
    pages = int(db.execute_sql("PRAGMA page_count").fetchone()[0])
    db.execute_sql(f"PRAGMA max_page_count = {pages}")
    written = failures = 0
    while failures < 30:  # consecutive: the last table page, not one index page, is full
        try:
            journal.append(Draft(kind=KIND_REFUSAL, state=REFUSED, terminal_id=TERMINAL_ID,
                                 reason="x", card_serial=serial))
        except JournalFull:
            failures += 1
        else:
            written += 1
            failures = 0
    return written


def unfill_journal(journal: Journal) -> None:
    db: Any = journal._db
    db.execute_sql("PRAGMA max_page_count = 1073741823")


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
