"""Relay fidelity shapes, run by tests/test_fidelity.py through `loopwatch run`.

Each shape drives a proxy at a port or URL in front of a backend from here
(raw sockets with hand-built frames from tests/wsraw.py, the `websockets`
library, aiohttp's server) and asserts what arrives at each end; the caller
adds what loopwatch records about the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import WSMsgType, web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from tests.conftest import websockets_backend
from tests.wsraw import (
    BINARY,
    CLOSE,
    CONT,
    PING,
    PONG,
    TEXT,
    RawBackend,
    RawClient,
    close_payload,
    frame,
)

MiB = 1 << 20
DEFLATE = b"Sec-WebSocket-Extensions: permessage-deflate\r\n"


def deflate(data: bytes) -> bytes:
    """A permessage-deflate payload (RFC 7692 §7.2.1: sync flush, tail removed)."""
    c = zlib.compressobj(wbits=-15)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


# ---------------------------------------------------------------------------
# Hand-crafted frames, byte for byte (a raw backend that negotiates
# permessage-deflate, and a raw client).

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
    (each piece read separately by the proxy)."""
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


async def hand_crafted_frames_arrive_byte_for_byte(port: int, backend: RawBackend, how: str) -> None:
    """`script` both ways, written `how`; then a close handshake (4001 "bye ✓",
    the client first), byte for byte, after which both connections end."""
    client = await RawClient.connect(port, "/raw", extra=DEFLATE)
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


async def header_split_at_every_offset(port: int, backend: RawBackend) -> None:
    """A 14-byte header (masked, 64-bit length) cut after 1..13 bytes, and a
    server frame's 10-byte header cut after 1..9: all forwarded intact. Both
    connections are dropped at the end."""
    client = await RawClient.connect(port)
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
    client.abort()
    up.writer.transport.abort()


# The backend's frames in the same write as its 101 (for `raw_backend(greeting=...)`).
GREETING = frame(TEXT, b"welcome") + frame(PING, b"hi")


async def frames_sent_with_the_handshake_are_kept(port: int, backend: RawBackend) -> None:
    """Frames in the same write as the upgrade request (before the 101) and,
    from a backend made with `greeting=GREETING`, in the same write as the 101:
    both forwarded once the splice starts, unchanged. Both connections are
    dropped at the end."""
    up_frames = frame(TEXT, b"eager", mask=key(1)) + frame(BINARY, bytes(300), mask=key(2))
    client = await RawClient.connect(port, early=up_frames)
    up = await backend.accept()
    assert await up.wait_bytes(len(up_frames)) == up_frames
    assert await client.read_bytes(len(GREETING)) == GREETING
    client.abort()
    up.writer.transport.abort()


async def close_then_half_close_from_the_client(port: int, backend: RawBackend) -> None:
    """A client that sends its close frame (1000 "done") and shuts its writing
    half still gets the backend's close reply; the EOF reaches the backend
    (a backend made with `close_on_eof=False`)."""
    client = await RawClient.connect(port)
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


async def frames_close_and_eof_before_the_101_reach_the_backend(port: int, backend: RawBackend) -> None:
    """Frames and a close frame (1000 "early") in the same write as the upgrade
    request, then the client's EOF before the 101: the backend gets them and
    the EOF; the client the 101, the backend's greeting (`greeting=GREETING`)
    and its close reply (a backend made with `close_on_eof=False`)."""
    early = frame(TEXT, b"eager", mask=key(1)) + frame(CLOSE, close_payload(1000, "early"), mask=key(5))
    client = await RawClient.connect(port, early=early, eof=True)
    up = await backend.accept()
    assert await up.wait_eof() == early
    close_down = frame(CLOSE, close_payload(1000, "early too"))
    await up.send(close_down)
    up.close()
    assert await client.read_to_eof() == GREETING + close_down
    await client.close()


# ---------------------------------------------------------------------------
# The fidelity matrix: a websockets client, a websockets or aiohttp backend
# that echoes, closes on "close CODE REASON" and pings on "ping me".


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


def payload_bytes(messages: Any) -> int:
    return sum(len(m.encode() if isinstance(m, str) else m) for m in messages)


