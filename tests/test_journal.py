"""The journal: hash chain, tamper evidence, refusing what it must not open, ordering,
terminal sequence numbers, the JSON form the back office rechecks."""

from __future__ import annotations

import itertools
import json
import sqlite3
from pathlib import Path

import pytest

from daemon.errors import JournalError, JournalFull
from daemon.journal import Draft, Journal, schema
from daemon.journal.entry import (
    COMPLETED,
    ENTRY_FIELDS,
    GENESIS,
    INTENT,
    KIND_DEBIT,
    KIND_REFUSAL,
    REFUSED,
    chain_hash,
)
from tests.helpers import TERMINAL_ID, Clock, fill_journal, serial_of, unfill_journal

SERIAL = serial_of(7)


def intent(seq: int, amount: int = 250) -> Draft:
    return Draft(kind=KIND_DEBIT, state=INTENT, terminal_id=TERMINAL_ID, amount=amount,
                 card_serial=SERIAL, card_type=1, balance_before=5000, card_counter=seq,
                 card_random=bytes.fromhex("A1B2C3D4"), terminal_seq=seq, tx_date="20260504",
                 tx_time="080000")


def refusal(reason: str = "card blocked") -> Draft:
    return Draft(kind=KIND_REFUSAL, state=REFUSED, terminal_id=TERMINAL_ID, reason=reason,
                 card_serial=SERIAL)


def filled(path: Path, n: int = 6) -> list[int]:
    with Journal(path) as journal:
        return [journal.append(intent(i + 1) if i % 2 else refusal()).id for i in range(n)]


def raw(path: Path, sql: str, *params: object) -> None:
    db = sqlite3.connect(path)
    try:
        db.execute(sql, params)
        db.commit()
    finally:
        db.close()


def verify(path: Path) -> list[str]:
    with Journal(path) as journal:
        return journal.verify().problems


