"""Recording: every engine event as one JSON line, for `loopwatch replay`.

The recorder is an observer. It sees exactly what the engine is fed — each
`Connection` (before admission), the `Rejected` the engine records when it
refuses one, and every `HandshakeFailed`, `Opened` and `Closed` — in the order
the engine saw them, and appends each as ``detectors.events.to_dict`` plus a
``wall`` field (Unix time, so a person can tell when; the engine's ``t`` is
the proxy's monotonic clock and is what replay uses).

Writing never happens on the event loop: hooks only append a line to an
in-memory buffer, and a writer task hands the buffer to a thread every
``FLUSH_INTERVAL`` (sooner when it grows large). The buffer is bounded: past
``MAX_PENDING`` lines new events are dropped and counted, so a stalled disk
slows nothing and grows nothing. Files are bounded too: when the next batch
would take the file past ``record.max_bytes`` it is rotated to ``PATH.1``
(``PATH.1`` to ``PATH.2`` …, keeping ``record.rotate`` of them); with
``rotate: 0`` the full file is simply started over.

A write that fails (a full disk) is taken back to the last whole line, so
the file never holds half a record and never passes ``max_bytes``; its lines
are counted as lost (``loopwatch_record_events_dropped_total{reason=
"write_error"}``), and the outage is logged when it starts
(``record_write_failed``) and when writing works again (``record_write_resumed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ...detectors import events as ev
from .observers import Observer, Observers

if TYPE_CHECKING:
    from ...detectors.decisions import Admit, Reject
    from ..app.settings import Settings
    from ..dataplane.boundary import Connection, RelayStats

from .settings import RecordSettings

log = logging.getLogger("loopwatch.recorder")

FLUSH_INTERVAL = 0.5  # seconds between writes; a crash loses at most this much
FLUSH_LINES = 5_000  # a burst this large is written without waiting for the interval
MAX_PENDING = 200_000  # lines buffered while the disk is slow; beyond, events are dropped


def _open_regular(path: str, truncate: bool = False) -> io.FileIO:
    """`path` opened to append (`truncate`: emptied first), if it is a regular
    file (or new). Without a reader a FIFO's open waits, and start-up hung
    there, SIGTERM unheard; with one, writes would wait on it. Non-blocking
    open, then the type checked. Always O_APPEND: after logrotate's
    copytruncate empties the file, writes go to its new end, not to where the
    last one ended (a run of zero bytes before the next line)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_TRUNC if truncate else 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ENXIO:  # a FIFO without a reader
            raise OSError(errno.EINVAL, "not a regular file", path) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", path)
    os.set_blocking(fd, True)
    return open(fd, "ab", buffering=0)  # noqa: SIM115 - held open for the recorder's life


class EventFile:
    """The file side, used from one writer thread at a time (the lock makes the
    final synchronous flush at shutdown safe against a write still running)."""

    def __init__(self, path: str, max_bytes: int, rotate: int):
        self.path = path
        self.max_bytes = max_bytes
        self.rotate_count = rotate
        self.rotations = 0
        self._lock = threading.Lock()
        # Opened at start-up, so a bad path fails `loopwatch run` at once, not silently later.
        # Unbuffered: a failed write leaves nothing behind in a buffer to come out later.
        self._file = _open_regular(path)
        self.size = os.fstat(self._file.fileno()).st_size

    def write(self, lines: Iterable[bytes]) -> int:
        """Append lines (each ending in a newline), rotating as needed; bytes written."""
        written = 0
        with self._lock:
            if self._file.closed:
                return 0
            # As it is on disk: emptied by logrotate's copytruncate since, say.
            self.size = os.fstat(self._file.fileno()).st_size
            chunk: list[bytes] = []
            chunk_size = 0
            for line in lines:
                if self.size + chunk_size + len(line) > self.max_bytes and self.size + chunk_size > 0:
                    written += self._append(chunk, chunk_size)
                    chunk, chunk_size = [], 0
                    self._rotate()
                chunk.append(line)
                chunk_size += len(line)
            written += self._append(chunk, chunk_size)
        return written

    def _append(self, chunk: list[bytes], size: int) -> int:
        if not chunk:
            return 0
        data = memoryview(b"".join(chunk))
        try:
            while data:
                data = data[self._file.write(data) or 0 :]
        except OSError:
            # Back to the last whole line: the next batch must not start inside
            # a torn one (replay would lose both), nor the file pass max_bytes.
            with contextlib.suppress(OSError):
                os.ftruncate(self._file.fileno(), self.size)
                self._file.seek(self.size)
            raise
        self.size += size
        return size

    def _rotate(self) -> None:
        """The full file becomes PATH.1 and a new one is started. The full one
        stays open until the new one is: a rotation that fails (a directory
        made read-only for a while) leaves the recorder writing where it was,
        and the next batch tries again. It used to close first, and one
        failure stopped the recorder for good. A PATH already moved away (by
        logrotate, say) is not an error: the new file takes its name."""
        if self.rotate_count > 0:
            for i in range(self.rotate_count - 1, 0, -1):
                older = f"{self.path}.{i}"
                if os.path.exists(older):
                    os.replace(older, f"{self.path}.{i + 1}")
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.path, f"{self.path}.1")
        self._replace(_open_regular(self.path, truncate=True))
        self.rotations += 1

    def _replace(self, new: io.FileIO) -> None:
        old, self._file = self._file, new
        self.size = os.fstat(new.fileno()).st_size
        old.close()

    def reopen(self) -> bool:
        """Start a new file at PATH if the open one is no longer there (moved
        away or deleted: logrotate's default `create` mode, then a SIGHUP), as
        nginx reopens its logs; whether it did."""
        with self._lock:
            if self._file.closed:
                return False
            try:
                on_disk = os.stat(self.path)
            except FileNotFoundError:
                on_disk = None
            held = os.fstat(self._file.fileno())
            if on_disk is not None and (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino):
                return False
            self._replace(_open_regular(self.path))
            return True

    def close(self) -> None:
        with self._lock:
            self._file.close()


