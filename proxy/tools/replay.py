"""`loopwatch replay`: recorded events through the same engine, offline.

The `fail2ban-regex` of connection loops: feed a recording (the `record:`
section writes one) to ``detectors.engine.Engine`` with any configuration and
see which clients it would flag, when, by which rule, on what evidence, and
what enforcement would have done — before switching enforcement on.

Events are replayed in event time, as fast as the CPU goes: before each event
the engine is woken at every ``next_wake`` that event time has passed, exactly
as the proxy's timer would have. ``Attempt`` goes to ``admit`` and every other
event to ``record``, as in the proxy. A recorded ``Rejected`` is skipped: it
is what the live engine wrote down when it refused the attempt, and ``admit``
writes its own when the replayed engine refuses.

What the live engine had besides the traffic is in the recording too
(proxy/observe/recorder.py), and replayed as the live process had it:

* a ``start`` line: the process started, with an empty engine, so the replay
  starts a fresh one there (and connection ids start over). Recordings made
  before these lines: connection ids going back are taken for a restart;
* ``lever`` lines: an operator's cooldown, release or breaker reset, another
  replica's cooldown or release, applied where the live engine took them;
* ``config`` lines: a digest of the sections the engine decides by, at the
  start and at every reload, so the report can tell the differences this
  configuration makes from those a reload made live;
* ``judged`` on each attempt: what the live engine judged. The data plane
  admits from its table, a batch behind the engine, so an attempt the engine
  judged refused can have reached the backend all the same. The engine kept
  its judgement and was not fed that attempt's outcome; nor is the replay's,
  and such attempts are counted on their own, not as a difference.

A replay with another configuration can decide differently from the live
proxy, and a recording only holds what really happened:

* the replay refuses an attempt the live proxy let through: the outcome that
  attempt had (its failed handshake, or its open and close) is left out;
* the replay lets through an attempt the live proxy refused: nobody knows what
  the backend would have said, so the replay *assumes* it would have ended
  like that client's previous attempt that did reach it (same status, or same
  close code after the same lifetime), and says how many outcomes it assumed.
  A recording made in observe mode needs no such guess: everything reached the
  backend. That is why docs/tuning.md records in observe mode.

With the configuration the recording was made with, none of this happens and
the replay judges every attempt as the live engine did (tests hold it to that).

A line that is not a valid event (corrupt, truncated by a crash, hand-edited,
longer than any event, or with a time no clock says) is reported with its
file and line number and skipped; a compressed file cut short is read up to
where it ends.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import heapq
import io
import itertools
import json
import math
import os
import stat
import sys
import zlib
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Generic, Literal, Protocol, TypeAlias, TypeGuard, TypeVar, cast

from ...detectors import events as ev
from ...detectors.actions import BreakerTransition, CloseConnection, CooldownStarted, WouldReject
from ...detectors.decisions import Admit, Outcome, Reject
from ...detectors.engine import Engine
from ...detectors.findings import Finding
from ...detectors.shared import SharedCooldown
from ..observe.recorder import ENGINE_SECTIONS, section_digests

# Events of one process arrive in time order up to a few ms; more than this back is a clock reset.
CLOCK_SLACK = 1.0
# Replay wakes the engine at every due time; a wake that schedules itself again
# at the same instant would spin, so the replay moves on after this many.
_MAX_WAKES_PER_EVENT = 10_000
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
# Attempts waiting for their outcome or answer, and connections open: an
# outcome lost (the recorder's buffer full) would keep its attempt for good,
# so at most this many are kept, the oldest forgotten first (an attempt waits
# a handshake's time; a connection may stay open for hours).
MAX_WAITING = 1 << 16
MAX_OPEN = 1 << 18

STDIN = "-"
_STDIN_NAME = "<stdin>"
_GZIP_MAGIC = b"\x1f\x8b"

# What became of an attempt here, for its recorded outcome:
# feed: admitted here: its outcome is fed to the engine;
# drop: refused here, though the live engine admitted it (or the recording does
#       not say): its outcome is left out, a difference;
# late: refused here and by the live engine, but the data plane had admitted it
#       already: its outcome is what the client met, and kept from the engine
#       as the live engine was kept from it.
Fate: TypeAlias = Literal["feed", "drop", "late"]
T = TypeVar("T")


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


@dataclass(frozen=True)
class Raised:
    """A finding the replayed engine raised, and at which call."""

    finding: Finding
    source: str  # "admit" | "record" | "wake"


@dataclass
class Differences:
    """Where the replay decided otherwise than the live engine."""

    judged: int = 0  # attempts judged otherwise (recordings that say what the live engine judged)
    dropped: int = 0  # attempts refused here whose recorded outcome was left out
    assumed: int = 0  # outcomes assumed for attempts only the live proxy refused
    unknown: int = 0  # … and those with nothing to assume from

    def __bool__(self) -> bool:
        return bool(self.judged or self.dropped or self.assumed or self.unknown)

    def add(self, other: Differences) -> None:
        self.judged += other.judged
        self.dropped += other.dropped
        self.assumed += other.assumed
        self.unknown += other.unknown

    def to_dict(self) -> dict[str, int]:
        return {"judged": self.judged, "dropped": self.dropped, "assumed": self.assumed, "unknown": self.unknown}

    def text(self) -> str:
        parts = []
        if self.judged:
            parts.append(f"{self.judged} attempt(s) judged otherwise")
        if self.dropped:
            parts.append(f"{self.dropped} recorded outcome(s) left out (attempts refused here that were let through live)")
        if self.assumed:
            parts.append(
                f"{self.assumed} outcome(s) assumed like the client's previous attempt (attempts let through here "
                "that were refused live)"
            )
        if self.unknown:
            parts.append(f"{self.unknown} attempt(s) let through here with nothing to assume their outcome from")
        return ", ".join(parts)


@dataclass
class ClientReport:
    key: str
    attempts: int = 0
    admitted: int = 0
    refused: Counter[str] = field(default_factory=Counter)  # by the replayed engine, enforced
    would_refuse: Counter[str] = field(default_factory=Counter)  # observe mode / rollout / allow list
    live_refused: Counter[str] = field(default_factory=Counter)  # in the recording
    findings: list[Finding] = field(default_factory=list)
    cooldowns: list[CooldownStarted] = field(default_factory=list)
    closed_by_policy: int = 0  # close-oldest actions
    # Refused here and by the live engine, and let through by the data plane
    # before the live judgement reached it (M1 of the tools probe).
    late_admitted: int = 0
    # Refused by the live table, a batch ahead of the engine, though the engine
    # would have let them through: refused here too, as live.
    table_refused: int = 0
    judged_otherwise: int = 0  # attempts the replay judged otherwise than the live engine
    outside: Counter[str] = field(default_factory=Counter)  # levers applied to it (operator, other replicas)

    @property
    def flagged(self) -> bool:
        return bool(self.findings)

    def enforcement(self) -> str:
        """What enforcement would have done to this client, in a few words."""
        parts = []
        enforced = [c for c in self.cooldowns if c.enforced]
        observed = [c for c in self.cooldowns if not c.enforced]
        if enforced:
            parts.append(
                f"{len(enforced)} cooldown(s) ("
                + ", ".join(f"{c.duration:.0f}s" + (" by an operator" if c.rule == "manual" else "") for c in enforced[:4])
                + (" …" if len(enforced) > 4 else "")
                + ")"
            )
        if self.refused:
            parts.append(f"refused {sum(self.refused.values())} attempt(s) ({_counts(self.refused)})")
        if self.late_admitted:
            parts.append(f"{self.late_admitted} of them let through by the data plane first, as live")
        if self.table_refused:
            parts.append(f"{self.table_refused} of them refused by the data plane's table only, as live")
        if observed:
            parts.append(f"observe: {len(observed)} cooldown(s) not enforced")
        if self.would_refuse:
            parts.append(f"would have refused {sum(self.would_refuse.values())} ({_counts(self.would_refuse)})")
        if self.closed_by_policy:
            parts.append(f"closed {self.closed_by_policy} connection(s) over max_concurrent")
        if self.outside:
            parts.append(f"not traffic: {_counts(self.outside)}")
        return "; ".join(parts) or "nothing"

    def to_dict(self, report: ReplayReport) -> dict[str, Any]:
        return {
            "key": self.key,
            "attempts": self.attempts,
            "admitted": self.admitted,
            "refused": dict(self.refused),
            "would_refuse": dict(self.would_refuse),
            "live_refused": dict(self.live_refused),
            "late_admitted": self.late_admitted,
            "table_refused": self.table_refused,
            "judged_otherwise": self.judged_otherwise,
            "outside": dict(self.outside),
            "findings": [report.finding_dict(f) for f in self.findings],
            "cooldowns": [
                {**c.to_dict(), "at": report.at(c.t), "wall": report.wall(c.t)} for c in self.cooldowns
            ],
            "enforcement": self.enforcement(),
        }

    @property
    def affected(self) -> bool:
        """Anything to say of it beyond its attempts: refused (here, live or
        both), an operator's or another replica's doing, decided otherwise."""
        return bool(
            self.refused or self.would_refuse or self.live_refused or self.cooldowns or self.closed_by_policy
            or self.late_admitted or self.table_refused or self.judged_otherwise or self.outside
        )  # fmt: skip


@dataclass(frozen=True)
class Reload:
    """A reload the live proxy applied that changed what its engine decides by."""

    t: float
    changed: tuple[str, ...]


@dataclass(eq=False)  # each stretch is itself: removed from the report's list by identity
class Stretch:
    """A stretch of the recording that one live configuration decided: from a
    process start or a reload to the next. Differences are counted by stretch,
    so that those made where the live proxy ran another configuration are not
    put down to the replay's."""

    process: int
    digests: Mapping[str, str] | None = None  # the live configuration's (None: the recording does not say)
    matches: bool = False  # the live configuration is the replay's
    first_t: float | None = None
    last_t: float | None = None
    diffs: Differences = field(default_factory=Differences)

    def saw(self, t: float) -> None:
        if self.first_t is None:
            self.first_t = t
        self.last_t = t


