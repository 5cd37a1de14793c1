"""The breakers inside the engine: fed by outcomes, enforced by admit, probes handled."""

from __future__ import annotations

import pytest

from loopwatch.detectors.actions import BreakerTransition, CooldownStarted
from loopwatch.detectors.breaker import party
from loopwatch.detectors.decisions import Admit, Reject
from loopwatch.detectors.engine import Engine
from loopwatch.detectors.events import Attempt, Closed, HandshakeFailed, Opened
from loopwatch.detectors.settings import BreakerSettings, DetectionSettings, PolicySettings
from tests.detectors.sim import Client, Close, Sim, Stay, always, backoff, fixed

UPSTREAM = {"min_calls": 10, "window": "30s", "open_wait": "5s", "open_wait_max": "20s", "half_open_probes": 2}


def engine(policy: PolicySettings | None = None, **breakers: object) -> Engine:
    b = BreakerSettings.model_validate({"upstream": UPSTREAM, **breakers})
    return Engine(DetectionSettings(), policy or PolicySettings(), b)


def auth_fails(e: Engine, key: str, t: float, addr: str = "", status: int = 401) -> None:
    """Client `key` fails auth twice in a row, 10 ms apart: the second is the
    first failure its route's auth breaker counts (a stale token fails once)."""
    for i in range(2):
        if e.admit(Attempt(key, "/ws", t + i * 0.01, addr)).admitted:
            e.record(HandshakeFailed(key, "/ws", t + i * 0.01 + 0.005, status))


def transitions(outcomes: list) -> list[tuple[str, str, str]]:
    return [
        (a.name, a.from_state, a.to_state)
        for o in outcomes
        for a in o.actions
        if isinstance(a, BreakerTransition)
    ]


def upstream_down(e: Engine, clients: int, t: float = 0.0, error: str = "connect") -> list:
    """``clients`` different clients each fail once to connect upstream (with
    ``error`` "fd_limit": the proxy had no descriptor for the upstream's socket)."""
    out = []
    for i in range(clients):
        key = f"c{i}"
        d = e.admit(Attempt(key, "/ws", t))
        out.append(d.outcome)
        if d.admitted:
            out.append(e.record(HandshakeFailed(key, "/ws", t + 0.01, None, error)))
        t += 0.01
    return out


def test_upstream_breaker_opens_when_the_upstream_is_down_and_admit_refuses_by_itself() -> None:
    e = engine()
    out = upstream_down(e, 10)
    assert transitions(out) == [("upstream", "closed", "open")]
    d = e.admit(Attempt("newcomer", "/ws", 0.2))
    assert isinstance(d, Reject)
    assert (d.reason, d.breaker) == ("circuit_open", "upstream")
    assert d.retry_after == pytest.approx(5.0 - 0.1, abs=0.01)
    assert e.breakers(0.2)[0].state == "open"
    assert e.snapshot(0.2).breakers == {"/ws": {"upstream": "open", "auth": "closed"}}


def test_refusals_while_open_do_not_count_against_clients() -> None:
    e = engine()
    upstream_down(e, 10)
    for i in range(100):  # a client hammering the open breaker
        assert isinstance(e.admit(Attempt("eager", "/ws", 0.2 + i * 0.01)), Reject)
    view = e.client("eager", 1.3)
    assert view is not None and view.findings == () and view.status == "ok"


def test_failures_while_the_breaker_is_open_start_no_cooldown() -> None:
    """Attempts in flight when it opened still fail; the upstream is to blame, not the client."""
    e = engine()
    for i in range(35):  # one client's attempts all in flight at once
        e.admit(Attempt("k", "/ws", i * 0.001))
    out = [e.record(HandshakeFailed("k", "/ws", 1.0 + i * 0.001, 502)) for i in range(35)]
    assert not any(isinstance(a, CooldownStarted) for o in out for a in o.actions)
    assert transitions(out) == [("upstream", "closed", "open")]


def test_half_open_probes_go_through_admit_and_close_the_breaker_on_success() -> None:
    e = engine()
    upstream_down(e, 10)
    t = 5.1  # past the open wait: no wake() call needed, admit moves it on
    first = e.admit(Attempt("p1", "/ws", t))
    assert isinstance(first, Admit) and first.probes == ("upstream",) and first.probe
    assert transitions([first.outcome]) == [("upstream", "open", "half_open")]
    second = e.admit(Attempt("p2", "/ws", t))
    assert isinstance(second, Admit) and second.probe
    third = e.admit(Attempt("p3", "/ws", t))  # both probes are out
    assert isinstance(third, Reject) and third.reason == "circuit_open"
    e.record(Opened("p1", "/ws", t + 0.01, 1))
    out = e.record(Opened("p2", "/ws", t + 0.02, 2))
    assert transitions([out]) == [("upstream", "half_open", "closed")]
    assert e.admit(Attempt("p3", "/ws", t + 0.1)).admitted


def test_a_failed_probe_reopens_with_a_longer_wait() -> None:
    e = engine()
    upstream_down(e, 10)
    d = e.admit(Attempt("p1", "/ws", 5.1))
    assert d.admitted
    out = e.record(HandshakeFailed("p1", "/ws", 5.2, 503))
    assert transitions([out]) == [("upstream", "half_open", "open")]
    assert e.breakers(5.2)[0].open_wait == 10.0
    refused = e.admit(Attempt("p2", "/ws", 5.3))
    assert isinstance(refused, Reject) and refused.retry_after == pytest.approx(9.9)


def test_the_proxys_own_fd_limit_does_not_open_the_upstream_breaker() -> None:
    # Ten connect failures open it (upstream_down above); thirty of loopwatch's
    # own do not: the upstream was never tried.
    e = engine()
    assert transitions(upstream_down(e, 30, error="fd_limit")) == []
    assert e.breakers(0.5)[0].state == "closed"
    assert e.admit(Attempt("newcomer", "/ws", 0.5)).admitted


def test_clients_that_leave_before_the_upstream_answers_do_not_open_it() -> None:
    """Closed tabs against a slow backend counted as upstream failures. A client
    that leaves first still came to nothing, for its own rules."""
    e = engine()
    assert transitions(upstream_down(e, 30, error="client_closed")) == []
    assert e.breakers(0.5)[0].state == "closed"
    for i in range(12):  # one client doing it 24 times a second: its own rapid_reconnect
        t = 1.0 + i * 0.04
        e.admit(Attempt("leaver", "/ws", t))
        e.record(HandshakeFailed("leaver", "/ws", t + 0.01, None, "client_closed"))
    view = e.client("leaver", 1.5)
    assert view is not None and "rapid_reconnect" in {f.rule for f in view.findings}


def test_the_proxys_own_fd_limit_is_no_failure_of_the_client() -> None:
    # One client whose every attempt meets the limit is neither flagged nor
    # cooled: each failure is loopwatch's, not its own (a 502 would count).
    e = engine()
    for i in range(40):
        t = i * 0.05
        assert e.admit(Attempt("k", "/ws", t)).admitted
        out = e.record(HandshakeFailed("k", "/ws", t + 0.01, None, "fd_limit"))
        assert not any(isinstance(a, CooldownStarted) for a in out.actions)
    view = e.client("k", 2.1)
    assert view is not None and view.findings == () and view.status == "ok"
    assert view.history[-1].error == "fd_limit"


def test_a_probe_that_meets_the_proxys_fd_limit_goes_back_unused() -> None:
    e = engine()
    upstream_down(e, 10)
    assert e.admit(Attempt("p1", "/ws", 5.1)).probe
    assert e.admit(Attempt("p2", "/ws", 5.1)).probe
    out = e.record(HandshakeFailed("p1", "/ws", 5.2, None, "fd_limit"))
    assert transitions([out]) == []  # neither reopened nor closed by it
    again = e.admit(Attempt("p3", "/ws", 5.3))  # its probe is free for another client
    assert isinstance(again, Admit) and again.probe
    e.record(Opened("p2", "/ws", 5.4, 2))
    out = e.record(Opened("p3", "/ws", 5.4, 3))
    assert transitions([out]) == [("upstream", "half_open", "closed")]


