"""Log lines: one JSON object per line on stderr (or plain text for humans).

Call sites log an `event` name plus fields:
    log.info("finding", extra={"fields": {"client": key, "rule": rule}})
and the formatter writes {"ts": …, "level": …, "event": …, "client": …, …}.

How many lines get written is bounded twice: `LineBudget` caps the lines a
kind of event may write a second (lines clients cause, so clients cannot flood
the log), `LogWriter` the lines waiting for a slow reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import queue
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        # Every character outside printable ASCII escaped: values come from clients,
        # and C1 controls, U+2028 or a right-to-left override left raw act on the
        # terminal or the viewer of whoever reads the line.
        return json.dumps(line, default=str, ensure_ascii=True)


class TextFormatter(logging.Formatter):
    """`key=value` lines for people, logfmt-style: a value that is not plain
    printable ASCII without spaces, `=` or quotes is quoted and escaped as in
    JSON. Values come from clients (keys, close reasons, paths): written raw, a
    close reason with CR LF forged a log line, and one with escape sequences
    cleared the screen of whoever tailed the log; a key with spaces forged
    fields. (nginx escapes such bytes as \\xNN.)"""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None) or {}
        extra = " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        base = f"{self.formatTime(record)} {record.levelname.lower():7} {_text_value(record.getMessage())}"
        if record.exc_info:  # loopwatch's own traceback: lines of its own, meant to be read
            extra += "\n" + self.formatException(record.exc_info)
        return f"{base} {extra}".rstrip()


_LITERALS = frozenset({"null", "true", "false"})


def _text_value(value: object) -> str:
    if isinstance(value, (dict, list, tuple, bool)) or value is None:  # true/null as the JSON lines say
        return json.dumps(value, default=str, ensure_ascii=True, separators=(",", ":"))
    text = str(value)
    # Bare only what cannot read as another value: a client key "null" was
    # `client=null`, no client at all.
    if (
        text and text.isascii() and text.isprintable() and not any(c in text for c in ' ="\\')
        and text not in _LITERALS and text[0] not in "[{"
    ):
        return text
    return json.dumps(text, ensure_ascii=True)


MAX_QUEUED_LINES = 10_000  # lines waiting for a slow reader of stderr; beyond, dropped


class LogWriter(logging.Handler):
    """Log lines to a stream from a thread of their own, through a bounded queue.

    Written synchronously, a stderr whose reader stalls (a full pipe nobody
    reads, a stuck log shipper) blocked the event loop in write(): detection
    stopped (a loop refused after 3 attempts got 60 through), the admin port
    and /metrics stopped answering, SIGTERM went unheard. Now a line is
    formatted where it is logged and queued; a full queue drops it, and the
    count is in `loopwatch_log_lines_dropped_total` and in a line written
    once the reader is back. The thread writes with os.write on the stream's
    descriptor, holding no lock the interpreter needs at exit (a daemon
    thread stuck in a write is left behind)."""

    def __init__(self, stream: IO[str], max_queued: int = MAX_QUEUED_LINES) -> None:
        super().__init__()
        self.stream = stream
        try:
            self.fd: int | None = stream.fileno()
        except (AttributeError, OSError, ValueError):
            self.fd = None  # a stream without a descriptor (a test's capture): written as it is
        self.lines: queue.Queue[str] = queue.Queue(max_queued)
        self.queued = self.written = 0  # lines taken and lines written (or given up on)
        self.dropped = 0  # the queue was full (by emit, on the logging threads)
        self.failed = 0  # their write failed (by the writing thread): a full disk
        self._said = {"queue_full": 0, "write_error": 0}  # of each, the lines a log_lines_dropped line said
        self._torn = False  # the last write stopped inside a line
        self._thread = threading.Thread(target=self._write_lines, name="loopwatch-log", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        try:
            self.lines.put_nowait(line)
        except queue.Full:
            self.dropped += 1
        else:
            self.queued += 1

    def _write_lines(self) -> None:
        while True:
            line = self.lines.get()
            for reason, lost in (("queue_full", self.dropped), ("write_error", self.failed)):
                if lost != self._said[reason] and self._report(lost - self._said[reason], reason):
                    self._said[reason] = lost
            if not self._write(line):
                self.failed += 1
            self.written += 1

    def _report(self, missed: int, reason: str) -> bool:
        """A `log_lines_dropped` line, in the format of every other line;
        whether it was written (if not, its lines stay owed)."""
        record = logging.LogRecord("loopwatch", logging.WARNING, __file__, 0, "log_lines_dropped", None, None)
        record.fields = {"count": missed, "reason": reason}
        try:
            text = self.format(record) + "\n"
        except Exception:  # a formatter that fails: the count still said
            text = f"log_lines_dropped count={missed} reason={reason}\n"
        return self._write(text)

    def _write(self, text: str) -> bool:
        """Whether the line was written. A stream that fails (a full disk) is
        counted by the caller; after a line torn by it, the next begins on a
        line of its own (glued to the torn one, both were lost to a reader of
        JSON lines)."""
        if self.fd is None:
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):  # ValueError: a closed stream
                return False
            return True
        data = text.encode("utf-8", "backslashreplace")
        if self._torn:
            data = b"\n" + data
        whole = len(data)
        try:
            while data:
                data = data[os.write(self.fd, data) :]
        except OSError:
            self._torn = self._torn or len(data) != whole
            return False
        self._torn = False
        return True

    def flush(self, timeout: float = 1.0) -> None:
        """Wait a little for the queued lines to be written (at exit), not for a
        reader that is gone."""
        deadline = time.monotonic() + timeout
        while self.written < self.queued and time.monotonic() < deadline:
            time.sleep(0.005)


# --- a budget for lines clients cause ---------------------------------------------

# A budget holds this many seconds' worth of lines: an incident's burst (50
# looping tabs raising findings together) is written whole, a flood is not.
BURST_SECONDS = 10.0
# At most one `log_lines_suppressed` line per name this often; a spell of lines
# left out is reported at most this long after its first one.
REPORT_INTERVAL = 5.0
# What of a name's budget one party may use: one address's flood (minting
# identities) leaves half to everybody else, and its share (100 lines at the
# default 20 a second) still holds a looping office NAT's 50 tabs.
PARTY_SHARE = 0.5
# Parties whose shares are held: an address that comes back after this many
# others starts with a full share again.
MAX_PARTIES = 4096


class TokenBucket:
    """`rate` tokens a second, at most `burst` held; starts full. Time is the
    caller's `now` (seconds: the engine's time of the event), not a clock read
    per line."""

    __slots__ = ("rate", "burst", "tokens", "last")

    def __init__(self, rate: float, burst: float):
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last: float | None = None

    def take(self, now: float) -> bool:
        """Take one token if there is one."""
        if self.ready(now):
            self.tokens -= 1.0
            return True
        return False

    def ready(self, now: float) -> bool:
        """Whether there is a token to take (refilled to `now`, none taken)."""
        if self.last is None:
            self.last = now
        elif now > self.last:  # a clock that steps back refills nothing
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
        return self.tokens >= 1.0

    def retune(self, rate: float, burst: float) -> None:
        """A new rate and burst, keeping what is held (up to the new burst): a
        reload is no way to refill."""
        self.rate, self.burst = rate, burst
        self.tokens = min(self.tokens, burst)


def burst_of(per_second: float) -> float:
    return max(1.0, per_second * BURST_SECONDS)


@dataclass(slots=True)
class Suppressed:
    """One line name's lines left out and not yet reported."""

    count: int = 0
    # When its last `log_lines_suppressed` line was written: on the event loop's
    # clock when one runs (the spacing is for a reader, in real time, and the
    # timers run on it), else on the callers' (offline, there is no other).
    reported_at: float = -math.inf
    timer: asyncio.TimerHandle | None = None  # the report due while lines are left out


