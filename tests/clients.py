"""Client behaviours shared by the detection tests: one attempt, the incident's
loop, and the demo backend as a context manager."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from loopwatch.proxy.tools.demo_backend import DemoBackend


@contextlib.asynccontextmanager
async def demo_backend() -> AsyncIterator[DemoBackend]:
    backend = DemoBackend()
    await backend.start()
    try:
        yield backend
    finally:
        await backend.stop()


async def attempt(url: str, address: str | None = None) -> tuple[int | None, str]:
    """One connection (from local `address`, a loopback one, when given): (close
    code, reason) as the client saw them."""
    local = {} if address is None else {"local_addr": (address, 0)}
    try:
        async with connect(url, open_timeout=5, close_timeout=2, **local) as ws:
            await ws.recv()
    except ConnectionClosed as e:
        return (e.rcvd.code, e.rcvd.reason) if e.rcvd else (None, "")
    except InvalidStatus as e:
        return e.response.status_code, e.response.body.decode() if e.response.body else ""
    return None, ""


async def loop_until(url: str, n: int, interval: float = 0.05) -> list[tuple[int | None, str]]:
    """The incident's client: reconnect at once (20/s) after every close."""
    seen = []
    for _ in range(n):
        seen.append(await attempt(url))
        await asyncio.sleep(interval)
    return seen


