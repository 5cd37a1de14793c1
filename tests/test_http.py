"""Plain HTTP through loopwatch to an aiohttp backend: requests and responses
stream both ways, and status, reason, headers and bodies pass unchanged."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from loopwatch.proxy.app.runtime import Running
from tests.conftest import (
    free_port,
    loopwatch,
    raw_exchange,
    read_response,
    self_signed_cert,
    server_context,
    wait_for,
)

RUN_ON_UVLOOP = True  # each test runs on asyncio's loop and on uvloop (tests/conftest.py)

FIRST_CHUNK_TIMEOUT = 10.0


class Backend:
    """An aiohttp app that reports what it received and answers in many shapes."""

    def __init__(self) -> None:
        self.first_upload_bytes = asyncio.Event()
        self.first_chunk_read = asyncio.Event()  # set by the test once it got chunk one
        self.waited_in_vain: list[str] = []
        self.requests: list[web.Request] = []
        self.gzipped = gzip.compress(b"squeeze me " * 1000, mtime=0)
        self.big = bytes(range(256)) * (4 * 4096)  # 4 MiB
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/echo{tail:.*}", self.echo)
        app.router.add_post("/upload", self.upload)
        app.router.add_get("/slow", self.slow)
        app.router.add_get("/late", self.late)
        app.router.add_get("/created", self.created)
        app.router.add_get("/etag", self.etag)
        app.router.add_get("/resource", self.resource)
        app.router.add_get("/gzip", self.gzip)
        app.router.add_get("/big", self.big_body)
        app.router.add_get("/nolength", self.no_length)
        app.router.add_get("/cookies", self.cookies)
        app.router.add_get("/truncated", self.truncated)
        self.app = app
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> Backend:
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    async def echo(self, request: web.Request) -> web.Response:
        self.requests.append(request)
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "path_qs": request.raw_path,
                "headers": [[k.decode(), v.decode()] for k, v in request.raw_headers],
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "version": f"{request.version.major}.{request.version.minor}",
            }
        )

    async def upload(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        length = 0
        async for chunk in request.content.iter_any():
            if length == 0 and chunk:
                self.first_upload_bytes.set()
            digest.update(chunk)
            length += len(chunk)
        return web.json_response(
            {
                "sha256": digest.hexdigest(),
                "length": length,
                "transfer_encoding": request.headers.get("Transfer-Encoding"),
                "content_length": request.headers.get("Content-Length"),
            }
        )

    async def late(self, request: web.Request) -> web.Response:
        """Its answer (`n`, a line) after `s` seconds (1.5 by default)."""
        await asyncio.sleep(float(request.query.get("s", "1.5")))
        return web.Response(text=request.query.get("n", "late") + "\n")

    async def slow(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        await response.write(b"first chunk\n")
        try:
            await asyncio.wait_for(self.first_chunk_read.wait(), FIRST_CHUNK_TIMEOUT)
        except TimeoutError:
            self.waited_in_vain.append("slow")
        await asyncio.sleep(0.05)
        await response.write(b"second chunk\n")
        await asyncio.sleep(0.05)
        await response.write(b"last chunk\n")
        await response.write_eof()
        return response

    async def created(self, request: web.Request) -> web.Response:
        return web.Response(
            status=201,
            reason="Made It",
            text="made\n",
            headers={"X-Custom-Header": "custom value", "Location": "/things/7"},
        )

    async def etag(self, request: web.Request) -> web.Response:
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers={"ETag": '"v1"', "X-Was": "cached"})
        return web.Response(text="fresh\n", headers={"ETag": '"v1"'})

    async def resource(self, request: web.Request) -> web.Response:
        return web.Response(body=b"r" * 1234, headers={"X-Resource": "yes"})

    async def gzip(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.gzipped,
            headers={"Content-Encoding": "gzip", "Content-Type": "text/plain", "Vary": "Accept-Encoding"},
        )

    async def big_body(self, request: web.Request) -> web.Response:
        return web.Response(body=self.big, content_type="application/octet-stream")

    async def no_length(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for i in range(5):
            await response.write(b"part %d\n" % i)
        await response.write_eof()
        return response

    async def truncated(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "1000"})
        await response.prepare(request)
        await response.write(b"t" * 10)
        await asyncio.sleep(0.1)
        assert request.transport is not None
        request.transport.abort()  # dies 990 bytes short
        return response

    async def cookies(self, request: web.Request) -> web.Response:
        response = web.Response(text="cookies\n")
        response.headers.add("Set-Cookie", "a=1; Path=/")
        response.headers.add("Set-Cookie", "b=2; Path=/; HttpOnly")
        return response


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    async with Backend() as b:
        yield b


@pytest.fixture
async def proxy_url(backend: Backend) -> AsyncIterator[str]:
    """loopwatch in front of the backend, on the data plane of this run (both
    must pass every test here unchanged)."""
    async with loopwatch(backend.url) as lw:
        yield f"http://127.0.0.1:{lw.proxy_port}"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        yield s


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def test_get_with_query_and_headers(backend, proxy_url, session):
    async with session.get(
        proxy_url + "/echo/a%20b?x=1&y=%C3%A9&x=2",
        headers={"X-Custom": "value", "Authorization": "Bearer t", "Cookie": "c=1"},
    ) as resp:
        assert resp.status == 200
        data = await resp.json()
    assert data["method"] == "GET"
    assert data["path_qs"] == "/echo/a%20b?x=1&y=%C3%A9&x=2"
    headers = dict(data["headers"])
    assert headers["X-Custom"] == "value"
    assert headers["Authorization"] == "Bearer t"
    assert headers["Cookie"] == "c=1"
    assert headers["Host"] == backend.url.removeprefix("http://")
    assert headers["X-Forwarded-For"] == "127.0.0.1"
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["X-Forwarded-Host"] == proxy_url.removeprefix("http://")


async def test_request_head_exact_over_raw_socket(backend, proxy_url):
    request = (
        b"GET /echo/raw?q=%2F HTTP/1.1\r\nHost: front.example\r\nx-lower: 1\r\n"
        b"X-Upper: 2\r\nConnection: keep-alive, X-Hop\r\nX-Hop: gone\r\nKeep-Alive: timeout=5\r\n"
        b"TE: trailers\r\nProxy-Authorization: Basic eA==\r\nX-Forwarded-For: 198.51.100.1\r\n"
        b"Connection: close\r\n\r\n"
    )
    response, _ = await raw_exchange(port_of(proxy_url), request)
    assert response.status == 200
    data = json.loads(response.body)
    assert data["path_qs"] == "/echo/raw?q=%2F"
    names = [n for n, _ in data["headers"]]
    assert names.index("x-lower") < names.index("X-Upper")  # order and case kept
    for hop in ("X-Hop", "Keep-Alive", "TE", "Proxy-Authorization", "Connection"):
        assert hop.lower() not in [n.lower() for n in names], hop
    assert dict(data["headers"])["X-Forwarded-For"] == "198.51.100.1, 127.0.0.1"
    assert dict(data["headers"])["X-Forwarded-Host"] == "front.example"


async def test_post_streamed_chunked_upload(backend, proxy_url, session):
    chunk = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB
    chunks = 64  # 4 MiB
    digest = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        for i in range(chunks):
            digest.update(chunk)
            yield chunk
            if i == 0:
                # Streamed, not buffered: the backend sees the start of the body
                # before the client has produced the rest of it.
                await asyncio.wait_for(backend.first_upload_bytes.wait(), 10)

    async with session.post(proxy_url + "/upload", data=body()) as resp:
        assert resp.status == 200
        data = await resp.json()
    assert data["length"] == chunks * len(chunk)
    assert data["sha256"] == digest.hexdigest()
    assert data["transfer_encoding"] == "chunked"


async def test_post_with_content_length(backend, proxy_url, session):
    body = bytes(range(256)) * 4000
    async with session.post(proxy_url + "/upload", data=body) as resp:
        data = await resp.json()
    assert data["length"] == len(body)
    assert data["sha256"] == hashlib.sha256(body).hexdigest()
    assert data["content_length"] == str(len(body))
    assert data["transfer_encoding"] is None


async def test_streamed_response_arrives_before_it_ends(backend, proxy_url, session):
    async with session.get(proxy_url + "/slow") as resp:
        assert resp.status == 200
        first = await asyncio.wait_for(resp.content.readline(), FIRST_CHUNK_TIMEOUT / 2)
        assert first == b"first chunk\n"
        backend.first_chunk_read.set()
        rest = await resp.content.read()
    assert rest == b"second chunk\nlast chunk\n"
    assert backend.waited_in_vain == []


async def test_status_reason_and_headers_pass_through(backend, proxy_url):
    port = port_of(proxy_url)
    response, _ = await raw_exchange(port, b"GET /created HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert response.status_line == b"HTTP/1.1 201 Made It"
    assert response.header("X-Custom-Header") == "custom value"
    assert response.header("Location") == "/things/7"
    assert response.body == b"made\n"

    response, _ = await raw_exchange(port, b"GET /cookies HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert [v for n, v in response.headers if n.lower() == b"set-cookie"] == [
        b"a=1; Path=/",
        b"b=2; Path=/; HttpOnly",
    ]


async def test_304_and_head_have_no_body(backend, proxy_url):
    port = port_of(proxy_url)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        # Both on one connection: had loopwatch sent a body, the next response
        # would start with it.
        writer.write(b'GET /etag HTTP/1.1\r\nHost: x\r\nIf-None-Match: "v1"\r\n\r\n')
        response = await asyncio.wait_for(read_response(reader), 10)
        assert response.status == 304
        assert response.header("ETag") == '"v1"'
        assert response.header("X-Was") == "cached"
        assert response.header("Transfer-Encoding") is None
        writer.write(b"HEAD /resource HTTP/1.1\r\nHost: x\r\n\r\n")
        response = await asyncio.wait_for(read_response(reader, head_only=True), 10)
        assert response.status == 200
        assert response.header("Content-Length") == "1234"
        assert response.header("X-Resource") == "yes"
        writer.write(b"GET /resource HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        response = await asyncio.wait_for(read_response(reader), 10)
        assert response.status == 200
        assert response.body == b"r" * 1234
        assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        writer.close()


async def test_gzip_body_not_decompressed(backend, proxy_url, session):
    async with session.get(proxy_url + "/gzip", headers={"Accept-Encoding": "gzip"}) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert resp.headers["Content-Length"] == str(len(backend.gzipped))
        assert await resp.read() == backend.gzipped
    # And the client's Accept-Encoding reached the backend as sent (none added).
    async with session.get(proxy_url + "/echo", headers={"Accept-Encoding": "br"}) as resp:
        data = await resp.json()
    assert [v for n, v in data["headers"] if n.lower() == "accept-encoding"] == ["br"]


async def test_large_response_body_intact(backend, proxy_url, session):
    async with session.get(proxy_url + "/big") as resp:
        body = await resp.read()
    assert hashlib.sha256(body).digest() == hashlib.sha256(backend.big).digest()


async def test_response_without_length_is_chunked_to_http11_and_closed_for_http10(backend, proxy_url):
    port = port_of(proxy_url)
    response, after = await raw_exchange(port, b"GET /nolength HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert response.header("Transfer-Encoding") == "chunked"
    assert response.body == b"".join(b"part %d\n" % i for i in range(5))
    assert after == b""
    response, after = await raw_exchange(port, b"GET /nolength HTTP/1.0\r\n\r\n")
    assert response.header("Transfer-Encoding") is None
    assert response.header("Content-Length") is None
    assert response.body == b"".join(b"part %d\n" % i for i in range(5))  # ends with the connection


async def test_a_later_http_1_minor_version_is_served_as_http_1_1(backend, proxy_url):
    """RFC 9112 §2.3, as nginx and HAProxy: HTTP/1.2 is read as HTTP/1.1 (it
    was refused 400), and goes upstream as HTTP/1.1."""
    response, _ = await raw_exchange(port_of(proxy_url), b"GET /echo HTTP/1.2\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert response.status == 200
    assert json.loads(response.body)["version"] == "1.1"


async def test_keep_alive_two_requests_on_one_connection(backend, proxy_url):
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy_url))
    try:
        for i in range(3):
            writer.write(b"GET /echo/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
            response = await asyncio.wait_for(read_response(reader), 10)
            assert response.status == 200
            assert response.header("Connection") is None
            assert json.loads(response.body)["path_qs"] == f"/echo/{i}"
        body = b"hello body"
        writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        response = await asyncio.wait_for(read_response(reader), 10)
        assert json.loads(response.body)["sha256"] == hashlib.sha256(body).hexdigest()
    finally:
        writer.close()


async def test_connection_close_is_honoured(backend, proxy_url):
    port = port_of(proxy_url)
    for request in (
        b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /echo HTTP/1.0\r\n\r\n",
        b"POST /upload HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi",
    ):
        response, after = await raw_exchange(port, request, timeout=5)
        assert response.status == 200, request
        assert response.header("Connection") == "close", request
        assert after == b""


async def test_http10_keep_alive(backend, proxy_url):
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy_url))
    try:
        for _ in range(2):
            writer.write(b"GET /echo HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            response = await asyncio.wait_for(read_response(reader), 10)
            assert response.status == 200
            assert response.header("Content-Length") is not None
            assert response.header("Connection") == "keep-alive"
    finally:
        writer.close()


async def test_idle_keep_alive_connection_closed_quietly(backend):
    """Idle between requests, a connection has `keepalive_timeout`, not the
    head's `handshake_timeout`: a load balancer pooling connections for 60 s
    must not reuse one loopwatch is closing (a 502 for its client). Once the
    next request's first byte came, its head has `handshake_timeout`."""
    timeouts = {"limits.handshake_timeout": "0.3s", "limits.keepalive_timeout": "1.2s"}
    async with loopwatch(backend.url, **timeouts) as lw:
        reader, writer = await asyncio.open_connection("127.0.0.1", lw.proxy_port)
        try:
            writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
            response = await asyncio.wait_for(read_response(reader), 10)
            assert response.status == 200
            await asyncio.sleep(0.6)  # past handshake_timeout: still open
            writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
            response = await asyncio.wait_for(read_response(reader), 10)
            assert response.status == 200
            began = asyncio.get_running_loop().time()
            # Nothing more is sent: after the timeout the connection just ends,
            # with no unsolicited 408 that could race a next request.
            assert await asyncio.wait_for(reader.read(), 10) == b""
            assert asyncio.get_running_loop().time() - began > 1.0
        finally:
            writer.close()
        await wait_for(lambda: lw.plane.connections() == 0)
        # A next request begun and left half-sent is the head's timeout: 408.
        reader, writer = await asyncio.open_connection("127.0.0.1", lw.proxy_port)
        try:
            writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await asyncio.wait_for(read_response(reader), 10)).status == 200
            writer.write(b"GET /echo HT")  # after the response: no pipelining
            began = asyncio.get_running_loop().time()
            assert (await asyncio.wait_for(read_response(reader), 10)).status == 408
            assert asyncio.get_running_loop().time() - began < 1.0
        finally:
            writer.close()


