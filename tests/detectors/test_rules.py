"""Each rule at its thresholds: fires at N, not at N−1, with the right severity.

Rules are pure functions of a client's state, so these tests fold an event
table into a ``ClientState`` (tracker) and evaluate the rule at a given time.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from itertools import chain
from typing import Any

import pytest

from loopwatch.detectors.events import Attempt, Closed, Event, Opened, Rejected
from loopwatch.detectors.findings import Finding
from loopwatch.detectors.rules import (
    RULES,
    auth_failure_loop,
    duplicate_connections,
    no_backoff,
    rapid_reconnect,
    short_lived,
)
from loopwatch.detectors.settings import DetectionSettings
from loopwatch.detectors.state import ClientState
from tests.detectors.helpers import ROUTE, connection, end_of, fold, refused, schedule

K = "alice@10.0.0.5"
D = DetectionSettings()
COUNTING_ONLY = DetectionSettings(rules={"auth_failure_loop": {"steady": None}})  # type: ignore[arg-type]


def run(rule: Any, events: list[Event], t: float | None = None, settings: DetectionSettings = D) -> Finding | None:
    state = fold(events, settings)
    block = {r.name: r for r in RULES}[rule.NAME].settings(settings.rules)
    return rule.evaluate(state, block, events[-1].t if t is None else t)


def severity(finding: Finding | None) -> str | None:
    return None if finding is None else finding.severity


def paced(make: Callable[[float], list[Event]], n: int, every: float, start: float = 0.0) -> list[Event]:
    return list(chain.from_iterable(make(start + i * every) for i in range(n)))


# --- auth_failure_loop -----------------------------------------------------


@pytest.mark.parametrize(
    ("failures", "retry", "expected"),
    [
        (2, 0.05, None),  # two is not yet a loop
        (3, 0.05, "critical"),  # the incident, by its third failure
        (3, 0.999, "critical"),
        (3, 1.0, None),  # a 1 s pause is backing off
        (6, 2.0, None),
    ],
)
def test_auth_streak(failures: int, retry: float, expected: str | None) -> None:
    events = list(schedule(K, 0.0, [retry] * (failures - 1)))
    finding = run(auth_failure_loop, events)
    assert severity(finding) == expected
    if finding is not None:
        assert finding.evidence["consecutive"] == failures
        assert finding.evidence["close_codes"] == {"1008": failures}
        assert finding.rule == "auth_failure_loop" and finding.key == K


def test_auth_streak_counts_401_and_403_handshakes() -> None:
    events = refused(K, 0.0, 401) + refused(K, 0.1, 403) + refused(K, 0.2, 401)
    assert severity(run(auth_failure_loop, events)) == "critical"


@pytest.mark.parametrize(
    "breaker",
    [
        connection(K, 0.1, lived=0.01, code=1011),  # a non-auth close
        refused(K, 0.1, 503),  # a non-auth handshake failure
        connection(K, 0.1, lived=10.0, code=1000),  # a success
        connection(K, 0.1, lived=3600.0, code=1008),  # healthy for an hour, then its token expired
    ],
    ids=["1011", "503", "success", "token-expiry"],
)
def test_auth_streak_is_broken_by_any_other_end(breaker: list[Event]) -> None:
    first = connection(K, 0.0, lived=0.01, code=1008)
    second_start = end_of(breaker) + 0.05
    rest = list(schedule(K, second_start, [0.05]))  # two more quick failures
    assert severity(run(auth_failure_loop, first + breaker + rest)) is None


def test_auth_streak_ignores_closes_the_proxy_made() -> None:
    events = list(chain.from_iterable(
        connection(K, i * 0.1, lived=0.01, code=1008, initiator="proxy") for i in range(5)
    ))
    assert run(auth_failure_loop, events) is None


def test_auth_streak_stops_matching_once_the_client_is_quiet() -> None:
    events = list(schedule(K, 0.0, [0.05, 0.05]))
    last = end_of(events)
    assert severity(run(auth_failure_loop, events, last + 0.5)) == "critical"
    assert run(auth_failure_loop, events, last + 1.0) is None


def test_auth_streak_survives_refusals_without_a_pause() -> None:
    """Refused attempts neither extend nor break the streak; only a pause does."""
    looping = list(schedule(K, 0.0, [0.05, 0.05]))
    t = end_of(looping)
    refusals: list[Event] = []
    for _ in range(10):
        t += 0.05
        refusals += [Attempt(K, ROUTE, t), Rejected(K, ROUTE, t, "cooldown")]
    state_events = looping + refusals
    assert severity(run(auth_failure_loop, state_events)) == "critical"
    after = connection(K, t + 0.05, lived=0.01, code=1008)
    finding = run(auth_failure_loop, state_events + after)
    assert finding is not None and finding.evidence["consecutive"] == 4
    paused = connection(K, t + 1.5, lived=0.01, code=1008)
    assert run(auth_failure_loop, state_events + paused) is None


@pytest.mark.parametrize(
    ("failures", "every", "expected"),
    [
        (9, 6.0, None),
        (10, 6.0, "warning"),  # ≥ 10 in 60 s however paced (54 s from first to last)
        (29, 2.0, "warning"),
        (30, 2.0, "critical"),
        (12, 6.0, "warning"),  # the window slides: 10 of the 12 are within 60 s
    ],
)
def test_auth_failures_counted_in_the_window(failures: int, every: float, expected: str | None) -> None:
    # Only the counting thresholds: at a steady 2 s or 6 s the steady streak would
    # be critical by the 8th failure (see the steady tests below).
    events = paced(lambda t: connection(K, t, lived=0.01, code=1008), failures, every)
    finding = run(auth_failure_loop, events, settings=COUNTING_ONLY)
    assert severity(finding) == expected
    if finding is not None:
        assert finding.evidence["consecutive"] == 1  # paced ≥ 1 s apart: never a streak
        assert finding.evidence["auth_failures"] == min(failures, 10 if every == 6.0 else failures)


def test_auth_failures_older_than_the_window_do_not_count() -> None:
    events = paced(lambda t: connection(K, t, lived=0.01, code=1008), 10, 6.0)
    assert severity(run(auth_failure_loop, events, events[-1].t + 6.5, COUNTING_ONLY)) is None  # first is 60.5 s old


def test_app_auth_codes_count_when_configured() -> None:
    custom = DetectionSettings(auth_close_codes=(1008, 4001, 4003))
    events = list(schedule(K, 0.0, [0.05, 0.05], code=4003))
    assert run(auth_failure_loop, events) is None
    assert severity(run(auth_failure_loop, events, settings=custom)) == "critical"


# --- auth_failure_loop: the steady streak ----------------------------------


def steady_loop(gaps: list[float], start: float = 0.0) -> list[Event]:
    """Quick 1008s, retried after each of ``gaps`` (from the close)."""
    return list(schedule(K, start, gaps))


@pytest.mark.parametrize(
    ("failures", "gap", "expected"),
    [
        (7, 2.0, None),  # seven is not yet a loop
        (8, 2.0, "critical"),  # every 2 s: the slow loop, by its 8th failure
        (8, 1.2, "critical"),
        (8, 5.0, "critical"),  # 0.2/s
        (8, 6.9, "critical"),
        (8, 7.0, None),  # a 7 s pause ends the streak: slower clients are not judged by it
        (40, 30.0, None),  # backoff capped at 30 s repeats steadily, but at 0.033/s
    ],
)
def test_steady_streak(failures: int, gap: float, expected: str | None) -> None:
    events = steady_loop([gap] * (failures - 1))
    finding = run(auth_failure_loop, events)
    assert severity(finding) == expected
    if finding is not None:
        assert finding.evidence["consecutive"] == 1  # every retry ≥ 1 s: never the fast streak
        assert finding.evidence["steady"] == failures
        assert finding.evidence["retry_intervals"] == pytest.approx([gap] * (failures - 1))
        assert finding.evidence["auth_failures"] == failures < D.rules.auth_failure_loop.warning


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("every", [1.5, 2.0, 5.0])
def test_steady_streak_with_jitter(every: float, seed: int) -> None:
    """± 20 % around the pace: never twice an earlier interval, never past 7 s."""
    rng = random.Random(seed)
    gaps = [every * rng.uniform(0.8, 1.2) for _ in range(7)]
    assert run(auth_failure_loop, steady_loop(gaps[:6])) is None
    assert severity(run(auth_failure_loop, steady_loop(gaps))) == "critical"


@pytest.mark.parametrize(
    ("gaps", "expected"),
    [
        ([1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0], None),  # exponential backoff
        ([1.0, 2.2, 4.2, 4.2, 4.2, 4.2, 4.2], None),  # backoff capped at 4.2 s: the growth is in view
        ([1.0, 2.2, 4.2, 4.2, 4.2, 4.2, 4.2, 4.2], "critical"),  # … then it is not: a loop at 0.24/s
        ([2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 4.1], None),  # it has started to back off
        ([3.0, 3.3, 3.6, 3.9, 4.2, 4.5, 4.8], "critical"),  # growing, but never by 2×: not backing off
        # The fixed client failing forever: ≥ 10 failures a minute, a warning, never critical.
        ([1.0, 2.0, 4.0, 5.0, 1.0, 2.0, 4.0, 5.0, 1.0, 2.0, 4.0], "warning"),
        # Under 1 s, scheduling noise is not backoff: 0.3 s counts as 1 s (the
        # fast streak never reaches 3 here: every other retry waits 1.2 s).
        ([0.3, 1.2, 0.3, 1.2, 0.3, 1.2, 0.3], "critical"),
    ],
)
def test_steady_streak_judges_growth_within_the_streak(gaps: list[float], expected: str | None) -> None:
    finding = run(auth_failure_loop, steady_loop(gaps))
    assert severity(finding) == expected
    if finding is not None:
        assert finding.evidence["consecutive"] < 3


@pytest.mark.parametrize(
    ("breaker", "pause"),
    [
        (lambda t: connection(K, t, lived=0.01, code=1011), 2.0),  # a non-auth close
        (lambda t: refused(K, t, 503), 2.0),  # a non-auth handshake failure
        (lambda t: connection(K, t, lived=10.0, code=1000), 2.0),  # a success
        (lambda t: connection(K, t, lived=0.5, code=1000), 2.0),  # a short one that ended normally
        (lambda t: connection(K, t, lived=3600.0, code=1008), 2.0),  # healthy for an hour, then its token expired
        (lambda t: [], 7.0),  # a pause
    ],
    ids=["1011", "503", "success", "short-success", "token-expiry", "pause"],
)
def test_steady_streak_is_broken_by_any_other_end_or_a_pause(
    breaker: Callable[[float], list[Event]], pause: float
) -> None:
    first = steady_loop([2.0] * 3)  # four failures
    middle = breaker(end_of(first) + 2.0)
    rest = steady_loop([2.0] * 3, (end_of(middle) if middle else end_of(first)) + pause)  # four more
    assert run(auth_failure_loop, first + middle + rest) is None
    failures = fold(first + middle + rest).failures
    assert failures is not None and failures.steady == 4
    unbroken = first + steady_loop([2.0] * 3, end_of(first) + 2.0)
    assert severity(run(auth_failure_loop, unbroken)) == "critical"


def test_steady_streak_survives_refusals_and_stops_matching_once_the_client_is_quiet() -> None:
    looping = steady_loop([2.0] * 7)
    t = end_of(looping)
    assert severity(run(auth_failure_loop, looping, t + 6.9)) == "critical"
    assert run(auth_failure_loop, looping, t + 7.0) is None
    refusals: list[Event] = []
    for _ in range(5):  # its cooldown: refused every 2 s
        t += 2.0
        refusals += [Attempt(K, ROUTE, t), Rejected(K, ROUTE, t, "cooldown")]
    after = connection(K, t + 2.0, lived=0.01, code=1008)
    finding = run(auth_failure_loop, looping + refusals + after)
    assert finding is not None and finding.evidence["steady"] == 9
    paused = connection(K, t + 7.5, lived=0.01, code=1008)
    assert run(auth_failure_loop, looping + refusals + paused) is None


def test_steady_streak_counts_sockets_opened_alongside_but_not_their_intervals() -> None:
    """Two sockets per round (the incident's two effects), a round every 2 s."""
    events: list[Event] = []
    t = 0.0
    for _ in range(4):
        a = connection(K, t, lived=0.01, code=1008)
        b = connection(K, t + 0.001, lived=0.01, code=1008)
        events += sorted(a + b, key=lambda e: e.t)
        t = end_of(b) + 2.0
    finding = run(auth_failure_loop, events)
    assert finding is not None and finding.severity == "critical"
    assert finding.evidence["steady"] == 8
    assert len(finding.evidence["retry_intervals"]) == 6  # the first round has no retry interval


def test_steady_streak_needs_at_least_consecutive_failures_and_can_be_switched_off() -> None:
    looser = DetectionSettings(rules={"auth_failure_loop": {"consecutive": 10}})  # type: ignore[arg-type]
    assert run(auth_failure_loop, steady_loop([2.0] * 8), settings=looser) is None
    assert severity(run(auth_failure_loop, steady_loop([2.0] * 9), settings=looser)) == "critical"
    assert run(auth_failure_loop, steady_loop([0.05] * 8), settings=looser) is None  # the fast streak too
    assert severity(run(auth_failure_loop, steady_loop([0.05] * 9), settings=looser)) == "critical"
    stricter = DetectionSettings(rules={"auth_failure_loop": {"steady": 4, "steady_within": "20s"}})  # type: ignore[arg-type]
    assert severity(run(auth_failure_loop, steady_loop([15.0] * 3), settings=stricter)) == "critical"
    assert severity(run(auth_failure_loop, steady_loop([2.0] * 19))) == "critical"
    # Off: only the counting thresholds are left (20 failures in 38 s: a warning).
    assert severity(run(auth_failure_loop, steady_loop([2.0] * 19), settings=COUNTING_ONLY)) == "warning"


# --- rapid_reconnect -------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "expected"), [(9, None), (10, "warning"), (29, "warning"), (30, "critical")]
)
def test_rapid_reconnect_thresholds(n: int, expected: str | None) -> None:
    events = paced(lambda t: connection(K, t, lived=0.1, code=1011), n, 0.25)
    finding = run(rapid_reconnect, events)
    assert severity(finding) == expected
    if finding is not None:
        assert finding.evidence["attempts"] == n
        assert finding.evidence["close_codes"] == {"1011": n}


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda t: connection(K, t, lived=4.9, code=1000), "warning"),  # lived under 5 s
        (lambda t: connection(K, t, lived=5.0, code=1000), None),  # lived 5 s: healthy
        (lambda t: refused(K, t, None, "connect"), "warning"),
        (lambda t: refused(K, t, 401), "warning"),
        (lambda t: [Attempt(K, ROUTE, t), Rejected(K, ROUTE, t, "min_interval")], "warning"),
        (lambda t: [Attempt(K, ROUTE, t), Rejected(K, ROUTE, t, "circuit_open")], None),
    ],
    ids=["short", "healthy", "connect-error", "401", "refused", "circuit-open"],
)
def test_rapid_reconnect_counts_what_came_to_nothing(make: Callable[[float], list[Event]], expected: str | None) -> None:
    # 10 attempts that each start as the previous one ends (so they are in 10 s only when short)
    events: list[Event] = []
    t = 0.0
    for _ in range(10):
        step = make(t)
        events += step
        t = min(step[-1].t, t + 0.9) + 0.05
    assert severity(run(rapid_reconnect, events)) == expected


