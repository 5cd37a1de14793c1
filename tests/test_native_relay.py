"""The native listener (proxy/dataplane/py, issue 16) alone, as a WebSocket
proxy: the upgrade as sent, protocol errors passed on, closes made as
docs/relay.md says, the brain's commands, and stop() ending every connection
with 1001 on both legs.

Black-box: the listener runs on its own tokio threads in this process, in
front of independent peers (the `websockets` library, and raw sockets with
hand-built frames from tests/wsraw.py); the test only talks to sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from loopwatch.detectors import events as ev
from loopwatch.proxy.dataplane.boundary import RelayStats
from loopwatch.proxy.dataplane.native import (
    EnforcementTable,
    EventQueue,
    NativeListener,
    Received,
)
from loopwatch.proxy.dataplane.settings import IdentitySettings, Limits
from tests import relay_shapes as shapes
from tests.conftest import wait_for
from tests.wsraw import (
    BINARY,
    CLOSE,
    PING,
    TEXT,
    RawBackendConnection,
    RawClient,
    close_payload,
    frame,
    parse_frames,
    raw_backend,
)


@dataclass
class Native:
    """A running native listener with its queue and table."""

    listener: NativeListener
    queue: EventQueue
    table: Any
    received: list[Received]

    @property
    def port(self) -> int:
        return self.listener.port

    def url(self, path: str = "/") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def received_events(self) -> list[ev.Event]:
        return [r.event for r in self.received]

    def conn_ids(self, cls: type) -> list[int]:
        """The connection ids of the events of type `cls` so far, in order."""
        return [r.conn_id for r in self.received if isinstance(r.event, cls)]

    async def events(
        self, until: Callable[[list[ev.Event]], bool], timeout: float = 5.0
    ) -> list[ev.Event]:
        """Drain the queue (off the event loop) until `until(all events so far)`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not until([r.event for r in self.received]):
            if loop.time() > deadline:
                raise AssertionError(f"events not reached in time: {self.received}")
            self.received += await asyncio.to_thread(self.queue.recv_batch, 1024, 0.05)
        return [r.event for r in self.received]

    async def stop(self, grace: float = 3.0) -> int:
        # stop() blocks until connections end, and their peers run on this loop.
        return await asyncio.to_thread(self.listener.stop, grace)


@contextlib.asynccontextmanager
async def native(
    upstream: str,
    *,
    routes: list[tuple[str, str]] | None = None,
    reject_with: str = "close-1013",
    close_code: int = 1013,
    max_holds: int = 1024,
    max_held_per_key: int = 4,
    identity: IdentitySettings | None = None,
    capacity: int = 4096,
    max_bytes: int = 1 << 20,
    threads: int = 2,
    **limits: Any,
) -> AsyncIterator[Native]:
    queue = EventQueue(capacity, max_bytes)
    table = EnforcementTable()
    listener = NativeListener.start(
        routes or [("/", upstream)],
        queue=queue,
        table=table,
        limits=Limits(**limits),
        reject_with=reject_with,
        close_code=close_code,
        max_holds=max_holds,
        max_held_per_key=max_held_per_key,
        identity=identity,
        threads=threads,
    )
    running = Native(listener, queue, table, [])
    try:
        yield running
    finally:
        await running.stop()


@contextlib.contextmanager
def native_in_thread(upstream: str) -> Iterator[NativeListener]:
    """The listener for a test that drives its own event loop (the hypothesis
    properties): started and stopped without one; at the end, no relay is left."""
    queue = EventQueue(1 << 16)
    listener = NativeListener.start([("/", upstream)], queue=queue, table=EnforcementTable(), threads=2)
    try:
        yield listener
        deadline = time.monotonic() + 5
        while listener.stats().relays and time.monotonic() < deadline:
            time.sleep(0.01)
        assert listener.stats().relays == 0
        assert queue.dropped == 0
    finally:
        listener.stop(2.0)


def of_type(events: list[ev.Event], cls: type) -> list[Any]:
    return [e for e in events if isinstance(e, cls)]


def closed_count(n: int) -> Callable[[list[ev.Event]], bool]:
    return lambda events: len(of_type(events, ev.Closed)) >= n


