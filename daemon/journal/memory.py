"""What the journal keeps in memory of what it holds, so that a tap asks SQLite only when
it must: each card's pending tears, and each card's latest passage among recent entries.

Both are what the journal says: read at open and kept in step by every committed append
and prune, under the writer lock (:class:`~daemon.journal.db.JournalDb` owns them).
The card loop reads them on other threads than the uplink's prune, so each change is
made in an order a reader may see halfway.
"""

from __future__ import annotations

from collections.abc import Iterable

from daemon.journal.sql import PASSAGE_KINDS
from protocol.entry import KIND_DEBIT, KIND_RECOVERY, TORN, Entry

NEVER = -(2**63)


class Tears(dict[bytes, set[int]]):
    """Card serial -> ids of its torn debits no recovery entry closes yet. A dict itself:
    asked on every tap whether a card has any (``serial in tears``)."""

    def load(self, pending: Iterable[Entry]) -> None:
        self.clear()
        for torn in pending:
            if torn.card_serial is not None:
                self.setdefault(torn.card_serial, set()).add(torn.id)

    def note(self, entries: list[Entry]) -> None:
        """Keep in step with entries just committed."""
        for entry in entries:
            serial = entry.card_serial
            if serial is None:
                continue
            if entry.kind == KIND_DEBIT and entry.state == TORN:
                self.setdefault(serial, set()).add(entry.id)
            elif entry.kind == KIND_RECOVERY and entry.ref is not None:
                ids = self.get(serial)
                if ids is not None:
                    ids.discard(entry.ref)
                    if not ids:
                        del self[serial]


class Passages:
    """Card serial -> (id, created_ms) of its latest passage (a recognised debit or a free
    pass) among recent entries, oldest first (``latest``); every passage it lacks was
    created at or before ``floor_ms``. Those older than ``kept_ms`` before the newest
    are forgotten, the floor raised over them."""

    def __init__(self, kept_ms: int) -> None:
        self.latest: dict[bytes, tuple[int, int]] = {}
        self.floor_ms = -NEVER  # nothing is known before load()
        self._kept_ms = kept_ms

    def load(self, floor_ms: int | None, passages: Iterable[tuple[int, bytes, int]]) -> None:
        """From the passages (id, serial, created_ms) after a horizon, in id order, and
        the latest before it (None: there is none)."""
        self.latest = {}
        self.floor_ms = NEVER if floor_ms is None else floor_ms
        for entry_id, serial, created_ms in passages:
            self.latest.pop(serial, None)
            self.latest[serial] = (entry_id, created_ms)

    def forget(self) -> None:
        """Closed: nothing is known until the next load()."""
        self.floor_ms = -NEVER

    def note(self, entries: list[Entry]) -> None:
        """Keep in step with entries just committed (writer lock held)."""
        for entry in entries:
            if entry.card_serial is None or (entry.kind, entry.state) not in PASSAGE_KINDS:
                continue
            self.latest.pop(entry.card_serial, None)  # to the end: the newest
            self.latest[entry.card_serial] = (entry.id, entry.created_ms)
            cutoff = entry.created_ms - self._kept_ms
            while True:
                serial, (_, created_ms) = next(iter(self.latest.items()))
                if created_ms >= cutoff:
                    break
                # the floor first: a reader on another thread never sees a passage gone
                # that the floor does not cover
                self.floor_ms = max(self.floor_ms, created_ms)
                del self.latest[serial]

    def pruned(self, through_id: int) -> None:
        """Entries up to ``through_id`` are gone: a card whose last passage went has none
        left in the journal (older ones went too)."""
        for serial in [s for s, (entry_id, _) in self.latest.items() if entry_id <= through_id]:
            del self.latest[serial]
