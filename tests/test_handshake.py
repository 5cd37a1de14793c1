"""The upgrade handshake through loopwatch, end to end.

Clients are `websockets` (an implementation independent of the proxy's) or raw
sockets when exact bytes matter; backends are `websockets` servers or
`RawBackend`, which records the exact request head it received.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import (
    RawBackend,
    accept_for,
    echo,
    free_port,
    loopwatch,
    raw_exchange,
    read_response,
    self_signed_cert,
    server_context,
    switching_protocols,
    upgrade_request,
    wait_for,
    websockets_backend,
    ws_url,
)

RUN_ON_UVLOOP = True  # each test runs on asyncio's loop and on uvloop (tests/conftest.py)


def client(url: str, **kwargs):  # noqa: ANN201
    kwargs.setdefault("proxy", None)
    kwargs.setdefault("open_timeout", 10)
    return connect(url, **kwargs)


async def refused(url: str, **kwargs) -> InvalidStatus:  # noqa: ANN003
    with pytest.raises(InvalidStatus) as info:
        async with client(url, **kwargs):
            pass
    return info.value


def masked_frame(payload: bytes, opcode: int = 0x1, mask: bytes = b"\x11\x22\x33\x44") -> bytes:
    assert len(payload) < 126
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


# --- negotiation --------------------------------------------------------------


async def test_subprotocol_chosen_by_backend_reaches_client():
    seen: list[str | None] = []

    async def handler(ws: ServerConnection) -> None:
        seen.append(ws.subprotocol)
        await echo(ws)

    async with (
        websockets_backend(handler, subprotocols=["b"]) as (url, _),
        loopwatch(url) as lw,
        client(ws_url(lw, "/"), subprotocols=["a", "b"]) as ws,
    ):
        assert ws.subprotocol == "b"
        assert ws.response.headers["Sec-WebSocket-Protocol"] == "b"
        await ws.send("ping")
        assert await ws.recv() == "ping"
    assert seen == ["b"]


async def test_permessage_deflate_negotiated_end_to_end():
    backend_extensions: list[str] = []

    async def handler(ws: ServerConnection) -> None:
        backend_extensions.append(ws.response.headers.get("Sec-WebSocket-Extensions", ""))
        await echo(ws)

    async with (
        websockets_backend(handler, compression="deflate") as (url, _),
        loopwatch(url) as lw,
        client(ws_url(lw), compression="deflate") as ws,
    ):
        header = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        assert header.startswith("permessage-deflate")
        assert header == backend_extensions[0]  # the backend's answer, untouched
        assert [type(e).__name__ for e in ws.protocol.extensions] == ["PerMessageDeflate"]
        messages = ["a" * 100_000, "hello", "x" * 3, "b" * 70_000, b"\x00\x01" * 5000]
        for message in messages:
            await ws.send(message)
            assert await ws.recv() == message
        # Compressed: the relay passed RSV1 frames through.
        many = "compressible " * 5000
        await ws.send(many)
        assert await ws.recv() == many
    assert backend_extensions and backend_extensions[0].startswith("permessage-deflate")


# --- what the upstream receives ----------------------------------------------


async def test_request_head_preserved_hop_by_hop_dropped_forwarded_added():
    async with RawBackend(switching_protocols) as backend, loopwatch(backend.url) as lw:
        end_to_end = [
            b"user-agent: RawClient/1.0 (test)",
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            b"sec-websocket-version: 13",
            b"Sec-WebSocket-Protocol: a, b",
            b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
            b"Authorization: Bearer abc.def.ghi",
            b"Cookie: a=1",
            b"X-Custom-Thing: Value With  Spaces",
            b"Cookie: b=2",
            b"Origin: https://app.example",
            b"x-lower-case: yes",
        ]
        hop_by_hop = [
            b"Keep-Alive: timeout=5",
            b"TE: trailers",
            b"Proxy-Authorization: Basic eHl6",
            b"X-Drop-Me: secret",
            b"Proxy-Connection: keep-alive",
        ]
        request = (
            b"GET /chat/room?x=1&y=%2F%20&z HTTP/1.1\r\n"
            b"Host: public.example:8443\r\n"
            + b"\r\n".join(end_to_end[:3])
            + b"\r\nUpgrade: websocket\r\nConnection: Upgrade, X-Drop-Me\r\n"
            + b"\r\n".join(hop_by_hop[:2])
            + b"\r\n"
            + b"\r\n".join(end_to_end[3:])
            + b"\r\n"
            + b"\r\n".join(hop_by_hop[2:])
            + b"\r\nX-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: gopher\r\n"
            b"X-Forwarded-Host: spoofed.example\r\n\r\n"
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", lw.proxy_port)
        try:
            writer.write(request)
            response = await asyncio.wait_for(read_response(reader, head_only=True), 10)
            assert response.status == 101
        finally:
            writer.close()

    assert backend.connections == 1
    lines = backend.heads[0].split(b"\r\n")
    assert lines[0] == b"GET /chat/room?x=1&y=%2F%20&z HTTP/1.1"
    headers = [line for line in lines[1:] if line]
    names = [h.partition(b":")[0].lower() for h in headers]
    # Exactly one Host, the upstream's authority.
    assert [h for h in headers if h.lower().startswith(b"host:")] == [
        b"Host: 127.0.0.1:%d" % backend.port
    ]
    # Every end-to-end header as sent: byte for byte, in the client's order.
    assert [h for h in headers if h in end_to_end] == end_to_end
    # Hop-by-hop headers, and the one named in Connection, are gone.
    for line in hop_by_hop:
        assert line.partition(b":")[0].lower() not in names, line
    # The upgrade itself, re-stated for this hop.
    assert b"upgrade: websocket" in [h.lower() for h in headers]
    assert [h.lower() for h in headers if h.lower().startswith(b"connection:")] == [
        b"connection: upgrade"
    ]
    # X-Forwarded-*: appended to, never taken from the client.
    assert [h for h in headers if h.lower().startswith(b"x-forwarded-")] == [
        b"X-Forwarded-For: 203.0.113.7, 127.0.0.1",
        b"X-Forwarded-Proto: http",
        b"X-Forwarded-Host: public.example:8443",
    ]


async def test_headers_from_websockets_client_reach_backend():
    seen = {}

    async def handler(ws: ServerConnection) -> None:
        seen["path"] = ws.request.path
        seen["headers"] = ws.request.headers
        await echo(ws)

    async with websockets_backend(handler) as (url, _), loopwatch(url) as lw:
        port = lw.proxy_port
        async with client(
            ws_url(lw, "/feed?token=t0k&a=%C3%A9"),
            origin="https://app.example",
            user_agent_header="loopwatch-test/1",
            additional_headers={"Authorization": "Bearer xyz", "Cookie": "sid=42", "X-Trace": "7"},
        ) as ws:
            await ws.send("x")
            assert await ws.recv() == "x"
    headers = seen["headers"]
    assert seen["path"] == "/feed?token=t0k&a=%C3%A9"
    assert headers["Origin"] == "https://app.example"
    assert headers["User-Agent"] == "loopwatch-test/1"
    assert headers["Authorization"] == "Bearer xyz"
    assert headers["Cookie"] == "sid=42"
    assert headers["X-Trace"] == "7"
    assert headers["Host"] == url.removeprefix("ws://")
    assert headers["X-Forwarded-For"] == "127.0.0.1"
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["X-Forwarded-Host"] == f"127.0.0.1:{port}"
    assert headers["Sec-WebSocket-Version"] == "13"


async def test_absolute_form_target_sent_upstream_in_origin_form():
    async with RawBackend(switching_protocols) as backend, loopwatch(backend.url) as lw:
        request = upgrade_request("http://public.example:8080/chat?room=1", host="ignored.example")
        reader, writer = await asyncio.open_connection("127.0.0.1", lw.proxy_port)
        try:
            writer.write(request)
            response = await asyncio.wait_for(read_response(reader, head_only=True), 10)
            assert response.status == 101
        finally:
            writer.close()
    lines = backend.heads[0].split(b"\r\n")
    assert lines[0] == b"GET /chat?room=1 HTTP/1.1"
    assert b"X-Forwarded-Host: public.example:8080" in lines
    assert b"Host: 127.0.0.1:%d" % backend.port in lines


# --- routes -------------------------------------------------------------------


async def test_routes_longest_prefix_wins_and_base_path_rewrites():
    seen: list[tuple[str, str]] = []

    def named(name: str):  # noqa: ANN202
        async def handler(ws: ServerConnection) -> None:
            seen.append((name, ws.request.path))
            await ws.send(f"{name} {ws.request.path}")
            await echo(ws)

        return handler

    async with (
        websockets_backend(named("A")) as (url_a, _),
        websockets_backend(named("B")) as (url_b, _),
        websockets_backend(named("C")) as (url_c, _),
    ):
        routes = [
            {"path_prefix": "/a", "upstream": url_a},
            {"path_prefix": "/a/b", "upstream": url_b},
            {"path_prefix": "/rewrite", "upstream": url_c + "/base/v2/"},
        ]
        async with loopwatch(None, routes=routes) as lw:  # type: ignore[arg-type]
            expected = {
                "/a": "A /a",
                "/a/x?q=1": "A /a/x?q=1",
                "/a/bc": "A /a/bc",  # prefixes match whole segments
                "/a/b": "B /a/b",
                "/a/b/c?d=e": "B /a/b/c?d=e",
                "/rewrite": "C /base/v2",
                "/rewrite/chat?x=1&y=2": "C /base/v2/chat?x=1&y=2",
            }
            for path, greeting in expected.items():
                async with client(ws_url(lw, path)) as ws:
                    assert await ws.recv() == greeting, path
            for path in ("/", "/nope", "/ab", "/rewritten"):
                err = await refused(ws_url(lw, path))
                assert err.response.status_code == 404, path
                assert err.response.body.count(b"\n") == 1
    assert len(seen) == len(expected)


# --- the upstream's refusals --------------------------------------------------

REFUSALS = {
    401: (b"Unauthorized", [b"WWW-Authenticate: Bearer realm=\"chat\", error=\"invalid_token\""]),
    403: (b"Forbidden", [b"X-Reason: origin not allowed"]),
    404: (b"Not Found", [b"X-Request-Id: r-404"]),
    429: (b"Too Many Requests", [b"Retry-After: 17"]),
    500: (b"Internal Server Error", [b"X-Request-Id: r-500"]),
    503: (b"Service Unavailable", [b"Retry-After: 30", b"X-Request-Id: r-503"]),
}


def refusal(status: int, framing: str, body: bytes) -> bytes:
    reason, headers = REFUSALS[status]
    head = b"HTTP/1.1 %d %s\r\n" % (status, reason) + b"".join(h + b"\r\n" for h in headers)
    head += b"Content-Type: application/json\r\nSet-Cookie: s=1; Path=/\r\n"
    if framing == "length":
        return head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    if framing == "chunked":
        half = len(body) // 2
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[:half], body[half:]) if c)
        return head + b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
    return head + b"Connection: close\r\n\r\n" + body  # ends with the connection


@pytest.mark.parametrize("status", sorted(REFUSALS))
async def test_upstream_refusal_passed_through(status):
    body = b'{"error": "refused with %d"}' % status
    async with (
        RawBackend(lambda head: refusal(status, "length", body)) as backend,
        loopwatch(backend.url) as lw,
    ):
        err = await refused(ws_url(lw, "/socket"))
        assert backend.connections == 1  # the upgrade did reach the upstream
    response = err.response
    assert response.status_code == status
    assert response.reason_phrase == REFUSALS[status][0].decode()
    assert response.body == body
    for line in REFUSALS[status][1]:
        name, _, value = line.decode().partition(": ")
        assert response.headers[name] == value
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Set-Cookie"] == "s=1; Path=/"


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
async def test_upstream_refusal_raw_never_101(framing):
    body = b"go away\n" * 10
    async with (
        RawBackend(lambda head: refusal(503, framing, body), close_after=framing == "close") as backend,
        loopwatch(backend.url) as lw,
    ):
        response, after = await raw_exchange(lw.proxy_port, upgrade_request("/x"))
        assert backend.connections == 1
    assert response.status == 503
    assert response.body == body
    assert response.header("Retry-After") == "30"
    assert response.header("Transfer-Encoding") is None
    assert response.header("Content-Length") == str(len(body))
    assert after == b""  # nothing after the refusal: no 101, no frames; then EOF


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
async def test_upstream_refusal_body_truncated(framing):
    body = bytes(range(256)) * 40  # 10 KiB
    async with (
        RawBackend(lambda head: refusal(500, framing, body), close_after=framing == "close") as backend,
        loopwatch(backend.url, **{"limits.error_body_size": "1KiB"}) as lw,
    ):
        response, after = await raw_exchange(lw.proxy_port, upgrade_request("/x"))
    assert response.status == 500
    assert response.body == body[:1024]
    assert response.header("Content-Length") == "1024"
    assert after == b""


async def test_a_refusal_whose_body_never_ends_is_answered_at_the_handshake_timeout():
    """A 401 without a length on a connection the backend keeps open: its
    body ends only with the close. loopwatch waited for it and, at
    handshake_timeout, answered 504 instead: the client never saw its 401,
    and the engine counted an upstream failure, not an auth failure (the
    auth-loop rule never fired; the upstream breaker counted it).
    nginx and HAProxy pass the 401 on."""
    async with (
        RawBackend(lambda head: b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer\r\n\r\nnope") as backend,
        loopwatch(backend.url, **{"limits.handshake_timeout": "1s"}) as lw,
    ):
        response, after = await raw_exchange(lw.proxy_port, upgrade_request("/x"))
        assert backend.connections == 1
        await wait_for(lambda: lw.plane.settled())
        view = lw.engine.client("127.0.0.1", time.monotonic())
    assert (response.status, response.body) == (401, b"nope")
    assert response.header("WWW-Authenticate") == "Bearer"
    assert after == b""
    assert view is not None and view.consecutive_auth_failures == 1


# --- the upstream failing -----------------------------------------------------


async def test_upstream_down_is_502():
    async with loopwatch(f"ws://127.0.0.1:{free_port()}") as lw:
        err = await refused(ws_url(lw))
        # The answer is written before the connection ends (the native task).
        await wait_for(lambda: lw.plane.connections() == 0)
    assert err.response.status_code == 502
    assert err.response.body.count(b"\n") == 1


async def test_upstream_never_answers_is_504_after_handshake_timeout():
    async with (
        RawBackend(lambda head: None) as backend,
        loopwatch(backend.url, **{"limits.handshake_timeout": "0.5s"}) as lw,
    ):
        started = time.monotonic()
        response, after = await raw_exchange(lw.proxy_port, upgrade_request("/slow"))
        elapsed = time.monotonic() - started
        assert backend.heads  # the request did reach it
        await wait_for(lambda: lw.plane.connections() == 0)
    assert response.status == 504
    assert 0.3 <= elapsed < 5
    assert after == b""


async def test_a_client_that_leaves_before_the_101_is_not_an_upstream_failure():
    """A client that closes while the upstream thinks (a closed tab) was kept
    until the handshake timeout, then counted as an upstream handshake timeout:
    closed tabs against a slow backend fed the upstream breaker. Its attempt
    now ends at once, as the client's (outcome client_gone)."""
    async with (
        RawBackend(lambda head: None) as backend,
        loopwatch(backend.url, **{"limits.handshake_timeout": "5s", "breakers.upstream.min_calls": 3}) as lw,
    ):
        for _ in range(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", lw.proxy_port)
            writer.write(upgrade_request("/slow"))
            await writer.drain()
            await wait_for(lambda: len(backend.heads) > 0)
            writer.write_eof()  # gone, having sent nothing more
            assert await asyncio.wait_for(reader.read(), 2) == b""  # closed at once, no 504 later
            writer.close()
        await wait_for(lambda: lw.plane.connections() == 0)
        await wait_for(lw.plane.settled)
        [upstream] = [b for b in lw.engine.breakers(time.monotonic()) if b.name == "upstream"]
        assert (upstream.state, upstream.failures) == ("closed", 0)


async def test_upstream_connect_timeout_is_504():
    # A listener whose accept queue is full: the kernel drops further SYNs, so a
    # connect neither succeeds nor fails until the connect timeout.
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
        overrides = {"limits.connect_timeout": "0.5s", "limits.handshake_timeout": "10s"}
        async with loopwatch(f"ws://127.0.0.1:{port}", **overrides) as lw:
            started = time.monotonic()
            response, _ = await raw_exchange(lw.proxy_port, upgrade_request())
            elapsed = time.monotonic() - started
    finally:
        for s in fillers:
            s.close()
        sock.close()
    assert response.status == 504
    assert b"connect" in response.body
    assert 0.3 <= elapsed < 5


async def test_upstream_closing_without_answer_is_502():
    async with (
        RawBackend(lambda head: b"", close_after=True) as backend,
        loopwatch(backend.url) as lw,
    ):
        response, _ = await raw_exchange(lw.proxy_port, upgrade_request())
        assert backend.connections == 1
    assert response.status == 502


async def test_upstream_garbage_answer_is_502():
    async with (
        RawBackend(lambda head: b"SSH-2.0-OpenSSH_9.6\r\n\r\n") as backend,
        loopwatch(backend.url) as lw,
    ):
        response, _ = await raw_exchange(lw.proxy_port, upgrade_request())
    assert response.status == 502


async def test_upstream_101_without_upgrade_is_not_passed_as_refusal():
    # A 101 that does not switch to websocket is no valid answer to the upgrade.
    async with (
        RawBackend(lambda head: b"HTTP/1.1 101 Switching Protocols\r\nX-A: 1\r\n\r\n") as backend,
        loopwatch(backend.url) as lw,
    ):
        response, _ = await raw_exchange(lw.proxy_port, upgrade_request())
    assert response.status == 502


@pytest.mark.parametrize(
    "broken",
    [
        lambda head: switching_protocols(head).replace(accept_for(head), b"c29tZXRoaW5nIGVsc2U="),
        lambda head: switching_protocols(head).replace(b"Sec-WebSocket-Accept: " + accept_for(head) + b"\r\n", b""),
        lambda head: switching_protocols(head).replace(b"Connection: Upgrade", b"Connection: close"),
    ],
    ids=["wrong-accept", "no-accept", "connection-close"],
)
async def test_a_101_that_does_not_answer_the_key_is_the_upstreams_failure(broken):
    """Passed on, the client failed the handshake and dropped the connection:
    the engine counted an upstream success and a short-lived client, and
    flagged the client for the backend's fault. HAProxy answers 502."""
    async with RawBackend(broken) as backend, loopwatch(backend.url) as lw:
        response, after = await raw_exchange(lw.proxy_port, upgrade_request())
        await wait_for(lambda: lw.plane.settled())
        view = lw.engine.client("127.0.0.1", time.monotonic())
    assert response.status == 502 and after == b""
    assert view is not None and view.open_connections == 0 and view.close_codes == {}


# --- exact bytes --------------------------------------------------------------


async def test_101_head_reaches_client_byte_for_byte():
    def unusual(head: bytes) -> bytes:
        full = switching_protocols(head)
        accept = full.split(b"Sec-WebSocket-Accept: ")[1].split(b"\r\n")[0]
        return (
            b"HTTP/1.1 101 Web Socket Protocol Handshake\r\n"
            b"upgrade: WebSocket\r\n"
            b"CONNECTION: keep-alive, Upgrade\r\n"
            b"X-Extra:   spaced\tvalue\r\n"
            b"sec-websocket-accept:" + accept + b"\r\n"
            b"X-Dup: 1\r\nX-Dup: 2\r\n"
            b"Set-Cookie: session=abc; HttpOnly\r\n"
            b"Date: Thu, 01 Jan 1970 00:00:00 GMT\r\n"
            b"\r\n"
            b"\x81\x05hello"  # a frame in the same write as the head
        )

    async with RawBackend(unusual) as backend, loopwatch(backend.url) as lw:
        reader, writer = await asyncio.open_connection("127.0.0.1", lw.proxy_port)
        try:
            writer.write(upgrade_request("/exact"))
            expected = unusual(upgrade_request("/exact"))
            got = await asyncio.wait_for(reader.readexactly(len(expected)), 10)
            assert got == expected
            # Frames flow after it both ways.
            frame = masked_frame(b"client says hi")
            writer.write(frame)
            await asyncio.wait_for(_until(lambda: bytes(backend.after[0]) == frame), 10)
        finally:
            writer.close()


async def test_interim_answers_before_the_101_pass_through():
    """103 Early Hints (or 100) before the 101: passed on with it, byte for
    byte, as nginx does; the WebSocket opens. They were taken for the final
    answer: the client got a 103 with Content-Length and a close."""
    interim = b"HTTP/1.1 103 Early Hints\r\nLink: </app.css>; rel=preload\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n"

    async with RawBackend(lambda head: interim + switching_protocols(head)) as backend, loopwatch(backend.url) as lw:
        reader, writer = await asyncio.open_connection("127.0.0.1", lw.proxy_port)
        try:
            writer.write(upgrade_request("/hints"))
            expected = interim + switching_protocols(upgrade_request("/hints"))
            assert await asyncio.wait_for(reader.readexactly(len(expected)), 10) == expected
            frame = masked_frame(b"after the hints")
            writer.write(frame)
            await asyncio.wait_for(_until(lambda: bytes(backend.after[0]) == frame), 10)
        finally:
            writer.close()


async def _until(predicate) -> None:  # noqa: ANN001
    while not predicate():
        await asyncio.sleep(0.01)


async def test_bytes_sent_with_the_upgrade_request_reach_backend_after_handshake():
    frame = masked_frame(b"early bird") + masked_frame(b"second", mask=b"\xa0\xb1\xc2\xd3")
    async with RawBackend(switching_protocols) as backend, loopwatch(backend.url) as lw:
        reader, writer = await asyncio.open_connection("127.0.0.1", lw.proxy_port)
        try:
            writer.write(upgrade_request("/early") + frame)  # one write: head + frames
            response = await asyncio.wait_for(read_response(reader, head_only=True), 10)
            assert response.status == 101
            await asyncio.wait_for(_until(lambda: bytes(backend.after[0]) == frame), 10)
        finally:
            writer.close()
    # The head the backend got is the head alone; the frames came after it, untouched.
    assert backend.heads[0].endswith(b"\r\n\r\n") and b"bird" not in backend.heads[0]


async def test_early_frames_echoed_by_a_real_backend():
    async with websockets_backend(echo) as (url, _), loopwatch(url) as lw:
        reader, writer = await asyncio.open_connection("127.0.0.1", lw.proxy_port)
        try:
            writer.write(upgrade_request("/early") + masked_frame(b"early bird"))
            response = await asyncio.wait_for(read_response(reader, head_only=True), 10)
            assert response.status == 101
            echoed = await asyncio.wait_for(reader.readexactly(2 + len(b"early bird")), 10)
            assert echoed == b"\x81\x0aearly bird"
        finally:
            writer.close()


# --- TLS ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> tuple[str, str]:  # noqa: ANN001
    return self_signed_cert(tmp_path_factory.mktemp("tls"), ["localhost", "127.0.0.1"])


async def test_tls_listener(tls_files):
    cert, key = tls_files
    seen = {}

    async def handler(ws: ServerConnection) -> None:
        seen["proto"] = ws.request.headers["X-Forwarded-Proto"]
        await echo(ws)

    async with (
        websockets_backend(handler) as (url, _),
        loopwatch(url, **{"tls.cert_file": cert, "tls.key_file": key}) as lw,
    ):
        ctx = ssl.create_default_context(cafile=cert)
        async with client(f"wss://127.0.0.1:{lw.proxy_port}/secure", ssl=ctx) as ws:
            for message in ("over tls", "y" * 200_000, b"\x00" * 70_000):
                await ws.send(message)
                assert await ws.recv() == message
            await ws.send("close 4001 tls bye")
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, "tls bye")
        # A plain-text client on the TLS port gets no upgrade.
        reader, writer = await asyncio.open_connection("127.0.0.1", lw.proxy_port)
        try:
            writer.write(upgrade_request())
            data = await asyncio.wait_for(reader.read(100), 10)
            assert not data.startswith(b"HTTP/1.1 101")
        finally:
            writer.close()
    assert seen["proto"] == "https"


