"""Per-client state and the bounded store that holds it.

A ``ClientState`` is small on purpose: scalars for the latest attempt and end,
capped rings (``detectors.ring``) allocated only once a client has something to
put in them, and a compact event history. The store bounds how many there
are: an idle client is forgotten after ``client_ttl`` and beyond
``max_clients`` the least recently seen one is evicted, so a flood of forged
keys costs bounded memory — and shows up as ``evictions``.

The engine only talks to the ``ClientStore`` protocol, so a shared store
(Redis, in proxy/) can replace ``MemoryStore`` without touching detection.
"""

from __future__ import annotations

import math
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from .events import ConnId
from .findings import Flag

if TYPE_CHECKING:
    from .breaker import CircuitBreaker

INF = math.inf
NEVER = -math.inf
_ABSENT = object()


class Failures:
    """What only a client that fails needs: its auth failure streaks and the rings
    of failures the rules count. Most clients never fail (and one that only ends
    short-lived connections fills ``ClientState.bad_times`` alone), so a client
    state holds one slot for these, None until the first, not seven."""

    __slots__ = (
        "streak",  # consecutive auth failures retried quickly (auth_failure_loop)
        "steady",  # consecutive auth failures retried within steady_within (auth_failure_loop) …
        "steady_gaps",  # ring: … and the retry intervals before them (is it backing off?)
        "auth_times",  # ring: auth failures
        "short_times",  # ring: short, abnormal closes (short_lived)
        "intervals",  # ring: retry intervals after failures (no_backoff) …
        "interval_times",  # … and when each was measured
    )

    def __init__(self) -> None:
        self.streak = 0
        self.steady = 0
        self.steady_gaps: array[float] | None = None
        self.auth_times: array[float] | None = None
        self.short_times: array[float] | None = None
        self.intervals: array[float] | None = None
        self.interval_times: array[float] | None = None


