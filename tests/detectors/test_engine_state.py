"""Engine state: bounds (property-based), determinism, time, operators, views, reconfigure."""

from __future__ import annotations

import json
from array import array
from collections.abc import Callable

from hypothesis import example, given, settings
from hypothesis import strategies as st

from loopwatch.detectors.actions import CooldownEnded, CooldownStarted
from loopwatch.detectors.decisions import ADMITTED, EMPTY, Reject
from loopwatch.detectors.engine import Engine
from loopwatch.detectors.events import (
    Attempt,
    Closed,
    Event,
    HandshakeFailed,
    Opened,
    from_dict,
    to_dict,
)
from loopwatch.detectors.settings import BreakerSettings, DetectionSettings, PolicySettings
from loopwatch.detectors.shared import SharedCooldown
from loopwatch.detectors.state import ClientState
from tests.detectors.sim import Client, Close, Sim, Stay, always, fixed, once

K = "alice@10.0.0.5"


def engine(detection: DetectionSettings | None = None, policy: PolicySettings | None = None, seed: int = 0) -> Engine:
    return Engine(detection or DetectionSettings(), policy or PolicySettings(), BreakerSettings(), seed=seed)


# --- random event streams ------------------------------------------------------

steps = st.lists(
    st.tuples(
        st.integers(0, 40),  # which key
        st.sampled_from(["attempt", "opened", "closed", "failed"]),
        st.floats(0.0, 3.0, allow_nan=False),  # time step
        st.sampled_from([1000, 1001, 1006, 1008, 1011, 4001]),
        st.sampled_from([None, 401, 403, 500, 503]),
    ),
    max_size=400,
)


def play(
    e: Engine,
    script: list[tuple[int, str, float, int, int | None]],
    after: Callable[[Engine], None] | None = None,
    snapshots: bool = True,
) -> list[object]:
    """Feed a random script; returns every answer, JSON-encoded (for comparisons).
    Steps: attempt, opened, closed, failed, and the operator's wake, release,
    cooldown, reset. `after` is called after every step; `snapshots` adds the
    engine's snapshot to the answers after every step (it advances the breakers)."""
    t = 0.0
    answers: list[object] = []
    conns: dict[str, list[int]] = {}
    next_id = 0
    for n, kind, dt, code, status in script:
        t += dt
        key = f"k{n}@10.0.0.{n}"
        wake = e.next_wake
        if wake is not None and wake <= t:
            answers.append(e.wake(t).to_dict())
        if kind == "attempt":
            answers.append(e.admit(Attempt(key, "/ws", t)).to_dict())
        elif kind == "opened":
            next_id += 1
            conns.setdefault(key, []).append(next_id)
            answers.append(e.record(Opened(key, "/ws", t, next_id)).to_dict())
        elif kind == "closed" and conns.get(key):
            cid = conns[key].pop(0)
            answers.append(e.record(Closed(key, "/ws", t, cid, code, "", "upstream", dt)).to_dict())
        elif kind == "failed":
            answers.append(e.record(HandshakeFailed(key, "/ws", t, status, "connect" if status is None else None)).to_dict())
        elif kind == "wake":
            answers.append(e.wake(t).to_dict())
        elif kind == "release":
            answers.append(e.release(key, t))
        elif kind == "cooldown":
            e.force_cooldown(key, 1.0 + dt, t)
        elif kind == "reset":
            answers.append(e.reset_breaker("upstream" if n % 2 else "auth", t))
        if after is not None:
            after(e)
        if snapshots:
            answers.append(e.snapshot(t).to_dict())
    return answers


