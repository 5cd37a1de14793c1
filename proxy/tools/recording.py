"""Reading a recording for `loopwatch replay`: its lines, as records.

What the `record:` section writes (proxy/observe/recorder.py), from files,
standard input or a FIFO, gzip or not: each line an event, a process start, a
configuration, a lever or a gap, validated before the replay sees it.

A line that is not a valid event (corrupt, truncated by a crash, hand-edited,
longer than any event, or with a time no clock says) is reported with its
file and line number and skipped; a compressed file cut short is read up to
where it ends.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import math
import os
import stat
import sys
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeAlias, TypeGuard, cast

from ...detectors import events as ev
from ...detectors.shared import SharedCooldown

# Events of one process arrive in time order up to a few ms; more than this back is a clock reset.
CLOCK_SLACK = 1.0
# loopwatch writes events of under 1 KB a line; a longer line is no event of
# its own, and is skipped without holding it in memory (a 1.5 GB line of a
# 6 MB .gz was read whole). Over-long lines are skipped in pieces of this size.
MAX_LINE = 1 << 20
_SKIP_CHUNK = 1 << 16
# What a line's times may say. `t` is a monotonic clock, seconds since boot:
# never negative, and 1e10 is some 300 years of uptime. `wall` is Unix time
# up to the last second a datetime shows (9999-12-31). Beyond them a line was
# no proxy's (a 1e20 `wall` ended the replay with an OverflowError, a 1e300
# `t` printed a 300-digit span).
MAX_T = 1e10
MAX_WALL = 253402300799.0

STDIN = "-"
STDIN_NAME = "<stdin>"
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class Corrupt:
    file: str
    line: int | None  # None: the file as a whole (a compressed stream cut short)
    error: str

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "error": self.error}

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.file}: {self.error}"
        return f"{self.file}:{self.line}: skipped: {self.error}"


class Tally(Protocol):
    """What reading counts as it goes (a replay_report.ReplayReport)."""

    lines: int
    corrupt: list[Corrupt]
    warnings: list[str]


@dataclass(frozen=True, slots=True)
class Recorded:
    """An event line, with what the recorder wrote beside the event."""

    event: ev.Event
    wall: float | None
    # The attempt's connection id, on its attempt, rejected, handshake_failed and
    # answered lines (opened and closed carry it as the event's own); None in
    # recordings made before it was written.
    conn_id: ev.ConnId | None
    judged: str | None  # attempt lines: what the live engine judged, "admit" or the refusal's reason
    file: str
    line: int


@dataclass(frozen=True, slots=True)
class Start:
    """A process opened the recorder: an engine that started empty judged what follows."""

    t: float | None
    run: str
    file: str
    line: int


@dataclass(frozen=True, slots=True)
class ConfigLine:
    """The engine's configuration at a process start (`reload` False) or after a reload."""

    t: float | None
    reload: bool
    digests: Mapping[str, str]
    changed: tuple[str, ...]
    shared: str | None  # state.backend
    health_check: bool
    health_results: bool  # the results are lever lines (recordings since they are)
    file: str
    line: int


@dataclass(frozen=True, slots=True)
class LeverLine:
    """A change the engine took that is no traffic (observers.Lever, as recorded)."""

    kind: Literal["cooldown", "release", "breaker_reset", "adopt", "health"]
    t: float
    key: str
    duration: float
    breaker: str
    route: str | None
    cooldown: SharedCooldown | None
    origin: str  # "admin": this replica's operator; a replica's id; "redis"
    file: str
    line: int
    healthy: bool = True  # health: the check's result


@dataclass(frozen=True, slots=True)
class Gap:
    """The recorder lost `lost` events here (its buffer full, a write failed)."""

    lost: int
    file: str
    line: int


Item: TypeAlias = Recorded | Start | ConfigLine | LeverLine | Gap


def read_events(paths: Sequence[str], report: Tally) -> Iterator[Item]:
    """Each file's lines in turn, as records; bad lines go to `report.corrupt`.
    `-` is standard input; a file, a FIFO or a /dev/fd path is read as a
    stream, once; gzip is told by its first bytes, not by the name."""
    last = [float("-inf")]
    for path in paths:
        name = STDIN_NAME if path == STDIN else path
        with _open_input(path) as fh:
            lines = BoundedLines(fh)
            try:
                yield from _read_lines(name, lines, report, last)
            except (EOFError, zlib.error):
                # Cut short (a rotation compressed by a job that was killed, a copy
                # taken mid-write): what came before is kept, as zcat keeps it.
                report.corrupt.append(Corrupt(name, None, f"truncated compressed stream after line {lines.count}"))


class Readable(Protocol):
    def readline(self, size: int = -1, /) -> bytes: ...


