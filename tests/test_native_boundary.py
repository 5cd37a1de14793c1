"""The native listener's edge and its boundary with the brain (issue 16): bad
heads answered as the shared vectors say, admission from the enforcement
table (429 and close-1013 refusals that never reach the backend, holds),
the upstream's own refusals and failures, the events on the queue and its
drop counter, and clear answers to bad arguments from Python.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import select
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from loopwatch.detectors import events as ev
from loopwatch.proxy.dataplane.native import (
    EnforcementTable,
    EventQueue,
    NativeListener,
    RefusalPolicy,
    listener_config,
    route_records,
)
from loopwatch.proxy.dataplane.settings import IdentitySettings, Limits, ListenerTLS
from tests.conftest import (
    RawBackend,
    RawResponse,
    raw_exchange,
    read_response,
    switching_protocols,
    upgrade_request,
    wait_for,
)
from tests.hardening import ATTACKER, OTHER, open_from
from tests.test_native_relay import closed_count, echo_server, native, of_type

VECTORS = Path(__file__).parent / "vectors" / "request_heads.json"
# docs/refusals.md, "The reason grammar".
REASON_RE = re.compile(r"^loopwatch: ([\x20-\x2B\x2D-\x7E]{1,64}), retry in ([1-9][0-9]{0,9})s$")


async def refused_for_its_address(port: int, address: str) -> bool:
    """Connect from `address`: True when the answer is the per-address 503."""
    reader, writer = await open_from(port, address)
    try:
        response = await asyncio.wait_for(read_response(reader), 5)
    finally:
        writer.close()
    assert (response.status, response.header("Retry-After")) == (503, "1")
    assert response.header("Connection") == "close"
    assert response.body == b"loopwatch: too many connections from your address\n"
    return True


async def upgrade_status(port: int) -> int:
    """The status of an upgrade's answer (its head only), then hang up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(upgrade_request())
        return (await asyncio.wait_for(read_response(reader, head_only=True), 5)).status
    finally:
        writer.close()


def latin1(text: str) -> bytes:
    return text.encode("latin-1")


def rejected_vectors() -> list[dict]:
    """Every kind of refusal in the shared vectors (those with a whole answer
    among them), plus a fixed sample of the rest."""
    cases = [
        c for c in json.loads(VECTORS.read_text())["cases"]
        if c["expect"]["outcome"] == "reject" and "max_head_size" not in c
    ]  # fmt: skip
    by_kind: dict[tuple[int, str, bool], dict] = {}
    for case in cases:
        expect = case["expect"]
        by_kind.setdefault((expect["status"], expect["reason"], "response" in expect), case)
    sample = random.Random(16).sample(cases, 60)
    return list(by_kind.values()) + sample


async def test_bad_heads_are_answered_as_the_vectors_say() -> None:
    cases = rejected_vectors()
    async with echo_server() as backend, native(backend.url) as running:
        for case in cases:
            reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
            writer.write(latin1(case["input"]))
            answer = await asyncio.wait_for(reader.read(), 5)  # the answer, then the close
            writer.close()
            expect = case["expect"]
            if "response" in expect:  # the whole answer, byte for byte
                assert answer == latin1(expect["response"]), case["name"]
                continue
            # Else the status and headers (the body line words the parser's complaint).
            head, _, body = answer.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            assert lines[0].split(b" ")[1] == str(expect["status"]).encode(), case["name"]
            for name, value in expect["headers"]:
                assert latin1(f"{name}: {value}") in lines, case["name"]
            assert b"Connection: close" in lines and body.endswith(b"\n"), case["name"]
        await wait_for(lambda: running.listener.stats().active == 0)
        stats = running.listener.stats()
    expected: dict[str, int] = {}
    for case in cases:
        expected[case["expect"]["reason"]] = expected.get(case["expect"]["reason"], 0) + 1
    assert {k: v for k, v in stats.rejected.items() if v} == expected
    assert stats.opened == 0 and stats.active == 0


async def test_no_route_and_a_slow_head_are_answered() -> None:
    async with echo_server() as backend, native(
        backend.url, routes=[("/ws", backend.url)], handshake_timeout=0.3
    ) as running:
        response, _ = await raw_exchange(running.port, upgrade_request("/other"))
        assert (response.status, response.body) == (404, b"no route for this path\n")
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        response = await asyncio.wait_for(read_response(reader), 5)
        writer.close()
        assert (response.status, response.body) == (408, b"loopwatch: request head timeout\n")
        stats = running.listener.stats()
    assert (stats.rejected["no_route"], stats.rejected["head_timeout"]) == (1, 1)


