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

Beside the events, what a replay needs to decide as the live engine did
(docs/tuning.md, "What is recorded"):

* each ``attempt`` carries its connection id (``conn_id``, also on
  ``rejected``, ``handshake_failed`` and ``answered``: one attempt's lines pair
  by it) and what the engine judged it (``judged``: ``admit`` or the refusal's
  reason). The data plane admits from its table, a batch behind the engine, so
  an attempt the engine judged refused may have reached the backend all the
  same (its ``opened``/``closed`` follow, and no ``rejected``): the engine kept
  its judgement, and a replay must too;
* a ``start`` line when the process opens the recorder (wall time, a random
  run id): a new process starts with an empty engine, and its connection ids
  start again at 1;
* a ``config`` line with a digest of each section the engine decides by
  (detection, policy, breakers), at start and at every reload that applied
  (``reload``, ``changed``): a replay can tell whether its configuration is
  the one that ran, and when it was not; and the one in force at the head of
  every new file (``continued``: a rotation, a file moved away, one
  copytruncate emptied), so a file read alone says it too;
* a ``lever`` line for each change that is no traffic (an operator's cooldown,
  release or breaker reset; a cooldown or release another replica sent),
  written where the engine took it, so a replay applies it there;
* a ``gap`` line where events were lost (the buffer was full, a write failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import queue
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from ...detectors import events as ev
from ...detectors.decisions import Reject
from .observers import Lever, Observer, Observers, reload_applied

if TYPE_CHECKING:
    from ...detectors.decisions import Admit
    from ..app.settings import Settings
    from ..dataplane.boundary import Connection, RelayStats

from .settings import RecordSettings

log = logging.getLogger("loopwatch.recorder")
T = TypeVar("T")

FLUSH_INTERVAL = 0.5  # seconds between writes; a crash loses at most this much
# At shutdown, how long the last batches may take to reach a disk: one that
# stalls (NFS, a frozen volume) must not hold the stop past the drain.
CLOSE_TIMEOUT = 5.0
FLUSH_LINES = 5_000  # a burst this large is written without waiting for the interval
MAX_PENDING = 200_000  # lines buffered while the disk is slow; beyond, events are dropped
CONFIG_PREFIX = b'{"type":"config",'  # how Recorder.on_config's lines begin
# The sections the engine decides by: a `config` line carries a digest of each.
ENGINE_SECTIONS = ("detection", "policy", "breakers")


def section_digests(settings: Settings) -> dict[str, str]:
    """A short digest of each of ENGINE_SECTIONS as loaded (defaults filled in,
    durations normalised): equal digests, the same engine configuration, however
    the files spelled it. Replay computes its own configuration's the same way."""
    out = {}
    for name in ENGINE_SECTIONS:
        text = json.dumps(getattr(settings, name).model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        out[name] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return out


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
        # The last config line written: each new file starts with it, marked
        # `continued`, so a file read alone (PATH after a rotation, a new one
        # after logrotate moved the last, or one copytruncate emptied) says
        # which configuration ran and that Redis or health checks fed the
        # engine. Owed from the new file's start until a write there succeeds.
        self._config: bytes | None = None
        self._head_owed = False

    def write(self, lines: Iterable[bytes]) -> int:
        """Append lines (each ending in a newline), rotating as needed; bytes written."""
        written = 0
        with self._lock:
            if self._file.closed:
                return 0
            # As it is on disk: emptied by logrotate's copytruncate since, say.
            on_disk = os.fstat(self._file.fileno()).st_size
            if on_disk < self.size:
                self._head_owed = True
            self.size = on_disk
            chunk = self._head()
            chunk_size = head_size = sum(map(len, chunk))
            for line in lines:
                # Full, and not only with the head it owes: a line too long for
                # an empty file goes in it all the same.
                if self.size + chunk_size + len(line) > self.max_bytes and self.size + chunk_size > head_size:
                    written += self._append(chunk, chunk_size)
                    self._rotate()
                    chunk = self._head()
                    chunk_size = head_size = sum(map(len, chunk))
                chunk.append(line)
                chunk_size += len(line)
                if line.startswith(CONFIG_PREFIX):
                    self._config = line
            written += self._append(chunk, chunk_size)
        return written

    def _head(self) -> list[bytes]:
        """The lines a new chunk starts with: the configuration in force, if
        this file still owes it."""
        if not self._head_owed or self._config is None:
            return []
        return [_encode({**json.loads(self._config), "reload": False, "changed": [], "continued": True})]

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
        self._head_owed = False  # the file has its head, or lines before any config line
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
        self._head_owed = True

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


class FileWorker:
    """One daemon thread that runs the recorder's file calls in order. Not the
    loop's default executor: its threads are joined at exit, and a write stuck
    on a stalled disk held the process's exit for as long as the stall."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Callable[[], Any]] | None] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._stopped = False

    def run(self, call: Callable[[], T]) -> asyncio.Future[T]:
        """`call()` in the thread, after the calls before it; its result or
        error (OSError once stopped: a batch still on its way when the close
        gave up on a stalled disk is lost, and counted so)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        if self._stopped:
            done.set_exception(OSError(errno.ECANCELED, "the recorder closed before this write"))
            return done
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="loopwatch-recorder-file", daemon=True)
            self._thread.start()
        self._jobs.put((loop, done, call))
        return done

    def stop(self) -> None:
        """The thread ends after the calls already given, and later calls
        fail (it was left waiting for ever, one per recorder made)."""
        self._stopped = True
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, done, call = job
            try:
                result, error = call(), None
            except Exception as e:
                result, error = None, e
            # A write that outlasted the loop (the close gave up on a stalled
            # disk, then the process stopped): nobody waits for its result,
            # and raising here printed a plain-text traceback at exit.
            with contextlib.suppress(RuntimeError):  # the event loop is closed
                loop.call_soon_threadsafe(_settle, done, result, error)


def _settle(done: asyncio.Future[Any], result: Any, error: Exception | None) -> None:
    if done.cancelled():
        return
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(result)


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
        self._writing: asyncio.Task[None] | None = None  # the last batch handed to the writing thread
        self._closed = False
        self._unmarked = 0  # events lost since the last `gap` line (dropped or lost in a write)
        self._pending_gaps: list[int] = []  # the counts of the `gap` lines in _pending
        # A reload came (a SIGHUP: logrotate's postrotate): the writing thread
        # looks whether the file was moved away before its next batch.
        self._reopen_due = False
        self._worker = FileWorker()
        self._digests: dict[str, str] | None = None  # of the configuration last written
        # Made once per process (build_gate, before the data plane starts): every
        # event after this line is this process's, judged by an engine that started
        # empty. The run id tells two processes apart whatever their clocks say.
        self.run = secrets.token_hex(8)
        self._line({"type": "start", "run": self.run, "pid": os.getpid(), "t": time.monotonic()})

    # --- observer hooks: the engine's inputs, in its order --------------------

    def on_attempt(self, conn: Connection, event: ev.Attempt, decision: Admit | Reject) -> None:
        # What the engine judged, whatever the data plane did: it admitted from
        # its table, which may not hold this judgement yet (a late refusal).
        judged = decision.reason if isinstance(decision, Reject) else "admit"
        self._add(event, conn.conn_id, judged)

    def on_rejected(self, conn: Connection, event: ev.Rejected) -> None:
        self._add(event, conn.conn_id)

    def on_handshake_failed(self, conn: Connection, event: ev.HandshakeFailed) -> None:
        self._add(event, conn.conn_id)

    def on_opened(self, conn: Connection, event: ev.Opened) -> None:
        self._add(event)

    def on_closed(self, conn: Connection, event: ev.Closed, stats: RelayStats) -> None:
        self._add(event)

    def on_answered(self, conn: Connection, event: ev.Answered) -> None:
        self._add(event, conn.conn_id)

    def on_lever(self, lever: Lever) -> None:
        record: dict[str, Any] = {"type": "lever", "kind": lever.kind, "t": lever.t}
        if lever.key:
            record["key"] = lever.key
        if lever.kind == "cooldown":
            record["duration"] = lever.duration
        elif lever.kind == "breaker_reset":
            record["breaker"], record["route"] = lever.breaker, lever.route
        elif lever.kind == "health":
            record["route"], record["ok"] = lever.route, lever.healthy
        elif lever.kind == "adopt" and lever.cooldown is not None:
            c = lever.cooldown
            record.update(remaining=c.remaining, rule=c.rule, repeat=c.repeat, enforced=c.enforced, force=c.force)
        record["origin"] = lever.origin or "admin"
        if self._room():
            self._line(record)

    def on_config(self, settings: Settings, info: dict[str, object]) -> None:
        """At the start and at each reload that applied: a `config` line (what
        the engine decides by from here). At every reload (SIGHUP), applied or
        not, a file moved away is followed by a new one at `record.path`:
        logrotate's `create` mode with `postrotate kill -HUP`, which must get
        its new file even when the configuration on disk is half-edited (nginx
        reopens its logs whatever its configuration says). The writing thread
        does it, before its next batch: done here, on the event loop, it waited
        for a write stalled on the disk, and the brain froze with it."""
        if self._closed:
            return
        if info.get("reload"):
            self._reopen_due = True
            if self._task is None:
                self._start()
            elif self._wakeup is not None:
                self._wakeup.set()
        reload = reload_applied(info)
        if not (reload or (not info.get("reload") and info.get("result") == "ok")):
            return
        if settings is None:
            return  # a caller with nothing to describe (a test of the reopening alone)
        digests = section_digests(settings)
        before, self._digests = self._digests, digests
        changed = [] if before is None else [name for name in ENGINE_SECTIONS if before.get(name) != digests[name]]
        self._line({
            "type": "config", "t": time.monotonic(), "reload": reload, "sections": digests, "changed": changed,
            # Inputs of the engine the recording does not hold: replay says so.
            # (Health check results are lever lines; older recordings had none:
            # `health_results` tells them apart.)
            "shared": settings.state.backend, "health_check": settings.health_check.enabled, "health_results": True,
        })  # fmt: skip

    # --- buffering -------------------------------------------------------------

    def _room(self) -> bool:
        """Whether a line may be buffered; if not, it is counted as dropped."""
        if self._closed:
            return False
        if len(self._pending) >= MAX_PENDING:
            self.dropped += 1
            self._unmarked += 1
            return False
        return True

    def _add(self, event: ev.Event, conn_id: ev.ConnId | None = None, judged: str | None = None) -> None:
        if not self._room():
            return
        record: dict[str, Any] = ev.to_dict(event)
        if conn_id is not None:  # the attempt's id from accept: it pairs the attempt's lines
            record["conn_id"] = conn_id
        if judged is not None:
            record["judged"] = judged
        self._line(record)
        self.recorded += 1
        if self._task is None:
            self._start()
        elif len(self._pending) >= FLUSH_LINES and self._wakeup is not None:
            self._wakeup.set()

    def _line(self, record: dict[str, Any]) -> None:
        if self._unmarked:
            # Where events went missing, so a replay can say its decisions after
            # this point may differ for want of them.
            lost, self._unmarked = self._unmarked, 0
            self._pending.append(_encode({"type": "gap", "lost": lost, "wall": round(time.time(), 6)}))
            self._pending_gaps.append(lost)
        record["wall"] = round(time.time(), 6)
        self._pending.append(_encode(record))

    def _start(self) -> None:
        # Started by the first event, so the recorder needs no start-up hook and
        # is always created inside the running loop it writes from.
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._writer(), name="loopwatch-recorder")

    async def _writer(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while not self._closed:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a
            # cancellation that comes as the wait ends (a wake-up, then the
            # stop in the same turn of the loop), and the writer went on
            # flushing for ever while the stop awaited it (a CI hang).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.flush_interval):
                    await self._wakeup.wait()
            self._wakeup.clear()
            await self._flush(loop)

    async def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        reopen, self._reopen_due = self._reopen_due, False
        if not self._pending and not reopen:
            return
        batch, self._pending = self._pending, []
        gaps, self._pending_gaps = self._pending_gaps, []
        # Shielded: shutdown cancels the writer, and a batch it was writing (in
        # its thread) must reach the file before the file is closed. Cancelled,
        # it went on in the thread, the final flush closed the file first, and
        # the thread found it closed: the batch lost, counted nowhere (the last
        # half-second of a process, seen in replay tests as 9 attempts missing).
        self._writing = loop.create_task(self._write(batch, gaps, reopen))
        await asyncio.shield(self._writing)

    async def _write(self, batch: list[bytes], gaps: list[int], reopen: bool) -> None:
        if reopen:
            try:
                if await self._worker.run(self.file.reopen):
                    log.info("record_reopened", extra={"fields": {"path": self.file.path}})
            except OSError as e:
                log.error("record_write_failed", extra={"fields": {"path": self.file.path, "error": str(e)}})
        if not batch:
            return
        try:
            await self._worker.run(lambda: self.file.write(batch))
        except OSError as e:
            self.write_errors += 1
            # At most: lines before a rotation in it may have been written. Its
            # `gap` lines are lost too, and what they counted with them: owed
            # to the next one (a full disk's gap line said 6 events of 993).
            events = len(batch) - len(gaps)
            self.lost += events
            self._unmarked += events + sum(gaps)
            if not self.failing:  # once an outage: a full disk must not flood the log
                self.failing = True
                log.error("record_write_failed", extra={"fields": {"path": self.file.path, "error": str(e)}})
            return
        if self.failing:
            self.failing = False
            log.warning("record_write_resumed", extra={"fields": {"path": self.file.path, "lost": self.lost}})

    async def aclose(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Write what is buffered and close the file, within `timeout`: a disk
        that does not answer leaves the last batches unwritten (said in a
        `record_close_timed_out` line), not the stop waiting (the sinks probe:
        30 s and more, past limits.shutdown_timeout)."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            async with asyncio.timeout(timeout):
                await self._finish()
        except TimeoutError:
            log.error("record_close_timed_out", extra={"fields": {
                "path": self.file.path, "seconds": timeout, "unwritten": len(self._pending),
            }})  # fmt: skip
        finally:
            self._worker.stop()

    async def _finish(self) -> None:
        if self._writing is not None:
            await asyncio.shield(self._writing)  # the batch the writer was writing when cancelled
        await self._flush(asyncio.get_running_loop())
        await self._worker.run(self.file.close)

    def stats(self) -> dict[str, int]:
        return {
            "recorded": self.recorded,
            "dropped": self.dropped,
            "write_errors": self.write_errors,
            "rotations": self.file.rotations,
            "pending": len(self._pending),
        }


def _encode(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


async def close_recorders(observers: Observers) -> None:
    """Flush and close every recorder among `observers` (at shutdown)."""
    for observer in observers.observers:
        if isinstance(observer, Recorder):
            await observer.aclose()
