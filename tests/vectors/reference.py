"""The Python data plane's answers, as the shared test vectors record them.

Both `generate.py` (which writes the vectors from these answers) and
`tests/test_vectors.py` (which checks the vectors still are these answers) use
this module, so the vectors and today's Python behaviour cannot drift apart
silently. The Rust core replays the same files (proxy/dataplane/core/tests/).

Bytes are stored in JSON as strings whose code points are the bytes
(latin-1: "\\u0000".."\\u00ff"), readable for request heads; frame streams
are stored as hex.
"""

from __future__ import annotations

import contextlib
import datetime
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import jwt

from loopwatch.proxy.dataplane.frames import PyFrameParser, build_close_frame, load_compiled
from loopwatch.proxy.dataplane.heads import (
    HeadParser,
    HttpError,
    simple_response,
    validate_websocket_upgrade,
)
from loopwatch.proxy.dataplane.identity import Identifier
from loopwatch.proxy.dataplane.native import identity_spec
from loopwatch.proxy.dataplane.settings import IdentitySettings

# No head is larger than this in the byte-by-byte pass that finds where a
# head ends (the size limit is exercised by the single-read pass).
_UNLIMITED = 1 << 30


def text(data: bytes) -> str:
    return data.decode("latin-1")


def raw(value: str) -> bytes:
    return value.encode("latin-1")


def own_message(message: str) -> bool:
    """loopwatch's own wording (compared exactly), not llhttp's error text."""
    return not message.startswith("malformed request:")


def _refusal(e: HttpError) -> dict[str, Any]:
    out: dict[str, Any] = {
        "outcome": "reject",
        "status": e.status,
        "reason": e.reason,
        "headers": [list(h) for h in e.headers],
    }
    if own_message(e.message):
        # The whole answer, as the client reads it.
        out["message"] = e.message
        out["response"] = text(simple_response(e.status, e.message, e.headers))
    return out


def _upgrade_checks(head: Any) -> None:
    """What the listener checks before admitting an upgrade (begin_upgrade in
    proxy/dataplane/listener.py), in its order; the route lookup (404) is not the head's."""
    if not head.is_websocket_upgrade:
        raise HttpError(400, "unsupported upgrade: only websocket is proxied")
    validate_websocket_upgrade(head)


def head_answer(data: bytes, max_head_size: int) -> dict[str, Any]:
    """The Python data plane's answer to the head at the start of `data`,
    arriving in one read. What follows the head (a body, frames, a next
    request) is reported apart: an error in a body is not the head's."""
    end = _head_end(data)
    parser = HeadParser(max_head_size)
    try:
        head = parser.feed(data if end is None else data[:end])
        if head is None:
            return {"outcome": "partial"}
        if parser.upgrade:
            _upgrade_checks(head)
    except HttpError as e:
        return _refusal(e)
    assert end is not None
    out: dict[str, Any] = {
        "outcome": "accept",
        "kind": "websocket" if parser.upgrade else "http",
        "method": head.method,
        "target": text(head.target),
        "path": head.path,
        "query": head.query,
        "version": head.version,
        "authority": None if head.authority is None else text(head.authority),
        "keep_alive": parser.keep_alive,
        "headers": [[text(n), text(v)] for n, v in head.headers],
        "head_len": end,
    }
    if parser.upgrade:
        out["rest"] = text(data[end:])
        return out
    # The body as the parser reads it after this head.
    try:
        parser.feed(data[end:])
    except HttpError:
        out["body_error"] = True
        return out
    out["body"] = text(b"".join(parser.early_body))
    out["message_done"] = parser.message_done
    return out


def _head_end(data: bytes) -> int | None:
    """Where the head ends: the byte after which the parser has it (or
    refuses it at its last byte), feeding one byte at a time; None when the
    bytes end first or are refused earlier."""
    parser = HeadParser(_UNLIMITED)
    for i in range(len(data)):
        try:
            if parser.feed(data[i : i + 1]) is not None:
                return i + 1
        except HttpError:
            return i + 1 if parser.headers_done else None
    return None


# --- frames --------------------------------------------------------------------

FRAME_BUILDS: dict[str, type] = {"python": PyFrameParser}
# A missing C build is reported by tests/test_frames.py and test_vectors.py.
with contextlib.suppress(ImportError):
    FRAME_BUILDS["compiled"] = load_compiled()


def unpack(pieces: list[Any]) -> bytes:
    """A stream stored as hex pieces and [pattern, count] repeats (generate.pack)."""
    out = bytearray()
    for piece in pieces:
        if isinstance(piece, str):
            out += bytes.fromhex(piece)
        else:
            pattern, count = piece
            out += bytes.fromhex(pattern) * count
    return bytes(out)


