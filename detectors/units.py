"""Durations and sizes as configuration strings ("10s", "500ms", "16MiB").

Pure parsing plus pydantic annotated types, so every settings model (the
proxy's and the engine's) validates them the same way and reports the same
message on a bad value.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# re.ASCII: Python's \d takes every script's digits ("١s" was one second).
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$", re.ASCII)
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmg]i?b|b)?\s*$", re.IGNORECASE | re.ASCII)


# The longest duration anything in loopwatch takes: a year. Beyond it a value is a
# mistake, and an unbounded one (1e400s is infinite) would overflow the retry
# time a refusal carries (docs/refusals.md).
MAX_DURATION = 366 * 86400.0
# The largest size and count a setting takes: beyond them a value is a mistake,
# and it would not fit the data plane's fixed-size integers (a traceback, or a
# reload half applied, instead of an error naming the key).
MAX_SIZE = 1 << 40  # 1 TiB
MAX_COUNT = 10_000_000


def parse_duration(value: Any) -> float:
    """Seconds from "250ms", "10s", "5m", "1h", "1d", or a plain number of seconds
    (at most MAX_DURATION)."""
    if isinstance(value, bool):
        raise ValueError(f'expected a duration such as "10s" or "500ms", got {_shown(value)}')
    seconds: float | None = None
    if isinstance(value, int | float):
        if not value >= 0:  # also NaN
            raise ValueError(f"expected a non-negative duration, got {_shown(value)}")
        if value > MAX_DURATION:  # before float(): an int too large for one raises OverflowError
            raise ValueError(f"expected at most 366d, got {_shown(value)}")
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if seconds is None:
        raise ValueError(f'expected a duration such as "10s" or "500ms", got {_shown(value)}')
    if seconds > MAX_DURATION:
        raise ValueError(f"expected at most 366d, got {_shown(value)}")
    return seconds


def escalated(base: float, factor: float, steps: int, cap: float) -> float:
    """``base × factor^steps``, at most ``cap``, for any number of steps: a
    backend down for a weekend trips its breaker past a thousand times, and
    2^1024 is no float (OverflowError, the breaker stuck half-open)."""
    if steps <= 0 or factor <= 1.0 or base <= 0.0:
        return min(base, cap)
    if base >= cap or steps >= math.log(cap / base) / math.log(factor):
        return cap
    return min(base * factor**steps, cap)


def _shown(value: Any) -> str:
    """A value in an error message, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}…({len(text)} characters)"


def format_duration(seconds: float) -> str:
    """The shortest exact string for a duration, the inverse of parse_duration."""
    if seconds == 0:
        return "0s"
    for unit in ("d", "h", "m", "s"):
        n = seconds / _DURATION_UNITS[unit]
        if n >= 1 and n == int(n):
            return f"{int(n)}{unit}"
    ms = seconds * 1000
    if ms == int(ms):
        return f"{int(ms)}ms"
    return f"{seconds:g}s"


def parse_size(value: Any) -> int:
    """Bytes from "16MiB", "64KiB", "1000", or a plain integer."""
    if isinstance(value, bool):
        raise ValueError(f'expected a size such as "64KiB" or "16MiB", got {_shown(value)}')
    size: int | None = None
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"expected a non-negative size, got {_shown(value)}")
        size = value
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            # A digit string past Python's int limit (4 300) raises its own ValueError.
            size = MAX_SIZE + 1 if len(m.group(1).lstrip("0")) > 20 else int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()]
    if size is None:
        raise ValueError(f'expected a size such as "64KiB" or "16MiB", got {_shown(value)}')
    if size > MAX_SIZE:
        raise ValueError(f"expected at most 1024GiB, got {_shown(value)}")
    return size


def format_size(n: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


# Seconds as float in code, "10s"-style strings in files and in dumped config.
Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(format_duration)]
# Bytes as int in code, "16MiB"-style strings in files and in dumped config.
ByteSize = Annotated[int, BeforeValidator(parse_size), PlainSerializer(format_size)]
