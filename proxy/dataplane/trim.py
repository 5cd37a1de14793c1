"""Memory of closed connections back to the system, for both data planes.

glibc keeps freed memory in its heap (and in each thread's arena) until
`malloc_trim`: without it a proxy that held 10,000 connections keeps their
memory after they closed. `malloc_trim(0)` trims every arena of the process:
the event loop's (the Python plane's transports and handles, the brain's
per-connection records) and the native plane's runtime threads' (its tasks,
sockets' state and buffers are malloc'd on those threads).

The policy (`Trimmer`): trim when the number of live connections fell by
TRIM_DROP from its peak since the last trim, TRIM_DELAY after (so a burst of
closes is trimmed once), never during steady churn. None off glibc.
"""

from __future__ import annotations

import asyncio
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


class Trimmer:
    """Trims once after a burst of closes. `note(live)` is told the number of live
    connections after a change (or a batch of them); `live()` reads it when the
    trim runs, which then becomes the new peak. `in_thread`: the trim runs in the
    loop's default executor, not on the loop (the native plane's runtime arenas
    can be large; the loop goes on meanwhile)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, live: Callable[[], int], *, in_thread: bool = False):
        self.loop = loop
        self.live = live
        self.in_thread = in_thread
        self.peak = 0  # most live connections since the last trim
        self.trims = 0  # trims run (or started, in_thread)
        self._timer: asyncio.TimerHandle | None = None

    def note(self, live: int) -> None:
        if live > self.peak:
            self.peak = live
        elif self.peak - live >= TRIM_DROP and self._timer is None and malloc_trim is not None:
            self._timer = self.loop.call_later(TRIM_DELAY, self.trim)

    def trim(self) -> None:
        """Give the memory of closed connections back (see TRIM_DROP)."""
        self._timer = None
        self.peak = self.live()
        trim = malloc_trim
        if trim is None:
            return
        self.trims += 1
        if self.in_thread:
            self.loop.run_in_executor(None, trim, 0)
        else:
            trim(0)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
