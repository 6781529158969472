"""The journal as the uplink's outbox: sync state (schema v3), acknowledgements, the
backlog read in order, and retention that never breaks the chain or a pending recovery."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from daemon.journal import Journal, schema
from daemon.metrics import journal_gauges
from protocol import contract
from protocol.entry import (
    COMPLETED,
    ENTRY_FIELDS,
    INTENT,
    KIND_DEBIT,
    KIND_PASS,
    KIND_RECOVERY,
    KIND_REFUSAL,
    NOT_DEBITED,
    RECOVERED,
    REFUSED,
    SYNC_PENDING,
    SYNC_SYNCED,
    TORN,
    UNCERTAIN,
    Draft,
    Entry,
    chain_hash,
)
from protocol.errors import JournalError
from tests.cards import TERMINAL_ID, Clock
from tests.drafts import intent, refusal
from tests.gate_stub import SignedGate

DAY_S = 86400


def follow(head: Entry, kind: str, state: str, **extra: Any) -> Draft:
    """An entry that follows ``head`` (completion, tear, recovery), carrying its card data."""
    return Draft(kind=kind, state=state, terminal_id=TERMINAL_ID, amount=head.amount,
                 card_serial=head.card_serial, card_type=head.card_type,
                 balance_before=head.balance_before, card_counter=head.card_counter,
                 card_random=head.card_random, terminal_seq=head.terminal_seq,
                 tx_date=head.tx_date, tx_time=head.tx_time, ref=head.id, **extra)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def journal(tmp_path: Path, clock: Clock) -> Any:
    with Journal(tmp_path / "journal.db", clock=clock) as j:
        yield j


def ack_all(journal: Journal) -> int:
    return journal.mark_acked(e.uuid for e in journal.entries())


# --- schema v3 -----------------------------------------------------------------------------
def test_a_v2_journal_is_migrated_with_every_entry_pending(tmp_path: Path) -> None:
    """An older journal gains the sync state in place: its entries are owed to the
    head-end, its chain and hashes are untouched."""
    v3 = tmp_path / "v3.db"
    with Journal(v3) as j:
        written = [j.append(refusal()), j.append(intent(1))]
    old = tmp_path / "old.db"
    db = sqlite3.connect(old)
    try:
        for step in (1, 2):  # the frozen DDL of v1 and v2, as an old tapgate left it
            for statement in _frozen(step):
                db.execute(statement)
        db.execute(f"ATTACH DATABASE '{v3}' AS new")
        columns = ", ".join(ENTRY_FIELDS)
        db.execute(f"INSERT INTO entry ({columns}) SELECT {columns} FROM new.entry")
        db.commit()
        db.execute("DETACH DATABASE new")
        db.execute("PRAGMA user_version = 2")
    finally:
        db.close()
    with Journal(old) as j:
        assert [e.uuid for e in j.unacked(0, 10)] == [e.uuid for e in written]
        assert j.pending_sync_count() == 2
        assert j.verify().ok
        assert list(j.entries()) == written
    db = sqlite3.connect(old)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
        assert db.execute("SELECT sql FROM sqlite_master WHERE name = 'entry_unacked'"
                          ).fetchone()[0].endswith('WHERE "acked_ms" IS NULL')
    finally:
        db.close()


def _frozen(step: int) -> tuple[str, ...]:
    statements: list[str] = []

    class Recorder:
        def execute_sql(self, sql: str) -> None:
            statements.append(sql)

    schema.MIGRATIONS[step](Recorder())  # type: ignore[arg-type]
    return tuple(statements)


def test_the_unacked_backlog_is_read_through_the_partial_index(journal: Journal) -> None:
    plan = journal.db.execute("EXPLAIN QUERY PLAN SELECT id FROM entry INDEXED BY entry_unacked "
                        "WHERE acked_ms IS NULL AND id > 0 ORDER BY id LIMIT 5").fetchall()
    assert "entry_unacked" in str(plan)


# --- the outbox ----------------------------------------------------------------------------
def test_unacked_reads_in_id_order_from_a_cursor(journal: Journal) -> None:
    ids = [journal.append(refusal(str(i))).id for i in range(10)]
    assert [e.id for e in journal.unacked(0, 4)] == ids[:4]
    assert [e.id for e in journal.unacked(ids[3], 4)] == ids[4:8]
    assert [e.id for e in journal.unacked(ids[-1], 4)] == []
    journal.mark_acked([e.uuid for e in journal.unacked(0, 10)[2:5]])
    assert [e.id for e in journal.unacked(0, 4)] == [ids[0], ids[1], ids[5], ids[6]]
    assert journal.unacked(0, 100) == [e for e in journal.entries() if e.id not in ids[2:5]]


def test_unacked_json_is_the_entries_export_form(journal: Journal) -> None:
    journal.append(intent(1))
    journal.append(refusal())
    assert journal.unacked_json(0, 10) == [e.to_json() for e in journal.unacked(0, 10)]


def test_unacked_wire_is_byte_for_byte_the_batch_python_encodes(tmp_path: Path) -> None:
    """What the uplink sends, written by SQLite, is exactly contract.Batch(...).encode() of
    unacked_json: for every kind of entry a gate writes (signed), and for values where
    SQLite's JSON and Python's part ways, which Python then encodes."""
    gate = SignedGate(tmp_path / "gate", TERMINAL_ID)
    try:
        gate.ride(10)
        j = gate.rig.journal
        torn = j.append(follow(j.append(intent(900)), KIND_DEBIT, TORN))
        j.append(follow(torn, KIND_RECOVERY, NOT_DEBITED))
        j.append(follow(torn, KIND_RECOVERY, UNCERTAIN))
        assert {(e.kind, e.state) for e in j.entries()} == {
            (KIND_DEBIT, INTENT), (KIND_DEBIT, COMPLETED), (KIND_DEBIT, TORN),
            (KIND_RECOVERY, RECOVERED), (KIND_RECOVERY, NOT_DEBITED),
            (KIND_RECOVERY, UNCERTAIN), (KIND_REFUSAL, REFUSED), (KIND_PASS, COMPLETED)}
        assert all(e.sig for e in j.entries())
        odd = [j.append(refusal(reason)).id for reason in (
            "Zürich Hbf 🚇", 'a "quoted" \\ back/slash', "tab\tnew\nline\x00\x1f", "del\x7f",
            "<script>&amp;")]
        # Values the journal never writes, but a column can hold: a REAL, text in a blob
        # column, a blob in an integer column, an empty blob, a 63-bit integer, a comma
        # in a uuid.
        for sql in ("amount = 0.1 + 0.2", "mac2 = 'not hex'", "card_type = x'01FF'", "tac = x''",
                    "terminal_seq = 9223372036854775807", "uuid = 'odd,uuid'"):
            odd.append(j.append(intent(len(odd))).id)
            j.db.execute(f"UPDATE entry SET {sql} WHERE id = ?", (odd[-1],))
        plain = j.append(refusal()).id
        for limit in (1, 4, 100):
            after, seen = 0, []
            while (out := j.unacked_wire(after, limit)) is not None:
                expected = j.unacked_json(after, limit)
                assert out.ids == [e["id"] for e in expected]
                assert out.uuids == [e["uuid"] for e in expected]
                assert contract.Batch.wrap("G1", "b-7", out.json) == contract.Batch(
                    "G1", "b-7", expected).encode()
                seen += out.ids
                after = out.ids[-1]
            assert seen == [e.id for e in j.entries()]
        # A batch of ordinary entries is one statement, one row: no Python per entry.
        statements: list[str] = []
        j.db.database.connection().set_trace_callback(statements.append)
        try:
            assert j.unacked_wire(odd[-1], 10) == j.unacked_wire(plain - 1, 10)
        finally:
            j.db.database.connection().set_trace_callback(None)
        assert len(statements) == 2
        assert j.unacked_wire(plain, 10) is None
    finally:
        gate.close()


def test_mark_acked_ids_is_one_update_per_run_in_one_commit(journal: Journal,
                                                            clock: Clock) -> None:
    ids = [journal.append(refusal()).id for _ in range(20)]
    seen: list[str] = []
    journal.db.database.connection().set_trace_callback(seen.append)
    try:
        # runs 0-4, 7-11, 15 and an id the journal does not have; 0 twice
        assert journal.mark_acked_ids([*ids[7:12], ids[15], *ids[0:5], 10_000, ids[0]]) == 11
    finally:
        journal.db.database.connection().set_trace_callback(None)
    assert sum(s.strip().upper().startswith("COMMIT") for s in seen) == 1
    assert sum(s.strip().upper().startswith("UPDATE") for s in seen) == 4
    assert journal.mark_acked_ids(ids[0:6]) == 1  # only ids[5] is new
    assert journal.mark_acked_ids([]) == 0
    assert [e.id for e in journal.unacked(0, 100)] == [ids[6], *ids[12:15], *ids[16:]]
    acked = journal.db.execute("SELECT DISTINCT acked_ms FROM entry WHERE acked_ms IS NOT NULL"
                         ).fetchall()
    assert acked == [(int(clock() * 1000),)]


def test_mark_acked_counts_only_newly_acknowledged_known_entries(journal: Journal,
                                                                 clock: Clock) -> None:
    a, b, c = (journal.append(refusal()) for _ in range(3))
    assert journal.pending_sync_count() == 3
    assert journal.mark_acked([a.uuid, b.uuid, "0" * 32, a.uuid]) == 2
    assert journal.mark_acked([a.uuid]) == 0  # again: nothing new
    assert journal.mark_acked([]) == 0
    assert journal.pending_sync_count() == 1
    assert [e.uuid for e in journal.unacked(0, 10)] == [c.uuid]
    first_ack = journal.db.execute("SELECT acked_ms FROM entry WHERE id = ?", (a.id,)).fetchone()[0]
    assert first_ack == int(clock() * 1000)


def test_mark_acked_is_one_commit(journal: Journal) -> None:
    uuids = [journal.append(refusal()).uuid for _ in range(50)]
    seen: list[str] = []
    journal.db.database.connection().set_trace_callback(seen.append)
    try:
        assert journal.mark_acked(uuids) == 50
    finally:
        journal.db.database.connection().set_trace_callback(None)
    assert sum(s.strip().upper().startswith("COMMIT") for s in seen) == 1
    assert sum(s.strip().upper().startswith("UPDATE") for s in seen) == 50


def test_acknowledging_changes_no_entry_and_no_hash(journal: Journal) -> None:
    before = [journal.append(intent(1)), journal.append(refusal())]
    ack_all(journal)
    assert list(journal.entries()) == before
    assert journal.verify().ok
    assert journal.append(refusal()).prev_hash == before[-1].hash


def test_the_sync_state_is_outside_the_hash(journal: Journal) -> None:
    """`journal export` shows an entry's sync state beside its fields (the column the
    acks set); the back office's recheck of the hash ignores it."""
    a, b = journal.append(intent(1)), journal.append(refusal())
    journal.mark_acked([a.uuid])
    states = dict(journal.db.execute("SELECT id, acked_ms IS NOT NULL FROM entry").fetchall())
    assert states == {a.id: 1, b.id: 0}
    for entry, state in ((a, SYNC_SYNCED), (b, SYNC_PENDING)):
        doc = {**entry.to_json(), "sync_state": state}
        assert chain_hash(doc) == entry.hash


