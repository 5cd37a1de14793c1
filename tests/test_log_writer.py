"""loopwatch never waits for its log (proxy/observe/logs.py, LogWriter).

Written synchronously, a stderr nobody read (a full pipe, a stalled log
shipper) blocked the event loop in write(): detection stopped, the admin port
and /metrics stopped answering, SIGTERM went unheard.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterator

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loopwatch.proxy.observe.logs import JsonFormatter, LogWriter, TextFormatter
from tests.clients import attempt
from tests.conftest import free_port
from tests.processes import loopwatch_run
from tests.test_service_links import process_env


@contextlib.contextmanager
def piped_logger(
    name: str, max_queued: int, formatter: logging.Formatter
) -> Iterator[tuple[logging.Logger, LogWriter, int]]:
    """A logger writing through a LogWriter into a pipe nobody reads yet: the
    logger, the writer and the pipe's read end."""
    read_end, write_end = os.pipe()
    stream = io.TextIOWrapper(os.fdopen(write_end, "wb", buffering=0), write_through=True)
    writer = LogWriter(stream, max_queued=max_queued)
    writer.setFormatter(formatter)
    logger = logging.getLogger(name)
    logger.propagate = False
    logger.addHandler(writer)
    try:
        yield logger, writer, read_end
    finally:
        logger.removeHandler(writer)
        os.close(read_end)


def test_a_full_queue_drops_lines_counts_them_and_says_so_later() -> None:
    with piped_logger("test.log_writer", 5, JsonFormatter()) as (logger, writer, read_end):
        line = "x" * 1000
        start = time.monotonic()
        for i in range(500):  # ~500 KB: far more than the pipe holds, nobody reading
            logger.warning("filler", extra={"fields": {"i": i, "pad": line}})
        assert time.monotonic() - start < 1.0  # the caller never waited for the pipe
        assert writer.dropped > 0
        dropped = writer.dropped
        # The reader comes back: what was queued is written, then the count of what was not.
        received = b""
        os.set_blocking(read_end, False)
        deadline = time.monotonic() + 10

        def read() -> None:
            nonlocal received
            try:
                received += os.read(read_end, 1 << 20)
            except BlockingIOError:
                time.sleep(0.01)

        while writer.written < writer.queued and time.monotonic() < deadline:
            read()
        logger.warning("after")
        while b'"event": "after"' not in received and time.monotonic() < deadline:
            read()
        lines = [json.loads(x) for x in received.decode().splitlines()]
        reports = [x for x in lines if x["event"] == "log_lines_dropped"]
        assert sum(x["count"] for x in reports) == dropped and {x["level"] for x in reports} == {"warning"}
        assert lines[-1]["event"] == "after"
        assert len(lines) == 500 - dropped + len(reports) + 1


def test_the_dropped_count_is_written_in_the_text_format_too() -> None:
    """With `logging.format: text` the drop report is a text line like the
    others, not a JSON line among them."""
    with piped_logger("test.log_writer.text", 2, TextFormatter()) as (logger, writer, read_end):
        for i in range(200):  # 200 KB into a 64 KiB pipe nobody reads: lines dropped
            logger.warning("filler", extra={"fields": {"i": i, "pad": "x" * 1000}})
        dropped = writer.dropped
        assert dropped > 0
        received = b""
        deadline = time.monotonic() + 10
        os.set_blocking(read_end, False)

        def reports() -> list[str]:
            return [x for x in received.decode().splitlines() if "log_lines_dropped" in x]

        # The writer may report while the lines are still being dropped: one
        # report then, one for the rest later (a CI run: count=177 of 196).
        said = 0
        while said < dropped and time.monotonic() < deadline:
            try:
                received += os.read(read_end, 1 << 20)
            except BlockingIOError:
                time.sleep(0.01)
                if writer.written == writer.queued:
                    logger.warning("after")  # a report comes before the next line
            said = sum(int(x.split("count=")[1].split()[0]) for x in reports())
        assert said == dropped
        for report in reports():
            assert not report.startswith("{")
            assert report.split()[2:4] == ["warning", "log_lines_dropped"]
            assert report.split()[5:] == ["reason=queue_full"]


