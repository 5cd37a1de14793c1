"""Replicas sharing state through the engine's plain methods: observe, adopt_cooldown, release.

Two engines stand for two replicas; what one sees is handed to the other the way
proxy/state/redis.py does it (encode, then decode at the receiver's clock),
so these tests cover the engine half of the Redis store without any I/O.
"""

from __future__ import annotations

import pytest

from loopwatch.detectors import shared
from loopwatch.detectors.actions import CloseConnection, CooldownStarted
from loopwatch.detectors.decisions import Outcome, Reject
from loopwatch.detectors.engine import Engine
from loopwatch.detectors.events import Attempt, Closed, Event, HandshakeFailed, Opened, Rejected
from loopwatch.detectors.policy import MAX_REPEAT
from loopwatch.detectors.settings import BreakerSettings, DetectionSettings, PolicySettings

K = "alice@10.0.0.5"
CRITICAL = 6  # combined auth failures in a minute that are critical
# Only the counting threshold of auth_failure_loop: a streak of 3 would fire on
# each replica alone, which is not what these tests are about.
DETECTION = DetectionSettings.model_validate(
    {
        "rules": {
            "auth_failure_loop": {"consecutive": 100, "warning": None, "critical": CRITICAL},
            "rapid_reconnect": {"warning": None, "critical": 100},
            "no_backoff": {"enabled": False},
            "short_lived": {"enabled": False},
        }
    }
)


def engine(policy: PolicySettings | None = None, breakers: BreakerSettings | None = None) -> Engine:
    return Engine(DETECTION, policy or PolicySettings(), breakers or BreakerSettings())


def relay(to: Engine, origin: str, messages: list[shared.Message], t: float, breakers: bool = False) -> list[Outcome]:
    """Carry messages over the wire form to another replica's engine, as the store does."""
    sender, decoded = shared.decode(shared.encode(origin, messages), t)
    assert sender == origin
    out = []
    for m in decoded:
        if isinstance(m, shared.RemoteEvent):
            out.append(to.observe(m.event, admitted=m.admitted, breakers=breakers))
        elif isinstance(m, shared.SharedCooldown):
            to.adopt_cooldown(m, t)
        elif isinstance(m, shared.Release):
            to.release(m.key, t)
    return out


def one_failure(e: Engine, key: str, t: float, cid: int) -> tuple[list[shared.Message], Outcome | Reject]:
    """One attempt ending in a quick 1008 on engine ``e``; what it would publish."""
    decision = e.admit(Attempt(key, "/ws", t))
    sent: list[shared.Message] = [shared.RemoteEvent(Attempt(key, "/ws", t), decision.admitted)]
    if not decision.admitted:
        assert isinstance(decision, Reject)
        return sent, decision
    events: list[Event] = [
        Opened(key, "/ws", t + 0.005, cid),
        Closed(key, "/ws", t + 0.015, cid, 1008, "token expired", "upstream", 0.01),
    ]
    last = Outcome()
    for event in events:
        last = e.record(event)  # type: ignore[arg-type]
        sent.append(shared.RemoteEvent(event))
    for action in last.actions:
        if isinstance(action, CooldownStarted):
            sent.append(
                shared.SharedCooldown(key, action.until - t, action.rule, action.repeat, action.enforced)
            )
    return sent, last


def round_robin(a: Engine, b: Engine, n: int, *, share: bool) -> list[Outcome | Reject]:
    results = []
    t = 0.0
    for i in range(n):
        here, there, origin = (a, b, "a") if i % 2 == 0 else (b, a, "b")
        sent, result = one_failure(here, K, t, i)
        results.append(result)
        if share:
            relay(there, origin, sent, t + 0.02)
        t += 0.1
    return results


def test_alone_neither_replica_crosses_the_threshold() -> None:
    a, b = engine(), engine()
    results = round_robin(a, b, CRITICAL + 2, share=False)
    assert not any(isinstance(r, Reject) for r in results)
    assert a.client(K, 1.0).findings == () and b.client(K, 1.0).findings == ()  # type: ignore[union-attr]


