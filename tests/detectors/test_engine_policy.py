"""Engine decisions under policy settings: modes, rollout, lists, limits, duplicates."""

from __future__ import annotations

import pytest

from loopwatch.detectors.actions import CloseConnection, CooldownStarted, WouldReject
from loopwatch.detectors.decisions import ADMITTED, Admit, Reject
from loopwatch.detectors.engine import Engine
from loopwatch.detectors.events import Attempt, Closed, HandshakeFailed, Opened
from loopwatch.detectors.settings import BreakerSettings, DetectionSettings, PolicySettings
from tests.detectors.sim import Client, Close, Sim, Stay, always, fixed, once

K = "alice@10.0.0.5"


def engine(policy: PolicySettings | None = None, detection: DetectionSettings | None = None) -> Engine:
    return Engine(detection or DetectionSettings(), policy or PolicySettings(), BreakerSettings())


def loop(e: Engine, key: str = K, until: float = 3.0, addr: str = "") -> Sim:
    sim = Sim(e, always(Close(0.01, 1008)))
    sim.add(Client(key, 0.0, fixed(0.05), addr=addr))
    sim.run(until)
    return sim


def fail_three_times(e: Engine, key: str, t: float = 0.0, addr: str = "") -> float:
    """Three quick 1008 closes: enough for a critical auth_failure_loop. Returns the time after."""
    for i in range(3):
        decision = e.admit(Attempt(key, "/ws", t, addr))
        assert decision.admitted
        e.record(Opened(key, "/ws", t + 0.005, f"{key}-{i}"))
        e.record(Closed(key, "/ws", t + 0.015, f"{key}-{i}", 1008, "", "upstream", 0.01))
        t += 0.065
    return t


# --- observe mode, per-rule modes --------------------------------------------


def test_observe_mode_flags_and_records_but_never_rejects() -> None:
    log = loop(engine(PolicySettings(mode="observe"))).log
    assert log.rejects() == []
    assert log.raised()[0].rule == "auth_failure_loop"
    cooldowns = log.cooldowns()
    assert cooldowns and not any(c.enforced for c in cooldowns)
    would = [d.would_reject for _, d in log.admits() if d.would_reject is not None]
    assert would and all(w.reason == "cooldown" for w in would)
    assert len(log.would_rejects()) == len(would)
    assert {w.reason for w in log.would_rejects()} == {"cooldown"}


def test_observe_mode_snapshot_counts_would_be_cooldowns_apart() -> None:
    e = engine(PolicySettings(mode="observe"))
    loop(e, until=1.0)
    snap = e.snapshot(1.0)
    assert (snap.clients_in_cooldown, snap.clients_in_observed_cooldown) == (0, 1)


def test_an_observed_cooldown_is_no_cooldown_status() -> None:
    """The docs probe: in observe mode the API and the CLI said `cooldown` for
    a client every attempt of which reached the backend (and admin-api.md's
    "who is refused" recipe listed it). `cooldown` is for a client refused;
    an observed cooldown ranks and reads as its worst finding."""
    e = engine(PolicySettings(mode="observe"))
    loop(e, until=1.0)
    loop(e, key="bob@10.0.0.6", until=1.0)
    e.force_cooldown("carol@10.0.0.7", 60.0, 1.0)  # an operator's: refused in any mode
    (view,) = e.views([K], 1.0)
    assert view.cooldown_rule == "auth_failure_loop" and not view.cooldown_enforced
    assert view.status == "critical"
    ranked = [(c.key, c.status) for c in e.clients(1.0)]
    assert ranked[0] == ("carol@10.0.0.7", "cooldown")
    assert {k: st for k, st in ranked[1:]} == {K: "critical", "bob@10.0.0.6": "critical"}
    enforced = engine()
    loop(enforced, until=1.0)
    assert enforced.views([K], 1.0)[0].status == "cooldown"


def test_a_rule_can_be_observed_while_the_rest_is_enforced() -> None:
    detection = DetectionSettings(rules={"auth_failure_loop": {"mode": "observe"}})  # type: ignore[arg-type]
    log = loop(engine(detection=detection), until=2.0).log
    auth = [c for c in log.cooldowns() if c.rule == "auth_failure_loop"]
    assert auth and not auth[0].enforced
    # rapid_reconnect (enforced) catches the same loop a little later
    enforced = [c for c in log.cooldowns() if c.enforced]
    assert enforced and enforced[0].rule == "rapid_reconnect"
    assert log.rejects()


