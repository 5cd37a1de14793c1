"""The circuit breaker on its own: the transition table, ratio, escalation, probes."""

from __future__ import annotations

import itertools

import pytest

from loopwatch.detectors.breaker import (
    ALLOW,
    CLOSED,
    HALF_OPEN,
    OPEN,
    PROBE,
    REFUSE,
    TRANSITIONS,
    BreakerState,
    CircuitBreaker,
    IllegalTransition,
)
from loopwatch.detectors.settings import CircuitBreakerSettings

S = CircuitBreakerSettings(
    failure_ratio=0.5, window="10s", min_calls=4, open_wait="5s", open_wait_max="20s",
    half_open_probes=2, probe_timeout="3s",
)


def breaker(settings: CircuitBreakerSettings = S) -> CircuitBreaker:
    return CircuitBreaker("upstream", settings)


def trip(b: CircuitBreaker, t: float) -> None:
    for _ in range(S.min_calls):
        b.record(t, success=False)
    assert b.state is OPEN


def to_half_open(b: CircuitBreaker) -> float:
    t = b.open_until
    (transition,) = b.advance(t)
    assert (transition.from_state, transition.to_state) == ("open", "half_open")
    return t


def probe(b: CircuitBreaker, t: float) -> None:
    assert b.permit(t) == PROBE
    b.take_probe(t)


# --- the table -------------------------------------------------------------

LEGAL = sorted(TRANSITIONS)
ILLEGAL = [
    (a, b) for a, b in itertools.product(BreakerState, BreakerState) if (a, b) not in TRANSITIONS
]


@pytest.mark.parametrize(("src", "dst"), LEGAL, ids=lambda s: str(s))
def test_every_legal_transition(src: BreakerState, dst: BreakerState) -> None:
    b = breaker()
    b.state = src
    transition = b.transition(dst, 1.0)
    assert b.state is dst
    assert (transition.name, transition.t, transition.from_state, transition.to_state) == (
        "upstream", 1.0, src.value, dst.value,
    )
    assert b.transitions_total[dst.value] == 1


@pytest.mark.parametrize(("src", "dst"), ILLEGAL, ids=lambda s: str(s))
def test_illegal_transitions_raise(src: BreakerState, dst: BreakerState) -> None:
    b = breaker()
    b.state = src
    with pytest.raises(IllegalTransition, match=f"{src} → {dst}"):
        b.transition(dst, 1.0)
    assert b.state is src


def test_the_table_is_the_design() -> None:
    assert set(TRANSITIONS) == {(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED), (HALF_OPEN, OPEN)}
    assert len(ILLEGAL) == 5  # self-loops, CLOSED→HALF_OPEN, OPEN→CLOSED (only a reset may)


@pytest.mark.parametrize("src", list(BreakerState))
def test_reset_closes_from_any_state(src: BreakerState) -> None:
    b = breaker()
    b.state = src
    b.trips = 3
    transition = b.reset(2.0)
    assert b.state is CLOSED and b.trips == 0
    if src is CLOSED:
        assert transition is None
    else:
        assert transition is not None and (transition.from_state, transition.to_state) == (src.value, "closed")


# --- closed: ratio over a window with a minimum of calls ------------------


def test_min_calls_before_the_ratio_counts() -> None:
    b = breaker()
    for _ in range(S.min_calls - 1):
        assert b.record(0.0, success=False) == ()
    assert b.state is CLOSED  # 3 failures out of 3, but fewer than min_calls
    (transition,) = b.record(0.0, success=False)
    assert transition.to_state == "open" and b.state is OPEN


@pytest.mark.parametrize(("failures", "successes", "opens"), [(2, 3, False), (3, 3, True), (5, 5, True), (4, 5, False)])
def test_failure_ratio_threshold(failures: int, successes: int, opens: bool) -> None:
    b = breaker()
    for _ in range(successes):
        b.record(0.0, success=True)
    for _ in range(failures):
        b.record(0.0, success=False)
    assert (b.state is OPEN) == opens


def test_failures_outside_the_window_do_not_count() -> None:
    b = breaker()
    for t in (0.0, 4.0, 8.0):
        b.record(t, success=False)
    b.record(12.0, success=False)  # the first is older than 10 s by now
    assert b.state is CLOSED
    b.record(12.5, success=False)
    assert b.state is OPEN


def test_a_disabled_breaker_never_opens() -> None:
    b = breaker(S.model_copy(update={"enabled": False}))
    for _ in range(100):
        b.record(0.0, success=False)
    assert b.state is CLOSED and b.permit(0.0) == ALLOW


# --- open: refuse, escalate -----------------------------------------------


def test_open_refuses_until_the_wait_then_half_opens() -> None:
    b = breaker()
    trip(b, 10.0)
    assert b.permit(10.0) == REFUSE
    assert b.retry_after(12.0) == pytest.approx(3.0)
    assert b.next_wake == 15.0
    assert b.advance(14.9) == ()
    assert b.state is OPEN
    to_half_open(b)
    assert b.state is HALF_OPEN


def test_outcomes_while_open_are_ignored() -> None:
    b = breaker()
    trip(b, 0.0)
    assert b.record(1.0, success=True) == ()
    assert b.record(1.0, success=False) == ()
    assert b.state is OPEN


def test_open_wait_doubles_on_repeated_trips_up_to_the_max() -> None:
    b = breaker()
    trip(b, 0.0)
    waits = [b.open_wait]
    for _ in range(4):
        t = to_half_open(b)
        probe(b, t)
        b.record(t + 0.1, success=False, probe=True)
        assert b.state is OPEN
        waits.append(b.open_wait)
    assert waits == [5.0, 10.0, 20.0, 20.0, 20.0]