def test_combined_rate_is_flagged_and_both_replicas_refuse() -> None:
    a, b = engine(), engine()
    results = round_robin(a, b, CRITICAL + 2, share=True)
    # The CRITICAL-th failure (index CRITICAL-1) completes the finding where it
    # happened and starts the cooldown there; the next attempt, on the other
    # replica, is refused from the shared cooldown, and so is the one after.
    started = results[CRITICAL - 1]
    assert isinstance(started, Outcome)
    assert any(isinstance(x, CooldownStarted) for x in started.actions)
    assert [isinstance(r, Reject) for r in results[CRITICAL:]] == [True, True]
    assert all(r.reason == "cooldown" for r in results[CRITICAL:])  # type: ignore[union-attr]
    for e in (a, b):
        view = e.client(K, 1.0)
        assert view is not None and view.cooldown_remaining > 0


def test_observed_events_never_refuse_nor_start_a_cooldown() -> None:
    a = engine()
    for i in range(CRITICAL * 2):
        t = i * 0.1
        for event in (
            Attempt(K, "/ws", t),
            Opened(K, "/ws", t, f"b/{i}"),
            Closed(K, "/ws", t + 0.01, f"b/{i}", 1008, "", "upstream", 0.01),
        ):
            out = a.observe(event)
            assert not any(isinstance(x, CooldownStarted) for x in out.actions)
    view = a.client(K, 2.0)
    assert view is not None and not view.cooldown_remaining > 0
    assert [f.rule for f in view.findings] == ["auth_failure_loop"]
    # The next failure seen here is the one that enforces the finding.
    _, result = one_failure(a, K, 2.0, 99)
    assert isinstance(result, Outcome)
    assert any(isinstance(x, CooldownStarted) for x in result.actions)


def test_min_interval_spans_replicas() -> None:
    a = engine(PolicySettings(min_interval=1.0))
    a.observe(Attempt(K, "/ws", 0.0), admitted=True)
    decision = a.admit(Attempt(K, "/ws", 0.5))
    assert isinstance(decision, Reject) and decision.reason == "min_interval"
    a.observe(Attempt("bob", "/ws", 0.0), admitted=False)  # refused elsewhere: no interval
    assert a.admit(Attempt("bob", "/ws", 0.5)).admitted


# --- cooldowns: merged so replicas converge ------------------------------------


def test_the_longer_cooldown_wins_whatever_the_order() -> None:
    short = shared.SharedCooldown(K, 5.0, "auth_failure_loop", 1)
    long = shared.SharedCooldown(K, 9.0, "auth_failure_loop", 2)
    for order in ((short, long), (long, short)):
        e = engine()
        adopted = [e.adopt_cooldown(c, 10.0) for c in order]
        assert adopted[0] is True
        view = e.client(K, 10.0)
        assert view is not None and view.cooldown_until == pytest.approx(19.0)
        assert view.cooldown_repeat == 2


def test_an_operators_cooldown_replaces_a_longer_one() -> None:
    e = engine()
    e.adopt_cooldown(shared.SharedCooldown(K, 60.0, "auth_failure_loop", 1), 0.0)
    assert e.adopt_cooldown(shared.SharedCooldown(K, 2.0, "manual", 1, force=True), 0.0)
    assert e.client(K, 0.0).cooldown_until == pytest.approx(2.0)  # type: ignore[union-attr]
    assert not e.admit(Attempt(K, "/ws", 1.0)).admitted
    assert e.admit(Attempt(K, "/ws", 2.5)).admitted


def test_an_adopted_cooldown_is_no_longer_than_this_replica_would_set() -> None:
    """It came off the network: a rule's is capped at policy.cooldown.max, an
    operator's at 366 days. Years (1e12 s) used to reach the enforcement
    table, which refused the write, and every write after it failed."""
    e = engine()
    assert e.adopt_cooldown(shared.SharedCooldown(K, 1e12, "auth_failure_loop", 1), 0.0)
    longest = e.policy.cooldown.max
    assert e.client(K, 0.0).cooldown_until == pytest.approx(longest)  # type: ignore[union-attr]
    assert e.enforcement(K, 0.0).cooldown.until == pytest.approx(longest)  # type: ignore[union-attr]
    other = "other@10.0.0.9"
    assert e.adopt_cooldown(shared.SharedCooldown(other, 1e12, "manual", 1, force=True), 0.0)
    assert e.client(other, 0.0).cooldown_until == pytest.approx(366 * 86400.0)  # type: ignore[union-attr]