@dataclass
class ReplayReport:
    files: list[str]
    config: str | None
    mode: str  # policy.mode of the replay's configuration
    environment: list[str] = field(default_factory=list)  # LOOPWATCH_* variables that changed it
    digests: Mapping[str, str] | None = None  # of the replay's configuration (recorder.section_digests)
    lines: int = 0
    events: int = 0  # fed to the engine (recorded Rejected excluded)
    skipped_rejected: int = 0
    corrupt: list[Corrupt] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    first_t: float | None = None
    last_t: float | None = None
    first_wall: float | None = None
    raised: list[Raised] = field(default_factory=list)
    cleared: list[Finding] = field(default_factory=list)
    decisions: list[tuple[ev.Attempt, Admit | Reject]] = field(default_factory=list)
    breakers: list[BreakerTransition] = field(default_factory=list)
    # Full reports only of the clients the report speaks of (flagged, refused,
    # decided otherwise …); the others' attempts are counted and nothing more:
    # a ClientReport each cost ~1 KB, 300 MB for a day of 300 000 IP keys.
    clients: dict[str, ClientReport] = field(default_factory=dict)
    quiet: dict[str, int] = field(default_factory=dict)  # key -> attempts, all admitted
    stretches: list[Stretch] = field(default_factory=list)
    process_starts: list[float] = field(default_factory=list)  # event time of each (start line or restart seen)
    restarts_guessed: int = 0  # of them, seen from connection ids (recordings without start lines)
    late_admitted: int = 0
    table_refused: int = 0  # refused by the live table (a batch ahead) where the engine would have admitted
    levers: Counter[str] = field(default_factory=Counter)
    reloads: list[Reload] = field(default_factory=list)
    lost: int = 0  # events the recorder lost (its gap lines)
    # What fed the live engine and is not in the recording: "shared" (other
    # replicas' events, state.backend: redis), "health_check" (its results).
    unrecorded: set[str] = field(default_factory=set)
    keep_decisions: bool = False

    def client(self, key: str) -> ClientReport:
        """The full report of `key`, made (with its attempts so far) when it first matters."""
        report = self.clients.get(key)
        if report is None:
            seen = self.quiet.pop(key, 0)
            report = self.clients[key] = ClientReport(key, attempts=seen, admitted=seen)
        return report

    def find(self, key: str) -> ClientReport | None:
        """What the report knows of `key` (a quiet client's attempts only); None if never seen."""
        report = self.clients.get(key)
        if report is None and key in self.quiet:
            seen = self.quiet[key]
            return ClientReport(key, attempts=seen, admitted=seen)
        return report

    @property
    def client_count(self) -> int:
        return len(self.clients) + len(self.quiet)

    @property
    def findings(self) -> list[Finding]:
        return [r.finding for r in self.raised]

    @property
    def flagged(self) -> list[ClientReport]:
        """Flagged clients, the earliest flagged first."""
        return sorted((c for c in self.clients.values() if c.flagged), key=lambda c: c.findings[0].t)

    @property
    def affected(self) -> list[ClientReport]:
        """Clients not flagged that were refused (here or live), decided
        otherwise or touched by an operator or another replica, by key."""
        return sorted((c for c in self.clients.values() if not c.flagged and c.affected), key=lambda c: c.key)

    def differences(self) -> dict[str, Differences]:
        """The differences by whose they are. `config`: this configuration's
        (it is not the one that ran live then, or the recording does not say
        which ran); `live_config`: made where this very configuration ran live,
        so not its doing (an input the recording lacks); `other_config`: made
        where the live proxy ran another configuration, a reload away from this
        one, which ran live at another time of the recording."""
        ran = any(s.matches for s in self.stretches)
        out = {"config": Differences(), "live_config": Differences(), "other_config": Differences()}
        for s in self.stretches:
            if s.digests is None or not (s.matches or ran):
                out["config"].add(s.diffs)
            elif s.matches:
                out["live_config"].add(s.diffs)
            else:
                out["other_config"].add(s.diffs)
        return out

    def _total(self) -> Differences:
        total = Differences()
        for s in self.stretches:
            total.add(s.diffs)
        return total

    @property
    def dropped_outcomes(self) -> int:
        return self._total().dropped

    @property
    def assumed_outcomes(self) -> int:
        return self._total().assumed

    @property
    def unknown_outcomes(self) -> int:
        return self._total().unknown

    @property
    def judged_otherwise(self) -> int:
        return self._total().judged

    def at(self, t: float) -> float:
        """Seconds since the recording's first event."""
        return round(t - (self.first_t or 0.0), 6)

    def wall(self, t: float) -> str | None:
        """Wall-clock time of event time `t`, when the recording says when it started."""
        if self.first_wall is None or self.first_t is None:
            return None
        try:
            when = dt.datetime.fromtimestamp(self.first_wall + (t - self.first_t), dt.UTC)
        except (OverflowError, ValueError, OSError):
            return None  # each within bounds, their sum beyond what a date shows
        return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def finding_dict(self, f: Finding) -> dict[str, Any]:
        return {**f.to_dict(), "at": self.at(f.t), "wall": self.wall(f.t)}

    @property
    def config_label(self) -> str:
        """Where the replay's configuration came from, for the report's first line."""
        if not self.environment:
            return self.config or "(defaults)"
        names = ", ".join(self.environment)
        return f"{self.config} + environment: {names}" if self.config else f"(defaults + environment: {names})"

    def to_dict(self) -> dict[str, Any]:
        blame = self.differences()
        return {
            "files": self.files,
            "config": self.config,
            "environment": self.environment,
            "mode": self.mode,
            "lines": self.lines,
            "events": self.events,
            "skipped_rejected": self.skipped_rejected,
            "corrupt": [c.to_dict() for c in self.corrupt],
            "warnings": self.warnings,
            "span": {
                "first_t": self.first_t,
                "last_t": self.last_t,
                "seconds": None if self.first_t is None else round((self.last_t or 0) - self.first_t, 6),
                "first_wall": self.wall(self.first_t) if self.first_t is not None else None,
            },
            "process_starts": [self.at(t) for t in self.process_starts],
            "restarts_guessed": self.restarts_guessed,
            "reloads": [{"at": self.at(r.t), "wall": self.wall(r.t), "changed": list(r.changed)} for r in self.reloads],
            "levers": dict(self.levers),
            "lost_events": self.lost,
            "unrecorded": sorted(self.unrecorded),
            "findings": [{**self.finding_dict(r.finding), "source": r.source} for r in self.raised],
            "cleared": [self.finding_dict(f) for f in self.cleared],
            "flagged_clients": [c.to_dict(self) for c in self.flagged],
            "affected_clients": [c.to_dict(self) for c in self.affected],
            "clients": self.client_count,
            "breakers": [{**b.to_dict(), "at": self.at(b.t)} for b in self.breakers],
            "late_admitted": self.late_admitted,
            "table_refused": self.table_refused,
            "judged_otherwise": self.judged_otherwise,
            "dropped_outcomes": self.dropped_outcomes,
            "assumed_outcomes": self.assumed_outcomes,
            "unknown_outcomes": self.unknown_outcomes,
            "differences": {kind: d.to_dict() for kind, d in blame.items()},
        }


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counter.most_common())


