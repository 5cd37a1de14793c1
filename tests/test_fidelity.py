"""Relay fidelity: what goes in one end comes out of the other, byte for byte,
and loopwatch's own closes (lost side, message too big, protocol error) are the
documented ones (docs/relay.md, "Closes").

Three kinds of peers: raw sockets with hand-built frames (tests/wsraw.py), the
`websockets` library, and aiohttp's server — never loopwatch's own code on
both ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvloop
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from loopwatch.detectors import events as ev
from loopwatch.proxy.app.runtime import Running, start
from loopwatch.proxy.dataplane.boundary import Connection, Gate, RelayStats
from tests import relay_shapes as shapes
from tests.conftest import loopwatch, settings_for, wait_for, websockets_backend, ws_url
from tests.relay_shapes import BACKENDS, Backend, key, websockets_handler
from tests.wsraw import (
    BINARY,
    CLOSE,
    CONT,
    PING,
    TEXT,
    RawBackend,
    RawClient,
    close_payload,
    frame,
    parse_frames,
    raw_backend,
)

RUN_ON_UVLOOP = True  # the loop `loopwatch run` uses (tests/conftest.py)


class RecordingGate(Gate):
    """Admits everyone; records each relayed connection's end as the relay saw it."""

    def __init__(self) -> None:
        self.closes: list[tuple[int, str, str]] = []

    def closed(
        self, attempt: Connection, t: float, code: int, reason: str, initiator: str, stats: RelayStats,
        event: ev.Closed | None = None,
    ) -> None:  # fmt: skip
        self.closes.append((code, reason, initiator))


# ---------------------------------------------------------------------------
# 1. Byte exactness with hand-crafted frames (tests/relay_shapes.py).


@pytest.mark.parametrize("how", ["whole", "frames", "split"])
async def test_hand_crafted_frames_arrive_byte_for_byte(how: str) -> None:
    gate = RecordingGate()
    async with raw_backend(extensions=b"permessage-deflate") as backend, loopwatch(
        backend.url, gate
    ) as running:
        await shapes.hand_crafted_frames_arrive_byte_for_byte(running.proxy_port, backend, how)
        await wait_for(lambda: running.plane.connections() == 0)
        assert running.plane.connections() == 0
    assert gate.closes == [(4001, "bye ✓", "client")]


async def test_header_split_at_every_offset() -> None:
    async with raw_backend() as backend, loopwatch(backend.url, Gate()) as running:
        await shapes.header_split_at_every_offset(running.proxy_port, backend)
        await wait_for(lambda: running.plane.connections() == 0)


async def test_frames_sent_together_with_the_handshake_are_kept() -> None:
    async with raw_backend(greeting=shapes.GREETING) as backend, loopwatch(backend.url, Gate()) as running:
        await shapes.frames_sent_with_the_handshake_are_kept(running.proxy_port, backend)
        await wait_for(lambda: running.plane.connections() == 0)


async def test_close_then_half_close_from_the_client() -> None:
    async with raw_backend(close_on_eof=False) as backend, loopwatch(backend.url, Gate()) as running:
        await shapes.close_then_half_close_from_the_client(running.proxy_port, backend)
        await wait_for(lambda: running.plane.connections() == 0)


async def test_close_and_half_close_before_the_101_reach_the_backend() -> None:
    gate = RecordingGate()
    async with raw_backend(greeting=shapes.GREETING, close_on_eof=False) as backend, loopwatch(
        backend.url, gate
    ) as running:
        await shapes.frames_close_and_eof_before_the_101_reach_the_backend(running.proxy_port, backend)
        await wait_for(lambda: running.plane.connections() == 0)
    assert gate.closes == [(1000, "early", "client")]


# ---------------------------------------------------------------------------
# 2. The fidelity matrix: websockets client, websockets or aiohttp backend.


