"""Helpers the rules share: thresholds to severity, and JSON-able evidence pieces."""

from __future__ import annotations

from array import array

from detectors.findings import Severity
from detectors.state import ClientState


def severity(count: int, warning: int | None, critical: int | None) -> Severity | None:
    """The severity a count reaches; a None threshold is switched off."""
    if critical is not None and count >= critical:
        return "critical"
    if warning is not None and count >= warning:
        return "warning"
    return None


def close_codes(state: ClientState) -> dict[str, int]:
    """The client's close-code histogram with string keys (JSON objects need them)."""
    if not state.codes:
        return {}
    return {("other" if code < 0 else str(code)): n for code, n in state.codes.items()}


def span(times: array[float], count: int) -> tuple[float, float]:
    """First and last of the newest ``count`` times."""
    return times[-count], times[-1]
