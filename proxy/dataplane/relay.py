"""The splice: after a 101, bytes flow both ways untouched.

Each side of a proxied WebSocket is a `Leg` (an asyncio protocol installed on
that side's transport with `set_protocol`). A leg feeds what it reads to its
frame-header parser and writes the very same bytes to the other side: client
frames stay masked with the client's keys, extensions stay end to end, close
codes and reasons arrive exactly as sent. Backpressure is TCP's own: when one
side's write buffer passes its high-water mark, reading from the other side
pauses until it drains, so nothing buffers without bound.

loopwatch writes a frame of its own only when it ends a connection itself
(`Relay.close`), and only at a frame boundary of the stream it writes into.

Three small state machines, each an enum with its table of legal moves
(docs/relay.md, "States"): the relay's (`RelayState`), and per leg what happens
to what its side sends (`Flow`) and where its transport is (`LegLink`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING

from .frames import FrameParser, build_close_frame
from .states import IllegalTransition, successors

if TYPE_CHECKING:
    from .boundary import Connection
    from .listener import AddressLoad

CLIENT = "client"
UPSTREAM = "upstream"
PROXY = "proxy"

# Codes loopwatch sends when one leg disappears without a close frame (see docs/relay.md).
CODE_UPSTREAM_LOST = 1014  # Bad Gateway: the upstream went away
CODE_CLIENT_LOST = 1001  # Going Away: the client went away
# How long a proxy-initiated close waits for a frame boundary and for the peers' replies.
CLOSE_GRACE = 2.0
# Close codes of a connection's end that no close frame carried (RFC 6455 §7.1.5, §7.4.1).
CODE_NO_STATUS = 1005  # a close frame without a code
CODE_ABNORMAL = 1006  # no close frame at all: the side vanished


class RelayState(StrEnum):
    """A proxied WebSocket as a whole."""

    OPEN = "open"  # frames flow both ways; the peers' own close handshake passes through here
    CLOSING = "closing"  # the proxy ends it: its close frames out, waiting for the replies or CLOSE_GRACE
    CLOSED = "closed"  # both transports are gone and the listener was told (on_done)


class Flow(StrEnum):
    """What a leg does with what its side sends."""

    FORWARDING = "forwarding"  # passes it on, watched by the frame parser
    FINISHING = "finishing"  # the proxy's close frame waits for the end of the frame in flight
    STOPPED = "stopped"  # the proxy ended this direction: only watched, for the side's close reply


class LegLink(StrEnum):
    """A leg's transport."""

    CONNECTED = "connected"
    HALF_CLOSED = "half_closed"  # the side shut its writing half after its close frame; `out` got the EOF
    GONE = "gone"  # connection_lost


OPEN, CLOSING, CLOSED = RelayState.OPEN, RelayState.CLOSING, RelayState.CLOSED
FORWARDING, FINISHING, STOPPED = Flow.FORWARDING, Flow.FINISHING, Flow.STOPPED
CONNECTED, HALF_CLOSED, GONE = LegLink.CONNECTED, LegLink.HALF_CLOSED, LegLink.GONE

RELAY_TRANSITIONS: frozenset[tuple[RelayState, RelayState]] = frozenset({
    (OPEN, CLOSING),  # Relay.close (idle timeout, shutdown, a protocol violation), or a side lost mid-stream
    (OPEN, CLOSED),  # both sides gone: after their close handshake, or abruptly
    (CLOSING, CLOSED),  # both sides gone: after their replies, or aborted at CLOSE_GRACE
})  # fmt: skip
FLOW_TRANSITIONS: frozenset[tuple[Flow, Flow]] = frozenset({
    (FORWARDING, FINISHING),  # the proxy closes while a frame of this side is half through
    (FORWARDING, STOPPED),  # the proxy's close frame went out, or there is nobody to forward to
    (FINISHING, STOPPED),  # the frame in flight ended (the close frame went out), or the side was lost
})  # fmt: skip
LINK_TRANSITIONS: frozenset[tuple[LegLink, LegLink]] = frozenset({
    (CONNECTED, HALF_CLOSED),  # EOF after the side's close frame, passed on (Relay.half_close)
    (CONNECTED, GONE),
    (HALF_CLOSED, GONE),
})  # fmt: skip
# Each state's legal next states, from the tables above: what a move checks (states.py).
RELAY_NEXT = successors(RelayState, RELAY_TRANSITIONS)
FLOW_NEXT = successors(Flow, FLOW_TRANSITIONS)
LINK_NEXT = successors(LegLink, LINK_TRANSITIONS)


