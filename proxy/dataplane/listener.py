"""The public listener: request heads, upgrades, refusals, and handing a
WebSocket over to the splice relay.

A plain `asyncio.Protocol` (on uvloop when installed) with httptools parsing
the head: measured here, it costs a fraction of an aiohttp handler per request
and per idle connection (docs/architecture.md). aiohttp stays for plain HTTP
forwarding (proxy/dataplane/forward.py) and the admin app.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import ipaddress
import itertools
import logging
import math
import ssl
import sys
import time
from enum import StrEnum
from typing import TYPE_CHECKING

from .boundary import Connection, Gate, Refusal, Rejections, RelayStats
from .forward import HttpExchange, checked_connector
from .frames import build_close_frame
from .heads import (
    HeadParser,
    HttpError,
    RequestHead,
    ResponseHeadParser,
    accept_key,
    simple_response,
    upstream_request_head,
    validate_websocket_upgrade,
)
from .relay import GONE, Relay
from .routing import Route, Router, client_ssl_context, server_ssl_context
from .states import IllegalTransition, successors
from .trim import Trimmer

if TYPE_CHECKING:
    import aiohttp

    from ..app.settings import Settings

log = logging.getLogger("loopwatch.server")



class HandshakeState(StrEnum):
    """Where a client connection is until the relay takes it over (docs/relay.md, "States")."""

    HEAD = "head"  # reading a request head (the first, or the next one on a kept-alive connection)
    UPSTREAM = "upstream"  # admitted: the upstream connect and its answer to the upgrade
    HTTP = "http"  # a plain HTTP request forwarded (forward.py's HttpExchange)
    HELD = "held"  # refused with a hold (policy.hold): waiting it out before the answer
    REFUSING = "refusing"  # a 101 and a close 1013 written: waiting for the client's close reply
    RELAYED = "relayed"  # the upstream's 101 went out: the relay owns both transports now
    DONE = "done"  # answered, refused, failed or gone: everything released


HEAD, UPSTREAM, HTTP, HELD, REFUSING, RELAYED, DONE = (
    HandshakeState.HEAD, HandshakeState.UPSTREAM, HandshakeState.HTTP, HandshakeState.HELD,
    HandshakeState.REFUSING, HandshakeState.RELAYED, HandshakeState.DONE,
)  # fmt: skip

# Every legal move. Refused or failed anywhere = DONE; RELAYED and DONE are final.
HANDSHAKE_TRANSITIONS: frozenset[tuple[HandshakeState, HandshakeState]] = frozenset({
    (HEAD, UPSTREAM),  # an upgrade, routed and admitted
    (HEAD, HTTP),  # a plain request, routed
    (HEAD, HELD),  # an upgrade refused with a hold
    (HEAD, REFUSING),  # an upgrade refused with a close 1013
    (HEAD, DONE),  # refused at accept, bad head, head timeout, refused by HTTP status, client gone
    (UPSTREAM, RELAYED),  # the upstream answered 101
    (UPSTREAM, DONE),  # the upstream refused or failed, timeout, client gone
    (HTTP, HEAD),  # response written, the connection kept alive for the next request
    (HTTP, DONE),  # response written and closed, or failed, or the client gone
    (HELD, REFUSING),  # the hold is over (or released): a close 1013
    (HELD, DONE),  # the hold is over: an HTTP refusal; or the client gone, or shutdown
    (REFUSING, DONE),  # the client's close reply, REFUSAL_GRACE, or shutdown
})  # fmt: skip
HANDSHAKE_NEXT = successors(HandshakeState, HANDSHAKE_TRANSITIONS)  # what a move checks (states.py)

OVERLOADED = simple_response(503, "loopwatch: too many connections", (("Retry-After", "1"),))
# One address holds its share of limits.max_connections (or of half-open heads):
# the answer nginx's limit_conn gives, not a silent close (docs/relay.md says why).
ADDRESS_LIMIT = simple_response(
    503, "loopwatch: too many connections from your address", (("Retry-After", "1"),)
)
SHUTTING_DOWN = simple_response(503, "loopwatch: shutting down")
REFUSAL_GRACE = 2.0  # how long a close-1013 refusal waits for the client's close reply
SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"

# Refusals as written, by (how, status, message, Retry-After): a looping client is
# refused tens of times a second with the same answer, so it is serialised once.
# Bounded (retry times and reasons vary): the table starts over when full.
_REFUSALS: dict[tuple[str, int, str, str], bytes] = {}
_REFUSALS_SIZE = 1024


def reworded(message: str, retry: str) -> str:
    """The refusal reason with its retry time replaced (the grammar's tail,
    docs/refusals.md): a held refusal says what is left when it is answered."""
    phrase, sep, _ = message.rpartition(", retry in ")
    return f"{phrase}, retry in {retry}s" if sep else message


class Holds:
    """Refused attempts held before their answer (policy.hold): the held
    handshakes by client key, and counts read at scrape time."""

    __slots__ = ("by_key", "count", "answered", "skipped", "released")

    def __init__(self) -> None:
        self.by_key: dict[str, list[ClientHandshake]] = {}
        self.count = 0  # held right now (loopwatch_connections_held)
        self.answered: dict[str, int] = {}  # by refusal reason: answered after a hold
        # Refusals answered at once because a bound was reached, by the bound.
        self.skipped: dict[str, int] = {"max_held": 0, "max_held_per_key": 0}
        self.released = 0  # answered early: the key was released, or shutdown

    def add(self, handshake: ClientHandshake, key: str, max_held: int, max_per_key: int) -> bool:
        """Hold `handshake` unless a bound is reached (then counted, and False)."""
        if self.count >= max_held:
            self.skipped["max_held"] += 1
            return False
        held = self.by_key.get(key)
        if len(held or ()) >= max_per_key:
            self.skipped["max_held_per_key"] += 1
            return False
        if held is None:
            held = self.by_key[key] = []
        held.append(handshake)
        self.count += 1
        return True

    def remove(self, handshake: ClientHandshake, key: str) -> None:
        held = self.by_key.get(key)
        if held is not None and handshake in held:
            held.remove(handshake)  # a few per key at most (max_held_per_key)
            self.count -= 1
            if not held:
                del self.by_key[key]


def refusal_bytes(refusal: Refusal, retry: str) -> bytes:
    """The 429/503 response, or the close-1013 frame, for `refusal` (cached)."""
    key = (refusal.how, refusal.status, refusal.message, retry)
    out = _REFUSALS.get(key)
    if out is None:
        if refusal.how == "http":
            out = simple_response(refusal.status, refusal.message, (("Retry-After", retry),))
        else:
            out = build_close_frame(refusal.status, refusal.message, mask=False)  # 1013, or policy.close_code
        if len(_REFUSALS) >= _REFUSALS_SIZE:
            _REFUSALS.clear()
        _REFUSALS[key] = out
    return out


class ClientHandshake(asyncio.Protocol):
    """A client connection until its upgrade is answered (or its plain HTTP
    requests are served); then the relay's Leg takes the transport over."""

    def __init__(self, server: ProxyServer):
        self.server = server
        # Set by connection_made, which the loop calls right after creating the protocol.
        self.transport: asyncio.Transport
        self.peer = ""
        self.state = HEAD
        self.parser = HeadParser(server.max_head_size)
        self.timer: asyncio.TimerHandle | None = None
        self.attempt: Connection | None = None
        self.route: Route | None = None
        self.early = bytearray()
        self.upstream: asyncio.Transport | None = None
        self.connecting: asyncio.Task | None = None  # the upstream connect, until it settles
        self.exchange: HttpExchange | None = None
        self._drain: asyncio.Future[None] | None = None
        self._paused = False
        self.idle_keep_alive = False  # waiting for a next request after a response
        self.address: AddressLoad | None = None  # what its client address holds, this included
        self.head_pending = False  # counted among its address's half-open heads
        self.early_eof = False  # the client shut its writing half during the upstream handshake
        self.held: Refusal | None = None  # the refusal it waits to be answered with (HELD)

    def _to(self, state: HandshakeState) -> None:
        if state not in HANDSHAKE_NEXT[self.state]:
            raise IllegalTransition("client handshake", self.state, state)
        self.state = state

    # --- asyncio callbacks --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # No isinstance check at run time: uvloop's transports do not subclass asyncio.Transport.
        if TYPE_CHECKING:
            assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        server = self.server
        peername = transport.get_extra_info("peername")
        peer = self.peer = peername[0] if peername else ""
        if server.closing or server.active >= server.max_connections:
            if server.closing:
                self.refuse_at_accept(SHUTTING_DOWN, 503, "loopwatch: shutting down", "shutting_down")
            else:
                self.refuse_at_accept(OVERLOADED, 503, "loopwatch: too many connections", "overload")
            return
        # Per address: its connections and half-open heads, one entry per address
        # with a connection (removed at zero: ProxyServer.release_address).
        load = server.addresses.get(peer)
        if load is None:
            load = server.addresses[peer] = AddressLoad(peer)
        elif (
            load.connections >= server.max_connections_per_address
            or load.heads >= server.max_heads_per_address
        ) and not server.cap_exempt(peer):
            self.refuse_at_accept(
                ADDRESS_LIMIT, 503, "loopwatch: too many connections from your address", "address_limit"
            )
            return
        load.connections += 1
        load.heads += 1
        self.address = load
        self.head_pending = True
        server.active += 1
        server.handshakes.add(self)
        self.timer = server.loop.call_later(server.handshake_timeout, self.on_timeout)

    def refuse_at_accept(self, response: bytes, status: int, message: str, reason: str) -> None:
        """Answer a connection loopwatch does not take on at all, and close it."""
        self._to(DONE)
        self.transport.write(response)
        self.transport.close()
        self.server.rejected(reason, status, self.peer, message)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state in (HEAD, HTTP):
            try:
                head = self.parser.feed(data)
            except HttpError as e:
                self.fail(e.status, e.message, e.headers, e.reason)
                return
            if state is HEAD and head is not None:
                if self.head_pending:
                    self.head_done()  # (pending once per connection: its first head)
                if self.parser.upgrade:
                    self.begin_upgrade(head, self.parser.rest)
                else:
                    self.begin_http(head)
        elif state is UPSTREAM:
            # A client may start sending frames before it sees the 101: keep a
            # bounded amount, then stop reading until the relay starts.
            self.early += data
            if len(self.early) > self.server.early_data_size:
                self.transport.pause_reading()
        elif state is REFUSING:
            self.transport.close()  # the client's close reply
        elif state is HELD:
            # Nothing is due before the answer: stop reading (no buffer grows).
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        if self.state is UPSTREAM:
            # Its frames so far (a close frame, say) are in `early`: the relay passes
            # them and then the EOF on, as if it had read them itself.
            self.early_eof = True
            return True
        # A client may half-close after its request; the response still flows.
        return self.state is HTTP and self.exchange is not None

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    async def drain(self) -> None:
        if self._paused and self.transport is not None and not self.transport.is_closing():
            self._drain = self.server.loop.create_future()
            await self._drain

    def connection_lost(self, exc: Exception | None) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        if self.exchange is not None:
            # Also once DONE (a 400 for a bad request body): the upstream request
            # ends with the client, it is not kept until its phase times out.
            self.exchange.client_gone()
        if self.state is DONE or self.state is RELAYED:
            return
        if self.state is UPSTREAM and self.attempt is not None:
            self.server.gate.handshake_failed(self.attempt, time.monotonic(), None, "client_closed")
        elif self.state is HELD:
            self.unhold()  # the client left before its answer: the attempt ended now
        self.finish()

    # --- the head -----------------------------------------------------------

    def begin_upgrade(self, head: RequestHead, rest: bytes) -> None:
        server = self.server
        self.parser.release()  # an upgrade's head is all this connection parses
        try:
            if not head.is_websocket_upgrade:
                raise HttpError(400, "unsupported upgrade: only websocket is proxied")
            validate_websocket_upgrade(head)
            route = server.router.match(head.path)
            if route is None:
                raise HttpError(404, "no route for this path", reason="no_route")
        except HttpError as e:
            self.fail(e.status, e.message, e.headers, e.reason)
            return
        self.route = route
        now = time.monotonic()
        attempt, refusal = server.gate.attempt(head, self.peer, route.name, now)
        self.attempt = attempt
        if refusal is not None:
            self.refuse(refusal)
            return
        # _to(UPSTREAM), written out: every WebSocket comes this way (states.py).
        if UPSTREAM not in HANDSHAKE_NEXT[self.state]:
            raise IllegalTransition("client handshake", self.state, UPSTREAM)
        self.state = UPSTREAM
        self.early += rest
        # Reading goes on during the upstream handshake: what the client sends early
        # is kept (bounded; data_received pauses beyond it), and a client that leaves
        # is noticed at once. No pause/resume pair of epoll changes per connection.
        self.connect(route, head, attempt)

    def begin_http(self, head: RequestHead) -> None:
        route = self.server.router.match(head.path)
        if route is None:
            self.fail(404, "no route for this path", reason="no_route")
            return
        self._to(HTTP)
        self.route = route
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.exchange = HttpExchange(self, head, route)

    def http_done(self, keep_alive: bool) -> None:
        """The exchange wrote its whole response: wait for the next request or close."""
        self.exchange = None
        if keep_alive and not self.server.closing and not self.parser.pipelined:
            self._to(HEAD)
            self.idle_keep_alive = True
            self.parser.release()
            self.parser = HeadParser(self.server.max_head_size)
            self.timer = self.server.loop.call_later(self.server.handshake_timeout, self.on_timeout)
            self.transport.resume_reading()
        else:
            self.transport.close()
            self.finish()

    # --- the upstream handshake ---------------------------------------------

    def connect(self, route: Route, head: RequestHead, attempt: Connection) -> None:
        """Open the upstream connection: one task for the loop's create_connection
        and one timer that cancels it after connect_timeout (no wait_for, whose
        second task, future and callbacks cost more than the rest of the connect
        in Python). `connected` takes it from there."""
        server = self.server
        up = route.upstream
        task = server.loop.create_task(
            server.loop.create_connection(
                lambda: UpstreamHandshake(self),
                up.host,
                up.port,
                ssl=server.upstream_ssl if up.tls else None,
                server_hostname=(server.upstream_server_name or up.host) if up.tls else None,
                # TCP + TLS within connect_timeout (the timer below): asyncio's own
                # default for the TLS part alone is 60 s.
                ssl_handshake_timeout=server.connect_timeout if up.tls else None,
            )
        )
        timer = server.loop.call_later(server.connect_timeout, task.cancel)
        self.connecting = task
        task.add_done_callback(lambda t: self.connected(t, timer, route, head, attempt))

    def connected(
        self, task: asyncio.Task, timer: asyncio.TimerHandle, route: Route, head: RequestHead, attempt: Connection
    ) -> None:
        timer.cancel()
        self.connecting = None
        if task.cancelled():
            # The timer's cancel (a client that left is DONE and ignored below).
            self.upstream_failed(504, "loopwatch: upstream connect timeout", None, "timeout")
            return
        exc = task.exception()
        if exc is not None:
            if not isinstance(exc, OSError):
                log.error("upstream connect failed", exc_info=exc)
            up = route.upstream
            if isinstance(exc, ssl.SSLError):  # an OSError too: certificate not trusted, protocol
                log.debug("upstream %s TLS handshake failed: %s", up.url, exc)
                self.upstream_failed(502, "loopwatch: upstream TLS handshake failed", None, "tls")
                return
            log.debug("upstream %s unreachable: %s", up.url, exc)
            self.upstream_failed(502, "loopwatch: upstream unreachable", None, "connect")
            return
        transport, _ = task.result()
        if self.state is not UPSTREAM:  # the client left or timed out meanwhile
            transport.close()
            return
        self.upstream = transport
        up = route.upstream
        transport.write(
            upstream_request_head(
                head,
                target=route.target(head.path, head.target),
                host=up.authority,
                peer=self.peer,
                scheme="https" if self.server.tls else "http",
                websocket=True,
                extra=attempt.extra_headers,
            )
        )
        # Sent: a live connection keeps neither the head nor its parser (memory).
        attempt.head = None
        attempt.extra_headers = None

    def upstream_accepted(self, upstream: asyncio.Transport, response: ResponseHeadParser) -> None:
        """A 101: pass its head on byte for byte and start the splice."""
        server = self.server
        if self.state is not UPSTREAM:
            upstream.close()
            return
        # _to(RELAYED), written out: every WebSocket comes this way (states.py).
        if RELAYED not in HANDSHAKE_NEXT[self.state]:
            raise IllegalTransition("client handshake", self.state, RELAYED)
        self.state = RELAYED
        self.cancel_timer()
        server.handshakes.discard(self)
        extensions = (response.header(b"sec-websocket-extensions") or b"").lower()
        if not extensions:
            allowed_rsv = 0
        elif extensions.strip().startswith(b"permessage-deflate") and b"," not in extensions:
            allowed_rsv = 0b100
        else:
            allowed_rsv = 0b111  # an extension loopwatch does not know may use any RSV bit
        attempt = self.attempt
        assert attempt is not None and self.address is not None
        conn_id = next(server.ids)
        attempt.conn_id = conn_id
        relay = Relay(
            conn_id,
            self.transport,
            upstream,
            max_message_size=server.max_message_size,
            allowed_rsv=allowed_rsv,
            on_done=server.on_relay_done,
            context=attempt,
            address=self.address,
        )
        server.relays[conn_id] = relay
        server.trimmer.note(len(server.relays))
        self.transport.write(response.head_bytes)
        server.gate.opened(attempt, time.monotonic())
        relay.start(bytes(self.early), response.rest)
        self.early = bytearray()
        if self.early_eof and relay.client.link is not GONE and not relay.half_close(relay.client):
            relay.client.transport.close()  # what the transport does when eof_received says so

    def upstream_refused(self, response: ResponseHeadParser) -> None:
        """The upstream answered the upgrade with anything but 101: the client gets
        that answer (status, headers, bounded body), never a 101 and a close."""
        if self.state is not UPSTREAM:
            return
        assert self.attempt is not None
        self.server.gate.handshake_failed(self.attempt, time.monotonic(), response.status, None)
        self.respond_and_close(response.refusal())

    def upstream_failed(self, status: int, message: str, http_status: int | None, error: str) -> None:
        if self.state is not UPSTREAM:
            return
        assert self.attempt is not None
        self.server.gate.handshake_failed(self.attempt, time.monotonic(), http_status, error)
        self.respond_and_close(simple_response(status, message))

    # --- refusals and failures ----------------------------------------------

    def refuse(self, refusal: Refusal) -> None:
        """Refuse an attempt without touching the upstream: HTTP status + Retry-After,
        or accept the upgrade and close 1013 with a reason a browser can read.
        With a hold, first wait (HELD) unless a hold bound is reached."""
        server = self.server
        if refusal.hold > 0 and self.attempt is not None:
            gate = server.gate
            if server.holds.add(self, self.attempt.key, gate.max_held, gate.max_held_per_key):
                self._to(HELD)
                self.held = refusal
                self.cancel_timer()
                self.timer = server.loop.call_later(refusal.hold, self.end_hold)
                return
        self.answer(refusal, refusal.retry_after, False)

    def unhold(self) -> float:
        """Leave the hold (idempotent); the gate learns the attempt ended now."""
        now = time.monotonic()
        if self.held is not None and self.attempt is not None:
            self.held = None
            self.server.holds.remove(self, self.attempt.key)
            self.server.gate.held_answered(self.attempt, now)
        return now

    def end_hold(self, released: bool = False) -> None:
        """Answer a held refusal: at the hold's end, or at once (`released`: the
        key was released, or loopwatch shuts down). The retry time is what is
        left now; a released client may come back at once (1 s, the least)."""
        self.timer = None
        refusal = self.held
        if self.state is not HELD or refusal is None or self.attempt is None:
            return
        now = self.unhold()
        holds = self.server.holds
        holds.answered[refusal.reason] = holds.answered.get(refusal.reason, 0) + 1
        if released:
            holds.released += 1
        retry_after = 0.0 if released else refusal.retry_after - (now - self.attempt.t0)
        self.answer(refusal, retry_after, True)

    def answer(self, refusal: Refusal, retry_after: float, held: bool) -> None:
        retry = str(max(1, math.ceil(retry_after)))
        if held:
            refusal = dataclasses.replace(refusal, message=reworded(refusal.message, retry))
        if refusal.how == "http":
            self.respond_and_close(refusal_bytes(refusal, retry))
            return
        head = self.attempt.head if self.attempt else None
        key = head.get(b"sec-websocket-key") if head else None
        assert key is not None and self.transport is not None
        self._to(REFUSING)
        self.cancel_timer()
        self.transport.write(
            SWITCHING + b"Sec-WebSocket-Accept: %s\r\n\r\n" % accept_key(key)
            + refusal_bytes(refusal, retry)
        )
        self.timer = self.server.loop.call_later(REFUSAL_GRACE, self.transport.close)

    def fail(
        self,
        status: int,
        message: str,
        headers: tuple[tuple[str, str], ...] = (),
        reason: str = "bad_request",
    ) -> None:
        """Answer a request loopwatch refuses itself (counted and logged by reason)."""
        self.server.rejected(reason, status, self.peer, message)
        self.respond_and_close(simple_response(status, message, headers))

    def respond_and_close(self, response: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(response)
            self.transport.close()
        self.finish()

    def shut_down(self) -> None:
        """The server is shutting down: end this connection as fits its state."""
        if self.state is HTTP and self.exchange is not None:
            return  # the response in flight finishes, then http_done closes (server.closing)
        if self.state is HELD:
            self.end_hold(released=True)  # answered now, then closed below
        if self.state is REFUSING:
            self.transport.close()  # its close frame is out already
            return
        if self.state is DONE:
            return  # an http-429 answer, written and closed
        if self.state is HEAD and self.idle_keep_alive and self.parser.received == 0:
            self.transport.close()  # idle between requests
            self.finish()
            return
        self.server.rejected("shutting_down", 503, self.peer, "loopwatch: shutting down")
        self.respond_and_close(SHUTTING_DOWN)

    def abort(self) -> None:
        """Shutdown ran out of time: drop the connection."""
        if self.exchange is not None:
            self.exchange.client_gone()
        if self.transport is not None:
            self.transport.abort()
        self.finish()

    def on_timeout(self) -> None:
        self.timer = None
        if self.state is HEAD:
            if self.idle_keep_alive and self.parser.received == 0:
                # An idle keep-alive connection: close it quietly (RFC 9112 §9.8); an
                # unsolicited 408 could race the client's next request on it.
                self.transport.close()
                self.finish()
                return
            self.fail(408, "loopwatch: request head timeout", reason="head_timeout")
        elif self.state is UPSTREAM:
            self.upstream_failed(504, "loopwatch: upstream handshake timeout", None, "timeout")

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def head_done(self) -> None:
        """The first request head is complete (or the connection ends before it):
        one half-open head fewer for this address."""
        self.head_pending = False
        assert self.address is not None  # head_pending is set with it
        self.address.heads -= 1

    def finish(self) -> None:
        """Release everything this handshake holds (idempotent)."""
        if self.state is DONE or self.state is RELAYED:
            return
        self._to(DONE)
        self.cancel_timer()
        self.unhold()
        self.parser.release()
        if self.head_pending:
            self.head_done()
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
        if self in self.server.handshakes:
            server = self.server
            server.handshakes.discard(self)
            server.active -= 1
            assert self.address is not None  # set with the entry in server.handshakes
            server.release_address(self.address)
            server.check_drained()


class AddressLoad:
    """What one client address holds now: its connections (any state) and its
    half-open heads, counted against limits.max_connections_per_address and
    max_heads_per_address. Shared by its connections; dropped at zero."""

    __slots__ = ("peer", "connections", "heads")

    def __init__(self, peer: str):
        self.peer = peer
        self.connections = 0
        self.heads = 0

    def __repr__(self) -> str:
        return f"AddressLoad({self.peer!r}, connections={self.connections}, heads={self.heads})"


def _in_networks(peer: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in net for net in networks)


def _never(peer: str) -> bool:
    return False


class AnswerState(StrEnum):
    """The upstream's answer to the forwarded upgrade (UpstreamHandshake)."""

    AWAITING = "awaiting"  # reading its response head
    ACCEPTED = "accepted"  # a 101: handed to the client's handshake, then the relay
    REFUSED = "refused"  # any other complete answer: passed on to the client
    FAILED = "failed"  # a malformed answer, or the connection closed before a whole one


AWAITING, ACCEPTED, REFUSED, FAILED = (
    AnswerState.AWAITING, AnswerState.ACCEPTED, AnswerState.REFUSED, AnswerState.FAILED
)  # fmt: skip

# The answer is settled once: each end state is final.
ANSWER_TRANSITIONS: frozenset[tuple[AnswerState, AnswerState]] = frozenset(
    {(AWAITING, ACCEPTED), (AWAITING, REFUSED), (AWAITING, FAILED)}
)
ANSWER_NEXT = successors(AnswerState, ANSWER_TRANSITIONS)  # what a move checks (states.py)


class UpstreamHandshake(asyncio.Protocol):
    """Reads the upstream's answer to the forwarded upgrade request."""

    def __init__(self, client: ClientHandshake):
        self.client = client
        server = client.server
        self.response = ResponseHeadParser(server.max_head_size, server.error_body_size)
        # Set by connection_made, which the loop calls right after creating the protocol.
        self.transport: asyncio.Transport
        self.state = AWAITING

    def _to(self, state: AnswerState) -> None:
        if state not in ANSWER_NEXT[self.state]:
            raise IllegalTransition("upstream handshake", self.state, state)
        self.state = state

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if TYPE_CHECKING:  # (uvloop's transports do not subclass asyncio.Transport)
            assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.state is not AWAITING:
            return
        response = self.response
        try:
            response.feed(data)
        except HttpError as e:
            self._to(FAILED)
            response.release()
            self.client.upstream_failed(502, f"loopwatch: {e.message}", None, "bad_response")
            return
        if response.upgrade and response.status == 101:
            # _to(ACCEPTED), written out: every WebSocket comes this way (states.py).
            if ACCEPTED not in ANSWER_NEXT[self.state]:
                raise IllegalTransition("upstream handshake", self.state, ACCEPTED)
            self.state = ACCEPTED
            response.release()
            self.client.upstream_accepted(self.transport, response)
        elif response.done or response.upgrade:
            self._to(REFUSED)
            response.release()
            self.client.upstream_refused(response)

    def eof_received(self) -> bool:
        self.response.eof()
        if self.state is AWAITING and self.response.done:
            self._to(REFUSED)
            self.client.upstream_refused(self.response)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.response.release()
        if self.state is AWAITING:
            self._to(FAILED)
            self.client.upstream_failed(
                502, "loopwatch: upstream closed during the handshake", None, "closed"
            )


class ProxyServer:
    """The listener, the live connections, and their orderly shutdown."""

    def __init__(self, settings: Settings, gate: Gate | None = None):
        self.settings = settings
        self.gate = gate or Gate()
        self.loop = asyncio.get_running_loop()
        self.router = Router([(r.path_prefix, r.upstream) for r in settings.effective_routes()])
        limits = settings.limits
        self.max_head_size = limits.max_head_size
        self.early_data_size = limits.early_data_size
        self.error_body_size = limits.error_body_size
        self.max_message_size = limits.max_message_size or None
        self.handshake_timeout = limits.handshake_timeout
        self.connect_timeout = limits.connect_timeout
        self.idle_timeout = limits.idle_timeout
        self.body_timeout = limits.body_timeout
        self.response_timeout = limits.response_timeout
        self.response_idle_timeout = limits.response_idle_timeout
        self.max_connections = limits.max_connections
        # Off (null) is a cap no count reaches: one comparison, no branch per connection.
        cap = limits.address_cap
        self.max_connections_per_address = cap(limits.max_connections_per_address) or sys.maxsize
        self.max_heads_per_address = cap(limits.max_heads_per_address) or sys.maxsize
        # Client address -> its connections (any state) and half-open heads
        # (accepted, first request head not complete yet); an entry goes at zero.
        self.addresses: dict[str, AddressLoad] = {}
        # Proxies in identity.trusted_proxies carry many clients' connections: never capped.
        trusted = tuple(
            ipaddress.ip_network(c.strip(), strict=False) for c in settings.identity.trusted_proxies
        )
        self.cap_exempt = (
            functools.lru_cache(maxsize=1024)(functools.partial(_in_networks, networks=trusted))
            if trusted
            else _never
        )
        self.rejections = Rejections()  # requests refused before the engine, by reason
        self.holds = Holds()  # refused attempts waiting out their hold
        self.shutdown_timeout = limits.shutdown_timeout
        self.tls = settings.tls.cert_file is not None
        self.upstream_ssl = client_ssl_context(settings.upstream_tls.verify, settings.upstream_tls.ca_file)
        self.upstream_server_name = settings.upstream_tls.server_name
        self.ids = itertools.count(1)
        self.active = 0  # client connections, handshaking or relayed
        self.handshakes: set[ClientHandshake] = set()
        self.relays: dict[int, Relay] = {}
        self.on_relay_done = self.relay_done  # one bound method for every relay, not one each
        # Most of an idle connection's memory is the event loop's transports and
        # handles, allocated with malloc: given back after a burst of closes.
        self.trimmer = Trimmer(self.loop, lambda: len(self.relays))
        self.closing = False
        self._server: asyncio.AbstractServer | None = None
        self._port = 0
        self._idle_task: asyncio.Task[None] | None = None
        self._all_closed: asyncio.Event | None = None
        self._http_session: aiohttp.ClientSession | None = None

    async def start(self, host: str, port: int) -> None:
        ssl_ctx = None
        if self.settings.tls.cert_file:
            ssl_ctx = server_ssl_context(self.settings.tls.cert_file, self.settings.tls.key_file)
        self._server = await self.loop.create_server(
            lambda: ClientHandshake(self), host, port, ssl=ssl_ctx, backlog=1024, reuse_address=True
        )
        self._port = self._server.sockets[0].getsockname()[1]
        if self.idle_timeout:
            self._idle_task = self.loop.create_task(self._sweep_idle())

    @property
    def port(self) -> int:
        """The bound port (still known after shutdown closed the listener)."""
        return self._port

    def http_session(self):  # noqa: ANN201 - aiohttp imported lazily, only for plain HTTP
        if self._http_session is None:
            import aiohttp

            self._http_session = aiohttp.ClientSession(
                auto_decompress=False,
                connector=checked_connector(ssl=self.upstream_ssl, limit=0),
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            )
        return self._http_session

    def rejected(self, reason: str, status: int | None, peer: str, message: str) -> None:
        """Count (and maybe log) a request loopwatch answered or cut itself."""
        self.rejections.add(reason, status, peer, message, time.monotonic())

    def release_held(self, key: str) -> int:
        """Answer the held refusals of a released client at once (retry in 1 s),
        so its next attempt comes now and is admitted. Returns how many."""
        held = list(self.holds.by_key.get(key, ()))
        for handshake in held:
            handshake.end_hold(released=True)
        return len(held)

    def release_address(self, load: AddressLoad) -> None:
        """A connection of that address ended."""
        load.connections -= 1
        if not load.connections:
            del self.addresses[load.peer]

    def relay_done(self, relay: Relay) -> None:
        self.relays.pop(relay.conn_id, None)
        self.active -= 1
        self.release_address(relay.address)
        code, reason, initiator = relay.close_info()
        c, u = relay.client.parser, relay.upstream.parser
        stats = RelayStats(c.messages, u.messages, c.message_bytes, u.message_bytes)
        attempt = relay.context
        self.gate.closed(attempt, time.monotonic(), code, reason, initiator, stats)
        self.trimmer.note(len(self.relays))
        self.check_drained()

    def check_drained(self) -> None:
        """During shutdown: wake it once no connection is left."""
        if self._all_closed is not None and not self.relays and not self.handshakes:
            self._all_closed.set()

    async def _sweep_idle(self) -> None:
        """Close relays with no traffic either way for idle_timeout. One timer for
        all connections; a relay's activity is read off its parsers' counters."""
        assert self.idle_timeout
        # A quarter of the timeout, at most a second or a sixtieth of it, whichever
        # is longer: the default hour is swept each minute, a few ms for 10 000 relays.
        interval = min(self.idle_timeout / 4, max(1.0, self.idle_timeout / 60))
        last: dict[int, tuple[int, float]] = {}  # conn id -> (activity, since when)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            current: dict[int, tuple[int, float]] = {}
            for conn_id, relay in list(self.relays.items()):
                c, u = relay.client.parser, relay.upstream.parser
                activity = c.frames + u.frames + c.message_bytes + u.message_bytes
                previous = last.get(conn_id)
                since = previous[1] if previous and previous[0] == activity else now
                if previous is None:
                    since = relay.opened_at if activity == 0 else now
                current[conn_id] = (activity, since)
                if now - since >= self.idle_timeout:
                    relay.close(1001, "loopwatch: idle timeout")
            last = current

    async def shutdown(self) -> None:
        """Stop accepting, close every WebSocket with 1001 on both legs, let plain
        HTTP responses in flight finish, wait up to shutdown_timeout for all that,
        then drop what is left."""
        self.closing = True
        self.trimmer.cancel()
        if self._server is not None:
            self._server.close()
        if self._idle_task is not None:
            self._idle_task.cancel()
        self._all_closed = asyncio.Event()
        for handshake in list(self.handshakes):
            handshake.shut_down()
        for relay in list(self.relays.values()):
            relay.close(1001, "loopwatch: shutting down")
        if self.relays or self.handshakes:
            try:
                await asyncio.wait_for(self._all_closed.wait(), self.shutdown_timeout)
            except TimeoutError:
                for relay in list(self.relays.values()):
                    relay.abort()
                for handshake in list(self.handshakes):
                    handshake.abort()
        if self._http_session is not None:
            await self._http_session.close()