async def test_tls_upstream_verified_with_ca_file(tls_files):
    cert, key = tls_files
    async with websockets_backend(echo, ssl=server_context(cert, key)) as (url, _):
        wss = url.replace("ws://", "wss://")
        async with (
            loopwatch(wss, **{"upstream_tls.ca_file": cert}) as lw,
            client(ws_url(lw, "/up")) as ws,
        ):
            await ws.send("to a wss upstream")
            assert await ws.recv() == "to a wss upstream"
            await ws.send("close 4002 done")
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4002


async def test_tls_upstream_untrusted_is_502(tls_files):
    cert, key = tls_files
    async with websockets_backend(echo, ssl=server_context(cert, key)) as (url, _):
        wss = url.replace("ws://", "wss://")
        async with loopwatch(wss) as lw:
            err = await refused(ws_url(lw, "/up"))
            await wait_for(lambda: lw.plane.connections() == 0)
    assert err.response.status_code == 502


async def handshake_errors(lw) -> dict[str, float]:  # noqa: ANN001
    """loopwatch_upstream_handshake_errors_total by error, from a scrape of /metrics."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as session, session.get(
        f"http://127.0.0.1:{lw.admin_port}/metrics"
    ) as response:
        assert response.status == 200
        text = await response.text()
    name = "loopwatch_upstream_handshake_errors_total"
    return {s.labels["error"]: s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name}


async def test_tls_upstream_untrusted_is_a_tls_failure_not_a_connect_failure(tls_files):
    # A wss backend whose certificate the proxy does not trust (no ca_file): the
    # certificate check fails, which is TLS's failure, as on the native plane.
    cert, key = tls_files
    async with websockets_backend(echo, ssl=server_context(cert, key)) as (url, _):
        wss = url.replace("ws://", "wss://")
        async with loopwatch(wss) as lw:
            response, after = await raw_exchange(lw.proxy_port, upgrade_request("/up"))
            await wait_for(lw.plane.settled)  # native: the brain counts it a batch later
            errors = await handshake_errors(lw)
    assert (response.status, response.body, after) == (502, b"loopwatch: upstream TLS handshake failed\n", b"")
    assert (errors["tls"], errors["connect"]) == (1, 0)


async def test_tls_upstream_wrong_server_name_is_502(tls_files):
    cert, key = tls_files
    async with websockets_backend(echo, ssl=server_context(cert, key)) as (url, _):
        wss = url.replace("ws://", "wss://")
        overrides = {"upstream_tls.ca_file": cert, "upstream_tls.server_name": "other.example"}
        async with loopwatch(wss, **overrides) as lw:
            err = await refused(ws_url(lw, "/up"))
    assert err.response.status_code == 502


async def test_browser_style_connection_header_and_case():
    # Firefox sends "Connection: keep-alive, Upgrade"; header names and tokens in any case.
    async with RawBackend(switching_protocols) as backend, loopwatch(backend.url) as lw:
        request = (
            b"GET /ff HTTP/1.1\r\nhost: example.test\r\nconnection: keep-alive, Upgrade\r\n"
            b"upgrade: WebSocket\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"sec-websocket-version: 13\r\n\r\n"
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", lw.proxy_port)
        try:
            writer.write(request)
            response = await asyncio.wait_for(read_response(reader, head_only=True), 10)
            assert response.status == 101
        finally:
            writer.close()
    assert b"X-Forwarded-Host: example.test" in backend.heads[0]


async def test_upgrade_after_a_plain_request_on_the_same_connection():
    def answer(head: bytes) -> bytes:
        if b"sec-websocket-key" in head.lower():
            return switching_protocols(head)
        return b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"

    async with RawBackend(answer) as backend, loopwatch(backend.url) as lw:
        reader, writer = await asyncio.open_connection("127.0.0.1", lw.proxy_port)
        try:
            writer.write(b"GET /config HTTP/1.1\r\nHost: example.test\r\n\r\n")
            response = await asyncio.wait_for(read_response(reader), 10)
            assert (response.status, response.body) == (200, b"ok\n")
            writer.write(upgrade_request("/ws"))
            response = await asyncio.wait_for(read_response(reader, head_only=True), 10)
            assert response.status == 101
            frame = masked_frame(b"after http")
            writer.write(frame)
            await asyncio.wait_for(_until(lambda: len(backend.after) == 2 and bytes(backend.after[1]) == frame), 10)
        finally:
            writer.close()


async def test_tls_upstream_with_server_name(tmp_path):
    cert, key = self_signed_cert(tmp_path, ["backend.internal"])
    async with websockets_backend(echo, ssl=server_context(cert, key)) as (url, _):
        wss = url.replace("ws://", "wss://")
        tls = {"upstream_tls.ca_file": cert, "upstream_tls.server_name": "backend.internal"}
        async with loopwatch(wss, **tls) as lw, client(ws_url(lw, "/sni")) as ws:
            await ws.send("named")
            assert await ws.recv() == "named"