class ClientState:
    """Everything the rules and the policy know about one client key."""

    __slots__ = (
        "key",
        "addr",  # peer address of the latest attempt (allow/deny CIDRs for keys without one)
        "first_seen",
        "last_seen",
        "touched",  # TTL/LRU anchor: last_seen, or when the store last chose to keep it
        "attempts",
        "rate",  # attempts per second, exponentially decayed (see tracker)
        "rate_t",
        "attempt_t",  # latest attempt
        "admitted_t",  # latest admitted attempt (min_interval)
        "end_t",  # latest end: close, refusal or failed handshake
        "end_failed",  # whether that end was a failure (retry intervals are judged after failures)
        "gap",  # retry interval of the latest attempt: attempt_t − previous end_t
        "failures",  # Failures: auth failure streaks, failure rings; None until the first
        # Open connections, oldest first: the only one in open_id/open_t (a dict
        # costs ~220 bytes, and most clients hold one connection at a time), two
        # or more in `open` (conn_id → open time). Read through the methods below.
        "open_id",
        "open_t",
        "open",
        "bad_times",  # ring: attempts refused, failed or short-lived (rapid_reconnect)
        "codes",  # close-code histogram: code and count in turn (tracker)
        "history",  # ring: recent events, time and packed value in turn (detectors.history)
        "flags",  # rule → Flag
        "cool_until",  # cooldown end; 0 when there is no cooldown
        "cool_repeat",
        "cool_rule",
        "cool_enforced",  # False: an observe-mode cooldown (would_reject only)
        "keep_until",  # the store keeps the client at least until then (cooldown memory)
        "scheduled",  # when the engine's wake queue holds this client; INF when not queued
        "probes",  # the breakers (of its route) this client's attempt in flight probes for
        "bucket",  # rollout bucket 0..9999, -1 until first needed
    )

    def __init__(self, key: str, t: float) -> None:
        self.key = key
        self.addr = ""
        self.first_seen = t
        self.last_seen = t
        self.touched = t
        self.attempts = 0
        self.rate = 0.0
        self.rate_t = t
        self.attempt_t = NEVER
        self.admitted_t = NEVER
        self.end_t = NEVER
        self.end_failed = False
        self.gap = INF
        self.failures: Failures | None = None
        self.open_id: ConnId | None = None
        self.open_t = 0.0
        self.open: dict[ConnId, float] | None = None
        self.bad_times: array[float] | None = None
        self.codes: array[int] | None = None
        self.history: array[float] | None = None
        self.flags: dict[str, Flag] | None = None
        self.cool_until = 0.0
        self.cool_repeat = 0
        self.cool_rule: str | None = None
        self.cool_enforced = False
        self.keep_until = NEVER
        self.scheduled = INF
        self.probes: tuple[CircuitBreaker, ...] = ()
        self.bucket = -1

    def failing(self) -> Failures:
        """The client's failure evidence, made at its first use."""
        failures = self.failures
        if failures is None:
            failures = self.failures = Failures()
        return failures

    @property
    def open_count(self) -> int:
        if self.open_id is not None:
            return 1
        return len(self.open) if self.open else 0

    def opened_at(self, conn_id: ConnId) -> float | None:
        """When the open connection `conn_id` opened; None when it is not open."""
        if self.open_id is not None:
            return self.open_t if self.open_id == conn_id else None
        return self.open.get(conn_id) if self.open else None

    def open_items(self) -> list[tuple[ConnId, float]]:
        """The open connections, oldest first: (conn_id, open time)."""
        if self.open_id is not None:
            return [(self.open_id, self.open_t)]
        return list(self.open.items()) if self.open else []

    def add_open(self, conn_id: ConnId, t: float) -> None:
        conns = self.open
        if conns is not None:
            conns[conn_id] = t
        elif self.open_id is None:
            self.open_id, self.open_t = conn_id, t
        else:
            self.open = {self.open_id: self.open_t, conn_id: t}
            self.open_id = None

    def remove_open(self, conn_id: ConnId) -> bool:
        """Forget an open connection; whether it was open."""
        if self.open_id is not None:
            if self.open_id != conn_id:
                return False
            self.open_id, self.open_t = None, 0.0  # (not keeping the time's float alive)
            return True
        conns = self.open
        if not conns or conns.pop(conn_id, _ABSENT) is _ABSENT:
            return False
        if len(conns) == 1:  # back to one: the dict goes
            ((self.open_id, self.open_t),) = conns.items()
            self.open = None
        elif not conns:
            self.open = None
        return True

    def in_cooldown(self, t: float) -> bool:
        return self.cool_until > t

    def rate_at(self, t: float, tau: float) -> float:
        """Attempts per second at ``t``: the stored rate decayed since it was last updated."""
        if self.rate == 0.0:
            return 0.0
        return self.rate * math.exp(-(max(t - self.rate_t, 0.0)) / tau)

    def pinned(self, t: float) -> bool:
        """Whether forgetting this client now would lose something that still matters."""
        return self.open_count > 0 or self.cool_until > t or self.keep_until > t


class Addresses:
    """One copy of each peer address for every client state that holds it.

    Each attempt brings its own string for the peer's address, and a client's
    state keeps the latest one for as long as the client is tracked (10 min
    after it leaves by default): ~60 bytes a client, the same bytes again for
    every client behind one NAT, load balancer or test host. States keep the
    copy from here instead. Bounded: when ``CAP`` distinct addresses are held
    it starts over (states keep the copies they have; only sharing restarts).
    """

    __slots__ = ("_copies",)
    CAP = 4096

    def __init__(self) -> None:
        self._copies: dict[str, str] = {}

    def share(self, addr: str) -> str:
        """The copy of ``addr`` to keep (``addr`` itself the first time)."""
        copy = self._copies.get(addr)
        if copy is None:
            if len(self._copies) >= self.CAP:
                self._copies.clear()
            copy = self._copies[addr] = addr
        return copy


