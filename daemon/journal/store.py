"""The durable local journal: SQLite through peewee, WAL, synchronous=FULL, one writer.

It is the only source of truth. The card loop appends to it, sync and the operator CLI
read it (sync also records the head-end's acks and prunes what is synced and old, under
the same writer lock); nothing about a transaction is kept only in memory. Every append is one
committed, fsynced transaction, so an entry that :meth:`Journal.append` returned
survives a crash or a power cut.

:class:`Journal` is one object put together from parts, a module each: this one opens it
and keeps the append path and what the card loop reads on every tap; the outbox
(:mod:`.outbox`: acks, pruning), remote management state (:mod:`.control`) and the
audit (:mod:`.audit`) are mixins on the SQLite underneath (:mod:`.db`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import peewee
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from daemon.journal import schema
from daemon.journal.audit import VerifyReport, _Audit
from daemon.journal.control import Control, _RemoteState
from daemon.journal.db import _COLUMNS, _wrap
from daemon.journal.outbox import Outgoing, _Outbox
from protocol.entry import (
    COMPLETED,
    DRAFT_FIELDS,
    ENTRY_FIELDS,
    GENESIS,
    INTENT,
    KIND_DEBIT,
    KIND_PASS,
    KIND_RECOVERY,
    RECOVERED,
    TORN,
    UNPROVEN,
    Draft,
    Entry,
    chain_hash,
    sign,
    wire_fields,
)
from protocol.errors import JournalError

# VerifyReport, Control and Outgoing live with their part of the journal; callers import
# them from here, as they did before it was split.
__all__ = ["PASSAGES_KEPT_MS", "PASSAGES_LOADED", "SQLITE_MAGIC", "Control", "Journal",
           "Outgoing", "VerifyReport"]

log = logging.getLogger("tapgate.journal")

SQLITE_MAGIC = b"SQLite format 3\x00"
# Anti-passback asks on every tap when a card last went through. The answer comes from
# memory for the passages of about the last hour, and for the last this many entries at
# open; a longer window asks SQLite.
PASSAGES_KEPT_MS = 3_600_000
PASSAGES_LOADED = 5000
_NEVER = -(2**63)


class Journal(_Outbox, _RemoteState, _Audit):
    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time,
                 signer: Ed25519PrivateKey | None = None) -> None:
        self.path = Path(path)
        self._clock = clock
        self._signer = signer
        self._lock = threading.Lock()  # one writer: appends are serialised here
        self._db = peewee.SqliteDatabase(
            str(self.path),
            pragmas={
                "journal_mode": "wal",
                "synchronous": 2,  # FULL: the WAL is fsynced at every commit
                # no checkpoint inside a commit a passenger waits for: the card loop
                # checkpoints between taps (checkpoint())
                "wal_autocheckpoint": 0,
                "busy_timeout": 5000,
                "foreign_keys": 1,
            },
            autoconnect=True,
        )
        self._row, self._meta = schema.bind(self._db)
        self._tail_id = 0
        self._tail_hash = GENESIS
        self._max_seq = 0
        # Card serial -> ids of its torn debits no recovery entry closes yet: what the
        # journal says, read at open() and kept in step by every committed append, so that
        # a tap asks SQLite for a card's tears only when it has some.
        self._tears: dict[bytes, set[int]] = {}
        # Card serial -> (id, created_ms) of its latest passage (a recognised debit or a
        # free pass) among recent entries, oldest first; every passage it lacks was
        # created at or before _passages_floor_ms. Read at open(), kept in step by every
        # committed append and prune.
        self._passages: dict[bytes, tuple[int, int]] = {}
        self._passages_floor_ms = -_NEVER  # nothing is known before open()
        # The WAL as checkpoint() left it, started over (see there); None: not so now.
        self._wal_primed: tuple[int, int, int] | None = None
        self._opened = False

    # -- lifecycle ---------------------------------------------------------------------
    def open(self) -> Journal:
        self._refuse_foreign_file()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db.connect(reuse_if_open=True)
            self._migrate()
            self._load_tail()
            self._load_tears()
            self._load_passages()
        except (peewee.DatabaseError, sqlite3.DatabaseError, OSError) as err:
            self._db.close()
            raise _wrap(err, f"cannot open the journal {self.path}") from err
        self._opened = True
        return self

    def close(self) -> None:
        if not self._db.is_closed():
            self._db.close()
        self._opened = False
        self._wal_primed = None
        self._passages_floor_ms = -_NEVER

    def __enter__(self) -> Journal:
        return self.open() if not self._opened else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _refuse_foreign_file(self) -> None:
        try:
            with self.path.open("rb") as fh:
                head = fh.read(16)
        except FileNotFoundError:
            return
        except OSError as err:
            raise JournalError(f"cannot read the journal {self.path}: {err.strerror}") from err
        if head and head != SQLITE_MAGIC:
            raise JournalError(f"{self.path} is not an SQLite journal (corrupt or foreign file)")

    def _migrate(self) -> None:
        version = int(self._sql("PRAGMA user_version").fetchone()[0])
        if version > schema.SCHEMA_VERSION:
            raise JournalError(
                f"{self.path} has journal schema {version}; this tapgate knows up to "
                f"{schema.SCHEMA_VERSION}: refusing to open a journal from a newer version"
            )
        if version == 0 and self._db.get_tables():
            raise JournalError(f"{self.path} holds tables but is not a tapgate journal")
        with self._db.atomic():
            for step in range(version + 1, schema.SCHEMA_VERSION + 1):
                log.info("journal %s: migrating to schema %d", self.path, step)
                schema.MIGRATIONS[step](self._db, (self._row, self._meta))
                self._sql(f"PRAGMA user_version = {step}")

    def _load_tail(self) -> None:
        row = self._row.select().order_by(self._row.id.desc()).first()
        if row is not None:
            self._tail_id, self._tail_hash = row.id, bytes(row.hash)
        seq = self._row.select(peewee.fn.MAX(self._row.terminal_seq)).scalar()
        stored = self._meta.get_or_none(self._meta.key == "max_terminal_seq")
        self._max_seq = max(int(seq or 0), int(stored.value) if stored else 0)

    def _load_tears(self) -> None:
        self._tears = {}
        for torn in self.pending_recoveries():
            if torn.card_serial is not None:
                self._tears.setdefault(torn.card_serial, set()).add(torn.id)

    def _load_passages(self) -> None:
        horizon = max(0, self._tail_id - PASSAGES_LOADED)
        floor = self._sql(_PASSAGES_FLOOR, (horizon,)).fetchone()[0]
        self._passages = {}
        self._passages_floor_ms = _NEVER if floor is None else int(floor)
        for entry_id, serial, created_ms in self._sql(_PASSAGES_AFTER, (horizon,)).fetchall():
            self._passages.pop(bytes(serial), None)
            self._passages[bytes(serial)] = (int(entry_id), int(created_ms))

    def _note_passages(self, entries: list[Entry]) -> None:
        """Keep :attr:`_passages` in step with entries just committed (writer lock held)."""
        for entry in entries:
            if entry.card_serial is None or (entry.kind, entry.state) not in _PASSAGE_KINDS:
                continue
            self._passages.pop(entry.card_serial, None)  # to the end: the newest
            self._passages[entry.card_serial] = (entry.id, entry.created_ms)
            cutoff = entry.created_ms - PASSAGES_KEPT_MS
            while True:
                serial, (_, created_ms) = next(iter(self._passages.items()))
                if created_ms >= cutoff:
                    break
                # the floor first: a reader on another thread never sees a passage gone
                # that the floor does not cover
                self._passages_floor_ms = max(self._passages_floor_ms, created_ms)
                del self._passages[serial]

    def _note_tears(self, entries: list[Entry]) -> None:
        """Keep :attr:`_tears` in step with entries just committed."""
        for entry in entries:
            serial = entry.card_serial
            if serial is None:
                continue
            if entry.kind == KIND_DEBIT and entry.state == TORN:
                self._tears.setdefault(serial, set()).add(entry.id)
            elif entry.kind == KIND_RECOVERY and entry.ref is not None:
                ids = self._tears.get(serial)
                if ids is not None:
                    ids.discard(entry.ref)
                    if not ids:
                        del self._tears[serial]

    # -- writing -----------------------------------------------------------------------
    def next_terminal_seq(self) -> int:
        """The terminal sequence number the next intent will carry (never reused)."""
        with self._lock:
            return self._max_seq + 1

    def append(self, draft: Draft, *, durable: bool = True) -> Entry:
        """Write one entry, commit it and fsync; return it as stored.

        ``durable=False``: committed without the fsync. The entry is then in the
        kernel's hands: it survives this process dying, not a power cut, until
        :meth:`sync` (or any durable append after it) makes it durable too."""
        with self._lock:
            return self._write([draft], durable=durable)[0]

    def sync(self) -> None:
        """fsync the WAL: every commit so far survives a power cut too."""
        try:
            fd = os.open(f"{self.path}-wal", os.O_RDONLY)
        except FileNotFoundError:
            return  # no WAL: everything is in the database file, synced by its checkpoint
        except OSError as err:
            raise _wrap(err, "cannot sync the journal") from err
        try:
            os.fsync(fd)
        except OSError as err:
            raise _wrap(err, "cannot sync the journal") from err
        finally:
            os.close(fd)

    def append_many(self, drafts: Iterable[Draft]) -> list[Entry]:
        """Write several entries in one committed, fsynced transaction (imports, tests and
        benchmarks; the card loop appends one at a time)."""
        with self._lock:
            return self._write(list(drafts))

    def _write(self, drafts: list[Draft], *, durable: bool = True) -> list[Entry]:
        tail_id, tail_hash = self._tail_id, self._tail_hash
        entries = []
        for draft in drafts:
            values: dict[str, Any] = {name: getattr(draft, name) for name in DRAFT_FIELDS}
            values.update(
                id=tail_id + 1,
                uuid=_new_uuid(),
                created_ms=int(self._clock() * 1000),
                prev_hash=tail_hash,
            )
            # the hash is over the entry's JSON form (Entry.to_json, less hash and sig)
            digest = chain_hash(wire_fields(values))
            sig = sign(self._signer, digest) if self._signer is not None else None
            entry = Entry(**values, hash=digest, sig=sig)
            entries.append(entry)
            tail_id, tail_hash = entry.id, entry.hash
        if not entries:
            return entries
        try:
            self._insert([[getattr(entry, name) for name in ENTRY_FIELDS]
                          for entry in entries], durable=durable)
        except (peewee.DatabaseError, sqlite3.DatabaseError, OSError) as err:
            first = entries[0]
            raise _wrap(err, f"cannot append a {first.kind}/{first.state} entry") from err
        self._tail_id, self._tail_hash = tail_id, tail_hash
        seqs = [e.terminal_seq for e in entries if e.terminal_seq is not None]
        if seqs:
            self._max_seq = max(self._max_seq, *seqs)
        self._note_tears(entries)
        self._note_passages(entries)
        return entries

    def _insert(self, rows: list[list[Any]], *, durable: bool = True) -> None:
        """BEGIN, the INSERTs, COMMIT (fsynced unless not ``durable``): straight on this
        thread's connection, without peewee's transaction objects, which cost a tap's
        intent tens of µs."""
        if self._db.in_transaction():  # inside a caller's atomic(): nest in it
            with self._db.atomic():
                for row in rows:
                    self._sql(_INSERT, row)
            return
        conn: sqlite3.Connection = self._db.connection()  # type: ignore[no-untyped-call]
        if not durable:  # WAL + NORMAL: the commit writes the WAL, with no fsync
            conn.execute("PRAGMA synchronous = NORMAL")
        try:
            conn.execute("BEGIN")
            try:
                for row in rows:
                    conn.execute(_INSERT, row)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # (SQLite ends it by itself on some errors)
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
        finally:
            if not durable:
                conn.execute("PRAGMA synchronous = FULL")

    # -- reading -----------------------------------------------------------------------
    def get(self, entry_id: int) -> Entry | None:
        found = self._entries(self._row.select().where(self._row.id == entry_id))
        return found[0] if found else None

    def pending_recoveries(self, serial: bytes | None = None) -> list[Entry]:
        """Torn debits not yet resolved, oldest first; for one card or for all."""
        if serial is not None:  # on every tap: a prepared statement, no query building
            if serial not in self._tears:
                return []  # the journal has none for this card (see _tears)
            return self._rows(_PENDING_FOR_CARD, (serial,))
        # the card loop's sweep, every few seconds: on the partial index of tears, not
        # a scan of the whole journal (which holds the loop for as long)
        return self._rows(_PENDING_ALL, ())

    def dangling_intents(self) -> list[Entry]:
        """Intents that no completion or tear follows: the process died mid-debit."""
        Row = self._row
        Out = Row.alias()
        followed = Out.select().where(
            (Out.ref == Row.id) & (Out.kind == KIND_DEBIT) & Out.state.in_([COMPLETED, TORN])
        )
        query = Row.select().where(
            (Row.kind == KIND_DEBIT) & (Row.state == INTENT) & ~peewee.fn.EXISTS(followed)
        )
        return self._entries(query.order_by(Row.id))

    def last_accepted_ms(self, serial: bytes, *, after_ms: int | None = None) -> int | None:
        """When this card last went through this gate (a recognised debit or a free pass).

        ``after_ms``: the caller only asks whether that was after then (anti-passback);
        a last passage at or before it may be answered with None. Asked on every tap,
        this is answered from memory whenever memory reaches back that far.
        """
        if after_ms is not None and after_ms >= self._passages_floor_ms:
            known = self._passages.get(serial)
            return known[1] if known is not None else None
        try:
            row = self._sql(_LAST_ACCEPTED, (serial,)).fetchone()
        except (peewee.DatabaseError, sqlite3.DatabaseError) as err:
            raise _wrap(err, "cannot read the journal") from err
        return int(row[0]) if row is not None else None

    def count(self) -> int:
        return int(self._row.select().count())

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
            busy, frames, copied = self._sql("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except (peewee.DatabaseError, sqlite3.DatabaseError, OSError) as err:
            log.warning("journal checkpoint failed (retried later): %s", err)
            return
        if busy == 0 and frames > 0 and copied == frames:
            try:
                self._start_wal_over()
            except (peewee.DatabaseError, sqlite3.DatabaseError, OSError) as err:
                log.debug("journal WAL not started over (the next commit will): %s", err)

    def _wal_state(self) -> tuple[int, int, int]:
        """What changes whenever anything commits: this thread's connection's own
        changes, and the data_version that moves on other connections' commits."""
        changes, version = self._sql(_WAL_STATE).fetchone()
        return threading.get_ident(), int(changes), int(version)

    def _start_wal_over(self) -> None:
        # rewrites user_version as it is: one page in the WAL, no content changed
        with self._lock, self._db.atomic("IMMEDIATE"):
            version = int(self._sql("PRAGMA user_version").fetchone()[0])
            self._sql(f"PRAGMA user_version = {version}")
            state = self._wal_state()  # no one else can commit before this does
        self._wal_primed = state

    def free_bytes(self) -> int:
        """Free space on the journal's filesystem, as an unprivileged writer sees it."""
        st = os.statvfs(self.path.parent)
        return st.f_bavail * st.f_frsize

    def disk_used_pct(self) -> float:
        """How full the journal's filesystem is, in percent (root's reserve counts as used)."""
        st = os.statvfs(self.path.parent)
        return 100.0 * (1 - st.f_bavail / st.f_blocks) if st.f_blocks else 0.0

    def size_bytes(self) -> int:
        """The database file and its WAL, as they are on disk now."""
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(f"{self.path}{suffix}").st_size
        return total

    def recovery_counts(self) -> dict[str, int]:
        """How the tears were settled: recovered / unproven / not_debited / uncertain ->
        count."""
        rows = self._sql(f"SELECT state, COUNT(*) FROM entry WHERE kind = '{KIND_RECOVERY}' "
                         "GROUP BY state").fetchall()
        return {str(state): int(n) for state, n in rows}

    @property
    def tail_id(self) -> int:
        return self._tail_id


