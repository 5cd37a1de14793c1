"""The detection gate: identity → engine → refusal, engine wake-ups on the loop,
engine actions applied to live connections, everything shown to observers.

This is where the pure engine meets the event loop. Admission is synchronous:
identify the client, `engine.admit(...)`, and answer — no await between the
request head and the decision.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING

from ..detectors import events as ev
from ..detectors.actions import CloseConnection
from ..detectors.decisions import Outcome, Reject
from ..detectors.engine import Engine
from .dataplane.boundary import Connection, Gate, Refusal, RelayStats
from .dataplane.heads import RequestHead
from .dataplane.identity import Identifier
from .observe.observers import Observers
from .state.local import LocalState, StateStore

if TYPE_CHECKING:
    from ..detectors.settings import PolicySettings
    from .app.settings import Settings
    from .dataplane.listener import ProxyServer

REASON_TEXT = {
    "cooldown": "cooldown",
    "min_interval": "too soon after the last attempt",
    "max_concurrent": "too many connections",
    "deny": "denied",
    "circuit_open": "upstream unavailable",
}


# (reason, whole seconds, reject_with, close code) -> (how, status, text): a looping client is
# refused with the same words tens of times a second. Bounded; starts over when full.
_WORDING: dict[tuple[str, int, str, int], tuple[str, int, str]] = {}
_WORDING_SIZE = 1024


def refusal_for(reject: Reject, reject_with: str, hold: float = 0.0, close_code: int = 1013) -> Refusal:
    """How a rejection reaches the client. A browser reports every refused
    handshake as 1006, so close-1013 (accept, then close with a reason it can
    read) is the default; http-429 is cheapest for other clients. An open
    breaker answers 503: the service, not the client, is the problem.
    `hold` is the policy's hold for this reason (0: none); never past the retry time.
    `close_code`: 1013, or the application code policy.close_code sets instead."""
    retry = max(1, math.ceil(reject.retry_after))
    key = (reject.reason, retry, reject_with, close_code)
    wording = _WORDING.get(key)
    if wording is None:
        text = f"loopwatch: {REASON_TEXT.get(reject.reason, reject.reason)}, retry in {retry}s"
        if reject_with == "http-429":
            wording = ("http", 503 if reject.reason == "circuit_open" else 429, text)
        else:
            wording = ("close-1013", close_code, text)
        if len(_WORDING) >= _WORDING_SIZE:
            _WORDING.clear()
        _WORDING[key] = wording
    return Refusal(reject.reason, reject.retry_after, *wording, hold=min(hold, reject.retry_after))


class EngineGate(Gate):
    def __init__(
        self,
        engine: Engine,
        identifier: Identifier,
        observers: Observers,
        *,
        reject_with: str = "close-1013",
    ):
        self.engine = engine
        self.identifier = identifier
        self.observers = observers
        self.reject_with = reject_with
        self.close_code = engine.policy.close_code
        self.holds: dict[str, float] = {}  # reason -> hold seconds (policy.hold, hold_reasons)
        self.max_held = 0
        self.max_held_per_key = 0
        self.server: ProxyServer | None = None  # set by the runtime, for engine actions
        # Shares state with other replicas (state.backend: redis); LocalState
        # when nothing is shared. Telemetry reads its `up` and `errors`.
        self.state_store: StateStore = LocalState()
        self._wake: asyncio.TimerHandle | None = None
        self._wake_at: float | None = None
        self.set_holds(engine.policy)

    # --- the Gate interface ---------------------------------------------------

    def attempt(self, head: RequestHead, peer: str, route: str, t: float) -> tuple[Connection, Refusal | None]:
        client = self.identifier.identify(head.text_headers(), head.query, peer)
        conn = Connection(key=client.key, route=route, peer=client.address, t0=t, head=head)
        event = ev.Attempt(client.key, route, t, client.address)
        decision = self.engine.admit(event)
        refusal = None
        if isinstance(decision, Reject):  # how it is refused, on the record the observers see
            refusal = conn.refusal = refusal_for(
                decision, self.reject_with, self.holds.get(decision.reason, 0.0), self.close_code
            )
        self.observers.call("on_attempt", conn, event, decision)
        if refusal is not None:
            self.observers.call("on_rejected", conn, ev.Rejected(client.key, route, t, refusal.reason))
        self._apply(decision.outcome, t, conn)
        return conn, refusal

    def handshake_failed(self, conn: Connection, t: float, status: int | None, error: str | None) -> None:
        event = ev.HandshakeFailed(conn.key, conn.route, t, status, error)
        self.observers.call("on_handshake_failed", conn, event)
        self._apply(self.engine.record(event), t, conn)

    def held_answered(self, conn: Connection, t: float) -> None:
        # The engine judges retry intervals from the end of the previous attempt:
        # a held refusal ends when it is answered, or the hold would look like a
        # client's backoff and break the auth_failure_loop streaks.
        event = ev.Answered(conn.key, conn.route, t)
        self.observers.call("on_answered", conn, event)
        self._apply(self.engine.answered(event), t, conn)

    def opened(self, conn: Connection, t: float) -> None:
        conn.opened_at = t
        event = ev.Opened(conn.key, conn.route, t, conn.conn_id)
        self.observers.call("on_opened", conn, event)
        self._apply(self.engine.record(event), t, conn)

    def closed(
        self, conn: Connection, t: float, code: int, reason: str, initiator: str, stats: RelayStats
    ) -> None:
        event = ev.Closed(conn.key, conn.route, t, conn.conn_id, code, reason, initiator, t - conn.opened_at)  # type: ignore[arg-type]  # Gate.closed takes initiator as str; the relay passes only ev.Initiator values
        self.observers.call("on_closed", conn, event, stats)
        self._apply(self.engine.record(event), t, conn)

    # --- engine output --------------------------------------------------------

    def _apply(self, outcome: Outcome, t: float, conn: Connection | None = None) -> None:
        if outcome:
            for action in outcome.actions:
                if isinstance(action, CloseConnection) and not self.close_connection(
                    action.conn_id, action.code, action.reason
                ):
                    self.state_store.forward_close(action)  # close-oldest may pick another replica's
            self.observers.call("on_outcome", outcome, t, conn)
        self._schedule()

    def close_connection(self, conn_id: object, code: int, reason: str) -> bool:
        """Close one of this replica's connections (close-oldest, or another
        replica's request); False when it is not here (or already gone)."""
        relays = self.server.relays if self.server is not None else {}
        relay = relays.get(conn_id) if isinstance(conn_id, int) else None  # ids here are ints
        if relay is None:
            return False
        relay.close(code, reason)
        return True

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
        self._apply(self.engine.wake(now), now)

    def health_result(self, t: float, ok: bool) -> None:
        """An active health check's result (proxy/admin/upstream_health.py) for the upstream breaker."""
        self._apply(self.engine.record_health(t, ok), t)

    def kick(self) -> None:
        """Re-arm the wake-up timer after an operator changed the engine's state."""
        self._schedule()

    def reconfigure(self, settings: Settings) -> None:
        """Apply reloaded settings; per-client state and breaker states are kept."""
        self.engine.reconfigure(settings.detection, settings.policy, settings.breakers)
        self.identifier = Identifier(settings.identity)
        self.reject_with = settings.policy.reject_with
        self.close_code = settings.policy.close_code
        self.set_holds(settings.policy)
        self._schedule()

    def set_holds(self, policy: PolicySettings) -> None:
        """The hold per refusal reason and the bounds the listener holds within."""
        self.holds = dict.fromkeys(policy.hold_reasons, policy.hold) if policy.hold > 0 else {}
        self.max_held = policy.max_held
        self.max_held_per_key = policy.max_held_per_key

    def close(self) -> None:
        if self._wake is not None:
            self._wake.cancel()
