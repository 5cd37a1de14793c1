"""The engine's answers: ``Outcome`` for every call, ``Admit``/``Reject`` for ``admit``.

The common answer is "nothing new", so ``EMPTY`` and ``ADMITTED`` are shared
singletons: the hot path allocates nothing when nothing happens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from .actions import Action
from .findings import Finding

RejectReason: TypeAlias = Literal["cooldown", "min_interval", "max_concurrent", "deny", "circuit_open"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """Findings raised and cleared, and actions taken, by one engine call."""

    raised: tuple[Finding, ...] = ()
    cleared: tuple[Finding, ...] = ()
    actions: tuple[Action, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.raised or self.cleared or self.actions)

    def to_dict(self) -> dict[str, Any]:
        return {
            "raised": [f.to_dict() for f in self.raised],
            "cleared": [f.to_dict() for f in self.cleared],
            "actions": [a.to_dict() for a in self.actions],
        }


EMPTY = Outcome()


@dataclass(frozen=True, slots=True)
class Reject:
    """Refuse the attempt; it never reaches the upstream.

    ``retry_after`` is seconds (for the 1013 close reason or Retry-After);
    ``breaker`` names the breaker for ``circuit_open``.
    """

    reason: RejectReason
    retry_after: float
    breaker: str | None = None
    detail: str = ""
    outcome: Outcome = EMPTY

    @property
    def admitted(self) -> bool:
        return False

    def to_dict(self) -> dict[str, Any]:
        return {
            "decision": "reject",
            "reason": self.reason,
            "retry_after": self.retry_after,
            "breaker": self.breaker,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class Admit:
    """Let the attempt through.

    ``would_reject`` is what enforcement would have done (observe mode, outside
    the rollout, allow-listed). ``probes`` names the half-open breakers this
    attempt is a probe for; the engine attributes its outcome itself, so the
    proxy need not care.
    """

    would_reject: Reject | None = None
    probes: tuple[str, ...] = ()
    outcome: Outcome = EMPTY

    @property
    def admitted(self) -> bool:
        return True

    @property
    def probe(self) -> bool:
        return bool(self.probes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "decision": "admit",
            "would_reject": None if self.would_reject is None else self.would_reject.to_dict(),
            "probes": list(self.probes),
        }


ADMITTED = Admit()
