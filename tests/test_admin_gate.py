"""The admin port's connections are bounded (proxy/admin/gate.py): a silent or
trickling client, one that never reads its answer, and more connections than
the cap. Before, each held its socket for ever, and 400 of them used up the
file descriptors the data plane shares: WebSocket clients got 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import socket
import struct
import time

import aiohttp
import pytest

from loopwatch.proxy.admin import gate
from tests.test_admin_guard import admin_port, call, rejected


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
    sock.setblocking(False)
    return sock


async def closed_by_peer(sock: socket.socket, within: float) -> float:
    """Seconds until the admin port closes `sock` (reads and drops what comes)."""
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    try:
        while await asyncio.wait_for(loop.sock_recv(sock, 65536), within):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - start


async def test_a_silent_or_trickling_client_is_closed_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gate, "FIRST_REQUEST_TIMEOUT", 0.5)
    async with admin_port() as lw:
        silent = connect(lw.admin_port)
        trickling = connect(lw.admin_port)
        loop = asyncio.get_running_loop()

        async def trickle() -> None:
            for byte in b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n":
                await loop.sock_sendall(trickling, bytes([byte]))
                await asyncio.sleep(0.05)

        task = asyncio.create_task(trickle())
        try:
            assert await closed_by_peer(silent, 5) < 2
            assert await closed_by_peer(trickling, 5) < 2
        finally:
            task.cancel()
            silent.close()
            trickling.close()
        assert await rejected(lw, "timeout") == 2
        # A client that asks in time is answered, and kept alive.
        status, _ = await call(lw, "GET", "/healthz")
        assert status == 200


async def test_a_client_that_never_reads_its_answer_is_let_go(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gate, "ANSWER_TIMEOUT", 0.5)
    async with admin_port() as lw:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", lw.admin_port))
        sock.setblocking(False)
        # Many /metrics answers, pipelined and never read: far more than the
        # socket buffers hold, so the writing waits for the client.
        request = f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{lw.admin_port}\r\n\r\n".encode()
        await asyncio.get_running_loop().sock_sendall(sock, request * 200)
        await asyncio.sleep(2)
        deadline = time.monotonic() + 15
        with pytest.raises((ConnectionResetError, BrokenPipeError)):  # aborted by the admin port
            while time.monotonic() < deadline:
                try:
                    if not sock.recv(65536):
                        raise ConnectionResetError  # closed: as good
                except BlockingIOError:  # read all it had written; the abort still to come
                    await asyncio.sleep(0.05)
        sock.close()
        assert await rejected(lw, "timeout") >= 1


async def test_connections_past_the_cap_are_closed_at_accept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gate, "MAX_REQUEST_CONNECTIONS", 5)
    async with admin_port(**{"admin.event_streams.max_streams": 1}) as lw:
        # The cap: 1 stream + 5; from two addresses, each within its half.
        held = [connect(lw.admin_port, source) for source in ("127.0.0.1", "127.0.0.2") for _ in range(3)]
        try:
            extra = connect(lw.admin_port, "127.0.0.3")
            assert await closed_by_peer(extra, 5) < 1
            extra.close()
        finally:
            for sock in held:
                sock.close()
        await asyncio.sleep(0.2)
        assert await rejected(lw, "connections") == 1
        # A refused answer closes its connection: it keeps no slot.
        status, _ = await call(lw, "GET", "/api/nothing-here")
        assert status == 404


async def test_malformed_requests_are_counted_not_logged_as_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    """aiohttp wrote an error line with a traceback for each request it could not
    parse: 50 bad requests, 50 error lines, from anyone who reached the port."""
    caplog.set_level(logging.INFO)
    async with admin_port() as lw:
        loop = asyncio.get_running_loop()
        for _ in range(20):
            sock = connect(lw.admin_port)
            await loop.sock_sendall(sock, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Bad: a\x01b\r\n\r\n")
            assert (await asyncio.wait_for(loop.sock_recv(sock, 1024), 5)).startswith(b"HTTP/1.0 400")
            sock.close()
        assert await rejected(lw, "bad_request") == 20
        # And a bad limit is answered in JSON, whatever it holds.
        status, body = await call(lw, "GET", '/api/clients?limit=x","injected":"yes')
        assert status == 400 and isinstance(body, dict) and set(body) == {"error"}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len([r for r in caplog.records if r.getMessage() == "admin_request_rejected"]) == 1


async def test_a_client_that_leaves_before_its_answer_is_no_error(caplog: pytest.LogCaptureFixture) -> None:
    """A client that sent its request and reset the connection before the answer
    (a health checker giving up, a scraper's timeout): aiohttp logged an error
    line with a traceback for each, 80 of 100 such requests here."""
    caplog.set_level(logging.INFO)
    async with admin_port() as lw:
        for path in ("/metrics", "/healthz", "/readyz", "/", "/api/status") * 10:
            sock = socket.create_connection(("127.0.0.1", lw.admin_port))
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{lw.admin_port}\r\n\r\n".encode())
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # a reset, before the answer could be written
            await asyncio.sleep(0.002)
        await asyncio.sleep(0.5)
        status, _ = await call(lw, "GET", "/healthz")
        assert status == 200
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def exchange(port: int, request: bytes, source: str = "127.0.0.1") -> bytes:
    """One raw request (from `source`); what came back until the port closed or 2 s passed."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.bind((source, 0))
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, request)
    got = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), 2):
            got += chunk
    sock.close()
    return got