def test_a_backend_down_for_days_keeps_the_breaker_open_for_the_max_wait() -> None:
    """The extremes probe: 2^1024 is no float, and trip 1 025 (17 hours of a
    down backend at the defaults) raised OverflowError: the breaker stuck
    half-open with its wait in the past, and its batch's other events lost."""
    b = breaker()
    trip(b, 0.0)
    for _ in range(1_100):
        t = to_half_open(b)
        probe(b, t)
        b.record(t + 0.1, success=False, probe=True)
        assert b.state is OPEN
    assert b.trips > 1_025
    assert b.open_wait == 20.0 and b.open_until == t + 0.1 + 20.0


def test_tripping_again_soon_after_closing_escalates_but_later_does_not() -> None:
    b = breaker()
    trip(b, 0.0)
    t = to_half_open(b)
    for _ in range(2):
        probe(b, t)
        b.record(t, success=True, probe=True)
    assert b.state is CLOSED
    trip(b, t + 1.0)  # within a window of closing: the same trouble
    assert b.open_wait == 10.0
    t = to_half_open(b)
    for _ in range(2):
        probe(b, t)
        b.record(t, success=True, probe=True)
    trip(b, t + 60.0)  # long after: a new incident starts from the base wait
    assert b.open_wait == 5.0


# --- half-open: probes ------------------------------------------------------


def test_half_open_lets_n_probes_through_and_closes_when_all_succeed() -> None:
    b = breaker()
    trip(b, 0.0)
    t = to_half_open(b)
    probe(b, t)
    probe(b, t)
    assert b.permit(t) == REFUSE  # both probes are out
    assert b.record(t + 0.1, success=True, probe=True) == ()
    assert b.state is HALF_OPEN
    (transition,) = b.record(t + 0.2, success=True, probe=True)
    assert (transition.from_state, transition.to_state) == ("half_open", "closed")
    assert b.permit(t + 0.2) == ALLOW


def test_one_failed_probe_reopens() -> None:
    b = breaker()
    trip(b, 0.0)
    t = to_half_open(b)
    probe(b, t)
    probe(b, t)
    b.record(t + 0.1, success=True, probe=True)
    (transition,) = b.record(t + 0.2, success=False, probe=True)
    assert (transition.from_state, transition.to_state) == ("half_open", "open")


def test_only_probe_outcomes_count_when_half_open() -> None:
    b = breaker()
    trip(b, 0.0)
    t = to_half_open(b)
    probe(b, t)
    assert b.record(t, success=False) == ()  # an attempt from before the trip
    assert b.state is HALF_OPEN


def test_a_probe_without_outcome_times_out_as_a_failure() -> None:
    b = breaker()
    trip(b, 0.0)
    t = to_half_open(b)
    probe(b, t)
    assert b.next_wake == t + 3.0
    assert b.advance(t + 2.9) == ()
    (transition,) = b.advance(t + 3.0)
    assert transition.to_state == "open"


def test_a_released_probe_frees_its_slot() -> None:
    b = breaker()
    trip(b, 0.0)
    t = to_half_open(b)
    probe(b, t)
    probe(b, t)
    b.release_probe()  # e.g. the probe's outcome said nothing about this breaker
    assert b.permit(t) == PROBE


def test_reconfigure_keeps_state_and_disabling_resets() -> None:
    b = breaker()
    trip(b, 0.0)
    assert b.configure(S.model_copy(update={"min_calls": 50}), 1.0) == ()
    assert b.state is OPEN
    (transition,) = b.configure(S.model_copy(update={"enabled": False}), 2.0)
    assert transition.to_state == "closed" and b.state is CLOSED


def test_view_reports_counts_and_state() -> None:
    b = breaker()
    b.record(0.0, success=True)
    b.record(0.0, success=False)
    v = b.view(1.0)
    assert (v.state, v.calls, v.failures, v.failure_ratio) == ("closed", 2, 1, 0.5)
    trip(b, 2.0)
    v = b.view(3.0)
    assert v.state == "open" and v.retry_after == pytest.approx(4.0)
    assert v.to_dict()["transitions_total"] == {"closed": 0, "open": 1, "half_open": 0}


def test_an_open_breaker_says_what_opened_it() -> None:
    """The window is cleared when the breaker opens, so its view showed 0 calls
    and 0 failures: the trip keeps the counts that made it, and why."""
    b = breaker()
    assert b.view(0.0).to_dict()["last_trip"] is None
    b.record(0.0, success=True)
    b.record(0.0, success=True)
    b.record(0.5, success=False)
    (opened,) = b.record(1.0, success=False)
    assert (opened.cause, opened.calls, opened.failures) == ("failure_ratio", 4, 2)
    view = b.view(3.0).to_dict()
    assert (view["state"], view["calls"], view["failures"]) == ("open", 0, 0)
    assert view["last_trip"] == {"cause": "failure_ratio", "calls": 4, "failures": 2, "ago": 2.0}
    t = to_half_open(b)
    probe(b, t)
    probe(b, t)
    (reopened,) = b.record(t + 0.1, success=False, probe=True)
    assert (reopened.cause, reopened.calls, reopened.failures) == ("probe_failed", 2, 1)
    t = to_half_open(b)
    probe(b, t)
    (timed_out,) = b.advance(t + S.probe_timeout)
    assert (timed_out.cause, timed_out.calls, timed_out.failures) == ("probe_timeout", 1, 1)
    # Only an opening says why; the other moves carry nothing.
    (half_open,) = b.advance(b.open_until)
    assert half_open.cause is None and half_open.calls is None
    # A reset keeps the last trip for the record.
    b.reset(b.open_until + 1)
    assert b.view(b.open_until + 1).to_dict()["last_trip"]["cause"] == "probe_timeout"
