"""The engine against whole client behaviours: the incident, and everyone it must leave alone."""

from __future__ import annotations

import itertools

import pytest

from loopwatch.detectors.actions import CooldownEnded, CooldownStarted
from loopwatch.detectors.decisions import Reject
from loopwatch.detectors.engine import Engine
from loopwatch.detectors.events import Attempt, Closed, Opened
from loopwatch.detectors.settings import BreakerSettings, DetectionSettings, PolicySettings
from tests.detectors.sim import (
    Client,
    Close,
    Fail,
    Sim,
    Stay,
    always,
    backoff,
    fixed,
    fixed_client,
    once,
)

K = "alice@10.0.0.5"


def engine(policy: PolicySettings | None = None, detection: DetectionSettings | None = None, seed: int = 0) -> Engine:
    return Engine(detection or DetectionSettings(), policy or PolicySettings(), BreakerSettings(), seed=seed)


def incident(policy: PolicySettings | None = None, until: float = 60.0, seed: int = 0) -> Sim:
    """A tab reconnecting 50 ms after every end; the backend closes every socket 1008 after 10 ms."""
    sim = Sim(engine(policy, seed=seed), always(Close(0.01, 1008)))
    sim.add(Client(K, 0.0, fixed(0.05)))
    sim.run(until)
    return sim


# --- the incident ------------------------------------------------------------


def test_the_incident_is_flagged_by_the_third_failure_and_refused_from_the_next_attempt() -> None:
    log = incident(until=2.0).log
    first = log.raised()[0]
    assert (first.rule, first.severity, first.key) == ("auth_failure_loop", "critical", K)
    assert first.evidence["consecutive"] == 3
    decisions = [(t, d) for t, _, d in log.decisions]
    assert [d.admitted for _, d in decisions[:4]] == [True, True, True, False]
    t3, d4 = decisions[3]
    assert first.t < t3  # raised at the third failure, before the fourth attempt
    assert isinstance(d4, Reject) and d4.reason == "cooldown"
    assert 4.5 - 0.2 <= d4.retry_after <= 5.5  # 5 s ± 10 % jitter, less the time since it started
    (cooldown,) = log.cooldowns()
    assert (cooldown.rule, cooldown.repeat, cooldown.enforced) == ("auth_failure_loop", 1, True)
    assert 4.5 <= cooldown.duration <= 5.5
    # every later attempt in the cooldown is refused with the time left
    for t, d in decisions[3:]:
        assert isinstance(d, Reject) and d.retry_after == pytest.approx(cooldown.until - t)


def test_after_a_cooldown_one_attempt_is_admitted_and_a_repeat_doubles_up_to_the_max() -> None:
    policy = PolicySettings(cooldown={"max": "40s"})  # type: ignore[arg-type]
    log = incident(policy, until=200.0).log
    cooldowns = log.cooldowns()
    assert [c.repeat for c in cooldowns[:6]] == [1, 2, 3, 4, 5, 6]
    nominal = [5.0, 10.0, 20.0, 40.0, 40.0, 40.0]
    for c, n in zip(cooldowns, nominal, strict=False):
        assert n * 0.9 <= c.duration <= min(n * 1.1, 40.0)
    # between two cooldowns exactly one attempt reaches the backend
    admits = [t for t, _ in log.admits()]
    for before, after in itertools.pairwise(cooldowns):
        assert len([t for t in admits if before.until <= t < after.t]) == 1
    ended = [a for a in log.actions() if isinstance(a, CooldownEnded)]
    assert len(ended) >= len(cooldowns) - 1


def test_the_incident_with_two_sockets_per_tab_is_caught_the_same_way() -> None:
    sim = Sim(engine(), always(Close(0.01, 1008)))
    sim.add(Client(K, 0.0, fixed(0.05)))
    sim.add(Client(K, 0.001, fixed(0.05)))  # the second effect
    log = sim.run(3.0)
    assert log.raised()[0].rule == "auth_failure_loop"
    assert len(log.admits()) <= 6
    assert len(log.cooldowns()) == 1


