"""The journal: hash chain, tamper evidence, refusing what it must not open, ordering,
terminal sequence numbers, the JSON form the back office rechecks."""

from __future__ import annotations

import itertools
import json
import sqlite3
from pathlib import Path

import pytest

from daemon.journal import Journal, schema
from protocol.entry import (
    COMPLETED,
    ENTRY_FIELDS,
    GENESIS,
    KIND_DEBIT,
    KIND_PASS,
    KIND_RECOVERY,
    KIND_REFUSAL,
    NOT_DEBITED,
    RECOVERED,
    REFUSED,
    TORN,
    Draft,
    Entry,
    canonical_json,
    chain_hash,
)
from protocol.errors import JournalError, JournalFull
from tests.cards import TERMINAL_ID, Clock, serial_of
from tests.disk import fill_journal, unfill_journal
from tests.drafts import SERIAL, intent, refusal


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
    with Journal(path, start_check=False) as journal:
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
    from daemon.journal.sql import PENDING_FOR_CARD

    path = tmp_path / "journal.db"
    with Journal(path):
        pass
    db = sqlite3.connect(path)
    plan = " | ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + PENDING_FOR_CARD,
                                                    (serial_of(1),)))
    db.close()
    assert "USING INDEX entry_torn_by_card (card_serial=?)" in plan, plan


def test_all_pending_tears_are_found_through_their_own_index(tmp_path: Path) -> None:
    """The card loop's sweep asks for every pending tear every few seconds: that must not
    read the whole journal either."""
    from daemon.journal.sql import PENDING_ALL

    path = tmp_path / "journal.db"
    with Journal(path):
        pass
    db = sqlite3.connect(path)
    plan = " | ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + PENDING_ALL))
    db.close()
    assert "SCAN t USING INDEX entry_torn_by_card" in plan, plan


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


# --- what a tap asks of the journal, made cheap -----------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_canonical_json_is_json_dumps_byte_for_byte(seed: int) -> None:
    """The hash is defined on json.dumps(sort_keys, compact, ASCII); the journal writes
    that form itself, and must not differ from it in a single byte."""
    import random

    rnd = random.Random(seed)
    texts = ["", "debit", 'a "quoted" \\ back\\slash', "tab\tnew\nline\x00\x1f\x7f",
             "é ü 中文 😀", "\u2028\u2029", "A1B2C3D4"]
    names = [n for n in ENTRY_FIELDS if n not in ("hash", "sig")]
    for _ in range(300):
        doc: dict[str, object] = {}
        for name in names:
            pick = rnd.randrange(4)
            doc[name] = (None if pick == 0 else rnd.choice(texts) if pick == 1
                         else rnd.randrange(-2**70, 2**70) if pick == 2
                         else "".join(chr(rnd.randrange(0x110000)) for _ in range(5))
                         .encode("utf-8", "surrogatepass").decode("utf-8", "replace"))
        if rnd.random() < 0.5:
            doc.update(hash="AB" * 32, sig=None, sync_state="pending")
        body = {k: v for k, v in doc.items() if k not in ("hash", "sig", "sync_state")}
        expected = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        assert canonical_json(doc) == expected


@pytest.mark.parametrize("odd", [True, 1.5, float("nan"), [1], {"a": 1}])
def test_canonical_json_leaves_other_values_to_json_dumps(odd: object) -> None:
    doc: dict[str, object] = {n: None for n in ENTRY_FIELDS}
    doc["amount"] = odd
    body = {k: v for k, v in doc.items() if k not in ("hash", "sig")}
    assert canonical_json(doc) == json.dumps(body, sort_keys=True, separators=(",", ":"),
                                             ensure_ascii=True)
    # and a dict with other keys than an entry's
    assert canonical_json({"b": 1, "a": "x"}) == '{"a":"x","b":1}'


def tear_of(intent: Entry, reason: str = "card left during the debit") -> Draft:
    return Draft(kind=KIND_DEBIT, state=TORN, terminal_id=intent.terminal_id,
                 amount=intent.amount, reason=reason, card_serial=intent.card_serial,
                 card_type=intent.card_type, balance_before=intent.balance_before,
                 card_counter=intent.card_counter, card_random=intent.card_random,
                 terminal_seq=intent.terminal_seq, tx_date=intent.tx_date,
                 tx_time=intent.tx_time, ref=intent.id)


def closing(torn: Entry, state: str = NOT_DEBITED) -> Draft:
    return Draft(kind=KIND_RECOVERY, state=state, terminal_id=torn.terminal_id,
                 amount=torn.amount, card_serial=torn.card_serial, ref=torn.id)


def test_a_cards_pending_tears_follow_every_append_and_reopening(tmp_path: Path) -> None:
    """A tap asks SQLite for a card's tears only when the journal holds some for it: the
    answer must still be the journal's, through tears, recoveries and reopening."""
    path = tmp_path / "journal.db"
    other = serial_of(8)
    with Journal(path) as journal:
        assert journal.pending_recoveries(SERIAL) == []
        first = journal.append(tear_of(journal.append(intent(1))))
        second = journal.append(tear_of(journal.append(intent(2))))
        assert [e.id for e in journal.pending_recoveries(SERIAL)] == [first.id, second.id]
        assert journal.pending_recoveries(other) == []
        journal.append(closing(first))
        assert [e.id for e in journal.pending_recoveries(SERIAL)] == [second.id]
    with Journal(path) as journal:  # read back from the journal at open
        assert [e.id for e in journal.pending_recoveries(SERIAL)] == [second.id]
        journal.append(closing(second, RECOVERED))
        assert journal.pending_recoveries(SERIAL) == []
        assert journal.pending_recoveries() == []
        # several entries in one transaction: a tear closed, another one left pending
        [i3, _] = journal.append_many([intent(3), refusal()])
        closed = journal.append(tear_of(i3, "interrupted"))
        [left, _] = journal.append_many([tear_of(i3), closing(closed)])
        assert [e.id for e in journal.pending_recoveries(SERIAL)] == [left.id]
    with Journal(path) as journal:
        assert len(journal.pending_recoveries(SERIAL)) == 1 == len(journal.pending_recoveries())