def test_a_lost_probe_times_out_and_wake_reopens() -> None:
    e = engine()
    upstream_down(e, 10)
    assert e.admit(Attempt("p1", "/ws", 5.1)).probe
    deadline = e.next_wake
    assert deadline == pytest.approx(5.1 + 10.0)  # probe_timeout
    out = e.wake(deadline)  # type: ignore[arg-type]
    assert transitions([out]) == [("upstream", "half_open", "open")]


def test_reset_breaker_from_the_admin_api() -> None:
    e = engine()
    upstream_down(e, 10)
    assert e.reset_breaker("upstream", 1.0) is True
    assert e.reset_breaker("nonexistent", 1.0) is False
    assert e.next_wake == 1.0  # the transition is news for observers: flushed by the next call
    out = e.wake(1.0)
    assert transitions([out]) == [("upstream", "open", "closed")]
    assert e.admit(Attempt("k", "/ws", 1.1)).admitted


def test_observe_mode_never_refuses_for_a_breaker() -> None:
    e = engine(PolicySettings(mode="observe"))
    upstream_down(e, 10)
    d = e.admit(Attempt("k", "/ws", 1.0))
    assert isinstance(d, Admit) and d.would_reject is not None
    assert (d.would_reject.reason, d.would_reject.breaker) == ("circuit_open", "upstream")


# --- the auth breaker ---------------------------------------------------------


def test_a_fleet_wide_1008_storm_opens_the_auth_breaker_and_puts_no_client_in_cooldown() -> None:
    """The auth service fails for everyone: clients are not to blame."""
    e = engine()
    sim = Sim(e, always(Close(0.01, 1008)))
    for i in range(200):
        sim.add(Client(f"user{i}@10.1.0.{i}", i * 0.005, fixed(0.2)))
    sim.run(1.0)
    assert e.snapshot(1.0).fleet_auth_failure_ratio == 1.0
    log = sim.run(30.0)
    assert ("auth", "closed", "open") in transitions(log.outcomes + [d.outcome for _, _, d in log.decisions])
    assert log.cooldowns() == []
    refused = [d for _, d in log.rejects()]
    assert refused and {(d.reason, d.breaker) for d in refused} == {("circuit_open", "auth")}
    assert e.snapshot(30.0).clients_in_cooldown == 0


def test_one_looping_client_does_not_trip_the_fleet_wide_auth_breaker() -> None:
    """Counted once per window, a client observed (not refused) cannot open it alone."""
    e = engine(PolicySettings(mode="observe"))
    sim = Sim(e, lambda key, n, t: Close(0.01, 1008) if key == "looper" else Stay())
    sim.add(Client("looper", 0.0, fixed(0.05)))
    for i in range(30):  # healthy neighbours, each connecting once
        sim.add(Client(f"user{i}", i * 0.1, backoff([], None)))
    sim.run(60.0)
    assert e.breakers(60.0)[1].state == "closed"


def test_the_auth_breaker_closes_after_probes_live_long_enough() -> None:
    e = engine(auth={"min_calls": 5, "half_open_probes": 2})
    for i in range(5):
        auth_fails(e, f"u{i}", i * 0.02)
    assert e.breakers(0.1)[1].state == "open"
    t = 10.1  # past the auth open wait
    for i in range(2):
        d = e.admit(Attempt(f"p{i}", "/ws", t))
        assert d.probes == ("auth",)
        e.record(Opened(f"p{i}", "/ws", t + 0.01, 100 + i))
    assert e.breakers(t + 1.0)[1].state == "half_open"  # not yet: auth could still close them 1008
    assert e.next_wake == pytest.approx(t + 0.01 + 5.0)  # healthy_after: the probes' credit
    out = e.wake(t + 5.02)
    assert ("auth", "half_open", "closed") in transitions([out])


