"""A damaged journal is refused, never run on: an empty file, damage start-up would act
on (a completion whose ref is garbled, an index that hides a completion, a broken
tail, pages SQLite itself finds malformed), and a meta value that is not a number. The
daemon refuses to start and says to salvage; `journal verify` and `journal salvage` say
what is wrong; nothing is written to the damaged file; no traceback anywhere.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from daemon.journal import Journal
from protocol.entry import COMPLETED, KIND_DEBIT, Draft, Entry
from protocol.errors import JournalError
from tests.daemon_process import Daemon
from tests.drafts import intent, refusal
from tests.operator_cli_support import config_for, digest, tapgate

SALVAGE = "tapgate journal salvage"


def completion_of(head: Entry) -> Draft:
    return Draft(kind=KIND_DEBIT, state=COMPLETED, terminal_id=head.terminal_id,
                 amount=head.amount, card_serial=head.card_serial, card_type=head.card_type,
                 balance_before=head.balance_before,
                 balance_after=(head.balance_before or 0) - head.amount,
                 card_counter=head.card_counter, card_random=head.card_random,
                 terminal_seq=head.terminal_seq, tx_date=head.tx_date, tx_time=head.tx_time,
                 mac2=bytes(4), tac=bytes(4), ref=head.id)


def paid_tap_journal(path: Path) -> tuple[int, int]:
    """Refusals, then one paid tap (intent, completion) last: (intent id, completion id)."""
    with Journal(path) as journal:
        for n in range(6):
            journal.append(refusal(str(n)))
        head = journal.append(intent(1))
        done = journal.append(completion_of(head))
        assert journal.dangling_intents() == []
    return head.id, done.id


def raw(path: Path, statement: str, *params: object) -> None:
    db = sqlite3.connect(path)
    try:
        db.execute(statement, params)
        db.commit()
    finally:
        db.close()


def refused_run(tmp_path: Path, journal: Path) -> str:
    """`tapgate run` on ``journal``: it must exit non-zero, cleanly; its log."""
    before = digest(journal)
    daemon = Daemon(config_for(tmp_path, journal))
    rc = daemon.wait_exit()
    log = "\n".join(daemon.lines)
    assert rc != 0, log
    assert "Traceback" not in log, log
    assert "tapgate running" not in log, log
    assert digest(journal) == before  # nothing written to it: not even a tear
    return log


# --- 7: an empty journal ----------------------------------------------------------------------
def test_an_empty_journal_file_is_refused_not_started_over(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    path.touch()
    with pytest.raises(JournalError, match="empty"):
        Journal(path).open()
    assert path.stat().st_size == 0

    checked = tapgate("journal", "verify", "--config", str(config_for(tmp_path, path)))
    assert checked.returncode != 0
    assert "0 entries" not in checked.stdout and "chain intact" not in checked.stdout
    assert "empty" in checked.stderr and "Traceback" not in checked.stderr

    log = refused_run(tmp_path, path)
    assert "empty (0 bytes)" in log and "backup" in log
    assert path.stat().st_size == 0


def test_a_new_journal_takes_its_name_only_when_made_whole(tmp_path: Path) -> None:
    path = tmp_path / "var" / "journal.db"
    with Journal(path) as journal:
        journal.append(refusal())
    assert sorted(p.name for p in path.parent.iterdir() if "new" in p.name) == []
    with Journal(path) as journal:
        assert journal.count() == 1
    # a start that died while making it leaves its scratch file: the next one starts over
    other = tmp_path / "other.db"
    (tmp_path / ".other.db.new").write_bytes(b"half made")
    with Journal(other) as journal:
        assert journal.count() == 0
    assert not (tmp_path / ".other.db.new").exists()


# --- 8: damage start-up would act on --------------------------------------------------------
def test_a_completion_garbled_on_disk_is_refused_not_taken_for_a_tear(tmp_path: Path) -> None:
    """The issue's case: damage hid an intent's completion; start-up would have turned the
    intent into a tear and the card's next tap into a free recovered passage."""
    path = tmp_path / "journal.db"
    head, done = paid_tap_journal(path)
    raw(path, "UPDATE entry SET ref = 999 WHERE id = ?", done)
    with pytest.raises(JournalError, match=f"damaged .*{SALVAGE}"):
        Journal(path).open()
    log = refused_run(tmp_path, path)
    assert SALVAGE in log and f"entry {done}" in log
    with Journal(path, start_check=False) as journal:
        assert [e.id for e in journal.dangling_intents()] == [head]  # what it would act on
        assert not journal.verify().ok


_SIZES = {0: 0, 1: 1, 2: 2, 8: 0, 9: 0}  # bytes of a record value, by SQLite serial type


