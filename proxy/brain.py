"""The brain: the data plane's events → engine → observers, the enforcement
table kept in step, engine wake-ups on the loop, engine actions applied to live
connections.

This is where the pure engine meets the event loop. The data plane identified
the client and admitted or refused the attempt from the enforcement table
without waiting; the engine judges each attempt after the fact (`judge`), and
`TableSync` writes what it decided back into the table (docs/architecture.md,
"The boundary").
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..detectors import events as ev
from ..detectors.actions import CloseConnection
from ..detectors.decisions import EMPTY, Outcome, Reject, RejectReason
from ..detectors.enforcement import NONE as NO_ENFORCEMENT
from ..detectors.enforcement import BreakerEnforcement, KeyEnforcement
from ..detectors.engine import Engine
from .dataplane.boundary import Connection, Gate, LogLimiter, PlaneTrace, Refusal, RelayStats
from .observe.observers import Lever, Observers
from .state.local import LocalState, StateStore

if TYPE_CHECKING:
    from ..detectors.policy import Policy
    from ..detectors.settings import PolicySettings
    from .app.settings import Settings

log = logging.getLogger("loopwatch")
# At most one traceback per kind of event this often when handling events fails.
FAILURE_LOG_INTERVAL = 10.0

REASON_TEXT = {
    "cooldown": "cooldown",
    "min_interval": "too soon after the last attempt",
    "max_concurrent": "too many connections",
    "deny": "denied",
    "circuit_open": "upstream unavailable",
}


# (reason, whole seconds, reject_with, close code) -> the first refusal made with
# those words: a looping client is refused with the same words tens of times a
# second, and a denied one (or one at max_concurrent) with the very same refusal,
# its retry time the settings'. Bounded; starts over when full.
_MADE: dict[tuple[str, int, str, int], Refusal] = {}
_MADE_SIZE = 1024


def engine_routes(settings: Settings) -> dict[str, str]:
    """The routes the engine keeps breakers for, each with its upstream (a
    reload that re-points a route closes its breakers: Engine._set_routes)."""
    return {r.path_prefix: r.upstream for r in settings.effective_routes()}


def refusal_for(reject: Reject, reject_with: str, hold: float = 0.0, close_code: int = 1013) -> Refusal:
    """How a rejection reaches the client. A browser reports every refused
    handshake as 1006, so close-1013 (accept, then close with a reason it can
    read) is the default; http-429 is cheapest for other clients. An open
    breaker answers 503: the service, not the client, is the problem.
    `hold` is the policy's hold for this reason (0: none); never past the retry time.
    `close_code`: 1013, or the application code policy.close_code sets instead."""
    retry = max(1, math.ceil(reject.retry_after))
    hold = min(hold, reject.retry_after)
    key = (reject.reason, retry, reject_with, close_code)
    made = _MADE.get(key)
    if made is not None:
        if made.retry_after == reject.retry_after and made.hold == hold:
            return made  # a frozen record: the same refusal again
        return Refusal(reject.reason, reject.retry_after, made.how, made.status, made.message, hold)
    text = f"loopwatch: {REASON_TEXT.get(reject.reason, reject.reason)}, retry in {retry}s"
    if reject_with == "http-429":
        how, status = "http", 503 if reject.reason == "circuit_open" else 429
    else:
        how, status = "close-1013", close_code
    refusal = Refusal(reject.reason, reject.retry_after, how, status, text, hold)
    if len(_MADE) >= _MADE_SIZE:
        _MADE.clear()
    _MADE[key] = refusal
    return refusal


class EngineGate(Gate):
    def __init__(
        self,
        engine: Engine,
        observers: Observers,
        *,
        reject_with: str = "close-1013",
    ):
        self.engine = engine
        self.observers = observers
        self.reject_with = reject_with
        self.close_code = engine.policy.close_code
        self.holds: dict[str, float] = {}  # reason -> hold seconds (policy.hold, hold_reasons)
        self.max_held = 0
        self.max_held_per_key = 0
        # The data plane's connections, for engine actions (close-oldest); set by the runtime.
        self.plane: Closer | None = None
        # The native data plane's enforcement table, kept in step (None: the Python
        # data plane asks `attempt` at every upgrade instead).
        self.table: TableSync | None = None
        # Shares state with other replicas (state.backend: redis); LocalState
        # when nothing is shared. Telemetry reads its `up` and `errors`.
        self.state_store: StateStore = LocalState()
        self._wake: asyncio.TimerHandle | None = None
        self._wake_at: float | None = None
        # Hands the engine the data plane's events still queued (set by the
        # plane): a wake-up at `now` comes after every event that happened
        # before it, as the engine's clock (and a replay) has it.
        self.catch_up: Callable[[], None] | None = None
        self.set_holds(engine.policy)

    # --- the Gate interface ---------------------------------------------------

    def judge(
        self, conn: Connection, event: ev.Attempt, refused: ev.Rejected | None = None, *, show_refusal: bool = True
    ) -> Refusal | None:
        """An identified attempt: the engine's decision, shown to the observers and
        acted on; how it is refused (None: admitted). `refused`: the native data
        plane already refused it, as this Rejected says (its reason: Engine.admit's).
        Without `show_refusal` a refusal is not shown yet: the data plane admitted
        the attempt, and whether its client meets the refusal or the backend's
        own answer is known later (NativeDriver, `show_rejected`)."""
        reason = None if refused is None else refused.reason
        decision = self.engine.admit(event, reason)  # type: ignore[arg-type]  # the table's reasons are RejectReason values
        refusal = None
        if isinstance(decision, Reject):  # how it is refused, on the record the observers see
            refusal = conn.refusal = refusal_for(
                decision, self.reject_with, self.holds.get(decision.reason, 0.0), self.close_code
            )
        self.observers.call("on_attempt", conn, event, decision)
        if refusal is not None and show_refusal:
            # The data plane's Rejected when it says what the engine does (the
            # same attempt, so the same key and route); else one is made.
            rejected = refused
            if rejected is None or rejected.reason != refusal.reason or rejected.t != event.t:
                rejected = ev.Rejected(event.key, event.route, event.t, refusal.reason)
            self.observers.call("on_rejected", conn, rejected)
        if self.table is not None:
            self.table.touched.add(event.key)
        self._apply(decision.outcome, event.t, conn)
        return refusal

    def show_rejected(self, conn: Connection, event: ev.Rejected) -> None:
        """A refusal judged earlier and held back (`judge(show_refusal=False)`):
        it reached the client, so the observers see it now."""
        self.observers.call("on_rejected", conn, event)

    def show_unrefused(
        self, conn: Connection, opened: ev.Opened, closed: ev.Closed, stats: RelayStats
    ) -> None:  # fmt: skip
        """A refusal judged too late: the backend's answer reached the client
        first (its 101 and its close), so the observers see that connection, as it
        went; the engine keeps its judgement (it saw the attempt refused)."""
        conn.opened_at = opened.t
        self.observers.call("on_opened", conn, opened)
        self.observers.call("on_closed", conn, closed, stats)

    def show_failed_handshake(self, conn: Connection, event: ev.HandshakeFailed) -> None:
        """A refusal judged too late whose upstream handshake failed first: the
        client got that answer (the upstream's status, or loopwatch's 502/504)."""
        self.observers.call("on_handshake_failed", conn, event)

    def table_refused(self, conn: Connection, t: float, reason: RejectReason) -> None:
        """The data plane's table refused an attempt the engine had not judged
        refused: it admitted it (a split refusal, or the listener's recheck
        after the upstream connect found an entry written since), or never saw
        it (its Attempt lost to a full queue). A refusal all the same, shown
        to the observers as one (loopwatch_refusals_total, the access log, the
        span's end); the engine keeps its judgement."""
        self.show_rejected(conn, ev.Rejected(conn.key, conn.route, t, reason))

    # `event`: the data plane's own record of the step, when the caller has one
    # (NativeDriver: the queue's, with these very values); else it is made here.

    def handshake_failed(
        self, conn: Connection, t: float, status: int | None, error: str | None,
        event: ev.HandshakeFailed | None = None,
    ) -> None:  # fmt: skip
        if event is None:
            event = ev.HandshakeFailed(conn.key, conn.route, t, status, error)
        self.observers.call("on_handshake_failed", conn, event)
        if self.table is not None:
            self.table.touched.add(conn.key)
        self._apply(self.engine.record(event), t, conn)

    def held_answered(self, conn: Connection, t: float, event: ev.Answered | None = None) -> None:
        # The engine judges retry intervals from the end of the previous attempt:
        # a held refusal ends when it is answered, or the hold would look like a
        # client's backoff and break the auth_failure_loop streaks.
        if event is None:
            event = ev.Answered(conn.key, conn.route, t)
        self.observers.call("on_answered", conn, event)
        self._apply(self.engine.answered(event), t, conn)

    def opened(self, conn: Connection, t: float, event: ev.Opened | None = None) -> None:
        conn.opened_at = t
        if event is None:
            event = ev.Opened(conn.key, conn.route, t, conn.conn_id)
        self.observers.call("on_opened", conn, event)
        if self.table is not None:
            self.table.touched.add(conn.key)
        self._apply(self.engine.record(event), t, conn)

    def closed(
        self, conn: Connection, t: float, code: int, reason: str, initiator: str, stats: RelayStats,
        event: ev.Closed | None = None,
    ) -> None:  # fmt: skip
        # The queue's Closed carries the listener's own duration (from the
        # moment it forwarded the 101): right even when the Opened was lost.
        if event is None:
            event = ev.Closed(conn.key, conn.route, t, conn.conn_id, code, reason, initiator, t - conn.opened_at)  # type: ignore[arg-type]  # Gate.closed takes initiator as str; the relay passes only ev.Initiator values
        self.observers.call("on_closed", conn, event, stats)
        if self.table is not None:
            self.table.touched.add(conn.key)
        self._apply(self.engine.record(event), t, conn)

    # --- engine output --------------------------------------------------------

    def _apply(self, outcome: Outcome, t: float, conn: Connection | None = None) -> None:
        if outcome is not EMPTY and outcome:  # EMPTY, the common answer, without a call to __bool__
            if self.table is not None:
                self.table.note(outcome)
            for action in outcome.actions:
                if isinstance(action, CloseConnection) and not self.close_connection(
                    action.conn_id, action.code, action.reason
                ):
                    self.state_store.forward_close(action)  # close-oldest may pick another replica's
            self.observers.call("on_outcome", outcome, t, conn)
        self._schedule()

    def close_connection(self, conn_id: object, code: int, reason: str, key: str | None = None) -> bool:
        """Close one of this replica's connections (close-oldest, or another
        replica's request, which names the client: `key`); False when it is not
        here, already gone, or another client's (ids are small counters: a
        request for a client's oldest must not close someone else's)."""
        if self.plane is None or not isinstance(conn_id, int):  # ids here are ints
            return False
        if key is not None:
            conn = self.plane.connection(conn_id)
            if conn is None or conn.key != key:
                return False
        return self.plane.close(conn_id, code, reason)

    def apply(self, outcome: Outcome, t: float) -> None:
        """Act on an engine outcome that no step of this gate produced (another
        replica's events, applied by the state store), like any other."""
        self._apply(outcome, t)

    def _schedule(self) -> None:
        """Keep one timer armed for the engine's next wake-up time."""
        wake_at = self.engine.next_wake
        if wake_at is None or (self._wake_at is not None and self._wake_at <= wake_at):
            return
        if self._wake is not None:
            self._wake.cancel()
        self._wake_at = wake_at
        delay = max(0.0, wake_at - time.monotonic())
        self._wake = asyncio.get_running_loop().call_later(delay, self._on_wake)

    def _on_wake(self) -> None:
        self._wake = None
        self._wake_at = None
        now = time.monotonic()
        if self.catch_up is not None:
            # Events stamped before `now` wait in the queue for the next look:
            # judged after a wake-up at `now`, an attempt would meet a cooldown
            # ended later than it came (and a replay of the recording would not).
            self.catch_up()
        self._apply(self.engine.wake(now), now)
        if self.table is not None:
            self.table.flush(now)

    def health_result(self, t: float, ok: bool, routes: tuple[str, ...]) -> None:
        """An active health check's result (proxy/admin/upstream_health.py) for
        the upstream breakers of `routes`: the route its path takes and the
        others to the same upstream URL."""
        for route in routes:
            self._apply(self.engine.record_health(t, ok, route), t)
            self.observers.call("on_lever", Lever("health", t, route=route, healthy=ok))  # the recorder: replay applies it
        if self.table is not None:
            self.table.flush(time.monotonic())

    def kick(self, keys: Iterable[str] = ()) -> None:
        """Re-arm the wake-up timer after an operator (or another replica) changed
        the engine's state; with an enforcement table, write what changed for
        `keys` (the clients the change concerns) and the breakers. Only those:
        asking about every cooldown here cost a replica O(cooldowns) per batch
        another replica published, and its loop stalled for seconds in the very
        storm it exists for (9 s at 5 000 clients cooled)."""
        self._schedule()
        if self.table is not None:
            self.table.touched.update(keys)
            self.table.flush(time.monotonic())

    def reconcile(self) -> None:
        """Bring every cooldown of the table in step with the engine (after a
        replica adopted the shared store's cooldowns on (re)connecting)."""
        self._schedule()
        if self.table is not None:
            self.table.reconcile(time.monotonic())

    def reconfigure(self, settings: Settings, policy: Policy | None = None) -> int:
        """Apply reloaded settings; per-client state and breaker states are kept.
        `policy`: the settings' policy already compiled (off the loop). Returns
        how many clients a lower `detection.max_clients` evicted."""
        now = time.monotonic()
        routes = engine_routes(settings)
        evicted = self.engine.reconfigure(
            settings.detection, settings.policy, settings.breakers, now, policy, routes=routes
        )
        self.reject_with = settings.policy.reject_with
        self.close_code = settings.policy.close_code
        self.set_holds(settings.policy)
        if self.table is not None:
            self.table.configure(settings.policy, self.holds, now)
        self._schedule()
        return evicted

    def set_holds(self, policy: PolicySettings) -> None:
        """The hold per refusal reason and the bounds the listener holds within."""
        self.holds = dict.fromkeys(policy.hold_reasons, policy.hold) if policy.hold > 0 else {}
        self.max_held = policy.max_held
        self.max_held_per_key = policy.max_held_per_key

    def close(self) -> None:
        if self._wake is not None:
            self._wake.cancel()


class Closer(Protocol):
    """What engine actions need of a data plane: close one of its connections
    (after checking whose it is)."""

    def close(self, conn_id: int, code: int, reason: str) -> bool: ...

    def connection(self, conn_id: object) -> Connection | None: ...


class Releaser(Protocol):
    """What the table's lifts need of a data plane: answer a client's held
    refusals now ("retry in 1s"), as an operator's release does."""

    def release_held(self, key: str) -> int: ...


class Table(Protocol):
    """The write side of the native data plane's enforcement table
    (proxy/dataplane/py/src/table.rs); durations in seconds from now."""

    def set_cooldown(
        self, key: str, seconds: float, reason: str = ..., retry_after: float | None = ..., hold: float | None = ...
    ) -> None: ...

    def set_min_interval(self, key: str, seconds: float) -> None: ...

    def set_at_capacity(self, key: str, at_capacity: bool) -> None: ...

    def clear(self, key: str) -> bool: ...

    def set_allow(self, entries: list[str]) -> None: ...

    def set_deny(self, entries: list[str]) -> None: ...

    def set_breaker(
        self,
        route: str,
        name: str,
        state: str,
        seconds: float = ...,
        probes: int = ...,
        enforced: bool = ...,
        no_probe: list[str] = ...,
        no_probe_seconds: float | None = ...,
    ) -> None: ...

    def remove_breaker(self, route: str, name: str) -> bool: ...

    def set_judged(self, conn_id: int) -> None: ...

    def begin(self) -> None:
        """The writes until `commit` are published together."""

    def commit(self) -> None: ...

    def set_defaults(
        self,
        deny_retry_after: float = ...,
        max_concurrent_retry_after: float = ...,
        holds: Mapping[str, float] | None = ...,
    ) -> None: ...


# Entries of the table written per key are kept here only while they restrict:
# at most this many are pruned of expired ones per flush.
_PRUNE_EVERY = 256


class TableSync:
    """Keeps the native data plane's enforcement table in step with the engine.

    The engine is the judge; the table is how the data plane admits without
    asking it. After each batch of events, wake-up, health result, operator lever
    or other replica's batch, the keys touched since the last write are asked
    again (`Engine.enforcement`) and what changed is written; the breakers too
    (`Engine.breaker_enforcement`). `written` mirrors what the table holds, so
    an unchanged key costs a comparison, not a write.

    `judged`: the highest connection id whose events the brain has handled
    (NativeDriver sets it after each batch). Before the first write that
    follows a rise of it, the table is told (`set_judged`): the listener's
    recheck before the upstream write refuses an attempt only for what was
    written before the brain judged it (a late refusal), never for what the
    attempt's own admission started (its min-interval, a cooldown it raised).

    `plane`: the data plane whose held refusals a lift answers (`flush`); None
    when there is none to answer (tests of the writes alone)."""

    def __init__(self, engine: Engine, table: Table, plane: Releaser | None = None):
        self.engine = engine
        self.table = table
        self.plane = plane
        self.touched: set[str] = set()
        self.written: dict[str, KeyEnforcement] = {}  # restricted keys only
        # (route, name) → the breaker as the table holds it
        self.breakers: dict[tuple[str, str], BreakerEnforcement] = {}
        # (route, name) of every breaker entry the table holds (kept through
        # configure, which forgets `breakers` to write them all again): an
        # entry of a route the engine no longer has is removed.
        self._in_table: set[tuple[str, str]] = set()
        self.writes = 0  # table writes so far (tests, docs/architecture.md)
        self.judged = 0
        self._marked = 0  # the judged mark the table holds
        self._policy: PolicySettings | None = None  # as the last configure had it
        self._flushes = 0

    def _mark(self) -> None:
        """Before a write: the table learns how far the brain has judged."""
        if self.judged > self._marked:
            self.table.set_judged(self.judged)
            self._marked = self.judged

    def configure(self, policy: PolicySettings, holds: dict[str, float], now: float) -> None:
        """Policy lists, retry times and holds; at start and on every reload, then
        the breakers again. `holds`: the hold per refusal reason (EngineGate.holds,
        `policy.hold` for each of `policy.hold_reasons`): one table write, which the
        listener reads at each refusal, capping it at the refusal's retry time as
        `refusal_for` does, so entries already written need no rewrite.

        A new policy is asked about every key it may restrict differently (the
        engine has the new one already), not only those with a cooldown: else
        a client already at a lowered `max_concurrent` got one attempt through
        to the backend (a late refusal), and one at a raised limit had its
        next attempt refused once more. Those are the keys the table restricts
        now, the clients with an open connection (`max_concurrent` with
        reject-new) and those admitted within the new `min_interval`: as many
        as a reload concerns, not every client tracked (this runs on the loop)."""
        self.table.set_allow(list(policy.allow))
        self.table.set_deny(list(policy.deny))
        self.table.set_defaults(
            deny_retry_after=policy.cooldown.max,
            max_concurrent_retry_after=policy.cooldown.base,
            holds={reason: hold for reason, hold in holds.items() if hold > 0},
        )
        self.breakers.clear()
        if policy != self._policy:
            self._policy = policy
            self.touched.update(self.written)
            if policy.max_concurrent is not None and policy.on_max_concurrent == "reject-new":
                self.touched.update(self.engine.connected_keys())
            if policy.min_interval is not None:
                self.touched.update(self.engine.admitted_since(now - policy.min_interval))
        self.reconcile(now)

    def note(self, outcome: Outcome) -> None:
        """The keys an engine outcome concerns (a cooldown started or ended, …)."""
        for action in outcome.actions:
            key = getattr(action, "key", None)
            if key is not None:
                self.touched.add(key)

    def reconcile(self, now: float) -> None:
        """Also ask about every key with a cooldown, in the table or in the engine:
        operators and other replicas change cooldowns without an event here."""
        self.touched.update(k for k, e in self.written.items() if e.cooldown is not None)
        self.touched.update(c.key for c in self.engine.cooldowns(now))
        self.flush(now)

    def flush(self, now: float) -> None:
        engine = self.engine
        freed: list[str] = []
        # One publish for the flush's writes: one copy of the table, not one per
        # key (a replica adopting 20 000 shared cooldowns copied it 20 000 times).
        self.table.begin()
        try:
            for key in self.touched:
                if self._write(key, engine.enforcement(key, now), now):
                    freed.append(key)
            self.touched.clear()
            wanted = engine.breaker_enforcement(now)
            for breaker in wanted:
                self._write_breaker(breaker, now)
            if self._in_table:  # an entry of a route the engine forgot (a reload dropped it)
                for route, name in self._in_table.difference([(b.route, b.name) for b in wanted]):
                    self._mark()
                    self.table.remove_breaker(route, name)
                    self.writes += 1
                    self._in_table.discard((route, name))
                    self.breakers.pop((route, name), None)
        finally:
            self.table.commit()
        # A client let go early (a reload's allow list, observe mode or rollout,
        # another replica's release) gets its held attempts answered now, as an
        # operator's release answers them: held to the end of their hold, they
        # were told the retry time of the cooldown lifted meanwhile, and a
        # client that follows the contract stayed away for it (minutes). After
        # the commit: the attempt it makes in a second finds the key cleared.
        # A cooldown that runs out needs nothing: no hold outlasts it.
        if self.plane is not None:
            for key in freed:
                self.plane.release_held(key)
        self._flushes += 1
        if self._flushes % _PRUNE_EVERY == 0:
            self.written = {k: e for k, e in self.written.items() if e.restricts(now)}

    def _write(self, key: str, want: KeyEnforcement, now: float) -> bool:
        """Bring the table's entry for `key` to `want`; True when that let the
        client go early: a cooldown or min-interval deadline that still refused
        is lifted and no other takes its place (its held attempts may go)."""
        had = self.written.get(key, NO_ENFORCEMENT)
        if want is had or want == had:  # mostly NONE, the engine's shared "nothing", on both sides
            return False
        self._mark()
        table = self.table
        # What the table holds that still refuses and must not: an expired entry
        # refuses nothing (the table ignores it until its next prune).
        lifted = (
            had.cooldown is not None and had.cooldown.until > now and want.cooldown != had.cooldown
        ) or (
            had.not_before is not None
            and had.not_before > now
            and (want.not_before is None or want.not_before < had.not_before)
        )
        if lifted:  # a restriction ended early or moved back: start the key over
            table.clear(key)
            self.writes += 1
            had = NO_ENFORCEMENT
        cooldown = want.cooldown
        if cooldown is not None and cooldown != had.cooldown and cooldown.until > now:
            # Held as the table's cooldown hold says (configure), never past its end.
            table.set_cooldown(key, cooldown.until - now, cooldown.rule, None, None)
            self.writes += 1
        if want.not_before is not None and want.not_before != had.not_before and want.not_before > now:
            table.set_min_interval(key, want.not_before - now)
            self.writes += 1
        if want.at_capacity != had.at_capacity:
            table.set_at_capacity(key, want.at_capacity)
            self.writes += 1
        if want.restricts(now):
            self.written[key] = want
        else:
            self.written.pop(key, None)
        # (A new cooldown or deadline in place of the lifted one: its held
        # attempts are refused for that one all the same, and wait.)
        return lifted and not (cooldown is not None and cooldown.until > now) and not (
            want.not_before is not None and want.not_before > now
        )

    def _write_breaker(self, want: BreakerEnforcement, now: float) -> None:
        route, name = want.route, want.name
        had = self.breakers.get((route, name))
        if had == want:
            return
        if want.state == "closed" and (route, name) not in self._in_table:
            # A closed breaker the table never held: its absence is "closed"
            # (every attempt on the route scans the route's entries: a route's
            # entry is written once its breaker first opens).
            self.breakers[route, name] = want
            return
        table = self.table
        if had is not None and had.enforced == want.enforced:
            if want.state == "closed" and had.state == "closed":
                return
            if want.state == "half_open" and had.state in ("open", "half_open"):
                # The table's open breaker goes half-open by itself when its wait is
                # over, taking probes from the budget written with it: writing the
                # transition would hand out a second budget.
                return
        self._mark()
        if want.state == "open":
            if had is not None and had.state == "open":
                table.remove_breaker(route, name)  # a new trip: a fresh probe budget
            wait = max(want.until - now, 0.0)
            barred = max(want.no_probe_until - now, 0.0)
            table.set_breaker(route, name, "open", wait, want.probes, want.enforced, sorted(want.no_probe), barred)
        elif want.state == "half_open":
            no_probe, barred = sorted(want.no_probe), max(want.no_probe_until - now, 0.0)
            table.set_breaker(route, name, "half_open", want.retry_after, want.probes, want.enforced, no_probe, barred)
        else:
            table.set_breaker(route, name, "closed", 0.0, 0, want.enforced)
        self.writes += 1
        self.breakers[route, name] = want
        self._in_table.add((route, name))


class Received(Protocol):
    """One event of the native data plane (proxy/dataplane/native.py, Received)."""

    @property
    def event(self) -> ev.Event: ...

    @property
    def conn_id(self) -> int: ...

    @property
    def traffic(self) -> RelayStats | None: ...

    @property
    def trace(self) -> PlaneTrace | None: ...


@dataclass(slots=True)
class Late:
    """An attempt the table admitted and the engine refused: how it is refused,
    the refusal the observers see once it has reached the client, and its
    Opened (the connection is closed with the refusal's code once it opens,
    unless the backend's close comes first)."""

    refusal: Refusal
    rejected: ev.Rejected
    opened: ev.Opened | None = None


# Refused attempts remembered until their held answer (Answered): a refusal that
# was not held never gets one, so the oldest are forgotten beyond this many.
_REFUSED_KEPT = 4096
_NO_TRAFFIC = RelayStats(0, 0, 0, 0)


class NativeDriver:
    """Feeds the native data plane's events to the gate, in batches, on the event
    loop, and keeps the enforcement table in step after each batch.

    The data plane admitted or refused each attempt by table lookup; the engine
    judges it after the fact (`EngineGate.judge`), told what the table did. They
    disagree only when the table is a batch behind or ahead of the engine:
    * the table admitted an attempt the engine refuses (a cooldown started by
      an event of the batch before it, not written yet): the listener looks
      the table up again before it writes the upgrade request upstream, and
      refuses it there if the table has the refusal by then (a Rejected for
      an attempt in `late`: the refusal caught before the backend); else the
      connection is closed with the refusal's close code and reason once it
      opens. Both are `late_refusals`. Such a refusal is shown to the observers
      once it reached the client: at the recheck's Rejected, or at a Closed of
      loopwatch's making; when the backend's answer came first (its close, or
      its refusal of the upgrade: `late_missed`), they see that instead, as the
      client did (loopwatch_refusals_total counts only refusals a client met);
    * the table refused an attempt the engine would admit (a slot freed by a
      close it had not seen): recorded as refused all the same (Engine.admit's
      `refused`; the engine's `table_refusals`, and `split_refusals` here:
      a Rejected after the batch that judged its Attempt admitted, from the
      lookup or from the recheck).
    Both are loopwatch_enforcement_lag_total (proxy/app/planes.py). Every
    refusal reaches the observers once, as on_rejected
    (loopwatch_refusals_total): at the judgement when the engine refuses
    (`judge`), at the Rejected when only the table did (`table_refused`)."""

    def __init__(self, gate: Gate, plane: Closer):
        self.gate = gate
        self.plane = plane
        self.conns: dict[int, Connection] = {}  # attempts admitted by the table, until they end
        # Refused by the table, until answered, oldest first: most are never answered
        # (not held), so every refusal beyond _REFUSED_KEPT drops the oldest. An
        # OrderedDict does that in O(1); a dict's first entry is found past the
        # holes its earlier deletions left (thousands, ~16 µs a refusal).
        self.refused: OrderedDict[int, Connection] = OrderedDict()
        self.late: dict[int, Late] = {}  # admitted by the table, refused by the engine
        self.late_refusals = 0
        # Of late_refusals, those the backend answered first (its 101 and close,
        # or its refusal of the upgrade): shown as what the client got.
        self.late_missed = 0
        self.rechecked = 0  # of late_refusals, those refused before the upstream (the recheck)
        # The highest connection id seen in an event (ids grow in accept order):
        # a connection above it has not reached the brain yet.
        self.last_conn_id = 0
        self.split_refusals = 0  # a Rejected in the batch after its Attempt's
        self.batches = 0
        # Events whose handling raised (a bug): each is left, the rest of its
        # batch handled; one traceback per kind every FAILURE_LOG_INTERVAL.
        self.failed_events = 0
        self._failure_lines = LogLimiter(FAILURE_LOG_INTERVAL)

    def handle(self, batch: Sequence[Received]) -> None:
        gate = self.gate
        judge = gate.judge if isinstance(gate, EngineGate) else None  # a plain Gate only watches
        refused_only = gate.table_refused if isinstance(gate, EngineGate) else None
        # The batch's refusals by the table; an Attempt judged with its own takes it out.
        rejected = {r.conn_id: r.event for r in batch if isinstance(r.event, ev.Rejected)}
        for r in batch:
            e = r.event
            cid = r.conn_id
            try:
                if cid > self.last_conn_id:
                    self.last_conn_id = cid
                # The kinds in the order they come most often (a churn cycle: Attempt, Opened, Closed).
                if isinstance(e, ev.Attempt):
                    conn = Connection(
                        key=e.key, route=e.route, peer=e.addr, t0=e.t, conn_id=cid, plane_trace=r.trace,
                    )  # fmt: skip
                    refused = rejected.pop(cid, None)
                    # A refusal of an attempt the table admitted is shown once it is
                    # known to have reached the client (`Late`).
                    refusal = judge(conn, e, refused, show_refusal=refused is not None) if judge is not None else None
                    conn.plane_trace = None  # read at the attempt; not kept for the connection's life (as the head)
                    if refused is not None:
                        self._remember_refused(cid, conn)
                    else:
                        self.conns[cid] = conn
                        if refusal is not None:
                            self.late[cid] = Late(refusal, ev.Rejected(e.key, e.route, e.t, refusal.reason))
                elif isinstance(e, ev.Opened):
                    known = self.conns.get(cid)
                    conn = known if known is not None else self._lost(cid, e, keep=True)
                    late = self.late.get(cid)
                    if late is not None:
                        self.late_refusals += 1
                        late.opened = e
                        refusal = late.refusal
                        code = refusal.close_code if refusal.close_code is not None else self.close_code
                        self.plane.close(cid, code, refusal.message)
                        continue
                    gate.opened(conn, e.t, e)
                elif isinstance(e, ev.Closed):
                    known = self.conns.pop(cid, None)
                    conn = known if known is not None else self._lost(cid, e)
                    late = self.late.pop(cid, None)
                    if late is None:
                        gate.closed(conn, e.t, e.code, e.reason, e.initiator, r.traffic or _NO_TRAFFIC, e)
                    elif isinstance(gate, EngineGate):  # refused by the engine: it saw no connection
                        if e.initiator == "proxy":  # the refusal's close reached the client
                            gate.show_rejected(conn, late.rejected)
                        else:  # the backend's close (its 1008) came first: that is what the client got
                            self.late_missed += 1
                            opened = late.opened or ev.Opened(e.key, e.route, e.t - e.duration, cid)
                            gate.show_unrefused(conn, opened, e, r.traffic or _NO_TRAFFIC)
                elif isinstance(e, ev.Rejected):
                    # Judged with its Attempt, which comes just before it in the same
                    # batch, unless the drain took the two apart or the listener's
                    # recheck refused it after its connect.
                    if cid not in rejected:
                        continue  # judged (and shown) with its Attempt
                    admitted = self.conns.pop(cid, None)
                    if admitted is None:
                        # Its Attempt was lost (a full queue): counted all the same.
                        if refused_only is not None:
                            lost = Connection(key=e.key, route=e.route, peer="", t0=e.t, conn_id=cid)
                            refused_only(lost, e.t, e.reason)  # type: ignore[arg-type]  # the table's reasons are RejectReason values
                        continue
                    late = self.late.pop(cid, None)
                    if late is not None:
                        # The recheck: the engine refused it, the table had admitted
                        # it, and now refused it before its request reached the
                        # upstream. It awaits its held answer as refused.
                        self.late_refusals += 1
                        self.rechecked += 1
                        if isinstance(gate, EngineGate):
                            gate.show_rejected(admitted, late.rejected)
                    else:
                        # The engine took it for admitted. Rare (the table's two
                        # sends are adjacent; a recheck refuses only what was written
                        # before the brain judged the attempt): counted, and the
                        # attempt awaits its held answer as refused.
                        self.split_refusals += 1
                        if refused_only is not None:
                            refused_only(admitted, e.t, e.reason)  # type: ignore[arg-type]  # as above
                    self._remember_refused(cid, admitted)
                elif isinstance(e, ev.Answered):
                    held = self.refused.pop(cid, None)
                    if held is not None:
                        gate.held_answered(held, e.t, e)
                elif isinstance(e, ev.HandshakeFailed):
                    known = self.conns.pop(cid, None)
                    conn = known if known is not None else self._lost(cid, e)
                    late = self.late.pop(cid, None)
                    if late is None:
                        gate.handshake_failed(conn, e.t, e.status, e.error, e)
                    elif isinstance(gate, EngineGate):  # the client got the handshake's answer, not the refusal
                        self.late_missed += 1
                        gate.show_failed_handshake(conn, e)
            except Exception:  # a bug with one event must not take the batch's others with it
                self.failed_events += 1
                left_out = self._failure_lines.admit(type(e).__name__, time.monotonic())
                if left_out is not None:
                    log.exception("handling a %s event failed (%d more since the last such line)",
                                  type(e).__name__, left_out)  # fmt: skip
        self.batches += 1
        if isinstance(gate, EngineGate) and gate.table is not None:
            gate.table.judged = self.last_conn_id
            gate.table.flush(time.monotonic())

    @property
    def close_code(self) -> int:
        """The close code of a late refusal answered over HTTP elsewhere (http-429)."""
        gate = self.gate
        return gate.close_code if isinstance(gate, EngineGate) else 1013

    def _remember_refused(self, cid: int, conn: Connection) -> None:
        if len(self.refused) >= _REFUSED_KEPT:
            self.refused.popitem(last=False)
        self.refused[cid] = conn

    def _lost(self, cid: int, e: ev.Opened | ev.HandshakeFailed | ev.Closed, keep: bool = False) -> Connection:
        """A record for an attempt whose Attempt was lost (queue full); `keep`:
        kept until its end (an Opened's)."""
        conn = Connection(key=e.key, route=e.route, peer="", t0=e.t, conn_id=cid)
        if keep:
            self.conns[cid] = conn
        return conn

    def forget_gone(self, live: set[int], before: float, now: float) -> int:
        """After lost events: end the attempts whose end was lost (no live
        WebSocket, and arrived before `before`, older than any handshake can
        be). One the gate saw open is closed for it now, by the proxy (a close
        the engine never judges a client by): else the engine would count it
        open for ever, and `max_concurrent` refuse its client. Returns how many."""
        gone = [cid for cid, conn in self.conns.items() if cid not in live and conn.t0 < before]
        for cid in gone:
            conn = self.conns.pop(cid)
            late = self.late.pop(cid, None)
            if late is not None:
                if isinstance(self.gate, EngineGate):  # its end is unknown: shown as judged
                    self.gate.show_rejected(conn, late.rejected)
            elif conn.opened_at:
                self.gate.closed(conn, now, 1006, "loopwatch: close event lost", "proxy", _NO_TRAFFIC)
        if gone and isinstance(self.gate, EngineGate) and self.gate.table is not None:
            self.gate.table.flush(now)
        return len(gone)