# --- reading ------------------------------------------------------------------------


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
    file: str
    line: int


@dataclass(frozen=True, slots=True)
class LeverLine:
    """A change the engine took that is no traffic (observers.Lever, as recorded)."""

    kind: Literal["cooldown", "release", "breaker_reset", "adopt"]
    t: float
    key: str
    duration: float
    breaker: str
    route: str | None
    cooldown: SharedCooldown | None
    origin: str  # "admin": this replica's operator; a replica's id; "redis"
    file: str
    line: int


@dataclass(frozen=True, slots=True)
class Gap:
    """The recorder lost `lost` events here (its buffer full, a write failed)."""

    lost: int
    file: str
    line: int


Item: TypeAlias = Recorded | Start | ConfigLine | LeverLine | Gap


def read_events(paths: Sequence[str], report: ReplayReport) -> Iterator[Item]:
    """Each file's lines in turn, as records; bad lines go to `report.corrupt`.
    `-` is standard input; a file, a FIFO or a /dev/fd path is read as a
    stream, once; gzip is told by its first bytes, not by the name."""
    last = [float("-inf")]
    for path in paths:
        name = _STDIN_NAME if path == STDIN else path
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
    path: str, lines: Iterable[bytes | None], report: ReplayReport, last: list[float]
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
        shared if isinstance(shared, str) else None, data.get("health_check") is True, path, number,
    )  # fmt: skip


