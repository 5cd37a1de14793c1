"""A discrete-event simulator around the engine: clients, a backend, synthetic time.

Clients are small programs ("how long do I wait after this result?"), the
backend is a function ("what happens to this admitted attempt?"), and the
simulator plays them against one ``Engine`` in time order, calling ``wake``
whenever ``next_wake`` asks — exactly what the proxy does, minus sockets.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from loopwatch.detectors.actions import Action, CloseConnection, CooldownStarted, WouldReject
from loopwatch.detectors.decisions import Admit, Outcome, Reject
from loopwatch.detectors.engine import Engine
from loopwatch.detectors.events import Attempt, Closed, HandshakeFailed, Opened
from loopwatch.detectors.findings import Finding

HANDSHAKE = 0.005


@dataclass(frozen=True)
class Close:
    """The backend accepts, then the connection ends after ``lived`` with ``code``."""

    lived: float
    code: int = 1000
    initiator: Literal["client", "upstream", "proxy"] = "upstream"


@dataclass(frozen=True)
class Fail:
    """The backend refuses the handshake (status) or cannot be reached (status None)."""

    status: int | None
    error: str | None = None


@dataclass(frozen=True)
class Stay:
    """The backend accepts and the connection stays open."""


Backend = Callable[[str, int, float], Close | Fail | Stay]
# A client's next move after a result: seconds to wait, or None to stop.
Result = Literal["rejected", "closed", "failed"]


@dataclass
class Client:
    key: str
    start: float
    # (result, detail) → delay before the next attempt, or None to stop
    policy: Callable[[Result, object], float | None]
    addr: str = ""
    attempts: int = 0


@dataclass
class Log:
    decisions: list[tuple[float, str, Admit | Reject]] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)

    def raised(self) -> list[Finding]:
        return [f for o in self._all() for f in o.raised]

    def cleared(self) -> list[Finding]:
        return [f for o in self._all() for f in o.cleared]

    def actions(self) -> list[Action]:
        return [a for o in self._all() for a in o.actions]

    def cooldowns(self) -> list[CooldownStarted]:
        return [a for a in self.actions() if isinstance(a, CooldownStarted)]

    def closes(self) -> list[CloseConnection]:
        return [a for a in self.actions() if isinstance(a, CloseConnection)]

    def would_rejects(self) -> list[WouldReject]:
        return [a for a in self.actions() if isinstance(a, WouldReject)]

    def rejects(self, key: str | None = None) -> list[tuple[float, Reject]]:
        return [(t, d) for t, k, d in self.decisions if isinstance(d, Reject) and key in (None, k)]

    def decisions_of(self, key: str) -> list[tuple[float, Admit | Reject]]:
        return [(t, d) for t, k, d in self.decisions if k == key]

    def admits(self, key: str | None = None) -> list[tuple[float, Admit]]:
        return [(t, d) for t, k, d in self.decisions if isinstance(d, Admit) and key in (None, k)]

    def _all(self) -> Iterator[Outcome]:
        yield from self.outcomes
        for _, _, d in self.decisions:
            yield d.outcome


class Sim:
    def __init__(self, engine: Engine, backend: Backend) -> None:
        self.engine = engine
        self.backend = backend
        self.log = Log()
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[[float], None]]] = []
        self._seq = itertools.count()
        self._conns = itertools.count(1)
        self.open: dict[int, tuple[str, float]] = {}  # conn_id → (key, opened)

    def at(self, t: float, fn: Callable[[float], None]) -> None:
        heapq.heappush(self._queue, (t, next(self._seq), fn))

    def add(self, client: Client) -> None:
        self.at(client.start, lambda t: self._attempt(client, t))

    def run(self, until: float) -> Log:
        engine = self.engine
        inf = float("inf")
        while True:
            nxt = self._queue[0][0] if self._queue else inf
            wake = engine.next_wake
            wake = inf if wake is None else wake
            if min(nxt, wake) > until:
                break
            if wake <= nxt:
                self.now = max(self.now, wake)
                self.log.outcomes.append(engine.wake(self.now))
                after = engine.next_wake
                # wake() must make progress, or a proxy would spin on its timer
                assert after is None or after > self.now, (after, self.now)
            else:
                self._step()
        self.now = max(self.now, until)
        self.log.outcomes.append(engine.wake(self.now))
        return self.log

    def _step(self) -> None:
        t, _, fn = heapq.heappop(self._queue)
        self.now = max(self.now, t)
        fn(self.now)

    def _attempt(self, client: Client, t: float) -> None:
        client.attempts += 1
        decision = self.engine.admit(Attempt(client.key, "/ws", t, client.addr))
        self.log.decisions.append((t, client.key, decision))
        if isinstance(decision, Reject):
            self._next(client, t, "rejected", decision)
            return
        for action in decision.outcome.actions:
            if isinstance(action, CloseConnection):
                self._proxy_close(action, t)
        result = self.backend(client.key, client.attempts, t)
        if isinstance(result, Fail):
            end = t + HANDSHAKE
            self.at(end, lambda t_: self._failed(client, t_, result))
            return
        cid = next(self._conns)
        self.at(t + HANDSHAKE, lambda t_: self._opened(client, t_, cid))
        if isinstance(result, Close):
            self.at(t + HANDSHAKE + result.lived, lambda t_: self._closed(client, t_, cid, result))

    def _failed(self, client: Client, t: float, result: Fail) -> None:
        self.log.outcomes.append(
            self.engine.record(HandshakeFailed(client.key, "/ws", t, result.status, result.error))
        )
        self._next(client, t, "failed", result.status)

    def _opened(self, client: Client, t: float, cid: int) -> None:
        self.open[cid] = (client.key, t)
        self.log.outcomes.append(self.engine.record(Opened(client.key, "/ws", t, cid)))

    def _closed(self, client: Client, t: float, cid: int, result: Close) -> None:
        if cid not in self.open:
            return  # closed earlier by the proxy
        _, opened = self.open.pop(cid)
        event = Closed(client.key, "/ws", t, cid, result.code, "", result.initiator, t - opened)
        self.log.outcomes.append(self.engine.record(event))
        self._next(client, t, "closed", result.code)

    def _proxy_close(self, action: CloseConnection, t: float) -> None:
        cid = int(action.conn_id)
        key, opened = self.open.pop(cid)
        event = Closed(key, "/ws", t, cid, action.code, action.reason, "proxy", t - opened)
        self.log.outcomes.append(self.engine.record(event))

    def _next(self, client: Client, t: float, result: Result, detail: object) -> None:
        delay = client.policy(result, detail)
        if delay is not None:
            self.at(t + delay, lambda t_: self._attempt(client, t_))


# --- client programs ---------------------------------------------------------


def fixed(delay: float) -> Callable[[Result, object], float | None]:
    """Retries after every result with the same delay: the incident's loop."""
    return lambda result, detail: delay


def once() -> Callable[[Result, object], float | None]:
    return lambda result, detail: None


def backoff(delays: list[float], then: float | None = None) -> Callable[[Result, object], float | None]:
    """Waits delays[0], delays[1], … after failures; after the list, ``then`` (None: stop)."""
    it = iter(delays)
    return lambda result, detail: next(it, then)


def fixed_client() -> Callable[[Result, object], float | None]:
    """The incident's fix: at most 3 retries with backoff 1, 2, 4 s, then a 5 s pause."""
    cycle = itertools.cycle([1.0, 2.0, 4.0, 5.0])
    return lambda result, detail: next(cycle)


def always(result: Close | Fail | Stay) -> Backend:
    return lambda key, n, t: result