@settings(max_examples=60, deadline=None)
@given(script=steps, cap=st.integers(1, 12))
def test_tracked_clients_never_exceed_max_clients(script: list, cap: int) -> None:
    e = engine(DetectionSettings(max_clients=cap, client_ttl="20s"))
    seen: set[str] = set()
    t = 0.0
    for n, kind, dt, code, status in script:
        t += dt
        key = f"k{n}"
        seen.add(key)
        if kind == "attempt":
            e.admit(Attempt(key, "/ws", t))
        elif kind == "failed":
            e.record(HandshakeFailed(key, "/ws", t, status))
        elif kind == "closed":
            e.record(Closed(key, "/ws", t, 1, code, "", "client", dt))
        else:
            e.record(Opened(key, "/ws", t, 1))
        if e.next_wake is not None and e.next_wake <= t:
            e.wake(t)
        snap = e.snapshot(t)
        assert snap.clients_tracked <= cap
        assert snap.clients_in_cooldown + snap.clients_in_observed_cooldown <= snap.clients_tracked
        assert all(0 <= n <= snap.clients_tracked for n in snap.clients_flagged.values())
    snap = e.snapshot(t)
    # every client ever seen is either still tracked or was evicted (and counted)
    if len(seen) > cap:
        assert snap.evictions_total >= len(seen) - cap


@settings(max_examples=30, deadline=None)
@given(script=steps, seed=st.integers(0, 2**32))
def test_the_same_events_yield_the_same_decisions(script: list, seed: int) -> None:
    first = play(engine(seed=seed), script)
    again = play(engine(seed=seed), script)
    assert first == again
    json.dumps(first)  # and every answer is JSON-able


def test_the_seed_only_moves_the_jitter() -> None:
    def cooldowns(seed: int) -> list[CooldownStarted]:
        sim = Sim(engine(seed=seed), always(Close(0.01, 1008)))
        sim.add(Client(K, 0.0, fixed(0.05)))
        log = sim.run(60.0)
        return log.cooldowns()

    a, b, c = cooldowns(1), cooldowns(1), cooldowns(2)
    assert a == b
    assert [x.repeat for x in a] == [x.repeat for x in c]
    assert [x.until for x in a] != [x.until for x in c]


def test_replay_from_jsonl_gives_the_same_findings_and_decisions() -> None:
    live = engine()
    sim = Sim(live, always(Close(0.01, 1008)))
    sim.add(Client(K, 0.0, fixed(0.05)))
    recorded: list[Event] = []
    admit, record = live.admit, live.record
    live.admit = lambda a: (recorded.append(a), admit(a))[1]  # type: ignore[method-assign]
    live.record = lambda ev: (recorded.append(ev), record(ev))[1]  # type: ignore[method-assign]
    log = sim.run(20.0)
    lines = [json.dumps(to_dict(ev)) for ev in recorded]  # what `loopwatch replay` reads

    replay = engine()
    raised, decisions = [], []
    for line in lines:
        ev = from_dict(json.loads(line))
        if replay.next_wake is not None and replay.next_wake <= ev.t:
            raised += replay.wake(replay.next_wake).raised
        if isinstance(ev, Attempt):
            d = replay.admit(ev)
            decisions.append(d.to_dict())
            raised += d.outcome.raised
        else:
            raised += replay.record(ev).raised  # type: ignore[arg-type]
    assert raised and raised == log.raised()
    assert decisions == [d.to_dict() for _, _, d in log.decisions]


# --- the hot path allocates nothing when nothing happens -------------------------


def test_nothing_new_is_the_shared_empty_outcome() -> None:
    e = engine()
    assert e.admit(Attempt(K, "/ws", 0.0)) is ADMITTED
    assert e.record(Opened(K, "/ws", 0.01, 1)) is EMPTY
    assert e.record(Closed(K, "/ws", 60.0, 1, 1000, "", "client", 59.99)) is EMPTY
    assert e.wake(61.0) is EMPTY


def test_record_takes_only_outcomes() -> None:
    import pytest

    with pytest.raises(TypeError, match="record\\(\\) takes"):
        engine().record(Attempt(K, "/ws", 0.0))  # type: ignore[arg-type]


# --- time: next_wake and wake ------------------------------------------------------


def test_idle_clients_are_forgotten_after_the_ttl() -> None:
    e = engine(DetectionSettings(client_ttl="10m"))
    e.admit(Attempt("idle", "/ws", 0.0))
    e.admit(Attempt("connected", "/ws", 0.0))
    e.record(Opened("connected", "/ws", 0.01, 1))
    wake = e.next_wake
    assert wake is not None and 600.0 <= wake <= 631.0
    e.wake(650.0)
    snap = e.snapshot(650.0)
    assert snap.clients_tracked == 1 and snap.evictions_total == 1
    assert e.client("idle", 650.0) is None
    assert e.client("connected", 650.0) is not None  # an open connection keeps it


