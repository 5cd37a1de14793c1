"""Active health checks feed the upstream breaker of the route they check, and only it."""

from __future__ import annotations

from loopwatch.detectors.actions import BreakerTransition
from loopwatch.detectors.engine import Engine
from loopwatch.detectors.settings import BreakerSettings, DetectionSettings, PolicySettings


def engine(**upstream: object) -> Engine:
    breakers = BreakerSettings(upstream={"min_calls": 3, "open_wait": "5s", **upstream})
    return Engine(DetectionSettings(), PolicySettings(), breakers, routes=("/ws", "/other"))


def transitions(outcome) -> list[tuple[str, str, str]]:  # noqa: ANN001
    return [
        (a.name, a.from_state, a.to_state)
        for a in outcome.actions
        if isinstance(a, BreakerTransition)
    ]


def upstream_state(e: Engine, t: float, route: str = "/ws") -> str:
    return {(b.route, b.name): b.state for b in e.breakers(t)}[route, "upstream"]


def test_failing_checks_open_the_breaker_and_track_no_client() -> None:
    e = engine()
    assert transitions(e.record_health(0.0, ok=False, route="/ws")) == []
    assert transitions(e.record_health(1.0, ok=False, route="/ws")) == []
    assert transitions(e.record_health(2.0, ok=False, route="/ws")) == [("upstream", "closed", "open")]
    assert e.snapshot(2.0).clients_tracked == 0
    assert upstream_state(e, 2.0) == "open"


def test_checks_while_open_do_not_count_then_probe_closes_it() -> None:
    e = engine(half_open_probes=1)
    for t in (0.0, 1.0, 2.0):
        e.record_health(t, ok=False, route="/ws")
    # Still inside the open wait: a good check neither closes nor re-trips it.
    assert transitions(e.record_health(4.0, ok=True, route="/ws")) == []
    assert upstream_state(e, 4.0) == "open"
    # After the wait, the next check is the half-open probe.
    assert transitions(e.record_health(7.5, ok=True, route="/ws")) == [
        ("upstream", "open", "half_open"),
        ("upstream", "half_open", "closed"),
    ]


def test_failed_probe_reopens() -> None:
    e = engine(half_open_probes=1)
    for t in (0.0, 1.0, 2.0):
        e.record_health(t, ok=False, route="/ws")
    assert transitions(e.record_health(7.5, ok=False, route="/ws")) == [
        ("upstream", "open", "half_open"),
        ("upstream", "half_open", "open"),
    ]


def test_healthy_checks_keep_a_closed_breaker_closed() -> None:
    e = engine()
    for t in range(10):
        assert transitions(e.record_health(float(t), ok=True, route="/ws")) == []
    assert upstream_state(e, 10.0) == "closed"


def test_checks_feed_only_the_breaker_of_their_route() -> None:
    e = engine()
    for t in (0.0, 1.0, 2.0):
        e.record_health(t, ok=False, route="/ws")
    assert upstream_state(e, 2.0) == "open"
    assert upstream_state(e, 2.0, "/other") == "closed"
