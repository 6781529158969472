"""Exponential backoff with jitter, for reconnecting to the broker.

Jitter spreads a fleet of gates that lost the same broker over the interval, so they do
not all come back in the same second when it returns.
"""

from __future__ import annotations

import random


class Backoff:
    def __init__(self, first_s: float, max_s: float, *,
                 rng: random.Random | None = None) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self._rng = rng or random.Random()
        self._next = first_s

    def next(self) -> float:
        """The pause before the next attempt: the current step, jittered to 50..150 %
        (never above the maximum); the step doubles for the time after."""
        step = self._next
        self._next = min(step * 2, self.max_s)
        return min(step * self._rng.uniform(0.5, 1.5), self.max_s)

    def reset(self) -> None:
        self._next = self.first_s