def test_a_client_in_cooldown_memory_outlives_the_ttl_so_repeats_still_escalate() -> None:
    e = engine(DetectionSettings(client_ttl="1m"))
    e.adopt_cooldown(SharedCooldown(K, 5.0, "auth_failure_loop", 1, True), 0.0)
    e.wake(3000.0)
    view = e.client(K, 3000.0)
    assert view is not None and view.cooldown_repeat == 1


def test_a_full_store_keeps_cooldowns_and_says_when_it_cannot() -> None:
    """A wave of new keys pushes out idle clients, not the ones in cooldown; a
    cooldown lost because every client held one is said so (evicted), not
    passed off as one that ran out."""
    e = engine(DetectionSettings(max_clients=10))
    for i in range(3):
        e.force_cooldown(f"cool{i}", 600.0, 0.0)
    for i in range(7):
        e.admit(Attempt(f"idle{i}", "/ws", 1.0))
    for i in range(20):
        e.admit(Attempt(f"new{i}", "/ws", 2.0 + i * 0.01))
    out = e.wake(3.0)
    assert not any(isinstance(a, CooldownEnded) for a in out.actions)
    for i in range(3):
        assert not e.admit(Attempt(f"cool{i}", "/ws", 3.0)).admitted
    # Every client in cooldown: the next new key costs one of them, said so.
    e = engine(DetectionSettings(max_clients=10))
    for i in range(10):
        e.force_cooldown(f"ban{i}", 600.0, 0.0)
    assert not any(isinstance(a, CooldownEnded) for a in e.wake(0.0).actions)
    answer = e.admit(Attempt("one-more", "/ws", 1.0))
    assert answer.admitted
    ended = [a for a in answer.outcome.actions if isinstance(a, CooldownEnded)]
    assert [(a.key, a.evicted) for a in ended] == [("ban0", True)]


def test_next_wake_is_none_when_nothing_is_pending() -> None:
    assert engine().next_wake is None


# --- operators ----------------------------------------------------------------------


def test_release_ends_the_cooldown_and_forgives() -> None:
    sim = Sim(engine(), always(Close(0.01, 1008)))
    sim.add(Client(K, 0.0, fixed(0.05)))
    sim.run(1.0)
    e = sim.engine
    assert e.client(K, 1.0).status == "cooldown"  # type: ignore[union-attr]
    assert e.release(K, 1.0) is True
    assert e.release("nobody", 1.0) is False
    view = e.client(K, 1.0)
    assert view is not None and view.status == "ok" and view.findings == ()
    assert e.next_wake == 1.0  # the release is news: CooldownEnded and cleared findings
    out = e.wake(1.0)
    assert any(isinstance(a, CooldownEnded) for a in out.actions)
    assert {f.rule for f in out.cleared} >= {"auth_failure_loop"}
    assert e.admit(Attempt(K, "/ws", 1.01)).admitted
    snap = e.snapshot(1.01)
    assert snap.clients_in_cooldown == 0 and sum(snap.clients_flagged.values()) == 0


def test_force_cooldown_refuses_for_exactly_that_long_even_in_observe_mode() -> None:
    e = engine(policy=PolicySettings(mode="observe"))
    e.force_cooldown(K, 30.0, 10.0)
    d = e.admit(Attempt(K, "/ws", 20.0))
    assert isinstance(d, Reject) and d.reason == "cooldown" and d.retry_after == 20.0
    assert [type(a) for a in d.outcome.actions] == [CooldownStarted]  # flushed with the next call
    assert d.outcome.actions[0].rule == "manual"  # type: ignore[union-attr]
    assert e.admit(Attempt(K, "/ws", 40.0)).admitted


# --- views ---------------------------------------------------------------------------


