"""A sliding time window of counters, in fixed buckets: bounded memory at any rate.

Used by the fleet view and the circuit breakers. The window is split into
``buckets`` slots indexed by ``floor(t / width)``; a slot whose index is stale is
zeroed on reuse, so nothing ever needs a timer to expire old counts. The
newest bucket is partial, so totals cover between ``window − width`` and
``window`` seconds — a documented approximation, as in Resilience4j's
time-based sliding window.
"""

from __future__ import annotations

import math


class SlidingCounter:
    """``fields`` integer counters summed over the last ``window`` seconds."""

    __slots__ = ("window", "width", "_n", "_epochs", "_counts")

    def __init__(self, window: float, fields: int, buckets: int = 10) -> None:
        self.window = window
        self.width = window / buckets
        self._n = buckets
        self._epochs = [-math.inf] * buckets
        self._counts = [[0] * fields for _ in range(buckets)]

    def add(self, t: float, field: int, amount: int = 1) -> None:
        epoch = math.floor(t / self.width)
        slot = epoch % self._n
        counts = self._counts[slot]
        if self._epochs[slot] != epoch:
            self._epochs[slot] = epoch
            for i in range(len(counts)):
                counts[i] = 0
        counts[field] += amount

    def total(self, t: float, field: int) -> int:
        oldest = math.floor(t / self.width) - self._n
        return sum(
            c[field] for e, c in zip(self._epochs, self._counts, strict=True) if e > oldest
        )

    def clear(self) -> None:
        self._epochs = [-math.inf] * self._n
        for counts in self._counts:
            for i in range(len(counts)):
                counts[i] = 0
