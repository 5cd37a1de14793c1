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
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from .frames import FrameParser, build_close_frame

CLIENT = "client"
UPSTREAM = "upstream"
PROXY = "proxy"

# Codes loopwatch sends when one leg disappears without a close frame (see docs/relay.md).
CODE_UPSTREAM_LOST = 1014  # Bad Gateway: the upstream went away
CODE_CLIENT_LOST = 1001  # Going Away: the client went away
# How long a proxy-initiated close waits for a frame boundary and for the peers' replies.
CLOSE_GRACE = 2.0


class Leg(asyncio.Protocol):
    """One side of the splice: reads from `transport`, writes to `out`."""

    __slots__ = ("relay", "side", "parser", "transport", "out", "forward", "pending", "eof", "closed")

    def __init__(self, relay: Relay, side: str, parser: FrameParser, transport: asyncio.Transport):
        self.relay = relay
        self.side = side
        self.parser = parser
        self.transport = transport
        self.out: asyncio.Transport = transport  # set to the other side's transport by Relay
        self.forward = True  # False once the proxy ended this direction with its own close
        self.pending: bytes | None = None  # the proxy's close frame, waiting for a boundary
        self.eof = False  # this side shut its writing half, and `out` got the EOF
        self.closed = False

    def data_received(self, data: bytes) -> None:
        if self.pending is None and self.forward:
            parser = self.parser
            n = parser.feed(data)
            if n == len(data):
                self.out.write(data)
                if parser.close_seen and self.relay.initiator is None:
                    self.relay.initiator = self.side
                return
            self.relay.violation(self, data, n)
        elif self.forward:
            self.relay.finish_frame(self, data)
        else:
            self.relay.discard(self, data)

    def pause_writing(self) -> None:
        self.relay.other(self).pause()

    def resume_writing(self) -> None:
        self.relay.other(self).resume()

    def pause(self) -> None:
        if not self.closed:
            self.transport.pause_reading()

    def resume(self) -> None:
        if not self.closed:
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        return self.relay.half_close(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.relay.lost(self)


class Relay:
    """A proxied WebSocket: two legs, who closed first with what, and the proxy's
    own closes."""

    __slots__ = (
        "conn_id", "client", "upstream", "opened_at", "initiator", "proxy_code",
        "proxy_reason", "closing", "_timer", "_on_done", "done", "context", "address",
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
        context: object = None,
        address: object = None,
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
        self.closing = False
        self._timer: asyncio.TimerHandle | None = None
        self._on_done = on_done
        self.done = False

    def start(self, client_early: bytes, upstream_early: bytes) -> None:
        """Install the legs and forward what each side sent before the splice began."""
        self.client.transport.set_protocol(self.client)
        self.upstream.transport.set_protocol(self.upstream)
        if upstream_early:
            self.upstream.data_received(upstream_early)
        if client_early and not self.upstream.closed:
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
                return 1006, "", self.initiator
            code = parser.close_code if parser.close_code is not None else 1005
            return code, parser.close_reason, self.initiator
        if self.initiator == PROXY and self.proxy_code is not None:
            return self.proxy_code, self.proxy_reason, PROXY
        return 1006, "", self.initiator or CLIENT

    # --- the proxy's own close: off the hot path ------------------------------

    def close(self, code: int, reason: str) -> None:
        """End the connection from the proxy: a close frame into each direction at a
        frame boundary, then the transports close once each side answered, or
        after CLOSE_GRACE."""
        if self.closing or self.done:
            return
        self.closing = True
        if self.initiator is None:
            self.initiator = PROXY
        self.proxy_code, self.proxy_reason = code, reason
        self._timer = asyncio.get_running_loop().call_later(CLOSE_GRACE, self.abort)
        for leg in (self.client, self.upstream):
            if self.other(leg).closed or leg.eof or not leg.forward:
                leg.forward = False
                continue
            leg.pending = build_close_frame(code, reason, mask=leg is self.client)
            if leg.parser.at_boundary:
                self.flush_pending(leg)
            # else: the direction is mid-frame; finish_frame flushes at its end.

    def flush_pending(self, leg: Leg) -> None:
        frame, leg.pending = leg.pending, None
        leg.forward = False
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
            leg.forward = False
            leg.pending = None
            leg.out.close()
        if self.closing:
            if leg.pending is not None:
                self.flush_pending(leg)
        else:
            self.close(err.close_code, f"loopwatch: {err.reason}")
        leg.forward = False
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
        if not self.closing or leg.closed or self.other(leg).pending is not None:
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
            if not leg.closed:
                leg.transport.abort()

    # --- ends of the transports ----------------------------------------------

    def half_close(self, leg: Leg) -> bool:
        """A side shut its writing half: pass the EOF on where the other transport
        can (TLS cannot half-close: then both close)."""
        if self.closing:
            # That side is done; the other ends with its own close reply (settle)
            # or at the grace timeout.
            return False
        if not leg.parser.close_seen:
            # A WebSocket ends with a close frame; an EOF before one means the side
            # is gone: let the transport close, and lost() tell the other side.
            return False
        other = self.other(leg)
        if other.closed or other.eof or not other.transport.can_write_eof():
            # Both halves are shut (or cannot be shut one by one): close both.
            if not other.closed:
                other.transport.close()
            return False
        leg.eof = True
        other.transport.write_eof()
        return True

    def lost(self, leg: Leg) -> None:
        if self.done:
            return
        if self.initiator is None:
            self.initiator = leg.side  # it vanished first, without a close frame
        other = self.other(leg)
        if not other.closed:
            # Nothing reaches the side that is gone any more.
            other.forward = False
            other.pending = None
            if self.closing:
                if leg.pending is not None:
                    # The proxy's close frame for the other side was waiting for
                    # the end of a frame this side will never finish.
                    leg.pending = None
                    other.transport.abort()
                else:
                    self.settle(other)  # closes on its close reply, or at the grace timeout
            elif leg.parser.close_seen or leg.eof:
                other.transport.close()  # an ordinary close handshake: flush, then close
            elif leg.parser.at_boundary and leg.parser.error is None:
                # The side vanished without a close frame: tell the other one why,
                # then wait (up to CLOSE_GRACE) for its close reply, as in close().
                if leg is self.upstream:
                    code, reason = CODE_UPSTREAM_LOST, "loopwatch: upstream connection lost"
                else:
                    code, reason = CODE_CLIENT_LOST, "loopwatch: client connection lost"
                self.closing = True
                self._timer = asyncio.get_running_loop().call_later(CLOSE_GRACE, self.abort)
                leg.forward = False
                leg.pending = None
                other.transport.write(build_close_frame(code, reason, mask=other is self.upstream))
                self.settle(other)
            else:
                other.transport.abort()  # mid-frame: a close frame now would corrupt the stream
            return
        self.done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._on_done(self)
        # Both transports are gone and nothing calls a leg any more: break the
        # cycles (relay <-> legs <-> transports, whose protocol is the leg) so the
        # connection's memory goes back at once by reference counting, not at the
        # collector's next full pass, which an idle proxy may not make for long.
        for gone in (self.client, self.upstream):
            gone.relay = gone.transport = gone.out = None  # type: ignore[assignment]
