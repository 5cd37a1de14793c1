"""The facade the proxy calls: events in, decisions and findings out, no I/O.

* ``admit(Attempt)`` decides at once whether an upgrade may go upstream. It
  never starts a cooldown by itself, so the first attempt after a cooldown
  always reaches the backend: one chance to show the client is fixed.
* ``record(HandshakeFailed | Opened | Closed)`` folds an outcome in, feeds the
  breakers of its route, evaluates the rules; a *failed* outcome of an
  admitted attempt that meets an enforceable finding starts a cooldown.
* ``wake(t)`` applies what time alone changes (cooldowns ending, findings
  clearing after the quiet period, breakers half-opening, idle clients
  forgotten). ``next_wake`` says when it is next needed, so the proxy
  schedules one timer instead of polling.

Each route (its ``path_prefix``, the ``route`` of every event) has its own
``upstream`` and ``auth`` breaker, as Envoy and HAProxy keep theirs per
backend: a dead backend behind one route must not refuse the clients of the
others. A route's pair is made at the first event for it (or at the start, for
the routes the proxy names: ``routes``), up to ``MAX_BREAKER_ROUTES``.

Nothing here reads a clock, logs or awaits; the only randomness is jitter
from a ``random.Random(seed)`` owned by the engine, so one event sequence
always yields one sequence of decisions (``loopwatch replay`` relies on it).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import Counter, OrderedDict
from collections.abc import Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from operator import attrgetter, itemgetter
from typing import TypeVar

from . import findings, policy, tracker
from .actions import Action, CloseConnection, CooldownEnded, WouldReject
from .breaker import CLOSED, HALF_OPEN, PROBE, REFUSE, CircuitBreaker, party
from .decisions import ADMITTED, EMPTY, Admit, Outcome, Reject, RejectReason
from .enforcement import NONE, BreakerEnforcement, CooldownEnforcement, KeyEnforcement
from .events import Answered, Attempt, Closed, ConnId, Event, HandshakeFailed, Opened
from .findings import SEVERITY_RANK, Finding, Flag
from .fleet import Fleet
from .inspection import breaker_states, client_view, rank, snapshot
from .offenders import HOT_RATE, HotClients
from .policy import MAX_REPEAT, Policy
from .rules import RULE_NAMES, RULES
from .settings import BreakerSettings, DetectionSettings, Mode, PolicySettings, RuleSettings
from .shared import OpenConnection, SharedCooldown, owner_of, remote_conn_id
from .state import INF, NEVER, Addresses, ClientState, ClientStore, MemoryStore
from .units import MAX_DURATION
from .views import BreakerView, ClientView, EngineSnapshot

# Which rules a call may enforce (start a cooldown for).
_ENFORCE_NONE, _ENFORCE_ALL, _ENFORCE_TIMED = 0, 1, 2
# Idle clients are swept in batches, not one timer each, and a batch is bounded
# so one wake never holds the proxy's event loop for long (~6 ms).
_SWEEP_FRACTION = 0.05
_SWEEP_BATCH = 10_000
# The parties (addresses) remembered as having fed the auth breaker within its
# window; beyond it, the ones out of the window are forgotten (all of them, in
# the flood of that many addresses within one window).
MAX_AUTH_FED = 65_536
# Routes given breakers at their first event, beyond the configured ones (which
# always get theirs). The proxy's own events carry a configured route, but
# another replica's (state.backend: redis) carry whatever string is in Redis:
# one with write access could invent routes without end. Beyond the bound an
# attempt on a new route is judged by no breaker and its outcomes feed none.
MAX_BREAKER_ROUTES = 256
BREAKER_NAMES = ("upstream", "auth")  # each route's, in the order admit judges them


def _always(state: ClientState) -> bool:
    return True  # a rule with no `needs`: always checked


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs twice as much
class Credit:
    """An open connection's auth success, due once it has lived ``healthy_after``."""

    due: float
    key: str
    route: RouteBreakers | None  # whose auth breaker it feeds (None: a route beyond the bound)


class RouteBreakers:
    """One route's breakers: ``upstream`` and ``auth``, with the same settings
    as every other route's, and the clients with a connection of the route
    open (counted as not failing by its auth breaker)."""

    __slots__ = ("route", "upstream", "auth", "pair", "live", "live_conns")

    def __init__(self, route: str, settings: BreakerSettings) -> None:
        self.route = route
        self.upstream = CircuitBreaker("upstream", settings.upstream, route)
        # A stale credential fails once and is renewed: its second chance (breaker.py).
        self.auth = CircuitBreaker("auth", settings.auth, route, second_chance=True)
        self.pair = (self.upstream, self.auth)  # in the order admit judges them
        self.live: Counter[str] = Counter()  # open connections of the route, by client key
        self.live_conns: dict[ConnId, str] = {}  # … and which key each counted one is under

    def opened(self, conn_id: ConnId, key: str) -> None:
        self.live_conns[conn_id] = key
        self.live[key] += 1

    def closed_conn(self, conn_id: ConnId) -> None:
        key = self.live_conns.pop(conn_id, None)
        if key is not None:
            self.live[key] -= 1
            if not self.live[key]:
                del self.live[key]

    def closed(self) -> bool:
        return self.upstream.state is CLOSED and self.auth.state is CLOSED


_Party = TypeVar("_Party", bound=Hashable)


def _with_room(entries: dict[_Party, float], t: float, window: float) -> dict[_Party, float]:
    """`entries` (when each party last did something) with room for one more:
    when full, those out of the window forgotten (all of them, in the flood
    of that many parties within one window)."""
    if len(entries) < MAX_AUTH_FED:
        return entries
    kept = {w: at for w, at in entries.items() if t - at < window}
    return kept if len(kept) < MAX_AUTH_FED else {}


def _first_due(credits: OrderedDict[ConnId, Credit]) -> float:
    return next(iter(credits.values())).due if credits else INF