async def messages_echo_unchanged(url: str, backend: Backend, compression: str | None, kind: str) -> None:
    """MESSAGES echoed unchanged (with permessage-deflate negotiated end to end
    or not), a ping from the client answered by the backend, and one from a
    websockets backend ("ping me") answered by the client; then a 1000 close."""
    async with connect(url, max_size=None, compression=compression) as ws:
        if compression is not None:
            assert ws.response is not None
            assert "permessage-deflate" in ws.response.headers.get("Sec-WebSocket-Extensions", "")
        for name, message in MESSAGES.items():
            await ws.send(message)
            echoed = await asyncio.wait_for(ws.recv(), 30)
            assert type(echoed) is type(message), name
            assert echoed == message, name
        latency = await asyncio.wait_for(await ws.ping(b"ping payload"), 5)
        assert latency >= 0
        if kind == "websockets":
            await ws.send("ping me")
            assert await asyncio.wait_for(ws.recv(), 5) == "pong received"
    assert await asyncio.wait_for(backend.closes.get(), 5) == (1000, "")


TEN_THOUSAND = 10_000


async def ten_thousand_messages_in_order(url: str, while_open: Callable[[], None] | None = None) -> None:
    """TEN_THOUSAND messages, text and binary alternating, sent while the
    echoes come back: every one back, in order; then `while_open()`, before
    the connection closes."""
    async with connect(url, max_size=None) as ws:

        async def sender() -> None:
            for i in range(TEN_THOUSAND):
                await ws.send(f"{i}" if i % 2 else f"{i}".encode())

        async def receiver() -> list[str | bytes]:
            return [await ws.recv() for _ in range(TEN_THOUSAND)]

        _, received = await asyncio.wait_for(asyncio.gather(sender(), receiver()), 60)
        assert received == [f"{i}" if i % 2 else f"{i}".encode() for i in range(TEN_THOUSAND)]
        if while_open is not None:
            while_open()


# Codes either side may send (RFC 6455 §7.4), from each range; reasons up to the
# 123 bytes a close frame can carry.
CLOSE_CODES = [1000, 1001, 1003, 1007, 1008, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4321, 4999]
REASONS = [
    "",
    "bye",
    "ünïcødé ✓ 🙂",
    "r" * 123,  # the longest reason a close frame can carry
    "é" * 61 + "x",  # 123 bytes of UTF-8, mostly two-byte characters
]


