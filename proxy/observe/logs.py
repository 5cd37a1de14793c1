"""Log lines: one JSON object per line on stderr (or plain text for humans).

Call sites log an `event` name plus fields:
    log.info("finding", extra={"fields": {"client": key, "rule": rule}})
and the formatter writes {"ts": …, "level": …, "event": …, "client": …, …}.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import sys
import threading
import time
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


def _text_value(value: object) -> str:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str, ensure_ascii=True, separators=(",", ":"))
    text = str(value)
    if text and text.isascii() and text.isprintable() and not any(c in text for c in ' ="\\'):
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
        self.dropped = 0
        self._reported = 0
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
            if self.dropped != self._reported:
                missed, self._reported = self.dropped - self._reported, self.dropped
                self._write(self._dropped_line(missed))
            self._write(line)
            self.written += 1

    def _dropped_line(self, missed: int) -> str:
        """The `log_lines_dropped` line, in the format of every other line."""
        record = logging.LogRecord("loopwatch", logging.WARNING, __file__, 0, "log_lines_dropped", None, None)
        record.fields = {"count": missed}
        try:
            return self.format(record) + "\n"
        except Exception:  # a formatter that fails: the count still said
            return f"log_lines_dropped count={missed}\n"

    def _write(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):  # a closed stderr: nothing to tell
            if self.fd is None:
                self.stream.write(text)
                self.stream.flush()
                return
            data = text.encode("utf-8", "backslashreplace")
            while data:
                data = data[os.write(self.fd, data) :]

    def flush(self, timeout: float = 1.0) -> None:
        """Wait a little for the queued lines to be written (at exit), not for a
        reader that is gone."""
        deadline = time.monotonic() + timeout
        while self.written < self.queued and time.monotonic() < deadline:
            time.sleep(0.005)


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