@pytest.mark.parametrize("reject_with", ["http-429", "close-1013"])
async def test_a_key_in_cooldown_is_refused_without_reaching_the_backend(reject_with: str) -> None:
    async with RawBackend(switching_protocols) as backend, native(
        backend.url, reject_with=reject_with
    ) as running:
        running.table.set_cooldown("127.0.0.1", 30.0, "auth_failure_loop")
        if reject_with == "http-429":
            response, rest = await raw_exchange(running.port, upgrade_request("/chat"))
            assert response.status == 429
            assert response.header("Retry-After") == "30"
            assert response.body == b"loopwatch: cooldown, retry in 30s\n"
            assert rest == b""
        else:
            async with connect(f"ws://127.0.0.1:{running.port}/chat") as ws:
                with pytest.raises(ConnectionClosed) as info:
                    await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd is not None
            assert info.value.rcvd.code == 1013
            match = REASON_RE.match(info.value.rcvd.reason)
            assert match is not None and match.groups() == ("cooldown", "30")
        assert backend.connections == 0
        events = await running.events(lambda es: len(of_type(es, ev.Rejected)) == 1)
        # Released: the next attempt reaches the backend.
        assert running.table.clear("127.0.0.1")
        assert await upgrade_status(running.port) == 101
        assert backend.connections == 1
        stats = running.listener.stats()
    assert stats.refused["cooldown"] == 1
    attempt, rejected = events[0], events[1]
    assert isinstance(attempt, ev.Attempt)
    assert (attempt.key, attempt.route, attempt.addr) == ("127.0.0.1", "/", "127.0.0.1")
    assert isinstance(rejected, ev.Rejected)
    assert (rejected.key, rejected.route, rejected.reason) == ("127.0.0.1", "/", "cooldown")
    assert rejected.t >= attempt.t


async def test_deny_lists_and_open_breakers_refuse_with_their_own_answers() -> None:
    async with RawBackend(switching_protocols) as backend, native(
        backend.url, reject_with="http-429"
    ) as running:
        running.table.set_deny(["127.0.0.0/8"])
        response, _ = await raw_exchange(running.port, upgrade_request())
        assert (response.status, response.header("Retry-After")) == (429, "300")
        assert response.body == b"loopwatch: denied, retry in 300s\n"
        running.table.set_deny([])
        running.table.set_breaker("/", "upstream", "open", seconds=8.0, probes=1)
        response, _ = await raw_exchange(running.port, upgrade_request())
        assert response.status == 503
        assert REASON_RE.match(response.body.decode().strip()).groups() == ("upstream unavailable", "8")
        assert backend.connections == 0
        # Half-open: one probe goes through, the next attempt is refused.
        running.table.set_breaker("/", "upstream", "half_open", seconds=2.0, probes=1)
        assert await upgrade_status(running.port) == 101
        assert await upgrade_status(running.port) == 503
        assert running.table.probes_left("/", "upstream") == 0
        assert backend.connections == 1
        stats = running.listener.stats()
    assert (stats.refused["deny"], stats.refused["circuit_open"]) == (1, 2)


async def test_a_refusal_is_held_when_its_cooldown_says_so() -> None:
    async with RawBackend(switching_protocols) as backend, native(
        backend.url, reject_with="http-429"
    ) as running:
        running.table.set_cooldown("127.0.0.1", 60.0, hold=0.4)
        started = time.monotonic()
        response, _ = await raw_exchange(running.port, upgrade_request())
        held = time.monotonic() - started
        assert response.status == 429
        assert held >= 0.35  # answered after the hold, not at once
        # The retry time is what was left when it was answered.
        assert REASON_RE.match(response.body.decode().strip()).groups() == ("cooldown", "60")
        assert backend.connections == 0
        # The attempt ended when it was answered: Answered, with the attempt's id.
        events = await running.events(lambda es: bool(of_type(es, ev.Answered)))
        stats = running.listener.stats()
    assert [type(e) for e in events] == [ev.Attempt, ev.Rejected, ev.Answered]
    assert len({r.conn_id for r in running.received}) == 1
    answered = events[2]
    assert (answered.key, answered.route) == ("127.0.0.1", "/")
    assert events[1].t <= answered.t
    assert (stats.held, stats.holding, stats.released) == (1, 0, 0)
    assert stats.held_answered == {**dict.fromkeys(stats.refused, 0), "cooldown": 1}
    assert stats.held_skipped == {"max_held": 0, "max_held_per_key": 0}


async def test_a_client_that_leaves_its_hold_ends_the_attempt_then() -> None:
    async with RawBackend(switching_protocols) as backend, native(backend.url) as running:
        running.table.set_cooldown("127.0.0.1", 60.0, hold=60.0)  # held up to the handshake timeout
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        writer.write(upgrade_request())
        await wait_for(lambda: running.listener.stats().holding == 1)
        writer.close()
        events = await running.events(lambda es: bool(of_type(es, ev.Answered)))
        await wait_for(lambda: running.listener.stats().holding == 0)
        stats = running.listener.stats()
        assert backend.connections == 0
    assert [type(e) for e in events] == [ev.Attempt, ev.Rejected, ev.Answered]
    assert len({r.conn_id for r in running.received}) == 1
    # Left, not answered: no answer was counted.
    assert (stats.held, stats.released, sum(stats.held_answered.values())) == (1, 0, 0)


