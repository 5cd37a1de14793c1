"""The native listener (proxy/dataplane/py, issue 16) as a WebSocket proxy:
what goes in one end comes out of the other, closes are passed on or made as
docs/relay.md says, and stop() ends every connection with 1001 on both legs.

Black-box: the listener runs on its own tokio threads in this process, in
front of independent peers (the `websockets` library, and raw sockets with
hand-built frames from tests/wsraw.py); the test only talks to sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from loopwatch.detectors import events as ev
from loopwatch.proxy.dataplane.boundary import RelayStats
from loopwatch.proxy.dataplane.native import (
    EnforcementTable,
    EventQueue,
    NativeListener,
    Received,
)
from loopwatch.proxy.dataplane.settings import Limits
from tests.conftest import wait_for, websockets_backend
from tests.wsraw import (
    BINARY,
    CLOSE,
    CONT,
    PING,
    PONG,
    TEXT,
    RawClient,
    close_payload,
    frame,
    raw_backend,
)

MiB = 1 << 20


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
    trusted_proxies: tuple[str, ...] = (),
    capacity: int = 4096,
    threads: int = 2,
    **limits: Any,
) -> AsyncIterator[Native]:
    queue = EventQueue(capacity)
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
        trusted_proxies=trusted_proxies,
        threads=threads,
    )
    running = Native(listener, queue, table, [])
    try:
        yield running
    finally:
        await running.stop()


def of_type(events: list[ev.Event], cls: type) -> list[Any]:
    return [e for e in events if isinstance(e, cls)]


def closed_count(n: int) -> Callable[[list[ev.Event]], bool]:
    return lambda events: len(of_type(events, ev.Closed)) >= n


@dataclass
class Backend:
    url: str
    closes: asyncio.Queue[tuple[int | None, str]]  # what the backend received


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[Backend]:
    """Echoes messages; "close CODE REASON" makes it close; "ping me" makes it ping."""
    closes: asyncio.Queue[tuple[int | None, str]] = asyncio.Queue()

    async def handler(ws: ServerConnection) -> None:
        try:
            async for message in ws:
                if isinstance(message, str) and message.startswith("close "):
                    _, code, reason = message.split(" ", 2)
                    await ws.close(int(code), reason)
                    return
                if message == "ping me":
                    await (await ws.ping(b"from the backend"))
                    await ws.send("pong received")
                    continue
                await ws.send(message)
        finally:
            await ws.wait_closed()
            closes.put_nowait((ws.close_code, ws.close_reason))

    async with websockets_backend(handler) as (url, _):
        yield Backend(url, closes)


def client(running: Native, path: str = "/", **kwargs: Any) -> connect:
    kwargs.setdefault("max_size", None)
    return connect(running.url(path), **kwargs)


# ---------------------------------------------------------------------------


async def test_text_and_binary_messages_echo_unchanged() -> None:
    messages: list[str | bytes] = [
        "hello, loopwatch",
        bytes(range(256)),
        "",
        b"",
        "ünïcødé ✓ 🙂 𝄞",
        "x" * MiB,
        os.urandom(MiB),
    ]
    async with echo_server() as backend, native(backend.url) as running:
        async with client(running, "/room?id=1", compression=None) as ws:
            for message in messages:
                await ws.send(message)
                echoed = await asyncio.wait_for(ws.recv(), 10)
                assert type(echoed) is type(message)
                assert echoed == message
            # Ping from the client, and from the backend: both pass through.
            await asyncio.wait_for(await ws.ping(b"ping payload"), 5)
            await ws.send("ping me")
            assert await asyncio.wait_for(ws.recv(), 5) == "pong received"
        assert await asyncio.wait_for(backend.closes.get(), 5) == (1000, "")
        events = await running.events(closed_count(1))
    closed = of_type(events, ev.Closed)[0]
    assert (closed.code, closed.reason, closed.initiator) == (1000, "", "client")
    traffic = next(r.traffic for r in running.received if isinstance(r.event, ev.Closed))
    assert traffic is not None
    # The messages above, plus "ping me"; the backend's answers, plus "pong received".
    assert (traffic.messages_in, traffic.messages_out) == (len(messages) + 1, len(messages) + 1)
    sizes = sum(len(m.encode() if isinstance(m, str) else m) for m in messages)
    assert traffic.bytes_in == sizes + len("ping me")
    assert traffic.bytes_out == sizes + len("pong received")


async def test_a_sixteen_mib_message() -> None:
    message = os.urandom(16 * MiB)
    async with echo_server() as backend, native(backend.url) as running, client(running) as ws:
        await ws.send(message)
        assert await asyncio.wait_for(ws.recv(), 30) == message


async def test_ten_thousand_messages_in_order() -> None:
    n = 10_000
    async with echo_server() as backend, native(backend.url) as running:
        async with client(running) as ws:

            async def sender() -> None:
                for i in range(n):
                    await ws.send(f"{i}" if i % 2 else f"{i}".encode())

            async def receiver() -> list[str | bytes]:
                return [await ws.recv() for _ in range(n)]

            _, received = await asyncio.wait_for(asyncio.gather(sender(), receiver()), 60)
            assert received == [f"{i}" if i % 2 else f"{i}".encode() for i in range(n)]
        await running.events(closed_count(1))
    traffic = next(r.traffic for r in running.received if r.traffic is not None)
    assert (traffic.messages_in, traffic.messages_out) == (n, n)


# Codes either side may send (RFC 6455 §7.4), from each range; reasons up to the
# 123 bytes a close frame can carry.
CLOSE_CODES = [1000, 1001, 1003, 1007, 1008, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4321, 4999]
REASONS = ["", "ünïcødé ✓", "r" * 123, "é" * 61 + "x"]


@pytest.mark.parametrize("initiator", ["client", "backend"])
async def test_close_codes_and_reasons_reach_the_far_end(initiator: str) -> None:
    async with echo_server() as backend, native(backend.url) as running:
        for code in CLOSE_CODES:
            for reason in REASONS:
                async with client(running) as ws:
                    await ws.send("warm-up")
                    assert await ws.recv() == "warm-up"
                    if initiator == "client":
                        await ws.close(code, reason)
                    else:
                        await ws.send(f"close {code} {reason}")
                        with pytest.raises(ConnectionClosed) as info:
                            await asyncio.wait_for(ws.recv(), 5)
                        assert info.value.rcvd is not None
                        assert (info.value.rcvd.code, info.value.rcvd.reason) == (code, reason)
                assert await asyncio.wait_for(backend.closes.get(), 5) == (code, reason)
        n = len(CLOSE_CODES) * len(REASONS)
        events = await running.events(closed_count(n), timeout=10)
    who = "client" if initiator == "client" else "upstream"
    seen = [(e.code, e.reason, e.initiator) for e in of_type(events, ev.Closed)]
    assert sorted(seen) == sorted((c, r, who) for c in CLOSE_CODES for r in REASONS)


async def test_fragments_pings_and_pongs_pass_through_byte_for_byte() -> None:
    key = bytes.fromhex("a1b2c3d4")
    up = [
        frame(TEXT, b"Hello, ", fin=False, mask=key),
        frame(PING, b"are you there?", mask=key),
        frame(CONT, "wörld".encode(), fin=False, mask=key),
        frame(PONG, b"", mask=key),
        frame(CONT, b"!", mask=key),
        frame(BINARY, os.urandom(70_000), mask=key),
    ]
    down = [
        frame(BINARY, b"part 1 ", fin=False),
        frame(PING, b"hi"),
        frame(CONT, b"part 2", fin=True),
        frame(PONG, b"\x00" * 125),
        frame(TEXT, b"x" * 300),
    ]
    async with raw_backend() as backend, native(backend.url) as running:
        raw = await RawClient.connect(running.port, "/raw")
        conn = await backend.accept()
        for f in up:  # one write per frame, the header of each cut in two
            await raw.send(f[:3])
            await asyncio.sleep(0.005)
            await raw.send(f[3:])
        assert await conn.wait_bytes(len(b"".join(up))) == b"".join(up)
        await conn.send(b"".join(down))
        assert await raw.read_bytes(len(b"".join(down))) == b"".join(down)
        close_up = frame(CLOSE, close_payload(4001, "bye ✓"), mask=key)
        await raw.send(close_up)
        assert (await conn.wait_bytes(len(b"".join(up)) + len(close_up))).endswith(close_up)
        close_down = frame(CLOSE, close_payload(4001, "bye ✓"))
        await conn.send(close_down)
        conn.close()
        assert await raw.read_to_eof() == close_down
        await raw.close()
        events = await running.events(closed_count(1))
    closed = of_type(events, ev.Closed)[0]
    assert (closed.code, closed.reason, closed.initiator) == (4001, "bye ✓", "client")
    traffic = next(r.traffic for r in running.received if r.traffic is not None)
    assert (traffic.messages_in, traffic.messages_out) == (2, 2)


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


async def test_a_client_protocol_error_closes_both_sides_with_1002() -> None:
    async with raw_backend() as backend, native(backend.url) as running:
        raw = await RawClient.connect(running.port)
        conn = await backend.accept()
        good = frame(TEXT, b"ok", mask=b"abcd")
        await raw.send(good + bytes([0x83, 0x80, 0, 0, 0, 0]))  # then a reserved opcode
        reason = "loopwatch: reserved opcode 0x3"
        expected_up = frame(CLOSE, close_payload(1002, reason))  # masked: compare the unmasked
        received = await conn.wait_bytes(len(good) + len(expected_up) + 4)
        assert received.startswith(good)
        tail = received[len(good) :]
        assert tail[0] == 0x88 and tail[1] & 0x80, "a masked close frame toward the backend"
        mask, payload = tail[2:6], tail[6:]
        assert bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) == close_payload(1002, reason)
        down = await raw.read_frame()
        assert (down.opcode, down.close) == (CLOSE, (1002, reason))
        await raw.close()
        await conn.send(frame(CLOSE, close_payload(1002)))
        conn.close()
        events = await running.events(closed_count(1))
    closed = of_type(events, ev.Closed)[0]
    assert (closed.code, closed.reason, closed.initiator) == (1002, reason, "proxy")


async def test_a_message_over_the_limit_is_refused_with_1009() -> None:
    async with echo_server() as backend, native(backend.url, max_message_size=1000) as running:
        async with client(running, compression=None) as ws:
            await ws.send("x" * 1000)
            assert await ws.recv() == "x" * 1000
            await ws.send("x" * 1001)
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (
            1009,
            "loopwatch: message larger than 1000 bytes",
        )
        assert await asyncio.wait_for(backend.closes.get(), 5) == (
            1009,
            "loopwatch: message larger than 1000 bytes",
        )


async def test_upstream_lost_gives_the_client_1014() -> None:
    async with raw_backend() as backend, native(backend.url) as running:
        raw = await RawClient.connect(running.port)
        conn = await backend.accept()
        conn.writer.transport.abort()
        down = await raw.read_frame()
        assert down.close == (1014, "loopwatch: upstream connection lost")
        await raw.send(frame(CLOSE, close_payload(1014), mask=b"abcd"))
        assert await raw.read_to_eof() == b""
        events = await running.events(closed_count(1))
    closed = of_type(events, ev.Closed)[0]
    assert (closed.code, closed.initiator) == (1006, "upstream")


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


async def test_close_then_half_close_from_the_client() -> None:
    """A client that sends its close frame and shuts its writing half still gets
    the backend's close reply; the EOF reaches the backend."""
    async with raw_backend(close_on_eof=False) as backend, native(backend.url) as running:
        raw = await RawClient.connect(running.port)
        conn = await backend.accept()
        close_up = frame(CLOSE, close_payload(1000, "done"), mask=b"abcd")
        await raw.send(close_up)
        raw.writer.write_eof()
        assert await conn.wait_eof() == close_up  # the close frame, then the EOF
        close_down = frame(CLOSE, close_payload(1000, "done too"))
        await conn.send(close_down)
        conn.close()
        assert await raw.read_to_eof() == close_down
        await raw.close()
        events = await running.events(closed_count(1))
    closed = of_type(events, ev.Closed)[0]
    assert (closed.code, closed.reason, closed.initiator) == (1000, "done", "client")


async def test_frames_and_eof_sent_with_the_upgrade_request_reach_the_backend() -> None:
    """Frames in the same write as the upgrade request, then the client's EOF
    before the 101: the backend gets them and the EOF, the client the 101 and
    the backend's close reply; the backend's own first frames (in the write of
    its 101) reach the client."""
    greeting = frame(TEXT, b"welcome")
    async with raw_backend(greeting=greeting, close_on_eof=False) as backend, native(
        backend.url
    ) as running:
        early = frame(TEXT, b"eager", mask=b"abcd") + frame(CLOSE, close_payload(1000, "early"), mask=b"efgh")
        raw = await RawClient.connect(running.port, early=early, eof=True)
        conn = await backend.accept()
        assert await conn.wait_eof() == early
        close_down = frame(CLOSE, close_payload(1000, "early too"))
        await conn.send(close_down)
        conn.close()
        assert await raw.read_to_eof() == greeting + close_down
        await raw.close()
        events = await running.events(closed_count(1))
    closed = of_type(events, ev.Closed)[0]
    assert (closed.code, closed.reason, closed.initiator) == (1000, "early", "client")


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