def test_clients_are_listed_worst_first() -> None:
    flag_only = {"enforce_on": "never"}  # critical findings, but no cooldowns
    e = engine(DetectionSettings(rules={"auth_failure_loop": flag_only, "rapid_reconnect": flag_only}))  # type: ignore[arg-type]
    sim = Sim(e, lambda key, n, t: Close(0.01, 1008) if key.startswith("loop") else (Close(1.0, 1006) if key == "flaky" else Close(1.0, 1000) if key == "busy" else Stay()))
    sim.add(Client("loop", 0.0, fixed(0.05)))
    sim.add(Client("flaky", 0.0, fixed(9.0)))
    for i in range(20):
        sim.add(Client(f"calm{i}", i * 0.1, once()))
    sim.add(Client("busy", 0.0, fixed(0.5)))
    sim.run(50.0)
    e.force_cooldown("calm3", 60.0, 50.0)
    views = e.clients(50.0, limit=5)
    assert [v.key for v in views[:3]] == ["calm3", "loop", "flaky"]
    assert [v.status for v in views[:3]] == ["cooldown", "critical", "warning"]
    assert views[3].status == "ok" and views[3].key == "busy"  # then by rate
    assert views[0].history == ()  # lists stay light; client() has the history
    page2 = e.clients(50.0, limit=5, offset=5)
    assert {v.key for v in page2}.isdisjoint(v.key for v in views)
    assert len(e.clients(50.0, limit=100)) == 23
    json.dumps([v.to_dict() for v in views])
    json.dumps(e.snapshot(50.0).to_dict())
    json.dumps([b.to_dict() for b in e.breakers(50.0)])


def test_snapshot_top_offenders_are_the_fastest_clients() -> None:
    e = engine(DetectionSettings(top_k=2), policy=PolicySettings(mode="observe"))
    for i in range(100):
        e.admit(Attempt("fast", "/ws", i * 0.05))
        if i % 5 == 0:
            e.admit(Attempt("medium", "/ws", i * 0.05))
        if i % 50 == 0:
            e.admit(Attempt("slow", "/ws", i * 0.05))
    top = e.snapshot(5.0).top_offenders
    assert [k for k, _ in top] == ["fast", "medium"]
    assert top[0][1] > top[1][1] > 0


# --- reconfigure --------------------------------------------------------------------


def test_reconfigure_keeps_clients_cooldowns_and_breakers() -> None:
    e = engine()
    sim = Sim(e, always(Close(0.01, 1008)))
    sim.add(Client(K, 0.0, fixed(0.05)))
    sim.run(1.0)
    e.reconfigure(DetectionSettings(rules={"no_backoff": {"enabled": False}}), PolicySettings(min_interval="1s"), BreakerSettings(), 1.0)  # type: ignore[arg-type]
    view = e.client(K, 1.0)
    assert view is not None and view.status == "cooldown"
    assert "no_backoff" not in {f.rule for f in view.findings}
    out = e.wake(1.0)
    assert "no_backoff" in {f.rule for f in out.cleared}
    assert e.snapshot(1.0).clients_flagged["no_backoff"] == 0


def test_reconfigure_shrinking_max_clients_evicts_and_counts() -> None:
    e = engine()
    for i in range(50):
        e.admit(Attempt(f"k{i}", "/ws", i * 0.01))
    assert e.reconfigure(DetectionSettings(max_clients=10), PolicySettings(), BreakerSettings(), 1.0) == 40
    snap = e.snapshot(1.0)
    assert snap.clients_tracked == 10 and snap.evictions_total == 40


def test_reconfigure_shrinking_max_clients_keeps_cooldowns_while_idle_clients_can_go() -> None:
    """The resize's second chance is judged at the reload's time: cooldowns,
    an operator's included, outlive idle clients, as on a new client's eviction."""
    e = engine()
    for i in range(5):
        e.force_cooldown(f"cooled{i}", 120.0, 0.0)
    for i in range(30):
        e.admit(Attempt(f"idle{i}", "/ws", 1.0 + i * 0.01))
    assert e.reconfigure(DetectionSettings(max_clients=10), PolicySettings(), BreakerSettings(), 60.0) == 25
    for i in range(5):
        view = e.client(f"cooled{i}", 60.0)
        assert view is not None and view.status == "cooldown"
    assert e.snapshot(60.0).clients_tracked == 10