def test_a_rule_can_be_enforced_while_the_rest_is_observed() -> None:
    e = engine(
        PolicySettings(mode="observe"),
        DetectionSettings(rules={"auth_failure_loop": {"mode": "enforce"}}),  # type: ignore[arg-type]
    )
    log = loop(e, until=2.0).log
    assert log.rejects() and log.rejects()[0][1].reason == "cooldown"


def test_enforce_on_warning_and_never() -> None:
    warn = DetectionSettings(rules={"no_backoff": {"enforce_on": "warning"}, "auth_failure_loop": {"enabled": False}, "rapid_reconnect": {"enabled": False}})  # type: ignore[arg-type]
    log = loop(engine(detection=warn)).log
    assert [c.rule for c in log.cooldowns()][:1] == ["no_backoff"]
    never = DetectionSettings(rules={name: {"enforce_on": "never"} for name in ("auth_failure_loop", "rapid_reconnect")})  # type: ignore[arg-type]
    log = loop(engine(detection=never)).log
    assert log.raised() and log.cooldowns() == [] and log.rejects() == []


def test_a_disabled_rule_never_raises() -> None:
    detection = DetectionSettings(rules={"auth_failure_loop": {"enabled": False}})  # type: ignore[arg-type]
    log = loop(engine(detection=detection), until=1.0).log
    assert "auth_failure_loop" not in {f.rule for f in log.raised()}


# --- rollout -----------------------------------------------------------------


def test_rollout_enforces_a_stable_share_of_clients() -> None:
    policy = PolicySettings(rollout_percent=30)
    # 10 000 clients failing auth at once would (rightly) open the auth breaker
    no_auth_breaker = BreakerSettings(auth={"enabled": False})  # type: ignore[arg-type]
    e = Engine(DetectionSettings(), policy, no_auth_breaker)
    enforced = set()
    for i in range(10_000):
        key = f"tab-{i}"
        t = fail_three_times(e, key)
        decision = e.admit(Attempt(key, "/ws", t))
        if isinstance(decision, Reject):
            enforced.add(key)
        else:
            assert decision.would_reject is not None and decision.would_reject.reason == "cooldown"
    assert 2700 <= len(enforced) <= 3300
    # same key, same answer: on another engine (another replica, a restart)
    other = Engine(DetectionSettings(), policy, no_auth_breaker)
    for i in range(0, 10_000, 97):
        key = f"tab-{i}"
        t = fail_three_times(other, key)
        assert isinstance(other.admit(Attempt(key, "/ws", t)), Reject) == (key in enforced)


# --- allow and deny ------------------------------------------------------------


@pytest.mark.parametrize(
    ("allow", "key", "addr"),
    [
        (["alice@10.0.0.5"], "alice@10.0.0.5", ""),
        (["10.0.0.0/24"], "alice@10.0.0.5", ""),
        (["10.0.0.0/24"], "alice", "10.0.0.5"),
    ],
)
def test_allow_listed_clients_are_flagged_but_never_refused(allow: list[str], key: str, addr: str) -> None:
    log = loop(engine(PolicySettings(allow=allow)), key=key, addr=addr).log
    assert log.raised() and log.rejects() == []
    assert log.would_rejects()


RULE_OFF = {"rules": {"auth_failure_loop": {"enabled": False}}}
RULE_NEVER = {"rules": {"auth_failure_loop": {"enforce_on": "never"}}}
RULE_OBSERVED = {"rules": {"auth_failure_loop": {"mode": "observe"}}}