def test_a_failed_append_leaves_no_pending_tear_behind(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    with Journal(path) as journal:
        torn = tear_of(journal.append(intent(1)))
        raw(path, "CREATE TRIGGER no_more BEFORE INSERT ON entry BEGIN "
                  "SELECT RAISE(ABORT, 'refused'); END")
        with pytest.raises(JournalError):
            journal.append(torn)
        assert journal.pending_recoveries(SERIAL) == []


def wal_salts(path: Path) -> bytes:
    """The WAL header's salts: new ones each time SQLite starts the WAL over."""
    with open(f"{path}-wal", "rb") as fh:
        return fh.read(32)[16:24]


def test_the_wal_is_started_over_between_taps_not_by_a_taps_commit(tmp_path: Path) -> None:
    """The first commit of a new WAL fsyncs its header before its own fsync: the
    checkpoint between taps starts the WAL over, so the next tap's intent does not."""
    path = tmp_path / "journal.db"
    with Journal(path) as journal:
        for n in range(3):
            journal.append(intent(n + 1))
        journal.checkpoint()
        salts = wal_salts(path)
        size = path.stat().st_size
        journal.checkpoint()  # nothing new: nothing done
        assert wal_salts(path) == salts and path.stat().st_size == size
        journal.append(intent(10))  # the tap's commit goes on in the WAL as it is
        assert wal_salts(path) == salts
        journal.checkpoint()
        assert wal_salts(path) != salts
        assert journal.verify().ok and journal.count() == 4
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
    db.close()


def test_a_checkpoint_after_another_connections_commit_folds_it(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    with Journal(path) as journal:
        journal.append(intent(1))
        journal.checkpoint()
        salts = wal_salts(path)
        raw(path, "INSERT INTO meta (key, value) VALUES ('x', 'y')")  # another writer
        journal.checkpoint()
        assert wal_salts(path) != salts  # folded, and started over again


def passage(serial: bytes, kind: str = KIND_DEBIT, state: str = COMPLETED) -> Draft:
    return Draft(kind=kind, state=state, terminal_id=TERMINAL_ID, amount=250,
                 card_serial=serial)


@pytest.mark.parametrize("seed", range(6))
def test_anti_passback_from_memory_is_the_journals_answer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """Every tap asks when the card last went through; that is answered from memory when
    the memory reaches back far enough, and must then mean what the journal says: the
    same passage, or None only for a last passage at or before ``after_ms``. Through
    passages and other entries, a clock that jumps both ways, memory forgetting, pruning
    and reopening."""
    import random

    from daemon.journal import store

    monkeypatch.setattr(store, "PASSAGES_KEPT_MS", 60_000)
    monkeypatch.setattr(store, "PASSAGES_LOADED", 7)
    rnd = random.Random(seed)
    clock = Clock()
    cards = [serial_of(n) for n in range(1, 9)]
    path = tmp_path / "journal.db"
    journal = Journal(path, clock=clock).open()
    kinds = [(KIND_DEBIT, COMPLETED), (KIND_PASS, COMPLETED), (KIND_RECOVERY, RECOVERED),
             (KIND_REFUSAL, REFUSED), (KIND_RECOVERY, NOT_DEBITED)]
    from_memory = 0
    try:
        for _ in range(400):
            op = rnd.random()
            clock.advance(rnd.choice([1, 5, 20, 45, 90, -30, -200]) if op < 0.9 else 0)
            if op < 0.6:
                kind, state = rnd.choice(kinds)
                journal.append(passage(rnd.choice(cards), kind, state))
            elif op < 0.63:
                journal.close()
                journal = Journal(path, clock=clock).open()
            elif op < 0.66:
                journal.mark_acked(e.uuid for e in journal.entries())
                journal.prune(int((clock() - rnd.choice([30, 120, 600])) * 1000))
            now_ms = int(clock() * 1000)
            for serial in cards:
                after = now_ms - rnd.choice([10_000, 50_000, 100_000, 300_000])
                exact = journal.last_accepted_ms(serial)
                answer = journal.last_accepted_ms(serial, after_ms=after)
                assert answer == exact or (answer is None and exact is not None
                                            and exact <= after), (serial, after)
                from_memory += after >= journal.db.passages_floor_ms
    finally:
        journal.close()
    assert from_memory > 100  # the memory did answer, not only SQLite


def test_entries_get_random_uuids(tmp_path: Path) -> None:
    import uuid

    with Journal(tmp_path / "journal.db") as journal:
        uuids = [journal.append(refusal()).uuid for _ in range(200)]
    assert len(set(uuids)) == 200
    for text in uuids:
        parsed = uuid.UUID(hex=text)
        assert (parsed.hex, parsed.version, parsed.variant) == (text, 4, uuid.RFC_4122)


def test_an_append_inside_an_open_transaction_is_part_of_it(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    with Journal(path) as journal, journal.db.database.atomic():
        journal.append(refusal("committed with its transaction"))
    with Journal(path) as journal:
        assert [e.reason for e in journal.entries()] == ["committed with its transaction"]
        assert journal.verify().ok