def test_rapid_reconnect_window_slides() -> None:
    events = paced(lambda t: connection(K, t, lived=0.1, code=1006), 10, 1.2)  # 10 over 10.8 s
    assert run(rapid_reconnect, events) is None


# --- short_lived -----------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "code", "lived", "initiator", "expected"),
    [
        (4, 1006, 1.0, "client", None),
        (5, 1006, 1.0, "client", "warning"),
        (5, 1011, 4.9, "upstream", "warning"),
        (5, 1000, 1.0, "client", None),  # normal
        (5, 1001, 1.0, "client", None),  # going away (page reloads)
        (5, 1008, 1.0, "upstream", None),  # auth failure: auth_failure_loop's business
        (5, 1006, 5.0, "client", None),  # lived 5 s
        (5, 1009, 1.0, "proxy", None),  # loopwatch closed it itself
    ],
)
def test_short_lived(n: int, code: int, lived: float, initiator: Any, expected: str | None) -> None:
    events = paced(lambda t: connection(K, t, lived=lived, code=code, initiator=initiator), n, 11.0)
    finding = run(short_lived, events)
    assert severity(finding) == expected
    if finding is not None:
        assert finding.evidence["connections"] == n


def test_short_lived_window_and_critical_threshold() -> None:
    events = paced(lambda t: connection(K, t, lived=1.0, code=1006), 5, 16.0)  # 64 s from first to last
    assert run(short_lived, events) is None
    strict = DetectionSettings(rules={"short_lived": {"critical": 8}})  # type: ignore[arg-type]
    events = paced(lambda t: connection(K, t, lived=1.0, code=1006), 8, 2.0)
    assert severity(run(short_lived, events, settings=strict)) == "critical"


