"""A fuzzing client that sends octet by octet, for the Autobahn comparison
(tests/test_autobahn.py): a TCP relay put between `kosoku` and the server
under test.

Run as ``python -m tests.autobahn_octets HOST PORT TARGET_PORT [PAUSE]``: it
listens on HOST:PORT and relays each connection to 127.0.0.1:TARGET_PORT.
After the client's request head, what the client sends goes on one octet per
write, one event-loop turn apart (asyncio sets TCP_NODELAY: each octet is a
segment of its own), for the first `BUDGET` octets of the connection; then as
it comes, so that the cases with megabytes of payload do not take hours. What
the server sends goes back as it comes.

With PAUSE (seconds), the pacing is by frame and by the clock instead, for a
few small cases whose frames are all complete: each client frame's first
octet, then 2 x PAUSE later the rest of the frame, then PAUSE before the next
frame. In front of a server that echoes 2 x PAUSE after a message
(tests/autobahn_echo.py DELAY), a valid message then a bad frame is then
answered deterministically: directly, the server echoes the message (at 4 x
PAUSE) before it has the bad frame's second octet (at 5 x PAUSE); a proxy
failing the connection at the bad frame's first octet (at 3 x PAUSE) loses the
echo.

kosoku writes a case's frames back to back (even the cases that say their
octets go out in octet-wise chops), so a server reads a valid message and the
protocol error after it in one read and fails the connection before it can
echo the message. Octet by octet, the server reads the message first and
answers it, as the original Autobahn runner's chops make it do: cases 3.4,
4.1.5 and 4.2.5 (a valid message, then a frame with a protocol error) are
then `OK` directly, and a proxy that fails the connection itself at the
first octet of the bad frame loses the server's echo (issue 16).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Coroutine
from typing import Any

BUDGET = 4096  # octets of each connection sent one by one, after the request head
HEAD_LIMIT = 64 * 1024
READ_SIZE = 64 * 1024


async def paced(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The client's bytes: the request head at once, then octet by octet."""
    writer.write(await reader.readuntil(b"\r\n\r\n"))
    budget = BUDGET
    while chunk := await reader.read(READ_SIZE):
        view = memoryview(chunk)
        while view and budget > 0:
            writer.write(view[:1])
            view = view[1:]
            budget -= 1
            await writer.drain()
            await asyncio.sleep(0)
        if view:
            writer.write(view)
            await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


async def by_frame(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pause: float) -> None:
    """The client's bytes: the request head at once, then frame by frame, each
    frame's first octet 2 x `pause` before its rest, `pause` between frames."""
    writer.write(await reader.readuntil(b"\r\n\r\n"))
    buffered = bytearray()
    while chunk := await reader.read(READ_SIZE):
        buffered += chunk
        while (size := frame_size(buffered)) is not None:
            whole = bytes(buffered[:size])
            del buffered[:size]
            writer.write(whole[:1])
            await writer.drain()
            await asyncio.sleep(2 * pause)
            writer.write(whole[1:])
            await writer.drain()
            await asyncio.sleep(pause)
    writer.write(bytes(buffered))
    if writer.can_write_eof():
        writer.write_eof()


def frame_size(data: bytearray) -> int | None:
    """The size of the frame at the start of `data`, once it is all there."""
    if len(data) < 2:
        return None
    length, size = data[1] & 0x7F, 2
    if length == 126:
        size, length = 4, int.from_bytes(data[2:4], "big") if len(data) >= 4 else -1
    elif length == 127:
        size, length = 10, int.from_bytes(data[2:10], "big") if len(data) >= 10 else -1
    size += 4 if data[1] & 0x80 else 0
    if length < 0 or len(data) < size + length:
        return None
    return size + length


async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while chunk := await reader.read(READ_SIZE):
        writer.write(chunk)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


async def relay(
    target_port: int, pause: float | None, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
) -> None:
    try:
        server_r, server_w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", target_port), 5)
    except (OSError, TimeoutError):
        client_w.close()
        return
    writers = (client_w, server_w)

    async def pump(direction: Coroutine[Any, Any, None]) -> None:
        try:
            await direction
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            # A side ended abruptly (kosoku drops connections on purpose): end both.
            for w in writers:
                w.close()

    try:
        up = paced(client_r, server_w) if pause is None else by_frame(client_r, server_w, pause)
        await asyncio.gather(pump(up), pump(plain(server_r, client_w)))
    finally:
        for w in writers:
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()


async def main(host: str, port: int, target_port: int, pause: float | None) -> None:
    server = await asyncio.start_server(
        lambda r, w: relay(target_port, pause, r, w), host, port, limit=HEAD_LIMIT
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    pause = float(sys.argv[4]) if len(sys.argv) > 4 else None
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), pause))
