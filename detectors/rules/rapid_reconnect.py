"""rapid_reconnect: many attempts that came to nothing, whatever the reason.

Counts attempts in ``window`` (10 s) that were refused (by loopwatch, except
while a breaker is open — that is not the client's doing), failed at the
handshake, or lived under ``lived_under`` (5 s): ≥ ``warning`` (10) is a
warning, ≥ ``critical`` (30) critical. Long-lived connections never count, so
many healthy users behind one address are not a loop.
"""

from __future__ import annotations

from detectors import ring
from detectors.findings import Finding
from detectors.rules.evidence import close_codes, severity, span
from detectors.settings import RapidReconnectSettings
from detectors.state import ClientState

NAME = "rapid_reconnect"


def evaluate(state: ClientState, settings: RapidReconnectSettings, t: float) -> Finding | None:
    times = state.bad_times
    lowest = settings.warning if settings.warning is not None else settings.critical
    if times is None or lowest is None or len(times) < lowest:
        return None  # fewer entries than any threshold: no need to look at times
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
            "attempts": count,
            "window": settings.window,
            "rate": count / settings.window,
            "close_codes": close_codes(state),
            "first_seen": first,
            "last_seen": last,
        },
        t,
    )