def test_an_enforced_cooldown_beats_an_observed_one() -> None:
    e = engine()
    e.adopt_cooldown(shared.SharedCooldown(K, 60.0, "auth_failure_loop", 1, enforced=False), 0.0)
    assert e.admit(Attempt(K, "/ws", 1.0)).admitted  # observed only
    assert e.adopt_cooldown(shared.SharedCooldown(K, 5.0, "auth_failure_loop", 1), 1.0)
    assert not e.admit(Attempt(K, "/ws", 2.0)).admitted


def offend(e: Engine, t: float) -> list[CooldownStarted]:
    """CRITICAL quick failures of K on `e` from `t`: the cooldowns the last one started."""
    last: Outcome | Reject = Outcome()
    for i in range(CRITICAL):
        _, last = one_failure(e, K, t + i * 0.1, i)
    assert isinstance(last, Outcome)
    return [x for x in last.actions if isinstance(x, CooldownStarted)]


def test_a_cooldown_that_is_over_still_escalates_the_next_one() -> None:
    # A replica that starts late learns a cooldown that already ended: nothing
    # to refuse, but the client's next offence is its second.
    e = engine()
    assert e.adopt_cooldown(shared.SharedCooldown(K, -30.0, "auth_failure_loop", 1), 100.0) is False
    assert e.admit(Attempt(K, "/ws", 100.0)).admitted
    started = offend(e, 100.1)
    assert started and started[0].repeat == 2


def test_a_cooldown_over_but_remembered_is_shared_for_a_store_that_lost_it() -> None:
    """After Redis restarted empty, only running cooldowns were written back:
    a replica started later escalated a repeat offender from scratch."""
    e = engine(PolicySettings.model_validate({"cooldown": {"memory": "10m"}}))
    e.adopt_cooldown(shared.SharedCooldown(K, 3.0, "auth_failure_loop", 1), 0.0)
    e.wake(3.0)  # over
    assert e.cooldowns(4.0) == []
    assert [(c.key, c.remaining, c.repeat) for c in e.cooldowns(4.0, remembered=True)] == [(K, -1.0, 1)]
    assert e.cooldowns(3.0 + 600.0, remembered=True) == []  # past the memory
    # A replica that adopts it escalates the next offence.
    late = engine()
    (remembered,) = e.cooldowns(4.0, remembered=True)
    late.adopt_cooldown(shared.decode(shared.encode("a", [remembered]), 4.0)[1][0], 4.0)  # type: ignore[arg-type]
    started = offend(late, 5.0)
    assert started and started[0].repeat == 2


def test_a_client_never_cooled_down_has_no_cooldown_to_remember() -> None:
    """On a host up for less than policy.cooldown.memory (the engine's clock is
    the monotonic one), every client's cool_until of 0.0 was "over but within
    memory": a Redis restart got a key for every tracked client."""
    e = engine(PolicySettings.model_validate({"cooldown": {"memory": "1h"}}))
    assert e.admit(Attempt("healthy", "/ws", 100.0)).admitted
    e.adopt_cooldown(shared.SharedCooldown(K, 3.0, "auth_failure_loop", 1), 100.0)
    e.wake(103.0)
    assert [c.key for c in e.cooldowns(110.0, remembered=True)] == [K]


def test_a_repeat_count_off_the_network_is_bounded() -> None:
    """A replica (or whoever can publish on the channel) sent repeat
    99 999 999 999: kept, it made the next offence's count as large."""
    e = engine()
    e.adopt_cooldown(shared.SharedCooldown(K, -1.0, "auth_failure_loop", 99_999_999_999), 100.0)
    started = offend(e, 100.1)
    assert started and started[0].repeat == MAX_REPEAT + 1


def test_adopted_cooldowns_end_by_the_wake_queue_and_are_listed() -> None:
    e = engine()
    e.adopt_cooldown(shared.SharedCooldown(K, 3.0, "rapid_reconnect", 1), 0.0)
    assert [(c.key, c.remaining, c.rule) for c in e.cooldowns(1.0)] == [(K, 2.0, "rapid_reconnect")]
    assert e.next_wake == pytest.approx(3.0)
    e.wake(3.0)
    assert e.cooldowns(3.0) == []
    assert e.admit(Attempt(K, "/ws", 3.1)).admitted


