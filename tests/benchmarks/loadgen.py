"""The benchmarks' load generator: one lean process, identical for every target.

    python -m tests.benchmarks.loadgen

Reads one JSON command a line on stdin, runs it, answers one JSON line on
stdout. uvloop, raw asyncio protocols, pre-built masked frames, no WebSocket
library: the generator must cost as little as possible per operation so that
it saturates the targets rather than itself. Connections opened by `hold` stay
open across commands until `release`.

Every operation is bounded in time (`max_s`) and in count. Echo replies are
counted by bytes (each echoed frame is the request frame minus its 4-byte mask
key: none of the targets re-frames a message); handshakes and closes are parsed.

Each command is `{"op": NAME, "host": ..., "port": ..., ...}`; ops: latency,
throughput, large, churn, refusal, pings, storm, detect, hold, release, quit.
churn, storm and detect take `sources`: their attempts then come from loopback
addresses of their own (churn: one of `sources` per attempt; storm: one per
looper; detect: one per run), for a target that keys clients by address.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import resource
import sys
import time
from collections.abc import Callable

MASK = b"\x37\xfa\x21\x3d"
WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
RUN_ID = f"{os.getpid():x}{int(time.time()) % 100000:x}"
_JWT_HEAD = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=").decode()
_RETRY_RE = re.compile(r"(\d+(?:\.\d+)?)")

now = time.perf_counter
now_ns = time.perf_counter_ns


# --- frames and requests ---------------------------------------------------


def _mask(payload: bytes) -> bytes:
    n = len(payload)
    if n == 0:
        return b""
    key = int.from_bytes((MASK * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


def masked_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + MASK + _mask(payload)


def echo_length(size: int) -> int:
    """Bytes of the unmasked echo of a `size`-byte message."""
    return size + (2 if size < 126 else 4 if size < 65536 else 10)


def close_frame(code: int, reason: bytes = b"") -> bytes:
    return masked_frame(code.to_bytes(2, "big") + reason, opcode=0x8)


CLOSE_1000 = close_frame(1000)


def token(sub: str) -> str:
    """An unsigned-looking JWT carrying `sub` (loopwatch's default identity reads
    jwt:sub without verifying it): one distinct client per token."""
    body = base64.urlsafe_b64encode(json.dumps({"sub": sub}).encode()).rstrip(b"=").decode()
    return f"{_JWT_HEAD}.{body}.c2ln"


def upgrade_request(host: str, port: int, path: str, sub: str | None = None) -> bytes:
    if sub is not None:
        path = f"{path}{'&' if '?' in path else '?'}token={token(sub)}"
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY.decode()}\r\n"
        f"Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    if not samples_ns:
        return {"count": 0}
    s = sorted(samples_ns)
    n = len(s)

    def q(p: float) -> float:
        return s[min(n - 1, int(p * (n - 1) + 0.5))] / 1000.0

    return {
        "count": n,
        "p50_us": q(0.50),
        "p90_us": q(0.90),
        "p99_us": q(0.99),
        "max_us": s[-1] / 1000.0,
        "mean_us": sum(s) / n / 1000.0,
    }


# --- an echo connection (byte-counted replies) ------------------------------


class EchoConn(asyncio.Protocol):
    """Handshake, then count reply bytes; `on_data` (if set) runs after each read."""

    __slots__ = (
        "request", "transport", "opened", "lost", "head", "open", "got", "target",
        "waiter", "on_data", "status",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, request: bytes):
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[int] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.head = bytearray()
        self.open = False
        self.got = 0
        self.target = 0
        self.waiter: asyncio.Future[None] | None = None
        self.on_data: Callable[[], None] | None = None
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.open:
            self.got += len(data)
            if self.waiter is not None and self.got >= self.target:
                waiter, self.waiter = self.waiter, None
                if not waiter.done():
                    waiter.set_result(None)
            if self.on_data is not None:
                self.on_data()
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            return
        try:
            self.status = int(self.head[9:12])
        except ValueError:
            self.status = -1
        if self.status == 101:
            self.open = True
            self.got = len(self.head) - end - 4
        self.head = bytearray()
        if not self.opened.done():
            self.opened.set_result(self.status)
        if self.status != 101:
            self.transport.close()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError("closed during the handshake"))
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection lost"))
        self.open = False
        if not self.lost.done():
            self.lost.set_result(None)

    async def echo(self, frame: bytes, reply_len: int, timeout: float = 5.0) -> None:
        """Send one frame and wait for its echo; TimeoutError after `timeout` s."""
        loop = asyncio.get_running_loop()
        self.target = self.got + reply_len
        waiter = self.waiter = loop.create_future()
        timer = loop.call_later(timeout, _expire, waiter)
        self.transport.write(frame)  # type: ignore[union-attr]
        try:
            await waiter
        finally:
            timer.cancel()


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


async def open_echo(host: str, port: int, path: str, sub: str | None, timeout: float = 10.0) -> EchoConn:
    loop = asyncio.get_running_loop()
    req = upgrade_request(host, port, path, sub)
    _, conn = await asyncio.wait_for(loop.create_connection(lambda: EchoConn(loop, req), host, port), timeout)
    status = await asyncio.wait_for(conn.opened, timeout)
    if status != 101:
        raise ConnectionError(f"handshake answered {status}")
    return conn  # type: ignore[return-value]


# --- a one-shot connection: handshake, maybe an echo, the close --------------


def parse_http_head(head: bytes) -> tuple[int, float | None]:
    try:
        status = int(head[9:12])
    except ValueError:
        return -1, None
    retry = None
    i = head.lower().find(b"\r\nretry-after:")
    if i >= 0:
        j = head.find(b"\r\n", i + 2)
        try:
            retry = float(head[i + 14 : j if j > 0 else None].strip())
        except ValueError:
            retry = None
    return status, retry


class Cycle(asyncio.Protocol):
    """One attempt: upgrade; on a 101 optionally one echo, then the close handshake.

    `result` resolves at connection_lost (or at once after the close reply when
    `fast_close`, like a client that reconnects from its close handler)."""

    __slots__ = (
        "request", "echo_frame", "echo_len", "fast_close", "result", "transport", "buf",
        "state", "status", "retry_after", "code", "reason", "echoed", "sent_close", "t_answer",
    )

    def __init__(self, request: bytes, result: asyncio.Future, echo_frame: bytes | None = None,
                 echo_len: int = 0, fast_close: bool = False):
        self.request = request
        self.echo_frame = echo_frame
        self.echo_len = echo_len
        self.fast_close = fast_close
        self.result = result
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.state = 0  # 0 head, 1 open, 2 closed
        self.status = 0
        self.retry_after: float | None = None
        self.code: int | None = None
        self.reason = ""
        self.echoed = False
        self.sent_close = False
        self.t_answer = 0.0  # when the status line (or the close frame) arrived

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        t = self.transport
        assert t is not None
        buf = self.buf + data if self.buf else data
        if self.state == 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            self.status, self.retry_after = parse_http_head(buf[:end])
            self.t_answer = now()
            buf = buf[end + 4 :]
            if self.status != 101:
                self.buf = b""
                self.state = 2
                t.close()
                return
            self.state = 1
            if self.echo_frame is not None:
                t.write(self.echo_frame)
        if self.state != 1:
            self.buf = b""
            return
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b1 = buf[pos + 1] & 0x7F
            hl = 2
            if b1 == 126:
                if n - pos < 4:
                    break
                b1 = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                hl = 4
            elif b1 == 127:
                if n - pos < 10:
                    break
                b1 = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                hl = 10
            end = pos + hl + b1
            if end > n:
                break
            opcode = buf[pos] & 0x0F
            payload = buf[pos + hl : end]
            pos = end
            if opcode == 0x8:
                self.code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.reason = payload[2:].decode("utf-8", "replace")
                self.t_answer = now()
                if not self.sent_close:
                    self.sent_close = True
                    t.write(close_frame(self.code if self.code not in (1005, 1006) else 1000))
                self.state = 2
                if self.fast_close:
                    t.close()
                    if not self.result.done():
                        self.result.set_result(self)
                break
            if opcode in (0x1, 0x2, 0x0) and self.echo_frame is not None and not self.echoed:
                self.echoed = True
                self.sent_close = True
                t.write(CLOSE_1000)
        self.buf = buf[pos:] if pos < n and self.state == 1 else b""

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.result.done():
            self.result.set_result(self)

    # outcome helpers
    def refused(self) -> bool:
        return self.status in (429, 503) or (self.status == 101 and self.code == 1013)

    def reached_backend(self) -> bool:
        return self.status == 101 and self.code == 1008 and self.reason.startswith("backend")

    def cooldown_end(self) -> float | None:
        """When a refusal says the client may retry (perf_counter seconds); None if it
        does not say. A Retry-After header is whole seconds rounded up, so 1 s of it
        is slack; a 1013 reason gives the time in its text."""
        if self.status != 101 and self.retry_after is not None:
            return self.t_answer + max(0.0, self.retry_after - 1.0)
        if self.status == 101 and self.code == 1013:
            m = _RETRY_RE.search(self.reason)
            if m:
                value = float(m.group(1))
                if "ms" in self.reason[m.end() : m.end() + 3]:
                    value /= 1000.0
                return self.t_answer + max(0.0, value - 0.05)
        return None


def source_address(block: int, i: int) -> str:
    """The i-th loopback address of a block, 127.BLOCK.x.y (Linux routes all of
    127/8 to lo): with `sources`, each attempt comes from its own address, a fleet
    of clients for a target that keys clients by address."""
    return f"127.{block}.{i // 250 % 250}.{i % 250 + 1}"


async def one_cycle(host: str, port: int, request: bytes, timeout: float, source: str | None = None,
                    **kw) -> Cycle | None:
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    proto: Cycle | None = None

    def factory() -> Cycle:
        nonlocal proto
        proto = Cycle(request, fut, **kw)
        return proto

    timer = loop.call_later(timeout, _expire, fut)
    try:
        # loopback: at once, or refused
        await loop.create_connection(factory, host, port, local_addr=(source, 0) if source else None)
        return await fut
    except (OSError, TimeoutError):
        if proto is not None and proto.transport is not None:
            proto.transport.abort()
        return None
    finally:
        timer.cancel()


# --- operations ----------------------------------------------------------------


async def op_latency(c: dict) -> dict:
    """Scenario 1: one connection, sequential echoes of `size` bytes."""
    conn = await open_echo(c["host"], c["port"], c.get("path", "/echo"), f"lat-{RUN_ID}-{c.get('tag', 0)}")
    frame, reply = masked_frame(os.urandom(c.get("size", 32))), echo_length(c.get("size", 32))
    samples: list[int] = []
    errors = 0
    deadline = now() + c.get("max_s", 30)
    t0 = now()
    try:
        for _ in range(c["n"]):
            if now() > deadline:
                break
            s = now_ns()
            await conn.echo(frame, reply, 5.0)
            samples.append(now_ns() - s)
    except (ConnectionError, TimeoutError):
        errors += 1
    elapsed = now() - t0
    await close_conns([conn])
    return {"ops": len(samples), "errors": errors, "elapsed_s": elapsed, **percentiles(samples)}


async def close_conns(conns: list[EchoConn], timeout: float = 5.0) -> int:
    for conn in conns:
        if conn.transport is not None and not conn.transport.is_closing():
            conn.transport.write(CLOSE_1000)
    pending = [conn.lost for conn in conns if not conn.lost.done()]
    if pending:
        _, still = await asyncio.wait(pending, timeout=timeout)
        for conn in conns:
            if not conn.lost.done() and conn.transport is not None:
                conn.transport.abort()
        return len(conns) - len(still)
    return len(conns)


async def op_throughput(c: dict) -> dict:
    """Scenario 2: `conns` connections, `msgs` echoes each, `window` in flight per connection."""
    host, port, path = c["host"], c["port"], c.get("path", "/echo")
    size, total, window = c.get("size", 32), c["msgs"], c.get("window", 64)
    conns = await asyncio.gather(
        *(open_echo(host, port, path, f"tp-{RUN_ID}-{c.get('tag', 0)}-{i}") for i in range(c["conns"]))
    )
    frame, reply = masked_frame(os.urandom(size)), echo_length(size)
    batches = [frame * k for k in range(window + 1)]
    loop = asyncio.get_running_loop()
    finished: list[asyncio.Future[None]] = []

    def pump(conn: EchoConn) -> None:
        done = loop.create_future()
        finished.append(done)
        sent = min(window, total)
        state = [sent]

        def on_data() -> None:
            completed = conn.got // reply
            if completed >= total:
                if not done.done():
                    done.set_result(None)
                return
            k = min(completed + window, total) - state[0]
            if k > 0:
                conn.transport.write(batches[k] if k <= window else frame * k)  # type: ignore[union-attr]
                state[0] += k

        conn.on_data = on_data
        conn.lost.add_done_callback(lambda _: done.done() or done.set_exception(ConnectionError("lost")))
        conn.transport.write(batches[sent])  # type: ignore[union-attr]

    t0 = now()
    for conn in conns:
        pump(conn)
    _, pending = await asyncio.wait(finished, timeout=c.get("max_s", 30))
    elapsed = now() - t0
    echoed = sum(min(conn.got // reply, total) for conn in conns)
    errors = sum(1 for f in finished if f.done() and f.exception() is not None)
    for f in finished:
        if f.done():
            f.exception()  # retrieved
    for conn in conns:
        conn.on_data = None
    await close_conns(list(conns))
    return {
        "ops": echoed, "errors": errors, "timed_out": len(pending), "elapsed_s": elapsed,
        "rate": echoed / elapsed if elapsed > 0 else 0.0,
    }


async def op_large(c: dict) -> dict:
    """Scenario 3: one connection, sequential echoes of `size` bytes (1 MiB)."""
    size = c.get("size", 1 << 20)
    conn = await open_echo(c["host"], c["port"], c.get("path", "/echo"), f"big-{RUN_ID}-{c.get('tag', 0)}")
    frame, reply = masked_frame(os.urandom(size)), echo_length(size)
    samples: list[int] = []
    errors = 0
    deadline = now() + c.get("max_s", 30)
    t0 = now()
    try:
        for _ in range(c["n"]):
            if now() > deadline:
                break
            s = now_ns()
            await conn.echo(frame, reply, 10.0)
            samples.append(now_ns() - s)
    except (ConnectionError, TimeoutError):
        errors += 1
    elapsed = now() - t0
    await close_conns([conn])
    mib = len(samples) * size / (1 << 20)
    return {
        "ops": len(samples), "mib": mib, "errors": errors, "elapsed_s": elapsed,
        "rate": mib / elapsed if elapsed > 0 else 0.0, **percentiles(samples),
    }


async def _cycle_workers(c: dict, make: Callable[[int], tuple[bytes, dict]], classify: Callable[[Cycle | None], str]) -> dict:
    """`workers` loops of one-shot connections for `max_s` seconds or `max_ops` attempts."""
    host, port = c["host"], c["port"]
    deadline = now() + c.get("max_s", 5.0)
    max_ops = c.get("max_ops", 1_000_000)
    counter = [0]
    outcomes: dict[str, int] = {}
    samples: list[int] = []

    async def worker() -> None:
        while now() < deadline and counter[0] < max_ops:
            i = counter[0]
            counter[0] += 1
            request, kw = make(i)
            s = now_ns()
            cyc = await one_cycle(host, port, request, c.get("cycle_timeout", 5.0), **kw)
            kind = classify(cyc)
            outcomes[kind] = outcomes.get(kind, 0) + 1
            if kind == "ok":
                samples.append(now_ns() - s)
            elif kind == "error":
                await asyncio.sleep(0.005)

    t0 = now()
    await asyncio.gather(*(worker() for _ in range(c.get("workers", 20))))
    elapsed = now() - t0
    ok = outcomes.get("ok", 0)
    return {
        "ops": ok, "attempts": counter[0], "outcomes": outcomes,
        "errors": counter[0] - ok, "elapsed_s": elapsed,
        "rate": ok / elapsed if elapsed > 0 else 0.0, **percentiles(samples),
    }


async def op_churn(c: dict) -> dict:
    """Scenario 4: connect + handshake + one echo + close 1000, `workers` in parallel.
    Every attempt carries its own client identity (a fleet of clients connecting once)."""
    host, port, path = c["host"], c["port"], c.get("path", "/echo")
    frame, reply = masked_frame(os.urandom(32)), echo_length(32)
    prefix = f"churn-{RUN_ID}-{c.get('tag', 0)}-"

    sources = c.get("sources", 0)

    def make(i: int) -> tuple[bytes, dict]:
        kw = {"echo_frame": frame, "echo_len": reply}
        if sources:
            kw["source"] = source_address(4, i % sources)
        return upgrade_request(host, port, path, prefix + str(i)), kw

    def classify(cyc: Cycle | None) -> str:
        if cyc is None:
            return "error"
        if cyc.status == 101 and cyc.echoed and cyc.code == 1000:
            return "ok"
        return f"status{cyc.status}/code{cyc.code}"

    return await _cycle_workers(c, make, classify)


async def op_refusal(c: dict) -> dict:
    """Scenario 5: attempts the target refuses (HTTP 429, or 101 + close 1013)."""
    host, port, path = c["host"], c["port"], c.get("path", "/refuse")
    request = upgrade_request(host, port, path)
    expect = c.get("expect", "http")

    def make(i: int) -> tuple[bytes, dict]:
        return request, {}

    def classify(cyc: Cycle | None) -> str:
        if cyc is None:
            return "error"
        if expect == "http" and cyc.status == 429:
            return "ok"
        if expect == "close" and cyc.status == 101 and cyc.code == 1013:
            return "ok"
        return f"status{cyc.status}/code{cyc.code}"

    return await _cycle_workers(c, make, classify)


async def op_pings(c: dict) -> dict:
    """Scenario 6's healthy clients: `clients` long-lived connections, each echoing
    32 bytes every `interval` s for `duration` s. Any failed echo is an error."""
    host, port, path = c["host"], c["port"], c.get("path", "/echo")
    conns = await asyncio.gather(
        *(open_echo(host, port, path, f"healthy-{RUN_ID}-{c.get('tag', 0)}-{i}") for i in range(c["clients"]))
    )
    frame, reply = masked_frame(os.urandom(32)), echo_length(32)
    samples: list[int] = []
    errors = [0]
    interval = c.get("interval", 0.01)
    t_start = now() + c.get("settle_s", 0.2)
    deadline = t_start + c["duration"]

    async def pinger(conn: EchoConn) -> None:
        while now() < deadline:
            s = now_ns()
            try:
                await conn.echo(frame, reply, 2.0)
            except (ConnectionError, TimeoutError):
                errors[0] += 1
                return
            if now() >= t_start:
                samples.append(now_ns() - s)
            await asyncio.sleep(interval)

    await asyncio.gather(*(pinger(conn) for conn in conns))
    closed = await close_conns(list(conns))
    return {
        "ops": len(samples), "errors": errors[0] + (len(conns) - closed),
        "elapsed_s": c["duration"], **percentiles(samples),
    }


async def op_storm(c: dict) -> dict:
    """Scenario 6's looping clients: `loopers` clients, each reconnecting at once after
    every close or refusal (an auth loop against /loop) for `duration` s.

    Records per looper when a refusal said it may retry; an attempt that started
    before that time and still reached the backend is a leak."""
    host, port = c["host"], c["port"]
    await asyncio.sleep(c.get("start_delay", 0.0))
    deadline = now() + c["duration"]
    max_ops = c.get("max_ops", 500_000)
    counter = [0]
    totals = {"attempts": 0, "reached": 0, "refused": 0, "other": 0, "errors": 0, "leaks": 0}

    async def looper(i: int) -> None:
        request = upgrade_request(host, port, "/loop", f"loop-{RUN_ID}-{c.get('tag', 0)}-{i}")
        source = source_address(2, i) if c.get("sources") else None
        cooldown_until = 0.0
        while now() < deadline and counter[0] < max_ops:
            counter[0] += 1
            started = now()
            cyc = await one_cycle(host, port, request, 5.0, source=source, fast_close=True)
            totals["attempts"] += 1
            if cyc is None:
                totals["errors"] += 1
                await asyncio.sleep(0.005)
            elif cyc.reached_backend():
                totals["reached"] += 1
                if started < cooldown_until:
                    totals["leaks"] += 1
            elif cyc.refused():
                totals["refused"] += 1
                end = cyc.cooldown_end()
                if end is not None:
                    cooldown_until = max(cooldown_until, end)
            else:
                totals["other"] += 1

    t0 = now()
    await asyncio.gather(*(looper(i) for i in range(c["loopers"])))
    elapsed = now() - t0
    return {**totals, "ops": totals["attempts"], "elapsed_s": elapsed,
            "rate": totals["attempts"] / elapsed if elapsed > 0 else 0.0}


async def op_detect(c: dict) -> dict:
    """Scenario 7: one client in a 20/s auth loop (the backend closes 1008 at once);
    attempts and seconds from its first attempt to the first attempt refused (sent
    then, decided on arrival), and to that refusal's answer (later by any hold)."""
    host, port = c["host"], c["port"]
    rate = c.get("rate", 20.0)
    request = upgrade_request(host, port, "/loop", f"detect-{RUN_ID}-{c.get('tag', 0)}")
    source = source_address(3, c.get("tag", 0)) if c.get("sources") else None  # a fresh key each run
    t0 = now()
    attempts = 0
    reached = 0
    outcome: dict = {"refused_at_attempt": None, "refused_after_s": None}
    while attempts < c.get("max_attempts", 60) and now() - t0 < c.get("max_s", 3.0):
        wait = t0 + attempts / rate - now()
        if wait > 0:
            await asyncio.sleep(wait)
        attempts += 1
        sent = now()
        cyc = await one_cycle(host, port, request, 5.0, source=source)
        if cyc is not None and cyc.refused():
            # Refused when it arrived: loopwatch decides at admission. With the hold
            # (policy.hold) the answer itself comes up to the hold later, by design.
            outcome = {"refused_at_attempt": attempts, "refused_after_s": sent - t0,
                       "answered_after_s": cyc.t_answer - t0,
                       "how": "http" if cyc.status != 101 else f"close-{cyc.code}", "reason": cyc.reason}
            break
        if cyc is not None and cyc.reached_backend():
            reached += 1
    return {"attempts": attempts, "reached": reached, "elapsed_s": now() - t0, "ops": attempts, **outcome}