_LEVERS = ("cooldown", "release", "breaker_reset", "adopt")


def _lever_line(data: Mapping[str, Any], path: str, number: int) -> LeverLine:
    kind = data.get("kind")
    if kind not in _LEVERS:
        raise ValueError(f"lever.kind: expected one of {list(_LEVERS)}, got {kind!r}")
    t = _seconds(data, "lever", "t")
    assert t is not None
    key = _text(data, "lever", "key", "")
    if kind != "breaker_reset" and not key:
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
    breaker = _text(data, "lever", "breaker", "")
    return LeverLine(
        kind, t, key, duration, breaker, route, cooldown, _text(data, "lever", "origin", "admin"), path, number
    )


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


# --- replaying -------------------------------------------------------------------------


@dataclass
class _Template:
    """How a client's last attempt that reached the backend ended, relative to the attempt."""

    failed: ev.HandshakeFailed | None = None
    opened_after: float | None = None
    closed: ev.Closed | None = None
    attempt_t: float = 0.0


@dataclass(slots=True)
class _Pending:
    """An attempt whose first outcome (or refusal, or held answer) is still to
    come in the recording, and what becomes of it here."""

    attempt: ev.Attempt
    fate: Fate
    live_judged: str | None  # what the live engine judged, when the recording says


@dataclass(slots=True)
class _Conn:
    """A connection opened in the recording: its attempt's time, and whether
    its outcomes go to the engine (see Fate)."""

    attempt_t: float
    fed: bool


@dataclass(order=True, slots=True)
class _Assumed:
    """An outcome assumed for an attempt only the live proxy refused, due at `t`."""

    t: float
    seq: int
    event: ev.Event = field(compare=False)


class _Waiting(Generic[T]):
    """Attempts waiting for something of theirs: by connection id when the
    recording gives the attempt one, else per client in arrival order (a
    client's outcomes come in the order of its attempts: older recordings).
    At most MAX_WAITING by id, the oldest forgotten first (an outcome lost)."""

    def __init__(self) -> None:
        self.by_id: OrderedDict[ev.ConnId, T] = OrderedDict()
        self.by_key: dict[str, deque[T]] = {}

    def add(self, key: str, conn_id: ev.ConnId | None, item: T) -> None:
        if conn_id is not None:
            self.by_id[conn_id] = item
            if len(self.by_id) > MAX_WAITING:
                self.by_id.popitem(last=False)
        else:
            self.by_key.setdefault(key, deque()).append(item)

    def take(self, key: str, conn_id: ev.ConnId | None) -> T | None:
        if conn_id is not None and self.by_id:
            item = self.by_id.pop(conn_id, None)
            if item is not None:
                return item
        queue = self.by_key.get(key)
        if not queue:
            return None
        item = queue.popleft()
        if not queue:
            del self.by_key[key]
        return item

    def take_id(self, conn_id: ev.ConnId | None) -> T | None:
        """Only by id: a line that names its attempt and may come late (a
        refusal after the upstream connect)."""
        return None if conn_id is None else self.by_id.pop(conn_id, None)


@dataclass
class _Process:
    """What one live process's engine had of its connections: never paired
    across a restart (connection ids start again at 1)."""

    marked: bool  # began at a start line (else: the recording's beginning, or a restart seen from ids)
    pending: _Waiting[_Pending] = field(default_factory=_Waiting)
    held: _Waiting[float] = field(default_factory=_Waiting)  # refused live and here: an answer may come
    conns: dict[tuple[str, ev.ConnId], _Conn] = field(default_factory=dict)
    assumed: list[_Assumed] = field(default_factory=list)  # heap
    highest_id: int = 0  # the highest int connection id seen: ids going back are a restart


