"""What the journal checks before the gate runs on it: enough to trust what start-up
reads, without walking the whole chain.

Start-up relies on a few entries: the tail (the next entry chains from it), every
intent no outcome follows (start-up turns each into a tear), every tear no recovery
settles yet (the card's next tap is a recovery) and what refers to them. It finds the
open ones through indexes that SQLite's quick_check does not compare with the table.
So, before any of it is believed:

- SQLite's quick_check (every page and B-tree well formed);
- meta's values are what the journal wrote there (a number, a hash);
- the indexes that find the open ones, summed key by key against the table itself;
- each entry start-up relies on, and its neighbours in the chain, hash-checked: its hash
  matches its content, it follows the entry before and the entry after follows it.

A damaged journal is refused with a message that says to salvage it: a gate that runs on
one may charge a card twice or let a debit go unrecorded.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

import peewee

from daemon.journal import sql
from daemon.journal.db import JournalDb, chain_anchor, damaged, stored_seq
from protocol.entry import Entry, chain_hash


def intact(entry: Entry) -> bool:
    """The entry's hash matches its content (a damaged row may not even hash)."""
    try:
        return chain_hash(entry.to_json()) == entry.hash
    except (TypeError, ValueError, AttributeError, UnicodeError):
        return False


def check_start(db: JournalDb) -> None:
    """Refuse a damaged journal (see the module); return quietly on a sound one."""
    path = db.path
    try:
        problems = [str(row[0]) for row in db.execute("PRAGMA quick_check(5)").fetchall()]
        if problems != ["ok"]:
            raise damaged(path, "SQLite quick_check: " + "; ".join(problems))
        stored_seq(path, db.meta(sql.MAX_TERMINAL_SEQ))
        anchor = chain_anchor(path, db.meta(sql.CHAIN_ANCHOR))
        tail = db.scalar(sql.LAST_ID)
        if tail is None:
            return
        dangling = [int(r[0]) for r in db.execute(sql.DANGLING_IDS).fetchall()]
        pending = [int(r[0]) for r in db.execute(sql.PENDING_TEAR_IDS).fetchall()]
        if db.execute(sql.SUMS_BY_TABLE).fetchone() != db.execute(sql.SUMS_BY_INDEX).fetchone():
            raise damaged(path, "an index does not match the table: open intents or tears "
                                "would be missed")
        relied = {int(tail), *dangling, *pending}
        for row in db.execute(sql.REFERRING_IDS.format(
                ids=", ".join(str(i) for i in sorted(set(dangling) | set(pending)))
                or "NULL")).fetchall():
            relied.update(int(v) for v in row if isinstance(v, int))
        _check_chain(db, relied, anchor)
    except (peewee.DatabaseError, sqlite3.DatabaseError, UnicodeDecodeError) as err:
        raise damaged(path, str(err)) from err


def _check_chain(db: JournalDb, ids: Iterable[int], anchor: bytes) -> None:
    """Each entry hash-checked and chained to its neighbours (one read per run of ids)."""
    first = int(db.scalar(sql.FIRST_ID))
    wanted = sorted({n for i in ids for n in (i - 1, i, i + 1) if n >= first})
    entries: dict[int, Entry] = {}
    for lo, hi in _runs(wanted):
        for found in db.read_entries(sql.BETWEEN, (lo, hi)):
            entries[found.id] = found
    for entry_id in wanted:
        entry = entries.get(entry_id)
        if entry is None:
            if entry_id <= int(db.scalar(sql.LAST_ID)):
                raise damaged(db.path, f"entry {entry_id} is missing from the chain")
            continue
        if not intact(entry):
            raise damaged(db.path, f"entry {entry_id}: its hash does not match its content")
        before = entries.get(entry_id - 1)
        expected = anchor if entry_id == first else (before.hash if before else None)
        if expected is not None and entry.prev_hash != expected:
            raise damaged(db.path, f"entry {entry_id} does not follow entry {entry_id - 1}")


def _runs(ids: list[int]) -> Iterable[tuple[int, int]]:
    start = prev = None
    for i in ids:
        if prev is not None and i == prev + 1:
            prev = i
            continue
        if start is not None and prev is not None:
            yield start, prev
        start = prev = i
    if start is not None and prev is not None:
        yield start, prev
