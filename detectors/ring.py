"""Capped, time-ordered rings of float timestamps, stored as ``array('d')``.

An ``array('d')`` costs 64 bytes plus 8 per value, against 600+ bytes for an
empty ``deque`` and 24 more per boxed float: this is what keeps a tracked
client under a couple of KiB. Rings are allocated on first use, so a healthy
client that never fails pays nothing for them. Rings stay short (a rule's
threshold), so trimming the front with ``del`` is a tiny memmove.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left


def push(ring: array[float] | None, value: float, cap: int) -> array[float]:
    """Append ``value``, keep only the newest ``cap`` values; returns the ring (new if None)."""
    if ring is None:
        ring = array("d")
    ring.append(value)
    extra = len(ring) - cap
    if extra > 0:
        del ring[:extra]
    return ring


def count_since(ring: array[float] | None, since: float) -> int:
    """How many values are ≥ ``since`` (times are appended in order, so bisect)."""
    if not ring:
        return 0
    return len(ring) - bisect_left(ring, since)
