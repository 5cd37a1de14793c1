"""proxy.observers.Observers: the fan-out every connection step goes through."""

from __future__ import annotations

import logging

import pytest

from loopwatch.proxy.observe.observers import Observer, Observers


class Counting(Observer):
    name = "counting"

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[object, ...]]] = []

    def on_opened(self, *args: object) -> None:  # type: ignore[override]
        self.calls.append(("on_opened", args))


class Failing(Observer):
    name = "failing"

    def on_opened(self, *args: object) -> None:  # type: ignore[override]
        raise RuntimeError("boom")


class DuckTyped:
    """Not an Observer subclass and missing most hooks."""

    name = "duck"

    def __init__(self) -> None:
        self.calls = 0

    def on_closed(self, *args: object) -> None:
        self.calls += 1


def test_calls_in_order_and_skips_nothing_that_implements_the_hook() -> None:
    order: list[str] = []

    class A(Observer):
        name = "a"

        def on_opened(self, *args: object) -> None:  # type: ignore[override]
            order.append("a")

    class B(A):
        name = "b"

        def on_opened(self, *args: object) -> None:  # type: ignore[override]
            order.append("b")

    class Inherits(A):  # the hook comes from A, not from Observer: it runs
        name = "inherits"

    observers = Observers([B(), Observer(), A(), Inherits()])
    observers.call("on_opened", 1, 2)
    observers.call("on_opened", 1, 2)
    assert order == ["b", "a", "a", "b", "a", "a"]


def test_an_observer_that_raises_is_contained_logged_once_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = Counting()
    observers = Observers([Failing(), good])
    with caplog.at_level(logging.ERROR, logger="loopwatch.observers"):
        for _ in range(3):
            observers.call("on_opened", "conn", "event")
    assert len(good.calls) == 3
    assert observers.errors["failing"] == 3
    assert len([r for r in caplog.records if r.getMessage() == "observer_error"]) == 1


def test_added_and_appended_observers_are_called() -> None:
    first, second, third = Counting(), Counting(), Counting()
    observers = Observers([first])
    observers.call("on_opened", 1)
    observers.add(second)
    observers.call("on_opened", 2)
    observers.observers.append(third)  # behind add()'s back
    observers.call("on_opened", 3)
    assert [len(o.calls) for o in (first, second, third)] == [3, 2, 1]


def test_instance_hooks_and_duck_typed_observers() -> None:
    seen: list[object] = []
    plain = Observer()
    plain.on_opened = seen.append  # type: ignore[method-assign]  # an instance attribute is a hook too
    duck = DuckTyped()
    observers = Observers([plain, duck])  # type: ignore[list-item]
    observers.call("on_opened", "x")
    observers.call("on_closed", "c", "e", "s")
    assert seen == ["x"] and duck.calls == 1
    # A hook the duck lacks is an observer error, as it always was, not a crash.
    observers.call("on_opened", "y")
    assert observers.errors["duck"] == 2


def test_idle_hooks_are_not_called_and_are_read_again_after_on_config() -> None:
    class Switchable(Observer):
        """Busy in on_closed only while `closes` is on (as the event log's access lines)."""

        name = "switchable"

        def __init__(self) -> None:
            self.closed: list[object] = []
            self.configured = 0
            self.set(False)

        def set(self, closes: bool) -> None:
            self.idle_hooks = frozenset() if closes else frozenset({"on_closed"})

        def on_closed(self, *args: object) -> None:  # type: ignore[override]
            assert "on_closed" not in self.idle_hooks, "an idle hook was called"
            self.closed.append(args)

        def on_config(self, settings: object, info: dict[str, object]) -> None:  # type: ignore[override]
            self.configured += 1
            self.set(bool(info["closes"]))

    observer, other = Switchable(), Counting()
    observers = Observers([observer, other])
    observers.call("on_closed", 1)
    assert observer.closed == []
    observers.call("on_config", None, {"closes": True})  # a reload: the idle hooks change
    observers.call("on_closed", 2)
    observers.call("on_config", None, {"closes": False})
    observers.call("on_closed", 3)
    assert observer.closed == [(2,)] and observer.configured == 2
    assert observers.errors == {}