@pytest.mark.parametrize("reject_with", ["http-429", "close-1013"])
async def test_release_held_answers_the_keys_held_refusals_now(reject_with: str) -> None:
    async with RawBackend(switching_protocols) as backend, native(
        backend.url, reject_with=reject_with
    ) as running:
        running.table.set_cooldown("127.0.0.1", 60.0, hold=60.0)
        held = [await asyncio.open_connection("127.0.0.1", running.port) for _ in range(2)]
        for _, writer in held:
            writer.write(upgrade_request())
        await wait_for(lambda: running.listener.stats().holding == 2)
        assert running.listener.release_held("somebody else") == 0
        running.table.clear("127.0.0.1")  # what the brain does first
        assert running.listener.release_held("127.0.0.1") == 2
        assert running.listener.release_held("127.0.0.1") == 0
        for reader, writer in held:
            # Answered now (the hold would last the handshake timeout, 10 s).
            response = await asyncio.wait_for(read_response(reader), 5)
            if reject_with == "http-429":
                assert (response.status, response.header("Retry-After")) == (429, "1")
                assert response.body == b"loopwatch: cooldown, retry in 1s\n"
            else:
                assert response.status == 101
                close = await asyncio.wait_for(reader.readexactly(2 + 2 + 32), 5)
                assert close == bytes((0x88, 34)) + (1013).to_bytes(2, "big") + b"loopwatch: cooldown, retry in 1s"
            writer.close()
        # Its next attempt comes at once and is admitted.
        assert await upgrade_status(running.port) == 101
        events = await running.events(lambda es: len(of_type(es, ev.Answered)) == 2)
        stats = running.listener.stats()
    assert (stats.released, stats.held_answered["cooldown"], stats.holding) == (2, 2, 0)
    assert len(of_type(events, ev.Answered)) == 2
    by_id: dict[int, list[type]] = {}
    for r in running.received:
        by_id.setdefault(r.conn_id, []).append(type(r.event))
    held_ids = {r.conn_id for r in running.received if isinstance(r.event, ev.Answered)}
    assert len(held_ids) == 2
    for conn_id in held_ids:
        assert by_id[conn_id] == [ev.Attempt, ev.Rejected, ev.Answered]


async def test_holds_stay_within_max_held_and_max_held_per_key_and_a_reload_moves_them() -> None:
    async with RawBackend(switching_protocols) as backend, native(
        backend.url, reject_with="http-429", max_held_per_key=1
    ) as running:
        for address in (ATTACKER, OTHER):
            running.table.set_cooldown(address, 60.0, hold=60.0)
        held = await open_from(running.port, ATTACKER)
        held[1].write(upgrade_request())
        await wait_for(lambda: running.listener.stats().holding == 1)
        # A second attempt of the same key: answered at once (one held per key).
        reader, writer = await open_from(running.port, ATTACKER)
        writer.write(upgrade_request())
        assert (await asyncio.wait_for(read_response(reader), 5)).status == 429
        writer.close()
        # Reloaded: one hold in all; another key's attempt is answered at once too.
        running.listener.reconfigure(max_holds=1, max_held_per_key=4)
        reader, writer = await open_from(running.port, OTHER)
        writer.write(upgrade_request())
        assert (await asyncio.wait_for(read_response(reader), 5)).status == 429
        writer.close()
        stats = running.listener.stats()
        assert stats.held_skipped == {"max_held": 1, "max_held_per_key": 1}
        assert (stats.holding, stats.held) == (1, 1)
        assert running.listener.holds().skipped == stats.held_skipped
        assert running.listener.release_held(ATTACKER) == 1
        assert (await asyncio.wait_for(read_response(held[0]), 5)).status == 429
        held[1].close()
        assert backend.connections == 0


