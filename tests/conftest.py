"""Shared fixtures: a real backend, a real loopwatch in front of it, clean ports.

Every server binds port 0 on 127.0.0.1; every process a test starts is stopped
by the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from proxy.config import Settings, load_settings
from proxy.gate import Gate
from proxy.runtime import Running, start


def free_port() -> int:
    """A currently free loopback port, for the few tools that cannot bind port 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings_for(upstream: str, **overrides: Any) -> Settings:
    base = {"upstream": upstream, "listen": "127.0.0.1:0", "admin.listen": "127.0.0.1:0"}
    base.update(overrides)
    return load_settings(None, env={}, overrides=base)


@contextlib.asynccontextmanager
async def websockets_backend(
    handler: Callable[[ServerConnection], Awaitable[None]], **kwargs: Any
) -> AsyncIterator[tuple[str, Any]]:
    """A `websockets` server on a free loopback port; yields (ws URL, server)."""
    kwargs.setdefault("max_size", None)
    async with serve(handler, "127.0.0.1", 0, **kwargs) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}", server


@contextlib.asynccontextmanager
async def loopwatch(
    upstream: str, gate: Gate | None = None, **overrides: Any
) -> AsyncIterator[Running]:
    """A loopwatch in this process in front of `upstream`; shut down on exit."""
    running = await start(settings_for(upstream, **overrides), gate)
    try:
        yield running
    finally:
        await running.close()


async def echo(ws: ServerConnection) -> None:
    """Echo every message; close with "close CODE REASON" on request."""
    async for message in ws:
        if isinstance(message, str) and message.startswith("close "):
            _, code, *reason = message.split(" ", 2)
            await ws.close(int(code), reason[0] if reason else "")
            return
        await ws.send(message)


@pytest.fixture
async def echo_backend() -> AsyncIterator[str]:
    async with websockets_backend(echo) as (url, _):
        yield url


@pytest.fixture
async def proxied(echo_backend: str) -> AsyncIterator[Running]:
    async with loopwatch(echo_backend) as running:
        yield running


def ws_url(running: Running, path: str = "/") -> str:
    return f"ws://127.0.0.1:{running.proxy_port}{path}"


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition on the event loop until it holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)
