"""Every phase of a plain HTTP exchange has a timeout, and an upgrade request
with a body is refused: each attack reproduced on a raw socket, answered as
docs/relay.md says, the backend's connection released, counted in
loopwatch_requests_rejected_total, while healthy clients keep working."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

from tests.conftest import RawBackend, read_response, switching_protocols, upgrade_request, wait_for
from tests.hardening import ATTACKER, MIB, Healthy, open_from, proxied, read_all, rejected

RUN_ON_UVLOOP = True  # each test runs on asyncio's loop and on uvloop (tests/conftest.py)

SLOW_BODY = b"POST /upload HTTP/1.1\r\nHost: example.test\r\nContent-Length: 100000\r\n\r\nabc"


async def test_silent_request_body_is_cut_at_body_timeout_with_408_and_releases_the_backend():
    async with proxied(**{"limits.body_timeout": "1s"}) as p, Healthy(p.port).running() as healthy:
        open_before = p.backend.open  # the healthy GET's pooled connection
        reader, writer = await open_from(p.port, ATTACKER)
        started = time.monotonic()
        writer.write(SLOW_BODY)  # 3 bytes of the 100 000 announced, then silence
        await wait_for(lambda: p.backend.open == open_before + 1)  # it went upstream, head and all
        response = await asyncio.wait_for(read_response(reader), 10)
        elapsed = time.monotonic() - started
        assert response.status == 408
        assert response.body == b"loopwatch: request body timeout\n"
        assert response.header("Connection") == "close"
        assert await read_all(reader) == b""
        writer.close()
        assert 0.9 <= elapsed < 5
        # The upstream request was cancelled: the backend saw its connection end
        # with the body unfinished, and loopwatch holds nothing of it any more.
        await wait_for(lambda: p.backend.open == open_before and p.backend.cut_short == 1)
        assert healthy.served_during(started, time.monotonic())[0] > 10
        await wait_for(lambda: p.lw.plane.connections() == 2)  # the two healthy connections
        assert (await rejected(p.lw))["body_timeout"] == 1


async def test_a_client_that_ends_its_side_mid_body_releases_the_backend_at_once():
    """It was held until body_timeout (30 s by default), then counted and
    logged as a slow body (408 to a client that had gone)."""
    async with proxied(**{"limits.body_timeout": "10s"}) as p:
        reader, writer = await open_from(p.port, ATTACKER)
        started = time.monotonic()
        writer.write(SLOW_BODY)  # 3 bytes of the 100 000 announced, then its end
        await wait_for(lambda: p.backend.open == 1)  # it went upstream, head and all
        writer.write_eof()
        assert await asyncio.wait_for(read_all(reader), 5) == b""  # closed, nothing answered
        writer.close()
        await wait_for(lambda: p.backend.open == 0 and p.backend.cut_short == 1)
        assert time.monotonic() - started < 5
        assert (await rejected(p.lw))["body_timeout"] == 0


async def test_a_body_that_keeps_coming_is_never_cut():
    """The timeout is on silence, as nginx's client_body_timeout: a slow upload that
    makes progress within each timeout is forwarded whole."""
    async with proxied(**{"limits.body_timeout": "1s"}) as p:
        reader, writer = await open_from(p.port, ATTACKER)
        writer.write(b"POST /upload HTTP/1.1\r\nHost: example.test\r\nContent-Length: 6\r\n\r\n")
        for byte in b"abcdef":  # 2.4 s in all, never 1 s without a byte
            await asyncio.sleep(0.4)
            writer.write(bytes([byte]))
        response = await asyncio.wait_for(read_response(reader), 10)
        writer.close()
        assert (response.status, response.body) == (200, b"6\n")
        assert p.backend.cut_short == 0
        assert (await rejected(p.lw))["body_timeout"] == 0


async def test_fifty_slow_bodies_no_longer_starve_healthy_clients_beyond_the_timeout():
    """The issue's attack: 50 slow bodies with max_connections 50 held every slot
    (and 50 backend connections) for as long as the attacker liked. Now every
    slot is free again one body_timeout later, and a new client gets in."""
    limits = {
        "limits.max_connections": 50,
        "limits.body_timeout": "1s",
        # One address here: what is measured is the timeout, not the per-address cap.
        "limits.max_connections_per_address": "100%",
        "limits.max_heads_per_address": "100%",
    }
    async with proxied(**limits) as p, Healthy(p.port, address=ATTACKER).running() as healthy:
        attackers = [await open_from(p.port, ATTACKER) for _ in range(48)]  # 48 + the 2 healthy ones
        started = time.monotonic()
        for _, writer in attackers:
            writer.write(SLOW_BODY)
        await wait_for(lambda: p.lw.plane.connections() == 50 and p.backend.cut_short == 0 and p.backend.open >= 48)
        # Every slot taken: a new client is turned away, for now.
        reader, writer = await open_from(p.port, ATTACKER)
        assert (await asyncio.wait_for(read_response(reader), 10)).status == 503
        writer.close()
        # A new client keeps trying every 50 ms; the slots come back at the timeout.
        while True:
            reader, writer = await open_from(p.port, ATTACKER)
            writer.write(b"GET /ok HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n")
            response = await asyncio.wait_for(read_response(reader), 10)
            writer.close()
            if response.status == 200:
                break
            assert response.status == 503
            assert time.monotonic() - started < 5, "still starved long after body_timeout"
            await asyncio.sleep(0.05)
        assert time.monotonic() - started >= 0.9
        for reader, writer in attackers:
            assert (await asyncio.wait_for(read_response(reader), 10)).status == 408
            writer.close()
        await wait_for(lambda: p.backend.cut_short == 48 and p.backend.open <= 2)
        # The connections already open kept working through it all.
        echoes, gets = healthy.served_during(started, time.monotonic())
        assert echoes > 10 and gets > 10
        counts = await rejected(p.lw)
        assert counts["body_timeout"] == 48 and counts["overload"] >= 1


async def test_upstream_that_never_answers_is_504_at_response_timeout():
    async with proxied(**{"limits.response_timeout": "1s"}) as p, Healthy(p.port).running():
        reader, writer = await open_from(p.port, ATTACKER)
        started = time.monotonic()
        writer.write(b"GET /no-head HTTP/1.1\r\nHost: example.test\r\n\r\n")
        response = await asyncio.wait_for(read_response(reader), 10)
        elapsed = time.monotonic() - started
        writer.close()
        assert (response.status, response.body) == (504, b"loopwatch: upstream timeout\n")
        assert 0.9 <= elapsed < 5
        await wait_for(lambda: p.backend.cut_short == 1)
        assert (await rejected(p.lw))["upstream_timeout"] == 1


async def test_response_body_that_stalls_is_cut_at_response_idle_timeout():
    """The head went out: no status is left to send, so the client connection is
    cut before the announced length (the client sees a short body) and counted."""
    async with proxied(**{"limits.response_idle_timeout": "1s"}) as p, Healthy(p.port).running():
        reader, writer = await open_from(p.port, ATTACKER)
        started = time.monotonic()
        writer.write(b"GET /stall-body HTTP/1.1\r\nHost: example.test\r\n\r\n")
        received = await read_all(reader)
        elapsed = time.monotonic() - started
        writer.close()
        assert received.startswith(b"HTTP/1.1 200 OK\r\n")
        assert received.endswith(b"\r\n\r\n" + b"s" * 10)  # 10 of the 1000 bytes, then the cut
        assert 0.9 <= elapsed < 5
        await wait_for(lambda: p.backend.cut_short == 1)
        assert (await rejected(p.lw))["response_timeout"] == 1


async def test_client_that_stops_reading_the_response_is_cut_at_response_idle_timeout():
    """A client that never reads pins the upstream's response (and its connection)
    once the buffers are full: the same idle timeout ends both."""
    async with proxied(**{"limits.response_idle_timeout": "1s"}) as p, Healthy(p.port).running():
        sock = socket.create_connection(("127.0.0.1", p.port), source_address=(ATTACKER, 0))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.sendall(b"GET /endless HTTP/1.1\r\nHost: example.test\r\n\r\n")
            await wait_for(lambda: "/endless" in p.backend.paths)
            await wait_for(lambda: p.backend.cut_short == 1, timeout=10)  # and never a byte read
        finally:
            sock.close()
        await wait_for(lambda: p.lw.plane.connections() == 2)
        assert (await rejected(p.lw))["response_timeout"] == 1


async def test_upstream_that_takes_no_body_is_blamed_with_504_not_the_client():
    """A client whose body loopwatch stopped reading (the upstream takes none of
    it) is silent through no fault of its own: the answer is 504, not 408."""
    async with proxied(**{"limits.body_timeout": "1s"}) as p:
        size = 64 * MIB
        reader, writer = await open_from(p.port, ATTACKER)
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
        counts = await rejected(p.lw)
        assert (counts["upstream_timeout"], counts["body_timeout"]) == (1, 0)


# --- upgrade requests with a body ---------------------------------------------------


def recording_backend() -> RawBackend:
    """Answers upgrades with a 101 and records every byte after the head."""
    return RawBackend(lambda head: switching_protocols(head) if b"websocket" in head.lower() else None)


async def test_upgrade_with_a_body_is_400_and_reaches_nothing():
    bodies = {
        b"Content-Length: 5\r\n": b"hello",
        b"Transfer-Encoding: chunked\r\n": b"5\r\nhello\r\n0\r\n\r\n",
        b"Content-Length: 00012\r\n": b"hello world!",
    }
    frame = b"\x81\x80\x00\x00\x00\x00"  # an empty text frame, masked
    async with recording_backend() as backend, proxied({"/ws": backend.url}) as p:
        async with Healthy(p.port).running():
            for header, body in bodies.items():
                reader, writer = await open_from(p.port, ATTACKER)
                writer.write(upgrade_request("/ws", extra=header) + body)
                response = await asyncio.wait_for(read_response(reader), 10)
                assert (response.status, response.body) == (400, b"upgrade request with a body\n")
                assert await read_all(reader) == b""
                writer.close()
        assert backend.connections == 0
        assert (await rejected(p.lw))["upgrade_with_body"] == len(bodies)
        # Content-Length: 0 announces no body: the upgrade goes through.
        reader, writer = await open_from(p.port, ATTACKER)
        writer.write(upgrade_request("/ws", extra=b"Content-Length: 0\r\n") + frame)
        response = await asyncio.wait_for(read_response(reader, head_only=True), 10)
        assert response.status == 101
        await wait_for(lambda: backend.connections == 1 and bytes(backend.after[0]) == frame)
        writer.close()
