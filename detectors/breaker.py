"""A Resilience4j-shaped circuit breaker, driven by an explicit transition table.

* CLOSED: outcomes are counted over a sliding ``window``; once there are at
  least ``min_calls`` and ``failures / calls >= failure_ratio`` it trips OPEN.
* OPEN: everything is refused for the open wait; the wait doubles with each
  consecutive trip up to ``open_wait_max`` (a backend that keeps failing is
  probed less and less often), then it goes HALF_OPEN.
* HALF_OPEN: ``half_open_probes`` attempts are let through. All succeed ⇒
  CLOSED; one fails (or a probe has no outcome within ``probe_timeout``) ⇒
  OPEN again, with a longer wait. A client whose probe failed gets no probe
  again until the breaker closes, unless no other client has taken one within
  ``open_wait`` of the half-open: the first in at every half-open, one looping
  client would otherwise fail every probe and keep the breaker open for
  everyone; barred for good, a fleet behind one NAT (one party) kept it
  half-open for ever once its probe had failed. The caller names clients
  (``who``: their ``party``); the breaker keeps up to ``MAX_FAILED_PROBERS``
  of them.
* ``second_chance`` (the auth breaker): in a half-open phase a client's first
  failed probe is not yet a failure; its probe goes back, and its next
  attempt may probe again. A credential that went stale while the breaker
  was open (a deploy that invalidated every token) fails once and is renewed
  on that answer: judged at once, each half-open re-opened on one such
  client, whose peers, refused meanwhile, never learned theirs had gone
  stale, and a healthy fleet stayed locked out for minutes. A second failure
  of the same client (its renewed credential refused: the auth service is
  down) re-opens as before.
* CLOSED with ``pending``: calls under way that have not failed yet count
  with the calls (the auth breaker's connections not yet old enough to be
  successes), so that the failures that come first do not make the ratio.
* Any state ⇒ CLOSED by an operator's reset.

Every change of state goes through ``_move``, which checks the table, so an
illegal transition is a bug that raises instead of a state nobody designed.
Time is an argument everywhere; the breaker never reads a clock.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import replace
from enum import StrEnum

from .actions import BreakerTransition
from .settings import CircuitBreakerSettings
from .units import escalated
from .views import BreakerView
from .window import SlidingCounter


def party(addr: str, key: str) -> str:
    """Who a route-wide breaker counts as one client: its address, not its key.

    A key from a source the client writes (an unsigned token's ``sub``, a header,
    a cookie) is free to mint anew at every attempt: counted by key, one client
    at one address opened the auth breaker for everyone, and took every probe
    with fresh keys to keep it open. An IPv6 host holds a whole /64, so that
    counts as one address. The key itself when there is no address."""
    if not addr:
        return key
    if ":" not in addr:
        return addr  # IPv4: the common case, no parsing
    try:
        ip = ipaddress.IPv6Address(addr)
    except ValueError:
        return addr
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False).network_address)


class TripCause(StrEnum):
    """What opened a breaker (``BreakerTransition.cause``)."""

    FAILURE_RATIO = "failure_ratio"  # closed: the window's failures reached the ratio
    PROBE_FAILED = "probe_failed"  # half-open: a probe failed
    PROBE_TIMEOUT = "probe_timeout"  # half-open: probes had no outcome in time


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN

# (from, to) → why. Reset is separate: it may leave any state for CLOSED.
TRANSITIONS: dict[tuple[BreakerState, BreakerState], str] = {
    (CLOSED, OPEN): "failure ratio reached",
    (OPEN, HALF_OPEN): "open wait elapsed",
    (HALF_OPEN, CLOSED): "probes succeeded",
    (HALF_OPEN, OPEN): "probe failed",
}


class IllegalTransition(Exception):
    """A transition that is not in ``TRANSITIONS`` (and is not a reset)."""

    def __init__(self, name: str, from_state: BreakerState, to_state: BreakerState, route: str = "") -> None:
        of = f" of route {route!r}" if route else ""
        super().__init__(f"breaker {name!r}{of}: no transition {from_state} → {to_state}")
        self.from_state = from_state
        self.to_state = to_state


# What ``permit`` answers.
ALLOW, PROBE, REFUSE = 0, 1, 2
_CALLS, _FAILURES = 0, 1
MAX_FAILED_PROBERS = 1024  # clients kept out of the probes; beyond it, no more are
_NO_TRANSITIONS: tuple[BreakerTransition, ...] = ()


class CircuitBreaker:
    __slots__ = (
        "name",
        "route",
        "settings",
        "state",
        "_window",
        "open_until",
        "open_wait",
        "trips",
        "closed_at",
        "probes_permitted",
        "probes_succeeded",
        "probes_in_flight",
        "probe_deadline",
        "half_open_at",
        "failed_probers",
        "second_chance",
        "second_chances",
        "transitions_total",
        "last_trip",
    )

    def __init__(
        self, name: str, settings: CircuitBreakerSettings, route: str = "", *, second_chance: bool = False
    ) -> None:
        self.name = name
        self.route = route  # the route whose outcomes it counts and whose attempts it judges
        self.settings = settings
        self.state = CLOSED
        self._window = SlidingCounter(settings.window, fields=2)
        self.open_until = 0.0
        self.open_wait = settings.open_wait
        self.trips = 0  # consecutive trips, for the escalating wait
        self.closed_at = -math.inf
        self.probes_permitted = 0
        self.probes_succeeded = 0
        self.probes_in_flight = 0
        self.probe_deadline = math.inf
        self.half_open_at = -math.inf
        self.failed_probers: set[str] = set()  # since the breaker last closed
        self.second_chance = second_chance
        self.second_chances: set[str] = set()  # clients forgiven a failed probe, this half-open
        self.transitions_total: dict[str, int] = {s.value: 0 for s in BreakerState}
        # The last time it opened, with what made it: the window is cleared when
        # it opens, and an operator looking at an open breaker asks why.
        self.last_trip: BreakerTransition | None = None

    # --- configuration -------------------------------------------------------

    def configure(self, settings: CircuitBreakerSettings, t: float) -> tuple[BreakerTransition, ...]:
        """Adopt new settings, keeping the state (a disabled breaker is reset closed)."""
        if settings.window != self.settings.window:
            self._window = SlidingCounter(settings.window, fields=2)
        self.settings = settings
        if not settings.enabled and self.state is not CLOSED:
            transition = self.reset(t)
            return (transition,) if transition else _NO_TRANSITIONS
        return _NO_TRANSITIONS

    # --- the table -----------------------------------------------------------

    def _move(self, to: BreakerState, t: float) -> BreakerTransition:
        if (self.state, to) not in TRANSITIONS:
            raise IllegalTransition(self.name, self.state, to, self.route)
        return self._enter(to, t)

    def _enter(self, to: BreakerState, t: float) -> BreakerTransition:
        transition = BreakerTransition(self.name, t, self.state.value, to.value, route=self.route)
        self.state = to
        self.transitions_total[to.value] += 1
        if to is OPEN:
            s = self.settings
            self.open_wait = escalated(s.open_wait, 2.0, self.trips - 1, s.open_wait_max)
            self.open_until = t + self.open_wait
            self._window.clear()
        elif to is HALF_OPEN:
            self.probes_permitted = self.probes_succeeded = self.probes_in_flight = 0
            self.probe_deadline = math.inf
            self.half_open_at = t
            self.second_chances.clear()
        else:
            self.closed_at = t
            self._window.clear()
            self.failed_probers.clear()
        return transition

    def transition(self, to: BreakerState, t: float) -> BreakerTransition:
        """Force one table transition (tests and tools); raises IllegalTransition."""
        if to is OPEN:
            self.trips += 1
        return self._move(to, t)

    def reset(self, t: float) -> BreakerTransition | None:
        """Operator reset: any state → CLOSED, escalation forgotten. None if already closed."""
        self.trips = 0
        self.open_wait = self.settings.open_wait
        if self.state is CLOSED:
            self._window.clear()
            return None
        return self._enter(CLOSED, t)

    # --- time ----------------------------------------------------------------

    def advance(self, t: float) -> tuple[BreakerTransition, ...]:
        """Apply what time alone changes: open → half-open, a probe timing out."""
        if self.state is CLOSED:
            return _NO_TRANSITIONS
        if self.state is OPEN:
            if t < self.open_until:
                return _NO_TRANSITIONS
            return (self._move(HALF_OPEN, t),)
        if self.probes_in_flight and t >= self.probe_deadline:
            return (self._trip(t, TripCause.PROBE_TIMEOUT, self.probes_permitted, self.probes_in_flight),)
        return _NO_TRANSITIONS

    @property
    def next_wake(self) -> float | None:
        if self.state is OPEN:
            return self.open_until
        if self.state is HALF_OPEN and self.probes_in_flight:
            return self.probe_deadline
        return None

    # --- calls ---------------------------------------------------------------

    def permit(self, t: float, who: str | None = None) -> int:
        """ALLOW, PROBE or REFUSE for an attempt now by client ``who`` (call
        ``advance`` first)."""
        if self.state is CLOSED:
            return ALLOW
        if (
            self.state is HALF_OPEN
            and self.probes_permitted < self.settings.half_open_probes
            and not (who in self.failed_probers and t < self.no_probe_until)
        ):
            return PROBE
        return REFUSE

    @property
    def no_probe_until(self) -> float:
        """Until when a client whose probe failed gets no probe: ``open_wait``
        into the half-open phase (the coming one, while open)."""
        start = self.half_open_at if self.state is HALF_OPEN else self.open_until
        return start + self.settings.open_wait

    def take_probe(self, t: float) -> None:
        """The attempt ``permit`` answered PROBE for was admitted."""
        self.probes_permitted += 1
        self.probes_in_flight += 1
        self.probe_deadline = t + self.settings.probe_timeout

    def release_probe(self) -> None:
        """A probe ended without telling success from failure: let another one through."""
        if self.state is HALF_OPEN and self.probes_in_flight:
            self.probes_in_flight -= 1
            self.probes_permitted -= 1

    def retry_after(self, t: float) -> float:
        if self.state is OPEN:
            return max(self.open_until - t, 0.0)
        if self.state is HALF_OPEN:
            # probes are out: come back about when their outcome is due
            return max(min(self.probe_deadline - t, self.settings.open_wait), 0.0)
        return 0.0

    def record(
        self, t: float, success: bool, probe: bool = False, *, who: str | None = None, pending: int = 0
    ) -> tuple[BreakerTransition, ...]:
        """Count one outcome, of client ``who``. In HALF_OPEN only probes count;
        in OPEN nothing does. ``pending``: calls under way that have not failed
        (CLOSED: counted with the calls for the ratio)."""
        state = self.state
        if state is CLOSED:
            if not self.settings.enabled:
                return _NO_TRANSITIONS
            window = self._window
            window.add(t, _CALLS)
            if success:
                return _NO_TRANSITIONS
            window.add(t, _FAILURES)
            calls = window.total(t, _CALLS) + pending
            failures = window.total(t, _FAILURES)
            if calls >= self.settings.min_calls and failures / calls >= self.settings.failure_ratio:
                return (self._trip(t, TripCause.FAILURE_RATIO, calls, failures),)
            return _NO_TRANSITIONS
        if state is HALF_OPEN and probe and self.probes_in_flight:
            self.probes_in_flight -= 1
            if not success:
                if (
                    self.second_chance
                    and who is not None
                    and who not in self.second_chances
                    and len(self.second_chances) < MAX_FAILED_PROBERS
                ):
                    self.second_chances.add(who)
                    self.probes_permitted -= 1  # its probe back: for its next attempt, or another's
                    return _NO_TRANSITIONS
                if who is not None and len(self.failed_probers) < MAX_FAILED_PROBERS:
                    self.failed_probers.add(who)
                return (self._trip(t, TripCause.PROBE_FAILED, self.probes_permitted, 1),)
            self.probes_succeeded += 1
            if self.probes_succeeded >= self.settings.half_open_probes:
                # trips is kept: tripping again within a window of closing escalates on.
                return (self._move(CLOSED, t),)
        return _NO_TRANSITIONS

    def _trip(self, t: float, cause: TripCause, calls: int, failures: int) -> BreakerTransition:
        # Re-opening soon after closing is the same trouble continuing: escalate.
        if self.state is HALF_OPEN or t - self.closed_at < self.settings.window:
            self.trips += 1
        else:
            self.trips = 1
        trip = replace(self._move(OPEN, t), cause=cause.value, calls=calls, failures=failures)
        self.last_trip = trip
        return trip

    # --- views ---------------------------------------------------------------

    def counts(self, t: float) -> tuple[int, int]:
        return self._window.total(t, _CALLS), self._window.total(t, _FAILURES)

    def view(self, t: float) -> BreakerView:
        calls, failures = self.counts(t)
        return BreakerView(
            name=self.name,
            route=self.route,
            enabled=self.settings.enabled,
            state=self.state.value,
            calls=calls,
            failures=failures,
            failure_ratio=failures / calls if calls else 0.0,
            retry_after=self.retry_after(t) if self.state is OPEN else 0.0,
            open_wait=self.open_wait,
            trips=self.trips,
            probes_permitted=self.probes_permitted,
            probes_succeeded=self.probes_succeeded,
            transitions_total=dict(self.transitions_total),
            last_trip=self.last_trip,
            t=t,
        )
