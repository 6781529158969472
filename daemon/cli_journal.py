"""`tapgate journal ...`: look at the journal from outside the daemon.

Everything here but ``verify`` reads the journal through :class:`JournalView`, a
read-only SQLite connection: it never creates, migrates or writes the file, so it is
safe beside the running daemon (WAL lets it read while the card loop appends) and on a
path that turns out to be wrong.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from json.encoder import encode_basestring_ascii
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from daemon.config import Config
from daemon.journal import Journal, schema, sql
from daemon.journal.store import SQLITE_MAGIC
from protocol import devicekey
from protocol.entry import (
    COMPLETED,
    ENTRY_FIELDS,
    KIND_DEBIT,
    KIND_PASS,
    KIND_RECOVERY,
    KIND_REFUSAL,
    SYNC_PENDING,
    SYNC_SYNCED,
    TORN,
    Entry,
    wire_value,
)
from protocol.errors import ConfigError, JournalError

EXIT_FAULT = 1
BATCH = 5000  # entries per read: each batch is its own short read transaction
FOLLOW_POLL_S = 0.5

# What a passenger's tap came to, as the journal tells it (intents are not outcomes).
TAP_OUTCOMES_SQL = (f"((kind = '{KIND_DEBIT}' AND state IN ('{COMPLETED}', '{TORN}')) "
                    f"OR kind IN ('{KIND_REFUSAL}', '{KIND_RECOVERY}', '{KIND_PASS}'))")


class JournalView:
    """A read-only look at a journal file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self._select = ""
        self.has_sync_state = False  # schema v3+: acked_ms says what the head-end stored

    def open(self) -> JournalView:
        if not self.path.is_file():
            raise JournalError(f"no journal at {self.path}")
        try:
            with self.path.open("rb") as fh:
                head = fh.read(16)
        except OSError as err:
            raise JournalError(f"cannot read the journal {self.path}: {err.strerror}") from err
        if head != SQLITE_MAGIC:
            raise JournalError(f"{self.path} is not an SQLite journal (corrupt or foreign file)")
        try:
            self._db = sqlite3.connect(self.path.absolute().as_uri() + "?mode=ro", uri=True,
                                       timeout=5)
            version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(entry)")}
        except sqlite3.DatabaseError as err:
            self.close()
            raise JournalError(f"cannot read the journal {self.path}: {err}") from err
        if version > schema.SCHEMA_VERSION:
            self.close()
            raise JournalError(
                f"{self.path} has journal schema {version}; this tapgate knows up to "
                f"{schema.SCHEMA_VERSION}: upgrade tapgate to read it")
        if not columns:
            self.close()
            raise JournalError(f"{self.path} is not a tapgate journal (no entry table)")
        # a journal from an older schema lacks the newer columns: they read as null
        wanted = [name if name in columns else f"NULL AS {name}" for name in ENTRY_FIELDS]
        self.has_sync_state = "acked_ms" in columns
        if self.has_sync_state:
            wanted.append("acked_ms")
        self._select = f"SELECT {', '.join(wanted)} FROM entry"
        return self

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> JournalView:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        if self._db is None:
            raise JournalError(f"the journal {self.path} is not open")
        try:
            return self._db.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as err:
            raise JournalError(f"cannot read the journal {self.path}: {err}") from err

    # -- rows: ENTRY_FIELDS in order, then acked_ms if the journal has sync state --------
    def rows(self, *, after: int, upto: int | None = None, limit: int = BATCH) -> list[Any]:
        """Entries with ``after < id <= upto`` in id order, at most ``limit``."""
        if upto is None:
            return self._query(f"{self._select} WHERE id > ? ORDER BY id LIMIT ?",
                               (after, limit))
        return self._query(f"{self._select} WHERE id > ? AND id <= ? ORDER BY id LIMIT ?",
                           (after, upto, limit))

    def last_rows(self, n: int, where: str = "") -> list[Any]:
        """The newest ``n`` entries (matching ``where``), oldest first."""
        clause = f" WHERE {where}" if where else ""
        found = self._query(f"{self._select}{clause} ORDER BY id DESC LIMIT ?", (n,))
        found.reverse()
        return found

    def entry(self, row: Sequence[Any]) -> Entry:
        return Entry(*row[:len(ENTRY_FIELDS)])

    # -- numbers ----------------------------------------------------------------------------
    def max_id(self) -> int:
        return int(self._query("SELECT MAX(id) FROM entry")[0][0] or 0)

    def count(self, after: int = 0, upto: int | None = None) -> int:
        if upto is None:
            return int(self._query("SELECT COUNT(*) FROM entry WHERE id > ?", (after,))[0][0])
        return int(self._query("SELECT COUNT(*) FROM entry WHERE id > ? AND id <= ?",
                               (after, upto))[0][0])

    def pending_sync(self) -> int:
        """Entries the head-end has not acknowledged (all of them before sync existed)."""
        if not self.has_sync_state:
            return self.count()
        return int(self._query("SELECT COUNT(*) FROM entry WHERE acked_ms IS NULL")[0][0])

    def pending_recoveries(self) -> list[Entry]:
        """Torn debits no recovery settled yet, oldest first."""
        rows = self._query(f"{self._select} AS t WHERE {sql.PENDING_TEAR} ORDER BY t.id")
        return [self.entry(row) for row in rows]


