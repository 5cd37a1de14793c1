"""Policy pieces on their own: cooldown math, rollout hashing, access lists, modes; and the fleet."""

from __future__ import annotations

import math
import random

import pytest

from loopwatch.detectors.access import AccessList, address_of
from loopwatch.detectors.fleet import Fleet
from loopwatch.detectors.policy import (
    Policy,
    cooldown_length,
    enforces,
    force_cooldown,
    in_rollout,
    rollout_bucket,
    rule_mode,
    start_cooldown,
)
from loopwatch.detectors.settings import (
    CooldownSettings,
    FleetSettings,
    PolicySettings,
    RapidReconnectSettings,
)
from loopwatch.detectors.state import ClientState
from loopwatch.detectors.units import escalated

C = CooldownSettings()


@pytest.mark.parametrize(
    ("repeat", "expected"), [(1, 5.0), (2, 10.0), (3, 20.0), (6, 160.0), (7, 300.0), (500, 300.0)]
)
def test_cooldown_doubles_per_repeat_capped_at_max(repeat: int, expected: float) -> None:
    assert cooldown_length(C, repeat) == expected


@pytest.mark.parametrize("factor", [1e300, 1e5, math.inf])
def test_any_factor_reaches_the_max_and_never_overflows(factor: float) -> None:
    """The extremes probe: `factor: 1e300` passed check-config, and a client's
    third cooldown raised OverflowError in the engine (the client escaped)."""
    settings = CooldownSettings(base="1s", factor=factor, max="1h")
    assert [cooldown_length(settings, repeat) for repeat in (1, 2, 3, 65, 10**6)] == [1.0] + [3600.0] * 4


@pytest.mark.parametrize(
    ("base", "factor", "steps", "cap", "expected"),
    [(5.0, 2.0, 0, 60.0, 5.0), (5.0, 2.0, 3, 60.0, 40.0), (5.0, 2.0, 4, 60.0, 60.0), (5.0, 2.0, 10**400, 60.0, 60.0),
     (5.0, 1.0, 10**9, 60.0, 5.0), (90.0, 2.0, 0, 60.0, 60.0), (0.0, 2.0, 9, 60.0, 0.0)],
)  # fmt: skip
def test_escalated_is_base_times_factor_to_the_steps_within_the_cap(
    base: float, factor: float, steps: int, cap: float, expected: float
) -> None:
    assert escalated(base, factor, steps, cap) == expected


def test_jitter_spreads_cooldowns_within_bounds_and_never_above_max() -> None:
    rng = random.Random(1)
    firsts = [start_cooldown(ClientState(f"k{i}", 0.0), C, 0.0, "r", True, rng).duration for i in range(500)]
    assert min(firsts) >= 4.5 and max(firsts) <= 5.5
    assert len(set(firsts)) > 400  # spread, not in step
    capped = ClientState("k", 0.0)
    capped.cool_repeat, capped.cool_until = 20, 0.0
    at_cap = []
    for _ in range(200):
        d = start_cooldown(capped, C, 1.0, "r", True, rng).duration
        assert 270.0 <= d <= 300.0
        at_cap.append(d)
        capped.cool_repeat, capped.cool_until = 20, 1.0
    # Spread below the cap too: cut at it, about half were exactly 300 s.
    assert at_cap.count(300.0) <= 2 and len(set(at_cap)) > 190


def test_same_seed_same_jitter() -> None:
    a = [start_cooldown(ClientState("k", 0.0), C, 0.0, "r", True, random.Random(7)).until for _ in range(3)]
    assert len(set(a)) == 1


def test_a_repeat_within_memory_escalates_and_after_memory_starts_over() -> None:
    s = CooldownSettings(jitter=0.0)
    state = ClientState("k", 0.0)
    rng = random.Random(0)
    first = start_cooldown(state, s, 0.0, "auth_failure_loop", True, rng)
    assert (first.repeat, first.duration, first.until) == (1, 5.0, 5.0)
    assert state.keep_until == 5.0 + 3600.0  # the store keeps it for the repeat memory
    second = start_cooldown(state, s, 6.0, "auth_failure_loop", True, rng)
    assert (second.repeat, second.duration) == (2, 10.0)
    later = start_cooldown(state, s, 16.0 + 3600.0, "auth_failure_loop", True, rng)
    assert (later.repeat, later.duration) == (1, 5.0)


def test_forced_cooldown_is_exact_and_enforced() -> None:
    state = ClientState("k", 0.0)
    action = force_cooldown(state, C, 10.0, 42.0)
    assert (action.until, action.rule, action.enforced) == (52.0, "manual", True)
    assert state.in_cooldown(51.9) and not state.in_cooldown(52.0)


