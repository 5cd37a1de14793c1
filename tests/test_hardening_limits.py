"""What one address may hold, and every early refusal counted.

- One address cannot take every slot of limits.max_connections, nor fill it
  with half-open heads, while other addresses still connect; a trusted proxy's
  address is not capped; per-address state empties as connections close.
- Each answer loopwatch writes itself before the engine sees a request raises
  its own reason of loopwatch_requests_rejected_total (and no other), and is
  logged at most once per reason per interval, with the number left unlogged.
- policy.max_concurrent is on by default, far above a user with many tabs.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest

from loopwatch.detectors.engine import Engine
from loopwatch.detectors.events import Attempt, Opened
from loopwatch.detectors.settings import BreakerSettings, DetectionSettings, PolicySettings
from loopwatch.proxy.dataplane import _dataplane
from loopwatch.proxy.dataplane.boundary import REJECTED_REASONS, REJECTION_LOG_INTERVAL, LogLimiter
from loopwatch.proxy.dataplane.native import RequestRejected
from tests.conftest import (
    RawBackend,
    free_port,
    raw_exchange,
    read_response,
    self_signed_cert,
    switching_protocols,
    upgrade_request,
    wait_for,
)
from tests.hardening import (
    ATTACKER,
    OTHER,
    Healthy,
    Proxied,
    no_descriptor_left,
    open_from,
    proxied,
    read_all,
    rejected,
)
from tests.test_native_relay import native

RUN_ON_UVLOOP = True  # each test runs on asyncio's loop and on uvloop (tests/conftest.py)

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def status_of(port: int, address: str, request: bytes) -> tuple[int, Conn]:
    """Send `request` from `address`; the response's status and the connection."""
    reader, writer = await open_from(port, address)
    writer.write(request)
    response = await asyncio.wait_for(read_response(reader, head_only=True), 10)
    return response.status, (reader, writer)


async def refused_at_once(port: int, address: str) -> bool:
    """Connect and send nothing: True if loopwatch answered 503 on its own."""
    reader, writer = await open_from(port, address)
    try:
        response = await asyncio.wait_for(read_response(reader), 0.5)
    except TimeoutError:
        return False  # taken: it waits for a request head
    finally:
        writer.close()
    assert response.status == 503
    assert response.header("Retry-After") == "1"
    assert response.header("Connection") == "close"
    assert response.body == b"loopwatch: too many connections from your address\n"
    return True


# --- per-address caps ------------------------------------------------------------------


PLAIN_GET = b"GET /ok HTTP/1.1\r\nHost: example.test\r\n\r\n"


def close_all(conns: list[Conn]) -> None:
    for _, writer in conns:
        writer.close()


async def test_one_address_cannot_exhaust_max_connections_while_others_still_connect():
    # 40 slots: 20 for one address (50 %), 16 of them half-open heads (10 % is 4,
    # below the floor of 16).
    async with proxied(**{"limits.max_connections": 40}) as p, Healthy(p.port).running() as healthy:
        held: list[Conn] = []
        try:
            # WebSockets from one address (each a half-open head only until its
            # request is in), then a slowloris: 16 connections that never send a byte.
            for i in range(4):
                status, conn = await status_of(p.port, ATTACKER, upgrade_request(f"/echo/{i}"))
                assert status == 101
                held.append(conn)
            for _ in range(16):
                held.append(await open_from(p.port, ATTACKER))
            await wait_for(lambda: p.lw.plane.connections() == 2 + 20)
            # Its 20 are all it gets: anything more is refused at once, with 503.
            refused = [await refused_at_once(p.port, ATTACKER) for _ in range(5)]
            assert refused == [True] * 5
            assert p.lw.plane.connections() == 2 + 20  # 18 slots still free for everyone else
            # Another address is not touched by the first one's cap: 15 more connections.
            for i in range(15):
                status, conn = await status_of(p.port, OTHER, upgrade_request(f"/echo/other{i}"))
                assert status == 101
                held.append(conn)
            assert healthy.errors == []
            assert (await rejected(p.lw))["address_limit"] == 5
        finally:
            close_all(held)
        # Its connections gone, the address has its whole allowance back (its
        # count went to zero): 16 half-open heads again, and the 17th refused.
        await wait_for(lambda: p.lw.plane.connections() == 2)
        again = [await open_from(p.port, ATTACKER) for _ in range(16)]
        try:
            await wait_for(lambda: p.lw.plane.connections() == 2 + 16)
            assert await refused_at_once(p.port, ATTACKER)
            assert (await rejected(p.lw))["address_limit"] == 6
        finally:
            close_all(again)


