"""Malformed, oversized, slow and excess requests: each is answered by loopwatch
itself with the right status and a one-line body, the upstream never sees it,
and a WebSocket relaying through the same loopwatch meanwhile never notices.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from websockets.asyncio.client import connect

from loopwatch.proxy.app.runtime import Running
from tests.conftest import (
    RawBackend,
    RawResponse,
    echo,
    loopwatch,
    raw_exchange,
    read_response,
    switching_protocols,
    upgrade_request,
    wait_for,
    websockets_backend,
)
from tests.hardening import rejected

RUN_ON_UVLOOP = True  # each test runs on asyncio's loop and on uvloop (tests/conftest.py)


@dataclass
class Setup:
    lw: Running
    recorder: RawBackend  # the upstream of every path but /echo
    echoed: list[int] = field(default_factory=list)


def answer(head: bytes) -> bytes:
    if b"sec-websocket-key" in head.lower():
        return switching_protocols(head)
    return b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"


@contextlib.asynccontextmanager
async def under_attack(**overrides: Any) -> AsyncIterator[Setup]:
    """loopwatch with two routes: /echo to a websockets echo backend, where a
    client relays a message every few milliseconds for the whole test, and / to a
    recording raw backend that must receive nothing. On exit, the echo client must
    have seen no error."""
    overrides.setdefault("limits.handshake_timeout", "1s")
    async with (
        websockets_backend(echo) as (echo_url, _),
        RawBackend(answer) as recorder,
    ):
        routes = [
            {"path_prefix": "/echo", "upstream": echo_url},
            {"path_prefix": "/", "upstream": recorder.url},
        ]
        async with loopwatch(None, routes=routes, **overrides) as lw:  # type: ignore[arg-type]
            setup = Setup(lw, recorder)
            stop = asyncio.Event()
            opened = asyncio.Event()

            async def relay_forever() -> None:
                url = f"ws://127.0.0.1:{lw.proxy_port}/echo"
                async with connect(url, proxy=None, open_timeout=10) as ws:
                    opened.set()
                    i = 0
                    while not stop.is_set():
                        message = f"message {i} " + "x" * (i % 300)
                        await ws.send(message)
                        assert await asyncio.wait_for(ws.recv(), 10) == message
                        setup.echoed.append(i)
                        i += 1
                        await asyncio.sleep(0.005)

            task = asyncio.create_task(relay_forever())
            try:
                await asyncio.wait_for(opened.wait(), 10)
                yield setup
                # The relay still works after whatever the test did.
                after = len(setup.echoed) + 3
                await wait_for(lambda: len(setup.echoed) >= after or task.done(), 10)
            finally:
                stop.set()
                await asyncio.wait_for(task, 15)  # re-raises the relay's error, if any


def one_line(response: RawResponse) -> None:
    assert response.body.endswith(b"\n") and response.body.count(b"\n") == 1, response.body
    assert response.header("Content-Length") == str(len(response.body))


BASE = b"Host: example.test\r\n"
UPGRADE = (
    b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)

BAD_REQUESTS = {
    "content-length-and-transfer-encoding": (
        b"POST /api HTTP/1.1\r\n" + BASE
        + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "transfer-encoding-and-content-length": (
        b"POST /api HTTP/1.1\r\n" + BASE
        + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        400,
    ),
    "duplicate-content-length": (
        b"POST /api HTTP/1.1\r\n" + BASE + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        400,
    ),
    "non-numeric-content-length": (
        b"POST /api HTTP/1.1\r\n" + BASE + b"Content-Length: five\r\n\r\nhello",
        400,
    ),
    "negative-content-length": (
        b"POST /api HTTP/1.1\r\n" + BASE + b"Content-Length: -5\r\n\r\nhello",
        400,
    ),
    "unknown-transfer-encoding": (
        b"POST /api HTTP/1.1\r\n" + BASE + b"Transfer-Encoding: gzip\r\n\r\nhello",
        400,
    ),
    "invalid-header-name": (b"GET /ws HTTP/1.1\r\n" + BASE + UPGRADE + b"Bad Name: x\r\n\r\n", 400),
    "space-before-colon": (b"GET /ws HTTP/1.1\r\n" + BASE + UPGRADE + b"X-A : x\r\n\r\n", 400),
    "cr-in-value": (b"GET /ws HTTP/1.1\r\n" + BASE + UPGRADE + b"X-A: a\rb\r\n\r\n", 400),
    "lf-in-value": (b"GET /ws HTTP/1.1\r\n" + BASE + UPGRADE + b"X-A: a\nX-B: b\r\n\r\n", 400),
    "nul-in-value": (b"GET /ws HTTP/1.1\r\n" + BASE + UPGRADE + b"X-A: a\x00b\r\n\r\n", 400),
    "obsolete-line-folding": (
        b"GET /ws HTTP/1.1\r\n" + BASE + UPGRADE + b"X-A: a\r\n  folded\r\n\r\n",
        400,
    ),
    "bare-lf-line-endings": (b"GET /ws HTTP/1.1\n" + BASE.replace(b"\r\n", b"\n") + b"\n", 400),
    "upgrade-missing-key": (
        b"GET /ws HTTP/1.1\r\n" + BASE
        + b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
        400,
    ),
    "upgrade-bad-key": (
        b"GET /ws HTTP/1.1\r\n" + BASE + b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: not-base64!\r\nSec-WebSocket-Version: 13\r\n\r\n",
        400,
    ),
    "upgrade-short-key": (
        b"GET /ws HTTP/1.1\r\n" + BASE + b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: c2hvcnQ=\r\nSec-WebSocket-Version: 13\r\n\r\n",
        400,
    ),
    # A WebSocket attempt (it carries a key) asking for another protocol. (An
    # offer of h2c without a key is declined and served: test_native_http.py.)
    "upgrade-not-websocket": (
        b"GET /ws HTTP/1.1\r\n" + BASE + UPGRADE.replace(b"Upgrade: websocket", b"Upgrade: h2c") + b"\r\n",
        400,
    ),
    "upgrade-with-post": (b"POST /ws HTTP/1.1\r\n" + BASE + UPGRADE + b"\r\n", 400),
    "upgrade-with-content-length": (
        b"GET /ws HTTP/1.1\r\n" + BASE + UPGRADE + b"Content-Length: 5\r\n\r\nhello",
        400,
    ),
    "upgrade-with-transfer-encoding": (
        b"GET /ws HTTP/1.1\r\n" + BASE + UPGRADE + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "upgrade-http-1.0": (b"GET /ws HTTP/1.0\r\n" + BASE + UPGRADE + b"\r\n", 400),
    "upgrade-missing-host": (b"GET /ws HTTP/1.1\r\n" + UPGRADE + b"\r\n", 400),
    "upgrade-duplicate-host": (b"GET /ws HTTP/1.1\r\n" + BASE + b"Host: other\r\n" + UPGRADE + b"\r\n", 400),
    "upgrade-host-with-space": (b"GET /ws HTTP/1.1\r\nHost: a b\r\n" + UPGRADE + b"\r\n", 400),
    "upgrade-host-with-comma": (b"GET /ws HTTP/1.1\r\nHost: a, b\r\n" + UPGRADE + b"\r\n", 400),
    "upgrade-host-with-path": (b"GET /ws HTTP/1.1\r\nHost: a/b\r\n" + UPGRADE + b"\r\n", 400),
    "http-1.1-missing-host": (b"GET /api HTTP/1.1\r\nAccept: */*\r\n\r\n", 400),
    "http-1.1-duplicate-host": (b"GET /api HTTP/1.1\r\n" + BASE + b"Host: other\r\n\r\n", 400),
    "http-0.9": (b"GET /api\r\n\r\n", 400),
    "http-2.0-over-http1": (b"GET /api HTTP/2.0\r\n" + BASE + b"\r\n", 505),
    "http-3.1-over-http1": (b"GET /api HTTP/3.1\r\n" + BASE + b"\r\n", 505),
    "asterisk-form": (b"OPTIONS * HTTP/1.1\r\n" + BASE + b"\r\n", 400),
    "connect": (b"CONNECT example.test:443 HTTP/1.1\r\n" + BASE + b"\r\n", 400),
    "garbage": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, 400),
    # Blank lines before the request line count towards limits.max_head_size: they
    # once made the limit measure the first CRLF CRLF (4 bytes) and let this through.
    "leading-blank-lines-then-30k-head": (
        b"\r\n\r\nGET /ws HTTP/1.1\r\n" + BASE + UPGRADE + b"X-Pad: " + b"p" * 30_000 + b"\r\n\r\n",
        431,
    ),
    # RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 request is faulty framing.
    "http-1.0-transfer-encoding": (
        b"POST /api HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    "http-1.0-transfer-encoding-upgrade": (
        b"GET /ws HTTP/1.0\r\n" + BASE + UPGRADE + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
async def test_bad_request_refused_before_upstream(name):
    request, status = BAD_REQUESTS[name]
    async with under_attack() as s:
        response, after = await raw_exchange(s.lw.proxy_port, request)
        assert response.status == status, response.body
        one_line(response)
        assert response.header("Connection") == "close"
        assert after == b""  # and then the connection is closed
        await asyncio.sleep(0.05)
        assert s.recorder.connections == 0
        await wait_for(lambda: s.lw.plane.connections() == 1)  # only the echo client is left


async def test_wrong_websocket_version_is_426_with_supported_version():
    request = (
        b"GET /ws HTTP/1.1\r\n" + BASE + b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n"
    )
    async with under_attack() as s:
        for req in (request, request.replace(b"Sec-WebSocket-Version: 8\r\n", b"")):
            response, after = await raw_exchange(s.lw.proxy_port, req)
            assert response.status == 426
            assert response.header("Sec-WebSocket-Version") == "13"
            one_line(response)
            assert after == b""
        assert s.recorder.connections == 0


def head_of_size(size: int) -> bytes:
    """An upgrade request head of exactly `size` bytes (its blank line included)."""
    start = b"GET /ws HTTP/1.1\r\n" + BASE + UPGRADE + b"X-Pad: "
    pad = size - len(start) - len(b"\r\n\r\n")
    return start + b"p" * pad + b"\r\n\r\n"


async def test_head_over_max_head_size_is_431():
    async with under_attack() as s:
        assert len(head_of_size(16 * 1024 + 1)) == 16 * 1024 + 1
        response, after = await raw_exchange(s.lw.proxy_port, head_of_size(16 * 1024 + 1))
        assert response.status == 431
        one_line(response)
        assert after == b""
        # Many small headers add up the same way.
        many = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 60) for i in range(400))
        response, _ = await raw_exchange(
            s.lw.proxy_port, b"GET /ws HTTP/1.1\r\n" + BASE + UPGRADE + many + b"\r\n"
        )
        assert response.status == 431
        # Sent in small pieces while the response comes back, it is cut as soon as
        # it passes the limit. (A plain socket: a failed send must not hide what
        # was received before it, as it would on an asyncio stream.)
        loop = asyncio.get_running_loop()
        with socket.create_connection(("127.0.0.1", s.lw.proxy_port)) as sock:
            sock.setblocking(False)
            await loop.sock_sendall(sock, b"GET /ws HTTP/1.1\r\n" + BASE + b"X-Long: ")

            async def keep_sending() -> None:
                with contextlib.suppress(OSError):
                    for _ in range(100):
                        await loop.sock_sendall(sock, b"z" * 1000)
                        await asyncio.sleep(0.002)

            task = asyncio.create_task(keep_sending())
            try:
                received = b""
                while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), 10):
                    received += chunk
            except ConnectionResetError:
                pass
            finally:
                task.cancel()
            assert received.startswith(b"HTTP/1.1 431 "), received
        assert s.recorder.connections == 0


async def test_request_line_over_max_head_size_is_414():
    # A URL longer than the limit: 414 URI Too Long, as nginx answers it, and
    # counted with the other heads over the limit.
    async with under_attack() as s:
        target = b"/ws?q=" + b"a" * (16 * 1024)
        response, after = await raw_exchange(
            s.lw.proxy_port, b"GET " + target + b" HTTP/1.1\r\n" + BASE + UPGRADE + b"\r\n"
        )
        assert response.status == 414
        assert response.body == b"request line too long\n"
        one_line(response)
        assert after == b""
        assert (await rejected(s.lw)).get("head_too_large") == 1
        assert s.recorder.connections == 0


async def test_head_at_max_head_size_is_accepted():
    async with under_attack() as s:
        reader, writer = await asyncio.open_connection("127.0.0.1", s.lw.proxy_port)
        try:
            # The head exactly at the limit, with a frame in the same write (not counted).
            frame = b"\x81\x85\x00\x00\x00\x00hello"
            writer.write(head_of_size(16 * 1024) + frame)
            response = await asyncio.wait_for(read_response(reader, head_only=True), 10)
            assert response.status == 101
            await wait_for(lambda: bytes(s.recorder.after[0]) == frame)
        finally:
            writer.close()
        assert s.recorder.connections == 1


async def test_configured_max_head_size():
    async with under_attack(**{"limits.max_head_size": "1KiB"}) as s:
        response, _ = await raw_exchange(s.lw.proxy_port, head_of_size(1025))
        assert response.status == 431
        reader, writer = await asyncio.open_connection("127.0.0.1", s.lw.proxy_port)
        try:
            writer.write(upgrade_request("/small"))
            response = await asyncio.wait_for(read_response(reader, head_only=True), 10)
            assert response.status == 101
        finally:
            writer.close()
        assert s.recorder.connections == 1


async def test_leading_blank_lines_count_towards_max_head_size():
    """RFC 9112 §2.2 lets a server skip empty lines before the request line (as
    llhttp, nginx and HAProxy do); loopwatch skips any number but counts them in
    limits.max_head_size, so they can neither stretch the limit nor make it
    measure the wrong blank line, however the bytes are cut into reads."""
    async with under_attack() as s:
        before = await rejected(s.lw)
        big = head_of_size(30 * 1024)
        refused = 0
        for lead in (b"\r\n\r\n", b"\r\n" * 3, b"\n\r\n\r\n", b"\r\r\n\n", b"\n\n"):
            response, after = await raw_exchange(s.lw.proxy_port, lead + big)
            assert response.status == 431, (lead, response.body)
            one_line(response)
            assert after == b""
            refused += 1
        # The blank lines in one read, the head in the next (and a CRLF CRLF
        # straddling the two).
        for first, second in ((b"\r\n\r\n", big), (b"\r\n\r", b"\n" + big), (b"\r\n", b"\r\n" + big)):
            reader, writer = await asyncio.open_connection("127.0.0.1", s.lw.proxy_port)
            try:
                writer.write(first)
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(second)
                response = await asyncio.wait_for(read_response(reader), 10)
                assert response.status == 431, (first, response.body)
                assert await asyncio.wait_for(reader.read(), 10) == b""
            finally:
                writer.close()
            refused += 1
        # Nothing but blank lines: refused once they pass the limit (431, not the
        # 408 of the head timeout).
        response, after = await raw_exchange(s.lw.proxy_port, b"\r\n" * (8 * 1024 + 1))
        assert response.status == 431
        assert after == b""
        refused += 1
        # The blank lines are part of the head's budget: with two of them, a head
        # two bytes under the limit is the largest accepted.
        response, _ = await raw_exchange(s.lw.proxy_port, b"\r\n" + head_of_size(16 * 1024 - 1))
        assert response.status == 431
        refused += 1
        assert s.recorder.connections == 0  # the upstream saw none of them
        reader, writer = await asyncio.open_connection("127.0.0.1", s.lw.proxy_port)
        try:
            writer.write(b"\r\n" + head_of_size(16 * 1024 - 2))
            response = await asyncio.wait_for(read_response(reader, head_only=True), 10)
            assert response.status == 101
            # The upstream gets the head without the blank line.
            assert s.recorder.heads[0].startswith(b"GET /ws HTTP/1.1\r\n")
        finally:
            writer.close()
        counted = await rejected(s.lw)
        assert counted["head_too_large"] - before["head_too_large"] == refused
        assert s.recorder.connections == 1


async def test_blank_lines_then_oversized_head_on_a_kept_alive_connection():
    """The next request on a keep-alive connection gets a fresh head budget, with
    its leading blank lines in it; a client that sends only a blank line after a
    response is still idle and closed quietly (RFC 9112 §9.8), not answered 408."""
    get = b"GET /api HTTP/1.1\r\n" + BASE + b"\r\n"
    # An upstream that closes after each answer: every GET is a connection of its own.
    async with (
        RawBackend(answer, close_after=True) as upstream,
        loopwatch(upstream.url, **{"limits.handshake_timeout": "1s", "limits.keepalive_timeout": "1s"}) as lw,
    ):
        before = await rejected(lw)
        reader, writer = await asyncio.open_connection("127.0.0.1", lw.proxy_port)
        try:
            writer.write(get)
            assert (await asyncio.wait_for(read_response(reader), 10)).status == 200
            writer.write(b"\r\n\r\n" + head_of_size(30 * 1024))
            response = await asyncio.wait_for(read_response(reader), 10)
            assert response.status == 431
            assert await asyncio.wait_for(reader.read(), 10) == b""
        finally:
            writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", lw.proxy_port)
        try:
            writer.write(get)
            assert (await asyncio.wait_for(read_response(reader), 10)).status == 200
            writer.write(b"\r\n")  # what old clients sent after a request body
            # keepalive_timeout is 1 s: then the connection closes without a word.
            assert await asyncio.wait_for(reader.read(), 10) == b""
        finally:
            writer.close()
        counted = await rejected(lw)
        assert counted["head_too_large"] - before["head_too_large"] == 1
        assert counted["head_timeout"] == before["head_timeout"]
        # Only the two GETs reached the upstream.
        assert upstream.connections == 2
        assert [head.split(b"\r\n")[0] for head in upstream.heads] == [b"GET /api HTTP/1.1"] * 2
        assert all(b"X-Pad" not in bytes(rest) for rest in upstream.after)


async def test_transfer_encoding_in_http_1_0_is_refused_and_counted():
    """RFC 9112 §6.1: a server that receives Transfer-Encoding in an HTTP/1.0
    request MUST treat its framing as faulty and close (hyper answers 400); it
    used to be read as chunked. HTTP/1.0 without it is still served."""
    async with under_attack() as s:
        before = await rejected(s.lw)
        for request in (
            b"POST /api HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            b"POST /api HTTP/1.0\r\n" + BASE + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            b"GET /api HTTP/1.0\r\nConnection: keep-alive\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        ):
            response, after = await raw_exchange(s.lw.proxy_port, request)
            assert response.status == 400, response.body
            assert response.body == b"Transfer-Encoding in an HTTP/1.0 request\n"
            one_line(response)
            assert response.header("Connection") == "close"
            assert after == b""
        assert s.recorder.connections == 0
        counted = await rejected(s.lw)
        assert counted["bad_request"] - before["bad_request"] == 3
        response, _ = await raw_exchange(
            s.lw.proxy_port, b"POST /api HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello"
        )
        assert response.status == 200
        assert s.recorder.heads[0].startswith(b"POST /api HTTP/1.1\r\n")
        await wait_for(lambda: bytes(s.recorder.after[0]).endswith(b"hello"))


async def test_slowloris_cut_at_handshake_timeout_with_408():
    async with under_attack(**{"limits.handshake_timeout": "1s"}) as s:
        reader, writer = await asyncio.open_connection("127.0.0.1", s.lw.proxy_port)
        request = upgrade_request("/slow")

        async def dribble() -> None:
            with contextlib.suppress(ConnectionError):
                for byte in request:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.1)

        started = time.monotonic()
        task = asyncio.create_task(dribble())
        try:
            response = await asyncio.wait_for(read_response(reader), 10)
            elapsed = time.monotonic() - started
            assert response.status == 408
            one_line(response)
            assert 0.8 <= elapsed < 5
            assert await asyncio.wait_for(reader.read(), 5) == b""
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            writer.close()
        assert s.recorder.connections == 0
        await wait_for(lambda: s.lw.plane.connections() == 1)


async def test_idle_connection_without_a_request_gets_408():
    async with under_attack(**{"limits.handshake_timeout": "0.5s"}) as s:
        response, after = await raw_exchange(s.lw.proxy_port, b"")
        assert response.status == 408
        assert after == b""
        assert s.recorder.connections == 0


async def test_max_connections_exceeded_is_503():
    limits = {
        "limits.max_connections": 3,
        "limits.handshake_timeout": "20s",
        # Every connection here is from 127.0.0.1: the total limit, not the address's.
        "limits.max_connections_per_address": "100%",
        "limits.max_heads_per_address": "100%",
    }
    async with under_attack(**limits) as s:
        # The echo client holds one; two idle connections take the rest.
        idle = [await asyncio.open_connection("127.0.0.1", s.lw.proxy_port) for _ in range(2)]
        try:
            await wait_for(lambda: s.lw.plane.connections() == 3)
            for _ in range(3):
                response, after = await raw_exchange(s.lw.proxy_port, upgrade_request("/more"))
                assert response.status == 503
                assert response.header("Retry-After") is not None
                one_line(response)
                assert after == b""
            assert s.recorder.connections == 0
            # A freed slot is usable again.
            idle.pop()[1].close()
            await wait_for(lambda: s.lw.plane.connections() == 2)
            reader, writer = await asyncio.open_connection("127.0.0.1", s.lw.proxy_port)
            try:
                writer.write(upgrade_request("/now"))
                response = await asyncio.wait_for(read_response(reader, head_only=True), 10)
                assert response.status == 101
            finally:
                writer.close()
            assert s.recorder.connections == 1
        finally:
            for _, w in idle:
                w.close()
        await wait_for(lambda: s.lw.plane.connections() == 1)
