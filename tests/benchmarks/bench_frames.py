"""Micro-benchmark of proxy.frames.FrameParser (run on demand, not by pytest).

    .venv/bin/python -m tests.benchmarks.bench_frames

Prints microseconds per frame for the three shapes that bound the relay's
cost: many small frames per read (the common case), a stream delivered one
byte at a time (the worst case for header buffering), and one large frame
(which must cost the same as a small one: payloads are skipped, not read).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from loopwatch.proxy.dataplane.frames import FrameParser

CHUNK = 64 * 1024


def _masked_frame(payload_len: int, opcode: int = 0x2) -> bytes:
    # Serialized by hand so the benchmark measures the parser only.  The
    # payload content is irrelevant to a header parser, so it is not masked.
    if payload_len < 126:
        head = bytes((0x80 | opcode, 0x80 | payload_len))
    elif payload_len < 1 << 16:
        head = bytes((0x80 | opcode, 0x80 | 126)) + payload_len.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + payload_len.to_bytes(8, "big")
    return head + os.urandom(4) + bytes(payload_len)


def _best_of(repeat: int, run: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_small_frames_in_chunks() -> float:
    stream = _masked_frame(32) * 20_000  # 760 KB, cut at arbitrary 64 KiB offsets
    view = memoryview(stream)
    chunks = [view[i : i + CHUNK] for i in range(0, len(stream), CHUNK)]

    def run() -> None:
        parser = FrameParser(client_side=True)
        for chunk in chunks:
            parser.feed(chunk)
        assert parser.messages == 20_000 and parser.at_boundary

    return _best_of(7, run) / 20_000 * 1e6


def bench_one_frame_per_feed() -> float:
    # What a relay sees with chatty clients: each read holds one small frame.
    count = 20_000
    chunks = [_masked_frame(32) for _ in range(count)]

    def run() -> None:
        parser = FrameParser(client_side=True)
        for chunk in chunks:
            parser.feed(chunk)
        assert parser.messages == count and parser.at_boundary

    return _best_of(7, run) / count * 1e6


def bench_small_frames_byte_by_byte() -> float:
    count = 500
    stream = _masked_frame(32) * count
    chunks = [stream[i : i + 1] for i in range(len(stream))]

    def run() -> None:
        parser = FrameParser(client_side=True)
        for chunk in chunks:
            parser.feed(chunk)
        assert parser.messages == count and parser.at_boundary

    return _best_of(5, run) / count * 1e6


def bench_large_frame() -> float:
    count = 20
    frame = _masked_frame(1 << 20)
    view = memoryview(frame)
    chunks = [view[i : i + CHUNK] for i in range(0, len(frame), CHUNK)]

    def run() -> None:
        parser = FrameParser(client_side=True)
        for _ in range(count):
            for chunk in chunks:
                parser.feed(chunk)
        assert parser.messages == count and parser.at_boundary

    return _best_of(5, run) / count * 1e6


def main() -> None:
    print(f"32-byte masked frames, 64 KiB chunks: {bench_small_frames_in_chunks():8.3f} us/frame")
    print(f"32-byte masked frames, 1 per feed:    {bench_one_frame_per_feed():8.3f} us/frame")
    print(
        f"32-byte masked frames, 1-byte chunks: {bench_small_frames_byte_by_byte():8.3f} us/frame"
    )
    print(f"1 MiB masked frame,    64 KiB chunks: {bench_large_frame():8.3f} us/frame")


if __name__ == "__main__":
    main()