# --- duplicate_connections -------------------------------------------------


def _open(n: int, t: float = 0.0) -> list[Event]:
    events: list[Event] = []
    for i in range(n):
        events += [Attempt(K, ROUTE, t + i * 0.1), Opened(K, ROUTE, t + i * 0.1 + 0.005, i)]
    return events


@pytest.mark.parametrize(
    ("n", "at", "expected"),
    [
        (3, 60.0, None),  # three is allowed
        (4, 5.0, None),  # the 4th was opened at 0.305: held 4.695 s
        (4, 5.31, "warning"),  # all four held 5 s
        (10, 60.0, "warning"),
    ],
)
def test_duplicate_connections(n: int, at: float, expected: str | None) -> None:
    finding = run(duplicate_connections, _open(n), at)
    assert severity(finding) == expected
    if finding is not None:
        assert finding.evidence["concurrent"] == n
        assert finding.evidence["conn_ids"][0] == 0


def test_duplicate_connections_tells_when_to_look_again() -> None:
    state = fold(_open(4))
    s = D.rules.duplicate_connections
    assert duplicate_connections.recheck_at(state, s, 1.0) == pytest.approx(5.305)
    assert duplicate_connections.recheck_at(state, s, 6.0) is None  # already due
    closed = fold(_open(4) + [Closed(K, ROUTE, 6.0, 2, 1000, "", "client", 5.8)])
    assert closed.open_count == 3
    assert duplicate_connections.evaluate(closed, s, 60.0) is None
    assert duplicate_connections.recheck_at(closed, s, 6.0) is None


