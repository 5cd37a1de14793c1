"""duplicate_connections: one key holding more sockets than it should.

A warning when more than ``max_connections`` (3) connections of one key have
each been open longer than ``held_for`` (5 s) — the incident's two effects
each opening a socket, multiplied. The ``held_for`` delay ignores the brief
overlap of a reconnect (new socket up before the old one is closed).

It is the one rule whose verdict changes with time alone (the extra sockets
age into ``held_for``), so it tells the engine when to look again.
"""

from __future__ import annotations

from detectors.findings import Finding
from detectors.settings import DuplicateConnectionsSettings
from detectors.state import ClientState

NAME = "duplicate_connections"
_MAX_IDS = 10  # evidence lists a few conn ids, not thousands


def evaluate(
    state: ClientState, settings: DuplicateConnectionsSettings, t: float
) -> Finding | None:
    conns = state.open
    limit = settings.max_connections
    if conns is None or len(conns) <= limit:
        return None
    held_for = settings.held_for
    # ``opened + held_for`` is the same arithmetic recheck_at uses, so a wake at
    # exactly that time matches (t - held_for could round the other way).
    held = [(opened, cid) for cid, opened in conns.items() if opened + held_for <= t]
    if len(held) <= limit:
        return None
    held.sort(key=lambda pair: pair[0])
    return Finding(
        state.key,
        NAME,
        "warning",
        {
            "concurrent": len(conns),
            "held": len(held),
            "max_connections": limit,
            "oldest_opened": held[0][0],
            "conn_ids": [cid for _, cid in held[:_MAX_IDS]],
            "first_seen": held[0][0],
            "last_seen": held[-1][0],
        },
        t,
    )


def recheck_at(state: ClientState, settings: DuplicateConnectionsSettings, t: float) -> float | None:
    """When enough connections will have been held long enough to match, if not yet."""
    conns = state.open
    limit = settings.max_connections
    if conns is None or len(conns) <= limit:
        return None
    # The (limit+1)-th oldest connection decides when "more than limit held" becomes true.
    opened = sorted(conns.values())[limit]
    due = opened + settings.held_for
    return due if due > t else None
