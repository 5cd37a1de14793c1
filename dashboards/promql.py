"""Just enough PromQL reading to check the dashboard and rules against the metric catalogue.

Not a parser: it removes what cannot hold a metric name (strings, label
matchers, ranges, grouping clauses, Grafana variables, numbers) and keeps the
identifiers that are not function calls or keywords.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
# An identifier not glued to a digit, dot or another identifier (so "5m" or "1e3"
# yield nothing); a following "(" makes it a function or aggregation.
_IDENTIFIER = re.compile(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(\s*\()?")
_KEYWORDS = frozenset(
    {
        "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
        "and", "or", "unless", "offset", "atan2", "inf", "nan", "start", "end",
    }
)  # fmt: skip

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def metric_names(expr: str) -> set[str]:
    """Metric (and recording rule) names an expression selects."""
    text = _STRING.sub('""', expr)
    # Strings are gone, so a "}" can only close a matcher block.
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _VARIABLE.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.groups()
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


_CATALOGUE_ROW = re.compile(r"^\|\s*`([a-z_:][a-z0-9_:]*)`\s*\|\s*(\w+)\s*\|", re.MULTILINE)


def catalogue(metrics_doc: Path) -> dict[str, str]:
    """The metric table of docs/metrics.md: name to type."""
    return dict(_CATALOGUE_ROW.findall(metrics_doc.read_text()))


def exposed_series_names(families: Mapping[str, str]) -> set[str]:
    """Names a query may select: each family, plus a histogram's _bucket/_sum/_count."""
    names = set(families)
    for name, kind in families.items():
        if kind == "histogram":
            names.update(name + suffix for suffix in HISTOGRAM_SUFFIXES)
    return names


def rules(groups: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for group in groups:
        yield from group["rules"]


def dashboard_targets(
    dashboard: Mapping[str, Any],
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) for every query of every panel, rows' nested panels included."""
    for panel in dashboard.get("panels", []):
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                yield inner, target


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Replace Grafana variables ($name, ${name}, ${name:opt}) as Grafana would."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", one, expr)
