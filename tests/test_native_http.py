"""Plain HTTP through the data plane's listener alone
(proxy/dataplane/py/src/http.rs; the whole runtime: tests/test_http.py).

The shapes of tests/test_hardening_http.py (every phase's timeout, the
backend's connection released, each refusal counted) and the parts of
tests/test_http.py that do not use its `proxy_url` fixture (which runs every
other test there through `loopwatch run`): routes, an unreachable or hanging
upstream, a client that leaves, idle keep-alive, shutdown. Then what only raw
sockets on both sides show: the request and response bytes exactly, chunked
bodies framed anew, interim 1xx answers, 204, garbage from the upstream;
upstream connections reused between clients (and a stale one retried by its
rule); an upgrade after a plain request; and that plain requests are no
WebSocket attempts (no events, the enforcement table is not consulted).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from loopwatch.proxy.dataplane.native import (
    EnforcementTable,
    EventQueue,
    NativeListener,
    RequestRejected,
)
from loopwatch.proxy.dataplane.settings import Limits
from loopwatch.proxy.tools.demo_backend import issue_token
from tests.conftest import (
    RawBackend,
    free_port,
    raw_exchange,
    read_response,
    switching_protocols,
    upgrade_request,
    wait_for,
)
from tests.hardening import MIB, PlainBackend, read_all
from tests.test_http import Backend

SLOW_BODY = b"POST /upload HTTP/1.1\r\nHost: example.test\r\nContent-Length: 100000\r\n\r\nabc"


@dataclass
class Front:
    """The listener under test: its port, what it rejected, its connections."""

    port: int
    rejected: Callable[[], Awaitable[dict[str, float]]]
    active: Callable[[], int]
    listener: NativeListener | None = None
    queue: EventQueue | None = None
    table: Any = None


@contextlib.asynccontextmanager
async def front(routes: list[tuple[str, str]], **limits: float) -> AsyncIterator[Front]:
    """The listener serving `routes` ((path prefix, upstream URL) pairs) under
    `limits` (seconds for the timeouts)."""
    queue, table = EventQueue(), EnforcementTable()
    listener = NativeListener.start(routes, queue=queue, table=table, limits=Limits(**limits), threads=2)

    async def native_rejected() -> dict[str, float]:
        return {k: float(v) for k, v in listener.stats().rejected.items()}

    try:
        yield Front(listener.port, native_rejected, lambda: listener.stats().active, listener, queue, table)
    finally:
        assert await asyncio.to_thread(listener.stop, 5.0) == 0


async def open_conn(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


# --- every phase has a timeout (the shapes of test_hardening_http.py) -------------


async def test_silent_request_body_is_408_and_the_backend_connection_is_released() -> None:
    async with PlainBackend() as backend, front([("/", backend.url)], body_timeout=1.0) as lw:
        reader, writer = await open_conn(lw.port)
        writer.write(SLOW_BODY)  # 3 bytes of the 100 000 announced, then silence
        await wait_for(lambda: backend.open == 1)  # it went upstream, head and all
        response = await asyncio.wait_for(read_response(reader), 10)
        assert (response.status, response.body) == (408, b"loopwatch: request body timeout\n")
        assert response.header("Connection") == "close"
        assert await read_all(reader) == b""
        writer.close()
        # The upstream request was cancelled: the backend saw its connection end
        # with the body unfinished.
        await wait_for(lambda: backend.open == 0 and backend.cut_short == 1)
        await wait_for(lambda: lw.active() == 0)
        assert (await lw.rejected())["body_timeout"] == 1


async def test_a_body_that_keeps_coming_is_never_cut() -> None:
    async with PlainBackend() as backend, front([("/", backend.url)], body_timeout=1.0) as lw:
        reader, writer = await open_conn(lw.port)
        writer.write(b"POST /upload HTTP/1.1\r\nHost: example.test\r\nContent-Length: 6\r\n\r\n")
        for byte in b"abcdef":  # never 1 s without a byte
            await asyncio.sleep(0.3)
            writer.write(bytes([byte]))
        response = await asyncio.wait_for(read_response(reader), 10)
        writer.close()
        assert (response.status, response.body) == (200, b"6\n")
        assert backend.cut_short == 0
        assert (await lw.rejected())["body_timeout"] == 0


async def rejected_message(lw: Any) -> str:
    """The message of the data plane's first `request_rejected` line."""
    assert lw.queue is not None
    lines = [r.event for r in await asyncio.to_thread(lw.queue.recv_batch, 100, 1.0)]
    return next(e for e in lines if isinstance(e, RequestRejected)).message


