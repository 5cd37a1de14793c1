"""What replicas tell each other: the pure half of a shared state store.

Several loopwatch replicas behind a load balancer that does not pin clients
each see a fraction of a looping client's attempts. They share what they see
by *replication*, not by reading state from a remote store at admission:
admission stays a synchronous call into the local engine (a hard rule of the
proxy), and every replica folds in the events the others saw, so each
engine's rules judge the client's combined traffic.

This module holds the messages and their wire form and nothing that does I/O;
``proxy/state/redis.py`` carries them over Redis, and the engine takes them
through plain method calls (``Engine.observe``, ``Engine.adopt_cooldown``,
``Engine.release``).

* ``RemoteEvent``: an event another replica saw (``admitted`` says whether its
  attempt was let through, so ``policy.min_interval`` spans replicas).
* ``SharedCooldown``: a cooldown another replica started. Seconds *remaining*
  travel, never a clock reading: each replica's engine runs on its own
  monotonic clock, and remaining time needs no synchronised clocks.
* ``Release``: an operator released the client on some replica.
* ``CloseRequest``: a replica enforcing ``max_concurrent: close-oldest``
  picked a connection that lives on another replica.
* ``Leaving``: the sender is shutting down (a planned stop, not a crash).

A batch is a header line ``lw1 <origin>`` and a JSON list of messages, each a
list whose first item names its kind. ``decode`` validates everything, since a
batch comes off the network, and hands events back already localized.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, TypeAlias

from .events import (
    INITIATORS,
    Attempt,
    Closed,
    ConnId,
    Event,
    HandshakeFailed,
    Opened,
    Rejected,
)

VERSION = 1
# Remote connection ids are "<replica>/<id>": strings, so they can never
# collide with the proxy's own int ids, and the owner can be read back.
_CONN_SEP = "/"


@dataclass(frozen=True, slots=True)
class RemoteEvent:
    event: Event
    admitted: bool = False


@dataclass(frozen=True, slots=True)
class SharedCooldown:
    """A cooldown with ``remaining`` seconds left (≤ 0: over, but its repeat
    count still escalates the next one within ``policy.cooldown.memory``).
    ``force`` replaces whatever the receiver holds (an operator's cooldown);
    otherwise the longer cooldown wins, so replicas converge whatever the order."""

    key: str
    remaining: float
    rule: str
    repeat: int
    enforced: bool = True
    force: bool = False


@dataclass(frozen=True, slots=True)
class Release:
    key: str


@dataclass(frozen=True, slots=True)
class CloseRequest:
    """Close connection ``conn_id`` (the owner's own id) on replica ``replica``."""

    replica: str
    conn_id: ConnId
    key: str
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class OpenConnection:
    key: str
    conn_id: ConnId  # the sender's own id
    age: float  # seconds open (close-oldest picks by it)


@dataclass(frozen=True, slots=True)
class Connections:
    """The connections the sending replica has open, sent when it
    (re)connects and when asked. The others then count exactly these as open
    through it, whatever Opened or Closed of its they missed (a Redis outage)
    or will never get (it crashed, or restarted with the same replica id).
    ``heartbeat``: the sender's ``state.redis.heartbeat``, by which its
    silence is judged."""

    open: tuple[OpenConnection, ...]
    heartbeat: float


@dataclass(frozen=True, slots=True)
class AskConnections:
    """Asks ``replica`` (``"*"``: every one) to send its ``Connections``."""

    replica: str


@dataclass(frozen=True, slots=True)
class Leaving:
    """The sending replica is shutting down, sent as its drain begins: what it
    has open stops counting at once (its clients are about to reconnect
    elsewhere, and must not be refused for the sockets it is closing), and
    its silence from then on is a planned stop, not a crash. Sent in a batch
    of its own: a replica of an older version, which cannot decode it, loses
    only that batch."""


Message: TypeAlias = (
    RemoteEvent | SharedCooldown | Release | CloseRequest | Connections | AskConnections | Leaving
)


def remote_conn_id(origin: str, conn_id: ConnId) -> str:
    return f"{origin}{_CONN_SEP}{conn_id}"


def owner_of(conn_id: ConnId) -> tuple[str, ConnId] | None:
    """(replica, its own id) for a remote connection id; None for a local one."""
    if not isinstance(conn_id, str) or _CONN_SEP not in conn_id:
        return None
    origin, _, own = conn_id.rpartition(_CONN_SEP)
    return origin, int(own) if own.isdigit() else own


def localize(event: Event, origin: str, t: float) -> Event:
    """The event as this replica records it: stamped ``t`` on the local clock
    (the sender's clock means nothing here) and with a connection id that
    cannot collide with a local one."""
    if isinstance(event, Opened):
        return Opened(event.key, event.route, t, remote_conn_id(origin, event.conn_id))
    if isinstance(event, Closed):
        return Closed(
            event.key, event.route, t, remote_conn_id(origin, event.conn_id),
            event.code, event.reason, event.initiator, event.duration,
        )
    return replace(event, t=t)


# --- the wire form -------------------------------------------------------------
#
# Positional lists, not dicts: a fleet publishes a few messages per handshake
# and decodes every other replica's, so the codec is on every replica's busiest
# path after admission itself. Kinds: a attempt, r rejected, h handshake_failed,
# o opened, c closed, C cooldown, X release, K close request, O connections,
# W ask for connections, L leaving.


def header(origin: str) -> bytes:
    """How every batch from ``origin`` starts: a replica recognises (and skips)
    its own batches, which pub/sub hands back, without parsing them."""
    return f"lw{VERSION} {origin}\n".encode()


def encode(origin: str, messages: Iterable[Message]) -> bytes:
    out: list[list[Any]] = []
    for m in messages:
        if isinstance(m, RemoteEvent):
            e = m.event
            if isinstance(e, Attempt):
                out.append(["a", e.key, e.route, e.addr, m.admitted])
            elif isinstance(e, Rejected):
                out.append(["r", e.key, e.route, e.reason])
            elif isinstance(e, HandshakeFailed):
                out.append(["h", e.key, e.route, e.status, e.error])
            elif isinstance(e, Opened):
                out.append(["o", e.key, e.route, e.conn_id])
            elif isinstance(e, Closed):
                out.append(["c", e.key, e.route, e.conn_id, e.code, e.reason, e.initiator, round(e.duration, 6)])
            else:  # Answered stays with the replica that held the refusal
                raise TypeError(f"not shared between replicas: {type(e).__name__}")
        elif isinstance(m, SharedCooldown):
            out.append(["C", m.key, round(m.remaining, 3), m.rule, m.repeat, m.enforced, m.force])
        elif isinstance(m, Release):
            out.append(["X", m.key])
        elif isinstance(m, Connections):
            out.append(["O", [[c.key, c.conn_id, round(c.age, 3)] for c in m.open], m.heartbeat])
        elif isinstance(m, AskConnections):
            out.append(["W", m.replica])
        elif isinstance(m, Leaving):
            out.append(["L"])
        else:
            out.append(["K", m.replica, m.conn_id, m.key, m.code, m.reason])
    return header(origin) + json.dumps(out, separators=(",", ":")).encode()


def decode(payload: bytes, t: float = 0.0) -> tuple[str, list[Message]]:
    """(origin, messages), events stamped ``t`` and localized (see ``localize``);
    ValueError naming what is wrong with a bad batch (it came off the network)."""
    head, sep, body = payload.partition(b"\n")
    version, _, origin_b = head.partition(b" ")
    if not sep or version != b"lw%d" % VERSION or not origin_b:
        raise ValueError(f"expected a batch starting 'lw{VERSION} <replica>', got {payload[:40]!r}")
    try:
        origin = origin_b.decode()
        items = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested beyond reason
        raise ValueError(f"not a JSON batch: {e}") from None
    if not isinstance(items, list):
        raise ValueError("expected a list of messages")
    return origin, [_message(item, origin, t) for item in items]


def _message(item: object, origin: str, t: float) -> Message:
    if not isinstance(item, list) or not item:
        raise ValueError(f"expected a message list, got {item!r:.80}")
    kind, n = item[0], len(item)
    try:
        if kind == "a" and n == 5 and _strs(item[1:4]) and _bool(item[4]):
            return RemoteEvent(Attempt(item[1], item[2], t, item[3]), item[4])
        if kind == "r" and n == 4 and _strs(item[1:4]):
            return RemoteEvent(Rejected(item[1], item[2], t, item[3]))
        if kind == "h" and n == 5 and _strs(item[1:3]):
            status, error = item[3], item[4]
            if (status is None or (_int(status) and 100 <= status <= 999)) and (error is None or isinstance(error, str)):
                return RemoteEvent(HandshakeFailed(item[1], item[2], t, status, error))
        if kind == "o" and n == 4 and _strs(item[1:3]) and _conn(item[3]):
            return RemoteEvent(Opened(item[1], item[2], t, remote_conn_id(origin, item[3])))
        if kind == "c" and n == 8 and _strs(item[1:3]) and _conn(item[3]):
            code, reason, initiator, duration = item[4:]
            if _code(code) and isinstance(reason, str) and initiator in INITIATORS and _number(duration):
                conn = remote_conn_id(origin, item[3])
                return RemoteEvent(Closed(item[1], item[2], t, conn, code, reason, initiator, float(duration)))
        if kind == "C" and n == 7:
            key, remaining, rule, repeat, enforced, force = item[1:]
            if (
                _strs((key, rule))
                and _number(remaining)
                and _int(repeat)
                and repeat >= 0
                and _bool(enforced)
                and _bool(force)
            ):
                return SharedCooldown(key, float(remaining), rule, repeat, enforced, force)
        if kind == "X" and n == 2 and isinstance(item[1], str):
            return Release(item[1])
        if kind == "O" and n == 3 and isinstance(item[1], list) and _number(item[2]) and item[2] > 0:
            conns = item[1]
            if all(
                isinstance(c, list) and len(c) == 3 and type(c[0]) is str and _conn(c[1]) and _number(c[2])
                for c in conns
            ):
                return Connections(
                    tuple(OpenConnection(key, cid, max(float(age), 0.0)) for key, cid, age in conns), float(item[2])
                )
        if kind == "W" and n == 2 and isinstance(item[1], str):
            return AskConnections(item[1])
        if kind == "L" and n == 1:
            return Leaving()
        if kind == "K" and n == 6:
            replica, conn_id, key, code, reason = item[1:]
            if _strs((replica, key, reason)) and _conn(conn_id) and _code(code) and 1000 <= code <= 4999:
                return CloseRequest(replica, conn_id, key, code, reason)
    except TypeError:
        pass  # e.g. a non-finite check on something that is no number
    raise ValueError(f"bad {kind!r} message: {item!r:.80}")


def _bool(value: object) -> bool:
    return type(value) is bool


def _strs(values: Iterable[object]) -> bool:
    return all(type(v) is str for v in values)


def _int(value: object) -> bool:
    return type(value) is int


def _code(value: object) -> bool:
    """A close code as a frame carries it (16 bits)."""
    return type(value) is int and 0 <= value <= 0xFFFF


def _conn(value: object) -> bool:
    """A connection id: the data plane's (64 bits) or a string."""
    return (type(value) is int and 0 <= value < 1 << 64) or type(value) is str


def _number(value: object) -> bool:
    return (type(value) is int or type(value) is float) and math.isfinite(value)


__all__ = [
    "AskConnections",
    "CloseRequest",
    "Connections",
    "Message",
    "OpenConnection",
    "Release",
    "RemoteEvent",
    "SharedCooldown",
    "decode",
    "encode",
    "header",
    "localize",
    "owner_of",
    "remote_conn_id",
]
