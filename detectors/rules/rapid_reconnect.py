"""rapid_reconnect: many attempts that came to nothing, whatever the reason.

Counts attempts in ``window`` (10 s) that were refused (by loopwatch, except
while a breaker is open — that is not the client's doing), failed at the
handshake, or lived under ``lived_under`` (5 s): ≥ ``warning`` (10) is a
warning, ≥ ``critical`` (30) critical. Long-lived connections never count, so
many healthy users behind one address are not a loop.
"""

from __future__ import annotations

from typing import Any

from .. import ring
from ..findings import Finding, Severity
from ..settings import RapidReconnectSettings
from ..state import ClientState
from .evidence import close_codes, finding, lowest, severity, span

NAME = "rapid_reconnect"


def check(state: ClientState, settings: RapidReconnectSettings, t: float) -> Severity | None:
    times = state.bad_times
    if times is None or len(times) < lowest(settings.warning, settings.critical):
        return None  # fewer entries than any threshold: no need to look at times
    return severity(ring.count_since(times, t - settings.window), settings.warning, settings.critical)


def evidence(state: ClientState, settings: RapidReconnectSettings, t: float) -> dict[str, Any]:
    times = state.bad_times
    count = ring.count_since(times, t - settings.window)
    first, last = span(times, count)
    return {
        "attempts": count,
        "window": settings.window,
        "rate": count / settings.window,
        "close_codes": close_codes(state),
        "first_seen": first,
        "last_seen": last,
    }


def evaluate(state: ClientState, settings: RapidReconnectSettings, t: float) -> Finding | None:
    return finding(NAME, check, evidence, state, settings, t)
