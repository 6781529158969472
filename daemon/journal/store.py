"""The durable local journal: SQLite through peewee, WAL, synchronous=FULL, one writer.

It is the only source of truth. The card loop appends to it, sync and the operator CLI
read it (sync also records the head-end's acks and prunes what is synced and old, under
the same writer lock); nothing about a transaction is kept only in memory. Every append is one
committed, fsynced transaction, so an entry that :meth:`Journal.append` returned
survives a crash or a power cut.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peewee
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from daemon.errors import JournalError, JournalFull
from daemon.journal import schema
from daemon.journal.entry import (
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
    Draft,
    Entry,
    chain_hash,
)

log = logging.getLogger("tapgate.journal")

SQLITE_MAGIC = b"SQLite format 3\x00"
# Anti-passback asks on every tap when a card last went through. The answer comes from
# memory for the passages of about the last hour, and for the last this many entries at
# open; a longer window asks SQLite.
PASSAGES_KEPT_MS = 3_600_000
PASSAGES_LOADED = 5000
_NEVER = -(2**63)


@dataclass
class VerifyReport:
    entries: int = 0
    problems: list[str] = field(default_factory=list)
    signed: int = 0  # entries whose signature the device's public key confirmed
    unsigned: int = 0  # entries written before the gate had a device key

    @property
    def ok(self) -> bool:
        return not self.problems


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


class Journal:
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

    def _sql(self, sql: str, params: Any = None) -> Any:
        return self._db.execute_sql(sql, params)  # type: ignore[no-untyped-call]

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

    def append(self, draft: Draft) -> Entry:
        """Write one entry, commit it and fsync; return it as stored."""
        with self._lock:
            return self._write([draft])[0]

    def append_many(self, drafts: Iterable[Draft]) -> list[Entry]:
        """Write several entries in one committed, fsynced transaction (imports, tests and
        benchmarks; the card loop appends one at a time)."""
        with self._lock:
            return self._write(list(drafts))

    def _write(self, drafts: list[Draft]) -> list[Entry]:
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
            digest = chain_hash({name: (v.hex().upper() if isinstance(v, bytes) else v)
                                 for name, v in values.items()})
            sig = self._signer.sign(digest) if self._signer is not None else None
            entry = Entry(**values, hash=digest, sig=sig)
            entries.append(entry)
            tail_id, tail_hash = entry.id, entry.hash
        if not entries:
            return entries
        try:
            self._insert([[getattr(entry, name) for name in ENTRY_FIELDS]
                          for entry in entries])
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

    def _insert(self, rows: list[list[Any]]) -> None:
        """BEGIN, the INSERTs, COMMIT (fsynced): straight on this thread's connection,
        without peewee's transaction objects, which cost a tap's intent tens of µs."""
        if self._db.in_transaction():  # inside a caller's atomic(): nest in it
            with self._db.atomic():
                for row in rows:
                    self._sql(_INSERT, row)
            return
        conn: sqlite3.Connection = self._db.connection()  # type: ignore[no-untyped-call]
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

    # -- reading -----------------------------------------------------------------------
    def _entries(self, query: Any) -> list[Entry]:
        try:
            return [_entry(row) for row in query]
        except (peewee.DatabaseError, sqlite3.DatabaseError) as err:
            raise _wrap(err, "cannot read the journal") from err

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

    def _rows(self, sql: str, params: tuple[Any, ...]) -> list[Entry]:
        try:
            cursor = self._sql(sql, params)
            return [_entry_from_tuple(row) for row in cursor.fetchall()]
        except (peewee.DatabaseError, sqlite3.DatabaseError) as err:
            raise _wrap(err, "cannot read the journal") from err

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
        """How the tears were settled: recovered / not_debited / uncertain -> count."""
        rows = self._sql(f"SELECT state, COUNT(*) FROM entry WHERE kind = '{KIND_RECOVERY}' "
                         "GROUP BY state").fetchall()
        return {str(state): int(n) for state, n in rows}

    @property
    def tail_id(self) -> int:
        return self._tail_id

    # -- sync state: the journal is the uplink's outbox ----------------------------------
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
                self._sql(_SET_META, ("chain_anchor", bytes(last_hash).hex().upper()))
                self._sql(_SET_META, ("max_terminal_seq", str(seq)))
        except (peewee.DatabaseError, sqlite3.DatabaseError, OSError) as err:
            raise _wrap(err, "cannot prune the journal") from err
        self._max_seq = seq
        # a card whose last passage went has none left in the journal (older ones went too)
        for serial in [s for s, (entry_id, _) in self._passages.items() if entry_id <= upto]:
            del self._passages[serial]
        return deleted

    def _scalar(self, sql: str, params: tuple[Any, ...]) -> Any:
        try:
            row = self._sql(sql, params).fetchone()
        except (peewee.DatabaseError, sqlite3.DatabaseError) as err:
            raise _wrap(err, "cannot read the journal") from err
        return row[0] if row else None

    # -- remote management (v5): what operators' commands changed --------------------
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

    # -- checking ----------------------------------------------------------------------
    def verify(self, public_key: Ed25519PublicKey | None = None) -> VerifyReport:
        """Check SQLite's quick_check, the hash chain from the first entry kept and, given
        the device's public key, every entry's signature."""
        report = VerifyReport()
        try:
            rows = self._sql("PRAGMA quick_check").fetchall()
        except (peewee.DatabaseError, sqlite3.DatabaseError) as err:
            report.problems.append(f"quick_check failed: {err}")
            return report
        report.problems.extend(f"quick_check: {r[0]}" for r in rows if r[0] != "ok")
        prev: Entry | None = None
        anchor = self._meta.get_or_none(self._meta.key == "chain_anchor")
        first_prev = bytes.fromhex(anchor.value) if anchor else GENESIS
        try:
            for entry in self.entries():
                report.entries += 1
                if prev is None and entry.prev_hash != first_prev:
                    report.problems.append(
                        f"entry {entry.id}: the first entry kept does not continue the chain "
                        "anchor: entries before it are missing")
                if chain_hash(entry.to_json()) != entry.hash:
                    report.problems.append(f"entry {entry.id}: hash does not match its content")
                if public_key is not None:
                    if entry.sig is None:
                        report.unsigned += 1
                    else:
                        try:
                            public_key.verify(entry.sig, entry.hash)
                            report.signed += 1
                        except InvalidSignature:
                            report.problems.append(
                                f"entry {entry.id}: signature is not the device key's")
                if prev is not None and entry.prev_hash != prev.hash:
                    report.problems.append(f"entry {entry.id}: prev_hash breaks the chain")
                if prev is not None and entry.id != prev.id + 1:
                    report.problems.append(f"entry {entry.id}: follows {prev.id}, entries missing")
                prev = entry
        except JournalError as err:
            report.problems.append(str(err))
        return report


_COLUMNS = ", ".join(ENTRY_FIELDS)
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
_PASSAGE_KINDS = frozenset({(KIND_DEBIT, COMPLETED), (KIND_RECOVERY, RECOVERED),
                            (KIND_PASS, COMPLETED)})
_IS_PASSAGE = f"""((kind = '{KIND_DEBIT}' AND state = '{COMPLETED}')
        OR (kind = '{KIND_RECOVERY}' AND state = '{RECOVERED}')
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
_WAL_STATE = "SELECT total_changes(), (SELECT data_version FROM pragma_data_version)"
_SET_META = "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)"
_GET_META = "SELECT value FROM meta WHERE key = ?"
DENY_VERSION = "deny_list_version"
DESIRED_VERSION = "desired_version"


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
    return {name: (v.hex().upper() if isinstance(v, bytes) else v)
            for name, v in zip(ENTRY_FIELDS, row, strict=True)}


def _runs(ids: Iterable[int]) -> list[tuple[int, int]]:
    """Ids as (first, last) runs of consecutive ids, ascending."""
    runs: list[tuple[int, int]] = []
    for i in sorted(set(ids)):
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def _new_uuid() -> str:
    """A random (version 4) UUID as 32 hex digits, as ``uuid.uuid4().hex`` has it."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    return raw.hex()


def _meta_int(value: Any) -> int:
    return int(value) if value is not None else 0


class Control:
    """Inside :meth:`Journal.control`: reads and writes of the remote management state."""

    def __init__(self, journal: Journal) -> None:
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

def _entry_from_tuple(row: tuple[Any, ...]) -> Entry:
    values: list[Any] = [bytes(v) if isinstance(v, (memoryview, bytearray)) else v for v in row]
    return Entry(*values)


def _entry(row: Any) -> Entry:
    values: dict[str, Any] = {}
    for name in ENTRY_FIELDS:
        value = getattr(row, name)
        values[name] = bytes(value) if isinstance(value, (memoryview, bytearray)) else value
    return Entry(**values)