HELD: list[EchoConn] = []


async def op_hold(c: dict) -> dict:
    """Scenario 8: open `n` more idle WebSockets (`concurrency` handshakes at a time) and keep them."""
    host, port, path = c["host"], c["port"], c.get("path", "/echo")
    sem = asyncio.Semaphore(c.get("concurrency", 100))
    errors = [0]
    kinds: dict[str, int] = {}
    base = len(HELD)
    deadline = now() + c.get("max_s", 60)

    async def one(i: int) -> None:
        async with sem:
            if now() > deadline:
                errors[0] += 1
                return
            try:
                HELD.append(await open_echo(host, port, path, f"idle-{RUN_ID}-{c.get('tag', 0)}-{base + i}"))
            except (OSError, ConnectionError, TimeoutError) as e:
                errors[0] += 1
                kind = f"{type(e).__name__}: {e}"[:80]
                kinds[kind] = kinds.get(kind, 0) + 1

    t0 = now()
    await asyncio.gather(*(one(i) for i in range(c["n"])))
    alive = sum(1 for conn in HELD if conn.open)
    return {"ops": len(HELD) - base, "held": alive, "errors": errors[0], "error_kinds": kinds,
            "elapsed_s": now() - t0}


async def op_release(c: dict) -> dict:
    t0 = now()
    conns = list(HELD)
    HELD.clear()
    closed = await close_conns(conns, timeout=c.get("max_s", 30))
    return {"ops": closed, "errors": len(conns) - closed, "elapsed_s": now() - t0}


OPS = {
    "latency": op_latency, "throughput": op_throughput, "large": op_large, "churn": op_churn,
    "refusal": op_refusal, "pings": op_pings, "storm": op_storm, "detect": op_detect,
    "hold": op_hold, "release": op_release,
}


async def serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"event": "ready", "pid": os.getpid()}), flush=True)
    while True:
        line = await reader.readline()
        if not line:
            return
        command = json.loads(line)
        if command.get("op") == "quit":
            return
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        try:
            result = await OPS[command["op"]](command)
        except Exception as e:  # reported, not fatal: the harness decides
            result = {"failed": f"{type(e).__name__}: {e}"}
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        result["loadgen_cpu_s"] = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


def main() -> None:
    try:
        import uvloop

        uvloop.run(serve())
    except ImportError:  # pragma: no cover
        asyncio.run(serve())


if __name__ == "__main__":
    main()
