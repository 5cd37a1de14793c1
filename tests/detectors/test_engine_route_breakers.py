"""Each route has its own breakers: a dead backend behind one route must not
refuse the clients of another (a probe found 74 % of a healthy route's
attempts refused while another route's backend was down)."""

from __future__ import annotations

import pytest

from loopwatch.detectors.actions import BreakerTransition
from loopwatch.detectors.decisions import Admit, Reject
from loopwatch.detectors.engine import MAX_BREAKER_ROUTES, Engine
from loopwatch.detectors.events import Attempt, Closed, HandshakeFailed, Opened
from loopwatch.detectors.settings import BreakerSettings, DetectionSettings, PolicySettings

UPSTREAM = {"min_calls": 10, "window": "30s", "open_wait": "5s", "open_wait_max": "20s", "half_open_probes": 1}


def engine(routes: tuple[str, ...] = ("/a", "/c"), **breakers: object) -> Engine:
    b = BreakerSettings.model_validate({"upstream": UPSTREAM, **breakers})
    return Engine(DetectionSettings(), PolicySettings(), b, routes=routes)


def states(e: Engine, t: float) -> dict[tuple[str, str], str]:
    return {(b.route, b.name): b.state for b in e.breakers(t)}


def transitions(outcomes: list) -> list[tuple[str, str, str, str]]:
    return [
        (a.route, a.name, a.from_state, a.to_state)
        for o in outcomes
        for a in o.actions
        if isinstance(a, BreakerTransition)
    ]


def upstream_down(e: Engine, route: str, clients: int, t: float = 0.0) -> list:
    out = []
    for i in range(clients):
        key = f"c{i}@10.0.{i // 250}.{i % 250}"
        d = e.admit(Attempt(key, route, t, key.partition("@")[2]))
        out.append(d.outcome)
        if d.admitted:
            out.append(e.record(HandshakeFailed(key, route, t + 0.01, None, "connect")))
        t += 0.01
    return out


def auth_down(e: Engine, route: str, clients: int, t: float = 0.0) -> None:
    """`clients` addresses fail auth twice each (the auth breaker counts a
    client's second failure in a row: a stale token fails once)."""
    for i in range(clients):
        key = f"u{i}@10.1.0.{i}"
        for _ in range(2):
            if e.admit(Attempt(key, route, t, f"10.1.0.{i}")).admitted:
                e.record(HandshakeFailed(key, route, t + 0.005, 401))
            t += 0.01


def test_configured_routes_have_their_breakers_from_the_start() -> None:
    assert states(engine(), 0.0) == {
        ("/a", "upstream"): "closed", ("/a", "auth"): "closed",
        ("/c", "upstream"): "closed", ("/c", "auth"): "closed",
    }  # fmt: skip


def test_a_dead_routes_upstream_breaker_does_not_refuse_another_route() -> None:
    e = engine()
    out = upstream_down(e, "/c", 30)
    assert transitions(out) == [("/c", "upstream", "closed", "open")]
    refused = e.admit(Attempt("late@10.9.0.1", "/c", 0.4, "10.9.0.1"))
    assert isinstance(refused, Reject) and (refused.reason, refused.breaker) == ("circuit_open", "upstream")
    assert "/c" in refused.detail
    healthy = e.admit(Attempt("user@10.9.0.2", "/a", 0.4, "10.9.0.2"))
    assert isinstance(healthy, Admit) and healthy.probes == ()
    assert e.record(Opened("user@10.9.0.2", "/a", 0.41, 1)).actions == ()
    assert states(e, 0.5)[("/a", "upstream")] == "closed"
    assert states(e, 0.5)[("/c", "upstream")] == "open"
    # The table holds it the same way: only /c's entry is open.
    table = {(b.route, b.name): b.state for b in e.breaker_enforcement(0.5)}
    assert table[("/c", "upstream")] == "open" and table[("/a", "upstream")] == "closed"


def test_a_healthy_routes_successes_do_not_dilute_a_dead_routes_ratio() -> None:
    e = engine()
    for i in range(200):  # /a busy and healthy
        key = f"ok{i}@10.2.0.{i}"
        e.admit(Attempt(key, "/a", i * 0.001, f"10.2.0.{i}"))
        e.record(Opened(key, "/a", i * 0.001 + 0.0005, i))
    assert transitions(upstream_down(e, "/c", 10, 0.3)) == [("/c", "upstream", "closed", "open")]