# --- no_backoff ------------------------------------------------------------


@pytest.mark.parametrize(
    ("gaps", "expected"),
    [
        ([0.05] * 3, None),  # three intervals: not enough to judge
        ([0.05] * 4, "warning"),
        ([0.5, 0.6, 0.7, 0.8], "warning"),  # growing, but never by 1.5×
        ([1.5, 1.5, 1.5, 1.5], "warning"),
        ([1.9, 1.9, 1.9, 1.9], "warning"),
        ([2.0, 2.0, 2.0, 2.0], None),  # averages 2 s: slow enough
        ([1.0, 2.0, 4.0, 8.0], None),  # exponential backoff
        ([0.1, 0.1, 0.1, 0.16], None),  # the last one grew by 1.5×
        ([4.0, 5.0, 1.0, 2.0], None),  # the fixed client's cycle: 2 ≥ 1.5 × 1
    ],
)
def test_no_backoff(gaps: list[float], expected: str | None) -> None:
    events = list(schedule(K, 0.0, gaps, code=1006))
    finding = run(no_backoff, events)
    assert severity(finding) == expected
    if finding is not None:
        assert finding.evidence["intervals"] == pytest.approx(gaps[-4:])


def test_no_backoff_only_judges_retries_after_failures() -> None:
    # four quick reconnects, but each after a *successful* connection
    events = list(schedule(K, 0.0, [0.05] * 4, lived=6.0, code=1000))
    assert run(no_backoff, events) is None


