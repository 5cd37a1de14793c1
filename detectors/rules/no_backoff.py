"""no_backoff: retries after failures that never slow down.

Looks at the latest ``intervals`` (4) retry intervals after failures (all
measured within ``window``): if none grows by at least ``growth`` (1.5×) over
the one before and they average under ``max_average`` (2 s), the client is not
backing off. Exponential backoff (1, 2, 4 s …) grows by 2× every step, and
the incident's fixed client (1, 2, 4 s, then a 5 s pause) grows within every
four intervals, so neither is flagged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..findings import Finding, Severity
from ..settings import NoBackoffSettings
from ..state import ClientState, Failures
from .evidence import finding

NAME = "no_backoff"


def check(state: ClientState, settings: NoBackoffSettings, t: float) -> Severity | None:
    failures = state.failures
    intervals = failures.intervals if failures is not None else None
    n = settings.intervals
    if failures is None or intervals is None or len(intervals) < n:
        return None
    when = failures.interval_times
    if when is None or when[-n] < t - settings.window:
        return None
    growth = settings.growth
    start = len(intervals) - n
    previous = total = intervals[start]
    for i in range(start + 1, len(intervals)):  # indexes, not a slice: no allocation
        current = intervals[i]
        if current >= growth * previous:
            return None  # it backs off at least once: not this rule's business
        total += current
        previous = current
    return "warning" if total / n < settings.max_average else None


def evidence(state: ClientState, settings: NoBackoffSettings, t: float) -> dict[str, Any]:
    n = settings.intervals
    failures = state.failures or Failures()
    recent = list(failures.intervals or ())[-n:]
    when: Sequence[float] = failures.interval_times or ()
    return {
        "intervals": [round(x, 6) for x in recent],
        "average": sum(recent) / len(recent) if recent else None,
        "first_seen": when[-len(recent)] if recent else None,
        "last_seen": when[-1] if recent else None,
    }


def evaluate(state: ClientState, settings: NoBackoffSettings, t: float) -> Finding | None:
    return finding(NAME, check, evidence, state, settings, t)
