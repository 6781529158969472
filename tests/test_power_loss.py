"""Power cuts under the real daemon: its journal on a filesystem that drops every write
never fsynced (tests/fixtures/powercut.py), demo passengers on the sim reader whose cards
outlive the gate (tests/fixtures/powercut_gate.py).

The power goes at every step of a tap (before and after the card acts on SELECT,
INITIALIZE, DEBIT, READ RECORD and GET TRANSACTION PROOF, before and after the flap
opens) and at random moments. After every cut, on what the disk kept: the journal opens
as the daemon opens it and verifies; no debit the card made is lost (each is recognised,
or an intent or a tear the card's next tap settles); none is recognised twice or without
the card; every passenger the gate let through has the debit that paid for it in the
journal. At the end every card taps until nothing is pending, and the ledger balances.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon.journal import Journal
from hal.card.model import DebitRecord
from protocol.entry import INTENT, KIND_DEBIT, TORN, Entry
from tests.configs import raw_config, toml_text
from tests.daemon_process import ROOT, Daemon
from tests.fixtures import powercut
from tests.fixtures.powercut_gate import load_cards, records
from tests.ledger import assert_ledger, card_debits, journal_debits, journal_problems

STEPS = [f"{ins}:{when}" for ins in ("A4", "50", "54", "B2", "5A", "open")
         for when in ("before", "after")]
GATES = 4  # gates cut in parallel, each with its own filesystem, journal and cards
CUTS_PER_GATE = int(os.environ.get("TAPGATE_POWER_CUTS", "13"))  # 4 x 13 = 52 cuts
STEP_TIMEOUT_S = 6.0  # a step no tap reaches by then (READ RECORD: no tear pending)
SITE = Path(__file__).resolve().parent / "fixtures" / "powercut_site"


@pytest.fixture(scope="module", autouse=True)
def _can_cut_power() -> None:
    why = powercut.available()
    if why is not None:
        if os.environ.get("TAPGATE_REQUIRE_POWERCUT"):
            pytest.fail(why)
        pytest.skip(why)


@dataclass
class Card:
    serial: bytes
    history: list[DebitRecord]


class Gate:
    """One gate on a power-cut disk: its config, its cards' file, what it told."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.disk = powercut.PowerCutDisk(work / "backing", work / "mnt")
        self.journal = work / "mnt" / "journal.db"
        raw = raw_config(self.journal)
        raw["gate"]["anti_passback_s"] = 0
        raw["reader"] = {"backend": "sim", "sim_interval_s": 0.15, "sim_cards": 3,
                         "sim_tear_rate": 0.25}
        self.config = work / "tapgate.toml"
        self.config.write_text(toml_text(raw), encoding="utf-8")
        self.state, self.told, self.mark = work / "cards.json", work / "told", work / "mark"
        self.cuts: Counter[str] = Counter()

    def daemon(self, at: str = "", *overrides: str) -> Daemon:
        self.mark.unlink(missing_ok=True)
        return Daemon(self.config, *overrides, env={
            "PYTHONPATH": f"{SITE}{os.pathsep}{ROOT}",
            "TAPGATE_POWERCUT_STATE": str(self.state), "TAPGATE_POWERCUT_TOLD": str(self.told),
            "TAPGATE_POWERCUT_MARK": str(self.mark), "TAPGATE_POWERCUT_AT": at})

    def cards(self) -> list[Card]:
        return [Card(bytes.fromhex(serial), records(state))
                for serial, state in load_cards(self.state).items()]

    def run_and_cut(self, at: str, rng: random.Random) -> None:
        daemon = self.daemon(at)
        daemon.wait_ready()
        if at:
            deadline = time.monotonic() + STEP_TIMEOUT_S
            while not self.mark.exists() and time.monotonic() < deadline:
                assert daemon.proc.poll() is None, daemon.tail()
                time.sleep(0.01)
            self.cuts[at if self.mark.exists() else "random"] += 1
        else:
            time.sleep(rng.uniform(0, 1.5))  # anywhere: a tap, a checkpoint, a sweep
            self.cuts["random"] += 1
        daemon.kill()
        self.disk.cut()

    def check_after_cut(self) -> None:
        with Journal(self.journal) as journal:  # as the daemon opens it: not refused
            report = journal.verify()
            assert report.ok, report.problems
            entries = list(journal.entries())
            assert journal_problems(journal, dangling_ok=True) == []
        check_nothing_lost(self.cards(), entries, self.told)

    def settle(self) -> None:
        """Taps with no tears until every card's pending tear is settled."""
        for _ in range(10):
            with Journal(self.journal) as journal:
                if not journal.pending_recoveries() and not journal.dangling_intents():
                    return
            daemon = self.daemon("", "reader.sim_tear_rate=0")
            daemon.wait_ready()
            daemon.wait_taps(daemon.taps() + 12)
            assert daemon.stop() == 0
        pytest.fail("tears still pending after the cards tapped again and again")


