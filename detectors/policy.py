"""Turning findings into decisions: modes, cooldown math, rollout, access lists.

Pure functions and one small class over ``PolicySettings``; the engine calls
them, so each piece of policy can be tested without events.

Cooldown length for the n-th offence within ``memory`` of the previous one::

    min(base × factor^(n−1), max) × (1 ± jitter), reflected below max

Jitter comes from the engine's seeded ``random.Random``: clients refused
together are told different retry times, so they do not come back in step, and
the same event sequence still yields the same decisions.
"""

from __future__ import annotations

import hashlib
import random

from .access import AccessList
from .actions import CooldownStarted
from .findings import SEVERITY_RANK
from .settings import CooldownSettings, Mode, PolicySettings, RuleSettings
from .state import ClientState
from .units import escalated

ROLLOUT_BUCKETS = 10_000
_ENFORCE_RANK = {"warning": SEVERITY_RANK["warning"], "critical": SEVERITY_RANK["critical"], "never": 99}


def rollout_bucket(key: str) -> int:
    """A stable bucket 0..9999 for a key: the same on every replica and every run.

    ``hash()`` is salted per process, so it would re-draw the rollout population
    on each restart; blake2b is stable and fast.
    """
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % ROLLOUT_BUCKETS


def in_rollout(state: ClientState, percent: float) -> bool:
    if percent >= 100.0:
        return True
    if percent <= 0.0:
        return False
    if state.bucket < 0:
        state.bucket = rollout_bucket(state.key)
    return state.bucket < percent * (ROLLOUT_BUCKETS / 100.0)


def rule_mode(rule: RuleSettings, policy: PolicySettings) -> Mode:
    return rule.mode if rule.mode is not None else policy.mode


def enforces(rule: RuleSettings, severity: str) -> bool:
    """Whether a finding of ``severity`` from ``rule`` starts a cooldown (enforce_on)."""
    return SEVERITY_RANK[severity] >= _ENFORCE_RANK[rule.enforce_on]


# The repeat count kept for a client: offences past it escalate no further
# (the cooldown is at its max long before), and a repeat count from another
# replica came off the network.
MAX_REPEAT = 65


def cooldown_length(settings: CooldownSettings, repeat: int) -> float:
    """Nominal cooldown for the ``repeat``-th offence (1-based), before jitter."""
    return escalated(settings.base, settings.factor, min(repeat, MAX_REPEAT) - 1, settings.max)


def jittered(settings: CooldownSettings, nominal: float, rng: random.Random) -> float:
    if not settings.jitter:
        return nominal
    spread = nominal * (1.0 + settings.jitter * (2.0 * rng.random() - 1.0))
    # Reflected at max, not cut: cut, half of the clients at the cap would be
    # told exactly max and come back in step; reflected, they spread below it.
    return spread if spread <= settings.max else 2.0 * settings.max - spread


def start_cooldown(
    state: ClientState,
    settings: CooldownSettings,
    t: float,
    rule: str,
    enforced: bool,
    rng: random.Random,
) -> CooldownStarted:
    """Put ``state`` in cooldown now; a repeat within ``memory`` of the last one escalates."""
    if state.cool_repeat and t - state.cool_until < settings.memory:
        repeat = state.cool_repeat + 1
    else:
        repeat = 1
    duration = jittered(settings, cooldown_length(settings, repeat), rng)
    return _set(state, settings, t, t + duration, rule, repeat, enforced)


def force_cooldown(
    state: ClientState, settings: CooldownSettings, t: float, duration: float
) -> CooldownStarted:
    """An operator's cooldown: exactly ``duration``, always enforced, not a repeat:
    the client's repeat count stays what its rules' cooldowns made it (0 for a
    client never cooled down), so its next cooldown by a rule is no longer for
    an operator having stepped in."""
    return _set(state, settings, t, t + duration, "manual", state.cool_repeat, True)


def _set(
    state: ClientState,
    settings: CooldownSettings,
    t: float,
    until: float,
    rule: str,
    repeat: int,
    enforced: bool,
) -> CooldownStarted:
    state.cool_until = until
    state.cool_rule = rule
    state.cool_repeat = repeat
    state.cool_enforced = enforced
    # Keep the client (and so its repeat count) for as long as a repeat would count.
    state.keep_until = until + settings.memory
    return CooldownStarted(state.key, t, until, until - t, rule, repeat, enforced)


class Policy:
    """``PolicySettings`` with its access lists compiled once."""

    __slots__ = ("settings", "allow", "deny", "allowing", "denying")

    def __init__(self, settings: PolicySettings) -> None:
        self.settings = settings
        self.allow = AccessList(settings.allow)
        self.deny = AccessList(settings.deny)
        # Whether each list has entries, asked at every attempt: known once.
        self.allowing = bool(self.allow)
        self.denying = bool(self.deny)

    def denied(self, key: str, addr: str) -> bool:
        return self.denying and self.deny.matches(key, addr)

    def allowed(self, key: str, addr: str) -> bool:
        return self.allowing and self.allow.matches(key, addr)

    def enforcing(self, state: ClientState, mode: Mode, addr: str = "") -> bool:
        """Whether a decision in ``mode`` is enforced for this client (else observed)."""
        return (
            mode == "enforce"
            and in_rollout(state, self.settings.rollout_percent)
            and not self.allowed(state.key, addr)
        )