@contextlib.asynccontextmanager
async def proxied_backend(kind: str) -> AsyncIterator[tuple[Backend, Running]]:
    async with BACKENDS[kind]() as backend, loopwatch(backend.url, Gate()) as running:
        yield backend, running


def client(running: Running, **kwargs: Any) -> connect:
    """A websockets client through loopwatch (no message size limit by default)."""
    kwargs.setdefault("max_size", None)
    return connect(ws_url(running, "/fidelity"), **kwargs)


@pytest.mark.parametrize("compression", ["deflate", None], ids=["deflate", "plain"])
@pytest.mark.parametrize("kind", list(BACKENDS))
async def test_messages_echo_unchanged(kind: str, compression: str | None) -> None:
    async with proxied_backend(kind) as (backend, running):
        await shapes.messages_echo_unchanged(ws_url(running, "/fidelity"), backend, compression, kind)
        await wait_for(lambda: running.plane.connections() == 0)


@pytest.mark.parametrize("kind", list(BACKENDS))
async def test_ten_thousand_messages_in_order(kind: str) -> None:
    async with proxied_backend(kind) as (_, running):

        def counted() -> None:
            ((_, stats),) = running.plane.live()
            assert stats.messages_in == shapes.TEN_THOUSAND
            assert stats.messages_out == shapes.TEN_THOUSAND

        await shapes.ten_thousand_messages_in_order(ws_url(running, "/fidelity"), counted)


@pytest.mark.parametrize("code", shapes.CLOSE_CODES)
@pytest.mark.parametrize("initiator", ["client", "backend"])
@pytest.mark.parametrize("kind", list(BACKENDS))
async def test_close_codes_and_reasons_reach_the_far_end(kind: str, initiator: str, code: int) -> None:
    gate = RecordingGate()
    async with BACKENDS[kind]() as backend, loopwatch(backend.url, gate) as running:

        async def relays_done() -> None:
            await wait_for(lambda: running.plane.connections() == 0)

        await shapes.close_codes_and_reasons_reach_the_far_end(
            ws_url(running, "/fidelity"), backend, initiator, [code], relays_done
        )
    who = "client" if initiator == "client" else "upstream"
    assert gate.closes == [(code, reason, who) for reason in shapes.REASONS]


# ---------------------------------------------------------------------------
# 3. Properties at the socket level: any sequence of messages arrives identical
# and in order; any valid stream of frames, cut anywhere, arrives byte for byte.


def test_any_message_sequence_arrives_identical_and_in_order() -> None:
    loop = uvloop.new_event_loop()
    received: dict[str, list[str | bytes]] = {}

    async def setup() -> tuple[contextlib.AsyncExitStack, Running]:
        stack = contextlib.AsyncExitStack()
        url, _ = await stack.enter_async_context(websockets_backend(shapes.recorder(received)))
        running = await start(settings_for(url), Gate())
        stack.push_async_callback(running.close)
        return stack, running

    stack, running = loop.run_until_complete(setup())
    try:
        shapes.any_message_sequence_arrives_identical_and_in_order(
            loop, lambda path: ws_url(running, path), received
        )
        loop.run_until_complete(wait_for(lambda: running.plane.connections() == 0))
    finally:
        loop.run_until_complete(stack.aclose())
        loop.close()


def test_frames_cut_anywhere_arrive_byte_for_byte() -> None:
    loop = uvloop.new_event_loop()

    async def setup() -> tuple[contextlib.AsyncExitStack, RawBackend, Running]:
        stack = contextlib.AsyncExitStack()
        backend = await stack.enter_async_context(raw_backend(extensions=b"permessage-deflate"))
        running = await start(settings_for(backend.url), Gate())
        stack.push_async_callback(running.close)
        return stack, backend, running

    stack, backend, running = loop.run_until_complete(setup())
    try:
        shapes.frames_cut_anywhere_arrive_byte_for_byte(loop, running.proxy_port, backend)
        loop.run_until_complete(wait_for(lambda: running.plane.connections() == 0))
    finally:
        loop.run_until_complete(stack.aclose())
        loop.close()