def test_a_routes_broken_auth_does_not_refuse_another_route() -> None:
    e = engine(auth={"min_calls": 5})
    auth_down(e, "/c", 5)
    assert states(e, 0.1)[("/c", "auth")] == "open"
    assert states(e, 0.1)[("/a", "auth")] == "closed"
    refused = e.admit(Attempt("x@10.9.0.1", "/c", 0.2, "10.9.0.1"))
    assert isinstance(refused, Reject) and refused.breaker == "auth"
    assert e.admit(Attempt("y@10.9.0.2", "/a", 0.2, "10.9.0.2")).admitted


def test_probes_belong_to_their_routes_breaker() -> None:
    """Both routes half-open at once: a probe's outcome closes its own
    route's breaker, not the other's of the same name."""
    e = engine()
    upstream_down(e, "/a", 10)
    upstream_down(e, "/c", 10)
    t = 10.0  # past both open waits
    probe_a = e.admit(Attempt("pa@10.3.0.1", "/a", t, "10.3.0.1"))
    probe_c = e.admit(Attempt("pc@10.3.0.2", "/c", t, "10.3.0.2"))
    assert probe_a.probes == ("upstream",) and probe_c.probes == ("upstream",)  # type: ignore[union-attr]
    # /a's budget (1 probe) is spent; /c's too: a third attempt on /a is refused.
    assert isinstance(e.admit(Attempt("n@10.3.0.3", "/a", t, "10.3.0.3")), Reject)
    out = e.record(Opened("pa@10.3.0.1", "/a", t + 0.01, 1))
    assert transitions([out]) == [("/a", "upstream", "half_open", "closed")]
    assert states(e, t + 0.02)[("/c", "upstream")] == "half_open"
    out = e.record(HandshakeFailed("pc@10.3.0.2", "/c", t + 0.02, 502))
    assert transitions([out]) == [("/c", "upstream", "half_open", "open")]
    assert states(e, t + 0.03)[("/a", "upstream")] == "closed"


def test_a_probe_released_unused_goes_back_to_its_route() -> None:
    e = engine()
    upstream_down(e, "/c", 10)
    t = 10.0
    assert e.admit(Attempt("p@10.3.0.1", "/c", t, "10.3.0.1")).probes == ("upstream",)  # type: ignore[union-attr]
    # The client left before the handshake ended: no outcome, the probe goes back.
    e.record(HandshakeFailed("p@10.3.0.1", "/c", t + 0.01, None, "client_closed"))
    assert e.admit(Attempt("q@10.3.0.2", "/c", t + 0.02, "10.3.0.2")).probes == ("upstream",)  # type: ignore[union-attr]


def test_reset_closes_one_routes_breaker_or_every_routes() -> None:
    e = engine()
    upstream_down(e, "/a", 10)
    upstream_down(e, "/c", 10, 0.2)
    assert e.reset_breaker("upstream", 1.0, route="/a")
    assert states(e, 1.0)[("/a", "upstream")] == "closed"
    assert states(e, 1.0)[("/c", "upstream")] == "open"
    assert not e.reset_breaker("upstream", 1.0, route="/nowhere")
    assert not e.reset_breaker("nonsense", 1.0)
    assert e.reset_breaker("upstream", 1.1)
    assert {s for (_, name), s in states(e, 1.1).items() if name == "upstream"} == {"closed"}
    pending = e.wake(1.2)
    assert transitions([pending]) == [
        ("/a", "upstream", "open", "closed"), ("/c", "upstream", "open", "closed"),
    ]  # fmt: skip


def test_reconfigure_applies_to_every_routes_breakers_and_routes() -> None:
    e = engine()
    upstream_down(e, "/c", 10)
    upstream_down(e, "/gone", 10)  # not configured: made at its first event
    off = BreakerSettings.model_validate({"upstream": {**UPSTREAM, "enabled": False}})
    e.reconfigure(DetectionSettings(), PolicySettings(), off, 1.0, routes=("/a", "/b"))
    views = e.breakers(1.0)
    assert all(not v.enabled for v in views if v.name == "upstream")
    # A disabled breaker is reset closed; the closed routes no longer configured are forgotten.
    assert sorted({v.route for v in views}) == ["/a", "/b"]
    assert all(v.state == "closed" for v in views)