# The statements every tap runs, prepared once (peewee's query building costs more per
# tap than SQLite's own work). Indexes: entry(card_serial, id) and entry(ref).
_INSERT = f"INSERT INTO entry ({_COLUMNS}) VALUES ({', '.join('?' * len(ENTRY_FIELDS))})"
_PENDING_FOR_CARD = f"""
    SELECT {_COLUMNS} FROM entry AS t
    WHERE t.card_serial = ? AND t.kind = '{KIND_DEBIT}' AND t.state = '{TORN}'
      AND NOT EXISTS (SELECT 1 FROM entry AS r WHERE r.ref = t.id AND r.kind = '{KIND_RECOVERY}')
    ORDER BY t.id"""
_PENDING_ALL = f"""
    SELECT {_COLUMNS} FROM entry AS t INDEXED BY entry_torn_by_card
    WHERE t.kind = '{KIND_DEBIT}' AND t.state = '{TORN}'
      AND NOT EXISTS (SELECT 1 FROM entry AS r WHERE r.ref = t.id AND r.kind = '{KIND_RECOVERY}')
    ORDER BY t.id"""
# what opened the gate for a card: anti-passback counts these
_PASSAGE_KINDS = frozenset({(KIND_DEBIT, COMPLETED), (KIND_RECOVERY, RECOVERED),
                            (KIND_RECOVERY, UNPROVEN), (KIND_PASS, COMPLETED)})
_IS_PASSAGE = f"""((kind = '{KIND_DEBIT}' AND state = '{COMPLETED}')
        OR (kind = '{KIND_RECOVERY}' AND state IN ('{RECOVERED}', '{UNPROVEN}'))
        OR (kind = '{KIND_PASS}' AND state = '{COMPLETED}'))"""
_LAST_ACCEPTED = f"""
    SELECT created_ms FROM entry
    WHERE card_serial = ? AND {_IS_PASSAGE}
    ORDER BY id DESC LIMIT 1"""
_PASSAGES_FLOOR = f"""
    SELECT MAX(created_ms) FROM entry
    WHERE id <= ? AND card_serial IS NOT NULL AND {_IS_PASSAGE}"""
_PASSAGES_AFTER = f"""
    SELECT id, card_serial, created_ms FROM entry
    WHERE id > ? AND card_serial IS NOT NULL AND {_IS_PASSAGE}
    ORDER BY id"""
_WAL_STATE = "SELECT total_changes(), (SELECT data_version FROM pragma_data_version)"


def _new_uuid() -> str:
    """A random (version 4) UUID as 32 hex digits, as ``uuid.uuid4().hex`` has it."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    return raw.hex()