@pytest.mark.parametrize(
    ("lift", "detection"),
    [
        ({"allow": ["10.0.0.0/24"]}, {}),
        ({"mode": "observe"}, {}),
        ({"rollout_percent": 0}, {}),
        ({}, RULE_OBSERVED),
        # Turning the rule off does no less than observing it (the reload
        # probe: the cooldown ran on for up to 5 minutes after the rule was off).
        ({}, RULE_OFF),
        ({}, RULE_NEVER),
    ],
)
def test_a_cooldown_a_reload_lifts_is_shown_as_not_enforced(
    lift: dict[str, object], detection: dict[str, object]
) -> None:
    """The runbook's remedies (allow-list the client, observe mode, a rollout
    that leaves it out, the rule observed or off) let its next attempt in; the
    API and loopwatch_clients_in_cooldown said "enforced" until the old
    cooldown ran out (5 minutes at most), so LoopwatchClientsInCooldownHigh kept
    firing and the operator was told the change had not applied. One test now
    decides both."""
    e = engine()
    t = fail_three_times(e, "alice", addr="10.0.0.5")
    assert not e.admit(Attempt("alice", "/ws", t, "10.0.0.5")).admitted
    view = e.client("alice", t)
    assert view is not None and view.cooldown_enforced
    assert e.snapshot(t).clients_in_cooldown == 1
    reloaded = DetectionSettings.model_validate(detection)
    e.reconfigure(reloaded, PolicySettings(**lift), BreakerSettings(), t)  # type: ignore[arg-type]
    view = e.client("alice", t + 0.1)
    # Flagged, not `cooldown`: the client is let in (the docs probe).
    assert view is not None and view.status in ("critical", "warning") and not view.cooldown_enforced
    snap = e.snapshot(t + 0.1)
    assert (snap.clients_in_cooldown, snap.clients_in_observed_cooldown) == (0, 1)
    assert e.admit(Attempt("alice", "/ws", t + 0.1, "10.0.0.5")).admitted  # as the views say
    # An operator's cooldown holds whatever the mode: shown enforced.
    e.force_cooldown("bob", 60.0, t + 0.2)
    bob = e.client("bob", t + 0.3)
    assert bob is not None and bob.cooldown_enforced and e.snapshot(t + 0.3).clients_in_cooldown == 1


@pytest.mark.parametrize(
    ("deny", "key", "addr"),
    [
        (["mallory@6.6.6.6"], "mallory@6.6.6.6", ""),
        (["6.6.0.0/16"], "mallory@6.6.6.6", ""),
        (["6.6.0.0/16"], "6.6.1.1", ""),
        (["2001:db8::/32"], "eve", "2001:db8::1"),
    ],
)
def test_deny_listed_clients_are_always_refused_even_in_observe_mode(deny: list[str], key: str, addr: str) -> None:
    for mode in ("enforce", "observe"):
        e = engine(PolicySettings(mode=mode, deny=deny))
        decision = e.admit(Attempt(key, "/ws", 0.0, addr))
        assert isinstance(decision, Reject) and decision.reason == "deny"
        assert decision.retry_after == 300.0
    assert e.admit(Attempt("alice@10.0.0.5", "/ws", 1.0)) is ADMITTED


# --- min interval ----------------------------------------------------------------


def test_min_interval_lets_one_attempt_through_per_interval() -> None:
    e = engine(PolicySettings(min_interval="1s"))
    decisions = [e.admit(Attempt(K, "/ws", t / 10)) for t in range(0, 25)]
    admitted = [i / 10 for i, d in enumerate(decisions) if d.admitted]
    assert admitted == [0.0, 1.0, 2.0]
    refused = decisions[3]
    assert isinstance(refused, Reject) and refused.reason == "min_interval"
    assert refused.retry_after == pytest.approx(0.7)


def test_min_interval_off_by_default() -> None:
    e = engine()
    assert all(e.admit(Attempt(K, "/ws", t / 100)) is ADMITTED for t in range(5))


# --- max concurrent, duplicates ---------------------------------------------------


def _open_n(e: Engine, n: int, key: str = K) -> list:
    outcomes = []
    for i in range(n):
        d = e.admit(Attempt(key, "/ws", i * 0.1))
        outcomes.append(d)
        if d.admitted:
            e.record(Opened(key, "/ws", i * 0.1 + 0.005, i))
    return outcomes


def test_max_concurrent_reject_new() -> None:
    e = engine(PolicySettings(max_concurrent=3))
    decisions = _open_n(e, 5)
    assert [d.admitted for d in decisions] == [True, True, True, False, False]
    assert decisions[3].reason == "max_concurrent"
    e.record(Closed(K, "/ws", 1.0, 0, 1000, "", "client", 1.0))
    assert e.admit(Attempt(K, "/ws", 1.1)).admitted


def _actions_opening(e: Engine, n: int, key: str = K) -> list:
    """Every action of ``n`` attempts each opened at once, the opens' included."""
    actions = []
    for i in range(n):
        d = e.admit(Attempt(key, "/ws", i * 0.1))
        actions += d.outcome.actions
        if d.admitted:
            actions += e.record(Opened(key, "/ws", i * 0.1 + 0.005, i)).actions
    return actions


