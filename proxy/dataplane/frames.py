"""Incremental RFC 6455 frame-header parser for the byte-splicing relay.

The relay forwards every byte unchanged; this module only *watches* the stream.
It is sans-I/O (no sockets, no asyncio, no clock), like the protocol cores of
h11 and websockets, so it can be tested exhaustively and replayed offline.

Design notes (why the code looks the way it does):

* ``feed`` is on the hot path of every relayed chunk, so the per-frame loop
  keeps all state in local variables and writes it back once per chunk;
  attribute access costs several times a local access in CPython.
* Payloads are skipped arithmetically (``pos = end``), never sliced or copied,
  so a 1 MiB frame costs the same as an empty one.  The only payloads read are
  close frames' (at most 125 bytes), to learn the close code and reason.
* The validity of a frame's first byte depends only on that byte, on whether a
  fragmented message is in progress and on the negotiated RSV bits, so it is
  precomputed into a table: one lookup classifies the frame *and* validates
  FIN/RSV/opcode/fragmentation.  The precise error is only worked out (by
  ``_diagnose``) once something is known to be wrong, which keeps the rules in
  one place instead of duplicating them between a fast and a slow path.
* A header split across chunks is the only thing buffered (at most 13 bytes).
  It is completed by gluing it to the first bytes of the next chunk and
  running the same loop over that small buffer.
* Positions in errors are tracked as absolute stream offsets so that a frame
  whose header started in an earlier chunk can be told apart from one that
  starts in the current chunk (only the latter can still be withheld).
* Two builds of the same parser: ``PyFrameParser`` below, the reference and
  the fallback, and ``proxy._frames.FrameParser``, a C extension compiled at
  install time (proxy/dataplane/_frames.c) that runs the same loop without the
  interpreter's per-byte cost.  ``FrameParser`` is the compiled one when it is
  importable (unless ``LW_PURE_PYTHON_FRAMES=1``).  The C build calls back into
  this module for what is rare and carries the rules' wording: the first-byte
  tables, close payloads (``_parse_close``), error descriptions
  (``_diagnose``) and ``FrameHeader`` objects.  tests/test_frames.py runs every
  test against both builds and fuzzes one against the other.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

__all__ = [
    "COMPILED",
    "CFrameParser",
    "FrameHeader",
    "FrameParser",
    "MessageTooBig",
    "ProtocolError",
    "PyFrameParser",
    "build_close_frame",
]

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

RSV1 = 0b100

# Largest possible header: 2 bytes + 8-byte extended length + 4-byte mask key.
MAX_HEADER_SIZE = 14
# Control frames carry at most 125 payload bytes (RFC 6455 §5.5).
MAX_CONTROL_PAYLOAD = 125
# A close reason must fit the 125-byte control payload after the 2-byte code.
MAX_CLOSE_REASON = MAX_CONTROL_PAYLOAD - 2

# Frame classes stored in the first-byte table.  0 means "invalid here".
# Data classes are 1..4 and odd data classes carry FIN, so the hot loop can
# test ``cls <= 4`` and ``cls & 1`` instead of decoding opcode and FIN again.
_INVALID = 0
_DATA_WHOLE = 1  # text/binary, FIN=1, no message in progress
_DATA_FIRST = 2  # text/binary, FIN=0: starts a fragmented message
_CONT_LAST = 3  # continuation, FIN=1: ends the fragmented message
_CONT_MORE = 4  # continuation, FIN=0
_PING = 5
_PONG = 6
_CLOSE = 7

# ``in message`` flag after a data frame of each class, encoded as the 256
# offset used to index the table (see _TABLES).  Only data classes use it.
_IM_AFTER = (0, 0, 256, 0, 256)

# "No limit" as an int, so the hot loop compares without a None check per
# frame; no connection will ever carry 2**80 bytes.
_NO_LIMIT = 1 << 80

_RESERVED_CLOSE_CODES = frozenset({1004, 1005, 1006, 1015})


class ProtocolError(Exception):
    """The peer broke RFC 6455; the relay should close with ``close_code``."""

    close_code: int = 1002

    def __init__(self, reason: str, close_code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if close_code is not None:
            self.close_code = close_code


class MessageTooBig(ProtocolError):
    """A data message exceeds ``max_message_size`` (close code 1009)."""

    close_code = 1009


@dataclass(frozen=True, slots=True)
class FrameHeader:
    fin: bool
    rsv: int  # 3 bits, RSV1 = 0b100
    opcode: int
    masked: bool
    mask: bytes | None
    length: int
    header_size: int


def _first_byte_problem(b0: int, in_message: bool, allowed_rsv: int) -> str | None:
    """Why a frame starting with ``b0`` is invalid in this state, or None.

    Single source of truth for FIN/RSV/opcode/fragmentation rules: both the
    first-byte tables and the error messages are derived from it.
    """
    fin = b0 & 0x80
    rsv = (b0 >> 4) & 0b111
    opcode = b0 & 0x0F
    if 3 <= opcode <= 7 or opcode >= 0xB:
        return f"reserved opcode {opcode:#x}"
    if opcode >= 8:
        if not fin:
            return "fragmented control frame"
        if rsv:
            return "RSV bits set on a control frame"
        return None
    if rsv & ~allowed_rsv:
        return "RSV bits set without a negotiated extension"
    if opcode == OP_CONT:
        if not in_message:
            return "continuation frame without a message in progress"
        if rsv & RSV1:
            # permessage-deflate sets RSV1 on a message's first frame only.
            return "RSV1 set on a continuation frame"
        return None
    if in_message:
        return "new data frame inside a fragmented message"
    return None


def _classify(b0: int, in_message: bool, allowed_rsv: int) -> int:
    if _first_byte_problem(b0, in_message, allowed_rsv) is not None:
        return _INVALID
    opcode = b0 & 0x0F
    fin = bool(b0 & 0x80)
    if opcode == OP_CLOSE:
        return _CLOSE
    if opcode == OP_PING:
        return _PING
    if opcode == OP_PONG:
        return _PONG
    if opcode == OP_CONT:
        return _CONT_LAST if fin else _CONT_MORE
    return _DATA_WHOLE if fin else _DATA_FIRST


# One 512-entry table per value of allowed_rsv: index ``b0 | 256`` while a
# fragmented message is in progress, ``b0`` otherwise.  8 * 512 small ints are
# built once at import, so creating a parser per connection costs nothing.
_TABLES: tuple[tuple[int, ...], ...] = tuple(
    tuple(_classify(i & 0xFF, i >= 256, allowed) for i in range(512)) for allowed in range(8)
)


def _unmask(payload: bytes, key: bytes) -> bytes:
    # Used for close payloads only (<= 125 bytes): one big-int XOR is faster
    # in CPython than a per-byte loop.
    n = len(payload)
    stream = (key * ((n + 3) // 4))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def _close_code_valid(code: int) -> bool:
    # RFC 6455 §7.4: 1000-2999 are the protocol's own (only registered ones
    # may appear on the wire), 3000-4999 are for libraries and applications.
    if code < 1000 or code >= 5000:
        return False
    if code in _RESERVED_CLOSE_CODES:
        return False
    return not 1016 <= code <= 2999


def _parse_close(payload: bytes) -> tuple[int | None, str]:
    """Close code and reason of an unmasked close payload; raises ProtocolError."""
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise ProtocolError("close frame with a 1-byte payload")
    code = (payload[0] << 8) | payload[1]
    if not _close_code_valid(code):
        raise ProtocolError(f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("close reason is not valid UTF-8", 1007) from None
    return code, reason


class PyFrameParser:
    """Watches one direction of a WebSocket stream, header by header.

    ``feed`` returns how many leading bytes of the chunk may be forwarded.
    See the module docstring for why the implementation is shaped this way.
    The pure-Python build: the reference, and the fallback where the compiled
    one (proxy/dataplane/_frames.c) is not built.
    """

    __slots__ = (
        "client_side",
        "max_message_size",
        "allowed_rsv",
        "on_frame",
        "messages",
        "message_bytes",
        "frames",
        "pings",
        "pongs",
        "close_seen",
        "close_code",
        "close_reason",
        "error",
        "in_message",
        "_msg_len",
        "_skip",
        "_kind",
        "_hbuf",
        "_close_buf",
        "_close_mask",
        "_frame_start",
        "_offset",
        "_err_boundary",
    )

    def __init__(
        self,
        *,
        client_side: bool,
        max_message_size: int | None = None,
        allowed_rsv: int = 0,
        on_frame: Callable[[FrameHeader], None] | None = None,
    ) -> None:
        if not 0 <= allowed_rsv <= 0b111:
            raise ValueError(f"allowed_rsv must be a 3-bit value, got {allowed_rsv!r}")
        if max_message_size is not None and max_message_size < 0:
            raise ValueError("max_message_size must be >= 0 or None")
        self.client_side = client_side
        self.max_message_size = max_message_size
        self.allowed_rsv = allowed_rsv
        # Called for every accepted header, in stream order.  It runs inside
        # feed() and must not raise (the relay wraps its observers).
        self.on_frame = on_frame
        self.messages = 0
        self.message_bytes = 0
        self.frames = 0
        self.pings = 0
        self.pongs = 0
        self.close_seen = False
        self.close_code: int | None = None
        self.close_reason = ""
        self.error: ProtocolError | None = None
        self.in_message = False
        self._msg_len = 0  # payload bytes of the current data message so far
        self._skip = 0  # payload bytes of the current frame still to come
        self._kind = _INVALID  # class of the frame whose payload is pending
        self._hbuf = bytearray()  # start of a header split across chunks
        self._close_buf = bytearray()  # masked close payload split across chunks
        self._close_mask: bytes | None = None
        self._frame_start = 0  # stream offset of a close frame whose payload is pending
        self._offset = 0  # stream offset of the next chunk's first byte
        self._err_boundary = True

    @property
    def at_boundary(self) -> bool:
        """True iff the bytes accepted so far end exactly between two frames.

        After an error this describes the accepted prefix (what ``feed``
        allowed to be forwarded): it is False when the offending frame had
        already started in an earlier chunk, so the peer holds half a frame
        and the relay must not append a close frame of its own.
        """
        if self.error is not None:
            return self._err_boundary
        return not self._skip and not self._hbuf

    @property
    def frame_remaining(self) -> int:
        """Payload bytes of the frame in progress still to come.

        0 at a frame boundary, and also while a header is incomplete (its
        frame's length is not known yet); lets the relay forward exactly up to
        the end of the current frame before writing a frame of its own.  0
        after an error: nothing more of this stream is to be forwarded.
        """
        if self.error is not None:
            return 0
        return self._skip

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Consume a chunk; return how many leading bytes are safe to forward.

        Normally ``len(data)``.  On a protocol violation, the offset in
        ``data`` where the offending frame starts (0 if it started in an
        earlier chunk), with ``self.error`` set; every later call re-raises it.
        """
        if self.error is not None:
            raise self.error
        if not 0 <= self.allowed_rsv <= 0b111:
            raise ValueError(f"allowed_rsv must be a 3-bit value, got {self.allowed_rsv!r}")
        if type(data) is memoryview and data.format != "B":
            # Indexing must yield ints 0..255 ("b" would give negatives).
            data = data.cast("B")
        n = len(data)
        base = self._offset
        pos = 0
        hbuf = self._hbuf
        # Complete a header split across chunks: glue the buffered bytes to
        # just enough of this chunk and run the normal loop on that small
        # buffer.  Repeats when the glued buffer ends in another partial
        # header (e.g. tiny frames fed byte by byte).
        while hbuf and pos < n:
            k = len(hbuf)
            take = min(MAX_HEADER_SIZE - k, n - pos)
            glued = bytes(hbuf) + bytes(data[pos : pos + take])
            hbuf.clear()
            err = self._run(glued, 0, base + pos - k)
            if err >= 0:
                return self._fail(err, base)
            pos += take
        if pos < n:
            err = self._run(data, pos, base)
            if err >= 0:
                return self._fail(err, base)
        self._offset = base + n
        return n

    def _fail(self, err_offset: int, base: int) -> int:
        # err_offset is the stream offset where the offending frame starts.
        # If that is before this chunk, its first bytes were already forwarded.
        if err_offset < base:
            self._err_boundary = False
            self._offset = base
            return 0
        self._err_boundary = True
        self._offset = err_offset
        return err_offset - base

    def _run(self, buf: bytes | bytearray | memoryview, pos: int, base: int) -> int:
        """Parse ``buf[pos:]``; ``buf[0]`` is at stream offset ``base``.

        Returns -1, or the stream offset of an invalid frame (with
        ``self.error`` set).
        """
        n = len(buf)

        # 1. Finish the payload of a frame that started in an earlier buffer.
        skip = self._skip
        if skip:
            avail = n - pos
            take = skip if skip <= avail else avail
            skip -= take
            self._skip = skip
            kind = self._kind
            if kind <= _CONT_MORE:
                self.message_bytes += take
            elif kind == _CLOSE:
                self._close_buf += buf[pos : pos + take]
            pos += take
            if skip:
                return -1
            if kind <= _CONT_MORE:
                if kind & 1:
                    self.messages += 1
            elif kind == _CLOSE:
                payload = bytes(self._close_buf)
                self._close_buf.clear()
                if self._close_mask is not None:
                    payload = _unmask(payload, self._close_mask)
                try:
                    self.close_code, self.close_reason = _parse_close(payload)
                except ProtocolError as exc:
                    self.error = exc
                    return self._frame_start
                self.close_seen = True
            if pos >= n:
                return -1

        # 2. Whole frames.  Everything below is local for speed; the state is
        # written back once after the loop.
        allowed_rsv = self.allowed_rsv
        table = _TABLES[allowed_rsv]
        want_mask = 0x80 if self.client_side else 0
        hs0 = 6 if want_mask else 2  # header size with a 7-bit length
        max_size = self.max_message_size
        if max_size is None:
            max_size = _NO_LIMIT
        on_frame = self.on_frame
        im = 256 if self.in_message else 0
        msg_len = self._msg_len
        frames = self.frames
        messages = self.messages
        message_bytes = self.message_bytes
        pings = self.pings
        pongs = self.pongs
        err_pos = -1
        error: ProtocolError | None = None

        while pos < n:
            left = n - pos
            if left < MAX_HEADER_SIZE:
                # Near the end of the buffer: stop if the header is cut short.
                # (With >= 14 bytes left any header is complete, so the common
                # case pays for this single comparison only.)
                if left < 2:
                    break
                b1 = buf[pos + 1]
                need = 2 if b1 & 0x80 == 0 else 6
                ln7 = b1 & 0x7F
                if ln7 == 126:
                    need += 2
                elif ln7 == 127:
                    need += 8
                if left < need:
                    break
            b0 = buf[pos]
            b1 = buf[pos + 1]
            cls = table[b0 | im]
            if not cls or b1 & 0x80 != want_mask:
                err_pos = pos
                break
            ln = b1 & 0x7F
            if ln < 126:
                hs = hs0
            elif cls > _CONT_MORE:  # control frames carry <= 125 bytes
                err_pos = pos
                break
            elif ln == 126:
                ln = (buf[pos + 2] << 8) | buf[pos + 3]
                hs = hs0 + 2
            else:
                ln = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                if ln >> 63:
                    err_pos = pos
                    break
                hs = hs0 + 8
            end = pos + hs + ln

            if cls <= _CONT_MORE:
                total = ln if cls <= _DATA_FIRST else msg_len + ln
                if total > max_size:
                    err_pos = pos
                    break
                msg_len = total
                im = _IM_AFTER[cls]
                frames += 1
                if on_frame is not None:
                    on_frame(self._header(buf, pos, hs, ln))
                if end <= n:
                    message_bytes += ln
                    if cls & 1:
                        messages += 1
                    pos = end
                    continue
                message_bytes += n - pos - hs
                self._skip = end - n
                self._kind = cls
                pos = n
                break

            if cls == _CLOSE:
                if ln == 1:
                    err_pos = pos
                    break
                if end <= n:
                    # Whole close frame here: validate before accepting it, so
                    # a bad one is withheld like a bad header.
                    payload = bytes(buf[pos + hs : end])
                    if want_mask:
                        payload = _unmask(payload, bytes(buf[pos + hs - 4 : pos + hs]))
                    try:
                        code, reason = _parse_close(payload)
                    except ProtocolError as exc:
                        error = exc
                        err_pos = pos
                        break
                    frames += 1
                    if on_frame is not None:
                        on_frame(self._header(buf, pos, hs, ln))
                    self.close_code = code
                    self.close_reason = reason
                    self.close_seen = True
                    pos = end
                    continue
                frames += 1
                if on_frame is not None:
                    on_frame(self._header(buf, pos, hs, ln))
                self._close_buf = bytearray(buf[pos + hs : n])
                self._close_mask = bytes(buf[pos + hs - 4 : pos + hs]) if want_mask else None
                self._skip = end - n
                self._kind = cls
                self._frame_start = base + pos
                pos = n
                break

            # Ping or pong: payload is skipped like data but not counted.
            if cls == _PING:
                pings += 1
            else:
                pongs += 1
            frames += 1
            if on_frame is not None:
                on_frame(self._header(buf, pos, hs, ln))
            if end <= n:
                pos = end
                continue
            self._skip = end - n
            self._kind = cls
            pos = n
            break

        self.in_message = im != 0
        self._msg_len = msg_len
        self.frames = frames
        self.messages = messages
        self.message_bytes = message_bytes
        self.pings = pings
        self.pongs = pongs

        if err_pos < 0 and pos < n:
            # A header cut short by the end of the buffer.  Reject it now if
            # the bytes we have already prove it invalid, so it is never
            # forwarded; otherwise keep it for the next chunk.
            error = self._diagnose(buf, pos, n, im != 0, msg_len)
            if error is None:
                self._hbuf += buf[pos:n]
                return -1
            err_pos = pos
        if err_pos < 0:
            return -1
        if error is None:
            error = self._diagnose(buf, err_pos, n, im != 0, msg_len)
            if error is None:  # pragma: no cover - the fast path and _diagnose disagree
                raise AssertionError(f"frame at offset {base + err_pos} rejected without a reason")
        self.error = error
        return base + err_pos

    def _header(
        self, buf: bytes | bytearray | memoryview, pos: int, hs: int, ln: int
    ) -> FrameHeader:
        # Only built when someone listens (on_frame), so the hot loop does
        # not allocate per frame.
        b0 = buf[pos]
        masked = bool(buf[pos + 1] & 0x80)
        return FrameHeader(
            fin=bool(b0 & 0x80),
            rsv=(b0 >> 4) & 0b111,
            opcode=b0 & 0x0F,
            masked=masked,
            mask=bytes(buf[pos + hs - 4 : pos + hs]) if masked else None,
            length=ln,
            header_size=hs,
        )

    def _diagnose(
        self,
        buf: bytes | bytearray | memoryview,
        pos: int,
        n: int,
        in_message: bool,
        msg_len: int,
    ) -> ProtocolError | None:
        return _diagnose(
            buf, pos, n, in_message, msg_len, self.allowed_rsv, self.client_side, self.max_message_size
        )


def _diagnose(
    buf: bytes | bytearray | memoryview,
    pos: int,
    n: int,
    in_message: bool,
    msg_len: int,
    allowed_rsv: int,
    client_side: bool,
    limit: int | None,
) -> ProtocolError | None:
    """The error in the (possibly incomplete) header at ``buf[pos:n]``.

    Slow and explicit on purpose: it only runs when the hot loop has
    already decided something is wrong, or at the end of a chunk.
    Returns None if the bytes available show no violation yet. Both builds
    of the parser describe their errors with it.
    """
    avail = n - pos
    b0 = buf[pos]
    problem = _first_byte_problem(b0, in_message, allowed_rsv)
    if problem is not None:
        return ProtocolError(problem)
    if avail < 2:
        return None
    b1 = buf[pos + 1]
    masked = bool(b1 & 0x80)
    if masked != client_side:
        return ProtocolError("unmasked client frame" if client_side else "masked server frame")
    opcode = b0 & 0x0F
    ln = b1 & 0x7F
    if opcode >= 8:
        if ln > MAX_CONTROL_PAYLOAD:
            return ProtocolError("control frame payload longer than 125 bytes")
        if opcode == OP_CLOSE and ln == 1:
            return ProtocolError("close frame with a 1-byte payload")
        return None
    if ln == 126:
        if avail < 4:
            return None
        ln = int.from_bytes(buf[pos + 2 : pos + 4], "big")
    elif ln == 127:
        if avail < 10:
            return None
        ln = int.from_bytes(buf[pos + 2 : pos + 10], "big")
        if ln >> 63:
            return ProtocolError("64-bit payload length with the most significant bit set")
    total = msg_len + ln if opcode == OP_CONT else ln
    if limit is not None and total > limit:
        return MessageTooBig(f"message larger than {limit} bytes")
    return None


def build_close_frame(code: int, reason: str = "", *, mask: bool) -> bytes:
    """A close frame written by the proxy itself.

    ``mask=True`` toward an upstream server (the proxy is its client there),
    with a fresh key from os.urandom as RFC 6455 §5.3 requires.  The reason is
    cut to 123 bytes of UTF-8 on a character boundary, so the payload stays a
    valid control frame and the peer does not fail it with 1007.
    """
    if not _close_code_valid(code):
        raise ValueError(f"close code {code} may not be sent")
    # "replace": a stray surrogate in a reason must not stop the proxy from
    # closing a connection.
    encoded = reason.encode("utf-8", "replace")
    if len(encoded) > MAX_CLOSE_REASON:
        cut = MAX_CLOSE_REASON
        # Back off over continuation bytes (10xxxxxx) to a character start.
        while cut > 0 and encoded[cut] & 0xC0 == 0x80:
            cut -= 1
        encoded = encoded[:cut]
    payload = code.to_bytes(2, "big") + encoded
    if mask:
        key = os.urandom(4)
        return bytes((0x80 | OP_CLOSE, 0x80 | len(payload))) + key + _unmask(payload, key)
    return bytes((0x80 | OP_CLOSE, len(payload))) + payload


def load_compiled() -> type:
    """The C build (proxy/dataplane/_frames.c), handed this module's tables and helpers.
    Raises ImportError where it was not built."""
    from . import _frames

    _frames._setup(
        tables=bytes(c for table in _TABLES for c in table),
        protocol_error=ProtocolError,
        diagnose=_diagnose,
        parse_close=_parse_close,
        frame_header=FrameHeader,
    )
    return _frames.FrameParser


def _compiled() -> type | None:
    """The C build, or None where it was not built or LW_PURE_PYTHON_FRAMES=1."""
    if os.environ.get("LW_PURE_PYTHON_FRAMES", "") not in ("", "0"):
        return None
    try:
        return load_compiled()
    except ImportError:
        return None


CFrameParser: type | None = _compiled()
COMPILED = CFrameParser is not None
if TYPE_CHECKING:
    # One type for both builds: the C one has PyFrameParser's public interface
    # (_frames.pyi spells it out; tests/test_frames.py runs every test on both).
    FrameParser = PyFrameParser
else:
    FrameParser = CFrameParser if CFrameParser is not None else PyFrameParser