async def test_pipelined_requests_first_answered_then_closed(backend, proxy_url):
    response, after = await raw_exchange(
        port_of(proxy_url),
        b"GET /echo/1 HTTP/1.1\r\nHost: x\r\n\r\nGET /echo/2 HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    assert response.status == 200
    assert json.loads(response.body)["path_qs"] == "/echo/1"
    assert response.header("Connection") == "close"  # the client knows to retry the second
    assert after == b""
    assert len(backend.requests) == 1


async def test_upstream_dying_mid_response_cuts_the_client(backend, proxy_url):
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy_url))
    try:
        writer.write(b"GET /truncated HTTP/1.1\r\nHost: x\r\n\r\n")
        response = await asyncio.wait_for(read_response(reader, head_only=True), 10)
        assert response.header("Content-Length") == "1000"
        body = await asyncio.wait_for(reader.read(), 10)  # must end, not hang
        assert body == b"t" * 10  # what the upstream sent before it died, and nothing else
    except ConnectionResetError:
        pass
    finally:
        writer.close()


async def test_upstream_down_is_502(session):
    async with loopwatch(f"http://127.0.0.1:{free_port()}") as lw:
        url = f"http://127.0.0.1:{lw.proxy_port}"
        async with session.get(url + "/anything") as resp:
            assert resp.status == 502
            assert (await resp.read()).count(b"\n") == 1
        # Also with a request body on its way.
        async with session.post(url + "/upload", data=b"x" * 100_000) as resp:
            assert resp.status == 502
        await wait_for(lambda: lw.plane.connections() == 0)


