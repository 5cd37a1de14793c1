"""Backpressure: a reader that stops slows the writer on the other side down, and
loopwatch buffers a bounded amount meanwhile (docs/relay.md: "nothing is
buffered without bound").

Each test offers tens of MiB to a peer that has stopped reading, checks that the
sender stalls long before it is done (what loopwatch and the kernel buffer on
the way is a fraction of it), then lets the reader resume and checks that every
message arrives intact and in order.
"""

from __future__ import annotations

import asyncio
import os
import socket

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection

from loopwatch.proxy.app.runtime import Running
from loopwatch.proxy.dataplane.boundary import Gate
from tests.conftest import idle, loopwatch, wait_for, websockets_backend, ws_url
from tests.wsraw import BINARY, CLOSE, RawClient, close_payload, frame, parse_frames, raw_backend

# Every async test here runs on asyncio's loop and on uvloop, the loop `loopwatch run`
# uses (tests/conftest.py, pytest_asyncio_loop_factories).
RUN_ON_UVLOOP = True

MESSAGE = 64 * 1024
COUNT = 768  # 48 MiB offered in 64 KiB messages
# What loopwatch may hold in one transport's write buffer: a few times asyncio's
# 64 KiB high-water mark (one read of up to 256 KiB can land on top of it).


def payload(i: int) -> bytes:
    """Message i: its number, then a pattern that differs from message to message."""
    return i.to_bytes(8, "big") + bytes([i % 251]) * (MESSAGE - 8)


def counts(running: Running) -> tuple[int, int]:
    """(messages in, messages out) of the one relayed WebSocket, so far."""
    ((_, stats),) = list(running.plane.live())
    return stats.messages_in, stats.messages_out


async def stall(progress: list[int], *, quiet: float = 0.5, timeout: float = 15.0) -> int:
    """Wait until progress[0] stops changing for `quiet` seconds; its value then."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last, since = progress[0], loop.time()
    while loop.time() - since < quiet:
        if loop.time() > deadline:
            raise AssertionError(f"the sender never stalled ({progress[0]} messages sent)")
        await asyncio.sleep(0.02)
        if progress[0] != last:
            last, since = progress[0], loop.time()
    return last


async def test_client_that_stops_reading_slows_the_upstream() -> None:
    sent = [0]
    done = asyncio.Event()

    async def flood(ws: ServerConnection) -> None:
        for i in range(COUNT):
            await ws.send(payload(i))
            sent[0] = i + 1
        done.set()
        await ws.wait_closed()

    async with websockets_backend(flood, compression=None) as (url, _), loopwatch(url, Gate()) as running:
        # A client with a small receive window that reads nothing after the 101.
        raw = await RawClient.connect(running.proxy_port, rcvbuf=64 * 1024)
        await wait_for(lambda: running.active_connections() == 1)

        stalled_at = await stall(sent)
        # The backend is stuck in send(): it got rid of a fraction of the 48 MiB,
        # what the kernel buffers on the way hold, and loopwatch reads no more.
        assert stalled_at < COUNT // 2, stalled_at
        assert not done.is_set()

        # The client reads again: everything arrives, in order, intact.
        buf = bytearray()
        received = 0
        while received < COUNT:
            chunk = await asyncio.wait_for(raw.reader.read(1 << 20), 10)
            assert chunk, f"EOF after {received} messages"
            buf += chunk
            frames, used = parse_frames(buf)
            del buf[:used]
            for f in frames:
                assert (f.opcode, f.fin, f.mask) == (BINARY, True, None)
                assert f.payload == payload(received), received
                received += 1
        await asyncio.wait_for(done.wait(), 5)
        assert counts(running)[1] == COUNT

        await raw.send(frame(CLOSE, close_payload(1000), mask=b"\x01\x02\x03\x04"))
        tail = await raw.read_to_eof()
        assert [f.close for f in parse_frames(buf + tail)[0]] == [(1000, "")]
        await raw.close()
        await wait_for(lambda: idle(running))


async def test_upstream_that_stops_reading_slows_the_client() -> None:
    async with raw_backend() as backend, loopwatch(backend.url, Gate()) as running:
        sent = [0]
        async with connect(ws_url(running), compression=None, max_size=None) as ws:
            up = await backend.accept()
            up.reading.clear()  # the backend reads nothing more
            up.writer.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024
            )

            async def flood() -> None:
                for i in range(COUNT):
                    await ws.send(payload(i))
                    sent[0] = i + 1

            sender = asyncio.create_task(flood())
            stalled_at = await stall(sent)
            assert stalled_at < COUNT // 2, stalled_at
            assert not sender.done()

            # The backend reads again: the client's send() completes and the
            # backend gets every message, masked as the client masked it, in order.
            up.reading.set()
            await asyncio.wait_for(sender, 30)
            total = COUNT * (MESSAGE + 14)  # 64 KiB payloads: 14-byte masked headers
            data = await up.wait_bytes(total, timeout=30)
            frames, used = parse_frames(data)
            assert used == total == len(data)
            assert len(frames) == COUNT
            for i, f in enumerate(frames):
                assert (f.opcode, f.fin, f.mask is not None) == (BINARY, True, True)
                assert f.payload == payload(i), i
            assert counts(running)[0] == COUNT
            await up.send(frame(CLOSE, close_payload(1000, "drained")))
            up.writer.close()
        assert ws.close_code == 1000 and ws.close_reason == "drained"
        await wait_for(lambda: idle(running))


async def test_backpressure_holds_in_both_directions_at_once() -> None:
    """Both peers flood and neither reads: both stall, loopwatch stays bounded,
    and once both read again every message arrives."""
    count = 512  # 32 MiB each way
    async with raw_backend() as backend, loopwatch(backend.url, Gate()) as running:
        raw = await RawClient.connect(running.proxy_port, rcvbuf=64 * 1024)
        up = await backend.accept()
        up.reading.clear()
        key = os.urandom(4)
        up_frames = [frame(BINARY, payload(i), mask=key) for i in range(count)]
        down_frames = [frame(BINARY, payload(i)) for i in range(count)]
        progress_up, progress_down = [0], [0]

        async def send_all(send, frames: list[bytes], progress: list[int]) -> None:  # noqa: ANN001
            for f in frames:
                await send(f)
                progress[0] += 1

        t_up = asyncio.create_task(send_all(raw.send, up_frames, progress_up))
        t_down = asyncio.create_task(send_all(up.send, down_frames, progress_down))
        a, b = await asyncio.gather(stall(progress_up), stall(progress_down))
        assert a < count and b < count, (a, b)

        up.reading.set()
        buf = bytearray()
        got = 0
        while got < count:
            chunk = await asyncio.wait_for(raw.reader.read(1 << 20), 10)
            assert chunk
            buf += chunk
            frames, used = parse_frames(buf)
            del buf[:used]
            for f in frames:
                assert f.payload == payload(got)
                got += 1
        await asyncio.wait_for(asyncio.gather(t_up, t_down), 30)
        data = await up.wait_bytes(sum(map(len, up_frames)), timeout=30)
        assert data == b"".join(up_frames)
        raw.abort()
        up.writer.transport.abort()
        await wait_for(lambda: idle(running))