async def test_an_application_close_code_replaces_1013_and_a_reload_changes_the_answer() -> None:
    async with RawBackend(switching_protocols) as backend, native(backend.url, close_code=4429) as running:
        assert running.listener.policy() == RefusalPolicy("close-1013", 4429, 1024, 4)
        running.table.set_cooldown("127.0.0.1", 30.0)

        async def refused_close() -> tuple[int, str]:
            async with connect(running.url()) as ws:
                with pytest.raises(ConnectionClosed) as info:
                    await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd is not None
            return info.value.rcvd.code, info.value.rcvd.reason

        code, reason = await refused_close()
        assert code == 4429
        assert REASON_RE.match(reason).groups() == ("cooldown", "30")  # the same grammar
        running.listener.reconfigure(close_code=1013)
        assert (await refused_close())[0] == 1013
        running.listener.reconfigure(reject_with="http-429")
        response, _ = await raw_exchange(running.port, upgrade_request())
        assert (response.status, response.body) == (429, b"loopwatch: cooldown, retry in 30s\n")
        # Bad values: a clear answer, and nothing is changed.
        before = running.listener.policy()
        with pytest.raises(ValueError, match="close_code"):
            running.listener.reconfigure(close_code=1008, max_holds=5)
        with pytest.raises(ValueError, match="reject_with"):
            running.listener.reconfigure(reject_with="drop")
        assert running.listener.policy() == before == RefusalPolicy("http-429", 1013, 1024, 4)
        assert backend.connections == 0
    with pytest.raises(ValueError, match="close_code"):
        NativeListener.start([("/", "ws://127.0.0.1:9")], queue=EventQueue(), table=EnforcementTable(), close_code=4429 + 1000)


async def test_every_event_of_a_connection_carries_its_id() -> None:
    refusal = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"
    async with echo_server() as backend, RawBackend(lambda head: refusal, close_after=True) as refusing, native(
        backend.url, routes=[("/ok", backend.url), ("/no", refusing.url)], reject_with="http-429"
    ) as running:
        async with connect(running.url("/ok")) as ws:
            await ws.send("hi")
            assert await ws.recv() == "hi"
        response, _ = await raw_exchange(running.port, upgrade_request("/no"))
        assert response.status == 403
        running.table.set_cooldown("127.0.0.1", 30.0)
        response, _ = await raw_exchange(running.port, upgrade_request("/ok"))
        assert response.status == 429
        await running.events(lambda es: bool(of_type(es, ev.Closed) and of_type(es, ev.Rejected)))
    by_id: dict[int, list[ev.Event]] = {}
    for r in running.received:
        by_id.setdefault(r.conn_id, []).append(r.event)
    assert sorted(([type(e) for e in events] for events in by_id.values()), key=str) == sorted([
        [ev.Attempt, ev.Opened, ev.Closed],
        [ev.Attempt, ev.HandshakeFailed],
        [ev.Attempt, ev.Rejected],
    ], key=str)  # fmt: skip
    for conn_id, events in by_id.items():
        assert conn_id > 0
        assert len({e.route for e in events}) == 1
        for e in events:
            if isinstance(e, ev.Opened | ev.Closed):
                assert e.conn_id == conn_id


async def test_per_address_caps_answer_503_and_spare_other_addresses() -> None:
    limits = {"max_heads_per_address": 3, "max_connections_per_address": 5}
    async with echo_server() as backend, native(backend.url, **limits) as running:
        idle = [await open_from(running.port, ATTACKER) for _ in range(3)]  # half-open heads
        await wait_for(lambda: running.listener.stats().active == 3)
        assert await refused_for_its_address(running.port, ATTACKER)
        # Another address is not touched by the first one's caps.
        others = [await open_from(running.port, OTHER) for _ in range(3)]
        await wait_for(lambda: running.listener.stats().active == 6)
        # A completed head frees its place among the heads at once; connections in
        # any state count towards the other cap: 2 heads + 3 WebSockets = 5.
        ws = []
        for i in range(3):
            reader, writer = idle.pop() if i == 0 else await open_from(running.port, ATTACKER)
            writer.write(upgrade_request())
            assert (await asyncio.wait_for(read_response(reader, head_only=True), 5)).status == 101
            ws.append((reader, writer))
        assert await refused_for_its_address(running.port, ATTACKER)
        stats = running.listener.stats()
        assert (stats.rejected["address_limit"], stats.addresses) == (2, 2)
        for _, writer in [*idle, *others, *ws]:
            writer.close()
        await wait_for(lambda: running.listener.stats().active == 0)
        assert running.listener.stats().addresses == 0


async def test_a_trusted_proxy_address_is_never_capped() -> None:
    async with echo_server() as backend, native(
        # One source of truth: the identity settings' trusted proxies.
        backend.url, max_heads_per_address=2, identity=IdentitySettings(trusted_proxies=(f"{ATTACKER}/32",))
    ) as running:
        held = [await open_from(running.port, ATTACKER) for _ in range(6)]
        await wait_for(lambda: running.listener.stats().active == 6)
        held += [await open_from(running.port, OTHER) for _ in range(2)]
        await wait_for(lambda: running.listener.stats().active == 8)
        assert await refused_for_its_address(running.port, OTHER)
        stats = running.listener.stats()
        assert (stats.rejected["address_limit"], stats.addresses) == (1, 1)  # the trusted one is not counted
        for _, writer in held:
            writer.close()
        await wait_for(lambda: running.listener.stats().active == 0)
        assert running.listener.stats().addresses == 0


