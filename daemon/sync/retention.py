"""Retention: acknowledged entries older than the configured age leave the journal, so
it stays bounded however long the gate runs. Only what the head-end has stored goes,
oldest first, and never anything a pending recovery still needs (Journal.prune)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from daemon.journal import Journal

log = logging.getLogger("tapgate.sync")

PRUNE_EVERY_S = 3600.0


def prune_once(journal: Journal, retention_days: float, now: float) -> int:
    return journal.prune(int((now - retention_days * 86400) * 1000))


async def run_retention(journal: Journal, retention_days: float, stop: asyncio.Event, *,
                        every_s: float = PRUNE_EVERY_S,
                        clock: Callable[[], float] = time.time) -> None:
    """Prune now and then until ``stop``; the deletes run off the event loop."""
    while not stop.is_set():
        await asyncio.to_thread(prune_once, journal, retention_days, clock())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