class Recorder(Observer):
    """Appends every engine event to ``record.path`` as one JSON line."""

    name = "recorder"

    def __init__(self, settings: RecordSettings, *, flush_interval: float = FLUSH_INTERVAL):
        assert settings.path is not None
        self.file = EventFile(settings.path, settings.max_bytes, settings.rotate)
        self.flush_interval = flush_interval
        self.recorded = 0
        self.dropped = 0  # buffer full: the disk could not keep up
        self.lost = 0  # lines of batches whose write failed (a full disk)
        self.write_errors = 0
        self.failing = False  # the last write failed: an outage under way
        self._pending: list[bytes] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # --- observer hooks: the engine's inputs, in its order --------------------

    def on_attempt(self, conn: Connection, event: ev.Attempt, decision: Admit | Reject) -> None:
        self._add(event)

    def on_rejected(self, conn: Connection, event: ev.Rejected) -> None:
        self._add(event)

    def on_handshake_failed(self, conn: Connection, event: ev.HandshakeFailed) -> None:
        self._add(event)

    def on_opened(self, conn: Connection, event: ev.Opened) -> None:
        self._add(event)

    def on_closed(self, conn: Connection, event: ev.Closed, stats: RelayStats) -> None:
        self._add(event)

    def on_answered(self, conn: Connection, event: ev.Answered) -> None:
        self._add(event)

    def on_config(self, settings: Settings, info: dict[str, object]) -> None:
        """At a reload (SIGHUP), a file moved away is followed by a new one at
        `record.path`: logrotate's `create` mode with `postrotate kill -HUP`."""
        if info.get("reload") and info.get("result") == "ok" and not self._closed:
            try:
                if self.file.reopen():
                    log.info("record_reopened", extra={"fields": {"path": self.file.path}})
            except OSError as e:
                log.error("record_write_failed", extra={"fields": {"path": self.file.path, "error": str(e)}})

    # --- buffering -------------------------------------------------------------

    def _add(self, event: ev.Event) -> None:
        if self._closed:
            return
        if len(self._pending) >= MAX_PENDING:
            self.dropped += 1
            return
        record: dict[str, Any] = ev.to_dict(event)
        record["wall"] = round(time.time(), 6)
        self._pending.append(
            (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        )
        self.recorded += 1
        if self._task is None:
            self._start()
        elif len(self._pending) >= FLUSH_LINES and self._wakeup is not None:
            self._wakeup.set()

    def _start(self) -> None:
        # Started by the first event, so the recorder needs no start-up hook and
        # is always created inside the running loop it writes from.
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._writer(), name="loopwatch-recorder")

    async def _writer(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self.flush_interval)
            self._wakeup.clear()
            await self._flush(loop)

    async def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        try:
            await loop.run_in_executor(None, self.file.write, batch)
        except OSError as e:
            self.write_errors += 1
            self.lost += len(batch)  # at most: lines before a rotation in it may have been written
            if not self.failing:  # once an outage: a full disk must not flood the log
                self.failing = True
                log.error("record_write_failed", extra={"fields": {"path": self.file.path, "error": str(e)}})
            return
        if self.failing:
            self.failing = False
            log.warning("record_write_resumed", extra={"fields": {"path": self.file.path, "lost": self.lost}})

    async def aclose(self) -> None:
        """Write what is buffered and close the file."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._flush(asyncio.get_running_loop())
        self.file.close()

    def stats(self) -> dict[str, int]:
        return {
            "recorded": self.recorded,
            "dropped": self.dropped,
            "write_errors": self.write_errors,
            "rotations": self.file.rotations,
            "pending": len(self._pending),
        }


async def close_recorders(observers: Observers) -> None:
    """Flush and close every recorder among `observers` (at shutdown)."""
    for observer in observers.observers:
        if isinstance(observer, Recorder):
            await observer.aclose()
