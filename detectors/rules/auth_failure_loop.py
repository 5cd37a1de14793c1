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

from typing import Any

from detectors import ring
from detectors.findings import Finding, Severity
from detectors.rules.evidence import close_codes, finding, severity, span
from detectors.settings import AuthFailureLoopSettings
from detectors.state import ClientState

NAME = "auth_failure_loop"


def check(state: ClientState, settings: AuthFailureLoopSettings, t: float) -> Severity | None:
    times = state.auth_times
    if times is None:
        return None
    if state.streak >= settings.consecutive and t - max(state.attempt_t, state.end_t) < settings.retry_within:
        return "critical"
    return severity(ring.count_since(times, t - settings.window), settings.warning, settings.critical)


def evidence(state: ClientState, settings: AuthFailureLoopSettings, t: float) -> dict[str, Any]:
    times = state.auth_times
    count = ring.count_since(times, t - settings.window)
    first, last = span(times, count)
    return {
        "consecutive": state.streak,
        "auth_failures": count,
        "window": settings.window,
        "rate": count / settings.window,
        "close_codes": close_codes(state),
        "first_seen": first,
        "last_seen": last,
    }


def evaluate(state: ClientState, settings: AuthFailureLoopSettings, t: float) -> Finding | None:
    return finding(NAME, check, evidence, state, settings, t)
