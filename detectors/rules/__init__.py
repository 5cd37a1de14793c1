"""The rules, one module each: pure functions of (client state, rule settings, t).

``RULES`` is the registry the engine iterates; each entry knows how to find its
own settings block, so adding a rule is a module plus one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from ..findings import Finding, Severity
from ..settings import RuleSettings, RulesSettings
from ..state import ClientState
from . import (
    auth_failure_loop,
    duplicate_connections,
    no_backoff,
    rapid_reconnect,
    short_lived,
)


class Rule(NamedTuple):
    name: str
    check: Callable[[ClientState, Any, float], Severity | None]
    evidence: Callable[[ClientState, Any, float], dict[str, Any]]
    settings: Callable[[RulesSettings], RuleSettings]
    # When the verdict may change with no new event (None: only events change it).
    recheck_at: Callable[[ClientState, Any, float], float | None] | None = None
    # The ClientState field the rule counts (``failures``: the rings in it): while
    # it is None, ``check`` cannot match, so the engine skips the call for a
    # client the rule has not flagged.
    needs: str | None = None

    def evaluate(self, state: ClientState, settings: Any, t: float) -> Finding | None:
        level = self.check(state, settings, t)
        if level is None:
            return None
        return Finding(state.key, self.name, level, self.evidence(state, settings, t), t)


RULES: tuple[Rule, ...] = (
    Rule(
        auth_failure_loop.NAME,
        auth_failure_loop.check,
        auth_failure_loop.evidence,
        lambda r: r.auth_failure_loop,
        needs="failures",
    ),
    Rule(
        rapid_reconnect.NAME,
        rapid_reconnect.check,
        rapid_reconnect.evidence,
        lambda r: r.rapid_reconnect,
        needs="bad_times",
    ),
    Rule(short_lived.NAME, short_lived.check, short_lived.evidence, lambda r: r.short_lived, needs="failures"),
    Rule(
        duplicate_connections.NAME,
        duplicate_connections.check,
        duplicate_connections.evidence,
        lambda r: r.duplicate_connections,
        duplicate_connections.recheck_at,
        needs="open",
    ),
    Rule(no_backoff.NAME, no_backoff.check, no_backoff.evidence, lambda r: r.no_backoff, needs="failures"),
)
RULE_NAMES: tuple[str, ...] = tuple(rule.name for rule in RULES)

__all__ = ["RULES", "RULE_NAMES", "Rule"]
