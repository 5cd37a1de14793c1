"""Folding events into a client's state, and what each event means.

This is where an event is *classified* once — auth failure, failed end,
short-lived, healthy — so the rules only read counters and rings. The
classification is returned as bit flags the engine uses to feed the breakers
and to decide whether the event may start a cooldown.

Two definitions from the design live here:

* A **retry interval** is the time from the end of one attempt (its close,
  refusal or failed handshake) to the next attempt of the same key. It is
  judged only after a failure, and only when the previous attempt had ended
  (a second socket opened alongside the first is not a retry).
* An **auth failure** is a close with a code in ``auth_close_codes`` that the
  proxy did not initiate itself, or a handshake answered with a status in
  ``auth_statuses``.
"""

from __future__ import annotations

import math
from array import array

from . import history, ring
from .events import Answered, Attempt, Closed, Event, HandshakeFailed, Opened, Rejected
from .settings import DetectionSettings
from .state import NEVER, Addresses, ClientState, Failures

# Bit flags describing an outcome.
FAILED = 1  # the attempt failed: refused, handshake failed, or a short abnormal/auth close
AUTH_FAILURE = 2
AUTH_SUCCESS = 4  # closed normally before healthy_after (a longer life is credited separately)
UPSTREAM_FAILURE = 8  # no answer, or a 5xx, at the handshake
UPSTREAM_SUCCESS = 16  # any other handshake answer, including 401/403
LOCAL = 32  # ended by the proxy's own limit (LOCAL_ERRORS): nobody's success or failure
CLIENT_LEFT = 64  # the client left before the upstream answered: the client's failure, not the upstream's

# Refusals the client cannot be blamed for: the breaker is about the upstream.
NEUTRAL_REJECTIONS = frozenset({"circuit_open"})
# Handshake errors of the proxy's own making (out of open files for the
# upstream's socket, or draining before the upstream answered): they blame
# neither the client nor the upstream.
LOCAL_ERRORS = frozenset({"fd_limit", "shutting_down"})
# Close-code histogram bound: codes are ints a backend chooses, keep the top few.
MAX_CODES = 16
_OTHER_CODE = -1


def _count_code(codes: array[int], code: int) -> None:
    """One more close with ``code`` in a histogram of codes and counts in turn (an
    array of two is 80 bytes where the smallest dict is 224, and a client that left
    keeps its histogram for ``client_ttl``). Beyond MAX_CODES codes, the close
    counts as _OTHER_CODE."""
    for i in range(0, len(codes), 2):
        if codes[i] == code:
            codes[i + 1] += 1
            return
    if len(codes) < 2 * MAX_CODES or code == _OTHER_CODE:
        codes.extend((code, 1))
    else:
        _count_code(codes, _OTHER_CODE)


def on_attempt(
    state: ClientState, event: Attempt, settings: DetectionSettings, addresses: Addresses | None = None
) -> None:
    t = event.t
    state.attempts += 1
    tau = settings.rate_window
    state.rate = state.rate_at(t, tau) + 1.0 / tau
    state.rate_t = t
    rules = settings.rules
    if state.end_t == NEVER:
        gap = math.inf
    else:
        gap = t - state.end_t
        failures = state.failures
        if failures is not None:
            afl = rules.auth_failure_loop
            if gap >= afl.retry_within:
                failures.streak = 0  # the client paused: whatever came before was not one fast loop …
            if gap >= afl.steady_within:
                _end_steady(failures)  # … nor a steady one
        if state.end_failed:
            if state.end_t >= state.attempt_t:  # a retry, not a socket opened alongside
                failures = state.failing()
                cap = rules.no_backoff.intervals
                failures.intervals = ring.push(failures.intervals, gap, cap)
                failures.interval_times = ring.push(failures.interval_times, t, cap)
        elif failures is not None and failures.intervals is not None:
            # A retry after a success starts a new backoff sequence.
            failures.intervals = failures.interval_times = None
    state.gap = gap
    state.attempt_t = t
    addr = event.addr
    if addr and addr != state.addr:  # the same address again keeps the copy held
        state.addr = addr if addresses is None else addresses.share(addr)
    state.last_seen = t
    if settings.history_size:
        _remember_packed(state, t, history.ATTEMPT, settings.history_size)


def on_rejected(state: ClientState, t: float, reason: str, settings: DetectionSettings) -> int:
    # Takes the fields, not a Rejected event: the engine records its own
    # refusals on the hot path and need not build an event object for it.
    state.end_t = t
    state.last_seen = t
    if settings.history_size:
        _remember_packed(state, t, history.pack_rejected(reason), settings.history_size)
    if reason in NEUTRAL_REJECTIONS:
        state.end_failed = False
        return 0
    state.end_failed = True
    state.bad_times = ring.push(state.bad_times, t, _rapid_cap(settings))
    return FAILED


def on_handshake_failed(
    state: ClientState, event: HandshakeFailed, settings: DetectionSettings
) -> int:
    t = event.t
    state.end_t = t
    state.last_seen = t
    if settings.history_size:
        _remember_packed(state, t, history.pack_failed(event.status, event.error), settings.history_size)
    if event.error in LOCAL_ERRORS:
        state.end_failed = False
        return LOCAL
    state.end_failed = True
    state.bad_times = ring.push(state.bad_times, t, _rapid_cap(settings))
    if event.error == "client_closed":
        # It came to nothing, but no upstream failed: a client that leaves while
        # a slow backend thinks (a closed tab) must not count toward the breaker.
        _end_streaks(state)
        return FAILED | CLIENT_LEFT
    status = event.status
    if status is not None and status in settings.auth_statuses:
        _auth_failure(state, t, settings)
        return FAILED | AUTH_FAILURE | UPSTREAM_SUCCESS
    _end_streaks(state)
    if status is None or status >= 500:
        return FAILED | UPSTREAM_FAILURE
    return FAILED | UPSTREAM_SUCCESS