class LineBudget:
    """At most `per_second` lines a second per line name on average, bursts of
    BURST_SECONDS' worth (None: no limit), and of those at most a
    PARTY_SHARE to one party (a client's address, which the caller names):
    one address minting identities, or looping with many, leaves the rest of
    the budget to everybody else (nginx's limit_req per address beside its
    global zone). The lines left out are counted per
    name and reported in a `log_lines_suppressed` line (`line`, `count`,
    `per_second`) on `logger`: before the next line of that name the budget
    admits, and, on an event loop, REPORT_INTERVAL after the first one left out
    without waiting for that; never two for one name within REPORT_INTERVAL.
    Bounded by the names its callers use and MAX_PARTIES parties (the least
    recently seen forgotten: it starts afresh with a full share)."""

    def __init__(self, logger: logging.Logger, per_second: float | None = None):
        self.logger = logger
        self.per_second = per_second
        self._buckets: dict[str, TokenBucket] = {}
        self._shares: OrderedDict[tuple[str, str], TokenBucket] = OrderedDict()
        self._suppressed: dict[str, Suppressed] = {}

    def configure(self, per_second: float | None) -> None:
        """A new limit (a reload): the counts not yet reported stay."""
        self.per_second = per_second
        if per_second is None:
            self._buckets.clear()
            self._shares.clear()
            return
        for bucket in self._buckets.values():
            bucket.retune(per_second, burst_of(per_second))
        share = per_second * PARTY_SHARE
        for bucket in self._shares.values():
            bucket.retune(share, burst_of(share))

    def admit(self, name: str, now: float, party: str | None = None) -> bool:
        """Whether to write this line of `name`; `now` in the caller's seconds;
        `party`: whose line it is (None: nobody's share, only the name's)."""
        if self.per_second is None:
            admitted = True
        else:
            bucket = self._buckets.get(name)
            if bucket is None:
                bucket = self._buckets[name] = TokenBucket(self.per_second, burst_of(self.per_second))
            # The party's share first: a line over it takes nothing from the
            # others'; and a line the name's budget refuses takes nothing from it.
            share = None if party is None else self._share(name, party)
            admitted = (share is None or share.ready(now)) and bucket.take(now)
            if admitted and share is not None:
                share.take(now)
        spell = self._suppressed.get(name)
        if admitted:
            if spell is not None and spell.count:
                loop = _running_loop()
                at = loop.time() if loop is not None else now
                if at - spell.reported_at >= REPORT_INTERVAL:
                    self._report(name, spell, at)
            return True
        if spell is None:
            spell = self._suppressed[name] = Suppressed()
        spell.count += 1
        if spell.timer is None:
            # Lines that stop being written for good are reported all the same.
            loop = _running_loop()
            if loop is not None:
                spell.timer = loop.call_later(REPORT_INTERVAL, self._report_due, name)
        return False

    def _share(self, name: str, party: str) -> TokenBucket:
        assert self.per_second is not None
        shares = self._shares
        bucket = shares.get((name, party))
        if bucket is None:
            if len(shares) >= MAX_PARTIES:
                shares.popitem(last=False)
            share = self.per_second * PARTY_SHARE
            bucket = shares[(name, party)] = TokenBucket(share, burst_of(share))
        else:
            shares.move_to_end((name, party))
        return bucket

    def pending(self, name: str) -> int:
        """Lines of `name` left out and not yet reported."""
        spell = self._suppressed.get(name)
        return 0 if spell is None else spell.count

    def flush(self) -> None:
        """Report every count now (at exit: a count is never lost)."""
        loop = _running_loop()
        for name, spell in self._suppressed.items():
            if spell.count:
                # Offline there is no clock to read, and no line after this one.
                self._report(name, spell, loop.time() if loop is not None else spell.reported_at)

    def _report_due(self, name: str) -> None:
        spell = self._suppressed[name]
        spell.timer = None
        if spell.count:
            self._report(name, spell, asyncio.get_running_loop().time())

    def _report(self, name: str, spell: Suppressed, at: float) -> None:
        if spell.timer is not None:
            spell.timer.cancel()
            spell.timer = None
        count, spell.count, spell.reported_at = spell.count, 0, at
        event(self.logger, "log_lines_suppressed", logging.WARNING, line=name, count=count,
              per_second=self.per_second)  # fmt: skip


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """This thread's running event loop; None where observers are called
    without one (offline tools, such as replay and simulate)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _timestamp(t: float) -> str:
    """A log line's `ts`: UTC, ISO 8601 with milliseconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


