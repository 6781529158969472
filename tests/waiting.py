"""Waiting in tests: for something another thread or process does (:func:`wait_until`),
and for a coroutine under a deadline (:func:`run`). Only a broken component gets near
the timeouts; nothing here is timed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

TIMEOUT_S = 60.0


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT_S) -> float:
    """Poll ``predicate`` until it holds and return how long that took; fail the test
    after ``timeout`` seconds."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - started


def run(coro: Coroutine[Any, Any, None], timeout_s: float = TIMEOUT_S) -> None:
    """Run ``coro`` in a fresh event loop; a hang fails after ``timeout_s``."""
    asyncio.run(asyncio.wait_for(coro, timeout_s))
