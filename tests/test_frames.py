"""Tests for proxy.frames, the relay's incremental frame-header parser.

Frames are serialized here by a small hand-written encoder (``frame``) that
shares no code with the parser, and cross-checked against the `websockets`
library's own encoder, so a bug symmetric to the parser's cannot hide.

The parser has two builds, the pure-Python one (the reference and fallback)
and the C extension proxy/dataplane/_frames.c compiled at install time: every test in
this module runs against both (the ``build`` fixture), a differential fuzz
test feeds both the same valid and corrupted streams cut at the same places,
and a missing compiled build fails the suite.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.frames import Close, Frame, Opcode

import loopwatch.proxy.dataplane.frames as frames_module
from loopwatch.proxy.dataplane.frames import (
    FrameHeader,
    FrameParser,
    MessageTooBig,
    ProtocolError,
    PyFrameParser,
    build_close_frame,
)

RSV1, RSV2, RSV3 = 0b100, 0b010, 0b001
KEY = b"\x37\xfa\x21\x3d"

try:
    CompiledParser: type | None = frames_module.load_compiled()
except ImportError:
    CompiledParser = None
NOT_BUILT = "proxy._frames is not built (pip install -e . compiles proxy/dataplane/_frames.c)"


@pytest.fixture(
    autouse=True,
    scope="module",
    params=[
        pytest.param("python", id="python"),
        pytest.param(
            "compiled", id="compiled", marks=pytest.mark.skipif(CompiledParser is None, reason=NOT_BUILT)
        ),
    ],
)
def build(request: pytest.FixtureRequest) -> object:
    """Every test of this module runs once per build of the parser: the module's
    `FrameParser` is rebound to it for the tests of that round."""
    global FrameParser
    saved = FrameParser
    FrameParser = PyFrameParser if request.param == "python" else CompiledParser
    yield FrameParser
    FrameParser = saved


def test_compiled_build_is_installed() -> None:
    # CI must not pass on the fallback alone: the relay is meant to run compiled.
    assert CompiledParser is not None, NOT_BUILT
    assert frames_module.COMPILED or frames_module.os.environ.get("LW_PURE_PYTHON_FRAMES")


# --------------------------------------------------------------------------
# An independent encoder.


def xor_mask(payload: bytes, key: bytes) -> bytes:
    if len(payload) <= 125:
        # Byte by byte for control payloads: the parser unmasks these, so the
        # test must not reuse its big-int trick.
        return bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    # Data payloads are never unmasked by the parser; only speed matters here.
    stream = (key * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(
        len(payload), "big"
    )


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = None,
    form: int | None = None,
    length: int | None = None,
) -> bytes:
    """Serialize one frame.

    ``form`` forces the length encoding (7, 16 or 64 bits) even when not
    minimal; ``length`` overrides the length field (to write lying headers).
    """
    declared = len(payload) if length is None else length
    if form is None:
        form = 7 if declared < 126 else 16 if declared < 1 << 16 else 64
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    mbit = 0x80 if mask is not None else 0
    if form == 7:
        head = bytes((b0, mbit | declared))
    elif form == 16:
        head = bytes((b0, mbit | 126)) + declared.to_bytes(2, "big")
    else:
        head = bytes((b0, mbit | 127)) + declared.to_bytes(8, "big")
    if mask is not None:
        return head + mask + xor_mask(payload, mask)
    return head + payload


def header_size(length: int, masked: bool) -> int:
    return (2 if length < 126 else 4 if length < 1 << 16 else 10) + (4 if masked else 0)


def close_payload(code: int, reason: str = "") -> bytes:
    return code.to_bytes(2, "big") + reason.encode()


def counters(p: FrameParser) -> dict[str, object]:
    return {
        "messages": p.messages,
        "message_bytes": p.message_bytes,
        "frames": p.frames,
        "pings": p.pings,
        "pongs": p.pongs,
        "close_seen": p.close_seen,
        "close_code": p.close_code,
        "close_reason": p.close_reason,
        "in_message": p.in_message,
    }


def collecting(**kwargs: object) -> tuple[FrameParser, list[FrameHeader]]:
    seen: list[FrameHeader] = []
    return FrameParser(on_frame=seen.append, **kwargs), seen  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Header forms.


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 70000])
@pytest.mark.parametrize("client_side", [True, False])
def test_length_forms_and_header_size(length: int, client_side: bool) -> None:
    mask = KEY if client_side else None
    data = frame(0x2, bytes(length), mask=mask)
    p, seen = collecting(client_side=client_side)
    assert p.feed(data) == len(data)
    expected_hs = header_size(length, client_side)
    assert seen == [FrameHeader(True, 0, 0x2, client_side, mask, length, expected_hs)]
    assert (
        expected_hs
        == {
            (True, 7): 6,
            (True, 16): 8,
            (True, 64): 14,
            (False, 7): 2,
            (False, 16): 4,
            (False, 64): 10,
        }[(client_side, 7 if length <= 125 else 16 if length <= 65535 else 64)]
    )
    assert p.messages == 1 and p.message_bytes == length and p.frames == 1
    assert p.at_boundary


@pytest.mark.parametrize(
    ("opcode", "fin", "rsv"),
    [
        (0x1, True, 0),
        (0x2, True, 0),
        (0x1, False, 0),
        (0x2, False, RSV1),
        (0x1, True, RSV1),
        (0x9, True, 0),
        (0xA, True, 0),
        (0x8, True, 0),
    ],
)
def test_fin_rsv_opcode_fields(opcode: int, fin: bool, rsv: int) -> None:
    payload = close_payload(1000) if opcode == 0x8 else b"abc"
    data = frame(opcode, payload, fin=fin, rsv=rsv, mask=KEY)
    p, seen = collecting(client_side=True, allowed_rsv=RSV1)
    assert p.feed(data) == len(data)
    assert seen == [FrameHeader(fin, rsv, opcode, True, KEY, len(payload), 6)]
    assert p.in_message is (not fin)


@pytest.mark.parametrize("form", [16, 64])
def test_non_minimal_length_encoding_is_accepted(form: int) -> None:
    data = frame(0x1, b"hello", form=form) + frame(0x2, b"x" * 200, form=64)
    p, seen = collecting(client_side=False)
    assert p.feed(data) == len(data)
    assert [(h.length, h.header_size) for h in seen] == [(5, 4 if form == 16 else 10), (200, 10)]
    assert p.messages == 2 and p.message_bytes == 205


def test_accepts_bytes_bytearray_and_memoryviews() -> None:
    data = frame(0x1, b"hi", mask=KEY) + frame(0x9, b"", mask=KEY)
    for chunk in (
        data,
        bytearray(data),
        memoryview(data),
        memoryview(bytearray(data)).cast("b"),  # signed format must still read 0..255
    ):
        p = FrameParser(client_side=True)
        assert p.feed(chunk) == len(data)
        assert (p.messages, p.pings, p.frames) == (1, 1, 2)
    assert FrameParser(client_side=True).feed(b"") == 0


def test_empty_feed_keeps_state() -> None:
    p = FrameParser(client_side=False)
    data = frame(0x1, b"abcdef")
    assert p.feed(data[:3]) == 3
    assert p.feed(b"") == 0
    assert not p.at_boundary
    assert p.feed(data[3:]) == len(data) - 3
    assert p.at_boundary and p.messages == 1


# --------------------------------------------------------------------------
# Counter semantics.


def test_counters_partial_payload_and_fragmentation() -> None:
    p = FrameParser(client_side=True)
    first = frame(0x1, b"a" * 10, fin=False, mask=KEY)
    ping = frame(0x9, b"p", mask=KEY)
    pong = frame(0xA, b"", mask=KEY)
    middle = frame(0x0, b"b" * 300, fin=False, mask=KEY)
    last = frame(0x0, b"c" * 5, mask=KEY)

    assert p.feed(first + ping) == len(first + ping)
    assert (p.messages, p.message_bytes, p.frames, p.pings, p.in_message) == (0, 10, 2, 1, True)
    # Half of the middle frame's payload: partly received bytes count already.
    cut = 8 + 100
    assert p.feed(middle[:cut]) == cut
    assert p.message_bytes == 110 and not p.at_boundary and p.frames == 3
    assert p.feed(middle[cut:] + pong + last[:7]) == len(middle) - cut + len(pong) + 7
    assert p.message_bytes == 311 and p.pongs == 1  # 1 byte of the last payload is in
    # The final frame's header is parsed, its payload not complete yet.
    assert p.messages == 0 and not p.in_message
    assert p.feed(last[7:]) == len(last) - 7
    assert (p.messages, p.message_bytes, p.frames) == (1, 315, 5)
    assert p.at_boundary


def test_frame_remaining_lets_a_caller_stop_at_the_frame_end() -> None:
    # The relay's way to reach a boundary: header byte by byte, then the rest
    # of the payload in one piece.
    data = frame(0x2, bytes(1000), mask=KEY) + frame(0x9, b"", mask=KEY)
    p = FrameParser(client_side=True)
    assert p.feed(data[:3]) == 3
    assert p.frame_remaining == 0 and not p.at_boundary  # inside the header
    pos = 3
    while not p.at_boundary:
        take = p.frame_remaining or 1
        assert p.feed(data[pos : pos + take]) == take
        pos += take
    assert pos == 8 + 1000 and p.messages == 1 and p.pings == 0


def test_allowed_rsv_can_be_set_after_construction() -> None:
    data = frame(0x1, b"deflated", rsv=RSV1)
    p = FrameParser(client_side=False)
    p.allowed_rsv = RSV1  # the relay learns it from the 101 response
    assert p.feed(data) == len(data)
    assert p.error is None and p.messages == 1


def test_allowed_rsv_must_be_three_bits() -> None:
    with pytest.raises(ValueError):
        FrameParser(client_side=True, allowed_rsv=8)
    p = FrameParser(client_side=True)
    p.allowed_rsv = -1
    with pytest.raises(ValueError):
        p.feed(b"")


def test_parsing_continues_after_close() -> None:
    data = (
        frame(0x8, close_payload(1000, "bye"), mask=KEY)
        + frame(0x9, b"", mask=KEY)
        + frame(0x1, b"late", mask=KEY)
        + frame(0x8, b"", mask=KEY)
    )
    p = FrameParser(client_side=True)
    assert p.feed(data) == len(data)
    assert (p.frames, p.pings, p.messages) == (4, 1, 1)
    # The latest close frame wins.
    assert p.close_seen and p.close_code is None and p.close_reason == ""


# --------------------------------------------------------------------------
# Property: any valid stream, cut anywhere, parses as in one piece.

DATA_LENGTHS = st.one_of(
    st.sampled_from([0, 1, 125, 126, 127, 65535, 65536]),
    st.integers(0, 300),
)
CONTROL_LENGTHS = st.one_of(st.sampled_from([0, 1, 124, 125]), st.integers(0, 125))
VALID_CLOSE_CODES = st.one_of(
    st.sampled_from([1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014]),
    st.integers(3000, 4999),
)


@dataclass(frozen=True)
class Spec:
    fin: bool
    rsv: int
    opcode: int
    payload: bytes


@st.composite
def control_spec(draw: st.DrawFn) -> Spec:
    opcode = draw(st.sampled_from([0x8, 0x9, 0xA]))
    if opcode == 0x8:
        if draw(st.booleans()):
            return Spec(True, 0, 0x8, b"")
        # 30 characters are at most 120 bytes of UTF-8: within the 123 allowed.
        reason = draw(st.text(max_size=30)).encode()
        return Spec(True, 0, 0x8, draw(VALID_CLOSE_CODES).to_bytes(2, "big") + reason)
    return Spec(True, 0, opcode, draw(st.binary(min_size=0, max_size=125)))


@st.composite
def valid_streams(draw: st.DrawFn) -> tuple[bool, int, list[Spec], list[bytes | None]]:
    client_side = draw(st.booleans())
    allowed_rsv = draw(st.sampled_from([0, RSV1]))
    specs: list[Spec] = []
    big = 0  # keep examples modest: at most two payloads of 64 KiB and more
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            specs.append(draw(control_spec()))
            continue
        opcode = draw(st.sampled_from([0x1, 0x2]))
        rsv1 = RSV1 if allowed_rsv and draw(st.booleans()) else 0
        n_frames = draw(st.integers(1, 4))
        for i in range(n_frames):
            length = draw(DATA_LENGTHS)
            if length >= 65535:
                big += 1
                if big > 2:
                    length = 300
            seed = draw(st.binary(min_size=1, max_size=4))
            payload = (seed * (length // len(seed) + 1))[:length]
            specs.append(
                Spec(i == n_frames - 1, rsv1 if i == 0 else 0, opcode if i == 0 else 0, payload)
            )
            if i < n_frames - 1:
                # Control frames may sit between the fragments of a message.
                for _ in range(draw(st.integers(0, 2))):
                    specs.append(draw(control_spec()))
    keys: list[bytes | None] = [
        draw(st.binary(min_size=4, max_size=4)) if client_side else None for _ in specs
    ]
    return client_side, allowed_rsv, specs, keys


def expected_for(
    specs: list[Spec], keys: list[bytes | None]
) -> tuple[list[FrameHeader], dict[str, object]]:
    headers = [
        FrameHeader(
            s.fin,
            s.rsv,
            s.opcode,
            k is not None,
            k,
            len(s.payload),
            header_size(len(s.payload), k is not None),
        )
        for s, k in zip(specs, keys, strict=True)
    ]
    closes = [s.payload for s in specs if s.opcode == 0x8]
    last_close = closes[-1] if closes else b""
    return headers, {
        "messages": sum(1 for s in specs if s.opcode in (0x1, 0x2)),
        "message_bytes": sum(len(s.payload) for s in specs if s.opcode < 8),
        "frames": len(specs),
        "pings": sum(1 for s in specs if s.opcode == 0x9),
        "pongs": sum(1 for s in specs if s.opcode == 0xA),
        "close_seen": bool(closes),
        "close_code": int.from_bytes(last_close[:2], "big") if last_close else None,
        "close_reason": last_close[2:].decode(),
        "in_message": False,
    }


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(stream=valid_streams(), data=st.data())
def test_split_anywhere_equals_one_piece(
    stream: tuple[bool, int, list[Spec], list[bytes | None]], data: st.DataObject
) -> None:
    client_side, allowed_rsv, specs, keys = stream
    encoded = [
        frame(s.opcode, s.payload, fin=s.fin, rsv=s.rsv, mask=k)
        for s, k in zip(specs, keys, strict=True)
    ]
    whole = b"".join(encoded)
    starts = [0]
    for e in encoded:
        starts.append(starts[-1] + len(e))
    boundaries = set(starts)
    total = len(whole)
    want_headers, want_counters = expected_for(specs, keys)

    # One piece.
    p1, seen1 = collecting(client_side=client_side, allowed_rsv=allowed_rsv)
    assert p1.feed(whole) == total
    assert p1.error is None
    assert seen1 == want_headers
    assert counters(p1) == want_counters
    assert p1.at_boundary

    # Arbitrary cuts, plus byte-by-byte runs through some headers (and close
    # payloads) so every header split position gets exercised.
    cuts: set[int] = set()
    if total > 1:
        cuts |= data.draw(st.sets(st.integers(1, total - 1), max_size=12), label="cuts")
    if len(encoded):
        for i in data.draw(
            st.lists(st.integers(0, len(encoded) - 1), max_size=3), label="byte-split frames"
        ):
            run = data.draw(st.integers(1, 140), label="byte-split length")
            cuts.update(range(starts[i], min(starts[i] + run, total)))
    cuts.discard(0)
    points = sorted(cuts) + [total]
    kind = data.draw(st.sampled_from([bytes, bytearray, memoryview]), label="chunk type")

    # What frame_remaining must say at each offset: the payload still to
    # come when the cut is past a frame's header, else 0.
    payload_start = [
        start + header_size(len(s.payload), k is not None)
        for start, s, k in zip(starts, specs, keys, strict=False)
    ]

    def remaining_at(point: int) -> int:
        for i in range(len(specs)):
            if payload_start[i] <= point < starts[i + 1]:
                return starts[i + 1] - point
        return 0

    p2, seen2 = collecting(client_side=client_side, allowed_rsv=allowed_rsv)
    prev = 0
    for point in points:
        chunk = kind(whole[prev:point])
        assert p2.feed(chunk) == point - prev
        assert p2.at_boundary is (point in boundaries), point
        assert p2.frame_remaining == remaining_at(point), point
        prev = point
    assert p2.error is None
    assert seen2 == want_headers
    assert counters(p2) == want_counters


# --------------------------------------------------------------------------
# Malformed headers.


@dataclass(frozen=True)
class Bad:
    id: str
    build: object  # Callable[[bytes | None], bytes]: the bad frame, given the side's mask key
    code: int = 1002
    setup: tuple[tuple[int, bool, int], ...] = ()  # (opcode, fin, rsv) frames before it
    allowed_rsv: int = 0
    # Header bytes needed before the violation is visible; a header cut
    # shorter than this is necessarily forwarded first.
    detect_at: int = 1
    sides: tuple[bool, ...] = (True, False)


BAD_CASES = [
    *(
        Bad(f"reserved-opcode-{op:#x}", lambda m, op=op: frame(op, b"xy", mask=m))
        for op in (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF)
    ),
    Bad("ping-126-bytes", lambda m: frame(0x9, bytes(126), mask=m), detect_at=2),
    Bad("pong-127-form", lambda m: frame(0xA, bytes(200), mask=m, form=64), detect_at=2),
    Bad("close-126-form", lambda m: frame(0x8, bytes(130), mask=m), detect_at=2),
    Bad("ping-fin-0", lambda m: frame(0x9, b"", fin=False, mask=m)),
    Bad("pong-fin-0", lambda m: frame(0xA, b"", fin=False, mask=m)),
    Bad("close-fin-0", lambda m: frame(0x8, b"", fin=False, mask=m)),
    Bad("continuation-without-message", lambda m: frame(0x0, b"abc", mask=m)),
    Bad(
        "text-inside-fragmented-message",
        lambda m: frame(0x1, b"abc", mask=m),
        setup=((0x2, False, 0),),
    ),
    Bad(
        "binary-inside-fragmented-message",
        lambda m: frame(0x2, b"abc", fin=False, mask=m),
        setup=((0x1, False, 0), (0x0, False, 0)),
    ),
    Bad("unmasked-client-frame", lambda m: frame(0x1, b"abc"), detect_at=2, sides=(True,)),
    Bad("masked-server-frame", lambda m: frame(0x1, b"abc", mask=KEY), detect_at=2, sides=(False,)),
    Bad(
        "64-bit-length-msb",
        lambda m: frame(0x2, b"", mask=m, form=64, length=1 << 63),
        detect_at=10,
    ),
    Bad("rsv1-not-negotiated", lambda m: frame(0x1, b"abc", rsv=RSV1, mask=m)),
    Bad("rsv2", lambda m: frame(0x1, b"abc", rsv=RSV2, mask=m), allowed_rsv=RSV1),
    Bad("rsv3", lambda m: frame(0x2, b"abc", rsv=RSV3, mask=m), allowed_rsv=RSV1),
    Bad("rsv1-on-ping", lambda m: frame(0x9, b"", rsv=RSV1, mask=m), allowed_rsv=RSV1),
    Bad("rsv1-on-close", lambda m: frame(0x8, b"", rsv=RSV1, mask=m), allowed_rsv=RSV1),
    Bad(
        "rsv1-on-continuation",
        lambda m: frame(0x0, b"abc", rsv=RSV1, mask=m),
        setup=((0x1, False, RSV1),),
        allowed_rsv=RSV1,
    ),
    Bad("close-1-byte-payload", lambda m: frame(0x8, b"\x03", mask=m), detect_at=2),
]
BAD_PARAMS = [
    pytest.param(case, side, id=f"{case.id}-{'client' if side else 'server'}")
    for case in BAD_CASES
    for side in case.sides
]


def _prefix(case: Bad, client_side: bool) -> tuple[bytes, int]:
    """Valid frames before the bad one, and how many there are."""
    m = KEY if client_side else None
    parts = [
        frame(0x1, b"hello", mask=m),
        frame(0x9, b"are you there", mask=m),
        frame(0x2, bytes(300), mask=m),
    ]
    parts += [frame(op, b"part", fin=fin, rsv=rsv, mask=m) for op, fin, rsv in case.setup]
    return b"".join(parts), len(parts)


def _assert_failed(p: FrameParser, code: int) -> None:
    assert isinstance(p.error, ProtocolError)
    assert p.error.close_code == code
    assert isinstance(p.error.reason, str) and p.error.reason
    assert p.frame_remaining == 0  # nothing more of this stream is to be forwarded
    with pytest.raises(ProtocolError) as info:
        p.feed(frame(0x9, b"", mask=KEY))
    assert info.value is p.error
    with pytest.raises(ProtocolError):
        p.feed(b"")


@pytest.mark.parametrize(("case", "client_side"), BAD_PARAMS)
def test_bad_header_in_same_chunk(case: Bad, client_side: bool) -> None:
    prefix, n_valid = _prefix(case, client_side)
    m = KEY if client_side else None
    bad = case.build(m)  # type: ignore[operator]
    p = FrameParser(client_side=client_side, allowed_rsv=case.allowed_rsv)
    trailing = frame(0xA, b"", mask=m)
    assert p.feed(prefix + bad + trailing) == len(prefix)
    # Only the frames before the bad one were counted, and the accepted bytes
    # end at a frame boundary, so the relay may append its own close frame.
    assert p.frames == n_valid and p.pongs == 0
    assert p.at_boundary
    _assert_failed(p, case.code)


@pytest.mark.parametrize(("case", "client_side"), BAD_PARAMS)
def test_bad_header_in_next_chunk(case: Bad, client_side: bool) -> None:
    prefix, n_valid = _prefix(case, client_side)
    bad = case.build(KEY if client_side else None)  # type: ignore[operator]
    p = FrameParser(client_side=client_side, allowed_rsv=case.allowed_rsv)
    assert p.feed(prefix) == len(prefix)
    assert p.feed(bad) == 0
    assert p.frames == n_valid and p.at_boundary
    _assert_failed(p, case.code)


@pytest.mark.parametrize(("case", "client_side"), BAD_PARAMS)
def test_bad_header_split_inside(case: Bad, client_side: bool) -> None:
    prefix, _ = _prefix(case, client_side)
    bad = case.build(KEY if client_side else None)  # type: ignore[operator]
    hs = 2 + (4 if client_side else 0) + {126: 2, 127: 8}.get(bad[1] & 0x7F, 0)
    for k in range(1, hs):
        p = FrameParser(client_side=client_side, allowed_rsv=case.allowed_rsv)
        first = p.feed(prefix + bad[:k])
        if k >= case.detect_at:
            # The bytes at hand already prove the header bad: none of it leaves.
            assert first == len(prefix), k
            assert p.at_boundary
        else:
            assert first == len(prefix) + k and p.error is None, k
            assert p.feed(bad[k:]) == 0
            # The header's start was forwarded already: no clean boundary.
            assert not p.at_boundary
        _assert_failed(p, case.code)


# --------------------------------------------------------------------------
# max_message_size.


@pytest.mark.parametrize("client_side", [True, False])
def test_single_frame_over_limit(client_side: bool) -> None:
    m = KEY if client_side else None
    ok = frame(0x1, bytes(1000), mask=m)
    too_big = frame(0x2, bytes(1001), mask=m)
    p = FrameParser(client_side=client_side, max_message_size=1000)
    data = ok + frame(0x9, bytes(125), mask=m) + too_big
    assert p.feed(data) == len(ok) + 2 + (4 if client_side else 0) + 125
    assert isinstance(p.error, MessageTooBig) and isinstance(p.error, ProtocolError)
    assert p.error.close_code == 1009
    assert p.messages == 1 and p.message_bytes == 1000
    _assert_failed(p, 1009)


def test_limit_is_checked_from_the_header_before_the_payload_arrives() -> None:
    p = FrameParser(client_side=False, max_message_size=10)
    header = frame(0x2, b"", form=64, length=1 << 40)[:10]
    assert p.feed(header[:4]) == 4
    assert p.feed(header[4:]) == 0
    assert isinstance(p.error, MessageTooBig)


def test_fragmented_message_crossing_limit_at_third_frame() -> None:
    m = KEY
    f1 = frame(0x1, bytes(40), fin=False, mask=m)
    ping = frame(0x9, bytes(125), mask=m)  # control payloads never count
    f2 = frame(0x0, bytes(40), fin=False, mask=m)
    f3 = frame(0x0, bytes(21), mask=m)
    p = FrameParser(client_side=True, max_message_size=100)
    # First, a complete message right at the limit, and a new message resets
    # the sum.
    at_limit = frame(0x2, bytes(60), fin=False, mask=m) + frame(0x0, bytes(40), mask=m)
    assert p.feed(at_limit) == len(at_limit)
    assert p.messages == 1
    assert p.feed(f1 + ping + f2) == len(f1 + ping + f2)
    assert p.feed(ping + f3) == len(ping)  # the offset of the third data frame
    assert isinstance(p.error, MessageTooBig) and p.error.close_code == 1009
    assert p.message_bytes == 100 + 80 and p.messages == 1 and p.in_message
    assert p.at_boundary


def test_fragmented_message_crossing_limit_in_one_chunk() -> None:
    f1 = frame(0x2, bytes(50), fin=False)
    f2 = frame(0x0, bytes(50), fin=False)
    f3 = frame(0x0, bytes(1))
    p = FrameParser(client_side=False, max_message_size=100)
    assert p.feed(f1 + f2 + f3) == len(f1 + f2)
    assert isinstance(p.error, MessageTooBig)


# --------------------------------------------------------------------------
# Close frames.


@pytest.mark.parametrize("client_side", [True, False])
def test_close_split_across_chunks(client_side: bool) -> None:
    reason = "going away – ünïcode ✓"
    data = frame(0x8, close_payload(1001, reason), mask=KEY if client_side else None)
    for i in range(1, len(data)):
        for j in range(i, len(data)):
            p = FrameParser(client_side=client_side)
            assert p.feed(data[:i]) == i
            assert p.feed(data[i:j]) == j - i
            assert not p.close_seen and p.close_code is None and not p.at_boundary
            assert p.feed(data[j:]) == len(data) - j
            assert p.close_seen and p.at_boundary
            assert (p.close_code, p.close_reason) == (1001, reason)


@pytest.mark.parametrize("client_side", [True, False])
def test_empty_close(client_side: bool) -> None:
    p = FrameParser(client_side=client_side)
    data = frame(0x8, b"", mask=KEY if client_side else None)
    assert p.feed(data) == len(data)
    assert p.close_seen and p.close_code is None and p.close_reason == ""


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535])
@pytest.mark.parametrize("client_side", [True, False])
def test_invalid_close_codes(code: int, client_side: bool) -> None:
    m = KEY if client_side else None
    before = frame(0x1, b"x", mask=m)
    p = FrameParser(client_side=client_side)
    assert p.feed(before + frame(0x8, close_payload(code, "r"), mask=m)) == len(before)
    assert not p.close_seen and p.frames == 1
    _assert_failed(p, 1002)


@pytest.mark.parametrize(
    "code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999]
)
def test_valid_close_codes(code: int) -> None:
    p = FrameParser(client_side=True)
    data = frame(0x8, close_payload(code), mask=KEY)
    assert p.feed(data) == len(data)
    assert p.close_code == code and p.close_seen


@pytest.mark.parametrize("reason", [b"\xff", b"ok\xc3", b"\xe2\x82", b"\xed\xa0\x80"])
@pytest.mark.parametrize("client_side", [True, False])
def test_close_reason_not_utf8(reason: bytes, client_side: bool) -> None:
    m = KEY if client_side else None
    data = frame(0x8, (1000).to_bytes(2, "big") + reason, mask=m)
    p = FrameParser(client_side=client_side)
    assert p.feed(frame(0x9, b"", mask=m) + data) == 2 + (4 if client_side else 0)
    assert not p.close_seen
    _assert_failed(p, 1007)


def test_bad_close_payload_split_after_header_was_forwarded() -> None:
    data = frame(0x8, (1000).to_bytes(2, "big") + b"bad\xff", mask=KEY)
    p = FrameParser(client_side=True)
    assert p.feed(data[:8]) == 8  # header and code: nothing is wrong yet
    assert p.frames == 1
    # The close frame began in the previous chunk, so nothing of this one is
    # safe and the relay has no frame boundary to write at.
    assert p.feed(data[8:]) == 0
    assert not p.at_boundary and not p.close_seen
    _assert_failed(p, 1007)


@pytest.mark.parametrize("client_side", [True, False])
def test_bad_close_payload_behind_a_split_header(client_side: bool) -> None:
    # The close frame starts in this chunk right after the rest of a header
    # split across chunks: its offset in this chunk is what must come back.
    m = KEY if client_side else None
    ping = frame(0x9, b"", mask=m)
    close = frame(0x8, (1000).to_bytes(2, "big") + b"bad reason\xff", mask=m)
    p = FrameParser(client_side=client_side)
    assert p.feed(ping[:1]) == 1
    assert p.feed(ping[1:] + close + frame(0x9, b"", mask=m)) == len(ping) - 1
    assert p.pings == 1 and p.at_boundary and not p.close_seen
    _assert_failed(p, 1007)


@pytest.mark.parametrize("client_side", [True, False])
def test_close_with_one_byte_payload(client_side: bool) -> None:
    p = FrameParser(client_side=client_side)
    assert p.feed(frame(0x8, b"\x03", mask=KEY if client_side else None)) == 0
    _assert_failed(p, 1002)


# --------------------------------------------------------------------------
# build_close_frame.


@pytest.mark.parametrize("mask", [True, False])
@pytest.mark.parametrize(
    ("code", "reason"), [(1000, ""), (1001, "shutdown"), (1013, "retry in 5s ⏳"), (4001, "auth")]
)
def test_build_close_frame_round_trips(mask: bool, code: int, reason: str) -> None:
    data = build_close_frame(code, reason, mask=mask)
    p, seen = collecting(client_side=mask)
    assert p.feed(data) == len(data)
    assert p.close_seen and (p.close_code, p.close_reason) == (code, reason)
    assert seen[0].opcode == 0x8 and seen[0].fin and seen[0].rsv == 0
    assert seen[0].masked is mask and seen[0].length == 2 + len(reason.encode())


def test_build_close_frame_uses_a_random_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frames_module.os, "urandom", lambda n: b"\x01\x02\x03\x04"[:n])
    data = build_close_frame(1001, "bye", mask=True)
    assert data == frame(0x8, close_payload(1001, "bye"), mask=b"\x01\x02\x03\x04")


@pytest.mark.parametrize(
    ("reason", "expected_bytes"),
    [
        ("a" * 200, 123),
        ("é" * 100, 122),  # 2-byte chars: 123 would split the 62nd
        ("€" * 50, 123),  # 3-byte chars: 41 fit exactly
        ("a" + "€" * 50, 121),  # 1 + 3*40; 124 would overflow
        ("😀" * 40, 120),  # 4-byte chars
        ("ab" + "😀" * 40, 122),
        ("abc" + "😀" * 40, 123),
    ],
)
@pytest.mark.parametrize("mask", [True, False])
def test_build_close_frame_truncates_on_character_boundary(
    reason: str, expected_bytes: int, mask: bool
) -> None:
    data = build_close_frame(1008, reason, mask=mask)
    p = FrameParser(client_side=mask)
    assert p.feed(data) == len(data)
    got = p.close_reason.encode()
    assert len(got) == expected_bytes
    assert reason.startswith(p.close_reason)
    assert len(data) == 2 + (4 if mask else 0) + 2 + expected_bytes <= 2 + 4 + 125


def test_build_close_frame_rejects_unsendable_codes() -> None:
    for code in (999, 1005, 1006, 1015, 2000, 5000):
        with pytest.raises(ValueError):
            build_close_frame(code, mask=False)


# --------------------------------------------------------------------------
# Cross-check against the websockets library's encoder.


@st.composite
def ws_frames(draw: st.DrawFn) -> list[Frame]:
    out: list[Frame] = []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["data", "fragmented", "ping", "pong", "close"]))
        length = draw(st.sampled_from([0, 1, 125, 126, 127, 65535, 65536]) | st.integers(0, 500))
        if kind == "data":
            out.append(Frame(draw(st.sampled_from([Opcode.TEXT, Opcode.BINARY])), bytes(length)))
        elif kind == "fragmented":
            out.append(Frame(Opcode.BINARY, bytes(length), fin=False))
            out.append(Frame(Opcode.PING, b"in between"))
            out.append(Frame(Opcode.CONT, bytes(draw(st.integers(0, 300))), fin=False))
            out.append(Frame(Opcode.CONT, b"end"))
        elif kind in ("ping", "pong"):
            op = Opcode.PING if kind == "ping" else Opcode.PONG
            out.append(Frame(op, bytes(min(length, 125))))
        else:
            code = draw(st.sampled_from([1000, 1001, 1011, 4000]))
            out.append(Frame(Opcode.CLOSE, Close(code, draw(st.text(max_size=20))).serialize()))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=ws_frames(), mask=st.booleans())
def test_websockets_serialized_frames(frames: list[Frame], mask: bool) -> None:
    p, seen = collecting(client_side=mask)
    total = 0
    for f in frames:
        data = f.serialize(mask=mask, extensions=[])
        total += len(data)
        assert p.feed(data) == len(data)
    assert p.error is None and p.at_boundary
    assert [(h.opcode, h.fin, h.length, h.masked) for h in seen] == [
        (int(f.opcode), f.fin, len(f.data), mask) for f in frames
    ]
    assert sum(h.header_size + h.length for h in seen) == total
    closes = [f for f in frames if f.opcode is Opcode.CLOSE]
    if closes:
        last = Close.parse(closes[-1].data)
        assert (p.close_code, p.close_reason) == (last.code, last.reason)


# --------------------------------------------------------------------------
# The two builds against each other: valid streams, corrupted streams, limits,
# cut anywhere; after every feed the same answer, state and error.


def observable(p: object) -> dict[str, object]:
    err = p.error  # type: ignore[attr-defined]
    return {
        **counters(p),  # type: ignore[arg-type]
        "at_boundary": p.at_boundary,  # type: ignore[attr-defined]
        "frame_remaining": p.frame_remaining,  # type: ignore[attr-defined]
        "error": None if err is None else (type(err), err.reason, err.close_code),
    }


def feed_result(p: object, chunk: bytes) -> object:
    try:
        return p.feed(chunk)  # type: ignore[attr-defined]
    except ProtocolError as e:
        return ("raised", type(e), e.reason, e.close_code)


@st.composite
def corrupted_streams(draw: st.DrawFn) -> tuple[bool, int, int | None, bytes, list[int]]:
    client_side, allowed_rsv, specs, keys = draw(valid_streams())
    whole = bytearray(
        b"".join(
            frame(s.opcode, s.payload, fin=s.fin, rsv=s.rsv, mask=k)
            for s, k in zip(specs, keys, strict=True)
        )
    )
    spots: list[int] = []  # where corruption went in: cuts around there matter most
    for _ in range(draw(st.integers(0, 3))):
        how = draw(st.sampled_from(["flip", "insert", "header", "truncate"]))
        if how == "flip" and whole:
            i = draw(st.integers(0, len(whole) - 1))
            whole[i] = draw(st.integers(0, 255))
        elif how == "insert":
            i = draw(st.integers(0, len(whole)))
            whole[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif how == "header":
            # Any first two bytes (every opcode, RSV, mask and length form) with
            # a short payload, at a frame boundary or anywhere.
            i = draw(st.sampled_from([0, len(whole)]) | st.integers(0, len(whole)))
            fin = draw(st.sampled_from([0x80, 0x80, 0x80, 0]))
            rsv = draw(st.sampled_from([0, 0, 0, 0x40]) | st.integers(0, 7).map(lambda r: r << 4))
            masked = 0x80 if client_side ^ draw(st.integers(0, 7).map(lambda x: x == 0)) else 0
            length = draw(st.sampled_from([0, 1, 1, 2, 125, 126, 127]) | st.integers(0, 127))
            b0 = fin | rsv | draw(st.sampled_from([0, 1, 2, 8, 8, 9, 10]) | st.integers(0, 15))
            b1 = masked | length
            ext = {126: 2, 127: 8}.get(b1 & 0x7F, 0)
            whole[i:i] = bytes((b0, b1)) + draw(st.binary(min_size=ext, max_size=ext + 8))
            spots.append(i)
        elif how == "truncate" and whole:
            del whole[draw(st.integers(0, len(whole) - 1)) :]
    limit = draw(st.one_of(st.none(), st.integers(0, 70000)))
    return client_side, draw(st.sampled_from([allowed_rsv, 0b111])), limit, bytes(whole), spots


@pytest.mark.skipif(CompiledParser is None, reason=NOT_BUILT)
@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(stream=corrupted_streams(), data=st.data())
def test_builds_agree(
    stream: tuple[bool, int, int | None, bytes, list[int]], data: st.DataObject
) -> None:
    client_side, allowed_rsv, limit, whole, spots = stream
    cuts: set[int] = set()
    if len(whole) > 1:
        cuts = data.draw(st.sets(st.integers(1, len(whole) - 1), max_size=20), label="cuts")
        for spot in spots:  # inside an inserted header
            cuts.add(spot + data.draw(st.integers(1, 10), label="into the header"))
        cuts = {c for c in cuts if 0 < c < len(whole)}
        # A run of 1-byte chunks somewhere: every split of the headers there.
        start = data.draw(st.integers(0, len(whole) - 1), label="byte run")
        cuts.update(range(max(start, 1), min(start + data.draw(st.integers(0, 24)), len(whole))))
    points = [*sorted(cuts), len(whole)]
    kind = data.draw(st.sampled_from([bytes, bytearray, memoryview]), label="chunk type")
    seen_py: list[FrameHeader] = []
    seen_c: list[FrameHeader] = []
    kwargs = {"client_side": client_side, "allowed_rsv": allowed_rsv, "max_message_size": limit}
    py = PyFrameParser(on_frame=seen_py.append, **kwargs)
    c = CompiledParser(on_frame=seen_c.append, **kwargs)  # type: ignore[misc]
    prev = 0
    for point in points:
        chunk = whole[prev:point]
        assert feed_result(c, kind(chunk)) == feed_result(py, kind(chunk)), point
        assert observable(c) == observable(py), point
        assert seen_c == seen_py
        prev = point


def test_builds_share_settings_and_errors() -> None:
    p = FrameParser(client_side=False, max_message_size=5)
    assert p.client_side is False and p.max_message_size == 5 and p.allowed_rsv == 0
    with pytest.raises(TypeError):
        FrameParser()  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        FrameParser(client_side=True, max_message_size=-1)
    p.max_message_size = None
    assert p.feed(frame(0x2, bytes(100))) == 102 and p.messages == 1