def test_a_loop_is_visible_in_the_snapshot_and_client_view() -> None:
    sim = incident(until=3.0)
    snap = sim.engine.snapshot(3.0)
    assert snap.clients_in_cooldown == 1
    assert snap.clients_flagged["auth_failure_loop"] == 1
    assert snap.top_offenders[0][0] == K
    view = sim.engine.client(K, 3.0)
    assert view is not None and view.status == "cooldown"
    assert 0 < view.cooldown_remaining < 5.5
    assert {f.rule for f in view.findings} >= {"auth_failure_loop", "no_backoff", "rapid_reconnect"}
    assert view.close_codes == {"1008": 3}
    assert view.history[-1].type == "rejected" and view.history[-1].reason == "cooldown"
    assert view.to_dict()["cooldown"]["rule"] == "auth_failure_loop"


def test_a_loop_stays_counted_at_its_severity_for_as_long_as_it_goes_on() -> None:
    """loopwatch_clients_flagged{rule, severity}, which the loop alert reads: a
    finding is raised once and then refreshed, so the standing count is what
    shows a loop that goes on; a flag escalated from warning to critical moves
    from one severity to the other (each client counted once per rule)."""
    sim = Sim(engine(), always(Close(0.01, 1008)))
    sim.add(Client(K, 0.0, fixed(0.05)))
    seen = []
    for until in (1.0, 3.0, 30.0, 120.0, 300.0):
        sim.run(until)
        snap = sim.engine.snapshot(until)
        for rule, total in snap.clients_flagged.items():
            assert sum(snap.clients_flagged_by_severity[rule].values()) == total, (until, rule)
        seen.append(snap.clients_flagged_by_severity["auth_failure_loop"]["critical"])
    assert seen == [1, 1, 1, 1, 1]  # raised once, at the third failure
    assert len([f for f in sim.log.raised() if f.rule == "auth_failure_loop"]) == 1
    escalated = {f.rule for f in sim.log.raised() if f.severity == "critical"} & {
        f.rule for f in sim.log.raised() if f.severity == "warning"
    }
    for rule in escalated:  # counted at critical only, once escalated
        assert snap.clients_flagged_by_severity[rule] == {"warning": 0, "critical": 1}, rule


def test_the_client_history_keeps_the_latest_events_exactly() -> None:
    """detection.history_size events per client, oldest dropped, each with its
    time and details as they came (one array of doubles holds both: the packed
    values fit 53 bits); a connection open for weeks shows 12.4 days at most."""
    e = engine(detection=DetectionSettings(history_size=4))
    key, t = "h@10.0.0.1", 1000.123456789
    e.admit(Attempt(key, "/", t, "10.0.0.1"))
    e.record(Opened(key, "/", t + 0.1, conn_id=1))
    e.record(Closed(key, "/", t + 20 * 86400, 1, 4003, "bye", "upstream", 20 * 86400.0))
    e.admit(Attempt(key, "/", t + 20 * 86400 + 0.7, "10.0.0.1"))
    e.record(Closed(key, "/", t + 20 * 86400 + 0.9, 2, 1000, "", "client", 0.123))
    view = e.client(key, t + 20 * 86400 + 1)
    assert view is not None
    assert [h.to_dict() for h in view.history] == [  # the first attempt dropped: four kept
        {"type": "opened", "t": t + 0.1},
        {"type": "closed", "t": t + 20 * 86400, "code": 4003, "initiator": "upstream",
         "duration": ((1 << 30) - 1) / 1000},
        {"type": "attempt", "t": t + 20 * 86400 + 0.7},
        {"type": "closed", "t": t + 20 * 86400 + 0.9, "code": 1000, "initiator": "client", "duration": 0.123},
    ]  # fmt: skip


# --- what must never be flagged -------------------------------------------------


def quiet(log: object) -> None:
    assert log.raised() == []  # type: ignore[attr-defined]
    assert log.rejects() == []  # type: ignore[attr-defined]
    assert log.cooldowns() == []  # type: ignore[attr-defined]


def test_exponential_backoff_after_auth_failures_is_left_alone() -> None:
    sim = Sim(engine(), always(Close(0.01, 1008)))
    sim.add(Client(K, 0.0, backoff([1, 2, 4, 8, 16])))
    log = sim.run(120.0)
    quiet(log)
    assert len(log.admits()) == 6


