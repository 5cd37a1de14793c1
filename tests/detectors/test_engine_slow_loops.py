"""Steady auth-failure loops at any pace from 0.2/s to 50/s, and the clients that are not loops.

The engine under its default settings, driven by the discrete-event simulator
with synthetic time: a loop must meet a critical finding — and so a cooldown —
within 10 auth failures whatever its pace, with or without ± 20 % jitter; the
benign behaviours must never meet one over ten simulated minutes.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

import pytest

from loopwatch.detectors.actions import CooldownStarted
from loopwatch.detectors.decisions import Reject
from loopwatch.detectors.engine import Engine
from loopwatch.detectors.settings import BreakerSettings, DetectionSettings, PolicySettings
from tests.detectors.sim import HANDSHAKE, Client, Close, Log, Result, Sim, Stay, always

K = "alice@10.0.0.5"
LIVED = 0.01  # the backend closes a bad token 1008 this long after the 101
PACES = [0.2, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0]  # attempts per second
TEN_MINUTES = 600.0


def engine() -> Engine:
    return Engine(DetectionSettings(), PolicySettings(), BreakerSettings(), seed=0)


def paced(pace: float, jitter: float, rng: random.Random) -> Callable[[Result, object], float]:
    """Starts an attempt every 1/pace s (± jitter), whatever happened to the last one:
    the wait after a close is the period less the connection's own time."""
    period = 1.0 / pace

    def next_delay(result: Result, detail: object) -> float:
        wait = period * rng.uniform(1.0 - jitter, 1.0 + jitter)
        if result == "closed":
            wait -= HANDSHAKE + LIVED
        return max(wait, 0.0)

    return next_delay


def critical_failures(log: Log, key: str = K) -> list[CooldownStarted]:
    return [c for c in log.cooldowns() if c.key == key]


def failures_before(log: Log, t: float, key: str = K) -> int:
    """Auth failures of ``key`` up to ``t``: admitted attempts, since each fails 1008."""
    return sum(1 for at, _ in log.admits(key) if at <= t)


# --- loops at every pace ---------------------------------------------------------


@pytest.mark.parametrize("jitter", [0.0, 0.2], ids=["steady", "jitter-20%"])
@pytest.mark.parametrize("pace", PACES, ids=[f"{p:g}/s" for p in PACES])
def test_a_steady_auth_loop_is_refused_within_ten_failures_at_any_pace(pace: float, jitter: float) -> None:
    sim = Sim(engine(), always(Close(LIVED, 1008)))
    rng = random.Random(f"{pace}/{jitter}")
    sim.add(Client(K, 0.0, paced(pace, jitter, rng)))
    log = sim.run(12.0 / pace)  # room for twelve attempts at the pace

    first = log.raised()[0]
    assert (first.rule, first.severity) == ("auth_failure_loop", "critical")
    cooldown = critical_failures(log)[0]
    assert (cooldown.rule, cooldown.repeat, cooldown.enforced) == ("auth_failure_loop", 1, True)
    assert cooldown.t == first.t  # the failure that completed the finding started the cooldown
    failures = failures_before(log, cooldown.t)
    assert failures <= 10
    if jitter == 0.0:
        # Retried under 1 s (from 1/s up): the fast streak, by the 3rd failure.
        # Slower: the steady streak, by the 8th.
        gap = 1.0 / pace - HANDSHAKE - LIVED
        assert failures == (3 if gap < 1.0 else 8)
        assert first.evidence["consecutive" if gap < 1.0 else "steady"] == failures
    else:
        assert 3 <= failures <= 8
    # The next attempt is refused, and so is every attempt until the cooldown ends.
    after = [(t, d) for t, key, d in log.decisions if key == K and t > cooldown.t]
    assert after and all(
        isinstance(d, Reject) and d.reason == "cooldown" for t, d in after if t < cooldown.until
    )


@pytest.mark.parametrize("pace", [0.2, 0.5, 2.0], ids=["0.2/s", "0.5/s", "2/s"])
def test_a_slow_loop_that_goes_on_through_its_cooldowns_is_refused_longer_each_time(pace: float) -> None:
    """The first attempt after a cooldown reaches the backend; when it fails the same
    way the next cooldown starts at once, twice as long (5, 10, 20 s …)."""
    sim = Sim(engine(), always(Close(LIVED, 1008)))
    sim.add(Client(K, 0.0, paced(pace, 0.2, random.Random(7))))
    log = sim.run(120.0)
    cooldowns = critical_failures(log)
    assert [c.repeat for c in cooldowns] == list(range(1, len(cooldowns) + 1))
    assert len(cooldowns) >= 3
    for before, after in itertools.pairwise(cooldowns):
        # one admitted attempt between two cooldowns, and it started the next one
        admitted = [t for t, _ in log.admits(K) if before.until <= t <= after.t]
        assert len(admitted) == 1
        assert after.t - admitted[0] == pytest.approx(HANDSHAKE + LIVED)
        assert after.duration > before.duration
    # loopwatch saw 12 failures at most; the backend saw the loop for well under a minute
    assert len(log.admits(K)) <= 8 + len(cooldowns)