def test_an_auth_probe_closed_1008_twice_reopens() -> None:
    """A client's first failed auth probe is its second chance (a stale token
    it renews on that answer); its second failure re-opens."""
    e = engine(auth={"min_calls": 5})
    for i in range(5):
        auth_fails(e, f"u{i}", 0.0, status=403)
    d = e.admit(Attempt("p", "/ws", 10.1))
    assert d.probes == ("auth",)
    e.record(Opened("p", "/ws", 10.11, 1))
    out = e.record(Closed("p", "/ws", 10.12, 1, 1008, "", "upstream", 0.01))
    assert transitions([out]) == [] and e.breakers(10.2)[1].state == "half_open"
    assert e.admit(Attempt("p", "/ws", 10.3)).probes == ("auth",)  # its next attempt probes again
    e.record(Opened("p", "/ws", 10.31, 2))
    out = e.record(Closed("p", "/ws", 10.32, 2, 1008, "", "upstream", 0.01))
    assert ("auth", "half_open", "open") in transitions([out])
    assert not any(isinstance(a, CooldownStarted) for a in out.actions)


def test_a_deploy_that_invalidates_every_token_locks_nobody_out() -> None:
    """The herd probe: 200 clients connected for minutes; a deploy closes them
    all (1012) and rejects their tokens; each reconnects, gets 1008 once,
    renews its token and is back. The first 20 stale tokens (before the
    closes were counted) opened the auth breaker; at each half-open a client
    refused meanwhile, still stale, failed its probe and re-opened it with a
    doubled wait: 0 of 200 back after 5 minutes. Now: never opened."""
    e = engine()
    n = 200
    for i in range(n):
        e.admit(Attempt(f"u{i}", "/ws", 0.0, f"10.0.{i // 250}.{i % 250}"))
        e.record(Opened(f"u{i}", "/ws", 0.01, i))
    e.wake(300.0)  # connected for 5 minutes: their successes long out of the window
    t = 300.0
    # The stale reconnects can be judged before the closes reach the engine.
    for i in range(n):
        addr = f"10.0.{i // 250}.{i % 250}"
        assert e.admit(Attempt(f"u{i}", "/ws", t + i * 0.001, addr)).admitted
        e.record(HandshakeFailed(f"u{i}", "/ws", t + i * 0.001 + 0.0005, 403))
    for i in range(n):
        e.record(Closed(f"u{i}", "/ws", t + 0.3, i, 1012, "", "upstream", 300.29))
    for i in range(n):  # renewed tokens
        addr = f"10.0.{i // 250}.{i % 250}"
        assert e.admit(Attempt(f"u{i}", "/ws", t + 0.5 + i * 0.001, addr)).admitted
        e.record(Opened(f"u{i}", "/ws", t + 0.5 + i * 0.001 + 0.0005, 1000 + i))
    auth = e.breakers(t + 10)[1]
    assert auth.state == "closed" and auth.trips == 0, auth


def test_at_half_open_stale_clients_renew_and_close_the_auth_breaker() -> None:
    """Were the breaker open anyway (an auth hiccup), the clients refused
    meanwhile hold stale tokens: each fails its probe once, renews, and its
    next attempt succeeds; the breaker closes at the first half-open."""
    e = engine(auth={"min_calls": 5, "half_open_probes": 3})
    for i in range(5):
        auth_fails(e, f"u{i}", 0.0, f"10.0.0.{i}", 403)
    assert e.breakers(0.1)[1].state == "open"
    t = 10.1
    for i in range(3):  # the probes: stale, 1008, then renewed and in
        key, addr = f"s{i}", f"10.0.1.{i}"
        assert e.admit(Attempt(key, "/ws", t, addr)).probes == ("auth",)
        e.record(HandshakeFailed(key, "/ws", t + 0.01, 403))
        assert e.breakers(t + 0.02)[1].state == "half_open"
        assert e.admit(Attempt(key, "/ws", t + 0.5, addr)).probes == ("auth",)
        e.record(Opened(key, "/ws", t + 0.51, 100 + i))
        t += 0.1
    out = e.wake(t + 0.6 + 5.0)  # healthy_after: the probes' credit
    assert ("auth", "half_open", "closed") in transitions([out])