async def test_routes_and_base_path_for_http(backend):
    routes = [
        {"path_prefix": "/api", "upstream": backend.url + "/echo/v2"},
        {"path_prefix": "/plain", "upstream": backend.url},
    ]
    async with loopwatch(None, routes=routes) as lw:  # type: ignore[arg-type]
        port = lw.proxy_port
        response, _ = await raw_exchange(port, b"GET /api/items?id=3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert json.loads(response.body)["path_qs"] == "/echo/v2/items?id=3"
        response, _ = await raw_exchange(port, b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert response.status == 404
        assert response.body.count(b"\n") == 1


async def leave_mid_response(backend: Backend, lw: Running) -> None:
    """A client that resets its connection once the first chunk of /slow came;
    returns when loopwatch has let go of both connections."""
    reader, writer = await asyncio.open_connection("127.0.0.1", lw.proxy_port)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b"first chunk\n"), 10)
    writer.transport.abort()
    backend.first_chunk_read.set()
    await wait_for(lambda: lw.plane.connections() == 0)


async def test_client_leaving_mid_response_frees_the_connection(backend):
    async with loopwatch(backend.url) as lw:
        await leave_mid_response(backend, lw)


async def test_expect_100_continue(backend, proxy_url):
    body = b"b" * 5000
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy_url))
    try:
        writer.write(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n"
            % len(body)
        )
        # The client holds its body back until told to continue (curl waits 1 s, then
        # sends anyway; a strict client waits for good).
        interim = await asyncio.wait_for(read_response(reader, head_only=True), 5)
        assert interim.status == 100
        writer.write(body)
        response = await asyncio.wait_for(read_response(reader), 10)
        assert response.status == 200
        assert json.loads(response.body)["sha256"] == hashlib.sha256(body).hexdigest()
    finally:
        writer.close()


