"""What the hardening tests share: a plain HTTP backend that shows what reached
it and when its connections closed, healthy clients measured while an attack
runs, connections from other loopback addresses, and the rejection counter as
a scrape shows it.

Loopback only: 127.0.0.0/8 is all loopback on Linux, so 127.0.0.2 and
127.0.0.3 are other client addresses on the same host.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import resource
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from loopwatch.proxy.app.runtime import Running
from tests.conftest import echo, loopwatch, websockets_backend

ATTACKER = "127.0.0.1"
HEALTHY = "127.0.0.2"
OTHER = "127.0.0.3"
REJECTED = "loopwatch_requests_rejected"
MIB = 1 << 20


class PlainBackend:
    """A raw HTTP/1.1 server (keep-alive, Content-Length bodies only) answering by path:

    - `GET /ok`: 200, "ok\\n"
    - `POST /upload`: reads the announced body, then 200 with its length
    - `POST /sink`: never reads the body (the upstream that does not take it)
    - `GET /no-head`: never answers
    - `GET /stall-body`: a head announcing 1000 bytes, 10 of them, then nothing
    - `GET /cut-body`: a head announcing 1000 bytes, 10 of them, then it closes
    - `GET /endless`: a head announcing 1 GiB, then 1 MiB writes as fast as they drain

    It counts the connections open now and those that ended (EOF or reset)
    before their request was answered: the slot loopwatch freed."""

    def __init__(self) -> None:
        self.open = 0
        self.accepted = 0
        self.cut_short = 0  # connections that ended with a request unanswered
        self.paths: list[str] = []
        self.url = ""
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self.accepted += 1
        self._writers.add(writer)
        answered = True
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                answered = False
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                self.paths.append(path)
                headers = {
                    name.strip().lower(): value.strip()
                    for name, _, value in (line.partition(":") for line in lines[1:] if line)
                }
                length = int(headers.get("content-length", "0"))
                if path == "/sink":
                    writer.transport.pause_reading()  # takes none of the body, ever
                    with contextlib.suppress(Exception):
                        await writer.wait_closed()
                    return
                if path == "/no-head":
                    await reader.read()
                    return
                if length:
                    await reader.readexactly(length)
                if path in ("/stall-body", "/cut-body"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"s" * 10)
                    if path == "/stall-body":
                        await reader.read()
                    return
                if path == "/endless":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (1 << 30))
                    chunk = b"e" * MIB
                    while True:
                        writer.write(chunk)
                        await writer.drain()
                body = b"ok\n" if method == "GET" else b"%d\n" % length
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                answered = True
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            if not answered:
                self.cut_short += 1
            self.open -= 1
            self._writers.discard(writer)
            writer.close()

    async def __aenter__(self) -> PlainBackend:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()


@dataclass
class Proxied:
    lw: Running
    backend: PlainBackend

    @property
    def port(self) -> int:
        return self.lw.proxy_port


@contextlib.asynccontextmanager
async def proxied(
    extra_routes: dict[str, str] | None = None, plain_prefix: str = "/", **overrides: Any
) -> AsyncIterator[Proxied]:
    """loopwatch with /echo to a websockets echo backend, `plain_prefix` to a
    PlainBackend, and `extra_routes` (path prefix -> upstream URL)."""
    async with websockets_backend(echo) as (echo_url, _), PlainBackend() as backend:
        routes = [
            {"path_prefix": "/echo", "upstream": echo_url},
            {"path_prefix": plain_prefix, "upstream": backend.url},
        ]
        routes += [{"path_prefix": k, "upstream": v} for k, v in (extra_routes or {}).items()]
        async with loopwatch(None, routes=routes, **overrides) as lw:  # type: ignore[arg-type]
            yield Proxied(lw, backend)


@dataclass
class Healthy:
    """A WebSocket echoing a message every 20 ms and a keep-alive plain GET every
    20 ms, both from `address`, for as long as the attack runs."""

    port: int
    address: str = HEALTHY
    echoes: list[float] = field(default_factory=list)  # monotonic times of each echo
    gets: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    async def _echo(self, opened: asyncio.Event, stop: asyncio.Event) -> None:
        url = f"ws://127.0.0.1:{self.port}/echo"
        async with connect(url, open_timeout=10, local_addr=(self.address, 0), compression=None) as ws:
            opened.set()
            i = 0
            while not stop.is_set():
                message = f"healthy {i}"
                await ws.send(message)
                assert await asyncio.wait_for(ws.recv(), 10) == message
                self.echoes.append(time.monotonic())
                i += 1
                await asyncio.sleep(0.02)

    async def _get(self, opened: asyncio.Event, stop: asyncio.Event) -> None:
        connector = aiohttp.TCPConnector(local_addr=(self.address, 0), limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            while not stop.is_set():
                async with session.get(f"http://127.0.0.1:{self.port}/ok", timeout=aiohttp.ClientTimeout(10)) as r:
                    assert r.status == 200, r.status
                    assert await r.read() == b"ok\n"
                self.gets.append(time.monotonic())
                opened.set()
                await asyncio.sleep(0.02)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Healthy]:
        """Both clients run inside the block; on exit, each must have kept working
        through to the end, without a single error."""
        stop = asyncio.Event()
        ws_open, get_open = asyncio.Event(), asyncio.Event()

        async def guard(name: str, coro: Any) -> None:
            try:
                await coro
            except Exception as e:  # noqa: BLE001 - every failure is a finding of the test
                self.errors.append(f"{name}: {e!r}")

        tasks = [
            asyncio.create_task(guard("websocket", self._echo(ws_open, stop))),
            asyncio.create_task(guard("get", self._get(get_open, stop))),
        ]
        try:
            await asyncio.wait_for(asyncio.gather(ws_open.wait(), get_open.wait()), 10)
            yield self
            # Still working after the attack: fresh echoes and GETs come in.
            before = (len(self.echoes), len(self.gets))
            deadline = time.monotonic() + 10
            while (len(self.echoes), len(self.gets)) <= (before[0] + 2, before[1] + 2):
                assert not self.errors, self.errors
                assert time.monotonic() < deadline, "healthy clients stopped"
                await asyncio.sleep(0.02)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 20)
        assert not self.errors, self.errors

    def served_during(self, start: float, end: float) -> tuple[int, int]:
        """(echoes, GETs) completed between two monotonic times."""
        return (
            sum(1 for t in self.echoes if start <= t <= end),
            sum(1 for t in self.gets if start <= t <= end),
        )


async def rejected(lw: Running) -> dict[str, float]:
    """loopwatch_requests_rejected_total by reason, from a scrape of /metrics."""
    async with aiohttp.ClientSession() as session, session.get(
        f"http://127.0.0.1:{lw.admin_port}/metrics"
    ) as response:
        assert response.status == 200
        text = await response.text()
    for family in text_string_to_metric_families(text):
        if family.name == REJECTED:
            return {s.labels["reason"]: s.value for s in family.samples if s.name == REJECTED + "_total"}
    raise AssertionError(f"{REJECTED}_total is not in the scrape")


async def open_from(port: int, address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(address, 0))


async def read_all(reader: asyncio.StreamReader, timeout: float = 10.0) -> bytes:
    """Everything until the server closes (a reset ends it too)."""
    out = bytearray()
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(reader.read(65536), timeout):
            out += chunk
    return bytes(out)


@contextlib.contextmanager
def no_descriptor_left() -> Iterator[None]:
    """This process (the test and the listener in it) with no free descriptor
    under its open-file limit: the limit set just above the highest in use,
    every lower free number filled with /dev/null. The garbage collector is off
    meanwhile, after one collection: an earlier test's socket finalized
    mid-way would free a descriptor, and the listener would accept through it
    (seen twice on loaded full runs: a TLS handshake waited, or was reset)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    gc.collect()
    collecting = gc.isenabled()
    gc.disable()
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    fillers: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
    try:
        with contextlib.suppress(OSError):  # EMFILE: every number under the limit taken
            while True:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        if collecting:
            gc.enable()
