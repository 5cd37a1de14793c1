"""Helpers the rules share: thresholds to severity, and JSON-able evidence pieces.

Every rule is two functions: ``check`` (cheap, allocation-free: is there a
match now, and how severe?) and ``evidence`` (builds the JSON-able details).
The engine calls ``check`` on every event and ``evidence`` only when a finding
is news, or when an operator looks.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from typing import Any, TypeVar

from ..findings import Finding, Severity
from ..state import ClientState

S = TypeVar("S")


def severity(count: int, warning: int | None, critical: int | None) -> Severity | None:
    """The severity a count reaches; a None threshold is switched off."""
    if critical is not None and count >= critical:
        return "critical"
    if warning is not None and count >= warning:
        return "warning"
    return None


def lowest(warning: int | None, critical: int | None) -> int:
    """The smallest count that can match (thresholds are validated warning ≤ critical)."""
    if warning is not None:
        return warning
    return critical if critical is not None else 1 << 62


def close_codes(state: ClientState) -> dict[str, int]:
    """The client's close-code histogram with string keys (JSON objects need them)."""
    codes = state.codes
    if not codes:
        return {}
    return {("other" if code < 0 else str(code)): n for code, n in zip(codes[::2], codes[1::2], strict=True)}


def span(times: array[float] | None, count: int) -> tuple[float | None, float | None]:
    """First and last of the newest ``count`` times."""
    if not times or count <= 0:
        return None, None
    return times[-min(count, len(times))], times[-1]


def finding(
    name: str,
    check: Callable[[ClientState, S, float], Severity | None],
    evidence: Callable[[ClientState, S, float], dict[str, Any]],
    state: ClientState,
    settings: S,
    t: float,
) -> Finding | None:
    """``check`` then, on a match, the whole Finding."""
    level = check(state, settings, t)
    if level is None:
        return None
    return Finding(state.key, name, level, evidence(state, settings, t), t)
