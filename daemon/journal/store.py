"""The durable local journal: SQLite through peewee, WAL, synchronous=FULL, one writer.

It is the only source of truth. The card loop appends to it, sync and the operator CLI
read it (sync also records the head-end's acks and prunes what is synced and old, under
the same writer lock); nothing about a transaction is kept only in memory. Every append is one
committed, fsynced transaction, so an entry that :meth:`Journal.append` returned
survives a crash or a power cut.

:class:`Journal` is a facade over parts, a module each, that hold one
:class:`~daemon.journal.db.JournalDb` (the connection, the writer lock, the chain's
tail and what memory keeps of the journal) and touch nothing of one another: the
outbox (:mod:`.outbox`: acks, pruning), remote management state (:mod:`.control`), the
audit (:mod:`.audit`) and the files (:mod:`.files`: checkpoints, sizes).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from daemon.journal import sql
from daemon.journal.audit import Audit, VerifyReport
from daemon.journal.control import Control, RemoteState
from daemon.journal.db import SQLITE_MAGIC, JournalDb
from daemon.journal.files import Files
from daemon.journal.integrity import check_start
from daemon.journal.outbox import Outbox, Outgoing
from protocol.entry import Draft, Entry

# VerifyReport, Control and Outgoing live with their part of the journal; callers import
# them from here, as they did before it was split.
__all__ = ["PASSAGES_KEPT_MS", "PASSAGES_LOADED", "SQLITE_MAGIC", "Control", "Journal",
           "Outgoing", "VerifyReport"]

# Anti-passback asks on every tap when a card last went through. The answer comes from
# memory for the passages of about the last hour, and for the last this many entries at
# open; a longer window asks SQLite.
PASSAGES_KEPT_MS = 3_600_000
PASSAGES_LOADED = 5000


class Journal:
    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time,
                 signer: Ed25519PrivateKey | None = None, start_check: bool = True) -> None:
        """``start_check``: refuse to open a damaged journal (:mod:`.integrity`); off
        only for :meth:`verify`, which reports the damage instead."""
        self.path = Path(path)
        self._start_check = start_check
        # the part every other part holds; public for tools and tests that look under the
        # facade (a query plan, a trace of the SQL, a page cap to fill the disk)
        self.db = JournalDb(self.path, clock=clock, signer=signer,
                               passages_kept_ms=PASSAGES_KEPT_MS,
                               passages_loaded=PASSAGES_LOADED)
        self._outbox = Outbox(self.db)
        self._remote = RemoteState(self.db)
        self._audit = Audit(self.db)
        self._files = Files(self.db)
        self._opened = False

    # -- lifecycle -----------------------------------------------------------------------
    def open(self) -> Journal:
        self.db.open(check_start if self._start_check else None)
        self._opened = True
        return self

    def close(self) -> None:
        self.db.close()
        self._files.closed()
        self._opened = False

    def __enter__(self) -> Journal:
        return self.open() if not self._opened else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the card loop: writing ------------------------------------------------------------
    def next_terminal_seq(self) -> int:
        """The terminal sequence number the next intent will carry (never reused)."""
        return self.db.next_terminal_seq()

    def append(self, draft: Draft, *, durable: bool = True) -> Entry:
        """Write one entry, commit it and fsync; return it as stored.

        ``durable=False``: committed without the fsync. The entry is then in the
        kernel's hands: it survives this process dying, not a power cut, until
        :meth:`sync` (or any durable append after it) makes it durable too."""
        return self.db.append([draft], durable=durable)[0]

    def append_many(self, drafts: Iterable[Draft]) -> list[Entry]:
        """Write several entries in one committed, fsynced transaction (imports, tests and
        benchmarks; the card loop appends one at a time)."""
        return self.db.append(list(drafts))

    def sync(self) -> None:
        """fsync the WAL: every commit so far survives a power cut too."""
        self._files.sync()

    @property
    def tail_id(self) -> int:
        return self.db.tail_id

    # -- the card loop: reading ------------------------------------------------------------
    def get(self, entry_id: int) -> Entry | None:
        found = self.db.read_entries(sql.GET, (entry_id,))
        return found[0] if found else None

    def entries(self, after_id: int = 0, batch: int = 1000) -> Iterator[Entry]:
        """Every entry in id order, read in batches (constant memory on big journals)."""
        return self.db.entries(after_id, batch)

    def pending_recoveries(self, serial: bytes | None = None) -> list[Entry]:
        """Torn debits not yet resolved, oldest first; for one card or for all."""
        return self.db.pending_tears(serial)

    def dangling_intents(self) -> list[Entry]:
        """Intents that no completion or tear follows: the process died mid-debit."""
        return self.db.read_entries(sql.DANGLING_INTENTS)

    def last_accepted_ms(self, serial: bytes, *, after_ms: int | None = None) -> int | None:
        """When this card last went through this gate (a recognised debit or a free pass).

        ``after_ms``: the caller only asks whether that was after then (anti-passback);
        a last passage at or before it may be answered with None. Asked on every tap,
        this is answered from memory whenever memory reaches back that far.
        """
        last = self.db.last_passage(serial, after_ms)
        return last[1] if last is not None else None

    def last_passage(self, serial: bytes, *, after_ms: int | None = None
                     ) -> tuple[int, int] | None:
        """:meth:`last_accepted_ms` with the passage's journal id: (id, created_ms)."""
        return self.db.last_passage(serial, after_ms)

    def count(self) -> int:
        return int(self.db.scalar(sql.COUNT))

    def recovery_counts(self) -> dict[str, int]:
        """How the tears were settled: recovered / unproven / not_debited / uncertain ->
        count."""
        return {str(state): int(n) for state, n in self.db.read(sql.RECOVERY_COUNTS)}

    # -- the files -------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Copy the WAL back into the database between taps (:meth:`Files.checkpoint`)."""
        self._files.checkpoint()

    def free_bytes(self) -> int:
        """Free space on the journal's filesystem, as an unprivileged writer sees it."""
        return self._files.free_bytes()

    def disk_used_pct(self) -> float:
        """How full the journal's filesystem is, in percent (root's reserve counts as used)."""
        return self._files.disk_used_pct()

    def size_bytes(self) -> int:
        """The database file and its WAL, as they are on disk now."""
        return self._files.size_bytes()

    # -- the outbox ------------------------------------------------------------------------
    def unacked(self, after_id: int = 0, limit: int = 100) -> list[Entry]:
        """Entries the head-end has not acknowledged, in id order, after ``after_id``."""
        return self._outbox.unacked(after_id, limit)

    def unacked_json(self, after_id: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """:meth:`unacked` in the JSON form (``Entry.to_json``)."""
        return self._outbox.unacked_json(after_id, limit)

    def unacked_wire(self, after_id: int = 0, limit: int = 100) -> Outgoing | None:
        """:meth:`unacked_json` already encoded, as the uplink sends it; None: nothing
        (:meth:`Outbox.unacked_wire`)."""
        return self._outbox.unacked_wire(after_id, limit)

    def mark_acked(self, uuids: Iterable[str]) -> int:
        """Record that the head-end stored these entries; how many were new."""
        return self._outbox.mark_acked(uuids)

    def mark_acked_ids(self, ids: Iterable[int]) -> int:
        """:meth:`mark_acked` by journal id; how many were new."""
        return self._outbox.mark_acked_ids(ids)

    def pending_sync_count(self) -> int:
        """Entries the head-end has not acknowledged."""
        return self._outbox.pending_sync_count()

    def oldest_unacked_ms(self) -> int | None:
        """When the oldest entry the head-end has not acknowledged was written."""
        return self._outbox.oldest_unacked_ms()

    def prune(self, older_than_ms: int, *, chunk: int = 2000) -> int:
        """Delete acknowledged old entries from the start (:meth:`Outbox.prune`)."""
        return self._outbox.prune(older_than_ms, chunk=chunk)

    # -- remote management -----------------------------------------------------------------
    def last_command_seq(self, key_id: str) -> int | None:
        """The highest sequence number applied from this operator key, if any."""
        return self._remote.last_command_seq(key_id)

    def deny_list(self) -> tuple[int, frozenset[bytes]]:
        """The deny list's version and its card serials."""
        return self._remote.deny_list()

    def remote_config(self) -> dict[str, Any]:
        """Config values operators set (dotted gate.* key -> value), to re-apply at start."""
        return self._remote.remote_config()

    def desired_version(self) -> int:
        """The version of the desired state (shadow) last applied; 0: none."""
        return self._remote.desired_version()

    def control(self) -> contextlib.AbstractContextManager[Control]:
        """One committed, fsynced transaction under the writer lock for a command's
        check-and-record and the state it changes (:meth:`RemoteState.control`)."""
        return self._remote.control()

    # -- the audit -------------------------------------------------------------------------
    def verify(self, public_key: Ed25519PublicKey | None = None) -> VerifyReport:
        """Check SQLite's quick_check, the hash chain from the first entry kept and, given
        the device's public key, every entry's signature."""
        return self._audit.verify(public_key)
