"""Named, supervised tasks: one that fails is logged, backs off with jitter and restarts,
and never takes the others down."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable

from protocol.errors import TapgateError

log = logging.getLogger("tapgate.supervisor")

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
HEALTHY_AFTER_S = 60.0  # a task that ran this long resets its backoff


async def supervise(name: str, body: Callable[[], Awaitable[None]], stop: asyncio.Event) -> None:
    delay = BACKOFF_FIRST_S
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        started = loop.time()
        try:
            await body()
            if stop.is_set():
                return
            log.warning("task %s returned by itself; restarting", name)
        except asyncio.CancelledError:
            raise
        except TapgateError as err:  # a known fault (no bluetoothd, a lost broker): one line
            log.error("task %s failed: %s", name, err)
        except Exception:
            log.exception("task %s failed", name)
        if loop.time() - started > HEALTHY_AFTER_S:
            delay = BACKOFF_FIRST_S
        pause = delay * random.uniform(0.5, 1.5)
        log.info("task %s restarts in %.1f s", name, pause)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), pause)
        delay = min(delay * 2, BACKOFF_MAX_S)
