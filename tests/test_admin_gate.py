"""The admin port's connections are bounded (proxy/admin/gate.py): a silent or
trickling client, one that never reads its answer, and more connections than
the cap. Before, each held its socket for ever, and 400 of them used up the
file descriptors the data plane shares: WebSocket clients got 503.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time

import pytest

from loopwatch.proxy.admin import gate
from tests.test_admin_guard import admin_port, call, rejected


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
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
        held = [connect(lw.admin_port) for _ in range(6)]  # the cap: 1 stream + 5
        try:
            extra = connect(lw.admin_port)
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
