"""auth_failure_loop: a client failing auth again and again — the incident, at any pace.

Critical in either of two ways:

* **fast**: ``consecutive`` (3) auth failures follow each other with every
  retry sooner than ``retry_within`` (1 s) after the previous attempt ended —
  a client that never waits before presenting the same bad credentials;
* **steady**: ``steady`` (8, and never fewer than ``consecutive``) auth
  failures follow each other with every retry sooner than ``steady_within``
  (7 s) and no retry interval ``steady_growth`` (2×) as long as an earlier one
  of the streak — a client that waits, but never longer: it does not back off
  and never succeeds, so it loops at whatever pace it has (0.2/s … 50/s).

Independently, ≥ ``warning`` (10) / ≥ ``critical`` (30) auth failures within
``window`` (60 s) however they are paced.

The streaks are maintained by the tracker (an auth failure extends them, any
other end or a pause of ``retry_within`` / ``steady_within`` resets them;
loopwatch's own refusals do neither); each matches only while the client is
still active without such a pause, so a client that stopped stops matching and
its flag clears after the quiet period. Retry intervals shorter than
``retry_within`` count as ``retry_within`` when judging growth: under a second,
scheduling noise is not backoff (and the fast streak judges those retries).
"""

from __future__ import annotations

from array import array
from typing import Any

from .. import ring
from ..findings import Finding, Severity
from ..settings import AuthFailureLoopSettings
from ..state import ClientState, Failures
from .evidence import close_codes, finding, severity, span

NAME = "auth_failure_loop"


def check(state: ClientState, settings: AuthFailureLoopSettings, t: float) -> Severity | None:
    failures = state.failures
    times = failures.auth_times if failures is not None else None
    if failures is None or times is None:
        return None
    idle = t - max(state.attempt_t, state.end_t)
    if failures.streak >= settings.consecutive and idle < settings.retry_within:
        return "critical"
    if idle < settings.steady_within and steady(failures, settings):
        return "critical"
    return severity(ring.count_since(times, t - settings.window), settings.warning, settings.critical)


def steady(failures: Failures, settings: AuthFailureLoopSettings) -> bool:
    """Whether the steady streak is long enough and its retry intervals never grew."""
    needed = settings.steady
    if needed is None or failures.steady < max(needed, settings.consecutive):
        return False
    gaps = failures.steady_gaps
    if gaps is None:
        return False
    return not backs_off(gaps, min(len(gaps), needed - 1), settings.steady_growth, settings.retry_within)


def backs_off(gaps: array[float], n: int, growth: float, floor: float) -> bool:
    """Whether one of the latest ``n`` intervals is ``growth`` times an earlier one
    of them (intervals under ``floor`` count as ``floor``). Indexes, no slice: no
    allocation on the hot path."""
    start = len(gaps) - n
    lowest = max(gaps[start], floor)
    for i in range(start + 1, len(gaps)):
        gap = max(gaps[i], floor)
        if gap >= growth * lowest:
            return True
        if gap < lowest:
            lowest = gap
    return False


def evidence(state: ClientState, settings: AuthFailureLoopSettings, t: float) -> dict[str, Any]:
    failures = state.failures or Failures()
    times = failures.auth_times
    count = ring.count_since(times, t - settings.window)
    first, last = span(times, count)
    return {
        "consecutive": failures.streak,
        "steady": failures.steady,
        "retry_intervals": [round(gap, 3) for gap in failures.steady_gaps or ()],
        "auth_failures": count,
        "window": settings.window,
        "rate": count / settings.window,
        "close_codes": close_codes(state),
        "first_seen": first,
        "last_seen": last,
    }


def evaluate(state: ClientState, settings: AuthFailureLoopSettings, t: float) -> Finding | None:
    return finding(NAME, check, evidence, state, settings, t)