async def test_upstream_that_never_answers_is_504_at_response_timeout() -> None:
    async with PlainBackend() as backend, front([("/", backend.url)], response_timeout=1.0) as lw:
        reader, writer = await open_conn(lw.port)
        writer.write(b"GET /no-head HTTP/1.1\r\nHost: example.test\r\n\r\n")
        response = await asyncio.wait_for(read_response(reader), 10)
        writer.close()
        assert (response.status, response.body) == (504, b"loopwatch: upstream timeout\n")
        await wait_for(lambda: backend.cut_short == 1)
        assert (await lw.rejected())["upstream_timeout"] == 1
        # The line names the phase: every timeout read the same ("backend down"
        # and "backend slow" could not be told apart).
        assert await rejected_message(lw) == (
            "loopwatch: upstream timeout: response head: none within limits.response_timeout"
        )


async def test_response_body_that_stalls_is_cut_at_response_idle_timeout() -> None:
    async with PlainBackend() as backend, front([("/", backend.url)], response_idle_timeout=1.0) as lw:
        reader, writer = await open_conn(lw.port)
        writer.write(b"GET /stall-body HTTP/1.1\r\nHost: example.test\r\n\r\n")
        received = await read_all(reader)
        writer.close()
        assert received.startswith(b"HTTP/1.1 200 OK\r\n")
        assert received.endswith(b"\r\n\r\n" + b"s" * 10)  # 10 of the 1000 bytes, then the cut
        await wait_for(lambda: backend.cut_short == 1)
        assert (await lw.rejected())["response_timeout"] == 1


async def test_client_that_stops_reading_the_response_is_cut() -> None:
    async with PlainBackend() as backend, front([("/", backend.url)], response_idle_timeout=1.0) as lw:
        sock = socket.create_connection(("127.0.0.1", lw.port))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.sendall(b"GET /endless HTTP/1.1\r\nHost: example.test\r\n\r\n")
            await wait_for(lambda: "/endless" in backend.paths)
            await wait_for(lambda: backend.cut_short == 1, timeout=10)  # and never a byte read
        finally:
            sock.close()
        await wait_for(lambda: lw.active() == 0)
        assert (await lw.rejected())["response_timeout"] == 1


