"""Building the read-only views from engine state (metrics snapshot, admin API).

Kept apart from the engine's hot path: these run at scrape time or on an
operator's request and may iterate, sort and allocate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .breaker import CircuitBreaker
from .findings import SEVERITY_RANK
from .fleet import Fleet
from .history import HistoryEntry, unpack
from .rules.evidence import close_codes
from .state import ClientState, ClientStore
from .views import ClientView, EngineSnapshot, FindingView

_STATUS_RANK = {"cooldown": 0, "critical": 1, "warning": 2, "ok": 3}


def status(state: ClientState, t: float, enforced: Callable[[ClientState], bool]) -> str:
    """`cooldown` only while loopwatch refuses the client: a cooldown the
    policy observes (observe mode, the allow list, outside the rollout) lets
    every attempt through, and said `cooldown` in the API and the CLI while
    the backend took them all (the docs probe). It shows as flagged: its
    findings' worst severity, `warning` without one."""
    cooling = state.cool_rule is not None and state.cool_until > t
    if cooling and enforced(state):
        return "cooldown"
    if state.flags:
        worst = max(SEVERITY_RANK[f.severity] for f in state.flags.values())
        return "critical" if worst == SEVERITY_RANK["critical"] else "warning"
    return "warning" if cooling else "ok"


def rank(state: ClientState, t: float, enforced: Callable[[ClientState], bool]) -> int:
    return _STATUS_RANK[status(state, t, enforced)]


# rule name → (check, evidence, settings block), for evidence as of the view's time
RuleViews = Mapping[str, tuple[Callable[[ClientState, Any, float], str | None], Callable[[ClientState, Any, float], dict[str, Any]], Any]]


def _evidence(state: ClientState, rule: str, raised: Mapping[str, Any], t: float, rules: RuleViews) -> Mapping[str, Any]:
    """Fresh evidence while the rule still matches; what was raised once it does not."""
    view = rules.get(rule)
    if view is None:
        return raised
    check, evidence, block = view
    return evidence(state, block, t) if check(state, block, t) is not None else raised


def client_view(
    state: ClientState,
    t: float,
    tau: float,
    quiet: float,
    rules: RuleViews,
    *,
    history: bool,
    enforced: Callable[[ClientState], bool],
) -> ClientView:
    """`enforced`: whether a running cooldown refuses now (the engine's test, the
    policy in force applied: allow list, observe mode, rollout)."""
    cooling = state.cool_rule is not None and state.cool_until > t
    flags = state.flags or {}
    failures = state.failures
    entries: tuple[HistoryEntry, ...] = ()
    ring = state.history
    if history and ring is not None:
        entries = tuple(unpack(ring[i], int(ring[i + 1])) for i in range(0, len(ring), 2))
    return ClientView(
        key=state.key,
        status=status(state, t, enforced),
        attempts_total=state.attempts,
        attempts_per_second=state.rate_at(t, tau),
        open_connections=state.open_count,
        first_seen=state.first_seen,
        last_seen=state.last_seen,
        # The fast or the steady streak.
        consecutive_auth_failures=max(failures.streak, failures.steady) if failures is not None else 0,
        close_codes=close_codes(state),
        cooldown_remaining=state.cool_until - t if cooling else 0.0,
        cooldown_until=state.cool_until if cooling else None,
        cooldown_rule=state.cool_rule if cooling else None,
        cooldown_repeat=state.cool_repeat,
        cooldown_enforced=cooling and enforced(state),
        findings=tuple(
            FindingView(
                rule=rule,
                severity=flag.severity,
                raised_at=flag.raised.t,
                last_match=flag.last_match,
                clears_at=flag.clears_at(quiet),
                evidence=_evidence(state, rule, flag.raised.evidence, t, rules),
            )
            for rule, flag in flags.items()
        ),
        history=entries,
    )


def breaker_states(breakers: Iterable[CircuitBreaker]) -> dict[str, dict[str, str]]:
    """route → breaker name → state."""
    out: dict[str, dict[str, str]] = {}
    for b in breakers:
        out.setdefault(b.route, {})[b.name] = b.state.value
    return out


def snapshot(
    t: float,
    *,
    store: ClientStore,
    notable: Iterable[ClientState],
    flagged: Mapping[str, Mapping[str, int]],
    enforced: Callable[[ClientState], bool],
    breakers: Mapping[str, Mapping[str, str]],
    fleet: Fleet,
    top: tuple[tuple[str, float], ...],
) -> EngineSnapshot:
    cooling = observed = 0
    for state in notable:
        if state.cool_rule is not None and state.cool_until > t:
            if enforced(state):
                cooling += 1
            else:
                observed += 1
    return EngineSnapshot(
        t=t,
        clients_tracked=len(store),
        clients_in_cooldown=cooling,
        clients_in_observed_cooldown=observed,
        clients_flagged={rule: sum(by_severity.values()) for rule, by_severity in flagged.items()},
        clients_flagged_by_severity={rule: dict(by_severity) for rule, by_severity in flagged.items()},
        breakers={route: dict(b) for route, b in breakers.items()},
        evictions_total=store.evictions,
        fleet_attempt_rate=fleet.rate(t),
        fleet_baseline_rate=fleet.baseline_at(t),
        fleet_auth_failure_ratio=fleet.auth_failure_ratio(t),
        storm=fleet.storm(t),
        storms_total=fleet.storms,
        top_offenders=top,
    )