class _Prefixed(io.RawIOBase):
    """The bytes read already to tell gzip from text, then the rest of a stream
    that cannot seek back to them (standard input, a FIFO)."""

    def __init__(self, head: bytes, rest: io.BufferedReader):
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._rest.read1(len(buffer))
        buffer[: len(data)] = data
        return len(data)


@contextlib.contextmanager
def _open_input(path: str) -> Iterator[Readable]:
    with contextlib.ExitStack() as stack:
        # Standard input's buffer is a BufferedReader, as an opened file is.
        fh = cast(io.BufferedReader, sys.stdin.buffer) if path == STDIN else stack.enter_context(open(path, "rb"))
        head = fh.read(len(_GZIP_MAGIC))
        stream = fh
        if fh.seekable():
            fh.seek(0)
        else:
            stream = io.BufferedReader(_Prefixed(head, fh), 1 << 16)
        if head == _GZIP_MAGIC:
            yield stack.enter_context(gzip.GzipFile(fileobj=stream, mode="rb"))
        else:
            yield stream


class BoundedLines:
    """A binary file's lines, each read with a bound: a line longer than
    MAX_LINE comes as None, and the rest of it is read past in pieces."""

    def __init__(self, fh: Readable):
        self.fh = fh
        self.count = 0  # lines read whole so far (over-long ones included)

    def __iter__(self) -> Iterator[bytes | None]:
        while raw := self.fh.readline(MAX_LINE + 1):
            if len(raw) > MAX_LINE and not raw.endswith(b"\n"):
                while (rest := self.fh.readline(_SKIP_CHUNK)) and not rest.endswith(b"\n"):
                    pass
                self.count += 1
                yield None
                continue
            self.count += 1
            yield raw


def _read_lines(
    path: str, lines: Iterable[bytes | None], report: Tally, last: list[float]
) -> Iterator[Item]:
    for number, raw in enumerate(lines, 1):
        report.lines += 1
        if raw is None:
            report.corrupt.append(Corrupt(path, number, f"line too long (over {MAX_LINE} bytes; events are under 1 KB)"))
            continue
        if not raw.strip():
            continue
        try:
            data = json.loads(raw)
        except UnicodeDecodeError:
            report.corrupt.append(Corrupt(path, number, "not UTF-8 text"))
            continue
        except (ValueError, RecursionError) as e:  # RecursionError: nested beyond reason
            truncated = not raw.endswith(b"\n")
            what = "truncated line (no newline at the end of the file)" if truncated else "invalid JSON"
            report.corrupt.append(Corrupt(path, number, f"{what}: {e}"))
            continue
        if not isinstance(data, dict):
            report.corrupt.append(Corrupt(path, number, f"expected a JSON object, got {type(data).__name__}"))
            continue
        try:
            item = parse_line(data, path, number)
        except (ValueError, TypeError) as e:
            report.corrupt.append(Corrupt(path, number, str(e)))
            continue
        if isinstance(item, Recorded):
            t = item.event.t
            if t < last[0] - CLOCK_SLACK:
                # `t` is the proxy's monotonic clock, which restarts when the host does.
                report.warnings.append(
                    f"{path}:{number}: event time went back {last[0] - t:.1f}s (files from before and after a "
                    "host reboot, or in the wrong order? replay each boot's files on their own, oldest first)"
                )
                last[0] = t  # once per jump: the new clock is the reference from here
            last[0] = max(last[0], t)
        yield item


def parse_line(data: Mapping[str, Any], path: str, number: int) -> Item:
    """One line's record; ValueError saying what is wrong with it."""
    kind = data.get("type")
    if kind == "start":
        return Start(_seconds(data, "start", "t", required=False), _text(data, "start", "run", ""), path, number)
    if kind == "config":
        return _config_line(data, path, number)
    if kind == "lever":
        return _lever_line(data, path, number)
    if kind == "gap":
        lost = data.get("lost")
        if not _is_int(lost) or lost < 0:
            raise ValueError(f"gap.lost: expected a count, got {lost!r}")
        return Gap(lost, path, number)
    event = ev.from_dict(data)  # raises ValueError, naming the field, for anything else amiss
    _seconds(data, kind, "t")
    if isinstance(event, ev.Closed):
        _seconds(data, kind, "duration", what="seconds, 0 or more")
    wall = data.get("wall")
    if wall is not None:
        _number_in(data, kind, "wall", 0.0, MAX_WALL, "a Unix time (0 to 9999-12-31)")
        wall = float(wall)
    conn_id = None
    if not isinstance(event, ev.Opened | ev.Closed):
        conn_id = data.get("conn_id")
        if conn_id is not None and not (_is_int(conn_id) or isinstance(conn_id, str)):
            raise ValueError(f"{kind}.conn_id: expected an int or string, got {conn_id!r}")
    judged = data.get("judged") if isinstance(event, ev.Attempt) else None
    if judged is not None and not isinstance(judged, str):
        raise ValueError(f"attempt.judged: expected admit or a refusal's reason, got {judged!r}")
    return Recorded(event, wall, conn_id, judged, path, number)