_writer: LogWriter | None = None


def log_writer() -> LogWriter | None:
    """The process's log writer, once `setup_logging` made it (for its drop count)."""
    return _writer


# Loggers of the OpenTelemetry API that log what clients send (their trace headers).
CLIENT_HEADER_LOGGERS = ("opentelemetry.trace.span", "opentelemetry.trace.propagation.tracecontext")


def setup_logging(level: str = "info", fmt: str = "json") -> None:
    global _writer
    if _writer is None or _writer.stream is not sys.stderr:
        _writer = LogWriter(sys.stderr)
    _writer.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [_writer]
    root.setLevel(level.upper())
    # aiohttp's access log duplicates ours and logs every admin scrape.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # The OpenTelemetry API warns at every malformed tracestate or traceparent
    # a client sends, with the client's text in the message (7 KB a line, per
    # connection, on the event loop): the header is dropped all the same, as
    # W3C Trace Context asks, and a client must not be able to write our log.
    for name in CLIENT_HEADER_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: object) -> None:
    """Log one structured event line."""
    if logger.isEnabledFor(level):
        logger.log(level, name, extra={"fields": fields})


@contextlib.contextmanager
def quieted(name: str = "loopwatch", level: int = logging.ERROR) -> Iterator[None]:
    """Logger `name` at `level` for the block, as before after it: `demo` and
    `simulate` keep loopwatch's lines off their tables, and run in-process in
    tests and embeddings, where a level left behind silenced the next one."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)