def test_the_fixed_client_gets_a_warning_at_most_and_never_a_rejection() -> None:
    sim = Sim(engine(), always(Close(0.01, 1008)))
    sim.add(Client(K, 0.0, fixed_client()))
    log = sim.run(600.0)
    assert log.rejects() == [] and log.cooldowns() == []
    assert {f.severity for f in log.raised()} <= {"warning"}
    assert {f.rule for f in log.raised()} <= {"auth_failure_loop"}  # ≥ 10 auth failures a minute
    assert len(log.admits()) > 150


def test_page_reloads_are_left_alone() -> None:
    sim = Sim(engine(), lambda key, n, t: Close(2.5, 1001) if n < 4 else Stay())
    sim.add(Client(K, 0.0, fixed(0.3)))  # three reloads in 10 s, then it stays
    quiet(sim.run(60.0))


def test_a_reconnect_storm_is_not_a_loop() -> None:
    restart = 3600.0
    e = engine()
    # Connected since the first minutes; the backend restarts at 3600 s and closes
    # every socket with 1012; every client reconnects once within 2 s and stays.
    sim = Sim(e, lambda key, n, t: Close(restart - t - 0.005, 1012) if n == 1 else Stay())
    for i in range(500):
        sim.add(Client(f"user{i}@10.0.{i // 250}.{i % 250}", i * 0.1, fixed(i * 0.004)))
    sim.run(restart - 1.0)
    before = e.snapshot(restart - 1.0)
    log = sim.run(restart + 120.0)
    assert not before.storm
    assert log.raised() == [] and log.rejects() == [] and log.cooldowns() == []
    assert sum(1 for t, _ in log.admits() if t >= restart) == 500
    spike = e.snapshot(restart + 2.0)
    assert spike.storm
    assert spike.fleet_attempt_rate == pytest.approx(50.0)  # 500 attempts in the 10 s window
    assert spike.fleet_attempt_rate >= 5 * spike.fleet_baseline_rate
    assert sum(spike.clients_flagged.values()) == 0 and spike.clients_in_cooldown == 0
    assert not e.snapshot(restart + 60.0).storm


def test_a_restart_storm_from_a_cold_start_flags_no_client() -> None:
    e = engine()
    sim = Sim(e, lambda key, n, t: Close(30.0, 1012) if n == 1 else Stay())
    for i in range(500):
        sim.add(Client(f"u{i}", 0.0, fixed(i * 0.004)))  # all restarted at 30 s, back within 2 s
    log = sim.run(40.0)
    quiet(log)
    assert e.snapshot(31.0).storm


def test_many_users_behind_one_address_are_not_a_loop() -> None:
    sim = Sim(engine(), always(Stay()))
    for i in range(100):
        sim.add(Client(f"user{i}@203.0.113.7", i * 0.05, once(), addr="203.0.113.7"))
    quiet(sim.run(600.0))


def test_many_users_keyed_by_one_ip_are_not_a_loop_only_many_connections() -> None:
    """Keyed by IP alone (no token), a NAT looks like one client with 100 sockets: never a loop rule."""
    sim = Sim(engine(), always(Stay()))
    for i in range(100):
        sim.add(Client("203.0.113.7", i * 0.05, once(), addr="203.0.113.7"))
    log = sim.run(600.0)
    assert log.rejects() == [] and log.cooldowns() == []
    assert {f.rule for f in log.raised()} == {"duplicate_connections"}


def test_a_flaky_client_with_backoff_is_left_alone() -> None:
    # The network drops the socket (1006) every 40-90 s; reconnecting sometimes fails at
    # first, and the client backs off 1, 2, 4 s before each retry.
    lifetimes = itertools.cycle([40.0, 90.0, 55.0, 70.0])
    outcomes = itertools.cycle([None, "fail", None, "fail", "fail"])

    def network(key: str, n: int, t: float) -> Close | Fail | Stay:
        if next(outcomes) == "fail":
            return Fail(None, "connect")
        return Close(next(lifetimes), 1006, "client")

    def client(result: str, detail: object) -> float | None:
        nonlocal retries
        if result == "closed":
            retries = 0
            return 1.0
        retries += 1
        return min(2.0 ** retries, 30.0)

    retries = 0
    sim = Sim(engine(), network)
    sim.add(Client(K, 0.0, client))
    quiet(sim.run(1800.0))