# --- the export form -----------------------------------------------------------------------
_KEYS = tuple(f'"{name}":' for name in ENTRY_FIELDS)
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


def _hex(value: bytes) -> str:
    return f'"{wire_value(value)}"'


def _null(value: None) -> str:
    return "null"


# How json.dumps writes each type SQLite hands back (bytes as the JSON form's hex).
_FORMAT: dict[type, Callable[[Any], str]] = {
    type(None): _null, int: int.__repr__, bytes: _hex, str: encode_basestring_ascii}


def json_line(row: Sequence[Any]) -> str:
    """One entry as `journal export` prints it: exactly ``json.dumps(doc,
    separators=(",", ":"))`` of the entry's JSON form (plus ``sync_state`` when the
    journal has one), built straight from the row: a million entries go through here."""
    get = _FORMAT.get
    parts = [key + get(type(value), _ENCODE)(value)
             for key, value in zip(_KEYS, row, strict=False)]  # sync state is not a field
    if len(row) > len(ENTRY_FIELDS):
        state = SYNC_PENDING if row[len(ENTRY_FIELDS)] is None else SYNC_SYNCED
        parts.append(f'"sync_state":"{state}"')
    return "{" + ",".join(parts) + "}"


def money(minor: int) -> str:
    return f"{minor / 100:.2f}"