def test_a_release_anywhere_forgets_the_combined_evidence() -> None:
    a, b = engine(), engine()
    round_robin(a, b, CRITICAL + 1, share=True)
    relay(b, "a", [shared.Release(K)], 1.0)
    assert a.release(K, 1.0)
    for e in (a, b):
        view = e.client(K, 1.0)
        assert view is not None and not view.cooldown_remaining > 0 and view.findings == ()
        assert e.admit(Attempt(K, "/ws", 1.1)).admitted


# --- connections and breakers -------------------------------------------------


def test_remote_connections_count_towards_max_concurrent_and_close_oldest_names_them() -> None:
    e = engine(PolicySettings(max_concurrent=2, on_max_concurrent="close-oldest"))
    e.observe(Attempt(K, "/ws", 0.0), admitted=True)
    e.observe(shared.localize(Opened(K, "/ws", 0.0, 7), "b", 0.0))
    assert e.admit(Attempt(K, "/ws", 1.0)).admitted
    e.record(Opened(K, "/ws", 1.0, 1))
    assert e.admit(Attempt(K, "/ws", 2.0)).admitted
    opened = e.record(Opened(K, "/ws", 2.0, 2))
    closes = [x for x in opened.actions if isinstance(x, CloseConnection)]
    assert [c.conn_id for c in closes] == ["b/7"]
    assert shared.owner_of(closes[0].conn_id) == ("b", 7)
    assert shared.owner_of(1) is None


def test_a_replicas_connections_are_replaced_by_what_it_says_it_has_open() -> None:
    """A replica that crashed, restarted under the same id or lost Redis while
    its Closed went by leaves connections no Closed will end: its
    Connections (or its silence: none) replace them, and nothing else."""
    e = engine(PolicySettings(max_concurrent=2))
    e.record(Opened(K, "/ws", 0.0, 1))  # this replica's own
    for cid in (7, 8):
        e.observe(shared.localize(Opened(K, "/ws", 0.0, cid), "b", 0.0))
    e.observe(shared.localize(Opened("carol", "/ws", 0.0, 3), "c", 0.0))
    assert e.client(K, 1.0).open_connections == 3  # type: ignore[union-attr]
    assert e.enforcement(K, 1.0).at_capacity
    # b restarted: it has one open now, for another client.
    assert e.replace_connections("b", [shared.OpenConnection("bob", 1, 0.5)], 2.0) == {K, "bob"}
    assert e.client(K, 2.0).open_connections == 1  # type: ignore[union-attr]
    assert e.client("bob", 2.0).open_connections == 1  # type: ignore[union-attr]
    assert not e.enforcement(K, 2.0).at_capacity
    assert e.client("carol", 2.0).open_connections == 1  # type: ignore[union-attr]  # c's untouched
    # b went silent: none of it counts.
    assert e.replace_connections("b", (), 3.0) == {"bob"}
    assert e.client("bob", 3.0).open_connections == 0  # type: ignore[union-attr]
    assert e.local_connections(3.0) == [shared.OpenConnection(K, 1, 3.0)]


def test_close_oldest_picks_by_the_ages_a_replica_reports() -> None:
    """Counted again from a Connections, remote connections used to look
    just opened: close-oldest closed a younger local one instead."""
    e = engine(PolicySettings(max_concurrent=2, on_max_concurrent="close-oldest"))
    e.replace_connections("b", [shared.OpenConnection(K, 7, 60.0)], 100.0)  # open since t = 40
    e.record(Opened(K, "/ws", 90.0, 1))
    opened = e.record(Opened(K, "/ws", 101.0, 2))
    assert [x.conn_id for x in opened.actions if isinstance(x, CloseConnection)] == ["b/7"]


def failing_handshakes(e: Engine, n: int, *, breakers: bool) -> None:
    for i in range(n):
        key = f"c{i}"
        e.observe(Attempt(key, "/ws", i * 0.01), admitted=True)
        e.observe(HandshakeFailed(key, "/ws", i * 0.01, 502), breakers=breakers)


def test_breakers_stay_local_unless_shared() -> None:
    local, shared_ = engine(), engine()
    failing_handshakes(local, 30, breakers=False)
    failing_handshakes(shared_, 30, breakers=True)
    assert all(b.state == "closed" for b in local.breakers(1.0))
    assert {(b.route, b.name): b.state for b in shared_.breakers(1.0)}["/ws", "upstream"] == "open"


