"""A storm is many clients reconnecting at once; one client looping is a loop."""

from __future__ import annotations

from loopwatch.detectors.engine import Engine
from loopwatch.detectors.events import Attempt, Closed, Opened
from loopwatch.detectors.settings import BreakerSettings, DetectionSettings, PolicySettings


def engine() -> Engine:
    return Engine(DetectionSettings(), PolicySettings(mode="observe"), BreakerSettings())


def test_one_client_looping_fast_is_never_a_storm() -> None:
    e = engine()
    t = 0.0
    for i in range(20 * 60):  # 20 attempts/s for a minute, each closed 1008 at once
        e.admit(Attempt("tab-42", "/ws", t, "10.0.0.1"))
        e.record(Opened("tab-42", "/ws", t + 0.005, i))
        e.record(Closed("tab-42", "/ws", t + 0.01, i, 1008, "token expired", "upstream", 0.005))
        e.wake(t + 0.01)
        assert not e.snapshot(t + 0.01).storm, f"storm flagged at {t:.2f}s"
        t += 0.05
    assert e.snapshot(t).fleet_attempt_rate > 15  # the attempt rate itself is still reported


def test_many_clients_reconnecting_once_is_a_storm() -> None:
    e = engine()
    # A quiet baseline: a few clients reconnecting now and then for ten minutes.
    t = 0.0
    for i in range(300):
        e.admit(Attempt(f"quiet{i % 5}", "/ws", t, "10.0.0.2"))
        t += 2.0
    assert not e.snapshot(t).storm
    # The backend restarts: 500 distinct clients reconnect within 2 s.
    for i in range(500):
        e.admit(Attempt(f"user{i}", "/ws", t + i * 0.004, f"10.1.{i // 250}.{i % 250}"))
    assert e.snapshot(t + 2.0).storm