class Engine:
    def __init__(
        self,
        detection: DetectionSettings,
        policy: PolicySettings,
        breakers: BreakerSettings,
        *,
        seed: int = 0,
        store: ClientStore | None = None,
        routes: Mapping[str, str] | Iterable[str] = (),
    ) -> None:
        self._rng = random.Random(seed)
        self._store: ClientStore = store or MemoryStore(detection.max_clients, detection.client_ttl)
        self._fleet = Fleet(detection.fleet)
        self._breaker_settings = breakers
        # route → its breakers; the configured routes' from the start (their
        # metrics exist at 0), any other's at its first event, within the bound.
        self._routes: dict[str, RouteBreakers] = {}
        self._configured: frozenset[str] = frozenset()
        self._targets: dict[str, str] = {}  # configured route → its upstream ("" when not told)
        self._set_routes(routes, 0.0)
        # Wake queue: (due, seq, key); stale entries are skipped (state.scheduled says which is live).
        self._queue: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        # Open connections awaiting their auth-success credit, in time order; a close
        # takes its connection's out (nothing of a connection outlives it). Their
        # clients are counted by route (RouteBreakers.live).
        self._credits: OrderedDict[ConnId, Credit] = OrderedDict()
        self._credit_due = INF  # the oldest credit's due time; INF when there is none
        # When each party (breaker.party) last fed a route's auth breaker a
        # failure, or a success: once per window each.
        self._auth_fed: dict[tuple[str, str, bool], float] = {}
        # When each party last failed a route's auth once, uncounted: its
        # second failure in a row within the window is the first that counts.
        self._auth_strikes: dict[tuple[str, str], float] = {}
        # Clients with a standing finding or a cooldown: few, so views and counts iterate them.
        self._notable: dict[str, ClientState] = {}
        # Clients with an open connection (here or through another replica): a
        # new max_concurrent concerns only them (connected_keys), and a reload
        # must not walk every client tracked to find them.
        self._connected: set[str] = set()
        # rule → severity → clients whose standing flag of the rule has it.
        self._flagged: dict[str, dict[str, int]] = {r: dict.fromkeys(SEVERITY_RANK, 0) for r in RULE_NAMES}
        self._hot = HotClients()  # top-offender candidates
        self._addresses = Addresses()  # one copy of a peer address its clients share
        self._next_sweep = NEVER
        # What the current call produced; admin calls leave theirs for the next call.
        self._raised: list[Finding] = []
        self._cleared: list[Finding] = []
        self._actions: list[Action] = []
        self._pending_since: float | None = None
        # A lower bound of the earliest time wake() has something to do: lowered
        # when something is scheduled, recomputed exactly when something rare
        # happens (a breaker moves, a wake, an operator call). The proxy asks after
        # every event; see next_wake.
        self._floor = INF
        # Attempts a table-admitting data plane refused that admit() would have let
        # through (its table a batch ahead of the engine): see admit's `refused`.
        self.table_refusals = 0
        self._apply_settings(detection, policy, breakers)

    # --- configuration -------------------------------------------------------

    def _apply_settings(
        self,
        detection: DetectionSettings,
        policy_: PolicySettings,
        breakers: BreakerSettings,
        compiled: Policy | None = None,
    ) -> None:
        self._detection = detection
        self._policy = compiled if compiled is not None and compiled.settings == policy_ else policy.Policy(policy_)
        # The deny list's answer is the same for every attempt it refuses: one record.
        self._deny = Reject("deny", policy_.cooldown.max, detail="on the deny list")
        blocks = {rule.name: rule.settings(detection.rules) for rule in RULES}
        active = [rule for rule in RULES if blocks[rule.name].enabled]
        self._rules = tuple(
            (
                rule.name, rule.check, rule.evidence, blocks[rule.name], rule.recheck_at is not None,
                attrgetter(rule.needs) if rule.needs else _always,
            )
            for rule in active
        )  # fmt: skip
        self._rechecks = tuple(
            (rule.recheck_at, blocks[rule.name]) for rule in active if rule.recheck_at is not None
        )
        self._views = {rule.name: (rule.check, rule.evidence, blocks[rule.name]) for rule in active}
        self._quiet = detection.quiet_period
        self._sweep_every = detection.client_ttl * _SWEEP_FRACTION

    def reconfigure(
        self,
        detection: DetectionSettings,
        policy: PolicySettings,
        breakers: BreakerSettings,
        t: float,
        compiled: Policy | None = None,
        routes: Mapping[str, str] | Iterable[str] | None = None,
    ) -> int:
        """New settings at ``t`` (now); per-client state and breaker state are
        kept. `compiled`: `Policy(policy)` made beforehand (a reload compiles its
        access lists off the event loop: 100 000 networks take a second).
        `routes`: the routes configured now, each with its upstream (or their
        names alone); None: as before. See ``_set_routes``.

        Returns how many clients a lower ``detection.max_clients`` evicted: as
        a new client's eviction does, it gives a client in cooldown or with an
        open connection a second chance (``MemoryStore.EVICTION_SCAN``), so idle
        clients go first and cooldowns only when there is no room left."""
        self._apply_settings(detection, policy, breakers, compiled)
        self._fleet.configure(detection.fleet)
        evicted = self._store.resize(detection.max_clients, detection.client_ttl, t)
        for state in evicted:
            self._forget(state, t)
        self._breaker_settings = breakers
        for rb in self._routes.values():
            self._actions.extend(rb.upstream.configure(breakers.upstream, t))
            self._actions.extend(rb.auth.configure(breakers.auth, t))
        if routes is not None:
            self._set_routes(routes, t)
        self._refloor()
        enabled = set(self._views)
        for state in list(self._notable.values()):
            if state.flags:
                for rule in [r for r in state.flags if r not in enabled]:
                    self._unflag(rule, state.flags.pop(rule))
                if not state.flags:
                    state.flags = None
            self._update_notable(state)
        self._mark_pending(t)
        return len(evicted)

    def _set_routes(self, routes: Mapping[str, str] | Iterable[str], t: float) -> None:
        """The configured routes, by name with their upstreams (or names alone:
        upstreams unknown, never changed): each gets its breakers now
        (whatever the bound). A route no longer configured has its breakers
        closed and forgotten: no attempt reaches it any more (its path has no
        route), so an open one would wait for probes that never come, half-open
        for good, and a route added back would inherit it; made again at the
        route's next event if there is one (a close of a connection it still
        relays). A route whose upstream changed has them closed: they judged
        another service, whose failures say nothing of the new one."""
        told = dict(routes) if isinstance(routes, Mapping) else dict.fromkeys(routes, "")
        targets = {route: told[route] or self._targets.get(route, "") for route in told}
        for route in [r for r in self._routes if r not in targets]:
            self._close_breakers(self._routes.pop(route), t)
        for route in sorted(targets):
            rb = self._routes.get(route)
            if rb is None:
                self._routes[route] = RouteBreakers(route, self._breaker_settings)
            elif self._targets.get(route) not in ("", None, targets[route]):
                self._close_breakers(rb, t)
        self._targets = targets
        self._configured = frozenset(targets)

    def _close_breakers(self, rb: RouteBreakers, t: float) -> None:
        """A route's breakers closed (as an operator's reset), their transitions told."""
        for breaker in rb.pair:
            transition = breaker.reset(t)
            if transition is not None:
                self._actions.append(transition)

    def _route(self, route: str) -> RouteBreakers | None:
        """The route's breakers, made at its first event; None beyond the bound."""
        rb = self._routes.get(route)
        if rb is None:
            if len(self._routes) - len(self._configured) >= MAX_BREAKER_ROUTES:
                return None
            rb = self._routes[route] = RouteBreakers(route, self._breaker_settings)
        return rb

    @property
    def _breakers(self) -> Iterator[CircuitBreaker]:
        """Every route's breakers."""
        for rb in self._routes.values():
            yield from rb.pair

    @property
    def policy(self) -> PolicySettings:
        """The policy settings in force (the proxy reads its hold settings here)."""
        return self._policy.settings

    # --- the hot path --------------------------------------------------------

    def admit(self, attempt: Attempt, refused: RejectReason | None = None) -> Admit | Reject:
        """Record an attempt and decide at once. A Reject is recorded as Rejected too.

        ``refused``: a data plane that admits from a table (the native one)
        already refused this attempt for that reason. It is recorded as refused
        whatever the engine would decide: with the engine's own refusal when it
        agrees, else with that reason (the table was a batch ahead: a client's
        connection closed, a probe budget ran out), taking no probe.
        """
        t = attempt.t
        if t >= self._credit_due:
            self._drain_credits(t)
        state = self._client(attempt.key, t)
        # A storm is many clients reconnecting, not one client looping: the fleet
        # counts a client once per window for it (and every attempt for the rate).
        distinct = t - state.attempt_t >= self._fleet.settings.window
        tracker.on_attempt(state, attempt, self._detection, self._addresses)
        if state.rate >= HOT_RATE:
            self._hot.note(state, t, self._detection.rate_window)
        self._fleet.attempt(t, distinct)

        reject, would = self._client_policy(state, attempt, t)
        probes: list[CircuitBreaker] | None = None
        # The breakers of the attempt's route only: another route's backend being
        # down is no reason to refuse this one's clients.
        rb = self._route(attempt.route)
        if reject is None and rb is not None:
            for breaker in rb.pair:
                if breaker.state is CLOSED:
                    continue
                self._moved(breaker.advance(t))
                verdict = breaker.permit(t, party(state.addr, state.key))
                if verdict == REFUSE:
                    refusal = Reject(
                        "circuit_open",
                        breaker.retry_after(t),
                        breaker=breaker.name,
                        detail=f"{breaker.name} breaker of {breaker.route} {breaker.state.value}",
                    )
                    if self._policy.settings.mode == "enforce":
                        reject = refusal
                        break
                    would = would or refusal
                elif verdict == PROBE:
                    probes = [*probes, breaker] if probes else [breaker]
        if refused is not None and reject is None:
            reject = Reject(refused, 0.0, detail="refused by the data plane's enforcement table")
            self.table_refusals += 1

        if reject is not None:
            tracker.on_rejected(state, t, reject.reason, self._detection)
            self._evaluate(state, t, _ENFORCE_NONE)
            self._reschedule(state, t)
            outcome = self._take()
            if outcome is EMPTY:
                return reject
            return Reject(reject.reason, reject.retry_after, reject.breaker, reject.detail, outcome)

        state.admitted_t = t
        names: tuple[str, ...] = ()
        if probes:
            for breaker in probes:
                breaker.take_probe(t)
            self._refloor()  # the probes' deadline
            names = tuple(b.name for b in probes)
            state.probes = tuple(dict.fromkeys(state.probes + tuple(probes)))
        if would is not None:
            self._actions.append(WouldReject(state.key, t, would.reason))
        self._evaluate(state, t, _ENFORCE_NONE)
        self._reschedule(state, t)
        outcome = self._take()
        if would is None and not names and outcome is EMPTY:
            return ADMITTED
        return Admit(would, names, outcome)

    def _client_policy(
        self, state: ClientState, attempt: Attempt, t: float
    ) -> tuple[Reject | None, Reject | None]:
        """Per-client refusals: (enforced, observed-only)."""
        pol = self._policy
        ps = pol.settings
        key, addr = state.key, attempt.addr
        if pol.denying and pol.denied(key, addr):
            # An operator's explicit deny holds even in observe mode.
            return self._deny, None
        refusal: Reject | None = None
        enforced = False
        if state.cool_rule is not None:
            if state.cool_until > t:
                refusal = Reject(
                    "cooldown",
                    state.cool_until - t,
                    detail=f"{state.cool_rule}, repeat {state.cool_repeat}",
                )
                enforced = self._cooldown_enforced(state, addr)
            else:
                self._end_cooldown(state, state.cool_until)
        if refusal is None and ps.min_interval is not None and t - state.admitted_t < ps.min_interval:
            refusal = Reject(
                "min_interval",
                state.admitted_t + ps.min_interval - t,
                detail=f"at most one attempt every {ps.min_interval:g}s",
            )
            enforced = pol.enforcing(state, ps.mode, addr)
        if (
            refusal is None
            and ps.max_concurrent is not None
            and ps.on_max_concurrent == "reject-new"
            and state.open_count >= ps.max_concurrent
        ):
            # close-oldest admits: it closes the oldest once the new one is open
            # (`_over_capacity`), not for an attempt that may still fail.
            enforced = pol.enforcing(state, ps.mode, addr)
            refusal = Reject(
                "max_concurrent",
                ps.cooldown.base,
                detail=f"{state.open_count} open, at most {ps.max_concurrent}",
            )
        if refusal is None:
            return None, None
        return (refusal, None) if enforced else (None, refusal)

    def _over_capacity(self, state: ClientState, t: float, opened: ConnId) -> None:
        """A connection of the client just opened: past policy.max_concurrent,
        close-oldest closes its oldest, reject-new this new one (attempts in
        their handshake at the same time were all admitted: only opens count).
        Deciding here, not at the attempt, closes nothing for an attempt that
        then fails, and holds the bound however many open at once."""
        ps = self._policy.settings
        limit = ps.max_concurrent
        if limit is None or state.open_count <= limit:
            return
        if not self._policy.enforcing(state, ps.mode, state.addr):
            self._actions.append(WouldReject(state.key, t, "max_concurrent"))
            return
        if ps.on_max_concurrent == "close-oldest":
            victim = min(state.open_items(), key=itemgetter(1))[0]  # (conn_id, opened at)
        else:
            victim = opened
        # Forget it now: the next open before its Closed arrives must pick the next one.
        state.remove_open(victim)
        self._actions.append(
            CloseConnection(state.key, victim, 1008, f"loopwatch: more than {limit} connections")
        )

    def record(self, event: HandshakeFailed | Opened | Closed) -> Outcome:
        """Fold in an outcome of an admitted attempt."""
        t = event.t
        if t >= self._credit_due:
            self._drain_credits(t)
        state = self._client(event.key, t)
        rb = self._route(event.route)
        d = self._detection
        enforce = _ENFORCE_NONE
        if isinstance(event, Opened):
            tracker.on_opened(state, event, d)
            self._over_capacity(state, t, event.conn_id)
            self._update_connected(state)
            if rb is not None:
                self._upstream_outcome(state, rb, t, success=True)
                rb.opened(event.conn_id, state.key)
            if self._breaker_settings.auth.enabled:
                due = t + d.healthy_after
                if not self._credits:
                    self._credit_due = due
                self._credits[event.conn_id] = Credit(due, state.key, rb)
                if rb is not None and due < self._floor and rb.auth.state is not CLOSED:
                    self._floor = due  # a probe may be waiting for its credit
        elif isinstance(event, Closed):
            if rb is not None:
                rb.closed_conn(event.conn_id)
            if self._credits.pop(event.conn_id, None) is not None:
                self._credit_due = _first_due(self._credits)
            opened = state.opened_at(event.conn_id)
            credited = event.duration >= d.healthy_after or (
                opened is not None and t - opened >= d.healthy_after
            )
            kind = tracker.on_closed(state, event, d)
            self._update_connected(state)
            if not credited:  # a longer life was already counted as an auth success
                if kind & tracker.AUTH_FAILURE:
                    self._auth_outcome(state, rb, t, failed=True)
                elif kind & tracker.AUTH_SUCCESS:
                    self._auth_outcome(state, rb, t, failed=False)
                elif rb is not None:
                    self._release_probe(state, rb.auth)
            elif rb is not None:
                # Counted as a success once, maybe long ago: said again as it
                # ends (once a window per client), so that the window holds
                # the fleet a deploy closes when its stale credentials fail
                # (they tripped the breaker before the closes were counted).
                self._feed_auth_breaker(state, rb, t, failed=False)
            if kind & tracker.FAILED:
                enforce = self._blame(kind, rb)
        elif isinstance(event, HandshakeFailed):
            kind = tracker.on_handshake_failed(state, event, d)
            if kind & (tracker.LOCAL | tracker.CLIENT_LEFT):
                # The proxy's own limit, or a client that left first: no breaker's
                # outcome; a probe it carried goes back unused.
                if rb is not None:
                    self._release_probe(state, rb.upstream)
                    self._release_probe(state, rb.auth)
                if kind & tracker.FAILED:
                    enforce = self._blame(kind, rb)
            else:
                if rb is not None:
                    self._upstream_outcome(state, rb, t, success=not kind & tracker.UPSTREAM_FAILURE)
                if kind & tracker.AUTH_FAILURE:
                    self._auth_outcome(state, rb, t, failed=True)
                elif rb is not None:
                    self._release_probe(state, rb.auth)
                enforce = self._blame(kind, rb)
        else:
            raise TypeError(f"record() takes HandshakeFailed, Opened or Closed, not {type(event).__name__}")
        self._evaluate(state, t, enforce)
        self._reschedule(state, t)
        return self._take()

    def answered(self, event: Answered) -> Outcome:
        """A refusal the proxy held was answered at ``event.t`` (or its client left then).

        ``admit`` recorded the attempt and its refusal at arrival; the attempt
        *ended* only now. Retry intervals are measured from an attempt's end, so
        a client that reconnects at once after a held refusal still shows no
        backoff: the hold is loopwatch's pause, not the client's.
        """
        state = self._store.get(event.key)
        if state is not None:
            tracker.on_answered(state, event.t)
        return EMPTY

    def _blame(self, kind: int, rb: RouteBreakers | None) -> int:
        # While a breaker of the route is not closed the failing service is to
        # blame, not the client: such failures raise findings but start no cooldown.
        if rb is None:
            return _ENFORCE_ALL
        if kind & tracker.AUTH_FAILURE and rb.auth.state is not CLOSED:
            return _ENFORCE_NONE
        if kind & tracker.UPSTREAM_FAILURE and rb.upstream.state is not CLOSED:
            return _ENFORCE_NONE
        return _ENFORCE_ALL

    # --- breakers' inputs ----------------------------------------------------

    @staticmethod
    def _take_probe(state: ClientState, breaker: CircuitBreaker) -> bool:
        """Whether the client's attempt in flight probes for `breaker` (a
        breaker of one route: the same name on another is another breaker);
        it does no more."""
        if breaker not in state.probes:
            return False
        state.probes = tuple(p for p in state.probes if p is not breaker)
        return True

    def _release_probe(self, state: ClientState, breaker: CircuitBreaker) -> None:
        if state.probes and self._take_probe(state, breaker):
            breaker.release_probe()

    def _upstream_outcome(self, state: ClientState, rb: RouteBreakers, t: float, success: bool) -> None:
        breaker = rb.upstream
        probe = bool(state.probes) and self._take_probe(state, breaker)
        self._moved(breaker.record(t, success, probe, who=party(state.addr, state.key)))

    def _auth_outcome(self, state: ClientState, rb: RouteBreakers | None, t: float, failed: bool) -> None:
        self._fleet.auth_outcome(t, failed)
        if rb is None:
            return  # a route beyond MAX_BREAKER_ROUTES: no breaker to feed
        breaker = rb.auth
        if state.probes and self._take_probe(state, breaker):
            self._moved(breaker.record(t, not failed, probe=True, who=party(state.addr, state.key)))
            return
        self._feed_auth_breaker(state, rb, t, failed)

    def _feed_auth_breaker(self, state: ClientState, rb: RouteBreakers, t: float, failed: bool) -> None:
        """Count clients, not attempts, and a client by its address (``party``):
        one looping client, whatever keys it makes up, must not trip a
        route-wide breaker (and so refuse everyone on the route) by itself.
        And a client's failure only once it fails again: a token refresh is a
        failure, then in. A deploy that invalidated every token failed every
        client once, and those failures opened the breaker for everyone."""
        breaker = rb.auth
        if breaker.state is not CLOSED:
            return
        window = breaker.settings.window
        who_at = party(state.addr, state.key)
        if not self._second_strike(rb.route, who_at, t, failed, window):
            return
        fed = self._auth_fed
        who = (rb.route, who_at, failed)
        if t - fed.get(who, NEVER) < window:
            return
        self._auth_fed = fed = _with_room(fed, t, window)
        fed[who] = t
        # Clients with a connection open count as not failing: after a deploy
        # every client reconnects, the failing few fail at once and the rest
        # only succeed healthy_after later, so without them a few percent
        # failing tripped the breaker; and a fleet connected for long, its
        # successes out of the window, was nothing against the first 20
        # stale tokens a deploy's reconnects failed with.
        self._moved(breaker.record(t, not failed, pending=len(rb.live)))

    def _second_strike(self, route: str, who: str, t: float, failed: bool, window: float) -> bool:
        """Whether a party's outcome counts: a success always (and it clears
        the party's strike); a failure when the party already failed within
        the window with no success since."""
        strikes = self._auth_strikes
        if not failed:
            strikes.pop((route, who), None)
            return True
        first = strikes.get((route, who))
        if first is not None and t - first < window:
            return True
        self._auth_strikes = strikes = _with_room(strikes, t, window)
        strikes[(route, who)] = t
        return False

    def _drain_credits(self, t: float) -> None:
        """Connections that lived ``healthy_after`` are auth successes."""
        credits = self._credits
        while credits:
            conn_id, credit = next(iter(credits.items()))
            if credit.due > t:
                break
            del credits[conn_id]
            state = self._store.get(credit.key)
            if state is not None and state.opened_at(conn_id) is not None:
                self._auth_outcome(state, credit.route, credit.due, failed=False)
        self._credit_due = _first_due(credits)

    # --- rules, findings, cooldowns -------------------------------------------

    def _evaluate(self, state: ClientState, t: float, enforce: int) -> None:
        flags = state.flags
        quiet = self._quiet
        culprits: list[tuple[str, RuleSettings]] | None = None
        for name, check, evidence, block, timed, needs in self._rules:
            if needs(state) is None and (flags is None or name not in flags):
                continue  # nothing the rule counts, and no flag of its own to refresh or clear
            severity = check(state, block, t)
            if severity is None:
                if flags is not None:
                    flag = flags.get(name)
                    if flag is not None and findings.expired(flag, t, quiet):
                        del flags[name]
                        self._unflag(name, flag)
                continue
            if flags is None:
                flags = state.flags = {}
            flag = flags.get(name)
            if flag is not None:
                flag.last_match = t
            if findings.is_news(flag, severity):
                # Evidence is built only for news; a refresh is a float store.
                finding = Finding(state.key, name, severity, evidence(state, block, t), t)
                if flag is None:
                    flags[name] = Flag(finding)
                else:
                    self._flagged[name][flag.severity] -= 1  # escalated: counted at its new severity
                    flag.raised = finding
                self._flagged[name][severity] += 1
                self._raised.append(finding)
            if enforce and (enforce == _ENFORCE_ALL or timed) and policy.enforces(block, severity):
                culprits = [*culprits, (name, block)] if culprits else [(name, block)]
        if flags is not None and not flags:
            state.flags = None
        if culprits is not None:
            self._cooldown(state, t, culprits)
        self._update_notable(state)

    def _cooldown(self, state: ClientState, t: float, culprits: list[tuple[str, RuleSettings]]) -> None:
        # The first rule (in registry order) whose finding is enforced for this
        # client wins; if none is, the first one starts an observed cooldown.
        ps = self._policy.settings
        rule, enforced = culprits[0][0], False
        for name, block in culprits:
            if self._policy.enforcing(state, policy.rule_mode(block, ps), state.addr):
                rule, enforced = name, True
                break
        if state.cool_rule is not None and state.cool_until > t and (state.cool_enforced or not enforced):
            return  # already cooling down (an observed cooldown is upgraded by an enforced one)
        self._actions.append(
            policy.start_cooldown(state, self._policy.settings.cooldown, t, rule, enforced, self._rng)
        )

    def _end_cooldown(self, state: ClientState, t: float) -> None:
        state.cool_rule = None
        self._actions.append(CooldownEnded(state.key, t))

    def _rule_mode(self, rule: str) -> Mode:
        """The mode a running cooldown of `rule` is enforced in. A rule an
        operator turned off (`enabled: false`) or that enforces nothing any more
        (`enforce_on: never`) lifts its cooldowns, as its `mode: observe` does:
        the stronger switch does no less. A rule this engine does not know (a
        cooldown adopted from a newer replica) follows the policy's mode."""
        view = self._views.get(rule)
        if view is None:
            return "observe" if rule in RULE_NAMES else self._policy.settings.mode
        if view[2].enforce_on == "never":
            return "observe"
        return policy.rule_mode(view[2], self._policy.settings)

    # --- time ----------------------------------------------------------------

    def wake(self, t: float) -> Outcome:
        """Apply what time alone changes, up to ``t``."""
        if t >= self._credit_due:
            self._drain_credits(t)
        for breaker in self._breakers:
            self._actions.extend(breaker.advance(t))
        queue = self._queue
        while queue and queue[0][0] <= t:
            due, _, key = heapq.heappop(queue)
            state = self._store.get(key)
            if state is None or state.scheduled != due:
                continue  # forgotten, or rescheduled since
            state.scheduled = INF
            if state.cool_rule is not None and state.cool_until <= t:
                self._end_cooldown(state, state.cool_until)
            # Only time-driven rules may enforce here: a rate rule still matching
            # at a cooldown's end must not deny the client its one attempt.
            self._evaluate(state, t, _ENFORCE_TIMED)
            self._reschedule(state, t)
        if t >= self._next_sweep:
            store = self._store
            for state in store.expire(t, _SWEEP_BATCH):
                self._forget(state, t)
            expiry = store.next_expiry()
            if expiry is not None and expiry <= t:
                self._next_sweep = math.nextafter(t, INF)  # more is due: next batch at once
            else:
                self._next_sweep = t + self._sweep_every
        self._refloor()
        return self._take()

    @property
    def next_wake(self) -> float | None:
        """When ``wake`` is next needed; None when nothing is pending. Never later
        than the earliest time ``wake`` has something to do, sometimes earlier
        (a wake that finds nothing due is harmless and makes it exact again):
        kept as a bound so that asking after every event costs nothing."""
        due = self._floor
        return None if due == INF else due

    def _moved(self, transitions: tuple[Action, ...]) -> None:
        """A breaker's answer: its transitions are news, and may move its wake-up."""
        if transitions:
            self._actions.extend(transitions)
            self._refloor()

    def _refloor(self) -> None:
        self._floor = self._exact_wake()

    def _exact_wake(self) -> float:
        due = INF
        if self._pending_since is not None:
            due = self._pending_since
        if self._queue:
            due = min(due, self._queue[0][0])
        auth_open = False
        for rb in self._routes.values():
            for breaker in rb.pair:
                when = breaker.next_wake
                if when is not None:
                    due = min(due, when)
            auth_open = auth_open or rb.auth.state is not CLOSED
        if auth_open:
            due = min(due, self._credit_due)  # a probe may be waiting for its credit
        expiry = self._store.next_expiry()
        if expiry is not None:
            due = min(due, max(expiry, self._next_sweep))
        return due

    def _reschedule(self, state: ClientState, t: float) -> None:
        due = INF
        if state.cool_rule is not None:
            due = state.cool_until
        if state.flags:
            quiet = self._quiet
            for flag in state.flags.values():
                due = min(due, flag.last_match + quiet)
        if state.open_count:
            for recheck_at, block in self._rechecks:
                when = recheck_at(state, block, t)
                if when is not None:
                    due = min(due, when)
        if due <= t:
            # Never schedule into the past: wake() would pop it again at once. The
            # sources above are all after t; this only guards against a spin.
            due = math.nextafter(t, INF)
        if due < state.scheduled:
            state.scheduled = due
            heapq.heappush(self._queue, (due, next(self._seq), state.key))
            if due < self._floor:
                self._floor = due

    # --- client bookkeeping ----------------------------------------------------

    def _client(self, key: str, t: float) -> ClientState:
        store = self._store
        state = store.get(key)
        if state is None:
            state = ClientState(key, t)
            for evicted in store.put(state, t):
                self._forget(evicted, t)
            if len(store) == 1:  # the first client: the idle sweep has a time now
                self._refloor()
        else:
            store.touch(state, t)
        return state

    def _cooldown_enforced(self, state: ClientState, addr: str) -> bool:
        """Whether `state`'s running cooldown refuses now: it was started
        enforced, and the policy in force still enforces its rule for this
        client (observe mode, the rollout or the allow list lift it; an
        operator's cooldown holds whatever the mode). The one test for
        admit, the table and the views alike."""
        rule = state.cool_rule
        return state.cool_enforced and (
            rule == "manual" or (rule is not None and self._policy.enforcing(state, self._rule_mode(rule), addr))
        )

    def _enforced_now(self, state: ClientState) -> bool:
        """`_cooldown_enforced` for a view: by the client's latest address."""
        return self._cooldown_enforced(state, state.addr)

    def _unflag(self, rule: str, flag: Flag) -> None:
        """A standing flag of `rule` is over (cleared, disabled or forgotten)."""
        self._cleared.append(flag.raised)
        self._flagged[rule][flag.severity] -= 1

    def _forget(self, state: ClientState, t: float) -> None:
        """A client left the store: settle what it held, so counts and breakers stay true."""
        if state.flags:
            for rule, flag in state.flags.items():
                self._unflag(rule, flag)
            state.flags = None
        if state.cool_rule is not None and state.cool_until > t:
            self._actions.append(CooldownEnded(state.key, t, evicted=True))
        state.cool_rule = None
        for breaker in state.probes:
            breaker.release_probe()
        state.probes = ()
        self._notable.pop(state.key, None)
        self._connected.discard(state.key)
        self._hot.forget(state.key)

    def _update_connected(self, state: ClientState) -> None:
        if state.open_count:
            self._connected.add(state.key)
        else:
            self._connected.discard(state.key)

    def _update_notable(self, state: ClientState) -> None:
        if state.flags or state.cool_rule is not None:
            self._notable[state.key] = state
        elif state.key in self._notable:
            del self._notable[state.key]

    def _take(self) -> Outcome:
        if not (self._raised or self._cleared or self._actions):
            return EMPTY
        outcome = Outcome(tuple(self._raised), tuple(self._cleared), tuple(self._actions))
        self._raised.clear()
        self._cleared.clear()
        self._actions.clear()
        if self._pending_since is not None:
            self._pending_since = None
            self._refloor()
        return outcome

    def _mark_pending(self, t: float) -> None:
        """Admin calls return no Outcome: theirs goes out with the next call (see next_wake)."""
        if (self._raised or self._cleared or self._actions) and self._pending_since is None:
            self._pending_since = t
            if t < self._floor:
                self._floor = t

    # --- operators -------------------------------------------------------------

    def release(self, key: str, t: float) -> bool:
        """Forgive a client: end its cooldown, forget its repeats, findings and loop evidence."""
        state = self._store.get(key)
        if state is None:
            return False
        if state.cool_rule is not None:
            self._end_cooldown(state, t)
        state.cool_until = min(state.cool_until, t)
        state.cool_repeat = 0
        state.keep_until = NEVER
        if state.flags:
            for rule, flag in state.flags.items():
                self._unflag(rule, flag)
            state.flags = None
        state.failures = None
        state.bad_times = None
        self._update_notable(state)
        self._mark_pending(t)
        return True

    def force_cooldown(self, key: str, duration: float, t: float) -> None:
        """Refuse a client for exactly ``duration`` seconds, whatever the mode."""
        state = self._client(key, t)
        self._actions.append(
            policy.force_cooldown(state, self._policy.settings.cooldown, t, duration)
        )
        self._update_notable(state)
        self._reschedule(state, t)
        self._mark_pending(t)

    def reset_breaker(self, name: str, t: float, route: str | None = None) -> bool:
        """Close breaker `name` (upstream or auth) of `route`, or of every route
        (None). False for an unknown name, or a route that has no breakers."""
        if name not in BREAKER_NAMES or (route is not None and route not in self._routes):
            return False
        for rb in self._routes.values() if route is None else (self._routes[route],):
            transition = (rb.upstream if name == "upstream" else rb.auth).reset(t)
            if transition is not None:
                self._actions.append(transition)
        self._refloor()
        self._mark_pending(t)
        return True

    # --- replicas (state.backend: redis) --------------------------------------

    def observe(self, event: Event, *, admitted: bool = False, breakers: bool = False) -> Outcome:
        """Fold in an event another replica saw, so the rules judge the client's
        combined traffic (detectors/shared.py).

        The replica that saw it has already decided, so nothing is decided here:
        no refusal, and no cooldown (cooldowns travel as such, see
        ``adopt_cooldown``); a finding it completes is raised all the same, and the
        next failure this replica sees itself enforces it. The fleet view stays
        this replica's own. The breakers of its route hear it only with
        ``breakers`` (state.breakers: shared), and never as a probe: probes are local.
        ``event`` must carry this engine's clock and, for Opened/Closed, a
        connection id that cannot collide with a local one (shared.localize).
        """
        t = event.t
        if t >= self._credit_due:
            self._drain_credits(t)
        state = self._client(event.key, t)
        kind = tracker.apply(state, event, self._detection, self._addresses)
        if isinstance(event, Attempt):
            if admitted:
                state.admitted_t = t
        else:
            if isinstance(event, Opened | Closed):
                self._update_connected(state)
            if breakers:
                self._observe_breakers(state, event, kind, t)
        self._evaluate(state, t, _ENFORCE_NONE)
        self._reschedule(state, t)
        return self._take()

    def _observe_breakers(self, state: ClientState, event: Event, kind: int, t: float) -> None:
        # The event's route's breakers (made at its first event, within
        # MAX_BREAKER_ROUTES: a route string off the network is anyone's).
        rb = self._route(event.route)
        if rb is None:
            return
        if isinstance(event, Opened | HandshakeFailed) and not kind & (tracker.LOCAL | tracker.CLIENT_LEFT):
            success = not kind & tracker.UPSTREAM_FAILURE
            self._moved(rb.upstream.record(t, success))
        if isinstance(event, Closed) and event.duration >= self._detection.healthy_after:
            failed = False  # lived long enough: the auth service let it in
        elif kind & tracker.AUTH_FAILURE:
            failed = True
        elif kind & tracker.AUTH_SUCCESS:
            failed = False
        else:
            return
        self._feed_auth_breaker(state, rb, t, failed)

    def adopt_cooldown(self, cooldown: SharedCooldown, t: float) -> bool:
        """A cooldown another replica started (or the shared store remembered).

        The longer cooldown wins and an enforced one beats an observed one, so
        replicas converge whatever order they hear things in; an operator's
        (``force``) replaces whatever is here. The repeat count is merged by
        maximum either way, so the next offence escalates on every replica. No
        CooldownStarted comes out: the replica that started it reported it, and
        counting it once per replica would multiply it. True if adopted.
        """
        state = self._client(cooldown.key, t)
        # No longer than this replica would ever set it (an operator's: 366
        # days; a rule's: policy.cooldown.max): it came off the network.
        longest = MAX_DURATION if cooldown.rule == "manual" else self._policy.settings.cooldown.max
        until = t + min(cooldown.remaining, longest)
        memory = self._policy.settings.cooldown.memory
        state.cool_repeat = max(state.cool_repeat, min(cooldown.repeat, MAX_REPEAT))
        state.keep_until = max(state.keep_until, until + memory)
        active = state.cool_rule is not None and state.cool_until > t
        adopt = cooldown.remaining > 0 and (
            cooldown.force
            or not active
            or (cooldown.enforced and not state.cool_enforced)
            or (until > state.cool_until and (cooldown.enforced or not state.cool_enforced))
        )
        if adopt:
            state.cool_until = until
            state.cool_rule = cooldown.rule
            state.cool_enforced = cooldown.enforced
        elif not active:
            # Over already: only its end matters, for the next offence's repeat.
            state.cool_until = max(state.cool_until, until)
        self._update_notable(state)
        self._reschedule(state, t)
        return adopt

    def local_connections(self, t: float) -> list[OpenConnection]:
        """This replica's own open connections, for the others."""
        return [
            OpenConnection(s.key, cid, t - opened)
            for s in self._store
            if s.open_count
            for cid, opened in s.open_items()
            if type(cid) is int
        ]

    def replace_connections(self, replica: str, open_: Iterable[OpenConnection], t: float) -> set[str]:
        """Count exactly `open_` (its own ids, by key) as open through replica
        `replica`, forgetting what was counted of it before; nothing for a
        replica gone silent. Its Opened and Closed are this engine's only other
        news of them, and a crash or an outage loses the Closed: the phantoms
        counted toward max_concurrent and duplicate_connections for as long as
        this replica ran. The keys whose counts changed (for the table)."""
        changed: set[str] = set()
        for state in self._store:
            if not state.open_count:
                continue
            for cid, _ in state.open_items():
                owner = owner_of(cid)
                if owner is not None and owner[0] == replica:
                    state.remove_open(cid)
                    changed.add(state.key)
            self._update_connected(state)
        for c in open_:
            state = self._client(c.key, t)
            state.add_open(remote_conn_id(replica, c.conn_id), t - c.age)
            self._update_connected(state)
            changed.add(c.key)
        return changed

    def cooldowns(self, t: float, *, remembered: bool = False) -> list[SharedCooldown]:
        """The cooldowns running now, as other replicas would adopt them. With
        `remembered`, also those over but within `policy.cooldown.memory` of
        their end (remaining ≤ 0: the client's next offence escalates from
        them), for a shared store that lost them (a Redis restarted empty)."""
        running = [
            SharedCooldown(s.key, s.cool_until - t, s.cool_rule, s.cool_repeat, s.cool_enforced)
            for s in self._notable.values()
            if s.cool_rule is not None and s.cool_until > t
        ]
        if not remembered:
            return running
        memory = self._policy.settings.cooldown.memory
        return running + [
            SharedCooldown(s.key, s.cool_until - t, "remembered", s.cool_repeat, s.cool_enforced)
            for s in self._store
            # cool_repeat: a client never cooled down has none to remember (its
            # cool_until, 0.0, was within memory of a host up less than that)
            if s.cool_rule is None and s.cool_repeat and s.cool_until <= t < s.cool_until + memory
        ]

    def record_health(self, t: float, ok: bool, route: str) -> Outcome:
        """An active health check's result (proxy/admin/upstream_health.py): it
        feeds the upstream breaker of ``route`` (the route its path takes) only,
        never a client. While the breaker is half-open a check is a probe like
        any client's attempt, so a recovered upstream closes the breaker without
        a client having to risk an attempt; while it is open and waiting, a check
        does not count (the wait is the wait)."""
        rb = self._route(route)
        if rb is None:
            return self._take()
        breaker = rb.upstream
        self._actions.extend(breaker.advance(t))
        verdict = breaker.permit(t)
        if verdict == PROBE:
            breaker.take_probe(t)
            self._actions.extend(breaker.record(t, ok, probe=True))
        elif verdict != REFUSE:
            self._actions.extend(breaker.record(t, ok))
        self._refloor()
        return self._take()

    # --- the enforcement table (detectors/enforcement.py) ---------------------------

    def enforcement(self, key: str, t: float) -> KeyEnforcement:
        """What a table-admitting data plane must hold for ``key`` at ``t``: the
        enforced part of what ``admit`` would refuse it for, in admit's order (a
        running cooldown, even an observed one, hides min_interval and
        max_concurrent, as it does in admit). Changes nothing."""
        state = self._store.get(key)
        if state is None:
            return NONE
        pol = self._policy
        ps = pol.settings
        addr = state.addr
        if state.cool_rule is not None and state.cool_until > t:
            if self._cooldown_enforced(state, addr):
                return KeyEnforcement(CooldownEnforcement(state.cool_until, state.cool_rule))
            return NONE
        not_before = None
        if ps.min_interval is not None and state.admitted_t + ps.min_interval > t:
            not_before = state.admitted_t + ps.min_interval
        at_capacity = (
            ps.max_concurrent is not None
            and ps.on_max_concurrent == "reject-new"
            and state.open_count >= ps.max_concurrent
        )
        # The mode, rollout and allow list only for a key something restricts
        # (asked for every key of every batch; most have nothing).
        if (not_before is None and not at_capacity) or not pol.enforcing(state, ps.mode, addr):
            return NONE
        return KeyEnforcement(None, not_before, at_capacity)

    def breaker_enforcement(self, t: float) -> tuple[BreakerEnforcement, ...]:
        """Every route's breakers as a table-admitting data plane must hold
        them at ``t`` (their states as they are: call after the engine's
        latest step), each naming its route."""
        enforced = self._policy.settings.mode == "enforce"
        out = []
        for b in self._breakers:
            if b.state is CLOSED:
                out.append(BreakerEnforcement(b.name, "closed", enforced=enforced, route=b.route))
                continue
            probes = b.settings.half_open_probes
            # Clients whose probe failed, and until when the table bars them.
            no_probe, barred = frozenset(b.failed_probers), b.no_probe_until if b.failed_probers else 0.0
            if b.state is HALF_OPEN:
                left = max(probes - b.probes_permitted, 0)
                out.append(BreakerEnforcement(b.name, "half_open", 0.0, b.retry_after(t), left, enforced, no_probe,
                                              barred, b.route))  # fmt: skip
            else:
                out.append(BreakerEnforcement(b.name, "open", b.open_until, 0.0, probes, enforced, no_probe,
                                              barred, b.route))  # fmt: skip
        return tuple(out)

    # --- views -----------------------------------------------------------------

    def breakers(self, t: float) -> list[BreakerView]:
        """Every route's breakers, by route, upstream before auth."""
        self._advance_breakers(t)
        return [b.view(t) for route in sorted(self._routes) for b in self._routes[route].pair]

    def snapshot(self, t: float) -> EngineSnapshot:
        self._advance_breakers(t)
        d = self._detection
        return snapshot(
            t,
            store=self._store,
            notable=self._notable.values(),
            flagged=self._flagged,
            enforced=self._enforced_now,
            breakers=breaker_states(self._breakers),
            fleet=self._fleet,
            top=self._hot.top(t, d.rate_window, d.top_k),
        )

    @property
    def clients_tracked(self) -> int:
        """How many clients the engine holds state for."""
        return len(self._store)

    def clients(self, t: float, *, limit: int = 50, offset: int = 0) -> list[ClientView]:
        """Tracked clients, worst first: cooldown > critical > warning > ok, then by rate."""
        if offset >= len(self._store):
            return []  # past the end: nothing to rank
        need = max(offset + limit, 0)
        tau = self._detection.rate_window
        notable = self._notable
        candidates = list(notable.values())
        candidates += heapq.nlargest(
            need,
            (s for s in self._store if s.key not in notable),
            key=lambda s: s.rate_at(t, tau),
        )
        candidates.sort(key=lambda s: (rank(s, t, self._enforced_now), -s.rate_at(t, tau)))
        return [
            client_view(s, t, tau, self._quiet, self._views, history=False, enforced=self._enforced_now)
            for s in candidates[offset : offset + limit]
        ]

    def ranked(self, t: float) -> list[str]:
        """Every tracked client's key, worst first, as `clients` pages them."""
        tau = self._detection.rate_window
        states = list(self._store)
        states.sort(key=lambda s: (rank(s, t, self._enforced_now), -s.rate_at(t, tau)))
        return [s.key for s in states]

    def views(self, keys: Iterable[str], t: float) -> list[ClientView]:
        """The views (without history) of those of `keys` still tracked."""
        tau = self._detection.rate_window
        store = self._store
        return [
            client_view(state, t, tau, self._quiet, self._views, history=False, enforced=self._enforced_now)
            for key in keys
            if (state := store.get(key)) is not None
        ]

    def connected_keys(self) -> list[str]:
        """The clients with an open connection the engine counts (here or
        through another replica): those whose `max_concurrent` a new policy
        may change. As many as there are, not as many clients as are tracked."""
        return list(self._connected)

    def admitted_since(self, t: float) -> list[str]:
        """The clients admitted after ``t``: those whose `min_interval` deadline
        a new policy may change. Read from the most recently seen back to the
        first seen at or before ``t`` (a client is seen at each admission), so
        it costs the clients seen since, not every client tracked. (Another
        replica's event, stamped before the latest seen here, puts a client
        out of that order and may end the read early: a client missed then
        meets its new deadline one attempt late, as before this was asked.)"""
        keys = []
        for state in self._store.recent():
            if state.touched <= t:
                break
            if state.admitted_t > t:
                keys.append(state.key)
        return keys

    def open_connections(self, key: str) -> tuple[ConnId, ...]:
        """The ids of the client's connections the engine counts as open (opened,
        not closed, not picked by close-oldest), oldest first."""
        state = self._store.get(key)
        return tuple(cid for cid, _ in state.open_items()) if state is not None else ()

    def client(self, key: str, t: float) -> ClientView | None:
        state = self._store.get(key)
        if state is None:
            return None
        return client_view(
            state, t, self._detection.rate_window, self._quiet, self._views, history=True, enforced=self._enforced_now
        )

    def _advance_breakers(self, t: float) -> None:
        for breaker in self._breakers:
            self._moved(breaker.advance(t))
        self._mark_pending(t)


__all__ = ["Engine"]
