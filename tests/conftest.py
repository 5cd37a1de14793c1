"""Shared fixtures: a real backend, a real loopwatch in front of it, clean ports.

Every server binds port 0 on 127.0.0.1; every process a test starts is stopped
by the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from loopwatch.proxy.app.runtime import Running, start
from loopwatch.proxy.app.settings import Settings, load_settings
from loopwatch.proxy.dataplane.boundary import Gate

if TYPE_CHECKING:
    from tests.redisserver import RedisServer


def free_port() -> int:
    """A currently free loopback port, for the few tools that cannot bind port 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the data plane a test runs on ------------------------------------------------
#
def client_key(subject: str | None = None, address: str = "127.0.0.1") -> str:
    """The key a loopback client gets (on either plane): `subject@address` from a
    JWT (identity.sources' default), else the address."""
    if subject is None:
        return address
    return f"{subject}@{address}"


def settings_for(upstream: str, **overrides: Any) -> Settings:
    # Refusals answered at once unless a test turns policy.hold on (tests/test_hold.py,
    # the browser tests): a 2 s hold per refusal would stretch every loop test.
    base: dict[str, Any] = {
        "upstream": upstream, "listen": "127.0.0.1:0", "admin.listen": "127.0.0.1:0", "policy.hold": 0,
    }
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


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, stopped after the test."""
    from tests.redisserver import RedisServer  # it imports free_port from here

    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def ws_url(running: Running, path: str = "/") -> str:
    return f"ws://127.0.0.1:{running.proxy_port}{path}"


def idle(running: Running) -> bool:
    """No WebSocket relayed and every event of the data plane judged (the native
    plane's brain sees a close a batch after its client does)."""
    return running.active_connections() == 0 and running.plane.settled()


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition on the event loop until it holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            # Once more after the loop ran what it had pending: a test process
            # that stalled past the deadline wakes with its readers' data unread.
            await asyncio.sleep(0.05)
            if predicate():
                return
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


# --- raw HTTP on both sides: exact bytes in, exact bytes out ---------------


def accept_for(head: bytes) -> bytes:
    """Sec-WebSocket-Accept for the Sec-WebSocket-Key in a raw request head."""
    import base64
    import hashlib

    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            digest = hashlib.sha1(value.strip() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
            return base64.b64encode(digest)
    raise AssertionError(f"no Sec-WebSocket-Key in {head!r}")


def switching_protocols(head: bytes, extra: bytes = b"") -> bytes:
    """A minimal valid 101 answering the raw request `head`, plus `extra` header lines."""
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_for(head) + b"\r\n" + extra + b"\r\n"
    )


class RawBackend:
    """A plain TCP server that records every connection, the exact request head it
    received and every byte after it, and answers each head with `answer(head)`
    (raw bytes written as they are; None: never answer). The connection stays open
    until the peer closes it or sends a close frame (answered with the same code),
    or is closed after the answer when `close_after`."""

    def __init__(self, answer: Callable[[bytes], bytes | None], *, close_after: bool = False):
        self.answer = answer
        self.close_after = close_after
        self.connections = 0
        self.heads: list[bytes] = []
        self.after: list[bytearray] = []  # bytes received after each head
        self.url = ""
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            rest = bytearray()
            self.after.append(rest)
            response = self.answer(head)
            if response is not None:
                writer.write(response)
                await writer.drain()
                if self.close_after:
                    return
            while chunk := await reader.read(65536):
                rest += chunk
                if chunk[0] == 0x88 and len(chunk) >= 8 and chunk[1] & 0x80:
                    # A (masked) close frame starting a read: answer it like a
                    # WebSocket server, with the same code, and end the connection.
                    mask, payload = chunk[2:6], chunk[6:8]
                    code = bytes(b ^ mask[i] for i, b in enumerate(payload))
                    writer.write(b"\x88\x02" + code)
                    await writer.drain()
                    return
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def __aenter__(self) -> RawBackend:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, limit=1 << 20)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"ws://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()


class RawResponse:
    """A response read off a raw socket: status line, headers as sent, body."""

    def __init__(self, head: bytes, body: bytes):
        lines = head.split(b"\r\n")
        self.head = head
        self.status_line = lines[0]
        self.status = int(lines[0].split(b" ")[1])
        self.headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(b":")
                self.headers.append((name, value.strip()))
        self.body = body

    def header(self, name: str) -> str | None:
        values = [v.decode("latin-1") for n, v in self.headers if n.lower() == name.lower().encode()]
        return ", ".join(values) if values else None


async def read_response(reader: asyncio.StreamReader, *, head_only: bool = False) -> RawResponse:
    """One response off a raw stream: the body by Content-Length, chunked, or to EOF."""
    head = await reader.readuntil(b"\r\n\r\n")
    response = RawResponse(head, b"")
    if head_only or response.status in (101, 204, 304) or 100 <= response.status < 200:
        return response
    length = response.header("content-length")
    if length is not None:
        response.body = await reader.readexactly(int(length))
    elif (response.header("transfer-encoding") or "").lower() == "chunked":
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        response.body = bytes(body)
    else:
        response.body = await reader.read()
    return response


async def raw_exchange(port: int, request: bytes, timeout: float = 10.0) -> tuple[RawResponse, bytes]:
    """Send raw `request` bytes to 127.0.0.1:port; the response and whatever
    followed it until the server closed the connection."""

    async def go() -> tuple[RawResponse, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(request)
            response = await read_response(reader)
            return response, await reader.read()
        finally:
            writer.close()

    return await asyncio.wait_for(go(), timeout)


def upgrade_request(path: str = "/", host: str = "example.test", extra: bytes = b"") -> bytes:
    """A valid WebSocket upgrade request head, plus `extra` header lines."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    ).encode() + extra + b"\r\n"


# --- event loops ----------------------------------------------------------------


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Async tests run on asyncio's default loop; a test module that sets
    `RUN_ON_UVLOOP = True` runs on uvloop instead, the loop `loopwatch run` uses
    (the brain's; the data plane is Rust, its sockets the same either way). A
    test that names its loops (`pytest.mark.asyncio(loop_factories=[...])`)
    gets those."""
    import uvloop

    loops: dict[str, Any] = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    marker = item.get_closest_marker("asyncio")
    named = marker.kwargs.get("loop_factories") if marker is not None else None
    if named:
        return {name: loops[name] for name in named}
    uv = getattr(getattr(item, "module", None), "RUN_ON_UVLOOP", False)
    return {"uvloop": loops["uvloop"]} if uv else {"asyncio": loops["asyncio"]}


# --- TLS ----------------------------------------------------------------------


def self_signed_cert(
    directory: Path, names: list[str], valid_days: tuple[float, float] = (-1, 90)
) -> tuple[str, str]:
    """A self-signed (CA) certificate for DNS names and IP addresses `names`, valid
    from and until `valid_days` from now (by default from yesterday, for 90 days:
    no warning that it ends soon); written as PEM into `directory`. Returns
    (cert file, key file)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"loopwatch test {names[0]}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=valid_days[0]))
        .not_valid_after(now + datetime.timedelta(days=valid_days[1]))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    return str(cert_file), str(key_file)


def server_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx
