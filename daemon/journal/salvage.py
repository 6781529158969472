"""Salvage what can still be read from a damaged journal into a new journal file.

A damaged SQLite file usually has a few bad pages. Entries live in the ``entry`` table's
B-tree keyed by their id (the rowid), so they are read by id ranges: a range that fails
is halved until the unreadable ids stand alone, and every entry that reads back whole
(its hash matches its content) is copied as it was: id, uuid, hashes, signature, sync
state. Nothing is invented: the new journal has gaps where entries were lost, and
``tapgate journal verify`` names them.

The damaged file is never written: SQLite opens it read-only and immutable (no locks,
no shared memory file) or, when a WAL is left beside it (the daemon died), reads a copy
of both made in a scratch directory beside the new file, so that replaying the WAL
touches only the copy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.journal import sql
from daemon.journal.db import SQLITE_MAGIC
from protocol.entry import ENTRY_FIELDS, chain_hash, wire_fields
from protocol.errors import JournalError

CHUNK = 256  # ids per read; a failing read is halved down to single ids
# Where the last id cannot be read, ids are probed this far past the last entry found.
TAIL_PROBE = 4096

UNREADABLE = "unreadable"  # SQLite could not read the page that holds it
DAMAGED = "damaged"  # read, but its content does not match its hash (or is malformed)
MISSING = "missing"  # not in the table where the ids around it are


@dataclass
class Gap:
    first: int
    last: int
    why: str

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def __str__(self) -> str:
        ids = f"id {self.first}" if self.first == self.last else f"ids {self.first}-{self.last}"
        return f"{ids} ({self.size:,} {'entry' if self.size == 1 else 'entries'}): {self.why}"


@dataclass
class SalvageReport:
    source: Path
    out: Path
    first_id: int | None = None  # the range of ids the damaged journal spans
    last_id: int | None = None
    recovered: int = 0
    lost: list[Gap] = field(default_factory=list)
    tail_unknown: bool = False  # the last id could not be read: entries after may be lost
    max_terminal_seq: int | None = None  # what meta says the sequence continues from
    meta_lost: list[str] = field(default_factory=list)  # meta values that were unreadable
    notes: list[str] = field(default_factory=list)

    @property
    def lost_entries(self) -> int:
        return sum(gap.size for gap in self.lost)

    @property
    def complete(self) -> bool:
        return not self.lost and not self.tail_unknown and not self.meta_lost

    def _note_loss(self, entry_id: int, why: str) -> None:
        last = self.lost[-1] if self.lost else None
        if last is not None and last.why == why and last.last + 1 == entry_id:
            last.last = entry_id
        else:
            self.lost.append(Gap(entry_id, entry_id, why))

    def lines(self) -> list[str]:
        if self.first_id is None or self.last_id is None:
            head = "salvaged no entries (none could be read)"
        elif self.complete:
            head = f"salvaged all {self.recovered:,} entries (ids {self.first_id}-{self.last_id})"
        elif self.tail_unknown:
            head = (f"salvaged {self.recovered:,} entries (ids {self.first_id}-{self.last_id} "
                    "read; the last id is unknown)")
        else:
            total = self.last_id - self.first_id + 1
            head = (f"salvaged {self.recovered:,} of {total:,} entries "
                    f"(ids {self.first_id}-{self.last_id})")
        out = [f"{head} from {self.source} into {self.out}"]
        out += [f"lost: {gap}" for gap in self.lost]
        if self.tail_unknown:
            out.append(f"lost: entries after id {self.last_id}, if there were any (the end of "
                       "the table could not be read)")
        out += self.meta_lost
        out += self.notes
        if self.complete:
            out.append("nothing lost")
        return out


def salvage(source: Path, out: Path, *, chunk: int = CHUNK) -> SalvageReport:
    """Copy what can be read from the journal ``source`` into a new journal ``out``
    (which must not exist). Raises :class:`JournalError` when nothing can be salvaged."""
    source, out = Path(source), Path(out)
    for path in (out, Path(f"{out}-wal"), Path(f"{out}-journal")):
        if path.exists() or path.is_symlink():
            raise JournalError(f"{path} exists: salvage never overwrites a file; "
                               "choose another --out")
    try:
        with source.open("rb") as fh:
            head = fh.read(16)
    except FileNotFoundError as err:
        raise JournalError(f"no journal at {source}") from err
    except OSError as err:
        raise JournalError(f"cannot read {source}: {err.strerror}") from err
    if head != SQLITE_MAGIC:
        raise JournalError(f"{source} does not start as an SQLite file: its first page is "
                           "lost, nothing can be salvaged from it")
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.salvage-", dir=out.parent))
    try:
        built = scratch / "salvaged.db"
        report = SalvageReport(source=source, out=out)
        _salvage(_open_damaged(source, scratch), built, report, chunk)
        try:
            os.link(built, out)  # never replaces: fails if out appeared meanwhile
        except FileExistsError as err:
            raise JournalError(f"{out} exists: salvage never overwrites a file") from err
        _fsync_dir(out.parent)
        return report
    except (OSError, sqlite3.DatabaseError, UnicodeDecodeError) as err:
        raise JournalError(f"cannot salvage {source} into {out}: {err}") from err
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _open_damaged(source: Path, scratch: Path) -> sqlite3.Connection:
    wal = Path(f"{source}-wal")
    if wal.is_file() and wal.stat().st_size > 0:
        copy = scratch / "damaged.db"
        shutil.copyfile(source, copy)
        shutil.copyfile(wal, Path(f"{copy}-wal"))
        return sqlite3.connect(copy, isolation_level=None)
    uri = source.absolute().as_uri() + "?mode=ro&immutable=1"
    return sqlite3.connect(uri, uri=True, isolation_level=None)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _edge(db: sqlite3.Connection, sql: str) -> tuple[bool, int | None]:
    """(read at all, the id found or None for an empty table)."""
    try:
        row = db.execute(sql).fetchone()
    except sqlite3.DatabaseError:
        return False, None
    return True, int(row[0]) if row else None


def _scalar(db: sqlite3.Connection, sql: str) -> Any:
    try:
        row = db.execute(sql).fetchone()
    except sqlite3.DatabaseError:
        return None
    return row[0] if row else None


def _salvage(src: sqlite3.Connection, built: Path, report: SalvageReport,
             chunk: int) -> None:
    dst = sqlite3.connect(built, isolation_level=None)
    try:
        src.execute("PRAGMA cell_size_check = ON")  # more damage seen as errors, not garbage
        try:
            version = int(src.execute("PRAGMA user_version").fetchone()[0])
            ddl = src.execute(
                "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE "
                "'sqlite_%' ORDER BY type != 'table'").fetchall()
            columns = [row[1] for row in src.execute("PRAGMA table_info(entry)")]
        except sqlite3.DatabaseError as err:
            raise JournalError(f"cannot read the schema of {report.source} ({err}): "
                               "nothing can be salvaged") from err
        if "id" not in columns or "hash" not in columns:
            raise JournalError(f"{report.source} has no journal entry table")
        dst.execute("BEGIN")
        for (statement,) in ddl:
            dst.execute(statement)
        dst.execute(f"PRAGMA user_version = {version}")
        names = ", ".join(f'"{c}"' for c in columns)
        insert = f"INSERT INTO entry ({names}) VALUES ({', '.join('?' * len(columns))})"
        select = f"SELECT {names} FROM entry WHERE rowid BETWEEN ? AND ? ORDER BY rowid"
        max_seq = _copy_entries(src, dst, select, insert, columns, report, chunk)
        _copy_meta(src, dst, report, max_seq)
        _copy_state(src, dst, report)
        dst.execute("COMMIT")
        problems = [row[0] for row in dst.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise JournalError(f"the salvaged journal fails quick_check: {problems[:3]}")
    except sqlite3.DatabaseError as err:
        raise JournalError(f"cannot write the salvaged journal: {err}") from err
    finally:
        src.close()
        dst.close()


def _copy_entries(src: sqlite3.Connection, dst: sqlite3.Connection, select: str,
                  insert: str, columns: Sequence[str], report: SalvageReport,
                  chunk: int) -> int:
    """Copy every intact entry; record the gaps. Returns the highest terminal_seq kept."""
    first_read, first = _edge(src, "SELECT rowid FROM entry ORDER BY rowid LIMIT 1")
    last_read, last = _edge(src, "SELECT rowid FROM entry ORDER BY rowid DESC LIMIT 1")
    if first_read and last_read and first is None:
        return 0  # an empty journal
    if not first_read:
        report.notes.append("the first id could not be read: reading from id 1")
    lo = first if first is not None else 1
    hi = last
    report.tail_unknown = hi is None
    max_seq = 0
    accounted = lo - 1  # every id up to here is either kept or recorded as lost
    found_any = False
    a = lo
    while (a <= hi) if hi is not None else (a <= accounted + TAIL_PROBE):
        b = a + chunk - 1 if hi is None else min(a + chunk - 1, hi)
        unreadable: list[int] = []
        kept: set[int] = set()
        damaged: set[int] = set()
        for row in _read(src, select, a, b, unreadable):
            doc = dict(zip(columns, row, strict=True))
            entry_id = doc.get("id")
            if not _intact(doc):
                if isinstance(entry_id, int) and a <= entry_id <= b:
                    damaged.add(entry_id)
                continue
            try:
                dst.execute(insert, row)
            except sqlite3.IntegrityError:  # a second copy of an id or uuid: not trusted
                damaged.add(doc["id"])
                continue
            kept.add(doc["id"])
            if isinstance(doc.get("terminal_seq"), int):
                max_seq = max(max_seq, doc["terminal_seq"])
        # Where the last id is unknown, ids count as lost only up to the last row read:
        # past the end every lookup may fail on the same damaged page.
        top = b if hi is not None else max(kept | damaged, default=None)
        if top is not None:
            found_any = True
            for entry_id in range(accounted + 1, top + 1):
                if entry_id in kept:
                    report.recovered += 1
                elif entry_id in unreadable:
                    report._note_loss(entry_id, UNREADABLE)
                elif entry_id in damaged:
                    report._note_loss(entry_id, f"{DAMAGED} (content does not match its hash)")
                else:
                    report._note_loss(entry_id, MISSING)
            accounted = top
        a = b + 1
    if found_any or hi is not None:
        report.first_id, report.last_id = lo, hi if hi is not None else accounted
    return max_seq


def _read(src: sqlite3.Connection, select: str, a: int, b: int,
          unreadable: list[int]) -> Iterator[tuple[Any, ...]]:
    """The rows with ids a..b that SQLite can read; the ids it cannot go to ``unreadable``."""
    try:
        rows = src.execute(select, (a, b)).fetchall()
    except sqlite3.DatabaseError:
        if a == b:
            unreadable.append(a)
            return
        mid = (a + b) // 2
        yield from _read(src, select, a, mid, unreadable)
        yield from _read(src, select, mid + 1, b, unreadable)
        return
    yield from rows


def _intact(doc: dict[str, Any]) -> bool:
    """The row is an entry whose hash still matches its content."""
    digest, prev = doc.get("hash"), doc.get("prev_hash")
    if not (isinstance(doc.get("id"), int) and isinstance(doc.get("uuid"), str)
            and isinstance(digest, bytes) and len(digest) == 32
            and isinstance(prev, bytes) and len(prev) == 32):
        return False
    body = wire_fields((name, doc.get(name)) for name in ENTRY_FIELDS)
    try:
        return chain_hash(body) == digest
    except (TypeError, ValueError):
        return False


# The gate's remote-management state (schema v5): the operators' replay high-water, the
# deny list and remotely set config. Losing command_seq would let an old signed command
# be replayed, so a table that cannot be read is said loudly.
STATE_TABLES = {
    "command_seq": "the operators' command sequence high-water (old commands could replay: "
                   "rotate the operator keys)",
    "deny_list": "the deny list (push it again from the back office)",
    "remote_config": "remotely set config (set it again)",
}


def _copy_state(src: sqlite3.Connection, dst: sqlite3.Connection,
                report: SalvageReport) -> None:
    present = {row[0] for row in dst.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    for table, what in STATE_TABLES.items():
        if table not in present:
            continue
        try:
            rows = src.execute(f'SELECT * FROM "{table}"').fetchall()
        except sqlite3.DatabaseError as err:
            report.notes.append(f"{table} could not be read ({err}): lost {what}")
            continue
        if rows:
            marks = ", ".join("?" * len(rows[0]))
            dst.executemany(f'INSERT OR REPLACE INTO "{table}" VALUES ({marks})', rows)


def _copy_meta(src: sqlite3.Connection, dst: sqlite3.Connection, report: SalvageReport,
               max_seq: int) -> None:
    """Copy meta (chain anchor, highest terminal sequence). Lost entries may have used
    terminal sequence numbers above any kept: each lost entry at most one more, so the
    bound written makes sure no number is ever used twice."""
    rows: list[tuple[Any, Any]] = []
    with contextlib.suppress(sqlite3.DatabaseError):
        rows = src.execute("SELECT key, value FROM meta").fetchall()
    if _scalar(src, "SELECT COUNT(*) FROM meta") is None:
        report.notes.append("meta (chain anchor, terminal sequence) could not be read")
    for key, value in rows:
        with contextlib.suppress(sqlite3.DatabaseError):
            dst.execute(sql.SET_META, (key, value))
    stored = dict(rows).get(sql.MAX_TERMINAL_SEQ)
    number = str(stored) if stored is not None else ""
    readable = number.isascii() and number.isdigit()
    if stored is not None and not readable:
        # it held the highest number ever used, entries pruned included: that is lost
        report.meta_lost.append(
            f"lost: meta {sql.MAX_TERMINAL_SEQ} ({str(stored)[:40]!r} is not a number): "
            "the highest terminal sequence number of the entries pruned before is unknown")
    known = max(max_seq, int(number) if readable else 0)
    if report.meta_lost:
        # each intent took the highest number used + 1 and its own id: none went past
        # the highest id (unless a salvage moved the numbers on: then meta said more)
        known = max(known, report.last_id or 0)
    if report.lost or report.tail_unknown or report.meta_lost:
        bound = known + report.lost_entries + (TAIL_PROBE if report.tail_unknown else 0)
        dst.execute(sql.SET_META, (sql.MAX_TERMINAL_SEQ, str(bound)))
        report.max_terminal_seq = bound
        report.notes.append(f"terminal sequence numbers continue after {bound}: lost entries "
                            "may have used numbers up to it")
        lost_tail = report.lost[-1] if report.lost else None
        if lost_tail is not None and lost_tail.last == report.last_id:
            report.notes.append(
                f"the newest entries ({lost_tail}) were lost: the gate's next entries "
                f"will take ids from {lost_tail.first} again; tell the head-end")
    else:
        report.max_terminal_seq = known or None