def test_a_client_whose_probe_failed_gets_no_probe_until_the_breaker_closes() -> None:
    """First in at every half-open, one looping client failed every probe and
    kept the breaker open for everyone (its failures are not its fault while
    the breaker is open: no cooldown stopped it)."""
    e = engine()
    upstream_down(e, 10)
    assert e.admit(Attempt("looper", "/ws", 5.1)).admitted
    e.record(HandshakeFailed("looper", "/ws", 5.15, 500))  # the probe failed: open for 10 s
    t = 15.2
    d = e.admit(Attempt("looper", "/ws", t))  # first in again
    assert isinstance(d, Reject) and (d.reason, d.breaker) == ("circuit_open", "upstream")
    for i in range(2):  # the probes go to others, who succeed: closed
        probe = e.admit(Attempt(f"ok{i}", "/ws", t + 0.01))
        assert probe.probes == ("upstream",)
        out = e.record(Opened(f"ok{i}", "/ws", t + 0.02, 50 + i))
    assert ("upstream", "half_open", "closed") in transitions([out])
    assert e.admit(Attempt("looper", "/ws", t + 0.1)).admitted  # closed: like anyone


def test_the_incidents_looper_cannot_hold_the_auth_breaker_open() -> None:
    """The auth service recovers after an outage; one client keeps looping on a
    bad token: the breaker closes and the looper is then put in cooldown."""
    e = engine(auth={"min_calls": 5, "half_open_probes": 2})
    for i in range(5):
        auth_fails(e, f"u{i}", i * 0.02)
    sim = Sim(e, lambda key, n, t: Close(0.01, 1008) if key == "looper" else Stay())
    sim.add(Client("looper", 1.0, fixed(0.035)))
    for i in range(20):
        sim.add(Client(f"user{i}", 9.0 + i * 0.5, fixed(1.0)))  # every second until in
    log = sim.run(120.0)
    assert e.breakers(120.0)[1].state == "closed"
    assert all(e.client(f"user{i}", 120.0).open_connections == 1 for i in range(20))  # type: ignore[union-attr]
    assert [c.key for c in log.cooldowns()][:1] == ["looper"]


def test_a_few_failing_clients_in_a_reconnecting_fleet_do_not_trip_the_auth_breaker() -> None:
    """After a deploy every client reconnects: the few with an expired token fail
    at once, the rest only become successes healthy_after later. Connections
    open and not yet failed count as not failing (3 % of 1 000 tripped it)."""
    e = engine()
    for i in range(1000):
        key = f"user{i}"
        t = i * 0.002
        assert e.admit(Attempt(key, "/ws", t)).admitted
        if i % 33 == 0:  # 3 %, each retrying once before it refreshes
            e.record(HandshakeFailed(key, "/ws", t + 0.001, 401))
            assert e.admit(Attempt(key, "/ws", t + 0.0012)).admitted
            e.record(HandshakeFailed(key, "/ws", t + 0.0015, 401))
        else:
            e.record(Opened(key, "/ws", t + 0.001, i))
    assert e.breakers(2.0)[1].state == "closed"
    assert e.breakers(2.0)[1].failures >= 20  # past min_calls: the ratio decided


def test_keys_made_up_at_one_address_count_once_for_the_auth_breaker() -> None:
    """An unsigned token's sub (the default identity), a header or a cookie is
    free to mint: one client at one address sending a new sub at every attempt
    opened the auth breaker, refusing everyone. A fleet-wide breaker counts a
    client by its address (an IPv6 host by its /64)."""
    e = engine(auth={"min_calls": 5})
    for i in range(40):  # 40 made-up keys from one IPv4 address, 40 from one /64
        for addr in ("203.0.113.7", f"2001:db8:7:7::{i + 1:x}"):
            key = f"sub{i}@{addr}"
            assert e.admit(Attempt(key, "/ws", i * 0.01, addr)).admitted
            e.record(HandshakeFailed(key, "/ws", i * 0.01 + 0.005, 401))
    assert e.breakers(1.0)[1].state == "closed"  # two clients failing, not eighty
    # Three more addresses failing, as in a real auth outage: five, open.
    for i in range(3):
        addr = f"198.51.100.{i + 1}"
        auth_fails(e, f"u@{addr}", 1.0, addr)
    assert e.breakers(1.1)[1].state == "open"