def _index_leaf_cells(data: bytearray, page: int, size: int) -> list[tuple[int, int, int]]:
    """(offset of the first key's value, its serial type, rowid) of each cell of an index
    leaf page whose records are (one integer-or-null key, rowid)."""
    base = (page - 1) * size
    head = base + (100 if page == 1 else 0)
    assert data[head] == 0x0A, "not an index leaf page"
    cells = int.from_bytes(data[head + 3:head + 5], "big")
    out = []
    for n in range(cells):
        cell = base + int.from_bytes(data[head + 8 + 2 * n:head + 10 + 2 * n], "big")
        # payload size (small: one byte), record header size (one byte), serial types
        header = cell + 1
        key_type, rowid_type = data[header + 1], data[header + 2]
        assert data[cell] < 0x80 and data[header] == 3, "unexpected cell"
        value = header + 3
        at = value + _SIZES[key_type]
        rowid = {8: 0, 9: 1}.get(rowid_type) or int.from_bytes(
            data[at:at + _SIZES[rowid_type]], "big")
        out.append((value, key_type, rowid))
    return out


def test_an_index_that_hides_a_completion_is_refused(tmp_path: Path) -> None:
    """quick_check never compares an index with its table: a garbled key in the ref
    index hides the completion from the query that finds intents left open."""
    path = tmp_path / "journal.db"
    head, done = paid_tap_journal(path)
    db = sqlite3.connect(path)
    root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'entryrow_ref'"
                      ).fetchone()[0]
    size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    data = bytearray(path.read_bytes())
    [(offset, key_type, _)] = [c for c in _index_leaf_cells(data, root, size) if c[2] == done]
    assert key_type == 1 and data[offset] == head
    data[offset] = 0x7F  # the largest key still: the index stays in order
    path.write_bytes(bytes(data))
    with Journal(path, start_check=False) as journal:
        assert [e.id for e in journal.dangling_intents()] == [head]  # the index lies
    with pytest.raises(JournalError, match=f"intent.*{SALVAGE}"):
        Journal(path).open()
    assert SALVAGE in refused_run(tmp_path, path)


def test_a_tail_whose_content_does_not_match_its_hash_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    _, done = paid_tap_journal(path)
    raw(path, "UPDATE entry SET amount = 1 WHERE id = ?", done)
    with pytest.raises(JournalError, match=f"entry {done}: its hash does not match"):
        Journal(path).open()


def test_pages_sqlite_finds_malformed_are_refused_with_a_word_on_salvage(tmp_path: Path
                                                                        ) -> None:
    path = tmp_path / "journal.db"
    with Journal(path) as journal:
        journal.append_many(refusal(f"refusal number {n}" * 3) for n in range(400))
    size = 4096
    data = bytearray(path.read_bytes())
    page = len(data) // size // 2
    data[page * size:page * size + 64] = bytes(range(64))  # a page header turned to garbage
    path.write_bytes(bytes(data))
    with pytest.raises(JournalError, match=SALVAGE):
        Journal(path).open()
    assert SALVAGE in refused_run(tmp_path, path)


def test_a_sound_journal_with_open_intents_and_tears_after_a_prune_opens(tmp_path: Path
                                                                         ) -> None:
    """What start-up checks holds on a sound journal: entries pruned from the start, an
    intent left open (the daemon died), a tear pending, several in one transaction."""
    path = tmp_path / "journal.db"
    with Journal(path) as journal:
        journal.append_many([refusal(), refusal()])
        paid = journal.append(intent(1))
        journal.append(completion_of(paid))
        journal.mark_acked_ids(range(1, 5))
        assert journal.prune(2**62, chunk=3) == 3
        torn = journal.append(intent(2))
        journal.append(Draft(kind=KIND_DEBIT, state="torn", terminal_id=torn.terminal_id,
                             amount=torn.amount, card_serial=torn.card_serial,
                             terminal_seq=2, ref=torn.id))
        journal.append(intent(3))
    with Journal(path) as journal:
        assert len(journal.dangling_intents()) == 1
        assert len(journal.pending_recoveries()) == 1
        assert journal.next_terminal_seq() == 4


# --- 9: a meta value that is not a number ------------------------------------------------------
def test_a_max_terminal_seq_that_is_not_a_number_is_said_by_run_verify_and_salvage(
        tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    paid_tap_journal(path)
    raw(path, "INSERT OR REPLACE INTO meta (key, value) VALUES ('max_terminal_seq', 'x7')")
    with pytest.raises(JournalError, match="max_terminal_seq is 'x7', not a number"):
        Journal(path).open()
    config = config_for(tmp_path, path)

    checked = tapgate("journal", "verify", "--config", str(config))
    assert checked.returncode != 0
    assert "max_terminal_seq" in checked.stderr + checked.stdout
    assert "Traceback" not in checked.stderr

    assert "max_terminal_seq is 'x7'" in refused_run(tmp_path, path)

    out = tmp_path / "salvaged.db"
    saved = tapgate("journal", "salvage", "--config", str(config), "--out", str(out))
    assert saved.returncode == 1, saved.stdout + saved.stderr  # something was lost
    assert "Traceback" not in saved.stderr
    assert "nothing lost" not in saved.stdout
    assert "lost: meta max_terminal_seq" in saved.stdout
    with Journal(out) as journal:  # the copy is sound, its numbers never go back
        assert journal.verify().ok
        assert journal.next_terminal_seq() > 1