# ---------------------------------------------------------------------------
# 4. A side vanishes without a close frame.


@pytest.mark.parametrize("how", ["abort", "fin"])
async def test_upstream_lost_gives_client_1014(how: str) -> None:
    async def handler(ws: ServerConnection) -> None:
        async for message in ws:
            if message == "die":
                # RST, or FIN without a close frame (a crashed process's kernel sends FIN).
                if how == "abort":  # RST: linger 0, then drop the socket
                    sock = ws.transport.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    ws.transport.abort()
                else:
                    ws.transport.close()
                return
            await ws.send(message)

    gate = RecordingGate()
    async with websockets_backend(handler) as (url, _), loopwatch(url, gate) as running:
        async with client(running) as ws:
            await ws.send("still here")
            assert await ws.recv() == "still here"
            await ws.send("die")
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd is not None
            assert (info.value.rcvd.code, info.value.rcvd.reason) == (
                1014,
                "loopwatch: upstream connection lost",
            )
        await wait_for(lambda: running.plane.connections() == 0)
        assert running.plane.connections() == 0
    # The relay records who vanished, with 1006: no close frame was ever received.
    assert gate.closes == [(1006, "", "upstream")]


@pytest.mark.parametrize("how", ["abort", "fin"])
async def test_client_lost_gives_upstream_1001(how: str) -> None:
    closes: asyncio.Queue[tuple[int | None, str | None]] = asyncio.Queue()
    gate = RecordingGate()
    async with websockets_backend(lambda ws: websockets_handler(ws, closes)) as (url, _), loopwatch(
        url, gate
    ) as running:
        raw = await RawClient.connect(running.proxy_port)
        await raw.send(frame(TEXT, b"hello", mask=key(1)))
        assert (await raw.read_frame()).payload == b"hello"
        if how == "abort":
            raw.abort()
        else:
            await raw.close()
        assert await asyncio.wait_for(closes.get(), 5) == (1001, "loopwatch: client connection lost")
        await wait_for(lambda: running.plane.connections() == 0)
    assert gate.closes == [(1006, "", "client")]


async def test_upstream_lost_mid_frame_closes_client_without_a_frame() -> None:
    """Half a frame is on its way to the client: a close frame now would be read as
    the rest of that frame, so the client's connection just ends (it sees 1006)."""
    async with raw_backend() as backend, loopwatch(backend.url, Gate()) as running:
        async with client(running) as ws:
            up = await backend.accept()
            whole = frame(BINARY, b"a" * 1000)
            await up.send(whole + whole[:500])
            assert await ws.recv() == b"a" * 1000
            await asyncio.sleep(0.05)
            up.writer.transport.abort()
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd is None
        await wait_for(lambda: running.plane.connections() == 0)


# ---------------------------------------------------------------------------
# 5. Messages larger than limits.max_message_size: 1009 to both sides.

LIMIT = 64 * 1024


@pytest.mark.parametrize("kind", list(BACKENDS))
async def test_oversized_client_message_is_refused_with_1009(kind: str) -> None:
    gate = RecordingGate()
    async with BACKENDS[kind]() as backend, loopwatch(
        backend.url, gate, **{"limits.max_message_size": "64KiB"}
    ) as running:
        async with client(running, compression=None) as ws:
            exact = os.urandom(LIMIT)
            await ws.send(exact)  # exactly at the limit: passes
            assert await ws.recv() == exact
            await ws.send(os.urandom(LIMIT + 1))
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd is not None
            assert info.value.rcvd.code == 1009
            assert info.value.rcvd.reason == f"loopwatch: message larger than {LIMIT} bytes"
        # The backend got loopwatch's 1009 and never the message (it would have echoed it).
        assert await asyncio.wait_for(backend.closes.get(), 5) == (
            1009,
            f"loopwatch: message larger than {LIMIT} bytes",
        )
        await wait_for(lambda: running.plane.connections() == 0)
    assert gate.closes == [(1009, f"loopwatch: message larger than {LIMIT} bytes", "proxy")]