def test_no_backoff_ignores_a_socket_opened_alongside_another() -> None:
    """Two sockets per round (the incident's two effects): one retry interval per round."""
    events: list[Event] = []
    t = 0.0
    for round_ in range(4):
        a = connection(K, t, lived=0.01, code=1008)
        b = connection(K, t + 0.001, lived=0.01, code=1008)
        events += sorted(a + b, key=lambda e: e.t)
        t = end_of(b) + (0.05 if round_ < 3 else 0)
    state = fold(events)
    assert state.failures is not None and state.failures.intervals is not None
    assert len(state.failures.intervals) == 3


def test_no_backoff_forgets_old_intervals() -> None:
    events = list(schedule(K, 0.0, [0.05] * 4, code=1006))
    assert severity(run(no_backoff, events, events[-1].t + 59.0)) == "warning"
    assert run(no_backoff, events, events[-1].t + 61.0) is None


def test_retry_interval_is_from_the_end_of_one_attempt_to_the_next() -> None:
    events = connection(K, 0.0, lived=2.0, code=1006) + refused(K, 3.0, 503)
    events += [Attempt(K, ROUTE, 3.5), Rejected(K, ROUTE, 3.5, "cooldown"), Attempt(K, ROUTE, 4.25)]
    state = fold(events)
    assert state.failures is not None and state.failures.intervals is not None
    assert list(state.failures.intervals) == pytest.approx([3.0 - 2.005, 3.5 - 3.005, 4.25 - 3.5])


# --- all rules -------------------------------------------------------------


def test_a_healthy_client_matches_nothing() -> None:
    events = connection(K, 0.0, lived=3600.0, code=1000) + connection(K, 3601.0, lived=60.0, code=1001)
    state = fold(events)
    for rule in RULES:
        assert rule.evaluate(state, rule.settings(D.rules), 3700.0) is None


def test_every_finding_carries_first_and_last_seen() -> None:
    events = list(schedule(K, 0.0, [0.05] * 40, code=1008))
    state: ClientState = fold(events)
    t = events[-1].t
    found = [r.evaluate(state, r.settings(D.rules), t) for r in RULES]
    assert {f.rule for f in found if f} == {"auth_failure_loop", "rapid_reconnect", "no_backoff"}
    for f in found:
        if f:
            assert f.evidence["first_seen"] <= f.evidence["last_seen"] <= t
            assert f.to_dict()["evidence"] == dict(f.evidence)
