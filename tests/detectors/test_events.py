"""Events: immutable, slotted, and a lossless JSON round trip for record/replay."""

from __future__ import annotations

import dataclasses
import json

import pytest

from loopwatch.detectors.events import (
    Attempt,
    Closed,
    HandshakeFailed,
    Opened,
    Rejected,
    event_type,
    from_dict,
    to_dict,
)

EVENTS = [
    Attempt("alice@10.0.0.5", "/ws", 1.5, addr="10.0.0.5"),
    Attempt("10.0.0.6", "/ws", 2.0),
    Rejected("alice@10.0.0.5", "/ws", 1.5, "cooldown"),
    HandshakeFailed("k", "/ws", 3.0, 401),
    HandshakeFailed("k", "/ws", 3.0, None, "connect"),
    Opened("k", "/ws", 4.0, 17),
    Opened("k", "/ws", 4.0, "c-17"),
    Closed("k", "/ws", 5.0, 17, 1008, "token not ready", "upstream", 0.05),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_round_trip_through_json(event: object) -> None:
    line = json.dumps(to_dict(event))  # type: ignore[arg-type]
    assert from_dict(json.loads(line)) == event


@pytest.mark.parametrize("event", EVENTS[:1] + EVENTS[2:4] + EVENTS[5:6] + EVENTS[7:], ids=lambda e: type(e).__name__)
def test_frozen_and_slotted(event: object) -> None:
    assert not hasattr(event, "__dict__")
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.t = 0.0  # type: ignore[attr-defined]


def test_type_field_names_the_event() -> None:
    assert [to_dict(e)["type"] for e in EVENTS[::2]] == [
        "attempt", "rejected", "handshake_failed", "opened",
    ]
    assert event_type(EVENTS[-1]) == "closed"


def test_defaults_fill_missing_optional_fields_and_extra_fields_are_ignored() -> None:
    assert from_dict({"type": "attempt", "key": "k", "route": "/", "t": 1}) == Attempt("k", "/", 1.0)
    assert from_dict({"type": "attempt", "key": "k", "route": "/", "t": 1, "trace": "x"}).t == 1.0


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"type": "teleport"}, "unknown event type 'teleport'"),
        ({"key": "k"}, "unknown event type None"),
        ({"type": "opened", "key": "k", "route": "/", "t": 1}, "opened event without 'conn_id'"),
        ({"type": "attempt", "key": "k", "route": "/", "t": "soon"}, "attempt.t: expected a number"),
        ({"type": "attempt", "key": 5, "route": "/", "t": 1}, "attempt.key: expected a string"),
        (
            {"type": "closed", "key": "k", "route": "/", "t": 1, "conn_id": 1, "code": 1000,
             "reason": "", "initiator": "martian", "duration": 1},
            "closed.initiator: expected one of",
        ),
        (
            {"type": "handshake_failed", "key": "k", "route": "/", "t": 1, "status": "401"},
            "handshake_failed.status: expected an HTTP status or null",
        ),
    ],
)
def test_bad_records_say_what_is_wrong(record: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        from_dict(record)
