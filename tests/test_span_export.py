"""The span exporter process (proxy/observe/span_export.py): a record crosses the pipe
without losing anything, the child exports what it is given and what is still
queued at shutdown, a child that dies is replaced and what was lost is counted,
a stalled child costs spans rather than the event loop, and the child never
outlives loopwatch."""

from __future__ import annotations

import itertools
import json
import logging
import marshal
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanContext, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from loopwatch.proxy.observe import span_export
from loopwatch.proxy.observe.span_export import (
    CHILD_NICENESS,
    CloseValues,
    ProcessSpanSink,
    Record,
    RequestValues,
    SdkParts,
    SpanEvent,
    SpanStatus,
    from_wire,
    to_wire,
)
from loopwatch.proxy.observe.tracing import ConnTrace, readable_span

FACTORY = "tests.test_span_export:file_exporters"
# The child runs with -P (the current directory is not on its path): the tests
# package that holds FACTORY reaches it through PYTHONPATH.
ON_PATH = {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
PARTS = SdkParts()


class FileExporter(SpanExporter):
    """One JSON line per exported span, in the file $LW_SPAN_FILE (the child's)."""

    def __init__(self, path: str):
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:  # type: ignore[override]
        with open(self.path, "a") as f:
            for span in spans:
                f.write(json.dumps(summary(span)) + "\n")
        return SpanExportResult.SUCCESS


def file_exporters() -> list[SpanExporter]:
    return [FileExporter(os.environ["LW_SPAN_FILE"])]


class BrokenExporter(SpanExporter):
    """An exporter whose every export raises (the SDK logs it)."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        raise ConnectionError("collector unreachable")


def broken_exporters() -> list[SpanExporter]:
    return [BrokenExporter()]


class SlowExporter(SpanExporter):
    """A collector that takes its time, then refuses every other batch: its spans
    are written to $LW_SPAN_FILE only when accepted."""

    def __init__(self, path: str):
        self.path = path
        self.calls = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:  # type: ignore[override]
        time.sleep(0.05)
        self.calls += 1
        if self.calls % 2 == 0:
            return SpanExportResult.FAILURE
        with open(self.path, "a") as f:
            f.write("".join(f"{span.context.span_id}\n" for span in spans))
        return SpanExportResult.SUCCESS


def slow_exporters() -> list[SpanExporter]:
    return [SlowExporter(os.environ["LW_SPAN_FILE"])]


class StuckExporter(SpanExporter):
    """A collector that never answers (until the child is killed)."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:  # type: ignore[override]
        time.sleep(60)
        return SpanExportResult.SUCCESS


def stuck_exporters() -> list[SpanExporter]:
    return [StuckExporter()]


def summary(span: ReadableSpan) -> dict[str, Any]:
    """What an exporter sees of a span, as plain comparable data."""
    parent = span.parent
    return {
        "name": span.name,
        "context": [span.context.trace_id, span.context.span_id, int(span.context.trace_flags),
                    span.context.trace_state.to_header() if span.context.trace_state else None],
        "parent": None if parent is None else [parent.trace_id, parent.span_id, int(parent.trace_flags),
                                              parent.is_remote, parent.trace_state.to_header()],
        "attributes": {k: list(v) if isinstance(v, tuple) else v for k, v in (span.attributes or {}).items()},
        "events": [[e.name, dict(e.attributes or {}), e.timestamp] for e in span.events],
        "status": [span.status.status_code.value, span.status.description],
        "times": [span.start_time, span.end_time],
        "kind": span.kind.value,
        "resource": dict(span.resource.attributes),
    }  # fmt: skip


def exported(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def trace(i: int, **extra: Any) -> ConnTrace:
    t = ConnTrace(
        0x4BF92F3577B34DA6A3CE929D0E0E4736 + i, 0x00F067AA0BA902B7 + i, 3, None, None,
        1_700_000_000_000_000_000 + i, True,
        RequestValues("/room", "127.0.0.1", "/", f"user-{i}@127.0.0.1", b"lw:8080", None),
    )  # fmt: skip
    t.close = CloseValues(i, 1000, "", "client", 0.5, 1, 2, 30, 40)
    for k, v in extra.items():
        setattr(t, k, v)
    return t


def records(start: int, n: int) -> list[Record]:
    return [trace(i).record(2_000_000_000_000_000_000 + i) for i in range(start, start + n)]


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[tuple[ProcessSpanSink, Path]]:
    out = tmp_path / "spans.jsonl"
    s = ProcessSpanSink(env={"LW_SPAN_FILE": str(out), **ON_PATH}, exporter_factory=FACTORY)
    try:
        yield s, out
    finally:
        s.shutdown()


# --- the record ------------------------------------------------------------------------------

attr_values = st.one_of(
    st.text(max_size=20), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False), st.booleans(),
    st.lists(st.text(max_size=5), max_size=3).map(tuple),
)  # fmt: skip
attrs = st.dictionaries(st.text(min_size=1, max_size=12), attr_values, max_size=4)
states = st.none() | st.dictionaries(
    st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True), st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True),
    min_size=1, max_size=3,
).map(lambda d: TraceState(list(d.items())))  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(
    ids=st.tuples(st.integers(1, 2**128 - 1), st.integers(1, 2**64 - 1)),
    flags=st.sampled_from([0, 1, 2, 3]),
    state=states,
    parent=st.none() | st.tuples(st.integers(1, 2**128 - 1), st.integers(1, 2**64 - 1), st.booleans(), states),
    agent=st.none() | st.binary(max_size=20),
    host=st.none() | st.sampled_from([b"", b"example.com:8080", b"[::1]:80", b"lw"]),
    extra=st.none() | attrs,
    closed=st.booleans(),
    events=st.lists(st.tuples(st.text(min_size=1, max_size=10), attrs, st.integers(0, 2**63 - 1)), max_size=3),
    status=st.none() | st.tuples(st.just(StatusCode.ERROR.value), st.none() | st.text(max_size=20)),
)
def test_a_record_crosses_the_pipe_unchanged(
    ids: tuple[int, int], flags: int, state: TraceState | None, parent: Any, agent: bytes | None,
    host: bytes | None, extra: dict[str, Any] | None, closed: bool, events: list[Any], status: Any,
) -> None:  # fmt: skip
    remote = None
    if parent is not None:
        remote = SpanContext(parent[0], parent[1], is_remote=parent[2], trace_flags=TraceFlags(1),
                             trace_state=parent[3])  # fmt: skip
    t = ConnTrace(
        ids[0], ids[1], flags, state, remote, 10, True,
        RequestValues("/x", "10.0.0.1", "/x", "k@10.0.0.1", host, agent), extra,
        CloseValues(7, 1008, "no", "upstream", 0.01, 1, 2, 3, 4) if closed else None,
        [SpanEvent(*e) for e in events] or None, None if status is None else SpanStatus(*status),
    )  # fmt: skip
    record = t.record(20)
    with pytest.raises(ValueError):  # marshal carries plain tuples only: the pipe converts
        marshal.dumps(record)
    wire = marshal.loads(marshal.dumps(to_wire(record)))
    assert from_wire(wire) == record  # the round trip, every field by name
    direct = readable_span(record, PARTS.resource, PARTS.scope)
    piped = readable_span(from_wire(wire), PARTS.resource, PARTS.scope)
    assert summary(piped) == summary(direct)
    assert piped.context.trace_id == ids[0] and piped.context.span_id == ids[1]
    assert piped.name == "WebSocket /x"  # the route's
    assert (piped.parent is None) == (parent is None)
    header = piped.context.trace_state.to_header() if piped.context.trace_state else None
    assert header == (state.to_header() if state else None)
    if parent is not None:
        assert piped.parent is not None and piped.parent.is_remote == parent[2]
        assert piped.parent.trace_state.to_header() == (parent[3].to_header() if parent[3] else "")
    assert piped.status.status_code.value == (status[0] if status else StatusCode.UNSET.value)
    a = dict(piped.attributes or {})
    assert a["url.path"] == "/x" and a["loopwatch.client.key_hash"] != "k@10.0.0.1"
    if closed:
        assert a["loopwatch.close.code"] == 1008 and a["http.response.status_code"] == 101
    assert [e.name for e in piped.events] == [e[0] for e in events]


