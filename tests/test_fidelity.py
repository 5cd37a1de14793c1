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
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import uvloop
from aiohttp import WSMsgType, web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from loopwatch.proxy.app.runtime import Running, start
from loopwatch.proxy.dataplane.boundary import Connection, Gate, RelayStats
from tests.conftest import (
    PLANES,
    idle,
    loopwatch,
    settings_for,
    wait_for,
    websockets_backend,
    ws_url,
)
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
    messages_of,
    parse_frames,
    raw_backend,
)

# Every async test here runs on asyncio's loop and on uvloop, the loop `loopwatch run`
# uses (tests/conftest.py, pytest_asyncio_loop_factories).
RUN_ON_UVLOOP = True


@pytest.fixture(
    autouse=True,
    scope="module",
    params=[
        pytest.param("compiled", id="frames-compiled"),
        pytest.param("python", id="frames-python"),
        pytest.param("native", id="native"),
    ],
)
def frame_parser_build(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test here runs on each relay: the Python data plane with each build of
    its frame parser (proxy/dataplane/_frames.c, and the pure-Python fallback), and
    the native data plane (`dataplane: native`, its frames watched in Rust)."""
    from loopwatch.proxy.dataplane import frames, relay

    if request.param == "native":
        PLANES["current"] = "native"
        yield request.param
        PLANES["current"] = "python"
        return
    saved = relay.FrameParser
    if request.param == "compiled":
        build = frames.CFrameParser or frames.load_compiled()  # ImportError: not built
    else:
        build = frames.PyFrameParser
    relay.FrameParser = build
    yield request.param
    relay.FrameParser = saved


MiB = 1 << 20


class RecordingGate(Gate):
    """Admits everyone; records each relayed connection's end as the relay saw it."""

    def __init__(self) -> None:
        self.closes: list[tuple[int, str, str]] = []

    def closed(
        self, attempt: Connection, t: float, code: int, reason: str, initiator: str, stats: RelayStats
    ) -> None:
        self.closes.append((code, reason, initiator))


def deflate(data: bytes) -> bytes:
    """A permessage-deflate payload (RFC 7692 §7.2.1: sync flush, tail removed)."""
    c = zlib.compressobj(wbits=-15)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


# ---------------------------------------------------------------------------
# 1. Byte exactness with hand-crafted frames.

KEYS = [bytes.fromhex(k) for k in ("01020304", "ff00ff00", "00000000", "deadbeef", "a5a5a5a5", "7f800180")]


def key(i: int) -> bytes:
    return KEYS[i % len(KEYS)]


def script(masked: bool) -> list[bytes]:
    """Frames covering the framing features the relay must not touch: a fragmented
    message with an interleaved ping and pong, 7/16/64-bit lengths, an empty
    message, compressed (RSV1) messages, one of them fragmented."""
    m = (lambda i: key(i)) if masked else (lambda i: None)
    compressed = deflate(b"compressible " * 400)
    half = len(compressed) // 2
    big = os.urandom(70_000)
    return [
        frame(TEXT, b"Hello, ", fin=False, mask=m(0)),
        frame(PING, b"are you there?", mask=m(1)),
        frame(CONT, "wörld".encode(), fin=False, mask=m(2)),
        frame(PONG, b"", mask=m(3)),
        frame(CONT, b"!", mask=m(4)),
        frame(BINARY, bytes(range(256)) * 2, mask=m(5)),
        frame(BINARY, big, mask=m(0)),
        frame(TEXT, b"", mask=m(1)),
        frame(BINARY, b"", mask=m(2)),
        frame(TEXT, deflate("ünïcødé ✓".encode() * 10), rsv=0b100, mask=m(3)),
        frame(BINARY, compressed[:half], rsv=0b100, fin=False, mask=m(4)),
        frame(PING, b"", mask=m(5)),
        frame(CONT, compressed[half:], mask=m(0)),
        frame(PONG, b"\x00" * 125, mask=m(1)),
    ]


async def write_in_pieces(send: Callable[[bytes], Awaitable[None]], frames: list[bytes], how: str) -> None:
    """Write `frames` whole, frame by frame, or with every header cut in two
    (each piece read separately by the proxy: it runs on this event loop)."""
    if how == "whole":
        await send(b"".join(frames))
        return
    for i, f in enumerate(frames):
        if how == "split":
            cut = 1 + i % 13
            if cut < len(f):
                await send(f[:cut])
                await asyncio.sleep(0.01)
                f = f[cut:]
        await send(f)
        await asyncio.sleep(0.002)


@pytest.mark.parametrize("how", ["whole", "frames", "split"])
async def test_hand_crafted_frames_arrive_byte_for_byte(how: str) -> None:
    gate = RecordingGate()
    async with raw_backend(extensions=b"permessage-deflate") as backend, loopwatch(
        backend.url, gate
    ) as running:
        client = await RawClient.connect(
            running.proxy_port, "/raw", extra=b"Sec-WebSocket-Extensions: permessage-deflate\r\n"
        )
        assert b"\r\nSec-WebSocket-Extensions: permessage-deflate\r\n" in client.response
        up = await backend.accept()

        sent_up = script(masked=True)
        await write_in_pieces(client.send, sent_up, how)
        expected = b"".join(sent_up)
        assert await up.wait_bytes(len(expected)) == expected

        sent_down = script(masked=False)
        await write_in_pieces(up.send, sent_down, how)
        expected = b"".join(sent_down)
        assert await client.read_bytes(len(expected)) == expected

        # The close handshake, also byte for byte; then both connections end.
        close_up = frame(CLOSE, close_payload(4001, "bye ✓"), mask=key(5))
        await client.send(close_up)
        received = await up.wait_bytes(len(b"".join(sent_up)) + len(close_up))
        assert received.endswith(close_up)
        close_down = frame(CLOSE, close_payload(4001, "bye ✓"))
        await up.send(close_down)
        up.close()
        assert await client.read_to_eof() == close_down
        await client.close()
        await up.wait_eof()
        await wait_for(lambda: idle(running))
        assert running.plane.connections() == 0
    assert gate.closes == [(4001, "bye ✓", "client")]


async def test_header_split_at_every_offset() -> None:
    """A 14-byte header (masked, 64-bit length) cut after 1..13 bytes, and a
    server frame's 10-byte header cut after 1..9: all forwarded intact."""
    async with raw_backend() as backend, loopwatch(backend.url, Gate()) as running:
        client = await RawClient.connect(running.proxy_port)
        up = await backend.accept()
        payload = os.urandom(66_000)
        expected = bytearray()
        for cut in range(1, 14):
            f = frame(BINARY, payload, mask=key(cut))
            expected += f
            await client.send(f[:cut])
            await asyncio.sleep(0.01)
            await client.send(f[cut:])
            await asyncio.sleep(0.005)
        assert await up.wait_bytes(len(expected)) == bytes(expected)
        expected = bytearray()
        for cut in range(1, 10):
            f = frame(BINARY, payload)
            expected += f
            await up.send(f[:cut])
            await asyncio.sleep(0.01)
            await up.send(f[cut:])
            await asyncio.sleep(0.005)
        assert await client.read_bytes(len(expected)) == bytes(expected)
        assert running.active_connections() == 1
        client.abort()
        up.writer.transport.abort()
        await wait_for(lambda: idle(running))


async def test_frames_sent_together_with_the_handshake_are_kept() -> None:
    """Frames in the same write as the upgrade request (before the 101) and in
    the same write as the 101: both forwarded once the splice starts, unchanged."""
    down = frame(TEXT, b"welcome") + frame(PING, b"hi")
    async with raw_backend(greeting=down) as backend, loopwatch(backend.url, Gate()) as running:
        up_frames = frame(TEXT, b"eager", mask=key(1)) + frame(BINARY, bytes(300), mask=key(2))
        client = await RawClient.connect(running.proxy_port, early=up_frames)
        up = await backend.accept()
        assert await up.wait_bytes(len(up_frames)) == up_frames
        assert await client.read_bytes(len(down)) == down
        client.abort()
        up.writer.transport.abort()
        await wait_for(lambda: idle(running))


async def test_close_then_half_close_from_the_client() -> None:
    """A client that sends its close frame and then shuts its writing half still
    gets the backend's close reply; the EOF reaches the backend."""
    async with raw_backend(close_on_eof=False) as backend, loopwatch(backend.url, Gate()) as running:
        client = await RawClient.connect(running.proxy_port)
        up = await backend.accept()
        close_up = frame(CLOSE, close_payload(1000, "done"), mask=key(4))
        await client.send(close_up)
        client.writer.write_eof()
        assert await up.wait_eof() == close_up  # the close frame, then the EOF
        close_down = frame(CLOSE, close_payload(1000, "done too"))
        await up.send(close_down)
        up.close()
        assert await client.read_to_eof() == close_down
        await client.close()
        await wait_for(lambda: idle(running))


async def test_close_and_half_close_before_the_101_reach_the_backend() -> None:
    """A client that sends its close frame and shuts its writing half in the same
    breath as the upgrade request (before the backend answered): the backend
    still gets the close frame and the EOF, the client the 101 and the reply."""
    async with raw_backend(close_on_eof=False) as backend, loopwatch(backend.url, Gate()) as running:
        close_up = frame(CLOSE, close_payload(1000, "early"), mask=key(5))
        client = await RawClient.connect(running.proxy_port, early=close_up, eof=True)
        up = await backend.accept()
        assert await up.wait_eof() == close_up
        close_down = frame(CLOSE, close_payload(1000, "early too"))
        await up.send(close_down)
        up.close()
        assert await client.read_to_eof() == close_down
        await client.close()
        await wait_for(lambda: idle(running))


# ---------------------------------------------------------------------------
# 2. The fidelity matrix: websockets client, websockets or aiohttp backend.


@dataclass
class Backend:
    url: str
    closes: asyncio.Queue[tuple[int | None, str | None]]  # what the backend received


async def websockets_handler(ws: ServerConnection, closes: asyncio.Queue[Any]) -> None:
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


@contextlib.asynccontextmanager
async def websockets_server() -> AsyncIterator[Backend]:
    closes: asyncio.Queue[Any] = asyncio.Queue()
    async with websockets_backend(lambda ws: websockets_handler(ws, closes)) as (url, _):
        yield Backend(url, closes)


@contextlib.asynccontextmanager
async def aiohttp_server() -> AsyncIterator[Backend]:
    closes: asyncio.Queue[Any] = asyncio.Queue()

    async def handler(request: web.Request) -> web.WebSocketResponse:
        # autoclose/autoping on (the defaults): aiohttp answers close and ping frames.
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        while True:
            msg = await ws.receive()
            if msg.type == WSMsgType.TEXT:
                if msg.data.startswith("close "):
                    _, code, reason = msg.data.split(" ", 2)
                    await ws.close(code=int(code), message=reason.encode())
                    break
                await ws.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
            elif msg.type == WSMsgType.CLOSE:
                closes.put_nowait((msg.data, msg.extra))
                break
            else:
                closes.put_nowait((None, f"unexpected {msg.type!r}: {msg.data!r}"))
                break
        return ws

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield Backend(f"ws://127.0.0.1:{port}", closes)
    finally:
        await runner.cleanup()


BACKENDS = {"websockets": websockets_server, "aiohttp": aiohttp_server}


@contextlib.asynccontextmanager
async def proxied_backend(kind: str) -> AsyncIterator[tuple[Backend, Running]]:
    async with BACKENDS[kind]() as backend, loopwatch(backend.url, Gate()) as running:
        yield backend, running


def client(running: Running, **kwargs: Any) -> connect:
    """A websockets client through loopwatch (no message size limit by default)."""
    kwargs.setdefault("max_size", None)
    return connect(ws_url(running, "/fidelity"), **kwargs)


MESSAGES: dict[str, str | bytes] = {
    "text": "hello, loopwatch",
    "binary": bytes(range(256)),
    "empty text": "",
    "empty binary": b"",
    "unicode": "ünïcødé ✓ 🙂 𝄞 — 日本語 \u0000 \U0010ffff",
    "1 MiB text": "x" * MiB,
    "1 MiB binary": os.urandom(MiB),
    "16 MiB binary": os.urandom(16 * MiB),
}


@pytest.mark.parametrize("compression", ["deflate", None], ids=["deflate", "plain"])
@pytest.mark.parametrize("kind", list(BACKENDS))
async def test_messages_echo_unchanged(kind: str, compression: str | None) -> None:
    async with proxied_backend(kind) as (backend, running):
        async with client(running, compression=compression) as ws:
            for name, message in MESSAGES.items():
                await ws.send(message)
                echoed = await asyncio.wait_for(ws.recv(), 30)
                assert type(echoed) is type(message), name
                assert echoed == message, name
            # Ping from the client: the backend's pong comes back through the relay.
            latency = await asyncio.wait_for(await ws.ping(b"ping payload"), 5)
            assert latency >= 0
            if kind == "websockets":  # and a ping from the backend, answered by the client
                await ws.send("ping me")
                assert await asyncio.wait_for(ws.recv(), 5) == "pong received"
        assert await asyncio.wait_for(backend.closes.get(), 5) == (1000, "")
        await wait_for(lambda: idle(running))


@pytest.mark.parametrize("kind", list(BACKENDS))
async def test_ten_thousand_messages_in_order(kind: str) -> None:
    n = 10_000
    async with proxied_backend(kind) as (_, running), client(running) as ws:

        async def sender() -> None:
            for i in range(n):
                await ws.send(f"{i}" if i % 2 else f"{i}".encode())

        async def receiver() -> list[str | bytes]:
            return [await ws.recv() for _ in range(n)]

        _, received = await asyncio.wait_for(asyncio.gather(sender(), receiver()), 30)
        assert received == [f"{i}" if i % 2 else f"{i}".encode() for i in range(n)]
        ((_, counts),) = list(running.plane.live())
        assert (counts.messages_in, counts.messages_out) == (n, n)


CLOSE_CODES = [1000, 1001, 1003, 1007, 1008, 1011, 3000, 4000, 4999]
REASONS = [
    "",
    "bye",
    "ünïcødé ✓ 🙂",
    "r" * 123,  # the longest reason a close frame can carry
    "é" * 61 + "x",  # 123 bytes of UTF-8, mostly two-byte characters
]


@pytest.mark.parametrize("code", CLOSE_CODES)
@pytest.mark.parametrize("initiator", ["client", "backend"])
@pytest.mark.parametrize("kind", list(BACKENDS))
async def test_close_codes_and_reasons_reach_the_far_end(kind: str, initiator: str, code: int) -> None:
    gate = RecordingGate()
    async with BACKENDS[kind]() as backend, loopwatch(backend.url, gate) as running:
        for reason in REASONS:
            async with client(running) as ws:
                await ws.send("warm-up")
                assert await ws.recv() == "warm-up"
                if initiator == "client":
                    await ws.close(code, reason)
                    assert await asyncio.wait_for(backend.closes.get(), 5) == (code, reason)
                else:
                    await ws.send(f"close {code} {reason}")
                    with pytest.raises(ConnectionClosed) as info:
                        await asyncio.wait_for(ws.recv(), 5)
                    assert info.value.rcvd is not None
                    assert (info.value.rcvd.code, info.value.rcvd.reason) == (code, reason)
            await wait_for(lambda: idle(running))
    who = "client" if initiator == "client" else "upstream"
    assert gate.closes == [(code, reason, who) for reason in REASONS]


# ---------------------------------------------------------------------------
# 3. Property: any sequence of messages arrives identical and in order.

message_strategy = st.one_of(
    st.text(max_size=300),
    st.binary(max_size=300),
    # Occasionally a large message, cheaply: a short pattern repeated.
    st.tuples(st.binary(min_size=1, max_size=7), st.integers(70_000, 200_000)).map(
        lambda t: (t[0] * (t[1] // len(t[0]) + 1))[: t[1]]
    ),
)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_any_message_sequence_arrives_identical_and_in_order(loop_kind: str) -> None:
    loop = asyncio.new_event_loop() if loop_kind == "asyncio" else uvloop.new_event_loop()
    received: dict[str, list[str | bytes]] = {}

    async def recorder(ws: ServerConnection) -> None:
        got = received.setdefault(ws.request.path, [])  # type: ignore[union-attr]
        async for message in ws:
            got.append(message)
            await ws.send(message)

    async def setup() -> tuple[contextlib.AsyncExitStack, Running]:
        stack = contextlib.AsyncExitStack()
        url, _ = await stack.enter_async_context(websockets_backend(recorder))
        running = await start(settings_for(url), Gate())
        stack.push_async_callback(running.close)
        return stack, running

    stack, running = loop.run_until_complete(setup())
    counter = iter(range(1 << 30))
    sizes: list[int] = []

    async def roundtrip(messages: list[str | bytes], compression: str | None) -> None:
        path = f"/p{next(counter)}"
        async with connect(ws_url(running, path), max_size=None, compression=compression) as ws:

            async def send_all() -> None:
                for message in messages:
                    await ws.send(message)

            async def receive_all() -> list[str | bytes]:
                return [await ws.recv() for _ in messages]

            _, echoed = await asyncio.wait_for(asyncio.gather(send_all(), receive_all()), 20)
        # Upstream saw exactly what the client sent; the client exactly what upstream sent.
        assert received.pop(path, []) == messages
        assert echoed == messages
        sizes.append(sum(len(m) for m in messages))

    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(messages=st.lists(message_strategy, max_size=25), compression=st.sampled_from(["deflate", None]))
    def check(messages: list[str | bytes], compression: str | None) -> None:
        loop.run_until_complete(roundtrip(messages, compression))

    try:
        check()
        loop.run_until_complete(wait_for(lambda: idle(running)))
        assert len(sizes) >= 50 and max(sizes) > 100_000  # the property really ran
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
        await wait_for(lambda: idle(running))
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
        await wait_for(lambda: idle(running))
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
        await wait_for(lambda: idle(running))


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
        await wait_for(lambda: idle(running))
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
        await wait_for(lambda: idle(running), timeout=1.5)


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
        await wait_for(lambda: idle(running))


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
        await wait_for(lambda: idle(running))
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
        await wait_for(lambda: idle(running))


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
        await wait_for(lambda: idle(running), timeout=1.0)


# ---------------------------------------------------------------------------
# 6. Protocol errors: 1002 (1007 for a close reason that is not UTF-8).

PROTOCOL_ERRORS = {
    "unmasked client frame": (frame(TEXT, b"plain"), 1002),
    "reserved opcode": (frame(0x3, b"?", mask=key(1)), 1002),
    "RSV1 without an extension": (frame(TEXT, b"z", rsv=0b100, mask=key(1)), 1002),
    "RSV2": (frame(TEXT, b"z", rsv=0b010, mask=key(1)), 1002),
    "control frame longer than 125 bytes": (frame(PING, b"p" * 126, mask=key(1)), 1002),
    "fragmented control frame": (frame(PING, b"p", fin=False, mask=key(1)), 1002),
    "continuation without a message": (frame(CONT, b"c", mask=key(1)), 1002),
    "close with a 1-byte payload": (frame(CLOSE, b"\x03", mask=key(1)), 1002),
    "close code 1005": (frame(CLOSE, close_payload(1005), mask=key(1)), 1002),
    "close reason not UTF-8": (frame(CLOSE, b"\x03\xe8\xff\xfe", mask=key(1)), 1007),
}


@pytest.mark.parametrize("name", list(PROTOCOL_ERRORS))
async def test_client_protocol_error_closes_both_sides(name: str) -> None:
    bad, code = PROTOCOL_ERRORS[name]
    gate = RecordingGate()
    async with raw_backend() as backend, loopwatch(backend.url, gate) as running:
        raw = await RawClient.connect(running.proxy_port)
        up = await backend.accept()
        good = frame(TEXT, b"fine so far", mask=key(0))
        await raw.send(good + bad + frame(TEXT, b"after", mask=key(2)))
        reply = await raw.read_frame()
        assert reply.opcode == CLOSE and reply.mask is None
        assert reply.close[0] == code
        assert reply.close[1].startswith("loopwatch: ")
        # The backend got the good frame, then loopwatch's own close; not the bad frame.
        received = await up.wait_bytes(len(good) + 2)
        assert received.startswith(good)
        frames, used = parse_frames(received[len(good) :])
        assert [f.opcode for f in frames] == [CLOSE]
        assert frames[0].mask is not None
        assert frames[0].close == reply.close
        await up.send(frame(CLOSE, close_payload(code)))
        assert len(await up.wait_eof()) == len(good) + used
        await raw.send(frame(CLOSE, close_payload(code), mask=key(3)))
        await raw.read_to_eof()
        await raw.close()
        await wait_for(lambda: idle(running), timeout=1.5)
    assert gate.closes == [(code, reply.close[1], "proxy")]


async def test_client_protocol_error_with_a_websockets_backend() -> None:
    closes: asyncio.Queue[tuple[int | None, str | None]] = asyncio.Queue()
    async with websockets_backend(lambda ws: websockets_handler(ws, closes)) as (url, _), loopwatch(
        url, Gate()
    ) as running:
        raw = await RawClient.connect(running.proxy_port)
        await raw.send(frame(TEXT, b"one", mask=key(1)))
        assert (await raw.read_frame()).payload == b"one"
        await raw.send(frame(TEXT, b"unmasked"))
        reply = await raw.read_frame()
        assert reply.close == (1002, "loopwatch: unmasked client frame")
        assert await asyncio.wait_for(closes.get(), 5) == (1002, "loopwatch: unmasked client frame")
        await raw.send(frame(CLOSE, close_payload(1002), mask=key(0)))
        await raw.read_to_eof()
        await raw.close()
        await wait_for(lambda: idle(running), timeout=1.5)


async def test_invalid_close_split_across_reads_is_not_followed_by_a_frame() -> None:
    """A close frame whose header was already forwarded turns out invalid: loopwatch
    cannot withdraw those bytes, and must not write its own close frame into the
    middle of that one; the backend's connection just ends."""
    async with raw_backend() as backend, loopwatch(backend.url, Gate()) as running:
        raw = await RawClient.connect(running.proxy_port)
        up = await backend.accept()
        bad = frame(CLOSE, b"\x03\xe8" + b"reason \xff", mask=key(1))
        await raw.send(bad[:8])
        await up.wait_bytes(8)
        await raw.send(bad[8:])
        reply = await raw.read_frame()
        assert reply.close[0] == 1007
        assert await up.wait_eof() == bad[:8]
        raw.abort()
        await wait_for(lambda: idle(running))


async def test_masked_server_frame_closes_both_sides() -> None:
    async with raw_backend() as backend, loopwatch(backend.url, Gate()) as running:
        raw = await RawClient.connect(running.proxy_port)
        up = await backend.accept()
        good = frame(BINARY, b"ok")
        await up.send(good + frame(BINARY, b"masked", mask=key(1)))
        assert await raw.read_bytes(len(good)) == good
        reply = await raw.read_frame()
        assert reply.close == (1002, "loopwatch: masked server frame")
        frames, _ = parse_frames(await up.wait_bytes(8))
        assert [f.close for f in frames] == [(1002, "loopwatch: masked server frame")]
        assert messages_of(frames) == []
        raw.abort()
        await wait_for(lambda: idle(running))