def test_pending_sync_and_lag_come_from_the_acks(journal: Journal, clock: Clock) -> None:
    first = journal.append(refusal())
    clock.advance(100)
    second = journal.append(refusal())
    clock.advance(20)
    gauges = journal_gauges(journal, clock())
    assert (gauges.pending_sync, gauges.sync_lag_s) == (2, pytest.approx(120))
    journal.mark_acked([first.uuid])
    gauges = journal_gauges(journal, clock())
    assert (gauges.pending_sync, gauges.sync_lag_s) == (1, pytest.approx(20))
    assert journal.oldest_unacked_ms() == second.created_ms
    journal.mark_acked([second.uuid])
    gauges = journal_gauges(journal, clock())
    assert (gauges.pending_sync, gauges.sync_lag_s) == (0, 0.0)
    assert journal.oldest_unacked_ms() is None
    assert gauges.entries == 2


def test_acks_from_another_thread_while_the_card_loop_appends(journal: Journal) -> None:
    """The uplink marks acks while the card loop writes: the writer lock serialises them,
    nothing fails, the chain holds."""
    done = threading.Event()
    errors: list[BaseException] = []

    def acker() -> None:
        try:
            while not done.is_set() or journal.pending_sync_count():
                journal.mark_acked(e.uuid for e in journal.unacked(0, 7))
        except BaseException as err:  # reported below
            errors.append(err)

    thread = threading.Thread(target=acker)
    thread.start()
    for i in range(200):
        journal.append(refusal(str(i)))
    done.set()
    thread.join(30)
    assert not errors and not thread.is_alive()
    assert journal.pending_sync_count() == 0 and journal.count() == 200
    assert journal.verify().ok