class Replayer:
    """Feeds events to an engine the way the proxy does, and collects what it says."""

    def __init__(self, settings: Any, report: ReplayReport, seed: int = 0):
        self.settings = settings
        self.seed = seed
        self.report = report
        self.engine = self._engine()
        self._proc = _Process(marked=False)
        self._stretch = self._new_stretch(None)
        # Bounded like the engine's own store: a template per client ever seen
        # grew without end (L2 of the tools probe).
        self._templates: OrderedDict[str, _Template] = OrderedDict()
        self._max_templates = settings.detection.max_clients
        self._seq = itertools.count()
        self._synthetic = itertools.count(1)

    def _engine(self) -> Engine:
        s = self.settings
        return Engine(s.detection, s.policy, s.breakers, seed=self.seed)

    def _new_stretch(self, digests: Mapping[str, str] | None) -> Stretch:
        report = self.report
        stretch = Stretch(len(report.process_starts), digests, digests is not None and digests == report.digests)
        report.stretches.append(stretch)
        return stretch

    def run(self, stream: Iterable[Item]) -> ReplayReport:
        report = self.report
        items = iter(stream)
        current = next(items, None)
        while current is not None:
            following = next(items, None)
            if isinstance(current, Recorded):
                self._event(current, following)
            elif isinstance(current, Start):
                self._start(current.t)
            elif isinstance(current, ConfigLine):
                self._config(current)
            elif isinstance(current, LeverLine):
                self._lever(current)
            else:
                report.lost += current.lost
                report.warnings.append(
                    f"{current.file}:{current.line}: {current.lost} event(s) were not recorded here (the "
                    "recorder's buffer was full, or a write failed): decisions after it may differ for want of them"
                )
            current = following
        self._assumed_until(float("inf"))
        report.stretches[:] = [s for s in report.stretches if s.first_t is not None or s.diffs]
        return report

    # --- process boundaries, configuration, levers ---------------------------------------

    def _start(self, t: float | None) -> None:
        """A process started: as live, a fresh engine; nothing of the last
        process's connections carries over (M2 of the tools probe: a crash left
        its sockets open for ever, and reused ids paired with old ones)."""
        report = self.report
        if t is not None:
            self._assumed_until(t)
        self.engine = self._engine()
        self._proc = _Process(marked=True)
        report.process_starts.append(t if t is not None else report.last_t or 0.0)
        if self._stretch.first_t is None and not self._stretch.diffs:
            report.stretches.remove(self._stretch)  # nothing happened under it
        self._stretch = self._new_stretch(None)

    def _restart_seen(self, rec: Recorded, conn_id: int) -> None:
        """A recording without start lines: connection ids went back, which they
        do only when a new process numbers its connections from 1 again."""
        self.report.restarts_guessed += 1
        self.report.warnings.append(
            f"{rec.file}:{rec.line}: connection ids went back ({self._proc.highest_id} -> {conn_id}): taken for a "
            "restart of loopwatch (the recording has no start lines), replayed from here with a fresh engine"
        )
        self._start(rec.event.t)
        self._proc.marked = False

    def _config(self, line: ConfigLine) -> None:
        report = self.report
        if line.shared == "redis":
            report.unrecorded.add("shared")
        if line.health_check:
            report.unrecorded.add("health_check")
        stretch = self._stretch
        if not line.reload:
            if stretch.digests is None:  # the process's own, from its start
                stretch.digests = line.digests
                stretch.matches = line.digests == report.digests
            return
        if stretch.digests == line.digests:
            return  # nothing the engine decides by changed
        # As the recorder saw it, against the configuration before (which this
        # stretch may not know: its process started before the recording).
        changed = tuple(s for s in ENGINE_SECTIONS if s in line.changed) or tuple(
            s for s in ENGINE_SECTIONS if stretch.digests is not None and stretch.digests.get(s) != line.digests.get(s)
        )
        report.reloads.append(Reload(line.t if line.t is not None else report.last_t or 0.0, changed))
        self._stretch = self._new_stretch(line.digests)

    def _lever(self, lever: LeverLine) -> None:
        """Applied where the live engine took it: an input, not configuration."""
        report, engine, t = self.report, self.engine, lever.t
        self._assumed_until(t)
        self._wake_until(t)
        if lever.kind == "cooldown":
            engine.force_cooldown(lever.key, lever.duration, t)
            what = "operator cooldown"
        elif lever.kind == "release":
            engine.release(lever.key, t)
            what = "operator release" if lever.origin == "admin" else "release from another replica"
        elif lever.kind == "breaker_reset":
            engine.reset_breaker(lever.breaker, t, lever.route)
            what = "operator breaker reset"
        else:
            assert lever.cooldown is not None
            engine.adopt_cooldown(lever.cooldown, t)
            what = "cooldown from the shared store" if lever.origin == "redis" else "cooldown from another replica"
        report.levers[what] += 1
        if lever.key:
            report.client(lever.key).outside[what] += 1

    # --- events ----------------------------------------------------------------------

    def _event(self, rec: Recorded, following: Item | None) -> None:
        report, event = self.report, rec.event
        if report.first_t is None:
            report.first_t = event.t
        if report.first_wall is None and rec.wall is not None:
            report.first_wall = rec.wall - (event.t - report.first_t)
        self._restart_check(rec)
        self._assumed_until(event.t)
        # Refused at once by the live data plane: its Rejected follows the attempt
        # (the brain shows it with the judgement; a later one is a late refusal).
        table: str | None = None
        if (
            isinstance(event, ev.Attempt)
            and isinstance(following, Recorded)
            and isinstance(following.event, ev.Rejected)
            and following.event.key == event.key
            and following.event.t == event.t
            and (rec.conn_id is None or following.conn_id is None or rec.conn_id == following.conn_id)
        ):
            table = following.event.reason
        self._stretch.saw(event.t)
        self._feed(rec, table)
        report.last_t = max(report.last_t or event.t, event.t)

    def _restart_check(self, rec: Recorded) -> None:
        if self._proc.marked:
            return  # a start line says where each process begins
        event = rec.event
        conn_id = event.conn_id if isinstance(event, ev.Opened) else rec.conn_id if isinstance(event, ev.Attempt) else None
        if type(conn_id) is not int:
            return
        highest = self._proc.highest_id
        # Ids grow in accept order; an attempt slow to open comes a little behind,
        # never back to half of them, and no id opens twice in one process.
        if highest and conn_id < highest and (
            conn_id <= highest // 2 or (isinstance(event, ev.Opened) and (event.key, conn_id) in self._proc.conns)
        ):
            self._restart_seen(rec, conn_id)
        self._proc.highest_id = max(self._proc.highest_id, conn_id)

    def _assumed_until(self, t: float) -> None:
        assumed = self._proc.assumed
        while assumed and assumed[0].t <= t:
            self._feed_assumed(heapq.heappop(assumed).event)

    def _wake_until(self, t: float) -> None:
        """Wake the engine at each due time up to `t`, as the proxy's timer would."""
        engine = self.engine
        for _ in range(_MAX_WAKES_PER_EVENT):
            due = engine.next_wake
            if due is None or due > t:
                return
            self._collect(engine.wake(due), "wake")
            after = engine.next_wake
            if after is not None and after <= due:
                break  # no progress at this instant: let the event's own time move it on
        self._collect(engine.wake(t), "wake")

    def _seen(self, key: str) -> None:
        """A client counted, with no report of its own until it matters."""
        report = self.report
        if key not in report.clients and key not in report.quiet:
            report.quiet[key] = 0

    def _feed(self, rec: Recorded, table: str | None) -> None:
        report, engine, event = self.report, self.engine, rec.event
        self._wake_until(event.t)
        key = event.key
        if isinstance(event, ev.Rejected):
            report.skipped_rejected += 1
            report.client(key).live_refused[event.reason] += 1
            self._late_rejected(rec)
            return
        if isinstance(event, ev.Answered):
            # A held refusal's end (policy.hold). It belongs to an attempt both the
            # live engine and this one refused; where this one admitted it, the
            # attempt's outcome is assumed instead and the hold never happened.
            if self._proc.held.take(key, rec.conn_id) is not None:
                report.events += 1
                self._collect(engine.answered(event), "answered")
            return
        report.events += 1
        if isinstance(event, ev.Attempt):
            self._attempt(rec, event, table)
            return
        self._seen(key)
        if self._keep(rec):
            self._collect(engine.record(event), "record")

    def _feed_assumed(self, event: ev.Event) -> None:
        self._wake_until(event.t)
        self.report.events += 1
        self._collect(self.engine.record(event), "record")  # type: ignore[arg-type]  # assumed outcomes only

    def _attempt(self, rec: Recorded, event: ev.Attempt, table: str | None) -> None:
        """`table`: the reason the live data plane refused it at once, if it did."""
        report, key, engine = self.report, event.key, self.engine
        live_refused = table is not None
        # With the configuration that ran, the table's refusal is an input, as it
        # was live (Engine.admit's `refused`): the table a batch ahead of the
        # engine refused an attempt the engine would have let through (a cooldown
        # released a moment before). With another configuration, the question
        # is what that one would decide.
        before = engine.table_refusals
        decision = engine.admit(event, table if self._stretch.matches else None)  # type: ignore[arg-type]  # the table's reasons are RejectReason values
        table_refused = engine.table_refusals > before
        if report.keep_decisions:
            report.decisions.append((event, decision))
        self._collect(decision.outcome, "admit")
        judged = decision.reason if isinstance(decision, Reject) else "admit"
        otherwise = rec.judged is not None and rec.judged != judged
        if otherwise:
            self._stretch.diffs.judged += 1
        refused = isinstance(decision, Reject)
        would = decision.would_reject if isinstance(decision, Admit) else None
        if not (refused or would or live_refused or otherwise or key in report.clients):
            report.quiet[key] = report.quiet.get(key, 0) + 1  # the common case: nothing to report of it
            self._proc.pending.add(key, rec.conn_id, _Pending(event, "feed", rec.judged))
            return
        client = report.client(key)
        client.attempts += 1
        client.judged_otherwise += otherwise
        if table_refused:
            report.table_refused += 1
            client.table_refused += 1
        if isinstance(decision, Reject):
            client.refused[decision.reason] += 1
            if live_refused:
                self._proc.held.add(key, rec.conn_id, event.t)  # may be answered later
                return
            # The data plane let it through. Where the live engine refused it too,
            # it did so too late to stop it (the table a batch behind): what
            # follows is what its client met, and the engine was not told of it.
            late = rec.judged is not None and rec.judged != "admit"
            self._proc.pending.add(key, rec.conn_id, _Pending(event, "late" if late else "drop", rec.judged))
            return
        client.admitted += 1
        if would is not None:
            client.would_refuse[would.reason] += 1
        if live_refused:
            self._assume_outcome(event)
        else:
            self._proc.pending.add(key, rec.conn_id, _Pending(event, "feed", rec.judged))

    def _late_rejected(self, rec: Recorded) -> None:
        """A refusal recorded apart from its attempt: the data plane admitted the
        attempt, then refused it after all (its recheck before the upstream, a
        close of its own), or its table refused one the engine had admitted (a
        split refusal). Found by the attempt's id (recordings that give one)."""
        pending = self._proc.pending.take_id(rec.conn_id)
        if pending is None:
            return  # refused with its attempt (handled there), or nothing to pair with
        attempt = pending.attempt
        if pending.fate == "feed" and pending.live_judged not in (None, "admit"):
            # Admitted here, refused live: what the backend would have said is
            # not known, so assumed as for a refusal at the attempt.
            self.report.client(attempt.key)
            self._assume_outcome(attempt, not_before=rec.event.t)
            return
        # Refused here too, or the live engine admitted it as this one did: as
        # live, nothing reached the backend and a held answer may follow.
        self._proc.held.add(attempt.key, rec.conn_id, attempt.t)

    def _keep(self, rec: Recorded) -> bool:
        """Whether a recorded outcome goes to the engine (as it went to the live
        one); also learns how this client's attempts end, for assumed outcomes."""
        event, proc = rec.event, self._proc
        key = event.key
        if isinstance(event, ev.Closed):
            conn = proc.conns.pop((key, event.conn_id), None)
            if conn is None:
                return True  # opened before the recording (or the process) began: as live
            if not conn.fed:
                return False
            if event.initiator != "proxy":
                template = self._template(key)
                template.failed, template.closed, template.attempt_t = None, event, conn.attempt_t
                template.opened_after = event.t - event.duration - conn.attempt_t
            return True
        # HandshakeFailed and Opened are the first outcome of an attempt.
        attempt_id = event.conn_id if isinstance(event, ev.Opened) else rec.conn_id
        pending = proc.pending.take(key, attempt_id)
        fed = pending is None or pending.fate == "feed"
        if pending is not None and pending.fate == "drop":
            self._stretch.diffs.dropped += 1  # counted once per attempt, at its first outcome
        elif pending is not None and pending.fate == "late":
            self.report.late_admitted += 1
            self.report.client(key).late_admitted += 1
        attempt_t = pending.attempt.t if pending is not None else event.t
        if isinstance(event, ev.Opened):
            proc.conns[(key, event.conn_id)] = _Conn(attempt_t, fed)
            if len(proc.conns) > MAX_OPEN:  # a close lost: forget the oldest
                del proc.conns[next(iter(proc.conns))]
        elif fed:
            assert isinstance(event, ev.HandshakeFailed)
            template = self._template(key)
            template.failed, template.closed, template.attempt_t = event, None, attempt_t
        return fed

    def _template(self, key: str) -> _Template:
        templates = self._templates
        template = templates.get(key)
        if template is None:
            template = templates[key] = _Template()
            if len(templates) > self._max_templates:
                templates.popitem(last=False)
        else:
            templates.move_to_end(key)
        return template

    def _assume_outcome(self, attempt: ev.Attempt, not_before: float | None = None) -> None:
        template = self._templates.get(attempt.key)
        t = attempt.t if not_before is None else max(attempt.t, not_before)
        diffs = self._stretch.diffs
        if template is not None and template.failed is not None:
            f = template.failed
            self._push(ev.HandshakeFailed(f.key, attempt.route, t + (f.t - template.attempt_t), f.status, f.error))
        elif template is not None and template.closed is not None and template.opened_after is not None:
            c = template.closed
            conn_id = f"assumed-{next(self._synthetic)}"
            opened = t + max(template.opened_after, 0.0)
            self._push(ev.Opened(c.key, attempt.route, opened, conn_id))
            self._push(
                ev.Closed(c.key, attempt.route, opened + c.duration, conn_id, c.code, c.reason, c.initiator, c.duration)
            )
        else:
            diffs.unknown += 1
            return
        diffs.assumed += 1

    def _push(self, event: ev.Event) -> None:
        heapq.heappush(self._proc.assumed, _Assumed(event.t, next(self._seq), event))

    def _collect(self, outcome: Outcome, source: str) -> None:
        if not outcome:
            return
        report = self.report
        for finding in outcome.raised:
            report.raised.append(Raised(finding, source))
            report.client(finding.key).findings.append(finding)
        report.cleared.extend(outcome.cleared)
        for action in outcome.actions:
            if isinstance(action, CooldownStarted):
                report.client(action.key).cooldowns.append(action)
            elif isinstance(action, BreakerTransition):
                report.breakers.append(action)
            elif isinstance(action, CloseConnection):
                report.client(action.key).closed_by_policy += 1
            elif isinstance(action, WouldReject):
                pass  # counted from the Admit's would_reject, once per attempt


