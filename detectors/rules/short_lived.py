"""short_lived: connections that open and die abnormally within seconds.

Counts connections in ``window`` (60 s) that lived under ``lived_under`` (5 s)
and ended with neither a normal code (1000/1001) nor an auth code: ≥
``warning`` (5) is a warning. Catches a client that connects, crashes on the
first message and reconnects — a loop that is not about auth.
"""

from __future__ import annotations

from typing import Any

from .. import ring
from ..findings import Finding, Severity
from ..settings import ShortLivedSettings
from ..state import ClientState
from .evidence import close_codes, finding, lowest, severity, span

NAME = "short_lived"


def check(state: ClientState, settings: ShortLivedSettings, t: float) -> Severity | None:
    times = state.failures.short_times if state.failures is not None else None
    if times is None or len(times) < lowest(settings.warning, settings.critical):
        return None
    return severity(ring.count_since(times, t - settings.window), settings.warning, settings.critical)


def evidence(state: ClientState, settings: ShortLivedSettings, t: float) -> dict[str, Any]:
    times = state.failures.short_times if state.failures is not None else None
    count = ring.count_since(times, t - settings.window)
    first, last = span(times, count)
    return {
        "connections": count,
        "window": settings.window,
        "lived_under": settings.lived_under,
        "rate": count / settings.window,
        "close_codes": close_codes(state),
        "first_seen": first,
        "last_seen": last,
    }


def evaluate(state: ClientState, settings: ShortLivedSettings, t: float) -> Finding | None:
    return finding(NAME, check, evidence, state, settings, t)