async def test_upstream_that_takes_no_body_is_blamed_with_504_not_the_client() -> None:
    async with PlainBackend() as backend, front([("/", backend.url)], body_timeout=1.0) as lw:
        size = 64 * MIB
        reader, writer = await open_conn(lw.port)
        writer.write(b"POST /sink HTTP/1.1\r\nHost: example.test\r\nContent-Length: %d\r\n\r\n" % size)

        async def send() -> None:
            with contextlib.suppress(ConnectionError):
                for _ in range(size // MIB):
                    writer.write(b"b" * MIB)
                    await writer.drain()

        task = asyncio.create_task(send())
        try:
            response = await asyncio.wait_for(read_response(reader), 15)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            writer.close()
        assert (response.status, response.body) == (504, b"loopwatch: upstream timeout\n")
        counts = await lw.rejected()
        assert (counts["upstream_timeout"], counts["body_timeout"]) == (1, 0)
        assert await rejected_message(lw) == (
            "loopwatch: upstream timeout: request body: the upstream took none of it for limits.body_timeout"
        )


async def test_upstream_down_is_502() -> None:
    async with front([("/", f"http://127.0.0.1:{free_port()}")]) as lw:
        response, after = await raw_exchange(lw.port, b"GET /anything HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (response.status, response.body) == (502, b"loopwatch: upstream unreachable\n")
        assert after == b""
        # Also with a request body on its way.
        body = b"x" * 100_000
        request = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
        response, _ = await raw_exchange(lw.port, request + body)
        assert response.status == 502
        await wait_for(lambda: lw.active() == 0)
        # Counted and logged (it was invisible): the line says why.
        rejected = await lw.rejected()
        assert rejected["upstream_error"] == 2 and sum(rejected.values()) == 2
        assert lw.queue is not None
        lines = [r.event for r in await asyncio.to_thread(lw.queue.recv_batch, 100, 1.0)]
        line = next(e for e in lines if isinstance(e, RequestRejected))
        assert (line.reason, line.status) == ("upstream_error", 502)
        assert line.message.startswith("loopwatch: upstream unreachable: connect: "), line.message


async def test_an_upstream_that_fails_mid_response_or_answers_garbage_is_counted() -> None:
    """Its 502s and the responses it cut short were in no metric and no log."""
    garbage = b"HTTP/1.1 000 Zero\r\nContent-Length: 2\r\n\r\nok"
    async with (
        ScriptedBackend(lambda path: garbage) as up,
        PlainBackend() as plain,  # /cut-body: 10 of 1000 bytes, then it closes
        front([("/garbage", up.url), ("/", plain.url)]) as lw,
    ):
        response, _ = await raw_exchange(lw.port, b"GET /garbage HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (response.status, response.body) == (502, b"loopwatch: upstream error\n")
        reader, writer = await open_conn(lw.port)
        writer.write(b"GET /cut-body HTTP/1.1\r\nHost: x\r\n\r\n")
        received = await read_all(reader)
        writer.close()
        assert received.startswith(b"HTTP/1.1 200 OK\r\n") and received.endswith(b"s" * 10)
        await wait_for(lambda: lw.active() == 0)
        rejected = await lw.rejected()
        assert (rejected["upstream_error"], rejected["upstream_cut"]) == (1, 1)
        assert lw.queue is not None
        lines = [r.event for r in await asyncio.to_thread(lw.queue.recv_batch, 100, 1.0)]
        messages = {e.reason: e.message for e in lines if isinstance(e, RequestRejected)}
        assert messages == {
            "upstream_error": "loopwatch: upstream error: invalid response from upstream: status 000 outside 100-599",
            "upstream_cut": "loopwatch: the upstream ended its response mid-body",
        }


async def test_upstream_connect_timeout_is_504() -> None:
    # A listener whose accept queue is full: SYNs are dropped, connect hangs.
    sock = socket.socket()
    fillers: list[socket.socket] = []
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(0)
        port = sock.getsockname()[1]
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        await asyncio.sleep(0.2)
        async with front([("/", f"http://127.0.0.1:{port}")], connect_timeout=0.5) as lw:
            response, _ = await raw_exchange(lw.port, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (response.status, response.body) == (504, b"loopwatch: upstream timeout\n")
            assert (await lw.rejected())["upstream_timeout"] == 1
            assert await rejected_message(lw) == (
                "loopwatch: upstream timeout: connect: not connected within limits.connect_timeout"
            )
    finally:
        for s in fillers:
            s.close()
        sock.close()


# --- routes, clients that leave, keep-alive, shutdown (test_http.py's shapes) ------


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    async with Backend() as b:
        yield b


async def test_routes_and_base_path(backend: Backend) -> None:
    routes = [("/api", backend.url + "/echo/v2"), ("/echo", backend.url)]
    async with front(routes) as lw:
        request = b"GET /api/items?id=3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        response, _ = await raw_exchange(lw.port, request)
        assert json.loads(response.body)["path_qs"] == "/echo/v2/items?id=3"
        request = b"GET /echo/p HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        response, _ = await raw_exchange(lw.port, request)
        assert json.loads(response.body)["path_qs"] == "/echo/p"
        request = b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        response, _ = await raw_exchange(lw.port, request)
        assert (response.status, response.body) == (404, b"no route for this path\n")
        assert (await lw.rejected())["no_route"] == 1


async def test_a_dot_dot_segment_cannot_leave_its_route() -> None:
    """`/public` serves the upstream's `/public-api` only: a `..` however
    written (percent-encoded, a backslash, Tomcat's `..;`) would take it
    elsewhere at a backend that resolves it, so it is refused before routing,
    WebSocket upgrades too; single dots and dots inside a name pass."""
    async with ScriptedBackend(lambda path: b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path.encode())) as up, front([("/public", up.url + "/public-api")]) as lw:  # fmt: skip
        refused = [b"/public/../admin/secret", b"/public/%2e%2E/admin", b"/public/.%2e/admin", b"/public/..%2fadmin",
                   b"/public/..\\admin", b"/public/..;x/admin", b"/public/a/../../admin?q=1"]  # fmt: skip
        for path in refused:
            response, _ = await raw_exchange(lw.port, b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path)
            assert (response.status, response.body) == (400, b"dot-dot segment in the path\n"), path
        response, _ = await raw_exchange(lw.port, upgrade_request("/public/../admin"))
        assert response.status == 400
        assert up.requests == []
        assert (await lw.rejected())["bad_request"] == len(refused) + 1
        for path, upstream in [(b"/public/./a/...", b"/public-api/./a/..."), (b"/public/v1..2/..x", b"/public-api/v1..2/..x")]:
            response, _ = await raw_exchange(lw.port, b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path)
            assert (response.status, response.body) == (200, upstream)


async def test_client_leaving_mid_response_frees_the_connection(backend: Backend) -> None:
    async with front([("/", backend.url)]) as lw:
        reader, writer = await open_conn(lw.port)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"first chunk\n"), 10)
        writer.transport.abort()
        backend.first_chunk_read.set()
        await wait_for(lambda: lw.active() == 0)


async def test_idle_keep_alive_connection_closed_quietly(backend: Backend) -> None:
    async with front([("/", backend.url)], handshake_timeout=0.5, keepalive_timeout=0.5) as lw:
        reader, writer = await open_conn(lw.port)
        try:
            writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
            response = await asyncio.wait_for(read_response(reader), 10)
            assert response.status == 200
            # Nothing more is sent: after the timeout the connection just ends,
            # with no unsolicited 408 that could race a next request.
            assert await asyncio.wait_for(reader.read(), 10) == b""
        finally:
            writer.close()
        await wait_for(lambda: lw.active() == 0)
        assert (await lw.rejected())["head_timeout"] == 0


async def test_shutdown_lets_an_http_response_in_flight_finish(backend: Backend) -> None:
    queue, table = EventQueue(), EnforcementTable()
    listener = NativeListener.start([("/", backend.url)], queue=queue, table=table, threads=2)
    reader, writer = await open_conn(listener.port)
    try:
        writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        response = await asyncio.wait_for(read_response(reader, head_only=True), 10)
        assert response.status == 200
        first = await asyncio.wait_for(reader.readuntil(b"first chunk\n"), 10)
        stop = asyncio.create_task(asyncio.to_thread(listener.stop, 5.0))
        # (Not listener.running: it waits for stop() to return, the GIL held.)
        await asyncio.sleep(0.2)
        backend.first_chunk_read.set()
        rest = await asyncio.wait_for(reader.read(), 10)  # to EOF: then it closes
        assert await asyncio.wait_for(stop, 10) == 0
    finally:
        writer.close()
    # The chunked body completes, uncorrupted by anything else.
    body = first + rest
    assert body.endswith(b"0\r\n\r\n")
    assert b"HTTP/1.1 503" not in body
    assert b"second chunk\n" in body and b"last chunk\n" in body


# --- raw sockets on both sides --------------------------------------------------


class ScriptedBackend:
    """A raw upstream: records each request (head and body, read by
    Content-Length or chunked framing) and answers with the bytes `answer`
    gives for its path (None: close without a word)."""

    def __init__(self, answer: Callable[[str], bytes | None]) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.connections = 0
        self.url = ""
        self._server: asyncio.AbstractServer | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lower = head.lower()
                raw = bytearray(head)
                if b"transfer-encoding: chunked" in lower:
                    while True:
                        line = await reader.readuntil(b"\r\n")
                        raw += line
                        size = int(line.split(b";")[0], 16)
                        if size == 0:
                            raw += await reader.readuntil(b"\r\n")
                            break
                        raw += await reader.readexactly(size + 2)
                elif b"content-length:" in lower:
                    length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
                    raw += await reader.readexactly(length)
                self.requests.append(bytes(raw))
                answer = self.answer(head.split(b" ")[1].decode())
                if answer is None:
                    return
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> ScriptedBackend:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


def decode_chunked(body: bytes) -> tuple[bytes, int]:
    """The data of a chunked body, and how many chunks carried it."""
    data, chunks = bytearray(), 0
    while True:
        line, _, body = body.partition(b"\r\n")
        size = int(line, 16)
        if size == 0:
            assert body == b"\r\n", body  # no trailers
            return bytes(data), chunks
        data += body[:size]
        chunks += 1
        assert body[size : size + 2] == b"\r\n"
        body = body[size + 2 :]


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def test_a_chunked_request_body_is_decoded_and_framed_anew() -> None:
    """Extensions and trailers stay with the client's hop; the upstream gets
    the data in loopwatch's own chunks, `Transfer-Encoding: chunked` last."""
    async with ScriptedBackend(lambda path: OK) as up, front([("/", up.url)]) as lw:
        body = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
        request = (
            b"POST /up?q=1 HTTP/1.1\r\nHost: front.example\r\nTransfer-Encoding: chunked\r\n"
            b"X-App: a\r\nConnection: close\r\n\r\n"
        )
        response, after = await raw_exchange(lw.port, request + body)
        assert (response.status, response.body, after) == (200, b"ok", b"")
        assert response.header("Connection") == "close"
        [seen] = up.requests
        head, _, chunked = seen.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0] == b"POST /up?q=1 HTTP/1.1"
        assert lines[1] == b"Host: 127.0.0.1:%d" % up.port
        assert b"X-App: a" in lines
        assert b"X-Forwarded-Host: front.example" in lines
        assert b"X-Forwarded-Proto: http" in lines
        assert lines[-1] == b"Transfer-Encoding: chunked"
        assert not any(line.lower().startswith(b"connection") for line in lines)
        data, _ = decode_chunked(chunked)
        assert data == b"hello world"


async def test_a_bad_chunked_body_is_400_and_the_upstream_request_cancelled() -> None:
    async with PlainBackend() as backend, front([("/", backend.url)]) as lw:
        reader, writer = await open_conn(lw.port)
        writer.write(b"POST /no-head HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        await wait_for(lambda: backend.open == 1)
        writer.write(b"5 \r\nhello\r\n0\r\n\r\n")  # whitespace after the size: llhttp refuses it
        response = await asyncio.wait_for(read_response(reader), 10)
        writer.close()
        assert response.status == 400
        assert response.body == b"malformed request: Invalid character in chunk size\n"
        assert (await lw.rejected())["bad_request"] == 1
        # The upstream request is cancelled at once, not kept until body_timeout:
        # the backend saw its connection end with the body unfinished.
        await wait_for(lambda: backend.cut_short == 1 and backend.open == 0)
        await wait_for(lambda: lw.active() == 0)


def response_shapes(path: str) -> bytes | None:
    return {
        # Interim answers are dropped; 204 has no body, so the next response follows at once.
        "/hints": b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
        b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
        # Chunked upstream: decoded, then chunked again without extensions or trailers.
        "/chunked": b"HTTP/1.1 200 Fine\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n"
        b"Connection: X-Hop\r\nX-Hop: 1\r\nX-Kept: 2\r\n\r\n"
        b"3;e=1\r\nabc\r\n4\r\ndefg\r\n0\r\nX-T: 1\r\n\r\n",
        "/garbage": b"SPDY/3 200 OK\r\n\r\n",
        "/no-reason": b"HTTP/1.1 200 \r\nContent-Length: 1\r\n\r\nr",
    }.get(path)


async def test_response_shapes_over_one_connection() -> None:
    async with ScriptedBackend(response_shapes) as up, front([("/", up.url)]) as lw:
        reader, writer = await open_conn(lw.port)
        try:
            writer.write(b"GET /hints HTTP/1.1\r\nHost: x\r\n\r\n")
            response = await asyncio.wait_for(read_response(reader), 10)
            assert response.status_line == b"HTTP/1.1 204 No Content"
            assert response.header("X-A") == "1" and response.header("Link") is None
            writer.write(b"GET /chunked HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head == (
                b"HTTP/1.1 200 Fine\r\nX-Kept: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            body = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 10)
            assert decode_chunked(body)[0] == b"abcdefg"
            writer.write(b"GET /no-reason HTTP/1.1\r\nHost: x\r\n\r\n")
            response = await asyncio.wait_for(read_response(reader), 10)
            assert (response.status_line, response.body) == (b"HTTP/1.1 200 ", b"r")
            writer.write(b"GET /garbage HTTP/1.1\r\nHost: x\r\n\r\n")
            response = await asyncio.wait_for(read_response(reader), 10)
            assert (response.status, response.body) == (502, b"loopwatch: upstream error\n")
            assert await read_all(reader) == b""
        finally:
            writer.close()


SMUGGLED = b"GET /internal/admin HTTP/1.1\r\nHost: internal.example\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n"


async def test_a_connection_naming_content_length_smuggles_no_request() -> None:
    """`Connection: Content-Length` does not take the body's length away
    upstream (RFC 9110 §7.6.1; nginx and HAProxy keep it too): without it the
    body went on unframed, and the upstream read it as a request loopwatch
    never routed, its next answer pooled for another client."""
    async with ScriptedBackend(lambda path: b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path.encode())) as up, front([("/api", up.url)]) as lw:  # fmt: skip
        reader, writer = await open_conn(lw.port)
        try:
            writer.write(b"POST /api/public HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Content-Length\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(SMUGGLED), SMUGGLED))  # fmt: skip
            response = await asyncio.wait_for(read_response(reader), 10)
            assert (response.status, response.body) == (200, b"/api/public")
            writer.write(b"GET /api/next HTTP/1.1\r\nHost: a\r\n\r\n")
            response = await asyncio.wait_for(read_response(reader), 10)
            assert (response.status, response.body) == (200, b"/api/next")
        finally:
            writer.close()
        first, second = up.requests
        head, _, body = first.partition(b"\r\n\r\n")
        assert b"\r\nContent-Length: %d" % len(SMUGGLED) in head and body == SMUGGLED
        assert second.startswith(b"GET /api/next HTTP/1.1\r\n")


async def test_a_response_naming_content_length_in_connection_keeps_its_length() -> None:
    """Its body is framed by it: dropped, the client could not tell where the
    body ends (it waited for more on a kept-alive connection)."""
    answer = b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Content-Length, X-Hop\r\nX-Hop: 1\r\nContent-Length: 5\r\n\r\nhello"
    async with ScriptedBackend(lambda path: answer) as up, front([("/", up.url)]) as lw:
        reader, writer = await open_conn(lw.port)
        try:
            for _ in range(2):  # and the connection carries the next one
                writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                response = await asyncio.wait_for(read_response(reader), 10)
                assert (response.status, response.header("Content-Length"), response.body) == (200, "5", b"hello")
                assert response.header("X-Hop") is None and response.header("Transfer-Encoding") is None
        finally:
            writer.close()


async def test_a_content_length_repeated_with_one_value_is_delivered_once() -> None:
    """The upstream probe: a backend stack that repeats the header (some
    middleware chains) got a 502 where nginx and HAProxy deliver; values that
    differ stay a bad response."""
    answers = {
        "/same": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\nContent-Length: 2\r\n\r\nok",
        "/differ": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
    }
    async with ScriptedBackend(lambda path: answers[path]) as up, front([("/", up.url)]) as lw:
        reader, writer = await open_conn(lw.port)
        try:
            writer.write(b"GET /same HTTP/1.1\r\nHost: a\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.lower().count(b"\r\ncontent-length: 2") == 1 and b"X-A: 1" in head
            assert await asyncio.wait_for(reader.readexactly(2), 10) == b"ok"
            writer.write(b"GET /differ HTTP/1.1\r\nHost: a\r\n\r\n")
            response = await asyncio.wait_for(read_response(reader), 10)
            assert response.status == 502
        finally:
            writer.close()


async def test_an_offer_to_upgrade_to_http2_is_declined_and_served() -> None:
    """`curl --http2 http://…` and Java's HttpClient offer `Upgrade: h2c` on
    ordinary requests: they were refused 400 as broken WebSocket upgrades (a
    POST as an upgrade with a body). Declined (RFC 9110 §7.8), they are served
    over HTTP/1.1 as nginx and HAProxy serve them, the offer not passed on."""
    offer = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with ScriptedBackend(lambda path: ok) as up, front([("/", up.url)]) as lw:
        reader, writer = await open_conn(lw.port)
        try:
            writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n" + offer + b"\r\n")
            response = await asyncio.wait_for(read_response(reader), 10)
            assert (response.status, response.body) == (200, b"ok")
            writer.write(b"POST /y HTTP/1.1\r\nHost: a\r\n" + offer + b"Content-Length: 4\r\n\r\nbody")
            response = await asyncio.wait_for(read_response(reader), 10)  # on the same connection
            assert (response.status, response.body) == (200, b"ok")
        finally:
            writer.close()
        get, post = up.requests
        for request in (get, post):
            head = request.partition(b"\r\n\r\n")[0].lower()
            assert b"upgrade" not in head and b"http2-settings" not in head, head
        assert post.endswith(b"\r\n\r\nbody")


async def test_an_operators_deny_holds_for_plain_requests() -> None:
    """`policy.deny` refused a client's WebSocket attempts while its REST calls
    (plain requests, no attempts) still reached the backend."""
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with ScriptedBackend(lambda path: ok) as up, front([("/", up.url)]) as lw:

        async def status(token: str | None = None) -> int:
            auth = b"" if token is None else b"Authorization: Bearer %s\r\n" % token.encode()
            response, _ = await raw_exchange(
                lw.port,
                b"POST /api HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
                + auth
                + b"Content-Length: 0\r\n\r\n",
            )
            return response.status

        lw.table.set_deny(
            ["alice@127.0.0.1"]
        )  # a key (the default identity: the token's sub, bound)
        assert await status(issue_token("alice", 60)) == 403
        assert await status(issue_token("bob", 60)) == 200
        assert await status() == 200
        lw.table.set_deny(["127.0.0.0/8"])  # a network: every client at its addresses
        assert await status() == 403 and await status(issue_token("bob", 60)) == 403
        lw.table.set_deny([])
        assert await status(issue_token("alice", 60)) == 200
        assert (await lw.rejected())["deny"] == 3
    assert len(up.requests) == 3  # bob's, the tokenless one, alice's once allowed again


async def test_a_101_to_a_plain_request_is_502() -> None:
    """No upgrade was asked for, so a switch is no valid answer (RFC 9110
    §15.2.2; HAProxy answers 502 too). It was passed on stripped of its
    Upgrade and Connection, and the connection went on as HTTP."""
    switch = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\nsecret"
    async with ScriptedBackend(lambda path: switch) as up, front([("/", up.url)]) as lw:
        response, after = await raw_exchange(lw.port, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (response.status, response.body, after) == (502, b"loopwatch: upstream error\n", b"")


async def test_an_upgrade_announced_on_a_200_does_not_take_its_body_away() -> None:
    """Apache with mod_http2 announces `Upgrade: h2,h2c` on its answers: only
    a 101 upgrades, so the body (here delimited by the close) reaches the client."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nUpgrade: h2,h2c\r\nConnection: Upgrade, close\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"<html>the page</html>")
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with front([("/", url)]) as lw:
            response, after = await raw_exchange(lw.port, b"GET /page HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert response.status == 200 and response.header("Upgrade") is None
            assert (response.body, after) == (b"<html>the page</html>", b"")
    finally:
        server.close()
        await server.wait_closed()


async def test_an_upstream_that_answers_before_the_body_ends_closes_the_connection() -> None:
    """A 413 before the body is in: the response goes out whole, with
    `Connection: close` (the rest of the body is never read as a request)."""
    early = b"HTTP/1.1 413 Too Big\r\nContent-Length: 3\r\n\r\nbig"

    async def answer_early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(early)
        await writer.drain()
        with contextlib.suppress(ConnectionError):
            await reader.read()  # and never reads the body it refused
        writer.close()

    server = await asyncio.start_server(answer_early, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with front([("/", url)]) as lw:
            reader, writer = await open_conn(lw.port)
            writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" + b"a" * 1000)
            response = await asyncio.wait_for(read_response(reader), 10)
            assert (response.status, response.body) == (413, b"big")
            assert response.header("Connection") == "close"
            writer.close()
            await wait_for(lambda: lw.active() == 0)
    finally:
        server.close()
        await server.wait_closed()


# --- upstream connections are reused ----------------------------------------------


async def test_upstream_connections_are_reused_across_clients() -> None:
    async with PlainBackend() as backend, front([("/", backend.url)]) as lw:
        for _ in range(3):  # one client connection each, one after the other
            response, _ = await raw_exchange(
                lw.port, b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert (response.status, response.body) == (200, b"ok\n")
        assert backend.accepted == 1
        assert backend.open == 1  # kept idle for the next request


def closes_on_its_second_request() -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A backend whose first connection answers one request, then closes when
    the next one comes (as a backend closing an idle keep-alive connection
    just as loopwatch reuses it); later connections answer everything."""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        first_connection = len(connections) == 1
        answered = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if first_connection and answered == 1:
                    return  # closed without a word
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                body = b"conn %d\n" % len(connections)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                answered += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return handle


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        # Idempotent and without a body: sent again on a new connection.
        (b"GET /again HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", (200, b"conn 2\n")),
        # Not idempotent: the upstream's failure is the answer.
        (
            b"POST /once HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi",
            (502, b"loopwatch: upstream closed the connection\n"),
        ),
    ],
    ids=["get-retried", "post-not-retried"],
)
async def test_a_reused_connection_the_upstream_closed(
    request_bytes: bytes, expected: tuple[int, bytes]
) -> None:
    server = await asyncio.start_server(closes_on_its_second_request(), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with front([("/", url)]) as lw:
            response, _ = await raw_exchange(
                lw.port, b"GET /first HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert (response.status, response.body) == (200, b"conn 1\n")
            response, _ = await raw_exchange(lw.port, request_bytes)
            assert (response.status, response.body) == expected
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ],
    ids=["connection-close", "http10"],
)
async def test_an_upstream_connection_that_cannot_carry_another_request_is_not_reused(
    answer: bytes,
) -> None:
    async with ScriptedBackend(lambda path: answer) as up, front([("/", up.url)]) as lw:
        for _ in range(2):
            response, _ = await raw_exchange(
                lw.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert (response.status, response.body) == (200, b"ok")
        assert up.connections == 2


async def test_an_upstream_connection_with_stray_bytes_is_not_reused() -> None:
    """Bytes after the response's end, in the same read, are no response to
    the next request: the connection is not kept for it. The listener passes
    the response on and closes the connection."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokSTRAY BYTES"
    expected = (200, b"ok")
    async with ScriptedBackend(lambda path: answer) as up, front([("/", up.url)]) as lw:
        for _ in range(2):
            response, _ = await raw_exchange(
                lw.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert (response.status, response.body) == expected
        assert up.connections == 2


async def test_an_upstream_connection_that_speaks_while_idle_is_not_reused() -> None:
    """A whole response the upstream sends unasked while its connection sits
    idle in the pool is not the answer to the next request sent on it (as
    aiohttp's pool would hand it out: aiohttp issue 13656): the connection is
    checked at checkout."""
    answered = asyncio.Event()
    unsolicited = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\ninjectd"
    connections: list[int] = []
    spoke = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        number = len(connections)
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                body = b"conn %d" % number
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                if number == 1 and not spoke.is_set():
                    await answered.wait()  # the proxy has it all: the connection is idle now
                    writer.write(unsolicited)
                    await writer.drain()
                    spoke.set()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with front([("/", url)]) as lw:
            request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            response, _ = await raw_exchange(lw.port, request)
            assert (response.status, response.body) == (200, b"conn 1")
            answered.set()
            await asyncio.wait_for(spoke.wait(), 10)
            response, _ = await raw_exchange(lw.port, request)
            assert (response.status, response.body) == (200, b"conn 2")
            assert len(connections) == 2
    finally:
        server.close()
        await server.wait_closed()


async def test_a_websocket_upgrade_after_a_plain_request_on_one_connection() -> None:
    """Keep-alive brings the connection back to its head: the next request may
    be an upgrade, admitted and relayed as any."""
    frame = b"\x81\x85\x00\x00\x00\x00hello"  # a masked text frame
    async with (
        RawBackend(switching_protocols) as ws_backend,
        PlainBackend() as plain,
        front([("/ws", ws_backend.url), ("/", plain.url)]) as lw,
    ):
        reader, writer = await open_conn(lw.port)
        try:
            writer.write(b"GET /ok HTTP/1.1\r\nHost: example.test\r\n\r\n")
            response = await asyncio.wait_for(read_response(reader), 10)
            assert (response.status, response.body) == (200, b"ok\n")
            writer.write(upgrade_request("/ws") + frame)
            response = await asyncio.wait_for(read_response(reader, head_only=True), 10)
            assert response.status == 101
            await wait_for(lambda: ws_backend.connections == 1 and bytes(ws_backend.after[0]) == frame)
        finally:
            writer.close()


# --- no WebSocket attempt ----------------------------------------------------------


async def test_plain_requests_are_not_attempts(backend: Backend) -> None:
    """A plain request never reaches the gate: no event, and the enforcement
    table is consulted for an operator's deny only (an open breaker and a
    client's cooldown still let it through)."""
    queue, table = EventQueue(), EnforcementTable()
    table.set_breaker("/", "upstream", "open", seconds=60.0)
    table.set_cooldown("127.0.0.1", 60.0, "auth_loop", None, None)
    listener = NativeListener.start([("/", backend.url)], queue=queue, table=table, threads=2)
    try:
        reader, writer = await open_conn(listener.port)
        for i in range(3):
            writer.write(b"GET /echo/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
            response = await asyncio.wait_for(read_response(reader), 10)
            assert response.status == 200
        writer.close()
        await wait_for(lambda: listener.stats().active == 0)
        stats = listener.stats()
        assert queue.recv_batch(timeout=0.05) == []
        assert sum(stats.refused.values()) == 0 and stats.opened == 0
    finally:
        assert await asyncio.to_thread(listener.stop, 5.0) == 0