# --- the wire form --------------------------------------------------------------


def test_every_message_survives_the_wire() -> None:
    messages: list[shared.Message] = [
        shared.RemoteEvent(Attempt(K, "/ws", 1.5, "10.0.0.5"), True),
        shared.RemoteEvent(Rejected(K, "/ws", 1.6, "cooldown")),
        shared.RemoteEvent(HandshakeFailed(K, "/ws", 2.0, None, "timeout")),
        shared.RemoteEvent(HandshakeFailed(K, "/ws", 2.0, 401)),
        shared.RemoteEvent(Opened(K, "/ws", 2.5, 4)),
        shared.RemoteEvent(Closed(K, "/ws", 3.0, 4, 1008, "bad token", "upstream", 0.25)),
        shared.SharedCooldown(K, 4.25, "manual", 3, True, True),
        shared.Release(K),
        shared.CloseRequest("b", 12, K, 1008, "loopwatch: more than 2 connections"),
        shared.Connections((shared.OpenConnection(K, 4, 12.5), shared.OpenConnection("bob", 5, 0.0)), 1.0),
        shared.Connections((), 8.0),
        shared.AskConnections("*"),
        shared.Leaving(),
    ]
    payload = shared.encode("a", messages)
    assert payload.startswith(shared.header("a"))
    origin, back = shared.decode(payload, 9.0)
    assert origin == "a"
    # Events come back on the receiver's clock, with connection ids that name their owner.
    assert back[:6] == [
        shared.RemoteEvent(Attempt(K, "/ws", 9.0, "10.0.0.5"), True),
        shared.RemoteEvent(Rejected(K, "/ws", 9.0, "cooldown")),
        shared.RemoteEvent(HandshakeFailed(K, "/ws", 9.0, None, "timeout")),
        shared.RemoteEvent(HandshakeFailed(K, "/ws", 9.0, 401)),
        shared.RemoteEvent(Opened(K, "/ws", 9.0, "a/4")),
        shared.RemoteEvent(Closed(K, "/ws", 9.0, "a/4", 1008, "bad token", "upstream", 0.25)),
    ]
    assert back[6:] == messages[6:]
    assert shared.localize(Opened(K, "/ws", 2.5, 4), "a", 9.0) == back[4].event  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "payload",
    [
        b"not a batch",
        b"lw1 a\nnot json",
        b"lw2 a\n[]",
        b"lw1 \n[]",
        b"lw1 a\n{}",
        b'lw1 a\n[["z"]]',
        b'lw1 a\n[["a", "k", "/", "", 1]]',
        b'lw1 a\n[["C", "k", "soon", "r", 1, true, false]]',
        b'lw1 a\n[["C", "k", NaN, "r", 1, true, false]]',
        b'lw1 a\n[["c", "k", "/", 1, 1008, "", "nobody", 0.1]]',
        b'lw1 a\n[["K", "b", true, "k", 1008, ""]]',
        # Numbers no frame or connection id holds, and nesting beyond reason:
        # each a ValueError, not an OverflowError or RecursionError that ended
        # the replica's session with the store.
        b'lw1 a\n[["c", "k", "/", 1, 18446744073709551617, "", "client", 0.1]]',
        b'lw1 a\n[["K", "b", 18446744073709551616, "k", 1008, ""]]',
        b'lw1 a\n[["K", "b", 1, "k", 70000, ""]]',
        b'lw1 a\n[["K", "b", -1, "k", 1008, ""]]',
        b'lw1 a\n[["h", "k", "/", 100000000000000000000, null]]',
        b'lw1 a\n[["O", [["k", 1]], 1.0]]',
        b'lw1 a\n[["O", [[1, 2, 0.5]], 1.0]]',
        b'lw1 a\n[["O", "k", 1.0]]',
        b'lw1 a\n[["O", [], 0]]',
        b'lw1 a\n[["O", [["k", 1, "old"]], 1.0]]',
        b'lw1 a\n[["W", 1]]',
        b'lw1 a\n[["L", "now"]]',
        b"lw1 a\n" + b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_a_bad_batch_is_a_value_error(payload: bytes) -> None:
    with pytest.raises(ValueError):
        shared.decode(payload)