def test_a_reload_closes_the_breakers_of_a_route_it_repoints_or_removes() -> None:
    """Breakers judge a route's upstream: re-pointed to a healthy backend, a
    route kept the dead one's open breaker (attempts refused "upstream
    unavailable" for up to open_wait_max); removed, it stayed half-open for
    good (its path has no route: its probes never come), and a route added
    back inherited it (the reload probe)."""
    b = BreakerSettings.model_validate({"upstream": UPSTREAM})
    routes = {"/a": "ws://one", "/c": "ws://dead"}
    e = Engine(DetectionSettings(), PolicySettings(), b, routes=routes)
    upstream_down(e, "/c", 10)
    assert states(e, 0.2)[("/c", "upstream")] == "open"
    # The same upstream, or the routes by name alone: kept.
    e.reconfigure(DetectionSettings(), PolicySettings(), b, 0.3, routes=routes)
    e.reconfigure(DetectionSettings(), PolicySettings(), b, 0.3, routes=("/a", "/c"))
    assert states(e, 0.3)[("/c", "upstream")] == "open"
    assert not e.admit(Attempt("k@10.9.0.1", "/c", 0.3, "10.9.0.1")).admitted
    # Re-pointed: closed at once, and told.
    e.reconfigure(DetectionSettings(), PolicySettings(), b, 0.4, routes={**routes, "/c": "ws://healthy"})
    assert states(e, 0.4) == {(r, n): "closed" for r in ("/a", "/c") for n in ("upstream", "auth")}
    assert transitions([e.wake(0.4)]) == [("/c", "upstream", "open", "closed")]
    assert e.admit(Attempt("k@10.9.0.1", "/c", 0.5, "10.9.0.1")).admitted
    # Removed while open: closed and forgotten; added back, closed.
    upstream_down(e, "/c", 10, 1.0)
    assert states(e, 1.2)[("/c", "upstream")] == "open"
    e.reconfigure(DetectionSettings(), PolicySettings(), b, 1.3, routes={"/a": "ws://one"})
    assert ("/c", "upstream") not in states(e, 1.3)
    assert transitions([e.wake(1.3)]) == [("/c", "upstream", "open", "closed")]
    e.reconfigure(DetectionSettings(), PolicySettings(), b, 60.0, routes={"/a": "ws://one", "/c": "ws://x"})
    assert states(e, 60.0)[("/c", "upstream")] == "closed"


def test_routes_beyond_the_bound_get_no_breakers() -> None:
    """Remote events carry any route string: the breakers made for them are bounded."""
    e = engine(routes=("/a",))
    for i in range(MAX_BREAKER_ROUTES + 10):
        e.admit(Attempt("k", f"/invented/{i}", i * 0.001))
    routes = {v.route for v in e.breakers(1.0)}
    assert len(routes) == MAX_BREAKER_ROUTES + 1 and "/a" in routes
    # Beyond it, an attempt is judged by no breaker and its outcomes feed none.
    assert transitions(upstream_down(e, "/beyond", 30, 2.0)) == []
    assert "/beyond" not in {v.route for v in e.breakers(3.0)}
    # A configured route always gets its breakers, whatever the bound.
    e.reconfigure(DetectionSettings(), PolicySettings(), BreakerSettings(), 4.0, routes=("/a", "/new"))
    assert "/new" in {v.route for v in e.breakers(4.0)}


def test_auth_credits_feed_their_routes_breaker() -> None:
    """An open connection is an auth success of its own route's breaker."""
    e = engine(auth={"min_calls": 5, "half_open_probes": 1})
    auth_down(e, "/c", 5)
    assert states(e, 0.1)[("/c", "auth")] == "open"
    t = 10.1
    d = e.admit(Attempt("p@10.4.0.1", "/c", t, "10.4.0.1"))
    assert d.probes == ("auth",)  # type: ignore[union-attr]
    e.record(Opened("p@10.4.0.1", "/c", t + 0.01, 7))
    e.record(Opened("q@10.4.0.2", "/a", t + 0.01, 8))
    assert e.next_wake == pytest.approx(t + 0.01 + 5.0)
    out = e.wake(t + 5.02)
    assert transitions([out]) == [("/c", "auth", "half_open", "closed")]
    e.record(Closed("p@10.4.0.1", "/c", t + 6.0, 7, 1000, "", "client", 5.99))