# --- the child process -------------------------------------------------------------------------


def test_the_child_exports_what_it_is_given_and_what_is_queued_at_shutdown(tmp_path: Path) -> None:
    out = tmp_path / "spans.jsonl"
    s = ProcessSpanSink(env={"LW_SPAN_FILE": str(out), "OTEL_SERVICE_NAME": "edge", **ON_PATH}, exporter_factory=FACTORY)
    child = s.child
    assert child is not None
    s.submit(records(0, 3))
    assert s.force_flush(10_000)
    # Background work: batch scheduling, below loopwatch's priority.
    assert os.sched_getscheduler(child.pid) == os.SCHED_BATCH
    assert os.getpriority(os.PRIO_PROCESS, child.pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + CHILD_NICENESS)
    got = exported(out)
    want = [summary(readable_span(r, PARTS.resource, PARTS.scope)) for r in records(0, 3)]
    for g, w in zip(got, want, strict=True):
        assert g["resource"]["service.name"] == "edge"  # the child reads the environment itself
        g.pop("resource"), w.pop("resource")
        assert g == w
    s.submit(records(3, 500))  # no flush: shutdown hands them over and the child exports them
    s.shutdown()
    assert child.returncode == 0
    assert [e["context"][1] for e in exported(out)] == [r.span_id for r in records(0, 503)]
    assert s.dropped == 0