def test_a_healthy_long_lived_client_that_reconnects_after_a_token_expiry_is_left_alone() -> None:
    sim = Sim(engine(), always(Close(3600.0, 1008)))  # closed 1008 when its token expires
    sim.add(Client(K, 0.0, fixed(0.05)))
    quiet(sim.run(6 * 3600.0))


# --- hysteresis --------------------------------------------------------------


def test_a_finding_stays_while_the_loop_goes_on_and_clears_after_the_quiet_period() -> None:
    # short-lived abnormal closes, paced so that short_lived matches but nothing critical does
    sim = Sim(engine(), always(Close(1.0, 1011)))
    sim.add(Client(K, 0.0, backoff([9.0] * 12)))
    log = sim.run(400.0)
    raised = [f for f in log.raised() if f.rule == "short_lived"]
    cleared = [f for f in log.cleared() if f.rule == "short_lived"]
    assert len(raised) == 1 and len(cleared) == 1  # no flapping while it went on
    assert cleared[0] is raised[0]
    last_attempt = max(t for t, _ in log.admits())
    # clears 30 s after the rule last matched, which is after the last short close
    clear_outcome = next(o for o in log.outcomes if cleared[0] in o.cleared)
    assert clear_outcome is not None
    assert sim.engine.client(K, 400.0).findings == ()  # type: ignore[union-attr]
    assert last_attempt < 400.0


def test_a_pause_shorter_than_the_quiet_period_does_not_re_raise() -> None:
    e = engine(PolicySettings(mode="observe"))
    sim = Sim(e, always(Close(0.01, 1008)))
    sim.add(Client(K, 0.0, backoff([0.05] * 5 + [20.0] + [0.05] * 5)))
    log = sim.run(100.0)
    auth = [f for f in log.raised() if f.rule == "auth_failure_loop"]
    assert len(auth) == 1
    assert len([f for f in log.cleared() if f.rule == "auth_failure_loop"]) == 1


def test_cooldowns_in_the_snapshot_end_on_time() -> None:
    sim = incident(until=1.0)
    e = sim.engine
    (c,) = sim.log.cooldowns()
    assert e.next_wake is not None and e.next_wake <= c.until
    out = e.wake(c.until)
    assert any(isinstance(a, CooldownEnded) for a in out.actions)
    assert e.snapshot(c.until).clients_in_cooldown == 0


def test_cooldown_started_actions_are_well_formed() -> None:
    (c,) = incident(until=1.0).log.cooldowns()
    assert isinstance(c, CooldownStarted)
    assert c.until == pytest.approx(c.t + c.duration)
    assert c.to_dict()["type"] == "cooldown_started"


def test_a_flag_clears_exactly_one_quiet_period_after_its_last_match() -> None:
    e = engine()
    t = 0.0
    for i in range(5):  # five short abnormal closes: short_lived warning at the 5th
        e.admit(Attempt(K, "/ws", t))
        e.record(Opened(K, "/ws", t + 0.005, i))
        out = e.record(Closed(K, "/ws", t + 1.005, i, 1011, "", "upstream", 1.0))
        t += 9.0
    raised = out.raised
    assert [f.rule for f in raised] == ["short_lived"]
    last_match = t - 9.0 + 1.005
    (flag,) = e.client(K, last_match).findings  # type: ignore[union-attr]
    assert flag.clears_at == pytest.approx(last_match + 30.0)
    assert e.next_wake == pytest.approx(last_match + 30.0)
    assert e.wake(last_match + 29.999).cleared == ()
    out = e.wake(last_match + 30.0)
    assert [f.rule for f in out.cleared] == ["short_lived"]
    assert out.cleared[0] is raised[0]
    assert e.client(K, last_match + 30.0).status == "ok"  # type: ignore[union-attr]