def test_seven_steady_failures_then_a_stop_is_not_a_loop() -> None:
    """A client that retries at a steady 2 s but gives up after 6 retries stays under `steady`."""
    sim = Sim(engine(), always(Close(LIVED, 1008)))
    delays = iter([2.0] * 6)
    sim.add(Client(K, 0.0, lambda result, detail: next(delays, None)))
    log = sim.run(60.0)
    assert len(log.admits(K)) == 7
    assert log.raised() == [] and log.cooldowns() == []


def test_a_release_forgets_the_steady_streak() -> None:
    e = engine()
    sim = Sim(e, always(Close(LIVED, 1008)))
    sim.add(Client(K, 0.0, paced(0.5, 0.0, random.Random(0))))
    sim.run(13.0)  # seven failures at 0.5/s; the 8th, at 14 s, would be critical
    view = e.client(K, 13.0)
    assert view is not None and view.consecutive_auth_failures == 7  # the steady streak
    assert e.release(K, 13.0)
    view = e.client(K, 13.0)
    assert view is not None and view.consecutive_auth_failures == 0
    log = sim.run(27.5)  # seven more after the release are seven, not fourteen
    assert critical_failures(log) == []
    log = sim.run(29.0)
    (cooldown,) = critical_failures(log)
    assert sum(1 for t, _ in log.admits(K) if 13.0 < t <= cooldown.t) == 8


# --- what must never be refused --------------------------------------------------


def herd_member(rng: random.Random) -> Callable[[Result, object], float]:
    """Back within 2 s of its connection's end, then a retry every second."""
    ends = itertools.count()
    return lambda result, detail: rng.uniform(0, 2.0) if next(ends) == 0 else 1.0


def never_critical(log: Log) -> None:
    assert [f for f in log.raised() if f.severity == "critical"] == []
    assert log.cooldowns() == []
    assert [d for _, d in log.rejects() if d.reason == "cooldown"] == []


@pytest.mark.parametrize("jitter", [0.0, 0.2], ids=["exact", "jitter-20%"])
def test_exponential_backoff_capped_at_30s_is_not_a_loop(jitter: float) -> None:
    """1, 2, 4, 8, 16 s, then every 30 s for ten minutes: steady at the cap, but at
    0.033/s, below the range a loop is judged in; and failing auth every 30 s is
    not even a warning."""
    rng = random.Random(3)
    steps = itertools.chain([1.0, 2.0, 4.0, 8.0, 16.0], itertools.repeat(30.0))
    sim = Sim(engine(), always(Close(LIVED, 1008)))
    sim.add(Client(K, 0.0, lambda result, detail: next(steps) * rng.uniform(1 - jitter, 1 + jitter)))
    log = sim.run(TEN_MINUTES)
    never_critical(log)
    assert log.raised() == []
    assert len(log.admits(K)) >= 20


@pytest.mark.parametrize("jitter", [0.0, 0.2], ids=["exact", "jitter-20%"])
def test_the_fixed_client_is_never_refused(jitter: float) -> None:
    """The incident's fix: at most 3 retries with backoff 1, 2, 4 s, then a 5 s pause,
    after which its token is valid; every 2 minutes the token expires (a healthy
    socket closed 1008), the client reconnects at once and the cycle starts again."""
    rng = random.Random(5)
    cycle = itertools.cycle(["fail", "fail", "fail", "fail", "ok"])

    def backend(key: str, n: int, t: float) -> Close:
        return Close(LIVED, 1008) if next(cycle) == "fail" else Close(120.0, 1008)

    delays = itertools.cycle([1.0, 2.0, 4.0, 5.0, 0.05])  # … and at once after the expiry
    sim = Sim(engine(), backend)
    sim.add(Client(K, 0.0, lambda result, detail: next(delays) * rng.uniform(1 - jitter, 1 + jitter)))
    log = sim.run(TEN_MINUTES)
    never_critical(log)
    assert log.raised() == []
    assert len(log.admits(K)) >= 20


@pytest.mark.parametrize("jitter", [0.0, 0.2], ids=["exact", "jitter-20%"])
def test_the_fixed_client_whose_token_never_becomes_valid_gets_a_warning_at_most(jitter: float) -> None:
    """The same fix against an auth service that never lets it in: its retries grow
    within every four, so it is never a steady loop (≥ 10 failures a minute: a warning)."""
    rng = random.Random(11)
    delays = itertools.cycle([1.0, 2.0, 4.0, 5.0])
    sim = Sim(engine(), always(Close(LIVED, 1008)))
    sim.add(Client(K, 0.0, lambda result, detail: next(delays) * rng.uniform(1 - jitter, 1 + jitter)))
    log = sim.run(TEN_MINUTES)
    never_critical(log)
    assert {(f.rule, f.severity) for f in log.raised()} <= {("auth_failure_loop", "warning")}
    assert len(log.admits(K)) > 150