async def test_the_upstreams_refusal_and_failures_reach_the_client_and_the_queue() -> None:
    refusal = (
        b"HTTP/1.1 403 Forbidden\r\nX-Reason: token expired\r\nContent-Length: 12\r\n\r\n"
        b"bad token!!\n"
    )
    async with RawBackend(lambda head: refusal, close_after=True) as backend, native(
        backend.url
    ) as running:
        with pytest.raises(InvalidStatus) as info:
            await connect(f"ws://127.0.0.1:{running.port}/")
        response = info.value.response
        assert response.status_code == 403
        assert response.headers["X-Reason"] == "token expired"
        assert response.body == b"bad token!!\n"
        events = await running.events(lambda es: bool(of_type(es, ev.HandshakeFailed)))
    failed = of_type(events, ev.HandshakeFailed)[0]
    assert (failed.key, failed.status, failed.error) == ("127.0.0.1", 403, None)

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        unreachable = f"ws://127.0.0.1:{sock.getsockname()[1]}"
    async with native(unreachable) as running:
        response, _ = await raw_exchange(running.port, upgrade_request())
        assert (response.status, response.body) == (502, b"loopwatch: upstream unreachable\n")
        events = await running.events(lambda es: bool(of_type(es, ev.HandshakeFailed)))
    failed = of_type(events, ev.HandshakeFailed)[0]
    assert (failed.status, failed.error) == (None, "connect")

    async with RawBackend(lambda head: None) as silent, native(
        silent.url, handshake_timeout=0.3
    ) as running:
        response, _ = await raw_exchange(running.port, upgrade_request())
        assert (response.status, response.body) == (504, b"loopwatch: upstream handshake timeout\n")
        events = await running.events(lambda es: bool(of_type(es, ev.HandshakeFailed)))
    assert (of_type(events, ev.HandshakeFailed)[0].error) == "timeout"


async def test_opened_and_closed_events_carry_the_connection() -> None:
    async with echo_server() as backend, native(backend.url, routes=[("/chat", backend.url)]) as running:
        async with connect(f"ws://127.0.0.1:{running.port}/chat/room", compression=None) as ws:
            await ws.send("hi")
            assert await ws.recv() == "hi"
            await ws.close(4000, "done")
        events = await running.events(closed_count(1))
    attempt, opened, closed = events
    assert isinstance(attempt, ev.Attempt) and isinstance(opened, ev.Opened)
    assert isinstance(closed, ev.Closed)
    assert attempt.route == opened.route == closed.route == "/chat"
    # One Python string per route, not one per event (the brain keeps an open connection's).
    assert attempt.route is opened.route is closed.route
    assert opened.conn_id == closed.conn_id and isinstance(opened.conn_id, int)
    assert attempt.t <= opened.t <= closed.t <= time.monotonic()
    assert abs(closed.duration - (closed.t - opened.t)) < 0.05
    assert (closed.code, closed.reason, closed.initiator) == (4000, "done", "client")
    # The events are the detectors' own: they round-trip through the replay format.
    assert [ev.from_dict(ev.to_dict(e)) for e in events] == events


async def test_a_full_queue_drops_and_counts_without_stopping_traffic() -> None:
    async with RawBackend(switching_protocols) as backend, native(
        backend.url, reject_with="http-429", capacity=3
    ) as running:
        running.table.set_cooldown("127.0.0.1", 30.0)
        for _ in range(5):  # each refusal queues an Attempt and a Rejected
            response, _ = await raw_exchange(running.port, upgrade_request())
            assert response.status == 429
        assert len(running.queue) == 3
        assert running.queue.dropped == 7
        assert running.queue.take_unreported_drops() == 7
        assert running.queue.take_unreported_drops() == 0
        batch = await asyncio.to_thread(running.queue.recv_batch, 100, 0.1)
        assert [type(r.event) for r in batch] == [ev.Attempt, ev.Rejected, ev.Attempt]
        assert await asyncio.to_thread(running.queue.recv_batch, 100, 0.05) == []
        assert running.listener.stats().refused["cooldown"] == 5