# --- the chain -----------------------------------------------------------------------------
def test_chain_is_intact(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    assert filled(path) == [1, 2, 3, 4, 5, 6]
    with Journal(path) as journal:
        report = journal.verify()
        assert report.ok and report.entries == 6 and report.problems == []
        entries = list(journal.entries())
    assert entries[0].prev_hash == GENESIS
    for prev, entry in itertools.pairwise(entries):
        assert entry.prev_hash == prev.hash
    for entry in entries:
        assert chain_hash(entry.to_json()) == entry.hash and len(entry.hash) == 32


def test_chain_continues_across_reopening(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    filled(path, 3)
    with Journal(path) as journal:
        last = journal.get(3)
        entry = journal.append(refusal())
        assert last is not None and (entry.id, entry.prev_hash) == (4, last.hash)
        assert journal.verify().ok


def test_tampered_content_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    filled(path)
    raw(path, "UPDATE entry SET amount = 25 WHERE id = 4")
    assert verify(path) == ["entry 4: hash does not match its content"]


def test_tampered_content_with_a_recomputed_hash_breaks_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    filled(path)
    with Journal(path) as journal:
        entry = journal.get(2)
    assert entry is not None
    forged = {**entry.to_json(), "amount": 1}
    raw(path, "UPDATE entry SET amount = 1, hash = ? WHERE id = 2", chain_hash(forged))
    assert verify(path) == ["entry 3: prev_hash breaks the chain"]


def test_deleted_row_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    filled(path)
    raw(path, "DELETE FROM entry WHERE id = 3")
    assert verify(path) == ["entry 4: prev_hash breaks the chain",
                            "entry 4: follows 2, entries missing"]


def test_deleted_head_of_the_chain_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    filled(path)
    raw(path, "DELETE FROM entry WHERE id IN (1, 2)")
    assert verify(path) == ["entry 3: the first entry kept does not continue the chain "
                            "anchor: entries before it are missing"]


def test_tampered_binary_field_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    filled(path)
    raw(path, "UPDATE entry SET card_serial = ? WHERE id = 5", bytes(8))
    assert verify(path) == ["entry 5: hash does not match its content"]


# --- what it refuses to open ---------------------------------------------------------------
def test_not_sqlite_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    path.write_bytes(b"this is not a journal, it is a shopping list\n" * 10)
    before = path.read_bytes()
    with pytest.raises(JournalError, match="not an SQLite journal"):
        Journal(path).open()
    assert path.read_bytes() == before


def test_foreign_sqlite_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    raw(path, "CREATE TABLE photos (id INTEGER PRIMARY KEY)")
    with pytest.raises(JournalError, match="not a tapgate journal"):
        Journal(path).open()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    filled(path, 2)
    raw(path, f"PRAGMA user_version = {schema.SCHEMA_VERSION + 1}")
    with pytest.raises(JournalError, match="newer version") as err:
        Journal(path).open()
    assert not isinstance(err.value, JournalFull)
    db = sqlite3.connect(path)  # untouched: still the newer version, still both entries
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION + 1
        assert db.execute("SELECT COUNT(*) FROM entry").fetchone()[0] == 2
    finally:
        db.close()


def test_new_journal_gets_the_current_schema(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "down" / "journal.db"
    with Journal(path) as journal:
        assert journal.count() == 0 and journal.tail_id == 0
        assert journal.next_terminal_seq() == 1
        assert journal.verify().ok
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


def test_unreadable_path_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    path.mkdir()
    with pytest.raises(JournalError):
        Journal(path).open()


# --- order and sequence numbers ------------------------------------------------------------
def test_terminal_seq_stays_monotonic_across_reopening(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    with Journal(path) as journal:
        assert journal.next_terminal_seq() == 1
        journal.append(intent(1))
        journal.append(intent(2))
        assert journal.next_terminal_seq() == 3
        journal.append(refusal())  # no seq: does not move it
        assert journal.next_terminal_seq() == 3
    with Journal(path) as journal:
        assert journal.next_terminal_seq() == 3
        journal.append(intent(3))
        journal.append(refusal())
    with Journal(path) as journal:
        assert journal.next_terminal_seq() == 4
        assert journal.tail_id == 5


def test_a_failed_append_uses_up_nothing(tmp_path: Path) -> None:
    with Journal(tmp_path / "journal.db") as journal:
        journal.append(intent(1))
        fill_journal(journal, SERIAL)
        tail, seq = journal.tail_id, journal.next_terminal_seq()
        with pytest.raises(JournalFull):
            journal.append(intent(seq))
        assert (journal.tail_id, journal.next_terminal_seq()) == (tail, seq)
        unfill_journal(journal)
        entry = journal.append(intent(seq))
        assert (entry.id, entry.terminal_seq) == (tail + 1, seq)
        assert journal.verify().ok


def test_entries_iterate_in_order(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    filled(path, 25)
    with Journal(path) as journal:
        assert [e.id for e in journal.entries(batch=4)] == list(range(1, 26))
        assert [e.id for e in journal.entries(after_id=20, batch=2)] == [21, 22, 23, 24, 25]
        assert list(journal.entries(after_id=25)) == []
        assert journal.count() == 25
        assert journal.get(26) is None


def test_entry_round_trip(tmp_path: Path) -> None:
    clock = Clock()
    with Journal(tmp_path / "journal.db", clock=clock) as journal:
        written = journal.append(intent(9))
        assert written.created_ms == int(clock.now * 1000)
        assert journal.get(written.id) == written
        [read] = journal.entries()
        assert read == written


# --- the JSON form -------------------------------------------------------------------------
def test_to_json_shape(tmp_path: Path) -> None:
    with Journal(tmp_path / "journal.db") as journal:
        journal.append(intent(1))
        done = journal.append(Draft(
            kind=KIND_DEBIT, state=COMPLETED, terminal_id=TERMINAL_ID, amount=250,
            card_serial=SERIAL, card_type=1, balance_before=5000, balance_after=4750,
            card_counter=1, card_random=bytes.fromhex("a1b2c3d4"), terminal_seq=1,
            tx_date="20260504", tx_time="080000", mac2=bytes.fromhex("c2c549c7"),
            tac=bytes.fromhex("4f40885b"), ref=1))
    doc = done.to_json()
    assert list(doc) == list(ENTRY_FIELDS)
    assert doc["terminal_id"] == "000000A00001"
    assert doc["card_serial"] == "8801000000000007"
    assert (doc["mac2"], doc["tac"], doc["card_random"]) == ("C2C549C7", "4F40885B", "A1B2C3D4")
    assert doc["amount"] == 250 and type(doc["amount"]) is int
    assert (doc["balance_before"], doc["balance_after"]) == (5000, 4750)
    assert (doc["id"], doc["ref"], doc["card_counter"], doc["terminal_seq"]) == (2, 1, 1, 1)
    assert (doc["kind"], doc["state"], doc["reason"]) == ("debit", "completed", None)
    assert len(doc["hash"]) == 64 and doc["hash"] == doc["hash"].upper()
    assert doc["prev_hash"] == done.prev_hash.hex().upper()
    assert len(doc["uuid"]) == 32
    assert json.loads(json.dumps(doc)) == doc
    assert chain_hash(doc).hex().upper() == doc["hash"]


def test_a_cards_tears_are_found_through_their_own_index(tmp_path: Path) -> None:
    """Every tap asks for the card's pending tears: that must not read the card's whole
    history, so the query has to run on the partial index of torn entries."""
    from daemon.journal.store import _PENDING_FOR_CARD

    path = tmp_path / "journal.db"
    with Journal(path):
        pass
    db = sqlite3.connect(path)
    plan = " | ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + _PENDING_FOR_CARD,
                                                    (serial_of(1),)))
    db.close()
    assert "USING INDEX entry_torn_by_card (card_serial=?)" in plan, plan


def test_commits_never_checkpoint_and_checkpoint_folds_the_wal(tmp_path: Path) -> None:
    """A passenger's commit must not pay for a checkpoint: appends only grow the WAL, and
    the card loop's checkpoint() (between taps) copies it into the database."""
    path = tmp_path / "journal.db"
    with Journal(path) as journal:
        journal.checkpoint()
        before = path.stat().st_size
        for n in range(1, 400):  # well past SQLite's default of 1000 pages of WAL
            journal.append(refusal(f"card blocked {n}"))
        assert path.stat().st_size == before  # nothing was checkpointed by a commit
        journal.checkpoint()
        assert path.stat().st_size > before
        assert journal.verify().ok and journal.count() == 399
