"""The data plane's state machines: every legal move is taken, every other one
raises IllegalTransition, and each table is a sound machine (every state
reachable from the first, every state able to end, the final ones final).

Each machine is driven through its own checking method on an instance of its
class, with only the attributes that method reads set (the classes' other
behaviour is covered black-box by test_fidelity, test_handshake, test_http,
test_lifecycle …). A real relay is also run to its end and its states read.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from enum import StrEnum

import pytest

from loopwatch.proxy.dataplane import forward, listener, relay
from loopwatch.proxy.dataplane.states import IllegalTransition


@dataclass(frozen=True)
class Machine:
    name: str
    states: type[StrEnum]
    table: frozenset
    initial: StrEnum
    final: frozenset
    cls: type
    attribute: str  # where the instance keeps its state
    method: str  # the checking move
    extra: tuple[tuple[str, object], ...] = ()  # attributes the error message reads

    def instance(self, state: StrEnum) -> object:
        obj = self.cls.__new__(self.cls)
        for name, value in self.extra:
            setattr(obj, name, value)
        setattr(obj, self.attribute, state)
        return obj

    def move(self, obj: object, to: StrEnum) -> None:
        getattr(obj, self.method)(to)


L, R, F = listener, relay, forward
MACHINES = (
    Machine("client handshake", L.HandshakeState, L.HANDSHAKE_TRANSITIONS, L.HEAD,
            frozenset({L.RELAYED, L.DONE}), L.ClientHandshake, "state", "_to"),
    Machine("upstream handshake", L.AnswerState, L.ANSWER_TRANSITIONS, L.AWAITING,
            frozenset({L.ACCEPTED, L.REFUSED, L.FAILED}), L.UpstreamHandshake, "state", "_to"),
    Machine("relay", R.RelayState, R.RELAY_TRANSITIONS, R.OPEN, frozenset({R.CLOSED}),
            R.Relay, "state", "_to", (("conn_id", 7),)),
    Machine("leg flow", R.Flow, R.FLOW_TRANSITIONS, R.FORWARDING, frozenset({R.STOPPED}),
            R.Leg, "flow", "_flow_to", (("side", R.CLIENT),)),
    Machine("leg link", R.LegLink, R.LINK_TRANSITIONS, R.CONNECTED, frozenset({R.GONE}),
            R.Leg, "link", "_link_to", (("side", R.UPSTREAM),)),
    Machine("http exchange", F.Phase, F.PHASE_TRANSITIONS, F.Phase.BODY, frozenset({F.Phase.DONE}),
            F.HttpExchange, "phase", "_to"),
)  # fmt: skip
IDS = [m.name for m in MACHINES]

LEGAL = [(m, a, b) for m in MACHINES for a, b in sorted(m.table)]
ILLEGAL = [
    (m, a, b) for m in MACHINES for a, b in itertools.product(m.states, repeat=2) if (a, b) not in m.table
]


@pytest.mark.parametrize(("machine", "from_state", "to_state"), LEGAL,
                         ids=[f"{m.name}: {a} -> {b}" for m, a, b in LEGAL])  # fmt: skip
def test_every_legal_move_is_taken(machine: Machine, from_state: StrEnum, to_state: StrEnum) -> None:
    obj = machine.instance(from_state)
    machine.move(obj, to_state)
    assert getattr(obj, machine.attribute) is to_state


@pytest.mark.parametrize(("machine", "from_state", "to_state"), ILLEGAL,
                         ids=[f"{m.name}: {a} -> {b}" for m, a, b in ILLEGAL])  # fmt: skip
def test_every_other_move_raises(machine: Machine, from_state: StrEnum, to_state: StrEnum) -> None:
    obj = machine.instance(from_state)
    with pytest.raises(IllegalTransition) as caught:
        machine.move(obj, to_state)
    assert getattr(obj, machine.attribute) is from_state  # unchanged
    assert caught.value.from_state is from_state and caught.value.to_state is to_state
    assert f"{from_state.value} → {to_state.value}" in str(caught.value)


@pytest.mark.parametrize("machine", MACHINES, ids=IDS)
def test_table_is_a_sound_machine(machine: Machine) -> None:
    states = set(machine.states)
    assert {s for pair in machine.table for s in pair} <= states
    assert machine.initial in states
    # Every state is reachable from the first one.
    reached, frontier = {machine.initial}, [machine.initial]
    while frontier:
        here = frontier.pop()
        for a, b in machine.table:
            if a is here and b not in reached:
                reached.add(b)
                frontier.append(b)
    assert reached == states
    # The final states have no way out; every other state has a way to a final one.
    assert not [pair for pair in machine.table if pair[0] in machine.final]
    for state in states - machine.final:
        ends, frontier = {state}, [state]
        while frontier:
            here = frontier.pop()
            for a, b in machine.table:
                if a is here and b not in ends:
                    ends.add(b)
                    frontier.append(b)
        assert ends & machine.final, state
    # No state moves to itself: an idempotent step is the caller's choice (Leg.stop).
    assert not [pair for pair in machine.table if pair[0] is pair[1]]


def test_states_have_distinct_values() -> None:
    for machine in MACHINES:
        values = [s.value for s in machine.states]
        assert len(values) == len(set(values)), machine.name


def test_a_leg_stops_once_and_drops_its_pending_close_frame() -> None:
    leg = relay.Leg.__new__(relay.Leg)
    leg.side, leg.flow, leg.pending = relay.CLIENT, relay.FINISHING, b"\x88\x02\x03\xe8"
    leg.stop()
    assert leg.flow is relay.STOPPED and leg.pending is None
    leg.stop()  # again: nothing to do, no error
    assert leg.flow is relay.STOPPED


async def test_a_relayed_connection_ends_in_its_final_states() -> None:
    """A real relay over loopback sockets: the client's close handshake passes
    through OPEN; both legs end GONE, the relay CLOSED, and the close is the
    client's."""
    loop = asyncio.get_running_loop()
    done: list[relay.Relay] = []
    finished = loop.create_future()

    def on_done(r: relay.Relay) -> None:
        done.append(r)
        finished.set_result(None)

    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = loop.create_future()

    async def on_accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result((reader, writer))

    # Two loopback connections: the proxy's ends of each are spliced by the relay.
    servers = []
    pairs = []
    for _ in range(2):
        accepted = loop.create_future()
        server = await asyncio.start_server(on_accept, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        outer = await asyncio.open_connection("127.0.0.1", port)
        inner = await asyncio.wait_for(accepted, 5)
        pairs.append((outer, inner))
    try:
        (client_side, proxy_client), (upstream_side, proxy_upstream) = pairs
        r = relay.Relay(
            1,
            proxy_client[1].transport,  # type: ignore[arg-type]
            proxy_upstream[1].transport,  # type: ignore[arg-type]
            max_message_size=None,
            allowed_rsv=0,
            on_done=on_done,
            context=None,  # type: ignore[arg-type]
            address=None,  # type: ignore[arg-type]
        )
        r.start(b"", b"")
        assert r.state is relay.OPEN
        assert (r.client.flow, r.client.link) == (relay.FORWARDING, relay.CONNECTED)
        close_1000 = b"\x88\x82\x00\x00\x00\x00\x03\xe8"  # masked, key 0: code 1000
        client_side[1].write(close_1000)
        assert await asyncio.wait_for(upstream_side[0].readexactly(len(close_1000)), 5) == close_1000
        upstream_side[1].write(b"\x88\x02\x03\xe8")  # the upstream's reply, unmasked
        assert await asyncio.wait_for(client_side[0].readexactly(4), 5) == b"\x88\x02\x03\xe8"
        assert r.state is relay.OPEN  # a peers' close handshake is not the proxy's
        client_side[1].close()
        upstream_side[1].close()
        await asyncio.wait_for(finished, 5)
        assert done == [r]
        assert r.state is relay.CLOSED
        assert r.client.link is relay.GONE and r.upstream.link is relay.GONE
        assert r.close_info() == (1000, "", relay.CLIENT)
    finally:
        for outer, _inner in pairs:
            outer[1].close()
        for server in servers:
            server.close()
            await server.wait_closed()