def test_connected_keys_are_the_clients_with_an_open_connection_however_it_changed() -> None:
    """The index a reload's max_concurrent reads (TableSync.configure) stays
    the store's truth through opens, closes, close-oldest's pick, another
    replica's events and reports, and evictions."""
    from loopwatch.detectors import shared

    e = engine(DetectionSettings(max_clients=4), PolicySettings(max_concurrent=1))

    def truth() -> set[str]:
        return {s.key for s in e._store if s.open_count}

    def check(expected: set[str]) -> None:
        assert set(e.connected_keys()) == truth() == expected

    e.record(Opened("a", "/ws", 1.0, 1))
    e.record(Opened("b", "/ws", 1.0, 2))
    e.record(Opened("b", "/ws", 1.1, 3))  # past max_concurrent: reject-new forgets it at once
    check({"a", "b"})
    e.record(Closed("a", "/ws", 2.0, 1, 1000, "", "client", 1.0))
    check({"b"})
    e.observe(shared.localize(Opened("c", "/ws", 0.0, 9), "r", 2.0))
    check({"b", "c"})
    e.observe(shared.localize(Closed("c", "/ws", 0.0, 9, 1000, "", "client", 1.0), "r", 3.0))
    check({"b"})
    e.replace_connections("r", [shared.OpenConnection("d", 7, 1.0)], 3.0)
    check({"b", "d"})
    e.replace_connections("r", (), 4.0)
    check({"b"})
    for i, key in enumerate(("w", "x", "y", "z")):  # every client connected: the oldest goes anyway
        e.record(Opened(key, "/ws", 5.0 + i, 10 + i))
    assert len(e._store) == 4
    check({"w", "x", "y", "z"})


def test_admitted_since_reads_back_only_as_far_as_asked() -> None:
    e = engine(policy=PolicySettings(min_interval="1s"))
    for key, t in (("old", 0.0), ("then", 5.0), ("late", 9.0), ("last", 10.0)):
        e.admit(Attempt(key, "/ws", t))
    assert isinstance(e.admit(Attempt("late", "/ws", 9.5)), Reject)  # refused: not admitted again
    e.record(Closed("old", "/ws", 9.8, 1, 1000, "", "client", 9.8))  # seen lately, admitted long ago
    assert sorted(e.admitted_since(6.0)) == ["last", "late"]
    assert e.admitted_since(10.0) == []


def test_top_offenders_come_from_a_bounded_set_of_hot_clients() -> None:
    from loopwatch.detectors.offenders import CAP, HOT_RATE, HotClients

    e = engine(DetectionSettings(top_k=3), policy=PolicySettings(mode="observe"))
    for i in range(3000):  # 3000 clients, each one attempt: none is an offender
        e.admit(Attempt(f"once{i}", "/ws", i * 0.001))
    assert e.snapshot(3.0).top_offenders == ()
    hot = HotClients()
    for i in range(5000):  # many hot clients at once: the set stays bounded
        state = e._store.get(f"once{i % 3000}") or e._store.get("once0")
        assert state is not None
        state.rate, state.rate_t = HOT_RATE * (1 + i), 3.0
        hot.forget(state.key)
        hot.note(state, 3.0, 10.0)
        assert len(hot) <= CAP
    assert [k for k, _ in hot.top(3.0, 10.0, 2)] == ["once1999", "once1998"]


def test_a_large_idle_population_is_swept_in_bounded_batches() -> None:
    e = engine(DetectionSettings(client_ttl="1m", max_clients=50_000))
    for i in range(25_000):
        e.admit(Attempt(f"k{i}", "/ws", 0.0))
    e.wake(61.0)
    assert e.snapshot(61.0).clients_tracked == 15_000  # one batch of 10 000
    again = e.next_wake
    assert again is not None and 61.0 < again < 61.001  # the next batch, at once
    e.wake(again)
    assert e.snapshot(again).clients_tracked == 5_000
    e.wake(e.next_wake)  # type: ignore[arg-type]
    assert e.snapshot(62.0).clients_tracked == 0 and e.snapshot(62.0).evictions_total == 25_000


# --- next_wake is a bound, never late ---------------------------------------------

operator_steps = st.lists(
    st.tuples(
        # two keys, short steps and mostly auth failures, so loops form and cooldowns start
        st.integers(0, 1),
        st.sampled_from(["attempt", "attempt", "opened", "closed", "failed", "failed", "wake", "release",
                         "cooldown", "reset"]),  # fmt: skip
        st.floats(0.0, 0.5, allow_nan=False),
        st.sampled_from([1008, 1008, 1000, 1006]),
        st.sampled_from([401, 401, None, 503]),
    ),
    min_size=20,
    max_size=300,
)