async def test_shutdown_lets_an_http_response_in_flight_finish(backend):
    async with loopwatch(backend.url, **{"limits.shutdown_timeout": "5s"}) as lw:
        reader, writer = await asyncio.open_connection("127.0.0.1", lw.proxy_port)
        try:
            writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            response = await asyncio.wait_for(read_response(reader, head_only=True), 10)
            assert response.status == 200
            first = await asyncio.wait_for(reader.readuntil(b"first chunk\n"), 10)
            shutdown = asyncio.create_task(lw.plane.shutdown())
            await asyncio.sleep(0.05)
            backend.first_chunk_read.set()
            rest = await asyncio.wait_for(reader.read(), 10)  # to EOF: then it closes
            await asyncio.wait_for(shutdown, 10)
        finally:
            writer.close()
    # The chunked body completes, uncorrupted by anything else.
    body = first + rest
    assert body.endswith(b"0\r\n\r\n")
    assert b"HTTP/1.1 503" not in body
    assert b"second chunk\n" in body and b"last chunk\n" in body


async def test_https_upstream_with_ca_file_and_server_name(tmp_path):
    # The upstream is reached by IP, its certificate names only backend.internal.
    cert, key = self_signed_cert(tmp_path, ["backend.internal"])
    async with Backend() as b:
        runner = web.AppRunner(b.app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context(cert, key))
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            tls = {"upstream_tls.ca_file": cert, "upstream_tls.server_name": "backend.internal"}
            async with (
                loopwatch(f"https://127.0.0.1:{port}", **tls) as lw,
                aiohttp.ClientSession() as session,
            ):
                async with session.get(f"http://127.0.0.1:{lw.proxy_port}/echo/tls") as resp:
                    assert resp.status == 200
                    data = await resp.json()
                assert data["path_qs"] == "/echo/tls"
            async with (
                loopwatch(f"https://127.0.0.1:{port}", **{"upstream_tls.ca_file": cert}) as lw,
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{lw.proxy_port}/echo/tls") as resp,
            ):
                assert resp.status == 502  # the certificate does not name 127.0.0.1
        finally:
            await runner.cleanup()