def on_opened(state: ClientState, event: Opened, settings: DetectionSettings) -> int:
    state.add_open(event.conn_id, event.t)
    state.last_seen = event.t
    if settings.history_size:
        _remember_packed(state, event.t, history.OPENED, settings.history_size)
    return UPSTREAM_SUCCESS


def on_closed(state: ClientState, event: Closed, settings: DetectionSettings) -> int:
    t = event.t
    state.remove_open(event.conn_id)
    state.end_t = t
    state.last_seen = t
    code = event.code
    if settings.history_size:
        packed = history.pack_closed(code, event.initiator, event.duration)
        _remember_packed(state, t, packed, settings.history_size)
    codes = state.codes
    if codes is None:
        state.codes = array("q", (code, 1))
    else:
        _count_code(codes, code)
    if event.initiator == "proxy":
        # loopwatch does not judge a client by closes it caused itself
        # (close-oldest uses 1008, shutdown 1001, size limits 1009).
        state.end_failed = False
        return 0
    duration = event.duration
    healthy = duration >= settings.healthy_after
    normal = code in settings.normal_close_codes
    auth = code in settings.auth_close_codes
    rules = settings.rules
    if duration < rules.rapid_reconnect.lived_under:
        state.bad_times = ring.push(state.bad_times, t, _rapid_cap(settings))
    if auth:
        if healthy:
            failures = state.failing()
            failures.streak = 0  # e.g. a token that expired after an hour: not a loop
            _end_steady(failures)
            failures.auth_times = ring.push(failures.auth_times, t, _auth_cap(settings))
            state.end_failed = False
            return AUTH_FAILURE
        _auth_failure(state, t, settings)
        state.end_failed = True
        return FAILED | AUTH_FAILURE
    _end_streaks(state)
    if duration < rules.short_lived.lived_under and not normal:
        failures = state.failing()
        failures.short_times = ring.push(failures.short_times, t, _short_cap(settings))
    failed = not healthy and not normal
    state.end_failed = failed
    if failed:
        return FAILED
    return 0 if healthy else AUTH_SUCCESS


def on_answered(state: ClientState, t: float) -> None:
    """A held refusal was answered at ``t``: the attempt ended then, so retry
    intervals count from here (the hold is loopwatch's pause, not the client's)."""
    if t > state.end_t:
        state.end_t = t
    if t > state.last_seen:
        state.last_seen = t


def apply(
    state: ClientState, event: Event, settings: DetectionSettings, addresses: Addresses | None = None
) -> int:
    """Fold any event into ``state`` (replay and tests); returns its classification.
    ``addresses``: where the engine keeps one copy of each peer address."""
    if isinstance(event, Attempt):
        on_attempt(state, event, settings, addresses)
        return 0
    if isinstance(event, Rejected):
        return on_rejected(state, event.t, event.reason, settings)
    if isinstance(event, HandshakeFailed):
        return on_handshake_failed(state, event, settings)
    if isinstance(event, Opened):
        return on_opened(state, event, settings)
    if isinstance(event, Answered):
        on_answered(state, event.t)
        return 0
    return on_closed(state, event, settings)


def _auth_failure(state: ClientState, t: float, settings: DetectionSettings) -> None:
    failures = state.failing()
    failures.streak += 1
    failures.auth_times = ring.push(failures.auth_times, t, _auth_cap(settings))
    s = settings.rules.auth_failure_loop
    if s.steady is None:
        return
    # A pause of steady_within before an attempt ended the streak (on_attempt).
    # The retry interval judged is the latest attempt's: this failure's own,
    # unless sockets overlap; one opened after a pause adds none.
    failures.steady += 1
    gap = state.gap
    if failures.steady > 1 and gap < s.steady_within:
        failures.steady_gaps = ring.push(failures.steady_gaps, gap, s.steady - 1)


def _end_streaks(state: ClientState) -> None:
    """An end that is not an auth failure ends both streaks (a client that never failed has none)."""
    failures = state.failures
    if failures is not None:
        failures.streak = 0
        _end_steady(failures)


def _end_steady(failures: Failures) -> None:
    failures.steady = 0
    failures.steady_gaps = None


def _remember_packed(state: ClientState, t: float, packed: int, size: int) -> None:
    ring = state.history
    if ring is None:
        ring = state.history = array("d")
    ring.append(t)
    ring.append(packed)  # exact: packed values fit a double's 53 bits (detectors.history)
    if len(ring) > 2 * size:
        del ring[: len(ring) - 2 * size]


# Ring capacities: a ring only needs to hold as many entries as the largest
# threshold that counts it, since "≥ N in the window" only looks N back.
def _auth_cap(settings: DetectionSettings) -> int:
    s = settings.rules.auth_failure_loop
    return max(s.warning or 1, s.critical or 1)


def _rapid_cap(settings: DetectionSettings) -> int:
    s = settings.rules.rapid_reconnect
    return max(s.warning or 1, s.critical or 1)


def _short_cap(settings: DetectionSettings) -> int:
    s = settings.rules.short_lived
    return max(s.warning or 1, s.critical or 1)