async def test_compressed_bodies_are_not_decoded(caplog: pytest.LogCaptureFixture) -> None:
    """aiohttp decoded a body's Content-Encoding before any check, on the loop
    detection shares: a gzip bomb held /healthz for a second, with its Host
    refused, and a body that did not decode logged an error traceback (500
    requests, 500 tracebacks, 795 KB of log from one client without a token)."""
    caplog.set_level(logging.INFO)
    async with admin_port() as lw:
        bomb = gzip.compress(b"\0" * (64 * 1024 * 1024))
        for host, path, body in [
            ("evil.example", "/api/reload", b"notgzip"),  # refused 421 by its Host
            ("127.0.0.1", "/healthz", b"notgzip"),
            ("127.0.0.1", "/healthz", bomb),
        ] * 5:
            head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Encoding: gzip\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")  # fmt: skip
            await exchange(lw.admin_port, head.encode() + body)
        # An endpoint that reads a body says it takes none compressed.
        async with aiohttp.ClientSession() as s, s.post(
            f"http://127.0.0.1:{lw.admin_port}/api/clients/someone/cooldown",
            data=gzip.compress(b'{"duration": "1s"}'), headers={"Content-Encoding": "gzip"},
        ) as r:  # fmt: skip
            assert r.status == 415 and "uncompressed" in (await r.json())["error"]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_one_address_holds_at_most_half_the_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer reopening idle sockets took every slot: 43 of 49 health probes
    failed. Another address keeps the other half."""
    monkeypatch.setattr(gate, "MAX_REQUEST_CONNECTIONS", 7)
    async with admin_port(**{"admin.event_streams.max_streams": 1}) as lw:  # cap 8, a share of 4
        held = [connect(lw.admin_port) for _ in range(4)]
        try:
            extra = connect(lw.admin_port)
            assert await closed_by_peer(extra, 5) < 1
            extra.close()
            answer = await exchange(lw.admin_port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "127.0.0.2")
            assert answer.startswith(b"HTTP/1.1 200 ")
        finally:
            for sock in held:
                sock.close()
        await asyncio.sleep(0.2)
        assert await rejected(lw, "address_limit") == 1
        assert await rejected(lw, "connections") == 0
        # Their slots came back.
        status, _ = await call(lw, "GET", "/healthz")
        assert status == 200


async def test_answers_say_no_store_nosniff_and_no_versions() -> None:
    async with admin_port() as lw:
        for path in ("/healthz", "/api/clients", "/api/nothing", "/metrics"):
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{lw.admin_port}{path}") as r:
                assert r.headers["Cache-Control"] == "no-store", path
                assert r.headers["X-Content-Type-Options"] == "nosniff", path
                assert r.headers["Server"] == "loopwatch", path
        # The stream takes no HEAD: its answer was the stream's body, holding a slot.
        status, _ = await call(lw, "HEAD", "/api/events")
        assert status == 405


async def test_bad_parameters_and_bodies_are_400s_that_close() -> None:
    async with admin_port() as lw:
        # A 400 raised as JSON kept its connection, against the gate's rule.
        answer = await exchange(lw.admin_port, b"GET /api/clients?limit=x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in head
        assert json.loads(body) == {"error": "limit: expected an integer, got 'x'"}
        # Digits of another script were taken as numbers.
        status, _ = await call(lw, "GET", "/api/clients?limit=%D9%A1")
        assert status == 400
        # A charset Python does not know was a 500 with a traceback.
        async with aiohttp.ClientSession() as s, s.post(
            f"http://127.0.0.1:{lw.admin_port}/api/clients/someone/cooldown",
            data=b'{"duration": "1s"}', headers={"Content-Type": "application/json; charset=bogus"},
        ) as r:  # fmt: skip
            assert r.status == 400
        status, _ = await call(lw, "POST", "/api/clients/someone/cooldown?duration=%D9%A1s")
        assert status == 400
