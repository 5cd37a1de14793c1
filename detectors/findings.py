"""Findings, and the hysteresis that keeps a flag from flapping.

A rule *matches* at an instant; a client is *flagged* from the first match
until the rule has not matched for ``quiet_period``. Observers see a finding
twice: when it is raised (first match, or escalation to a higher severity) and
when it clears. Between the two, matches only refresh the flag, so a loop at
50 attempts/s is one finding, not 50 a second.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

Severity: TypeAlias = Literal["warning", "critical"]
SEVERITY_RANK: dict[str, int] = {"warning": 1, "critical": 2}


@dataclass(frozen=True, slots=True)
class Finding:
    """A rule's verdict about one client at time ``t``; evidence is JSON-able."""

    key: str
    rule: str
    severity: Severity
    evidence: Mapping[str, Any]
    t: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "rule": self.rule,
            "severity": self.severity,
            "evidence": dict(self.evidence),
            "t": self.t,
        }


class Flag:
    """A raised finding while it lasts: what observers saw, and the latest evidence."""

    __slots__ = ("raised", "latest", "last_match")

    def __init__(self, finding: Finding) -> None:
        self.raised = finding  # the Finding observers were given (highest severity so far)
        self.latest = finding  # the most recent match, for fresh evidence in the admin view
        self.last_match = finding.t

    @property
    def severity(self) -> Severity:
        return self.raised.severity

    def clears_at(self, quiet_period: float) -> float:
        return self.last_match + quiet_period


def update(
    flags: dict[str, Flag], rule: str, match: Finding | None, t: float, quiet_period: float
) -> tuple[Finding | None, Finding | None]:
    """Apply one evaluation of ``rule`` at ``t``; returns (raised, cleared)."""
    flag = flags.get(rule)
    if match is not None:
        if flag is None:
            flags[rule] = Flag(match)
            return match, None
        flag.latest = match
        flag.last_match = t
        if SEVERITY_RANK[match.severity] > SEVERITY_RANK[flag.raised.severity]:
            # Escalation is news (warning → critical); de-escalation is not: the
            # flag keeps its worst severity until it clears as a whole.
            flag.raised = match
            return match, None
        return None, None
    if flag is not None and t - flag.last_match >= quiet_period:
        del flags[rule]
        return None, flag.raised
    return None, None
