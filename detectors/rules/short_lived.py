"""short_lived: connections that open and die abnormally within seconds.

Counts connections in ``window`` (60 s) that lived under ``lived_under`` (5 s)
and ended with neither a normal code (1000/1001) nor an auth code: ≥
``warning`` (5) is a warning. Catches a client that connects, crashes on the
first message and reconnects — a loop that is not about auth.
"""

from __future__ import annotations

from detectors import ring
from detectors.findings import Finding
from detectors.rules.evidence import close_codes, severity, span
from detectors.settings import ShortLivedSettings
from detectors.state import ClientState

NAME = "short_lived"


def evaluate(state: ClientState, settings: ShortLivedSettings, t: float) -> Finding | None:
    times = state.short_times
    lowest = settings.warning if settings.warning is not None else settings.critical
    if times is None or lowest is None or len(times) < lowest:
        return None
    count = ring.count_since(times, t - settings.window)
    level = severity(count, settings.warning, settings.critical)
    if level is None:
        return None
    first, last = span(times, count)
    return Finding(
        state.key,
        NAME,
        level,
        {
            "connections": count,
            "window": settings.window,
            "lived_under": settings.lived_under,
            "rate": count / settings.window,
            "close_codes": close_codes(state),
            "first_seen": first,
            "last_seen": last,
        },
        t,
    )
