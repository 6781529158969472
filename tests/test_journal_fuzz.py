"""Damaged copies of a real journal file (bytes flipped, the file cut short, pages
zeroed, and all of these at once) opened as the daemon opens it, checked as `journal
verify` checks it, and salvaged: each is refused with a JournalError or opens (and then
verifies, with or without faults); never another exception.

A journal that passes the start check may still hold damage elsewhere: start-up checks
only what it relies on; `verify` walks the rest and says so.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.journal import Journal
from daemon.journal.salvage import salvage
from protocol.entry import COMPLETED, KIND_DEBIT, KIND_RECOVERY, NOT_DEBITED, TORN, Draft, Entry
from protocol.errors import JournalError
from tests.cards import serial_of
from tests.drafts import intent, refusal

PAGE = 4096
QUICK = 200
SLOW = 4800  # with QUICK: 5,000 damaged journals


def _outcome(head: Entry, state: str) -> Draft:
    return Draft(kind=KIND_DEBIT, state=state, terminal_id=head.terminal_id, amount=head.amount,
                 card_serial=head.card_serial, card_type=head.card_type,
                 balance_before=head.balance_before, card_counter=head.card_counter,
                 card_random=head.card_random, terminal_seq=head.terminal_seq,
                 tx_date=head.tx_date, tx_time=head.tx_time,
                 mac2=bytes(4) if state == COMPLETED else None,
                 tac=bytes(4) if state == COMPLETED else None, ref=head.id)


def _journal_bytes() -> bytes:
    """A real journal: paid taps, tears recovered and pending, refusals, an intent left
    open, remote state, a prune (a chain anchor and a max_terminal_seq in meta)."""
    work = Path(tempfile.mkdtemp(prefix="tg-fuzz-src-"))
    try:
        path = work / "journal.db"
        with Journal(path) as journal:
            seq = itertools.count(1)
            for n in range(60):
                serial = serial_of(n % 5 + 1)
                head = journal.append(intent(next(seq), serial=serial))
                if n % 7 == 3:
                    torn = journal.append(_outcome(head, TORN))
                    if n % 2:
                        journal.append(Draft(kind=KIND_RECOVERY, state=NOT_DEBITED,
                                             terminal_id=torn.terminal_id, amount=torn.amount,
                                             card_serial=serial, ref=torn.id))
                else:
                    journal.append(_outcome(head, COMPLETED))
                journal.append(refusal(f"no. {n}", serial=serial))
            journal.append(intent(next(seq)))  # the daemon died mid-debit
            journal.mark_acked_ids(range(1, 40))
            journal.prune(2**62, chunk=20)
            with journal.control() as control:
                control.claim_seq("operator-1", 7)
        data = path.read_bytes()
        assert not Path(f"{path}-wal").exists()  # all of it in the file
        return data
    finally:
        shutil.rmtree(work, ignore_errors=True)


ORIGINAL = _journal_bytes()
SIZE = len(ORIGINAL)


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    # memory, where there is some: fsync costs nothing there, and the examples are many
    shm = Path("/dev/shm")
    work = Path(tempfile.mkdtemp(prefix="tg-fuzz-", dir=shm if shm.is_dir() else None))
    yield work
    shutil.rmtree(work, ignore_errors=True)


@st.composite
def damage(draw: st.DrawFn, size: int) -> list[tuple[str, int, int]]:
    """What happens to the file: (how, where, what) steps."""
    pages = size // PAGE
    step = st.one_of(
        st.tuples(st.just("flip"), st.integers(0, size - 1), st.integers(1, 255)),
        st.tuples(st.just("zero"), st.integers(0, pages - 1), st.just(0)),
        st.tuples(st.just("cut"), st.integers(0, size - 1), st.just(0)),
        st.tuples(st.just("garbage"), st.integers(0, pages - 1), st.integers(0, 2**31)),
    )
    return draw(st.lists(step, min_size=1, max_size=40))


def damaged(data: bytes, steps: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for how, where, what in steps:
        if how == "flip" and where < len(out):
            out[where] ^= what
        elif how == "zero":
            out[where * PAGE:(where + 1) * PAGE] = bytes(len(out[where * PAGE:(where + 1) * PAGE]))
        elif how == "garbage":
            chunk = len(out[where * PAGE:(where + 1) * PAGE])
            out[where * PAGE:(where + 1) * PAGE] = os.urandom(chunk) if what % 2 else bytes(
                (what >> (i % 24)) & 0xFF for i in range(chunk))
        elif how == "cut":
            del out[where:]
    return bytes(out)


_counter = itertools.count()


def check_damaged(scratch: Path, data: bytes) -> str:
    """The three ways in; what became of it ('refused', 'opened')."""
    n = next(_counter)
    path = scratch / f"j{n}.db"
    path.write_bytes(data)
    try:
        outcome = "refused"
        try:
            with Journal(path) as journal:  # as the daemon opens it
                outcome = "opened"
                journal.next_terminal_seq()
        except JournalError as err:
            assert str(err)
        try:
            with Journal(path, start_check=False) as journal:  # as `journal verify` does
                report = journal.verify()
                assert outcome == "refused" or isinstance(report.ok, bool)
        except JournalError as err:
            assert str(err)
        try:
            salvage(path, scratch / f"s{n}.db")
        except JournalError as err:
            assert str(err)
        return outcome
    finally:
        for leftover in scratch.glob(f"[js]{n}.db*"):
            leftover.unlink()


def test_the_undamaged_journal_opens_and_verifies(scratch: Path) -> None:
    assert check_damaged(scratch, ORIGINAL) == "opened"
    path = scratch / "whole.db"
    path.write_bytes(ORIGINAL)
    with Journal(path) as journal:
        assert journal.verify().ok
        assert len(journal.dangling_intents()) == 1 and journal.pending_recoveries()


@settings(max_examples=QUICK, deadline=None, database=None, derandomize=False,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=damage(SIZE))
def test_damaged_journals_are_refused_or_open_never_a_traceback(
        scratch: Path, steps: list[tuple[str, int, int]]) -> None:
    check_damaged(scratch, damaged(ORIGINAL, steps))


@pytest.mark.slow
@settings(max_examples=SLOW, deadline=None, database=None, derandomize=False,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=damage(SIZE))
def test_damaged_journals_in_bulk(scratch: Path, steps: list[tuple[str, int, int]]) -> None:
    check_damaged(scratch, damaged(ORIGINAL, steps))