async def test_heads_cap_holds_a_slowloris_while_its_completed_requests_still_count():
    limits = {"limits.max_heads_per_address": 3, "limits.max_connections_per_address": 5}
    async with proxied(**limits) as p, Healthy(p.port).running():
        idle = [await open_from(p.port, ATTACKER) for _ in range(3)]
        try:
            await wait_for(lambda: p.lw.plane.connections() == 2 + 3)
            assert await refused_at_once(p.port, ATTACKER)  # a 4th half-open head
            # A completed head frees its place among the heads at once: its
            # request answered (the connection kept alive), a new connection's
            # head is taken and answered too.
            reader, writer = idle[-1]
            writer.write(PLAIN_GET)
            assert (await asyncio.wait_for(read_response(reader), 10)).status == 200
            status, conn = await status_of(p.port, ATTACKER, PLAIN_GET)
            assert status == 200
            idle.append(conn)
            # Connections in any state count towards the other cap: 2 heads + 2
            # kept-alive connections + a WebSocket = 5, and a 6th is refused
            # though only 2 of its 3 heads are taken.
            status, conn = await status_of(p.port, ATTACKER, upgrade_request("/echo"))
            assert status == 101
            idle.append(conn)
            assert await refused_at_once(p.port, ATTACKER)
            assert (await rejected(p.lw))["address_limit"] == 2
        finally:
            close_all(idle)
        # All gone: the address has its three heads back, and a 4th is refused.
        await wait_for(lambda: p.lw.plane.connections() == 2)
        again = [await open_from(p.port, ATTACKER) for _ in range(3)]
        try:
            await wait_for(lambda: p.lw.plane.connections() == 2 + 3)
            assert await refused_at_once(p.port, ATTACKER)
        finally:
            close_all(again)


async def test_a_trusted_proxy_address_is_never_capped():
    limits = {
        "limits.max_heads_per_address": 2,
        "identity.trusted_proxies": [f"{ATTACKER}/32"],
    }
    async with proxied(**limits) as p:
        trusted = [await open_from(p.port, ATTACKER) for _ in range(6)]
        other = [await open_from(p.port, OTHER) for _ in range(2)]
        try:
            await wait_for(lambda: p.lw.plane.connections() == 8)
            assert await refused_at_once(p.port, OTHER)
            # Each of the proxy's six half-open heads was taken: each is answered.
            for reader, writer in trusted:
                writer.write(PLAIN_GET)
                assert (await asyncio.wait_for(read_response(reader), 10)).status == 200
            assert (await rejected(p.lw))["address_limit"] == 1
        finally:
            close_all(trusted + other)
        await wait_for(lambda: p.lw.plane.connections() == 0)
        # The proxy's address was never counted, and OTHER's count is back to 0:
        # 2 heads from OTHER again (and a third refused), 6 more from the proxy.
        again = [await open_from(p.port, OTHER) for _ in range(2)]
        again += [await open_from(p.port, ATTACKER) for _ in range(6)]
        try:
            await wait_for(lambda: p.lw.plane.connections() == 8)
            assert await refused_at_once(p.port, OTHER)
            assert (await rejected(p.lw))["address_limit"] == 2
        finally:
            close_all(again)


