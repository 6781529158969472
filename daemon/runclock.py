"""How old a journal entry is, in a way that survives the wall clock being set.

A gate's wall clock is set by NTP some time after boot, by an operator, or drifts back
from a bad RTC: it jumps, either way. The journal records wall time (``created_ms``:
the back office needs dates), but every window the gate keeps (anti-passback, the
recovery window of a tear) is measured on the monotonic clock for what happened in
this run, and the wall clock only for what happened before it:

* an entry this run marked: the monotonic time since it was marked;
* an entry from before this run: its wall-clock age, but never less than the run's own
  age (it happened before the run started, whatever the wall clock says now or said
  then), so one recorded "in the future" holds a window at most that long from start;
* an entry of this run that was not marked (or forgotten): its wall-clock age, as there
  is nothing better.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection


class RunClock:
    def __init__(self, *, first_id: int, wall: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        """``first_id``: the first journal id this run writes (the tail at start + 1)."""
        self.wall = wall
        self.monotonic = monotonic
        self._first_id = first_id
        self._started = monotonic()
        self._marked: dict[int, float] = {}  # entry id -> monotonic time it was written

    def mark(self, entry_id: int) -> None:
        """Entry ``entry_id`` was just written; its age will be asked for."""
        self._marked[entry_id] = self.monotonic()

    def forget(self, entry_id: int) -> None:
        self._marked.pop(entry_id, None)

    def retain(self, ids: Collection[int]) -> None:
        """Forget every marked entry not in ``ids`` (the rest's age is no longer asked)."""
        for entry_id in [i for i in self._marked if i not in ids]:
            del self._marked[entry_id]

    def since(self, monotonic_at: float) -> float:
        """Seconds since a monotonic reading of this run."""
        return self.monotonic() - monotonic_at

    def age_s(self, entry_id: int, created_ms: int) -> float:
        """How long ago entry ``entry_id`` (written at wall time ``created_ms``) was
        written, as the module says."""
        marked = self._marked.get(entry_id)
        if marked is not None:
            return self.since(marked)
        age = self.wall() - created_ms / 1000
        if entry_id < self._first_id:
            return max(age, self.since(self._started))
        return age
