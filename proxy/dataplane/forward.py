"""Plain HTTP requests (REST calls, token refresh) forwarded to the upstream.

The request body streams from the client to aiohttp's client with
backpressure (client reading pauses while a chunk is unconsumed), and the
response streams back as it arrives: status, reason and end-to-end headers as
the upstream sent them, the body unchanged (no decompression).

Every phase of an exchange has a timeout (`Phase`): the client's request body
(limits.body_timeout, 408), the upstream's response head once the request is
sent (limits.response_timeout, 504), and the response body, upstream silent or
client not reading (limits.response_idle_timeout: the response is under way,
so the connection is cut). One timer per exchange, re-armed only when it fires:
progress is a timestamp, not a timer per chunk.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from .heads import RequestHead, end_to_end, simple_response
from .states import IllegalTransition, successors

if TYPE_CHECKING:
    import aiohttp

    from .listener import ClientHandshake
    from .routing import Route

log = logging.getLogger("loopwatch.forward")

BODY_BUFFER = 64 * 1024  # bytes of request body held before the client is paused
# Pooled connections tried per request before giving up (each one tried is closed).
CHECKOUT_TRIES = 16
NO_BODY_STATUSES = frozenset({204, 304})


class Phase(enum.StrEnum):
    """Where an exchange is, and so which timeout watches it."""

    BODY = "body"  # the client still owes request body bytes
    AWAIT_HEAD = "await_head"  # the request is complete: waiting for the upstream's response head
    RESPONSE = "response"  # the response head went to the client; its body streams
    DONE = "done"  # answered, failed, timed out or the client left


PHASE_TRANSITIONS: frozenset[tuple[Phase, Phase]] = frozenset({
    (Phase.BODY, Phase.AWAIT_HEAD),  # the request body ended
    (Phase.BODY, Phase.RESPONSE),  # an upstream may answer before the body ends (413, 401 …)
    (Phase.BODY, Phase.DONE),
    (Phase.AWAIT_HEAD, Phase.RESPONSE),
    (Phase.AWAIT_HEAD, Phase.DONE),
    (Phase.RESPONSE, Phase.DONE),
})  # fmt: skip
PHASE_NEXT = successors(Phase, PHASE_TRANSITIONS)  # what a move checks (states.py)


def checked_connector(**kwargs: Any) -> aiohttp.TCPConnector:
    """aiohttp's connector, but a pooled connection that received anything while
    idle (a response nobody asked for, queued by aiohttp's parser: aiohttp issue
    13656) is closed at checkout, not handed to the next request as its answer."""
    import aiohttp

    class CheckedConnector(aiohttp.TCPConnector):
        async def connect(self, *args: Any, **kw: Any) -> aiohttp.connector.Connection:
            for _ in range(CHECKOUT_TRIES):
                conn = await super().connect(*args, **kw)
                protocol = conn.protocol
                if protocol is None or not protocol.should_close:
                    return conn
                conn.close()  # not released: closed, so the next try gets another one
            raise aiohttp.ClientConnectionError("upstream connections keep sending unasked")

    return CheckedConnector(**kwargs)


class HttpExchange:
    """One request/response pair, driven by the client connection's parser."""

    def __init__(self, conn: ClientHandshake, head: RequestHead, route: Route):
        self.conn = conn
        self.head = head
        self.route = route
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.ended = False
        self.gone = False
        self.started = False  # the response head went out: a failure can only abort now
        self.wakeup: asyncio.Event = asyncio.Event()
        loop = conn.server.loop
        self.loop = loop
        self.phase = Phase.BODY  # where every exchange starts; enter() below moves on if it has no body
        self.last = loop.time()  # the latest progress of the current phase
        self.timer: asyncio.TimerHandle | None = None
        parser = conn.parser
        parser.body_sink = self.body
        parser.complete_sink = self.body_done
        for chunk in parser.early_body:  # body bytes that arrived with the head
            self.body(chunk)
        parser.early_body.clear()
        self.has_body = (
            head.get(b"content-length") not in (None, b"0") or head.get(b"transfer-encoding") is not None
        )
        if parser.message_done:
            self.ended = True
        self.enter(Phase.BODY if self.has_body and not self.ended else Phase.AWAIT_HEAD)
        # "Expect: 100-continue": loopwatch answers it once the upstream wants the
        # body (aiohttp would wait for the upstream's own 100 and never pass it on).
        self.expect_continue = (
            self.has_body
            and not self.ended
            and not self.buffered
            and head.version == "1.1"
            and b"100-continue" in head.tokens(b"expect")
        )
        self.task = conn.server.loop.create_task(self.run())

    # --- phases and their timeouts ------------------------------------------

    def _to(self, phase: Phase) -> None:
        if phase not in PHASE_NEXT[self.phase]:
            raise IllegalTransition("http exchange", self.phase, phase)
        self.phase = phase

    def enter(self, phase: Phase) -> None:
        """Move to `phase` (see PHASE_TRANSITIONS) and watch it with its own timeout.
        Entering the phase it is in again only arms its timer if none is armed
        (the first phase, and DONE from wherever the exchange ends)."""
        if phase is self.phase:
            if self.timer is not None:
                return
        else:
            self._to(phase)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if phase is not Phase.DONE:
            self.last = self.loop.time()
            self.timer = self.loop.call_later(self.timeout(), self.on_timer)

    def timeout(self) -> float:
        server = self.conn.server
        if self.phase is Phase.BODY:
            return server.body_timeout
        if self.phase is Phase.AWAIT_HEAD:
            return server.response_timeout
        return server.response_idle_timeout

    def on_timer(self) -> None:
        self.timer = None
        if self.phase is Phase.DONE:
            return
        limit = self.timeout()
        idle = self.loop.time() - self.last
        if idle < limit:  # progress since it was armed: wait for what is left
            self.timer = self.loop.call_later(limit - idle, self.on_timer)
            return
        self.expire()

    def expire(self) -> None:
        """The phase made no progress for its timeout: answer or cut, and cancel
        the upstream request, which closes its connection (the backend's slot)."""
        phase = self.phase
        # Paused by loopwatch because the upstream is not taking the body: its fault.
        upstream_stalled = phase is Phase.BODY and self.buffered > BODY_BUFFER
        self.enter(Phase.DONE)
        self.task.cancel()
        conn = self.conn
        if phase is Phase.RESPONSE:
            conn.server.rejected("response_timeout", None, conn.peer, "loopwatch: response stalled")
            if conn.transport is not None:
                conn.transport.abort()  # mid-response: nothing honest to add
            conn.finish()
        elif phase is Phase.BODY and not upstream_stalled:
            conn.fail(408, "loopwatch: request body timeout", reason="body_timeout")
        else:
            conn.fail(504, "loopwatch: upstream timeout", reason="upstream_timeout")

    # --- request body, fed by the parser -----------------------------------

    def body(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.buffered += len(chunk)
        self.last = self.loop.time()
        if self.buffered > BODY_BUFFER and self.conn.transport is not None:
            self.conn.transport.pause_reading()
        self.wakeup.set()

    def body_done(self) -> None:
        self.ended = True
        self.wakeup.set()
        if self.phase is Phase.BODY:
            self.enter(Phase.AWAIT_HEAD)
        if self.conn.transport is not None:
            # Nothing more is read until the response is written (no pipelining).
            self.conn.transport.pause_reading()

    def client_gone(self) -> None:
        self.gone = True
        self.enter(Phase.DONE)
        self.wakeup.set()
        self.task.cancel()

    async def body_stream(self) -> AsyncIterator[bytes]:
        if self.expect_continue and not self.chunks and not self.ended and not self.gone:
            transport = self.conn.transport
            if transport is not None and not transport.is_closing():
                transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        while True:
            while self.chunks:
                chunk = self.chunks.popleft()
                self.buffered -= len(chunk)
                self.last = self.loop.time()  # the upstream takes the body: progress
                if self.buffered <= BODY_BUFFER // 2 and self.conn.transport is not None:
                    self.conn.transport.resume_reading()
                yield chunk
            if self.ended or self.gone:
                return
            self.wakeup.clear()
            await self.wakeup.wait()

    # --- the exchange --------------------------------------------------------

    def upstream_headers(self) -> list[tuple[str, str]]:
        head, conn = self.head, self.conn
        headers = [
            (n.decode("latin-1"), v.decode("latin-1"))
            for n, v in end_to_end(head.headers)
            if n.lower() not in (b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host")
            and not (self.expect_continue and n.lower() == b"expect")
        ]
        forwarded_for = head.get(b"x-forwarded-for")
        xff = conn.peer if forwarded_for is None else f"{forwarded_for.decode('latin-1')}, {conn.peer}"
        headers.append(("Host", self.route.upstream.authority.decode()))
        headers.append(("X-Forwarded-For", xff))
        headers.append(("X-Forwarded-Proto", "https" if conn.server.tls else "http"))
        host = head.authority
        if host is not None:
            headers.append(("X-Forwarded-Host", host.decode("latin-1")))
        # A chunked request body goes on chunked: aiohttp frames a body of unknown
        # size so itself (and refuses an explicit Transfer-Encoding with it).
        return headers

    async def run(self) -> None:
        import aiohttp
        from multidict import CIMultiDict
        from yarl import URL

        conn, head = self.conn, self.head
        server = conn.server
        # encoded=True: the target goes upstream exactly as the client sent it (yarl
        # would otherwise re-quote it: "%2F" in a query to "/", "/a/../b" to "/b").
        url = URL(
            self.route.upstream.http_base + self.route.target(head.path, head.target).decode("latin-1"),
            encoded=True,
        )
        keep_alive = conn.parser.keep_alive
        try:
            async with server.http_session().request(
                head.method,
                url,
                headers=CIMultiDict(self.upstream_headers()),
                data=self.body_stream() if self.has_body else None,
                allow_redirects=False,
                compress=None,
                # The name to verify the upstream's certificate against, as for WebSockets.
                server_hostname=server.upstream_server_name if self.route.upstream.tls else None,
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=server.connect_timeout, sock_read=None
                ),
            ) as resp:
                await self.respond(resp, keep_alive)
        except asyncio.CancelledError:
            raise
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, ConnectionError) as e:
            log.info("upstream %s failed for %s %s: %s", self.route.upstream.url, head.method, head.path, e)
            self.fail(502, "loopwatch: upstream unreachable")
        except TimeoutError:  # the connect (limits.connect_timeout)
            self.fail(504, "loopwatch: upstream timeout", "upstream_timeout")
        except aiohttp.ClientError as e:
            log.info("upstream error for %s %s: %s", head.method, head.path, e)
            self.fail(502, "loopwatch: upstream error")
        except Exception:
            # Never leave the client waiting on a response that will not come.
            log.exception("forwarding %s %s failed", head.method, head.path)
            self.fail(502, "loopwatch: upstream error")

    def fail(self, status: int, message: str, reason: str | None = None) -> None:
        """The upstream failed (`reason`: count it among loopwatch's own answers)."""
        if self.gone:
            return
        self.enter(Phase.DONE)
        if self.started:
            self.conn.transport.abort()  # mid-response: nothing honest to add
            self.conn.finish()
            return
        if reason is not None:
            self.conn.server.rejected(reason, status, self.conn.peer, message)
        self.conn.respond_and_close(simple_response(status, message))

    async def respond(self, resp, keep_alive: bool) -> None:  # noqa: ANN001
        conn = self.conn
        transport = conn.transport
        assert transport is not None
        length = resp.headers.get("Content-Length")
        bodiless = self.head.method == "HEAD" or resp.status in NO_BODY_STATUSES or resp.status < 200
        chunked = not bodiless and length is None and self.head.version == "1.1"
        if length is None and not bodiless and not chunked:
            keep_alive = False  # an HTTP/1.0 client: the body ends with the connection
        if not self.ended:
            keep_alive = False  # the upstream answered before the request body ended
        lines = [b"HTTP/1.1 %d %s\r\n" % (resp.status, (resp.reason or "").encode("latin-1"))]
        for n, v in end_to_end(list(resp.raw_headers)):
            lines.append(b"%s: %s\r\n" % (n, v))
        if chunked:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        if conn.parser.pipelined:
            keep_alive = False  # loopwatch answers one request at a time, then closes
        if conn.server.closing:
            keep_alive = False
        if not keep_alive:
            lines.append(b"Connection: close\r\n")
        elif self.head.version == "1.0":
            lines.append(b"Connection: keep-alive\r\n")  # HTTP/1.0 closes unless told
        lines.append(b"\r\n")
        self.started = True
        self.enter(Phase.RESPONSE)
        transport.write(b"".join(lines))
        if not bodiless:
            loop = self.loop
            async for chunk in resp.content.iter_any():
                if not chunk:
                    continue
                self.last = loop.time()
                transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                await conn.drain()
                if self.gone:
                    return
                self.last = loop.time()  # the client took it
            if chunked:
                transport.write(b"0\r\n\r\n")
        self.enter(Phase.DONE)
        conn.http_done(keep_alive)