async def test_the_queue_is_bounded_in_the_bytes_its_events_carry() -> None:
    """Beside its count, the queue bounds what its events carry (a key, an
    address; with tracing a path, Host and User-Agent): past it, events are
    dropped and counted as for a full queue, and traffic goes on."""
    async with RawBackend(switching_protocols) as backend, native(
        backend.url, reject_with="http-429", capacity=1000, max_bytes=40
    ) as running:
        assert (running.queue.max_bytes, running.queue.queued_bytes) == (40, 0)
        running.table.set_cooldown("127.0.0.1", 30.0)
        for _ in range(5):  # each refusal queues an Attempt and a Rejected
            response, _ = await raw_exchange(running.port, upgrade_request())
            assert response.status == 429
        # The Attempt carries key and address (9 + 9 bytes), the Rejected its key:
        # 18, 27, then each that would pass 40 is dropped, and the Rejected of the
        # second refusal fits (36).
        assert (len(running.queue), running.queue.queued_bytes) == (3, 36)
        assert running.queue.dropped == 7
        batch = await asyncio.to_thread(running.queue.recv_batch, 100, 0.1)
        assert [type(r.event) for r in batch] == [ev.Attempt, ev.Rejected, ev.Rejected]
        assert running.queue.queued_bytes == 0
        response, _ = await raw_exchange(running.port, upgrade_request())
        assert response.status == 429
        assert (len(running.queue), running.queue.queued_bytes) == (2, 27), "room again"
        assert running.listener.stats().refused["cooldown"] == 6


async def test_a_parked_queue_wakes_its_loop_at_the_next_event() -> None:
    """The brain's loop parks the empty queue and sleeps in its own poll: the
    next event makes the wake-up descriptor readable, once per park, and a
    park with events waiting says so instead of sleeping."""

    async def readable(timeout: float) -> bool:
        ready, _, _ = await asyncio.to_thread(select.select, [fd], [], [], timeout)
        return bool(ready)

    async with RawBackend(switching_protocols) as backend, native(backend.url, reject_with="http-429") as running:
        queue = running.queue
        fd = queue.wake_fd()
        assert queue.park()
        assert not await readable(0.05)  # nothing came: no wake-up
        running.table.set_cooldown("127.0.0.1", 30.0)
        response, _ = await raw_exchange(running.port, upgrade_request())
        assert response.status == 429
        assert await readable(5.0)
        queue.clear_wake()
        assert not await readable(0.0)
        assert not queue.park()  # the Attempt and Rejected are waiting: do not sleep
        batch = queue.recv_batch(100, 0.0)
        assert [type(r.event) for r in batch] == [ev.Attempt, ev.Rejected]
        assert queue.park()
        assert not await readable(0.05)  # the wake-up was read: readable again only at the next event
        response, _ = await raw_exchange(running.port, upgrade_request())
        assert await readable(5.0)
        queue.clear_wake()
        assert [type(r.event) for r in queue.recv_batch(100, 0.0)] == [ev.Attempt, ev.Rejected]


async def test_max_connections_answers_503() -> None:
    async with echo_server() as backend, native(backend.url, max_connections=1) as running:
        async with connect(f"ws://127.0.0.1:{running.port}/") as ws:
            await ws.send("hi")
            assert await ws.recv() == "hi"
            response, _ = await raw_exchange(running.port, upgrade_request())
            assert (response.status, response.header("Retry-After")) == (503, "1")
        assert running.listener.stats().rejected["overload"] == 1


def test_the_table_keeps_taken_probes_and_starts_fresh_budgets() -> None:
    table = EnforcementTable()
    table.set_breaker("/", "auth", "half_open", seconds=3.0, probes=2)
    assert table.lookup("k") == ("admit", ["auth"])
    table.set_breaker("/", "auth", "half_open", seconds=3.0, probes=2)  # same state: budget kept
    assert table.probes_left("/", "auth") == 1
    assert table.lookup("k") == ("admit", ["auth"])
    kind, reason, retry_after, hold, detail = table.lookup("k")
    assert (kind, reason, retry_after, hold, detail) == ("refuse", "circuit_open", 3.0, None, "auth")
    assert table.lookup("k", route="/other") == ("admit", [])  # another route's attempt: not its breaker
    table.set_breaker("/", "auth", "open", seconds=5.0, probes=2)  # a new state: a fresh budget
    assert table.probes_left("/", "auth") == 2
    table.set_breaker("/", "auth", "closed")
    assert table.lookup("k") == ("admit", [])
    assert table.remove_breaker("/", "auth") and not table.remove_breaker("/", "auth")
    table.set_cooldown("k", 10.0, "manual", retry_after=2.0, hold=1.5)
    kind, reason, retry_after, hold, detail = table.lookup("k")
    assert (kind, reason, hold, detail) == ("refuse", "cooldown", 1.5, "manual")
    assert 1.9 < retry_after <= 2.0
    assert "k" in table and len(table) == 1
    table.set_allow(["k"])
    assert table.lookup("k")[:2] == ("refuse", "cooldown")  # an operator's cooldown holds, allowed or not
    table.set_cooldown("k", 10.0, "auth_failure_loop")
    assert table.lookup("k") == ("allow_listed", [])  # a rule's does not
    table.set_defaults(deny_retry_after=60.0)
    table.set_deny(["10.0.0.0/8"])
    assert table.lookup("user@10.1.2.3")[:3] == ("refuse", "deny", 60.0)
    assert table.lookup("user", peer="10.9.9.9")[1] == "deny"
    assert table.clear("k") and not table.clear("k")