def test_lines_a_full_disk_loses_are_counted_and_the_next_begins_on_a_line_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sinks probe: stderr to a file on a disk that filled up. The lines
    that failed were counted as written (loopwatch_log_lines_dropped_total
    stayed 0, 217 lines gone), and the first line after the disk had room
    again was glued to the half-line the full disk had torn: one line no JSON
    reader takes."""
    real_write = os.write
    state = {"full": False, "torn": False}

    def write(fd: int, data: bytes) -> int:
        if state["torn"]:  # the disk fills in the middle of this line
            state["torn"], state["full"] = False, True
            return real_write(fd, bytes(data[:10]))
        if state["full"]:
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    with piped_logger("test.log_writer.full", 100, JsonFormatter()) as (logger, writer, read_end):
        logger.warning("before")
        wait(lambda: writer.written == writer.queued)
        monkeypatch.setattr(os, "write", write)
        state["torn"] = True
        for i in range(5):
            logger.warning("lost", extra={"fields": {"i": i}})
        wait(lambda: writer.written == writer.queued)
        state["full"] = False  # room again
        logger.warning("after")
        wait(lambda: writer.written == writer.queued)
        monkeypatch.setattr(os, "write", real_write)
        received = os.read(read_end, 1 << 20).decode()
    assert writer.failed == 5 and writer.dropped == 0
    whole = [json.loads(line) for line in received.splitlines()[:1] + received.splitlines()[2:]]
    assert received.splitlines()[1].startswith('{"ts"')  # the torn half-line, alone on its line
    assert [(x["event"], x.get("count"), x.get("reason")) for x in whole] == [
        ("before", None, None), ("log_lines_dropped", 5, "write_error"), ("after", None, None),
    ]  # fmt: skip


def wait(done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5
    while not done():
        assert time.monotonic() < deadline
        time.sleep(0.005)


ATTEMPTS = ("loopwatch_connection_attempts_total", ())  # summed over its labels by scrape()


async def scrape(admin: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The admin port's /metrics samples by (name, labels), with the attempts
    summed under ATTEMPTS."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{admin}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r,
    ):
        text = await r.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    samples[ATTEMPTS] = sum(v for (name, _), v in samples.items() if name == ATTEMPTS[0])
    return samples


async def test_a_stalled_log_reader_stops_nothing() -> None:
    """`loopwatch run` with access lines on and its stderr never read past the
    start: the brain goes on judging attempts, the admin port answers, and
    SIGTERM ends it (loopwatch_run asserts exit 0 within 20 s)."""
    # Refusals answered at once (no hold): the upstream breaker opens on the way.
    env = process_env({"LOOPWATCH_TELEMETRY__ACCESS_LOG": "all", "LOOPWATCH_POLICY__HOLD": "0s"})
    args = ("--upstream", f"ws://127.0.0.1:{free_port()}", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0")
    async with loopwatch_run(*args, env=env) as run:
        listening = await run.until("listening")
        proxy, admin = listening["proxy"], listening["admin"]
        # From here nobody reads stderr: its pipe (64 KiB) fills after ~200 lines.
        for i in range(1_500):
            await attempt(f"ws://{proxy}/ws?i={i}")
        # Every one judged by the brain, none lost (the last events may still be
        # on their way from the data plane when the last client is answered).
        deadline = asyncio.get_running_loop().time() + 10
        while (samples := await scrape(admin))[ATTEMPTS] < 1_500:
            assert asyncio.get_running_loop().time() < deadline, samples[ATTEMPTS]
            await asyncio.sleep(0.05)
        assert samples[ATTEMPTS] == 1_500
        assert samples[("loopwatch_log_lines_dropped_total", (("reason", "queue_full"),))] == 0  # 1 500 fit the queue
        assert samples[("loopwatch_log_lines_dropped_total", (("reason", "write_error"),))] == 0
        # The reader is back (asyncio also needs the pipe's end to see the exit).
        rest = asyncio.create_task(run.proc.stderr.read())  # type: ignore[union-attr]
    # Nothing was lost: every attempt's access line, and the lines of the stop.
    lines = [json.loads(x) for x in (await asyncio.wait_for(rest, 10)).splitlines()]
    assert sum(x["event"] == "access" for x in lines) == 1_500
    assert lines[-1]["event"] == "stopped"