def replay(
    paths: Sequence[str],
    settings: Any,
    *,
    config: str | None = None,
    environment: Sequence[str] = (),
    seed: int = 0,
    keep_decisions: bool = False,
) -> ReplayReport:
    """Replay the events in `paths` (oldest first; `-` is standard input) with
    `settings` (proxy.config.Settings), read from `config` and the `environment`
    variables named (for the report)."""
    report = ReplayReport(
        list(paths), config, settings.policy.mode, list(environment), digests=section_digests(settings),
        keep_decisions=keep_decisions,
    )  # fmt: skip
    return Replayer(settings, report, seed).run(read_events(paths, report))


# --- output ---------------------------------------------------------------------------


def _evidence_text(evidence: dict[str, Any], limit: int = 90) -> str:
    parts = []
    for k, v in evidence.items():
        if v is None or k in ("first_seen", "last_seen"):
            continue
        if isinstance(v, float):
            v = round(v, 3)
        parts.append(f"{k}={json.dumps(v, separators=(',', ':'))}")
    text = " ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


_UNRECORDED = {
    "shared": "the live proxy shared state with other replicas (state.backend: redis): the events they sent fed "
    "its rules and are not in this recording (their cooldowns and releases are, and were applied)",
    "health_check": "the live proxy ran health checks (health_check.enabled): their results fed the upstream "
    "breakers and are not in this recording",
}


