"""A client's recent events, packed into one number each for the admin view.

Keeping the event objects themselves would pin their strings (key, route,
conn id, reason) for every tracked client; the admin view only needs what
happened, when, and with which code. Layout of the packed value, low bits first:
kind (3 bits) | detail index (4 bits) | code or status (16 bits) | duration in ms
(30 bits, at most 12.4 days). 53 bits in all: a double holds it exactly, so a
client's history is one array of doubles, time and packed value in turn
(`ClientState.history`; one array, not two, saves ~110 bytes a client).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .events import Attempt, Closed, Event, HandshakeFailed, Initiator, Opened, Rejected

KINDS = ("attempt", "rejected", "handshake_failed", "opened", "closed")
# Reasons the engine itself produces, then a catch-all for replayed oddities.
REJECT_REASONS = ("cooldown", "min_interval", "max_concurrent", "deny", "circuit_open", "other")
ERRORS = ("connect", "timeout", "tls", "reset", "dns", "protocol", "fd_limit", "shutting_down", "other")
INITIATORS: tuple[Initiator, ...] = ("client", "upstream", "proxy")
_KIND_OF: dict[type[Event], int] = {
    Attempt: 0, Rejected: 1, HandshakeFailed: 2, Opened: 3, Closed: 4,
}
_NO_STATUS = 0xFFFF
_MAX_DURATION_MS = (1 << 30) - 1  # 12.4 days: the packed value stays within a double's 53 bits


def _index(options: tuple[str, ...], value: str | None) -> int:
    try:
        return options.index(value)
    except ValueError:
        return len(options) - 1  # "other"


# A refusal's packed value by reason, looked up at each refusal rather than searched.
_REJECTED = {reason: _KIND_OF[Rejected] | i << 3 for i, reason in enumerate(REJECT_REASONS)}


def pack_rejected(reason: str) -> int:
    return _REJECTED.get(reason, _REJECTED["other"])


# The tracker packs each kind of event with its own function (no type dispatch
# on the hot path); pack() is the same for any event.
ATTEMPT = _KIND_OF[Attempt]
OPENED = _KIND_OF[Opened]


def pack_failed(status: int | None, error: str | None) -> int:
    if status is None:
        return _KIND_OF[HandshakeFailed] | _index(ERRORS, error) << 3 | _NO_STATUS << 7
    return _KIND_OF[HandshakeFailed] | (status & 0xFFFF) << 7


def pack_closed(code: int, initiator: str, duration: float) -> int:
    ms = min(max(int(duration * 1000), 0), _MAX_DURATION_MS)
    return _KIND_OF[Closed] | INITIATORS.index(initiator) << 3 | (code & 0xFFFF) << 7 | ms << 23


def pack(event: Event) -> int:
    if isinstance(event, Rejected):
        return pack_rejected(event.reason)
    if isinstance(event, HandshakeFailed):
        return pack_failed(event.status, event.error)
    if isinstance(event, Closed):
        return pack_closed(event.code, event.initiator, event.duration)
    return _KIND_OF[type(event)]


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One remembered event; fields that do not apply to its type are None."""

    type: str
    t: float
    reason: str | None = None  # rejected
    status: int | None = None  # handshake_failed
    error: str | None = None  # handshake_failed without a status
    code: int | None = None  # closed
    initiator: str | None = None  # closed
    duration: float | None = None  # closed

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k in self.__slots__ if (v := getattr(self, k)) is not None}


def unpack(t: float, value: int) -> HistoryEntry:
    kind = value & 0b111
    detail = value >> 3 & 0xF
    code = value >> 7 & 0xFFFF
    name = KINDS[kind]
    if kind == 1:
        return HistoryEntry(name, t, reason=REJECT_REASONS[detail])
    if kind == 2:
        if code == _NO_STATUS:
            return HistoryEntry(name, t, error=ERRORS[detail])
        return HistoryEntry(name, t, status=code)
    if kind == 4:
        return HistoryEntry(
            name, t, code=code, initiator=INITIATORS[detail], duration=(value >> 23) / 1000
        )
    return HistoryEntry(name, t)
