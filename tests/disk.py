"""A disk that fills up: a tiny tmpfs filled to the last byte, or the journal's own
database capped at its size."""

from __future__ import annotations

import contextlib
import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from daemon.journal import Journal
from protocol.errors import JournalFull
from tests.drafts import refusal


class TinyDisk:
    """A small tmpfs (needs root) that a test fills to the last byte and frees again."""

    def __init__(self, path: Path, size_kib: int = 1024) -> None:
        self.path = Path(path)
        self.size_kib = size_kib
        self._filler = self.path / "filler"

    def fill(self) -> None:
        with self._filler.open("ab", buffering=0) as fh:
            for chunk in (65536, 4096, 1):
                while True:
                    try:
                        fh.write(bytes(chunk))
                    except OSError as err:
                        if err.errno != errno.ENOSPC:
                            raise
                        break

    def free(self) -> None:
        self._filler.unlink(missing_ok=True)


@contextlib.contextmanager
def tiny_disk(path: Path, size_kib: int = 1024) -> Iterator[TinyDisk | None]:
    """Mount a :class:`TinyDisk` at ``path``; None where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        yield None
        return
    try:
        yield TinyDisk(path, size_kib)
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill_journal(journal: Journal, serial: bytes | None) -> int:
    """Make the journal's database full with SQLite's max_page_count: cap it at its size,
    then append small refusals of card ``serial`` until no more fit (they land in the same
    table and index pages as the next entry of that card would). Returns how many went in."""
    db: Any = journal.db.database  # the cap is per connection: it must be the journal's own
    pages = int(db.execute_sql("PRAGMA page_count").fetchone()[0])
    db.execute_sql(f"PRAGMA max_page_count = {pages}")
    written = failures = 0
    while failures < 30:  # consecutive: the last table page, not one index page, is full
        try:
            journal.append(refusal("x", serial=serial))
        except JournalFull:
            failures += 1
        else:
            written += 1
            failures = 0
    return written


def unfill_journal(journal: Journal) -> None:
    db: Any = journal.db.database
    db.execute_sql("PRAGMA max_page_count = 1073741823")