def check_nothing_lost(cards: list[Card], entries: list[Entry], told: Path) -> None:
    problems: list[str] = []
    recognised = journal_debits(entries, problems)
    for debit, n in Counter(recognised).items():
        if n > 1:
            problems.append(f"recognised {n} times: {debit}")
    made = {d.key: d for d in card_debits(cards)}
    for debit in recognised:
        if debit.key not in made:
            problems.append(f"recognised but never made by the card: {debit}")
    open_keys = {(e.card_serial, e.card_counter, e.terminal_seq) for e in entries
                 if e.kind == KIND_DEBIT and e.state in (INTENT, TORN)}
    known = {d.key for d in recognised} | open_keys
    problems += [f"debited on the card, lost from the journal: {d}"
                 for key, d in made.items() if key not in known]
    debits = {(e.card_serial, e.card_counter) for e in entries if e.kind == KIND_DEBIT}
    lines = told.read_text(encoding="utf-8").split() if told.exists() else []
    for serial, counter in zip(lines[::2], lines[1::2], strict=True):
        if (bytes.fromhex(serial), int(counter) - 1) not in debits:
            problems.append(f"the gate let card {serial} through (counter {counter}); "
                            "the journal has no debit for it")
    assert not problems, "\n".join(problems)


def run_gate(work: Path, cuts: int, seed: int) -> Counter[str]:
    rng = random.Random(seed)
    gate = Gate(work)
    gate.disk.start()
    try:
        for n in range(cuts):
            at = STEPS[(n + seed) % len(STEPS)] if n % 4 != 3 else ""
            gate.run_and_cut(at, rng)
            gate.check_after_cut()
        gate.settle()
        with Journal(gate.journal) as journal:
            assert journal.verify().ok
            assert journal_problems(journal) == []
            ledger = assert_ledger(gate.cards(), journal)
        assert ledger.card, "no debit at all: the test exercised nothing"
        return gate.cuts
    finally:
        gate.disk.stop()


def test_power_cuts_at_every_step_of_a_tap_lose_nothing(tmp_path: Path) -> None:
    cuts = run_gate(tmp_path, len(STEPS), seed=0)
    assert sum(cuts.values()) == len(STEPS)
    assert cuts["random"] < len(STEPS) // 2, cuts  # most steps were reached


@pytest.mark.slow
def test_power_cuts_in_bulk_on_gates_side_by_side(tmp_path: Path) -> None:
    started = time.monotonic()
    with ThreadPoolExecutor(GATES) as pool:
        done = list(pool.map(lambda n: run_gate(tmp_path / f"gate{n}", CUTS_PER_GATE, n + 1),
                             range(GATES)))
    total = sum(done, Counter())
    print(f"power cuts: {sum(total.values())} on {GATES} gates in "
          f"{time.monotonic() - started:.0f} s: {dict(total)}")
    assert sum(total.values()) >= 50
