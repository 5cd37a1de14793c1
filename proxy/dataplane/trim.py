"""Memory of closed connections back to the system.

glibc keeps freed memory in its heap (and in each thread's arena) until
`malloc_trim`: without it a proxy that held 10,000 connections keeps their
memory after they closed. `malloc_trim(0)` trims every arena of the process:
the event loop's (the brain's per-connection records) and the data plane's
runtime threads' (its tasks, sockets' state and buffers are malloc'd on those
threads).

The policy: trim when what the process holds memory for (its live connections,
and the clients the engine remembers) fell by TRIM_DROP from its peak since the
last trim, TRIM_DELAY after (so a burst of closes is trimmed once), never during
steady churn. The engine forgets a client `client_ttl` after it left, so a
burst of clients is trimmed twice: at the closes, and when they are forgotten.
None off glibc. `ClockTrimmer` is the policy, polled with a clock (the data
plane's trimming thread: the brain's loop may be busy with the closes' events
for seconds, while the runtime freed the memory at once).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

TRIM_DROP = 256
TRIM_DELAY = 0.5
malloc_trim: Callable[[int], int] | None
try:
    _malloc_trim = ctypes.CDLL(None).malloc_trim
    _malloc_trim.argtypes = (ctypes.c_size_t,)
    malloc_trim = _malloc_trim
except (OSError, AttributeError):  # pragma: no cover - not glibc
    malloc_trim = None


class ClockTrimmer:
    """The policy, polled: `poll(live, now)` from any one thread, with the number
    of live connections plus tracked clients and a monotonic clock. It calls malloc_trim itself
    (ctypes lets the GIL go meanwhile) once TRIM_DELAY passed since the drop was
    seen; the live count then becomes the new peak. Returns when it wants to be
    polled next (a trim is due), else None."""

    def __init__(self) -> None:
        self.peak = 0  # most live connections + tracked clients since the last trim
        self.trims = 0  # trims run
        self._due: float | None = None

    def poll(self, live: int, now: float) -> float | None:
        if live > self.peak:
            self.peak = live
        if self._due is None:
            if self.peak - live >= TRIM_DROP and malloc_trim is not None:
                self._due = now + TRIM_DELAY
            return self._due
        if now < self._due:
            return self._due
        self._due = None
        self.peak = live
        trim = malloc_trim
        if trim is not None:
            self.trims += 1
            trim(0)
        return None

