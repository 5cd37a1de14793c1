"""A fuzzing client that sends octet by octet, for the Autobahn comparison
(tests/test_autobahn.py): a TCP relay put between `kosoku` and the server
under test.

Run as ``python -m tests.autobahn_octets HOST PORT TARGET_PORT``: it listens on
HOST:PORT and relays each connection to 127.0.0.1:TARGET_PORT. After the
client's request head, what the client sends goes on one octet per write, one
event-loop turn apart (asyncio sets TCP_NODELAY: each octet is a segment of
its own), for the first `BUDGET` octets of the connection; then as it comes,
so that the cases with megabytes of payload do not take hours. What the
server sends goes back as it comes.

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


async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while chunk := await reader.read(READ_SIZE):
        writer.write(chunk)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


async def relay(target_port: int, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
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
        await asyncio.gather(pump(paced(client_r, server_w)), pump(plain(server_r, client_w)))
    finally:
        for w in writers:
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()


async def main(host: str, port: int, target_port: int) -> None:
    server = await asyncio.start_server(
        lambda r, w: relay(target_port, r, w), host, port, limit=HEAD_LIMIT
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