class Leg(asyncio.Protocol):
    """One side of the splice: reads from `transport`, writes to `out`."""

    __slots__ = ("relay", "side", "parser", "transport", "out", "flow", "pending", "link")

    def __init__(self, relay: Relay, side: str, parser: FrameParser, transport: asyncio.Transport):
        self.relay = relay
        self.side = side
        self.parser = parser
        self.transport = transport
        self.out: asyncio.Transport = transport  # set to the other side's transport by Relay
        self.flow = FORWARDING
        self.pending: bytes | None = None  # the proxy's close frame while FINISHING
        self.link = CONNECTED

    @property
    def closed(self) -> bool:
        """Its transport is gone (for readers outside the relay)."""
        return self.link is GONE

    def _flow_to(self, flow: Flow) -> None:
        if flow not in FLOW_NEXT[self.flow]:
            raise IllegalTransition(f"{self.side} leg flow", self.flow, flow)
        self.flow = flow

    def _link_to(self, link: LegLink) -> None:
        if link not in LINK_NEXT[self.link]:
            raise IllegalTransition(f"{self.side} leg link", self.link, link)
        self.link = link

    def stop(self) -> None:
        """Forward nothing more from this side (idempotent): its close frame of
        the proxy, if one waits for a boundary, is dropped."""
        self.pending = None
        flow = self.flow
        if flow is not STOPPED:
            # _flow_to(STOPPED), written out: every connection comes this way.
            if STOPPED not in FLOW_NEXT[flow]:
                raise IllegalTransition(f"{self.side} leg flow", flow, STOPPED)
            self.flow = STOPPED

    def data_received(self, data: bytes) -> None:
        flow = self.flow
        if flow is FORWARDING:
            parser = self.parser
            n = parser.feed(data)
            if n == len(data):
                self.out.write(data)
                if parser.close_seen and self.relay.initiator is None:
                    self.relay.initiator = self.side
                return
            self.relay.violation(self, data, n)
        elif flow is FINISHING:
            self.relay.finish_frame(self, data)
        else:
            self.relay.discard(self, data)

    def pause_writing(self) -> None:
        self.relay.other(self).pause()

    def resume_writing(self) -> None:
        self.relay.other(self).resume()

    def pause(self) -> None:
        if self.link is not GONE:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.link is not GONE:
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        return self.relay.half_close(self)

    def connection_lost(self, exc: Exception | None) -> None:
        # _link_to(GONE), written out: every connection comes this way.
        if GONE not in LINK_NEXT[self.link]:
            raise IllegalTransition(f"{self.side} leg link", self.link, GONE)
        self.link = GONE
        self.relay.lost(self)