# --- retention -----------------------------------------------------------------------------
def test_prune_removes_acked_old_entries_from_the_start_and_keeps_the_chain(
        tmp_path: Path, journal: Journal, clock: Clock) -> None:
    old = [journal.append(refusal(str(i))) for i in range(5)]
    clock.advance(40 * DAY_S)
    young = [journal.append(refusal(str(i))) for i in range(3)]
    ack_all(journal)
    cutoff = int((clock() - 30 * DAY_S) * 1000)
    assert journal.prune(cutoff) == 5
    assert [e.id for e in journal.entries()] == [e.id for e in young]
    report = journal.verify()
    assert report.ok and report.entries == 3
    anchor = journal.db.execute("SELECT value FROM meta WHERE key = 'chain_anchor'").fetchone()[0]
    assert bytes.fromhex(anchor) == old[-1].hash
    assert journal.prune(cutoff) == 0  # nothing more is old enough
    nxt = journal.append(refusal())
    assert nxt.id == young[-1].id + 1 and nxt.prev_hash == young[-1].hash
    journal.close()
    with Journal(tmp_path / "journal.db", clock=clock) as again:  # anchor kept on disk
        assert again.verify().ok and again.tail_id == nxt.id


def test_prune_stops_at_the_first_unacknowledged_entry(journal: Journal, clock: Clock) -> None:
    entries = [journal.append(refusal(str(i))) for i in range(6)]
    journal.mark_acked([e.uuid for e in entries if e.id != entries[2].id])
    clock.advance(60 * DAY_S)
    assert journal.prune(int(clock() * 1000)) == 2  # never a hole: 4 and 5 stay behind 3
    assert [e.id for e in journal.entries()] == [e.id for e in entries[2:]]
    assert journal.verify().ok
    journal.mark_acked([entries[2].uuid])
    assert journal.prune(int(clock() * 1000)) == 3  # all but the newest
    assert [e.id for e in journal.entries()] == [entries[-1].id]
    assert journal.verify().ok