def test_the_table_holds_each_listed_reason_never_past_its_retry_time_nor_a_deny() -> None:
    table = EnforcementTable()
    every = {"cooldown": 2.0, "min_interval": 2.0, "max_concurrent": 2.0, "circuit_open": 2.0}
    table.set_defaults(max_concurrent_retry_after=5.0, holds=every)
    assert table.holds() == every
    table.set_min_interval("soon", 0.5)
    kind, reason, retry_after, hold, _ = table.lookup("soon")
    assert (kind, reason) == ("refuse", "min_interval") and hold == retry_after <= 0.5  # capped
    table.set_at_capacity("full", True)
    assert table.lookup("full")[:4] == ("refuse", "max_concurrent", 5.0, 2.0)
    table.set_cooldown("cool", 60.0, "auth_failure_loop")  # no hold of its own: the reason's
    assert table.lookup("cool")[3] == 2.0
    table.set_deny(["bad"])
    assert table.lookup("bad")[1:4] == ("deny", 300.0, None)  # never held
    table.set_breaker("/", "upstream", "open", seconds=10.0)
    kind, reason, retry_after, hold, detail = table.lookup("anyone")
    assert (reason, hold, detail) == ("circuit_open", 2.0, "upstream") and 9.0 < retry_after <= 10.0
    # Only the reasons named: a reload that lists cooldown alone.
    table.set_defaults(holds={"cooldown": 1.0})
    assert table.lookup("full")[3] is None and table.lookup("anyone")[3] is None
    assert table.lookup("cool")[3] == 1.0
    table.set_defaults()
    assert table.holds() == {} and table.lookup("cool")[3] is None


def test_bad_arguments_get_clear_answers() -> None:
    with pytest.raises(ValueError, match="capacity"):
        EventQueue(0)
    queue, table = EventQueue(), EnforcementTable()
    with pytest.raises(ValueError, match="timeout_s"):
        queue.raw.recv_batch(10, -1.0)
    with pytest.raises(ValueError, match="seconds"):
        table.set_cooldown("k", float("nan"))
    with pytest.raises(ValueError, match="hold"):
        table.set_cooldown("k", 5.0, hold=-1.0)
    with pytest.raises(ValueError, match="state"):
        table.set_breaker("/", "upstream", "ajar")
    with pytest.raises(ValueError, match="a denied client is never held"):
        table.set_defaults(holds={"deny": 2.0})
    with pytest.raises(ValueError, match="expected refusal reasons"):
        table.set_defaults(holds={"slow": 2.0})
    with pytest.raises(ValueError, match="holds"):
        table.set_defaults(holds={"cooldown": -1.0})
    with pytest.raises(ValueError, match="deny: invalid network"):
        table.set_deny(["10.0.0.0/40"])
    with pytest.raises(ValueError, match="peer"):
        table.lookup("k", peer="not an address")
    with pytest.raises(ValueError, match="wss://"):
        route_records([("/", "ftp://example.test")])
    with pytest.raises(ValueError, match="reject_with"):
        NativeListener.start([("/", "ws://127.0.0.1:9")], queue=queue, table=table, reject_with="drop")
    with pytest.raises(ValueError, match="threads"):
        NativeListener.start([("/", "ws://127.0.0.1:9")], queue=queue, table=table, threads=0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError, match="cannot listen"):
            NativeListener.start(
                [("/", "ws://127.0.0.1:9")], queue=queue, table=table, port=taken.getsockname()[1],
                limits=Limits(),
            )  # fmt: skip
    assert len(table) == 0 and table.generation == 0


async def test_a_client_still_sending_gets_its_whole_answer() -> None:
    """A head far over limits.max_head_size, sent in one go: the 431 is read in
    full (loopwatch drains what keeps coming before it closes, no reset)."""
    async with echo_server() as backend, native(backend.url) as running:
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
        response = await asyncio.wait_for(read_response(reader), 5)
        writer.close()
        assert response.status == 431
        assert response.body == b"request header fields too large\n"
        assert running.listener.stats().rejected["head_too_large"] == 1


async def test_every_table_refusal_is_counted_even_when_its_events_are_lost() -> None:
    """`stats().refused` (loopwatch_dataplane_refusals_total) is counted where the
    data plane refuses: with a queue of one event that nobody drains, the events
    of most refusals are lost (and counted as dropped), their refusals are not."""
    async with echo_server() as backend, native(backend.url, reject_with="http-429", capacity=1) as running:
        running.table.set_deny(["127.0.0.1/32"])
        for _ in range(5):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(running.url(), open_timeout=5):
                    pass
            assert refused.value.response.status_code == 429
        stats = running.listener.stats()
        assert stats.refused["deny"] == 5 and sum(stats.refused.values()) == 5
        assert running.queue.dropped >= 4  # five refusals' events, room for one


def test_the_native_counters_use_the_python_data_planes_labels() -> None:
    """What the brain exports from the native counters needs no translation:
    refusal reasons are the engine's, rejection reasons those of
    loopwatch_requests_rejected_total (plain HTTP's body_timeout,
    upstream_timeout and response_timeout among them, and address_limit)."""
    import typing

    from loopwatch.detectors.decisions import RejectReason
    from loopwatch.proxy.dataplane.boundary import REJECTED_REASONS

    queue, table = EventQueue(), EnforcementTable()
    listener = NativeListener.start([("/", "ws://127.0.0.1:9")], queue=queue, table=table, threads=1)
    try:
        stats = listener.stats()
    finally:
        assert listener.stop(1.0) == 0
    assert set(stats.refused) == set(typing.get_args(RejectReason))
    assert set(stats.rejected) <= set(REJECTED_REASONS)
    assert {"address_limit", "body_timeout", "upstream_timeout", "response_timeout"} <= set(stats.rejected)
    assert not listener.running


@contextlib.asynccontextmanager
async def named_http_backend(name: str) -> AsyncIterator[int]:
    """A plain HTTP server answering every GET with its name; its port."""

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=name)

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def test_a_reload_routes_every_next_request_and_a_removed_route_is_gone(tmp_path: Path) -> None:
    """`reload(listener_config(...))`: the next request of a keep-alive
    connection accepted before is served by the new routes, as a new
    connection's (the removed prefix 404: it stayed reachable for as long as
    a client kept one connection busy, unlike after nginx's or HAProxy's
    reload). A configuration that cannot be built is a ValueError naming the
    setting and the file, and nothing changes."""
    async with (
        named_http_backend("a") as a,
        named_http_backend("b") as b,
        native("", routes=[("/a", f"http://127.0.0.1:{a}")]) as running,
    ):

        async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> RawResponse:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: example.test\r\n\r\n".encode())
            return await asyncio.wait_for(read_response(reader), 5)

        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        try:
            assert (await get(reader, writer, "/a/x")).body == b"a"
            running.listener.reload(listener_config([("/a", f"http://127.0.0.1:{b}")]))
            assert (await get(reader, writer, "/a/x")).body == b"b"  # re-pointed
            running.listener.reload(listener_config([("/b", f"http://127.0.0.1:{b}")]))
            # The open connection: the new routes from its next request on.
            gone = await get(reader, writer, "/a/y")
            assert (gone.status, gone.body) == (404, b"no route for this path\n")
            new_reader, new_writer = await asyncio.open_connection("127.0.0.1", running.port)
            try:
                assert (await get(new_reader, new_writer, "/b/x")).body == b"b"
            finally:
                new_writer.close()
            response, _ = await raw_exchange(running.port, b"GET /a/x HTTP/1.1\r\nHost: example.test\r\n\r\n")
            assert response.status == 404
            garbage = tmp_path / "cert.pem"
            garbage.write_text("no certificate here\n")
            tls = ListenerTLS(cert_file=str(garbage), key_file=str(garbage))
            with pytest.raises(ValueError, match=r"tls\.cert_file: no certificate .*cert\.pem"):
                listener_config([("/a", f"http://127.0.0.1:{a}")], tls=tls)
            with pytest.raises(ValueError, match="route prefix"):
                listener_config([("a", f"http://127.0.0.1:{a}")])
            closing = b"GET /b/z HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n"
            response, _ = await raw_exchange(running.port, closing)
            assert (response.status, response.body) == (200, b"b")
        finally:
            writer.close()


def test_a_batch_of_writes_is_published_once_at_its_commit() -> None:
    """TableSync.flush writes in a batch: one copy of the table per flush, not
    one per key (a replica adopting 20 000 shared cooldowns copied the whole
    table 20 000 times and its brain stalled for 13 s)."""
    table = EnforcementTable()
    table.set_cooldown("old", 10.0)
    start = table.generation
    table.begin()
    for i in range(500):
        table.set_cooldown(f"k{i}", 10.0)
    table.set_breaker("/", "auth", "open", seconds=5.0)
    assert "k0" not in table and table.generation == start  # not published yet
    assert table.clear("old") and table.clear("k1")  # the batch's own copy
    assert table.remove_breaker("/", "auth")
    table.commit()
    assert table.generation == start + 1
    assert len(table) == 499 and "old" not in table and "k1" not in table
    assert table.lookup("k0")[:2] == ("refuse", "cooldown")
    assert table.lookup("x") == ("admit", [])
    table.commit()  # no batch open: nothing
    assert table.generation == start + 1