@settings(max_examples=150, deadline=None)
@given(script=operator_steps, fast_breakers=st.booleans())
@example(script=[(0, "attempt", 0.1, 1008, 401), (0, "failed", 0.1, 1008, 401)] * 6, fast_breakers=False)
def test_next_wake_is_never_later_than_the_work_it_stands_for(script: list, fast_breakers: bool) -> None:
    # The proxy arms one timer at next_wake after every call (proxy/brain.py). It is
    # kept as a cheap lower bound: earlier is a harmless empty wake, later would be
    # a cooldown or a half-open breaker noticed late. Fast breakers so they move;
    # default ones so that cooldowns start (no cooldown while a breaker is open).
    fast = {"min_calls": 3, "window": "5s", "open_wait": "1s", "open_wait_max": "4s", "probe_timeout": "2s"}
    breakers = BreakerSettings(upstream=fast, auth={**fast, "min_calls": 2}) if fast_breakers else BreakerSettings()
    e = Engine(DetectionSettings(client_ttl="30s", healthy_after="1s"), PolicySettings(), breakers)

    def bound_holds(e: Engine) -> None:
        bound = e.next_wake
        assert (float("inf") if bound is None else bound) <= e._exact_wake()

    play(e, script, after=bound_holds, snapshots=False)  # a snapshot makes the bound exact: not here


@settings(max_examples=60, deadline=None)
@given(script=steps)
def test_skipping_rules_with_nothing_to_count_changes_no_answer(script: list) -> None:
    # The engine skips a rule's check while the ClientState field it counts
    # (Rule.needs) is None and it has no flag to refresh: an optimisation that
    # must not change a single answer against checking every rule every time.
    from loopwatch.detectors import engine as engine_module

    skipping = engine()
    checking = engine()
    checking._rules = tuple(rule[:5] + (engine_module._always,) for rule in checking._rules)
    assert play(skipping, script) == play(checking, script)


def test_a_rule_cannot_match_while_what_it_counts_is_absent() -> None:
    from loopwatch.detectors.rules import RULES
    from loopwatch.detectors.settings import RulesSettings

    blocks = RulesSettings()
    for rule in RULES:
        assert rule.needs is not None, f"{rule.name}: say what it counts, or the engine checks it always"
        for t in (1.0, 10.0, 100.0):
            # everything else as bad as it gets: 50 failures of every kind just now,
            # 50 sockets held for ages, retries that never back off
            state = ClientState("k", 0.0)
            recent = array("d", [t - 0.001 * i for i in range(50, 0, -1)])
            failures = state.failing()
            failures.auth_times, state.bad_times = array("d", recent), array("d", recent)
            failures.short_times = array("d", recent)
            failures.intervals, failures.interval_times = array("d", [0.01] * 50), array("d", recent)
            state.open = {i: -1000.0 for i in range(50)}
            failures.streak, state.attempt_t, state.end_t = 99, t, t
            assert any(r.check(state, r.settings(blocks), t) for r in RULES)
            setattr(state, rule.needs, None)
            assert rule.check(state, rule.settings(blocks), t) is None, rule.name


def test_clients_behind_one_address_keep_one_copy_of_it() -> None:
    """Every attempt brings its own address string; the client states keep one
    copy of an address they share (a NAT, a load balancer), not one each."""
    e = engine()
    for i in range(3):
        addr = "".join(("192.0.2.", "7"))  # a new string each time, as the data plane's events bring
        e.admit(Attempt(f"client-{i}", "/ws", float(i), addr))
    states = [e._store.get(f"client-{i}") for i in range(3)]
    assert all(s is not None and s.addr == "192.0.2.7" for s in states)
    assert states[0] is not None and all(s is not None and s.addr is states[0].addr for s in states)
    e.admit(Attempt("client-0", "/ws", 5.0, "198.51.100.1"))  # a client that moves keeps its new address
    assert states[0].addr == "198.51.100.1"
    assert e.client("client-0", 5.0) is not None