def test_a_forced_cooldown_neither_adds_a_repeat_nor_erases_one() -> None:
    """An operator stepping in is no offence of the client's: its next cooldown
    by a rule is the one its own record calls for (was repeat 2, 10 s)."""
    s = CooldownSettings(jitter=0.0)
    rng = random.Random(0)
    fresh = ClientState("k", 0.0)
    assert force_cooldown(fresh, s, 0.0, 3.0).repeat == 0
    after = start_cooldown(fresh, s, 13.0, "auth_failure_loop", True, rng)
    assert (after.repeat, after.duration) == (1, 5.0)
    seasoned = ClientState("j", 0.0)
    start_cooldown(seasoned, s, 0.0, "auth_failure_loop", True, rng)
    assert force_cooldown(seasoned, s, 6.0, 3.0).repeat == 1
    again = start_cooldown(seasoned, s, 20.0, "auth_failure_loop", True, rng)
    assert (again.repeat, again.duration) == (2, 10.0)


def test_rollout_bucket_is_stable_and_uniform() -> None:
    assert rollout_bucket("alice@10.0.0.5") == rollout_bucket("alice@10.0.0.5")
    # a fixed value: the hash must not change between releases either (replicas agree)
    assert rollout_bucket("alice@10.0.0.5") == 2306
    enforced = sum(in_rollout(ClientState(f"user-{i}", 0.0), 25.0) for i in range(10_000))
    assert 2300 <= enforced <= 2700
    state = ClientState("k", 0.0)
    assert in_rollout(state, 100.0) and not in_rollout(state, 0.0)
    assert [in_rollout(state, 30.0) for _ in range(5)] == [in_rollout(state, 30.0)] * 5


def test_rollout_grows_monotonically() -> None:
    """Raising the percentage only adds clients: nobody enforced at 10 % is released at 20 %."""
    states = [ClientState(f"u{i}", 0.0) for i in range(2000)]
    at10 = {s.key for s in states if in_rollout(s, 10.0)}
    at20 = {s.key for s in states if in_rollout(s, 20.0)}
    assert at10 < at20


@pytest.mark.parametrize(
    ("key", "address"),
    [("sub@1.2.3.4", "1.2.3.4"), ("1.2.3.4", "1.2.3.4"), ("sub@2001:db8::1", "2001:db8::1"), ("a@b@::1", "::1")],
)
def test_address_of_a_key(key: str, address: str) -> None:
    assert address_of(key) == address


@pytest.mark.parametrize(
    ("entries", "key", "addr", "matches"),
    [
        (["mallory@6.6.6.6"], "mallory@6.6.6.6", "", True),
        (["mallory@6.6.6.6"], "mallory@6.6.6.7", "", False),
        (["10.0.0.0/8"], "alice@10.1.2.3", "", True),
        (["10.0.0.0/8"], "10.1.2.3", "", True),
        (["10.0.0.0/8"], "alice", "10.9.9.9", True),  # unbound key: the peer address decides
        (["10.0.0.0/8"], "alice", "192.168.1.1", False),
        (["10.0.0.0/8"], "alice@example.org", "", False),
        (["2001:db8::/32"], "bob@2001:db8::7", "", True),
        # The injection probe: an unbound value is the client's own writing, not
        # an address identity wrote (brackets, another spelling): its peer decides.
        (["10.0.0.0/8"], "loop@[10.9.9.9]", "127.0.0.1", False),
        (["10.0.0.0/8"], "[10.9.9.9]", "127.0.0.1", False),
        (["2001:db8::/32"], "2001:DB8::7", "127.0.0.1", False),
        (["2001:db8::/32"], "x@2001:db8:0::7", "127.0.0.1", False),
        ([], "anyone", "1.2.3.4", False),
    ],
)
def test_access_lists(entries: list[str], key: str, addr: str, matches: bool) -> None:
    access = AccessList(entries)
    assert access.matches(key, addr) is matches
    assert access.matches(key, addr) is matches  # the remembered answer is the same


def test_access_list_memo_is_bounded_and_right() -> None:
    access = AccessList(["10.0.0.0/8"])
    for i in range(10_000):
        ip = f"10.{i % 256}.{i // 256}.1" if i % 2 else f"11.{i % 256}.{i // 256}.1"
        assert access.matches(f"user{i}@{ip}") is bool(i % 2)
        assert len(access._memo) <= 4096
    assert access.matches("x@10.1.1.1") and not access.matches("x@11.1.1.1")


def test_modes_rollout_and_allow_decide_enforcement() -> None:
    p = Policy(PolicySettings(allow=["trusted@1.1.1.1"]))
    assert rule_mode(RapidReconnectSettings(), p.settings) == "enforce"
    assert rule_mode(RapidReconnectSettings(mode="observe"), p.settings) == "observe"
    assert rule_mode(RapidReconnectSettings(), PolicySettings(mode="observe")) == "observe"
    assert rule_mode(RapidReconnectSettings(mode="enforce"), PolicySettings(mode="observe")) == "enforce"
    assert p.enforcing(ClientState("x", 0.0), "enforce")
    assert not p.enforcing(ClientState("x", 0.0), "observe")
    assert not p.enforcing(ClientState("trusted@1.1.1.1", 0.0), "enforce")


