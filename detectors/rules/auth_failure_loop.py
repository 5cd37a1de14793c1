"""auth_failure_loop: a client failing auth again and again — the incident.

Critical when ``consecutive`` (3) auth failures follow each other with every
retry sooner than ``retry_within`` (1 s) after the previous attempt ended:
this is a client that never waits before presenting the same bad credentials.
Independently, ≥ ``warning`` (10) / ≥ ``critical`` (30) auth failures within
``window`` (60 s) however they are paced.

The streak is maintained by the tracker (an auth failure extends it, any other
end or a pause ≥ ``retry_within`` resets it); it matches only while the client
is still active without a pause, so a client that stopped stops matching and
its flag clears after the quiet period.
"""

from __future__ import annotations

from detectors import ring
from detectors.findings import Finding, Severity
from detectors.rules.evidence import close_codes, severity, span
from detectors.settings import AuthFailureLoopSettings
from detectors.state import ClientState

NAME = "auth_failure_loop"


def evaluate(state: ClientState, settings: AuthFailureLoopSettings, t: float) -> Finding | None:
    times = state.auth_times
    if times is None:
        return None
    last_activity = max(state.attempt_t, state.end_t)
    looping = state.streak >= settings.consecutive and t - last_activity < settings.retry_within
    count = ring.count_since(times, t - settings.window)
    level: Severity | None = "critical" if looping else severity(
        count, settings.warning, settings.critical
    )
    if level is None:
        return None
    first, last = span(times, max(count, 1))
    return Finding(
        state.key,
        NAME,
        level,
        {
            "consecutive": state.streak,
            "auth_failures": count,
            "window": settings.window,
            "rate": count / settings.window,
            "close_codes": close_codes(state),
            "first_seen": first,
            "last_seen": last,
        },
        t,
    )
