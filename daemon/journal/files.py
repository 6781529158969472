"""The journal's files on disk: the WAL copied back between taps and fsynced on demand,
their size, and the room left on their filesystem.

The WAL is bounded: once copied back it keeps at most WAL_LIMIT of the disk
(journal_size_limit), and none when the disk is short of space or the WAL grew past its
limit (a TRUNCATE checkpoint): a WAL that filled a small disk while checkpoints failed
gives the room back once they work again, and the gate comes back into service."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading

import peewee

from daemon.journal import sql
from daemon.journal.db import BUSY_TIMEOUT_MS, WAL_LIMIT, JournalDb, wrap
from protocol.errors import JournalError

log = logging.getLogger("tapgate.journal")

# Below this much free disk every checkpoint gives the WAL's room back (TRUNCATE): the
# next commit starts a new WAL file, two fsyncs instead of one, which a short disk pays.
SHORT_OF_SPACE = 4 * WAL_LIMIT


class Files:
    """The journal's database file and WAL, through its connection."""

    def __init__(self, db: JournalDb) -> None:
        self._db = db
        # The WAL as checkpoint() left it, started over (see there); None: not so now.
        self._wal_primed: tuple[int, int, int] | None = None

    def closed(self) -> None:
        """The connection is gone: what checkpoint() saw of it is no longer so."""
        self._wal_primed = None

    def sync(self) -> None:
        """fsync the WAL: every commit so far survives a power cut too."""
        try:
            fd = os.open(f"{self._db.path}-wal", os.O_RDONLY)
        except FileNotFoundError:
            return  # no WAL: everything is in the database file, synced by its checkpoint
        except OSError as err:
            raise wrap(err, "cannot sync the journal") from err
        try:
            os.fsync(fd)
        except OSError as err:
            raise wrap(err, "cannot sync the journal") from err
        finally:
            os.close(fd)

    def checkpoint(self) -> None:
        """Copy the WAL back into the database without blocking anyone (PASSIVE). The
        card loop calls it when no card is in the field and every few seconds.

        Once the whole WAL is in the database, the next commit starts the WAL over, and
        the first commit of a new WAL writes and fsyncs its header before its own fsync:
        two fsyncs where one will do. That commit would be the next tap's intent, so
        the WAL is started over here, between taps, by a commit that changes nothing.
        """
        try:
            if self._wal_primed is not None and self._wal_primed == self._wal_state():
                return  # nothing was written since: the WAL holds only that commit
            self._wal_primed = None
            busy, frames, copied = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except (peewee.DatabaseError, sqlite3.DatabaseError, OSError) as err:
            log.warning("journal checkpoint failed (retried later): %s", err)
            return
        if busy == 0 and frames > 0 and copied == frames:
            if self._wal_bytes() > WAL_LIMIT or self._disk_free() < SHORT_OF_SPACE:
                self._truncate_wal()
            try:
                self._start_wal_over()
            except JournalError as err:
                log.debug("journal WAL not started over (the next commit will): %s", err)

    def _truncate_wal(self) -> None:
        """Give the WAL's room back to the disk: a TRUNCATE checkpoint, which waits for
        no reader (one that holds the WAL makes it give up, to be tried again later)."""
        try:
            self._db.execute("PRAGMA busy_timeout = 0")
            try:
                busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        except (peewee.DatabaseError, sqlite3.DatabaseError, OSError) as err:
            log.warning("journal WAL not truncated (tried again later): %s", err)
            return
        if busy:
            log.info("journal WAL not truncated: a reader holds it (tried again later)")

    def _wal_bytes(self) -> int:
        try:
            return os.stat(f"{self._db.path}-wal").st_size
        except FileNotFoundError:
            return 0

    def _wal_state(self) -> tuple[int, int, int]:
        """What changes whenever anything commits: this thread's connection's own
        changes, and the data_version that moves on other connections' commits."""
        changes, version = self._db.execute(sql.WAL_STATE).fetchone()
        return threading.get_ident(), int(changes), int(version)

    def _start_wal_over(self) -> None:
        # rewrites user_version as it is: one page in the WAL, no content changed
        with self._db.writing("cannot start the WAL over", immediate=True):
            version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
            self._db.execute(f"PRAGMA user_version = {version}")
            state = self._wal_state()  # no one else can commit before this does
        self._wal_primed = state

    def free_bytes(self) -> int:
        """Free space on the journal's filesystem, as an unprivileged writer sees it, less
        the room the WAL may still grow into up to its limit: the reserve of free disk
        that a debit needs to start is then there with the WAL grown too."""
        return max(0, self._disk_free() - max(0, WAL_LIMIT - self._wal_bytes()))

    def _disk_free(self) -> int:
        st = os.statvfs(self._db.path.parent)
        return st.f_bavail * st.f_frsize

    def disk_used_pct(self) -> float:
        """How full the journal's filesystem is, in percent (root's reserve counts as used)."""
        st = os.statvfs(self._db.path.parent)
        return 100.0 * (1 - st.f_bavail / st.f_blocks) if st.f_blocks else 0.0

    def size_bytes(self) -> int:
        """The database file and its WAL, as they are on disk now."""
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(f"{self._db.path}{suffix}").st_size
        return total
