"""The journal's SQLite underneath: the state every part of the journal shares, the reads
they all make, and SQLite's errors said as the journal's (a full disk as
:class:`JournalFull`, on which no new debit may start).

:class:`~daemon.journal.store.Journal` is :class:`_Db` and its parts, each a mixin on it
in its own module (the outbox, remote management, the audit): one object, one
connection, one writer lock.
"""

from __future__ import annotations

import errno
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import peewee

from protocol.entry import ENTRY_FIELDS, Entry
from protocol.errors import JournalError, JournalFull


def _is_full(err: BaseException) -> bool:
    text = str(err)
    if isinstance(err, (sqlite3.OperationalError, peewee.OperationalError)) and (
        "full" in text or "disk I/O" in text
    ):
        return True
    return isinstance(err, OSError) and err.errno == errno.ENOSPC


def _wrap(err: Exception, doing: str) -> JournalError:
    # SQLite rolls a transaction back by itself on SQLITE_FULL; peewee's rollback then
    # fails with "no transaction is active" and hides the cause: look down the chain.
    cause: BaseException | None = err
    while cause is not None:
        if _is_full(cause):
            return JournalFull(f"{doing}: {cause}")
        cause = cause.__context__
    return JournalError(f"{doing}: {err}")


class _Db:
    """What the parts of the journal stand on. ``Journal.__init__`` sets these; they are
    declared here so that each part is type-checked on its own."""

    path: Path
    _clock: Callable[[], float]
    _lock: threading.Lock
    _db: peewee.SqliteDatabase
    _row: Any  # the entry table's model class (schema.bind)
    _meta: Any  # the meta table's model class

    def _sql(self, sql: str, params: Any = None) -> Any:
        return self._db.execute_sql(sql, params)  # type: ignore[no-untyped-call]

    def _entries(self, query: Any) -> list[Entry]:
        try:
            return [_entry(row) for row in query]
        except (peewee.DatabaseError, sqlite3.DatabaseError) as err:
            raise _wrap(err, "cannot read the journal") from err

    def _rows(self, sql: str, params: tuple[Any, ...]) -> list[Entry]:
        try:
            cursor = self._sql(sql, params)
            return [_entry_from_tuple(row) for row in cursor.fetchall()]
        except (peewee.DatabaseError, sqlite3.DatabaseError) as err:
            raise _wrap(err, "cannot read the journal") from err

    def entries(self, after_id: int = 0, batch: int = 1000) -> Iterator[Entry]:
        """Every entry in id order, read in batches (constant memory on big journals)."""
        last = after_id
        while True:
            rows = self._entries(
                self._row.select().where(self._row.id > last).order_by(self._row.id).limit(batch)
            )
            if not rows:
                return
            yield from rows
            last = rows[-1].id

    def _scalar(self, sql: str, params: tuple[Any, ...]) -> Any:
        try:
            row = self._sql(sql, params).fetchone()
        except (peewee.DatabaseError, sqlite3.DatabaseError) as err:
            raise _wrap(err, "cannot read the journal") from err
        return row[0] if row else None


_COLUMNS = ", ".join(ENTRY_FIELDS)
_SET_META = "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)"


def _entry_from_tuple(row: tuple[Any, ...]) -> Entry:
    values: list[Any] = [bytes(v) if isinstance(v, (memoryview, bytearray)) else v for v in row]
    return Entry(*values)


def _entry(row: Any) -> Entry:
    values: dict[str, Any] = {}
    for name in ENTRY_FIELDS:
        value = getattr(row, name)
        values[name] = bytes(value) if isinstance(value, (memoryview, bytearray)) else value
    return Entry(**values)