def test_a_dead_child_is_replaced_and_the_lost_spans_counted(
    sink: tuple[ProcessSpanSink, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    s, out = sink
    monkeypatch.setattr(span_export, "RESPAWN_INTERVAL", 0.5)
    first = s.child
    assert first is not None
    first.kill()
    first.wait()
    with caplog.at_level(logging.ERROR, logger="loopwatch.tracing"):
        s._spawned_at = time.monotonic()  # it "just" started: the next batch finds it dead, too soon to restart
        s.submit(records(0, 2))
        wait_for_sync(lambda: s.dropped == 2)
    assert [r.message for r in caplog.records] == ["span_exporter_exited"]
    time.sleep(0.6)
    s.submit(records(2, 2))
    assert s.force_flush(10_000)
    assert s.child is not None and s.child.pid != first.pid
    assert [e["context"][1] for e in exported(out)] == [r.span_id for r in records(2, 2)]
    assert s.dropped == 2
    assert s.exported == 2


def exporters_that_cannot_be_made() -> list[SpanExporter]:
    raise ValueError("max_export_batch_size must be less than or equal to max_queue_size.")


def test_a_child_that_dies_at_its_start_is_tried_less_and_less_often_and_says_why_in_json(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The sinks probe: an exporter the child could not make (the SDK refused
    its batch settings) killed it at every start, once a second for ever: a
    plain-text traceback each time in the JSON log, and a third of a core."""
    monkeypatch.setattr(span_export, "RESPAWN_INTERVAL", 0.25)
    starts: list[float] = []
    spawn = ProcessSpanSink._spawn

    def counted(self: ProcessSpanSink) -> None:
        starts.append(time.monotonic())
        spawn(self)

    monkeypatch.setattr(ProcessSpanSink, "_spawn", counted)
    s = ProcessSpanSink(env=dict(ON_PATH), exporter_factory="tests.test_span_export:exporters_that_cannot_be_made")
    try:
        deadline = time.monotonic() + 30
        while len(starts) < 4:
            assert time.monotonic() < deadline
            s.submit(records(0, 1))
            time.sleep(0.02)
    finally:
        s.shutdown()
    # 0.25 s, then 0.5, then 1: each wait twice the one before (at least).
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert all(gap >= 0.25 * 2**i for i, gap in enumerate(gaps)), gaps
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert lines and all(json.loads(line)["event"] in ("span_exporter_start_failed", "span_exporter_exited")
                         for line in lines), lines[:3]  # fmt: skip


def test_a_stalled_child_costs_spans_not_the_event_loop(tmp_path: Path) -> None:
    out = tmp_path / "spans.jsonl"
    # The SDK's queue in the child holds all that arrives once it runs again.
    env = {"LW_SPAN_FILE": str(out), "OTEL_BSP_MAX_QUEUE_SIZE": "100000", **ON_PATH}
    s = ProcessSpanSink(env=env, exporter_factory=FACTORY)
    assert s.force_flush(10_000)  # the child is up
    child = s.child
    assert child is not None
    os.kill(child.pid, signal.SIGSTOP)
    try:
        batch = records(0, 10)
        slowest, submitted = 0.0, 0
        for _ in range(span_export.QUEUE_SPANS // len(batch) + 200):  # far more than the pipe and the queue hold
            t0 = time.perf_counter()
            s.submit(batch)
            slowest = max(slowest, time.perf_counter() - t0)
            submitted += len(batch)
        assert slowest < 0.05  # never waits on the child
        wait_for_sync(lambda: s.dropped > 0)
    finally:
        os.kill(child.pid, signal.SIGCONT)
    try:
        assert s.force_flush(30_000)
        assert len(exported(out)) + s.dropped == submitted
    finally:
        s.shutdown()


def test_the_queue_is_bounded_in_spans_however_large_the_batches(tmp_path: Path) -> None:
    """A batch is every span that ended in 50 ms, as many as the traffic makes:
    bounded in batches (256), a stalled child let 43 000 spans (800 MB of the
    proxy's memory) wait at 3 400 connections a second."""
    out = tmp_path / "spans.jsonl"
    env = {"LW_SPAN_FILE": str(out), "OTEL_BSP_MAX_QUEUE_SIZE": "100000", **ON_PATH}
    s = ProcessSpanSink(env=env, exporter_factory=FACTORY)
    assert s.force_flush(10_000)
    child = s.child
    assert child is not None
    os.kill(child.pid, signal.SIGSTOP)
    try:
        batch = records(0, 500)
        for _ in range(60):  # 30 000 spans, 60 batches
            s.submit(batch)
            assert s.queued <= span_export.QUEUE_SPANS
        # What the pipe and the writer's batch in hand took aside, the rest was refused.
        wait_for_sync(lambda: s.dropped >= 30_000 - span_export.QUEUE_SPANS - 10 * len(batch))
    finally:
        os.kill(child.pid, signal.SIGCONT)
    try:
        assert s.force_flush(30_000)
        assert len(exported(out)) + s.dropped == 30_000
    finally:
        s.shutdown()


def test_a_value_marshal_cannot_carry_drops_that_span_only(sink: tuple[ProcessSpanSink, Path]) -> None:
    s, out = sink
    bad = trace(1, extra={"weird": object()}).record(5)
    s.submit([records(0, 1)[0], bad, records(2, 1)[0]])
    assert s.force_flush(10_000)
    assert [e["context"][1] for e in exported(out)] == [records(0, 1)[0].span_id, records(2, 1)[0].span_id]
    assert s.dropped == 1
    s.submit([bad])  # a batch of nothing else: that one span is counted once, not twice
    assert s.force_flush(10_000)
    assert s.dropped == 2 and len(exported(out)) == 2


def test_the_child_exits_when_loopwatch_is_killed(tmp_path: Path) -> None:
    out = tmp_path / "spans.jsonl"
    script = textwrap.dedent(f"""
        import os, sys, time
        from loopwatch.proxy.observe.span_export import ProcessSpanSink
        from tests.test_span_export import records
        s = ProcessSpanSink(env={{"LW_SPAN_FILE": {str(out)!r}, **{ON_PATH!r}}}, exporter_factory={FACTORY!r})
        s.submit(records(0, 5))
        assert s.force_flush(10_000)
        s.submit(records(5, 5))
        print(s.child.pid, flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        wait_for_sync(lambda: len(exported(out)) >= 5)
        parent.kill()  # SIGKILL: no shutdown, no flush
        parent.wait()
        wait_for_sync(lambda: not Path(f"/proc/{child_pid}").exists() or _zombie(child_pid), timeout=15)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
    assert len(exported(out)) in (5, 10)  # what it had read, it exported before leaving


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_for_sync(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)



def test_the_stop_waits_a_bounded_time_for_a_child_that_does_not_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a collector that never answers the child cannot finish its last
    export: the stop waited 30 s for it, past the shipped grace period
    (terminationGracePeriodSeconds 30 after shutdown_timeout 10)."""
    monkeypatch.setattr(span_export, "CHILD_EXIT_WAIT", 0.5)
    s = ProcessSpanSink(env={"LW_SPAN_FILE": str(tmp_path / "spans.jsonl"), **ON_PATH}, exporter_factory=FACTORY)
    assert s.force_flush(10_000)  # the child is up
    child = s.child
    assert child is not None
    os.kill(child.pid, signal.SIGSTOP)  # as stuck as an export that never returns
    start = time.monotonic()
    s.shutdown()
    assert time.monotonic() - start < 5
    assert child.poll() is not None  # stopped for good


def test_the_childs_own_log_lines_are_json(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The SDK's warnings in the child (an export failing, a full queue) came out
    as Python's last-resort plain text on loopwatch's stderr: a JSON log
    pipeline got lines it could not parse."""
    s = ProcessSpanSink(env=dict(ON_PATH), exporter_factory="tests.test_span_export:broken_exporters")
    try:
        s.submit(records(0, 3))
        assert s.force_flush(10_000)
    finally:
        s.shutdown()
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert lines, "the SDK said nothing of the failed export"
    for line in lines:
        assert json.loads(line)["level"] in ("warning", "error"), line


def test_every_span_the_child_loses_is_counted(tmp_path: Path) -> None:
    """A collector slower than the traffic and refusing half its batches: the
    child's SDK queue overflows and batches fail. Each such span is counted in
    `dropped` (loopwatch_spans_dropped_total), which said 0 while a collector
    outage lost 1 252 of 3 300 spans (the telemetry probe): delivered and
    dropped add up to what was made."""
    out = tmp_path / "spans.txt"
    env = {"LW_SPAN_FILE": str(out), "OTEL_BSP_MAX_QUEUE_SIZE": "20", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "10",
           "OTEL_BSP_SCHEDULE_DELAY": "10", **ON_PATH}  # fmt: skip
    s = ProcessSpanSink(env=env, exporter_factory="tests.test_span_export:slow_exporters")
    try:
        for start in range(0, 300, 50):
            s.submit(records(start, 50))
        assert s.force_flush(30_000)
        delivered = len(out.read_text().splitlines()) if out.exists() else 0
        assert 0 < delivered < 300
        assert s.dropped == 300 - delivered
        # And what was delivered, counted (the sinks probe: a collector that
        # takes requests and never answers showed as nothing at all, no drop
        # for half an hour; now as no span exported).
        assert s.exported == delivered
    finally:
        s.shutdown()


def test_the_spans_a_killed_child_held_are_counted(tmp_path: Path) -> None:
    """The child killed mid-export (`kill -9`, the OOM killer) took the spans it
    held with it: 105 of 123 lost with the metric at 0 (the probe). What it was
    handed and never reported delivered or lost is counted when it is found
    dead; a child that ends normally leaves nothing unsettled (the test above)."""
    env = {"OTEL_BSP_SCHEDULE_DELAY": "10", **ON_PATH}
    s = ProcessSpanSink(env=env, exporter_factory="tests.test_span_export:stuck_exporters")
    try:
        s.submit(records(0, 40))
        deadline = time.monotonic() + 10
        while s.queue.qsize() and time.monotonic() < deadline:  # handed to the child
            time.sleep(0.05)
        time.sleep(0.5)
        assert s.child is not None and s.dropped == 0
        os.kill(s.child.pid, signal.SIGKILL)
        s.child.wait()
        time.sleep(1.1)  # past RESPAWN_INTERVAL: the flush finds it dead and starts another
        s.force_flush(5_000)
        assert s.dropped == 40
    finally:
        s.shutdown()


class Collector:
    """A fake OTLP/HTTP collector on loopback: each request is answered by
    `answer(connection)`; what it could send before the exporter let go is kept."""

    def __init__(self, answer: Callable[[socket.socket], None]) -> None:
        self.answer = answer
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections = 0
        self.cut = threading.Event()  # the exporter closed while an answer was being sent
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as requests:
            try:
                while self._request(requests):
                    self.answer(conn)
            except OSError:
                self.cut.set()

    @staticmethod
    def _request(requests: Any) -> bool:
        """Read one whole request (its head, then Content-Length bytes of
        body); False at the end of the connection."""
        length = None
        while (line := requests.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if not line:
            return False
        assert length is not None, "the exporter sends a Content-Length"
        requests.read(length)
        return True

    def exporter(self, monkeypatch: pytest.MonkeyPatch) -> SpanExporter:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"http://127.0.0.1:{self.port}/v1/traces")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
        (exporter,) = span_export.exporters_from_env({"OTEL_TRACES_EXPORTER": "otlp"})
        return exporter


def export_in_time(exporter: SpanExporter) -> SpanExportResult:
    """One span exported; the export must end (a hung one fails the test, not the run)."""
    results: list[SpanExportResult] = []
    spans = [readable_span(r, PARTS.resource, PARTS.scope) for r in records(0, 1)]
    worker = threading.Thread(target=lambda: results.append(exporter.export(spans)), daemon=True)
    worker.start()
    worker.join(30)
    assert results, "the export did not end"
    return results[0]


CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


def endless_answer(conn: socket.socket) -> None:
    conn.sendall(CHUNKED)
    while True:
        conn.sendall(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")


def trickled(head: bytes, unit: bytes) -> Callable[[socket.socket], None]:
    """An answer that sends `head`, then `unit` every 0.1 s for ever."""

    def answer(conn: socket.socket) -> None:
        conn.sendall(head)
        while True:
            conn.sendall(unit)
            time.sleep(0.1)

    return answer


trickled_answer = trickled(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", b"x")
# One read of the body is one chunk-size line: a byte at a time, for ever.
trickled_chunk_size = trickled(CHUNKED + b"1;", b"a")
# The same, on an answer that says it will close: http.client takes the socket
# from the connection (the new6 probe: the export hung for good).
trickled_chunk_size_closing = trickled(
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n1;", b"a"
)
trickled_trailers = trickled(CHUNKED + b"2\r\nok\r\n0\r\n", b"X-More: y\r\n")


@pytest.mark.parametrize(
    "answer",
    [endless_answer, trickled_answer, trickled_chunk_size, trickled_chunk_size_closing, trickled_trailers],
    ids=["endless", "trickled", "chunk-size", "chunk-size-closing", "trailers"],
)
def test_a_collectors_answer_is_read_bounded_in_bytes_and_time(
    answer: Callable[[socket.socket], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sinks probe: the SDK read a collector's answer whole (200 MiB took
    137 MB into the child), and with its timeout per read a collector that
    trickled its answer held the export for good. The status is what counts:
    at most MAX_ANSWER bytes, within the export's timeout, then the
    connection is let go."""
    collector = Collector(answer)
    exporter = collector.exporter(monkeypatch)
    assert export_in_time(exporter) is SpanExportResult.SUCCESS  # its status was 200
    assert collector.cut.wait(10)  # the exporter closed the connection mid-answer
    assert export_in_time(exporter) is SpanExportResult.SUCCESS
    assert collector.connections == 2  # a connection let go is not reused
    exporter.shutdown()


def test_a_whole_answer_keeps_its_connection_for_the_next_export(monkeypatch: pytest.MonkeyPatch) -> None:
    collector = Collector(lambda conn: conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    exporter = collector.exporter(monkeypatch)
    for _ in range(3):
        assert export_in_time(exporter) is SpanExportResult.SUCCESS
    assert collector.connections == 1 and not collector.cut.is_set()
    exporter.shutdown()


def test_a_credential_providers_session_is_the_sdks_to_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """A session from OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER (an
    entry point) is not replaced by the bounded one: the SDK loads it."""
    monkeypatch.setenv("OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER", "no-such-provider")
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER": "no-such-provider"}
    with pytest.raises(RuntimeError, match="no-such-provider"):
        span_export.exporters_from_env(env)


def test_the_otlp_certificate_wins_over_the_requests_ca_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    """The new4 probe: with REQUESTS_CA_BUNDLE set (many images set it),
    requests verified the collector with that bundle, not the one
    OTEL_EXPORTER_OTLP_CERTIFICATE names: every export to a collector with a
    private CA failed."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    session = span_export.bounded_session()
    session.verify = "/etc/loopwatch/collector-ca.pem"  # as the exporter sets it
    merged = session.merge_environment_settings("https://collector:4318/v1/traces", {}, False, None, None)
    assert merged["verify"] == "/etc/loopwatch/collector-ca.pem"
    session.verify = True  # no certificate named: the environment's bundle, as requests does
    merged = session.merge_environment_settings("https://collector:4318/v1/traces", {}, False, None, None)
    assert merged["verify"] == "/etc/ssl/certs/ca-certificates.crt"


def test_the_timer_cuts_a_socket_behind_an_https_proxy_too() -> None:
    """The new5 probe: through an HTTPS proxy the connection's socket is
    urllib3's SSLTransport, which has no shutdown(): the timer raised
    AttributeError (a traceback in the log) and a trickled answer held the
    export for good. The socket it wraps is cut."""

    class Wrapped:  # as SSLTransport: the real socket in `.socket`, no shutdown()
        def __init__(self, sock: socket.socket) -> None:
            self.socket = sock

    ours, theirs = socket.socketpair()
    with ours, theirs:
        span_export._shut(object(), Wrapped(ours))
        assert theirs.recv(1) == b""  # cut: the peer sees the end
        span_export._shut(object(), object())  # nothing to cut: nothing raised
