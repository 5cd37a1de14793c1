"""WebSocket on raw sockets, for tests that must see every byte.

A hand-written frame encoder and decoder (sharing no code with proxy/dataplane/frames.py
or any WebSocket library), a raw client that performs the upgrade through
loopwatch and then reads and writes bytes, and a raw backend that answers the
upgrade with a 101 computed by hand and records every byte it receives.
Used by tests/test_fidelity.py and tests/test_backpressure.py; `blocking_exchange` by tests
that talk on blocking sockets (tests/test_autobahn.py, tests/test_prometheus_e2e.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def xor(payload: bytes, key: bytes) -> bytes:
    """RFC 6455 §5.3 masking (its own inverse)."""
    n = len(payload)
    if n == 0:
        return b""
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def frame(
    opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, mask: bytes | None = None
) -> bytes:
    """One frame; ``mask`` is the 4-byte key (client frames) or None (server frames)."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    mbit = 0x80 if mask is not None else 0
    if n < 126:
        head = bytes((b0, mbit | n))
    elif n < 1 << 16:
        head = bytes((b0, mbit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, mbit | 127)) + n.to_bytes(8, "big")
    if mask is None:
        return head + payload
    return head + mask + xor(payload, mask)


def close_payload(code: int, reason: str = "") -> bytes:
    return code.to_bytes(2, "big") + reason.encode()


@dataclass
class Frame:
    fin: bool
    rsv: int
    opcode: int
    payload: bytes  # unmasked
    mask: bytes | None
    raw: bytes  # the frame's bytes as they were on the wire

    @property
    def close(self) -> tuple[int | None, str]:
        assert self.opcode == CLOSE
        if not self.payload:
            return None, ""
        return int.from_bytes(self.payload[:2], "big"), self.payload[2:].decode()


def parse_frames(data: bytes | bytearray) -> tuple[list[Frame], int]:
    """Every complete frame at the start of ``data``, and how many bytes they span."""
    frames: list[Frame] = []
    pos = 0
    n = len(data)
    while n - pos >= 2:
        b0, b1 = data[pos], data[pos + 1]
        ln = b1 & 0x7F
        hs = 2
        if ln == 126:
            if n - pos < 4:
                break
            ln = int.from_bytes(data[pos + 2 : pos + 4], "big")
            hs = 4
        elif ln == 127:
            if n - pos < 10:
                break
            ln = int.from_bytes(data[pos + 2 : pos + 10], "big")
            hs = 10
        key = None
        if b1 & 0x80:
            if n - pos < hs + 4:
                break
            key = bytes(data[pos + hs : pos + hs + 4])
            hs += 4
        end = pos + hs + ln
        if end > n:
            break
        payload = bytes(data[pos + hs : end])
        if key is not None:
            payload = xor(payload, key)
        frames.append(Frame(bool(b0 & 0x80), (b0 >> 4) & 7, b0 & 0x0F, payload, key, bytes(data[pos:end])))
        pos = end
    return frames, pos