def summary(report: ReplayReport) -> list[str]:
    """The report's lines before its tables: what was replayed, and why the
    replay may differ from the live proxy, each cause on its own line; only
    differences that are this configuration's say so."""
    span = 0.0 if report.first_t is None else (report.last_t or 0.0) - report.first_t
    start = report.wall(report.first_t) if report.first_t is not None else None
    lines = [
        f"replayed {report.events} events ({report.skipped_rejected} recorded refusals skipped) "
        f"from {', '.join(_STDIN_NAME if f == STDIN else f for f in report.files)} — {span:.1f}s of traffic"
        + (f" from {start}" if start else "")
        + f", {report.client_count} clients, config {report.config_label}, mode {report.mode}"
    ]
    lines += [str(c) for c in report.corrupt]
    lines += [f"warning: {w}" for w in report.warnings]
    if report.process_starts:
        n = len(report.process_starts)
        at = ", ".join(f"{report.at(t):+.2f}s" for t in report.process_starts[:5]) + (" …" if n > 5 else "")
        guessed = report.restarts_guessed
        lines.append(
            f"{n} process start{'s' if n > 1 else ''} ({at}"
            + (f"; {guessed} seen from connection ids going back" if guessed else "")
            + "): each replayed from a fresh engine, as the live process started with one"
        )
    if report.levers:
        lines.append(f"applied where the live engine took them (not traffic): {_counts(report.levers)}")
    blame = report.differences()
    if report.reloads:
        lines.append(_reloads_text(report, blame["other_config"]))
    lines += [_UNRECORDED[u] for u in sorted(report.unrecorded)]
    if report.late_admitted:
        lines.append(
            f"{report.late_admitted} attempt(s) judged refused (live and here) were let through by the data plane "
            "before the judgement reached it: their recorded outcomes are what the clients met, kept from the "
            "engine as live (not a difference)"
        )
    if report.table_refused:
        lines.append(
            f"{report.table_refused} attempt(s) refused live by the data plane's table that this engine would have "
            "let through: taken as refused, as the live engine takes the table's refusals (the table a batch "
            "ahead of it: a cooldown released, a connection closed)"
        )
    if blame["live_config"]:
        lines.append(
            f"where the live proxy ran this very configuration: {blame['live_config'].text()}; not this "
            "configuration's doing, but of an input the recording lacks (events lost, other replicas' events, "
            "health checks) or of an earlier difference"
        )
    if blame["config"]:
        lines.append(f"this configuration decided differently from the live proxy: {blame['config'].text()}")
    return lines


def _reloads_text(report: ReplayReport, there: Differences) -> str:
    reloads = report.reloads
    n = len(reloads)
    when = ", ".join(f"+{report.at(r.t):.1f}s ({', '.join(r.changed)} changed)" for r in reloads[:5])
    text = f"the recording spans {n} reload{'s' if n > 1 else ''} at {when}" + (" …" if n > 5 else "")
    ran = [s for s in report.stretches if s.matches]
    known = [s for s in report.stretches if s.digests is not None]
    if not ran:
        return text + (": this configuration is none of those that ran live" if known else "")
    other = [s for s in report.stretches if not s.matches and s.first_t is not None]
    if not other:
        return text + ": this configuration ran live throughout"
    if n == 1:
        before = [s for s in other if (s.last_t or 0.0) <= reloads[0].t]
        side = "before" if len(before) == len(other) else "after" if not before else "before and after"
        text += f": decisions {side} it were made live with another configuration"
    else:
        spans = ", ".join(f"+{report.at(s.first_t or 0.0):.1f}s to +{report.at(s.last_t or 0.0):.1f}s" for s in other[:5])
        text += f": decisions from {spans} were made live with another configuration"
    if there:
        text += f", and differ there, not by this configuration: {there.text()}"
    return text


def print_report(report: ReplayReport, out: IO[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    out = out or sys.stdout
    # Keys are what clients wrote: never read as markup (a key "x[/]y" crashed
    # the report, "[link=…]" showed another key, linked to the client's URL).
    console = Console(file=out, width=None if out.isatty() else 160, markup=False, highlight=False, emoji=False)

    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    for line in summary(report):
        say(line)
    flagged = report.flagged
    if not flagged:
        say("no client would be flagged")
    else:
        table = Table(title=f"{len(flagged)} client(s) would be flagged")
        for col in ("client", "when", "rule", "severity", "evidence"):
            table.add_column(col, overflow="fold")
        for client in flagged:
            for f in client.findings:
                when = f"+{report.at(f.t):.2f}s"
                wall = report.wall(f.t)
                table.add_row(
                    client.key, when + (f" ({wall})" if wall else ""), f.rule, f.severity,
                    _evidence_text(dict(f.evidence)),
                )
        console.print(table)
    # Flagged clients, then those refused without a finding (an operator's
    # cooldown, another replica's): the probe's manually cooled client was
    # in no table at all.
    shown = flagged + report.affected
    if shown:
        enforcement = Table(title=f"what enforcement would have done ({report.mode} mode)")
        for col in ("client", "attempts", "let through", "enforcement", "refused live"):
            enforcement.add_column(col, overflow="fold")
        for client in shown:
            enforcement.add_row(
                client.key, str(client.attempts), str(client.admitted), client.enforcement(),
                _counts(client.live_refused) or "-",
            )
        console.print(enforcement)
    for b in report.breakers:
        say(f"breaker {b.name} of route {b.route}: {b.from_state} → {b.to_state} at +{report.at(b.t):.2f}s")


def engine_variables(env: Mapping[str, str]) -> list[str]:
    """The LOOPWATCH_* variables that change the replay's configuration, as
    load_settings applies them (environment over file): named in the report,
    since inside loopwatch's container they would otherwise change a candidate
    config in silence."""
    from ..app.settings import ENV_PREFIX, ENV_SEPARATOR, ignored_service_links

    links = set(ignored_service_links(env))
    return sorted(
        name for name in env
        if name.startswith(ENV_PREFIX) and name not in links
        and name[len(ENV_PREFIX):].lower().split(ENV_SEPARATOR)[0] in ENGINE_SECTIONS
    )


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


def replay_main(paths: Sequence[str], config: str | None, as_json: bool, seed: int = 0) -> int:
    """`loopwatch replay`: 0 (bad lines are reported, not fatal); 2 when a file or the config cannot be read."""
    from ..app.settings import ConfigError, load_settings

    try:
        settings = load_settings(config, env=os.environ)
    except ConfigError as e:
        print(f"loopwatch replay: invalid configuration:\n{e}", file=sys.stderr)
        return 2
    environment = engine_variables(os.environ)
    problem = unreadable(paths)
    if problem is not None:
        print(f"loopwatch replay: {problem}", file=sys.stderr)
        return 2
    try:
        report = replay(paths, settings, config=config, environment=environment, seed=seed)
    except OSError as e:
        print(f"loopwatch replay: cannot read: {e}", file=sys.stderr)
        return 2
    if as_json:
        json.dump(report.to_dict(), sys.stdout, indent=2, default=str)
        print()
    else:
        print_report(report)
    for c in report.corrupt:  # on stderr too, so a --json consumer still hears of them
        print(f"loopwatch replay: {c}", file=sys.stderr)
    return 0