def expand_cuts(cuts: list[int] | str, length: int) -> list[int]:
    """Chunk boundaries: a list of offsets, or "bytewise" (every byte alone)."""
    if cuts == "bytewise":
        return list(range(1, length))
    assert isinstance(cuts, list)
    return cuts


def frames_answer(
    build: type, config: dict[str, Any], stream: bytes, cuts: list[int]
) -> dict[str, Any]:
    """Feed `stream` cut at `cuts` to one build of the frame parser."""
    headers: list[list[Any]] = []

    def on_frame(h: Any) -> None:
        headers.append(
            [
                h.fin,
                h.rsv,
                h.opcode,
                h.masked,
                None if h.mask is None else h.mask.hex(),
                h.length,
                h.header_size,
            ]
        )

    parser = build(
        client_side=config["side"] == "client",
        max_message_size=config["max_message_size"],
        allowed_rsv=config["allowed_rsv"],
        on_frame=on_frame,
    )
    forwarded: list[int] = []
    bounds = [0, *cuts, len(stream)]
    for start, end in zip(bounds, bounds[1:], strict=False):
        if parser.error is not None:
            break  # every later feed re-raises: the relay stops feeding
        forwarded.append(parser.feed(stream[start:end]))
    error = parser.error
    return {
        "forwarded": forwarded,
        "error": None if error is None else {"code": error.close_code, "reason": error.reason},
        "messages": parser.messages,
        "message_bytes": parser.message_bytes,
        "frames": parser.frames,
        "pings": parser.pings,
        "pongs": parser.pongs,
        "in_message": parser.in_message,
        "close": (
            {"code": parser.close_code, "reason": parser.close_reason}
            if parser.close_seen
            else None
        ),
        "at_boundary": parser.at_boundary,
        "frame_remaining": parser.frame_remaining,
        "headers": headers,
    }


def close_frame_answer(code: int, reason: str, masked: bool) -> dict[str, Any]:
    """build_close_frame's frame, unmasked (a masked one has a random key)."""
    try:
        frame = build_close_frame(code, reason, mask=masked)
    except ValueError as e:
        return {"error": str(e)}
    if masked:
        key, payload = frame[2:6], frame[6:]
        frame = bytes((frame[0], frame[1] & 0x7F)) + bytes(
            b ^ key[i % 4] for i, b in enumerate(payload)
        )
    return {"frame": frame.hex()}


# --- identity ------------------------------------------------------------------


@contextlib.contextmanager
def frozen_jwt_clock(now: float) -> Iterator[None]:
    """PyJWT judges exp/nbf/iat by `datetime.now(tz=timezone.utc)` in
    jwt.api_jwt: pin it to `now` (seconds since the epoch) so the vectors'
    expired and not-yet-valid tokens stay so. A PyJWT that reads the clock
    another way shows up as wrong answers for the clock cases, not as a pass."""

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz: datetime.tzinfo | None = None) -> Any:  # type: ignore[override]
            return datetime.datetime.fromtimestamp(now, tz)

    with mock.patch.object(jwt.api_jwt, "datetime", Frozen):
        yield


@contextlib.contextmanager
def identity_settings(config: dict[str, Any]) -> Iterator[IdentitySettings]:
    """The IdentitySettings of a vector configuration (its key file's
    contents written to a temporary file)."""
    jwt_config = dict(config["jwt"])
    pem = jwt_config.pop("public_key_pem")
    with tempfile.TemporaryDirectory() as tmp:
        if pem is not None:
            path = Path(tmp) / "key.pem"
            path.write_text(pem)
            jwt_config["public_key_file"] = str(path)
        yield IdentitySettings.model_validate({**config, "jwt": jwt_config})


def native_spec(config: dict[str, Any]) -> dict[str, Any]:
    """What native.py passes to the Rust Identity for this configuration,
    bytes as latin-1 text (JSON)."""
    with identity_settings(config) as settings:
        spec = identity_spec(settings)
    for name in ("secret", "public_key_pem"):
        if spec[name] is not None:
            spec[name] = text(spec[name])
    return spec


def identity_answer(config: dict[str, Any], data: bytes, peer: str, now: float) -> dict[str, Any]:
    """Identifier.identify's answer for a request head (complete and valid)
    from `peer`, at `now`. A fresh Identifier each time, so that its cache of
    verified tokens (which only skips work) plays no part."""
    parser = HeadParser(_UNLIMITED)
    head = parser.feed(data)
    assert head is not None, "an identity vector's head must be complete"
    with identity_settings(config) as settings:
        identifier = Identifier(settings)
    with frozen_jwt_clock(now):
        client = identifier.identify(head.text_headers(), head.query, peer)
    return {
        "key": client.key,
        "source": client.source,
        "address": client.address,
        "verified": client.verified,
    }
