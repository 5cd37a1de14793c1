"""Building blocks for event tables: a connection's life, loops, backoff schedules."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import count

from loopwatch.detectors import tracker
from loopwatch.detectors.events import Attempt, Closed, Event, HandshakeFailed, Initiator, Opened
from loopwatch.detectors.settings import DetectionSettings
from loopwatch.detectors.state import ClientState

ROUTE = "/ws"
HANDSHAKE = 0.005  # seconds from attempt to 101 in these tables
_ids = count(1)


def conn_id() -> int:
    return next(_ids)


def connection(
    key: str,
    t: float,
    *,
    lived: float,
    code: int = 1000,
    initiator: Initiator = "upstream",
    addr: str = "",
    cid: int | None = None,
) -> list[Event]:
    """Attempt at ``t``, open after the handshake, closed ``lived`` seconds later."""
    cid = conn_id() if cid is None else cid
    opened = t + HANDSHAKE
    return [
        Attempt(key, ROUTE, t, addr),
        Opened(key, ROUTE, opened, cid),
        Closed(key, ROUTE, opened + lived, cid, code, "", initiator, lived),
    ]


def refused(key: str, t: float, status: int | None, error: str | None = None) -> list[Event]:
    return [Attempt(key, ROUTE, t), HandshakeFailed(key, ROUTE, t + HANDSHAKE, status, error)]


def end_of(events: list[Event]) -> float:
    return events[-1].t


def schedule(
    key: str, start: float, gaps: Iterable[float], *, lived: float = 0.01, code: int = 1008
) -> Iterator[Event]:
    """A connection closed with ``code`` after ``lived``, then one after each gap (from the close)."""
    t = start
    first = connection(key, t, lived=lived, code=code)
    yield from first
    end = end_of(first)
    for gap in gaps:
        events = connection(key, end + gap, lived=lived, code=code)
        yield from events
        end = end_of(events)


def fold(events: Iterable[Event], settings: DetectionSettings | None = None) -> ClientState:
    """One client's state after ``events`` (all of the same key)."""
    settings = settings or DetectionSettings()
    state: ClientState | None = None
    for event in events:
        if state is None:
            state = ClientState(event.key, event.t)
        tracker.apply(state, event, settings)
    assert state is not None
    return state
