"""Remote management state (journal schema v5): what operators' commands changed (the
deny list, config values, the desired state's version) and the highest sequence number
applied from each operator key. It lives in the journal so that it survives a restart,
and a command's check-and-record of its sequence number and the state it changes are
one transaction (:meth:`Journal.control`): all or nothing, and a replay is refused.

Part of :class:`~daemon.journal.store.Journal` (a mixin on :class:`~daemon.journal.db._Db`).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterable, Iterator
from typing import Any

import peewee

from daemon.journal.db import _SET_META, _Db, _wrap


class _RemoteState(_Db):
    """Remote management (v5): what operators' commands changed."""

    def last_command_seq(self, key_id: str) -> int | None:
        """The highest sequence number applied from this operator key, if any."""
        value = self._scalar("SELECT seq FROM command_seq WHERE key_id = ?", (key_id,))
        return int(value) if value is not None else None

    def deny_list(self) -> tuple[int, frozenset[bytes]]:
        """The deny list's version and its card serials."""
        try:
            rows = self._sql("SELECT serial FROM deny_list").fetchall()
        except (peewee.DatabaseError, sqlite3.DatabaseError) as err:
            raise _wrap(err, "cannot read the journal") from err
        return _meta_int(self._scalar(_GET_META, (DENY_VERSION,))), frozenset(
            bytes(r[0]) for r in rows)

    def remote_config(self) -> dict[str, Any]:
        """Config values operators set (dotted gate.* key -> value), to re-apply at start."""
        try:
            rows = self._sql("SELECT key, value FROM remote_config ORDER BY key").fetchall()
        except (peewee.DatabaseError, sqlite3.DatabaseError) as err:
            raise _wrap(err, "cannot read the journal") from err
        return {str(k): json.loads(v) for k, v in rows}

    def desired_version(self) -> int:
        """The version of the desired state (shadow) last applied; 0: none."""
        return _meta_int(self._scalar(_GET_META, (DESIRED_VERSION,)))

    @contextlib.contextmanager
    def control(self) -> Iterator[Control]:
        """One committed, fsynced transaction under the writer lock, for a command's
        check-and-record (its sequence number) and the state it changes: all or nothing."""
        with self._lock:
            try:
                with self._db.atomic():
                    yield Control(self)
            except (peewee.DatabaseError, sqlite3.DatabaseError, OSError) as err:
                raise _wrap(err, "cannot record a remote command") from err


_GET_META = "SELECT value FROM meta WHERE key = ?"
DENY_VERSION = "deny_list_version"
DESIRED_VERSION = "desired_version"


def _meta_int(value: Any) -> int:
    return int(value) if value is not None else 0


class Control:
    """Inside :meth:`Journal.control`: reads and writes of the remote management state."""

    def __init__(self, journal: _Db) -> None:
        self._journal = journal

    def _sql(self, sql: str, params: Any = None) -> Any:
        return self._journal._sql(sql, params)

    def claim_seq(self, key_id: str, seq: int) -> int | None:
        """Record ``seq`` as applied from ``key_id`` and return None, or, when it is not
        above the highest applied so far (a replay), write nothing and return that."""
        row = self._sql("SELECT seq FROM command_seq WHERE key_id = ?", (key_id,)).fetchone()
        if row is not None and seq <= int(row[0]):
            return int(row[0])
        self._sql("INSERT OR REPLACE INTO command_seq (key_id, seq) VALUES (?, ?)",
                  (key_id, seq))
        return None

    def savepoint(self) -> Any:
        """A nested transaction: what a refused command wrote is undone, its seq kept."""
        return self._journal._db.atomic()

    def deny_version(self) -> int:
        row = self._sql(_GET_META, (DENY_VERSION,)).fetchone()
        return _meta_int(row[0] if row else None)

    def change_deny_list(self, version: int, add: Iterable[bytes],
                         remove: Iterable[bytes]) -> None:
        for serial in remove:
            self._sql("DELETE FROM deny_list WHERE serial = ?", (serial,))
        for serial in add:
            self._sql("INSERT OR IGNORE INTO deny_list (serial) VALUES (?)", (serial,))
        self._sql(_SET_META, (DENY_VERSION, str(version)))

    def set_remote_config(self, changes: dict[str, Any]) -> None:
        for key, value in changes.items():
            self._sql("INSERT OR REPLACE INTO remote_config (key, value) VALUES (?, ?)",
                      (key, json.dumps(value)))

    def desired_version(self) -> int:
        row = self._sql(_GET_META, (DESIRED_VERSION,)).fetchone()
        return _meta_int(row[0] if row else None)

    def set_desired_version(self, version: int) -> None:
        self._sql(_SET_META, (DESIRED_VERSION, str(version)))

