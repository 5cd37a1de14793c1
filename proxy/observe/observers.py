"""Observers: telemetry, logs, the recorder and the status page watch the
connection lifecycle and the engine's output; none of them can break a relay.

Each observer gets every step of every attempt (with the engine event that
step produced) and every engine outcome. `Observers` calls them in order and
contains failures the way mitmproxy's `safecall` does: an observer that raises
is logged once per observer and counted, and the relay carries on.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ...detectors import events as ev
    from ...detectors.engine import Admit, Outcome, Reject
    from ...detectors.shared import SharedCooldown
    from ..app.settings import Settings
    from ..dataplane.boundary import Connection, LiveView, RelayStats, TraceContext

log = logging.getLogger("loopwatch.observers")


@dataclass(frozen=True, slots=True)
class Lever:
    """A change made to the engine at `t` (its clock) that is no traffic: an
    operator's cooldown, release or breaker reset (the admin port), another
    replica's cooldown or release (state.backend: redis), or a health check's
    result for a route's upstream breaker. Told to observers right after the
    engine took it, so the recorder writes it where the engine saw it and a
    replay applies it there (they decide later attempts)."""

    kind: Literal["cooldown", "release", "breaker_reset", "adopt", "health"]
    t: float
    key: str = ""  # cooldown, release, adopt
    duration: float = 0.0  # cooldown: the operator's seconds
    breaker: str = ""  # breaker_reset: upstream or auth
    route: str | None = None  # breaker_reset: None for every route; health: its route
    healthy: bool = True  # health: the check's result
    origin: str = ""  # "": this replica's admin port; else the replica (or "redis") it came from
    cooldown: SharedCooldown | None = None  # adopt: as received


class Observer:
    """Override what you need; every hook is called synchronously on the event loop
    and must not block."""

    name = "observer"
    # Hooks this observer does nothing in under its present settings (the event
    # log's access-line hooks with telemetry.access_log "off"): `Observers` does
    # not call them. Read again after every on_config, so a reload applies.
    idle_hooks: frozenset[str] = frozenset()

    def on_attempt(self, conn: Connection, event: ev.Attempt, decision: Admit | Reject) -> None:
        """An attempt, as the engine judged it (the data plane admitted or refused it already)."""

    def on_rejected(self, conn: Connection, event: ev.Rejected) -> None:
        """loopwatch refused the attempt (after on_attempt, unless the data plane's
        Attempt event was lost; once per attempt, whoever refused it)."""

    def on_handshake_failed(self, conn: Connection, event: ev.HandshakeFailed) -> None:
        pass

    def on_opened(self, conn: Connection, event: ev.Opened) -> None:
        pass

    def on_closed(self, conn: Connection, event: ev.Closed, stats: RelayStats) -> None:
        pass

    def on_answered(self, conn: Connection, event: ev.Answered) -> None:
        """A held refusal was answered (policy.hold)."""

    def on_outcome(self, outcome: Outcome, t: float, conn: Connection | None = None) -> None:
        """Findings raised/cleared and actions (cooldowns, breaker transitions …).

        `conn` is the attempt whose step produced the outcome (its span gets the
        finding, its trace id the exemplar); None for wake-ups and operator calls."""

    def on_lever(self, lever: Lever) -> None:
        """The engine took a change that is no traffic (`Lever`); its outcome, if
        any, comes with the engine's next call, as for every operator call."""

    def on_config(self, settings: Settings, info: dict[str, object]) -> None:
        """Settings were loaded at start or by a reload (`info`: reload, result
        ok/error, source, errors, restart_required). After a failed reload
        `settings` are the ones still running."""


def reload_applied(info: dict[str, Any]) -> bool:
    """Whether an `on_config` call is a reload that took effect (not the start,
    not a refused one)."""
    return bool(info.get("reload")) and info.get("result") == "ok"


class Observers:
    """An explicit, ordered list of observers with failure containment.

    `call` runs on every step of every connection, so each hook's bound methods
    are looked up once (when first called after the list changed, or after an
    on_config) and observers that leave a hook as `Observer`'s no-op, or list
    it in their `idle_hooks`, are not called for it at all.
    """

    def __init__(self, observers: list[Observer] | None = None):
        self.observers: list[Observer] = list(observers or [])
        self.errors: Counter[str] = Counter()
        # hook -> ((observer, bound method or None), …) for the observers that
        # implement it; None: the attribute is missing, getattr raises at call time.
        self._hooks: dict[str, tuple[tuple[Observer, Any], ...]] = {}
        self._seen: list[Observer] = []  # the list the table was built for

    def add(self, observer: Observer) -> None:
        self.observers.append(observer)
        self._hooks.clear()

    def _bound(self, hook: str) -> tuple[tuple[Observer, Any], ...]:
        if self._seen != self.observers:  # changed behind add()'s back
            self._hooks.clear()
            self._seen = list(self.observers)
        noop = getattr(Observer, hook, None)
        out = []
        for observer in self.observers:
            method = getattr(observer, hook, None)
            if noop is not None and getattr(method, "__func__", None) is noop:
                continue  # the base class's no-op
            if hook in getattr(observer, "idle_hooks", ()):
                continue  # nothing to do under the observer's present settings
            out.append((observer, method))
        bound = self._hooks[hook] = tuple(out)
        return bound

    def call(self, hook: str, *args: object) -> None:
        bound = self._hooks.get(hook)
        if bound is None or len(self._seen) != len(self.observers):
            bound = self._bound(hook)
        for observer, method in bound:
            try:
                if method is None:
                    method = getattr(observer, hook)
                method(*args)
            except Exception:
                name = observer.name
                if not self.errors[name]:  # once per observer; later failures are only counted
                    log.error(
                        "observer_error", exc_info=True, extra={"fields": {"observer": name, "hook": hook}}
                    )
                self.errors[name] += 1
        if hook == "on_config":  # settings changed: so may the observers' idle hooks
            self._hooks.clear()


def trace_context(view: LiveView | None, conn: Connection | None, key: str | None = None) -> TraceContext | None:
    """The trace a line or an exemplar about this step points at: the step's
    connection's, or (without one, or when `key` is another client's) that of the
    client's oldest open connection on this replica. Read off the connections'
    records (`Connection.trace`, written by the tracing observer), never asked of
    another observer."""
    if conn is not None and conn.trace is not None and (key is None or conn.key == key):
        return conn.trace
    if key is None or view is None:
        return None
    for conn_id in view.open_ids(key):
        found = view.connection(conn_id)
        if found is not None and found.key == key and found.trace is not None:
            return found.trace
    return None
