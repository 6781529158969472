"""The journal's SQLite file and what the journal keeps of it in memory: the part every
other part of the journal holds.

:class:`JournalDb` owns the one connection (WAL, synchronous=FULL), the one writer lock,
the end of the hash chain (tail id and hash), the highest terminal sequence number used,
and the in-memory indexes of tears and passages (:mod:`.memory`). It alone writes the
entry table, at both ends: appends at the tail, prunes from the start, keeping all of
that in step. The outbox, remote management and the audit go through its public
methods; SQLite's errors come out of it as the journal's (a full disk as
:class:`JournalFull`, on which no new debit may start).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import peewee
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from daemon.journal import schema, sql
from daemon.journal.memory import Passages, Tears
from protocol.entry import (
    DRAFT_FIELDS,
    ENTRY_FIELDS,
    GENESIS,
    Draft,
    Entry,
    chain_hash,
    sign,
    wire_fields,
    wire_value,
)
from protocol.errors import JournalError, JournalFull

log = logging.getLogger("tapgate.journal")

SQLITE_MAGIC = b"SQLite format 3\x00"
# What the WAL may keep of the disk once checkpointed: the room the reserve of free disk
# (journal.reserve_bytes) must leave it to grow back into (Files.free_bytes).
WAL_LIMIT = 256 * 1024
BUSY_TIMEOUT_MS = 5000
# (a text SQLite holds that is not UTF-8, as damage leaves it, fails in Python's decoding)
_FAILED = (peewee.DatabaseError, sqlite3.DatabaseError, OSError, UnicodeDecodeError)
_UNREADABLE = (peewee.DatabaseError, sqlite3.DatabaseError, UnicodeDecodeError)


class JournalDb:
    """The journal's one connection, writer lock, chain tail and memory (see the module)."""

    def __init__(self, path: Path, *, clock: Callable[[], float],
                 signer: Ed25519PrivateKey | None, passages_kept_ms: int,
                 passages_loaded: int) -> None:
        self.path = path
        self._clock = clock
        self._signer = signer
        self._lock = threading.Lock()  # one writer: appends are serialised here
        self._db = peewee.SqliteDatabase(
            str(path),
            pragmas={
                "journal_mode": "wal",
                "synchronous": 2,  # FULL: the WAL is fsynced at every commit
                # no checkpoint inside a commit a passenger waits for: the card loop
                # checkpoints between taps (Files.checkpoint)
                "wal_autocheckpoint": 0,
                # a WAL started over is cut back to WAL_LIMIT: on a small
                # disk a WAL once grown must not keep its room for good
                "journal_size_limit": WAL_LIMIT,
                "busy_timeout": BUSY_TIMEOUT_MS,
                "foreign_keys": 1,
            },
            autoconnect=True,
        )
        self._tail_id = 0
        self._tail_hash = GENESIS
        self._max_seq = 0
        self._tears = Tears()
        self._passages = Passages(passages_kept_ms)
        self._passages_loaded = passages_loaded  # at open, from this many entries back

    # -- lifecycle -----------------------------------------------------------------------
    def open(self, check: Callable[[JournalDb], None] | None = None) -> None:
        """Open (a new journal is made whole first, see :meth:`_create`), migrate, run
        ``check`` (which refuses a damaged journal), and load what memory keeps."""
        if not self._refuse_foreign_file():
            self._create()
        try:
            self._db.connect(reuse_if_open=True)
            self._migrate()
            if check is not None:
                check(self)
            self._load()
        except BaseException as err:
            self._db.close()
            if isinstance(err, _FAILED):
                if _is_damage(err):
                    raise damaged(self.path, str(err)) from err
                raise wrap(err, f"cannot open the journal {self.path}") from err
            raise

    def close(self) -> None:
        if not self._db.is_closed():
            self._db.close()
        self._passages.forget()

    def _refuse_foreign_file(self) -> bool:
        """Whether a journal is there; refused if it is not one, or is empty."""
        try:
            with self.path.open("rb") as fh:
                head = fh.read(16)
        except FileNotFoundError:
            return False
        except OSError as err:
            raise JournalError(f"cannot read the journal {self.path}: {err.strerror}") from err
        if not head:
            # a journal is made whole before it takes its name (_create): an empty file
            # there lost its content (a failed disk, a copy gone wrong, a power cut
            # under a filesystem that lost it), and a fresh journal would hide that
            raise JournalError(
                f"the journal {self.path} is empty (0 bytes): its entries are lost, "
                "never started over silently. Restore it from a backup, or move it aside "
                "(keep it for the record) to start a new journal; the head-end holds what "
                "it acknowledged")
        if head != SQLITE_MAGIC:
            raise JournalError(f"{self.path} is not an SQLite journal (corrupt or foreign file)")
        return True

    def _create(self) -> None:
        """A new journal: made with its schema under a scratch name, fsynced, then given
        its name. So the journal's name never holds a file that is not a journal yet,
        and an empty file there is always a loss (see _refuse_foreign_file)."""
        scratch = self.path.with_name(f".{self.path.name}.new")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{scratch}{suffix}").unlink(missing_ok=True)  # a start that died
            new = peewee.SqliteDatabase(str(scratch), pragmas={"synchronous": 2})
            try:
                with new.atomic():
                    for step in range(1, schema.SCHEMA_VERSION + 1):
                        schema.MIGRATIONS[step](new)
                    new.execute_sql(f"PRAGMA user_version = {schema.SCHEMA_VERSION}")  # type: ignore[no-untyped-call]
                new.execute_sql("PRAGMA journal_mode = wal")  # type: ignore[no-untyped-call]
            finally:
                new.close()
            _fsync(scratch)
            os.rename(scratch, self.path)
            _fsync(self.path.parent)
        except _FAILED as err:
            raise wrap(err, f"cannot create the journal {self.path}") from err
        log.info("journal %s: created (schema %d)", self.path, schema.SCHEMA_VERSION)

    def _migrate(self) -> None:
        version = int(self.execute("PRAGMA user_version").fetchone()[0])
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
                schema.MIGRATIONS[step](self._db)
                self.execute(f"PRAGMA user_version = {step}")

    def _load(self) -> None:
        """What memory keeps, from what the journal holds."""
        tail = self.execute(sql.TAIL).fetchone()
        if tail is not None:
            if not isinstance(tail[1], bytes) or len(tail[1]) != 32:
                raise damaged(self.path, f"the last entry's hash is {tail[1]!r:.80}")
            self._tail_id, self._tail_hash = int(tail[0]), tail[1]
        seq = self.execute(sql.MAX_SEQ).fetchone()[0]
        self._max_seq = max(_number(self.path, "terminal_seq", seq),
                            stored_seq(self.path, self.meta(sql.MAX_TERMINAL_SEQ)))
        self._tears.load(self.read_entries(sql.PENDING_ALL))
        horizon = max(0, self._tail_id - self._passages_loaded)
        floor = self.execute(sql.PASSAGES_FLOOR, (horizon,)).fetchone()[0]
        self._passages.load(None if floor is None else _number(self.path, "created_ms", floor), (
            (int(entry_id), serial, int(created_ms))
            for entry_id, serial, created_ms in self.execute(sql.PASSAGES_AFTER, (horizon,))
            if isinstance(serial, bytes) and isinstance(created_ms, int)))

    # -- statements ----------------------------------------------------------------------
    @property
    def database(self) -> peewee.SqliteDatabase:
        return self._db

    def execute(self, statement: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        """Run one statement as it is; SQLite's errors as they are (inside a transaction,
        which says what failed)."""
        cursor: sqlite3.Cursor = self._db.execute_sql(statement, params)  # type: ignore[no-untyped-call]
        return cursor

    def execute_many(self, statement: str, rows: Iterable[Sequence[Any]]) -> int:
        """One statement over many rows (inside a transaction); how many rows it changed."""
        cursor: sqlite3.Cursor = self._db.cursor()  # type: ignore[no-untyped-call]
        cursor.executemany(statement, rows)
        return max(0, int(cursor.rowcount))

    def read(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return list(self.execute(statement, params).fetchall())
        except _UNREADABLE as err:
            raise wrap(err, "cannot read the journal") from err

    def read_entries(self, statement: str, params: Sequence[Any] = ()) -> list[Entry]:
        """Entries, from a statement that selects :data:`sql.COLUMNS`."""
        return [_entry(row) for row in self.read(statement, params)]

    def scalar(self, statement: str, params: Sequence[Any] = ()) -> Any:
        try:
            row = self.execute(statement, params).fetchone()
        except _UNREADABLE as err:
            raise wrap(err, "cannot read the journal") from err
        return row[0] if row else None

    def meta(self, key: str) -> str | None:
        value = self.scalar(sql.GET_META, (key,))
        return None if value is None else str(value)

    def entries(self, after_id: int = 0, batch: int = 1000) -> Iterator[Entry]:
        """Every entry in id order, read in batches (constant memory on big journals)."""
        last = after_id
        while rows := self.read_entries(sql.AFTER, (last, batch)):
            yield from rows
            last = rows[-1].id

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    @contextlib.contextmanager
    def writing(self, doing: str, *, immediate: bool = False) -> Iterator[None]:
        """One committed, fsynced transaction under the writer lock; what fails in it is
        said as ``doing``."""
        with self._lock:
            try:
                with self._db.atomic("IMMEDIATE") if immediate else self._db.atomic():
                    yield
            except _FAILED as err:
                raise wrap(err, doing) from err

    def transaction(self) -> contextlib.AbstractContextManager[object]:
        """A transaction without the writer lock (one read snapshot), or inside one a
        savepoint: what is written in it is undone if it fails."""
        return self._db.atomic()

    # -- the chain's end: appends ---------------------------------------------------------
    @property
    def tail_id(self) -> int:
        return self._tail_id

    def next_terminal_seq(self) -> int:
        """The terminal sequence number the next intent will carry (never reused)."""
        with self._lock:
            return self._max_seq + 1

    def append(self, drafts: list[Draft], *, durable: bool = True) -> list[Entry]:
        """Write entries in one transaction, committed and fsynced (unless not
        ``durable``: then the commit survives this process, not a power cut, until the
        WAL is next fsynced); return them as stored."""
        with self._lock:
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
            except _FAILED as err:
                first = entries[0]
                raise wrap(err, f"cannot append a {first.kind}/{first.state} entry") from err
            self._tail_id, self._tail_hash = tail_id, tail_hash
            seqs = [e.terminal_seq for e in entries if e.terminal_seq is not None]
            if seqs:
                self._max_seq = max(self._max_seq, *seqs)
            self._tears.note(entries)
            self._passages.note(entries)
            return entries

    def _insert(self, rows: list[list[Any]], *, durable: bool) -> None:
        """BEGIN, the INSERTs, COMMIT (fsynced unless not ``durable``): straight on this
        thread's connection, without peewee's transaction objects, which cost a tap's
        intent tens of µs."""
        if self._db.in_transaction():  # inside a caller's atomic(): nest in it
            with self._db.atomic():
                for row in rows:
                    self.execute(sql.INSERT, row)
            return
        conn: sqlite3.Connection = self._db.connection()  # type: ignore[no-untyped-call]
        if not durable:  # WAL + NORMAL: the commit writes the WAL, with no fsync
            conn.execute("PRAGMA synchronous = NORMAL")
        try:
            conn.execute("BEGIN")
            try:
                for row in rows:
                    conn.execute(sql.INSERT, row)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # (SQLite ends it by itself on some errors)
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
        finally:
            if not durable:
                conn.execute("PRAGMA synchronous = FULL")

    # -- what a tap asks of memory first ---------------------------------------------------
    def pending_tears(self, serial: bytes | None) -> list[Entry]:
        """Torn debits not yet resolved, oldest first; for one card or for all."""
        if serial is not None:  # on every tap
            if serial not in self._tears:
                return []  # the journal has none for this card (see Tears)
            return self.read_entries(sql.PENDING_FOR_CARD, (serial,))
        # the card loop's sweep, every few seconds: on the partial index of tears, not
        # a scan of the whole journal (which holds the loop for as long)
        return self.read_entries(sql.PENDING_ALL)

    def last_passage(self, serial: bytes, after_ms: int | None) -> tuple[int, int] | None:
        """(id, created_ms) of the card's last passage; None: none, or (given
        ``after_ms``) maybe one at or before then."""
        passages = self._passages
        if after_ms is not None and after_ms >= passages.floor_ms:
            return passages.latest.get(serial)
        found = self.read(sql.LAST_ACCEPTED, (serial,))
        return (int(found[0][0]), int(found[0][1])) if found else None

    @property
    def passages_floor_ms(self) -> int:
        """Memory answers when a card last went through for any time after this."""
        return self._passages.floor_ms

    # -- the chain's start: pruning --------------------------------------------------------
    def prune_from_start(self, through: int, most: int) -> int:
        """Delete the oldest entries, at most ``most`` and none after id ``through``, in
        one transaction under the writer lock. Meta keeps the hash of the last one
        deleted (the chain anchor) and the highest terminal sequence number used, so
        none is reused. Returns how many went."""
        with self._lock:
            first = self.scalar(sql.FIRST_ID)
            if first is None or int(first) > through:
                return 0
            upto = min(through, int(first) + most - 1)
            try:
                with self._db.atomic():
                    last_hash, max_seq = self.execute(sql.PRUNED_RUN, (upto, upto)).fetchone()
                    stored = stored_seq(self.path, self.meta(sql.MAX_TERMINAL_SEQ))
                    seq = max(_number(self.path, "terminal_seq", max_seq), stored,
                              self._max_seq)
                    deleted = int(self.execute(sql.PRUNE_THROUGH, (upto,)).rowcount)
                    self.execute(sql.SET_META, (sql.CHAIN_ANCHOR, wire_value(bytes(last_hash))))
                    self.execute(sql.SET_META, (sql.MAX_TERMINAL_SEQ, str(seq)))
            except _FAILED as err:
                raise wrap(err, "cannot prune the journal") from err
            self._max_seq = seq
            self._passages.pruned(upto)
            return deleted


SALVAGE_HINT = ("`tapgate journal salvage` copies out what can still be read: stop the "
                "gate, run it with --out NEW.db, and point journal.path at NEW.db")


def damaged(path: object, what: str) -> JournalError:
    return JournalError(f"the journal {path} is damaged ({what}): {SALVAGE_HINT}")


def stored_seq(path: object, value: str | None) -> int:
    """meta's highest terminal sequence number: a decimal number, or refused."""
    if value is None:
        return 0
    if not (value.isascii() and value.isdigit()):
        raise damaged(path, f"meta {sql.MAX_TERMINAL_SEQ} is {value[:40]!r}, not a number")
    return int(value)


def chain_anchor(path: object, value: str | None) -> bytes:
    """meta's chain anchor (the hash of the last entry pruned): 32 bytes, or refused."""
    if value is None:
        return GENESIS
    try:
        anchor = bytes.fromhex(value)
    except ValueError:
        anchor = b""
    if len(anchor) != 32:
        raise damaged(path, f"meta {sql.CHAIN_ANCHOR} is {value[:80]!r}, not a hash")
    return anchor



def wrap(err: BaseException, doing: str) -> JournalError:
    """SQLite's error as the journal's: :class:`JournalFull` when the disk is full."""
    # SQLite rolls a transaction back by itself on SQLITE_FULL; peewee's rollback then
    # fails with "no transaction is active" and hides the cause: look down the chain.
    cause: BaseException | None = err
    while cause is not None:
        if _is_full(cause):
            return JournalFull(f"{doing}: {cause}")
        cause = cause.__context__
    return JournalError(f"{doing}: {err}")


def _is_damage(err: BaseException) -> bool:
    """SQLite's word for a file whose content is not what it wrote."""
    return isinstance(err, UnicodeDecodeError) or (
        isinstance(err, sqlite3.DatabaseError | peewee.DatabaseError)
        and any(word in str(err) for word in ("malformed", "not a database", "corrupt")))


def _number(path: object, what: str, value: Any) -> int:
    """A column's aggregate (MAX) as an int: None is 0; another type is damage."""
    if value is None:
        return 0
    if not isinstance(value, int):
        raise damaged(path, f"{what} holds {value!r:.40}, not a number")
    return value


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_full(err: BaseException) -> bool:
    text = str(err)
    if isinstance(err, (sqlite3.OperationalError, peewee.OperationalError)) and (
        "full" in text or "disk I/O" in text
    ):
        return True
    return isinstance(err, OSError) and err.errno == errno.ENOSPC


def _entry(row: tuple[Any, ...]) -> Entry:
    values: list[Any] = [bytes(v) if isinstance(v, (memoryview, bytearray)) else v for v in row]
    return Entry(*values)


def _new_uuid() -> str:
    """A random (version 4) UUID as 32 hex digits, as ``uuid.uuid4().hex`` has it."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    return raw.hex()