@pytest.mark.parametrize(
    ("enforce_on", "severity", "expected"),
    [
        ("critical", "critical", True), ("critical", "warning", False),
        ("warning", "warning", True), ("warning", "critical", True),
        ("never", "critical", False),
    ],
)
def test_enforce_on(enforce_on: str, severity: str, expected: bool) -> None:
    assert enforces(RapidReconnectSettings(enforce_on=enforce_on), severity) is expected  # type: ignore[arg-type]


# --- fleet -----------------------------------------------------------------


def test_fleet_rate_and_auth_ratio() -> None:
    f = Fleet(FleetSettings())
    for i in range(50):
        f.attempt(i * 0.1)
        f.auth_outcome(i * 0.1, failed=i % 5 == 0)
    assert f.rate(4.95) == pytest.approx(5.0)  # 50 attempts in the 10 s window
    assert f.auth_failure_ratio(4.95) == pytest.approx(0.2)
    assert f.rate(100.0) == 0.0 and f.auth_failure_ratio(100.0) == 0.0


def test_a_restart_spike_is_a_storm_and_steady_traffic_is_not() -> None:
    f = Fleet(FleetSettings())
    t = 0.0
    for _ in range(600):  # ten minutes at 1 attempt/s: the baseline
        f.attempt(t)
        t += 1.0
    assert not f.storm(t) and f.storms == 0
    assert f.baseline_at(t) == pytest.approx(1.0, rel=0.15)
    for i in range(500):  # every client reconnects once within 2 s
        f.attempt(t + i * 0.004)
    assert f.storm(t + 2.0)
    assert f.rate(t + 2.0) >= 50.0
    assert f.storms == 1  # counted as it began: its flag lasts seconds, less than a scrape may show
    assert not f.storm(t + 60.0)  # it passes
    assert f.storms == 1


def poisson_clients(f: Fleet, rate: float, start: float, end: float, seed: int) -> None:
    """Distinct clients attempting at `rate` a second from `start` to `end`."""
    rng = random.Random(seed)
    t = start + rng.expovariate(rate)
    while t < end:
        f.attempt(t)
        f.storm(t)  # looked at as a scrape or the status page would
        t += rng.expovariate(rate)


@pytest.mark.parametrize("rate", [8.0, 11.0, 30.0])
def test_a_fresh_process_with_steady_traffic_counts_no_storm(rate: float) -> None:
    """The soak probe: from a baseline of 0, ordinary traffic of 8-11 new
    clients a second was a storm until the average caught up, and flapped at
    the threshold: 4-6 storms counted at every start, LoopwatchReconnectStorm
    firing at every restart and rollout."""
    for seed in range(3):
        f = Fleet(FleetSettings())
        poisson_clients(f, rate, 1000.0, 1600.0, seed)
        assert f.storms == 0, (rate, seed)
        assert f.baseline == pytest.approx(rate, rel=0.2)


def test_a_start_burst_is_no_storm_and_a_later_restart_is() -> None:
    """A rollout: every client connects within 2 s of the start, then the
    usual few a second; half an hour later the backend restarts."""
    f = Fleet(FleetSettings())
    for i in range(500):
        f.attempt(i * 0.004)
    poisson_clients(f, 2.0, 2.0, 1800.0, seed=7)
    assert f.storms == 0
    for i in range(500):
        f.attempt(1800.0 + i * 0.004)
    assert f.storm(1802.0) and f.storms == 1


def test_a_rate_hovering_at_the_threshold_is_one_storm() -> None:
    """Once begun, a storm lasts until the rate falls below half the rate
    that began it: a rate crossing the threshold back and forth is one."""
    f = Fleet(FleetSettings())
    poisson_clients(f, 1.0, 0.0, 600.0, seed=3)  # a baseline of about one a second
    threshold = max(FleetSettings().storm_min_rate, FleetSettings().storm_factor * f.baseline)
    t = 600.0
    for second in range(120):  # alternately just above and just below the threshold
        per_second = round(threshold * (1.3 if second % 20 < 10 else 0.8))
        for i in range(per_second):
            f.attempt(t + i / per_second)
        f.storm(t)
        t += 1.0
    assert f.storms == 1
    poisson_clients(f, 1.0, t, t + 60.0, seed=4)  # back to normal: it ends
    assert not f.storm(t + 60.0)


def test_bucket_memory_is_constant() -> None:
    f = Fleet(FleetSettings())
    for i in range(100_000):
        f.attempt(i * 0.001)
    assert len(f._window._counts) == 10
