"""The journal as the uplink's outbox: which entries the head-end has not acknowledged,
read for sending (already encoded, by SQLite), the acks recorded, and what is synced and
old pruned.

Part of :class:`~daemon.journal.store.Journal` (a mixin on :class:`~daemon.journal.db._Db`):
acks and pruning write under the journal's one writer lock, like appends.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import peewee

from daemon.journal.db import _COLUMNS, _SET_META, _Db, _wrap
from protocol.entry import (
    COMPLETED,
    ENTRY_FIELDS,
    INTENT,
    KIND_DEBIT,
    KIND_RECOVERY,
    TORN,
    Entry,
    wire_fields,
    wire_value,
)

log = logging.getLogger("tapgate.journal")


class _Outbox(_Db):
    """Sync state: the journal is the uplink's outbox."""

    # Journal's own, which pruning moves on: the highest terminal sequence number used
    # (kept in meta as entries go, so none is reused), and the passages anti-passback
    # answers from memory (an entry pruned is no longer the journal's answer).
    _max_seq: int
    _passages: dict[bytes, tuple[int, int]]

    def unacked(self, after_id: int = 0, limit: int = 100) -> list[Entry]:
        """Entries the head-end has not acknowledged, in id order, after ``after_id``."""
        return self._rows(_UNACKED, (after_id, limit))

    def unacked_json(self, after_id: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """:meth:`unacked` in the JSON form (``Entry.to_json``) straight from the rows:
        what the uplink sends, without building an Entry for each on the way."""
        try:
            rows = self._sql(_UNACKED, (after_id, limit)).fetchall()
        except (peewee.DatabaseError, sqlite3.DatabaseError) as err:
            raise _wrap(err, "cannot read the journal") from err
        return [_row_json(row) for row in rows]

    def unacked_wire(self, after_id: int = 0, limit: int = 100) -> Outgoing | None:
        """:meth:`unacked_json` already encoded, as the uplink sends it; None: nothing.

        The entries' JSON is exactly ``json.dumps(entry.to_json(), sort_keys=True,
        separators=(",", ":"))`` (``contract.canonical``) of each, comma-separated. SQLite
        writes it (json_object, keys in sorted order, blobs as uppercase hex) and hands
        the batch over as one row: no Python object per entry, and one release of the
        GIL, not one per row (another busy thread, paho's, would hold each of those up).
        Where SQLite's JSON and Python's could differ in a single byte (a string with
        anything to escape or beyond printable ASCII, a REAL), Python encodes the batch."""
        try:
            ids, uuids, text = self._sql(_UNACKED_WIRE, (after_id, limit)).fetchone()
        except (peewee.DatabaseError, sqlite3.DatabaseError) as err:
            raise _wrap(err, "cannot read the journal") from err
        if ids is None:
            return None
        # the three aggregates saw the same rows in the same order; id order is checked,
        # and that no uuid held a comma
        out = Outgoing([int(i) for i in ids.split(",")], uuids.split(","), text)
        if (not text.isascii() or "\\" in text or "\x7f" in text
                or out.ids != sorted(out.ids) or len(out.uuids) != len(out.ids)):
            rows = [_row_json(r) for r in self._rows_raw(_UNACKED, (after_id, limit))]
            out = Outgoing([r["id"] for r in rows], [r["uuid"] for r in rows], ",".join(
                json.dumps(r, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
                for r in rows))
        return out

    def _rows_raw(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            return list(self._sql(sql, params).fetchall())
        except (peewee.DatabaseError, sqlite3.DatabaseError) as err:
            raise _wrap(err, "cannot read the journal") from err

    def mark_acked_ids(self, ids: Iterable[int]) -> int:
        """:meth:`mark_acked` by journal id (the uplink knows the ids it sent in each
        batch): one UPDATE per run of consecutive ids, all in one committed, fsynced
        transaction under the writer lock. Returns how many were newly acknowledged."""
        runs = _runs(ids)
        if not runs:
            return 0
        now_ms = int(self._clock() * 1000)
        with self._lock:
            try:
                with self._db.atomic():
                    return sum(max(0, int(self._sql(_MARK_ACKED_RUN, (now_ms, first, last)
                                                    ).rowcount)) for first, last in runs)
            except (peewee.DatabaseError, sqlite3.DatabaseError, OSError) as err:
                raise _wrap(err, "cannot record acknowledged entries") from err

    def mark_acked(self, uuids: Iterable[str]) -> int:
        """Record that the head-end stored these entries: one committed, fsynced
        transaction under the writer lock. Returns how many were newly acknowledged."""
        now_ms = int(self._clock() * 1000)
        rows = [(now_ms, u) for u in dict.fromkeys(uuids)]
        if not rows:
            return 0
        with self._lock:
            try:
                with self._db.atomic():
                    cursor = self._db.cursor()  # type: ignore[no-untyped-call]
                    cursor.executemany(_MARK_ACKED, rows)
                    return max(0, int(cursor.rowcount))
            except (peewee.DatabaseError, sqlite3.DatabaseError, OSError) as err:
                raise _wrap(err, "cannot record acknowledged entries") from err

    def pending_sync_count(self) -> int:
        """Entries the head-end has not acknowledged."""
        return int(self._scalar(_PENDING_SYNC, ()) or 0)

    def oldest_unacked_ms(self) -> int | None:
        """When the oldest entry the head-end has not acknowledged was written."""
        value = self._scalar(_OLDEST_UNACKED, ())
        return int(value) if value is not None else None

    def prune(self, older_than_ms: int, *, chunk: int = 2000) -> int:
        """Delete acknowledged entries written before ``older_than_ms``, oldest first.

        Only a run from the start of the journal goes, so the chain never gets a hole:
        pruning stops at the first entry that must stay (not acknowledged, too young, a
        tear still awaiting its card or that tear's intent, an intent with no outcome,
        or the newest entry, which the next append continues from). Meta keeps the hash
        of the last entry deleted (``chain_anchor``: verify checks the first entry kept
        against it) and the highest terminal sequence number used, so none is reused.
        Deletes in chunks, each its own transaction under the writer lock, so a tap
        never waits behind a long delete. Returns how many entries went.
        """
        with self._db.atomic():  # one read snapshot, and the writer is not held up
            through = self._prunable_through(older_than_ms)
        total = 0
        while True:
            with self._lock:
                done = self._prune_chunk(through, chunk)
            total += done
            if done < chunk:
                if total:
                    log.info("journal: pruned %d acknowledged entries (through id %d)",
                             total, through)
                return total

    def _prunable_through(self, older_than_ms: int) -> int:
        """The highest id such that it and every entry before it may be pruned."""
        stops = [self._scalar(sql, params) for sql, params in (
            ("SELECT MAX(id) FROM entry", ()),
            (_FIRST_UNACKED_ID, ()),
            (_FIRST_YOUNG_ID, (older_than_ms,)),
            (_FIRST_PENDING_TEAR_ID, ()),
            (_FIRST_DANGLING_INTENT_ID, ()),
        )]
        found = [int(s) for s in stops if s is not None]
        return min(found) - 1 if found else 0

    def _prune_chunk(self, through: int, chunk: int) -> int:
        first = self._scalar("SELECT MIN(id) FROM entry", ())
        if first is None or int(first) > through:
            return 0
        upto = min(through, int(first) + chunk - 1)
        try:
            with self._db.atomic():
                last_hash, max_seq = self._sql(
                    "SELECT (SELECT hash FROM entry WHERE id = ?), "
                    "MAX(terminal_seq) FROM entry WHERE id <= ?", (upto, upto)).fetchone()
                stored = self._sql("SELECT value FROM meta WHERE key = 'max_terminal_seq'"
                                   ).fetchone()
                seq = max(int(max_seq or 0), int(stored[0]) if stored else 0, self._max_seq)
                deleted = int(self._sql("DELETE FROM entry WHERE id <= ?", (upto,)).rowcount)
                self._sql(_SET_META, ("chain_anchor", wire_value(bytes(last_hash))))
                self._sql(_SET_META, ("max_terminal_seq", str(seq)))
        except (peewee.DatabaseError, sqlite3.DatabaseError, OSError) as err:
            raise _wrap(err, "cannot prune the journal") from err
        self._max_seq = seq
        # a card whose last passage went has none left in the journal (older ones went too)
        for serial in [s for s, (entry_id, _) in self._passages.items() if entry_id <= upto]:
            del self._passages[serial]
        return deleted


# The uplink's statements. INDEXED BY: the partial index holds only unacknowledged
# entries, so these cost the backlog, not the journal's length.
_UNACKED = (f"SELECT {_COLUMNS} FROM entry INDEXED BY entry_unacked "
            "WHERE acked_ms IS NULL AND id > ? ORDER BY id LIMIT ?")
_MARK_ACKED = "UPDATE entry SET acked_ms = ? WHERE uuid = ? AND acked_ms IS NULL"
_MARK_ACKED_RUN = "UPDATE entry SET acked_ms = ? WHERE id BETWEEN ? AND ? AND acked_ms IS NULL"
_PENDING_SYNC = "SELECT COUNT(*) FROM entry INDEXED BY entry_unacked WHERE acked_ms IS NULL"
_OLDEST_UNACKED = ("SELECT created_ms FROM entry INDEXED BY entry_unacked "
                   "WHERE acked_ms IS NULL ORDER BY id LIMIT 1")
_FIRST_UNACKED_ID = ("SELECT id FROM entry INDEXED BY entry_unacked "
                     "WHERE acked_ms IS NULL ORDER BY id LIMIT 1")
# Retention: what must stay. Entries are read from the start, which is what goes.
_FIRST_YOUNG_ID = "SELECT id FROM entry WHERE created_ms >= ? ORDER BY id LIMIT 1"
_FIRST_PENDING_TEAR_ID = f"""
    SELECT MIN(MIN(t.id, COALESCE(t.ref, t.id))) FROM entry AS t
    WHERE t.kind = '{KIND_DEBIT}' AND t.state = '{TORN}'
      AND NOT EXISTS (SELECT 1 FROM entry AS r WHERE r.ref = t.id AND r.kind = '{KIND_RECOVERY}')"""
_FIRST_DANGLING_INTENT_ID = f"""
    SELECT MIN(i.id) FROM entry AS i
    WHERE i.kind = '{KIND_DEBIT}' AND i.state = '{INTENT}'
      AND NOT EXISTS (SELECT 1 FROM entry AS o WHERE o.ref = i.id AND o.kind = '{KIND_DEBIT}'
                      AND o.state IN ('{COMPLETED}', '{TORN}'))"""


# What the uplink sends: each entry's canonical JSON, written by SQLite.
def _wire_value(column: str) -> str:
    # Entry.to_json's rule (bytes as uppercase hex, the rest as it is), in SQL. A REAL,
    # which the journal never writes, becomes a backslash: unacked_wire then leaves
    # the entry to Python, whose float format is not SQLite's.
    return (f"CASE typeof({column}) WHEN 'blob' THEN hex({column}) "
            f"WHEN 'real' THEN char(92) ELSE {column} END")


_WIRE_JSON = "json_object(" + ", ".join(
    f"'{name}', {_wire_value(name)}" for name in sorted(ENTRY_FIELDS)) + ")"
_UNACKED_WIRE = (
    "SELECT group_concat(id), group_concat(uuid), group_concat(wire) FROM ("
    f"SELECT id, uuid, {_WIRE_JSON} AS wire FROM entry INDEXED BY entry_unacked "
    "WHERE acked_ms IS NULL AND id > ? ORDER BY id LIMIT ?)")


@dataclass(frozen=True, slots=True)
class Outgoing:
    """Entries not yet acknowledged, encoded for the uplink (:meth:`Journal.unacked_wire`)."""

    ids: list[int]
    uuids: list[str]
    json: str  # their canonical JSON, comma-separated: the inside of a JSON array


def _row_json(row: tuple[Any, ...]) -> dict[str, Any]:
    return wire_fields(zip(ENTRY_FIELDS, row, strict=True))


def _runs(ids: Iterable[int]) -> list[tuple[int, int]]:
    """Ids as (first, last) runs of consecutive ids, ascending."""
    runs: list[tuple[int, int]] = []
    for i in sorted(set(ids)):
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs
