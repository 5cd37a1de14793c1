"""Types of the C build of the frame parser (_frames.c, built by setup.py).

mypy cannot read the compiled module; this stub says what it holds. FrameParser
has frames.PyFrameParser's public interface (tests/test_frames.py runs every
test on both builds), written out here so a drift shows in review."""

from collections.abc import Callable

from .frames import FrameHeader, ProtocolError

def _setup(
    *,
    tables: bytes,
    protocol_error: type[ProtocolError],
    diagnose: Callable[
        [bytes | bytearray | memoryview, int, int, bool, int, int, bool, int | None],
        ProtocolError | None,
    ],
    parse_close: Callable[[bytes], tuple[int | None, str]],
    frame_header: type[FrameHeader],
) -> None: ...

class FrameParser:
    allowed_rsv: int
    max_message_size: int | None
    @property
    def on_frame(self) -> Callable[[FrameHeader], None] | None: ...
    @property
    def messages(self) -> int: ...
    @property
    def message_bytes(self) -> int: ...
    @property
    def frames(self) -> int: ...
    @property
    def pings(self) -> int: ...
    @property
    def pongs(self) -> int: ...
    @property
    def close_code(self) -> int | None: ...
    @property
    def close_reason(self) -> str: ...
    @property
    def error(self) -> ProtocolError | None: ...
    @property
    def client_side(self) -> bool: ...
    @property
    def close_seen(self) -> bool: ...
    @property
    def in_message(self) -> bool: ...
    @property
    def at_boundary(self) -> bool: ...
    @property
    def frame_remaining(self) -> int: ...
    def __init__(
        self,
        *,
        client_side: bool = ...,
        max_message_size: int | None = ...,
        allowed_rsv: int = ...,
        on_frame: Callable[[FrameHeader], None] | None = ...,
    ) -> None: ...
    def feed(self, data: bytes | bytearray | memoryview, /) -> int: ...