class ClientStore(Protocol):
    """Where client states live; the engine needs nothing else from it."""

    @property
    def evictions(self) -> int:
        """Clients dropped by the TTL or the size cap since start (not explicit removals)."""
        ...

    def get(self, key: str) -> ClientState | None:
        """The client's state, without marking it used."""
        ...

    def touch(self, state: ClientState, t: float) -> None:
        """Mark ``state`` used at ``t`` (most recently used; TTL restarts)."""
        ...

    def put(self, state: ClientState, t: float) -> list[ClientState]:
        """Add a new client; returns the clients evicted to make room."""
        ...

    def evict(self, key: str) -> ClientState | None:
        """Remove one client on purpose; returns it if it was there."""
        ...

    def expire(self, t: float, limit: int | None = None) -> list[ClientState]:
        """Drop clients idle for the TTL (keeping pinned ones); returns them.

        ``limit`` bounds how many clients one call looks at, so a sweep never
        holds the caller's event loop for long; ``next_expiry`` then says more is due.
        """
        ...

    def resize(self, max_clients: int, ttl: float, t: float) -> list[ClientState]:
        """Change the bounds at ``t``; returns clients evicted to fit the new
        cap, pinned ones (``ClientState.pinned``) last, as ``put`` evicts."""
        ...

    def next_expiry(self) -> float | None:
        """Earliest time ``expire`` may drop someone; None when empty."""
        ...

    def recent(self) -> Iterator[ClientState]:
        """Clients, most recently used first."""
        ...

    def __iter__(self) -> Iterator[ClientState]: ...

    def __len__(self) -> int: ...


class MemoryStore:
    """An in-process store: an OrderedDict in least-recently-used order."""

    # How many of the least recently used clients a full store looks at to find
    # one that is not pinned, per eviction, before evicting the oldest anyway: a
    # flood of new keys should push out idle clients before a client in
    # cooldown, but memory and the work per new key stay bounded no matter what.
    # A pinned client looked at goes to the back, its TTL restarted (as a sweep
    # does): looking only at the oldest few in place, a handful of cooldowns at
    # the front were evicted by the flood while idle clients stayed.
    EVICTION_SCAN = 32

    def __init__(self, max_clients: int, ttl: float) -> None:
        self.max_clients = max_clients
        self.ttl = ttl
        self._clients: OrderedDict[str, ClientState] = OrderedDict()
        self._evictions = 0

    @property
    def evictions(self) -> int:
        return self._evictions

    def get(self, key: str) -> ClientState | None:
        return self._clients.get(key)

    def touch(self, state: ClientState, t: float) -> None:
        state.touched = t
        self._clients.move_to_end(state.key)

    def put(self, state: ClientState, t: float) -> list[ClientState]:
        evicted = self._shrink(self.max_clients - 1, t) if len(self._clients) >= self.max_clients else []
        state.touched = t
        self._clients[state.key] = state
        return evicted

    def evict(self, key: str) -> ClientState | None:
        return self._clients.pop(key, None)

    def expire(self, t: float, limit: int | None = None) -> list[ClientState]:
        expired: list[ClientState] = []
        clients = self._clients
        horizon = t - self.ttl
        for _ in range(len(clients) if limit is None else min(limit, len(clients))):
            state = next(iter(clients.values()))
            if state.touched > horizon:
                break
            if state.pinned(t):
                # Still needed: restart its TTL so the scan does not meet it again at once.
                self.touch(state, t)
                continue
            del clients[state.key]
            expired.append(state)
        self._evictions += len(expired)
        return expired

    def resize(self, max_clients: int, ttl: float, t: float) -> list[ClientState]:
        self.max_clients = max_clients
        self.ttl = ttl
        # The second chance a new client's eviction gives: a lower cap must not
        # take the clients in cooldown (an operator's included) before idle ones.
        return self._shrink(max_clients, t)

    def next_expiry(self) -> float | None:
        if not self._clients:
            return None
        return next(iter(self._clients.values())).touched + self.ttl

    def recent(self) -> Iterator[ClientState]:
        return reversed(self._clients.values())

    def __iter__(self) -> Iterator[ClientState]:
        return iter(self._clients.values())

    def __len__(self) -> int:
        return len(self._clients)

    def _shrink(self, size: int, t: float) -> list[ClientState]:
        clients = self._clients
        evicted: list[ClientState] = []
        while len(clients) > size:
            victim = None
            for _ in range(min(self.EVICTION_SCAN, len(clients))):
                state = next(iter(clients.values()))
                if not state.pinned(t):
                    victim = state
                    break
                self.touch(state, t)  # a second chance, at the back
            if victim is None:
                victim = next(iter(clients.values()))
            del clients[victim.key]
            evicted.append(victim)
        self._evictions += len(evicted)
        return evicted