async def test_oversized_message_bytes_never_reach_the_backend() -> None:
    async with raw_backend() as backend, loopwatch(
        backend.url, Gate(), **{"limits.max_message_size": "64KiB"}
    ) as running:
        raw = await RawClient.connect(running.proxy_port)
        up = await backend.accept()
        at_limit = frame(BINARY, os.urandom(LIMIT), mask=key(2))
        fragments = [
            frame(TEXT, b"a" * (LIMIT // 2), fin=False, mask=key(3)),
            frame(CONT, b"b" * (LIMIT // 2), mask=key(4)),  # 64 KiB in two fragments: fine
        ]
        too_big = frame(BINARY, os.urandom(LIMIT + 1), mask=key(5))
        await raw.send(at_limit + b"".join(fragments) + too_big)
        # The client gets 1009, at a frame boundary of what the backend sent it (nothing).
        reply = await raw.read_frame()
        assert reply.opcode == CLOSE and reply.mask is None
        assert reply.close == (1009, f"loopwatch: message larger than {LIMIT} bytes")
        # The backend got the messages up to the limit, then loopwatch's masked close.
        received = await up.wait_bytes(len(at_limit) + len(b"".join(fragments)) + 1)
        assert received.startswith(at_limit + b"".join(fragments))
        frames, used = parse_frames(received[len(at_limit) + len(b"".join(fragments)) :])
        assert [(f.opcode, f.mask is not None) for f in frames] == [(CLOSE, True)]
        assert frames[0].close == (1009, f"loopwatch: message larger than {LIMIT} bytes")
        # Both sides answer the close: the connections end.
        await up.send(frame(CLOSE, close_payload(1009)))
        await raw.send(frame(CLOSE, close_payload(1009), mask=key(0)))
        rest = await up.wait_eof()
        assert len(rest) == len(received)  # nothing of the oversized frame, ever
        await raw.read_to_eof()
        await raw.close()
        await wait_for(lambda: running.plane.connections() == 0, timeout=1.5)


async def test_oversized_fragmented_message_is_cut_at_the_fragment() -> None:
    async with raw_backend() as backend, loopwatch(
        backend.url, Gate(), **{"limits.max_message_size": "64KiB"}
    ) as running:
        raw = await RawClient.connect(running.proxy_port)
        up = await backend.accept()
        first = frame(BINARY, b"x" * LIMIT, fin=False, mask=key(1))
        ping = frame(PING, b"p", mask=key(2))
        last = frame(CONT, b"y", mask=key(3))  # one byte over the limit in total
        await raw.send(first + ping + last)
        reply = await raw.read_frame()
        assert reply.close[0] == 1009
        received = await up.wait_bytes(len(first) + len(ping) + 8)
        assert received.startswith(first + ping)
        frames, _ = parse_frames(received[len(first) + len(ping) :])
        assert [f.opcode for f in frames] == [CLOSE]
        assert frames[0].close[0] == 1009
        raw.abort()
        up.writer.transport.abort()
        await wait_for(lambda: running.plane.connections() == 0)


async def test_oversized_upstream_message_is_refused_with_1009() -> None:
    async def big_sender(ws: ServerConnection) -> None:
        await ws.send(os.urandom(LIMIT))  # at the limit: passes
        await ws.send(os.urandom(LIMIT + 1))
        await ws.wait_closed()
        closes.put_nowait((ws.close_code, ws.close_reason))

    closes: asyncio.Queue[tuple[int | None, str | None]] = asyncio.Queue()
    gate = RecordingGate()
    async with websockets_backend(big_sender, compression=None) as (url, _), loopwatch(
        url, gate, **{"limits.max_message_size": "64KiB"}
    ) as running:
        async with client(running, compression=None) as ws:
            assert len(await ws.recv()) == LIMIT
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd is not None
            assert (info.value.rcvd.code, info.value.rcvd.reason) == (
                1009,
                f"loopwatch: message larger than {LIMIT} bytes",
            )
        assert await asyncio.wait_for(closes.get(), 5) == (
            1009,
            f"loopwatch: message larger than {LIMIT} bytes",
        )
        await wait_for(lambda: running.plane.connections() == 0)
    assert gate.closes == [(1009, f"loopwatch: message larger than {LIMIT} bytes", "proxy")]


@pytest.mark.parametrize("cut", ["payload", "header"])
async def test_proxy_close_waits_for_the_frame_in_flight(cut: str) -> None:
    """The client's oversized message ends the connection while a server frame is
    on its way to the client (cut in its payload, or in its header): the client
    gets the rest of that frame, then 1009, and nothing of the frame after it."""
    async with raw_backend() as backend, loopwatch(
        backend.url, Gate(), **{"limits.max_message_size": "64KiB"}
    ) as running:
        raw = await RawClient.connect(running.proxy_port)
        up = await backend.accept()
        f1 = frame(BINARY, b"1" * 20_000)
        f2 = frame(BINARY, b"2" * 20_000)
        f3 = frame(BINARY, b"3" * 20_000)
        first = f1[:10_000] if cut == "payload" else f1 + f2[:3]  # f2: a 4-byte header
        await up.send(first)
        assert await raw.read_bytes(len(first)) == first
        await raw.send(frame(BINARY, b"x" * (LIMIT + 1), mask=key(1)))
        await asyncio.sleep(0.1)
        # The rest of the frame in flight and the start of the next in one read:
        # the close frame goes between them.
        if cut == "payload":
            rest, after = f1[10_000:], f2[:5_000]
        else:
            rest, after = f2[3:], f3[:5_000]
        await up.send(rest + after)
        assert await raw.read_bytes(len(rest)) == rest
        reply = await raw.read_frame(timeout=1.5)
        assert reply.opcode == CLOSE
        assert reply.close[0] == 1009
        assert raw.buffer == b""  # nothing of the next frame
        # The backend got loopwatch's 1009 at once: its direction was at a boundary.
        frames, _ = parse_frames(await up.wait_bytes(8))
        assert [f.close[0] for f in frames] == [1009]
        raw.abort()
        up.writer.transport.abort()
        await wait_for(lambda: running.plane.connections() == 0)


async def test_upstream_lost_while_a_proxy_close_waits_mid_frame() -> None:
    """loopwatch is closing (1009) and waits for the end of the upstream's frame to
    write its close to the client, when the upstream vanishes: that frame will
    never end, so the client's connection is dropped at once, not after the
    grace period, and without a close frame inside the cut frame."""
    async with raw_backend() as backend, loopwatch(
        backend.url, Gate(), **{"limits.max_message_size": "64KiB"}
    ) as running:
        raw = await RawClient.connect(running.proxy_port)
        up = await backend.accept()
        f1 = frame(BINARY, b"1" * 20_000)
        await up.send(f1[:10_000])
        assert await raw.read_bytes(10_000) == f1[:10_000]
        await raw.send(frame(BINARY, b"x" * (LIMIT + 1), mask=key(1)))
        frames, _ = parse_frames(await up.wait_bytes(8))
        assert [f.close[0] for f in frames] == [1009]
        t0 = asyncio.get_running_loop().time()
        up.writer.transport.abort()
        with contextlib.suppress(ConnectionError):
            assert await raw.read_to_eof(timeout=1.5) == b""
        assert asyncio.get_running_loop().time() - t0 < 1.0
        await wait_for(lambda: running.plane.connections() == 0, timeout=1.0)


# ---------------------------------------------------------------------------
# 6. Protocol errors are passed on unparsed for the peer to answer, as on the
# direct path (docs/relay.md): tests/test_native_relay.py, "protocol error".

