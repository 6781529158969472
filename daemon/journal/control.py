"""Remote management state (journal schema v5, v6): what operators' commands changed
(the deny list, config values, the desired state's version), the highest sequence number
applied from each operator key and the answers the last ANSWERS_KEPT of them got. It
lives in the journal so that it survives a restart, and a command's check-and-record of
its sequence number, its answer and the state it changes are one transaction
(:meth:`RemoteState.control`): all or nothing, and a replay is refused (or, the same
command sent again, told the answer it got).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from daemon.journal import sql
from daemon.journal.db import JournalDb

DENY_VERSION = "deny_list_version"  # meta keys
DESIRED_VERSION = "desired_version"
DESIRED_DIGEST = "desired_digest"  # of the applied desired state's args, beside its version
_LAST_SEQ = "SELECT seq FROM command_seq WHERE key_id = ?"
_CLAIM_SEQ = "INSERT OR REPLACE INTO command_seq (key_id, seq) VALUES (?, ?)"
_ANSWER = "SELECT digest, reply FROM command_answer WHERE key_id = ? AND seq = ?"
_SET_ANSWER = ("INSERT OR REPLACE INTO command_answer (key_id, seq, digest, reply) "
               "VALUES (?, ?, ?, ?)")
# all but the newest ANSWERS_KEPT of one key's
_FORGET_ANSWERS = ("DELETE FROM command_answer WHERE key_id = ? AND seq <= (SELECT seq "
                   "FROM command_answer WHERE key_id = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)")
ANSWERS_KEPT = 64  # per operator key: a tool's retries come within minutes, not 64 commands
_DENIED = "SELECT serial FROM deny_list"
_DENY = "INSERT OR IGNORE INTO deny_list (serial) VALUES (?)"
_UNDENY = "DELETE FROM deny_list WHERE serial = ?"
_REMOTE_CONFIG = "SELECT key, value FROM remote_config ORDER BY key"
_SET_REMOTE_CONFIG = "INSERT OR REPLACE INTO remote_config (key, value) VALUES (?, ?)"


class RemoteState:
    """Remote management (v5): what operators' commands changed."""

    def __init__(self, db: JournalDb) -> None:
        self._db = db

    def last_command_seq(self, key_id: str) -> int | None:
        """The highest sequence number applied from this operator key, if any."""
        value = self._db.scalar(_LAST_SEQ, (key_id,))
        return int(value) if value is not None else None

    def deny_list(self) -> tuple[int, frozenset[bytes]]:
        """The deny list's version and its card serials."""
        rows = self._db.read(_DENIED)
        return _meta_int(self._db.meta(DENY_VERSION)), frozenset(bytes(r[0]) for r in rows)

    def remote_config(self) -> dict[str, Any]:
        """Config values operators set (dotted gate.* key -> value), to re-apply at start."""
        return {str(k): json.loads(v) for k, v in self._db.read(_REMOTE_CONFIG)}

    def desired_version(self) -> int:
        """The version of the desired state (shadow) last applied; 0: none."""
        return _meta_int(self._db.meta(DESIRED_VERSION))

    @contextlib.contextmanager
    def control(self) -> Iterator[Control]:
        """One committed, fsynced transaction under the writer lock, for a command's
        check-and-record (its sequence number) and the state it changes: all or nothing."""
        with self._db.writing("cannot record a remote command"):
            yield Control(self._db)


@dataclass(frozen=True, slots=True)
class Claimed:
    """A seq not above the highest applied (``last``), and the answer that command got
    when it is kept and the command is the same (its digest); else None: a replay."""

    last: int
    answer: str | None


class Control:
    """Inside :meth:`RemoteState.control`: reads and writes of the remote management state
    (SQLite's errors as they are: the transaction says what failed)."""

    def __init__(self, db: JournalDb) -> None:
        self._db = db

    def claim_seq(self, key_id: str, seq: int, digest: bytes = b"") -> Claimed | None:
        """Record ``seq`` as applied from ``key_id`` and return None, or, when it is not
        above the highest applied so far, write nothing and return what it was
        (:class:`Claimed`: the answer it got, if it is the same command, by
        ``digest``)."""
        row = self._db.execute(_LAST_SEQ, (key_id,)).fetchone()
        if row is not None and seq <= int(row[0]):
            kept = self._db.execute(_ANSWER, (key_id, seq)).fetchone()
            same = kept is not None and bytes(kept[0]) == digest != b""
            return Claimed(int(row[0]), str(kept[1]) if same else None)
        self._db.execute(_CLAIM_SEQ, (key_id, seq))
        return None

    def keep_answer(self, key_id: str, seq: int, digest: bytes, reply: bytes) -> None:
        """The answer a claimed seq got (or gets, until replaced once it is known); only
        the newest ANSWERS_KEPT of a key are kept."""
        self._db.execute(_SET_ANSWER, (key_id, seq, digest, reply.decode("utf-8")))
        self._db.execute(_FORGET_ANSWERS, (key_id, key_id, ANSWERS_KEPT))

    def savepoint(self) -> contextlib.AbstractContextManager[object]:
        """A nested transaction: what a refused command wrote is undone, its seq kept."""
        return self._db.transaction()

    def deny_version(self) -> int:
        return self._meta_int(DENY_VERSION)

    def change_deny_list(self, version: int, add: Iterable[bytes],
                         remove: Iterable[bytes]) -> None:
        for serial in remove:
            self._db.execute(_UNDENY, (serial,))
        for serial in add:
            self._db.execute(_DENY, (serial,))
        self._db.execute(sql.SET_META, (DENY_VERSION, str(version)))

    def set_remote_config(self, changes: dict[str, Any]) -> None:
        for key, value in changes.items():
            self._db.execute(_SET_REMOTE_CONFIG, (key, json.dumps(value)))

    def desired_version(self) -> int:
        return self._meta_int(DESIRED_VERSION)

    def set_desired_version(self, version: int) -> None:
        self._db.execute(sql.SET_META, (DESIRED_VERSION, str(version)))

    def desired_digest(self) -> str | None:
        """The digest of the desired state last applied; None: none recorded (none
        applied, or applied before digests were kept)."""
        row = self._db.execute(sql.GET_META, (DESIRED_DIGEST,)).fetchone()
        return str(row[0]) if row else None

    def set_desired_digest(self, digest: str) -> None:
        self._db.execute(sql.SET_META, (DESIRED_DIGEST, digest))

    def _meta_int(self, key: str) -> int:
        row = self._db.execute(sql.GET_META, (key,)).fetchone()
        return _meta_int(row[0] if row else None)


def _meta_int(value: str | None) -> int:
    return int(value) if value is not None else 0
