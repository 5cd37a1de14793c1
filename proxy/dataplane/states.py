"""What the data plane's state machines share: the error an impossible move raises.

Each machine is an enum of states beside the code it drives, with a table of
the legal (from, to) pairs and one method that checks a move against it (as
detectors/breaker.py does): ``ClientHandshake._to`` and ``UpstreamHandshake._to``
(proxy/dataplane/listener.py), ``Relay._to``, ``Leg._flow_to`` and
``Leg._end_to`` (relay.py), ``HttpExchange.enter`` (forward.py). A move that is
not in its table is a bug, so it raises instead of leaving a connection in a
state nobody designed. docs/relay.md ("States") draws them.

The tables are frozensets of pairs of StrEnum members: a lookup hashes two
strings whose hashes are cached, so a checked move costs about as much as a
method call (docs/relay.md gives the measurement).
"""

from __future__ import annotations

from enum import StrEnum


class IllegalTransition(Exception):
    """A move that is not in its machine's transition table."""

    def __init__(self, machine: str, from_state: StrEnum, to_state: StrEnum) -> None:
        super().__init__(f"{machine}: no transition {from_state.value} → {to_state.value}")
        self.machine = machine
        self.from_state = from_state
        self.to_state = to_state