def test_a_failed_probe_denies_its_address_a_probe_whatever_the_key() -> None:
    """With a new key at every half-open the looper took the probes again."""
    e = engine()
    for i in range(10):
        addr = f"198.51.100.{i + 1}"
        e.admit(Attempt(f"c{i}@{addr}", "/ws", i * 0.01, addr))
        e.record(HandshakeFailed(f"c{i}@{addr}", "/ws", i * 0.01 + 0.005, None, "connect"))
    t = 5.1
    looper = "203.0.113.7"
    assert e.admit(Attempt(f"a@{looper}", "/ws", t, looper)).probes == ("upstream",)
    e.record(HandshakeFailed(f"a@{looper}", "/ws", t + 0.05, 500))  # the probe failed
    (upstream,) = [b for b in e.breaker_enforcement(t + 0.1) if b.name == "upstream"]
    assert upstream.no_probe == frozenset({looper})  # what the data plane's table is told
    t = 15.2
    d = e.admit(Attempt(f"fresh@{looper}", "/ws", t, looper))
    assert isinstance(d, Reject) and d.reason == "circuit_open"
    assert e.admit(Attempt("ok@198.51.100.1", "/ws", t, "198.51.100.1")).probes == ("upstream",)


def test_a_fleet_behind_one_address_gets_the_breaker_closed_once_the_backend_is_back() -> None:
    """Every client behind one NAT (or one unlisted load balancer) is one
    party: once its probe had failed, no one could probe again and the breaker
    stayed half-open for ever, refusing everyone while the backend worked. A
    failed prober gets a probe when no one else has taken one within
    open_wait of the half-open."""
    e = engine()
    nat = "198.51.100.9"
    for i in range(10):
        e.admit(Attempt(f"c{i}@{nat}", "/ws", i * 0.01, nat))
        e.record(HandshakeFailed(f"c{i}@{nat}", "/ws", i * 0.01 + 0.005, None, "connect"))
    assert e.breakers(1.0)[0].state == "open"
    t = 10.2  # half-open: the NAT's probe fails (the backend is still down)
    assert e.admit(Attempt(f"c0@{nat}", "/ws", t, nat)).probes == ("upstream",)
    out = e.record(HandshakeFailed(f"c0@{nat}", "/ws", t + 0.01, None, "connect"))
    assert ("upstream", "half_open", "open") in transitions([out])
    t = 30.3  # the backend is back; the breaker half-opens again (after a 10 s wait)
    e.wake(t)
    (upstream,) = [b for b in e.breaker_enforcement(t) if b.name == "upstream"]
    assert upstream.state == "half_open" and upstream.no_probe == frozenset({nat})
    grace_end = upstream.no_probe_until
    assert grace_end == pytest.approx(t + 5.0)  # open_wait (5 s) into the half-open
    d = e.admit(Attempt(f"c1@{nat}", "/ws", grace_end - 0.1, nat))
    assert isinstance(d, Reject) and d.reason == "circuit_open"  # others come first
    for i in (2, 3):  # the half-open's two probes, both from the NAT: closed
        assert e.admit(Attempt(f"c{i}@{nat}", "/ws", grace_end, nat)).probes == ("upstream",)
        e.record(Opened(f"c{i}@{nat}", "/ws", grace_end + 0.01, 90 + i))
    assert e.breakers(grace_end + 0.1)[0].state == "closed"


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("", "the-key"),
    ],
)
def test_the_party_a_breaker_counts(addr: str, expected: str) -> None:
    assert party(addr, "the-key") == expected