@pytest.mark.parametrize("refresh", [2.0, 3.0, 5.0])
def test_a_token_refresh_that_pauses_then_succeeds_is_not_a_loop(refresh: float) -> None:
    """Every 2 minutes the token expires (a healthy socket closed 1008); the client
    reconnects at once with the stale token, fails twice, pauses to refresh it,
    and the fresh token is let in."""
    cycle = itertools.cycle(["fail", "fail", "ok"])
    waits = itertools.cycle([0.1, refresh, 0.05])  # after: 1st failure, 2nd failure, expiry

    def backend(key: str, n: int, t: float) -> Close:
        return Close(LIVED, 1008) if next(cycle) == "fail" else Close(120.0, 1008)

    sim = Sim(engine(), backend)
    sim.add(Client(K, 0.0, lambda result, detail: next(waits)))
    log = sim.run(TEN_MINUTES)
    never_critical(log)
    assert log.raised() == []
    assert len(log.admits(K)) >= 12


def test_short_sockets_closed_normally_about_once_a_second_are_not_a_loop() -> None:
    """A widget that connects, reads for 0.2 s and closes 1000, about once a second:
    no auth failure, no abnormal close (many short connections: a warning at most)."""
    rng = random.Random(13)
    sim = Sim(engine(), always(Close(0.2, 1000, "client")))
    sim.add(Client(K, 0.0, lambda result, detail: rng.uniform(0.6, 1.0)))
    log = sim.run(TEN_MINUTES)
    never_critical(log)
    assert {f.severity for f in log.raised()} <= {"warning"}
    assert len(log.admits(K)) > 500


@pytest.mark.parametrize("auth_breaker", [True, False], ids=["auth-breaker", "no-auth-breaker"])
def test_a_herd_after_a_restart_each_failing_once_then_connecting_is_not_a_loop(auth_breaker: bool) -> None:
    """300 users connected for minutes; the backend restarts (1012) and everyone is
    back within 2 s with the token the old backend accepted: refused once (1008),
    then connected with a fresh one a second later. So many 1008s at once open the
    auth breaker (the auth side is failing, not the clients), which refuses
    attempts while it is open; either way nobody is put in cooldown."""
    restart = 300.0
    e = Engine(
        DetectionSettings(),
        PolicySettings(),
        BreakerSettings(auth={"enabled": auth_breaker}),  # type: ignore[arg-type]
        seed=0,
    )
    admitted: dict[str, int] = {}

    def backend(key: str, n: int, t: float) -> Close | Stay:
        admitted[key] = admitted.get(key, 0) + 1
        if admitted[key] == 1:
            return Close(restart - t - HANDSHAKE, 1012)
        return Close(LIVED, 1008) if admitted[key] == 2 else Stay()

    rng = random.Random(17)
    sim = Sim(e, backend)
    keys = [f"user{i}@10.0.{i // 200}.{i % 200}" for i in range(300)]
    for i, key in enumerate(keys):
        sim.add(Client(key, i * 0.5, herd_member(rng)))
    end = restart + TEN_MINUTES
    log = sim.run(end)
    never_critical(log)
    assert {d.reason for _, d in log.rejects()} <= {"circuit_open"}
    assert set(admitted.values()) <= {1, 2, 3}  # connected, failed once, connected
    for key in keys:
        view = e.client(key, end)
        assert view is not None and view.status == "ok"
        assert view.consecutive_auth_failures <= 1
    if not auth_breaker:
        assert log.rejects() == []
        assert admitted == dict.fromkeys(keys, 3)
        assert all(e.client(key, end).open_connections == 1 for key in keys)  # type: ignore[union-attr]


@pytest.mark.parametrize("normal", [(1000, 1001), (1001,)], ids=["default", "1000-not-normal"])
def test_a_loop_of_normal_closes_is_flagged_and_refused_only_when_1000_is_not_normal(
    normal: tuple[int, ...],
) -> None:
    """A server that closes each connection 1000 right after it opens, and a
    client that reconnects at once, ~3 a second (docs/detection.md, known
    limits): flagged critical either way; refused only once 1000 is no
    normal close, from about its 30th attempt."""
    sim = Sim(
        Engine(DetectionSettings(normal_close_codes=normal), PolicySettings(), BreakerSettings(), seed=0),
        always(Close(0.05, 1000, "client")),
    )
    sim.add(Client(K, 0.0, lambda result, detail: 0.25))
    log = sim.run(60.0)
    assert "critical" in {f.severity for f in log.raised() if f.rule == "rapid_reconnect"}
    refused = log.rejects(K)
    if normal == (1000, 1001):
        assert critical_failures(log) == [] and refused == []
    else:
        assert critical_failures(log)
        first_refused_at = refused[0][0]
        attempts_before = sum(1 for at, _ in log.decisions_of(K) if at < first_refused_at)
        assert 20 <= attempts_before + 1 <= 40, attempts_before
