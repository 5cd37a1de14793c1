"""duplicate_connections: one key holding more sockets than it should.

A warning when more than ``max_connections`` (3) connections of one key have
each been open at least ``held_for`` (5 s) — the incident's two effects each
opening a socket, multiplied. The ``held_for`` delay ignores the brief
overlap of a reconnect (new socket up before the old one is closed).

It is the one rule whose verdict changes with time alone (the extra sockets
age into ``held_for``), so it tells the engine when to look again.
"""

from __future__ import annotations

from typing import Any

from ..events import ConnId
from ..findings import Finding, Severity
from ..settings import DuplicateConnectionsSettings
from ..state import ClientState
from .evidence import finding

NAME = "duplicate_connections"
_MAX_IDS = 10  # evidence lists a few conn ids, not thousands


def _held(state: ClientState, settings: DuplicateConnectionsSettings, t: float) -> list[tuple[float, ConnId]]:
    held_for = settings.held_for
    # ``opened + held_for`` is the same arithmetic recheck_at uses, so a wake at
    # exactly that time matches (t - held_for could round the other way).
    return [(opened, cid) for cid, opened in state.open_items() if opened + held_for <= t]


def check(state: ClientState, settings: DuplicateConnectionsSettings, t: float) -> Severity | None:
    if state.open_count <= settings.max_connections:
        return None
    limit = settings.max_connections
    return "warning" if len(_held(state, settings, t)) > limit else None


def evidence(state: ClientState, settings: DuplicateConnectionsSettings, t: float) -> dict[str, Any]:
    held = sorted(_held(state, settings, t), key=lambda pair: pair[0])
    return {
        "concurrent": state.open_count,
        "held": len(held),
        "max_connections": settings.max_connections,
        "conn_ids": [cid for _, cid in held[:_MAX_IDS]],
        "first_seen": held[0][0] if held else None,
        "last_seen": held[-1][0] if held else None,
    }


def evaluate(state: ClientState, settings: DuplicateConnectionsSettings, t: float) -> Finding | None:
    return finding(NAME, check, evidence, state, settings, t)


def recheck_at(state: ClientState, settings: DuplicateConnectionsSettings, t: float) -> float | None:
    """When enough connections will have been held long enough to match, if not yet."""
    limit = settings.max_connections
    if state.open_count <= limit:
        return None
    # The (limit+1)-th oldest connection decides when "more than limit held" becomes true.
    opened = sorted(t for _, t in state.open_items())[limit]
    due = opened + settings.held_for
    return due if due > t else None
