"""What the data plane's enforcement table must hold (issue 16).

The data plane never waits for the engine: it looks each attempt's client up
in an enforcement table (and the engine judges the attempt after the fact,
``Engine.admit`` with what the table did), and the brain keeps that
table in step with the engine: after each batch of events, wake-up, operator
lever or reload, it asks ``Engine.enforcement(key, t)`` for the keys it touched
and ``Engine.breaker_enforcement(t)`` for the breakers (each route's), and
writes the answers.

Only *enforced* restrictions appear here, with the same precedence as
``Engine.admit``: what admit would only observe (observe mode, outside the
rollout, allow-listed) is left out, so the table never needs to know the mode.
All times are the engine's (the caller's monotonic seconds). Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeAlias

BreakerStateName: TypeAlias = Literal["closed", "open", "half_open"]


@dataclass(frozen=True, slots=True)
class CooldownEnforcement:
    """An enforced cooldown: refuse until ``until``, naming ``rule``."""

    until: float
    rule: str


@dataclass(frozen=True, slots=True)
class KeyEnforcement:
    """What the table must hold for one client key at one instant."""

    cooldown: CooldownEnforcement | None = None
    # min_interval: no attempt before this time (None: no deadline now).
    not_before: float | None = None
    # max_concurrent with on_max_concurrent reject-new: the key has its limit open.
    at_capacity: bool = False

    def restricts(self, t: float) -> bool:
        """Whether anything here still refuses an attempt at ``t``."""
        return (
            (self.cooldown is not None and self.cooldown.until > t)
            or (self.not_before is not None and self.not_before > t)
            or self.at_capacity
        )


NONE = KeyEnforcement()


@dataclass(frozen=True, slots=True)
class BreakerEnforcement:
    """A breaker as the table admits with it.

    ``open``: refuse until ``until``, then let ``probes`` through (the table
    goes half-open by itself, from the same budget). ``half_open``: ``probes``
    more probes, the rest refused with ``retry_after``. ``enforced`` False
    (observe mode): probes are taken but nothing is refused."""

    name: str
    state: BreakerStateName
    until: float = 0.0
    retry_after: float = 0.0
    probes: int = 0
    enforced: bool = True
    # Clients whose probe failed since the breaker last closed: the table gives
    # them no probe before ``no_probe_until``, as the engine gives them none
    # (CircuitBreaker.failed_probers, CircuitBreaker.bars).
    no_probe: frozenset[str] = frozenset()
    no_probe_until: float = 0.0
    # The route (its path_prefix) it is the breaker of: the table judges an
    # attempt by its own route's breakers only.
    route: str = ""


__all__ = ["BreakerEnforcement", "CooldownEnforcement", "KeyEnforcement", "NONE"]
