"""The events the proxy feeds the engine: plain, timestamped, immutable.

Each event is one step of one upgrade attempt's life. ``t`` is the caller's
monotonic clock in float seconds; the engine never reads a clock itself, which
is what lets tests use synthetic time and ``loopwatch replay`` run recorded
traffic offline. ``to_dict``/``from_dict`` give the JSONL form used for
recording and replay: a flat JSON object with a ``"type"`` field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any, Literal, TypeAlias

Initiator: TypeAlias = Literal["client", "upstream", "proxy"]
INITIATORS: tuple[Initiator, ...] = ("client", "upstream", "proxy")
# The proxy numbers connections with ints; recorded traffic from elsewhere may use strings.
ConnId: TypeAlias = int | str


@dataclass(frozen=True, slots=True)
class Attempt:
    """An upgrade request arrived (before admission). ``addr`` is the peer address."""

    key: str
    route: str
    t: float
    addr: str = ""


@dataclass(frozen=True, slots=True)
class Rejected:
    """loopwatch refused an attempt; the engine records this itself when it rejects."""

    key: str
    route: str
    t: float
    reason: str


@dataclass(frozen=True, slots=True)
class HandshakeFailed:
    """The upstream refused the upgrade (``status``) or could not be reached (``error``).

    ``status`` is None exactly when no HTTP answer came back; ``error`` then says
    why ("connect", "timeout", "tls", …).
    """

    key: str
    route: str
    t: float
    status: int | None
    error: str | None = None
    # Why, as the data plane saw it (a TLS alert or verification error, the OS
    # error): for the operator's log line; detection does not read it.
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class Opened:
    """Both sides are open: the upstream answered 101 and the client has it."""

    key: str
    route: str
    t: float
    conn_id: ConnId


@dataclass(frozen=True, slots=True)
class Closed:
    """A connection ended. ``duration`` is seconds from Opened to this close."""

    key: str
    route: str
    t: float
    conn_id: ConnId
    code: int
    reason: str
    initiator: Initiator
    duration: float


@dataclass(frozen=True, slots=True)
class Answered:
    """A refusal loopwatch held (policy.hold) was answered at ``t``, or its client
    left then. The attempt and its refusal were recorded at arrival; the attempt
    *ended* only now, and retry intervals are measured from an attempt's end."""

    key: str
    route: str
    t: float


Event: TypeAlias = Attempt | Rejected | HandshakeFailed | Opened | Closed | Answered

EVENT_TYPES: dict[str, type[Event]] = {
    "attempt": Attempt,
    "rejected": Rejected,
    "handshake_failed": HandshakeFailed,
    "opened": Opened,
    "closed": Closed,
    "answered": Answered,
}
_TYPE_NAMES: dict[type[Event], str] = {cls: name for name, cls in EVENT_TYPES.items()}
_FIELDS: dict[type[Event], tuple[str, ...]] = {
    cls: tuple(f.name for f in fields(cls)) for cls in EVENT_TYPES.values()
}


def event_type(event: Event) -> str:
    """The ``"type"`` name of an event: attempt, rejected, handshake_failed, opened, closed."""
    return _TYPE_NAMES[type(event)]


def to_dict(event: Event) -> dict[str, Any]:
    """A JSON-able dict: ``{"type": "closed", "key": …, "t": …, …}``."""
    out: dict[str, Any] = {"type": _TYPE_NAMES[type(event)]}
    for name in _FIELDS[type(event)]:
        out[name] = getattr(event, name)
    return out


def from_dict(data: Mapping[str, Any]) -> Event:
    """The inverse of ``to_dict``; a bad record raises ValueError saying what is wrong.

    Unknown extra fields are ignored so that a recording made by a newer version
    (with more fields) still replays.
    """
    kind = data.get("type")
    if not isinstance(kind, str) or kind not in EVENT_TYPES:
        raise ValueError(f"unknown event type {kind!r}, expected one of {sorted(EVENT_TYPES)}")
    cls = EVENT_TYPES[kind]
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in data:
            kwargs[f.name] = data[f.name]
        elif f.default is not MISSING:
            kwargs[f.name] = f.default
        else:
            raise ValueError(f"{kind} event without {f.name!r}")
    _check(cls, kind, kwargs)
    return cls(**kwargs)


def _check(cls: type[Event], kind: str, kw: dict[str, Any]) -> None:
    # Replay files are edited by hand and produced by other tools: fail loudly
    # and precisely instead of feeding the engine a str where a float belongs.
    def expect(name: str, ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"{kind}.{name}: expected {what}, got {kw[name]!r}")

    expect("key", isinstance(kw["key"], str), "a string")
    expect("route", isinstance(kw["route"], str), "a string")
    t = kw["t"]
    expect("t", _is_finite(t), "a number of seconds")
    kw["t"] = float(t)
    if cls is Attempt:
        expect("addr", isinstance(kw["addr"], str), "a string")
    elif cls is Rejected:
        expect("reason", isinstance(kw["reason"], str), "a string")
    elif cls is HandshakeFailed:
        status = kw["status"]
        expect("status", status is None or (_is_int(status) and 100 <= status <= 999), "an HTTP status or null")
        expect("error", kw["error"] is None or isinstance(kw["error"], str), "a string or null")
    elif cls is Answered:
        pass  # key, route and t only
    else:
        expect("conn_id", _is_int(kw["conn_id"]) or isinstance(kw["conn_id"], str), "an int or string")
        if cls is Closed:
            expect("code", _is_int(kw["code"]) and 0 <= kw["code"] <= 0xFFFF, "a close code")
            expect("reason", isinstance(kw["reason"], str), "a string")
            expect("initiator", kw["initiator"] in INITIATORS, f"one of {list(INITIATORS)}")
            d = kw["duration"]
            expect("duration", _is_finite(d), "seconds")
            kw["duration"] = float(d)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: object) -> bool:
    """A number of seconds (not NaN or infinite: JSON from other tools may say so)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
