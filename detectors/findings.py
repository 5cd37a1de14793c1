"""Findings, and the hysteresis that keeps a flag from flapping.

A rule *matches* at an instant; a client is *flagged* from the first match
until the rule has not matched for ``quiet_period``. Observers see a finding
twice: when it is raised (first match, or escalation to a higher severity) and
when it clears. Between the two, matches only refresh the flag — without
building evidence — so a loop at 50 attempts/s is one finding, not 50 a
second, and costs a few comparisons per event.
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
    """A raised finding while it lasts."""

    __slots__ = ("raised", "last_match")

    def __init__(self, finding: Finding) -> None:
        self.raised = finding  # what observers were given (the highest severity so far)
        self.last_match = finding.t

    @property
    def severity(self) -> Severity:
        return self.raised.severity

    def clears_at(self, quiet_period: float) -> float:
        return self.last_match + quiet_period


def is_news(flag: Flag | None, severity: Severity) -> bool:
    """A first match, or an escalation (warning → critical). De-escalation is not
    news: a flag keeps its worst severity until it clears as a whole."""
    return flag is None or SEVERITY_RANK[severity] > SEVERITY_RANK[flag.raised.severity]


def expired(flag: Flag, t: float, quiet_period: float) -> bool:
    # The same arithmetic as clears_at, which is when the engine asks to be
    # woken: ``t - last_match >= quiet`` can round the other way at that instant.
    return t >= flag.last_match + quiet_period