async def test_http_through_a_tls_listener(backend, tmp_path):
    cert, key = self_signed_cert(tmp_path, ["127.0.0.1"])
    async with (
        loopwatch(backend.url, **{"tls.cert_file": cert, "tls.key_file": key}) as lw,
        aiohttp.ClientSession() as session,
    ):
        ctx = ssl.create_default_context(cafile=cert)
        async with session.get(f"https://127.0.0.1:{lw.proxy_port}/echo/s", ssl=ctx) as resp:
            data = await resp.json()
        assert dict(data["headers"])["X-Forwarded-Proto"] == "https"
        body = b"z" * 300_000
        async with session.post(f"https://127.0.0.1:{lw.proxy_port}/upload", data=body, ssl=ctx) as resp:
            assert (await resp.json())["sha256"] == hashlib.sha256(body).hexdigest()


async def test_upstream_connect_timeout_is_504(session):
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
        async with loopwatch(f"http://127.0.0.1:{port}", **{"limits.connect_timeout": "0.5s"}) as lw:
            started = time.monotonic()
            async with session.get(f"http://127.0.0.1:{lw.proxy_port}/x") as resp:
                assert resp.status == 504
            assert 0.3 <= time.monotonic() - started < 5
    finally:
        for s in fillers:
            s.close()
        sock.close()
