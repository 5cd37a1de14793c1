"""The benchmarks' echo backend: one lean process, uvloop + a raw asyncio protocol.

    python -m tests.benchmarks.backend [--port 0]

Prints one JSON line `{"event": "listening", "port": N}` on stdout, then serves
until SIGTERM. It is deliberately cheap so that the proxies, not the backend,
dominate what the harness measures; it is the same process behind every target.

Paths (of the upgrade request; the query string is ignored):

* `/loop…`     101, then at once close 1008 "backend: auth failed" (an auth
               loop's backend); the TCP connection closes on the client's
               close reply or after 2 s.
* `/refuse`    HTTP 429 + Retry-After, then close (the direct path's refusal).
* `/__stats`   (plain GET) JSON counters: upgrades per kind.
* anything else  a WebSocket echo: every data frame back with the same opcode
               and FIN bit, ping answered with pong, close answered with the
               same close payload, then TCP close.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import signal
import sys

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_ACCEPT: dict[bytes, bytes] = {}
STATS = {"echo": 0, "loop": 0, "refuse": 0, "http": 0}

CLOSE_1008 = b"\x88" + bytes([2 + len(b"backend: auth failed")]) + (1008).to_bytes(2, "big") + b"backend: auth failed"
REFUSE = (
    b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 5\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 8\r\nConnection: close\r\n\r\nrefused\n"
)
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def accept_key(key: bytes) -> bytes:
    value = _ACCEPT.get(key)
    if value is None:
        value = base64.b64encode(hashlib.sha1(key + GUID).digest())
        if len(_ACCEPT) < 10_000:
            _ACCEPT[key] = value
    return value


def unmask(payload: bytes | bytearray | memoryview, mask: bytes) -> bytes:
    n = len(payload)
    if n == 0:
        return b""
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


def header(b0: int, n: int) -> bytes:
    if n < 126:
        return bytes((b0, n))
    if n < 65536:
        return bytes((b0, 126)) + n.to_bytes(2, "big")
    return bytes((b0, 127)) + n.to_bytes(8, "big")


class Conn(asyncio.Protocol):
    __slots__ = ("transport", "buf", "need", "ws", "loop_mode", "timer")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.need = 0  # bytes the buffered partial frame needs before it is worth parsing
        self.ws = False
        self.loop_mode = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def data_received(self, data: bytes) -> None:
        if self.ws:
            self.frames(data)
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > 65536:
                self.transport.close()  # type: ignore[union-attr]
            return
        head = bytes(self.buf[:end])
        rest = self.buf[end + 4 :]
        self.buf = bytearray()
        line, _, fields = head.partition(b"\r\n")
        parts = line.split(b" ")
        path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b"/"
        lower = fields.lower()
        t = self.transport
        assert t is not None
        i = lower.find(b"sec-websocket-key:")
        if i < 0:
            STATS["http"] += 1
            if path == b"/__stats":
                body = json.dumps(STATS).encode()
                t.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                    b"Connection: close\r\n\r\n%s" % (len(body), body)
                )
            elif path == b"/refuse":
                STATS["refuse"] += 1
                t.write(REFUSE)
            else:
                t.write(NOT_FOUND)
            t.close()
            return
        if path == b"/refuse":
            STATS["refuse"] += 1
            t.write(REFUSE)
            t.close()
            return
        j = lower.find(b"\r\n", i)
        key = fields[i + 18 : j if j >= 0 else len(fields)].strip()
        response = (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_key(key) + b"\r\n\r\n"
        )
        self.ws = True
        if path.startswith(b"/loop"):
            STATS["loop"] += 1
            self.loop_mode = True
            t.write(response + CLOSE_1008)
            self.timer = asyncio.get_running_loop().call_later(2.0, t.close)
        else:
            STATS["echo"] += 1
            t.write(response)
        if rest:
            self.frames(bytes(rest))

    def frames(self, data: bytes) -> None:
        buf = self.buf
        if buf:
            buf += data
            if len(buf) < self.need:
                return
            data = bytes(buf)
        n = len(data)
        need = 0
        pos = 0
        out = []
        t = self.transport
        assert t is not None
        closing = False
        while n - pos >= 2:
            b0 = data[pos]
            b1 = data[pos + 1]
            length = b1 & 0x7F
            hl = 2
            if length == 126:
                if n - pos < 4:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 4], "big")
                hl = 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                hl = 10
            masked = b1 & 0x80
            if masked:
                hl += 4
            end = pos + hl + length
            if end > n:
                need = end - pos
                break
            payload = data[pos + hl : end]
            if masked:
                payload = unmask(payload, data[pos + hl - 4 : pos + hl])
            opcode = b0 & 0x0F
            pos = end
            if opcode == 0x8:
                if not self.loop_mode:
                    out.append(header(0x88, len(payload)))
                    out.append(payload)
                closing = True
                break
            if opcode == 0x9:
                out.append(header(0x8A, len(payload)))
                out.append(payload)
            elif opcode == 0xA:
                pass
            elif not self.loop_mode:
                out.append(header(b0 & 0x8F, len(payload)))
                out.append(payload)
        if out:
            t.write(b"".join(out) if len(out) > 1 else out[0])
        if closing:
            t.close()
            self.buf = bytearray()
            return
        if pos < n:
            self.buf = bytearray(data[pos:])
            self.need = need
        elif buf:
            self.buf = bytearray()


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Conn, "127.0.0.1", port, backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"event": "listening", "port": server.sockets[0].getsockname()[1]}), flush=True)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(main(args.port))
    except ImportError:  # pragma: no cover
        asyncio.run(main(args.port))
    sys.exit(0)
