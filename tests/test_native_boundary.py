"""The native listener's edge and its boundary with the brain (issue 16): bad
heads answered as the shared vectors say, admission from the enforcement
table (429 and close-1013 refusals that never reach the backend, holds),
the upstream's own refusals and failures, the events on the queue and its
drop counter, and clear answers to bad arguments from Python.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from loopwatch.detectors import events as ev
from loopwatch.proxy.dataplane.native import (
    EnforcementTable,
    EventQueue,
    NativeListener,
    route_records,
)
from loopwatch.proxy.dataplane.settings import Limits
from tests.conftest import (
    RawBackend,
    raw_exchange,
    read_response,
    switching_protocols,
    upgrade_request,
    wait_for,
)
from tests.test_native_relay import closed_count, echo_server, native, of_type

VECTORS = Path(__file__).parent / "vectors" / "request_heads.json"
# docs/refusals.md, "The reason grammar".
REASON_RE = re.compile(r"^loopwatch: ([\x20-\x2B\x2D-\x7E]{1,64}), retry in ([1-9][0-9]{0,9})s$")


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
        running.table.set_breaker("upstream", "open", seconds=8.0, probes=1)
        response, _ = await raw_exchange(running.port, upgrade_request())
        assert response.status == 503
        assert REASON_RE.match(response.body.decode().strip()).groups() == ("upstream unavailable", "8")
        assert backend.connections == 0
        # Half-open: one probe goes through, the next attempt is refused.
        running.table.set_breaker("upstream", "half_open", seconds=2.0, probes=1)
        assert await upgrade_status(running.port) == 101
        assert await upgrade_status(running.port) == 503
        assert running.table.probes_left("upstream") == 0
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
        assert running.listener.stats().held == 1
        assert backend.connections == 0


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
    table.set_breaker("auth", "half_open", seconds=3.0, probes=2)
    assert table.lookup("k") == ("admit", ["auth"])
    table.set_breaker("auth", "half_open", seconds=3.0, probes=2)  # same state: budget kept
    assert table.probes_left("auth") == 1
    assert table.lookup("k") == ("admit", ["auth"])
    kind, reason, retry_after, hold, detail = table.lookup("k")
    assert (kind, reason, retry_after, hold, detail) == ("refuse", "circuit_open", 3.0, None, "auth")
    table.set_breaker("auth", "open", seconds=5.0, probes=2)  # a new state: a fresh budget
    assert table.probes_left("auth") == 2
    table.set_breaker("auth", "closed")
    assert table.lookup("k") == ("admit", [])
    assert table.remove_breaker("auth") and not table.remove_breaker("auth")
    table.set_cooldown("k", 10.0, "manual", retry_after=2.0, hold=1.5)
    kind, reason, retry_after, hold, detail = table.lookup("k")
    assert (kind, reason, hold, detail) == ("refuse", "cooldown", 1.5, "manual")
    assert 1.9 < retry_after <= 2.0
    assert "k" in table and len(table) == 1
    table.set_allow(["k"])
    assert table.lookup("k") == ("allow_listed", [])
    table.set_defaults(deny_retry_after=60.0)
    table.set_deny(["10.0.0.0/8"])
    assert table.lookup("user@10.1.2.3")[:3] == ("refuse", "deny", 60.0)
    assert table.lookup("user", peer="10.9.9.9")[1] == "deny"
    assert table.clear("k") and not table.clear("k")


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
        table.set_breaker("upstream", "ajar")
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


def test_the_native_counters_use_the_python_data_planes_labels() -> None:
    """What the brain will export from the native counters needs no translation:
    refusal reasons are the engine's, rejection reasons those of
    loopwatch_requests_rejected_total (plain HTTP's body_timeout,
    upstream_timeout and response_timeout among them)."""
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
    assert {"body_timeout", "upstream_timeout", "response_timeout"} <= set(stats.rejected)
    assert not listener.running
