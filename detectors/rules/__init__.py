"""The rules, one module each: pure functions of (client state, rule settings, t).

``RULES`` is the registry the engine iterates; each entry knows how to find its
own settings block, so adding a rule is a module plus one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from detectors.findings import Finding
from detectors.rules import (
    auth_failure_loop,
    duplicate_connections,
    no_backoff,
    rapid_reconnect,
    short_lived,
)
from detectors.settings import RuleSettings, RulesSettings
from detectors.state import ClientState


class Rule(NamedTuple):
    name: str
    evaluate: Callable[[ClientState, Any, float], Finding | None]
    settings: Callable[[RulesSettings], RuleSettings]
    # When the verdict may change with no new event (None: only events change it).
    recheck_at: Callable[[ClientState, Any, float], float | None] | None = None


RULES: tuple[Rule, ...] = (
    Rule(auth_failure_loop.NAME, auth_failure_loop.evaluate, lambda r: r.auth_failure_loop),
    Rule(rapid_reconnect.NAME, rapid_reconnect.evaluate, lambda r: r.rapid_reconnect),
    Rule(short_lived.NAME, short_lived.evaluate, lambda r: r.short_lived),
    Rule(
        duplicate_connections.NAME,
        duplicate_connections.evaluate,
        lambda r: r.duplicate_connections,
        duplicate_connections.recheck_at,
    ),
    Rule(no_backoff.NAME, no_backoff.evaluate, lambda r: r.no_backoff),
)
RULE_NAMES: tuple[str, ...] = tuple(rule.name for rule in RULES)

__all__ = ["RULES", "RULE_NAMES", "Rule"]