async def close_codes_and_reasons_reach_the_far_end(
    url: str,
    backend: Backend,
    initiator: str,
    codes: list[int],
    after_each: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """For each code and each of REASONS, one connection closed by `initiator`
    ("client" or "backend"): the far end gets the code and reason exactly."""
    for code in codes:
        for reason in REASONS:
            async with connect(url, max_size=None) as ws:
                await ws.send("warm-up")
                assert await ws.recv() == "warm-up"
                if initiator == "client":
                    await ws.close(code, reason)
                    assert await asyncio.wait_for(backend.closes.get(), 5) == (code, reason)
                else:
                    await ws.send(f"close {code} {reason}")
                    try:
                        await asyncio.wait_for(ws.recv(), 5)
                    except ConnectionClosed as closed:
                        assert closed.rcvd is not None
                        assert (closed.rcvd.code, closed.rcvd.reason) == (code, reason)
                    else:
                        raise AssertionError(f"no close {code} {reason!r} from the backend")
            if after_each is not None:
                await after_each()


# ---------------------------------------------------------------------------
# Properties at the socket level (hypothesis drives them on `loop`, a loop the
# caller made and runs nothing else on; the proxy and backend live there).

message_strategy = st.one_of(
    st.text(max_size=300),
    st.binary(max_size=300),
    # Occasionally a large message, cheaply: a short pattern repeated.
    st.tuples(st.binary(min_size=1, max_size=7), st.integers(70_000, 200_000)).map(
        lambda t: (t[0] * (t[1] // len(t[0]) + 1))[: t[1]]
    ),
)


def recorder(received: dict[str, list[str | bytes]]) -> Callable[[ServerConnection], Awaitable[None]]:
    """A websockets handler that echoes and records each message under its path."""

    async def handler(ws: ServerConnection) -> None:
        got = received.setdefault(ws.request.path, [])  # type: ignore[union-attr]
        async for message in ws:
            got.append(message)
            await ws.send(message)

    return handler


def any_message_sequence_arrives_identical_and_in_order(
    loop: asyncio.AbstractEventLoop,
    url_for: Callable[[str], str],
    received: dict[str, list[str | bytes]],
    max_examples: int = 60,
) -> None:
    """Property: any list of messages, with permessage-deflate or not, reaches a
    `recorder` backend (at `url_for(path)`) exactly as sent, and its echoes the
    client exactly as sent back."""
    counter = itertools.count()
    sizes: list[int] = []

    async def roundtrip(messages: list[str | bytes], compression: str | None) -> None:
        path = f"/p{next(counter)}"
        async with connect(url_for(path), max_size=None, compression=compression) as ws:

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
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(messages=st.lists(message_strategy, max_size=25), compression=st.sampled_from(["deflate", None]))
    def check(messages: list[str | bytes], compression: str | None) -> None:
        loop.run_until_complete(roundtrip(messages, compression))

    check()
    assert len(sizes) >= max_examples * 5 // 6 and max(sizes) > 100_000  # the property really ran


LENGTHS = st.one_of(st.integers(0, 130), st.sampled_from([125, 126, 127, 65_535, 65_536, 70_000]))


@st.composite
def frame_streams(draw: st.DrawFn, masked: bool) -> bytes:
    """A valid stream of frames from one side (client frames masked): messages
    of 1-3 fragments (RSV1 on some first frames: permessage-deflate is
    negotiated), pings between fragments, pings and pongs between messages."""
    out: list[bytes] = []
    big = 0

    def mask() -> bytes | None:
        return draw(st.binary(min_size=4, max_size=4)) if masked else None

    for _ in range(draw(st.integers(1, 5))):
        if draw(st.integers(0, 3)) == 0:
            control = draw(st.sampled_from([PING, PONG]))
            out.append(frame(control, draw(st.binary(max_size=125)), mask=mask()))
            continue
        opcode = draw(st.sampled_from([TEXT, BINARY]))
        rsv = draw(st.sampled_from([0, 0b100]))
        n = draw(st.integers(1, 3))
        for i in range(n):
            length = draw(LENGTHS)
            if length > 1000:
                big += 1
                length = length if big <= 2 else 300
            seed = draw(st.binary(min_size=1, max_size=4))
            payload = (seed * (length // len(seed) + 1))[:length]
            first = i == 0
            out.append(
                frame(opcode if first else CONT, payload, fin=i == n - 1, rsv=rsv if first else 0, mask=mask())
            )
            if i < n - 1 and draw(st.booleans()):
                out.append(frame(PING, draw(st.binary(max_size=20)), mask=mask()))
    return b"".join(out)


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def frames_cut_anywhere_arrive_byte_for_byte(
    loop: asyncio.AbstractEventLoop, port: int, backend: RawBackend, max_examples: int = 40
) -> None:
    """Property: any valid stream of frames, cut anywhere into pieces that the
    proxy reads one by one, arrives byte for byte, from the client to a raw
    `backend` (made with `extensions=b"permessage-deflate"`) and back."""
    examples: list[int] = []

    async def roundtrip(up: bytes, up_cuts: list[int], down: bytes, down_cuts: list[int]) -> None:
        client = await RawClient.connect(port, "/split", extra=DEFLATE)
        conn = await backend.accept()
        try:
            for piece in pieces(up, up_cuts):
                await client.send(piece)
                await asyncio.sleep(0.002)
            assert await conn.wait_bytes(len(up)) == up
            for piece in pieces(down, down_cuts):
                await conn.send(piece)
                await asyncio.sleep(0.002)
            assert await client.read_bytes(len(down)) == down
        finally:
            client.abort()
            conn.writer.transport.abort()
        examples.append(len(up) + len(down))

    def cuts(n: int) -> st.SearchStrategy[list[int]]:
        return st.lists(st.integers(1, max(1, n - 1)), max_size=8)

    @settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(up=frame_streams(masked=True), down=frame_streams(masked=False), data=st.data())
    def check(up: bytes, down: bytes, data: st.DataObject) -> None:
        up_cuts = data.draw(cuts(len(up)), label="up cuts")
        down_cuts = data.draw(cuts(len(down)), label="down cuts")
        loop.run_until_complete(roundtrip(up, up_cuts, down, down_cuts))

    check()
    assert len(examples) >= max_examples * 5 // 6 and max(examples) > 65_536  # the property really ran