def _config_line(data: Mapping[str, Any], path: str, number: int) -> ConfigLine:
    sections = data.get("sections")
    if not isinstance(sections, dict) or not all(isinstance(v, str) for v in sections.values()):
        raise ValueError(f"config.sections: expected a digest of each section, got {sections!r}")
    changed = data.get("changed", [])
    if not isinstance(changed, list) or not all(isinstance(c, str) for c in changed):
        raise ValueError(f"config.changed: expected a list of sections, got {changed!r}")
    reload = data.get("reload", False)
    if not isinstance(reload, bool):
        raise ValueError(f"config.reload: expected true or false, got {reload!r}")
    shared = data.get("shared")
    return ConfigLine(
        _seconds(data, "config", "t", required=False), reload, dict(sections), tuple(changed),
        shared if isinstance(shared, str) else None, data.get("health_check") is True,
        data.get("health_results") is True, path, number,
    )  # fmt: skip


_LEVERS = ("cooldown", "release", "breaker_reset", "adopt", "health")
_KEYLESS_LEVERS = ("breaker_reset", "health")


def _lever_line(data: Mapping[str, Any], path: str, number: int) -> LeverLine:
    kind = data.get("kind")
    if kind not in _LEVERS:
        raise ValueError(f"lever.kind: expected one of {list(_LEVERS)}, got {kind!r}")
    t = _seconds(data, "lever", "t")
    assert t is not None
    key = _text(data, "lever", "key", "")
    if kind not in _KEYLESS_LEVERS and not key:
        raise ValueError(f"lever.key: a {kind} without the client's key")
    duration = 0.0
    cooldown = None
    if kind == "cooldown":
        duration = _seconds(data, "lever", "duration", what="seconds, 0 or more") or 0.0
    elif kind == "adopt":
        remaining = data.get("remaining")
        if not _is_number(remaining) or abs(remaining) > MAX_T:
            raise ValueError(f"lever.remaining: expected seconds, got {remaining!r}")
        repeat = data.get("repeat")
        if not _is_int(repeat) or repeat < 0:
            raise ValueError(f"lever.repeat: expected a count, got {repeat!r}")
        enforced, force = data.get("enforced", True), data.get("force", False)
        if not isinstance(enforced, bool) or not isinstance(force, bool):
            raise ValueError("lever.enforced, lever.force: expected true or false")
        cooldown = SharedCooldown(key, float(remaining), _text(data, "lever", "rule", "manual"), repeat, enforced, force)
    route = data.get("route")
    if route is not None and not isinstance(route, str):
        raise ValueError(f"lever.route: expected a route or null, got {route!r}")
    if kind == "health" and route is None:
        raise ValueError("lever.route: a health check result without its route")
    healthy = data.get("ok", True)
    if not isinstance(healthy, bool):
        raise ValueError(f"lever.ok: expected true or false, got {healthy!r}")
    breaker = _text(data, "lever", "breaker", "")
    return LeverLine(
        kind, t, key, duration, breaker, route, cooldown, _text(data, "lever", "origin", "admin"), path, number,
        healthy,
    )  # fmt: skip


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _number_in(data: Mapping[str, Any], kind: object, name: str, lo: float, hi: float, what: str) -> float:
    value = data.get(name)
    if not _is_number(value) or not lo <= value <= hi:
        raise ValueError(f"{kind}.{name}: expected {what}, got {value!r}")
    return float(value)


def _seconds(
    data: Mapping[str, Any], kind: object, name: str, *, required: bool = True,
    what: str = "seconds of a monotonic clock (0 to 1e10)",
) -> float | None:  # fmt: skip
    if data.get(name) is None and not required:
        return None
    return _number_in(data, kind, name, 0.0, MAX_T, what)


def _text(data: Mapping[str, Any], kind: str, name: str, default: str) -> str:
    value = data.get(name, default)
    if not isinstance(value, str):
        raise ValueError(f"{kind}.{name}: expected a string, got {value!r}")
    return value


def unreadable(paths: Sequence[str]) -> str | None:
    """Why `paths` cannot be replayed, or None. Standard input (`-`, once), a
    file, a FIFO or a /dev/fd path (`<(zcat …)`) are read; a directory is not
    (it was "no such file", as were the FIFO and stdin)."""
    if paths.count(STDIN) > 1:
        return "standard input (-) given more than once"
    for path in paths:
        if path == STDIN:
            continue
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            return f"no such file: {path}"
        except OSError as e:
            return f"cannot read: {path}: {e.strerror}"
        if stat.S_ISDIR(mode):
            return f"not a regular file: {path} (a directory)"
    return None
