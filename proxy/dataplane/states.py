"""What the data plane's state machines share: the error an impossible move
raises, and each table's successors.

Each machine is an enum of states beside the code it drives, with one table of
the legal (from, to) pairs (as detectors/breaker.py has), and every move is
checked against it: by a method (``ClientHandshake._to`` and
``UpstreamHandshake._to`` in proxy/dataplane/listener.py, ``Relay._to``,
``Leg._flow_to`` and ``Leg._link_to`` in relay.py, ``HttpExchange._to`` in
forward.py), or, on the path every connection takes, by the same test written
out where the move is made (a method call costs as much as the test). A move
that is not in its table is a bug, so it raises instead of leaving a connection
in a state nobody designed. docs/relay.md ("States") draws them.

The test is ``to in NEXT[state]``: each state's legal next states, a tuple
built from the table once, at import (`successors`). No pair is built and no
state hashed but the current one; the tuple is searched by identity. About
300 instructions a move (docs/relay.md gives the measurement).
"""

from __future__ import annotations

from collections.abc import Collection
from enum import StrEnum
from typing import TypeVar

S = TypeVar("S", bound=StrEnum)


class IllegalTransition(Exception):
    """A move that is not in its machine's transition table."""

    def __init__(self, machine: str, from_state: StrEnum, to_state: StrEnum) -> None:
        super().__init__(f"{machine}: no transition {from_state.value} → {to_state.value}")
        self.machine = machine
        self.from_state = from_state
        self.to_state = to_state


def successors(states: type[S], table: Collection[tuple[S, S]]) -> dict[S, tuple[S, ...]]:
    """Each state's legal next states (in the enum's order; a final state's are
    empty), from a machine's table of (from, to) pairs."""
    return {here: tuple(to for to in states if (here, to) in table) for here in states}
