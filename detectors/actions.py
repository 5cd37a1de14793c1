"""What the engine asks the proxy (and its observers) to do or know.

Actions are plain frozen records; the proxy acts on ``CloseConnection`` and
schedules ``wake`` from ``Engine.next_wake``, observers turn the rest into
metrics, logs and span events. ``to_dict`` gives one JSON object per action
with a ``"type"`` field, like events.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, TypeAlias

from .events import ConnId


@dataclass(frozen=True, slots=True)
class CooldownStarted:
    """A client is refused until ``until``; ``enforced`` is False in observe mode."""

    key: str
    t: float
    until: float
    duration: float
    rule: str  # the rule whose finding started it, or "manual" (admin API)
    repeat: int  # 1 for a first offence, n for the n-th within cooldown.memory
    enforced: bool = True

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self, "cooldown_started")


@dataclass(frozen=True, slots=True)
class CooldownEnded:
    key: str
    t: float
    # Forgotten while it still ran: the store was full and every client it
    # looked at held something (detectors/state.py, MemoryStore.EVICTION_SCAN).
    evicted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self, "cooldown_ended")


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """Close a live connection (max_concurrent close-oldest) at the next frame boundary."""

    key: str
    conn_id: ConnId
    code: int = 1008
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self, "close_connection")


@dataclass(frozen=True, slots=True)
class BreakerTransition:
    name: str
    t: float
    from_state: str
    to_state: str
    # When it opens, what made it (None otherwise): `cause` is failure_ratio (the
    # window's calls and failures reached the ratio), probe_failed or
    # probe_timeout (the probes let through, and those that failed or got no outcome).
    cause: str | None = None
    calls: int | None = None
    failures: int | None = None
    # The route whose breaker it is (its path_prefix): each route has its own.
    route: str = ""

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self, "breaker_transition")


@dataclass(frozen=True, slots=True)
class WouldReject:
    """Observe mode (or outside the rollout, or allow-listed): this would have been refused."""

    key: str
    t: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self, "would_reject")


Action: TypeAlias = CooldownStarted | CooldownEnded | CloseConnection | BreakerTransition | WouldReject


def _as_dict(action: Action, kind: str) -> dict[str, Any]:
    out: dict[str, Any] = {"type": kind}
    for f in fields(action):
        out[f.name] = getattr(action, f.name)
    return out