def messages_of(frames: list[Frame]) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each data message, fragments joined; control frames skipped."""
    out: list[tuple[int, bytes]] = []
    current: tuple[int, bytearray] | None = None
    for f in frames:
        if f.opcode >= 8:
            continue
        if f.opcode != CONT:
            current = (f.opcode, bytearray(f.payload))
        else:
            assert current is not None, "continuation without a message"
            current[1].extend(f.payload)
        if f.fin:
            assert current is not None
            out.append((current[0], bytes(current[1])))
            current = None
    return out


def accept(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def request_key(head: bytes) -> bytes:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            return value.strip()
    raise AssertionError(f"no Sec-WebSocket-Key in {head!r}")


def blocking_exchange(sock: socket.socket, request: bytes) -> bytes:
    """Send `request` on a blocking socket and read the answer's head: up to its
    blank line (and whatever came with it), or what came before the peer closed."""
    sock.sendall(request)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return head


def upgrade_head(port: int, path: str = "/", extra: bytes = b"") -> tuple[bytes, bytes]:
    """A client upgrade request and the Sec-WebSocket-Accept it must get back."""
    key = base64.b64encode(os.urandom(16))
    head = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    ).encode() + b"Sec-WebSocket-Key: " + key + b"\r\n" + extra + b"\r\n"
    return head, accept(key)


class RawClient:
    """A WebSocket client on a plain TCP socket: after the 101, bytes only."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, response: bytes):
        self.reader = reader
        self.writer = writer
        self.response = response  # the 101 head as received
        self.buffer = bytearray()  # bytes read after the 101 and not yet consumed

    @classmethod
    async def connect(
        cls,
        port: int,
        path: str = "/",
        *,
        extra: bytes = b"",
        rcvbuf: int | None = None,
        early: bytes = b"",
        eof: bool = False,
    ) -> RawClient:
        """Connect and upgrade; `early` goes out in the same write as the request,
        then with `eof` the writing half is shut before the 101 is read."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect, so the window is small from the start
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        head, expected_accept = upgrade_head(port, path, extra)
        writer.write(head + early)
        if eof:
            writer.write_eof()
        response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert response.startswith(b"HTTP/1.1 101 "), response
        assert b"Sec-WebSocket-Accept: " + expected_accept in response, response
        return cls(reader, writer, response)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_bytes(self, n: int, timeout: float = 10.0) -> bytes:
        """Exactly ``n`` bytes after the 101."""
        while len(self.buffer) < n:
            chunk = await asyncio.wait_for(self.reader.read(1 << 20), timeout)
            if not chunk:
                raise AssertionError(f"EOF after {len(self.buffer)} of {n} bytes")
            self.buffer += chunk
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    async def read_frame(self, timeout: float = 10.0) -> Frame:
        while True:
            frames, used = parse_frames(self.buffer[: 1 << 26])
            if frames:
                first = frames[0]
                del self.buffer[: len(first.raw)]
                return first
            chunk = await asyncio.wait_for(self.reader.read(1 << 20), timeout)
            if not chunk:
                raise AssertionError(f"EOF with {len(self.buffer)} bytes of an incomplete frame")
            self.buffer += chunk

    async def read_to_eof(self, timeout: float = 10.0) -> bytes:
        """Everything up to the proxy closing the connection."""
        while chunk := await asyncio.wait_for(self.reader.read(1 << 20), timeout):
            self.buffer += chunk
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    def abort(self) -> None:
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


class RawBackendConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes):
        self.reader = reader
        self.writer = writer
        self.head = head  # the upgrade request as the backend received it
        self.received = bytearray()  # every byte after the request head
        self.eof = asyncio.Event()
        self.reading = asyncio.Event()  # cleared: the backend stops reading
        self.reading.set()
        self.changed = asyncio.Event()
        self.closed = asyncio.Event()  # set by close()

    def close(self) -> None:
        self.writer.close()
        self.closed.set()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def wait_bytes(self, n: int, timeout: float = 10.0) -> bytes:
        """Wait until at least ``n`` bytes arrived; all received so far."""

        async def go() -> None:
            while len(self.received) < n:
                if self.eof.is_set():
                    raise AssertionError(
                        f"EOF after {len(self.received)} of {n} bytes: {bytes(self.received[:200])!r}"
                    )
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(go(), timeout)
        return bytes(self.received)

    async def wait_eof(self, timeout: float = 10.0) -> bytes:
        await asyncio.wait_for(self.eof.wait(), timeout)
        return bytes(self.received)


class RawBackend:
    """A TCP server that answers each upgrade with a hand-computed 101 (plus
    ``extensions``, e.g. b"permessage-deflate") and records every byte after it."""

    def __init__(self, extensions: bytes | None = None, greeting: bytes = b"", close_on_eof: bool = True):
        self.extensions = extensions
        self.greeting = greeting  # bytes sent in the same write as the 101
        self.close_on_eof = close_on_eof  # False: a half-closed connection stays writable
        self.connections: asyncio.Queue[RawBackendConnection] = asyncio.Queue()
        self.url = ""
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            extra = b""
            if self.extensions is not None:
                extra = b"Sec-WebSocket-Extensions: " + self.extensions + b"\r\n"
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + accept(request_key(head)) + b"\r\n" + extra + b"\r\n"
                + self.greeting
            )
            conn = RawBackendConnection(reader, writer, head)
            await self.connections.put(conn)
            try:
                while True:
                    await conn.reading.wait()
                    chunk = await reader.read(1 << 20)
                    if not chunk:
                        break
                    conn.received += chunk
                    conn.changed.set()
            finally:
                conn.eof.set()
                conn.changed.set()
            if not self.close_on_eof:
                await conn.closed.wait()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def accept(self, timeout: float = 5.0) -> RawBackendConnection:
        return await asyncio.wait_for(self.connections.get(), timeout)

    async def __aenter__(self) -> RawBackend:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()


@contextlib.asynccontextmanager
async def raw_backend(
    extensions: bytes | None = None, greeting: bytes = b"", close_on_eof: bool = True
) -> AsyncIterator[RawBackend]:
    async with RawBackend(extensions, greeting, close_on_eof) as backend:
        yield backend