async def test_behind_a_trusted_proxy_the_client_it_names_has_its_address_share():
    """The proxy is exempt at accept (it carries many clients), and the client
    its X-Forwarded-For names is capped as a direct one: one client behind a
    load balancer took every slot of limits.max_connections (the probe: 16 of
    16, then 503 `overload` for everybody else)."""
    limits = {
        "limits.max_connections_per_address": 2,
        "identity.trusted_proxies": [f"{ATTACKER}/32"],
    }

    def through_proxy(client: str) -> bytes:
        return upgrade_request("/echo", extra=f"X-Forwarded-For: {client}\r\n".encode())

    async with proxied(**limits) as p:
        held = []
        try:
            for _ in range(2):
                status, conn = await status_of(p.port, ATTACKER, through_proxy("198.51.100.5"))
                assert status == 101
                held.append(conn)
            reader, writer = await open_from(p.port, ATTACKER)
            writer.write(through_proxy("198.51.100.5"))
            response = await asyncio.wait_for(read_response(reader), 10)
            writer.close()
            assert response.status == 503
            assert response.body == b"loopwatch: too many connections from your address\n"
            assert (await rejected(p.lw))["address_limit"] == 1
            # Another client behind the same proxy, and the proxy's own
            # connections beyond the cap, are not held back by it.
            for client in ("198.51.100.6", "198.51.100.6"):
                status, conn = await status_of(p.port, ATTACKER, through_proxy(client))
                assert status == 101
                held.append(conn)
        finally:
            close_all(held)
        # Its upgrades gone, the client has its share back.
        await wait_for(lambda: p.lw.plane.connections() == 0)
        status, conn = await status_of(p.port, ATTACKER, through_proxy("198.51.100.5"))
        assert status == 101
        close_all([conn])


async def test_behind_a_trusted_proxy_a_plain_request_counts_for_the_client_it_names():
    """A plain request a trusted proxy carries counts against the share of the
    client its X-Forwarded-For names while it runs (nginx: realip and
    limit_conn): one client's slow requests behind a load balancer otherwise
    held as many of the proxy's connections, and of limits.max_connections,
    as it liked."""
    limits = {
        "limits.max_connections_per_address": 2,
        "identity.trusted_proxies": [f"{ATTACKER}/32"],
    }

    def get(path: str, client: str) -> bytes:
        return f"GET {path} HTTP/1.1\r\nHost: example.test\r\nX-Forwarded-For: {client}\r\n\r\n".encode()

    async with proxied(**limits) as p:
        slow = []
        try:
            for _ in range(2):  # two requests the backend never answers
                reader, writer = await open_from(p.port, ATTACKER)
                writer.write(get("/no-head", "198.51.100.5"))
                slow.append((reader, writer))
            await wait_for(lambda: p.backend.paths.count("/no-head") == 2)
            status, conn = await status_of(p.port, ATTACKER, get("/ok", "198.51.100.5"))
            close_all([conn])
            assert status == 503
            assert (await rejected(p.lw))["address_limit"] == 1
            # Another client behind the proxy is not held back by it.
            status, conn = await status_of(p.port, ATTACKER, get("/ok", "198.51.100.6"))
            close_all([conn])
            assert status == 200
            # The share is the client's requests running, not the proxy's
            # connections: one slow request, and one kept-alive connection
            # whose requests follow each other, each in its turn.
            close_all(slow[1:])
            await wait_for(lambda: p.backend.cut_short == 1)
            reader, writer = await open_from(p.port, ATTACKER)
            try:
                for _ in range(3):
                    writer.write(get("/ok", "198.51.100.5"))
                    response = await asyncio.wait_for(read_response(reader), 10)
                    assert (response.status, response.body) == (200, b"ok\n")
            finally:
                writer.close()
            assert (await rejected(p.lw))["address_limit"] == 1
        finally:
            close_all(slow)


def test_address_caps_follow_max_connections():
    from loopwatch.proxy.app.settings import load_settings

    def caps(**overrides: Any) -> tuple[int | None, int | None]:
        limits = load_settings(None, env={}, overrides=overrides).limits
        return (
            limits.address_cap(limits.max_connections_per_address),
            limits.address_cap(limits.max_heads_per_address),
        )

    assert caps() == (5000, 1000)
    assert caps(**{"limits.max_connections": 40_000}) == (20_000, 4000)
    assert caps(**{"limits.max_connections": 50}) == (
        25,
        16,
    )  # the floor: a page opens a few at once
    assert caps(**{"limits.max_connections": 3}) == (3, 3)
    assert caps(
        **{"limits.max_heads_per_address": 7, "limits.max_connections_per_address": "12.5%"}
    ) == (1250, 7)


# --- every early refusal counted -------------------------------------------------------


async def send(p: Proxied, request: bytes, status: int | None) -> None:
    """One request from the attacker's address; its status (None: a cut connection)."""
    reader, writer = await open_from(p.port, ATTACKER)
    writer.write(request)
    if status is None:
        received = await read_all(reader)
        assert received.startswith(b"HTTP/1.1 200 "), received
    else:
        response = await asyncio.wait_for(read_response(reader), 10)
        assert response.status == status, response.body
        # Its status line as every HTTP tool expects it (not "403 Unknown").
        assert response.status_line == f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode(), response.status_line
    writer.close()


async def overload(p: Proxied) -> None:
    held = [await open_from(p.port, ATTACKER) for _ in range(2)]
    await wait_for(lambda: p.lw.plane.connections() == 2)
    await send(p, b"", 503)
    for _, writer in held:
        writer.close()


async def address_limit(p: Proxied) -> None:
    _, writer = await open_from(p.port, ATTACKER)
    await wait_for(lambda: p.lw.plane.connections() == 1)
    assert await refused_at_once(p.port, ATTACKER)
    writer.close()


async def shutting_down(p: Proxied) -> None:
    reader, writer = await open_from(p.port, ATTACKER)
    writer.write(b"GET /ok HTTP/1.1\r\nHost: ")  # half a head when the drain starts
    await wait_for(lambda: p.lw.plane.connections() == 1)
    await p.lw.plane.shutdown()
    assert (await asyncio.wait_for(read_response(reader), 10)).status == 503
    writer.close()


