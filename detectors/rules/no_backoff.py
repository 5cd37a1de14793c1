"""no_backoff: retries after failures that never slow down.

Looks at the latest ``intervals`` (4) retry intervals after failures (all
measured within ``window``): if none grows by at least ``growth`` (1.5×) over
the one before and they average under ``max_average`` (2 s), the client is not
backing off. Exponential backoff (1, 2, 4 s …) grows by 2× every step, and
the incident's fixed client (1, 2, 4 s, then a 5 s pause) grows within every
four intervals, so neither is flagged.
"""

from __future__ import annotations

from detectors.findings import Finding
from detectors.settings import NoBackoffSettings
from detectors.state import ClientState

NAME = "no_backoff"


def evaluate(state: ClientState, settings: NoBackoffSettings, t: float) -> Finding | None:
    intervals = state.intervals
    n = settings.intervals
    if intervals is None or len(intervals) < n:
        return None
    when = state.interval_times
    assert when is not None  # pushed together with intervals
    if when[-n] < t - settings.window:
        return None
    recent = intervals[-n:]
    growth = settings.growth
    for previous, current in zip(recent, recent[1:], strict=False):
        if current >= growth * previous:
            return None  # it backs off at least once: not this rule's business
    average = sum(recent) / n
    if average >= settings.max_average:
        return None
    return Finding(
        state.key,
        NAME,
        "warning",
        {
            "intervals": [round(x, 6) for x in recent],
            "average": average,
            "first_seen": when[-n],
            "last_seen": when[-1],
        },
        t,
    )
