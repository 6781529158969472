"""The journal as the uplink's outbox: which entries the head-end has not acknowledged,
read for sending (already encoded, by SQLite), the acks recorded, and what is synced and
old pruned.

Acks and pruning write under the journal's one writer lock, like appends
(:class:`~daemon.journal.db.JournalDb`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from daemon.journal import sql
from daemon.journal.db import JournalDb
from protocol.entry import ENTRY_FIELDS, Entry, wire_fields

log = logging.getLogger("tapgate.journal")


@dataclass(frozen=True, slots=True)
class Outgoing:
    """Entries not yet acknowledged, encoded for the uplink (:meth:`Outbox.unacked_wire`)."""

    ids: list[int]
    uuids: list[str]
    json: str  # their canonical JSON, comma-separated: the inside of a JSON array


class Outbox:
    """Sync state: the journal is the uplink's outbox."""

    def __init__(self, db: JournalDb) -> None:
        self._db = db

    def unacked(self, after_id: int = 0, limit: int = 100) -> list[Entry]:
        """Entries the head-end has not acknowledged, in id order, after ``after_id``."""
        return self._db.read_entries(sql.UNACKED, (after_id, limit))

    def unacked_json(self, after_id: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """:meth:`unacked` in the JSON form (``Entry.to_json``) straight from the rows:
        what the uplink sends, without building an Entry for each on the way."""
        return [_row_json(row) for row in self._db.read(sql.UNACKED, (after_id, limit))]

    def unacked_wire(self, after_id: int = 0, limit: int = 100) -> Outgoing | None:
        """:meth:`unacked_json` already encoded, as the uplink sends it; None: nothing.

        The entries' JSON is exactly ``json.dumps(entry.to_json(), sort_keys=True,
        separators=(",", ":"))`` (``contract.canonical``) of each, comma-separated. SQLite
        writes it (``sql.WIRE_JSON``, from the entry's wire form) and hands the batch
        over as one row: no Python object per entry, and one release of the GIL, not
        one per row (another busy thread, paho's, would hold each of those up). Where
        SQLite's JSON and Python's could differ in a single byte (a string with anything
        to escape or beyond printable ASCII, a value not of its field's type), Python
        encodes the batch."""
        [(ids, uuids, text)] = self._db.read(sql.UNACKED_WIRE, (after_id, limit))
        if ids is None:
            return None
        # the three aggregates saw the same rows in the same order; id order is checked,
        # and that no uuid held a comma
        out = Outgoing([int(i) for i in ids.split(",")], uuids.split(","), text)
        if (not text.isascii() or "\\" in text or "\x7f" in text
                or out.ids != sorted(out.ids) or len(out.uuids) != len(out.ids)):
            rows = self.unacked_json(after_id, limit)
            out = Outgoing([r["id"] for r in rows], [r["uuid"] for r in rows], ",".join(
                json.dumps(r, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
                for r in rows))
        return out

    def mark_acked_ids(self, ids: Iterable[int]) -> int:
        """:meth:`mark_acked` by journal id (the uplink knows the ids it sent in each
        batch): one UPDATE per run of consecutive ids, all in one committed, fsynced
        transaction under the writer lock. Returns how many were newly acknowledged."""
        runs = _runs(ids)
        if not runs:
            return 0
        now_ms = self._db.now_ms()
        with self._db.writing("cannot record acknowledged entries"):
            return sum(max(0, int(self._db.execute(sql.MARK_ACKED_RUN, (now_ms, first, last)
                                                   ).rowcount)) for first, last in runs)

    def mark_acked(self, uuids: Iterable[str]) -> int:
        """Record that the head-end stored these entries: one committed, fsynced
        transaction under the writer lock. Returns how many were newly acknowledged."""
        now_ms = self._db.now_ms()
        rows = [(now_ms, u) for u in dict.fromkeys(uuids)]
        if not rows:
            return 0
        with self._db.writing("cannot record acknowledged entries"):
            return self._db.execute_many(sql.MARK_ACKED, rows)

    def pending_sync_count(self) -> int:
        """Entries the head-end has not acknowledged."""
        return int(self._db.scalar(sql.PENDING_SYNC) or 0)

    def oldest_unacked_ms(self) -> int | None:
        """When the oldest entry the head-end has not acknowledged was written."""
        value = self._db.scalar(sql.OLDEST_UNACKED)
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
        with self._db.transaction():  # one read snapshot, and the writer is not held up
            through = self._prunable_through(older_than_ms)
        total = 0
        while True:
            done = self._db.prune_from_start(through, chunk)
            total += done
            if done < chunk:
                if total:
                    log.info("journal: pruned %d acknowledged entries (through id %d)",
                             total, through)
                return total

    def _prunable_through(self, older_than_ms: int) -> int:
        """The highest id such that it and every entry before it may be pruned."""
        stops = [self._db.scalar(statement, params) for statement, params in (
            (sql.LAST_ID, ()),
            (sql.FIRST_UNACKED_ID, ()),
            (sql.FIRST_YOUNG_ID, (older_than_ms,)),
            (sql.FIRST_PENDING_TEAR_ID, ()),
            (sql.FIRST_DANGLING_INTENT_ID, ()),
        )]
        found = [int(s) for s in stops if s is not None]
        return min(found) - 1 if found else 0


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