def test_prune_never_deletes_the_newest_entry(journal: Journal, clock: Clock) -> None:
    only = journal.append(refusal())
    ack_all(journal)
    clock.advance(60 * DAY_S)
    assert journal.prune(int(clock() * 1000)) == 0
    assert list(journal.entries()) == [only]


def test_prune_keeps_terminal_seqs_unique_across_reopening(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "journal.db"
    with Journal(path, clock=clock) as j:
        for seq in (1, 2, 3):
            head = j.append(intent(seq))
            j.append(follow(head, KIND_DEBIT, COMPLETED, balance_after=4750,
                            mac2=b"\x01" * 4, tac=b"\x02" * 4))
        j.append(refusal())
        ack_all(j)
        clock.advance(60 * DAY_S)
        assert j.prune(int(clock() * 1000)) == 6
        assert j.next_terminal_seq() == 4
    with Journal(path, clock=clock) as j:
        assert j.count() == 1 and j.next_terminal_seq() == 4  # not 1: no seq is reused
        assert j.verify().ok


def test_prune_keeps_a_pending_tear_and_its_intent_even_when_acked(journal: Journal,
                                                                   clock: Clock) -> None:
    before = journal.append(refusal("before"))
    head = journal.append(intent(1))
    tear = journal.append(follow(head, KIND_DEBIT, TORN, reason="card left"))
    after = [journal.append(refusal(str(i))) for i in range(3)]
    ack_all(journal)
    clock.advance(60 * DAY_S)
    assert journal.prune(int(clock() * 1000)) == 1  # only what precedes the intent
    assert [e.id for e in journal.entries()] == [head.id, tear.id] + [e.id for e in after]
    assert [e.id for e in journal.pending_recoveries()] == [tear.id]
    assert journal.get(tear.ref or 0) == head  # the recovery window still runs from it
    assert journal.verify().ok
    del before
    # settled: the story is complete, and it may go once the head-end has everything
    settled = journal.append(follow(tear, KIND_RECOVERY, NOT_DEBITED, reason="not debited"))
    journal.mark_acked([settled.uuid])
    assert journal.prune(int(clock() * 1000)) == 5
    assert list(journal.entries()) == [settled]
    assert journal.verify().ok


def test_prune_keeps_an_intent_with_no_outcome(journal: Journal, clock: Clock) -> None:
    journal.append(refusal())
    dangling = journal.append(intent(1))  # the process died here
    journal.append(refusal())
    journal.append(refusal())
    ack_all(journal)
    clock.advance(60 * DAY_S)
    assert journal.prune(int(clock() * 1000)) == 1
    assert [e.id for e in journal.dangling_intents()] == [dangling.id]


def test_prune_in_chunks_leaves_the_same_journal(tmp_path: Path, clock: Clock) -> None:
    results = []
    for chunk in (3, 2000):
        with Journal(tmp_path / f"j{chunk}.db", clock=clock) as j:
            for i in range(20):
                j.append(refusal(str(i)))
            ack_all(j)
            pruned = j.prune(int((clock() + 1) * 1000), chunk=chunk)
            results.append((pruned, [e.id for e in j.entries()], j.verify().ok))
    assert results[0] == results[1] == (19, [20], True)


def test_deleting_the_first_kept_entry_after_a_prune_is_detected(tmp_path: Path,
                                                                 clock: Clock) -> None:
    path = tmp_path / "journal.db"
    with Journal(path, clock=clock) as j:
        for i in range(6):
            j.append(refusal(str(i)))
        ack_all(j)
        j.prune(int(clock() * 1000) + 1, chunk=3)
        assert [e.id for e in j.entries()] == [6] and j.verify().ok
        j.append(refusal())
    db = sqlite3.connect(path)
    try:
        db.execute("DELETE FROM entry WHERE id = 6")
        db.commit()
    finally:
        db.close()
    with pytest.raises(JournalError, match=r"damaged .*journal salvage"):
        Journal(path, clock=clock).open()  # the gate refuses to run on it
    with Journal(path, clock=clock, start_check=False) as j:
        problems = j.verify().problems
    assert any("chain anchor" in p for p in problems), problems