def test_max_concurrent_close_oldest_names_the_oldest_connection() -> None:
    e = engine(PolicySettings(max_concurrent=2, on_max_concurrent="close-oldest"))
    actions = _actions_opening(e, 4)
    closes = [a for a in actions if isinstance(a, CloseConnection)]
    assert [(c.conn_id, c.code) for c in closes] == [(0, 1008), (1, 1008)]
    assert "more than 2" in closes[0].reason
    # The ones picked no longer count as open; the rest do, oldest first.
    assert e.open_connections(K) == (2, 3) and e.open_connections("nobody") == ()
    # the proxy closes it (initiator proxy, 1008): that is not an auth failure
    out = e.record(Closed(K, "/ws", 0.5, 0, 1008, closes[0].reason, "proxy", 0.495))
    assert out.raised == ()
    view = e.client(K, 0.5)
    assert view is not None and view.consecutive_auth_failures == 0


def test_max_concurrent_in_observe_mode_only_records() -> None:
    e = engine(PolicySettings(mode="observe", max_concurrent=2, on_max_concurrent="close-oldest"))
    actions = _actions_opening(e, 3)
    assert not any(isinstance(a, CloseConnection) for a in actions)
    assert [a.reason for a in actions if isinstance(a, WouldReject)] == ["max_concurrent"]
    e2 = engine(PolicySettings(mode="observe", max_concurrent=2))
    last = _open_n(e2, 3)[-1]
    assert isinstance(last, Admit) and last.would_reject is not None
    assert last.would_reject.reason == "max_concurrent"


def test_close_oldest_closes_nothing_for_an_attempt_that_fails() -> None:
    """The incident's other tab loops on an expired token: each failing attempt
    used to close the user's working socket, though nothing replaced it."""
    e = engine(PolicySettings(max_concurrent=1, on_max_concurrent="close-oldest"))
    assert e.admit(Attempt(K, "/ws", 0.0)).admitted
    e.record(Opened(K, "/ws", 0.01, 1))
    for i in range(3):
        t = 1.0 + i * 0.1
        d = e.admit(Attempt(K, "/ws", t))
        assert d.admitted and not d.outcome.actions
        out = e.record(HandshakeFailed(K, "/ws", t + 0.01, 403))
        assert not any(isinstance(a, CloseConnection) for a in out.actions)
    assert e.open_connections(K) == (1,)


@pytest.mark.parametrize("how, closed", [("close-oldest", [0, 1, 2]), ("reject-new", [3, 4, 5])])
def test_max_concurrent_holds_when_attempts_open_at_once(how: str, closed: list[int]) -> None:
    """Six tabs' attempts in their handshakes together were all admitted and
    all stayed open: the bound is kept as they open."""
    e = engine(PolicySettings(max_concurrent=3, on_max_concurrent=how))
    assert all(e.admit(Attempt(K, "/ws", 0.0)).admitted for _ in range(6))
    actions = [a for i in range(6) for a in e.record(Opened(K, "/ws", 0.01 + i * 0.001, i)).actions]
    assert [a.conn_id for a in actions if isinstance(a, CloseConnection)] == closed
    assert len(e.open_connections(K)) == 3


def test_duplicate_connections_are_flagged_once_held_without_any_new_event() -> None:
    e = engine()
    sim = Sim(e, always(Stay()))
    for i in range(5):
        sim.add(Client(K, i * 0.01, once()))
    log = sim.run(4.0)
    assert log.raised() == []
    log = sim.run(10.0)  # the engine asked to be woken when they had been held 5 s
    (finding,) = log.raised()
    assert finding.rule == "duplicate_connections" and finding.severity == "warning"
    assert finding.evidence["concurrent"] == 5
    assert finding.t == pytest.approx(5.035)  # when the 4th (opened at 0.035) had been held 5 s
    # it stays while they stay open (rechecked at each quiet-period deadline)
    log = sim.run(600.0)
    assert log.cleared() == []
    assert e.snapshot(600.0).clients_flagged["duplicate_connections"] == 1


def test_duplicate_connections_can_be_enforced() -> None:
    detection = DetectionSettings(rules={"duplicate_connections": {"enforce_on": "warning"}})  # type: ignore[arg-type]
    e = engine(detection=detection)
    _open_n(e, 4)
    out = e.wake(e.next_wake or 0.0)
    assert [type(a) for a in out.actions] == [CooldownStarted]
    assert isinstance(e.admit(Attempt(K, "/ws", 6.0)), Reject)