async def fd_limit(p: Proxied, address: str = ATTACKER) -> None:
    # The client's socket is made first; then the process has no descriptor
    # left, so the listener's accept fails (EMFILE): it gives up its reserve
    # descriptor to accept the connection and answer it.
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.bind((address, 0))
    with no_descriptor_left():
        await loop.sock_connect(sock, ("127.0.0.1", p.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        response = await asyncio.wait_for(read_response(reader), 10)
    assert response.status == 503 and response.header("Retry-After") == "1", response
    assert response.body == b"loopwatch: out of file descriptors\n"
    writer.close()
    await writer.wait_closed()  # its descriptor is free before the next test's count


async def cut_handshake(p: Proxied, record: bytes) -> None:
    """A TLS record from the attacker's address, then nothing: the listener cuts
    the connection without an answer."""
    reader, writer = await open_from(p.port, ATTACKER)
    writer.write(record)
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()


CLIENT_HELLO_START = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"  # 512 bytes announced, 6 sent
NOT_A_CLIENT_HELLO = b"\x16\x03\x01\x00\x05hello"  # a handshake record that is no handshake message
TLS_REASONS = ("tls_error", "tls_timeout", "not_tls")  # these run with tls: (a self-signed certificate)

H = b"Host: example.test\r\n"
TRIGGERS: dict[str, tuple[dict[str, Any], Callable[[Proxied], Awaitable[None]]]] = {
    "bad_request": ({}, lambda p: send(p, b"GET /ok HTTP/1.1\r\nBad Name: x\r\n" + H + b"\r\n", 400)),
    "head_too_large": (
        {"limits.max_head_size": "1KiB"},
        lambda p: send(p, b"GET /ok HTTP/1.1\r\n" + H + b"X-Pad: " + b"p" * 1100 + b"\r\n\r\n", 431),
    ),
    "head_timeout": ({"limits.handshake_timeout": "0.5s"}, lambda p: send(p, b"GET /ok HTTP/1.1\r\n", 408)),
    "body_timeout": (
        {"limits.body_timeout": "0.5s"},
        lambda p: send(p, b"POST /upload HTTP/1.1\r\n" + H + b"Content-Length: 10\r\n\r\nabc", 408),
    ),
    "upstream_timeout": (
        {"limits.response_timeout": "0.5s"},
        lambda p: send(p, b"GET /no-head HTTP/1.1\r\n" + H + b"\r\n", 504),
    ),
    "response_timeout": (
        {"limits.response_idle_timeout": "0.5s"},
        lambda p: send(p, b"GET /stall-body HTTP/1.1\r\n" + H + b"\r\n", None),
    ),
    "version": ({}, lambda p: send(p, b"GET /ok HTTP/2.0\r\n" + H + b"\r\n", 505)),
    "upgrade_required": (
        {}, lambda p: send(p, upgrade_request("/echo").replace(b"Version: 13", b"Version: 8"), 426)
    ),
    "upgrade_with_body": (
        {}, lambda p: send(p, upgrade_request("/echo", extra=b"Content-Length: 2\r\n") + b"hi", 400)
    ),
    "not_implemented": (
        {}, lambda p: send(p, b"POST /upload HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n", 501)
    ),
    "no_route": ({"plain_prefix": "/api"}, lambda p: send(p, b"GET /nowhere HTTP/1.1\r\n" + H + b"\r\n", 404)),
    "overload": (
        {"limits.max_connections": 2, "limits.max_connections_per_address": "100%",
         "limits.max_heads_per_address": "100%"},
        overload,
    ),
    "address_limit": ({"limits.max_heads_per_address": 1}, address_limit),
    "shutting_down": ({}, shutting_down),
    "fd_limit": ({}, fd_limit),
    "tls_error": ({}, lambda p: cut_handshake(p, NOT_A_CLIENT_HELLO)),
    "tls_timeout": ({"limits.handshake_timeout": "0.5s"}, lambda p: cut_handshake(p, CLIENT_HELLO_START)),
    "not_tls": ({}, lambda p: send(p, b"GET /ok HTTP/1.1\r\n" + H + b"\r\n", 400)),
    "deny": ({"policy.deny": [f"{ATTACKER}/32"]}, lambda p: send(p, b"GET /ok HTTP/1.1\r\n" + H + b"\r\n", 403)),
    "upstream_error": (
        {"extra_routes": {"/down": f"http://127.0.0.1:{free_port()}"}},
        lambda p: send(p, b"GET /down HTTP/1.1\r\n" + H + b"\r\n", 502),
    ),
    "upstream_cut": ({}, lambda p: send(p, b"GET /cut-body HTTP/1.1\r\n" + H + b"\r\n", None)),
}  # fmt: skip


def test_every_reason_has_a_trigger():
    assert set(TRIGGERS) == set(REJECTED_REASONS)


@pytest.mark.parametrize("reason", REJECTED_REASONS)
async def test_each_early_refusal_raises_its_own_counter(reason: str, tmp_path: Path):
    overrides, trigger = TRIGGERS[reason]
    if reason in TLS_REASONS:
        cert, key = self_signed_cert(tmp_path, ["127.0.0.1"])
        overrides = {**overrides, "tls.cert_file": cert, "tls.key_file": key}
    async with proxied(**overrides) as p:
        before = await rejected(p.lw)
        assert set(before) == set(REJECTED_REASONS) and set(before.values()) == {0}  # pre-created
        await trigger(p)
        after = await rejected(p.lw)
    assert after == {**before, reason: 1}


async def test_out_of_descriptors_every_connection_is_answered_then_served_again():
    # The reserve is taken back after each answer: three times out of
    # descriptors, three 503s; with descriptors again, the next is relayed.
    async with proxied() as p:
        for _ in range(3):
            await fd_limit(p)
        assert (await rejected(p.lw))["fd_limit"] == 3
        await send(p, b"GET /ok HTTP/1.1\r\n" + H + b"\r\n", 200)


async def test_a_flood_of_refusals_is_one_log_line_per_reason(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="loopwatch.server")

    def logged() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage() == "request_rejected"]

    async with proxied() as p:
        for _ in range(20):
            await send(p, b"GARBAGE\r\n\r\n", 400)
        await send(p, b"GET /ok HTTP/2.0\r\n" + H + b"\r\n", 505)
        assert (await rejected(p.lw))["bad_request"] == 20
        # (The native listener's lines reach the log through the brain.)
        await wait_for(lambda: len(logged()) == 2)
    lines = logged()
    assert [(r.fields["reason"], r.fields["status"]) for r in lines] == [  # type: ignore[attr-defined]
        ("bad_request", 400),
        ("version", 505),
    ]
    assert lines[0].fields["peer"] == ATTACKER and lines[0].fields["suppressed"] == 0  # type: ignore[attr-defined]
    assert [r.levelname for r in lines] == ["INFO", "INFO"]
    assert set(lines[0].fields) >= {"reason", "status", "peer", "message", "suppressed"}  # type: ignore[attr-defined]


async def test_a_native_flood_of_bad_requests_puts_one_line_per_reason_in_the_event_queue():
    # The lines are rate-limited where the requests are refused, so a flood
    # costs the queue to the brain one record per reason, not one per request:
    # an 8-event queue takes 50 refusals of two kinds without a drop.
    async with (
        RawBackend(switching_protocols) as backend,
        native(backend.url, capacity=8) as running,
    ):
        for _ in range(25):
            response, _ = await raw_exchange(running.port, b"GARBAGE\r\n\r\n")
            assert response.status == 400
            response, _ = await raw_exchange(running.port, b"GET /ok HTTP/2.0\r\n" + H + b"\r\n")
            assert response.status == 505
        assert running.listener.stats().rejected["bad_request"] == 25
        assert running.listener.stats().rejected["version"] == 25
        batch = await asyncio.to_thread(running.queue.recv_batch, 100, 1.0)
        lines = [r.event for r in batch]
        assert all(isinstance(line, RequestRejected) for line in lines)
        assert [(line.reason, line.status, line.peer, line.suppressed) for line in lines] == [  # type: ignore[union-attr]
            ("bad_request", 400, "127.0.0.1", 0),
            ("version", 505, "127.0.0.1", 0),
        ]
        assert lines[1].message + "\n" == response.body.decode()  # type: ignore[union-attr]  # the answer's line
        assert running.queue.dropped == 0
        assert _dataplane.REJECTION_LOG_INTERVAL == REJECTION_LOG_INTERVAL


def test_the_log_limiter_writes_one_line_per_slot_and_interval_with_the_count_left_out():
    """The Python twin of the listener's limiter (`upstream_handshake_failed`)."""
    lines = LogLimiter(interval=10.0)
    admitted = [lines.admit("overload", 100.0 + i) for i in range(5)]
    assert admitted == [0, None, None, None, None]  # one line, four left out
    assert lines.admit("bad_request", 104.5) == 0  # another slot: its own line
    assert lines.admit("overload", 110.5) == 4  # the next line tells the four
    assert lines.admit("overload", 111.0) is None
    assert lines.admit("overload", 120.5) == 1


# --- max_concurrent on by default ---------------------------------------------------------


def test_max_concurrent_is_on_by_default_far_above_a_user_with_many_tabs():
    policy = PolicySettings()
    assert (policy.max_concurrent, policy.on_max_concurrent) == (1000, "reject-new")
    engine = Engine(DetectionSettings(), policy, BreakerSettings())
    key = "alice@10.0.0.5"
    # All admitted up to the limit (a user with 30 tabs, each with the incident's
    # duplicate socket, holds 60); the next one is refused.
    t = 0.0
    for i in range(1000):
        t += 0.01
        decision = engine.admit(Attempt(key, "/ws", t))
        assert decision.admitted, (i, decision)
        engine.record(Opened(key, "/ws", t + 0.001, f"c{i}"))
    refused = engine.admit(Attempt(key, "/ws", t + 0.01))
    assert not refused.admitted and refused.reason == "max_concurrent"
