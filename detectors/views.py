"""Read-only views for metrics and the admin API: frozen, with ``to_dict`` for JSON."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .actions import BreakerTransition
from .history import HistoryEntry


@dataclass(frozen=True, slots=True)
class FindingView:
    """A client's standing flag for one rule."""

    rule: str
    severity: str
    raised_at: float
    last_match: float
    clears_at: float  # if the rule does not match again
    evidence: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "severity": self.severity,
            "raised_at": self.raised_at,
            "last_match": self.last_match,
            "clears_at": self.clears_at,
            "evidence": dict(self.evidence),
        }


@dataclass(frozen=True, slots=True)
class ClientView:
    key: str
    status: str  # cooldown | critical | warning | ok (worst first)
    attempts_total: int
    attempts_per_second: float
    open_connections: int
    first_seen: float
    last_seen: float
    consecutive_auth_failures: int
    close_codes: Mapping[str, int]
    cooldown_remaining: float  # 0 when not in cooldown
    cooldown_until: float | None
    cooldown_rule: str | None
    cooldown_repeat: int
    cooldown_enforced: bool
    findings: tuple[FindingView, ...]
    history: tuple[HistoryEntry, ...]  # oldest first; empty in list views

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "status": self.status,
            "attempts_total": self.attempts_total,
            "attempts_per_second": self.attempts_per_second,
            "open_connections": self.open_connections,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "consecutive_auth_failures": self.consecutive_auth_failures,
            "close_codes": dict(self.close_codes),
            "cooldown": {
                "remaining": self.cooldown_remaining,
                "until": self.cooldown_until,
                "rule": self.cooldown_rule,
                "repeat": self.cooldown_repeat,
                "enforced": self.cooldown_enforced,
            },
            "findings": [f.to_dict() for f in self.findings],
            "history": [h.to_dict() for h in self.history],
        }


@dataclass(frozen=True, slots=True)
class BreakerView:
    name: str  # upstream | auth
    route: str  # the route (path_prefix) it is the breaker of
    enabled: bool
    state: str  # closed | open | half_open
    calls: int  # in the window (closed state)
    failures: int
    failure_ratio: float
    retry_after: float  # seconds until it may half-open; 0 unless open
    open_wait: float  # the wait of the current (or next) trip
    trips: int  # consecutive trips (escalation)
    probes_permitted: int
    probes_succeeded: int
    transitions_total: Mapping[str, int]  # by target state
    last_trip: BreakerTransition | None  # the last time it opened, and why
    t: float  # when this view was taken (for the trip's age)

    def to_dict(self) -> dict[str, Any]:
        trip = self.last_trip
        return {
            "name": self.name,
            "route": self.route,
            "enabled": self.enabled,
            "state": self.state,
            "calls": self.calls,
            "failures": self.failures,
            "failure_ratio": self.failure_ratio,
            "retry_after": self.retry_after,
            "open_wait": self.open_wait,
            "trips": self.trips,
            "probes_permitted": self.probes_permitted,
            "probes_succeeded": self.probes_succeeded,
            "transitions_total": dict(self.transitions_total),
            "last_trip": None
            if trip is None
            else {"cause": trip.cause, "calls": trip.calls, "failures": trip.failures, "ago": self.t - trip.t},
        }


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    """Current-state numbers, read by the metrics collector at scrape time."""

    t: float
    clients_tracked: int
    clients_in_cooldown: int  # enforced cooldowns
    clients_in_observed_cooldown: int  # would-be cooldowns (observe mode, rollout, allow list)
    clients_flagged: Mapping[str, int]  # rule → clients with a standing finding
    # rule → severity → clients whose standing finding of the rule has that severity
    # (raised at it, or escalated to it): a loop goes on paging while its flag stands.
    clients_flagged_by_severity: Mapping[str, Mapping[str, int]]
    breakers: Mapping[str, Mapping[str, str]]  # route → name → state
    evictions_total: int
    fleet_attempt_rate: float  # attempts per second, fleet-wide
    fleet_baseline_rate: float
    fleet_auth_failure_ratio: float
    storm: bool
    storms_total: int  # storms begun (judged once a second), since start
    top_offenders: tuple[tuple[str, float], ...]  # (key, attempts per second), worst first

    def to_dict(self) -> dict[str, Any]:
        return {
            "t": self.t,
            "clients_tracked": self.clients_tracked,
            "clients_in_cooldown": self.clients_in_cooldown,
            "clients_in_observed_cooldown": self.clients_in_observed_cooldown,
            "clients_flagged": dict(self.clients_flagged),
            "clients_flagged_by_severity": {r: dict(s) for r, s in self.clients_flagged_by_severity.items()},
            "breakers": {route: dict(b) for route, b in self.breakers.items()},
            "evictions_total": self.evictions_total,
            "fleet_attempt_rate": self.fleet_attempt_rate,
            "fleet_baseline_rate": self.fleet_baseline_rate,
            "fleet_auth_failure_ratio": self.fleet_auth_failure_ratio,
            "storm": self.storm,
            "storms_total": self.storms_total,
            "top_offenders": [{"key": k, "attempts_per_second": r} for k, r in self.top_offenders],
        }
