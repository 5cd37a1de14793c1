"""A compliant WebSocket echo server for the Autobahn comparison (tests/test_autobahn.py).

Run as ``python -m tests.autobahn_echo HOST PORT [DELAY]``: the `websockets`
library's server echoing every message (DELAY seconds after it arrived, when
given), with no message size limit. websockets also caps
a fragmented message at 4096 frames by default (cases 9.3.x and 9.4.x send 4 MiB
in 64-byte fragments); the cap is lifted too, so those cases test the relay on
tens of thousands of tiny frames instead of failing on both paths alike.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

# Read by websockets at import time.
os.environ.setdefault("WEBSOCKETS_MAX_FRAGMENTS", str(1 << 20))

from websockets.asyncio.server import ServerConnection, serve  # noqa: E402


async def echo(ws: ServerConnection, delay: float) -> None:
    async for message in ws:
        if delay:
            await asyncio.sleep(delay)
        await ws.send(message)


async def main(host: str, port: int, delay: float) -> None:
    async with serve(lambda ws: echo(ws, delay), host, port, max_size=None) as server:
        await server.serve_forever()


if __name__ == "__main__":
    # The suite makes the server fail connections on purpose: no traceback each time.
    logging.getLogger("websockets").setLevel(logging.CRITICAL)
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 0.0))
