"""Engine.enforcement and breaker_enforcement: what a table-admitting data plane
must hold, and admit's `refused` (detectors/enforcement.py). Synthetic time."""

from __future__ import annotations

from loopwatch.detectors.decisions import Reject
from loopwatch.detectors.enforcement import (
    NONE,
    BreakerEnforcement,
    CooldownEnforcement,
    KeyEnforcement,
)
from loopwatch.detectors.engine import Engine
from loopwatch.detectors.events import Attempt, Closed, HandshakeFailed, Opened
from loopwatch.detectors.settings import BreakerSettings, DetectionSettings, PolicySettings
from tests.detectors.test_engine_policy import fail_three_times

K = "10.0.0.5"


def engine(**policy: object) -> Engine:
    return Engine(DetectionSettings(), PolicySettings(**policy), BreakerSettings())  # type: ignore[arg-type]


def test_unknown_and_quiet_clients_need_nothing() -> None:
    e = engine()
    assert e.enforcement(K, 0.0) is NONE
    e.admit(Attempt(K, "/ws", 0.0, K))
    assert e.enforcement(K, 0.1) == NONE
    assert not NONE.restricts(0.0)


def test_an_enforced_cooldown_is_held_until_it_ends_and_matches_admit() -> None:
    e = engine(**{"cooldown": {"base": 10.0, "jitter": 0.0}})
    t = fail_three_times(e, K)
    want = e.enforcement(K, t)
    assert want.cooldown is not None and want.cooldown.rule == "auth_failure_loop"
    until = want.cooldown.until
    assert want == KeyEnforcement(CooldownEnforcement(until, "auth_failure_loop"))
    assert want.restricts(t) and not want.restricts(until)
    # The engine refuses exactly while the table would.
    decision = e.admit(Attempt(K, "/ws", until - 0.01, K))
    assert isinstance(decision, Reject) and decision.reason == "cooldown"
    assert e.enforcement(K, until + 0.01) == NONE


def test_observed_decisions_are_left_out() -> None:
    e = engine(mode="observe", min_interval=1.0)
    t = fail_three_times(e, K)
    assert e.enforcement(K, t) == NONE  # an observed cooldown, and min_interval only observed
    rollout = engine(rollout_percent=0.0, min_interval=1.0)
    rollout.admit(Attempt(K, "/ws", 0.0, K))
    assert rollout.enforcement(K, 0.5) == NONE


def test_allow_listed_clients_get_no_entry() -> None:
    e = engine(allow=(K,), min_interval=1.0)
    e.admit(Attempt(K, "/ws", 0.0, K))
    assert e.enforcement(K, 0.5) == NONE


def test_min_interval_deadline_follows_the_last_admitted_attempt() -> None:
    e = engine(min_interval=2.0)
    e.admit(Attempt(K, "/ws", 1.0, K))
    assert e.enforcement(K, 1.5) == KeyEnforcement(not_before=3.0)
    assert e.enforcement(K, 3.0) == NONE


def test_at_capacity_for_reject_new_only() -> None:
    e = engine(max_concurrent=1)
    e.admit(Attempt(K, "/ws", 0.0, K))
    e.record(Opened(K, "/ws", 0.01, 1))
    assert e.enforcement(K, 0.5) == KeyEnforcement(at_capacity=True)
    e.record(Closed(K, "/ws", 1.0, 1, 1000, "", "client", 0.99))
    assert e.enforcement(K, 1.5) == NONE
    oldest = engine(max_concurrent=1, on_max_concurrent="close-oldest")
    oldest.admit(Attempt(K, "/ws", 0.0, K))
    oldest.record(Opened(K, "/ws", 0.01, 1))
    assert oldest.enforcement(K, 0.5) == NONE  # close-oldest admits the new one


def test_breakers_as_the_table_holds_them() -> None:
    e = Engine(
        DetectionSettings(), PolicySettings(),
        BreakerSettings(upstream={"min_calls": 3, "open_wait": 5.0, "half_open_probes": 2}),  # type: ignore[arg-type]
        routes=("/ws",),
    )  # fmt: skip
    assert [(b.route, b.name, b.state) for b in e.breaker_enforcement(0.0)] == [
        ("/ws", "upstream", "closed"), ("/ws", "auth", "closed"),
    ]  # fmt: skip
    t = 0.0
    for i in range(3):  # distinct clients: the upstream fails, not them
        key = f"10.0.0.{i}"
        e.admit(Attempt(key, "/ws", t, key))
        e.record(HandshakeFailed(key, "/ws", t + 0.01, None, "connect"))
        t += 0.1
    upstream = e.breaker_enforcement(t)[0]
    assert upstream == BreakerEnforcement("upstream", "open", upstream.until, 0.0, 2, True, route="/ws")
    assert upstream.until == t - 0.1 + 0.01 + 5.0
    e.wake(upstream.until)
    half = e.breaker_enforcement(upstream.until)[0]
    assert (half.state, half.probes) == ("half_open", 2)
    e.admit(Attempt("10.0.0.9", "/ws", upstream.until + 0.1, "10.0.0.9"))  # a probe
    assert e.breaker_enforcement(upstream.until + 0.1)[0].probes == 1
    observed = Engine(DetectionSettings(), PolicySettings(mode="observe"), BreakerSettings(), routes=("/ws",))
    assert not any(b.enforced for b in observed.breaker_enforcement(0.0))


def test_admit_records_a_refusal_of_the_table_whatever_it_decides() -> None:
    e = engine(max_concurrent=1)
    e.admit(Attempt(K, "/ws", 0.0, K))
    e.record(Opened(K, "/ws", 0.01, 1))
    e.record(Closed(K, "/ws", 0.5, 1, 1000, "", "client", 0.49))
    # The table still said at capacity (a batch behind the Closed): the engine
    # records the refusal rather than an admission, and counts it.
    decision = e.admit(Attempt(K, "/ws", 0.6, K), "max_concurrent")
    assert isinstance(decision, Reject) and decision.reason == "max_concurrent"
    assert e.table_refusals == 1
    # Recorded as refused: the attempt did not move the min-interval clock nor take a slot.
    assert e.open_connections(K) == ()
    # When the engine agrees, its own refusal is used (its retry time), not counted.
    e2 = engine(**{"cooldown": {"base": 10.0, "jitter": 0.0}})
    t = fail_three_times(e2, K)
    decision = e2.admit(Attempt(K, "/ws", t, K), "cooldown")
    assert isinstance(decision, Reject) and decision.retry_after > 9.0
    assert e2.table_refusals == 0