# The shared backends (tests/relay_shapes.py): echoes messages; "close CODE
# REASON" makes it close; "ping me" makes it ping; `closes` has what it received.
echo_server = shapes.websockets_server


def client(running: Native, path: str = "/", **kwargs: Any) -> connect:
    kwargs.setdefault("max_size", None)
    return connect(running.url(path), **kwargs)


# ---------------------------------------------------------------------------
# The listener alone: what its events record and how it closes. The relay
# fidelity shapes (tests/relay_shapes.py) run through `loopwatch run` in
# tests/test_fidelity.py.


async def test_the_upgrade_goes_upstream_with_forwarding_headers_and_the_101_comes_back_as_sent() -> None:
    greeting = frame(TEXT, b"welcome")
    async with raw_backend(extensions=b"permessage-deflate", greeting=greeting) as backend, native(
        backend.url
    ) as running:
        raw = await RawClient.connect(
            running.port,
            "/chat?room=7",
            extra=b"X-Forwarded-For: 203.0.113.9\r\nCookie: a=b\r\nKeep-Alive: 5\r\n"
            b"Sec-WebSocket-Extensions: permessage-deflate\r\n",
        )
        conn = await backend.accept()
        lines = conn.head.split(b"\r\n")
        assert lines[0] == b"GET /chat?room=7 HTTP/1.1"
        assert lines[1] == b"Host: " + backend.url.removeprefix("ws://").encode()
        assert b"Cookie: a=b" in lines
        assert not any(line.lower().startswith(b"keep-alive") for line in lines)
        assert b"X-Forwarded-For: 203.0.113.9, 127.0.0.1" in lines
        assert b"X-Forwarded-Proto: http" in lines
        assert b"X-Forwarded-Host: 127.0.0.1:%d" % running.port in lines
        # The backend's 101, byte for byte, then its greeting.
        assert raw.response.endswith(b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n")
        assert await raw.read_bytes(len(greeting)) == greeting
        # permessage-deflate was negotiated: RSV1 passes.
        compressed = frame(TEXT, b"\xf2\x48\xcd\xc9\xc9\x07\x00", rsv=0b100, mask=b"abcd")
        await raw.send(compressed)
        assert await conn.wait_bytes(len(compressed)) == compressed
        raw.abort()
        conn.close()
        await running.events(closed_count(1))


# A protocol error is the receiving peer's to answer, as without loopwatch: the
# bad frame and what follows pass unparsed (at most PASS_BUDGET bytes, for at
# most ANSWER_GRACE), and what the peer sends before its close comes first.
PASS_BUDGET = 64 * 1024
BAD_OPCODE = frame(0x3, b"?", mask=b"efgh")  # a reserved opcode


async def protocol_errors(running: Native, expected: dict[str, int]) -> None:
    """The listener's count of broken connections by side reaches `expected`
    (it is taken as the relay ends, just after its Closed event)."""
    deadline = asyncio.get_running_loop().time() + 5
    while (counts := running.listener.stats().protocol_errors) != expected:
        assert asyncio.get_running_loop().time() < deadline, counts
        await asyncio.sleep(0.01)


async def test_a_client_protocol_error_is_passed_on_for_the_backend_to_answer() -> None:
    async with raw_backend() as backend, native(backend.url) as running:
        raw = await RawClient.connect(running.port)
        conn = await backend.accept()
        good = frame(TEXT, b"Hello, world!", mask=b"abcd")
        ping = frame(PING, b"", mask=b"ijkl")
        await raw.send(good)
        assert await conn.wait_bytes(len(good)) == good
        await raw.send(BAD_OPCODE + ping)
        # The backend reads what it would read directly: the bad frame, then the ping.
        assert await conn.wait_bytes(len(good + BAD_OPCODE + ping)) == good + BAD_OPCODE + ping
        # It answers the message, then fails the connection: both reach the client, in order.
        answer = frame(TEXT, b"Hello, world!") + frame(CLOSE, close_payload(1002, "reserved opcode"))
        await conn.send(answer)
        conn.close()
        assert await raw.read_to_eof() == answer
        await raw.close()
        events = await running.events(closed_count(1))
        # Counted for the side that broke it, whoever closed (the upstream probe:
        # only the close code said, under the closing side).
        await protocol_errors(running, {"client": 1, "upstream": 0})
    closed = of_type(events, ev.Closed)[0]
    assert (closed.code, closed.reason, closed.initiator) == (1002, "reserved opcode", "upstream")
    traffic = next(r.traffic for r in running.received if r.traffic is not None)
    assert (traffic.messages_in, traffic.messages_out) == (1, 1)  # nothing counted after the bad frame


async def test_the_client_gets_1002_when_the_backend_tolerates_the_error() -> None:
    """A backend that does not fail the connection within 2 s: loopwatch closes
    it, 1002 to the client; the backend's connection ends after what passed."""
    async with raw_backend() as backend, native(backend.url) as running:
        raw = await RawClient.connect(running.port)
        conn = await backend.accept()
        await raw.send(BAD_OPCODE)
        down = await raw.read_frame(timeout=5)
        assert (down.opcode, down.close) == (CLOSE, (1002, "loopwatch: reserved opcode 0x3"))
        assert await conn.wait_eof() == BAD_OPCODE
        await raw.close()
        events = await running.events(closed_count(1))
    closed = of_type(events, ev.Closed)[0]
    assert (closed.code, closed.reason, closed.initiator) == (1002, "loopwatch: reserved opcode 0x3", "proxy")


@pytest.mark.parametrize("limit", [None, 1000])
async def test_what_passes_after_a_protocol_error_is_bounded(limit: int | None) -> None:
    """At most 64 KiB (or the message size limit, if smaller) from the bad
    frame's first byte; past that, loopwatch closes at once."""
    budget = PASS_BUDGET if limit is None else limit
    bad = frame(0x3, os.urandom(budget + 5000), mask=b"efgh")
    limits = {} if limit is None else {"max_message_size": limit}
    async with raw_backend() as backend, native(backend.url, **limits) as running:
        raw = await RawClient.connect(running.port)
        conn = await backend.accept()
        await raw.send(bad)
        down = await raw.read_frame(timeout=1.5)  # well before the 2 s answer deadline
        assert down.close == (1002, "loopwatch: reserved opcode 0x3")
        assert await conn.wait_eof() == bad[:budget]
        await raw.close()
        await running.events(closed_count(1))


async def test_an_upstream_protocol_error_is_passed_on_for_the_client_to_answer() -> None:
    async with raw_backend() as backend, native(backend.url) as running:
        raw = await RawClient.connect(running.port)
        conn = await backend.accept()
        bad = frame(BINARY, b"masked", mask=b"wxyz") + frame(TEXT, b"after")  # server frames are unmasked
        await conn.send(frame(TEXT, b"fine") + bad)
        assert await raw.read_bytes(len(frame(TEXT, b"fine") + bad)) == frame(TEXT, b"fine") + bad
        # The client fails the connection itself; its close reaches the backend.
        close_up = frame(CLOSE, close_payload(1002, "masked server frame"), mask=b"abcd")
        await raw.send(close_up)
        assert await conn.wait_bytes(len(close_up)) == close_up
        conn.close()
        assert await raw.read_to_eof() == b""
        await raw.close()
        events = await running.events(closed_count(1))
        await protocol_errors(running, {"client": 0, "upstream": 1})
    closed = of_type(events, ev.Closed)[0]
    assert (closed.code, closed.reason, closed.initiator) == (1002, "masked server frame", "client")


async def test_an_idle_connection_is_closed_with_1001() -> None:
    async with echo_server() as backend, native(backend.url, idle_timeout=0.3) as running:
        async with client(running) as ws:
            await ws.send("once")
            assert await ws.recv() == "once"
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (1001, "loopwatch: idle timeout")
        assert await asyncio.wait_for(backend.closes.get(), 5) == (1001, "loopwatch: idle timeout")


async def test_the_idle_timeout_counts_from_the_last_traffic() -> None:
    """Closed between the timeout and a quarter more after the last message
    (the check runs in quarters of it); checked once per timeout, traffic
    just after a check kept the connection up to twice the timeout."""
    async with echo_server() as backend, native(backend.url, idle_timeout=2.0) as running:
        async with client(running) as ws:
            await asyncio.sleep(0.1)
            await ws.send("once")
            assert await ws.recv() == "once"
            last = time.monotonic()
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            silence = time.monotonic() - last
        assert 1.9 <= silence < 3.2, silence  # at most 2.5, with room for a loaded machine


@contextlib.asynccontextmanager
async def flooding(conn: RawBackendConnection) -> AsyncIterator[None]:
    """The backend sends frames to `conn` until its writes block (its client
    reads nothing), and on while the block lasts."""

    async def stream() -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                await conn.send(frame(BINARY, b"x" * 65536))

    task = asyncio.create_task(stream())
    try:
        yield
    finally:
        task.cancel()


async def test_a_side_that_reads_nothing_is_idle_whatever_it_sends() -> None:
    """A client that stopped reading but still pings: the backend's writes wait
    on it, and its pings were traffic, so nothing ended the connection (the
    slow-peers probe: 20 open after 3.75 idle timeouts; HAProxy closes them).
    Output that does not move for the idle timeout is no traffic."""
    async with raw_backend() as backend, native(backend.url, idle_timeout=0.4) as running:
        raw = await RawClient.connect(running.port, rcvbuf=4096)
        conn = await backend.accept()
        began = time.monotonic()
        try:
            async with flooding(conn):
                while not conn.eof.is_set() and time.monotonic() - began < 10:
                    await raw.send(frame(PING, b"", mask=b"abcd"))
                    await asyncio.sleep(0.1)
        finally:
            raw.abort()
        # The idle timeout (0.4 s, checked in quarters), then the close's 2 s grace.
        assert conn.eof.is_set() and time.monotonic() - began < 5
        frames, _ = parse_frames(conn.received)
        assert (1001, "loopwatch: idle timeout") in [f.close for f in frames if f.opcode == CLOSE]
        events = await running.events(closed_count(1))
    closed = of_type(events, ev.Closed)[0]
    assert (closed.code, closed.initiator) == (1001, "proxy")


async def test_a_client_gone_without_a_close_frame_is_passed_on_though_bytes_wait_for_it() -> None:
    """A client that stopped reading, then sent its FIN without a close frame:
    its leg waited for the bytes queued for it to be written, which never
    happened, so the upstream heard nothing until the idle timeout (an hour by
    default; the slow-peers probe). nginx and HAProxy end it at the FIN. Now
    the upstream is told at once; the bytes get the close's grace."""
    async with raw_backend() as backend, native(backend.url) as running:
        raw = await RawClient.connect(running.port, rcvbuf=4096)
        conn = await backend.accept()
        lost = (1001, "loopwatch: client connection lost")

        def told() -> bool:
            frames, _ = parse_frames(conn.received)
            return lost in [f.close for f in frames if f.opcode == CLOSE]

        try:
            async with flooding(conn):
                await asyncio.sleep(0.5)  # bytes for the client pile up in loopwatch
                raw.writer.write_eof()  # gone, without a close frame
                await wait_for(told, timeout=1.5)
                events = await running.events(closed_count(1), timeout=5)
        finally:
            raw.abort()
    closed = of_type(events, ev.Closed)[0]
    assert (closed.code, closed.initiator) == (1006, "client")


async def test_stop_closes_live_websockets_with_1001_on_both_legs() -> None:
    async with echo_server() as backend, native(backend.url) as running:
        sockets = [await client(running) for _ in range(3)]
        for i, ws in enumerate(sockets):
            await ws.send(f"hello {i}")
            assert await ws.recv() == f"hello {i}"
        assert running.listener.stats().relays == 3
        left = await running.stop(grace=5.0)
        assert left == 0
        for ws in sockets:
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd is not None
            assert (info.value.rcvd.code, info.value.rcvd.reason) == (1001, "loopwatch: shutting down")
        for _ in sockets:
            assert await asyncio.wait_for(backend.closes.get(), 5) == (1001, "loopwatch: shutting down")
        assert not running.listener.running
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", running.port)
        events = await running.events(closed_count(3))
    assert {(e.code, e.reason, e.initiator) for e in of_type(events, ev.Closed)} == {
        (1001, "loopwatch: shutting down", "proxy")
    }


async def test_stop_waits_for_the_frame_in_flight_before_its_close_frame() -> None:
    payload = os.urandom(50_000)
    whole = frame(BINARY, payload, mask=b"wxyz")
    async with raw_backend() as backend, native(backend.url) as running:
        raw = await RawClient.connect(running.port)
        conn = await backend.accept()
        await raw.send(whole[:20_000])
        await conn.wait_bytes(20_000)
        stopping = asyncio.create_task(running.stop(grace=5.0))
        down = await raw.read_frame()  # toward the client: at a boundary already
        assert down.close == (1001, "loopwatch: shutting down")
        await asyncio.sleep(0.05)
        await raw.send(whole[20_000:] + frame(CLOSE, close_payload(1001), mask=b"abcd"))
        reason = "loopwatch: shutting down"
        received = await conn.wait_bytes(len(whole) + 6 + 2 + len(reason))
        assert received[: len(whole)] == whole  # the frame in flight, complete
        tail = received[len(whole) :]
        assert tail[:2] == bytes((0x88, 0x80 | 2 + len("loopwatch: shutting down")))
        mask = tail[2:6]
        text = bytes(b ^ mask[i % 4] for i, b in enumerate(tail[6:]))
        assert text == close_payload(1001, "loopwatch: shutting down")
        await conn.send(frame(CLOSE, close_payload(1001)))
        assert await asyncio.wait_for(stopping, 10) == 0
        events = await running.events(closed_count(1))
    closed = of_type(events, ev.Closed)[0]
    assert (closed.code, closed.initiator) == (1001, "proxy")


async def test_counters_answer_while_a_stop_waits_out_its_grace() -> None:
    """stop() holds its lock for its grace (without the GIL): `running`, stats()
    and live() never wait for it, so the event loop is not blocked meanwhile."""
    async with raw_backend() as backend, native(backend.url) as running:
        raw = await RawClient.connect(running.port)
        conn = await backend.accept()
        stopped = threading.Event()

        def stop() -> int:
            left = running.listener.stop(3.0)
            stopped.set()
            return left

        stopping = asyncio.create_task(asyncio.to_thread(stop))
        # Neither peer answers the 1001: the relay waits for them (the stop's
        # grace), and the stop with it.
        assert (await raw.read_frame()).close == (1001, "loopwatch: shutting down")
        assert not running.listener.running
        stats, live = running.listener.stats(), running.listener.live()
        assert not stopped.is_set()
        assert stats.relays == 1 and [c.conn_id for c in live] == [1]  # still in its grace
        assert await asyncio.wait_for(stopping, 15) == 0  # nobody answered: reset just before the grace's end
        assert running.listener.stats().relays == 0
        raw.abort()
        conn.writer.transport.abort()


# --- the brain's commands on live connections ----------------------------------------


async def test_close_by_id_gives_the_client_and_the_backend_that_code_and_reason() -> None:
    """The engine's close-oldest (or an operator's close): one WebSocket, named by
    the id of its events, is closed on both legs; the others are untouched."""
    reason = "loopwatch: too many connections"
    async with echo_server() as backend, native(backend.url) as running:
        # One after the other: the first accepted has the smaller id.
        first = await client(running)
        second = await client(running)
        for ws in (first, second):
            await ws.send("hello")
            assert await ws.recv() == "hello"
        await running.events(lambda es: len(of_type(es, ev.Opened)) == 2)
        oldest, newest = running.conn_ids(ev.Opened)
        assert oldest < newest
        assert running.listener.close(oldest, 1008, reason) is True
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(first.recv(), 5)
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (1008, reason)
        assert await asyncio.wait_for(backend.closes.get(), 5) == (1008, reason)
        # The other connection still relays.
        other = second
        await other.send("still here")
        assert await asyncio.wait_for(other.recv(), 5) == "still here"
        events = await running.events(closed_count(1))
        await wait_for(lambda: len(running.listener.live()) == 1)
        assert running.listener.close(oldest, 1000) is False  # ended
        assert running.listener.close(10**12, 1000) is False  # never existed
        with pytest.raises(ValueError, match="code"):
            running.listener.close(newest, 1005)
        # A reason too long for a close frame is cut on a character boundary.
        assert running.listener.close(newest, 4000, "é" * 100) is True
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(other.recv(), 5)
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (4000, "é" * 61)
    closed = of_type(events, ev.Closed)[0]
    assert (closed.conn_id, closed.code, closed.reason, closed.initiator) == (oldest, 1008, reason, "proxy")


async def test_close_by_id_waits_for_the_frame_in_flight() -> None:
    """A close asked while a frame is half-way to the backend: the backend gets that
    frame whole, then the close frame (masked: loopwatch is its client)."""
    payload = os.urandom(50_000)
    whole = frame(BINARY, payload, mask=b"wxyz")
    reason = "operator close"
    async with raw_backend() as backend, native(backend.url) as running:
        raw = await RawClient.connect(running.port)
        conn = await backend.accept()
        await raw.send(whole[:20_000])
        await conn.wait_bytes(20_000)
        await running.events(lambda es: bool(of_type(es, ev.Opened)))
        assert running.listener.close(running.conn_ids(ev.Opened)[0], 4001, reason)
        down = await raw.read_frame()  # toward the client: at a boundary already
        assert down.close == (4001, reason)
        await raw.send(whole[20_000:] + frame(CLOSE, close_payload(4001), mask=b"abcd"))
        received = await conn.wait_bytes(len(whole) + 6 + 2 + len(reason))
        assert received[: len(whole)] == whole
        tail = received[len(whole) :]
        assert tail[:2] == bytes((0x88, 0x80 | 2 + len(reason)))
        mask = tail[2:6]
        assert bytes(b ^ mask[i % 4] for i, b in enumerate(tail[6:])) == close_payload(4001, reason)
        await conn.send(frame(CLOSE, close_payload(4001)))
        events = await running.events(closed_count(1))
    closed = of_type(events, ev.Closed)[0]
    assert (closed.code, closed.reason, closed.initiator) == (4001, reason, "proxy")


async def test_close_by_id_after_a_close_frame_passed_sends_no_second_one() -> None:
    """The backend's close frame (the incident's 1008) already reached the client
    when the brain's close comes (a late refusal): the client gets no second close
    frame (a frame after the close is a protocol error: Chromium fails the
    connection, 1006); the backend gets loopwatch's, and the client's close
    reply ends the connection with a FIN."""
    reason = "loopwatch: cooldown, retry in 6s"
    async with raw_backend() as backend, native(backend.url) as running:
        raw = await RawClient.connect(running.port)
        conn = await backend.accept()
        await running.events(lambda es: bool(of_type(es, ev.Opened)))
        await conn.send(frame(CLOSE, close_payload(1008, "token expired")))
        assert (await raw.read_frame()).close == (1008, "token expired")
        assert running.listener.close(running.conn_ids(ev.Opened)[0], 1013, reason)
        up = await conn.wait_bytes(2 + 4 + 2 + len(reason))
        (to_backend,), _ = parse_frames(up)
        assert to_backend.close == (1013, reason)
        await raw.send(frame(CLOSE, close_payload(1008, "token expired"), mask=b"abcd"))
        assert await raw.read_to_eof() == b""  # a FIN, and nothing after the backend's close
        await running.events(closed_count(1))


async def test_live_lists_each_open_websocket_with_its_counts() -> None:
    async with echo_server() as backend, native(
        backend.url, routes=[("/a", backend.url), ("/b", backend.url)]
    ) as running:
        assert running.listener.live() == []
        a, b = await client(running, "/a/x", compression=None), await client(running, "/b", compression=None)
        for message in ("one", "two", "three"):
            await a.send(message)
            assert await a.recv() == message
        await b.send(b"\x00" * 1000)
        assert await b.recv() == b"\x00" * 1000
        await running.events(lambda es: len(of_type(es, ev.Opened)) == 2)
        opened = of_type(running.received_events(), ev.Opened)
        ids = {e.route: e.conn_id for e in opened}
        assert list(ids.values()) == running.conn_ids(ev.Opened)
        live = {c.conn_id: c for c in running.listener.live()}
        assert set(live) == set(ids.values())
        assert live[ids["/a"]].route == "/a"
        assert live[ids["/a"]].stats == RelayStats(3, 3, len("onetwothree"), len("onetwothree"))
        assert live[ids["/b"]].stats == RelayStats(1, 1, 1000, 1000)
        await a.close()
        await wait_for(lambda: [c.conn_id for c in running.listener.live()] == [ids["/b"]])
        await b.close()
        await wait_for(lambda: running.listener.live() == [])
