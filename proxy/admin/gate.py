"""The admin port's connections: how many at once, and how long one may hold
a socket without a request or without reading its answer.

aiohttp bounds a request head's size but not the time it takes to arrive,
nor how long an answer may wait for its client to read it, nor how many
connections are open. A client that connected and said nothing, trickled
its head or never read held its socket for ever; 400 of them used up the
file descriptors the data plane shares with the admin port, and WebSocket
clients were answered 503. The data plane's listener bounds all of this
(`limits.*`); the gate does it for the admin port:

* at most ``event_streams.max_streams`` + ``MAX_REQUEST_CONNECTIONS``
  connections at once, one address at most ``PEER_SHARE`` of them; one more
  is closed at accept;
* a connection's first request head within ``FIRST_REQUEST_TIMEOUT``; a
  kept-alive connection with no request in progress is closed after
  ``IDLE_TIMEOUT``;
* an answer of 400 or more closes its connection (a refused client keeps
  no slot);
* a request's handler and the writing of its answer within
  ``ANSWER_TIMEOUT``, except for the handlers marked `long_lived` (the event
  stream, bounded by its own ``write_timeout`` and buffer).

Refusals are counted as `loopwatch_admin_requests_rejected_total` reasons
``connections``, ``address_limit`` and ``timeout`` (a kept-alive connection closed when idle is
not a refusal). The gate wraps aiohttp's low-level ``web.Server``, a protocol
factory, through the public asyncio protocol interface.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage

from .api import AdminCounters

MAX_REQUEST_CONNECTIONS = 128  # besides the event streams
FIRST_REQUEST_TIMEOUT = 10.0  # seconds from accept to a complete request head
IDLE_TIMEOUT = 60.0  # seconds a kept-alive connection may wait for its next request
ANSWER_TIMEOUT = 30.0  # seconds for a handler and the writing of its answer
# What of the connections one address may hold: a peer reopening idle sockets
# took all 228 and failed 43 of 49 health probes (a pod restarted by its
# liveness probe); now the others keep half, as the data plane's per-address
# bound. On a loopback-only port every client is one address: half still.
PEER_SHARE = 0.5

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
H = TypeVar("H", bound=Callable[..., Any])


def long_lived(handler: H) -> H:
    """Mark a handler whose answer lasts (a stream): no answer timeout."""
    handler.admin_long_lived = True  # type: ignore[attr-defined]
    return handler


def abort(transport: asyncio.BaseTransport) -> None:
    """Close at once, dropping what is unsent (a stream transport's abort)."""
    transport.abort()  # type: ignore[attr-defined]


def refused_close(response: web.StreamResponse) -> web.StreamResponse:
    """An answer of 400 or more closes its connection: a refused client keeps no slot."""
    if response.status >= 400 and not response.prepared:
        response.force_close()
    return response


def peer_address(transport: asyncio.BaseTransport) -> str:
    """The client's address ("" for a socket without one, as a Unix socket)."""
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else ""


class Phase(enum.Enum):
    """Where a connection is: its deadline and what its expiry means."""

    FIRST = "first"  # accepted, no request yet: a timeout is a refusal
    BUSY = "busy"  # a request in progress: the answer timeout applies
    IDLE = "idle"  # answered, kept alive: closed quietly when idle too long


class GatedConnection(asyncio.Protocol):
    """aiohttp's protocol for one connection, with the gate's deadline."""

    def __init__(self, gate: AdminGate) -> None:
        self.gate = gate
        self.inner: asyncio.Protocol | None = None
        # (uvloop's transports are not asyncio.Transport instances: no isinstance)
        self.transport: asyncio.BaseTransport | None = None
        self.phase = Phase.FIRST
        self.deadline: asyncio.TimerHandle | None = None
        self.lost = False
        self.peer = ""  # its address, once it counts in the gate's `by_peer`

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        gate = self.gate
        cap = gate.max_connections()
        if len(gate.open) >= cap:
            gate.counters.reject("connections")
            abort(transport)
            return
        peer = peer_address(transport)
        if gate.by_peer.get(peer, 0) >= max(1, int(cap * PEER_SHARE)):
            gate.counters.reject("address_limit")
            abort(transport)
            return
        assert gate.server is not None
        self.transport = transport
        self.peer = peer
        gate.open[transport] = self
        gate.by_peer[peer] = gate.by_peer.get(peer, 0) + 1
        self.inner = gate.server()
        self.inner.connection_made(transport)
        self._arm(FIRST_REQUEST_TIMEOUT)

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._disarm()
        if self.transport is not None and self.gate.open.pop(self.transport, None) is not None:
            left = self.gate.by_peer.pop(self.peer) - 1
            if left:
                self.gate.by_peer[self.peer] = left
        if self.inner is not None:
            self.inner.connection_lost(exc)

    # --- the deadline -------------------------------------------------------------

    def request_started(self) -> None:
        self.phase = Phase.BUSY
        self._disarm()

    def request_done(self) -> None:
        self.phase = Phase.IDLE
        if not self.lost:  # a handler ends after its client left (a closed stream): no timer to hold it
            self._arm(IDLE_TIMEOUT)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self.deadline = asyncio.get_running_loop().call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _expired(self) -> None:
        self.deadline = None
        if self.phase is Phase.FIRST:
            self.gate.counters.reject("timeout")
        if self.transport is not None:
            abort(self.transport)


class MalformedRequests(logging.Filter):
    """aiohttp logs every request it cannot parse (a control byte in a header)
    at error, with a traceback: anyone who reaches the port could flood the log
    and trip error-rate alerts. Those become the refusal `bad_request`, counted
    and logged at most once a minute like the others; aiohttp answers 400."""

    def __init__(self, counters: AdminCounters) -> None:
        super().__init__()
        self.counters = counters

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, BadHttpMessage):
            self.counters.reject("bad_request")
            return False
        return True


class AdminGate:
    """The protocol factory for the admin port's socket, and its middleware."""

    def __init__(self, counters: AdminCounters, max_streams: Callable[[], int]) -> None:
        self.server: web.Server | None = None  # the application's, once it is set up
        self.counters = counters
        self.max_streams = max_streams
        self.open: dict[asyncio.BaseTransport, GatedConnection] = {}
        self.by_peer: dict[str, int] = {}  # open connections per address (none kept at 0)

    def __call__(self) -> GatedConnection:
        return GatedConnection(self)

    def max_connections(self) -> int:
        return self.max_streams() + MAX_REQUEST_CONNECTIONS

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Outermost: the request is in progress until its answer is written."""
        transport = request.transport
        connection = self.open.get(transport) if transport is not None else None
        if connection is not None:
            connection.request_started()
        try:
            if getattr(request.match_info.handler, "admin_long_lived", False):
                return refused_close(await handler(request))
            try:
                async with asyncio.timeout(ANSWER_TIMEOUT):
                    response = refused_close(await handler(request))
                    # Written here, within the timeout: aiohttp would write it after
                    # the middlewares, waiting for a client that never reads.
                    try:
                        await response.prepare(request)
                        await response.write_eof()
                    except ConnectionResetError:
                        # The client left before its answer (a health checker's
                        # timeout, a reset): aiohttp logged each as an error with
                        # its traceback, a flood anyone reaching the port could
                        # cause. Nobody is left to answer, as after a timeout.
                        raise asyncio.CancelledError from None
                return response
            except TimeoutError:
                self.counters.reject("timeout", request)
                if transport is not None:
                    abort(transport)
                raise asyncio.CancelledError from None  # the connection is gone
        finally:
            if connection is not None:
                connection.request_done()