def local_time(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


def describe(entry: Entry) -> str:
    """One entry as a line an operator reads."""
    parts = [f"#{entry.id}", local_time(entry.created_ms), f"{entry.kind}/{entry.state:<11}"]
    if entry.card_serial is not None:
        parts.append(f"card {entry.card_serial.hex().upper()}")
    if entry.amount or entry.kind in (KIND_DEBIT, KIND_RECOVERY):
        parts.append(f"amount {money(entry.amount)}")
    if entry.balance_before is not None:
        after = entry.balance_after
        parts.append(f"balance {money(entry.balance_before)}"
                     + (f" -> {money(after)}" if after is not None else ""))
    if entry.terminal_seq is not None:
        parts.append(f"seq {entry.terminal_seq}")
    if entry.ref is not None:
        parts.append(f"ref #{entry.ref}")
    if entry.reason:
        parts.append(f"({entry.reason})")
    return "  ".join(parts)


# --- progress --------------------------------------------------------------------------------
class Progress:
    """entries done / total, rate and ETA on stderr: redrawn in place on a terminal at
    most ``1 / tty_every_s`` times a second, one line a second when stderr is a file."""

    def __init__(self, total: int, stream: TextIO, *, tty: bool, label: str = "export",
                 clock: Callable[[], float] = time.monotonic, tty_every_s: float = 0.2,
                 file_every_s: float = 1.0) -> None:
        self.total = total
        self._stream = stream
        self._tty = tty
        self._label = label
        self._clock = clock
        self._every = tty_every_s if tty else file_every_s
        self._started = clock()
        self._next = self._started + self._every
        self.drawn = 0  # how many times it was drawn (tests count them)

    def update(self, done: int) -> None:
        now = self._clock()
        if now >= self._next:
            self._draw(done, now, final=False)
            self._next = now + self._every

    def finish(self, done: int) -> None:
        self._draw(done, self._clock(), final=True)

    def _draw(self, done: int, now: float, *, final: bool) -> None:
        total = max(self.total, done)
        elapsed = max(now - self._started, 1e-9)
        rate = done / elapsed
        share = done / total if total else 1.0
        text = (f"{self._label} {_bar(share)} {share * 100:5.1f}%  "
                f"{done:,}/{total:,} entries  {rate:,.0f}/s  ")
        if final:
            text += f"in {_clock_time(elapsed)}"
        else:
            text += f"ETA {_clock_time((total - done) / rate) if rate > 0 else '?'}"
        if self._tty:
            self._stream.write("\r" + text + "\x1b[K" + ("\n" if final else ""))
        else:
            self._stream.write(text + "\n")
        self._stream.flush()
        self.drawn += 1


def _bar(share: float, width: int = 24) -> str:
    filled = int(share * width)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _clock_time(seconds: float) -> str:
    whole = int(seconds + 0.5)
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


# --- the commands ----------------------------------------------------------------------------
def verify(config: Config) -> int:
    """The hash chain, SQLite's quick_check and, if the device key can be read, every
    signature. (Through :class:`Journal`: it checks the file as the daemon opens it.)"""
    if not config.journal.path.is_file():
        raise JournalError(f"no journal at {config.journal.path}")
    public_key = None
    if config.journal.device_key is not None:
        try:
            public_key = devicekey.load(config.journal.device_key).public_key()
        except ConfigError as err:
            print(f"tapgate: signatures not checked: {err}", file=sys.stderr)
    try:
        # not refused at open as the daemon refuses it: verify says what is damaged
        with Journal(config.journal.path, start_check=False) as journal:
            report = journal.verify(public_key)
    except JournalError as err:
        if "malformed" not in str(err) or "salvage" in str(err):
            raise
        raise JournalError(f"{err}; `tapgate journal salvage` copies out what can still be "
                           "read") from err
    for problem in report.problems:
        print(f"FAULT {problem}")
    line = f"{report.entries} entries, {'chain intact' if report.ok else 'FAULTS FOUND'}"
    if public_key is not None:
        line += f", {report.signed} signed"
        if report.unsigned:
            line += f", {report.unsigned} unsigned (written before the device key)"
    print(line)
    return 0 if report.ok else EXIT_FAULT


def export(config: Config, *, after: int = 0, progress: bool | None = None,
           out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Every entry after ``after`` as one JSON object per line, up to the newest entry
    when the export started (the daemon may go on appending)."""
    out = out or sys.stdout
    err = err or sys.stderr
    tty = err.isatty()
    with JournalView(config.journal.path) as view:
        upto = view.max_id()
        bar = (Progress(view.count(after, upto), err, tty=tty)
               if (tty if progress is None else progress) else None)
        done, last = 0, after
        while rows := view.rows(after=last, upto=upto):
            out.write("\n".join(map(json_line, rows)) + "\n")
            done += len(rows)
            last = rows[-1][0]
            if bar is not None:
                bar.update(done)
        out.flush()
        if bar is not None:
            bar.finish(done)
    return 0


class _Signalled:
    """SIGINT and SIGTERM end a follow loop cleanly: the handler only sets a flag."""

    def __init__(self) -> None:
        self.stopped = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.stopped = True


@contextlib.contextmanager
def _until_signalled() -> Iterator[_Signalled]:
    flag = _Signalled()
    old = {signum: signal.signal(signum, flag) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)


def tail(config: Config, *, n: int = 10, follow: bool = False, as_json: bool = False,
         poll_s: float = FOLLOW_POLL_S) -> int:
    """The last ``n`` entries; with ``follow``, then every new one until SIGINT/SIGTERM."""
    out = sys.stdout
    with JournalView(config.journal.path) as view:
        def show(row: Any) -> str:
            return json_line(row) if as_json else describe(view.entry(row))

        with _until_signalled() as signalled:
            rows = view.last_rows(n) if n > 0 else []
            last = rows[-1][0] if rows else view.max_id()
            while True:
                if rows:
                    out.write("".join(show(row) + "\n" for row in rows))
                    out.flush()
                    last = rows[-1][0]
                if not follow or signalled.stopped:
                    return 0
                if len(rows) < BATCH:  # caught up: wait before asking again
                    deadline = time.monotonic() + poll_s
                    while not signalled.stopped and time.monotonic() < deadline:
                        time.sleep(min(0.1, poll_s))
                    if signalled.stopped:
                        return 0
                rows = view.rows(after=last)


def salvage(config: Config, out: Path) -> int:
    from daemon.journal.salvage import salvage as run_salvage
    from daemon.status import liveness, read_status

    running = liveness(read_status(config.journal.status_path), time.time(),
                       config.service.status_interval_s)
    if running.running:
        raise JournalError(f"the daemon is {running.summary}: stop it before salvaging "
                           "its journal")
    report = run_salvage(config.journal.path, out)
    for line in report.lines():
        print(line)
    return 0 if report.complete else EXIT_FAULT