class Relay:
    """A proxied WebSocket: two legs, who closed first with what, and the proxy's
    own closes."""

    __slots__ = (
        "conn_id", "client", "upstream", "opened_at", "initiator", "proxy_code",
        "proxy_reason", "state", "_timer", "_on_done", "context", "address",
    )

    def __init__(
        self,
        conn_id: int,
        client_transport: asyncio.Transport,
        upstream_transport: asyncio.Transport,
        *,
        max_message_size: int | None,
        allowed_rsv: int,
        on_done: Callable[[Relay], None],
        context: Connection,
        address: AddressLoad,
    ):
        self.conn_id = conn_id
        self.context = context
        self.address = address  # the listener's count for the client's address (proxy/dataplane/listener.py)
        self.client = Leg(
            self, CLIENT,
            FrameParser(client_side=True, max_message_size=max_message_size, allowed_rsv=allowed_rsv),
            client_transport,
        )
        self.upstream = Leg(
            self, UPSTREAM,
            FrameParser(client_side=False, max_message_size=max_message_size, allowed_rsv=allowed_rsv),
            upstream_transport,
        )
        self.client.out = upstream_transport
        self.upstream.out = client_transport
        self.opened_at = time.monotonic()
        self.initiator: str | None = None  # whose close came first: client, upstream or proxy
        self.proxy_code: int | None = None
        self.proxy_reason = ""
        self.state = OPEN
        self._timer: asyncio.TimerHandle | None = None
        self._on_done = on_done

    def _to(self, state: RelayState) -> None:
        if state not in RELAY_NEXT[self.state]:
            raise IllegalTransition(f"relay {self.conn_id}", self.state, state)
        self.state = state

    def start(self, client_early: bytes, upstream_early: bytes) -> None:
        """Install the legs and forward what each side sent before the splice began."""
        self.client.transport.set_protocol(self.client)
        self.upstream.transport.set_protocol(self.upstream)
        if upstream_early:
            self.upstream.data_received(upstream_early)
        if client_early and self.upstream.link is not GONE:
            self.client.data_received(client_early)
        for leg in (self.client, self.upstream):
            # A leg whose output is already over its high-water mark is paused (its
            # pause_writing went to the handshake's protocol, not to the leg):
            # resume_writing resumes it once that output drains. Otherwise it reads,
            # which also resumes a client paused for sending too much too early.
            if leg.out.get_write_buffer_size() <= leg.out.get_write_buffer_limits()[1]:
                leg.resume()
            else:
                leg.pause()

    def other(self, leg: Leg) -> Leg:
        return self.upstream if leg is self.client else self.client

    def close_info(self) -> tuple[int, str, str]:
        """(code, reason, initiator) of the connection's end: the first close frame
        seen, the proxy's own close, or 1006 when a side vanished without one."""
        if self.initiator == CLIENT or self.initiator == UPSTREAM:
            parser = self.client.parser if self.initiator == CLIENT else self.upstream.parser
            if not parser.close_seen:  # that side vanished without a close frame
                return CODE_ABNORMAL, "", self.initiator
            code = parser.close_code if parser.close_code is not None else CODE_NO_STATUS
            return code, parser.close_reason, self.initiator
        if self.initiator == PROXY and self.proxy_code is not None:
            return self.proxy_code, self.proxy_reason, PROXY
        return CODE_ABNORMAL, "", self.initiator or CLIENT

    # --- the proxy's own close: off the hot path ------------------------------

    def close(self, code: int, reason: str) -> None:
        """End the connection from the proxy: a close frame into each direction at a
        frame boundary, then the transports close once each side answered, or
        after CLOSE_GRACE."""
        if self.state is not OPEN:
            return
        self._to(CLOSING)
        if self.initiator is None:
            self.initiator = PROXY
        self.proxy_code, self.proxy_reason = code, reason
        self._timer = asyncio.get_running_loop().call_later(CLOSE_GRACE, self.abort)
        for leg in (self.client, self.upstream):
            if self.other(leg).link is GONE or leg.link is HALF_CLOSED or leg.flow is not FORWARDING:
                leg.stop()  # nobody to tell, or its side ended this direction itself
                continue
            leg.pending = build_close_frame(code, reason, mask=leg is self.client)
            if leg.parser.at_boundary:
                self.flush_pending(leg)
            else:  # the direction is mid-frame; finish_frame flushes at its end.
                leg._flow_to(FINISHING)

    def flush_pending(self, leg: Leg) -> None:
        frame = leg.pending
        leg.stop()
        if frame is not None:
            leg.out.write(frame)
        self.settle(self.other(leg))

    def finish_frame(self, leg: Leg, data: bytes) -> None:
        """A close frame of the proxy's waits for the frame in flight: forward up
        to that frame's end, write the close frame, and only watch what follows."""
        parser = leg.parser
        pos, n = 0, len(data)
        while pos < n and not parser.at_boundary:
            # The rest of the payload at once; a header still incomplete byte by
            # byte (at most 13 bytes), until its length is known.
            take = min(parser.frame_remaining or 1, n - pos)
            piece = data[pos : pos + take]
            k = parser.feed(piece)
            if k < take:
                self.violation(leg, piece, k)
                return
            leg.out.write(piece)
            pos += take
        if parser.close_seen and self.initiator is None:
            self.initiator = leg.side
        if parser.at_boundary:
            self.flush_pending(leg)
            if pos < n:
                self.discard(leg, data[pos:])

    def violation(self, leg: Leg, data: bytes, n: int) -> None:
        """A frame loopwatch must not forward (protocol error, message too big): pass
        what came before it, then close both sides with the error's code."""
        if n:
            leg.out.write(data[:n])
        err = leg.parser.error
        if err is None:  # cannot happen: feed() stops short only on an error
            raise AssertionError("frame parser stopped without an error")
        if not leg.parser.at_boundary:
            # The offending frame started in an earlier chunk and its first bytes
            # are out: a close frame now would land inside it. End that stream.
            leg.stop()
            leg.out.close()
        if self.state is CLOSING:
            if leg.flow is FINISHING:
                self.flush_pending(leg)
        else:
            self.close(err.close_code, f"loopwatch: {err.reason}")
        leg.stop()
        self.settle(leg)

    def discard(self, leg: Leg, data: bytes) -> None:
        """Bytes after the proxy closed this direction: watch for the side's close reply."""
        parser = leg.parser
        if parser.error is None:
            parser.feed(data)
        self.settle(leg)

    def settle(self, leg: Leg) -> None:
        """While closing, end `leg`'s side once its close handshake is done: the
        proxy's close frame is written to it and its own close frame arrived."""
        if self.state is not CLOSING or leg.link is GONE or self.other(leg).flow is FINISHING:
            return
        transport = leg.transport
        if leg.parser.close_seen:
            transport.close()
        elif leg.parser.error is not None and not transport.is_closing():
            # Its stream cannot be read any more, so its close reply would go
            # unnoticed: send a FIN after the close frame and keep reading (and
            # dropping) until the peer closes its side. Closing outright with
            # unread bytes would reset the connection, and a reset can destroy
            # the close frame before the peer reads it.
            if transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()

    def abort(self) -> None:
        for leg in (self.client, self.upstream):
            if leg.link is not GONE:
                leg.transport.abort()

    # --- ends of the transports ----------------------------------------------

    def half_close(self, leg: Leg) -> bool:
        """A side shut its writing half: pass the EOF on where the other transport
        can (TLS cannot half-close: then both close)."""
        if self.state is CLOSING:
            # That side is done; the other ends with its own close reply (settle)
            # or at the grace timeout.
            return False
        if not leg.parser.close_seen:
            # A WebSocket ends with a close frame; an EOF before one means the side
            # is gone: let the transport close, and lost() tell the other side.
            return False
        other = self.other(leg)
        if other.link is not CONNECTED or not other.transport.can_write_eof():
            # Both halves are shut (or cannot be shut one by one): close both.
            if other.link is not GONE:
                other.transport.close()
            return False
        # _link_to(HALF_CLOSED), written out: every connection comes this way.
        # (uvloop reports an EOF again if reading resumes after it: then the link
        # is HALF_CLOSED already.)
        link = leg.link
        if link is CONNECTED:
            if HALF_CLOSED not in LINK_NEXT[link]:
                raise IllegalTransition(f"{leg.side} leg link", link, HALF_CLOSED)
            leg.link = HALF_CLOSED
        # Its side sends nothing more, and nothing more goes out this way: the
        # other transport's writing half is shut below, so no close frame of the
        # proxy may follow either (a write after write_eof raises).
        leg.stop()
        other.transport.write_eof()
        return True

    def lost(self, leg: Leg) -> None:
        if self.state is CLOSED:
            return
        if self.initiator is None:
            self.initiator = leg.side  # it vanished first, without a close frame
        other = self.other(leg)
        if other.link is not GONE:
            # Nothing reaches the side that is gone any more.
            other.stop()
            if self.state is CLOSING:
                if leg.flow is FINISHING:
                    # The proxy's close frame for the other side was waiting for
                    # the end of a frame this side will never finish.
                    leg.stop()
                    other.transport.abort()
                else:
                    self.settle(other)  # closes on its close reply, or at the grace timeout
            elif leg.parser.close_seen:  # (a side half-closes only after its close frame)
                other.transport.close()  # an ordinary close handshake: flush, then close
            elif leg.parser.at_boundary and leg.parser.error is None:
                # The side vanished without a close frame: tell the other one why,
                # then wait (up to CLOSE_GRACE) for its close reply, as in close().
                if leg is self.upstream:
                    code, reason = CODE_UPSTREAM_LOST, "loopwatch: upstream connection lost"
                else:
                    code, reason = CODE_CLIENT_LOST, "loopwatch: client connection lost"
                self._to(CLOSING)
                self._timer = asyncio.get_running_loop().call_later(CLOSE_GRACE, self.abort)
                leg.stop()
                other.transport.write(build_close_frame(code, reason, mask=other is self.upstream))
                self.settle(other)
            else:
                other.transport.abort()  # mid-frame: a close frame now would corrupt the stream
            return
        # _to(CLOSED), written out: every connection comes this way.
        if CLOSED not in RELAY_NEXT[self.state]:
            raise IllegalTransition(f"relay {self.conn_id}", self.state, CLOSED)
        self.state = CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._on_done(self)
        # Both transports are gone and nothing calls a leg any more: break the
        # cycles (relay <-> legs <-> transports, whose protocol is the leg) so the
        # connection's memory goes back at once by reference counting, not at the
        # collector's next full pass, which an idle proxy may not make for long.
        for gone in (self.client, self.upstream):
            del gone.relay, gone.transport, gone.out
